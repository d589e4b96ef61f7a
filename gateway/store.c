/* Store: the gateway's memory in SQLite, written by one writer thread.
 *
 * Design (docs/store.md has the long version):
 * - Loop-thread calls copy their arguments into an operation and append it to a queue under a
 *   mutex; they never touch SQLite, so they never block on disk.
 * - The writer thread takes everything queued (up to batch_max_ops) and applies it into one
 *   open transaction (BEGIN IMMEDIATE), committed on the commit interval (commit_tick) or at
 *   once when an op needs durability (a command's "accepted" row, a seq reservation, every
 *   batch with interval 0). Finished operations go back to the loop through a uv_async_t,
 *   which runs the callbacks in queue order.
 * - Outbox messages are staged in the ring (ring.h) by the loop thread; an interval commit
 *   writes only those still unacknowledged into the outbox table. seq ranges are reserved
 *   ahead in seq_reserve, durably, before a seq is published.
 * - Reads (outbox_fetch, history) are operations too, so they are ordered with the writes; they
 *   see the open transaction, and outbox_fetch merges the ring's live records.
 * - Outbox byte and row counts are kept as running totals (loaded once at open), adjusted by the
 *   statements of a transaction and folded in only when it commits.
 * - One connection, used by the writer thread and, for the start-up reads, by the main thread;
 *   db_mu makes those uses exclusive, so the connection is opened without SQLite's own mutex. */
#include "store.h"

#include <errno.h>
#include <pthread.h>
#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "history.h"
#include "log.h"
#include "obpack.h"
#include "ring.h"

#define SCOPE          "store"
#define SCHEMA_VERSION 2

/* Tunables. Plain statics rather than options: nothing outside needs to change them, and the
 * unit tests (which #include this file) can shorten the timers. */
static size_t batch_max_ops = 10000;      /* ops per transaction: bounds commit latency and WAL */
static uint64_t idle_tick_ms = 1000;      /* idle wake-up for pruning and checkpoints */
static uint64_t prune_interval_ms = 1000; /* at most one prune per interval, unless behind */
static uint64_t prune_backlog_ms = 20;    /* wake-up while old history rows remain */
static int prune_chunk = 1000;            /* rows per prune: a bounded, short delete */
static int64_t cmd_result_keep_ms = 24 * 3600000LL; /* default: far beyond the dedup window */
static int64_t audit_keep_ms = 90 * 24 * 3600000LL; /* default: the audit trail outlives history */
static int busy_timeout_ms = 5000;  /* another process (sqlite3 CLI) holding a lock */
static int close_apply_rounds = 32; /* callbacks that queue more work during close */
static int64_t journal_size_limit = 64 * 1024 * 1024; /* WAL truncated to this after reset */
static int wal_autocheckpoint_pages = 1000;
static int cache_kib = 2048;     /* page cache of the writer's connection (docs/store.md) */
static int ckpt_cache_kib = 256; /* the checkpointer reads pages once: it needs no cache */
static size_t ring_region_bytes = 4 * 1024 * 1024; /* per ring region; sparse, on tmpfs */
static uint64_t lv_flush_ms = 300000;   /* last values written this often (and at stop) */
static uint64_t seq_headroom_min = 8;   /* seqs reserved ahead of the last committed one */
static uint64_t seq_reserve_blocks = 8; /* a reservation spans this many headrooms */
static size_t pack_min_msgs = 8;        /* fewer unacked messages at a commit: one row each */

enum op_kind {
    OP_PUT_VALUE,
    OP_OUTBOX_ADD,
    OP_OUTBOX_ACK,
    OP_OUTBOX_FETCH,
    OP_HISTORY,
    OP_CMD_PUT,
    OP_AUDIT,
};

/* One queued operation. Its strings live in `data`, so one allocation carries everything. */
typedef struct op {
    struct op *next;
    enum op_kind kind;
    int status;             /* 0, or a negative code (preset for invalid arguments) */
    int64_t id;             /* add: assigned row id; ack: row to delete; fetch: after_id */
    int64_t ts_ms;          /* put, cmd_put: time; history: from_ms; audit: received_ms */
    int64_t to_ms;          /* history: to_ms; audit: latency_us */
    uint64_t seq;           /* add */
    size_t max;             /* fetch: max rows; history: limit */
    const char *device;     /* put, add, history, cmd_put, audit (may be NULL) */
    const char *name;       /* put: tag; add: topic; history: tag; cmd_put, audit: command id */
    const char *value_json; /* put; cmd_put: result (may be NULL); audit */
    const char *aux[4];     /* audit: op, tag, code, message (each may be NULL) */
    const void *payload;    /* add */
    size_t len;             /* add */
    uint64_t reserve;       /* add: seq range end reserved by this op's commit (0: none) */
    bool done;              /* finished; waits behind earlier ops only to keep callback order */
    bool has_cb;
    union {
        smp_store_added_cb added;
        smp_store_fetch_cb fetch;
        smp_store_history_cb history;
    } cb;
    void *arg;
    /* Results of reads, owned by the op and freed with it. */
    void *rows;
    size_t nrows;
    char *buf;
    char data[];
} op_t;

enum {
    ST_BEGIN,
    ST_COMMIT,
    ST_ROLLBACK,
    ST_PUT_LAST,
    ST_SEQ_SET,
    ST_OB_ACK,
    ST_OB_FETCH,
    ST_OB_OLDEST,
    ST_OB_DEL_UPTO,
    ST_LOAD_LAST,
    ST_LOAD_SEQ,
    ST_CMD_PUT,
    ST_CMD_PRUNE,
    ST_LOAD_CMDS,
    ST_AUDIT,
    ST_AUDIT_PRUNE,
    ST_AUDIT_TRIM,
    ST_OB_ADD_ID,
    ST_SEQ_MAX,
    ST_RESERVE_SET,
    ST_LOAD_RESERVE,
    ST_RESERVE_EXACT,
    ST_PK_ADD,
    ST_PK_DEL,
    ST_PK_MEMBERS,
    ST_PK_DATA,
    ST_COUNT
};

static const char *const stmt_sql[ST_COUNT] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_PUT_LAST] = "INSERT INTO last_value(device, tag, value_json, ts_ms) VALUES(?1, ?2, ?3, ?4)"
                    " ON CONFLICT(device, tag) DO UPDATE SET value_json = excluded.value_json,"
                    " ts_ms = excluded.ts_ms",
    [ST_SEQ_SET] = "INSERT INTO device_seq(device, seq) VALUES(?1, ?2)"
                   " ON CONFLICT(device) DO UPDATE SET seq = excluded.seq",
    [ST_OB_ACK] = "DELETE FROM outbox WHERE id = ?1 RETURNING length(payload)",
    [ST_OB_FETCH] = "SELECT id, device, seq, topic, payload FROM outbox WHERE id > ?1"
                    " ORDER BY id LIMIT ?2",
    [ST_OB_OLDEST] = "SELECT id, length(payload) FROM outbox ORDER BY id",
    [ST_OB_DEL_UPTO] = "DELETE FROM outbox WHERE id <= ?1",
    [ST_LOAD_LAST] = "SELECT device, tag, value_json, ts_ms FROM last_value ORDER BY device, tag",
    [ST_LOAD_SEQ] = "SELECT seq FROM device_seq WHERE device = ?1",
    [ST_CMD_PUT] = "INSERT INTO cmd_result(device, id, result_json, ts_ms) VALUES(?1, ?2, ?3, ?4)"
                   " ON CONFLICT(device, id) DO UPDATE SET result_json = excluded.result_json,"
                   " ts_ms = excluded.ts_ms",
    [ST_CMD_PRUNE] = "DELETE FROM cmd_result WHERE (device, id) IN (SELECT device, id"
                     " FROM cmd_result WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT ?2)",
    [ST_LOAD_CMDS] = "SELECT device, id, result_json, ts_ms FROM cmd_result WHERE ts_ms >= ?1"
                     " ORDER BY ts_ms",
    [ST_AUDIT] = "INSERT INTO audit(received_ms, cmd_id, device, op, tag, value_json, code,"
                 " message, latency_us) VALUES(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    [ST_AUDIT_PRUNE] = "DELETE FROM audit WHERE id IN (SELECT id FROM audit"
                       " WHERE received_ms < ?1 ORDER BY received_ms LIMIT ?2)",
    /* Ids only grow: the rows more than ?1 below the newest are the oldest beyond the cap. */
    [ST_AUDIT_TRIM] = "DELETE FROM audit WHERE id IN (SELECT id FROM audit"
                      " WHERE id <= (SELECT max(id) FROM audit) - ?1 ORDER BY id LIMIT ?2)",
    /* OR IGNORE: a ring record may already be in the table when the process died between a
     * commit and resetting the ring region (recovery inserts it again). */
    [ST_OB_ADD_ID] = "INSERT OR IGNORE INTO outbox(id, device, seq, topic, payload, ts_ms)"
                     " VALUES(?1, ?2, ?3, ?4, ?5, ?6)",
    [ST_SEQ_MAX] = "INSERT INTO device_seq(device, seq) VALUES(?1, ?2)"
                   " ON CONFLICT(device) DO UPDATE SET seq = max(seq, excluded.seq)",
    [ST_RESERVE_SET] = "INSERT INTO seq_reserve(device, upto) VALUES(?1, ?2)"
                       " ON CONFLICT(device) DO UPDATE SET upto = max(upto, excluded.upto)",
    [ST_LOAD_RESERVE] = "SELECT upto FROM seq_reserve WHERE device = ?1",
    [ST_RESERVE_EXACT] = "INSERT INTO seq_reserve(device, upto) VALUES(?1, ?2)"
                         " ON CONFLICT(device) DO UPDATE SET upto = excluded.upto",
    [ST_PK_ADD] = "INSERT OR IGNORE INTO outbox_pack(first_id, last_id, raw_len, members, data)"
                  " VALUES(?1, ?2, ?3, ?4, ?5)",
    [ST_PK_DEL] = "DELETE FROM outbox_pack WHERE first_id = ?1",
    [ST_PK_MEMBERS] = "UPDATE outbox_pack SET members = ?2 WHERE first_id = ?1",
    [ST_PK_DATA] = "SELECT raw_len, data FROM outbox_pack WHERE first_id = ?1",
};

/* The tables of schema version 1 except `history`, which version 2 replaced with chunks
 * (history.c). Every table is documented in docs/store.md. */
static const char schema_v1[] =
    "CREATE TABLE IF NOT EXISTS last_value ("
    " device TEXT NOT NULL, tag TEXT NOT NULL, value_json TEXT NOT NULL, ts_ms INTEGER NOT NULL,"
    " PRIMARY KEY (device, tag)) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS device_seq ("
    " device TEXT PRIMARY KEY NOT NULL, seq INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE IF NOT EXISTS outbox ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, seq INTEGER NOT NULL,"
    " topic TEXT NOT NULL, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL);"
    "CREATE TABLE IF NOT EXISTS cmd_result ("
    " device TEXT NOT NULL, id TEXT NOT NULL, result_json TEXT, ts_ms INTEGER NOT NULL,"
    " PRIMARY KEY (device, id)) WITHOUT ROWID;"
    "CREATE INDEX IF NOT EXISTS cmd_result_by_ts ON cmd_result(ts_ms);"
    "CREATE TABLE IF NOT EXISTS audit ("
    " id INTEGER PRIMARY KEY AUTOINCREMENT, received_ms INTEGER NOT NULL, cmd_id TEXT,"
    " device TEXT, op TEXT, tag TEXT, value_json TEXT, code TEXT, message TEXT,"
    " latency_us INTEGER);"
    "CREATE INDEX IF NOT EXISTS audit_by_time ON audit(received_ms);"
    /* Added without a version bump: an older simpul ignores a table it does not know. */
    "CREATE TABLE IF NOT EXISTS seq_reserve ("
    " device TEXT PRIMARY KEY NOT NULL, upto INTEGER NOT NULL) WITHOUT ROWID;"
    /* An interval's outage backlog in one deflated row (obpack.h); also without a bump. */
    "CREATE TABLE IF NOT EXISTS outbox_pack ("
    " first_id INTEGER PRIMARY KEY, last_id INTEGER NOT NULL, raw_len INTEGER NOT NULL,"
    " members BLOB NOT NULL, data BLOB NOT NULL);";

struct smp_store {
    uv_loop_t *loop;
    uv_async_t async;
    bool async_closing;
    bool async_closed;
    size_t pending_cbs; /* loop thread: ops whose callback has not run; the async is ref'ed
                         * only while this is non-zero, like a uv_fs request */

    sqlite3 *db;
    sqlite3_stmt *stmt[ST_COUNT];
    bool in_memory;
    char *path;
    int64_t retention_ms; /* 0: keep history forever */
    int64_t outbox_max;   /* 0: unbounded */
    bool sync_normal;     /* PRAGMA synchronous = NORMAL instead of FULL */
    int64_t cmd_keep_ms, audit_keep_ms, audit_max_rows; /* see smp_store_opts_t */
    smp_history_t *hist; /* history chunks (history.c), used by the writer like the db */
    int64_t history_max; /* bytes; 0: unbounded */
    int64_t history_chunk_ms;
    char *runtime_dir; /* staging file of open history chunks; NULL: memory */
    bool skip_check;   /* no PRAGMA quick_check at open (smp_store_opts_t) */

    uv_thread_t writer;
    bool writer_started;
    uv_mutex_t mu; /* queue and `stopping` */
    uv_cond_t cond;
    op_t *q_head, *q_tail;
    bool stopping;

    uv_mutex_t db_mu; /* exclusive use of the connection: writer vs. start-up reads */

    uv_mutex_t done_mu; /* done list and stats */
    op_t *d_head, *d_tail;
    smp_store_stats_t stats;

    /* Writer state: used under db_mu (the writer, and the start-up reads that may log an
     * error), or by open/close while the writer is not running. */
    int64_t ob_rows, ob_bytes;             /* committed outbox totals */
    smp_obpack_index_t packs;              /* outbox packs in the database (writer thread) */
    smp_obpack_index_t tx_packs;           /* packs the open interval commit inserts */
    int64_t tx_rows, tx_bytes, tx_dropped; /* changes by the open transaction */
    int64_t tx_written;                    /* outbox rows written by it */
    uint64_t ob_dropped;                   /* since start */
    bool ob_full;                          /* in an "outbox full" episode */
    uint64_t ob_episode_dropped;
    bool err_episode;
    int err_code;
    uint64_t err_episode_count;
    uint64_t last_prune_ms; /* monotonic */
    bool prune_more;        /* the last prune hit its chunk size: old rows remain */
    uint64_t commits_since_ckpt;

    /* Checkpointer: a second connection on its own thread folds the WAL back into the
     * database, so the fsync a checkpoint needs never sits in front of a commit that a
     * command's answer is waiting for. */
    sqlite3 *ckpt_db;
    uv_thread_t ckpt_thread;
    bool ckpt_started;
    uv_mutex_t ckpt_mu;
    uv_cond_t ckpt_cond;
    bool ckpt_stop;
    int ckpt_wal_pages; /* WAL size after the last commit (ckpt_mu) */
    bool ckpt_dirty;    /* commits since the last checkpoint (ckpt_mu) */

    /* Interval commits (writer thread, under db_mu). */
    int64_t commit_interval_ms; /* 0: every batch is committed */
    bool tx_open;               /* a transaction spans the ops applied since the last commit */
    bool commit_now;            /* an applied op needs its commit before its callback */
    uint64_t next_tick_ms;      /* monotonic: the next interval commit */
    op_t *w_head, *w_tail;      /* applied, callback waits for the commit */
    op_t *r_head, *r_tail;      /* finished, to deliver */
    struct strmap *lv;          /* last values not yet written: "device/tag" -> struct lv */
    uint64_t lv_flushed_ms;
    smp_ring_rec_t *snap; /* ring records being written by commit_tick */
    bool *snap_ins;       /* ... and whether each was inserted */
    size_t snap_n, snap_cap;
    bool snap_oom;
    struct dirty_dev *dirty; /* devices whose seq commit_tick records */
    size_t dirty_n, dirty_cap;
    op_t *s_head, *s_tail; /* adds to stage once their reservation's commit has ended */
    uint64_t ring_staged;  /* messages staged since start (ring_mu) */
    uint64_t ring_live;    /* staged, not acked, not yet in the database (ring_mu) */
    int64_t *late; /* ids acked after their row was written: deleted in the next transaction */
    size_t late_n, late_cap;
    bool lost_state; /* the database was moved aside or is in memory: seq needs the floor */
    bool final_ok;   /* the last commit at close succeeded: the ring file can go */

