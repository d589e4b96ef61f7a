/* History: per-tag chunks of compressed samples in SQLite (docs/store.md, "History").
 *
 * The store's writer thread owns a history and calls it inside its transactions:
 *   - smp__history_append() for every recorded value: the sample goes into the tag's open
 *     chunk, which lives in a small mmap'd staging file in the runtime directory (tmpfs:
 *     it survives kill -9, not a power cut) and touches SQLite only when the chunk closes;
 *   - smp__history_flush() just before COMMIT: closes chunks past their age and inserts every
 *     closed chunk, exactly once;
 *   - smp__history_tx_end() after COMMIT or ROLLBACK;
 *   - smp__history_query() for the history command: committed chunks plus the open ones;
 *   - smp__history_prune() for retention and the size bound, a few rows at a time.
 * Nothing here is thread-safe: one thread at a time (the store's db_mu).
 *
 * Errors are SQLite result codes (SQLITE_OK, SQLITE_NOMEM, ...): the store maps them at its
 * boundary like its own statements'. The codec functions (smp__hist_enc_*, smp__hist_iter_*)
 * are pure and return 0 or a negative errno. */
#ifndef SMP_HISTORY_H
#define SMP_HISTORY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <sqlite3.h>

#include "store.h"

/* ---- codec ------------------------------------------------------------------------------ */

/* Value encodings of a chunk (history_chunk.encoding). */
enum smp_hist_enc {
    SMP_HENC_BOOL = 1,  /* one byte 0/1 */
    SMP_HENC_INT = 2,   /* zigzag varint of the difference to the previous value (int64) */
    SMP_HENC_UINT = 3,  /* the same arithmetic, printed unsigned (uint64 above INT64_MAX) */
    SMP_HENC_FLOAT = 4, /* XOR with the previous double, significant bytes only */
    SMP_HENC_TEXT = 5,  /* varint length + the JSON text as it was given (strings, anything) */
    SMP_HENC_KIND = 0x0f,
    /* Flag: times as varints of the difference to the previous sample's, instead of zigzag
     * varints of the delta-of-delta. Chosen per chunk from the tag's last chunk: regular
     * polling favours delta-of-delta (0 costs one byte), irregular changes plain deltas. */
    SMP_HENC_TS_DELTA = 0x10,
    /* Flag: times as multiples of a period P (a varint at the start of the blob) plus a small
     * residual, (q << 5 | zigzag(r)) << 1, or (delta << 1 | 1) when the residual is large. A
     * tag polled every P ms that changes at random polls costs one or two bytes per time. */
    SMP_HENC_TS_PERIOD = 0x20,
    SMP_HENC_TS_MODE = 0x30,
};

/* Encoder and decoder state: the previous sample. */
typedef struct smp_hist_state {
    int enc;
    uint32_t n;      /* samples so far */
    int64_t t_first; /* first sample's time (stored in the row, not in the blob) */
    int64_t ts;      /* previous sample's time */
    uint64_t delta;  /* previous time difference (for delta-of-delta) */
    uint64_t val;    /* previous value: int64/uint64 bits, double bits, bool 0/1 */
    uint64_t period; /* TS_PERIOD: P */
    /* Encoder: time bytes so far in each form (period with cand_period), the smallest time
     * difference seen: what the tag's next chunk chooses from. */
    uint64_t cost_dod, cost_delta, cost_period, cand_period, min_delta;
    const char *text; /* TEXT: the sample's text (decoder only, not NUL-terminated) */
    size_t text_len;
} smp_hist_state_t;

/* Parses JSON value text as it would be stored with encoding `enc`: 0 and *val set when the
 * text reads back exactly (smp__hist_format gives the same bytes), -EINVAL otherwise. TEXT
 * takes any text. */
int smp__hist_parse(int enc, const char *text, size_t len, uint64_t *val);
/* The encoding a new chunk would use for `text`: BOOL, INT, UINT, FLOAT or TEXT. */
int smp__hist_classify(const char *text, size_t len);

