/* Store: the gateway's memory in SQLite (WAL).
 *
 * Tables (documented in docs/store.md): last values per tag, value history, per-device seq,
 * the MQTT outbox (store-and-forward), command results (idempotency) and the audit log.
 *
 * Threads. smp_store_open/close and the smp_store_load_* functions run on the main thread
 * before/after the loop runs and may block. Everything else is called on the loop thread and
 * never blocks it: calls queue an operation for the store's writer thread, which applies the
 * queued operations into one open transaction, committed at most once per commit interval (at
 * once for what needs durability), and runs completion callbacks back on the loop thread
 * (uv_async). Outbox messages are staged by the loop thread itself in a ring file on tmpfs
 * (gateway/ring.h). Operations are applied in the order they were queued. Strings passed in
 * are copied.
 *
 * Errors. SQLite errors are logged once per episode and turned into negative codes (-EIO,
 * -ENOSPC, -EROFS, ...). A database that cannot be opened or is corrupt at start is moved aside
 * (renamed "<path>.corrupt-<unix-time>") and a new one is created; if even that fails the store
 * runs on an in-memory database so the gateway keeps polling and publishing. */
#ifndef SMP_STORE_H
#define SMP_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

typedef struct smp_store smp_store_t;

typedef struct smp_store_opts {
    const char *path;         /* database file; ":memory:" allowed (tests) */
    int history_retention_h;  /* history rows older than this are pruned, a little at a time */
    int64_t outbox_max_bytes; /* when the outbox exceeds this, the oldest rows are dropped */
    /* false (default): PRAGMA synchronous=FULL, every commit is on disk before its callback
     * runs, so a power cut loses nothing acknowledged. true: NORMAL, faster commits that
     * survive a crash of the process but not of the machine. */
    bool sync_normal;
    /* Command records: results kept this long (0: 24 h); audit rows kept this long (0: 90
     * days) and at most this many (0: no cap), the oldest pruned first, a little at a time. */
    int64_t cmd_keep_ms;
    int64_t audit_keep_ms;
    int64_t audit_max_rows;
    /* History (docs/store.md, "History"): a size bound in bytes (0: none), the longest time a
     * chunk stays open (0: 900 s), and the directory of the staging file of open chunks, best
     * on tmpfs (NULL: memory only, a kill -9 loses open chunks). */
    int64_t history_max_bytes;
    int history_chunk_max_s;
    /* 0: every outbox message is committed before its callback runs (commit-before-publish).
     * > 0: telemetry, history and last values are committed at most once per interval, in
     * one transaction; outbox messages are staged in a ring file in runtime_dir and only those
     * not acknowledged when the interval ends reach the database (docs/store.md). */
    int commit_interval_ms;
    /* A directory that outlives the process but not the power (tmpfs) for the outbox ring.
     * NULL, or a directory that cannot be used: no ring (as commit_interval_ms 0 for the
     * outbox). */
    const char *runtime_dir;
    /* true: open without PRAGMA quick_check (it reads every page: seconds to minutes on a big
     * store and slow flash). The engine sets it for a reload and for store.quick_check "off". */
    bool skip_check;
} smp_store_opts_t;

/* Opens (creating/migrating the schema), starts the writer thread. Returns 0 or a negative
 * code; see "Errors" above for what happens to a bad file. */
int smp_store_open(uv_loop_t *loop, const smp_store_opts_t *opts, smp_store_t **out);
/* Applies every queued operation, stops the writer, closes the database. Must be called
 * after the loop has stopped running handles of the store's own (it closes its uv_async with
 * uv_close and runs the loop until closed). smp_store_close(NULL) is a no-op. */
void smp_store_close(smp_store_t *st);
/* True when the configured database could not be used at open and the store runs on the
 * in-memory fallback (never for a configured ":memory:"). Any thread after open. */
bool smp_store_degraded(const smp_store_t *st);

/* --- start-up reads (main thread, before the loop runs) --- */
/* Calls cb for every stored last value. value_json is the JSON text of the value. */
typedef void (*smp_store_last_cb)(void *arg, const char *device, const char *tag,
                                  const char *value_json, int64_t ts_ms);
int smp_store_load_last(smp_store_t *st, smp_store_last_cb cb, void *arg);
/* The seq to continue from for a device: the next message gets *seq + 1. 0 for a device the
 * store has never seen. Never a seq that may already have been published: after a power cut it
 * is the end of the range reserved ahead; when the store lost its memory (database moved
 * aside, in-memory store) or cannot read it, a floor from the clock (wall ms x 1000, see
 * docs/contract.md). Returns 0, or a negative code when the read failed (*seq is then the
 * floor, safe to use). */
int smp_store_load_seq(smp_store_t *st, const char *device, uint64_t *seq);

