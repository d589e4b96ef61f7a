/* Connection load and over-subscription (see conn_load.h). */
#include "conn_load.h"

#include <inttypes.h>
#include <string.h>

#include "log.h"

/* Over-subscription is judged on windows this long: long enough that one slow reply (a dead
 * unit's timeout) does not make an episode, short enough to name a bus within seconds. */
#define CHECK_WINDOW_MS 5000u

void smp__conn_load_init(smp_conn_load_t *l, uint64_t now_ms)
{
    memset(l, 0, sizeof *l);
    l->pub_ms = l->win_ms = now_ms;
}

void smp__conn_load_overrun(smp_conn_load_t *l)
{
    l->overruns++;
    l->win_overruns++;
}

/* The share of the line's time the configured polls need in the window: what the worker was
 * busy with, plus what the skipped polls would have cost at the window's average job. */
static double demand(const smp_conn_load_t *l, uint64_t wall_ms)
{
    double busy = (double)l->win_busy_us;
    if (l->win_jobs > 0) {
        busy += (double)l->win_overruns * busy / (double)l->win_jobs;
    }
    return busy / ((double)wall_ms * 1000.0);
}

static void check_window(smp_conn_load_t *l, const char *key, uint64_t now_ms)
{
    uint64_t wall = now_ms - l->win_ms;
    if (wall < CHECK_WINDOW_MS) {
        return;
    }
    double need = demand(l, wall);
    double util = (double)l->win_busy_us / ((double)wall * 1000.0);
    if (!l->over && l->win_overruns > 0 && need >= 1.0) {
        l->over = true;
        LOG_WARN("engine",
                 "bus %s is over-subscribed: its polls need %.0f%% of the line's time "
                 "(%.0f%% over; %" PRIu64 " polls skipped in %.1f s); raise interval_ms or "
                 "split the bus",
                 key, need * 100.0, (need - 1.0) * 100.0, l->win_overruns, (double)wall / 1000.0);
    } else if (l->over && l->win_overruns == 0) {
        l->over = false;
        LOG_INFO("engine", "bus %s keeps up again: busy %.0f%% of the time, no poll skipped", key,
                 util * 100.0);
    }
    l->win_ms = now_ms;
    l->win_busy_us = l->win_jobs = l->win_overruns = 0;
}

void smp__conn_load_add(smp_conn_load_t *l, const char *key, const smp_conn_sample_t *s,
                        uint64_t now_ms)
{
    l->busy_us += s->busy_us;
    l->requests += s->requests;
    l->jobs++;
    l->win_busy_us += s->busy_us;
    l->win_jobs++;
    /* Counters arrive as totals; jobs may be reordered only within one loop iteration, so
     * keep the largest. */
    if (s->link.crc_errors > l->link.crc_errors) {
        l->link.crc_errors = s->link.crc_errors;
    }
    if (s->link.framing_errors > l->link.framing_errors) {
        l->link.framing_errors = s->link.framing_errors;
    }
    if (s->reconnects > l->reconnects) {
        l->reconnects = s->reconnects;
    }
    check_window(l, key, now_ms);
}

void smp__conn_load_json(smp_conn_load_t *l, const char *key, smp_buf_t *b, uint64_t now_ms)
{
    uint64_t wall = now_ms > l->pub_ms ? now_ms - l->pub_ms : 1;
    double util = (double)(l->busy_us - l->pub_busy_us) / ((double)wall * 1000.0);
    double rps = (double)(l->requests - l->pub_requests) * 1000.0 / (double)wall;
    smp_buf_json_string(b, key, strlen(key));
    smp_buf_printf(b,
                   ":{\"utilisation\":%.3f,\"requests_per_s\":%.1f,\"overruns\":%" PRIu64
                   ",\"crc_errors\":%" PRIu64 ",\"framing_errors\":%" PRIu64
                   ",\"reconnects\":%" PRIu64 ",\"over_subscribed\":%s}",
                   util > 1.0 ? 1.0 : util, rps, l->overruns, l->link.crc_errors,
                   l->link.framing_errors, l->reconnects, l->over ? "true" : "false");
    l->pub_ms = now_ms;
    l->pub_busy_us = l->busy_us;
    l->pub_requests = l->requests;
}