    /* The outbox ring (ring.h) and the per-device seq bookkeeping, under ring_mu: the loop
     * thread stages and acks, the writer commits and resets. */
    smp_ring_t *ring;
    uv_mutex_t ring_mu;
    int64_t next_id;
    struct strmap *dseq; /* device -> struct dseq */
};

/* Per device seq state (ring mode). staged: the highest seq in the ring; committed: the seq
 * the last commit recorded in device_seq; upto: the durable reservation (seq_reserve), above
 * which nothing may be published before a new reservation commits. */
struct dseq {
    uint64_t staged, committed, upto, snap;
    uint64_t tick_staged, rate; /* staged at the last interval commit, and seqs per interval */
    int slot;                   /* its seq slot in the ring (kill -9 resumes from it), -1 none */
    bool dirty;                 /* snap taken at a region switch and not yet committed */
    unsigned in_writer;         /* adds of this device routed through the writer, not yet staged */
    unsigned pending;           /* of those, waiting for a reservation's commit */
};

struct lv {
    int64_t ts_ms;
    char json[];
};

/* ------------------------------------------------------------------------------------------ */
/* Helpers */

static uint64_t mono_ms(void)
{
    return uv_hrtime() / 1000000u;
}

static int64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Maps a SQLite result code to a negative errno. For I/O errors the errno of the failing system
 * call is more precise (ENOSPC, EACCES, ...) than the generic code, so it wins when known. */
static int map_rc(sqlite3 *db, int rc)
{
    switch (rc & 0xff) {
    case SQLITE_OK:
    case SQLITE_ROW:
    case SQLITE_DONE:
        return 0;
    case SQLITE_FULL:
        return -ENOSPC;
    case SQLITE_READONLY:
        return -EROFS;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        return -EBADMSG;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return -EBUSY;
    case SQLITE_NOMEM:
        return -ENOMEM;
    case SQLITE_PERM:
    case SQLITE_AUTH:
        return -EACCES;
    case SQLITE_TOOBIG:
        return -EMSGSIZE;
    case SQLITE_INTERRUPT:
        return -EINTR;
    case SQLITE_PROTOCOL:
        return -EPROTO;
    case SQLITE_CONSTRAINT:
    case SQLITE_MISMATCH:
    case SQLITE_RANGE:
    case SQLITE_MISUSE:
        return -EINVAL;
    case SQLITE_IOERR:
    case SQLITE_CANTOPEN: {
        int e = db != NULL ? sqlite3_system_errno(db) : 0;
        return e > 0 ? -e : -EIO;
    }
    default:
        return -EIO;
    }
}

static void stats_add_error(smp_store_t *st)
{
    uv_mutex_lock(&st->done_mu);
    st->stats.errors++;
    uv_mutex_unlock(&st->done_mu);
}

/* Records a failed SQLite call on the writer path. Logs when an error episode starts (or the
 * kind of error changes), not for every failing statement: a full disk would otherwise write
 * one line per poll. Returns the mapped code. */
static int sql_fail(smp_store_t *st, int rc, const char *what)
{
    int code = map_rc(st->db, rc);
    stats_add_error(st);
    st->err_episode_count++;
    if (!st->err_episode || st->err_code != (rc & 0xff)) {
        LOG_ERR(SCOPE, "%s: %s (%s)%s", what, sqlite3_errmsg(st->db), strerror(-code),
                st->err_episode ? "" : "; further errors of this kind are not logged");
        st->err_episode = true;
        st->err_code = rc & 0xff;
    }
    return code;
}

static void sql_ok(smp_store_t *st)
{
    if (st->err_episode) {
        LOG_INFO(SCOPE, "database writes succeed again after %" PRIu64 " failed calls",
                 st->err_episode_count);
        st->err_episode = false;
        st->err_code = 0;
        st->err_episode_count = 0;
    }
}

/* Steps a statement that returns no rows, then resets it. */
static int step_done(smp_store_t *st, int which, const char *what)
{
    sqlite3_stmt *s = st->stmt[which];
    int rc = sqlite3_step(s);
    sqlite3_reset(s);
    if (rc != SQLITE_DONE) {
        return sql_fail(st, rc, what);
    }
    return 0;
}

/* Binds text; a NULL string binds SQL NULL. */
static int bind_text(sqlite3_stmt *s, int i, const char *v)
{
    return v != NULL ? sqlite3_bind_text(s, i, v, -1, SQLITE_STATIC) : sqlite3_bind_null(s, i);
}

/* A small string-keyed hash map (open addressing, linear probing) for the last values and the
 * per-device seq state. Keys are copied; values are malloc'ed and owned by the map. */
struct strmap {
    char **keys;
    void **vals;
    size_t n, cap;
};

static uint64_t str_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s != '\0'; s++) {
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    }
    return h;
}

static void sm_clear(struct strmap *m)
{
    for (size_t i = 0; m != NULL && i < m->cap; i++) {
        free(m->keys[i]);
        free(m->vals[i]);
    }
    if (m != NULL) {
        free(m->keys);
        free(m->vals);
        *m = (struct strmap){0};
    }
}

static int sm_grow(struct strmap *m)
{
    size_t cap = m->cap ? m->cap * 2 : 64;
    char **keys = calloc(cap, sizeof *keys);
    void **vals = calloc(cap, sizeof *vals);
    if (keys == NULL || vals == NULL) {
        free(keys);
        free(vals);
        return -ENOMEM;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (m->keys[i] != NULL) {
            size_t j = str_hash(m->keys[i]) & (cap - 1);
            while (keys[j] != NULL) {
                j = (j + 1) & (cap - 1);
            }
            keys[j] = m->keys[i];
            vals[j] = m->vals[i];
        }
    }
    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->cap = cap;
    return 0;
}

/* The value slot of `key`, created (NULL value) when `create`; NULL when absent or no memory. */
static void **sm_slot(struct strmap *m, const char *key, bool create)
{
    if (m->cap > 0) {
        for (size_t j = str_hash(key) & (m->cap - 1); m->keys[j] != NULL;
             j = (j + 1) & (m->cap - 1)) {
            if (strcmp(m->keys[j], key) == 0) {
                return &m->vals[j];
            }
        }
    }
    if (!create || ((m->n + 1) * 2 > m->cap && sm_grow(m) != 0)) {
        return NULL;
    }
    char *k = strdup(key);
    if (k == NULL) {
        return NULL;
    }
    size_t j = str_hash(key) & (m->cap - 1);
    while (m->keys[j] != NULL) {
        j = (j + 1) & (m->cap - 1);
    }
    m->keys[j] = k;
    m->vals[j] = NULL;
    m->n++;
    return &m->vals[j];
}

/* ------------------------------------------------------------------------------------------ */
/* Transactions and the outbox bound */

static void publish_stats(smp_store_t *st)
{
    uint64_t hbytes, hsamples;
    smp__history_stats(st->hist, &hbytes, &hsamples);
    uv_mutex_lock(&st->done_mu);
    st->stats.history_bytes = hbytes;
    st->stats.history_samples = hsamples;
    st->stats.outbox_rows = (uint64_t)st->ob_rows;
    st->stats.outbox_bytes = (uint64_t)st->ob_bytes;
    st->stats.outbox_dropped = st->ob_dropped;
    uv_mutex_unlock(&st->done_mu);
}

static int tx_begin(smp_store_t *st)
{
    st->tx_rows = 0;
    st->tx_bytes = 0;
    st->tx_dropped = 0;
    st->tx_written = 0;
    return step_done(st, ST_BEGIN, "BEGIN");
}

static void tx_rollback(smp_store_t *st)
{
    smp__history_tx_end(st->hist, false);
    st->tx_rows = 0;
    st->tx_bytes = 0;
    st->tx_dropped = 0;
    st->tx_written = 0;
    /* Some errors (SQLITE_FULL, IOERR) already rolled the transaction back. */
    if (!sqlite3_get_autocommit(st->db)) {
        int rc = sqlite3_step(st->stmt[ST_ROLLBACK]);
        sqlite3_reset(st->stmt[ST_ROLLBACK]);
        if (rc != SQLITE_DONE) {
            sql_fail(st, rc, "ROLLBACK");
        }
    }
}

/* Logs the outbox-full episode: once when dropping starts, once when the outbox is back under
 * 90% of its limit. The 10% hysteresis keeps a steadily full outbox (which after each trim sits
 * within one message of the limit) from logging on every batch. */
static void outbox_episode(smp_store_t *st, int64_t dropped)
{
    if (dropped > 0) {
        if (!st->ob_full) {
            LOG_WARN(SCOPE,
                     "outbox full, dropping oldest messages (limit %" PRId64 " bytes); "
                     "is the broker reachable?",
                     st->outbox_max);
            st->ob_full = true;
            st->ob_episode_dropped = 0;
        }
        st->ob_episode_dropped += (uint64_t)dropped;
    } else if (st->ob_full && st->ob_bytes <= st->outbox_max - st->outbox_max / 10) {
        LOG_INFO(SCOPE, "outbox below limit again, %" PRIu64 " dropped", st->ob_episode_dropped);
        st->ob_full = false;
        st->ob_episode_dropped = 0;
    }
}

static int tx_commit(smp_store_t *st)
{
    /* History chunks that closed go in with the transaction that commits. */
    int rc = st->hist != NULL ? smp__history_flush(st->hist, wall_ms()) : SQLITE_OK;
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "history");
    }
    rc = step_done(st, ST_COMMIT, "COMMIT");
    if (rc != 0) {
        return rc;
    }
    smp__history_tx_end(st->hist, true);
    st->ob_rows += st->tx_rows;
    st->ob_bytes += st->tx_bytes;
    st->ob_dropped += (uint64_t)st->tx_dropped;
    if (st->outbox_max > 0) {
        outbox_episode(st, st->tx_dropped);
    }
    st->tx_rows = 0;
    st->tx_bytes = 0;
    st->tx_dropped = 0;
    st->commits_since_ckpt++;
    sql_ok(st);
    uv_mutex_lock(&st->done_mu);
    st->stats.commits++;
    st->stats.outbox_written += (uint64_t)st->tx_written;
    uv_mutex_unlock(&st->done_mu);
    st->tx_written = 0;
    publish_stats(st);
    return 0;
}

/* Drops the oldest outbox rows until the payload total is within the limit. Runs inside the
 * open transaction: walks ids upward summing lengths (length() of a blob does not read it),
 * then deletes the whole prefix with one range delete. */
static int pack_drop_oldest(smp_store_t *st, int64_t *freed);

static int outbox_trim(smp_store_t *st)
{
    int64_t excess = st->ob_bytes + st->tx_bytes - st->outbox_max;
    int64_t freed = 0, packs_freed = 0, n = 0, last_id = -1, row_id = 0, row_len = 0;
    sqlite3_stmt *s = st->stmt[ST_OB_OLDEST];
    int rc = SQLITE_ROW, err = 0;
    bool have = false; /* row_id/row_len hold the oldest row not yet counted */
    while (freed + packs_freed < excess && err == 0) {
        if (!have && rc == SQLITE_ROW && (rc = sqlite3_step(s)) == SQLITE_ROW) {
            row_id = sqlite3_column_int64(s, 0);
            row_len = sqlite3_column_int64(s, 1);
            have = true;
        }
        if (st->packs.n > 0 && (!have || st->packs.v[0].first < row_id)) {
            err = pack_drop_oldest(st, &packs_freed); /* the oldest is a pack */
        } else if (have) {
            last_id = row_id;
            freed += row_len;
            n++;
            have = false;
        } else {
            break;
        }
    }
    sqlite3_reset(s);
    if (err != 0) {
        return err;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        return sql_fail(st, rc, "outbox trim");
    }
    if (n == 0) {
        return 0;
    }
    s = st->stmt[ST_OB_DEL_UPTO];
    rc = sqlite3_bind_int64(s, 1, last_id);
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "outbox trim");
    }
    rc = step_done(st, ST_OB_DEL_UPTO, "outbox trim");
    if (rc != 0) {
        return rc;
    }
    st->tx_rows -= n;
    st->tx_bytes -= freed;
    st->tx_dropped += n;
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Applying operations (writer thread) */

/* Binds (device, name, value_json, ts_ms) to ?1..?4: the shape of last_value and cmd_result. */
static int bind_device_name_json_ts(sqlite3_stmt *s, const op_t *o)
{
    int rc = bind_text(s, 1, o->device);
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 2, o->name);
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 3, o->value_json);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int64(s, 4, o->ts_ms);
    }
    return rc;
}

/* Last values are kept in memory and written every lv_flush_ms and at close (lv_flush): an
 * upsert per change would rewrite every page of the table each interval. The key is
 * "device<US>tag" (US = 0x1f, which no name contains). Returns false when out of memory. */
static bool lv_remember(smp_store_t *st, const op_t *o)
{
    size_t dl = strlen(o->device), tl = strlen(o->name), jl = strlen(o->value_json);
    char *key = malloc(dl + tl + 2);
    struct lv *v = malloc(sizeof *v + jl + 1);
    void **slot = NULL;
    if (key != NULL && v != NULL) {
        memcpy(key, o->device, dl);
        key[dl] = '\x1f';
        memcpy(key + dl + 1, o->name, tl + 1);
        slot = sm_slot(st->lv, key, true);
    }
    free(key);
    if (slot == NULL) {
        free(v);
        return false;
    }
    v->ts_ms = o->ts_ms;
    memcpy(v->json, o->value_json, jl + 1);
    free(*slot);
    *slot = v;
    return true;
}

static int upsert_last(smp_store_t *st, const char *device, const char *tag, const char *json,
                       int64_t ts_ms)
{
    sqlite3_stmt *s = st->stmt[ST_PUT_LAST];
    int rc = bind_text(s, 1, device);
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 2, tag);
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 3, json);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int64(s, 4, ts_ms);
    }
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "last value");
    }
    return step_done(st, ST_PUT_LAST, "last value");
}

/* Writes the remembered last values into the open transaction. The map is emptied only once
 * that transaction committed (lv_flushed). */
static int lv_flush(smp_store_t *st)
{
    for (size_t i = 0; i < st->lv->cap; i++) {
        char *key = st->lv->keys[i];
        if (key == NULL) {
            continue;
        }
        char *sep = strchr(key, '\x1f');
        const struct lv *v = st->lv->vals[i];
        *sep = '\0';
        int rc = upsert_last(st, key, sep + 1, v->json, v->ts_ms);
        *sep = '\x1f';
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

static bool lv_due(const smp_store_t *st)
{
    return st->lv->n > 0 && mono_ms() - st->lv_flushed_ms >= lv_flush_ms;
}

static int apply_put(smp_store_t *st, op_t *o)
{
    int rc;
    if (!lv_remember(st, o)) {
        rc = upsert_last(st, o->device, o->name, o->value_json, o->ts_ms);
        if (rc != 0) {
            return rc;
        }
    }
    rc = smp__history_append(st->hist, o->device, o->name, o->ts_ms, o->value_json);
    return rc == SQLITE_OK ? 0 : sql_fail(st, rc, "history");
}

/* Inserts outbox row `r->id` (kept if it is already there). */
static int insert_outbox(smp_store_t *st, const smp_ring_rec_t *r)
{
    sqlite3_stmt *s = st->stmt[ST_OB_ADD_ID];
    int rc = sqlite3_bind_int64(s, 1, r->id);
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 2, r->device);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int64(s, 3, (int64_t)r->seq);
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 4, r->topic);
    }
    if (rc == SQLITE_OK) {
        /* Never a NULL pointer: SQLite would bind NULL instead of an empty blob. */
        rc = sqlite3_bind_blob64(s, 5, r->len ? r->payload : "", r->len, SQLITE_STATIC);
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int64(s, 6, r->ts_ms);
    }
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "outbox add");
    }
    rc = step_done(st, ST_OB_ADD_ID, "outbox add");
    if (rc == 0 && sqlite3_changes(st->db) > 0) {
        st->tx_rows++;
        st->tx_bytes += (int64_t)r->len;
        st->tx_written++;
    }
    return rc;
}

