/* Unit tests for the SQLite store (gateway/store.c), on real database files in a temporary
 * directory. The store's .c is included so tests can shorten its timers and reach the
 * connection under its own lock (to simulate a full disk). Waiting is always "run the loop
 * until a condition holds or a deadline passes", never a sleep. */
#include "store.c"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <grp.h>
#include <stdio.h>
#include <sys/types.h>
#include <sys/wait.h>

#define DEADLINE_MS 30000

/* The seq a device continues from; fails the test when the store reports a read error. */
static uint64_t load_seq_ok(smp_store_t *st, const char *device)
{
    uint64_t seq = 0;
    assert_int_equal(smp_store_load_seq(st, device, &seq), 0);
    return seq;
}

static char g_dir[256];
static char g_path[512];
static uv_loop_t g_loop;
static uv_thread_t g_main_thread;

/* ------------------------------------------------------------------------------------------ */
/* Fixture and helpers */

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    (void)state;
    snprintf(g_dir, sizeof g_dir, "/tmp/simpul-store-XXXXXX");
    if (mkdtemp(g_dir) == NULL) {
        return -1;
    }
    /* Traversable by the unprivileged child of the read-only tests. */
    chmod(g_dir, 0755);
    snprintf(g_path, sizeof g_path, "%s/simpul.db", g_dir);
    g_main_thread = uv_thread_self();
    prune_interval_ms = 1000;
    idle_tick_ms = 1000;
    return uv_loop_init(&g_loop);
}

static int teardown(void **state)
{
    (void)state;
    int rc = uv_loop_close(&g_loop); /* fails if the store left a handle open */
    nftw(g_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return rc;
}

typedef struct deadline {
    uv_timer_t timer;
    bool fired;
    bool closed;
} deadline_t;

static void on_deadline(uv_timer_t *t)
{
    ((deadline_t *)t->data)->fired = true;
}

static void on_deadline_closed(uv_handle_t *h)
{
    ((deadline_t *)h->data)->closed = true;
}

static void deadline_start(deadline_t *d, uv_loop_t *loop, uint64_t ms)
{
    d->fired = false;
    d->closed = false;
    uv_timer_init(loop, &d->timer);
    d->timer.data = d;
    uv_timer_start(&d->timer, on_deadline, ms, 0);
}

static void deadline_stop(deadline_t *d, uv_loop_t *loop)
{
    uv_close((uv_handle_t *)&d->timer, on_deadline_closed);
    while (!d->closed) {
        uv_run(loop, UV_RUN_NOWAIT);
    }
}

/* Runs the loop until `expr` holds or the deadline passes. */
#define WAIT_LOOP(loop, expr)                                                                      \
    do {                                                                                           \
        deadline_t dl_;                                                                            \
        deadline_start(&dl_, (loop), DEADLINE_MS);                                                 \
        while (!(expr) && !dl_.fired) {                                                            \
            uv_run((loop), UV_RUN_ONCE);                                                           \
        }                                                                                          \
        deadline_stop(&dl_, (loop));                                                               \
    } while (0)
/* The same, then asserts `expr`. */
#define WAIT_FOR(expr)                                                                             \
    do {                                                                                           \
        WAIT_LOOP(&g_loop, expr);                                                                  \
        assert_true(expr);                                                                         \
    } while (0)

static smp_store_t *open_at(const char *path, int retention_h, int64_t max)
{
    smp_store_opts_t o = {
        .path = path, .history_retention_h = retention_h, .outbox_max_bytes = max};
    smp_store_t *st = NULL;
    assert_int_equal(smp_store_open(&g_loop, &o, &st), 0);
    assert_non_null(st);
    return st;
}

static smp_store_t *open_default(void)
{
    return open_at(g_path, 168, 256 * 1024 * 1024);
}

static bool on_loop_thread(void)
{
    uv_thread_t self = uv_thread_self();
    return uv_thread_equal(&self, &g_main_thread) != 0;
}

/* Log capture: fd 2 goes to a file while a test looks for specific lines. */
typedef struct logcap {
    int saved;
    char file[600];
} logcap_t;

static void logcap_start(logcap_t *c)
{
    snprintf(c->file, sizeof c->file, "%s/log.txt", g_dir);
    int fd = open(c->file, O_CREAT | O_TRUNC | O_WRONLY, 0666);
    assert_true(fd >= 0);
    fchmod(fd, 0666);
    fflush(stderr);
    c->saved = dup(2);
    dup2(fd, 2);
    close(fd);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap + 1);
    size_t r;
    while (buf != NULL && (r = fread(buf + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap + 1);
        }
    }
    fclose(f);
    if (buf != NULL) {
        buf[n] = '\0';
    }
    if (len != NULL) {
        *len = n;
    }
    return buf;
}

/* Restores stderr and returns what was logged (caller frees); echoes it for the test log. */
static char *logcap_stop(logcap_t *c)
{
    dup2(c->saved, 2);
    close(c->saved);
    char *text = read_file(c->file, NULL);
    assert_non_null(text);
    fputs(text, stderr);
    unlink(c->file);
    return text;
}

static int count_substr(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p += strlen(needle)) {
        n++;
    }
    return n;
}

static int write_file(const char *path, const void *data, size_t len)
{
    int fd = open(path, O_CREAT | O_TRUNC | O_WRONLY, 0644);
    if (fd < 0) {
        return -1;
    }
    ssize_t w = write(fd, data, len);
    close(fd);
    return w == (ssize_t)len ? 0 : -1;
}

/* Finds "<base>.corrupt-<digits>" (not the -wal/-shm companions) in dir. */
static bool find_corrupt(const char *dir, const char *base, char *out, size_t size)
{
    DIR *d = opendir(dir);
    if (d == NULL) {
        return false;
    }
    char prefix[128];
    snprintf(prefix, sizeof prefix, "%s.corrupt-", base);
    bool found = false;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0 && strstr(e->d_name, "-wal") == NULL &&
            strstr(e->d_name, "-shm") == NULL) {
            snprintf(out, size, "%s/%s", dir, e->d_name);
            found = true;
        }
    }
    closedir(d);
    return found;
}

static bool file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Counts rows with an independent connection (after the store is closed). */
/* bits(blob): the set bits of a blob, for counting the members of outbox packs. */
static void sql_bits(sqlite3_context *c, int argc, sqlite3_value **v)
{
    (void)argc;
    const unsigned char *b = sqlite3_value_blob(v[0]);
    int n = sqlite3_value_bytes(v[0]);
    int64_t bits = 0;
    for (int k = 0; b != NULL && k < n; k++) {
        bits += __builtin_popcount(b[k]);
    }
    sqlite3_result_int64(c, bits);
}

/* Messages waiting in the outbox: single rows and the unacknowledged members of packs. */
#define OUTBOX_MSGS                                                                                \
    "SELECT (SELECT count(*) FROM outbox) + (SELECT coalesce(sum(bits(members)), 0)"               \
    " FROM outbox_pack)"

static int64_t count_rows(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *s = NULL;
    int64_t n = -1;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_create_function(db, "bits", 1, SQLITE_UTF8, NULL, sql_bits, NULL, NULL) ==
            SQLITE_OK &&
        sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW) {
        n = sqlite3_column_int64(s, 0);
    }
    sqlite3_finalize(s);
    sqlite3_close(db);
    return n;
}

/* --- callback recorders --- */

#define REC_MAX 64

typedef struct adds {
    size_t n, errors;
    int last_status;
    int64_t last_id;
    bool increasing;
    bool off_loop;
    int64_t ids[REC_MAX];
} adds_t;

static void on_added(void *arg, int status, int64_t id)
{
    adds_t *a = arg;
    if (!on_loop_thread()) {
        a->off_loop = true;
    }
    if (status == 0) {
        if (id <= a->last_id) {
            a->increasing = false;
        }
        a->last_id = id;
    } else {
        a->errors++;
        a->last_status = status;
        if (id != 0) {
            a->increasing = false; /* failures must report id 0 */
        }
    }
    if (a->n < REC_MAX) {
        a->ids[a->n] = id;
    }
    a->n++;
}

