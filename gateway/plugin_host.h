/* Plugin host: finds, loads and checks protocol-driver plugins (plugins/include/simpul/plugin.h).
 *
 * A plugin for protocol P is the file "P.so" in the plugin directory. The search order is the
 * config's gateway.plugin_dir (or --plugin-dir), then $SIMPUL_PLUGIN_DIR, then the installed
 * directory, then the build tree's (so an uninstalled build runs from a checkout). Each of
 * these may be a ':'-separated list of directories, searched in order. */
#ifndef SMP_PLUGIN_HOST_H
#define SMP_PLUGIN_HOST_H

#include <stddef.h>
#include <stdio.h>

#include <simpul/plugin.h>

typedef struct smp_plugin_host {
    char *name;
    char *path;
    void *handle; /* dlopen handle, NULL for built-in test plugins */
    const smp_plugin_t *desc;
    size_t nconn_keys, ntag_keys;
} smp_plugin_host_t;

typedef struct smp_plugin_set smp_plugin_set_t;

smp_plugin_set_t *smp_plugin_set_new(const char *plugin_dir);
/* Returns the loaded plugin for `protocol`, loading it on first use. On failure returns NULL
 * and writes a one-line reason (e.g. "modbus.so: plugin ABI version 2, this simpul supports ABI
 * version 1") into err. `protocol` must match [a-z0-9_]+ (it becomes a file name). The first
 * directory of the search order that holds "P.so" decides; a broken plugin there is an error. */
const smp_plugin_host_t *smp_plugin_set_get(smp_plugin_set_t *set, const char *protocol, char *err,
                                            size_t errlen);
/* Registers a descriptor without dlopen (unit tests). The descriptor is checked like a loaded
 * one. Returns 0 or a negative code with the reason in err. */
int smp_plugin_set_add_static(smp_plugin_set_t *set, const smp_plugin_t *desc, char *err,
                              size_t errlen);
/* Checks a descriptor's abi_version, struct_size and required members. 0 or -EINVAL.
 * `what` (e.g. "modbus.so") starts the message. check_connection and check_tag may be NULL;
 * all other functions are required; reserved[] is ignored. */
int smp_plugin_check(const smp_plugin_t *desc, const char *what, char *err, size_t errlen);
void smp_plugin_set_free(smp_plugin_set_t *set);

/* The search order above as a list of directories, duplicates removed. */
typedef struct smp_plugin_dirs {
    char **v;
    size_t n;
} smp_plugin_dirs_t;
/* Fills *out (free it with smp_plugin_dirs_free). `set` may be NULL (no explicit directory).
 * Returns 0 or -ENOMEM. */
int smp_plugin_dirs(const smp_plugin_set_t *set, smp_plugin_dirs_t *out);
void smp_plugin_dirs_free(smp_plugin_dirs_t *d);

/* The host API table given to every plugin. Its log() takes as log_ctx a `const char *` scope
 * string such as "modbus:pump-01" (printed as "[modbus:pump-01] "), or NULL; whoever hands a
 * log_ctx to a plugin (conn_create, device_create) keeps that string alive while the plugin may
 * log with it. monotonic_ms is CLOCK_MONOTONIC, wall_ms CLOCK_REALTIME, both in milliseconds.
 * All three are safe to call from any thread. */
extern const smp_host_api_t smp__host_api;
/* Sets what call_deadline_ms() answers on the calling thread (0: no deadline). The engine's
 * worker sets it around each device_write. */
void smp__host_set_call_deadline(uint64_t mono_ms);

#endif
