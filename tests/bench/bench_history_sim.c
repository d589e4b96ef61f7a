/* Bench: history bytes per sample at the city load, in simulated time.
 *
 * 200 devices x 50 uint16 registers polled every second, 10 % of the registers changing per
 * second (a random walk of +-1..50), polls spread over the second with a few ms of jitter:
 * ~1000 samples/s. The samples go through the history module exactly as the store's writer
 * feeds it (append per changed value, flush + commit once a second, prune), into a real SQLite
 * file, for `hours` of simulated time (default 2). Then it reports what dbstat says the history
 * takes on disk, per sample, and the CPU time per sample.
 *
 *   bench_history_sim [hours] [chunk_max_s]
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "history.h"

enum { NDEV = 200, NREG = 50 };

static uint64_t rng = 88172645463325252ull;

static uint64_t next_rand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static double cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int64_t scalar(sqlite3 *db, const char *sql)
{
    sqlite3_stmt *s;
    int64_t v = -1;
    if (sqlite3_prepare_v2(db, sql, -1, &s, NULL) == SQLITE_OK && sqlite3_step(s) == SQLITE_ROW) {
        v = sqlite3_column_int64(s, 0);
    }
    sqlite3_finalize(s);
    return v;
}

static void must(int rc, sqlite3 *db, const char *what)
{
    if (rc != SQLITE_OK) {
        fprintf(stderr, "%s: %s\n", what, sqlite3_errmsg(db));
        exit(1);
    }
}

int main(int argc, char **argv)
{
    double hours = argc > 1 ? atof(argv[1]) : 2.0;
    int chunk_s = argc > 2 ? atoi(argv[2]) : 600;
    char dir[] = "/tmp/bench-history-XXXXXX";
    if (mkdtemp(dir) == NULL) {
        return 1;
    }
    char path[128];
    snprintf(path, sizeof path, "%s/h.db", dir);
    sqlite3 *db;
    must(sqlite3_open(path, &db), db, "open");
    must(sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL", NULL, NULL, NULL),
         db, "pragma");
    must(smp__history_schema(db), db, "schema");
    smp_history_opts_t o = {.runtime_dir = dir, .chunk_max_ms = (int64_t)chunk_s * 1000};
    smp_history_t *h;
    must(smp__history_open(db, &o, &h), db, "history open");

    static uint16_t val[NDEV][NREG];
    static char names[NDEV][16], tags[NREG][16];
    int offset_ms[NDEV];
    for (int d = 0; d < NDEV; d++) {
        snprintf(names[d], sizeof names[d], "dev-%03d", d);
        offset_ms[d] = (int)(next_rand() % 1000);
        for (int r = 0; r < NREG; r++) {
            val[d][r] = (uint16_t)(next_rand() % 4000);
        }
    }
    for (int r = 0; r < NREG; r++) {
        snprintf(tags[r], sizeof tags[r], "reg%02d", r);
    }
    int64_t t0 = 1764293720000;
    int64_t secs = (int64_t)(hours * 3600);
    uint64_t samples = 0;
    double c0 = cpu_s();
    for (int64_t s = 0; s < secs; s++) {
        must(sqlite3_exec(db, "BEGIN", NULL, NULL, NULL), db, "begin");
        for (int d = 0; d < NDEV; d++) {
            int64_t ts = t0 + s * 1000 + offset_ms[d] + (int64_t)(next_rand() % 4);
            for (int r = 0; r < NREG; r++) {
                if (next_rand() % 10 != 0 && s > 0) {
                    continue;
                }
                int step = (int)(next_rand() % 50) + 1;
                int v = val[d][r] + ((next_rand() & 1) ? step : -step);
                val[d][r] = (uint16_t)(v < 0 ? 0 : v > 65535 ? 65535 : v);
                char text[8];
                snprintf(text, sizeof text, "%u", val[d][r]);
                must(smp__history_append(h, names[d], tags[r], ts, text), db, "append");
                samples++;
            }
        }
        must(smp__history_flush(h, t0 + s * 1000 + 1000), db, "flush");
        int deleted;
        bool more;
        must(smp__history_prune(h, t0 + s * 1000 + 1000, 1000, &deleted, &more), db, "prune");
        must(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), db, "commit");
        smp__history_tx_end(h, true);
    }
    double cpu = cpu_s() - c0;
    /* Stored chunks only (the open ones are in the staging file): the steady state. */
    int64_t stored = scalar(db, "SELECT sum(n) FROM history_chunk");
    int64_t chunks = scalar(db, "SELECT count(*) FROM history_chunk");
    int64_t blob = scalar(db, "SELECT sum(length(data)) FROM history_chunk");
    int64_t t_bytes = scalar(db, "SELECT sum(pgsize) FROM dbstat WHERE name = 'history_chunk'");
    int64_t i_bytes =
        scalar(db, "SELECT sum(pgsize) FROM dbstat WHERE name = 'history_chunk_by_time'");
    int64_t tag_bytes = scalar(db, "SELECT sum(pgsize) FROM dbstat WHERE name = 'tags'");
    sqlite3_stmt *q;
    if (sqlite3_prepare_v2(db,
                           "SELECT encoding, count(*), sum(length(data)) * 1.0 / sum(n) FROM"
                           " history_chunk GROUP BY encoding",
                           -1, &q, NULL) == SQLITE_OK) {
        while (sqlite3_step(q) == SQLITE_ROW) {
            printf("encoding 0x%02x: %d chunks, %.2f B/sample in their blobs\n",
                   sqlite3_column_int(q, 0), sqlite3_column_int(q, 1), sqlite3_column_double(q, 2));
        }
    }
    sqlite3_finalize(q);
    uint64_t est, all;
    smp__history_stats(h, &est, &all);
    printf("load: %d devices x %d registers @ 1 s, 10 %% changing/s, %.1f h simulated, chunks "
           "close after %d s\n",
           NDEV, NREG, hours, chunk_s);
    printf("samples: %" PRIu64 " (%.0f/s); stored in chunks: %" PRId64 " in %" PRId64
           " chunks (%.1f samples/chunk)\n",
           samples, (double)samples / (double)secs, stored, chunks,
           (double)stored / (double)chunks);
    printf("on disk (dbstat): history_chunk %" PRId64 " B + index %" PRId64 " B = %.2f B/sample"
           " (blob alone %.2f B/sample); tags table %" PRId64 " B\n",
           t_bytes, i_bytes, (double)(t_bytes + i_bytes) / (double)stored,
           (double)blob / (double)stored, tag_bytes);
    printf("history_bytes estimate %" PRIu64 " B (%.2f of dbstat)\n", est,
           (double)est / (double)(t_bytes + i_bytes));
    printf("cpu: %.2f s, %.2f us/sample (encode + SQLite)\n", cpu, cpu * 1e6 / (double)samples);
    /* The history command's cost: one tag's first page over everything, its last hour, and a
     * window where it has nothing (the worst case: every chunk's index entry is read). */
    struct {
        const char *what;
        int64_t from, to;
    } qs[] = {
        {"first 1000 of all", INT64_MIN, INT64_MAX},
        {"last hour, 1000", t0 + secs * 1000 - 3600000, INT64_MAX},
        {"empty window (all of it)", INT64_MIN, INT64_MAX},
    };
    for (size_t k = 0; k < 3; k++) {
        smp_history_row_t *rows;
        size_t n;
        char *buf;
        double w0 = cpu_s();
        const char *tag = k == 2 ? "none" : tags[0];
        if (k == 2) {
            /* A tag with one sample at the very end: all earlier chunks are candidates. */
            must(sqlite3_exec(db, "BEGIN", NULL, NULL, NULL), db, "begin");
            must(smp__history_append(h, names[0], tag, t0 + secs * 1000, "1"), db, "append");
            must(smp__history_flush(h, INT64_MIN), db, "flush");
            must(sqlite3_exec(db, "COMMIT", NULL, NULL, NULL), db, "commit");
            smp__history_tx_end(h, true);
        }
        must(smp__history_query(h, names[0], tag, qs[k].from, qs[k].to, 1000, &rows, &n, &buf), db,
             "query");
        printf("query %-26s %4zu samples in %.1f ms (cpu)\n", qs[k].what, n, (cpu_s() - w0) * 1e3);
        free(rows);
        free(buf);
    }
    smp__history_free(h);
    sqlite3_close(db);
    char cmd[256];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    return system(cmd) == 0 ? 0 : 1;
}
