/* History: per-tag chunks of compressed samples (see history.h and docs/store.md).
 *
 * Layout in SQLite:
 *   tags(id INTEGER PRIMARY KEY, device, tag, type)        one row per tag, ever
 *   history_chunk(tag_id, t_first, t_last, n, encoding, data)  rowid order = append order
 *   index history_chunk_by_time(t_first, tag_id)            the only index
 * The index leads with time, not with the tag: chunks close roughly in time order, so its
 * inserts land on the last page, like the table's. An index led by the tag would put every
 * new chunk on a different page (each tag's newest leaf), and a 4 KiB page rewritten for a
 * 200-byte chunk is the write amplification this layout exists to avoid. A query scans the
 * index entries of its window (all tags) and reads only its tag's rows.
 *
 * Open chunks live in a staging file in the runtime directory (tmpfs), one fixed-size slot
 * each, mmap'd: a sample is encoded straight into its slot and the slot's length is stored
 * last, so the file is consistent at any instruction a kill -9 can stop us at. A chunk that
 * closes (full, or older than chunk_max_ms) stays in its slot, CLOSED, until the transaction
 * that inserts it has committed; at start every slot still OPEN or CLOSED is written to SQLite
 * unless that exact chunk is already there. */
#include "history.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "value.h"

#define SCOPE "history"

/* ------------------------------------------------------------------------------------------ */
/* Codec */

static size_t put_varint(uint8_t *out, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        out[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (uint8_t)v;
    return n;
}

static int get_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
    uint64_t r = 0;
    for (unsigned shift = 0; shift < 64; shift += 7) {
        if (*p >= end) {
            return -EBADMSG;
        }
        uint8_t b = *(*p)++;
        if (shift == 63 && b > 1) {
            return -EBADMSG; /* more than 64 bits */
        }
        r |= (uint64_t)(b & 0x7f) << shift;
        if ((b & 0x80) == 0) {
            *v = r;
            return 0;
        }
    }
    return -EBADMSG;
}

static uint64_t zigzag(uint64_t v)
{
    return (v << 1) ^ (0 - (v >> 63));
}

static uint64_t unzigzag(uint64_t z)
{
    return (z >> 1) ^ (0 - (z & 1));
}

static bool is_digits(const char *t, size_t len)
{
    if (len == 0 || len > 20 || (t[0] == '0' && len > 1)) {
        return false;
    }
    for (size_t k = 0; k < len; k++) {
        if (t[k] < '0' || t[k] > '9') {
            return false;
        }
    }
    return true;
}

int smp__hist_parse(int enc, const char *text, size_t len, uint64_t *val)
{
    char buf[48], back[48];
    switch (enc) {
    case SMP_HENC_BOOL:
        if (len == 4 && memcmp(text, "true", 4) == 0) {
            *val = 1;
            return 0;
        }
        if (len == 5 && memcmp(text, "false", 5) == 0) {
            *val = 0;
            return 0;
        }
        return -EINVAL;
    case SMP_HENC_INT:
    case SMP_HENC_UINT: {
        bool neg = len > 0 && text[0] == '-';
        if (!is_digits(text + neg, len - neg) || (neg && enc == SMP_HENC_UINT)) {
            return -EINVAL;
        }
        memcpy(buf, text, len);
        buf[len] = '\0';
        errno = 0;
        if (enc == SMP_HENC_INT) {
            long long v = strtoll(buf, NULL, 10);
            snprintf(back, sizeof back, "%lld", v);
            *val = (uint64_t)v;
        } else {
            unsigned long long v = strtoull(buf, NULL, 10);
            snprintf(back, sizeof back, "%llu", v);
            *val = (uint64_t)v;
        }
        return errno == 0 && strcmp(back, buf) == 0 ? 0 : -EINVAL;
    }
    case SMP_HENC_FLOAT: {
        if (len == 0 || len >= sizeof buf) {
            return -EINVAL;
        }
        memcpy(buf, text, len);
        buf[len] = '\0';
        char *endp;
        double d = strtod(buf, &endp);
        if (*endp != '\0' || !isfinite(d)) {
            return -EINVAL;
        }
        /* Only text that prints back byte for byte: the history returns what was recorded. */
        smp_format_double(d, back, sizeof back);
        if (strcmp(back, buf) != 0) {
            return -EINVAL;
        }
        memcpy(val, &d, sizeof d);
        return 0;
    }
    case SMP_HENC_TEXT:
        *val = 0;
        return 0;
    default:
        return -EINVAL;
    }
}

int smp__hist_classify(const char *text, size_t len)
{
    static const int order[] = {SMP_HENC_BOOL, SMP_HENC_INT, SMP_HENC_UINT, SMP_HENC_FLOAT};
    uint64_t v;
    for (size_t k = 0; k < sizeof order / sizeof order[0]; k++) {
        if (smp__hist_parse(order[k], text, len, &v) == 0) {
            return order[k];
        }
    }
    return SMP_HENC_TEXT;
}

void smp__hist_enc_init(smp_hist_state_t *s, int enc, int64_t ts)
{
    memset(s, 0, sizeof *s);
    s->enc = enc;
    s->t_first = ts;
    s->ts = ts;
}

/* Significant bytes of a double's XOR with the previous one: a control byte (trailing zero
 * bytes << 4 | byte count), then the bytes; 0x00 alone when the value repeats. */
static size_t put_xor(uint8_t *out, uint64_t x)
{
    if (x == 0) {
        out[0] = 0;
        return 1;
    }
    unsigned tz = (unsigned)__builtin_ctzll(x) / 8, lz = (unsigned)__builtin_clzll(x) / 8;
    unsigned nb = 8 - tz - lz;
    out[0] = (uint8_t)(tz << 4 | nb);
    x >>= tz * 8;
    for (unsigned k = 0; k < nb; k++) {
        out[1 + k] = (uint8_t)(x >> (8 * k));
    }
    return 1 + nb;
}

int smp__hist_enc_period(smp_hist_state_t *s, uint64_t period, uint8_t *out, size_t cap)
{
    uint8_t tmp[10];
    if (period == 0 || (s->enc & SMP_HENC_TS_MODE) != SMP_HENC_TS_PERIOD || s->n > 0) {
        return -EINVAL;
    }
    size_t n = put_varint(tmp, period);
    if (n > cap) {
        return -ENOSPC;
    }
    memcpy(out, tmp, n);
    s->period = period;
    s->cand_period = period;
    return (int)n;
}

/* A round period near m (the smallest time step seen, a little below the poll interval
 * because of jitter): 1, 2, 2.5 or 5 times a power of ten within 5 %, else m. */
static uint64_t nice_period(uint64_t m)
{
    static const uint64_t mant[] = {10, 20, 25, 50};
    for (uint64_t d = 1; d / 2 <= m && d <= UINT64_MAX / 100; d *= 10) {
        for (size_t k = 0; k < 4; k++) {
            uint64_t c = mant[k] * d / 10;
            if (c > 0 && (c > m ? c - m : m - c) * 20 <= m) {
                return c;
            }
        }
    }
    return m;
}

/* A sample's time field in `mode`. Returns the bytes written, 0 when the form cannot hold it. */
static size_t put_ts(uint8_t *out, int mode, uint64_t delta, uint64_t prev_delta, uint64_t period)
{
    if (mode == SMP_HENC_TS_DELTA) {
        return put_varint(out, delta);
    }
    if (mode != SMP_HENC_TS_PERIOD) {
        return put_varint(out, zigzag(delta - prev_delta));
    }
    if (period > 0 && delta < UINT64_MAX / 2) {
        uint64_t q = (delta + period / 2) / period;
        uint64_t zr = zigzag(delta - q * period);
        if (zr < 32 && q < (UINT64_C(1) << 57)) {
            return put_varint(out, (q << 5 | zr) << 1);
        }
    }
    return delta < (UINT64_C(1) << 63) ? put_varint(out, delta << 1 | 1) : 0;
}

