/* libFuzzer: a command delivery as the bridge hands it over — topic, MQTT 5 properties
 * (Response Topic, Correlation Data), the retain flag — and its payload. Whatever arrives, the
 * classification and the parse never crash, a retained delivery is always refused, an answer
 * never goes outside PREFIX/GATEWAY_ID/reply/, and a deadline never overflows.
 *
 * Input: byte 0 flags (bit 0 retained, bit 1 Response Topic present, bit 2 Correlation Data
 * present), then three strings each preceded by a length byte (topic, Response Topic,
 * Correlation Data), then the payload. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "command.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char PREFIX[] = "simpul";
static const char GW[] = "gw-1";

/* Takes a length byte and that many bytes as a NUL-terminated copy (embedded NULs end it). */
static char *take(const uint8_t **p, size_t *left)
{
    size_t n = 0;
    if (*left > 0) {
        n = **p;
        (*p)++;
        (*left)--;
    }
    if (n > *left) {
        n = *left;
    }
    char *s = malloc(n + 1);
    if (s == NULL) {
        abort();
    }
    memcpy(s, *p, n);
    s[n] = '\0';
    *p += n;
    *left -= n;
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1) {
        return 0;
    }
    uint8_t flags = data[0];
    const uint8_t *p = data + 1;
    size_t left = size - 1;
    char *topic = take(&p, &left);
    char *rt = take(&p, &left);
    char *corr = take(&p, &left);
    smp_mqtt_props_t props = {
        .response_topic = (flags & 2) ? rt : NULL,
        .correlation_data = (flags & 4) ? corr : NULL,
        .correlation_len = (flags & 4) ? strlen(corr) : 0,
        .retained = flags & 1,
    };
    smp_cmd_delivery_t dv;
    int rc = smp_cmd_delivery(topic, &props, PREFIX, GW, &dv);
    if (rc == 0) {
        if (props.retained &&
            (dv.refusal_code == NULL || strcmp(dv.refusal_code, "stale_retained"))) {
            abort();
        }
        if (dv.use_response_topic &&
            (dv.refusal_code != NULL || strncmp(rt, "simpul/gw-1/reply/", 18) != 0 ||
             strlen(rt) <= 18 || strpbrk(rt, "+#") != NULL)) {
            abort();
        }
        if (dv.device[0] == '\0' || strlen(dv.device) >= sizeof dv.device) {
            abort();
        }
    }
    smp_cmd_t c;
    smp_cmd_error_t err;
    if (smp_cmd_parse(p, left, &c, &err) == 0) {
        int64_t dl = smp_cmd_deadline(&c);
        if (c.has_ts && c.has_ttl && (dl < c.ts || dl < c.ttl_ms)) {
            abort(); /* saturates, never wraps */
        }
        (void)smp_cmd_expired(&c, (uint64_t)dl);
    }
    smp_cmd_free(&c);
    free(topic);
    free(rt);
    free(corr);
    return 0;
}
