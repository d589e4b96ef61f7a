/* simpul protocol-driver plugin ABI, version 1: the specification.
 *
 * A driver is a shared object NAME.so that exports exactly one symbol, smp_plugin_entry().
 * The host dlopen()s it with RTLD_NOW | RTLD_LOCAL, calls the entry point with its table of
 * host functions and gets back a descriptor. It reads abi_version first, struct_size second,
 * and only then anything else; a plugin of another ABI version is refused. The plugin never
 * links against host symbols: everything it may call is in smp_host_api_t.
 *
 * Threads. The host owns scheduling, timeouts between polls, backoff, status, deadband,
 * scale/offset, JSON and MQTT; a driver writes plain blocking code. Devices whose conn_key()
 * is equal share one *connection*, and every connection has its own host worker thread: all
 * conn_* and device_* calls for one connection come from that thread, one at a time, so the
 * driver needs no locks for per-connection or per-device state. Calls for different
 * connections run concurrently on different threads: state the driver shares between
 * connections (globals, a library's process-wide state) is the driver's to protect.
 * smp_plugin_entry(), check_connection(), check_tag() and conn_key() run on the host's main
 * thread while a config is loaded (at start, on SIGHUP, for --check and --plugin-help).
 *
 * Lifetime. The host may load a plugin, use it and unload it (dlclose) more than once in one
 * process: on every config reload the new config loads its plugins before the old config's are
 * released. The entry point may therefore run several times. A plugin whose libraries keep
 * process-wide state that cannot be torn down should link with -Wl,-z,nodelete (snmp.so
 * does). Order per connection, on its worker thread: conn_create, device_create for each of
 * its devices, then any number of conn_open / device_read / device_write / conn_close, and at
 * the end device_destroy for each device, conn_close, conn_destroy. device_create runs before
 * the first conn_open: it must not do I/O.
 *
 * Errors are 0 or a negative errno-style code (-ETIMEDOUT, -ECONNREFUSED, -EIO, ...). A device
 * that answers with an error of its own is SMP_EDEVICE with a message naming the error in the
 * protocol's words ("illegal data address", "notWritable"). What each code means to the host
 * is given at each function below; the texts the platform sees for the common codes are:
 * -ETIMEDOUT "timeout", -ECONNREFUSED "connection refused", -ENOTCONN "not connected",
 * -ECONNRESET "connection reset", -EHOSTUNREACH "host unreachable", -EKEYREJECTED
 * "authentication failure" (credentials refused), -ENOMEM "out of memory"; others strerror().
 *
 * Ownership words. Borrowed: the callee may use the pointer only for the stated time and never
 * frees it. Static: the pointer must stay valid until the plugin is unloaded. Driver-owned:
 * the driver keeps the memory alive for the stated time; the host copies what it needs.
 *
 * Growth rules (how ABI 1 changes without breaking plugins or hosts):
 *  1. smp_plugin_t grows only by taking its reserved[] slots in order, so its size stays the
 *     same. A host uses a new member only when the plugin's struct_size covers it and it is
 *     not NULL; plugins built against older headers have NULL there. A plugin that claims a
 *     struct_size smaller than offsetof(smp_plugin_t, reserved) is refused; a larger one is
 *     accepted and the host copies only the bytes it knows.
 *  2. smp_host_api_t grows at the end. A plugin reads a member only when the host's
 *     struct_size covers it; the three members below exist in every ABI 1 host.
 *  3. Enums may gain values (key types, log levels). A host refuses at load, with a message
 *     naming the plugin, a key table that uses a type it does not know.
 *  4. smp_value_t, smp_reading_t, smp_param_t, smp_tag_t and smp_config_key_t are used in
 *     arrays or filled by the other side: their layout is fixed for ABI 1. Changing any of them,
 *     or the meaning of an existing member or code, needs ABI 2.
 *  5. An ABI 2 host will keep loading ABI 1 plugins: it reads abi_version (the first member of
 *     every version), and for 1 uses the ABI 1 layout, which it keeps as a struct of its own.
 *
 * What the second driver (SNMP, protocols/snmp) needed from ABI 1: one key type,
 * SMP_KEY_SECRET_FILE (v3 passwords live in files named relative to the config, and only the
 * host knows the config's directory), and the host's text for -EKEYREJECTED. Everything else
 * fitted: UDP's lack of a connection (conn_open only resolves the agent's name), one session
 * per device with its own community or user (device_create gets the device's own connection
 * params), typed values and per-tag type errors (smp_reading_t), tooBig splits (device_read
 * reports how many requests it sent). docs/snmp.md records the limits met on the way.
 */
