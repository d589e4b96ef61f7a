/* Operator commands: strict parsing and validation (pure functions, unit-tested) and their
 * execution by the engine (command.c). The contract is docs/contract.md, "Commands".
 *
 * Safety rules: a command is validated completely before any device I/O; it runs at most once
 * per (device, id) within commands.dedup_window_s, across restarts; a retained delivery is never
 * executed; it is refused once expired; a
 * write is answered ok only after the device accepted it and a read-back returned the value
 * written; every command, valid or not, is audited. */
#ifndef SMP_COMMAND_H
#define SMP_COMMAND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>
#include <simpul/plugin.h>

#include "bridge.h"
#include "config.h"
#include "engine_cmd.h"

#define SMP_CMD_MAX_PAYLOAD 65536
#define SMP_CMD_ID_MAX      128
#define SMP_CMD_MAX_TAGS    256
#define SMP_CMD_QUEUE_MAX   16 /* commands waiting per device before "busy" */
#define SMP_CMD_HISTORY_MAX 1000

typedef enum smp_cmd_op {
    SMP_CMD_WRITE = 1,
    SMP_CMD_READ,
    SMP_CMD_HISTORY,
} smp_cmd_op_t;

typedef struct smp_cmd_error {
    const char *code; /* "bad_request", "unknown_tag", ... (static) */
    char message[256];
} smp_cmd_error_t;

typedef struct smp_cmd {
    bool has_id;
    char id[SMP_CMD_ID_MAX + 1];
    smp_cmd_op_t op;
    const char *op_name;
    char tag[128];
    json_t *value; /* write: owned reference */
    char **tags;   /* read: owned */
    size_t ntags;
    bool has_ts, has_ttl;
    int64_t ts, ttl_ms;
    int64_t from, to; /* history */
    size_t limit;
} smp_cmd_t;

/* Parses a command payload strictly. Returns 0, or -EINVAL with err->code "bad_request" and a
 * message. Even on failure out->id/has_id hold the id when one could be read. Free with
 * smp_cmd_free in both cases. */
int smp_cmd_parse(const void *payload, size_t len, smp_cmd_t *out, smp_cmd_error_t *err);
void smp_cmd_free(smp_cmd_t *cmd);

/* What a delivery on a command topic is, before its payload is read. */
typedef struct smp_cmd_delivery {
    char device[128];         /* D of P/G/D/cmd */
    const char *refusal_code; /* NULL, or the code it is answered with, never run */
    const char *refusal_fmt;  /* the message: a printf format taking prefix and gateway id */
    bool use_response_topic;  /* props->response_topic is where the answer goes */
} smp_cmd_delivery_t;
/* Classifies a delivery: -EINVAL when `topic` is no PREFIX/GATEWAY_ID/D/cmd (ignored), else 0
 * with the device name, and a refusal for a retained delivery or a Response Topic outside
 * the reply namespace. `props` may be NULL. Pure (fuzzed: tests/fuzz/fuzz_cmd_props.c). */
int smp_cmd_delivery(const char *topic, const smp_mqtt_props_t *props, const char *prefix,
                     const char *gateway_id, smp_cmd_delivery_t *out);
/* True when an MQTT 5 Response Topic lies in the namespace answers may go to:
 * PREFIX/GATEWAY_ID/reply/ followed by at least one character, no wildcards. */
bool smp_cmd_reply_topic_ok(const char *topic, const char *prefix, const char *gateway_id);
/* ts + ttl_ms (wall-clock ms), saturated at INT64_MAX instead of overflowing. */
int64_t smp_cmd_deadline(const smp_cmd_t *cmd);
/* True when the command carries ts and ttl_ms and now_ms is past ts + ttl_ms. */
bool smp_cmd_expired(const smp_cmd_t *cmd, uint64_t now_ms);

/* Validates a write of JSON `value` (engineering units) to `tag` and converts it to the raw
 * value the driver writes (value = raw * scale + offset, inverted). Errors: not_writable,
 * type_mismatch, out_of_range. For strings raw->s points into *owned (free it). */
int smp_cmd_to_raw(const smp_tag_cfg_t *tag, const json_t *value, smp_value_t *raw, char **owned,
                   smp_cmd_error_t *err);
/* True when the raw read-back equals the raw value written (float32 compared as float32). */
bool smp_cmd_raw_equal(const smp_tag_cfg_t *tag, const smp_value_t *a, const smp_value_t *b);

/* ------------------------------------------------------------------------------------------ */
/* The command module: execution, at-most-once, answers (loop thread). It reaches the engine
 * only through engine_cmd.h; the engine calls it only through these functions. Every function
 * accepts a NULL module (commands unavailable for lack of memory) and then does nothing. */

typedef struct smp_commands smp_commands_t;

/* PUBACK tokens of command answers carry this bit (outbox row ids never do). */
#define SMP_CMD_ANSWER_TOKEN (UINT64_C(1) << 63)

/* Creates the module and restores the recent results from the store (blocking: start-up
 * only). `eng` is copied; what it points to is borrowed. NULL without memory. */
smp_commands_t *smp_commands_new(const smp_cmd_engine_t *eng);
void smp_commands_free(smp_commands_t *s);
/* A delivery on a subscribed topic: a command when the topic is PREFIX/GATEWAY_ID/D/cmd of
 * this gateway (else ignored). `props` may be NULL. */
void smp_commands_receive(smp_commands_t *s, const char *topic, const void *payload, size_t len,
                          const smp_mqtt_props_t *props);
/* The result of the device job queued with `cookie` (the job is the engine's to free). */
void smp_commands_job_done(smp_commands_t *s, void *cookie, const smp_cmd_outcome_t *out);
/* The job queued with `cookie` never reached the device (a forced stop): answered "cancelled". */
void smp_commands_job_cancelled(smp_commands_t *s, void *cookie);
/* The job queued with `cookie` never reached the device because a reload replaced or removed
 * the device: answered "cancelled", saying so. */
void smp_commands_job_replaced(smp_commands_t *s, void *cookie);
/* The job queued with `cookie` finished after the loop stopped: forgotten, unanswered. */
void smp_commands_job_discard(smp_commands_t *s, void *cookie);
/* True while a command is accepted and not yet answered (the stop waits for it). */
bool smp_commands_busy(const smp_commands_t *s);
/* Publishes answers that waited for room in the MQTT window (call on PUBACK and connect). */
void smp_commands_flush(smp_commands_t *s);
/* A PUBACK: true when `token` was an answer's (then handled), false for an outbox row. */
bool smp_commands_acked(smp_commands_t *s, uint64_t token);
/* The connection is gone: answers not acknowledged are sent again after the next connect. */
void smp_commands_disconnected(smp_commands_t *s);
/* A reload changed the engine's devices: now `ndevs` under `cfg`; map[k] is the new index of
 * the device that had index k (nold of them), -1 when it was replaced or removed. Commands of
 * a replaced device that have not reached it are answered "cancelled"; one already running
 * finishes and is answered, its read-back not published. */
void smp_commands_devices_changed(smp_commands_t *s, const smp_config_t *cfg, size_t ndevs,
                                  const int *map, size_t nold);
/* Commands answered so far (metrics "commands"). */
uint64_t smp_commands_answered(const smp_commands_t *s);

#endif
