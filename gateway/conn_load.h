/* How busy each connection (one TCP endpoint, one serial bus, one RTU-over-TCP line) is, on the
 * loop thread: utilisation (time the worker spent on requests / wall time), requests per
 * second, overruns (polls skipped because the previous one had not come back), and the link
 * counters the driver reports (CRC and framing errors) and reconnects.
 *
 * A bus that cannot fit the polls its config asks for is named in one warning per episode,
 * with how far over it is, and one line when it keeps up again. Not a public surface: the
 * engine feeds it and publishes it under "connections" in the metrics.
 */
#ifndef SMP_CONN_LOAD_H
#define SMP_CONN_LOAD_H

#include <stdbool.h>
#include <stdint.h>

#include <simpul/plugin.h>

#include "value.h"

/* What one finished job tells about its connection (filled on the worker thread). */
typedef struct smp_conn_sample {
    uint64_t busy_us;      /* time the job held the line */
    uint32_t requests;     /* requests it issued */
    smp_conn_stats_t link; /* the driver's cumulative counters after the job */
    uint64_t reconnects;   /* the connection's cumulative reopens after the job */
} smp_conn_sample_t;

typedef struct smp_conn_load {
    /* totals */
    uint64_t busy_us, requests, jobs, overruns, reconnects;
    smp_conn_stats_t link;
    /* since the last metrics publish */
    uint64_t pub_ms, pub_busy_us, pub_requests;
    /* over-subscription check: a window of CHECK_WINDOW_MS */
    uint64_t win_ms, win_busy_us, win_jobs, win_overruns;
    bool over; /* in an episode (warned, recovery not yet logged) */
} smp_conn_load_t;

/* Starts counting at loop time now_ms. */
void smp__conn_load_init(smp_conn_load_t *l, uint64_t now_ms);

/* Adds one finished job; may log the start or the end of an over-subscription episode of the
 * connection named `key` (e.g. "rtu_tcp:10.0.0.40:4001"). */
void smp__conn_load_add(smp_conn_load_t *l, const char *key, const smp_conn_sample_t *s,
                        uint64_t now_ms);

/* Counts a skipped poll. */
void smp__conn_load_overrun(smp_conn_load_t *l);

/* Appends `"KEY":{...}` for one connection to b and starts the next publish window. */
void smp__conn_load_json(smp_conn_load_t *l, const char *key, smp_buf_t *b, uint64_t now_ms);

#endif