static void adds_init(adds_t *a)
{
    memset(a, 0, sizeof *a);
    a->increasing = true;
}

typedef struct fetched {
    bool done;
    int status;
    size_t n;
    int64_t id[REC_MAX];
    uint64_t seq[REC_MAX];
    char device[REC_MAX][32];
    char topic[REC_MAX][64];
    unsigned char payload[REC_MAX][128];
    size_t len[REC_MAX];
} fetched_t;

static void on_fetched(void *arg, int status, const smp_outbox_row_t *rows, size_t n)
{
    fetched_t *f = arg;
    f->done = true;
    f->status = status;
    f->n = n;
    for (size_t k = 0; k < n && k < REC_MAX; k++) {
        f->id[k] = rows[k].id;
        f->seq[k] = rows[k].seq;
        snprintf(f->device[k], sizeof f->device[k], "%s", rows[k].device);
        snprintf(f->topic[k], sizeof f->topic[k], "%s", rows[k].topic);
        f->len[k] = rows[k].len;
        memcpy(f->payload[k], rows[k].payload, rows[k].len < 128 ? rows[k].len : 128);
    }
}

static fetched_t *fetch_sync(smp_store_t *st, int64_t after, size_t max)
{
    fetched_t *f = calloc(1, sizeof *f);
    assert_non_null(f);
    smp_store_outbox_fetch(st, after, max, on_fetched, f);
    WAIT_FOR(f->done);
    assert_int_equal(f->status, 0);
    return f;
}

typedef struct hist {
    bool done;
    int status;
    size_t n;
    int64_t ts[REC_MAX];
    char value[REC_MAX][32];
} hist_t;

static void on_history(void *arg, int status, const smp_history_row_t *rows, size_t n)
{
    hist_t *h = arg;
    h->done = true;
    h->status = status;
    h->n = n;
    for (size_t k = 0; k < n && k < REC_MAX; k++) {
        h->ts[k] = rows[k].ts_ms;
        snprintf(h->value[k], sizeof h->value[k], "%s", rows[k].value_json);
    }
}

static void history_sync(smp_store_t *st, const char *dev, const char *tag, int64_t from,
                         int64_t to, size_t limit, hist_t *h)
{
    memset(h, 0, sizeof *h);
    smp_store_history(st, dev, tag, from, to, limit, on_history, h);
    WAIT_FOR(h->done);
    assert_int_equal(h->status, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Tests */

static void test_bad_args_and_close_null(void **state)
{
    (void)state;
    smp_store_t *st = (smp_store_t *)0x1;
    smp_store_opts_t o = {.path = NULL};
    assert_int_equal(smp_store_open(&g_loop, &o, &st), -EINVAL);
    assert_null(st);
    assert_int_equal(smp_store_open(&g_loop, NULL, &st), -EINVAL);
    smp_store_close(NULL);
}

struct last_seen {
    size_t n;
    char dev[8][32], tag[8][32], val[8][32];
    int64_t ts[8];
};

static void on_last(void *arg, const char *device, const char *tag, const char *value_json,
                    int64_t ts_ms)
{
    struct last_seen *l = arg;
    if (l->n < 8) {
        snprintf(l->dev[l->n], 32, "%s", device);
        snprintf(l->tag[l->n], 32, "%s", tag);
        snprintf(l->val[l->n], 32, "%s", value_json);
        l->ts[l->n] = ts_ms;
    }
    l->n++;
}

static void test_last_value_roundtrip(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    int64_t now = wall_ms();
    smp_store_put_value(st, "pump-01", "speed_rpm", "1450", now - 2000);
    smp_store_put_value(st, "pump-01", "running", "true", now - 1500);
    smp_store_put_value(st, "pump-01", "speed_rpm", "1500", now - 1000); /* newer wins */
    smp_store_put_value(st, "light-07", "name", "\"lamp \\\"7\\\"\"", now);
    smp_store_close(st); /* close applies what is queued */

    st = open_default();
    struct last_seen l = {0};
    assert_int_equal(smp_store_load_last(st, on_last, &l), 0);
    assert_int_equal(l.n, 3);
    /* Ordered by device, then tag. */
    assert_string_equal(l.dev[0], "light-07");
    assert_string_equal(l.tag[0], "name");
    assert_string_equal(l.val[0], "\"lamp \\\"7\\\"\"");
    assert_int_equal(l.ts[0], now);
    assert_string_equal(l.dev[1], "pump-01");
    assert_string_equal(l.tag[1], "running");
    assert_string_equal(l.val[1], "true");
    assert_string_equal(l.tag[2], "speed_rpm");
    assert_string_equal(l.val[2], "1500");
    assert_int_equal(l.ts[2], now - 1000);
    smp_store_close(st);
    /* Every put also appended history. */
    assert_int_equal(count_rows(g_path, "SELECT CAST(total(n) AS INTEGER) FROM history_chunk"), 4);
    assert_int_equal(count_rows(g_path, "PRAGMA user_version"), 2);
}

static void test_seq_persisted(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    adds_t a;
    adds_init(&a);
    assert_int_equal(load_seq_ok(st, "pump-01"), 0);
    smp_store_outbox_add(st, "pump-01", 41, "simpul/gw/pump-01/data", "{}", 2, on_added, &a);
    smp_store_outbox_add(st, "pump-01", 42, "simpul/gw/pump-01/data", "{}", 2, on_added, &a);
    smp_store_outbox_add(st, "light-07", UINT64_MAX, "simpul/gw/light-07/data", "{}", 2, on_added,
                         &a);
    WAIT_FOR(a.n == 3);
    assert_int_equal(a.errors, 0);
    smp_store_close(st);

    st = open_default();
    assert_int_equal(load_seq_ok(st, "pump-01"), 42);
    assert_true(load_seq_ok(st, "light-07") == UINT64_MAX);
    assert_int_equal(load_seq_ok(st, "nobody"), 0);
    smp_store_close(st);
}

static void test_outbox_add_fetch_ack_reopen(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    adds_t a;
    adds_init(&a);
    const unsigned char bin[] = {0x00, 0x01, 0xff, 0x00, 0x7f};
    char topic[64];
    for (int k = 0; k < 5; k++) {
        snprintf(topic, sizeof topic, "p/g/pump-01/data/%d", k);
        if (k == 3) {
            smp_store_outbox_add(st, "pump-01", 100 + k, topic, bin, sizeof bin, on_added, &a);
        } else if (k == 4) {
            smp_store_outbox_add(st, "pump-01", 100 + k, topic, NULL, 0, on_added, &a);
        } else {
            char msg[16];
            int len = snprintf(msg, sizeof msg, "msg-%d", k);
            smp_store_outbox_add(st, "pump-01", 100 + k, topic, msg, (size_t)len, on_added, &a);
        }
    }
    WAIT_FOR(a.n == 5);
    assert_int_equal(a.errors, 0);
    assert_false(a.off_loop);
    assert_true(a.increasing);
    int64_t *id = a.ids;

    fetched_t *f = fetch_sync(st, 0, 10);
    assert_int_equal(f->n, 5);
    for (size_t k = 0; k < 5; k++) {
        assert_int_equal(f->id[k], id[k]);
        assert_int_equal(f->seq[k], 100 + k);
        assert_string_equal(f->device[k], "pump-01");
        snprintf(topic, sizeof topic, "p/g/pump-01/data/%zu", k);
        assert_string_equal(f->topic[k], topic);
    }
    assert_int_equal(f->len[0], 5);
    assert_memory_equal(f->payload[0], "msg-0", 5);
    assert_int_equal(f->len[3], sizeof bin);
    assert_memory_equal(f->payload[3], bin, sizeof bin);
    assert_int_equal(f->len[4], 0);
    free(f);

    /* A window after an id. */
    f = fetch_sync(st, id[1], 2);
    assert_int_equal(f->n, 2);
    assert_int_equal(f->id[0], id[2]);
    assert_int_equal(f->id[1], id[3]);
    free(f);

    smp_store_outbox_ack(st, id[0]);
    smp_store_outbox_ack(st, id[2]);
    smp_store_outbox_ack(st, id[4]); /* the newest: its id must not come back */
    f = fetch_sync(st, 0, 10);
    assert_int_equal(f->n, 2);
    assert_int_equal(f->id[0], id[1]);
    assert_int_equal(f->id[1], id[3]);
    free(f);
    smp_store_stats_t s;
    smp_store_stats(st, &s);
    assert_int_equal(s.outbox_rows, 2);
    assert_int_equal(s.outbox_bytes, 5 + sizeof bin);
    assert_int_equal(s.outbox_dropped, 0);
    assert_true(s.commits > 0);
    smp_store_close(st);

    st = open_default();
    smp_store_stats(st, &s);
    assert_int_equal(s.outbox_rows, 2); /* totals reloaded at open */
    assert_int_equal(s.outbox_bytes, 5 + sizeof bin);
    f = fetch_sync(st, 0, 10);
    assert_int_equal(f->n, 2);
    assert_int_equal(f->id[0], id[1]);
    assert_int_equal(f->id[1], id[3]);
    assert_memory_equal(f->payload[1], bin, sizeof bin);
    free(f);
    adds_t b;
    adds_init(&b);
    smp_store_outbox_add(st, "pump-01", 200, "t", "x", 1, on_added, &b);
    WAIT_FOR(b.n == 1);
    assert_int_equal(b.errors, 0);
    assert_true(b.ids[0] > id[4]); /* never reused, even after deleting the newest */
    smp_store_close(st);
}

/* The ack queued in an add's callback comes after the add; a fetch queued after it no longer
 * sees the row. */
struct ack_in_cb {
    smp_store_t *st;
    int64_t id;
    fetched_t f;
};

static void on_added_ack(void *arg, int status, int64_t id)
{
    struct ack_in_cb *c = arg;
    assert_int_equal(status, 0);
    c->id = id;
    smp_store_outbox_ack(c->st, id);
    smp_store_outbox_fetch(c->st, 0, 10, on_fetched, &c->f);
}

static void test_ack_from_callback(void **state)
{
    (void)state;
    struct ack_in_cb c = {0};
    c.st = open_default();
    smp_store_outbox_add(c.st, "d", 1, "t", "keep?", 5, on_added_ack, &c);
    WAIT_FOR(c.f.done);
    assert_int_equal(c.f.status, 0);
    assert_true(c.id > 0);
    assert_int_equal(c.f.n, 0);
    smp_store_close(c.st);
}

static void test_outbox_bound(void **state)
{
    (void)state;
    logcap_t lc;
    logcap_start(&lc);
    smp_store_t *st = open_at(g_path, 168, 1000);
    adds_t a;
    adds_init(&a);
    char payload[100];
    for (int k = 0; k < 25; k++) {
        memset(payload, 'a' + k, sizeof payload);
        smp_store_outbox_add(st, "pump-01", (uint64_t)k + 1, "t", payload, sizeof payload, on_added,
                             &a);
    }
    WAIT_FOR(a.n == 25);
    assert_int_equal(a.errors, 0);
    smp_store_stats_t s;
    smp_store_stats(st, &s);
    assert_int_equal(s.outbox_rows, 10);
    assert_int_equal(s.outbox_bytes, 1000);
    assert_int_equal(s.outbox_dropped, 15);
    fetched_t *f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 10);
    for (size_t k = 0; k < 10; k++) {
        assert_int_equal(f->seq[k], 16 + k); /* the newest ten are kept */
        assert_int_equal(f->payload[k][0], 'a' + 15 + (int)k);
    }
    /* The broker is back: acknowledging brings the outbox below its limit. */
    for (size_t k = 0; k < 10; k++) {
        smp_store_outbox_ack(st, f->id[k]);
    }
    free(f);
    f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 0);
    free(f);
    smp_store_stats(st, &s);
    assert_int_equal(s.outbox_rows, 0);
    assert_int_equal(s.outbox_bytes, 0);
    smp_store_close(st);
    char *log = logcap_stop(&lc);
    assert_int_equal(count_substr(log, "outbox full, dropping oldest"), 1);
    assert_int_equal(count_substr(log, "outbox below limit again, 15 dropped"), 1);
    free(log);
}