/* Sets (device, seq) in statement `which` (ST_SEQ_SET, ST_SEQ_MAX or ST_RESERVE_SET). */
static int set_device_seq(smp_store_t *st, int which, const char *device, uint64_t seq)
{
    sqlite3_stmt *s = st->stmt[which];
    int rc = bind_text(s, 1, device);
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int64(s, 2, (int64_t)seq);
    }
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "device seq");
    }
    return step_done(st, which, "device seq");
}

/* An outbox row straight into the database (o->id assigned by the caller). */
static int apply_add(smp_store_t *st, op_t *o)
{
    smp_ring_rec_t r = {.id = o->id,
                        .seq = o->seq,
                        .ts_ms = wall_ms(),
                        .device = o->device,
                        .topic = o->name,
                        .payload = o->payload,
                        .len = o->len};
    int rc = insert_outbox(st, &r);
    if (rc != 0) {
        return rc;
    }
    return set_device_seq(st, ST_SEQ_SET, o->device, o->seq);
}

/* ---- outbox packs (obpack.h): an interval's outage backlog in one deflated row ---- */

static int pack_delete(smp_store_t *st, int64_t first)
{
    int rc = sqlite3_bind_int64(st->stmt[ST_PK_DEL], 1, first);
    return rc != SQLITE_OK ? sql_fail(st, rc, "outbox pack delete")
                           : step_done(st, ST_PK_DEL, "outbox pack delete");
}

/* Inserts recs[0..n) as one pack of the open transaction (st->tx_packs until it commits). */
static int pack_insert(smp_store_t *st, const smp_ring_rec_t *recs, size_t n)
{
    uint8_t *blob = NULL;
    size_t blob_len = 0, raw_len = 0;
    int rc = smp__obpack_encode(recs, n, &blob, &blob_len, &raw_len);
    if (rc != 0) {
        return rc;
    }
    int64_t first = recs[0].id, last = recs[n - 1].id;
    size_t mbytes = smp__obpack_members_bytes(first, last);
    uint8_t *members = calloc(1, mbytes);
    for (size_t k = 0; members != NULL && k < n; k++) {
        smp__obpack_members_set(members, first, recs[k].id);
    }
    sqlite3_stmt *q = st->stmt[ST_PK_ADD];
    rc = members == NULL ? SQLITE_NOMEM : sqlite3_bind_int64(q, 1, first);
    rc = rc == SQLITE_OK ? sqlite3_bind_int64(q, 2, last) : rc;
    rc = rc == SQLITE_OK ? sqlite3_bind_int64(q, 3, (int64_t)raw_len) : rc;
    rc = rc == SQLITE_OK ? sqlite3_bind_blob64(q, 4, members, mbytes, SQLITE_STATIC) : rc;
    rc = rc == SQLITE_OK ? sqlite3_bind_blob64(q, 5, blob, blob_len, SQLITE_STATIC) : rc;
    rc =
        rc == SQLITE_OK ? step_done(st, ST_PK_ADD, "outbox pack") : sql_fail(st, rc, "outbox pack");
    free(blob);
    if (rc == 0 && sqlite3_changes(st->db) > 0) {
        rc = smp__obpack_index_add(&st->tx_packs, first, last, (uint32_t)n, (uint32_t)blob_len,
                                   members);
        if (rc == 0) {
            members = NULL;
            st->tx_rows += (int64_t)n;
            st->tx_bytes += (int64_t)blob_len;
            st->tx_written += (int64_t)n;
        }
    }
    free(members);
    return rc;
}

/* After the interval commit: its packs join the index (room was made before the commit), or
 * are forgotten with a rolled-back transaction. */
static void packs_committed(smp_store_t *st, bool committed)
{
    for (size_t k = 0; k < st->tx_packs.n; k++) {
        smp_obpack_t *p = &st->tx_packs.v[k];
        if (committed && smp__obpack_index_add(&st->packs, p->first, p->last, p->live, p->blob_len,
                                               p->members) == 0) {
            p->members = NULL;
        }
    }
    smp__obpack_index_free(&st->tx_packs);
}

/* An ack of a message inside a pack: the pack's row goes when its last member is acked. */
static int pack_ack(smp_store_t *st, int64_t id)
{
    smp_obpack_t *p = NULL;
    if (!smp__obpack_ack(&st->packs, id, &p)) {
        return 0;
    }
    st->tx_rows--;
    if (p->live > 0) {
        return 0;
    }
    int rc = pack_delete(st, p->first);
    if (rc == 0) {
        st->tx_bytes -= p->blob_len;
        smp__obpack_index_remove(&st->packs, (size_t)(p - st->packs.v));
    }
    return rc;
}

/* The outbox trim drops the oldest pack whole. */
static int pack_drop_oldest(smp_store_t *st, int64_t *freed)
{
    smp_obpack_t *p = &st->packs.v[0];
    int rc = pack_delete(st, p->first);
    if (rc == 0) {
        *freed += p->blob_len;
        st->tx_rows -= p->live;
        st->tx_bytes -= p->blob_len;
        st->tx_dropped += p->live;
        smp__obpack_index_remove(&st->packs, 0);
    }
    return rc;
}

/* A clean stop writes the bitmaps of packs acked in part: a restart sends only the rest. */
static int packs_save_members(smp_store_t *st)
{
    int rc = 0;
    sqlite3_stmt *q = st->stmt[ST_PK_MEMBERS];
    for (size_t k = 0; k < st->packs.n && rc == 0; k++) {
        smp_obpack_t *p = &st->packs.v[k];
        if (!p->acked_some) {
            continue;
        }
        rc = sqlite3_bind_int64(q, 1, p->first);
        rc = rc == SQLITE_OK
                 ? sqlite3_bind_blob64(q, 2, p->members,
                                       smp__obpack_members_bytes(p->first, p->last), SQLITE_STATIC)
                 : rc;
        rc = rc == SQLITE_OK ? step_done(st, ST_PK_MEMBERS, "outbox pack members")
                             : sql_fail(st, rc, "outbox pack members");
        p->acked_some = rc != 0;
    }
    return rc;
}

/* Loads the index at open: each pack's unacknowledged members and its size. */
static int packs_load(smp_store_t *st)
{
    sqlite3_stmt *q = NULL;
    int rc = sqlite3_prepare_v2(st->db,
                                "SELECT first_id, last_id, members, length(data) FROM outbox_pack"
                                " ORDER BY first_id",
                                -1, &q, NULL);
    while (rc == SQLITE_OK && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        int64_t first = sqlite3_column_int64(q, 0), last = sqlite3_column_int64(q, 1);
        size_t need = smp__obpack_members_bytes(first, last);
        size_t have = (size_t)sqlite3_column_bytes(q, 2);
        const uint8_t *m = sqlite3_column_blob(q, 2);
        uint8_t *members = need > 0 ? calloc(1, need) : NULL;
        if (members == NULL) {
            rc = need > 0 ? SQLITE_NOMEM : SQLITE_OK;
            continue; /* a row whose ids are out of order holds nothing usable */
        }
        memcpy(members, m != NULL ? m : (const uint8_t *)"", have < need ? have : need);
        uint32_t live = 0;
        for (size_t k = 0; k < need; k++) {
            live += (uint32_t)__builtin_popcount(members[k]);
        }
        uint32_t blob_len = (uint32_t)sqlite3_column_int64(q, 3);
        if (smp__obpack_index_add(&st->packs, first, last, live, blob_len, members) != 0) {
            free(members);
            rc = SQLITE_NOMEM;
            break;
        }
        st->ob_rows += live;
        st->ob_bytes += blob_len;
        rc = SQLITE_OK;
    }
    rc = rc == SQLITE_DONE ? SQLITE_OK : rc;
    sqlite3_finalize(q);
    return rc;
}

static int apply_ack_one(smp_store_t *st, int64_t id)
{
    sqlite3_stmt *s = st->stmt[ST_OB_ACK];
    int rc = sqlite3_bind_int64(s, 1, id);
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "outbox ack");
    }
    bool deleted = false;
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        st->tx_rows--;
        st->tx_bytes -= sqlite3_column_int64(s, 0);
        deleted = true;
    }
    sqlite3_reset(s);
    if (rc != SQLITE_DONE) {
        return sql_fail(st, rc, "outbox ack");
    }
    return deleted || st->packs.n == 0 ? 0 : pack_ack(st, id);
}

/* One id (o->id), or many (an int64_t array in the payload). */
static int apply_ack(smp_store_t *st, op_t *o)
{
    if (o->len == 0) {
        return apply_ack_one(st, o->id);
    }
    size_t n = o->len / sizeof(int64_t);
    for (size_t k = 0; k < n; k++) {
        int64_t id;
        memcpy(&id, (const char *)o->payload + k * sizeof id, sizeof id);
        int rc = apply_ack_one(st, id);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

static int apply_cmd_put(smp_store_t *st, op_t *o)
{
    sqlite3_stmt *s = st->stmt[ST_CMD_PUT];
    int rc = bind_device_name_json_ts(s, o);
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "command result");
    }
    return step_done(st, ST_CMD_PUT, "command result");
}

static int apply_audit(smp_store_t *st, op_t *o)
{
    sqlite3_stmt *s = st->stmt[ST_AUDIT];
    int rc = sqlite3_bind_int64(s, 1, o->ts_ms);
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 2, o->name);
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 3, o->device);
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 4, o->aux[0]); /* op */
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 5, o->aux[1]); /* tag */
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 6, o->value_json);
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 7, o->aux[2]); /* code */
    }
    if (rc == SQLITE_OK) {
        rc = bind_text(s, 8, o->aux[3]); /* message */
    }
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int64(s, 9, o->to_ms); /* latency_us */
    }
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "audit");
    }
    return step_done(st, ST_AUDIT, "audit");
}

/* A growable byte buffer for read results; rows refer to it by offset until it stops moving. */
typedef struct rbuf {
    char *p;
    size_t len, cap;
} rbuf_t;

static int rbuf_add(rbuf_t *b, const void *data, size_t n, bool nul, size_t *off)
{
    size_t need = b->len + n + (nul ? 1 : 0);
    if (need > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < need) {
            cap *= 2;
        }
        char *p = realloc(b->p, cap);
        if (p == NULL) {
            return -ENOMEM;
        }
        b->p = p;
        b->cap = cap;
    }
    *off = b->len;
    if (n > 0) {
        memcpy(b->p + b->len, data, n);
    }
    b->len += n;
    if (nul) {
        b->p[b->len++] = '\0';
    }
    return 0;
}

static int grow_array(void **arr, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap) {
        return 0;
    }
    size_t c = *cap ? *cap * 2 : 16;
    while (c < need) {
        c *= 2;
    }
    void *p = realloc(*arr, c * elem);
    if (p == NULL) {
        return -ENOMEM;
    }
    *arr = p;
    *cap = c;
    return 0;
}

static void list_push(op_t **head, op_t **tail, op_t *o)
{
    o->next = NULL;
    if (*tail != NULL) {
        (*tail)->next = o;
    } else {
        *head = o;
    }
    *tail = o;
}

static int tx_ensure(smp_store_t *st)
{
    if (st->tx_open) {
        return 0;
    }
    int rc = tx_begin(st);
    st->tx_open = rc == 0;
    return rc;
}

/* Ends the open transaction: commits it (rc == 0) or rolls it back. The ops whose callback
 * waited for it become ready with the outcome; outbox adds that waited for a seq reservation
 * go to the staging list (they are staged in the ring either way: the ring protects them
 * against a crash, and a failing database is reported by the errors). Returns 0 if committed. */
static int tx_end(smp_store_t *st, int rc)
{
    if (st->tx_open) {
        if (rc == 0 && st->outbox_max > 0 && st->ob_bytes + st->tx_bytes > st->outbox_max) {
            rc = outbox_trim(st);
        }
        if (rc == 0) {
            rc = tx_commit(st);
        }
        if (rc != 0) {
            tx_rollback(st);
        }
        st->tx_open = false;
    }
    st->commit_now = false;
    op_t *o = st->w_head;
    st->w_head = st->w_tail = NULL;
    while (o != NULL) {
        op_t *next = o->next;
        if (o->kind == OP_OUTBOX_ADD && o->reserve != 0) {
            if (rc != 0) {
                o->reserve = 0; /* not durable: the loop's limit stays where it was */
            }
            list_push(&st->s_head, &st->s_tail, o);
        } else {
            if (rc != 0 && o->status == 0 && !o->done) {
                o->status = rc;
                o->id = 0;
            }
            list_push(&st->r_head, &st->r_tail, o);
        }
        o = next;
    }
    return rc;
}

static int late_push(smp_store_t *st, int64_t id)
{
    if (grow_array((void **)&st->late, &st->late_cap, st->late_n + 1, sizeof *st->late) != 0) {
        return -ENOMEM; /* the row stays: sent again after a restart (at-least-once) */
    }
    st->late[st->late_n++] = id;
    return 0;
}

/* Deletes the rows acked while commit_tick was writing them. */
static int apply_late(smp_store_t *st)
{
    int rc = st->late_n > 0 ? tx_ensure(st) : 0;
    for (size_t k = 0; k < st->late_n && rc == 0; k++) {
        rc = apply_ack_one(st, st->late[k]);
    }
    st->late_n = 0;
    return rc;
}

/* Seqs a device must always have reserved ahead: four intervals' worth (at least 8). */
static uint64_t headroom(const struct dseq *d)
{
    return d->rate * 4 > seq_headroom_min ? d->rate * 4 : seq_headroom_min;
}

/* Where a new reservation ends: a block of seq_reserve_blocks headrooms, so that a device
 * publishing steadily moves its reservation (two small rows) once per ~60 intervals, not at
 * every interval. A power cut can leave up to this many reserved numbers unused. */
static uint64_t reserve_end(const struct dseq *d, uint64_t seq)
{
    return seq + (d != NULL ? headroom(d) : seq_headroom_min) * seq_reserve_blocks;
}

/* The seq state of a device, created on first use, with its seq slot in the ring. Caller
 * holds ring_mu. */
static struct dseq *dseq_get(smp_store_t *st, const char *device)
{
    void **slot = sm_slot(st->dseq, device, true);
    if (slot != NULL && *slot == NULL) {
        struct dseq *d = calloc(1, sizeof(struct dseq));
        if (d != NULL) {
            d->slot = st->ring != NULL ? smp__ring_seq_slot(st->ring, device) : -1;
        }
        *slot = d;
    }
    return slot != NULL ? *slot : NULL;
}

/* A device's seq was staged (or loaded): kept in its ring slot, which a kill -9 leaves. */
static void dseq_staged(smp_store_t *st, struct dseq *d, uint64_t seq)
{
    if (seq > d->staged) {
        d->staged = seq;
    }
    if (st->ring != NULL) {
        smp__ring_seq_set(st->ring, d->slot, d->staged);
    }
}

static void snap_add(void *arg, const smp_ring_rec_t *rec)
{
    smp_store_t *st = arg;
    size_t cap = st->snap_cap;
    if (grow_array((void **)&st->snap, &cap, st->snap_n + 1, sizeof *st->snap) != 0 ||
        grow_array((void **)&st->snap_ins, &st->snap_cap, st->snap_n + 1, sizeof *st->snap_ins) !=
            0) {
        st->snap_oom = true;
        return;
    }
    st->snap[st->snap_n] = *rec;
    st->snap_ins[st->snap_n++] = false;
}

