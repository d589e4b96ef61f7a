/* libFuzzer: Modbus register decoding. Whatever a device sends, every type and order decodes
 * without reading past the registers, and strings come out as valid, NUL-terminated UTF-8. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "codec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2) {
        return 0;
    }
    unsigned sel = data[0];
    smp_type_t type = (smp_type_t)(SMP_TYPE_BOOL + sel % 10);
    smp_mb_order_t order = (smp_mb_order_t)(data[1] % SMP_MB_NORDERS);
    size_t nregs = (size - 2) / 2;
    if (nregs == 0 || nregs > SMP_MB_STRING_MAX_REGS) {
        return 0;
    }
    uint16_t *regs = malloc(nregs * sizeof *regs); /* exact size: ASan sees any overread */
    for (size_t k = 0; k < nregs; k++) {
        regs[k] = (uint16_t)(data[2 + 2 * k] << 8 | data[3 + 2 * k]);
    }
    size_t need = type == SMP_TYPE_STRING ? nregs : smp_mb_type_regs(type, 0);
    if (need <= nregs) {
        size_t bs = smp_mb_string_bufsize((unsigned)need);
        char *buf = malloc(bs);
        smp_value_t v;
        int bit = type == SMP_TYPE_BOOL ? (int)(sel / 10 % 17) - 1 : -1;
        if (smp_mb_decode_regs(regs, need, type, order, bit, buf, bs, &v) == 0 &&
            type == SMP_TYPE_STRING) {
            /* Embedded NULs are the device's business (the host stops at the first one). */
            if (v.len >= bs || buf[v.len] != '\0') {
                abort();
            }
            char *again = malloc(3 * v.len + 1);
            /* Sanitising valid UTF-8 must change nothing. */
            if (smp_mb_utf8_sanitize((const uint8_t *)v.s, v.len, again) != v.len ||
                memcmp(again, v.s, v.len) != 0) {
                abort();
            }
            free(again);
        }
        free(buf);
    }
    free(regs);
    return 0;
}