int smp__hist_enc_sample(smp_hist_state_t *s, int64_t ts, const char *text, size_t len,
                         uint8_t *out, size_t cap)
{
    uint8_t tmp[32];
    size_t n = 0;
    uint64_t val = 0, delta = 0;
    int kind = s->enc & SMP_HENC_KIND, mode = s->enc & SMP_HENC_TS_MODE;
    uint64_t cost_dod = s->cost_dod, cost_delta = s->cost_delta, cost_period = s->cost_period;
    uint64_t min_delta = s->min_delta;
    if (smp__hist_parse(kind, text, len, &val) != 0 ||
        (mode == SMP_HENC_TS_PERIOD && s->period == 0)) {
        return -EINVAL;
    }
    if (s->n > 0) {
        if (ts < s->ts) {
            return -EINVAL;
        }
        delta = (uint64_t)ts - (uint64_t)s->ts;
        /* Every form's cost is kept, so the tag's next chunk can take the cheapest. */
        cost_dod += put_ts(tmp, 0, delta, s->delta, 0);
        cost_delta += put_ts(tmp, SMP_HENC_TS_DELTA, delta, 0, 0);
        if (delta > 0 && (min_delta == 0 || delta < min_delta)) {
            min_delta = delta;
        }
        /* Without a period from the last chunk, the one this chunk suggests so far. */
        uint64_t cand = s->cand_period > 0 ? s->cand_period : nice_period(min_delta);
        size_t c = cand > 0 ? put_ts(tmp, SMP_HENC_TS_PERIOD, delta, 0, cand) : 0;
        cost_period += c > 0 ? c : 10;
        n = put_ts(tmp, mode, delta, s->delta, s->period);
        if (n == 0) {
            return -EINVAL; /* a time step no form holds: a new chunk */
        }
    } else if (ts != s->t_first) {
        return -EINVAL;
    }
    switch (kind) {
    case SMP_HENC_BOOL:
        tmp[n++] = (uint8_t)val;
        break;
    case SMP_HENC_INT:
    case SMP_HENC_UINT:
        n += put_varint(tmp + n, zigzag(val - s->val));
        break;
    case SMP_HENC_FLOAT:
        n += put_xor(tmp + n, val ^ s->val);
        break;
    default: /* TEXT */
        n += put_varint(tmp + n, len);
        break;
    }
    size_t total = n + (kind == SMP_HENC_TEXT ? len : 0);
    if (total > cap) {
        return -ENOSPC;
    }
    memcpy(out, tmp, n);
    if (kind == SMP_HENC_TEXT && len > 0) {
        memcpy(out + n, text, len);
    }
    s->cost_dod = cost_dod;
    s->cost_delta = cost_delta;
    s->cost_period = cost_period;
    s->min_delta = min_delta;
    s->delta = s->n > 0 ? delta : 0;
    s->ts = ts;
    s->val = val;
    s->n++;
    return (int)total;
}

int smp__hist_iter_init(smp_hist_iter_t *it, int enc, int64_t t_first, const uint8_t *data,
                        size_t len)
{
    int kind = enc & SMP_HENC_KIND;
    if (kind < SMP_HENC_BOOL || kind > SMP_HENC_TEXT ||
        (enc & ~(SMP_HENC_KIND | SMP_HENC_TS_MODE)) ||
        (enc & SMP_HENC_TS_MODE) == SMP_HENC_TS_MODE || (data == NULL && len > 0)) {
        return -EBADMSG;
    }
    smp__hist_enc_init(&it->s, enc, t_first);
    it->p = data;
    it->end = data + len;
    if ((enc & SMP_HENC_TS_MODE) == SMP_HENC_TS_PERIOD &&
        (get_varint(&it->p, it->end, &it->s.period) != 0 || it->s.period == 0)) {
        return -EBADMSG;
    }
    return 0;
}

static int get_value(smp_hist_iter_t *it)
{
    smp_hist_state_t *s = &it->s;
    uint64_t v;
    switch (s->enc & SMP_HENC_KIND) {
    case SMP_HENC_BOOL:
        if (it->p >= it->end || *it->p > 1) {
            return -EBADMSG;
        }
        s->val = *it->p++;
        return 0;
    case SMP_HENC_INT:
    case SMP_HENC_UINT:
        if (get_varint(&it->p, it->end, &v) != 0) {
            return -EBADMSG;
        }
        s->val += unzigzag(v);
        return 0;
    case SMP_HENC_FLOAT: {
        if (it->p >= it->end) {
            return -EBADMSG;
        }
        unsigned c = *it->p++, nb = c & 0x0f, tz = c >> 4;
        if (c == 0) {
            return 0;
        }
        if (nb == 0 || nb + tz > 8 || (size_t)(it->end - it->p) < nb) {
            return -EBADMSG;
        }
        uint64_t x = 0;
        for (unsigned k = 0; k < nb; k++) {
            x |= (uint64_t)it->p[k] << (8 * k);
        }
        it->p += nb;
        s->val ^= x << (tz * 8);
        return 0;
    }
    default:
        if (get_varint(&it->p, it->end, &v) != 0 || v > (uint64_t)(it->end - it->p)) {
            return -EBADMSG;
        }
        s->text = (const char *)it->p;
        s->text_len = (size_t)v;
        it->p += v;
        return 0;
    }
}

/* The time difference a sample's time field `z` stands for. */
static int get_delta(const smp_hist_state_t *s, uint64_t z, uint64_t *delta)
{
    switch (s->enc & SMP_HENC_TS_MODE) {
    case SMP_HENC_TS_DELTA:
        *delta = z;
        return 0;
    case SMP_HENC_TS_PERIOD: {
        if (z & 1) {
            *delta = z >> 1;
            return 0;
        }
        uint64_t qp;
        if (__builtin_mul_overflow(z >> 6, s->period, &qp)) {
            return -EBADMSG;
        }
        *delta = qp + unzigzag(z >> 1 & 31); /* a negative residual below qp wraps: caught */
        return 0;
    }
    default:
        *delta = s->delta + unzigzag(z);
        return 0;
    }
}

int smp__hist_iter_next(smp_hist_iter_t *it)
{
    smp_hist_state_t *s = &it->s;
    if (it->p >= it->end) {
        return 0;
    }
    if (s->n > 0) {
        uint64_t z;
        if (get_varint(&it->p, it->end, &z) != 0) {
            return -EBADMSG;
        }
        uint64_t delta;
        if (get_delta(s, z, &delta) != 0) {
            return -EBADMSG;
        }
        int64_t ts = (int64_t)((uint64_t)s->ts + delta);
        if (ts < s->ts) {
            return -EBADMSG; /* the encoder never writes time going backwards */
        }
        s->delta = delta;
        s->ts = ts;
    }
    if (get_value(it) != 0) {
        return -EBADMSG;
    }
    if ((s->enc & SMP_HENC_KIND) == SMP_HENC_FLOAT) {
        double d;
        memcpy(&d, &s->val, sizeof d);
        if (!isfinite(d)) {
            return -EBADMSG; /* NaN and infinities are not JSON */
        }
    }
    s->n++;
    return 1;
}