struct dirty_dev {
    const char *name; /* a key of st->dseq: stable, entries are never removed */
    uint64_t seq, upto;
};

/* Takes the ring's part of an interval commit (under ring_mu): switches regions when the
 * retired one is free, snapshots each device's staged seq, collects the retired region's
 * records (every record when `final`). Returns the region to reset after the commit, or -1. */
static int tick_snapshot(smp_store_t *st, bool final)
{
    smp_ring_t *r = st->ring;
    int act = smp__ring_active(r), old = 1 - act;
    bool took = final;
    if (!final && smp__ring_empty(r, old) && !smp__ring_empty(r, act)) {
        smp__ring_switch(r);
        old = act;
        took = true;
    }
    st->dirty_n = 0;
    for (size_t i = 0; i < st->dseq->cap; i++) {
        struct dseq *d = st->dseq->vals[i];
        if (d == NULL) {
            continue;
        }
        if (took) {
            d->rate = d->staged - d->tick_staged;
            d->tick_staged = d->staged;
        }
        /* A device with a seq slot needs the database only when its reservation runs low
         * (or at the final commit): a kill -9 resumes from the slot, a power cut after the
         * reservation. Without a slot its seq is committed at every interval. */
        bool renew = d->staged + headroom(d) > d->upto;
        if (took && (final || (d->staged > d->committed && (d->slot < 0 || renew)))) {
            d->snap = d->staged;
            d->dirty = true;
        }
        if (d->dirty && grow_array((void **)&st->dirty, &st->dirty_cap, st->dirty_n + 1,
                                   sizeof *st->dirty) == 0) {
            uint64_t head = headroom(d);
            st->dirty[st->dirty_n++] = (struct dirty_dev){
                st->dseq->keys[i], d->snap,
                final ? d->snap : (d->snap + head > d->upto ? reserve_end(d, d->snap) : d->upto)};
        }
    }
    st->snap_n = 0;
    st->snap_oom = false;
    smp__ring_scan(r, final ? -1 : old, snap_add, st);
    return st->snap_oom ? -2 : old;
}

/* After a successful interval commit (under ring_mu): rows acked while they were being written
 * are deleted in the next transaction, the retired region is reset, limits move up. */
static void tick_done(smp_store_t *st, int old, bool final)
{
    for (size_t k = 0; k < st->snap_n; k++) {
        if (!st->snap_ins[k]) {
            continue;
        }
        int was = smp__ring_set_state(st->ring, st->snap[k].id, SMP_RING_ACKED);
        if (was == SMP_RING_ACKED) {
            late_push(st, st->snap[k].id);
        } else if (st->ring_live > 0) {
            st->ring_live--; /* counted in the database rows now */
        }
    }
    if (final) {
        smp__ring_reset(st->ring, 0);
        smp__ring_reset(st->ring, 1);
    } else if (old >= 0) {
        smp__ring_reset(st->ring, old);
    }
    for (size_t k = 0; k < st->dirty_n; k++) {
        void **slot = sm_slot(st->dseq, st->dirty[k].name, false);
        struct dseq *d = slot != NULL ? *slot : NULL;
        if (d != NULL) {
            d->committed = st->dirty[k].seq;
            d->upto = st->dirty[k].upto > d->upto || final ? st->dirty[k].upto : d->upto;
            d->dirty = false;
        }
    }
    st->snap_n = 0;
}

/* The interval commit: the still-unacknowledged messages of the retired ring region, the
 * devices' seq (and their reservation ahead), late acks and, when due, the last values join
 * the open transaction, which is then committed. `final` (close): everything, exact seqs. */
/* The retired region's unacknowledged records go into the database: one row each when they
 * are few (a broker that acks a little late), in packs during an outage. */
static int insert_snapshot(smp_store_t *st)
{
    size_t live = 0;
    for (size_t k = 0; k < st->snap_n; k++) {
        live += st->snap[k].state == SMP_RING_LIVE;
    }
    int rc = 0;
    if (live < pack_min_msgs) {
        for (size_t k = 0; k < st->snap_n && rc == 0; k++) {
            if (st->snap[k].state == SMP_RING_LIVE) {
                rc = insert_outbox(st, &st->snap[k]);
                st->snap_ins[k] = true;
            }
        }
        return rc;
    }
    smp_ring_rec_t *run = malloc(live * sizeof *run);
    size_t k = 0;
    rc = run == NULL ? -ENOMEM : 0;
    while (rc == 0 && k < st->snap_n) {
        size_t n = 0, raw = 0, from = k;
        for (; k < st->snap_n; k++) {
            const smp_ring_rec_t *r = &st->snap[k];
            if (r->state != SMP_RING_LIVE) {
                continue;
            }
            /* A message too big for a pack goes in a row of its own, between packs. */
            if (r->len > SMP_OBPACK_MAX_RAW / 2) {
                if (n > 0) {
                    break;
                }
                if ((rc = insert_outbox(st, r)) != 0) {
                    break;
                }
                continue;
            }
            /* A pack's bitmap spans its id range: a bounded one keeps it small. */
            if (n > 0 && (n == SMP_OBPACK_MAX_MSGS || raw + r->len > SMP_OBPACK_MAX_RAW ||
                          r->id - run[0].id >= 8 * SMP_OBPACK_MAX_MSGS)) {
                break;
            }
            run[n++] = *r;
            raw += r->len + strlen(r->device) + strlen(r->topic);
        }
        if (n > 0) {
            rc = pack_insert(st, run, n);
        }
        for (size_t j = from; j < k && rc == 0; j++) {
            st->snap_ins[j] = st->snap[j].state == SMP_RING_LIVE;
        }
    }
    free(run);
    return rc;
}

static bool packs_acked_some(const smp_store_t *st)
{
    for (size_t k = 0; k < st->packs.n; k++) {
        if (st->packs.v[k].acked_some) {
            return true;
        }
    }
    return false;
}

static void commit_tick(smp_store_t *st, bool final)
{
    uint64_t now = mono_ms();
    if (st->commit_interval_ms > 0) {
        uint64_t iv = (uint64_t)st->commit_interval_ms;
        st->next_tick_ms = (now / iv + 1) * iv;
    }
    int old = -1;
    st->snap_n = 0;
    st->dirty_n = 0;
    if (st->ring != NULL) {
        uv_mutex_lock(&st->ring_mu);
        old = tick_snapshot(st, final);
        uv_mutex_unlock(&st->ring_mu);
    }
    bool lv = st->lv->n > 0 && (final || lv_due(st));
    bool pk = final && packs_acked_some(st);
    if (!st->tx_open && st->snap_n == 0 && st->dirty_n == 0 && st->late_n == 0 && !lv && !pk) {
        if (old >= 0 && st->ring != NULL && !st->snap_oom) {
            uv_mutex_lock(&st->ring_mu);
            tick_done(st, old, final); /* a region of acked records only */
            uv_mutex_unlock(&st->ring_mu);
        }
        return;
    }
    int rc = old == -2 ? -ENOMEM : tx_ensure(st);
    if (rc == 0) {
        rc = insert_snapshot(st);
    }
    /* Room in the index for this commit's packs: after COMMIT nothing may fail. */
    if (rc == 0 && st->tx_packs.n > 0) {
        rc = grow_array((void **)&st->packs.v, &st->packs.cap, st->packs.n + st->tx_packs.n,
                        sizeof *st->packs.v);
    }
    if (rc == 0 && pk) {
        rc = packs_save_members(st);
    }
    for (size_t k = 0; k < st->dirty_n && rc == 0; k++) {
        rc = set_device_seq(st, ST_SEQ_MAX, st->dirty[k].name, st->dirty[k].seq);
        if (rc == 0) {
            rc = set_device_seq(st, final ? ST_RESERVE_EXACT : ST_RESERVE_SET, st->dirty[k].name,
                                st->dirty[k].upto);
        }
    }
    if (rc == 0) {
        rc = apply_late(st);
    }
    if (rc == 0 && lv) {
        rc = lv_flush(st);
    }
    rc = tx_end(st, rc);
    packs_committed(st, rc == 0);
    if (rc == 0 && lv) {
        sm_clear(st->lv);
        st->lv_flushed_ms = now;
    }
    if (rc == 0 && st->ring != NULL) {
        uv_mutex_lock(&st->ring_mu);
        tick_done(st, old, final);
        uv_mutex_unlock(&st->ring_mu);
    }
    st->final_ok = rc == 0;
}

static bool tick_due(const smp_store_t *st)
{
    return st->commit_interval_ms > 0 && mono_ms() >= st->next_tick_ms;
}

/* Stages a writer-path add in the ring (ring_mu taken here). The reservation it waited for, if
 * committed, raises the device's limit first. Returns 0 or -ENOSPC and friends. */
static int stage_from_writer(smp_store_t *st, op_t *o)
{
    uv_mutex_lock(&st->ring_mu);
    struct dseq *d = dseq_get(st, o->device);
    if (d != NULL && o->reserve > d->upto) {
        d->upto = o->reserve;
    }
    int64_t id = st->next_id;
    int rc =
        smp__ring_append(st->ring, id, o->device, o->seq, o->name, o->payload, o->len, wall_ms());
    if (rc == 0) {
        st->next_id++;
        o->id = id;
        st->ring_staged++;
        st->ring_live++;
        if (d != NULL) {
            dseq_staged(st, d, o->seq);
            d->in_writer -= d->in_writer > 0;
        }
    }
    uv_mutex_unlock(&st->ring_mu);
    return rc;
}

/* A finished op: ready now, or behind the ops still waiting for a commit, so that callbacks
 * run in queue order. */
static void finish(smp_store_t *st, op_t *o)
{
    if (st->w_head != NULL) {
        o->done = true;
        list_push(&st->w_head, &st->w_tail, o);
    } else {
        list_push(&st->r_head, &st->r_tail, o);
    }
}

/* Writes an add straight into the database (the ring cannot take it); its callback waits for
 * the commit. */
static void spill_add(smp_store_t *st, op_t *o)
{
    uv_mutex_lock(&st->ring_mu);
    o->id = st->next_id++;
    struct dseq *d = st->ring != NULL ? dseq_get(st, o->device) : NULL;
    if (d != NULL) {
        dseq_staged(st, d, o->seq);
        d->in_writer -= d->in_writer > 0;
    }
    uv_mutex_unlock(&st->ring_mu);
    int rc = tx_ensure(st);
    if (rc == 0) {
        rc = apply_add(st, o);
    }
    if (rc != 0) {
        tx_end(st, rc);
        o->status = rc;
        o->id = 0;
        finish(st, o);
        return;
    }
    list_push(&st->w_head, &st->w_tail, o);
    st->commit_now = true;
}

/* Stages an add whose seq is covered by a durable reservation; a full ring gets an early
 * interval commit (which frees a region) before the message goes to the database instead. */
static void add_stage(smp_store_t *st, op_t *o)
{
    int rc = stage_from_writer(st, o);
    if (rc == -ENOSPC && st->commit_interval_ms > 0) {
        commit_tick(st, false);
        rc = stage_from_writer(st, o);
    }
    if (rc == 0) {
        finish(st, o);
    } else {
        spill_add(st, o);
    }
}

/* An outbox add that came through the queue: without a ring it is committed before its
 * callback (commit-before-publish); with one, a seq beyond the device's durable reservation
 * first reserves a new range (committed now), then the message is staged. */
static void add_op(smp_store_t *st, op_t *o)
{
    if (st->ring == NULL) {
        spill_add(st, o);
        return;
    }
    uv_mutex_lock(&st->ring_mu);
    struct dseq *d = dseq_get(st, o->device);
    bool need = d == NULL || o->seq > d->upto || d->pending > 0;
    uint64_t upto = reserve_end(d, o->seq);
    if (need && d != NULL) {
        d->pending++;
    }
    uv_mutex_unlock(&st->ring_mu);
    if (!need) {
        add_stage(st, o);
        return;
    }
    int rc = tx_ensure(st);
    if (rc == 0) {
        rc = set_device_seq(st, ST_RESERVE_SET, o->device, upto);
    }
    o->reserve = upto;
    list_push(&st->w_head, &st->w_tail, o);
    st->commit_now = true;
    if (rc != 0) {
        tx_end(st, rc);
    }
}

/* Stages the adds whose reservation commit has ended. */
static void process_staging(smp_store_t *st)
{
    op_t *o = st->s_head;
    st->s_head = st->s_tail = NULL;
    while (o != NULL) {
        op_t *next = o->next;
        uv_mutex_lock(&st->ring_mu);
        void **slot = sm_slot(st->dseq, o->device, false);
        struct dseq *d = slot != NULL ? *slot : NULL;
        if (d != NULL && d->pending > 0) {
            d->pending--;
        }
        uv_mutex_unlock(&st->ring_mu);
        add_stage(st, o);
        o = next;
    }
}

static int64_t clamp_limit(size_t n)
{
    return n > (size_t)INT64_MAX ? INT64_MAX : (int64_t)n;
}

static int col_text(sqlite3_stmt *s, int i, rbuf_t *b, size_t *off)
{
    const unsigned char *t = sqlite3_column_text(s, i);
    size_t n = (size_t)sqlite3_column_bytes(s, i);
    return rbuf_add(b, t != NULL ? (const void *)t : "", t != NULL ? n : 0, true, off);
}

struct fetch_tmp {
    int64_t id;
    uint64_t seq;
    size_t dev, topic, pay, len;
};

/* Ring records merged into a fetch: the live ones above the cursor, oldest first. */
struct fetch_ctx {
    struct fetch_tmp **tmp;
    size_t *n, *cap;
    rbuf_t *b;
    int64_t after;
    size_t max, taken;
    int err;
};

static void fetch_ring_rec(void *arg, const smp_ring_rec_t *rec)
{
    struct fetch_ctx *c = arg;
    if (c->err != 0 || rec->state != SMP_RING_LIVE || rec->id <= c->after || c->taken >= c->max) {
        return;
    }
    if ((c->err = grow_array((void **)c->tmp, c->cap, *c->n + 1, sizeof **c->tmp)) != 0) {
        return;
    }
    struct fetch_tmp *r = &(*c->tmp)[*c->n];
    r->id = rec->id;
    r->seq = rec->seq;
    r->len = rec->len;
    if ((c->err = rbuf_add(c->b, rec->device, strlen(rec->device), true, &r->dev)) != 0 ||
        (c->err = rbuf_add(c->b, rec->topic, strlen(rec->topic), true, &r->topic)) != 0 ||
        (c->err = rbuf_add(c->b, rec->payload, rec->len, false, &r->pay)) != 0) {
        return;
    }
    (*c->n)++;
    c->taken++;
}

static int fetch_tmp_cmp(const void *a, const void *b)
{
    int64_t x = ((const struct fetch_tmp *)a)->id, y = ((const struct fetch_tmp *)b)->id;
    return (x > y) - (x < y);
}

/* Adds the ring's live records to a fetch's database rows and keeps the `max` oldest. */
static int fetch_merge_ring(smp_store_t *st, op_t *o, struct fetch_tmp **tmp, size_t *n,
                            size_t *cap, rbuf_t *b)
{
    size_t from_db = *n;
    struct fetch_ctx c = {tmp, n, cap, b, o->id, o->max, 0, 0};
    uv_mutex_lock(&st->ring_mu);
    smp__ring_scan(st->ring, -1, fetch_ring_rec, &c);
    uv_mutex_unlock(&st->ring_mu);
    if (c.err == 0 && c.taken > 0 && from_db > 0) {
        qsort(*tmp, *n, sizeof **tmp, fetch_tmp_cmp);
    }
    if (*n > o->max) {
        *n = o->max;
    }
    return c.err;
}

/* A pack's members still unacknowledged join a fetch like ring records. */
struct pack_fetch {
    struct fetch_ctx c;
    const smp_obpack_t *p;
};

