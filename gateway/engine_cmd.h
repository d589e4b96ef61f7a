/* What the command module (command.c) needs from the engine: the narrow interface between them.
 *
 * The engine hands smp_commands_new an smp_cmd_engine_t (its operations and its context); the
 * command module reaches the engine through nothing else. Devices are named by their index in
 * the config (cfg->devices order), device jobs by an opaque handle. The engine, in turn, calls
 * the command module only through command.h (deliveries, job results, PUBACKs, connection
 * changes). Loop thread on both sides. A fake implementation of these operations tests the
 * command module alone (tests/unit/test_command_module.c). */
#ifndef SMP_ENGINE_CMD_H
#define SMP_ENGINE_CMD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <simpul/plugin.h>
#include <uv.h>

#include "bridge.h"
#include "config.h"
#include "store.h"

/* Length of the error texts a device job returns (its own and each tag's). */
#define SMP_ENGINE_ERRMSG_LEN 128

/* Wall-clock milliseconds (CLOCK_REALTIME). */
uint64_t smp__wall_ms(void);

/* A device job: owned by the command module from job_new until job_enqueue (or job_free), then
 * by the engine until it reports the result (command.h). */
typedef struct smp_cmd_job smp_cmd_job_t;

/* What a device job does. Borrowed values must outlive the job: the command owns them. */
typedef struct smp_cmd_job_spec {
    bool write;             /* a write of raw to tag (and its read-back), else a read */
    uint32_t tag;           /* write */
    const smp_value_t *raw; /* write: copied; raw->s is borrowed */
    const uint32_t *idx;    /* read: the tags, borrowed */
    size_t n;               /* read: how many */
} smp_cmd_job_spec_t;

/* A device's state as the commands see it. */
typedef struct smp_cmd_device {
    const smp_device_cfg_t *cfg;
    const char *topic_result; /* PREFIX/GATEWAY_ID/D/cmd/result */
    int online;               /* -1 not polled yet, 0 offline, 1 online */
    const char *status_err;   /* while offline: why */
} smp_cmd_device_t;

typedef struct smp_cmd_engine_ops {
    /* The index of the device called `name`, or -1. */
    int (*find_device)(void *eng, const char *name);
    void (*device)(void *eng, size_t dev, smp_cmd_device_t *out);
    /* A job for device `dev`, or NULL without memory. */
    smp_cmd_job_t *(*job_new)(void *eng, size_t dev, const smp_cmd_job_spec_t *spec);
    void (*job_free)(void *eng, smp_cmd_job_t *job);
    /* Queues the job on the device's connection, ahead of its polls. No device I/O starts
     * after deadline_mono_ms (uv_hrtime() ms; 0 for none). `cookie` comes back with the
     * result (smp_commands_job_done, _cancelled or _discard). */
    void (*job_enqueue)(void *eng, smp_cmd_job_t *job, uint64_t deadline_mono_ms, void *cookie);
    /* A confirmed value of tag `tag`: the tag's newest state, published as data now. */
    void (*emit_reading)(void *eng, size_t dev, uint32_t tag, const smp_reading_t *r,
                         uint64_t ts_ms);
    /* Publishes an answer (QoS 1, reserved room in the window): 0, -EAGAIN when the window
     * is full, -ENOTCONN when not connected, another negative code for a lost message. The
     * PUBACK comes back as smp_commands_acked(token). */
    int (*publish)(void *eng, const char *topic, const char *text, size_t len, uint64_t token,
                   const smp_mqtt_props_t *props);
    /* True once the gateway is stopping: no new device job is accepted. */
    bool (*stopping)(void *eng);
    /* Something the stop may wait for has finished (see smp_commands_busy). */
    void (*progress)(void *eng);
} smp_cmd_engine_ops_t;

/* The engine, as the command module gets it. Everything is borrowed from the engine. */
typedef struct smp_cmd_engine {
    const smp_cmd_engine_ops_t *ops;
    void *eng; /* the first argument of every operation */
    uv_loop_t *loop;
    const smp_config_t *cfg;
    smp_store_t *store; /* results, audit, history */
    size_t ndevs;       /* devices, indexed 0..ndevs-1 */
} smp_cmd_engine_t;

/* The result of a device job, for smp_commands_job_done. Valid during that call only. */
typedef struct smp_cmd_outcome {
    int status;                    /* < 0: the job failed (errmsg says why) */
    const char *errmsg;            /* "" when none */
    bool started;                  /* write: the request may have reached the device */
    uint64_t done_wall_ms;         /* when the device answered */
    const smp_reading_t *rb;       /* write: the read-back */
    const smp_reading_t *readings; /* read: one per tag of the spec */
    const char *tag_errs; /* read: tag k's error text at tag_errs + k * SMP_ENGINE_ERRMSG_LEN */
} smp_cmd_outcome_t;

#endif