size_t smp__hist_format(const smp_hist_iter_t *it, char *buf, size_t n)
{
    const smp_hist_state_t *s = &it->s;
    int len;
    switch (s->enc & SMP_HENC_KIND) {
    case SMP_HENC_BOOL:
        len = snprintf(buf, n, "%s", s->val ? "true" : "false");
        break;
    case SMP_HENC_INT:
        len = snprintf(buf, n, "%" PRId64, (int64_t)s->val);
        break;
    case SMP_HENC_UINT:
        len = snprintf(buf, n, "%" PRIu64, s->val);
        break;
    case SMP_HENC_FLOAT: {
        double d;
        memcpy(&d, &s->val, sizeof d);
        len = smp_format_double(d, buf, n);
        break;
    }
    default:
        if (n > 0) {
            size_t c = s->text_len < n - 1 ? s->text_len : n - 1;
            memcpy(buf, s->text, c);
            buf[c] = '\0';
        }
        return s->text_len;
    }
    return len > 0 ? (size_t)len : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The module's state */

enum { SLOT_SIZE = 320, SLOT_HDR = 24, SLOT_DATA = SLOT_SIZE - SLOT_HDR };
enum { SLOT_FREE = 0, SLOT_OPEN = 0x4e45504f /* "OPEN" */, SLOT_CLOSED = 0x44534c43 };
static const char stage_magic[8] = "SMPHIST1";
static uint32_t chunk_max_samples = 1000; /* besides the slot size and the age */
/* Disk bytes of a chunk besides its blob: the row (rowid, header, five integers, cell pointer,
 * ~43 bytes) and its index entry (~22), with the free space B-tree pages keep; plus the two
 * B-trees' root pages, which a tiny bound notices (dbstat, docs/store.md). */
static int64_t chunk_overhead = 80;
static int64_t btree_fixed = 2 * 4096;
static int flush_prune_rows = 256;    /* rows a commit may prune to stay within the size bound */
static size_t pend_max_slots = 65536; /* closed chunks waiting for a commit (20 MiB of slots) */

/* One slot of the staging file. Slot 0 is the file header. */
struct slot {
    uint32_t state; /* stored last when a chunk opens */
    uint32_t tag_id;
    int64_t t_first;
    uint16_t len; /* data bytes; stored last when a sample is appended */
    uint8_t enc;
    uint8_t pad[5];
    uint8_t data[SLOT_DATA];
};
_Static_assert(sizeof(struct slot) == SLOT_SIZE, "slot layout");

struct stage_hdr {
    char magic[8];
    uint64_t uid; /* history_meta.uid of the database the slots belong to */
    uint32_t slot_size;
    uint32_t nslots; /* slots after the header */
};

struct tag {
    char *key; /* "device\0tag\0" */
    size_t keylen;
    uint32_t id;
    int32_t slot;    /* its open chunk, -1 none */
    int last_enc;    /* value encoding of its last chunk: a new chunk tries it first */
    int ts_mode;     /* time form of its next chunk: the cheapest for its last one */
    uint64_t period; /* the period its last chunk's times suggest (0: none yet) */
};

enum { ST_CHUNK_ADD, ST_TAG_ADD, ST_QUERY, ST_OLDEST, ST_DEL_UPTO, ST_EXISTS, ST_N };

static const char *const hist_sql[ST_N] = {
    [ST_CHUNK_ADD] = "INSERT INTO history_chunk(tag_id, t_first, t_last, n, encoding, data)"
                     " VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
    [ST_TAG_ADD] = "INSERT OR REPLACE INTO tags(id, device, tag, type) VALUES(?1, ?2, ?3, ?4)",
    [ST_QUERY] = "SELECT t_first, encoding, data FROM history_chunk"
                 " WHERE t_first >= ?1 AND t_first < ?2 AND tag_id = ?3 ORDER BY t_first",
    [ST_OLDEST] =
        "SELECT rowid, t_last, length(data), n FROM history_chunk ORDER BY rowid LIMIT ?1",
    [ST_DEL_UPTO] = "DELETE FROM history_chunk WHERE rowid <= ?1",
    [ST_EXISTS] = "SELECT 1 FROM history_chunk WHERE t_first = ?1 AND tag_id = ?2 AND n = ?3"
                  " AND data = ?4",
};

struct smp_history {
    sqlite3 *db;
    sqlite3_stmt *stmt[ST_N];
    int64_t retention_ms, max_bytes, chunk_max_ms;
    int64_t span_max;      /* longest span of any stored chunk: the query's look-back */
    int64_t last_sweep_ms; /* last look for chunks past their age */

    /* Tags: open-addressing hash on the key, and an array by id for recovery. */
    struct tag **tab;
    size_t tab_cap, ntags;
    uint32_t next_id;
    struct tag **unstored; /* tags whose row is not committed yet */
    size_t nunstored, unstored_cap;

    /* Staging: a file mapping (fd >= 0) or heap memory. */
    int fd;
    char *stage_path;
    uint64_t uid;
    uint8_t *base; /* header slot + cap slots */
    size_t cap;
    struct sst *sst; /* encoder state per slot */
    uint32_t *free_slots;
    size_t nfree;
    uint32_t *pend; /* CLOSED slots not inserted yet */
    size_t npend;
    uint32_t *intx; /* CLOSED slots inserted by the open transaction */
    size_t nintx;
    size_t nopen;

    /* Totals of committed chunks, and the open transaction's changes to them. */
    int64_t rows, bytes, samples;
    int64_t tx_rows, tx_bytes, tx_samples;
    int64_t open_samples;
    uint64_t lost_samples; /* dropped while nothing could be committed */
    bool losing;           /* in such an episode */
    bool no_slot;          /* the staging file could not grow (logged once) */
};

static struct slot *slot_at(const smp_history_t *h, uint32_t i)
{
    return (struct slot *)(h->base + (size_t)(i + 1) * SLOT_SIZE);
}

/* The encoder state of an open chunk as kept per slot: smp_hist_state_t without what only the
 * decoder uses (text), the first time (its slot has it) and with 32-bit byte counts — 72 bytes
 * instead of 112, one per tag with an open chunk (11 MB at 100k tags before). */
struct sst {
    int64_t ts;
    uint64_t delta, val, period, cand_period, min_delta;
    uint32_t n, cost_dod, cost_delta, cost_period;
    uint8_t enc;
};

static uint32_t cost32(uint64_t c)
{
    /* Byte counts of one chunk (< 1000 samples of a few bytes): never near the cap. Were one to
     * reach it, only the choice of the next chunk's time form would be off. */
    return c > UINT32_MAX ? UINT32_MAX : (uint32_t)c;
}

static void sst_get(const smp_history_t *h, uint32_t i, smp_hist_state_t *st)
{
    const struct sst *p = &h->sst[i];
    *st = (smp_hist_state_t){.enc = p->enc,
                             .n = p->n,
                             .t_first = slot_at(h, i)->t_first,
                             .ts = p->ts,
                             .delta = p->delta,
                             .val = p->val,
                             .period = p->period,
                             .cost_dod = p->cost_dod,
                             .cost_delta = p->cost_delta,
                             .cost_period = p->cost_period,
                             .cand_period = p->cand_period,
                             .min_delta = p->min_delta};
}

static void sst_put(smp_history_t *h, uint32_t i, const smp_hist_state_t *st)
{
    h->sst[i] = (struct sst){.enc = (uint8_t)st->enc,
                             .n = st->n,
                             .ts = st->ts,
                             .delta = st->delta,
                             .val = st->val,
                             .period = st->period,
                             .cost_dod = cost32(st->cost_dod),
                             .cost_delta = cost32(st->cost_delta),
                             .cost_period = cost32(st->cost_period),
                             .cand_period = st->cand_period,
                             .min_delta = st->min_delta};
}

static int reset_stmt(sqlite3_stmt *s, int rc)
{
    sqlite3_reset(s);
    return rc == SQLITE_DONE || rc == SQLITE_ROW ? SQLITE_OK : rc;
}

/* ---- tags ---- */

static uint64_t hash_key(const char *k, size_t n)
{
    uint64_t x = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        x = (x ^ (uint8_t)k[i]) * 1099511628211ull;
    }
    return x;
}

static struct tag **tag_find_slot(smp_history_t *h, const char *key, size_t n)
{
    size_t mask = h->tab_cap - 1;
    for (size_t i = hash_key(key, n) & mask;; i = (i + 1) & mask) {
        struct tag *t = h->tab[i];
        if (t == NULL || (t->keylen == n && memcmp(t->key, key, n) == 0)) {
            return &h->tab[i];
        }
    }
}

static int tag_table_grow(smp_history_t *h)
{
    size_t cap = h->tab_cap ? h->tab_cap * 2 : 1024;
    struct tag **old = h->tab;
    size_t old_cap = h->tab_cap;
    h->tab = calloc(cap, sizeof *h->tab);
    if (h->tab == NULL) {
        h->tab = old;
        return SQLITE_NOMEM;
    }
    h->tab_cap = cap;
    for (size_t i = 0; i < old_cap; i++) {
        if (old[i] != NULL) {
            *tag_find_slot(h, old[i]->key, old[i]->keylen) = old[i];
        }
    }
    free(old);
    return SQLITE_OK;
}

static size_t make_key(char *buf, size_t n, const char *device, const char *tag)
{
    size_t ld = strlen(device), lt = strlen(tag);
    if (ld + lt + 2 > n) {
        return 0;
    }
    memcpy(buf, device, ld + 1);
    memcpy(buf + ld + 1, tag, lt + 1);
    return ld + lt + 2;
}

