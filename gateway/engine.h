/* Engine: the gateway's core on the loop thread.
 *
 * It owns one worker thread per connection (blocking driver I/O lives there), schedules polls
 * per device and per tag interval, turns readings into engineering values, applies deadbands,
 * builds `data` and `status` payloads, keeps the per-device seq, and moves messages through the
 * store's outbox to the MQTT bridge (persist first, publish, delete on PUBACK). Commands arrive
 * from the bridge and are executed on the device's worker ahead of queued polls. */
#ifndef SMP_ENGINE_H
#define SMP_ENGINE_H

#include <stdint.h>

#include <uv.h>

#include "config.h"

typedef struct smp_engine smp_engine_t;

/* `cfg` is borrowed and must outlive the engine. Opens the store (blocking: start-up only),
 * restores last values and seqs. Returns 0 or a negative code. */
int smp_engine_new(uv_loop_t *loop, const smp_config_t *cfg, smp_engine_t **out);
/* Starts the workers, the poll timers and the MQTT connection. */
int smp_engine_start(smp_engine_t *e);
/* Graceful stop: no new polls, in-flight writes finish, queued messages are committed, the
 * offline status is published, MQTT disconnects; then `done(arg)` runs on the loop thread.
 * The whole sequence is bounded by `timeout_ms`. */
void smp_engine_stop(smp_engine_t *e, uint32_t timeout_ms, void (*done)(void *arg), void *arg);
/* Frees everything after `done` ran and the loop has returned (closes the store). Returns 0,
 * or -EBUSY when a worker thread is still inside a driver call past the stop deadline: the
 * store is then closed (everything queued is committed) but nothing else is freed, and the
 * caller must end the process (_exit) rather than go on. */
int smp_engine_free(smp_engine_t *e);

#endif
