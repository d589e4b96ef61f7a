/* The CLI's view of the plugins (plugin_info.h): --plugins, --plugin-help, --plugin-schema.
 * Everything printed here is generated from the plugins' own key tables, so help, schema and
 * validation cannot drift apart. */
#include "plugin_info.h"

#include <dirent.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "plugin_host.h"

static const char *const key_type_names[] = {
    [SMP_KEY_STRING] = "string", [SMP_KEY_INT] = "integer", [SMP_KEY_NUMBER] = "number",
    [SMP_KEY_BOOL] = "boolean",  [SMP_KEY_ENUM] = "enum",   [SMP_KEY_SECRET_FILE] = "secret file",
};

/* A plugin name from a directory entry "NAME.so", or false when it is not one. */
static bool so_name(const char *file, char *name, size_t n)
{
    size_t len = strlen(file);
    if (len <= 3 || len - 3 >= n || strcmp(file + len - 3, ".so") != 0) {
        return false;
    }
    memcpy(name, file, len - 3);
    name[len - 3] = '\0';
    return true;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every distinct NAME of a NAME.so in the search directories, sorted. */
static int collect_names(const smp_plugin_dirs_t *dirs, char ***out, size_t *nout)
{
    char **v = NULL;
    size_t n = 0;
    for (size_t i = 0; i < dirs->n; i++) {
        DIR *dir = opendir(dirs->v[i]);
        struct dirent *e;
        while (dir != NULL && (e = readdir(dir)) != NULL) {
            char name[256];
            bool seen = !so_name(e->d_name, name, sizeof name);
            for (size_t k = 0; k < n && !seen; k++) {
                seen = strcmp(v[k], name) == 0;
            }
            char **nv = seen ? v : realloc(v, (n + 1) * sizeof *v);
            if (!seen && (nv == NULL || (nv[n] = strdup(name)) == NULL)) {
                closedir(dir);
                *out = nv != NULL ? nv : v;
                *nout = n;
                return -ENOMEM;
            }
            if (!seen) {
                v = nv;
                n++;
            }
        }
        if (dir != NULL) {
            closedir(dir);
        }
    }
    if (n > 1) {
        qsort(v, n, sizeof *v, name_cmp);
    }
    *out = v;
    *nout = n;
    return 0;
}

int smp_plugin_list(FILE *f, const char *plugin_dir)
{
    smp_plugin_set_t *set = smp_plugin_set_new(plugin_dir);
    smp_plugin_dirs_t dirs;
    if (set == NULL || smp_plugin_dirs(set, &dirs) != 0) {
        smp_plugin_set_free(set);
        return -ENOMEM;
    }
    char **names = NULL;
    size_t n = 0;
    int rc = collect_names(&dirs, &names, &n);
    fprintf(f, "Plugin directories, searched in this order:\n");
    for (size_t i = 0; i < dirs.n; i++) {
        fprintf(f, "  %s\n", dirs.v[i]);
    }
    fprintf(f, "%s\n", n > 0 ? "Plugins:" : "No plugins found.");
    int broken = 0;
    for (size_t i = 0; i < n; i++) {
        char err[1024];
        const smp_plugin_host_t *p = smp_plugin_set_get(set, names[i], err, sizeof err);
        if (p != NULL) {
            fprintf(f, "  %-12s %-10s ABI %u  %s\n", p->name, p->desc->version,
                    (unsigned)p->desc->abi_version, p->path);
        } else {
            fprintf(f, "  %-12s unusable: %s\n", names[i], err);
            broken++;
        }
        free(names[i]);
    }
    free(names);
    smp_plugin_dirs_free(&dirs);
    smp_plugin_set_free(set);
    return rc < 0 ? rc : broken;
}

/* Loads protocol `name` into a set of its own (free it when done), or prints why not. */
static smp_plugin_set_t *load_one(const char *plugin_dir, const char *name, FILE *errs,
                                  const smp_plugin_host_t **p)
{
    smp_plugin_set_t *set = smp_plugin_set_new(plugin_dir);
    char err[1024] = "out of memory";
    *p = set != NULL ? smp_plugin_set_get(set, name, err, sizeof err) : NULL;
    if (*p == NULL) {
        fprintf(errs, "simpul: %s\n", err);
        smp_plugin_set_free(set);
        return NULL;
    }
    return set;
}

static void print_keys(FILE *f, const smp_config_key_t *keys, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const smp_config_key_t *k = &keys[i];
        fprintf(f, "  %-26s %s", k->name, key_type_names[k->type]);
        if (k->type == SMP_KEY_INT) {
            fprintf(f, " %lld..%lld", (long long)k->min, (long long)k->max);
        } else if (k->type == SMP_KEY_ENUM) {
            for (size_t c = 0; k->choices[c] != NULL; c++) {
                fprintf(f, "%s%s", c ? " | " : " ", k->choices[c]);
            }
        }
        if (k->required) {
            fprintf(f, ", required");
        }
        if (k->default_value != NULL) {
            fprintf(f, ", default %s", k->default_value);
        }
        fprintf(f, "\n      %s\n", k->description != NULL ? k->description : "");
    }
}