static void test_outbox_limit_lowered_at_open(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    adds_t a;
    adds_init(&a);
    for (int k = 0; k < 10; k++) {
        smp_store_outbox_add(st, "d", (uint64_t)k, "t", "0123456789", 10, on_added, &a);
    }
    WAIT_FOR(a.n == 10);
    smp_store_close(st);
    st = open_at(g_path, 168, 35);
    smp_store_stats_t s;
    smp_store_stats(st, &s);
    assert_int_equal(s.outbox_rows, 3);
    assert_int_equal(s.outbox_bytes, 30);
    assert_int_equal(s.outbox_dropped, 7);
    fetched_t *f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 3);
    assert_int_equal(f->seq[0], 7);
    free(f);
    smp_store_close(st);
}

static void test_history_window(void **state)
{
    (void)state;
    smp_store_t *st = open_at(g_path, 0, 0); /* retention 0: keep (these are 1970 stamps) */
    char v[16];
    for (int k = 1; k <= 10; k++) {
        snprintf(v, sizeof v, "%d", k);
        smp_store_put_value(st, "pump-01", "flow", v, k * 1000);
        smp_store_put_value(st, "pump-01", "other", "0", k * 1000);
        smp_store_put_value(st, "pump-02", "flow", "0", k * 1000);
    }
    hist_t h;
    history_sync(st, "pump-01", "flow", 3000, 7000, 100, &h);
    assert_int_equal(h.n, 4); /* from inclusive, to exclusive */
    for (size_t k = 0; k < 4; k++) {
        assert_int_equal(h.ts[k], 3000 + 1000 * (int64_t)k);
        snprintf(v, sizeof v, "%zu", k + 3);
        assert_string_equal(h.value[k], v);
    }
    history_sync(st, "pump-01", "flow", 3000, 7000, 2, &h);
    assert_int_equal(h.n, 2); /* limit keeps the oldest */
    assert_int_equal(h.ts[0], 3000);
    assert_int_equal(h.ts[1], 4000);
    history_sync(st, "pump-01", "flow", 3000, 3001, 100, &h);
    assert_int_equal(h.n, 1);
    history_sync(st, "pump-01", "flow", 3001, 4000, 100, &h);
    assert_int_equal(h.n, 0);
    history_sync(st, "pump-01", "flow", INT64_MIN, INT64_MAX, 100, &h);
    assert_int_equal(h.n, 10);
    history_sync(st, "pump-01", "nope", INT64_MIN, INT64_MAX, 100, &h);
    assert_int_equal(h.n, 0);
    smp_store_close(st);
}

static void test_retention_prune(void **state)
{
    (void)state;
    prune_interval_ms = 0; /* prune after every batch */
    smp_store_t *st = open_at(g_path, 1, 0);
    int64_t now = wall_ms();
    /* More old rows than one prune chunk, so pruning must continue over several steps. */
    for (int k = 0; k < 2500; k++) {
        smp_store_put_value(st, "pump-01", "flow", "1", now - 2 * 3600000 + k);
    }
    for (int k = 0; k < 10; k++) {
        smp_store_put_value(st, "pump-01", "flow", "2", now - 59 * 60000 + k);
    }
    hist_t h;
    deadline_t dl;
    deadline_start(&dl, &g_loop, DEADLINE_MS);
    do {
        history_sync(st, "pump-01", "flow", INT64_MIN, INT64_MAX, 100, &h);
    } while (h.n != 10 && !dl.fired);
    deadline_stop(&dl, &g_loop);
    assert_int_equal(h.n, 10);
    for (size_t k = 0; k < 10; k++) {
        assert_string_equal(h.value[k], "2"); /* only old rows went */
    }
    smp_store_close(st);
    assert_int_equal(count_rows(g_path, "SELECT CAST(total(n) AS INTEGER) FROM history_chunk"), 10);
    /* The last value is not history: it stays. */
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM last_value"), 1);
}