#ifndef SIMPUL_PLUGIN_H
#define SIMPUL_PLUGIN_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SMP_PLUGIN_ABI_VERSION 1u

/* The device answered with an error of its own (an exception, an error-status). Below -4095,
 * so it never collides with an errno value. The message given with it is what the platform
 * sees, e.g. "illegal data address"; commands answer it as "device_error". */
#define SMP_EDEVICE (-5000)

/* Value types of the contract (docs/contract.md). */
typedef enum smp_type {
    SMP_TYPE_BOOL = 1,
    SMP_TYPE_INT16,
    SMP_TYPE_UINT16,
    SMP_TYPE_INT32,
    SMP_TYPE_UINT32,
    SMP_TYPE_INT64,
    SMP_TYPE_UINT64,
    SMP_TYPE_FLOAT32,
    SMP_TYPE_FLOAT64,
    SMP_TYPE_STRING,
} smp_type_t;

/* A raw value as the device holds it (before scale/offset). Exactly one member of the union is
 * meaningful, chosen by the tag's smp_type_t: b for BOOL; i for INT16/32/64; u for
 * UINT16/32/64; d for FLOAT32/64 (a float32 is widened exactly); s/len for STRING (UTF-8, not
 * necessarily NUL-terminated; the host publishes at most the first 1024 bytes).
 * Strings a driver returns are driver-owned until the next call on the same device; the host
 * copies them at once. Strings the host passes in are borrowed for the duration of the call. */
typedef struct smp_value {
    union {
        bool b;
        int64_t i;
        uint64_t u;
        double d;
    } v;
    const char *s;
    size_t len;
} smp_value_t;

/* The outcome of reading one tag. status is 0 (value valid) or a negative code; message
 * explains a failure (NULL when status is 0; when NULL on a failure the host uses the code's
 * text). message is static or driver-owned until the next call on the same device. */
typedef struct smp_reading {
    int status;
    const char *message;
    smp_value_t value;
} smp_reading_t;

/* Config keys a driver declares, once for its "connection" object and once for the
 * protocol-specific fields of a tag. The host validates every config against these tables
 * before any driver function sees it: it rejects unknown and duplicate keys, wrong JSON types,
 * integers outside [min, max] and strings outside `choices`, reports missing required keys,
 * and fills in defaults. `simpul --plugin-help NAME` and `--plugin-schema NAME` are generated
 * from the same tables, and a CI test compares the latter with config/simpul.schema.json. */
typedef enum smp_key_type {
    SMP_KEY_STRING = 1, /* JSON string; param.s */
    SMP_KEY_INT,        /* JSON integer within [min, max]; param.i (and param.d) */
    SMP_KEY_NUMBER,     /* JSON number; param.d */
    SMP_KEY_BOOL,       /* JSON true/false; param.i is 0 or 1 */
    SMP_KEY_ENUM,       /* JSON string, one of `choices`; param.i is its index, param.s it */
    /* JSON string naming a file that holds a secret (a password). The host resolves the path
     * against the config file's directory, reads the file with the checks of
     * mqtt.password_file (a readable regular file of at most 65535 bytes, no NUL byte; one
     * trailing newline dropped) and hands the plugin the secret itself in param.s, never the
     * path. Takes no default. Added within ABI 1 for SNMPv3; a host that predates it refuses
     * the plugin at load ("unknown type 6"). */
    SMP_KEY_SECRET_FILE,
} smp_key_type_t;

