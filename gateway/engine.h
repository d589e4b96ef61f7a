/* Engine: the gateway's core on the loop thread.
 *
 * It owns one worker thread per connection (blocking driver I/O lives there), schedules polls
 * per device and per tag interval, turns readings into engineering values, applies deadbands,
 * builds `data` and `status` payloads, keeps the per-device seq, and moves messages through the
 * store's outbox to the MQTT bridge (persist first, publish, delete on PUBACK). Commands arrive
 * from the bridge and go to the command module (command.h), which has them executed on the
 * device's worker ahead of queued polls through the engine's interface (engine_cmd.h). */
#ifndef SMP_ENGINE_H
#define SMP_ENGINE_H

#include <stdbool.h>
#include <stddef.h>
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

/* Applies `cfg` (borrowed, must outlive its use) to the running engine, on the loop thread:
 * the store stays open; devices whose definition is unchanged keep polling (same timers, same
 * connection); removed devices retire with a retained status {"state":"offline",...,"error":
 * "removed from the config"}; changed devices are replaced (their seq goes on); added ones
 * start; changed MQTT settings reconnect once, unchanged ones not at all. Returns 0, -EPERM
 * when cfg changes a key that cannot change live (smp_config_fixed_change: logged, nothing
 * changed), -EBUSY while the previous reload is still letting devices go, or -ENOMEM.
 * Each earlier config the engine no longer refers to is handed to `release(arg, cfg)` (later,
 * from the loop); one still held when the engine is freed is the caller's to free after. */
int smp_engine_reload(smp_engine_t *e, const smp_config_t *cfg,
                      void (*release)(void *arg, const smp_config_t *cfg), void *arg);

/* What the service manager is told (systemd's readiness and STATUS= line). */
typedef struct smp_engine_health {
    size_t devices;        /* configured */
    size_t online;         /* online now */
    size_t tried;          /* devices whose first poll has completed, online or not */
    uint64_t outbox_depth; /* messages waiting for the broker's acknowledgement */
    bool mqtt_connected;
    bool store_degraded; /* store.on_error "degraded" in effect */
} smp_engine_health_t;
/* Fills *out. Loop thread, after smp_engine_new succeeded. */
void smp_engine_health(smp_engine_t *e, smp_engine_health_t *out);

#endif
