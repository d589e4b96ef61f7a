/* Plugin host: finds, loads and checks protocol-driver plugins (see plugin_host.h).
 *
 * Everything a plugin hands over is distrusted until checked: the ABI version is read first
 * (every ABI version starts with it), the struct size next, and only then the rest. The host
 * keeps its own copy of the descriptor, of at most the size both sides know, so a plugin that
 * claims a smaller struct can never make the host read past its end. */
#include "plugin_host.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <jansson.h>

#include "log.h"

#ifndef SMP_PLUGIN_INSTALL_DIR
#define SMP_PLUGIN_INSTALL_DIR NULL
#endif
#ifndef SMP_PLUGIN_BUILD_DIR
#define SMP_PLUGIN_BUILD_DIR NULL
#endif

/* Bounds on what a sane plugin declares; they keep a corrupt or unterminated table from
 * sending the host on a long walk through the plugin's memory. */
#define MAX_KEYS    64
#define MAX_CHOICES 64
#define MAX_NAME    64

/* The members every v1 plugin has: everything before check_device (added in 1.1, where a
 * shorter descriptor leaves it NULL). */
#define V1_NEEDED_SIZE offsetof(smp_plugin_t, check_device)

typedef struct loaded {
    smp_plugin_host_t pub; /* pub.desc points at desc below */
    smp_plugin_t desc;
} loaded_t;

struct smp_plugin_set {
    char *dir; /* NULL: no explicit directory */
    loaded_t **items;
    size_t n, cap;
};

/* ---- host API handed to plugins ---------------------------------------------------------- */

__attribute__((format(printf, 3, 4))) static void host_log(void *log_ctx, int level,
                                                           const char *fmt, ...)
{
    if (level < SMP_LOG_ERROR) {
        level = SMP_LOG_ERROR;
    } else if (level > SMP_LOG_DEBUG) {
        level = SMP_LOG_DEBUG;
    }
    if (level > smp__log_level || fmt == NULL) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    smp__vlog(level, (const char *)log_ctx, fmt, ap);
    va_end(ap);
}