static void test_corrupt_garbage(void **state)
{
    (void)state;
    char garbage[5000];
    for (size_t k = 0; k < sizeof garbage; k++) {
        garbage[k] = (char)(k * 7 + 3);
    }
    assert_int_equal(write_file(g_path, garbage, sizeof garbage), 0);
    char wal[600];
    snprintf(wal, sizeof wal, "%s-wal", g_path);
    assert_int_equal(write_file(wal, "not a wal", 9), 0);

    logcap_t lc;
    logcap_start(&lc);
    smp_store_t *st = open_default();
    char *log = logcap_stop(&lc);
    assert_non_null(strstr(log, "moving it aside"));
    free(log);

    char moved[600], moved_wal[700];
    assert_true(find_corrupt(g_dir, "simpul.db", moved, sizeof moved));
    size_t len = 0;
    char *content = read_file(moved, &len);
    assert_int_equal(len, sizeof garbage); /* the original, untouched */
    assert_memory_equal(content, garbage, sizeof garbage);
    free(content);
    snprintf(moved_wal, sizeof moved_wal, "%s-wal", moved);
    content = read_file(moved_wal, &len); /* its WAL went with it, unchanged */
    assert_non_null(content);
    assert_int_equal(len, 9);
    assert_memory_equal(content, "not a wal", 9);
    free(content);

    adds_t a;
    adds_init(&a);
    smp_store_outbox_add(st, "d", 1, "t", "x", 1, on_added, &a);
    WAIT_FOR(a.n == 1);
    assert_int_equal(a.errors, 0);
    smp_store_close(st);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 1);
}

static void test_corrupt_truncated(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    char big[300];
    memset(big, 'z', sizeof big);
    for (int k = 0; k < 200; k++) {
        smp_store_outbox_add(st, "d", (uint64_t)k, "t", big, sizeof big, NULL, NULL);
        smp_store_put_value(st, "d", "x", "1", wall_ms());
    }
    smp_store_close(st);
    size_t len = 0;
    char *db = read_file(g_path, &len);
    assert_non_null(db);
    assert_true(len > 8192);
    assert_int_equal(write_file(g_path, db, 1000), 0);
    free(db);

    logcap_t lc;
    logcap_start(&lc);
    st = open_default();
    char *log = logcap_stop(&lc);
    assert_non_null(strstr(log, "moving it aside"));
    free(log);
    char moved[600];
    assert_true(find_corrupt(g_dir, "simpul.db", moved, sizeof moved));
    fetched_t *f = fetch_sync(st, 0, 10);
    assert_int_equal(f->n, 0); /* a new, empty database */
    free(f);
    smp_store_put_value(st, "d", "x", "2", wall_ms());
    smp_store_close(st);
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM last_value"), 1);
}

static void test_parent_dir_created(void **state)
{
    (void)state;
    char path[600];
    snprintf(path, sizeof path, "%s/a/b/simpul.db", g_dir);
    smp_store_t *st = open_at(path, 168, 0);
    smp_store_put_value(st, "d", "t", "1", 1);
    smp_store_close(st);
    assert_int_equal(count_rows(path, "SELECT count(*) FROM last_value"), 1);
}

/* A path whose directory can never exist (a regular file is in the way): nothing can be moved
 * or created, so the store runs in memory. Works even as root. */
static void test_unusable_path_falls_back_to_memory(void **state)
{
    (void)state;
    char blocker[600], path[700];
    snprintf(blocker, sizeof blocker, "%s/blocker", g_dir);
    assert_int_equal(write_file(blocker, "x", 1), 0);
    snprintf(path, sizeof path, "%s/simpul.db", blocker);

    logcap_t lc;
    logcap_start(&lc);
    smp_store_t *st = open_at(path, 168, 0);
    char *log = logcap_stop(&lc);
    assert_non_null(strstr(log, "IN-MEMORY"));
    free(log);
    assert_true(st->in_memory);

    adds_t a;
    adds_init(&a);
    smp_store_outbox_add(st, "d", 5, "t", "x", 1, on_added, &a);
    WAIT_FOR(a.n == 1);
    assert_int_equal(a.errors, 0);
    fetched_t *f = fetch_sync(st, 0, 10);
    assert_int_equal(f->n, 1);
    free(f);
    /* An in-memory store keeps nothing across restarts: seq continues from the clock floor. */
    assert_true(load_seq_ok(st, "d") >= (uint64_t)(wall_ms() - 60000) * 1000u);
    smp_store_close(st);
    assert_false(file_exists(path));
}

/* --- read-only file / directory, as an unprivileged user (root ignores permissions) --- */

enum ro_case { RO_FILE, RO_DIR };

/* Child side: returns 0 on success or a small number naming the failed check. */
static int ro_child(enum ro_case which, const char *dir, const char *path, off_t orig_size)
{
    uv_loop_t loop;
    if (uv_loop_init(&loop) != 0) {
        return 10;
    }
    smp_store_opts_t o = {.path = path, .history_retention_h = 1, .outbox_max_bytes = 0};
    smp_store_t *st = NULL;
    if (smp_store_open(&loop, &o, &st) != 0 || st == NULL) {
        return 11;
    }
    char moved[600];
    bool was_moved = find_corrupt(dir, "simpul.db", moved, sizeof moved);
    if (which == RO_FILE && (!was_moved || st->in_memory)) {
        return 12; /* writable directory: moved aside, new file */
    }
    if (which == RO_DIR && (was_moved || !st->in_memory)) {
        return 13; /* nothing can change on disk: memory */
    }
    adds_t a;
    adds_init(&a);
    smp_store_outbox_add(st, "d", 9, "t", "x", 1, on_added, &a);
    WAIT_LOOP(&loop, a.n == 1);
    if (a.n != 1 || a.errors != 0) {
        return 14;
    }
    smp_store_close(st);
    if (uv_loop_close(&loop) != 0) {
        return 15;
    }
    struct stat sb;
    if (which == RO_DIR && (stat(path, &sb) != 0 || sb.st_size != orig_size)) {
        return 16; /* the original file is untouched */
    }
    return 0;
}

static void run_ro_case(enum ro_case which)
{
    /* A real database with data in it. */
    char dir[600], path[700];
    snprintf(dir, sizeof dir, "%s/ro", g_dir);
    assert_int_equal(mkdir(dir, 0755), 0);
    snprintf(path, sizeof path, "%s/simpul.db", dir);
    smp_store_t *st = open_at(path, 1, 0);
    smp_store_put_value(st, "d", "t", "1", wall_ms());
    smp_store_close(st);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(chmod(path, 0444), 0);
    bool root = geteuid() == 0;
    if (which == RO_FILE && root) {
        assert_int_equal(chown(dir, 65534, 65534), 0); /* the child may write the directory */
    }
    if (which == RO_DIR && !root) {
        assert_int_equal(chmod(dir, 0555), 0);
    }

    logcap_t lc;
    logcap_start(&lc);
    fflush(stdout);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        if (root && (setgroups(0, NULL) != 0 || setgid(65534) != 0 || setuid(65534) != 0)) {
            _exit(77);
        }
        exit(ro_child(which, dir, path, sb.st_size)); /* exit, not _exit: LSan checks the child */
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    char *log = logcap_stop(&lc);
    chmod(dir, 0755);
    assert_true(WIFEXITED(status));
    if (WEXITSTATUS(status) == 77) {
        free(log);
        skip();
    }
    assert_int_equal(WEXITSTATUS(status), 0);
    assert_non_null(strstr(log, "read-only"));
    if (which == RO_DIR) {
        assert_non_null(strstr(log, "IN-MEMORY"));
    } else {
        assert_non_null(strstr(log, "started a new, empty database"));
    }
    free(log);
}