/* Starts a chunk with its first sample; enc may carry a SMP_HENC_TS_* flag. */
void smp__hist_enc_init(smp_hist_state_t *s, int enc, int64_t ts);
/* TS_PERIOD chunks: sets P (> 0) and writes the blob's header; call after init. Returns the
 * bytes written or -ENOSPC / -EINVAL. */
int smp__hist_enc_period(smp_hist_state_t *s, uint64_t period, uint8_t *out, size_t cap);
/* Encodes one sample into out[0..cap) and advances *s. Returns the bytes written, -ENOSPC
 * when it does not fit (s unchanged), -EINVAL when ts is before the previous sample's (a
 * clock step: start a new chunk) or the text does not fit the encoding. */
int smp__hist_enc_sample(smp_hist_state_t *s, int64_t ts, const char *text, size_t len,
                         uint8_t *out, size_t cap);

/* Decoding: init, then next() until it returns 0 (end) or a negative code (-EBADMSG: corrupt).
 * After a 1, s->ts and the value (s->val / s->text) describe the sample. */
typedef struct smp_hist_iter {
    smp_hist_state_t s;
    const uint8_t *p, *end;
} smp_hist_iter_t;
int smp__hist_iter_init(smp_hist_iter_t *it, int enc, int64_t t_first, const uint8_t *data,
                        size_t len);
int smp__hist_iter_next(smp_hist_iter_t *it);
/* Writes the current sample's JSON text (NUL-terminated, truncated to n). Returns the length
 * the full text needs, like snprintf. */
size_t smp__hist_format(const smp_hist_iter_t *it, char *buf, size_t n);

/* ---- the module ------------------------------------------------------------------------- */

typedef struct smp_history smp_history_t;

typedef struct smp_history_opts {
    /* Directory of the staging file (tmpfs); NULL or unusable: open chunks live in memory
     * only and a kill -9 loses them (logged). Borrowed. */
    const char *runtime_dir;
    int64_t retention_ms; /* 0: no time bound */
    int64_t max_bytes;    /* 0: no size bound */
    int64_t chunk_max_ms; /* a chunk spans at most this much time (and closes at that age) */
} smp_history_opts_t;

/* Schema of the history tables, run by the store inside its schema transaction. Migrates rows
 * of the old `history` table (schema 1) into chunks and drops it. */
int smp__history_schema(sqlite3 *db);
/* Prepares statements, loads tag ids and totals, recovers the staging file (chunks that were
 * open at a kill -9 are written to SQLite). Main thread, at store open. */
int smp__history_open(sqlite3 *db, const smp_history_opts_t *opts, smp_history_t **out);
/* Closes every open chunk and writes it (own transaction; the store calls it at a clean stop
 * with no transaction open). Returns an SQLite code. */
int smp__history_flush_all(smp_history_t *h);
/* Finalizes statements and unmaps; does not write. NULL is a no-op. */
void smp__history_free(smp_history_t *h);

/* Inside a transaction. Strings borrowed. */
int smp__history_append(smp_history_t *h, const char *device, const char *tag, int64_t ts,
                        const char *value_json);
int smp__history_flush(smp_history_t *h, int64_t now_ms);
void smp__history_tx_end(smp_history_t *h, bool committed);

/* Up to `limit` samples with from <= ts < to, oldest first (ties in append order), committed
 * or still open. *rows and *buf are malloc'ed (free both); *n may be 0. */
int smp__history_query(smp_history_t *h, const char *device, const char *tag, int64_t from,
                       int64_t to, size_t limit, smp_history_row_t **rows, size_t *n, char **buf);

/* Deletes the oldest chunks past the retention (before now_ms - retention) or over max_bytes,
 * at most max_rows, inside a transaction. *deleted gets the number of rows deleted, *more is
 * set when more remain. */
int smp__history_prune(smp_history_t *h, int64_t now_ms, int max_rows, int *deleted, bool *more);

/* Bytes of history on disk (chunk rows and their index, estimated from running totals) and
 * samples stored (committed and open). */
void smp__history_stats(const smp_history_t *h, uint64_t *bytes, uint64_t *samples);

#endif
