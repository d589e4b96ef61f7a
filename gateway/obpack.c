/* Outbox packs: see obpack.h.
 *
 * Layout before deflate, per message: varint(id - previous id, the first one absolute),
 * varint(seq), varint(zigzag(ts - previous ts)), then device, topic and payload, each as
 * varint(length) + bytes (device and topic followed by a NUL). The zlib stream's Adler-32 and
 * the exact length (stored in the row) refuse a damaged pack as a whole. */
#include "obpack.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>

struct wbuf {
    uint8_t *p;
    size_t n, cap;
    int err;
};

static void put(struct wbuf *b, const void *data, size_t n)
{
    if (b->err != 0) {
        return;
    }
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->n + n) {
            cap *= 2;
        }
        uint8_t *p = realloc(b->p, cap);
        if (p == NULL) {
            b->err = -ENOMEM;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, data, n);
    b->n += n;
}

static void put_varint(struct wbuf *b, uint64_t v)
{
    uint8_t tmp[10];
    size_t k = 0;
    do {
        tmp[k++] = (uint8_t)((v & 0x7f) | (v > 0x7f ? 0x80 : 0));
        v >>= 7;
    } while (v != 0);
    put(b, tmp, k);
}

static uint64_t zigzag(int64_t v)
{
    return ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
}

static void put_bytes(struct wbuf *b, const void *data, size_t n, bool nul)
{
    put_varint(b, n);
    put(b, data, n);
    if (nul) {
        put(b, "", 1);
    }
}

int smp__obpack_encode(const smp_ring_rec_t *recs, size_t n, uint8_t **blob, size_t *blob_len,
                       size_t *raw_len)
{
    *blob = NULL;
    struct wbuf b = {0};
    int64_t id = 0, ts = 0;
    for (size_t k = 0; k < n; k++) {
        const smp_ring_rec_t *r = &recs[k];
        if (r->id <= id) {
            free(b.p);
            return -EINVAL;
        }
        put_varint(&b, (uint64_t)(r->id - id));
        put_varint(&b, r->seq);
        put_varint(&b, zigzag((int64_t)((uint64_t)r->ts_ms - (uint64_t)ts)));
        put_bytes(&b, r->device, strlen(r->device), true);
        put_bytes(&b, r->topic, strlen(r->topic), true);
        put_bytes(&b, r->payload, r->len, false);
        id = r->id;
        ts = r->ts_ms;
    }
    if (b.err != 0) {
        free(b.p);
        return b.err;
    }
    uLongf out_len = compressBound((uLong)b.n);
    uint8_t *out = malloc(out_len);
    int rc = out != NULL ? compress2(out, &out_len, b.p, (uLong)b.n, Z_DEFAULT_COMPRESSION)
                         : Z_MEM_ERROR;
    *raw_len = b.n;
    free(b.p);
    if (rc != Z_OK) {
        free(out);
        return -ENOMEM;
    }
    *blob = out;
    *blob_len = out_len;
    return 0;
}

struct rbuf {
    const uint8_t *p, *end;
    bool bad;
};

static uint64_t get_varint(struct rbuf *r)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (r->p >= r->end) {
            break;
        }
        uint8_t c = *r->p++;
        v |= (uint64_t)(c & 0x7f) << shift;
        if ((c & 0x80) == 0) {
            return v;
        }
    }
    r->bad = true;
    return 0;
}

/* A length-prefixed field; with `nul`, a C string that must hold no other NUL. */
static const char *get_bytes(struct rbuf *r, bool nul, size_t *len)
{
    uint64_t n = get_varint(r);
    size_t need = (size_t)n + (nul ? 1 : 0);
    if (r->bad || n > (uint64_t)(r->end - r->p) || need > (size_t)(r->end - r->p)) {
        r->bad = true;
        return NULL;
    }
    const char *s = (const char *)r->p;
    if (nul && (s[n] != '\0' || memchr(s, '\0', (size_t)n) != NULL)) {
        r->bad = true;
        return NULL;
    }
    r->p += need;
    *len = (size_t)n;
    return s;
}

