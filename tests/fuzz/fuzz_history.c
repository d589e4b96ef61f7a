/* libFuzzer: the history chunk decoder (gateway/history.c). A chunk read back from the
 * database or a staging file may be damaged: whatever its bytes, decoding never reads past
 * them, never yields time going backwards or a NaN, and every sample it yields encodes again
 * to a chunk that decodes to the same samples. Input: encoding byte, 8-byte t_first, data. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "history.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 9) {
        return 0;
    }
    int enc = (data[0] & SMP_HENC_KIND) % 6 | (data[0] & SMP_HENC_TS_MODE);
    int64_t t_first;
    memcpy(&t_first, data + 1, sizeof t_first);
    size_t len = size - 9;
    uint8_t *chunk = malloc(len ? len : 1); /* exact size: ASan sees any overread */
    memcpy(chunk, data + 9, len);
    smp_hist_iter_t it, back;
    uint8_t *again = malloc(len * 2 + 64);
    size_t alen = 0;
    smp_hist_state_t es;
    if (smp__hist_iter_init(&it, enc, t_first, chunk, len) == 0) {
        smp__hist_enc_init(&es, enc, t_first);
        if (it.s.period > 0) {
            alen = (size_t)smp__hist_enc_period(&es, it.s.period, again, len * 2 + 64);
        }
        int64_t prev = t_first;
        char text[512];
        while (smp__hist_iter_next(&it) == 1) {
            if (it.s.ts < prev) {
                abort();
            }
            uint64_t step = (uint64_t)it.s.ts - (uint64_t)prev;
            prev = it.s.ts;
            size_t need = smp__hist_format(&it, text, sizeof text);
            if (need >= sizeof text) {
                break; /* a long text: the round trip below needs all of it */
            }
            int w =
                smp__hist_enc_sample(&es, it.s.ts, text, need, again + alen, len * 2 + 64 - alen);
            if (w < 0) {
                /* Only a value that does not print back exactly, or a time step beyond what
                 * the period form holds (the encoder then starts a new chunk), may refuse. */
                uint64_t v;
                if (smp__hist_parse(enc & SMP_HENC_KIND, text, need, &v) == 0 &&
                    step < (UINT64_C(1) << 62)) {
                    abort();
                }
                break;
            }
            alen += (size_t)w;
        }
        /* The re-encoded chunk decodes to the same samples, in the same order. */
        smp__hist_iter_init(&it, enc, t_first, chunk, len);
        smp__hist_iter_init(&back, enc, t_first, again, alen);
        while (smp__hist_iter_next(&back) == 1) {
            char a[512], b[512];
            if (smp__hist_iter_next(&it) != 1 || it.s.ts != back.s.ts) {
                abort();
            }
            smp__hist_format(&it, a, sizeof a);
            smp__hist_format(&back, b, sizeof b);
            if (strcmp(a, b) != 0) {
                abort();
            }
        }
    }
    free(again);
    free(chunk);
    return 0;
}
