/* simpul protocol-driver plugin ABI, version 1.
 *
 * A driver is a shared object that exports exactly one symbol, smp_plugin_entry(). The host
 * dlopen()s it with RTLD_NOW | RTLD_LOCAL, calls the entry point with its table of host
 * functions, and gets back a descriptor. The host checks abi_version and struct_size before it
 * touches anything else; a plugin of another ABI version is refused.
 *
 * Threads. The host owns scheduling, backoff, status, deadband, scale/offset, JSON and MQTT.
 * A driver writes plain blocking code. Every connection (one TCP endpoint, one serial bus) gets
 * its own host worker thread; all conn_* and device_* calls for one connection are made from
 * that thread, one at a time, so a driver needs no locking of its own for per-connection state.
 * check_* and conn_key are called from the host's main thread while the config is loaded.
 *
 * Compatibility. Structs here grow only at the end. A plugin built against ABI 1 keeps working
 * with any host that accepts ABI 1; struct_size lets either side tell which fields exist.
 *
 * Errors are 0 or a negative errno-style code (-ETIMEDOUT, -ECONNREFUSED, -EIO, ...). Device
 * exceptions use the SMP_E* codes below.
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

/* Device-level errors a driver may return for one tag or one call (below -4095, so they never
 * collide with errno values). The message a driver gives for such an error is what the
 * platform sees, e.g. "illegal data address". */
#define SMP_EDEVICE (-5000) /* the device answered with an exception */

/* Value types of the contract. */
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
 * UINT16/32/64; d for FLOAT32/64 (a float32 is widened exactly); s/len for STRING.
 * For strings read by a driver, s points into driver memory that stays valid until the next
 * call on the same device; the host copies it. For strings the host passes in, s is borrowed
 * for the duration of the call. */
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

/* Per-tag outcome of a read. status is 0 (value valid) or a negative code; message is a
 * static or driver-owned string describing a failure (NULL when status is 0). */
typedef struct smp_reading {
    int status;
    const char *message;
    smp_value_t value;
} smp_reading_t;

/* Config keys a driver declares, once for its "connection" object and once for the
 * protocol-specific fields of a tag. The host validates a config against these tables: it
 * rejects unknown and duplicate keys, wrong types, out-of-range integers and values outside
 * `choices`, fills in defaults, and generates --help text and the JSON Schema from them. */
typedef enum smp_key_type {
    SMP_KEY_STRING = 1,
    SMP_KEY_INT,    /* JSON integer within [min, max] */
    SMP_KEY_NUMBER, /* JSON number */
    SMP_KEY_BOOL,
    SMP_KEY_ENUM, /* JSON string, one of `choices`; param.i is its index */
    /* JSON string naming a file that holds a secret (a password). The host resolves the path
     * against the config file's directory, reads the file with the checks of
     * mqtt.password_file (a readable regular file of at most 65535 bytes, no NUL byte; one
     * trailing newline dropped) and hands the plugin the secret itself in param.s, never the
     * path. Takes no default. Added in ABI 1 for SNMPv3 (a host that predates it refuses the
     * plugin at load with "unknown type 6"). */
    SMP_KEY_SECRET_FILE,
} smp_key_type_t;

typedef struct smp_config_key {
    const char *name;
    smp_key_type_t type;
    bool required;
    int64_t min, max;           /* SMP_KEY_INT only */
    const char *const *choices; /* SMP_KEY_ENUM only: NULL-terminated */
    const char *default_value;  /* JSON text of the default, or NULL for none */
    const char *description;
} smp_config_key_t;

/* One resolved key, index-aligned with the declaring smp_config_key_t table. `set` is true when
 * the config gave the key or it has a default. i holds INT, BOOL (0/1) and ENUM (index);
 * d holds NUMBER (and INT, converted); s holds STRING and ENUM (the choice text). Borrowed:
 * valid for as long as the object it was passed with. */
typedef struct smp_param {
    bool set;
    int64_t i;
    double d;
    const char *s;
} smp_param_t;

/* A tag as the driver sees it. Borrowed from the host for the lifetime of the device. */
typedef struct smp_tag {
    const char *name;
    smp_type_t type;
    bool writable;
    const smp_param_t *params; /* index-aligned with the driver's tag_keys */
} smp_tag_t;

