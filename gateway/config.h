/* Config: loads and validates the JSON config of Part B of the contract.
 *
 * Every problem is reported as "FILE:LINE:COL: path.to.key: message" (LINE:COL of the offending
 * key, or of the value when the value is wrong), and loading goes on to find all of them.
 * Protocol-specific keys (a device's "connection" object and a tag's protocol fields) are
 * validated against the tables the protocol's plugin declares, so the plugins are loaded while
 * the config is loaded. Relative paths in the config are taken relative to the directory of the
 * config file. */
#ifndef SMP_CONFIG_H
#define SMP_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <simpul/plugin.h>

#include "plugin_host.h"

typedef struct smp_tag_cfg {
    char *name;
    smp_type_t type;
    double scale;         /* default 1 */
    double offset;        /* default 0 */
    char *unit;           /* NULL when absent */
    uint32_t interval_ms; /* 0 = the device's */
    double deadband;      /* default 0: any change is reported */
    bool writable;
    bool has_min, has_max;
    double min, max; /* engineering units */
    /* min/max written as JSON integers, kept exact (a double loses them above 2^53) */
    bool min_is_int, max_is_int;
    int64_t min_i, max_i;
    smp_param_t *params; /* plugin tag keys, index-aligned with plugin->tag_keys */
} smp_tag_cfg_t;

typedef struct smp_device_cfg {
    char *name;
    char *protocol;
    char *profile;                   /* NULL when absent */
    uint32_t interval_ms;            /* default 1000 */
    uint32_t refresh_s;              /* full refresh period, default 300 */
    const smp_plugin_host_t *plugin; /* borrowed from the config's plugin set */
    smp_param_t *conn_params;        /* index-aligned with plugin->desc->conn_keys */
    char conn_key[256];              /* from plugin conn_key(): equal => shared connection */
    smp_tag_cfg_t *tags;             /* profile's tags first, then the device's own */
    size_t ntags;
    bool tags_shared; /* tags belong to an earlier device with the same profile and protocol */
} smp_device_cfg_t;

/* mqtt.format: which contracts the gateway speaks (docs/sparkplug.md). */
enum { SMP_FORMAT_JSON = 1, SMP_FORMAT_SPARKPLUG = 2, SMP_FORMAT_BOTH = 3 };

typedef struct smp_config {
    char *path; /* the file loaded */
    struct {
        char *id;
        char *data_dir;         /* default "./data" */
        char *plugin_dir;       /* NULL: use the default search path (plugin_host.h) */
        char *log_level;        /* default "info" */
        int metrics_interval_s; /* P/G/metrics period, default 60 */
    } gateway;
    struct {
        char *host;         /* default "127.0.0.1" */
        int port;           /* default 1883 */
        char *client_id;    /* default "simpul-" + gateway id */
        char *topic_prefix; /* default "simpul" */
        int qos;            /* 0 or 1, default 1 */
        int keepalive_s;    /* default 30 */
        int version;        /* 3 (= "3.1"), 4 (= "3.1.1", default) or 5 (= "5") */
        char *username;
        char *password; /* read from password_file at load time; NULL when absent */
        char *password_file;
        char *tls_ca_file, *tls_cert_file, *tls_key_file;
        bool tls_no_verify; /* tls.verify false: the broker's certificate is not checked */
        int inflight_max;   /* QoS 1 messages awaiting PUBACK, default 256 */
        int format;         /* SMP_FORMAT_JSON (default), SMP_FORMAT_SPARKPLUG, SMP_FORMAT_BOTH */
        struct {
            char *group_id;        /* required with a sparkplug format */
            char *edge_node_id;    /* default gateway.id */
            char *primary_host_id; /* NULL when absent */
            bool use_aliases;      /* default true */
        } sparkplug;
    } mqtt;
    struct {
        char *path;              /* default data_dir + "/simpul.db" */
        int history_retention_h; /* default 168 */
        double outbox_max_mb;    /* default 256; fractions allowed (0.01 .. 1048576) */
        bool sync_normal;        /* "synchronous": "normal" (true) or "full" (false, default) */
        bool on_error_refuse;    /* "on_error": "refuse" (true) or "degraded" (false, default) */
        double history_max_mb;   /* default 256; 0: no size bound */
        int history_chunk_max_s; /* default 900: longest time a history chunk stays open */
        char *runtime_dir;       /* default $RUNTIME_DIRECTORY, else /dev/shm/simpul-<gateway.id> */
        int commit_interval_ms;  /* default 1000; 0: commit every message before publishing */
        bool skip_check;         /* "quick_check": "off" (read at start only) */
    } store;
    struct {
        /* Commands and their limits (docs/config.md, "commands"). */
        int dedup_window_s;       /* at-most-once window per (device, id), default 600 */
        int rate_per_device;      /* commands per second per device (burst as many), 20 */
        int rate_global;          /* commands per second in all, 200 */
        int dedup_max;            /* ids remembered at once, 10000 */
        int result_max_bytes;     /* largest answer kept for duplicates, 4096 */
        int audit_max_rows;       /* audit rows kept, 1000000 */
        int audit_retention_days; /* audit rows kept this long, 90 */
    } commands;
    smp_device_cfg_t *devices;
    size_t ndevices;
    smp_plugin_set_t *plugins; /* owned: plugins loaded for the devices' protocols */
} smp_config_t;

/* Loads and validates `path`. On success returns 0 and *out (owned by the caller, free with
 * smp_config_free). On failure prints every problem to `errs` (one per line, as above),
 * returns the number of problems (> 0) and leaves *out NULL. `plugin_dir_override` (may be
 * NULL) wins over the config's gateway.plugin_dir. */
int smp_config_load(const char *path, const char *plugin_dir_override, FILE *errs,
                    smp_config_t **out);
/* Same, from text in memory (tests, fuzzing); `name` is used in messages and for relative
 * paths. */
int smp_config_load_text(const char *name, const char *text, size_t len,
                         const char *plugin_dir_override, FILE *errs, smp_config_t **out);
void smp_config_free(smp_config_t *cfg);

/* Finds a device by name; NULL when absent. */
const smp_device_cfg_t *smp_config_device(const smp_config_t *cfg, const char *name);

const char *smp_type_name(smp_type_t t);

/* A reload (engine.h, smp_engine_reload). Two devices are equal when everything that defines
 * them is: name, protocol, intervals, plugin, connection keys and every tag (compared by
 * content, whether a profile or the device gives them: a profile's tags are shared within one
 * config only). */
bool smp_device_cfg_equal(const smp_device_cfg_t *a, const smp_device_cfg_t *b);
/* The same plugin library, loaded by two configs. */
bool smp_plugin_host_same(const smp_plugin_host_t *a, const smp_plugin_host_t *b);
/* The MQTT client settings (broker, client id, credentials, TLS, keepalive, version, window). */
bool smp_config_mqtt_equal(const smp_config_t *a, const smp_config_t *b);
/* The first key of `b` that differs from `a` and cannot change while simpul runs (gateway.id,
 * data_dir, topic_prefix, format, sparkplug, store.*, the commands' store limits), or NULL. */
const char *smp_config_fixed_change(const smp_config_t *a, const smp_config_t *b);

#endif