static struct tag *tag_lookup(smp_history_t *h, const char *device, const char *tag)
{
    char key[512];
    size_t n = make_key(key, sizeof key, device, tag);
    if (n == 0 || h->tab_cap == 0) {
        return NULL;
    }
    return *tag_find_slot(h, key, n);
}

/* Adds a tag to the map (from the tags table, or new with id 0 = allocate). */
static struct tag *tag_add(smp_history_t *h, const char *device, const char *tag, uint32_t id)
{
    char key[512];
    size_t n = make_key(key, sizeof key, device, tag);
    if (n == 0) {
        return NULL;
    }
    if ((h->ntags + 1) * 2 > h->tab_cap && tag_table_grow(h) != SQLITE_OK) {
        return NULL;
    }
    struct tag *t = calloc(1, sizeof *t);
    if (t == NULL || (t->key = malloc(n)) == NULL) {
        free(t);
        return NULL;
    }
    memcpy(t->key, key, n);
    t->keylen = n;
    t->id = id != 0 ? id : h->next_id++;
    if (t->id >= h->next_id) {
        h->next_id = t->id + 1;
    }
    t->slot = -1;
    *tag_find_slot(h, key, n) = t;
    h->ntags++;
    return t;
}

/* ---- staging ---- */

static int stage_resize(smp_history_t *h, size_t cap)
{
    size_t bytes = (cap + 1) * SLOT_SIZE, old = (h->cap + 1) * SLOT_SIZE;
    uint8_t *base;
    if (h->fd >= 0) {
        /* Allocated, not only sized: a page of a full tmpfs touched through the mapping would
         * be a SIGBUS; this is an error instead. */
        int e = posix_fallocate(h->fd, 0, (off_t)bytes);
        if (e != 0) {
            LOG_WARN(SCOPE, "%s: cannot grow: %s", h->stage_path, strerror(e));
            return SQLITE_FULL;
        }
        base = h->base != NULL ? mremap(h->base, old, bytes, MREMAP_MAYMOVE)
                               : mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, h->fd, 0);
        if (base == MAP_FAILED) {
            return SQLITE_NOMEM;
        }
    } else {
        size_t keep = h->base != NULL ? old : 0;
        base = realloc(h->base, bytes);
        if (base == NULL) {
            return SQLITE_NOMEM;
        }
        memset(base + keep, 0, bytes - keep);
    }
    h->base = base;
    /* Per-slot arrays: encoder state, and the free, pending and in-transaction lists, each of
     * which can hold every slot. */
    struct sst *sst = realloc(h->sst, cap * sizeof *sst);
    if (sst != NULL) {
        h->sst = sst;
    }
    uint32_t **lists[] = {&h->free_slots, &h->pend, &h->intx};
    bool ok = sst != NULL;
    for (size_t k = 0; k < 3; k++) {
        uint32_t *p = realloc(*lists[k], cap * sizeof *p);
        if (p != NULL) {
            *lists[k] = p;
        }
        ok &= p != NULL;
    }
    if (!ok) {
        return SQLITE_NOMEM;
    }
    /* New slots are free, highest index at the bottom of the stack: low slots go first. */
    for (size_t i = cap; i-- > h->cap;) {
        h->free_slots[h->nfree++] = (uint32_t)i;
    }
    h->cap = cap;
    struct stage_hdr *hdr = (struct stage_hdr *)h->base;
    memcpy(hdr->magic, stage_magic, sizeof hdr->magic);
    hdr->uid = h->uid;
    hdr->slot_size = SLOT_SIZE;
    hdr->nslots = (uint32_t)cap;
    return SQLITE_OK;
}

static int slot_alloc(smp_history_t *h, uint32_t *out)
{
    if (h->nfree == 0) {
        /* A quarter more each time: the file is RAM (tmpfs), and allocated. */
        int rc = stage_resize(h, h->cap + (h->cap / 4 > 256 ? h->cap / 4 : 256));
        if (rc != SQLITE_OK) {
            return rc;
        }
    }
    *out = h->free_slots[--h->nfree];
    return SQLITE_OK;
}

static void slot_free(smp_history_t *h, uint32_t i)
{
    struct slot *s = slot_at(h, i);
    s->state = SLOT_FREE;
    s->len = 0;
    h->free_slots[h->nfree++] = i;
}

/* Opens the staging file for this database, or falls back to memory. */
static void stage_open(smp_history_t *h, const char *dir)
{
    h->fd = -1;
    if (dir == NULL || dir[0] == '\0') {
        return;
    }
    size_t n = strlen(dir) + 64;
    h->stage_path = malloc(n);
    if (h->stage_path == NULL) {
        return;
    }
    mkdir(dir, 0700);
    snprintf(h->stage_path, n, "%s/history-%016" PRIx64 ".stage", dir, h->uid);
    int fd = open(h->stage_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 || flock(fd, LOCK_EX | LOCK_NB) != 0) {
        LOG_WARN(SCOPE,
                 "%s: %s; open history chunks are kept in memory only (a kill -9 loses them)",
                 h->stage_path, fd < 0 ? strerror(errno) : "in use by another process");
        if (fd >= 0) {
            close(fd);
        }
        free(h->stage_path);
        h->stage_path = NULL;
        return;
    }
    h->fd = fd;
}

/* Maps an existing staging file's slots (at start) so they can be recovered. */
static int stage_map_existing(smp_history_t *h)
{
    struct stat sb;
    if (h->fd < 0 || fstat(h->fd, &sb) != 0 || sb.st_size < SLOT_SIZE) {
        return 0;
    }
    size_t nslots = (size_t)sb.st_size / SLOT_SIZE - 1;
    void *m = mmap(NULL, (nslots + 1) * SLOT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, h->fd, 0);
    if (m == MAP_FAILED) {
        return 0;
    }
    const struct stage_hdr *hdr = m;
    if (memcmp(hdr->magic, stage_magic, sizeof hdr->magic) != 0 || hdr->uid != h->uid ||
        hdr->slot_size != SLOT_SIZE) {
        LOG_WARN(SCOPE, "%s: not a staging file of this database; starting it anew", h->stage_path);
        munmap(m, (nslots + 1) * SLOT_SIZE);
        return 0;
    }
    h->base = m;
    h->cap = nslots;
    return 1;
}

/* ---- chunks ---- */

static int insert_chunk(smp_history_t *h, uint32_t tag_id, int enc, const smp_hist_state_t *st,
                        const uint8_t *data, size_t len)
{
    sqlite3_stmt *s = h->stmt[ST_CHUNK_ADD];
    int rc = sqlite3_bind_int64(s, 1, tag_id);
    rc = rc ? rc : sqlite3_bind_int64(s, 2, st->t_first);
    rc = rc ? rc : sqlite3_bind_int64(s, 3, st->ts);
    rc = rc ? rc : sqlite3_bind_int64(s, 4, st->n);
    rc = rc ? rc : sqlite3_bind_int(s, 5, enc);
    rc = rc ? rc : sqlite3_bind_blob(s, 6, len ? (const void *)data : "", (int)len, SQLITE_STATIC);
    if (rc == SQLITE_OK) {
        rc = reset_stmt(s, sqlite3_step(s));
    } else {
        sqlite3_reset(s);
    }
    if (rc == SQLITE_OK) {
        h->tx_rows++;
        h->tx_bytes += (int64_t)len + chunk_overhead;
        h->tx_samples += st->n;
        int64_t span = st->ts - st->t_first;
        if (span > h->span_max) {
            h->span_max = span;
        }
    }
    return rc;
}

static void choose_ts_mode(struct tag *t, const smp_hist_state_t *st)
{
    uint64_t period = st->cost_period + 2; /* its header */
    t->ts_mode = st->cost_delta < st->cost_dod ? SMP_HENC_TS_DELTA : 0;
    uint64_t best = t->ts_mode ? st->cost_delta : st->cost_dod;
    if (st->min_delta > 0 && period < best) {
        t->ts_mode = SMP_HENC_TS_PERIOD;
    }
    if (st->min_delta > 0) {
        t->period = nice_period(st->min_delta);
    }
    if (t->ts_mode == SMP_HENC_TS_PERIOD && t->period == 0) {
        t->ts_mode = SMP_HENC_TS_DELTA;
    }
}