int smp_plugin_help(FILE *f, const char *plugin_dir, const char *name, FILE *errs)
{
    const smp_plugin_host_t *p;
    smp_plugin_set_t *set = load_one(plugin_dir, name, errs, &p);
    if (set == NULL) {
        return -ENOENT;
    }
    fprintf(f, "Protocol \"%s\": plugin version %s, ABI %u, %s\n\n", p->name, p->desc->version,
            (unsigned)p->desc->abi_version, p->path);
    fprintf(f, "Connection keys (a device's \"connection\" object):\n");
    print_keys(f, p->desc->conn_keys, p->nconn_keys);
    fprintf(f, "\nTag keys (besides name, type, scale, offset, unit, interval_ms, deadband, "
               "writable, min, max):\n");
    print_keys(f, p->desc->tag_keys, p->ntag_keys);
    smp_plugin_set_free(set);
    return 0;
}

/* One key as a JSON Schema property. */
static json_t *key_schema(const smp_config_key_t *k)
{
    json_t *s = json_object();
    switch (k->type) {
    case SMP_KEY_STRING:
    case SMP_KEY_SECRET_FILE:
        json_object_set_new(s, "type", json_string("string"));
        break;
    case SMP_KEY_INT:
        json_object_set_new(s, "type", json_string("integer"));
        json_object_set_new(s, "minimum", json_integer((json_int_t)k->min));
        json_object_set_new(s, "maximum", json_integer((json_int_t)k->max));
        break;
    case SMP_KEY_NUMBER:
        json_object_set_new(s, "type", json_string("number"));
        break;
    case SMP_KEY_BOOL:
        json_object_set_new(s, "type", json_string("boolean"));
        break;
    case SMP_KEY_ENUM: {
        json_t *e = json_array();
        for (size_t c = 0; k->choices[c] != NULL; c++) {
            json_array_append_new(e, json_string(k->choices[c]));
        }
        json_object_set_new(s, "enum", e);
        break;
    }
    }
    if (k->default_value != NULL) {
        json_object_set_new(s, "default", json_loads(k->default_value, JSON_DECODE_ANY, NULL));
    }
    if (k->description != NULL) {
        json_object_set_new(s, "description", json_string(k->description));
    }
    return s;
}

static json_t *table_schema(const smp_config_key_t *keys, size_t n)
{
    json_t *o = json_object(), *props = json_object(), *req = json_array();
    for (size_t i = 0; i < n; i++) {
        json_object_set_new(props, keys[i].name, key_schema(&keys[i]));
        if (keys[i].required) {
            json_array_append_new(req, json_string(keys[i].name));
        }
    }
    json_object_set_new(o, "type", json_string("object"));
    json_object_set_new(o, "required", req);
    json_object_set_new(o, "properties", props);
    return o;
}

int smp_plugin_schema(FILE *f, const char *plugin_dir, const char *name, FILE *errs)
{
    const smp_plugin_host_t *p;
    smp_plugin_set_t *set = load_one(plugin_dir, name, errs, &p);
    if (set == NULL) {
        return -ENOENT;
    }
    json_t *o = json_object();
    json_object_set_new(o, "protocol", json_string(p->name));
    json_object_set_new(o, "version", json_string(p->desc->version));
    json_object_set_new(o, "connection", table_schema(p->desc->conn_keys, p->nconn_keys));
    json_object_set_new(o, "tag", table_schema(p->desc->tag_keys, p->ntag_keys));
    int rc = json_dumpf(o, f, JSON_INDENT(2) | JSON_SORT_KEYS) == 0 ? 0 : -EIO;
    fputc('\n', f);
    json_decref(o);
    smp_plugin_set_free(set);
    return rc;
}