static uint64_t clock_ms(clockid_t id)
{
    struct timespec ts;
    if (clock_gettime(id, &ts) != 0) {
        return 0;
    }
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t host_monotonic_ms(void)
{
    return clock_ms(CLOCK_MONOTONIC);
}

static uint64_t host_wall_ms(void)
{
    return clock_ms(CLOCK_REALTIME);
}

/* Each worker thread makes one driver call at a time: the deadline of that call. */
static _Thread_local uint64_t call_deadline;

void smp__host_set_call_deadline(uint64_t mono_ms)
{
    call_deadline = mono_ms;
}

static uint64_t host_call_deadline_ms(void)
{
    return call_deadline;
}

const smp_host_api_t smp__host_api = {
    .abi_version = SMP_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(smp_host_api_t),
    .log = host_log,
    .monotonic_ms = host_monotonic_ms,
    .wall_ms = host_wall_ms,
    .call_deadline_ms = host_call_deadline_ms,
};

/* ---- helpers ------------------------------------------------------------------------------ */

__attribute__((format(printf, 3, 4))) static void set_err(char *err, size_t errlen, const char *fmt,
                                                          ...)
{
    if (err == NULL || errlen == 0) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Copies s for a message: at most 40 characters, control bytes shown as '?', so a hostile
 * name cannot forge lines in the output. */
static const char *printable(const char *s, char *buf, size_t n)
{
    size_t k = 0;
    if (s == NULL) {
        s = "(null)";
    }
    for (; *s != '\0' && k + 4 < n && k < 40; s++) {
        unsigned char c = (unsigned char)*s;
        buf[k++] = c < 0x20 || c == 0x7f ? '?' : (char)c;
    }
    if (*s != '\0' && k + 4 <= n) {
        memcpy(buf + k, "...", 3);
        k += 3;
    }
    buf[k] = '\0';
    return buf;
}

static bool name_ok(const char *s)
{
    if (s == NULL || *s == '\0') {
        return false;
    }
    size_t n = 0;
    for (; *s != '\0'; s++, n++) {
        char c = *s;
        if (n >= MAX_NAME || !((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_')) {
            return false;
        }
    }
    return true;
}

/* Host-owned tag fields (config.h smp_tag_cfg_t). A plugin may not declare these. */
static const char *const generic_tag_fields[] = {
    "name",     "type",     "scale", "offset", "unit", "interval_ms",
    "deadband", "writable", "min",   "max",    NULL,
};

static bool is_generic_tag_field(const char *k)
{
    for (size_t i = 0; generic_tag_fields[i] != NULL; i++) {
        if (strcmp(generic_tag_fields[i], k) == 0) {
            return true;
        }
    }
    return false;
}

/* Checks that a key's default_value is JSON of the key's type (and within its range), so the
 * config loader can apply it without checking again. */
static bool default_ok(const smp_config_key_t *k, const char **why)
{
    json_error_t jerr;
    json_t *j = json_loads(k->default_value, JSON_DECODE_ANY, &jerr);
    bool ok = false;
    *why = "is not valid JSON";
    if (j == NULL) {
        return false;
    }
    *why = "does not match the key's type";
    switch (k->type) {
    case SMP_KEY_STRING:
        ok = json_is_string(j);
        break;
    case SMP_KEY_NUMBER:
        ok = json_is_number(j);
        break;
    case SMP_KEY_BOOL:
        ok = json_is_boolean(j);
        break;
    case SMP_KEY_INT:
        ok = json_is_integer(j);
        if (ok && (json_integer_value(j) < k->min || json_integer_value(j) > k->max)) {
            ok = false;
            *why = "is out of the key's range";
        }
        break;
    case SMP_KEY_SECRET_FILE:
        ok = false;
        *why = "is not allowed: a secret file has no default";
        break;
    case SMP_KEY_ENUM:
        ok = false;
        if (json_is_string(j)) {
            *why = "is not one of the key's choices";
            for (size_t c = 0; k->choices[c] != NULL; c++) {
                if (strcmp(k->choices[c], json_string_value(j)) == 0) {
                    ok = true;
                }
            }
        }
        break;
    }
    json_decref(j);
    return ok;
}

/* Validates a key table; returns its number of keys, or -1 with err set. */
static int check_keys(const smp_config_key_t *t, const char *which, bool tag, const char *what,
                      char *err, size_t errlen)
{
    char pb[64];
    if (t == NULL) {
        set_err(err, errlen, "%s: %s key table is NULL (give at least the terminating entry)", what,
                which);
        return -1;
    }
    int n = 0;
    for (; t[n].name != NULL; n++) {
        const smp_config_key_t *k = &t[n];
        if (n >= MAX_KEYS) {
            set_err(err, errlen, "%s: more than %d %s keys, or a missing terminator", what,
                    MAX_KEYS, which);
            return -1;
        }
        if (!name_ok(k->name)) {
            set_err(err, errlen, "%s: %s key \"%s\": a key name is 1-%d of [a-z0-9_]", what, which,
                    printable(k->name, pb, sizeof pb), MAX_NAME);
            return -1;
        }
        if (tag && is_generic_tag_field(k->name)) {
            set_err(err, errlen, "%s: tag key \"%s\" is a host tag field and cannot be declared",
                    what, k->name);
            return -1;
        }
        for (int m = 0; m < n; m++) {
            if (strcmp(t[m].name, k->name) == 0) {
                set_err(err, errlen, "%s: %s key \"%s\" is declared twice", what, which, k->name);
                return -1;
            }
        }
        if (k->type < SMP_KEY_STRING || k->type > SMP_KEY_SECRET_FILE) {
            set_err(err, errlen, "%s: %s key \"%s\" has unknown type %d", what, which, k->name,
                    (int)k->type);
            return -1;
        }
        if (k->type == SMP_KEY_INT && k->min > k->max) {
            set_err(err, errlen, "%s: %s key \"%s\": min > max", what, which, k->name);
            return -1;
        }
        if (k->type == SMP_KEY_ENUM) {
            /* Walk the choices without ever reading past entry MAX_CHOICES. */
            size_t c = 0;
            bool ok = k->choices != NULL;
            while (ok && k->choices[c] != NULL) {
                if (k->choices[c][0] == '\0' || ++c > MAX_CHOICES) {
                    ok = false;
                }
            }
            if (!ok || c == 0) {
                set_err(err, errlen,
                        "%s: %s key \"%s\": an enum needs 1-%d non-empty choices and a NULL "
                        "terminator",
                        what, which, k->name, MAX_CHOICES);
                return -1;
            }
        }
        const char *why;
        if (k->default_value != NULL && !default_ok(k, &why)) {
            set_err(err, errlen, "%s: %s key \"%s\": default %s", what, which, k->name, why);
            return -1;
        }
    }
    return n;
}

/* ---- public ------------------------------------------------------------------------------- */

int smp_plugin_check(const smp_plugin_t *desc, const char *what, char *err, size_t errlen)
{
    char pb[64];
    if (what == NULL) {
        what = "plugin";
    }
    if (desc == NULL) {
        set_err(err, errlen, "%s: no plugin descriptor", what);
        return -EINVAL;
    }
    /* abi_version is the one field every ABI version shares: check it before anything else. */
    if (desc->abi_version != SMP_PLUGIN_ABI_VERSION) {
        set_err(err, errlen, "%s: plugin ABI version %u, this simpul supports ABI version %u", what,
                (unsigned)desc->abi_version, (unsigned)SMP_PLUGIN_ABI_VERSION);
        return -EINVAL;
    }
    if (desc->struct_size < V1_NEEDED_SIZE) {
        set_err(err, errlen, "%s: plugin descriptor is %u bytes, ABI version %u needs at least %zu",
                what, (unsigned)desc->struct_size, (unsigned)SMP_PLUGIN_ABI_VERSION,
                (size_t)V1_NEEDED_SIZE);
        return -EINVAL;
    }
    if (!name_ok(desc->name)) {
        set_err(err, errlen, "%s: plugin name \"%s\" is not 1-%d of [a-z0-9_]", what,
                printable(desc->name, pb, sizeof pb), MAX_NAME);
        return -EINVAL;
    }
    /* check_connection and check_tag are optional (no cross-field rules); everything the
     * engine calls is required. */
    const struct {
        const char *name;
        bool present;
    } required[] = {
        {"conn_key", desc->conn_key != NULL},
        {"conn_create", desc->conn_create != NULL},
        {"conn_open", desc->conn_open != NULL},
        {"conn_close", desc->conn_close != NULL},
        {"conn_destroy", desc->conn_destroy != NULL},
        {"device_create", desc->device_create != NULL},
        {"device_destroy", desc->device_destroy != NULL},
        {"device_read", desc->device_read != NULL},
        {"device_write", desc->device_write != NULL},
    };
    for (size_t i = 0; i < sizeof required / sizeof required[0]; i++) {
        if (!required[i].present) {
            set_err(err, errlen, "%s: plugin \"%s\" has no %s function", what, desc->name,
                    required[i].name);
            return -EINVAL;
        }
    }
    if (check_keys(desc->conn_keys, "connection", false, what, err, errlen) < 0 ||
        check_keys(desc->tag_keys, "tag", true, what, err, errlen) < 0) {
        return -EINVAL;
    }
    return 0;
}

smp_plugin_set_t *smp_plugin_set_new(const char *plugin_dir)
{
    smp_plugin_set_t *set = calloc(1, sizeof *set);
    if (set == NULL) {
        return NULL;
    }
    if (plugin_dir != NULL && plugin_dir[0] != '\0') {
        set->dir = strdup(plugin_dir);
        if (set->dir == NULL) {
            free(set);
            return NULL;
        }
    }
    return set;
}

static const smp_plugin_host_t *find(const smp_plugin_set_t *set, const char *name)
{
    for (size_t i = 0; i < set->n; i++) {
        if (strcmp(set->items[i]->pub.name, name) == 0) {
            return &set->items[i]->pub;
        }
    }
    return NULL;
}

/* Takes a checked descriptor into the set. `handle` is owned on success. */
static int add(smp_plugin_set_t *set, const smp_plugin_t *desc, const char *path, void *handle,
               const smp_plugin_host_t **out)
{
    if (set->n == set->cap) {
        size_t ncap = set->cap ? set->cap * 2 : 4;
        loaded_t **ni = realloc(set->items, ncap * sizeof *ni);
        if (ni == NULL) {
            return -ENOMEM;
        }
        set->items = ni;
        set->cap = ncap;
    }
    loaded_t *l = calloc(1, sizeof *l);
    if (l == NULL) {
        return -ENOMEM;
    }
    l->pub.name = strdup(desc->name);
    l->pub.path = strdup(path);
    if (l->pub.name == NULL || l->pub.path == NULL) {
        free(l->pub.name);
        free(l->pub.path);
        free(l);
        return -ENOMEM;
    }
    /* Our copy: never more than either side knows. Fields the plugin did not have stay 0. */
    size_t n = desc->struct_size < sizeof l->desc ? desc->struct_size : sizeof l->desc;
    memcpy(&l->desc, desc, n);
    l->desc.struct_size = (uint32_t)n;
    if (l->desc.version == NULL) {
        l->desc.version = "unknown";
    }
    l->pub.handle = handle;
    l->pub.desc = &l->desc;
    while (l->desc.conn_keys[l->pub.nconn_keys].name != NULL) {
        l->pub.nconn_keys++;
    }
    while (l->desc.tag_keys[l->pub.ntag_keys].name != NULL) {
        l->pub.ntag_keys++;
    }
    set->items[set->n++] = l;
    *out = &l->pub;
    return 0;
}

int smp_plugin_set_add_static(smp_plugin_set_t *set, const smp_plugin_t *desc, char *err,
                              size_t errlen)
{
    const smp_plugin_host_t *p;
    set_err(err, errlen, "%s", "");
    if (set == NULL) {
        return -EINVAL;
    }
    if (smp_plugin_check(desc, "static plugin", err, errlen) != 0) {
        return -EINVAL;
    }
    if (find(set, desc->name) != NULL) {
        set_err(err, errlen, "static plugin: protocol \"%s\" is already registered", desc->name);
        return -EEXIST;
    }
    int rc = add(set, desc, "(static)", NULL, &p);
    if (rc != 0) {
        set_err(err, errlen, "static plugin: out of memory");
    }
    return rc;
}

/* dlopen()s path and checks what it exports. Returns the plugin or NULL with err set. */
static const smp_plugin_host_t *load(smp_plugin_set_t *set, const char *protocol, const char *path,
                                     const char *file, char *err, size_t errlen)
{
    /* RTLD_NOW: an unresolved symbol fails here, at config time, not in the middle of a poll.
     * RTLD_LOCAL: one plugin's symbols cannot satisfy or clash with another's. */
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        const char *e = dlerror();
        set_err(err, errlen, "%s: cannot load plugin: %s", file, e != NULL ? e : "dlopen failed");
        return NULL;
    }
    smp_plugin_entry_fn entry;
    void *sym = dlsym(h, SMP_PLUGIN_ENTRY_SYMBOL);
    /* ISO C has no object-to-function pointer cast; POSIX guarantees this copy works. */
    memcpy(&entry, &sym, sizeof entry);
    if (entry == NULL) {
        set_err(err, errlen, "%s: not a simpul plugin (no %s symbol)", file,
                SMP_PLUGIN_ENTRY_SYMBOL);
        dlclose(h);
        return NULL;
    }
    const smp_plugin_t *desc = entry(&smp__host_api);
    if (desc == NULL) {
        set_err(err, errlen, "%s: the plugin refused to start (its entry point returned NULL)",
                file);
        dlclose(h);
        return NULL;
    }
    if (smp_plugin_check(desc, file, err, errlen) != 0) {
        dlclose(h);
        return NULL;
    }
    if (strcmp(desc->name, protocol) != 0) {
        set_err(err, errlen, "%s: the plugin is for protocol \"%s\", not \"%s\"", file, desc->name,
                protocol);
        dlclose(h);
        return NULL;
    }
    const smp_plugin_host_t *p;
    if (add(set, desc, path, h, &p) != 0) {
        set_err(err, errlen, "%s: out of memory", file);
        dlclose(h);
        return NULL;
    }
    LOG_DEBUG("plugin", "loaded %s %s from %s", p->name, p->desc->version, path);
    return p;
}

/* Appends each ':'-separated part of `list` that is not yet in *d. */
static int dirs_add(smp_plugin_dirs_t *d, const char *list)
{
    while (list != NULL && *list != '\0') {
        const char *end = strchr(list, ':');
        size_t len = end != NULL ? (size_t)(end - list) : strlen(list);
        bool seen = len == 0;
        for (size_t j = 0; j < d->n && !seen; j++) {
            seen = strlen(d->v[j]) == len && memcmp(d->v[j], list, len) == 0;
        }
        if (!seen) {
            char **nv = realloc(d->v, (d->n + 1) * sizeof *nv);
            if (nv == NULL) {
                return -ENOMEM;
            }
            d->v = nv;
            d->v[d->n] = strndup(list, len);
            if (d->v[d->n] == NULL) {
                return -ENOMEM;
            }
            d->n++;
        }
        list = end != NULL ? end + 1 : NULL;
    }
    return 0;
}

int smp_plugin_dirs(const smp_plugin_set_t *set, smp_plugin_dirs_t *out)
{
    const char *lists[] = {set != NULL ? set->dir : NULL, getenv("SIMPUL_PLUGIN_DIR"),
                           SMP_PLUGIN_INSTALL_DIR, SMP_PLUGIN_BUILD_DIR};
    out->v = NULL;
    out->n = 0;
    for (size_t i = 0; i < sizeof lists / sizeof lists[0]; i++) {
        if (dirs_add(out, lists[i]) != 0) {
            smp_plugin_dirs_free(out);
            return -ENOMEM;
        }
    }
    return 0;
}

void smp_plugin_dirs_free(smp_plugin_dirs_t *d)
{
    for (size_t i = 0; i < d->n; i++) {
        free(d->v[i]);
    }
    free(d->v);
    d->v = NULL;
    d->n = 0;
}

const smp_plugin_host_t *smp_plugin_set_get(smp_plugin_set_t *set, const char *protocol, char *err,
                                            size_t errlen)
{
    char pb[64];
    set_err(err, errlen, "%s", "");
    if (set == NULL) {
        set_err(err, errlen, "no plugin set");
        return NULL;
    }
    /* The name becomes a file name: only [a-z0-9_] keeps "../x" and "/tmp/evil" out. */
    if (!name_ok(protocol)) {
        set_err(err, errlen, "invalid protocol name \"%s\": use 1-%d of a-z, 0-9 and _",
                printable(protocol, pb, sizeof pb), MAX_NAME);
        return NULL;
    }
    const smp_plugin_host_t *p = find(set, protocol);
    if (p != NULL) {
        return p;
    }
    char file[MAX_NAME + 8];
    snprintf(file, sizeof file, "%s.so", protocol);
    char searched[1024] = "";
    size_t slen = 0;
    smp_plugin_dirs_t dirs;
    if (smp_plugin_dirs(set, &dirs) != 0) {
        set_err(err, errlen, "%s: out of memory", file);
        return NULL;
    }
    for (size_t i = 0; i < dirs.n; i++) {
        const char *d = dirs.v[i];
        size_t n = strlen(d) + 1 + strlen(file) + 1;
        char *path = malloc(n);
        if (path == NULL) {
            set_err(err, errlen, "%s: out of memory", file);
            smp_plugin_dirs_free(&dirs);
            return NULL;
        }
        snprintf(path, n, "%s/%s", d, file);
        struct stat st;
        if (stat(path, &st) == 0 && S_ISREG(st.st_mode)) {
            /* The first directory that has the file decides: a broken plugin there is an
             * error, not a reason to quietly pick another build from further down. */
            p = load(set, protocol, path, file, err, errlen);
            free(path);
            smp_plugin_dirs_free(&dirs);
            return p;
        }
        free(path);
        if (slen < sizeof searched) {
            int k = snprintf(searched + slen, sizeof searched - slen, "%s%s", slen ? ", " : "", d);
            slen += k > 0 ? (size_t)k : 0;
        }
    }
    smp_plugin_dirs_free(&dirs);
    set_err(err, errlen, "no plugin for protocol \"%s\": %s not found in %s", protocol, file,
            slen ? searched : "any plugin directory (none configured)");
    return NULL;
}

void smp_plugin_set_free(smp_plugin_set_t *set)
{
    if (set == NULL) {
        return;
    }
    for (size_t i = 0; i < set->n; i++) {
        loaded_t *l = set->items[i];
        if (l->pub.handle != NULL) {
            dlclose(l->pub.handle);
        }
        free(l->pub.name);
        free(l->pub.path);
        free(l);
    }
    free(set->items);
    free(set->dir);
    free(set);
}