static void test_readonly_file(void **state)
{
    (void)state;
    run_ro_case(RO_FILE);
}

static void test_readonly_dir(void **state)
{
    (void)state;
    run_ro_case(RO_DIR);
}

/* --- ordering, threads, errors, volume --- */

struct order_rec {
    int next; /* expected tag of the next callback */
    int seen;
    bool in_order;
    bool off_loop;
};

struct order_cb {
    struct order_rec *r;
    int tag;
};

static void order_note(struct order_cb *c)
{
    if (!on_loop_thread()) {
        c->r->off_loop = true;
    }
    if (c->tag != c->r->next) {
        c->r->in_order = false;
    }
    c->r->next = c->tag + 1;
    c->r->seen++;
}

static void order_added(void *arg, int status, int64_t id)
{
    (void)id;
    assert_int_equal(status, 0);
    order_note(arg);
}

static void order_fetched(void *arg, int status, const smp_outbox_row_t *rows, size_t n)
{
    (void)rows;
    (void)n;
    assert_int_equal(status, 0);
    order_note(arg);
}

static void order_history(void *arg, int status, const smp_history_row_t *rows, size_t n)
{
    (void)rows;
    (void)n;
    assert_int_equal(status, 0);
    order_note(arg);
}

static void test_callbacks_loop_thread_in_order(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    struct order_rec r = {.in_order = true};
    enum { N = 300 };
    static struct order_cb cbs[N];
    for (int k = 0; k < N; k++) {
        cbs[k] = (struct order_cb){.r = &r, .tag = k};
        switch (k % 3) {
        case 0:
            smp_store_outbox_add(st, "d", (uint64_t)k, "t", "x", 1, order_added, &cbs[k]);
            smp_store_put_value(st, "d", "v", "1", k);
            break;
        case 1:
            smp_store_outbox_fetch(st, 0, 5, order_fetched, &cbs[k]);
            break;
        default:
            smp_store_history(st, "d", "v", 0, 1000, 5, order_history, &cbs[k]);
            break;
        }
    }
    WAIT_FOR(r.seen == N);
    assert_true(r.in_order);
    assert_false(r.off_loop);
    smp_store_close(st);
}

static void test_close_drains_queue(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    adds_t a;
    adds_init(&a);
    for (int k = 0; k < 3; k++) {
        smp_store_outbox_add(st, "d", (uint64_t)k, "t", "x", 1, on_added, &a);
    }
    smp_store_close(st); /* without running the loop first */
    assert_int_equal(a.n, 3);
    assert_int_equal(a.errors, 0);
    assert_true(a.increasing);
    assert_false(a.off_loop);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 3);
}

/* A full disk, simulated with max_page_count: callbacks get -ENOSPC, the error is logged once,
 * the writer keeps going and recovers when there is room again. */
static void test_disk_full_then_recovers(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    uv_mutex_lock(&st->db_mu);
    assert_int_equal(exec_sql(st, "PRAGMA max_page_count = 30"), SQLITE_OK);
    uv_mutex_unlock(&st->db_mu);

    logcap_t lc;
    logcap_start(&lc);
    adds_t a;
    adds_init(&a);
    char big[4000];
    memset(big, 'q', sizeof big);
    int rounds = 0;
    /* Add (one batch at a time) until the database is full, then some more. */
    while (a.errors < 5 && rounds < 200) {
        size_t before = a.n;
        smp_store_outbox_add(st, "d", (uint64_t)rounds, "t", big, sizeof big, on_added, &a);
        WAIT_FOR(a.n == before + 1);
        rounds++;
    }
    assert_int_equal(a.errors, 5);
    assert_int_equal(a.last_status, -ENOSPC);
    assert_true(a.increasing); /* failed adds reported id 0 */
    smp_store_stats_t s;
    smp_store_stats(st, &s);
    assert_true(s.errors >= 5);
    assert_int_equal(s.outbox_rows, a.n - a.errors);

    uv_mutex_lock(&st->db_mu);
    assert_int_equal(exec_sql(st, "PRAGMA max_page_count = 1000000"), SQLITE_OK);
    uv_mutex_unlock(&st->db_mu);
    size_t errors = a.errors;
    smp_store_outbox_add(st, "d", 999, "t", big, sizeof big, on_added, &a);
    WAIT_FOR(a.n == (size_t)rounds + 1);
    assert_int_equal(a.errors, errors);
    char *log = logcap_stop(&lc);
    assert_int_equal(count_substr(log, "database or disk is full"), 1);
    assert_int_equal(count_substr(log, "succeed again"), 1);
    free(log);
    smp_store_close(st);
}

struct burst {
    adds_t a;
    bool done;
};

static void burst_done(void *arg, int status, const smp_history_row_t *rows, size_t n)
{
    (void)rows;
    (void)n;
    assert_int_equal(status, 0);
    ((struct burst *)arg)->done = true;
}

static void test_burst_100k(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    struct burst b = {0};
    adds_init(&b.a);
    enum { N = 50000 };
    char tag[16], topic[32];
    int64_t now = wall_ms();
    for (int k = 0; k < N; k++) {
        snprintf(tag, sizeof tag, "tag%d", k % 100);
        smp_store_put_value(st, "pump-01", tag, "12.5", now + k);
        snprintf(topic, sizeof topic, "p/g/pump-%02d/data", k % 10);
        smp_store_outbox_add(st, "pump-01", (uint64_t)k, topic, "{\"v\":1}", 7, on_added, &b.a);
    }
    smp_store_history(st, "pump-01", "tag0", 0, INT64_MAX, 1, burst_done, &b);
    WAIT_FOR(b.done);
    assert_int_equal(b.a.n, N);
    assert_int_equal(b.a.errors, 0);
    assert_true(b.a.increasing);
    assert_false(b.a.off_loop);
    smp_store_stats_t s;
    smp_store_stats(st, &s);
    assert_int_equal(s.outbox_rows, N);
    assert_int_equal(s.outbox_bytes, 7 * N);
    /* Batched: far fewer transactions than operations. */
    print_message("100k ops in %" PRIu64 " commits\n", s.commits);
    assert_true(s.commits <= 2 * N / 10);
    assert_int_equal(load_seq_ok(st, "pump-01"), N - 1);
    smp_store_close(st);
    assert_int_equal(count_rows(g_path, "SELECT CAST(total(n) AS INTEGER) FROM history_chunk"), N);
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM last_value"), 100);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), N);
}

struct cmds_seen {
    size_t n;
    char dev[8][32], id[8][32], res[8][64];
    bool null_res[8];
    int64_t ts[8];
};

static void on_cmd(void *arg, const char *device, const char *id, const char *result_json,
                   int64_t ts_ms)
{
    struct cmds_seen *c = arg;
    if (c->n < 8) {
        snprintf(c->dev[c->n], 32, "%s", device);
        snprintf(c->id[c->n], 32, "%s", id);
        c->null_res[c->n] = result_json == NULL;
        snprintf(c->res[c->n], 64, "%s", result_json ? result_json : "");
        c->ts[c->n] = ts_ms;
    }
    c->n++;
}

