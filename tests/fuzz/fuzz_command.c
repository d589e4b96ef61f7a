/* libFuzzer: command payloads from MQTT. Parsing and validation must answer every input with
 * a result, never crash, and never produce a raw value outside the tag's type. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    smp_cmd_t c;
    smp_cmd_error_t err;
    int rc = smp_cmd_parse(data, size, &c, &err);
    if (rc < 0 && (err.code == NULL || strcmp(err.code, "bad_request") != 0)) {
        abort();
    }
    if (rc == 0 && c.op == SMP_CMD_WRITE) {
        static const smp_type_t types[] = {
            SMP_TYPE_BOOL,  SMP_TYPE_INT16,  SMP_TYPE_UINT16,  SMP_TYPE_INT32,   SMP_TYPE_UINT32,
            SMP_TYPE_INT64, SMP_TYPE_UINT64, SMP_TYPE_FLOAT32, SMP_TYPE_FLOAT64, SMP_TYPE_STRING};
        for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
            smp_tag_cfg_t tag;
            memset(&tag, 0, sizeof tag);
            tag.name = "t";
            tag.type = types[k];
            tag.scale = (size & 1) ? 0.1 : 1;
            tag.writable = true;
            smp_value_t raw;
            char *owned = NULL;
            smp_cmd_error_t verr;
            memset(&verr, 0, sizeof verr);
            if (smp_cmd_to_raw(&tag, c.value, &raw, &owned, &verr) == 0) {
                if (tag.type == SMP_TYPE_UINT16 && raw.v.u > 65535) {
                    abort();
                }
                if (tag.type == SMP_TYPE_INT16 && (raw.v.i < -32768 || raw.v.i > 32767)) {
                    abort();
                }
            }
            free(owned);
        }
    }
    smp_cmd_free(&c);
    return 0;
}
