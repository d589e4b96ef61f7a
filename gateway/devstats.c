#include "devstats.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

void smp_devstats_poll(smp_devstats_t *s, bool ok, uint64_t read_us, uint64_t wall_ms,
                       uint32_t backoff_ms)
{
    if (ok) {
        s->polls++;
        s->last_ok_ts = wall_ms;
    } else {
        s->errors++;
    }
    s->backoff_ms = backoff_ms;
    if (read_us > 0) {
        s->lat_us[s->lat_next] = read_us > UINT32_MAX ? UINT32_MAX : (uint32_t)read_us;
        s->lat_next = (s->lat_next + 1) % SMP_DEVSTATS_WINDOW;
        if (s->lat_n < SMP_DEVSTATS_WINDOW) {
            s->lat_n++;
        }
    }
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of the sorted window, in ms. */
static double pct_ms(const uint32_t *sorted, size_t n, unsigned pct)
{
    size_t rank = (n * pct + 99) / 100; /* ceil(n * pct / 100), 1-based */
    return (double)sorted[rank > 0 ? rank - 1 : 0] / 1000.0;
}

void smp_devstats_json(const smp_devstats_t *s, const char *name, smp_buf_t *b)
{
    smp_buf_printf(b, "\"%s\":{\"polls\":%" PRIu64 ",\"errors\":%" PRIu64, name, s->polls,
                   s->errors);
    if (s->lat_n > 0) {
        uint32_t sorted[SMP_DEVSTATS_WINDOW];
        memcpy(sorted, s->lat_us, s->lat_n * sizeof sorted[0]);
        qsort(sorted, s->lat_n, sizeof sorted[0], cmp_u32);
        smp_buf_printf(b, ",\"latency_ms_p50\":%.3f,\"latency_ms_p99\":%.3f",
                       pct_ms(sorted, s->lat_n, 50), pct_ms(sorted, s->lat_n, 99));
    } else {
        smp_buf_printf(b, ",\"latency_ms_p50\":null,\"latency_ms_p99\":null");
    }
    if (s->last_ok_ts > 0) {
        smp_buf_printf(b, ",\"last_ok_ts\":%" PRIu64, s->last_ok_ts);
    } else {
        smp_buf_printf(b, ",\"last_ok_ts\":null");
    }
    smp_buf_printf(b, ",\"backoff_ms\":%" PRIu32 "}", s->backoff_ms);
}