/* One key of a table. Tables are static arrays terminated by an entry whose name is NULL,
 * at most 64 keys. The host refuses the plugin at load when a table breaks a rule. */
typedef struct smp_config_key {
    const char *name; /* 1-64 of [a-z0-9_], unique in its table; a tag key may not
                         be a host tag field (name, type, scale, offset, unit,
                         interval_ms, deadband, writable, min, max) */
    smp_key_type_t type;
    bool required;              /* missing => config error "missing required key" */
    int64_t min, max;           /* SMP_KEY_INT only: min <= max */
    const char *const *choices; /* SMP_KEY_ENUM only: 1-64 non-empty strings, NULL-terminated */
    const char *default_value;  /* JSON text of the default (of the key's type, within range),
                                   or NULL: the key stays unset when absent */
    const char *description;    /* one line for --plugin-help and the schema */
} smp_config_key_t;

/* One resolved key, index-aligned with the declaring smp_config_key_t table. `set` is true when
 * the config gave the key or it has a default (a driver that must tell the two apart declares
 * no default and applies its own). i holds INT, BOOL (0/1) and ENUM (index); d holds NUMBER
 * (and INT, converted); s holds STRING, ENUM (the choice text) and SECRET_FILE (the secret).
 * Borrowed: valid for as long as the object it was passed with. */
typedef struct smp_param {
    bool set;
    int64_t i;
    double d;
    const char *s;
} smp_param_t;

/* A tag as the driver sees it. Borrowed from the host for the lifetime of the device. type and
 * writable are the config's; the host has checked type-independent rules (min <= max, no scale
 * on strings...) and the driver's check_tag has accepted the rest. */
typedef struct smp_tag {
    const char *name;
    smp_type_t type;
    bool writable;
    const smp_param_t *params; /* index-aligned with the driver's tag_keys */
} smp_tag_t;

/* Log levels for smp_host_api_t.log. */
enum { SMP_LOG_ERROR = 0, SMP_LOG_WARN, SMP_LOG_INFO, SMP_LOG_DEBUG };

/* Host functions handed to the plugin. Borrowed: valid until the plugin is unloaded. Every
 * function may be called from any thread. */
typedef struct smp_host_api {
    uint32_t abi_version; /* SMP_PLUGIN_ABI_VERSION of the host */
    uint32_t struct_size; /* sizeof(smp_host_api_t) as the host saw it */
    /* Writes one log line. log_ctx is a log_ctx the host gave the plugin (conn_create,
     * device_create) or NULL; the host prefixes the line with it, e.g. "[snmp:ups-01] ".
     * A level outside SMP_LOG_ERROR..SMP_LOG_DEBUG is clamped; lines above the configured
     * level are dropped before fmt is formatted. */
    void (*log)(void *log_ctx, int level, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 3, 4)))
#endif
        ;
    uint64_t (*monotonic_ms)(void); /* CLOCK_MONOTONIC in ms: for timeouts */
    uint64_t (*wall_ms)(void);      /* CLOCK_REALTIME in ms: for timestamps that leave */
    /* Added in 1.1 (growth rule 2: read it only when the host's struct_size covers it). On
     * a worker thread inside device_write: the monotonic_ms() time by which the call must be
     * done, or 0 for no deadline (commands with ttl_ms have one). A driver waits no longer
     * than what is left for any reply, and sends no write once it has passed: it returns
     * -ETIME instead ("expired", nothing written). */
    uint64_t (*call_deadline_ms)(void);
} smp_host_api_t;

/* Link counters of one connection, cumulative since conn_create (see conn_stats). */
typedef struct smp_conn_stats {
    uint64_t crc_errors;     /* replies refused for a bad checksum */
    uint64_t framing_errors; /* replies refused for their framing: length, ids, function, count */
} smp_conn_stats_t;

/* Where a check_* function reports a problem: `key` names the offending key inside the object
 * being checked (or NULL for the object itself); fmt is printf-style. The host prints it as
 * "FILE:LINE:COL: path.to.key: message". Call it once per problem; report_ctx is the value the
 * check function received. Main thread, during the check call only. */