/* Reads one message; false at a malformed one. */
static bool next_rec(struct rbuf *r, smp_ring_rec_t *rec)
{
    uint64_t did = get_varint(r), seq = get_varint(r), dts = get_varint(r);
    size_t dl = 0, tl = 0, pl = 0;
    const char *dev = get_bytes(r, true, &dl);
    const char *topic = get_bytes(r, true, &tl);
    const char *pay = get_bytes(r, false, &pl);
    if (r->bad || did == 0 || did > (uint64_t)INT64_MAX - (uint64_t)rec->id) {
        return false;
    }
    int64_t d = (int64_t)(dts >> 1) ^ -(int64_t)(dts & 1);
    rec->id += (int64_t)did;
    rec->seq = seq;
    rec->ts_ms = (int64_t)((uint64_t)rec->ts_ms + (uint64_t)d);
    rec->device = dev;
    rec->topic = topic;
    rec->payload = pay;
    rec->len = pl;
    return true;
}

int smp__obpack_decode(const void *blob, size_t blob_len, size_t raw_len, smp_obpack_cb cb,
                       void *arg)
{
    if (raw_len == 0 || raw_len > SMP_OBPACK_MAX_RAW + (SMP_OBPACK_MAX_RAW / 2)) {
        return -EBADMSG;
    }
    uint8_t *raw = malloc(raw_len);
    if (raw == NULL) {
        return -ENOMEM;
    }
    uLongf got = (uLongf)raw_len;
    if (uncompress(raw, &got, blob, (uLong)blob_len) != Z_OK || got != raw_len) {
        free(raw);
        return -EBADMSG;
    }
    /* Two passes: nothing is passed on from a pack that is damaged anywhere. */
    int n = 0;
    for (int pass = 0; pass < 2; pass++) {
        struct rbuf r = {raw, raw + raw_len, false};
        smp_ring_rec_t rec = {.state = SMP_RING_LIVE, .region = -1};
        for (n = 0; r.p < r.end; n++) {
            if (!next_rec(&r, &rec)) {
                free(raw);
                return -EBADMSG;
            }
            if (pass == 1) {
                cb(arg, &rec);
            }
        }
    }
    free(raw);
    return n;
}

size_t smp__obpack_members_bytes(int64_t first, int64_t last)
{
    return last >= first ? (size_t)((uint64_t)(last - first) / 8 + 1) : 0;
}

void smp__obpack_members_set(uint8_t *members, int64_t first, int64_t id)
{
    uint64_t k = (uint64_t)(id - first);
    members[k / 8] |= (uint8_t)(1u << (k % 8));
}

bool smp__obpack_members_has(const uint8_t *members, size_t bytes, int64_t first, int64_t id)
{
    if (id < first) {
        return false;
    }
    uint64_t k = (uint64_t)(id - first);
    return k / 8 < bytes && (members[k / 8] & (1u << (k % 8))) != 0;
}

int smp__obpack_index_add(smp_obpack_index_t *x, int64_t first, int64_t last, uint32_t live,
                          uint32_t blob_len, uint8_t *members)
{
    if (x->n == x->cap) {
        size_t cap = x->cap ? x->cap * 2 : 64;
        smp_obpack_t *v = realloc(x->v, cap * sizeof *v);
        if (v == NULL) {
            return -ENOMEM;
        }
        x->v = v;
        x->cap = cap;
    }
    x->v[x->n++] = (smp_obpack_t){first, last, live, blob_len, false, members};
    return 0;
}

smp_obpack_t *smp__obpack_index_find(smp_obpack_index_t *x, int64_t id)
{
    size_t lo = 0, hi = x->n;
    while (lo < hi) { /* the first pack whose last id is >= id */
        size_t mid = lo + (hi - lo) / 2;
        if (x->v[mid].last < id) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < x->n && x->v[lo].first <= id ? &x->v[lo] : NULL;
}

bool smp__obpack_ack(smp_obpack_index_t *x, int64_t id, smp_obpack_t **pack)
{
    smp_obpack_t *p = smp__obpack_index_find(x, id);
    *pack = p;
    size_t bytes = p != NULL ? smp__obpack_members_bytes(p->first, p->last) : 0;
    if (p == NULL || !smp__obpack_members_has(p->members, bytes, p->first, id)) {
        return false;
    }
    uint64_t k = (uint64_t)(id - p->first);
    p->members[k / 8] &= (uint8_t) ~(1u << (k % 8));
    p->live--;
    p->acked_some = true;
    return true;
}

void smp__obpack_index_remove(smp_obpack_index_t *x, size_t k)
{
    free(x->v[k].members);
    memmove(&x->v[k], &x->v[k + 1], (x->n - k - 1) * sizeof *x->v);
    x->n--;
}

void smp__obpack_index_free(smp_obpack_index_t *x)
{
    for (size_t k = 0; k < x->n; k++) {
        free(x->v[k].members);
    }
    free(x->v);
    *x = (smp_obpack_index_t){0};
}
