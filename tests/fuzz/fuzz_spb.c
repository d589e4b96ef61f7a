/* libFuzzer: Sparkplug B payloads from MQTT (NCMD, DCMD). Decoding must answer every input
 * with a payload or an error, never crash or leak, and whatever it decodes must encode again
 * with the datatypes it declares or be refused cleanly. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "spb_codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    smp_spb_payload_t p;
    int rc = smp_spb_decode(data, size, &p);
    if (rc < 0) {
        if (rc != -EINVAL && rc != -EMSGSIZE && rc != -ENOMEM) {
            abort();
        }
        if (p.n != 0 || p.metrics != NULL) {
            abort();
        }
        return 0;
    }
    for (size_t k = 0; k < p.n; k++) {
        const smp_spb_in_metric_t *in = &p.metrics[k];
        smp_spb_metric_t m = {.name = in->name,
                              .has_alias = in->has_alias,
                              .alias = in->alias,
                              .has_ts = in->has_ts,
                              .ts = in->ts,
                              .datatype = in->has_datatype ? in->datatype : 0,
                              .is_null = in->is_null,
                              .value = &in->value};
        uint8_t *buf = NULL;
        size_t len = 0;
        rc = smp_spb_encode(p.ts, p.has_seq ? (int64_t)(p.seq & 0xff) : -1, &m, 1, &buf, &len);
        if (rc == 0) {
            smp_spb_payload_t again;
            if (smp_spb_decode(buf, len, &again) != 0 || again.n != 1) {
                abort();
            }
            smp_spb_payload_free(&again);
        } else if (rc != -EINVAL || buf != NULL) {
            abort();
        }
        free(buf);
    }
    smp_spb_payload_free(&p);
    return 0;
}