static void test_cmd_results_and_audit(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    adds_t a;
    adds_init(&a);
    int64_t now = wall_ms();
    const char *res = "{\"id\":\"c-1\",\"ok\":true}";
    smp_store_cmd_put(st, "pump-01", "c-1", NULL, now - 1000, on_added, &a); /* accepted */
    smp_store_cmd_put(st, "pump-01", "c-1", res, now - 1000, on_added, &a);  /* finished */
    smp_store_cmd_put(st, "pump-01", "c-2", NULL, now - 500, on_added, &a);  /* still running */
    smp_store_cmd_put(st, "light-07", "c-1", "{}", now - 2 * 3600000, on_added, &a);
    smp_store_cmd_put(st, NULL, "c-3", NULL, now, on_added, &a); /* no device: refused */
    WAIT_FOR(a.n == 5);
    assert_int_equal(a.errors, 1);
    assert_int_equal(a.last_status, -EINVAL);
    assert_false(a.off_loop);

    smp_audit_row_t row = {.received_ms = now - 1000,
                           .id = "c-1",
                           .device = "pump-01",
                           .op = "write",
                           .tag = "speed_rpm",
                           .value_json = "1200",
                           .code = "ok",
                           .message = NULL,
                           .latency_us = 1500};
    smp_store_audit(st, &row);
    smp_audit_row_t bad = {
        .received_ms = now, .device = "pump-01", .code = "bad_request", .message = "missing id"};
    smp_store_audit(st, &bad);
    smp_store_close(st);

    st = open_default();
    struct cmds_seen c = {0};
    assert_int_equal(smp_store_load_cmds(st, now - 600000, on_cmd, &c), 0);
    assert_int_equal(c.n, 2); /* the light-07 one is older than `since` */
    assert_string_equal(c.dev[0], "pump-01");
    assert_string_equal(c.id[0], "c-1");
    assert_false(c.null_res[0]);
    assert_string_equal(c.res[0], res);
    assert_int_equal(c.ts[0], now - 1000);
    assert_string_equal(c.id[1], "c-2");
    assert_true(c.null_res[1]); /* was running when the gateway stopped */
    smp_store_close(st);

    char sql[512];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM audit WHERE received_ms = %" PRId64
             " AND cmd_id = 'c-1' AND device = 'pump-01' AND op = 'write' AND tag = 'speed_rpm'"
             " AND value_json = '1200' AND code = 'ok' AND message IS NULL AND latency_us = 1500",
             now - 1000);
    assert_int_equal(count_rows(g_path, sql), 1);
    assert_int_equal(count_rows(g_path,
                                "SELECT count(*) FROM audit WHERE cmd_id IS NULL AND op IS"
                                " NULL AND code = 'bad_request' AND message = 'missing id'"),
                     1);
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM audit"), 2);
}

static void test_cmd_results_pruned(void **state)
{
    (void)state;
    prune_interval_ms = 0;
    smp_store_t *st = open_default();
    int64_t now = wall_ms();
    smp_store_cmd_put(st, "d", "old", "{}", now - 25 * 3600000LL, NULL, NULL);
    smp_store_cmd_put(st, "d", "new", "{}", now - 2 * 3600000LL, NULL, NULL);
    struct cmds_seen c;
    hist_t h;
    deadline_t dl;
    deadline_start(&dl, &g_loop, DEADLINE_MS);
    do {
        history_sync(st, "d", "t", 0, 1, 1, &h); /* a barrier: the puts are applied */
        memset(&c, 0, sizeof c);
        assert_int_equal(smp_store_load_cmds(st, INT64_MIN, on_cmd, &c), 0);
    } while (c.n != 1 && !dl.fired);
    deadline_stop(&dl, &g_loop);
    assert_int_equal(c.n, 1);
    assert_string_equal(c.id[0], "new");
    smp_store_close(st);
}

/* A schema-1 database keeps its history: the rows become chunks, the old table goes. */
static void test_migrate_history_v1(void **state)
{
    (void)state;
    sqlite3 *db;
    assert_int_equal(sqlite3_open(g_path, &db), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db, schema_v1, NULL, NULL, NULL), SQLITE_OK);
    const char *old =
        "CREATE TABLE history (device TEXT NOT NULL, tag TEXT NOT NULL, ts_ms INTEGER NOT NULL,"
        " value_json TEXT NOT NULL);"
        "CREATE INDEX history_by_tag ON history(device, tag, ts_ms);"
        "CREATE INDEX history_by_ts ON history(ts_ms);"
        "INSERT INTO history VALUES('pump-01', 'flow', 3000, '12.5'), ('pump-01', 'flow', 1000,"
        " '1'), ('pump-01', 'name', 2000, '\"PS-01\"'), ('pump-02', 'flow', 1500, 'true'),"
        " ('pump-01', 'flow', 2000, '2');"
        "PRAGMA user_version = 1;";
    assert_int_equal(sqlite3_exec(db, old, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    smp_store_t *st = open_at(g_path, 0, 0);
    hist_t h;
    history_sync(st, "pump-01", "flow", INT64_MIN, INT64_MAX, 100, &h);
    assert_int_equal(h.n, 3);
    assert_int_equal(h.ts[0], 1000);
    assert_string_equal(h.value[0], "1");
    assert_int_equal(h.ts[1], 2000);
    assert_string_equal(h.value[1], "2");
    assert_int_equal(h.ts[2], 3000);
    assert_string_equal(h.value[2], "12.5");
    history_sync(st, "pump-01", "name", INT64_MIN, INT64_MAX, 100, &h);
    assert_int_equal(h.n, 1);
    assert_string_equal(h.value[0], "\"PS-01\"");
    history_sync(st, "pump-02", "flow", 0, 2000, 100, &h);
    assert_int_equal(h.n, 1);
    assert_string_equal(h.value[0], "true");
    smp_store_close(st);
    assert_int_equal(
        count_rows(g_path, "SELECT count(*) FROM sqlite_schema WHERE name = 'history'"), 0);
    assert_int_equal(count_rows(g_path, "PRAGMA user_version"), 2);
    assert_int_equal(count_rows(g_path, "SELECT CAST(total(n) AS INTEGER) FROM history_chunk"), 5);
}

static void test_schema_tables(void **state)
{
    (void)state;
    smp_store_close(open_default());
    const char *tables[] = {"last_value", "tags",       "history_chunk", "device_seq",
                            "outbox",     "cmd_result", "audit"};
    for (size_t k = 0; k < sizeof tables / sizeof tables[0]; k++) {
        char sql[128];
        snprintf(sql, sizeof sql,
                 "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = '%s'",
                 tables[k]);
        assert_int_equal(count_rows(g_path, sql), 1);
    }
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM pragma_journal_mode "
                                        "WHERE journal_mode = 'wal'"),
                     1);
}

/* ------------------------------------------------------------------------------------------ */
/* Interval commits and the outbox ring */

static char g_run[600];

static void on_poll_tick(uv_timer_t *t)
{
    (void)t;
}

/* WAIT_FOR for conditions outside the loop (rows another connection sees): a 10 ms timer
 * makes each loop iteration return. */
#define WAIT_POLL(expr)                                                                            \
    do {                                                                                           \
        uv_timer_t tick_;                                                                          \
        uv_timer_init(&g_loop, &tick_);                                                            \
        uv_timer_start(&tick_, on_poll_tick, 10, 10);                                              \
        WAIT_LOOP(&g_loop, expr);                                                                  \
        uv_close((uv_handle_t *)&tick_, NULL);                                                     \
        uv_run(&g_loop, UV_RUN_NOWAIT);                                                            \
        assert_true(expr);                                                                         \
    } while (0)

static smp_store_t *open_ring(int interval_ms)
{
    snprintf(g_run, sizeof g_run, "%s/run", g_dir);
    smp_store_opts_t o = {.path = g_path,
                          .history_retention_h = 168,
                          .outbox_max_bytes = 256 * 1024 * 1024,
                          .commit_interval_ms = interval_ms,
                          .runtime_dir = g_run};
    smp_store_t *st = NULL;
    assert_int_equal(smp_store_open(&g_loop, &o, &st), 0);
    assert_non_null(st->ring);
    return st;
}

