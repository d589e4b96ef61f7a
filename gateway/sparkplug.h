/* Sparkplug B 3.0 edge node (docs/sparkplug.md): simpul is one edge node, each configured
 * device a Sparkplug device, each tag a metric.
 *
 * It owns a second MQTT session (its own bridge instance, client id and Will) beside the JSON
 * one, or instead of it (mqtt.format). Births, deaths and data are built from the engine's tag
 * state; DCMD writes are handed to the engine's command path as JSON commands, so they get the
 * same validation, at-most-once, read-back confirmation and audit as any other command.
 *
 * Engine-internal: runs on the loop thread, reads the engine's device state (engine_internal.h);
 * DCMD writes go to the command module (command.h, smp_commands_receive).
 * Every function accepts a NULL session (format "json") and then does nothing. */
#ifndef SMP_SPARKPLUG_H
#define SMP_SPARKPLUG_H

#include <stdbool.h>
#include <stdint.h>

#include "engine_internal.h"

typedef struct smp_sparkplug smp_sparkplug_t;

/* Creates the session when mqtt.format is "sparkplug" or "both" (else *out = NULL, returns 0).
 * Reads the persisted bdSeq from gateway.data_dir. Returns 0 or a negative code. */
int smp__sparkplug_new(smp_engine_t *e, smp_sparkplug_t **out);
/* Subscribes (NCMD, DCMD, STATE) and starts connecting. */
int smp__sparkplug_start(smp_sparkplug_t *s);
/* Called by the engine's emit for device `d`, before the JSON side consumes the tags' dirty
 * flags: sends the device's DBIRTH (first time in a session) or a DDATA of what changed, or
 * keeps the DDATA for replay when the session is not live. */
void smp__sparkplug_emit(smp_sparkplug_t *s, struct device *d, uint64_t ts);
/* Called when a device's online state changed: DDEATH when it went offline. */
void smp__sparkplug_device_state(smp_sparkplug_t *s, struct device *d);
/* Clean stop: NDEATH (3.1.1) or DISCONNECT 0x04 (MQTT 5), bounded by timeout_ms; the engine's
 * stop progress is called once the session's bridge has stopped. */
void smp__sparkplug_stop(smp_sparkplug_t *s, uint32_t timeout_ms);
/* True when stopped (or NULL). */
bool smp__sparkplug_stopped(const smp_sparkplug_t *s);
/* A reload changed e->devs (`old`: the list before, whose retiring devices are going): DDEATH
 * for those that were born, then a rebirth (NBIRTH and DBIRTHs) of a live session. */
int smp__sparkplug_devices_changed(smp_sparkplug_t *s, struct device *const *old, size_t nold);
/* A reload's config (borrowed, as at new): reconnects once when `reconnect` (MQTT settings
 * changed), else only takes the new config's pointers. */
void smp__sparkplug_reconfigure(smp_sparkplug_t *s, const smp_config_t *cfg, bool reconnect);
/* After the stop; NULL is a no-op. */
void smp__sparkplug_free(smp_sparkplug_t *s);

#endif