static void fetch_pack_rec(void *arg, const smp_ring_rec_t *rec)
{
    struct pack_fetch *f = arg;
    const smp_obpack_t *p = f->p;
    if (smp__obpack_members_has(p->members, smp__obpack_members_bytes(p->first, p->last), p->first,
                                rec->id)) {
        fetch_ring_rec(&f->c, rec);
    }
}

/* Reads one pack's data into a fetch. A pack that does not decode is dropped, loudly. */
static int fetch_one_pack(smp_store_t *st, size_t k, struct pack_fetch *f)
{
    sqlite3_stmt *q = st->stmt[ST_PK_DATA];
    f->p = &st->packs.v[k];
    int rc = sqlite3_bind_int64(q, 1, f->p->first);
    int got = -EBADMSG;
    if (rc == SQLITE_OK && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        got = smp__obpack_decode(sqlite3_column_blob(q, 1), (size_t)sqlite3_column_bytes(q, 1),
                                 (size_t)sqlite3_column_int64(q, 0), fetch_pack_rec, f);
        rc = SQLITE_DONE;
    }
    sqlite3_reset(q);
    if (rc != SQLITE_DONE) {
        return sql_fail(st, rc, "outbox pack read");
    }
    if (got == -ENOMEM) {
        return -ENOMEM;
    }
    if (got < 0) {
        LOG_ERR(SCOPE, "outbox pack %" PRId64 "..%" PRId64 " is damaged: %u messages lost",
                f->p->first, f->p->last, f->p->live);
        smp__obpack_index_remove(&st->packs, k);
        return 1;
    }
    return 0;
}

/* Adds the packs' live members above the cursor to a fetch's rows. Packs are in id order and
 * do not overlap: once `max` members are taken, later packs hold only larger ids. */
static int fetch_packs(smp_store_t *st, op_t *o, struct fetch_tmp **tmp, size_t *n, size_t *cap,
                       rbuf_t *b)
{
    size_t from_db = *n;
    struct pack_fetch f = {{tmp, n, cap, b, o->id, o->max, 0, 0}, NULL};
    for (size_t k = 0; k < st->packs.n && f.c.taken < o->max && f.c.err == 0;) {
        if (st->packs.v[k].last <= o->id || st->packs.v[k].live == 0) {
            k++;
            continue;
        }
        int rc = fetch_one_pack(st, k, &f);
        if (rc < 0) {
            return rc;
        }
        k += rc == 0; /* 1: the damaged pack left the index */
    }
    if (f.c.err == 0 && f.c.taken > 0 && from_db > 0) {
        qsort(*tmp, *n, sizeof **tmp, fetch_tmp_cmp);
    }
    if (*n > o->max) {
        *n = o->max;
    }
    return f.c.err;
}

static int read_fetch(smp_store_t *st, op_t *o)
{
    sqlite3_stmt *s = st->stmt[ST_OB_FETCH];
    struct fetch_tmp *tmp = NULL;
    size_t n = 0, cap = 0;
    rbuf_t b = {0};
    int err = apply_late(st); /* acked rows must not be sent again */
    if (err != 0) {
        return err;
    }
    int rc = sqlite3_bind_int64(s, 1, o->id);
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int64(s, 2, clamp_limit(o->max));
    }
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "outbox fetch");
    }
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        if ((err = grow_array((void **)&tmp, &cap, n + 1, sizeof *tmp)) != 0) {
            break;
        }
        struct fetch_tmp *r = &tmp[n];
        r->id = sqlite3_column_int64(s, 0);
        r->seq = (uint64_t)sqlite3_column_int64(s, 2);
        const void *blob = sqlite3_column_blob(s, 4);
        r->len = (size_t)sqlite3_column_bytes(s, 4);
        if (blob == NULL && r->len > 0) {
            err = -ENOMEM; /* SQLite could not materialise the blob */
            break;
        }
        if ((err = col_text(s, 1, &b, &r->dev)) != 0 ||
            (err = col_text(s, 3, &b, &r->topic)) != 0 ||
            (err = rbuf_add(&b, blob, blob != NULL ? r->len : 0, false, &r->pay)) != 0) {
            break;
        }
        n++;
    }
    sqlite3_reset(s);
    if (err == 0 && rc != SQLITE_DONE) {
        err = sql_fail(st, rc, "outbox fetch");
    }
    if (err == 0 && st->packs.n > 0) {
        err = fetch_packs(st, o, &tmp, &n, &cap, &b);
    }
    if (err == 0 && st->ring != NULL) {
        err = fetch_merge_ring(st, o, &tmp, &n, &cap, &b);
    }
    smp_outbox_row_t *rows = NULL;
    if (err == 0 && n > 0 && (rows = malloc(n * sizeof *rows)) == NULL) {
        err = -ENOMEM;
    }
    if (err != 0) {
        free(tmp);
        free(b.p);
        return err;
    }
    for (size_t k = 0; k < n; k++) {
        rows[k] = (smp_outbox_row_t){
            .id = tmp[k].id,
            .device = b.p + tmp[k].dev,
            .seq = tmp[k].seq,
            .topic = b.p + tmp[k].topic,
            .payload = tmp[k].len ? (const void *)(b.p + tmp[k].pay) : (const void *)"",
            .len = tmp[k].len,
        };
    }
    free(tmp);
    o->rows = rows;
    o->nrows = n;
    o->buf = b.p;
    return 0;
}

static int read_history(smp_store_t *st, op_t *o)
{
    smp_history_row_t *rows;
    int rc = smp__history_query(st->hist, o->device, o->name, o->ts_ms, o->to_ms, o->max, &rows,
                                &o->nrows, &o->buf);
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, "history query");
    }
    o->rows = rows;
    return 0;
}

/* Deletes at most prune_chunk rows older than `cutoff` with statement `which`. Returns 0 or a
 * negative code; *full is set when the chunk was used up (more rows may remain). */
static int prune_one(smp_store_t *st, int which, int64_t cutoff, bool *full, int *changed,
                     const char *what)
{
    sqlite3_stmt *s = st->stmt[which];
    int rc = sqlite3_bind_int64(s, 1, cutoff);
    if (rc == SQLITE_OK) {
        rc = sqlite3_bind_int(s, 2, prune_chunk);
    }
    if (rc != SQLITE_OK) {
        return sql_fail(st, rc, what);
    }
    rc = step_done(st, which, what);
    if (rc == 0) {
        int n = sqlite3_changes(st->db);
        *changed += n;
        *full |= n >= prune_chunk;
    }
    return rc;
}

/* Removes old rows a little at a time: at most prune_chunk each of history (past the
 * retention), command results (past cmd_result_keep_ms) and audit rows (past audit_keep_ms), in
 * a short transaction of its own so a failure here never fails queued operations. */
static void prune_old(smp_store_t *st)
{
    st->last_prune_ms = mono_ms();
    st->prune_more = false;
    int64_t now = wall_ms();
    bool more = false;
    int changed = 0;
    int rc = tx_begin(st);
    if (rc == 0) {
        int n = 0;
        bool hmore = false;
        rc = smp__history_prune(st->hist, now, prune_chunk, &n, &hmore);
        rc = rc == SQLITE_OK ? 0 : sql_fail(st, rc, "history prune");
        changed += n;
        more |= hmore;
    }
    if (rc == 0) {
        rc = prune_one(st, ST_CMD_PRUNE, now - st->cmd_keep_ms, &more, &changed,
                       "command result prune");
    }
    if (rc == 0) {
        rc = prune_one(st, ST_AUDIT_PRUNE, now - st->audit_keep_ms, &more, &changed, "audit prune");
    }
    if (rc == 0 && st->audit_max_rows > 0) {
        rc = prune_one(st, ST_AUDIT_TRIM, st->audit_max_rows, &more, &changed, "audit trim");
    }
    if (rc == 0 && changed > 0) {
        rc = tx_commit(st);
    }
    if (rc != 0 || changed == 0) {
        tx_rollback(st); /* nothing deleted: nothing to commit */
        return;
    }
    st->prune_more = more;
}

static bool prune_due(const smp_store_t *st)
{
    return st->prune_more || mono_ms() - st->last_prune_ms >= prune_interval_ms;
}

/* Applies one batch in queue order into the open transaction (reads see it too). Each op
 * ends up ready (its callback may run now), waiting for the commit, or being staged. */
static void apply_batch(smp_store_t *st, op_t *ops)
{
    while (ops != NULL) {
        op_t *o = ops;
        ops = o->next;
        o->next = NULL;
        int rc = o->status;
        bool write = true, wait = false;
        if (rc == 0 && o->kind == OP_OUTBOX_ADD) {
            add_op(st, o);
            continue;
        }
        if (rc == 0) {
            if (o->kind == OP_OUTBOX_FETCH || o->kind == OP_HISTORY) {
                write = false;
                rc = o->kind == OP_OUTBOX_FETCH ? read_fetch(st, o) : read_history(st, o);
            } else {
                rc = tx_ensure(st);
            }
        }
        if (rc == 0 && write) {
            switch (o->kind) {
            case OP_PUT_VALUE:
                rc = apply_put(st, o);
                break;
            case OP_OUTBOX_ACK:
                rc = apply_ack(st, o);
                break;
            case OP_CMD_PUT:
                rc = apply_cmd_put(st, o);
                /* "accepted" (no result yet) is durable before the device is written. */
                wait = true;
                st->commit_now |= o->value_json == NULL;
                break;
            case OP_AUDIT:
                rc = apply_audit(st, o);
                break;
            default:
                break;
            }
        }
        if (rc != 0 && o->status == 0) {
            o->status = rc;
            o->id = 0;
            if (write) {
                tx_end(st, rc);
            }
        }
        if (wait && rc == 0) {
            list_push(&st->w_head, &st->w_tail, o);
        } else {
            finish(st, o);
        }
    }
}

/* Commits what the batch needs committed: an op waiting for durability, every batch when
 * there is no interval, the interval commit when due; then stages the adds whose
 * reservation committed (which can need another commit, hence the loop). */
static void after_batch(smp_store_t *st)
{
    for (int round = 0; round < 8; round++) {
        if (st->commit_now || (st->commit_interval_ms == 0 && st->tx_open)) {
            if (st->lv->n > 0 && lv_due(st) && tx_ensure(st) == 0) {
                int rc = lv_flush(st);
                if (tx_end(st, rc) == 0) {
                    sm_clear(st->lv);
                    st->lv_flushed_ms = mono_ms();
                }
            } else {
                tx_end(st, 0);
            }
        } else if (tick_due(st)) {
            commit_tick(st, false);
        }
        if (st->s_head == NULL) {
            break;
        }
        process_staging(st);
    }
    if (!st->tx_open && prune_due(st)) {
        prune_old(st);
    }
}

static op_t *take_ready(smp_store_t *st)
{
    op_t *o = st->r_head;
    st->r_head = st->r_tail = NULL;
    return o;
}

/* Work for quiet periods: pruning, and a PASSIVE checkpoint so the WAL is folded back into the
 * database while nobody is waiting (it never blocks and never waits for readers). */