/* Holds the next interval commit back (due_ms UINT64_MAX) or makes it due now (0), so a test
 * decides which of its steps an interval commit follows. The writer reads next_tick_ms under
 * mu (its wait) and db_mu (the commit); it never holds both. */
static void set_tick(smp_store_t *st, uint64_t due_ms)
{
    uv_mutex_lock(&st->db_mu);
    uv_mutex_lock(&st->mu);
    st->next_tick_ms = due_ms;
    uv_cond_signal(&st->cond);
    uv_mutex_unlock(&st->mu);
    uv_mutex_unlock(&st->db_mu);
}

static void add_n(smp_store_t *st, adds_t *a, const char *dev, uint64_t from, int n)
{
    for (int k = 0; k < n; k++) {
        smp_store_outbox_add(st, dev, from + (uint64_t)k, "t", "{\"v\":1}", 7, on_added, a);
    }
}

static void test_ring_acked_never_written(void **state)
{
    (void)state;
    smp_store_t *st = open_ring(300);
    assert_int_equal(load_seq_ok(st, "d"), 0);
    /* No interval commit between the adds and their acks (on a loaded machine one could fall
     * there and rightly write the 50 messages, then unacked). */
    set_tick(st, UINT64_MAX);
    adds_t a;
    adds_init(&a);
    add_n(st, &a, "d", 1, 50);
    WAIT_FOR(a.n == 50);
    assert_int_equal(a.errors, 0);
    assert_true(a.increasing);
    smp_store_outbox_ack_many(st, a.ids, 50);
    set_tick(st, 0);
    /* The interval commit recorded the seq, and nothing else. */
    WAIT_POLL(count_rows(g_path, "SELECT seq FROM device_seq WHERE device = 'd'") == 50);
    smp_store_stats_t ss;
    smp_store_stats(st, &ss);
    assert_int_equal(ss.outbox_written, 0);
    assert_int_equal(ss.ring_messages, 50);
    smp_store_close(st);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 0);
    assert_int_equal(count_rows(g_path, "SELECT seq FROM device_seq WHERE device = 'd'"), 50);
    /* A clean stop leaves no reservation beyond what was used, and no ring. */
    assert_int_equal(count_rows(g_path, "SELECT upto FROM seq_reserve WHERE device = 'd'"), 50);
    DIR *d = opendir(g_run);
    assert_non_null(d);
    struct dirent *e;
    int files = 0;
    while ((e = readdir(d)) != NULL) {
        files += e->d_name[0] != '.';
    }
    closedir(d);
    assert_int_equal(files, 0);
}

static void test_ring_unacked_reach_db_on_interval(void **state)
{
    (void)state;
    smp_store_t *st = open_ring(200);
    load_seq_ok(st, "d");
    adds_t a;
    adds_init(&a);
    add_n(st, &a, "d", 1, 20);
    WAIT_FOR(a.n == 20);
    /* Seen by another connection, before any close: the interval commit wrote them. */
    WAIT_POLL(count_rows(g_path, OUTBOX_MSGS) == 20);
    fetched_t *f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 20);
    assert_int_equal(f->seq[0], 1);
    assert_int_equal(f->seq[19], 20);
    free(f);
    /* A fetch merges the ring: new messages appear at once, after the database's rows. */
    add_n(st, &a, "d", 21, 5);
    WAIT_FOR(a.n == 25);
    f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 25);
    for (size_t k = 1; k < f->n; k++) {
        assert_true(f->id[k] > f->id[k - 1]);
    }
    free(f);
    smp_store_outbox_ack_many(st, a.ids, 25);
    smp_store_close(st);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 0);
}

/* An outage backlog: the interval commit packs the unacknowledged messages (obpack.h); a
 * fetch reads them back in order from any cursor; a clean stop remembers which were acked; the
 * pack's row goes with its last ack. */
static void test_outage_backlog_packed(void **state)
{
    (void)state;
    smp_store_t *st = open_ring(100);
    load_seq_ok(st, "d");
    adds_t a;
    adds_init(&a);
    add_n(st, &a, "d", 1, 60);
    WAIT_FOR(a.n == 60);
    WAIT_POLL(count_rows(g_path, OUTBOX_MSGS) == 60);
    assert_true(count_rows(g_path, "SELECT count(*) FROM outbox_pack") >= 1);
    assert_true(count_rows(g_path, "SELECT count(*) FROM outbox") < 16);
    fetched_t *f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 60);
    for (size_t k = 0; k < f->n; k++) {
        assert_int_equal(f->seq[k], k + 1);
        assert_string_equal(f->device[k], "d");
        assert_int_equal(f->len[k], 7);
        assert_memory_equal(f->payload[k], "{\"v\":1}", 7);
        assert_true(k == 0 || f->id[k] > f->id[k - 1]);
    }
    int64_t cursor = f->id[29];
    free(f);
    f = fetch_sync(st, cursor, 10);
    assert_int_equal(f->n, 10);
    assert_int_equal(f->seq[0], 31);
    assert_int_equal(f->seq[9], 40);
    free(f);
    smp_store_outbox_ack_many(st, a.ids, 30);
    smp_store_close(st);
    /* Reopened: only the 30 unacknowledged ones are waiting. */
    st = open_ring(100);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 30);
    smp_store_stats_t ss;
    smp_store_stats(st, &ss);
    assert_int_equal(ss.outbox_rows, 30);
    f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 30);
    assert_int_equal(f->seq[0], 31);
    assert_int_equal(f->seq[29], 60);
    free(f);
    smp_store_outbox_ack_many(st, a.ids + 30, 30);
    WAIT_POLL(count_rows(g_path, "SELECT count(*) FROM outbox_pack") == 0);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 0);
    smp_store_close(st);
}

/* A message too big for a pack (over half of SMP_OBPACK_MAX_RAW) takes a row of its own
 * between the packs of its interval, and comes back whole and in order. */
static void test_outage_big_message_beside_packs(void **state)
{
    (void)state;
    smp_store_t *st = open_ring(100);
    load_seq_ok(st, "d");
    adds_t a;
    adds_init(&a);
    size_t big_len = 2 * (size_t)SMP_OBPACK_MAX_RAW; /* a pack of it would not decode */
    char *big = malloc(big_len);
    assert_non_null(big);
    memset(big, 'x', big_len);
    add_n(st, &a, "d", 1, 20);
    smp_store_outbox_add(st, "d", 21, "t", big, big_len, on_added, &a);
    add_n(st, &a, "d", 22, 20);
    WAIT_FOR(a.n == 41);
    free(big);
    WAIT_POLL(count_rows(g_path, OUTBOX_MSGS) == 41);
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM outbox WHERE seq = 21"), 1);
    fetched_t *f = fetch_sync(st, 0, 100);
    assert_int_equal(f->n, 41);
    for (size_t k = 0; k < f->n; k++) {
        assert_int_equal(f->seq[k], k + 1);
        assert_int_equal(f->len[k], k == 20 ? big_len : 7);
    }
    free(f);
    smp_store_outbox_ack_many(st, a.ids, 41);
    WAIT_POLL(count_rows(g_path, OUTBOX_MSGS) == 0);
    smp_store_close(st);
}

/* In a forked child: the store in ring mode and device d's seq (exits 2 when it cannot). */
static smp_store_t *child_open(uv_loop_t *loop, int interval_ms, uint64_t *seq)
{
    uv_loop_init(loop);
    smp_store_opts_t o = {.path = g_path,
                          .history_retention_h = 168,
                          .commit_interval_ms = interval_ms,
                          .runtime_dir = g_run};
    smp_store_t *st = NULL;
    if (smp_store_open(loop, &o, &st) != 0) {
        _exit(2);
    }
    smp_store_load_seq(st, "d", seq);
    return st;
}

