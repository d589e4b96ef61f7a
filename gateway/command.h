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

#endif