typedef void (*smp_report_fn)(void *report_ctx, const char *key, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

typedef struct smp_plugin {
    uint32_t abi_version; /* SMP_PLUGIN_ABI_VERSION the plugin was built against */
    uint32_t struct_size; /* sizeof(smp_plugin_t) as the plugin saw it */
    const char *name;     /* static; 1-64 of [a-z0-9_]; the config's "protocol" and the file
                             name NAME.so (a mismatch is refused) */
    const char *version;  /* static; the plugin's own version, shown by --plugins; NULL
                             reads as "unknown" */

    /* Static key tables (see smp_config_key_t). Both required; an empty table is just the
     * terminating entry. */
    const smp_config_key_t *conn_keys;
    const smp_config_key_t *tag_keys;

    /* Cross-field checks, after the host validated the object against the table (so every
     * param that is set has the right type and range). conn and tag are borrowed for the call.
     * Report each problem with `report` and return the number reported (> 0 without a report
     * still fails, as "refused by protocol"). May be NULL (no such rules). Main thread. */
    int (*check_connection)(const smp_param_t *conn, smp_report_fn report, void *report_ctx);
    int (*check_tag)(const smp_tag_t *tag, smp_report_fn report, void *report_ctx);

    /* Writes into buf (n bytes, 256 today) a NUL-terminated key that is equal for two devices
     * exactly when they must share one connection (one worker thread), e.g. "tcp:10.0.0.21:502"
     * or "udp:10.0.3.7:161". The key also names the connection in log lines. Returns 0,
     * or -ENOSPC (a config error). Only called when check_connection found no problem. Main
     * thread. Required. */
    int (*conn_key)(const smp_param_t *conn, char *buf, size_t n);

    /* Allocates a connection without doing I/O. conn (the params of the connection's first
     * device) and log_ctx are borrowed and outlive the connection. Returns the driver's handle,
     * or NULL: every call on the connection then fails, logged as "driver could not create the
     * connection". Worker thread. Required. */
    void *(*conn_create)(const smp_param_t *conn, void *log_ctx);
    /* Connects (blocking, bounded by the driver's own timeout). Returns 0, or a negative code
     * that becomes the offline reason of the connection's devices; the host retries with
     * backoff (1 s doubling to 30 s). Called on a closed connection before the first call
     * after creation or after conn_close. Worker thread. Required. */
    int (*conn_open)(void *c);
    /* Disconnects; must accept an already closed connection. The host closes after a failed
     * device call (see device_read) and before conn_destroy. Worker thread. Required. */
    void (*conn_close)(void *c);
    /* Frees the connection; conn_destroy(NULL) must be a no-op. Worker thread. Required. */
    void (*conn_destroy)(void *c);

    /* Creates the driver's state for one device on connection c (Modbus: a unit id; SNMP: a
     * session with its own community or user). dev_conn holds the device's own connection
     * params (they may differ from the ones conn_create saw in keys that do not enter
     * conn_key). dev_conn, tags (ntags entries, index-aligned with the config's tags) and
     * log_ctx are borrowed for the device's lifetime. No I/O: the connection is not open yet.
     * Returns the handle, or NULL: the device's calls then fail ("driver could not create the
     * device"). Worker thread. Required. */
    void *(*device_create)(void *c, const smp_param_t *dev_conn, const smp_tag_t *tags,
                           size_t ntags, void *log_ctx);
    /* Frees a device's state; called before conn_close/conn_destroy of its connection. Worker
     * thread. Required. */
    void (*device_destroy)(void *dev);

    /* Reads tags idx[0..n) (indices into the device's tags; borrowed for the call) in as few
     * requests as the protocol allows, filling out[k] for idx[k] (host memory, zeroed, n
     * entries). Returns:
     *  - the number of requests sent (>= 0) when the device answered, even if some tags
     *    failed: the device is online, each out[k] is a value or that tag's error;
     *  - -ETIMEDOUT when the device did not answer: the device goes offline ("timeout") and
     *    is retried with backoff; after 2 timeouts in a row on the connection the host also
     *    closes and reopens it (a late reply must not be taken for the next answer);
     *  - another negative code when the connection failed: every device on it goes offline with
     *    that code's text, the host calls conn_close and reopens later. out[] is ignored.
     * Worker thread. Required. */
    int (*device_read)(void *dev, const uint32_t *idx, size_t n, smp_reading_t *out);

    /* Writes raw value `in` (borrowed; the host has already inverted scale/offset, checked
     * writable, type and min/max) to tag idx, then reads the tag back into *readback (host
     * memory, zeroed). *message (static or driver-owned until the next call on the device)
     * explains a failure. Returns, with the command error code the platform sees:
     *  - 0: accepted and read back; a readback.status != 0 answers "device_error" ("write
     *    accepted but the read-back failed"), a read-back value other than the one written
     *    answers "device_error" too;
     *  - SMP_EDEVICE: the device refused; "device_error" with *message;
     *  - -ERANGE or -E2BIG: the value does not fit the device's type; "out_of_range";
     *  - -EINVAL: the value cannot be encoded for this tag; "type_mismatch";
     *  - -EPERM: the driver refuses to write this tag; "not_writable";
     *  - -ETIMEDOUT or any other code: the request may have reached the device, so the
     *    outcome is unknown: "timeout"; the host treats the connection as in device_read.
     * The first four leave the connection open. The host executes a command at most once;
     * a driver must not re-send a write the device may have applied unless the protocol
     * makes the repetition harmless. Worker thread. Required. */
    int (*device_write)(void *dev, uint32_t idx, const smp_value_t *in, smp_reading_t *readback,
                        const char **message);

    /* Added in 1.1, in the first reserved slot (growth rule 1; NULL in older plugins): a
     * check across one device's connection and all its tags, after check_connection and
     * check_tag passed (e.g. "a broadcast unit id with writable tags"). Returns the number of
     * problems reported; `key` of a report names a key of the connection object. Main
     * thread. Optional. */
    int (*check_device)(const smp_param_t *conn, const smp_tag_t *tags, size_t ntags,
                        smp_report_fn report, void *report_ctx);

    /* Added in 1.1 (reserved slot; optional): fills *out with the counters of connection c
     * (a conn_create result), cumulative since conn_create. Called on the connection's worker
     * thread after each job. */
    void (*conn_stats)(void *c, smp_conn_stats_t *out);

    /* Added in 1.1 (reserved slot; optional): for commissioning (simpul --probe), describes
     * tag idx of dev after a device_read: where it lives in the protocol's terms (e.g.
     * "holding_register 10-11") into where[wn], and the raw data the last read returned for
     * it (e.g. "05AA 0000", or "" when it was not read) into raw[rn]. Both NUL-terminated,
     * truncated to fit. Returns 0 or -EINVAL. Same thread as device_read. */
    int (*tag_detail)(void *dev, uint32_t idx, char *where, size_t wn, char *raw, size_t rn);

    void *reserved[5]; /* must be NULL; future members take these slots (growth rule 1) */
} smp_plugin_t;

/* The one exported symbol. `host` is borrowed and stays valid until the plugin is unloaded.
 * Returns a static descriptor, or NULL if the plugin cannot work with this host (the host
 * reports "the plugin refused to start"). Check host->abi_version and host->struct_size before
 * using the table. Main thread; may run more than once per process (see Lifetime). */
typedef const smp_plugin_t *(*smp_plugin_entry_fn)(const smp_host_api_t *host);
#define SMP_PLUGIN_ENTRY_SYMBOL "smp_plugin_entry"

#if defined(__GNUC__)
#define SMP_PLUGIN_EXPORT __attribute__((visibility("default")))
#else
#define SMP_PLUGIN_EXPORT
#endif

#ifdef __cplusplus
}
#endif
#endif /* SIMPUL_PLUGIN_H */
