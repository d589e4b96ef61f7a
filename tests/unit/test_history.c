/* Unit tests for the history chunks (gateway/history.c): the codec's round trip for every
 * contract type and its edges, the decoder on bad bytes, and the module on a real SQLite file
 * with a staging file: windows across chunk boundaries, clock steps, recovery after a
 * simulated kill -9 (exactly once), and the size bound. history.c is included to reach its
 * statics (chunk_overhead, the slot layout). */
#include "history.c"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ftw.h>

static char g_dir[256];
static char g_db[512];

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
    snprintf(g_dir, sizeof g_dir, "/tmp/simpul-hist-XXXXXX");
    if (mkdtemp(g_dir) == NULL) {
        return -1;
    }
    snprintf(g_db, sizeof g_db, "%s/h.db", g_dir);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    nftw(g_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* ---- codec ---- */

/* Encodes texts[] at times ts[] into one chunk and decodes it back, in every time form. */
static void roundtrip_mode(int enc, const char *const *texts, const int64_t *ts, size_t n)
{
    uint8_t buf[4096];
    size_t len = 0;
    smp_hist_state_t s;
    smp__hist_enc_init(&s, enc, ts[0]);
    if ((enc & SMP_HENC_TS_MODE) == SMP_HENC_TS_PERIOD) {
        len = (size_t)smp__hist_enc_period(&s, 1000, buf, sizeof buf);
    }
    for (size_t k = 0; k < n; k++) {
        int w = smp__hist_enc_sample(&s, ts[k], texts[k], strlen(texts[k]), buf + len,
                                     sizeof buf - len);
        if (w < 0) {
            fail_msg("encoding %s (enc %d): %d", texts[k], enc, w);
        }
        len += (size_t)w;
    }
    smp_hist_iter_t it;
    assert_int_equal(smp__hist_iter_init(&it, enc, ts[0], buf, len), 0);
    for (size_t k = 0; k < n; k++) {
        assert_int_equal(smp__hist_iter_next(&it), 1);
        assert_int_equal(it.s.ts, ts[k]);
        char out[256];
        size_t need = smp__hist_format(&it, out, sizeof out);
        assert_int_equal(need, strlen(texts[k]));
        assert_string_equal(out, texts[k]);
    }
    assert_int_equal(smp__hist_iter_next(&it), 0);
}

static void roundtrip(int enc, const char *const *texts, const int64_t *ts, size_t n)
{
    roundtrip_mode(enc, texts, ts, n);
    roundtrip_mode(enc | SMP_HENC_TS_DELTA, texts, ts, n);
    roundtrip_mode(enc | SMP_HENC_TS_PERIOD, texts, ts, n);
}

static void test_roundtrip_types(void **state)
{
    (void)state;
    const int64_t ts[] = {INT64_MIN,     -5,       0, 1000, 1000, 2003, 1764293720123,
                          INT64_MAX - 1, INT64_MAX};
    const char *bools[] = {"true",  "false", "false", "true", "true",
                           "false", "true",  "false", "true"};
    roundtrip(SMP_HENC_BOOL, bools, ts, 9);
    const char *ints[] = {"0",      "-1",    "9223372036854775807",  "-9223372036854775808", "1450",
                          "-32768", "65535", "-9223372036854775808", "9223372036854775807"};
    roundtrip(SMP_HENC_INT, ints, ts, 9);
    const char *uints[] = {"18446744073709551615",
                           "0",
                           "18446744073709551615",
                           "1",
                           "4294967295",
                           "9223372036854775808",
                           "42",
                           "0",
                           "18446744073709551614"};
    roundtrip(SMP_HENC_UINT, uints, ts, 9);
    /* float32 values as the engine prints them, float64, scaled, whole, signed zero. */
    const char *floats[] = {"12.5",
                            "0.1",
                            "-3.4028235e+38",
                            "1e-45",
                            "0.30000000000000004",
                            "1.7976931348623157e+308",
                            "5e-324",
                            "-0",
                            "1234.56"};
    roundtrip(SMP_HENC_FLOAT, floats, ts, 9);
    const char *texts[] = {"\"Dumai PS-01\"",
                           "\"\"",
                           "\"a \\\"q\\\" \\u0000\"",
                           "\"\xc3\xa9\"",
                           "null",
                           "\"x\"",
                           "12.5",
                           "true",
                           "\"Sudirman L-01\""};
    roundtrip(SMP_HENC_TEXT, texts, ts, 9);
}

/* The period form: multiples of P with a small residual cost one or two bytes. */
static void test_period_times(void **state)
{
    (void)state;
    const int64_t ts[] = {1000, 2001, 2999, 13000, 13000, 50003, 51000, 10000000, 10000001};
    const char *v[] = {"1", "2", "3", "4", "5", "6", "7", "8", "9"};
    roundtrip(SMP_HENC_INT, v, ts, 9);
    uint8_t buf[64];
    smp_hist_state_t s;
    smp__hist_enc_init(&s, SMP_HENC_INT | SMP_HENC_TS_PERIOD, 0);
    assert_int_equal(smp__hist_enc_sample(&s, 0, "1", 1, buf, sizeof buf), -EINVAL); /* no P */
    assert_int_equal(smp__hist_enc_period(&s, 0, buf, sizeof buf), -EINVAL);
    assert_int_equal(smp__hist_enc_period(&s, 1000, buf, sizeof buf), 2);
    assert_int_equal(smp__hist_enc_sample(&s, 0, "1", 1, buf, sizeof buf), 1);
    assert_int_equal(smp__hist_enc_sample(&s, 1002, "1", 1, buf, sizeof buf), 2); /* q 1: 1 B */
    assert_int_equal(smp__hist_enc_sample(&s, 9999, "1", 1, buf, sizeof buf), 3); /* q 9: 2 B */
    assert_int_equal(nice_period(997), 1000);
    assert_int_equal(nice_period(98), 100);
    assert_int_equal(nice_period(249), 250);
    assert_int_equal(nice_period(1500), 1500);
    assert_int_equal(nice_period(1), 1);
}

static void test_classify(void **state)
{
    (void)state;
    assert_int_equal(smp__hist_classify("true", 4), SMP_HENC_BOOL);
    assert_int_equal(smp__hist_classify("-12", 3), SMP_HENC_INT);
    assert_int_equal(smp__hist_classify("18446744073709551615", 20), SMP_HENC_UINT);
    assert_int_equal(smp__hist_classify("12.5", 4), SMP_HENC_FLOAT);
    assert_int_equal(smp__hist_classify("-0", 2), SMP_HENC_FLOAT);
    /* Not exact in the other encodings: kept as text, byte for byte. */
    assert_int_equal(smp__hist_classify("007", 3), SMP_HENC_TEXT);
    assert_int_equal(smp__hist_classify("1.50", 4), SMP_HENC_TEXT);
    assert_int_equal(smp__hist_classify("18446744073709551616", 20), SMP_HENC_TEXT);
    assert_int_equal(smp__hist_classify("nan", 3), SMP_HENC_TEXT);
    assert_int_equal(smp__hist_classify("inf", 3), SMP_HENC_TEXT);
    assert_int_equal(smp__hist_classify("1e999", 5), SMP_HENC_TEXT);
    assert_int_equal(smp__hist_classify("\"s\"", 3), SMP_HENC_TEXT);
    uint64_t v;
    /* A whole float fits FLOAT too, so a float chunk keeps going through "12". */
    assert_int_equal(smp__hist_parse(SMP_HENC_FLOAT, "12", 2, &v), 0);
    /* 2^53 + 1 is not a double: an integer chunk is needed. */
    assert_int_equal(smp__hist_parse(SMP_HENC_FLOAT, "9007199254740993", 16, &v), -EINVAL);
}

static void test_time_backwards(void **state)
{
    (void)state;
    uint8_t buf[64];
    smp_hist_state_t s;
    smp__hist_enc_init(&s, SMP_HENC_INT, 5000);
    assert_int_equal(smp__hist_enc_sample(&s, 5000, "1", 1, buf, sizeof buf) > 0, 1);
    assert_int_equal(smp__hist_enc_sample(&s, 4999, "2", 1, buf, sizeof buf), -EINVAL);
    assert_int_equal(s.n, 1);
    assert_int_equal(smp__hist_enc_sample(&s, 5000, "x", 1, buf, sizeof buf), -EINVAL);
    assert_int_equal(smp__hist_enc_sample(&s, 6000, "2", 1, buf, 0), -ENOSPC);
    assert_int_equal(s.n, 1);
}

static void test_decoder_rejects(void **state)
{
    (void)state;
    smp_hist_iter_t it;
    assert_int_equal(smp__hist_iter_init(&it, 9, 0, (const uint8_t *)"", 0), -EBADMSG);
    /* Bool 2. */
    assert_int_equal(smp__hist_iter_init(&it, SMP_HENC_BOOL, 0, (const uint8_t *)"\x02", 1), 0);
    assert_int_equal(smp__hist_iter_next(&it), -EBADMSG);
    /* A varint longer than 64 bits. */
    const uint8_t over[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
    assert_int_equal(smp__hist_iter_init(&it, SMP_HENC_INT, 0, over, sizeof over), 0);
    assert_int_equal(smp__hist_iter_next(&it), -EBADMSG);
    /* Truncated: an unfinished varint. */
    assert_int_equal(smp__hist_iter_init(&it, SMP_HENC_INT, 0, (const uint8_t *)"\x80", 1), 0);
    assert_int_equal(smp__hist_iter_next(&it), -EBADMSG);
    /* XOR bytes to a NaN (all exponent bits and a mantissa bit). */
    const uint8_t nan[] = {0x08, 0x01, 0, 0, 0, 0, 0, 0xf8, 0x7f};
    assert_int_equal(smp__hist_iter_init(&it, SMP_HENC_FLOAT, 0, nan, sizeof nan), 0);
    assert_int_equal(smp__hist_iter_next(&it), -EBADMSG);
    /* A text longer than the chunk. */
    assert_int_equal(smp__hist_iter_init(&it, SMP_HENC_TEXT, 0,
                                         (const uint8_t *)"\x05"
                                                          "ab",
                                         3),
                     0);
    assert_int_equal(smp__hist_iter_next(&it), -EBADMSG);
    /* Period form: a period of 0, both time flags, q * P overflowing. */
    assert_int_equal(smp__hist_iter_init(&it, SMP_HENC_INT | SMP_HENC_TS_PERIOD, 0,
                                         (const uint8_t *)"\x00\x00", 2),
                     -EBADMSG);
    assert_int_equal(smp__hist_iter_init(&it, SMP_HENC_INT | SMP_HENC_TS_MODE, 0,
                                         (const uint8_t *)"\x01\x00", 2),
                     -EBADMSG);
    const uint8_t big[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00,
                           0xc0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x00};
    assert_int_equal(
        smp__hist_iter_init(&it, SMP_HENC_INT | SMP_HENC_TS_PERIOD, 0, big, sizeof big), 0);
    assert_int_equal(smp__hist_iter_next(&it), 1);
    assert_int_equal(smp__hist_iter_next(&it), -EBADMSG);
    /* Time going backwards: second sample's dod = -1 after a first delta of 0. */
    assert_int_equal(
        smp__hist_iter_init(&it, SMP_HENC_INT, 100, (const uint8_t *)"\x00\x01\x00", 3), 0);
    assert_int_equal(smp__hist_iter_next(&it), 1);
    assert_int_equal(smp__hist_iter_next(&it), -EBADMSG);
}

/* ---- the module ---- */

static sqlite3 *db_open(void)
{
    sqlite3 *db;
    assert_int_equal(sqlite3_open(g_db, &db), SQLITE_OK);
    assert_int_equal(
        sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=OFF", NULL, NULL, NULL),
        SQLITE_OK);
    assert_int_equal(smp__history_schema(db), SQLITE_OK);
    return db;
}

static smp_history_t *hist_open(sqlite3 *db, int64_t max_bytes, int64_t chunk_ms)
{
    smp_history_opts_t o = {.runtime_dir = g_dir, .max_bytes = max_bytes, .chunk_max_ms = chunk_ms};
    smp_history_t *h = NULL;
    assert_int_equal(smp__history_open(db, &o, &h), SQLITE_OK);
    return h;
}

static void tx(sqlite3 *db, const char *sql)
{
    assert_int_equal(sqlite3_exec(db, sql, NULL, NULL, NULL), SQLITE_OK);
}

static void put(sqlite3 *db, smp_history_t *h, const char *tag, int64_t ts, const char *v)
{
    tx(db, "BEGIN");
    assert_int_equal(smp__history_append(h, "dev", tag, ts, v), SQLITE_OK);
    assert_int_equal(smp__history_flush(h, ts), SQLITE_OK);
    tx(db, "COMMIT");
    smp__history_tx_end(h, true);
}

static int64_t scalar(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *s;
    assert_int_equal(sqlite3_prepare_v2(db, sql, -1, &s, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_step(s), SQLITE_ROW);
    int64_t v = sqlite3_column_int64(s, 0);
    sqlite3_finalize(s);
    return v;
}

/* Samples k = 0..n-1 at ts 1000 + 997 k, value k*k (some chunks close on size, some on age). */
static void put_series(sqlite3 *db, smp_history_t *h, const char *tag, int n)
{
    char v[32];
    for (int k = 0; k < n; k++) {
        snprintf(v, sizeof v, "%d", k * k);
        put(db, h, tag, 1000 + 997 * (int64_t)k, v);
    }
}

/* Pages through [from, to) with `limit` per page, as the history command does, and checks
 * every sample of the window came exactly once, in order. */
static void check_window(smp_history_t *h, const char *tag, int n, int64_t from, int64_t to,
                         size_t limit)
{
    int expect = 0;
    while (expect < n && 1000 + 997 * (int64_t)expect < from) {
        expect++;
    }
    int64_t cur = from;
    for (;;) {
        smp_history_row_t *rows;
        size_t got;
        char *buf;
        assert_int_equal(smp__history_query(h, "dev", tag, cur, to, limit, &rows, &got, &buf),
                         SQLITE_OK);
        for (size_t k = 0; k < got; k++, expect++) {
            char v[32];
            snprintf(v, sizeof v, "%d", expect * expect);
            assert_int_equal(rows[k].ts_ms, 1000 + 997 * (int64_t)expect);
            assert_string_equal(rows[k].value_json, v);
        }
        bool full = got == limit;
        if (full) {
            cur = rows[got - 1].ts_ms + 1; /* the command's "next" */
        }
        free(rows);
        free(buf);
        if (!full) {
            break;
        }
    }
    int last = 0;
    while (last < n && 1000 + 997 * (int64_t)last < to) {
        last++;
    }
    assert_int_equal(expect, last);
}

static void test_windows_across_chunks(void **state)
{
    (void)state;
    sqlite3 *db = db_open();
    smp_history_t *h = hist_open(db, 0, 60000);
    put_series(db, h, "a", 2000);
    put_series(db, h, "b", 50);
    /* Many chunks stored, one still open. */
    assert_true(scalar(db, "SELECT count(*) FROM history_chunk") > 10);
    assert_true(h->nopen > 0);
    check_window(h, "a", 2000, INT64_MIN, INT64_MAX, 1000);
    check_window(h, "a", 2000, 0, INT64_MAX, 7);
    check_window(h, "a", 2000, 1000 + 997 * 123, 1000 + 997 * 1999, 100);
    check_window(h, "a", 2000, 1000 + 997 * 123 + 1, 1000 + 997 * 124, 100); /* empty */
    check_window(h, "a", 2000, 1000 + 997 * 1990, INT64_MAX, 3);             /* open chunk */
    check_window(h, "b", 50, 5000, 40000, 1);
    smp_history_row_t *rows;
    size_t got;
    char *buf;
    assert_int_equal(smp__history_query(h, "dev", "none", 0, INT64_MAX, 10, &rows, &got, &buf),
                     SQLITE_OK);
    assert_int_equal(got, 0);
    smp__history_free(h);
    sqlite3_close(db);
}

static void test_clock_step(void **state)
{
    (void)state;
    sqlite3 *db = db_open();
    smp_history_t *h = hist_open(db, 0, 600000);
    put(db, h, "t", 10000, "1");
    put(db, h, "t", 11000, "2");
    put(db, h, "t", 5000, "3"); /* the clock stepped back: a new chunk */
    put(db, h, "t", 12000, "4");
    put(db, h, "t", 6000, "5.5");
    assert_int_equal(smp__history_flush_all(h), SQLITE_OK);
    smp_history_row_t *rows;
    size_t got;
    char *buf;
    assert_int_equal(smp__history_query(h, "dev", "t", 0, INT64_MAX, 100, &rows, &got, &buf),
                     SQLITE_OK);
    const int64_t ts[] = {5000, 6000, 10000, 11000, 12000};
    const char *vals[] = {"3", "5.5", "1", "2", "4"};
    assert_int_equal(got, 5);
    for (size_t k = 0; k < 5; k++) {
        assert_int_equal(rows[k].ts_ms, ts[k]);
        assert_string_equal(rows[k].value_json, vals[k]);
    }
    free(rows);
    free(buf);
    smp__history_free(h);
    sqlite3_close(db);
}

/* A kill -9 at any point: the staging file holds open chunks and closed ones whose commit may
 * or may not have happened. Restarting stores each of them exactly once. */
static void test_recovery_exactly_once(void **state)
{
    (void)state;
    sqlite3 *db = db_open();
    smp_history_t *h = hist_open(db, 0, 60000);
    put_series(db, h, "a", 300);
    /* A chunk closed and committed, its slot not yet freed: the kill came in between. */
    tx(db, "BEGIN");
    close_open(h, tag_lookup(h, "dev", "a"));
    assert_int_equal(smp__history_flush(h, 0), SQLITE_OK);
    tx(db, "COMMIT");
    /* And a new open chunk after it. */
    assert_int_equal(smp__history_append(h, "dev", "a", 1000 + 997 * 300, "90000"), SQLITE_OK);
    h->nintx = 0; /* "killed": no tx_end, no flush; free leaves the staging file */
    int64_t chunks = scalar(db, "SELECT count(*) FROM history_chunk");
    smp__history_free(h);
    sqlite3_close(db);

    db = db_open();
    h = hist_open(db, 0, 60000);
    assert_int_equal(scalar(db, "SELECT count(*) FROM history_chunk"), chunks + 1);
    check_window(h, "a", 301, INT64_MIN, INT64_MAX, 1000);
    assert_int_equal(scalar(db, "SELECT sum(n) FROM history_chunk"), 301);
    /* A clean stop flushes and removes the staging file. */
    put(db, h, "a", 1000 + 997 * 301, "90601");
    assert_int_equal(smp__history_flush_all(h), SQLITE_OK);
    char path[600];
    snprintf(path, sizeof path, "%s", h->stage_path);
    smp__history_free(h);
    sqlite3_close(db);
    struct stat sb;
    assert_int_equal(stat(path, &sb), -1);
    db = db_open();
    h = hist_open(db, 0, 60000);
    check_window(h, "a", 302, INT64_MIN, INT64_MAX, 1000);
    smp__history_free(h);
    sqlite3_close(db);
}

/* Rolled-back chunks are inserted again with the next transaction. */
static void test_rollback_keeps_chunks(void **state)
{
    (void)state;
    sqlite3 *db = db_open();
    smp_history_t *h = hist_open(db, 0, 60000);
    put_series(db, h, "a", 10);
    tx(db, "BEGIN");
    assert_int_equal(smp__history_flush(h, INT64_MAX), SQLITE_OK); /* all past their age */
    tx(db, "ROLLBACK");
    smp__history_tx_end(h, false);
    assert_int_equal(scalar(db, "SELECT count(*) FROM history_chunk"), 0);
    check_window(h, "a", 10, INT64_MIN, INT64_MAX, 3); /* still answered from memory */
    tx(db, "BEGIN");
    assert_int_equal(smp__history_flush(h, INT64_MAX), SQLITE_OK);
    tx(db, "COMMIT");
    smp__history_tx_end(h, true);
    assert_int_equal(scalar(db, "SELECT sum(n) FROM history_chunk"), 10);
    assert_int_equal(scalar(db, "SELECT count(*) FROM tags"), 1);
    check_window(h, "a", 10, INT64_MIN, INT64_MAX, 3);
    smp__history_free(h);
    sqlite3_close(db);
}

/* While nothing commits, closed chunks wait in RAM up to a bound; the oldest go first. */
static void test_pending_bound(void **state)
{
    (void)state;
    pend_max_slots = 4;
    sqlite3 *db = db_open();
    smp_history_t *h = hist_open(db, 0, 1000);
    char v[16];
    for (int k = 0; k < 20; k++) {
        snprintf(v, sizeof v, "%d", k);
        tx(db, "BEGIN");
        /* 2 s apart with 1 s chunks: every sample closes the chunk before it. */
        assert_int_equal(smp__history_append(h, "dev", "a", 2000 * (int64_t)k, v), SQLITE_OK);
        assert_int_equal(smp__history_flush(h, 2000 * (int64_t)k), SQLITE_OK);
        tx(db, "ROLLBACK"); /* the disk is full */
        smp__history_tx_end(h, false);
        assert_true(h->npend <= 4);
    }
    smp_history_row_t *rows;
    size_t got;
    char *buf;
    assert_int_equal(smp__history_query(h, "dev", "a", 0, INT64_MAX, 100, &rows, &got, &buf),
                     SQLITE_OK);
    assert_int_equal(got, 5); /* 4 waiting + the open one: the newest */
    assert_int_equal(rows[0].ts_ms, 2000 * 15);
    assert_string_equal(rows[4].value_json, "19");
    free(rows);
    free(buf);
    /* The disk is back. Closing the open chunk makes the oldest waiting one give way. */
    assert_int_equal(smp__history_flush_all(h), SQLITE_OK);
    assert_int_equal(scalar(db, "SELECT sum(n) FROM history_chunk"), 4);
    assert_int_equal(scalar(db, "SELECT max(t_last) FROM history_chunk"), 2000 * 19);
    smp__history_free(h);
    sqlite3_close(db);
    pend_max_slots = 65536;
}

/* The size bound holds on disk (dbstat), pruned in bounded steps, oldest first. */
static void test_size_bound(void **state)
{
    (void)state;
    const int64_t max = 64 * 1024;
    sqlite3 *db = db_open();
    smp_history_t *h = hist_open(db, max, 60000);
    char v[32], tag[16];
    for (int k = 0; k < 40000; k++) {
        snprintf(tag, sizeof tag, "t%d", k % 50);
        snprintf(v, sizeof v, "%d", (k * 7919) % 1000);
        tx(db, "BEGIN");
        assert_int_equal(smp__history_append(h, "dev", tag, 1000 * (int64_t)k, v), SQLITE_OK);
        assert_int_equal(smp__history_flush(h, 1000 * (int64_t)k), SQLITE_OK);
        int deleted;
        bool more;
        assert_int_equal(smp__history_prune(h, 0, 20, &deleted, &more), SQLITE_OK);
        tx(db, "COMMIT");
        smp__history_tx_end(h, true);
    }
    uint64_t bytes, samples;
    smp__history_stats(h, &bytes, &samples);
    assert_true(bytes <= (uint64_t)max);
    int64_t on_disk = scalar(db, "SELECT sum(pgsize) FROM dbstat WHERE name IN"
                                 " ('history_chunk', 'history_chunk_by_time')");
    print_message("history on disk %" PRId64 " bytes (estimate %" PRIu64 ", bound %" PRId64
                  "), %" PRIu64 " samples\n",
                  on_disk, bytes, max, samples);
    assert_true(on_disk <= max);
    /* The newest samples are the ones kept. */
    smp_history_row_t *rows;
    size_t got;
    char *buf;
    assert_int_equal(smp__history_query(h, "dev", "t0", 0, INT64_MAX, 1, &rows, &got, &buf),
                     SQLITE_OK);
    assert_int_equal(got, 1);
    assert_true(rows[0].ts_ms > 1000 * 20000);
    free(rows);
    free(buf);
    smp__history_free(h);
    sqlite3_close(db);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_types),
        cmocka_unit_test(test_period_times),
        cmocka_unit_test(test_classify),
        cmocka_unit_test(test_time_backwards),
        cmocka_unit_test(test_decoder_rejects),
        cmocka_unit_test_setup_teardown(test_windows_across_chunks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_clock_step, setup, teardown),
        cmocka_unit_test_setup_teardown(test_recovery_exactly_once, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rollback_keeps_chunks, setup, teardown),
        cmocka_unit_test_setup_teardown(test_pending_bound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_size_bound, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