/* Host functions handed to the plugin. log_ctx identifies who logs (a device or connection);
 * the host prefixes the line with "[protocol:device]". */
enum { SMP_LOG_ERROR = 0, SMP_LOG_WARN, SMP_LOG_INFO, SMP_LOG_DEBUG };

typedef struct smp_host_api {
    uint32_t abi_version;
    uint32_t struct_size;
    void (*log)(void *log_ctx, int level, const char *fmt, ...)
#if defined(__GNUC__)
        __attribute__((format(printf, 3, 4)))
#endif
        ;
    uint64_t (*monotonic_ms)(void);
    uint64_t (*wall_ms)(void);
} smp_host_api_t;

/* Where a check_* function reports a problem: `key` names the offending key inside the object
 * being checked (or NULL for the object itself). Returns nothing; call it once per problem. */
typedef void (*smp_report_fn)(void *report_ctx, const char *key, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

typedef struct smp_plugin {
    uint32_t abi_version; /* SMP_PLUGIN_ABI_VERSION the plugin was built against */
    uint32_t struct_size; /* sizeof(smp_plugin_t) as the plugin saw it */
    const char *name;     /* protocol name used in configs, e.g. "modbus" */
    const char *version;  /* the plugin's own version string */

    const smp_config_key_t *conn_keys; /* terminated by an entry with name == NULL */
    const smp_config_key_t *tag_keys;  /* terminated by an entry with name == NULL */

    /* Cross-field checks after the host validated keys against the tables (e.g. "string needs
     * length"). Return the number of problems reported. Main thread. */
    int (*check_connection)(const smp_param_t *conn, smp_report_fn report, void *report_ctx);
    int (*check_tag)(const smp_tag_t *tag, smp_report_fn report, void *report_ctx);

    /* Writes into buf (size n) a key that is equal for two devices exactly when they must share
     * one connection, e.g. "tcp:10.0.0.21:502" or "rtu:/dev/ttyUSB0". Returns 0 or -ENOSPC. */
    int (*conn_key)(const smp_param_t *conn, char *buf, size_t n);

    /* Connection lifecycle, on the connection's worker thread. conn_create allocates without
     * doing I/O and returns NULL on failure; conn is borrowed and outlives the connection.
     * conn_open connects (blocking, bounded by the driver's timeout); conn_close disconnects
     * and may be called on a closed connection; conn_destroy(NULL) is a no-op. */
    void *(*conn_create)(const smp_param_t *conn, void *log_ctx);
    int (*conn_open)(void *c);
    void (*conn_close)(void *c);
    void (*conn_destroy)(void *c);

    /* A device on a connection (Modbus: a unit id). dev_conn holds the device's own connection
     * params (its unit id may differ from the one conn_create saw). tags is borrowed for the
     * device's lifetime. Returns NULL on failure. */
    void *(*device_create)(void *c, const smp_param_t *dev_conn, const smp_tag_t *tags,
                           size_t ntags, void *log_ctx);
    void (*device_destroy)(void *dev);

    /* Reads tags idx[0..n) (indices into the device's tags) in as few requests as the
     * protocol allows, filling out[k] for idx[k]. Returns the number of requests issued
     * (>= 0) when the device was reached, even if some tags failed, or a negative code when
     * the connection failed (the host will then close and later reopen it). */
    int (*device_read)(void *dev, const uint32_t *idx, size_t n, smp_reading_t *out);

    /* Writes raw value `in` to tag idx, then reads it back into *readback. Returns 0 when the
     * device accepted the write and the read-back completed, SMP_EDEVICE with *message set
     * when the device refused, or another negative code for connection failures. */
    int (*device_write)(void *dev, uint32_t idx, const smp_value_t *in, smp_reading_t *readback,
                        const char **message);

    void *reserved[8]; /* must be NULL; room to grow without a new ABI version */
} smp_plugin_t;

/* The one exported symbol. `host` is borrowed and stays valid until the plugin is unloaded.
 * Returns a descriptor with static storage, or NULL if the plugin cannot work with this host. */
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