/* The child stages messages and dies without closing the store, as kill -9 would. */
static void crash_child(int interval_ms, int n, bool wait_commit)
{
    snprintf(g_run, sizeof g_run, "%s/run", g_dir);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uv_loop_t loop;
        uint64_t seq = 0;
        smp_store_t *st = child_open(&loop, interval_ms, &seq);
        adds_t a;
        adds_init(&a);
        for (int k = 0; k < n; k++) {
            smp_store_outbox_add(st, "d", seq + 1 + (uint64_t)k, "t", "x", 1, on_added, &a);
        }
        while (a.n < (size_t)n) {
            uv_run(&loop, UV_RUN_ONCE);
        }
        smp_store_outbox_ack(st, a.ids[0]); /* the first one was delivered */
        /* Until exactly the unacked ones are committed: an interval commit may land between
         * the adds and the ack, and the row of the acked one then goes at the next commit. */
        for (int tries = 0; wait_commit && count_rows(g_path, OUTBOX_MSGS) != n - 1; tries++) {
            if (tries > 1000) {
                _exit(3); /* 10 s: the parent's assertion names the failure */
            }
            usleep(10000);
        }
        _exit(0);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

static void test_ring_recovered_after_crash(void **state)
{
    (void)state;
    crash_child(60000, 10, false);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 0);
    smp_store_t *st = open_ring(60000);
    /* Nine unacknowledged messages came back with their seq; seq goes on without a gap. */
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 9);
    assert_int_equal(count_rows(g_path, "SELECT min(seq) FROM outbox"), 2);
    assert_int_equal(load_seq_ok(st, "d"), 10);
    smp_store_stats_t ss;
    smp_store_stats(st, &ss);
    assert_int_equal(ss.powercut_lost, 0);
    smp_store_close(st);
}

/* A device publishing one message per interval, each acked at once, then a kill -9: the ring
 * regions were reset many times and the database's device_seq lags (it is written only when
 * the reservation moves), yet the seq slot in the ring gives the exact seq back. */
static void test_seq_slot_resumes_exactly_after_crash(void **state)
{
    (void)state;
    enum { N = 40 };
    snprintf(g_run, sizeof g_run, "%s/run", g_dir);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uv_loop_t loop;
        uint64_t seq = 0;
        smp_store_t *st = child_open(&loop, 20, &seq);
        adds_t a;
        adds_init(&a);
        for (int k = 0; k < N; k++) {
            smp_store_outbox_add(st, "d", seq + 1 + (uint64_t)k, "t", "x", 1, on_added, &a);
            while (a.n < (size_t)k + 1) {
                uv_run(&loop, UV_RUN_ONCE);
            }
            smp_store_outbox_ack(st, a.ids[k]);
            usleep(25000); /* about one interval: each message lands in a region of its own */
        }
        _exit(a.errors == 0 ? 0 : 3);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    int64_t in_db = count_rows(g_path, "SELECT coalesce(max(seq), 0) FROM device_seq");
    assert_true(in_db < N); /* the database alone would repeat seqs */
    smp_store_t *st = open_ring(20);
    assert_int_equal(load_seq_ok(st, "d"), N);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 0);
    smp_store_stats_t ss;
    smp_store_stats(st, &ss);
    assert_int_equal(ss.powercut_lost, 0);
    smp_store_close(st);
}

static int rm_tree(const char *dir)
{
    return nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void test_powercut_reported_and_seq_skips(void **state)
{
    (void)state;
    crash_child(
        100, 6,
        true); /* 5 unacked: single rows (a pack keeps an acked member until a clean stop) */
    int64_t upto = count_rows(g_path, "SELECT upto FROM seq_reserve WHERE device = 'd'");
    assert_true(upto >= 6);
    /* The power cut: the tmpfs ring is gone, the database keeps its last commit. */
    rm_tree(g_run);
    logcap_t lc;
    logcap_start(&lc);
    smp_store_t *st = open_ring(100);
    char *log = logcap_stop(&lc);
    assert_non_null(strstr(log, "power cut"));
    free(log);
    smp_store_stats_t ss;
    smp_store_stats(st, &ss);
    assert_true(ss.powercut_events == 1);
    /* Every seq that may have been published is skipped: seq never repeats. */
    assert_true(load_seq_ok(st, "d") == (uint64_t)upto);
    assert_int_equal(count_rows(g_path, OUTBOX_MSGS), 5);
    smp_store_close(st);
}

static void test_moved_aside_store_seq_floor(void **state)
{
    (void)state;
    smp_store_t *st = open_default();
    adds_t a;
    adds_init(&a);
    add_n(st, &a, "d", 1, 3);
    WAIT_FOR(a.n == 3);
    smp_store_close(st);
    assert_int_equal(write_file(g_path, "garbage, not a database", 23), 0);
    st = open_default();
    uint64_t seq = load_seq_ok(st, "d");
    assert_true(seq >= (uint64_t)(wall_ms() - 60000) * 1000u);
    smp_store_close(st);
}

static void test_commands_commit_at_once_in_interval_mode(void **state)
{
    (void)state;
    smp_store_t *st = open_ring(60000);
    adds_t a;
    adds_init(&a);
    smp_store_put_value(st, "d", "v", "1", 1);
    smp_store_cmd_put(st, "d", "c-1", NULL, wall_ms(), on_added, &a);
    WAIT_FOR(a.n == 1);
    assert_int_equal(a.errors, 0);
    /* The "accepted" row is committed long before the 60 s interval. */
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM cmd_result"), 1);
    smp_store_close(st);
    assert_int_equal(count_rows(g_path, "SELECT count(*) FROM last_value"), 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_bad_args_and_close_null, setup, teardown),
        cmocka_unit_test_setup_teardown(test_schema_tables, setup, teardown),
        cmocka_unit_test_setup_teardown(test_migrate_history_v1, setup, teardown),
        cmocka_unit_test_setup_teardown(test_last_value_roundtrip, setup, teardown),
        cmocka_unit_test_setup_teardown(test_seq_persisted, setup, teardown),
        cmocka_unit_test_setup_teardown(test_outbox_add_fetch_ack_reopen, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ack_from_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_outbox_bound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_outbox_limit_lowered_at_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_history_window, setup, teardown),
        cmocka_unit_test_setup_teardown(test_retention_prune, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_garbage, setup, teardown),
        cmocka_unit_test_setup_teardown(test_corrupt_truncated, setup, teardown),
        cmocka_unit_test_setup_teardown(test_parent_dir_created, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unusable_path_falls_back_to_memory, setup, teardown),
        cmocka_unit_test_setup_teardown(test_readonly_file, setup, teardown),
        cmocka_unit_test_setup_teardown(test_readonly_dir, setup, teardown),
        cmocka_unit_test_setup_teardown(test_callbacks_loop_thread_in_order, setup, teardown),
        cmocka_unit_test_setup_teardown(test_close_drains_queue, setup, teardown),
        cmocka_unit_test_setup_teardown(test_disk_full_then_recovers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_burst_100k, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cmd_results_and_audit, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cmd_results_pruned, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ring_acked_never_written, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ring_unacked_reach_db_on_interval, setup, teardown),
        cmocka_unit_test_setup_teardown(test_ring_recovered_after_crash, setup, teardown),
        cmocka_unit_test_setup_teardown(test_outage_backlog_packed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_outage_big_message_beside_packs, setup, teardown),
        cmocka_unit_test_setup_teardown(test_seq_slot_resumes_exactly_after_crash, setup, teardown),
        cmocka_unit_test_setup_teardown(test_powercut_reported_and_seq_skips, setup, teardown),
        cmocka_unit_test_setup_teardown(test_moved_aside_store_seq_floor, setup, teardown),
        cmocka_unit_test_setup_teardown(test_commands_commit_at_once_in_interval_mode, setup,
                                        teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
