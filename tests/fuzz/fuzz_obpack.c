/* libFuzzer: the outbox pack decoder (gateway/obpack.c). A pack read back from the database
 * may be damaged: whatever its bytes, decoding never reads past them and passes on either all
 * of its messages or none. The input is taken as the pack's bytes before deflate (it is
 * deflated here, so the fuzzer explores the message layout, not zlib) and, once more, as a
 * deflated blob as stored. A pack that decodes encodes again to the same messages. */
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

#include "obpack.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct got {
    smp_ring_rec_t *recs;
    size_t n, cap;
};

static void collect(void *arg, const smp_ring_rec_t *rec)
{
    struct got *g = arg;
    if (g->n == g->cap) {
        g->cap = g->cap ? g->cap * 2 : 16;
        g->recs = realloc(g->recs, g->cap * sizeof *g->recs);
    }
    /* Copies: the decoder's buffer is freed when it returns (strlen also proves that every
     * string it passes on is terminated inside that buffer). */
    smp_ring_rec_t r = *rec;
    r.device = strdup(rec->device);
    r.topic = strdup(rec->topic);
    void *pay = malloc(rec->len ? rec->len : 1);
    if (rec->len > 0) {
        memcpy(pay, rec->payload, rec->len);
    }
    r.payload = pay;
    g->recs[g->n++] = r;
}

static void got_free(struct got *g)
{
    for (size_t k = 0; k < g->n; k++) {
        free((void *)g->recs[k].device);
        free((void *)g->recs[k].topic);
        free((void *)g->recs[k].payload);
    }
    free(g->recs);
}

static void count(void *arg, const smp_ring_rec_t *rec)
{
    (void)rec;
    (*(size_t *)arg)++;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t n = 0;
    (void)smp__obpack_decode(data, size, size * 4 + 1, count, &n); /* as a stored blob */
    if (size == 0 || size > SMP_OBPACK_MAX_RAW) {
        return 0;
    }
    uLongf blen = compressBound((uLong)size);
    uint8_t *blob = malloc(blen);
    if (blob == NULL || compress2(blob, &blen, data, (uLong)size, 1) != Z_OK) {
        free(blob);
        return 0;
    }
    struct got g = {0};
    int rc = smp__obpack_decode(blob, blen, size, collect, &g);
    if (rc < 0 && g.n != 0) {
        abort(); /* a refused pack passed messages on */
    }
    if (rc >= 0 && (size_t)rc != g.n) {
        abort();
    }
    /* Decoded messages with increasing ids encode and decode to themselves. */
    bool increasing = g.n > 0 && g.recs[0].id > 0;
    for (size_t k = 1; k < g.n && increasing; k++) {
        increasing = g.recs[k].id > g.recs[k - 1].id;
    }
    uint8_t *again = NULL;
    size_t alen = 0, araw = 0;
    if (increasing && smp__obpack_encode(g.recs, g.n, &again, &alen, &araw) == 0) {
        size_t m = 0;
        if (smp__obpack_decode(again, alen, araw, count, &m) != (int)g.n || m != g.n) {
            abort();
        }
    }
    free(again);
    got_free(&g);
    free(blob);
    return 0;
}