static void close_open(smp_history_t *h, struct tag *t)
{
    if (t->slot < 0) {
        return;
    }
    uint32_t i = (uint32_t)t->slot;
    smp_hist_state_t st;
    sst_get(h, i, &st);
    choose_ts_mode(t, &st);
    slot_at(h, i)->state = SLOT_CLOSED;
    /* While nothing commits (disk full, I/O errors) closed chunks pile up in RAM: past a bound
     * the oldest go, counted and logged once per episode. */
    if (h->npend >= pend_max_slots) {
        uint32_t old = h->pend[0];
        h->open_samples -= h->sst[old].n;
        h->lost_samples += h->sst[old].n;
        slot_free(h, old);
        memmove(h->pend, h->pend + 1, (h->npend - 1) * sizeof *h->pend);
        h->npend--;
        if (!h->losing) {
            LOG_WARN(SCOPE,
                     "history chunks cannot be stored: dropping the oldest of the %zu "
                     "waiting",
                     h->npend + 1);
            h->losing = true;
        }
    }
    h->pend[h->npend++] = i;
    h->nopen--;
    t->slot = -1;
}

static int open_chunk(smp_history_t *h, struct tag *t, int enc, int64_t ts)
{
    uint32_t i;
    int rc = slot_alloc(h, &i);
    if (rc != SQLITE_OK) {
        return rc;
    }
    struct slot *s = slot_at(h, i);
    smp_hist_state_t st;
    s->tag_id = t->id;
    s->t_first = ts;
    s->enc = (uint8_t)enc;
    s->len = 0;
    smp__hist_enc_init(&st, enc, ts);
    st.cand_period = t->period; /* counts what the period form would cost */
    if ((enc & SMP_HENC_TS_MODE) == SMP_HENC_TS_PERIOD) {
        s->len = (uint16_t)smp__hist_enc_period(&st, t->period, s->data, SLOT_DATA);
    }
    sst_put(h, i, &st);
    __atomic_store_n(&s->state, SLOT_OPEN, __ATOMIC_RELEASE);
    t->slot = (int32_t)i;
    t->last_enc = enc & SMP_HENC_KIND;
    h->nopen++;
    return SQLITE_OK;
}

/* Appends to the tag's open chunk; 1 when it does not fit there (a new chunk is needed). */
static int try_append(smp_history_t *h, struct tag *t, int64_t ts, const char *text, size_t len)
{
    if (t->slot < 0) {
        return 1;
    }
    uint32_t i = (uint32_t)t->slot;
    struct slot *s = slot_at(h, i);
    const struct sst *p = &h->sst[i];
    if (p->n >= chunk_max_samples || ts < p->ts ||
        (uint64_t)ts - (uint64_t)s->t_first >= (uint64_t)h->chunk_max_ms) {
        return 1;
    }
    smp_hist_state_t st;
    sst_get(h, i, &st);
    int k = smp__hist_enc_sample(&st, ts, text, len, s->data + s->len, SLOT_DATA - s->len);
    if (k < 0) {
        return 1;
    }
    sst_put(h, i, &st);
    __atomic_store_n(&s->len, (uint16_t)(s->len + k), __ATOMIC_RELEASE);
    h->open_samples++;
    return 0;
}

int smp__history_append(smp_history_t *h, const char *device, const char *tag, int64_t ts,
                        const char *value_json)
{
    size_t len = strlen(value_json);
    struct tag *t = tag_lookup(h, device, tag);
    if (t == NULL) {
        t = tag_add(h, device, tag, 0);
        if (t == NULL) {
            return SQLITE_NOMEM;
        }
        t->last_enc = smp__hist_classify(value_json, len);
        if (h->nunstored == h->unstored_cap) {
            size_t c = h->unstored_cap ? h->unstored_cap * 2 : 64;
            struct tag **p = realloc(h->unstored, c * sizeof *p);
            if (p == NULL) {
                return SQLITE_NOMEM;
            }
            h->unstored = p;
            h->unstored_cap = c;
        }
        h->unstored[h->nunstored++] = t;
    }
    if (try_append(h, t, ts, value_json, len) == 0) {
        return SQLITE_OK;
    }
    close_open(h, t);
    uint64_t v;
    int enc = t->last_enc != 0 && smp__hist_parse(t->last_enc, value_json, len, &v) == 0
                  ? t->last_enc
                  : smp__hist_classify(value_json, len);
    int rc = open_chunk(h, t, enc | t->ts_mode, ts);
    if (rc == SQLITE_OK && try_append(h, t, ts, value_json, len) == 0) {
        return SQLITE_OK;
    }
    if (rc == SQLITE_OK) {
        /* Larger than a whole slot (a long string). */
        uint32_t i = (uint32_t)t->slot;
        t->slot = -1;
        h->nopen--;
        slot_free(h, i);
    } else if (!h->no_slot) {
        LOG_WARN(SCOPE, "no room for open history chunks (%s): samples go to SQLite one by one",
                 h->stage_path != NULL ? h->stage_path : "memory");
        h->no_slot = true;
    }
    /* A chunk of its own, straight to SQLite with the transaction: telemetry never fails for
     * want of a slot. */
    smp_hist_state_t st;
    smp__hist_enc_init(&st, SMP_HENC_TEXT, ts);
    uint8_t *buf = malloc(len + 16);
    if (buf == NULL) {
        return SQLITE_NOMEM;
    }
    int k = smp__hist_enc_sample(&st, ts, value_json, len, buf, len + 16);
    rc = k < 0 ? SQLITE_MISUSE : insert_chunk(h, t->id, SMP_HENC_TEXT, &st, buf, (size_t)k);
    free(buf);
    return rc;
}

static int insert_tags(smp_history_t *h)
{
    sqlite3_stmt *s = h->stmt[ST_TAG_ADD];
    for (size_t k = 0; k < h->nunstored; k++) {
        struct tag *t = h->unstored[k];
        const char *dev = t->key, *name = t->key + strlen(t->key) + 1;
        static const char *const types[] = {"", "bool", "int", "uint", "float", "text"};
        int rc = sqlite3_bind_int64(s, 1, t->id);
        rc = rc ? rc : sqlite3_bind_text(s, 2, dev, -1, SQLITE_STATIC);
        rc = rc ? rc : sqlite3_bind_text(s, 3, name, -1, SQLITE_STATIC);
        rc = rc ? rc : sqlite3_bind_text(s, 4, types[t->last_enc], -1, SQLITE_STATIC);
        rc = rc ? rc : reset_stmt(s, sqlite3_step(s));
        if (rc != SQLITE_OK) {
            sqlite3_reset(s);
            return rc;
        }
    }
    return SQLITE_OK;
}

static int prune_prefix(smp_history_t *h, int64_t cutoff, int max_rows, int *deleted, bool *more);

/* qsort has no context argument; the writer is the only thread that sorts. */
static _Thread_local const smp_history_t *g_sort_h;

static int cmp_t_first(const void *a, const void *b)
{
    int64_t x = slot_at(g_sort_h, *(const uint32_t *)a)->t_first;
    int64_t y = slot_at(g_sort_h, *(const uint32_t *)b)->t_first;
    return (x > y) - (x < y);
}