/* --- loop-thread operations --- */
/* Records a tag's new value: upserts last value and appends a history row. */
void smp_store_put_value(smp_store_t *st, const char *device, const char *tag,
                         const char *value_json, int64_t ts_ms);

/* Appends a message to the outbox and records `seq` as the device's last seq in the same
 * transaction. When that transaction commits, cb(arg, 0, id) runs on the loop thread with the
 * row id (ids increase in insertion order); on failure cb(arg, negative code, 0): the message
 * then only lives in memory and the caller may publish it anyway. cb may be NULL. */
typedef void (*smp_store_added_cb)(void *arg, int status, int64_t id);
void smp_store_outbox_add(smp_store_t *st, const char *device, uint64_t seq, const char *topic,
                          const void *payload, size_t len, smp_store_added_cb cb, void *arg);
/* The broker acknowledged row `id`: delete it. */
void smp_store_outbox_ack(smp_store_t *st, int64_t id);
/* The same for n rows at once (ids copied): one queue operation instead of n. */
void smp_store_outbox_ack_many(smp_store_t *st, const int64_t *ids, size_t n);

/* Fetches up to `max` outbox rows with id > after_id, oldest first. cb runs on the loop thread;
 * the rows and their strings are valid only during the callback. */
typedef struct smp_outbox_row {
    int64_t id;
    const char *device;
    uint64_t seq;
    const char *topic;
    const void *payload;
    size_t len;
} smp_outbox_row_t;
typedef void (*smp_store_fetch_cb)(void *arg, int status, const smp_outbox_row_t *rows, size_t n);
void smp_store_outbox_fetch(smp_store_t *st, int64_t after_id, size_t max, smp_store_fetch_cb cb,
                            void *arg);

/* Counters, read on the loop thread (updated by the writer; approximate is fine). */
typedef struct smp_store_stats {
    uint64_t outbox_rows;     /* rows in the outbox now */
    uint64_t outbox_bytes;    /* payload bytes in the outbox now */
    uint64_t outbox_dropped;  /* rows dropped because the outbox was full, since start */
    uint64_t commits;         /* transactions committed */
    uint64_t errors;          /* SQLite errors seen */
    uint64_t history_bytes;   /* history on disk (chunks and their index, estimated) */
    uint64_t history_samples; /* samples in the history, stored or in open chunks */
    uint64_t outbox_written;  /* outbox messages written to the database (unacked at a commit) */
    uint64_t ring_messages;   /* messages staged in the ring since start */
    uint64_t powercut_lost;   /* seqs reserved but not committed before a power cut (at open) */
    uint64_t powercut_events; /* 1 when this start followed a power cut with seqs at risk */
} smp_store_stats_t;
void smp_store_stats(smp_store_t *st, smp_store_stats_t *out);

/* History query: up to `limit` changes of device/tag with from_ms <= ts < to_ms, oldest first.
 * cb runs on the loop thread; rows valid only during it. */
typedef struct smp_history_row {
    int64_t ts_ms;
    const char *value_json;
} smp_history_row_t;
typedef void (*smp_store_history_cb)(void *arg, int status, const smp_history_row_t *rows,
                                     size_t n);
void smp_store_history(smp_store_t *st, const char *device, const char *tag, int64_t from_ms,
                       int64_t to_ms, size_t limit, smp_store_history_cb cb, void *arg);

#endif

/* --- commands (at most once, audit) --- */
#ifndef SMP_STORE_CMD_API
#define SMP_STORE_CMD_API
/* Records that command (device, id) was accepted and is about to run (result_json NULL) or its
 * final result. cb runs after the commit, before which the caller must not act on it. */
void smp_store_cmd_put(smp_store_t *st, const char *device, const char *id, const char *result_json,
                       int64_t ts_ms, smp_store_added_cb cb, void *arg);
/* Start-up: calls cb for every command recorded at or after since_ms (result_json NULL for a
 * command that was still running when the gateway stopped). */
typedef void (*smp_store_cmd_cb)(void *arg, const char *device, const char *id,
                                 const char *result_json, int64_t ts_ms);
int smp_store_load_cmds(smp_store_t *st, int64_t since_ms, smp_store_cmd_cb cb, void *arg);
/* False when the store runs on an in-memory database (the file could not be used): nothing it
 * records survives a restart. */
bool smp_store_durable(const smp_store_t *st);
/* One audit row per command, valid or not. Strings may be NULL. */
typedef struct smp_audit_row {
    int64_t received_ms;
    const char *id;
    const char *device;
    const char *op;
    const char *tag;
    const char *value_json;
    const char *code; /* "ok" or the error code */
    const char *message;
    int64_t latency_us;
} smp_audit_row_t;
void smp_store_audit(smp_store_t *st, const smp_audit_row_t *row);
#endif
