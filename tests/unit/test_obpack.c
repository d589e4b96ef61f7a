/* Outbox packs (gateway/obpack.c): the format round-trips exactly, a damaged pack is refused
 * whole, and the index tracks which members are still unacknowledged. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "obpack.h"

enum { N = 300 };

struct got {
    size_t n;
    smp_ring_rec_t rec[N];
    char dev[N][32], topic[N][64], pay[N][64];
};

static void collect(void *arg, const smp_ring_rec_t *rec)
{
    struct got *g = arg;
    if (g->n < N) {
        g->rec[g->n] = *rec;
        snprintf(g->dev[g->n], sizeof g->dev[0], "%s", rec->device);
        snprintf(g->topic[g->n], sizeof g->topic[0], "%s", rec->topic);
        memcpy(g->pay[g->n], rec->payload, rec->len < 64 ? rec->len : 64);
    }
    g->n++;
}

/* N messages of 20 devices, ids with holes (acked ones), ts going back once (a clock step). */
static void make(smp_ring_rec_t *recs, char (*dev)[32], char (*topic)[64], char (*pay)[64])
{
    for (int k = 0; k < N; k++) {
        snprintf(dev[k], 32, "light-%02d", k % 20);
        snprintf(topic[k], 64, "simpul/gw/light-%02d/data", k % 20);
        int len = snprintf(pay[k], 64, "{\"ts\":%d,\"seq\":%d,\"values\":{\"r0\":%d}}", 1000 + k,
                           k / 20, k * 7);
        recs[k] = (smp_ring_rec_t){.id = 1000 + 2 * k + (k % 3 == 0),
                                   .seq = (uint64_t)(k / 20) + (k == 5 ? UINT64_MAX / 2 : 0),
                                   .ts_ms = 1764293720123 + k * 5 - (k == 100 ? 60000 : 0),
                                   .device = dev[k],
                                   .topic = topic[k],
                                   .payload = pay[k],
                                   .len = k == 7 ? 0 : (size_t)len};
    }
}

static void test_round_trip(void **state)
{
    (void)state;
    static smp_ring_rec_t recs[N];
    static char dev[N][32], topic[N][64], pay[N][64];
    make(recs, dev, topic, pay);
    uint8_t *blob = NULL;
    size_t blob_len = 0, raw_len = 0;
    assert_int_equal(smp__obpack_encode(recs, N, &blob, &blob_len, &raw_len), 0);
    /* Shared keys, topics and names: deflate keeps well under half. */
    assert_true(blob_len * 3 < raw_len);
    static struct got g;
    memset(&g, 0, sizeof g);
    assert_int_equal(smp__obpack_decode(blob, blob_len, raw_len, collect, &g), N);
    assert_int_equal(g.n, N);
    for (int k = 0; k < N; k++) {
        assert_int_equal(g.rec[k].id, recs[k].id);
        assert_int_equal(g.rec[k].seq, recs[k].seq);
        assert_int_equal(g.rec[k].ts_ms, recs[k].ts_ms);
        assert_string_equal(g.dev[k], dev[k]);
        assert_string_equal(g.topic[k], topic[k]);
        assert_int_equal(g.rec[k].len, recs[k].len);
        assert_memory_equal(g.pay[k], pay[k], recs[k].len);
        assert_int_equal(g.rec[k].state, SMP_RING_LIVE);
    }
    /* Damage anywhere, or a wrong length: refused, and nothing passed on. */
    for (size_t at = 0; at < blob_len; at += blob_len / 7 + 1) {
        blob[at] ^= 0x40;
        memset(&g, 0, sizeof g);
        assert_true(smp__obpack_decode(blob, blob_len, raw_len, collect, &g) < 0);
        assert_int_equal(g.n, 0);
        blob[at] ^= 0x40;
    }
    assert_true(smp__obpack_decode(blob, blob_len, raw_len - 1, collect, &g) < 0);
    assert_true(smp__obpack_decode(blob, blob_len / 2, raw_len, collect, &g) < 0);
    assert_int_equal(g.n, 0);
    free(blob);
    /* Ids must increase. */
    smp_ring_rec_t two[2] = {recs[1], recs[0]};
    assert_int_equal(smp__obpack_encode(two, 2, &blob, &blob_len, &raw_len), -EINVAL);
}

static void test_index_acks(void **state)
{
    (void)state;
    smp_obpack_index_t x = {0};
    int64_t firsts[3] = {10, 40, 100};
    for (int p = 0; p < 3; p++) {
        int64_t first = firsts[p], last = first + 20;
        size_t bytes = smp__obpack_members_bytes(first, last);
        uint8_t *m = calloc(1, bytes);
        assert_non_null(m);
        uint32_t live = 0;
        for (int64_t id = first; id <= last; id += 2) { /* even offsets only */
            smp__obpack_members_set(m, first, id);
            live++;
        }
        assert_int_equal(smp__obpack_index_add(&x, first, last, live, 100, m), 0);
    }
    smp_obpack_t *p = NULL;
    assert_null(smp__obpack_index_find(&x, 35)); /* between packs */
    assert_null(smp__obpack_index_find(&x, 9));
    assert_null(smp__obpack_index_find(&x, 121));
    assert_false(smp__obpack_ack(&x, 41, &p)); /* in the range, not a member */
    assert_non_null(p);
    assert_true(smp__obpack_ack(&x, 42, &p));
    assert_int_equal(p->first, 40);
    assert_int_equal(p->live, 10);
    assert_true(p->acked_some);
    assert_false(smp__obpack_ack(&x, 42, &p)); /* twice: once only */
    assert_int_equal(p->live, 10);
    smp__obpack_index_remove(&x, 0);
    assert_int_equal(x.n, 2);
    assert_null(smp__obpack_index_find(&x, 10));
    assert_non_null(smp__obpack_index_find(&x, 120));
    smp__obpack_index_free(&x);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_index_acks),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