int smp__history_flush(smp_history_t *h, int64_t now_ms)
{
    /* Age: a chunk open longer than chunk_max_ms closes, which bounds what a power cut can take
     * (the staging file is in RAM) to that much history per tag. */
    /* At most once a second: commits can be far more frequent (commit_interval_ms 0). */
    if (h->nopen > 0 && now_ms > INT64_MIN + h->chunk_max_ms &&
        (now_ms - h->last_sweep_ms >= 1000 || now_ms < h->last_sweep_ms)) {
        h->last_sweep_ms = now_ms;
        for (size_t k = 0; k < h->tab_cap; k++) {
            struct tag *t = h->tab[k];
            if (t != NULL && t->slot >= 0 &&
                slot_at(h, (uint32_t)t->slot)->t_first <= now_ms - h->chunk_max_ms) {
                close_open(h, t);
            }
        }
    }
    int rc = insert_tags(h);
    /* Oldest first, so that rowid order stays close to time order: pruning takes a prefix. */
    g_sort_h = h;
    qsort(h->pend, h->npend, sizeof *h->pend, cmp_t_first);
    size_t done = 0;
    for (; rc == SQLITE_OK && done < h->npend; done++) {
        uint32_t i = h->pend[done];
        struct slot *s = slot_at(h, i);
        smp_hist_state_t st;
        sst_get(h, i, &st);
        rc = insert_chunk(h, s->tag_id, s->enc, &st, s->data, s->len);
        if (rc != SQLITE_OK) {
            break;
        }
        h->intx[h->nintx++] = i;
        h->open_samples -= h->sst[i].n;
    }
    memmove(h->pend, h->pend + done, (h->npend - done) * sizeof *h->pend);
    h->npend -= done;
    /* The size bound holds at every commit: what this one added over it goes with it (a
     * bounded step; a bigger excess, e.g. a lowered bound, is left to the regular prune). */
    if (rc == SQLITE_OK && h->max_bytes > 0 && h->bytes + h->tx_bytes > h->max_bytes) {
        int deleted;
        bool more;
        rc = prune_prefix(h, INT64_MIN, flush_prune_rows, &deleted, &more);
    }
    return rc;
}

void smp__history_tx_end(smp_history_t *h, bool committed)
{
    if (h == NULL) {
        return;
    }
    if (committed) {
        if (h->losing) {
            LOG_INFO(SCOPE, "history chunks are stored again; %" PRIu64 " samples were dropped",
                     h->lost_samples);
            h->losing = false;
            h->lost_samples = 0;
        }
        for (size_t k = 0; k < h->nintx; k++) {
            slot_free(h, h->intx[k]);
        }
        h->nunstored = 0;
        h->rows += h->tx_rows;
        h->bytes += h->tx_bytes;
        h->samples += h->tx_samples;
    } else {
        /* Their rows are gone: insert them again with the next transaction. */
        for (size_t k = 0; k < h->nintx; k++) {
            h->pend[h->npend++] = h->intx[k];
            h->open_samples += h->sst[h->intx[k]].n;
        }
    }
    h->nintx = 0;
    h->tx_rows = h->tx_bytes = h->tx_samples = 0;
}

/* ---- query ---- */

struct qsample {
    int64_t ts;
    uint64_t order; /* chunk order, then sample order: ties keep append order */
    size_t off;     /* text in the buffer */
};

struct qres {
    struct qsample *v;
    size_t n, cap;
    char *buf;
    size_t blen, bcap;
};

static int cmp_sample(const void *a, const void *b)
{
    const struct qsample *x = a, *y = b;
    if (x->ts != y->ts) {
        return x->ts < y->ts ? -1 : 1;
    }
    return x->order < y->order ? -1 : x->order > y->order;
}

static int qres_add(struct qres *r, const smp_hist_iter_t *it, uint64_t order)
{
    char tmp[64];
    size_t need = smp__hist_format(it, tmp, sizeof tmp);
    if (r->n == r->cap) {
        size_t c = r->cap ? r->cap * 2 : 64;
        void *p = realloc(r->v, c * sizeof *r->v);
        if (p == NULL) {
            return SQLITE_NOMEM;
        }
        r->v = p;
        r->cap = c;
    }
    if (r->blen + need + 1 > r->bcap) {
        size_t c = r->bcap ? r->bcap : 1024;
        while (c < r->blen + need + 1) {
            c *= 2;
        }
        char *p = realloc(r->buf, c);
        if (p == NULL) {
            return SQLITE_NOMEM;
        }
        r->buf = p;
        r->bcap = c;
    }
    smp__hist_format(it, r->buf + r->blen, need + 1);
    r->v[r->n++] = (struct qsample){.ts = it->s.ts, .order = order, .off = r->blen};
    r->blen += need + 1;
    return SQLITE_OK;
}

static int qres_chunk(struct qres *r, int enc, int64_t t_first, const uint8_t *data, size_t len,
                      int64_t from, int64_t to, uint64_t order)
{
    smp_hist_iter_t it;
    if (smp__hist_iter_init(&it, enc, t_first, data, len) != 0) {
        return SQLITE_CORRUPT;
    }
    int k, rc = SQLITE_OK;
    while (rc == SQLITE_OK && (k = smp__hist_iter_next(&it)) == 1) {
        if (it.s.ts >= to) {
            break;
        }
        if (it.s.ts >= from) {
            rc = qres_add(r, &it, order + it.s.n);
        }
    }
    if (rc == SQLITE_OK && k < 0) {
        LOG_WARN(SCOPE, "a history chunk does not decode; skipping the rest of it");
    }
    return rc;
}

/* Sorts and keeps the first `limit`: what is cut off can never come back into the answer. */
static void qres_trim(struct qres *r, size_t limit)
{
    if (r->n > 1) { /* r->v is NULL while empty: qsort must not see it */
        qsort(r->v, r->n, sizeof *r->v, cmp_sample);
    }
    if (r->n > limit) {
        r->n = limit;
    }
}

int smp__history_query(smp_history_t *h, const char *device, const char *tag, int64_t from,
                       int64_t to, size_t limit, smp_history_row_t **rows, size_t *n, char **buf)
{
    *rows = NULL;
    *n = 0;
    *buf = NULL;
    struct tag *t = tag_lookup(h, device, tag);
    if (t == NULL || limit == 0 || from >= to) {
        return SQLITE_OK;
    }
    struct qres r = {0};
    int rc = SQLITE_OK;
    /* Chunks not in SQLite yet: the open one and closed ones awaiting their insert. They come
     * after every stored chunk in append order. */
    uint64_t mem_order = UINT64_C(1) << 62;
    for (size_t k = 0; rc == SQLITE_OK && k < h->npend; k++) {
        struct slot *s = slot_at(h, h->pend[k]);
        if (s->tag_id == t->id) {
            rc = qres_chunk(&r, s->enc, s->t_first, s->data, s->len, from, to,
                            mem_order + (uint64_t)k * 4096);
        }
    }
    if (rc == SQLITE_OK && t->slot >= 0) {
        struct slot *s = slot_at(h, (uint32_t)t->slot);
        rc = qres_chunk(&r, s->enc, s->t_first, s->data, s->len, from, to,
                        mem_order + (UINT64_C(1) << 60));
    }
    /* Stored chunks in t_first order: once `limit` samples are in hand and the next chunk
     * starts after the last of them, nothing later can get in. */
    sqlite3_stmt *s = h->stmt[ST_QUERY];
    int64_t lo = from > INT64_MIN + h->span_max ? from - h->span_max : INT64_MIN;
    rc = rc ? rc : sqlite3_bind_int64(s, 1, lo);
    rc = rc ? rc : sqlite3_bind_int64(s, 2, to);
    rc = rc ? rc : sqlite3_bind_int64(s, 3, t->id);
    uint64_t order = 0;
    int step = SQLITE_DONE;
    while (rc == SQLITE_OK && (step = sqlite3_step(s)) == SQLITE_ROW) {
        int64_t t_first = sqlite3_column_int64(s, 0);
        if (r.n >= limit) {
            qres_trim(&r, limit);
            if (r.v[limit - 1].ts < t_first) {
                step = SQLITE_DONE;
                break;
            }
        }
        const uint8_t *data = sqlite3_column_blob(s, 2);
        size_t len = (size_t)sqlite3_column_bytes(s, 2);
        rc = qres_chunk(&r, sqlite3_column_int(s, 1), t_first, data, len, from, to, order);
        order += 4096;
    }
    sqlite3_reset(s);
    if (rc == SQLITE_OK && step != SQLITE_DONE) {
        rc = step;
    }
    if (rc == SQLITE_OK) {
        qres_trim(&r, limit);
        if (r.n > 0 && (*rows = malloc(r.n * sizeof **rows)) == NULL) {
            rc = SQLITE_NOMEM;
        }
    }
    if (rc != SQLITE_OK) {
        free(r.v);
        free(r.buf);
        return rc;
    }
    for (size_t k = 0; k < r.n; k++) {
        (*rows)[k] = (smp_history_row_t){.ts_ms = r.v[k].ts, .value_json = r.buf + r.v[k].off};
    }
    *n = r.n;
    *buf = r.buf;
    free(r.v);
    return SQLITE_OK;
}

/* ---- pruning ---- */