static void idle_work(smp_store_t *st)
{
    if (!st->tx_open && prune_due(st)) {
        prune_old(st);
    }
    if (st->commits_since_ckpt > 0 && !st->in_memory && !st->ckpt_started) {
        int rc = sqlite3_wal_checkpoint_v2(st->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        if (rc == SQLITE_OK) {
            st->commits_since_ckpt = 0;
        } else if (rc != SQLITE_BUSY) {
            sql_fail(st, rc, "checkpoint");
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Queue, writer thread, completions */

static void free_op(op_t *o)
{
    free(o->rows);
    free(o->buf);
    free(o);
}

/* Appends finished ops to the done list and wakes the loop thread, which runs their callbacks. */
static void done_append(smp_store_t *st, op_t *head, op_t *tail)
{
    uv_mutex_lock(&st->done_mu);
    if (st->d_tail != NULL) {
        st->d_tail->next = head;
    } else {
        st->d_head = head;
    }
    st->d_tail = tail;
    uv_mutex_unlock(&st->done_mu);
    uv_async_send(&st->async);
}

/* Finished ops: those without a callback are freed here; the others go to the loop thread. */
static void deliver(smp_store_t *st, op_t *ops)
{
    op_t *head = NULL, *tail = NULL;
    while (ops != NULL) {
        op_t *next = ops->next;
        ops->next = NULL;
        if (ops->has_cb) {
            if (tail != NULL) {
                tail->next = ops;
            } else {
                head = ops;
            }
            tail = ops;
        } else {
            free_op(ops);
        }
        ops = next;
    }
    if (head != NULL) {
        done_append(st, head, tail);
    }
}

/* Takes up to `max` ops off the queue. Caller holds mu. */
static op_t *take_batch(smp_store_t *st, size_t max)
{
    op_t *head = st->q_head;
    op_t *last = head;
    for (size_t n = 1; n < max && last->next != NULL; n++) {
        last = last->next;
    }
    st->q_head = last->next;
    if (st->q_head == NULL) {
        st->q_tail = NULL;
    }
    last->next = NULL;
    return head;
}

static uint64_t writer_wait_ms(const smp_store_t *st)
{
    uint64_t wait_ms = st->prune_more ? prune_backlog_ms : idle_tick_ms;
    if (st->commit_interval_ms > 0) {
        uint64_t now = mono_ms();
        uint64_t until = st->next_tick_ms > now ? st->next_tick_ms - now : 0;
        wait_ms = until < wait_ms ? until : wait_ms;
    }
    return wait_ms;
}

static void writer_main(void *arg)
{
    smp_store_t *st = arg;
    pthread_setname_np(pthread_self(), "smp-store");
    uv_mutex_lock(&st->mu);
    for (;;) {
        if (st->q_head == NULL) {
            if (st->stopping) {
                break;
            }
            uint64_t wait_ms = writer_wait_ms(st);
            int r = wait_ms > 0 ? uv_cond_timedwait(&st->cond, &st->mu, wait_ms * 1000000u)
                                : UV_ETIMEDOUT;
            if (r == UV_ETIMEDOUT && st->q_head == NULL && !st->stopping) {
                uv_mutex_unlock(&st->mu);
                uv_mutex_lock(&st->db_mu);
                after_batch(st);
                idle_work(st);
                op_t *ready = take_ready(st);
                uv_mutex_unlock(&st->db_mu);
                deliver(st, ready);
                uv_mutex_lock(&st->mu);
            }
            continue;
        }
        op_t *batch = take_batch(st, batch_max_ops);
        uv_mutex_unlock(&st->mu);
        uv_mutex_lock(&st->db_mu);
        apply_batch(st, batch);
        after_batch(st);
        op_t *ready = take_ready(st);
        uv_mutex_unlock(&st->db_mu);
        deliver(st, ready);
        uv_mutex_lock(&st->mu);
    }
    uv_mutex_unlock(&st->mu);
}

static void invoke(op_t *o)
{
    switch (o->kind) {
    case OP_OUTBOX_ADD:
    case OP_CMD_PUT:
        o->cb.added(o->arg, o->status, o->status == 0 ? o->id : 0);
        break;
    case OP_OUTBOX_FETCH:
        o->cb.fetch(o->arg, o->status, o->rows, o->nrows);
        break;
    case OP_HISTORY:
        o->cb.history(o->arg, o->status, o->rows, o->nrows);
        break;
    default:
        break;
    }
}

/* Loop thread: runs the callbacks of finished ops in the order they were queued. Callbacks may
 * queue new operations; those land in the next delivery, never in this list. */
static void run_callbacks(smp_store_t *st)
{
    uv_mutex_lock(&st->done_mu);
    op_t *o = st->d_head;
    st->d_head = st->d_tail = NULL;
    uv_mutex_unlock(&st->done_mu);
    while (o != NULL) {
        op_t *next = o->next;
        invoke(o);
        free_op(o);
        if (--st->pending_cbs == 0 && !st->async_closing) {
            uv_unref((uv_handle_t *)&st->async);
        }
        o = next;
    }
}

static void on_async(uv_async_t *h)
{
    run_callbacks(h->data);
}

static void enqueue(smp_store_t *st, op_t *o)
{
    if (o->has_cb && st->pending_cbs++ == 0 && !st->async_closing) {
        uv_ref((uv_handle_t *)&st->async);
    }
    uv_mutex_lock(&st->mu);
    bool was_empty = st->q_head == NULL;
    if (st->q_tail != NULL) {
        st->q_tail->next = o;
    } else {
        st->q_head = o;
    }
    st->q_tail = o;
    /* The writer only waits when the queue is empty. */
    if (was_empty) {
        uv_cond_signal(&st->cond);
    }
    uv_mutex_unlock(&st->mu);
}

/* Allocates an op and copies in its strings and payload. `strs` holds the device, name,
 * value_json and the four aux strings, in that order; NULL entries stay NULL. */
enum { OP_NSTRS = 7 };

static op_t *op_new(enum op_kind kind, const char *const strs[OP_NSTRS], const void *payload,
                    size_t len)
{
    size_t lens[OP_NSTRS];
    size_t fixed = sizeof(op_t);
    for (int k = 0; k < OP_NSTRS; k++) {
        lens[k] = strs != NULL && strs[k] != NULL ? strlen(strs[k]) + 1 : 0;
        fixed += lens[k];
    }
    if (len > SIZE_MAX - fixed) {
        return NULL;
    }
    op_t *o = malloc(fixed + len);
    if (o == NULL) {
        return NULL;
    }
    memset(o, 0, sizeof *o);
    o->kind = kind;
    const char **dst[OP_NSTRS] = {&o->device, &o->name,   &o->value_json, &o->aux[0],
                                  &o->aux[1], &o->aux[2], &o->aux[3]};
    char *p = o->data;
    for (int k = 0; k < OP_NSTRS; k++) {
        if (lens[k] > 0) {
            *dst[k] = memcpy(p, strs[k], lens[k]);
            p += lens[k];
        }
    }
    if (len > 0) {
        o->payload = memcpy(p, payload, len);
    }
    o->len = len;
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* Opening */

static void finalize_all(smp_store_t *st)
{
    for (int i = 0; i < ST_COUNT; i++) {
        sqlite3_finalize(st->stmt[i]);
        st->stmt[i] = NULL;
    }
}

static int on_wal_commit(void *arg, sqlite3 *db, const char *name, int pages)
{
    (void)db;
    (void)name;
    smp_store_t *st = arg;
    uv_mutex_lock(&st->ckpt_mu);
    st->ckpt_wal_pages = pages;
    st->ckpt_dirty = true;
    if (pages >= wal_autocheckpoint_pages) {
        uv_cond_signal(&st->ckpt_cond);
    }
    uv_mutex_unlock(&st->ckpt_mu);
    return SQLITE_OK;
}

static void checkpointer_main(void *arg)
{
    smp_store_t *st = arg;
    pthread_setname_np(pthread_self(), "smp-checkpoint");
    uv_mutex_lock(&st->ckpt_mu);
    while (!st->ckpt_stop) {
        bool big = st->ckpt_wal_pages >= wal_autocheckpoint_pages;
        if (!big) {
            int r = uv_cond_timedwait(&st->ckpt_cond, &st->ckpt_mu, idle_tick_ms * 1000000u);
            big = st->ckpt_wal_pages >= wal_autocheckpoint_pages;
            /* A quiet second with commits behind it is a good time to fold the WAL back. */
            if (st->ckpt_stop || (!big && !(r == UV_ETIMEDOUT && st->ckpt_dirty))) {
                continue;
            }
        }
        st->ckpt_wal_pages = 0;
        st->ckpt_dirty = false;
        uv_mutex_unlock(&st->ckpt_mu);
        /* PASSIVE: copies what no reader still needs and never blocks the writer. */
        int rc =
            sqlite3_wal_checkpoint_v2(st->ckpt_db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY && rc != SQLITE_LOCKED) {
            LOG_WARN(SCOPE, "checkpoint: %s", sqlite3_errstr(rc));
        }
        uv_mutex_lock(&st->ckpt_mu);
    }
    uv_mutex_unlock(&st->ckpt_mu);
}

/* Starts the checkpointer on a second connection. Without it (in memory, or the second
 * connection cannot open) the writer checkpoints itself, as SQLite does by default. */
static void checkpointer_start(smp_store_t *st)
{
    if (st->in_memory || st->db == NULL) {
        return;
    }
    int rc = sqlite3_open_v2(st->path, &st->ckpt_db, SQLITE_OPEN_READWRITE, NULL);
    if (rc == SQLITE_OK) {
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA cache_size = -%d", ckpt_cache_kib);
        (void)sqlite3_exec(st->ckpt_db, sql, NULL, NULL, NULL);
    }
    if (rc == SQLITE_OK && uv_thread_create(&st->ckpt_thread, checkpointer_main, st) == 0) {
        st->ckpt_started = true;
        return;
    }
    LOG_WARN(SCOPE, "no checkpointer thread (%s): the writer checkpoints itself",
             rc == SQLITE_OK ? "thread" : sqlite3_errstr(rc));
    sqlite3_close(st->ckpt_db);
    st->ckpt_db = NULL;
    sqlite3_wal_autocheckpoint(st->db, wal_autocheckpoint_pages);
}

static void checkpointer_stop(smp_store_t *st)
{
    if (st->ckpt_started) {
        uv_mutex_lock(&st->ckpt_mu);
        st->ckpt_stop = true;
        uv_cond_signal(&st->ckpt_cond);
        uv_mutex_unlock(&st->ckpt_mu);
        uv_thread_join(&st->ckpt_thread);
        st->ckpt_started = false;
    }
    if (st->ckpt_db != NULL) {
        sqlite3_close(st->ckpt_db);
        st->ckpt_db = NULL;
    }
}

static void db_close(smp_store_t *st)
{
    smp__history_free(st->hist);
    st->hist = NULL;
    smp__obpack_index_free(&st->packs);
    smp__obpack_index_free(&st->tx_packs);
    finalize_all(st);
    if (st->db != NULL) {
        int rc = sqlite3_close(st->db);
        if (rc != SQLITE_OK) {
            LOG_ERR(SCOPE, "closing the database: %s", sqlite3_errstr(rc));
        }
        st->db = NULL;
    }
}

/* Runs a statement that yields one text value (a pragma) into out. */
static int query_text(smp_store_t *st, const char *sql, char *out, size_t size)
{
    sqlite3_stmt *s = NULL;
    int rc = sqlite3_prepare_v2(st->db, sql, -1, &s, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            const unsigned char *t = sqlite3_column_text(s, 0);
            snprintf(out, size, "%s", t != NULL ? (const char *)t : "");
            rc = SQLITE_OK;
        } else if (rc == SQLITE_DONE) {
            out[0] = '\0';
            rc = SQLITE_OK;
        }
    }
    sqlite3_finalize(s);
    return rc;
}

static int exec_sql(smp_store_t *st, const char *sql)
{
    return sqlite3_exec(st->db, sql, NULL, NULL, NULL);
}

/* Creates or checks the schema, in one transaction. */
static int setup_schema(smp_store_t *st, const char **why)
{
    char ver[32];
    int rc = exec_sql(st, "BEGIN IMMEDIATE");
    if (rc != SQLITE_OK) {
        *why = "begin";
        return rc;
    }
    rc = query_text(st, "PRAGMA user_version", ver, sizeof ver);
    if (rc == SQLITE_OK && atoi(ver) > SCHEMA_VERSION) {
        LOG_ERR(SCOPE, "the database has schema version %s, newer than this simpul's (%d)", ver,
                SCHEMA_VERSION);
        exec_sql(st, "ROLLBACK");
        *why = "schema version";
        return SQLITE_ERROR;
    }
    if (rc == SQLITE_OK) {
        rc = exec_sql(st, schema_v1);
    }
    if (rc == SQLITE_OK) {
        rc = smp__history_schema(st->db);
    }
    if (rc == SQLITE_OK && atoi(ver) < SCHEMA_VERSION) {
        rc = exec_sql(st, "PRAGMA user_version = 2");
    }
    if (rc == SQLITE_OK) {
        rc = exec_sql(st, "COMMIT");
    }
    if (rc != SQLITE_OK) {
        *why = "schema";
        if (!sqlite3_get_autocommit(st->db)) {
            exec_sql(st, "ROLLBACK");
        }
    }
    return rc;
}

/* Opens `path` and makes it ready: WAL, integrity, schema, statements, outbox totals. Returns 0
 * or a negative code, with the reason logged; on failure nothing stays open. */
static int try_open(smp_store_t *st, const char *path)
{
    const char *why = "open";
    char text[256];
    int rc = sqlite3_open_v2(
        path, &st->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc == SQLITE_OK) {
        /* Until the file has passed every check, keep SQLite from deleting its -wal when we
         * close it: a bad database is moved aside together with its WAL, as evidence. (The
         * result is not checked: an in-memory database has no WAL and says NOTFOUND.) */
        int persist = 1;
        (void)sqlite3_file_control(st->db, "main", SQLITE_FCNTL_PERSIST_WAL, &persist);
        sqlite3_extended_result_codes(st->db, 1);
        sqlite3_busy_timeout(st->db, busy_timeout_ms);
        /* SQLite quietly opens a file it may not write read-only; we need to write. */
        if (sqlite3_db_readonly(st->db, "main") == 1) {
            LOG_WARN(SCOPE, "%s: the file is read-only", path);
            db_close(st);
            return -EROFS;
        }
        why = "journal mode";
        rc = query_text(st, "PRAGMA journal_mode = WAL", text, sizeof text);
    }
    if (rc == SQLITE_OK && strcmp(text, "wal") != 0 &&
        !(st->in_memory && strcmp(text, "memory") == 0)) {
        LOG_WARN(SCOPE, "%s: cannot switch to WAL mode (journal mode is '%s')", path, text);
        db_close(st);
        return -EIO;
    }
    if (rc == SQLITE_OK) {
        why = "synchronous";
        rc = exec_sql(st, st->sync_normal ? "PRAGMA synchronous = NORMAL"
                                          : "PRAGMA synchronous = FULL");
    }
    if (rc == SQLITE_OK) {
        char sql[64];
        /* mmap off: pages are read into the (small) cache instead of mapping the whole file
         * into the process, which would count in its RSS. */
        snprintf(sql, sizeof sql, "PRAGMA cache_size = -%d; PRAGMA mmap_size = 0", cache_kib);
        why = "cache size";
        rc = exec_sql(st, sql);
    }
    if (rc == SQLITE_OK) {
        /* The writer never checkpoints (a checkpoint's fsync would stall commits); it reports
         * the WAL's size to the checkpointer thread instead, which checkpoints once the WAL
         * passes wal_autocheckpoint_pages, and when the store is idle. */
        why = "wal hook";
        sqlite3_wal_hook(st->db, on_wal_commit, st);
    }
    if (rc == SQLITE_OK && !st->skip_check) {
        why = "integrity check";
        rc = query_text(st, "PRAGMA quick_check", text, sizeof text);
        if (rc == SQLITE_OK && strcmp(text, "ok") != 0) {
            LOG_WARN(SCOPE, "%s: quick_check failed: %s", path, text);
            db_close(st);
            return -EBADMSG;
        }
    }
    if (rc == SQLITE_OK) {
        rc = setup_schema(st, &why);
    }
    for (int i = 0; i < ST_COUNT && rc == SQLITE_OK; i++) {
        why = "prepare";
        rc = sqlite3_prepare_v3(st->db, stmt_sql[i], -1, SQLITE_PREPARE_PERSISTENT, &st->stmt[i],
                                NULL);
    }
    if (rc == SQLITE_OK) {
        /* Also recovers history chunks a kill -9 left open, and migrates schema 1's rows. */
        smp_history_opts_t ho = {
            .runtime_dir = st->in_memory ? NULL : st->runtime_dir,
            .retention_ms = st->retention_ms,
            .max_bytes = st->history_max,
            .chunk_max_ms = st->history_chunk_ms,
        };
        why = "history";
        rc = smp__history_open(st->db, &ho, &st->hist);
    }
    if (rc == SQLITE_OK) {
        sqlite3_stmt *s = NULL;
        why = "outbox totals";
        rc = sqlite3_prepare_v2(st->db, "SELECT count(*), total(length(payload)) FROM outbox", -1,
                                &s, NULL);
        if (rc == SQLITE_OK && (rc = sqlite3_step(s)) == SQLITE_ROW) {
            st->ob_rows = sqlite3_column_int64(s, 0);
            st->ob_bytes = (int64_t)sqlite3_column_double(s, 1);
            rc = SQLITE_OK;
        }
        sqlite3_finalize(s);
    }
    if (rc == SQLITE_OK) {
        why = "outbox packs";
        rc = packs_load(st);
    }
    if (rc == SQLITE_OK) {
        /* Set last: with a size limit, closing a persistent WAL would truncate it. */
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA journal_size_limit = %" PRId64, journal_size_limit);
        why = "journal size limit";
        rc = query_text(st, sql, text, sizeof text);
    }
    if (rc == SQLITE_OK) {
        int persist = 0; /* a healthy database: a clean close removes the WAL again */
        (void)sqlite3_file_control(st->db, "main", SQLITE_FCNTL_PERSIST_WAL, &persist);
    }
    if (rc != SQLITE_OK) {
        int code = map_rc(st->db, rc);
        LOG_WARN(SCOPE, "%s: %s failed: %s", path, why,
                 st->db != NULL ? sqlite3_errmsg(st->db) : sqlite3_errstr(rc));
        db_close(st);
        return code;
    }
    return 0;
}

/* mkdir -p of the directory part of `path`. Failures surface when SQLite cannot open. */
static void make_parent_dir(const char *path)
{
    char *dir = strdup(path);
    if (dir == NULL) {
        return;
    }
    char *slash = strrchr(dir, '/');
    if (slash != NULL && slash != dir) {
        *slash = '\0';
        for (char *p = dir + 1; *p != '\0'; p++) {
            if (*p == '/') {
                *p = '\0';
                mkdir(dir, 0755);
                *p = '/';
            }
        }
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
            LOG_WARN(SCOPE, "cannot create directory %s: %s", dir, strerror(errno));
        }
    }
    free(dir);
}

/* Renames the database and its -wal/-shm to "<path>.corrupt-<unix-time>[-wal|-shm]" so the
 * sqlite3 CLI can still open the moved copy with its WAL. Returns 0, or a negative errno
 * (-ENOENT when there was no file to move). */
static int move_aside(const char *path)
{
    size_t n = strlen(path) + 64;
    char *dst = malloc(n), *src = malloc(n), *dst2 = malloc(n);
    int rc = 0;
    if (dst == NULL || src == NULL || dst2 == NULL) {
        rc = -ENOMEM;
        goto out;
    }
    long long now = (long long)time(NULL);
    snprintf(dst, n, "%s.corrupt-%lld", path, now);
    for (int k = 1; access(dst, F_OK) == 0 && k < 1000; k++) {
        snprintf(dst, n, "%s.corrupt-%lld.%d", path, now, k);
    }
    if (rename(path, dst) != 0) {
        rc = -errno;
        if (rc != -ENOENT) {
            LOG_ERR(SCOPE, "cannot move %s aside to %s: %s", path, dst, strerror(errno));
        }
        goto out;
    }
    LOG_WARN(SCOPE, "moved the unusable database %s to %s", path, dst);
    static const char *const suffixes[] = {"-wal", "-shm"};
    for (size_t i = 0; i < 2; i++) {
        snprintf(src, n, "%s%s", path, suffixes[i]);
        snprintf(dst2, n, "%s%s", dst, suffixes[i]);
        if (rename(src, dst2) != 0 && errno != ENOENT) {
            /* A stale WAL next to a new database would be replayed into it: remove it. */
            LOG_ERR(SCOPE, "cannot move %s aside: %s; removing it", src, strerror(errno));
            unlink(src);
        }
    }
out:
    free(dst);
    free(src);
    free(dst2);
    return rc;
}

/* Opens the configured database, moving a bad one aside, and falls back to memory. */
static int open_db(smp_store_t *st)
{
    if (strcmp(st->path, ":memory:") == 0) {
        st->in_memory = true;
        st->lost_state = true;
        return try_open(st, ":memory:");
    }
    make_parent_dir(st->path);
    int rc = try_open(st, st->path);
    if (rc == 0 || rc == -ENOMEM) {
        return rc;
    }
    if (rc == -EBUSY) {
        /* Locked by another process (a second gateway?): the file is probably fine. */
        LOG_ERR(SCOPE, "%s is locked by another process; not touching it", st->path);
    } else if (access(st->path, F_OK) != 0) {
        LOG_ERR(SCOPE, "cannot create %s (%s)", st->path, strerror(-rc));
    } else {
        LOG_ERR(SCOPE, "cannot use %s (%s): moving it aside and starting a new database", st->path,
                strerror(-rc));
        if (move_aside(st->path) == 0) {
            st->lost_state = true; /* its seqs are gone with it: the clock floor takes over */
            rc = try_open(st, st->path);
            if (rc == 0) {
                LOG_WARN(SCOPE, "started a new, empty database at %s", st->path);
                return 0;
            }
        }
    }
    LOG_ERR(SCOPE,
            "cannot use a database at %s (%s): running on an IN-MEMORY database; last values, "
            "seq numbers and the outbox will NOT survive a restart",
            st->path, strerror(-rc));
    st->in_memory = true;
    st->lost_state = true;
    return try_open(st, ":memory:");
}

/* ------------------------------------------------------------------------------------------ */
/* Public API */

static void on_async_closed(uv_handle_t *h)
{
    smp_store_t *st = h->data;
    st->async_closed = true;
}

/* Closes the async and runs the loop until its close callback ran. UV_RUN_NOWAIT, not
 * UV_RUN_DEFAULT: DEFAULT would not return while any other handle is still active, and each
 * NOWAIT pass only runs what is already due. */
static void close_async(smp_store_t *st)
{
    st->async_closing = true;
    uv_close((uv_handle_t *)&st->async, on_async_closed);
    while (!st->async_closed) {
        uv_run(st->loop, UV_RUN_NOWAIT);
    }
}

static void free_store(smp_store_t *st)
{
    checkpointer_stop(st);
    db_close(st);
    smp__ring_close(st->ring, st->final_ok);
    sm_clear(st->lv);
    sm_clear(st->dseq);
    free(st->lv);
    free(st->dseq);
    free(st->snap);
    free(st->snap_ins);
    free(st->dirty);
    free(st->late);
    uv_mutex_destroy(&st->ring_mu);
    uv_cond_destroy(&st->ckpt_cond);
    uv_mutex_destroy(&st->ckpt_mu);
    uv_cond_destroy(&st->cond);
    uv_mutex_destroy(&st->mu);
    uv_mutex_destroy(&st->db_mu);
    uv_mutex_destroy(&st->done_mu);
    free(st->path);
    free(st->runtime_dir);
    free(st);
}

/* Recovery of a ring left by a process that did not stop cleanly (kill -9, OOM, watchdog):
 * its unacknowledged messages go into the outbox with their ids, ts and seq, acked ones that
 * had reached the outbox leave it, and each device's seq continues exactly. */
struct recover_ctx {
    smp_store_t *st;
    int rc;
    uint64_t live, acked;
};

static void recover_rec(void *arg, const smp_ring_rec_t *rec)
{
    struct recover_ctx *c = arg;
    if (c->rc != 0) {
        return;
    }
    smp_obpack_t *p = smp__obpack_index_find(&c->st->packs, rec->id);
    if (p != NULL && rec->state == SMP_RING_LIVE) {
        c->live++; /* committed in a pack before the process died: it is there already */
    } else if (rec->state == SMP_RING_LIVE) {
        c->rc = insert_outbox(c->st, rec);
        c->live++;
    } else {
        c->rc = apply_ack_one(c->st, rec->id);
        c->acked++;
    }
    if (c->rc == 0) {
        c->rc = set_device_seq(c->st, ST_SEQ_MAX, rec->device, rec->seq);
    }
}

static void recover_seq(void *arg, const char *device, uint64_t seq)
{
    struct recover_ctx *c = arg;
    if (c->rc == 0 && seq > 0) {
        c->rc = set_device_seq(c->st, ST_SEQ_MAX, device, seq);
    }
}

static void ring_recover(smp_store_t *st)
{
    struct recover_ctx c = {st, tx_begin(st), 0, 0};
    smp__ring_scan(st->ring, -1, recover_rec, &c);
    smp__ring_seq_scan(st->ring, recover_seq, &c);
    if (c.rc == 0) {
        c.rc = tx_commit(st);
    }
    if (c.rc != 0) {
        tx_rollback(st);
        LOG_ERR(SCOPE, "cannot move the ring's messages into the database (%s); they stay in %s",
                strerror(-c.rc), smp__ring_path(st->ring));
        return;
    }
    smp__ring_reset(st->ring, 0);
    smp__ring_reset(st->ring, 1);
    smp__ring_seq_clear(st->ring);
    if (c.live + c.acked > 0) {
        LOG_WARN(SCOPE,
                 "the last run did not stop cleanly: recovered %" PRIu64
                 " unacknowledged messages from %s (%" PRIu64 " acked ones dropped)",
                 c.live, smp__ring_path(st->ring), c.acked);
    }
}

/* Without a ring from the last run (power cut, or runtime_dir lost), every seq a device had
 * reserved beyond its last committed one may have been published and lost: logged per device,
 * counted, and never used again. */
static void powercut_check(smp_store_t *st)
{
    static const char sql[] = "SELECT r.device, coalesce(s.seq, 0), r.upto FROM seq_reserve r"
                              " LEFT JOIN device_seq s USING (device) WHERE r.upto > "
                              "coalesce(s.seq, 0)";
    sqlite3_stmt *q = NULL;
    int rc = tx_begin(st);
    if (rc == 0 && sqlite3_prepare_v2(st->db, sql, -1, &q, NULL) != SQLITE_OK) {
        rc = -EIO;
    }
    uint64_t lost = 0, devices = 0;
    while (rc == 0 && sqlite3_step(q) == SQLITE_ROW) {
        const char *dev = (const char *)sqlite3_column_text(q, 0);
        uint64_t seq = (uint64_t)sqlite3_column_int64(q, 1);
        uint64_t upto = (uint64_t)sqlite3_column_int64(q, 2);
        LOG_WARN(SCOPE,
                 "power cut (or runtime_dir lost): %s seq %" PRIu64 "..%" PRIu64
                 " were reserved but not committed: up to %" PRIu64 " messages lost",
                 dev, seq + 1, upto, upto - seq);
        lost += upto - seq;
        devices++;
        rc = set_device_seq(st, ST_SEQ_MAX, dev, upto);
    }
    sqlite3_finalize(q);
    if (rc == 0 && devices > 0) {
        rc = tx_commit(st);
    }
    if (rc != 0 || devices == 0) {
        tx_rollback(st);
    }
    if (devices > 0) {
        LOG_WARN(SCOPE,
                 "telemetry lost to a power cut: at most %" PRIu64 " messages of %" PRIu64
                 " devices (at most commit_interval_ms of unacknowledged data)",
                 lost, devices);
        st->stats.powercut_lost = lost;
        st->stats.powercut_events = 1;
    }
}

/* The next outbox id: above every id the table ever had (AUTOINCREMENT's sqlite_sequence). */
static int64_t max_outbox_id(smp_store_t *st)
{
    char text[32];
    if (query_text(
            st,
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox'), 0),"
            " coalesce((SELECT max(id) FROM outbox), 0),"
            " coalesce((SELECT max(last_id) FROM outbox_pack), 0))",
            text, sizeof text) != SQLITE_OK) {
        return 0;
    }
    return strtoll(text, NULL, 10);
}

static void max_ring_id(void *arg, const smp_ring_rec_t *rec)
{
    int64_t *next = arg;
    if (rec->id >= *next) {
        *next = rec->id + 1;
    }
}

/* Opens the ring in runtime_dir (interval mode, file database), recovers or reports what the
 * last run left, and sets the next outbox id. */
static void ring_setup(smp_store_t *st, const smp_store_opts_t *opts)
{
    bool tmpfs = false, existed = false;
    if (st->commit_interval_ms > 0 && !st->in_memory) {
        const char *dir = opts->runtime_dir;
        int rc = dir != NULL && dir[0] != '\0'
                     ? smp__ring_open(dir, st->path, ring_region_bytes, &tmpfs, &existed, &st->ring)
                     : -ENOENT;
        if (rc != 0) {
            LOG_ERR(SCOPE,
                    "no outbox ring in runtime_dir %s (%s): every message is committed before "
                    "it is published, as with commit_interval_ms 0",
                    dir != NULL ? dir : "(none)", strerror(-rc));
        } else if (!tmpfs) {
            LOG_WARN(SCOPE,
                     "runtime_dir %s is NOT on tmpfs: the outbox ring there writes to the disk "
                     "and survives a power cut only by chance; use a tmpfs such as /run or "
                     "/dev/shm",
                     dir);
        }
    }
    if (st->ring != NULL && existed) {
        ring_recover(st);
    } else {
        powercut_check(st);
    }
    st->next_id = max_outbox_id(st) + 1;
    if (st->ring != NULL) {
        /* Records the recovery could not move into the database keep their ids. */
        smp__ring_scan(st->ring, -1, max_ring_id, &st->next_id);
    }
    if (st->commit_interval_ms > 0) {
        uint64_t iv = (uint64_t)st->commit_interval_ms;
        st->next_tick_ms = (mono_ms() / iv + 1) * iv;
    }
}

int smp_store_open(uv_loop_t *loop, const smp_store_opts_t *opts, smp_store_t **out)
{
    if (out != NULL) {
        *out = NULL;
    }
    if (loop == NULL || opts == NULL || opts->path == NULL || opts->path[0] == '\0' ||
        out == NULL) {
        return -EINVAL;
    }
    smp_store_t *st = calloc(1, sizeof *st);
    if (st == NULL) {
        return -ENOMEM;
    }
    st->path = strdup(opts->path);
    if (st->path == NULL) {
        free(st);
        return -ENOMEM;
    }
    st->loop = loop;
    st->retention_ms =
        opts->history_retention_h > 0 ? (int64_t)opts->history_retention_h * 3600000 : 0;
    st->outbox_max = opts->outbox_max_bytes > 0 ? opts->outbox_max_bytes : 0;
    st->sync_normal = opts->sync_normal;
    st->cmd_keep_ms = opts->cmd_keep_ms > 0 ? opts->cmd_keep_ms : cmd_result_keep_ms;
    st->audit_keep_ms = opts->audit_keep_ms > 0 ? opts->audit_keep_ms : audit_keep_ms;
    st->audit_max_rows = opts->audit_max_rows;
    st->history_max = opts->history_max_bytes > 0 ? opts->history_max_bytes : 0;
    st->history_chunk_ms = opts->history_chunk_max_s > 0 ? opts->history_chunk_max_s * 1000 : 0;
    st->runtime_dir = opts->runtime_dir != NULL ? strdup(opts->runtime_dir) : NULL;
    st->commit_interval_ms = opts->commit_interval_ms > 0 ? opts->commit_interval_ms : 0;
    st->skip_check = opts->skip_check;
    if (uv_mutex_init(&st->mu) != 0) {
        free(st->path);
        free(st);
        return -ENOMEM;
    }
    if (uv_mutex_init(&st->db_mu) != 0) {
        uv_mutex_destroy(&st->mu);
        free(st->path);
        free(st);
        return -ENOMEM;
    }
    if (uv_mutex_init(&st->done_mu) != 0) {
        uv_mutex_destroy(&st->db_mu);
        uv_mutex_destroy(&st->mu);
        free(st->path);
        free(st);
        return -ENOMEM;
    }
    if (uv_cond_init(&st->cond) != 0) {
        uv_mutex_destroy(&st->done_mu);
        uv_mutex_destroy(&st->db_mu);
        uv_mutex_destroy(&st->mu);
        free(st->path);
        free(st);
        return -ENOMEM;
    }
    st->lv = calloc(1, sizeof *st->lv);
    st->dseq = calloc(1, sizeof *st->dseq);
    if (uv_mutex_init(&st->ckpt_mu) != 0 || uv_cond_init(&st->ckpt_cond) != 0 ||
        uv_mutex_init(&st->ring_mu) != 0 || st->lv == NULL || st->dseq == NULL) {
        abort(); /* only fails for lack of resources at start-up */
    }
    st->lv_flushed_ms = mono_ms();

    int rc = open_db(st);
    if (rc == 0 && st->outbox_max > 0 && st->ob_bytes > st->outbox_max) {
        /* The limit was lowered since the last run. */
        if (tx_begin(st) == 0 && outbox_trim(st) == 0 && tx_commit(st) == 0) {
            LOG_WARN(SCOPE, "outbox over its new limit at start: dropped %" PRIu64 " oldest",
                     st->ob_dropped);
        } else {
            tx_rollback(st);
        }
        st->ob_full = false;
    }
    if (rc != 0) {
        free_store(st);
        return rc;
    }
    ring_setup(st, opts);
    publish_stats(st);

    rc = uv_async_init(loop, &st->async, on_async);
    if (rc != 0) {
        free_store(st);
        return rc;
    }
    st->async.data = st;
    uv_unref((uv_handle_t *)&st->async);
    /* Before the writer exists: its fallback configures the writer's connection, and the
     * writer reads ckpt_started. */
    checkpointer_start(st);
    rc = uv_thread_create(&st->writer, writer_main, st);
    if (rc != 0) {
        close_async(st);
        free_store(st);
        return rc;
    }
    st->writer_started = true;
    LOG_INFO(SCOPE, "opened %s%s: outbox %" PRId64 " messages, %" PRId64 " bytes", st->path,
             st->in_memory ? " (in memory)" : "", st->ob_rows, st->ob_bytes);
    *out = st;
    return 0;
}

static op_t *take_all(smp_store_t *st)
{
    uv_mutex_lock(&st->mu);
    op_t *q = st->q_head;
    st->q_head = st->q_tail = NULL;
    uv_mutex_unlock(&st->mu);
    return q;
}

void smp_store_close(smp_store_t *st)
{
    if (st == NULL) {
        return;
    }
    /* The writer drains the queue before it exits. */
    uv_mutex_lock(&st->mu);
    st->stopping = true;
    uv_cond_signal(&st->cond);
    uv_mutex_unlock(&st->mu);
    if (st->writer_started) {
        uv_thread_join(&st->writer);
    }

    /* Callbacks may queue more work. Apply it here (the writer is gone, so this thread may use
     * the connection), a bounded number of rounds; after that, cancel. When nothing is left,
     * the last commit writes the ring's unacknowledged messages, exact seqs and last values. */
    bool final_done = false;
    for (int round = 0;; round++) {
        run_callbacks(st);
        op_t *q = take_all(st);
        if (q == NULL && !final_done) {
            final_done = true;
            uv_mutex_lock(&st->db_mu);
            commit_tick(st, true);
            op_t *ready = take_ready(st);
            uv_mutex_unlock(&st->db_mu);
            deliver(st, ready);
            continue;
        }
        if (q == NULL) {
            break;
        }
        if (round < close_apply_rounds) {
            while (q != NULL) {
                op_t *rest = q;
                for (size_t k = 1; k < batch_max_ops && rest->next != NULL; k++) {
                    rest = rest->next;
                }
                op_t *next = rest->next;
                rest->next = NULL;
                uv_mutex_lock(&st->db_mu);
                apply_batch(st, q);
                after_batch(st);
                op_t *ready = take_ready(st);
                uv_mutex_unlock(&st->db_mu);
                deliver(st, ready);
                q = next;
            }
        } else if (round < 2 * close_apply_rounds) {
            for (op_t *o = q; o != NULL; o = o->next) {
                o->status = -ECANCELED;
                o->id = 0;
            }
            deliver(st, q);
        } else {
            LOG_WARN(SCOPE, "callbacks keep queueing work during close; dropping it");
            while (q != NULL) {
                op_t *next = q->next;
                free_op(q);
                q = next;
            }
            break;
        }
    }
    /* Open history chunks go to SQLite at a clean stop, so the staging file is not needed. */
    uv_mutex_lock(&st->db_mu);
    int hrc = smp__history_flush_all(st->hist);
    uv_mutex_unlock(&st->db_mu);
    if (hrc != SQLITE_OK) {
        sql_fail(st, hrc, "history at close (the staging file keeps the open chunks)");
    }
    /* sqlite3_close (in free_store) checkpoints the WAL into the database and removes it. */
    close_async(st);
    LOG_INFO(SCOPE, "closed %s", st->path);
    free_store(st);
}

int smp_store_load_last(smp_store_t *st, smp_store_last_cb cb, void *arg)
{
    if (st == NULL || cb == NULL) {
        return -EINVAL;
    }
    struct last_tmp {
        size_t dev, tag, val;
        int64_t ts;
    } *tmp = NULL;
    size_t n = 0, cap = 0;
    rbuf_t b = {0};
    int err = 0, rc;
    /* Collect first, call back after: the callback may use the store (load_seq) itself. */
    uv_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = st->stmt[ST_LOAD_LAST];
    while ((rc = sqlite3_step(s)) == SQLITE_ROW) {
        if ((err = grow_array((void **)&tmp, &cap, n + 1, sizeof *tmp)) != 0 ||
            (err = col_text(s, 0, &b, &tmp[n].dev)) != 0 ||
            (err = col_text(s, 1, &b, &tmp[n].tag)) != 0 ||
            (err = col_text(s, 2, &b, &tmp[n].val)) != 0) {
            break;
        }
        tmp[n].ts = sqlite3_column_int64(s, 3);
        n++;
    }
    sqlite3_reset(s);
    if (err == 0 && rc != SQLITE_DONE) {
        err = sql_fail(st, rc, "loading last values");
    }
    uv_mutex_unlock(&st->db_mu);
    if (err == 0) {
        for (size_t k = 0; k < n; k++) {
            cb(arg, b.p + tmp[k].dev, b.p + tmp[k].tag, b.p + tmp[k].val, tmp[k].ts);
        }
    }
    free(tmp);
    free(b.p);
    return err;
}

/* A seq above every seq a device can have used since any earlier floor: wall ms x 1000
 * (a device sends far fewer than 1000 messages per millisecond). Below 2^53 until the year
 * 2255, so platforms that read JSON numbers as doubles keep it exact. */
static uint64_t seq_floor(void)
{
    return (uint64_t)wall_ms() * 1000u;
}

static int read_seq_row(smp_store_t *st, int which, const char *device, uint64_t *out)
{
    sqlite3_stmt *s = st->stmt[which];
    *out = 0;
    int rc = bind_text(s, 1, device);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(s);
        if (rc == SQLITE_ROW) {
            *out = (uint64_t)sqlite3_column_int64(s, 0);
            rc = SQLITE_DONE;
        }
    }
    sqlite3_reset(s);
    return rc == SQLITE_DONE ? 0 : sql_fail(st, rc, "loading seq");
}

int smp_store_load_seq(smp_store_t *st, const char *device, uint64_t *seq)
{
    if (seq != NULL) {
        *seq = seq_floor();
    }
    if (st == NULL || device == NULL || seq == NULL) {
        return -EINVAL;
    }
    uint64_t last = 0, upto = 0;
    uv_mutex_lock(&st->db_mu);
    int rc = read_seq_row(st, ST_LOAD_SEQ, device, &last);
    if (rc == 0) {
        rc = read_seq_row(st, ST_LOAD_RESERVE, device, &upto);
    }
    uv_mutex_unlock(&st->db_mu);
    if (rc != 0) {
        LOG_ERR(SCOPE,
                "%s: cannot read its last seq (%s): continuing from the clock floor %" PRIu64,
                device, strerror(-rc), *seq);
        last = *seq;
        upto = 0;
    } else if (st->lost_state) {
        uint64_t floor = seq_floor();
        if (last < floor) {
            LOG_WARN(SCOPE, "%s: the store lost its seqs; continuing from the clock floor %" PRIu64,
                     device, floor);
            last = floor;
        }
    }
    *seq = last;
    if (st->ring != NULL) {
        uv_mutex_lock(&st->ring_mu);
        struct dseq *d = dseq_get(st, device);
        if (d != NULL) {
            /* Already known (a device restarted by a reload): the database may be behind. */
            d->committed = last > d->committed ? last : d->committed;
            if (d->staged > last) {
                last = d->staged;
                *seq = last;
            }
            if (d->tick_staged == 0) {
                d->tick_staged = last;
            }
            dseq_staged(st, d, last);
            d->upto = upto > d->upto ? upto : d->upto;
            d->upto = d->upto > last ? d->upto : last;
        }
        uv_mutex_unlock(&st->ring_mu);
    }
    return rc;
}

void smp_store_put_value(smp_store_t *st, const char *device, const char *tag,
                         const char *value_json, int64_t ts_ms)
{
    if (st == NULL || device == NULL || tag == NULL || value_json == NULL) {
        LOG_ERR(SCOPE, "put_value: missing argument");
        return;
    }
    op_t *o = op_new(OP_PUT_VALUE, (const char *[OP_NSTRS]){device, tag, value_json}, NULL, 0);
    if (o == NULL) {
        LOG_ERR(SCOPE, "put_value %s/%s: out of memory", device, tag);
        return;
    }
    o->ts_ms = ts_ms;
    enqueue(st, o);
}

/* Loop thread: runs an op's callback through the done list, as if the writer had finished it. */
static void complete_now(smp_store_t *st, op_t *o)
{
    if (st->pending_cbs++ == 0 && !st->async_closing) {
        uv_ref((uv_handle_t *)&st->async);
    }
    done_append(st, o, o);
}

/* Loop thread: stages a message in the ring when its seq is covered by the device's durable
 * reservation and nothing of that device waits in the writer. Returns the id, or 0. */
static int64_t stage_direct(smp_store_t *st, const char *device, uint64_t seq, const char *topic,
                            const void *payload, size_t len)
{
    int64_t id = 0;
    uv_mutex_lock(&st->ring_mu);
    struct dseq *d = dseq_get(st, device);
    if (d != NULL && d->in_writer == 0 && seq <= d->upto &&
        smp__ring_append(st->ring, st->next_id, device, seq, topic, payload, len, wall_ms()) == 0) {
        id = st->next_id++;
        dseq_staged(st, d, seq);
        st->ring_staged++;
        st->ring_live++;
    } else if (d != NULL) {
        d->in_writer++; /* the caller queues it for the writer */
    }
    uv_mutex_unlock(&st->ring_mu);
    return id;
}

void smp_store_outbox_add(smp_store_t *st, const char *device, uint64_t seq, const char *topic,
                          const void *payload, size_t len, smp_store_added_cb cb, void *arg)
{
    bool bad = st == NULL || device == NULL || topic == NULL || (payload == NULL && len > 0);
    if (!bad && st->ring != NULL) {
        op_t *c = cb != NULL ? op_new(OP_OUTBOX_ADD, NULL, NULL, 0) : NULL;
        int64_t id =
            cb == NULL || c != NULL ? stage_direct(st, device, seq, topic, payload, len) : 0;
        if (id != 0) {
            if (c != NULL) {
                c->id = id;
                c->has_cb = true;
                c->cb.added = cb;
                c->arg = arg;
                complete_now(st, c);
            }
            return;
        }
        free(c);
    }
    op_t *o = st != NULL ? op_new(OP_OUTBOX_ADD, (const char *[OP_NSTRS]){device, topic},
                                  bad ? NULL : payload, bad ? 0 : len)
                         : NULL;
    if (o == NULL) {
        /* Nothing to queue the answer on: answer now. */
        if (cb != NULL) {
            cb(arg, st == NULL ? -EINVAL : -ENOMEM, 0);
        }
        return;
    }
    o->status = bad ? -EINVAL : 0;
    o->seq = seq;
    o->has_cb = cb != NULL;
    o->cb.added = cb;
    o->arg = arg;
    enqueue(st, o);
}

/* Loop thread: an ack of a message still in the ring only flips its state there (no disk
 * write at all). Returns true when that was the case. */
static bool ring_ack(smp_store_t *st, int64_t id)
{
    if (st->ring == NULL) {
        return false;
    }
    uv_mutex_lock(&st->ring_mu);
    int old = smp__ring_set_state(st->ring, id, SMP_RING_ACKED);
    st->ring_live -= old == SMP_RING_LIVE && st->ring_live > 0;
    uv_mutex_unlock(&st->ring_mu);
    return old == SMP_RING_LIVE || old == SMP_RING_ACKED;
}

void smp_store_outbox_ack(smp_store_t *st, int64_t id)
{
    if (st == NULL || ring_ack(st, id)) {
        return;
    }
    op_t *o = op_new(OP_OUTBOX_ACK, NULL, NULL, 0);
    if (o == NULL) {
        /* The row stays and is sent again after a restart: at-least-once still holds. */
        LOG_ERR(SCOPE, "outbox ack %" PRId64 ": out of memory", id);
        return;
    }
    o->id = id;
    enqueue(st, o);
}

void smp_store_outbox_ack_many(smp_store_t *st, const int64_t *ids, size_t n)
{
    if (st == NULL || n == 0) {
        return;
    }
    op_t *o = op_new(OP_OUTBOX_ACK, NULL, ids, n * sizeof *ids);
    if (o == NULL) {
        LOG_ERR(SCOPE, "outbox ack of %zu rows: out of memory", n);
        return;
    }
    /* Keep only the ids that are rows of the database. */
    size_t w = 0;
    for (size_t k = 0; k < n; k++) {
        if (!ring_ack(st, ids[k])) {
            memcpy((char *)o->payload + w * sizeof *ids, &ids[k], sizeof *ids);
            w++;
        }
    }
    if (w == 0) {
        free_op(o);
        return;
    }
    o->len = w * sizeof *ids;
    enqueue(st, o);
}

void smp_store_outbox_fetch(smp_store_t *st, int64_t after_id, size_t max, smp_store_fetch_cb cb,
                            void *arg)
{
    if (cb == NULL) {
        return; /* a read nobody receives */
    }
    op_t *o = st != NULL ? op_new(OP_OUTBOX_FETCH, NULL, NULL, 0) : NULL;
    if (o == NULL) {
        cb(arg, st == NULL ? -EINVAL : -ENOMEM, NULL, 0);
        return;
    }
    o->id = after_id;
    o->max = max;
    o->has_cb = true;
    o->cb.fetch = cb;
    o->arg = arg;
    enqueue(st, o);
}

void smp_store_history(smp_store_t *st, const char *device, const char *tag, int64_t from_ms,
                       int64_t to_ms, size_t limit, smp_store_history_cb cb, void *arg)
{
    if (cb == NULL) {
        return;
    }
    op_t *o =
        st != NULL ? op_new(OP_HISTORY, (const char *[OP_NSTRS]){device, tag}, NULL, 0) : NULL;
    if (o == NULL) {
        cb(arg, st == NULL ? -EINVAL : -ENOMEM, NULL, 0);
        return;
    }
    o->status = device == NULL || tag == NULL ? -EINVAL : 0;
    o->ts_ms = from_ms;
    o->to_ms = to_ms;
    o->max = limit;
    o->has_cb = true;
    o->cb.history = cb;
    o->arg = arg;
    enqueue(st, o);
}

void smp_store_stats(smp_store_t *st, smp_store_stats_t *out)
{
    if (out == NULL) {
        return;
    }
    if (st == NULL) {
        memset(out, 0, sizeof *out);
        return;
    }
    uv_mutex_lock(&st->done_mu);
    *out = st->stats;
    uv_mutex_unlock(&st->done_mu);
    uv_mutex_lock(&st->ring_mu);
    out->ring_messages = st->ring_staged;
    out->outbox_rows += st->ring_live;
    uv_mutex_unlock(&st->ring_mu);
}

void smp_store_cmd_put(smp_store_t *st, const char *device, const char *id, const char *result_json,
                       int64_t ts_ms, smp_store_added_cb cb, void *arg)
{
    bool bad = st == NULL || device == NULL || id == NULL;
    op_t *o = st != NULL
                  ? op_new(OP_CMD_PUT, (const char *[OP_NSTRS]){device, id, result_json}, NULL, 0)
                  : NULL;
    if (o == NULL) {
        if (cb != NULL) {
            cb(arg, st == NULL ? -EINVAL : -ENOMEM, 0);
        }
        return;
    }
    o->status = bad ? -EINVAL : 0;
    o->ts_ms = ts_ms;
    o->has_cb = cb != NULL;
    o->cb.added = cb;
    o->arg = arg;
    enqueue(st, o);
}

int smp_store_load_cmds(smp_store_t *st, int64_t since_ms, smp_store_cmd_cb cb, void *arg)
{
    if (st == NULL || cb == NULL) {
        return -EINVAL;
    }
    struct cmd_tmp {
        size_t dev, id, res; /* res == SIZE_MAX: NULL (the command was still running) */
        int64_t ts;
    } *tmp = NULL;
    size_t n = 0, cap = 0;
    rbuf_t b = {0};
    int err = 0, rc;
    uv_mutex_lock(&st->db_mu);
    sqlite3_stmt *s = st->stmt[ST_LOAD_CMDS];
    rc = sqlite3_bind_int64(s, 1, since_ms);
    if (rc != SQLITE_OK) {
        err = sql_fail(st, rc, "loading command results");
    }
    while (err == 0 && (rc = sqlite3_step(s)) == SQLITE_ROW) {
        if ((err = grow_array((void **)&tmp, &cap, n + 1, sizeof *tmp)) != 0 ||
            (err = col_text(s, 0, &b, &tmp[n].dev)) != 0 ||
            (err = col_text(s, 1, &b, &tmp[n].id)) != 0) {
            break;
        }
        tmp[n].res = SIZE_MAX;
        if (sqlite3_column_type(s, 2) != SQLITE_NULL &&
            (err = col_text(s, 2, &b, &tmp[n].res)) != 0) {
            break;
        }
        tmp[n].ts = sqlite3_column_int64(s, 3);
        n++;
    }
    sqlite3_reset(s);
    if (err == 0 && rc != SQLITE_DONE) {
        err = sql_fail(st, rc, "loading command results");
    }
    uv_mutex_unlock(&st->db_mu);
    /* Called back without the lock: the callback may queue operations (cmd_put). */
    for (size_t k = 0; err == 0 && k < n; k++) {
        cb(arg, b.p + tmp[k].dev, b.p + tmp[k].id, tmp[k].res != SIZE_MAX ? b.p + tmp[k].res : NULL,
           tmp[k].ts);
    }
    free(tmp);
    free(b.p);
    return err;
}

bool smp_store_durable(const smp_store_t *st)
{
    return st != NULL && !st->in_memory;
}

void smp_store_audit(smp_store_t *st, const smp_audit_row_t *row)
{
    if (st == NULL || row == NULL) {
        return;
    }
    op_t *o = op_new(OP_AUDIT,
                     (const char *[OP_NSTRS]){row->device, row->id, row->value_json, row->op,
                                              row->tag, row->code, row->message},
                     NULL, 0);
    if (o == NULL) {
        LOG_ERR(SCOPE, "audit of command %s: out of memory", row->id ? row->id : "(no id)");
        return;
    }
    o->ts_ms = row->received_ms;
    o->to_ms = row->latency_us;
    enqueue(st, o);
}

bool smp_store_degraded(const smp_store_t *st)
{
    return st != NULL && st->in_memory && strcmp(st->path, ":memory:") != 0;
}
