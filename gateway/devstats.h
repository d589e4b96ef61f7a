/* devstats: per-device health for P/G/metrics' "devices" group (docs/contract.md).
 *
 * Polls and failed polls since start, the driver's read latency (p50 and p99 over the last
 * SMP_DEVSTATS_WINDOW reads), the wall time of the last successful poll and the device's
 * current backoff. Loop thread only: the worker measures a read into its job, the loop folds
 * the job in here. */
#ifndef SMP_DEVSTATS_H
#define SMP_DEVSTATS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "value.h"

#define SMP_DEVSTATS_WINDOW 128

typedef struct smp_devstats {
    uint64_t polls, errors;
    uint64_t last_ok_ts; /* ms since the epoch; 0: never */
    uint32_t backoff_ms;
    uint32_t lat_us[SMP_DEVSTATS_WINDOW]; /* ring of the last reads' latencies */
    size_t lat_n, lat_next;
} smp_devstats_t;

/* One completed poll: `read_us` is what the driver call took (0 when none was made, e.g. a
 * device in backoff: not counted in the latency window). */
void smp_devstats_poll(smp_devstats_t *s, bool ok, uint64_t read_us, uint64_t wall_ms,
                       uint32_t backoff_ms);
/* Appends `"name":{...}` for one device to `b`. */
void smp_devstats_json(const smp_devstats_t *s, const char *name, smp_buf_t *b);

#endif
