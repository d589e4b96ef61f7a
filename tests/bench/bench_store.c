/* Store throughput: outbox_add and put_value on a real database file.
 *
 * The loop thread queues operations in chunks (one chunk per loop iteration, as the engine does
 * after each poll) while the writer thread commits them; the clock stops when the last
 * completion has come back to the loop. Prints operations per second and per commit. Never
 * passes or fails on time (a benchmark, not a test).
 *
 * Usage: bench_store [OPS [CHUNK [DIR]]]   defaults: 200000 1000 a new directory under /tmp */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "store.h"

enum mode { MODE_ADD, MODE_PUT };

struct bench {
    uv_loop_t *loop;
    smp_store_t *st;
    enum mode mode;
    size_t ops, chunk, queued, done;
    int64_t t0_ms; /* value timestamps start here: recent, so retention keeps them */
    int failures;
    bool barrier_done;
    uv_idle_t idle;
};

static void on_added(void *arg, int status, int64_t id)
{
    struct bench *b = arg;
    (void)id;
    if (status != 0) {
        b->failures++;
    }
    b->done++;
}

static void on_barrier(void *arg, int status, const smp_history_row_t *rows, size_t n)
{
    struct bench *b = arg;
    (void)rows;
    (void)n;
    if (status != 0) {
        b->failures++;
    }
    b->barrier_done = true;
}

/* Queues one chunk per loop iteration. */
static void on_idle(uv_idle_t *h)
{
    struct bench *b = h->data;
    static const char payload[] = "{\"ts\":1764293720123,\"seq\":42,\"values\":{\"running\":true,"
                                  "\"speed_rpm\":1450,\"flow_m3h\":12.5}}";
    char tag[16], value[24];
    size_t end = b->queued + b->chunk < b->ops ? b->queued + b->chunk : b->ops;
    for (; b->queued < end; b->queued++) {
        if (b->mode == MODE_ADD) {
            smp_store_outbox_add(b->st, "pump-01", b->queued + 1, "simpul/gw/pump-01/data", payload,
                                 sizeof payload - 1, on_added, b);
        } else {
            snprintf(tag, sizeof tag, "tag%zu", b->queued % 500);
            snprintf(value, sizeof value, "%zu.5", b->queued);
            smp_store_put_value(b->st, "pump-01", tag, value, b->t0_ms + (int64_t)b->queued);
        }
    }
    if (b->queued == b->ops) {
        uv_idle_stop(h);
        if (b->mode == MODE_PUT) {
            /* put_value has no callback: a read queued after the puts completes after them. */
            smp_store_history(b->st, "pump-01", "tag0", 0, INT64_MAX, 1, on_barrier, b);
        }
    }
}

static bool finished(const struct bench *b)
{
    return b->mode == MODE_ADD ? b->done == b->ops : b->barrier_done;
}

static int run(uv_loop_t *loop, smp_store_t *st, enum mode mode, size_t ops, size_t chunk)
{
    struct bench b = {.loop = loop, .st = st, .mode = mode, .ops = ops, .chunk = chunk};
    uv_timeval64_t tv;
    uv_gettimeofday(&tv);
    b.t0_ms = tv.tv_sec * 1000 + tv.tv_usec / 1000;
    smp_store_stats_t s0, s1;
    smp_store_stats(st, &s0);
    uv_idle_init(loop, &b.idle);
    b.idle.data = &b;
    uint64_t t0 = uv_hrtime();
    uv_idle_start(&b.idle, on_idle);
    while (!finished(&b)) {
        uv_run(loop, UV_RUN_ONCE);
    }
    uint64_t t1 = uv_hrtime();
    uv_close((uv_handle_t *)&b.idle, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    smp_store_stats(st, &s1);
    double secs = (double)(t1 - t0) / 1e9;
    uint64_t commits = s1.commits - s0.commits;
    printf("%-11s %8zu ops in %6.3f s = %9.0f ops/s, %" PRIu64 " commits (%.0f ops/commit)%s\n",
           mode == MODE_ADD ? "outbox_add" : "put_value", ops, secs, (double)ops / secs, commits,
           commits ? (double)ops / (double)commits : 0.0, b.failures ? " FAILURES" : "");
    return b.failures ? 1 : 0;
}

int main(int argc, char **argv)
{
    size_t ops = argc > 1 ? strtoul(argv[1], NULL, 10) : 200000;
    size_t chunk = argc > 2 ? strtoul(argv[2], NULL, 10) : 1000;
    char dir[256];
    if (argc > 3) {
        snprintf(dir, sizeof dir, "%s", argv[3]);
    } else {
        snprintf(dir, sizeof dir, "/tmp/simpul-bench-XXXXXX");
        if (mkdtemp(dir) == NULL) {
            perror("mkdtemp");
            return 1;
        }
    }
    if (ops == 0 || chunk == 0) {
        fprintf(stderr, "usage: bench_store [OPS [CHUNK [DIR]]]\n");
        return 2;
    }
    char path[512];
    snprintf(path, sizeof path, "%s/bench.db", dir);
    uv_loop_t loop;
    uv_loop_init(&loop);
    smp_store_opts_t opts = {
        .path = path, .history_retention_h = 168, .outbox_max_bytes = (int64_t)1 << 30};
    smp_store_t *st = NULL;
    int rc = smp_store_open(&loop, &opts, &st);
    if (rc != 0) {
        fprintf(stderr, "open %s: %s\n", path, strerror(-rc));
        return 1;
    }
    printf("store %s, chunk %zu ops per loop iteration\n", path, chunk);
    int fails = run(&loop, st, MODE_ADD, ops, chunk);
    fails |= run(&loop, st, MODE_PUT, ops, chunk);
    smp_store_close(st);
    uv_loop_close(&loop);
    if (argc <= 3) {
        char f[600];
        const char *sfx[] = {"", "-wal", "-shm"};
        for (size_t k = 0; k < 3; k++) {
            snprintf(f, sizeof f, "%s%s", path, sfx[k]);
            unlink(f);
        }
        rmdir(dir);
    }
    return fails;
}