/* Deletes the oldest rows (by rowid) that ended before `cutoff` or push the total over the
 * size bound, at most max_rows. */
static int prune_prefix(smp_history_t *h, int64_t cutoff, int max_rows, int *deleted, bool *more)
{
    *deleted = 0;
    *more = false;
    int64_t bytes = h->bytes + h->tx_bytes;
    if (cutoff == INT64_MIN && (h->max_bytes <= 0 || bytes <= h->max_bytes)) {
        return SQLITE_OK;
    }
    /* Oldest first, by rowid: the prefix that is past the retention or over the size. Rows
     * close in about time order, so the first recent row ends the prefix. */
    sqlite3_stmt *s = h->stmt[ST_OLDEST];
    int rc = sqlite3_bind_int(s, 1, max_rows);
    int64_t last = -1, freed = 0, samples = 0, nrows = 0;
    while (rc == SQLITE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        int64_t t_last = sqlite3_column_int64(s, 1);
        int64_t b = sqlite3_column_int64(s, 2) + chunk_overhead;
        bool old = t_last<cutoff, over = h->max_bytes> 0 && bytes - freed > h->max_bytes;
        if (!old && !over) {
            break;
        }
        last = sqlite3_column_int64(s, 0);
        freed += b;
        samples += sqlite3_column_int64(s, 3);
        nrows++;
        rc = SQLITE_OK;
    }
    rc = reset_stmt(s, rc);
    if (rc != SQLITE_OK || nrows == 0) {
        return rc;
    }
    s = h->stmt[ST_DEL_UPTO];
    rc = sqlite3_bind_int64(s, 1, last);
    rc = rc ? rc : reset_stmt(s, sqlite3_step(s));
    if (rc == SQLITE_OK) {
        h->tx_rows -= nrows;
        h->tx_bytes -= freed;
        h->tx_samples -= samples;
        *deleted = (int)nrows;
        *more = nrows >= max_rows;
    }
    return rc;
}

int smp__history_prune(smp_history_t *h, int64_t now_ms, int max_rows, int *deleted, bool *more)
{
    int64_t cutoff = h->retention_ms > 0 && now_ms > INT64_MIN + h->retention_ms
                         ? now_ms - h->retention_ms
                         : INT64_MIN;
    return prune_prefix(h, cutoff, max_rows, deleted, more);
}

void smp__history_stats(const smp_history_t *h, uint64_t *bytes, uint64_t *samples)
{
    *bytes = h != NULL && h->bytes > 0 ? (uint64_t)h->bytes : 0;
    *samples = h != NULL ? (uint64_t)(h->samples + (h->open_samples > 0 ? h->open_samples : 0)) : 0;
}

/* ---- schema, open, recovery, migration ---- */

int smp__history_schema(sqlite3 *db)
{
    return sqlite3_exec(db,
                        "CREATE TABLE IF NOT EXISTS tags ("
                        " id INTEGER PRIMARY KEY, device TEXT NOT NULL, tag TEXT NOT NULL,"
                        " type TEXT NOT NULL);"
                        "CREATE TABLE IF NOT EXISTS history_chunk ("
                        " tag_id INTEGER NOT NULL, t_first INTEGER NOT NULL,"
                        " t_last INTEGER NOT NULL, n INTEGER NOT NULL,"
                        " encoding INTEGER NOT NULL, data BLOB NOT NULL);"
                        "CREATE INDEX IF NOT EXISTS history_chunk_by_time"
                        " ON history_chunk(t_first, tag_id);"
                        "CREATE TABLE IF NOT EXISTS history_meta ("
                        " key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;",
                        NULL, NULL, NULL);
}

static int exec1(sqlite3 *db, const char *sql, sqlite3_stmt **out)
{
    int rc = sqlite3_prepare_v2(db, sql, -1, out, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(*out);
        if (rc == SQLITE_DONE) {
            rc = SQLITE_OK;
        }
    }
    return rc;
}

/* The database's identity (history_meta.uid), created on first use: names its staging file. */
static int load_uid(smp_history_t *h)
{
    sqlite3_stmt *s = NULL;
    int rc = exec1(h->db, "SELECT value FROM history_meta WHERE key = 'uid'", &s);
    if (rc == SQLITE_ROW) {
        h->uid = (uint64_t)sqlite3_column_int64(s, 0);
        sqlite3_finalize(s);
        return SQLITE_OK;
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_OK) {
        return rc;
    }
    sqlite3_randomness(sizeof h->uid, &h->uid);
    char sql[128];
    snprintf(sql, sizeof sql, "INSERT INTO history_meta(key, value) VALUES('uid', %" PRId64 ")",
             (int64_t)h->uid);
    return sqlite3_exec(h->db, sql, NULL, NULL, NULL);
}

static int load_tags_and_totals(smp_history_t *h)
{
    sqlite3_stmt *s = NULL;
    int rc = sqlite3_prepare_v2(h->db, "SELECT id, device, tag, type FROM tags", -1, &s, NULL);
    while (rc == SQLITE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        struct tag *t =
            tag_add(h, (const char *)sqlite3_column_text(s, 1),
                    (const char *)sqlite3_column_text(s, 2), (uint32_t)sqlite3_column_int64(s, 0));
        if (t == NULL) {
            rc = SQLITE_NOMEM;
            break;
        }
        rc = SQLITE_OK;
    }
    sqlite3_finalize(s);
    if (rc != SQLITE_DONE && rc != SQLITE_OK) {
        return rc;
    }
    /* Reads the whole table once (allow a second per ~100 MB at start). */
    rc = exec1(h->db,
               "SELECT count(*), total(length(data)), total(n), max(t_last - t_first)"
               " FROM history_chunk",
               &s);
    if (rc == SQLITE_ROW) {
        h->rows = sqlite3_column_int64(s, 0);
        h->bytes = (int64_t)sqlite3_column_double(s, 1) + h->rows * chunk_overhead + btree_fixed;
        h->samples = (int64_t)sqlite3_column_double(s, 2);
        int64_t span = sqlite3_column_int64(s, 3);
        h->span_max = span > h->chunk_max_ms ? span : h->chunk_max_ms;
        rc = SQLITE_OK;
    }
    sqlite3_finalize(s);
    return rc;
}

static bool tag_id_known(const uint8_t *known, uint32_t next_id, uint32_t id)
{
    return id < next_id && (known[id / 8] >> (id % 8) & 1);
}

/* Decodes a recovered slot: how many samples its bytes hold, up to the first bad one. */
static size_t recover_decode(const struct slot *sl, smp_hist_state_t *st, size_t *len)
{
    smp_hist_iter_t it;
    size_t good = 0;
    *len = 0;
    if (sl->len > SLOT_DATA || smp__hist_iter_init(&it, sl->enc, sl->t_first, sl->data, sl->len)) {
        return 0;
    }
    while (smp__hist_iter_next(&it) == 1) {
        good = (size_t)(it.p - sl->data);
        *st = it.s;
    }
    *len = good;
    return st->n;
}

static int chunk_exists(smp_history_t *h, const struct slot *sl, const smp_hist_state_t *st,
                        size_t len, bool *exists)
{
    sqlite3_stmt *s = h->stmt[ST_EXISTS];
    int rc = sqlite3_bind_int64(s, 1, sl->t_first);
    rc = rc ? rc : sqlite3_bind_int64(s, 2, sl->tag_id);
    rc = rc ? rc : sqlite3_bind_int64(s, 3, st->n);
    rc = rc ? rc : sqlite3_bind_blob(s, 4, len ? (const void *)sl->data : "", (int)len, NULL);
    int step = rc ? rc : sqlite3_step(s);
    *exists = step == SQLITE_ROW;
    return reset_stmt(s, step);
}

/* Writes every chunk the staging file still holds (open or closed at a kill -9) to SQLite,
 * once: a chunk whose exact row is already there committed before the kill. */
static int recover(smp_history_t *h)
{
    size_t nrec = 0, ndup = 0, nlost = 0;
    uint8_t *known = calloc(h->next_id / 8 + 1, 1);
    if (known == NULL) {
        return SQLITE_NOMEM;
    }
    for (size_t k = 0; k < h->tab_cap; k++) {
        if (h->tab[k] != NULL) {
            known[h->tab[k]->id / 8] |= (uint8_t)(1u << (h->tab[k]->id % 8));
        }
    }
    int rc = sqlite3_exec(h->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    for (uint32_t i = 0; rc == SQLITE_OK && i < h->cap; i++) {
        struct slot *sl = slot_at(h, i);
        if (sl->state != SLOT_OPEN && sl->state != SLOT_CLOSED) {
            continue;
        }
        smp_hist_state_t st = {0};
        size_t len;
        if (!tag_id_known(known, h->next_id, sl->tag_id) || recover_decode(sl, &st, &len) == 0) {
            nlost += sl->len > 0;
            continue;
        }
        bool exists = false;
        rc = chunk_exists(h, sl, &st, len, &exists);
        if (rc == SQLITE_OK && exists) {
            ndup++;
        } else if (rc == SQLITE_OK) {
            rc = insert_chunk(h, sl->tag_id, sl->enc, &st, sl->data, len);
            nrec++;
        }
    }
    free(known);
    if (rc == SQLITE_OK) {
        rc = sqlite3_exec(h->db, "COMMIT", NULL, NULL, NULL);
    }
    if (rc != SQLITE_OK) {
        sqlite3_exec(h->db, "ROLLBACK", NULL, NULL, NULL);
        smp__history_tx_end(h, false);
        return rc;
    }
    smp__history_tx_end(h, true);
    if (nrec + ndup + nlost > 0) {
        LOG_INFO(SCOPE,
                 "recovered %zu history chunks from %s (%zu were stored already, %zu dropped: "
                 "their tag was never committed)",
                 nrec, h->stage_path, ndup, nlost);
    }
    return SQLITE_OK;
}

/* Schema 1 kept one row per sample in `history`: turn them into chunks, then drop it. */
static int migrate_v1(smp_history_t *h)
{
    sqlite3_stmt *s = NULL;
    int rc =
        exec1(h->db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'history'", &s);
    sqlite3_finalize(s);
    if (rc != SQLITE_ROW) {
        return rc;
    }
    LOG_INFO(SCOPE, "migrating the history table of schema 1 into chunks");
    int64_t nrows = 0;
    rc = sqlite3_exec(h->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_prepare_v2(h->db,
                                "SELECT device, tag, ts_ms, value_json FROM history"
                                " ORDER BY device, tag, ts_ms, rowid",
                                -1, &s, NULL);
    }
    struct tag *prev = NULL;
    while (rc == SQLITE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        const char *dev = (const char *)sqlite3_column_text(s, 0);
        const char *tag = (const char *)sqlite3_column_text(s, 1);
        const char *val = (const char *)sqlite3_column_text(s, 3);
        rc = dev && tag && val ? smp__history_append(h, dev, tag, sqlite3_column_int64(s, 2), val)
                               : SQLITE_OK;
        struct tag *t = dev && tag ? tag_lookup(h, dev, tag) : NULL;
        if (rc == SQLITE_OK && prev != NULL && t != prev) {
            close_open(h, prev); /* one tag at a time: memory stays small */
            rc = smp__history_flush(h, INT64_MIN);
        }
        prev = t;
        nrows++;
    }
    sqlite3_finalize(s);
    if (rc == SQLITE_DONE) {
        if (prev != NULL) {
            close_open(h, prev);
        }
        rc = smp__history_flush(h, INT64_MIN);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_exec(h->db, "DROP TABLE history", NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_exec(h->db, "COMMIT", NULL, NULL, NULL);
    }
    if (rc != SQLITE_OK) {
        LOG_ERR(SCOPE, "history migration failed: %s", sqlite3_errmsg(h->db));
        sqlite3_exec(h->db, "ROLLBACK", NULL, NULL, NULL);
        smp__history_tx_end(h, false);
        return rc;
    }
    smp__history_tx_end(h, true);
    LOG_INFO(SCOPE, "migrated %" PRId64 " history rows into %" PRId64 " chunks", nrows, h->rows);
    return SQLITE_OK;
}

int smp__history_open(sqlite3 *db, const smp_history_opts_t *opts, smp_history_t **out)
{
    *out = NULL;
    smp_history_t *h = calloc(1, sizeof *h);
    if (h == NULL) {
        return SQLITE_NOMEM;
    }
    h->db = db;
    h->fd = -1;
    h->retention_ms = opts->retention_ms > 0 ? opts->retention_ms : 0;
    h->max_bytes = opts->max_bytes > 0 ? opts->max_bytes : 0;
    h->chunk_max_ms = opts->chunk_max_ms > 0 ? opts->chunk_max_ms : 900000;
    h->next_id = 1;
    int rc = SQLITE_OK;
    for (int i = 0; i < ST_N && rc == SQLITE_OK; i++) {
        rc = sqlite3_prepare_v3(db, hist_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &h->stmt[i], NULL);
    }
    rc = rc ? rc : load_uid(h);
    rc = rc ? rc : load_tags_and_totals(h);
    if (rc == SQLITE_OK) {
        stage_open(h, opts->runtime_dir);
        if (stage_map_existing(h)) {
            rc = recover(h);
            munmap(h->base, (h->cap + 1) * SLOT_SIZE);
            h->base = NULL;
            h->cap = 0;
            h->npend = h->nintx = 0;
        }
    }
    if (rc == SQLITE_OK && h->fd >= 0 && ftruncate(h->fd, 0) != 0) {
        rc = SQLITE_IOERR;
    }
    if (rc == SQLITE_OK && stage_resize(h, 256) != SQLITE_OK && h->fd >= 0) {
        /* A full tmpfs: keep going in memory rather than refuse the database. */
        LOG_WARN(SCOPE,
                 "%s: no room; open history chunks are kept in memory only (a kill -9 "
                 "loses them)",
                 h->stage_path);
        if (h->base != NULL) {
            munmap(h->base, (h->cap + 1) * SLOT_SIZE);
        }
        h->base = NULL;
        h->cap = h->nfree = 0;
        close(h->fd);
        h->fd = -1;
        unlink(h->stage_path);
        rc = stage_resize(h, 256);
    } else if (rc == SQLITE_OK && h->base == NULL) {
        rc = SQLITE_NOMEM;
    }
    rc = rc ? rc : migrate_v1(h);
    if (rc != SQLITE_OK) {
        smp__history_free(h);
        return rc;
    }
    *out = h;
    return SQLITE_OK;
}

int smp__history_flush_all(smp_history_t *h)
{
    if (h == NULL) {
        return SQLITE_OK;
    }
    for (size_t k = 0; k < h->tab_cap; k++) {
        if (h->tab[k] != NULL) {
            close_open(h, h->tab[k]);
        }
    }
    if (h->npend == 0 && h->nunstored == 0) {
        return SQLITE_OK;
    }
    int rc = sqlite3_exec(h->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    rc = rc ? rc : smp__history_flush(h, INT64_MIN);
    rc = rc ? rc : sqlite3_exec(h->db, "COMMIT", NULL, NULL, NULL);
    if (rc != SQLITE_OK && !sqlite3_get_autocommit(h->db)) {
        sqlite3_exec(h->db, "ROLLBACK", NULL, NULL, NULL);
    }
    smp__history_tx_end(h, rc == SQLITE_OK);
    return rc;
}

void smp__history_free(smp_history_t *h)
{
    if (h == NULL) {
        return;
    }
    for (int i = 0; i < ST_N; i++) {
        sqlite3_finalize(h->stmt[i]);
    }
    for (size_t k = 0; k < h->tab_cap; k++) {
        if (h->tab[k] != NULL) {
            free(h->tab[k]->key);
            free(h->tab[k]);
        }
    }
    free(h->tab);
    free(h->unstored);
    if (h->fd >= 0) {
        if (h->base != NULL) {
            munmap(h->base, (h->cap + 1) * SLOT_SIZE);
        }
        /* Nothing left to recover (a clean stop flushed everything): tmpfs is RAM, tidy up. */
        if (h->nopen == 0 && h->npend == 0 && h->nintx == 0) {
            unlink(h->stage_path);
        }
        close(h->fd);
    } else {
        free(h->base);
    }
    free(h->stage_path);
    free(h->sst);
    free(h->free_slots);
    free(h->pend);
    free(h->intx);
    free(h);
}
