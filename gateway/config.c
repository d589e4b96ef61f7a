/* Config: loads and validates the JSON config (see config.h and design.md Part B).
 *
 * Three passes over the text. jansson parses it (syntax errors stop there, with jansson's
 * line:col); jsonpos walks it again to learn where every key and value sits and to find
 * duplicate keys, which jansson would silently collapse; then the validator walks the json_t
 * tree, keeping the path of the value it is looking at ("devices[1].connection.port"), and turns
 * every problem into "FILE:LINE:COL: path: message". Problems are collected, not fatal: the
 * walk goes on past each one so an integrator sees all of them in one --check. At the end they
 * are sorted by position and repeated ones merged (a profile's tag is checked once for every
 * device that uses it).
 *
 * Memory: everything the config holds is owned by it and freed by smp_config_free(), which
 * also accepts a half-built config, so error paths just free what exists. Allocation failures
 * are remembered and end the load with an "out of memory" error instead of a crash. */
#include "config.h"

#include <errno.h>
#include <stddef.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "jsonpos.h"
#include "log.h"

#define NAME_MAX_LEN       64
#define FILE_MAX_BYTES     (16u << 20) /* a config larger than this is a mistake */
#define PASSWORD_MAX_BYTES 65535       /* MQTT's limit */
#define MSG_MAX            2048
#define SHOW_MAX           40  /* user text quoted in a message is cut to this */
#define PATH_SHOW          512 /* file paths in messages are cut to this */

/* ---- diagnostics and the current path ---------------------------------------------------- */

typedef struct diag {
    uint32_t line, col;
    size_t seq; /* keeps the sort stable */
    char *text; /* "path: message" */
} diag_t;

typedef struct vctx {
    const char *name; /* FILE in messages, as given */
    char *dir;        /* directory of the config, for relative paths; NULL: the cwd */
    smp_jsonpos_t *pos;
    diag_t *diags;
    size_t ndiags, cap;
    bool oom;
    char *path; /* path of the value being validated */
    size_t plen, pcap;
} vctx_t;

enum { AT_KEY, AT_VALUE };

static void *xmalloc(vctx_t *v, size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL) {
        v->oom = true;
    }
    return p;
}

static void *xcalloc(vctx_t *v, size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz);
    if (p == NULL) {
        v->oom = true;
    }
    return p;
}

static char *xstrdup(vctx_t *v, const char *s)
{
    if (s == NULL) {
        return NULL;
    }
    char *p = strdup(s);
    if (p == NULL) {
        v->oom = true;
    }
    return p;
}

static bool path_reserve(vctx_t *v, size_t extra)
{
    if (v->plen + extra + 1 <= v->pcap) {
        return true;
    }
    size_t ncap = v->pcap ? v->pcap : 128;
    while (ncap < v->plen + extra + 1) {
        ncap *= 2;
    }
    char *np = realloc(v->path, ncap);
    if (np == NULL) {
        v->oom = true;
        return false;
    }
    v->path = np;
    v->pcap = ncap;
    return true;
}

/* Appends ".key" (or "key" at the root) to the current path; returns the length to restore. */
static size_t push_key(vctx_t *v, const char *key)
{
    size_t old = v->plen;
    size_t n = strlen(key);
    if (!path_reserve(v, n + 1)) {
        return old;
    }
    if (v->plen > 0) {
        v->path[v->plen++] = '.';
    }
    memcpy(v->path + v->plen, key, n + 1);
    v->plen += n;
    return old;
}

static size_t push_index(vctx_t *v, size_t i)
{
    size_t old = v->plen;
    char part[32];
    int n = snprintf(part, sizeof part, "[%zu]", i);
    if (!path_reserve(v, (size_t)n)) {
        return old;
    }
    memcpy(v->path + v->plen, part, (size_t)n + 1);
    v->plen += (size_t)n;
    return old;
}

static void pop(vctx_t *v, size_t old)
{
    if (v->path != NULL && old <= v->plen) {
        v->plen = old;
        v->path[old] = '\0';
    }
}

/* Replaces the current path (to validate a profile's tag while on a device). */
static void path_set(vctx_t *v, const char *p)
{
    pop(v, 0);
    size_t n = strlen(p);
    if (path_reserve(v, n)) {
        memcpy(v->path, p, n + 1);
        v->plen = n;
    }
}

static const char *cur_path(const vctx_t *v)
{
    return v->path != NULL ? v->path : "";
}

/* Position for a problem at `path`: the key or value itself, else the nearest enclosing value
 * the scanner recorded, else the start of the file. */
static smp_jsonpos_loc_t locate(const vctx_t *v, const char *path, int at)
{
    smp_jsonpos_loc_t loc = {1, 1};
    if (at == AT_KEY && smp_jsonpos_key(v->pos, path, &loc)) {
        return loc;
    }
    if (smp_jsonpos_value(v->pos, path, &loc)) {
        return loc;
    }
    char *p = strdup(path);
    if (p == NULL) {
        return (smp_jsonpos_loc_t){1, 1};
    }
    for (size_t n = strlen(p); n > 0;) {
        /* Strip the last component: "[i]" or ".key" (or the first key). */
        if (p[n - 1] == ']') {
            char *b = strrchr(p, '[');
            n = b != NULL ? (size_t)(b - p) : 0;
        } else {
            char *d = strrchr(p, '.');
            n = d != NULL ? (size_t)(d - p) : 0;
        }
        p[n] = '\0';
        if (smp_jsonpos_value(v->pos, p, &loc)) {
            free(p);
            return loc;
        }
    }
    free(p);
    return (smp_jsonpos_loc_t){1, 1};
}

/* Position of the value of member `key` of the object at `base`. */
static smp_jsonpos_loc_t locate_member(vctx_t *v, const char *base, const char *key)
{
    size_t n = strlen(base) + 1 + strlen(key) + 1;
    char *p = xmalloc(v, n);
    if (p == NULL) {
        return (smp_jsonpos_loc_t){1, 1};
    }
    snprintf(p, n, "%s%s%s", base, base[0] != '\0' ? "." : "", key);
    smp_jsonpos_loc_t loc = locate(v, p, AT_VALUE);
    free(p);
    return loc;
}

/* Adds one problem. Control characters become '?' so that no input can forge extra lines. */
static void add_diag(vctx_t *v, smp_jsonpos_loc_t loc, const char *path, const char *msg)
{
    if (v->ndiags == v->cap) {
        size_t ncap = v->cap ? v->cap * 2 : 16;
        diag_t *nd = realloc(v->diags, ncap * sizeof *nd);
        if (nd == NULL) {
            v->oom = true;
            return;
        }
        v->diags = nd;
        v->cap = ncap;
    }
    const char *shown = path[0] != '\0' ? path : "(root)";
    size_t plen = strlen(shown);
    bool cut = plen > 300;
    if (cut) {
        plen = 300;
    }
    size_t mlen = strlen(msg);
    char *t = xmalloc(v, plen + (cut ? 3 : 0) + 2 + mlen + 1);
    if (t == NULL) {
        return;
    }
    size_t k = 0;
    memcpy(t + k, shown, plen);
    k += plen;
    if (cut) {
        memcpy(t + k, "...", 3);
        k += 3;
    }
    memcpy(t + k, ": ", 2);
    k += 2;
    memcpy(t + k, msg, mlen + 1);
    for (char *c = t; *c != '\0'; c++) {
        if ((unsigned char)*c < 0x20 || *c == 0x7f) {
            *c = '?';
        }
    }
    v->diags[v->ndiags] = (diag_t){.line = loc.line, .col = loc.col, .seq = v->ndiags, .text = t};
    v->ndiags++;
}

__attribute__((format(printf, 3, 4))) static void err(vctx_t *v, int at, const char *fmt, ...)
{
    char msg[MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    add_diag(v, locate(v, cur_path(v), at), cur_path(v), msg);
}

/* Same, for the member `key` of the current object. */
__attribute__((format(printf, 4, 5))) static void err_key(vctx_t *v, const char *key, int at,
                                                          const char *fmt, ...)
{
    char msg[MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    size_t old = push_key(v, key);
    add_diag(v, locate(v, cur_path(v), at), cur_path(v), msg);
    pop(v, old);
}

/* Quotes user text for a message, cut to fit buf (n bytes): callers size buf for what they
 * quote (SHOW_MAX for names and values, more for file paths). */
static const char *show(const char *s, char *buf, size_t n)
{
    size_t len = strlen(s);
    if (len + 3 <= n) {
        snprintf(buf, n, "\"%s\"", s);
    } else {
        snprintf(buf, n, "\"%.*s...\"", (int)(n > 6 ? n - 6 : 0), s);
    }
    return buf;
}

static int diag_cmp(const void *a, const void *b)
{
    const diag_t *x = a, *y = b;
    if (x->line != y->line) {
        return x->line < y->line ? -1 : 1;
    }
    if (x->col != y->col) {
        return x->col < y->col ? -1 : 1;
    }
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Sorts, merges repeats, prints; returns the number printed. */
static int flush_diags(vctx_t *v, FILE *errs)
{
    if (v->oom) {
        /* Report it even if the list itself could not grow: the count must not be 0. */
        add_diag(v, (smp_jsonpos_loc_t){1, 1}, "", "out of memory while loading the config");
    }
    if (v->ndiags > 1) {
        qsort(v->diags, v->ndiags, sizeof *v->diags, diag_cmp);
    }
    int n = 0;
    for (size_t i = 0; i < v->ndiags; i++) {
        const diag_t *d = &v->diags[i];
        if (i > 0 && d->line == v->diags[i - 1].line && d->col == v->diags[i - 1].col &&
            strcmp(d->text, v->diags[i - 1].text) == 0) {
            continue;
        }
        if (errs != NULL) {
            fprintf(errs, "%s:%u:%u: %s\n", v->name, (unsigned)d->line, (unsigned)d->col, d->text);
        }
        n++;
    }
    if (n == 0 && v->oom) {
        if (errs != NULL) {
            fprintf(errs, "%s:1:1: (root): out of memory while loading the config\n", v->name);
        }
        n = 1;
    }
    return n;
}

static void free_diags(vctx_t *v)
{
    for (size_t i = 0; i < v->ndiags; i++) {
        free(v->diags[i].text);
    }
    free(v->diags);
    v->diags = NULL;
    v->ndiags = v->cap = 0;
}

/* ---- typed getters ----------------------------------------------------------------------- */

typedef enum want { W_STRING, W_INT, W_NUMBER, W_BOOL, W_OBJECT, W_ARRAY } want_t;

static const char *want_name(want_t w)
{
    switch (w) {
    case W_STRING:
        return "a string";
    case W_INT:
        return "an integer";
    case W_NUMBER:
        return "a number";
    case W_BOOL:
        return "true or false";
    case W_OBJECT:
        return "an object";
    default:
        return "an array";
    }
}

static bool type_ok(const json_t *j, want_t w)
{
    switch (w) {
    case W_STRING:
        return json_is_string(j);
    case W_INT:
        return json_is_integer(j);
    case W_NUMBER:
        return json_is_number(j);
    case W_BOOL:
        return json_is_boolean(j);
    case W_OBJECT:
        return json_is_object(j);
    default:
        return json_is_array(j);
    }
}

/* "a string (\"1883\")", "a number (1883.5)", "an object", ... */
static const char *got(const json_t *j, char *buf, size_t n)
{
    const char *kind;
    switch (json_typeof(j)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_NULL:
        return "null";
    case JSON_STRING:
        kind = "a string";
        break;
    case JSON_INTEGER:
        kind = "an integer";
        break;
    case JSON_REAL:
        kind = "a number";
        break;
    default:
        kind = "a boolean";
        break;
    }
    char *text = json_dumps(j, JSON_ENCODE_ANY);
    if (text == NULL) {
        return kind;
    }
    if (strlen(text) > SHOW_MAX) {
        snprintf(buf, n, "%s (%.*s...)", kind, SHOW_MAX, text);
    } else {
        snprintf(buf, n, "%s (%s)", kind, text);
    }
    free(text);
    return buf;
}

/* obj[key] if it has the wanted type. Reports a missing required key at the object and a wrong
 * type at the value; NULL in both cases and when the key is absent. */
static json_t *get(vctx_t *v, json_t *obj, const char *key, want_t w, bool required)
{
    json_t *j = json_object_get(obj, key);
    if (j == NULL) {
        if (required) {
            err(v, AT_VALUE, "missing required key \"%s\"", key);
        }
        return NULL;
    }
    if (!type_ok(j, w)) {
        char gb[128];
        err_key(v, key, AT_VALUE, "expected %s, got %s", want_name(w), got(j, gb, sizeof gb));
        return NULL;
    }
    return j;
}

static bool get_int(vctx_t *v, json_t *obj, const char *key, long long lo, long long hi,
                    bool required, long long *out)
{
    json_t *j = get(v, obj, key, W_INT, required);
    if (j == NULL) {
        return false;
    }
    long long x = json_integer_value(j);
    if (x < lo || x > hi) {
        err_key(v, key, AT_VALUE, "%lld is out of range %lld..%lld", x, lo, hi);
        return false;
    }
    *out = x;
    return true;
}

static bool get_num(vctx_t *v, json_t *obj, const char *key, bool required, double *out)
{
    json_t *j = get(v, obj, key, W_NUMBER, required);
    if (j == NULL) {
        return false;
    }
    *out = json_number_value(j);
    return true;
}

static bool get_bool(vctx_t *v, json_t *obj, const char *key, bool *out)
{
    json_t *j = get(v, obj, key, W_BOOL, false);
    if (j == NULL) {
        return false;
    }
    *out = json_is_true(j);
    return true;
}

/* A string member; empty strings are refused (no key of ours means anything when empty). */
static const char *get_str(vctx_t *v, json_t *obj, const char *key, bool required)
{
    json_t *j = get(v, obj, key, W_STRING, required);
    if (j == NULL) {
        return NULL;
    }
    if (json_string_length(j) == 0) {
        err_key(v, key, AT_VALUE, "must not be empty");
        return NULL;
    }
    return json_string_value(j);
}

/* Replaces *dst with a copy of s (when s is non-NULL). */
static void set_str(vctx_t *v, char **dst, const char *s)
{
    if (s != NULL) {
        char *c = xstrdup(v, s);
        if (c != NULL) {
            free(*dst);
            *dst = c;
        }
    }
}

/* ---- names, unknown keys ----------------------------------------------------------------- */

/* Edit distance, for "did you mean". Inputs are short keys; longer ones are not compared. */
static size_t distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 64 || lb > 64) {
        return SIZE_MAX;
    }
    size_t row[65];
    for (size_t j = 0; j <= lb; j++) {
        row[j] = j;
    }
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) {
                best = up + 1;
            }
            if (row[j - 1] + 1 < best) {
                best = row[j - 1] + 1;
            }
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static const char *suggest(const char *key, const char *const *cands, size_t n)
{
    const char *best = NULL;
    size_t bd = 3; /* only close matches: at most two edits */
    for (size_t i = 0; i < n; i++) {
        size_t d = distance(key, cands[i]);
        /* Two edits turn "x" into almost anything: demand the key be longer than the fix. */
        if (d < bd && d < strlen(cands[i]) && d < strlen(key)) {
            bd = d;
            best = cands[i];
        }
    }
    return best;
}

static size_t count_strs(const char *const *list)
{
    size_t n = 0;
    while (list[n] != NULL) {
        n++;
    }
    return n;
}

static bool in_list(const char *s, const char *const *list)
{
    for (size_t i = 0; list[i] != NULL; i++) {
        if (strcmp(list[i], s) == 0) {
            return true;
        }
    }
    return false;
}

static void report_unknown_key(vctx_t *v, const char *key, const char *const *cands, size_t n,
                               const char *what)
{
    const char *s = suggest(key, cands, n);
    if (s != NULL) {
        err_key(v, key, AT_KEY, "unknown key%s (did you mean \"%s\"?)", what, s);
    } else {
        err_key(v, key, AT_KEY, "unknown key%s", what);
    }
}

/* Reports every key of obj that is not in `allowed`. */
static void check_known(vctx_t *v, json_t *obj, const char *const *allowed)
{
    const char *key;
    json_t *val;
    json_object_foreach(obj, key, val)
    {
        if (!in_list(key, allowed)) {
            report_unknown_key(v, key, allowed, count_strs(allowed), "");
        }
    }
}

/* Names become MQTT topic levels: [A-Za-z0-9_-]{1,64}. `at` says whether the name is a key
 * (profiles) or a value. */
static bool check_name(vctx_t *v, const char *s, int at)
{
    char sb[SHOW_MAX + 6];
    size_t n = strlen(s);
    if (n == 0) {
        err(v, at, "a name must not be empty");
        return false;
    }
    for (const char *c = s; *c != '\0'; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              *c == '_' || *c == '-')) {
            err(v, at, "invalid name %s: use only A-Z, a-z, 0-9, _ and -", show(s, sb, sizeof sb));
            return false;
        }
    }
    if (n > NAME_MAX_LEN) {
        err(v, at, "name is %zu characters long, at most %d are allowed", n, NAME_MAX_LEN);
        return false;
    }
    return true;
}

/* A string value at obj.key that must be a name. Returns it or NULL. */
static const char *get_name(vctx_t *v, json_t *obj, const char *key, bool required)
{
    const char *s = get_str(v, obj, key, required);
    if (s == NULL) {
        return NULL;
    }
    size_t old = push_key(v, key);
    bool ok = check_name(v, s, AT_VALUE);
    pop(v, old);
    return ok ? s : NULL;
}

/* ---- paths and files --------------------------------------------------------------------- */

/* Relative paths in the config are relative to the config file, not to the daemon's cwd. */
static char *resolve(vctx_t *v, const char *p)
{
    if (p == NULL) {
        return NULL;
    }
    if (p[0] == '/' || v->dir == NULL) {
        return xstrdup(v, p);
    }
    while (p[0] == '.' && p[1] == '/') {
        p += 2;
        while (p[0] == '/') {
            p++;
        }
    }
    if (p[0] == '\0' || strcmp(p, ".") == 0) {
        return xstrdup(v, v->dir);
    }
    size_t n = strlen(v->dir) + 1 + strlen(p) + 1;
    char *r = xmalloc(v, n);
    if (r != NULL) {
        snprintf(r, n, "%s%s%s", v->dir, strcmp(v->dir, "/") == 0 ? "" : "/", p);
    }
    return r;
}

/* A secret (password, private key) that other users can read is refused: on a shared PC it
 * would already be leaked. Group access stays allowed (root:simpul 0640 is the usual way). */
static void check_private(vctx_t *v, const char *key, const char *path, int fd)
{
    char sb[PATH_SHOW];
    struct stat st;
    if (fstat(fd, &st) == 0 && (st.st_mode & S_IRWXO) != 0) {
        err_key(v, key, AT_VALUE,
                "%s is accessible to other users (mode %04o): chmod o-rwx it (0600, or 0640 "
                "with group simpul)",
                show(path, sb, sizeof sb), (unsigned)(st.st_mode & 07777));
    }
}

/* A file we must be able to read (TLS material). Reports at obj.key. A secret must not be
 * accessible to other users. */
static void check_readable(vctx_t *v, const char *key, const char *path, bool secret)
{
    char sb[PATH_SHOW];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        err_key(v, key, AT_VALUE, "cannot read %s: %s", show(path, sb, sizeof sb), strerror(errno));
        return;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && !S_ISREG(st.st_mode)) {
        err_key(v, key, AT_VALUE, "%s is not a regular file", show(path, sb, sizeof sb));
    } else if (secret) {
        check_private(v, key, path, fd);
    }
    close(fd);
}

/* Reads the MQTT password; a trailing newline (as editors leave) is not part of it. */
static char *read_password(vctx_t *v, const char *key, const char *path)
{
    char sb[PATH_SHOW];
    FILE *f = fopen(path, "rbe");
    if (f == NULL) {
        err_key(v, key, AT_VALUE, "cannot read %s: %s", show(path, sb, sizeof sb), strerror(errno));
        return NULL;
    }
    check_private(v, key, path, fileno(f));
    char *buf = xmalloc(v, PASSWORD_MAX_BYTES + 2);
    if (buf == NULL) {
        fclose(f);
        return NULL;
    }
    size_t n = fread(buf, 1, PASSWORD_MAX_BYTES + 1, f);
    bool bad = ferror(f) != 0;
    int e = errno;
    fclose(f);
    if (bad) {
        err_key(v, key, AT_VALUE, "cannot read %s: %s", show(path, sb, sizeof sb), strerror(e));
        free(buf);
        return NULL;
    }
    while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == '\r')) {
        n--;
    }
    if (n > PASSWORD_MAX_BYTES) {
        err_key(v, key, AT_VALUE, "%s holds more than %d bytes", show(path, sb, sizeof sb),
                PASSWORD_MAX_BYTES);
        free(buf);
        return NULL;
    }
    if (memchr(buf, '\0', n) != NULL) {
        err_key(v, key, AT_VALUE, "%s contains a NUL byte", show(path, sb, sizeof sb));
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

/* ---- sections ---------------------------------------------------------------------------- */

static void parse_gateway(vctx_t *v, smp_config_t *cfg, json_t *root)
{
    static const char *const keys[] = {"id",        "data_dir",           "plugin_dir",
                                       "log_level", "metrics_interval_s", NULL};
    char sb[SHOW_MAX + 6];
    json_t *g = get(v, root, "gateway", W_OBJECT, true);
    if (g == NULL) {
        return;
    }
    size_t old = push_key(v, "gateway");
    check_known(v, g, keys);
    set_str(v, &cfg->gateway.id, get_name(v, g, "id", true));
    const char *s = get_str(v, g, "data_dir", false);
    if (s != NULL) {
        char *r = resolve(v, s);
        if (r != NULL) {
            free(cfg->gateway.data_dir);
            cfg->gateway.data_dir = r;
        }
    }
    s = get_str(v, g, "plugin_dir", false);
    if (s != NULL) {
        cfg->gateway.plugin_dir = resolve(v, s);
    }
    s = get_str(v, g, "log_level", false);
    if (s != NULL) {
        if (smp_log_level_parse(s) < 0) {
            err_key(v, "log_level", AT_VALUE,
                    "unknown log level %s (use error, warn, info or debug)",
                    show(s, sb, sizeof sb));
        } else {
            set_str(v, &cfg->gateway.log_level, s);
        }
    }
    long long x;
    if (get_int(v, g, "metrics_interval_s", 1, 86400, false, &x)) {
        cfg->gateway.metrics_interval_s = (int)x;
    }
    pop(v, old);
}

/* A topic prefix is one or more topic levels: no wildcards, no empty levels. */
static bool topic_prefix_ok(const char *s)
{
    if (s[0] == '/' || s[strlen(s) - 1] == '/' || strstr(s, "//") != NULL) {
        return false;
    }
    return strpbrk(s, "+#") == NULL;
}

static void parse_tls(vctx_t *v, smp_config_t *cfg, json_t *mqtt)
{
    static const char *const keys[] = {"ca_file", "cert_file", "key_file", "verify", NULL};
    json_t *t = get(v, mqtt, "tls", W_OBJECT, false);
    if (t == NULL) {
        return;
    }
    size_t old = push_key(v, "tls");
    check_known(v, t, keys);
    char **dst[] = {&cfg->mqtt.tls_ca_file, &cfg->mqtt.tls_cert_file, &cfg->mqtt.tls_key_file};
    for (size_t i = 0; i < 3; i++) {
        /* libmosquitto needs a CA to verify the broker; client cert and key come as a pair. */
        const char *s = get_str(v, t, keys[i], i == 0);
        if (s != NULL) {
            *dst[i] = resolve(v, s);
            if (*dst[i] != NULL) {
                check_readable(v, keys[i], *dst[i], /* secret = */ i == 2);
            }
        }
    }
    bool has_cert = json_object_get(t, "cert_file") != NULL;
    bool has_key = json_object_get(t, "key_file") != NULL;
    if (has_cert != has_key) {
        err(v, AT_VALUE, "cert_file and key_file must be given together");
    }
    bool verify = true;
    get_bool(v, t, "verify", &verify);
    cfg->mqtt.tls_no_verify = !verify;
    pop(v, old);
}

/* A Sparkplug id becomes a topic level: no '/', '+' or '#'. */
static void get_spb_id(vctx_t *v, json_t *o, const char *key, bool required, char **dst)
{
    const char *s = get_str(v, o, key, required);
    if (s != NULL && strpbrk(s, "/+#") != NULL) {
        err_key(v, key, AT_VALUE, "must not contain '/', '+' or '#' (it is a topic level)");
    } else {
        set_str(v, dst, s);
    }
}

/* mqtt.format and mqtt.sparkplug (docs/sparkplug.md). */
static void parse_sparkplug(vctx_t *v, smp_config_t *cfg, json_t *m)
{
    static const char *const keys[] = {"group_id", "edge_node_id", "primary_host_id", "use_aliases",
                                       NULL};
    const char *f = get_str(v, m, "format", false);
    if (f != NULL) {
        if (strcmp(f, "json") == 0) {
            cfg->mqtt.format = SMP_FORMAT_JSON;
        } else if (strcmp(f, "sparkplug") == 0) {
            cfg->mqtt.format = SMP_FORMAT_SPARKPLUG;
        } else if (strcmp(f, "both") == 0) {
            cfg->mqtt.format = SMP_FORMAT_BOTH;
        } else {
            char sb[SHOW_MAX + 6];
            err_key(v, "format", AT_VALUE,
                    "unknown format %s (use \"json\", \"sparkplug\" or \"both\")",
                    show(f, sb, sizeof sb));
        }
    }
    json_t *sp = get(v, m, "sparkplug", W_OBJECT, false);
    if (sp == NULL) {
        if (cfg->mqtt.format != SMP_FORMAT_JSON) {
            err_key(v, "format", AT_VALUE, "a sparkplug format needs mqtt.sparkplug.group_id");
        }
        return;
    }
    size_t old = push_key(v, "sparkplug");
    check_known(v, sp, keys);
    get_spb_id(v, sp, "group_id", true, &cfg->mqtt.sparkplug.group_id);
    get_spb_id(v, sp, "edge_node_id", false, &cfg->mqtt.sparkplug.edge_node_id);
    get_spb_id(v, sp, "primary_host_id", false, &cfg->mqtt.sparkplug.primary_host_id);
    get_bool(v, sp, "use_aliases", &cfg->mqtt.sparkplug.use_aliases);
    pop(v, old);
}

static void parse_mqtt(vctx_t *v, smp_config_t *cfg, json_t *root)
{
    static const char *const keys[] = {
        "host",      "port",     "client_id",     "topic_prefix", "qos",          "keepalive_s",
        "version",   "username", "password_file", "tls",          "inflight_max", "format",
        "sparkplug", NULL};
    char sb[SHOW_MAX + 6];
    long long x;
    json_t *m = get(v, root, "mqtt", W_OBJECT, false);
    if (m == NULL) {
        return;
    }
    size_t old = push_key(v, "mqtt");
    check_known(v, m, keys);
    set_str(v, &cfg->mqtt.host, get_str(v, m, "host", false));
    if (get_int(v, m, "port", 1, 65535, false, &x)) {
        cfg->mqtt.port = (int)x;
    }
    set_str(v, &cfg->mqtt.client_id, get_str(v, m, "client_id", false));
    const char *s = get_str(v, m, "topic_prefix", false);
    if (s != NULL) {
        if (!topic_prefix_ok(s)) {
            err_key(v, "topic_prefix", AT_VALUE,
                    "invalid topic prefix %s: no '+' or '#', no leading, trailing or double '/'",
                    show(s, sb, sizeof sb));
        } else {
            set_str(v, &cfg->mqtt.topic_prefix, s);
        }
    }
    if (get_int(v, m, "qos", 0, 1, false, &x)) {
        cfg->mqtt.qos = (int)x;
    }
    if (get_int(v, m, "keepalive_s", 1, 65535, false, &x)) {
        cfg->mqtt.keepalive_s = (int)x;
    }
    s = get_str(v, m, "version", false);
    if (s != NULL) {
        if (strcmp(s, "3.1") == 0) {
            cfg->mqtt.version = 3;
        } else if (strcmp(s, "3.1.1") == 0) {
            cfg->mqtt.version = 4;
        } else if (strcmp(s, "5") == 0) {
            cfg->mqtt.version = 5;
        } else {
            err_key(v, "version", AT_VALUE,
                    "unknown MQTT version %s (use \"3.1\", \"3.1.1\" or \"5\")",
                    show(s, sb, sizeof sb));
        }
    }
    set_str(v, &cfg->mqtt.username, get_str(v, m, "username", false));
    s = get_str(v, m, "password_file", false);
    if (s != NULL) {
        cfg->mqtt.password_file = resolve(v, s);
        if (cfg->mqtt.password_file != NULL) {
            cfg->mqtt.password = read_password(v, "password_file", cfg->mqtt.password_file);
        }
        if (json_object_get(m, "username") == NULL) {
            err_key(v, "password_file", AT_KEY, "a password needs mqtt.username as well");
        }
    }
    parse_tls(v, cfg, m);
    if (get_int(v, m, "inflight_max", 1, 65535, false, &x)) {
        cfg->mqtt.inflight_max = (int)x;
    }
    parse_sparkplug(v, cfg, m);
    pop(v, old);
}

/* An optional string key with two values: sets *out to false for `no`, true for `yes`. */
static void get_choice(vctx_t *v, json_t *obj, const char *key, const char *no, const char *yes,
                       bool *out)
{
    const char *s = get_str(v, obj, key, false);
    if (s == NULL) {
        return;
    }
    if (strcmp(s, no) == 0 || strcmp(s, yes) == 0) {
        *out = strcmp(s, yes) == 0;
    } else {
        char sb[96];
        err_key(v, key, AT_VALUE, "%s is not \"%s\" or \"%s\"", show(s, sb, sizeof sb), no, yes);
    }
}

static void parse_store(vctx_t *v, smp_config_t *cfg, json_t *root)
{
    static const char *const keys[] = {"path",
                                       "history_retention_h",
                                       "outbox_max_mb",
                                       "synchronous",
                                       "on_error",
                                       "commit_interval_ms",
                                       "history_max_mb",
                                       "history_chunk_max_s",
                                       "runtime_dir",
                                       "quick_check",
                                       NULL};
    long long x;
    json_t *st = get(v, root, "store", W_OBJECT, false);
    if (st == NULL) {
        return;
    }
    size_t old = push_key(v, "store");
    check_known(v, st, keys);
    const char *s = get_str(v, st, "path", false);
    if (s != NULL) {
        /* ":memory:" is SQLite's, not a file name. */
        cfg->store.path = strcmp(s, ":memory:") == 0 ? xstrdup(v, s) : resolve(v, s);
    }
    if (get_int(v, st, "history_retention_h", 0, 87600, false, &x)) {
        cfg->store.history_retention_h = (int)x;
    }
    get_choice(v, st, "synchronous", "full", "normal", &cfg->store.sync_normal);
    get_choice(v, st, "on_error", "degraded", "refuse", &cfg->store.on_error_refuse);
    if (get_int(v, st, "history_chunk_max_s", 1, 86400, false, &x)) {
        cfg->store.history_chunk_max_s = (int)x;
    }
    s = get_str(v, st, "runtime_dir", false);
    if (s != NULL) {
        free(cfg->store.runtime_dir);
        cfg->store.runtime_dir = resolve(v, s);
    }
    get_choice(v, st, "quick_check", "start", "off", &cfg->store.skip_check);
    double mb;
    if (get_num(v, st, "outbox_max_mb", false, &mb)) {
        /* A number, not only an integer: a small site (or a test) may want less than 1 MB. */
        if (!(mb >= 0.01 && mb <= 1048576)) {
            err_key(v, "outbox_max_mb", AT_VALUE, "%g is out of range 0.01..1048576", mb);
        } else {
            cfg->store.outbox_max_mb = mb;
        }
    }
    if (get_int(v, st, "commit_interval_ms", 0, 60000, false, &x)) {
        cfg->store.commit_interval_ms = (int)x;
    }
    if (get_num(v, st, "history_max_mb", false, &mb)) {
        if (!(mb == 0 || (mb >= 0.01 && mb <= 1048576))) {
            err_key(v, "history_max_mb", AT_VALUE, "%g is not 0 or in range 0.01..1048576", mb);
        } else {
            cfg->store.history_max_mb = mb;
        }
    }
    pop(v, old);
}

/* Integer keys of "commands": name, range, where it goes. */
typedef struct int_key {
    const char *name;
    long long lo, hi, dflt;
    size_t off;
} int_key_t;

static const int_key_t command_keys[] = {
    {"dedup_window_s", 1, 86400, 600, offsetof(smp_config_t, commands.dedup_window_s)},
    {"rate_per_device", 1, 10000, 20, offsetof(smp_config_t, commands.rate_per_device)},
    {"rate_global", 1, 100000, 200, offsetof(smp_config_t, commands.rate_global)},
    {"dedup_max", 16, 1000000, 10000, offsetof(smp_config_t, commands.dedup_max)},
    {"result_max_bytes", 256, 65536, 4096, offsetof(smp_config_t, commands.result_max_bytes)},
    {"audit_max_rows", 1000, 100000000, 1000000, offsetof(smp_config_t, commands.audit_max_rows)},
    {"audit_retention_days", 1, 3650, 90, offsetof(smp_config_t, commands.audit_retention_days)},
};

static void parse_commands(vctx_t *v, smp_config_t *cfg, json_t *root)
{
    static const char *names[sizeof command_keys / sizeof command_keys[0] + 1];
    size_t n = sizeof command_keys / sizeof command_keys[0];
    json_t *c = get(v, root, "commands", W_OBJECT, false);
    if (c == NULL) {
        return;
    }
    for (size_t k = 0; k < n; k++) {
        names[k] = command_keys[k].name;
    }
    names[n] = NULL;
    size_t old = push_key(v, "commands");
    check_known(v, c, names);
    for (size_t k = 0; k < n; k++) {
        long long x;
        if (get_int(v, c, command_keys[k].name, command_keys[k].lo, command_keys[k].hi, false,
                    &x)) {
            *(int *)((char *)cfg + command_keys[k].off) = (int)x;
        }
    }
    pop(v, old);
}

/* ---- tags -------------------------------------------------------------------------------- */

/* The tag fields the host owns; every other key of a tag belongs to the protocol's plugin.
 * plugin_host.c refuses a plugin that declares one of these. */
static const char *const generic_tag_keys[] = {
    "name",     "type",     "scale", "offset", "unit", "interval_ms",
    "deadband", "writable", "min",   "max",    NULL,
};

static const char *const type_names[] = {
    [SMP_TYPE_BOOL] = "bool",     [SMP_TYPE_INT16] = "int16",     [SMP_TYPE_UINT16] = "uint16",
    [SMP_TYPE_INT32] = "int32",   [SMP_TYPE_UINT32] = "uint32",   [SMP_TYPE_INT64] = "int64",
    [SMP_TYPE_UINT64] = "uint64", [SMP_TYPE_FLOAT32] = "float32", [SMP_TYPE_FLOAT64] = "float64",
    [SMP_TYPE_STRING] = "string",
};

const char *smp_type_name(smp_type_t t)
{
    if ((int)t >= SMP_TYPE_BOOL && (int)t <= SMP_TYPE_STRING) {
        return type_names[t];
    }
    return "?";
}

static int type_parse(const char *s)
{
    for (int t = SMP_TYPE_BOOL; t <= SMP_TYPE_STRING; t++) {
        if (strcmp(type_names[t], s) == 0) {
            return t;
        }
    }
    return -1;
}

/* Where a tag came from, for the plugin's pass and for messages. */
typedef struct tag_src {
    json_t *obj; /* borrowed from the parsed tree */
    char *path;  /* e.g. "profiles.pump-v1.tags[0]" */
    bool ok;     /* the host fields were valid */
} tag_src_t;

static void free_tag(smp_tag_cfg_t *t, size_t nparams)
{
    free(t->name);
    free(t->unit);
    if (t->params != NULL) {
        for (size_t i = 0; i < nparams; i++) {
            free((char *)t->params[i].s);
        }
        free(t->params);
    }
}

/* Validates the host fields of the tag at the current path into *out. Returns true when all
 * of them are valid. Unknown keys are the plugin pass's business. */
static bool parse_tag_fields(vctx_t *v, json_t *t, smp_tag_cfg_t *out)
{
    char sb[SHOW_MAX + 6];
    size_t before = v->ndiags;
    memset(out, 0, sizeof *out);
    out->scale = 1;
    if (!json_is_object(t)) {
        char gb[128];
        err(v, AT_VALUE, "expected an object, got %s", got(t, gb, sizeof gb));
        return false;
    }
    set_str(v, &out->name, get_name(v, t, "name", true));
    const char *ty = get_str(v, t, "type", true);
    if (ty != NULL) {
        int k = type_parse(ty);
        if (k < 0) {
            err_key(v, "type", AT_VALUE,
                    "unknown type %s (use bool, int16, uint16, int32, uint32, int64, uint64, "
                    "float32, float64 or string)",
                    show(ty, sb, sizeof sb));
        } else {
            out->type = (smp_type_t)k;
        }
    }
    double d;
    if (get_num(v, t, "scale", false, &d)) {
        if (d == 0) {
            err_key(v, "scale", AT_VALUE, "scale must not be 0 (writes divide by it)");
        } else {
            out->scale = d;
        }
    }
    get_num(v, t, "offset", false, &out->offset);
    set_str(v, &out->unit, get_str(v, t, "unit", false));
    long long x;
    if (get_int(v, t, "interval_ms", 10, 86400000, false, &x)) {
        out->interval_ms = (uint32_t)x;
    }
    if (get_num(v, t, "deadband", false, &d)) {
        if (d < 0) {
            err_key(v, "deadband", AT_VALUE, "deadband must be >= 0, got %g", d);
        } else {
            out->deadband = d;
        }
    }
    get_bool(v, t, "writable", &out->writable);
    out->has_min = get_num(v, t, "min", false, &out->min);
    out->has_max = get_num(v, t, "max", false, &out->max);
    out->min_is_int = out->has_min && json_is_integer(json_object_get(t, "min"));
    out->max_is_int = out->has_max && json_is_integer(json_object_get(t, "max"));
    out->min_i = out->min_is_int ? json_integer_value(json_object_get(t, "min")) : 0;
    out->max_i = out->max_is_int ? json_integer_value(json_object_get(t, "max")) : 0;
    if (out->has_min && out->has_max && out->min > out->max) {
        err_key(v, "max", AT_VALUE, "max %g is less than min %g", out->max, out->min);
    }
    /* Arithmetic on a bool or a string means nothing: refuse rather than ignore it. */
    if (out->type == SMP_TYPE_BOOL || out->type == SMP_TYPE_STRING) {
        static const char *const numeric_only[] = {"scale", "offset", "deadband", "min", "max"};
        for (size_t i = 0; i < sizeof numeric_only / sizeof numeric_only[0]; i++) {
            if (json_object_get(t, numeric_only[i]) != NULL) {
                err_key(v, numeric_only[i], AT_KEY, "not allowed for type %s",
                        smp_type_name(out->type));
            }
        }
    }
    return v->ndiags == before && out->name != NULL && out->type != 0;
}

/* Parses the tags array `arr` at the current path: fills *srcs and *cfgs (*n entries, owned by
 * the caller even on failure) and reports duplicate names inside it. */
static void parse_tag_list(vctx_t *v, json_t *arr, tag_src_t **srcs, smp_tag_cfg_t **cfgs,
                           size_t *n)
{
    size_t cnt = json_array_size(arr);
    *n = 0;
    *srcs = xcalloc(v, cnt, sizeof **srcs);
    *cfgs = xcalloc(v, cnt, sizeof **cfgs);
    json_t *seen = json_object();
    if (*srcs == NULL || *cfgs == NULL || seen == NULL) {
        v->oom = true;
        json_decref(seen);
        return;
    }
    for (size_t j = 0; j < cnt; j++) {
        json_t *t = json_array_get(arr, j);
        size_t old = push_index(v, j);
        tag_src_t *s = &(*srcs)[j];
        s->obj = t;
        s->path = xstrdup(v, cur_path(v));
        s->ok = parse_tag_fields(v, t, &(*cfgs)[j]);
        *n = j + 1;
        const char *name = (*cfgs)[j].name;
        if (name != NULL) {
            json_t *prev = json_object_get(seen, name);
            if (prev != NULL) {
                const char *fpath = (*srcs)[json_integer_value(prev)].path;
                smp_jsonpos_loc_t first = locate_member(v, fpath != NULL ? fpath : "", "name");
                char sb[SHOW_MAX + 6];
                size_t o2 = push_key(v, "name");
                err(v, AT_VALUE, "duplicate tag name %s (first at line %u, column %u)",
                    show(name, sb, sizeof sb), (unsigned)first.line, (unsigned)first.col);
                pop(v, o2);
                s->ok = false;
            } else if (json_object_set_new(seen, name, json_integer((json_int_t)j)) != 0) {
                v->oom = true;
            }
        }
        pop(v, old);
    }
    json_decref(seen);
}

/* ---- profiles ---------------------------------------------------------------------------- */

typedef struct profile {
    size_t n;
    tag_src_t *srcs;
    smp_tag_cfg_t *cfgs; /* host fields; devices copy them */
    /* The first valid device whose tags are all this profile's: later such devices with the
     * same protocol share its tag definitions instead of holding a copy each. */
    const smp_device_cfg_t *owner;
} profile_t;

typedef struct profiles {
    json_t *index; /* name -> integer index into list */
    profile_t *list;
    size_t n;
} profiles_t;

static void free_srcs(tag_src_t *srcs, size_t n)
{
    for (size_t i = 0; srcs != NULL && i < n; i++) {
        free(srcs[i].path);
    }
    free(srcs);
}

static void free_profiles(profiles_t *ps)
{
    for (size_t i = 0; i < ps->n; i++) {
        profile_t *p = &ps->list[i];
        for (size_t j = 0; p->cfgs != NULL && j < p->n; j++) {
            free_tag(&p->cfgs[j], 0);
        }
        free(p->cfgs);
        free_srcs(p->srcs, p->n);
    }
    free(ps->list);
    json_decref(ps->index);
}

static void parse_profiles(vctx_t *v, json_t *root, profiles_t *ps)
{
    static const char *const keys[] = {"tags", NULL};
    memset(ps, 0, sizeof *ps);
    ps->index = json_object();
    if (ps->index == NULL) {
        v->oom = true;
        return;
    }
    json_t *all = get(v, root, "profiles", W_OBJECT, false);
    if (all == NULL) {
        return;
    }
    size_t old = push_key(v, "profiles");
    ps->list = xcalloc(v, json_object_size(all), sizeof *ps->list);
    if (ps->list == NULL) {
        pop(v, old);
        return;
    }
    const char *name;
    json_t *p;
    json_object_foreach(all, name, p)
    {
        size_t o2 = push_key(v, name);
        check_name(v, name, AT_KEY);
        if (!json_is_object(p)) {
            char gb[128];
            err(v, AT_VALUE, "expected an object, got %s", got(p, gb, sizeof gb));
        } else {
            check_known(v, p, keys);
            json_t *tags = get(v, p, "tags", W_ARRAY, true);
            if (tags != NULL) {
                profile_t *pr = &ps->list[ps->n];
                size_t o3 = push_key(v, "tags");
                parse_tag_list(v, tags, &pr->srcs, &pr->cfgs, &pr->n);
                pop(v, o3);
                /* Indexed even with a bad name: "unknown profile" on top would be noise. */
                if (json_object_set_new(ps->index, name, json_integer((json_int_t)ps->n)) != 0) {
                    v->oom = true;
                }
                ps->n++;
            }
        }
        pop(v, o2);
    }
    pop(v, old);
}

/* ---- plugin keys ------------------------------------------------------------------------- */

/* An enum key's value: one of its choices (p->i its index), else reported with the list. */
static bool fill_enum(vctx_t *v, const smp_config_key_t *k, const char *s, smp_param_t *p)
{
    char sb[SHOW_MAX + 8];
    size_t c = 0;
    while (k->choices[c] != NULL && strcmp(k->choices[c], s) != 0) {
        c++;
    }
    if (k->choices[c] == NULL) {
        char list[512] = "";
        size_t len = 0;
        for (size_t i = 0; k->choices[i] != NULL && len < sizeof list; i++) {
            int w2 = snprintf(list + len, sizeof list - len, "%s%s", i ? ", " : "", k->choices[i]);
            len += w2 > 0 ? (size_t)w2 : 0;
        }
        err_key(v, k->name, AT_VALUE, "unknown value %s (use one of: %s)", show(s, sb, sizeof sb),
                list);
        return false;
    }
    p->i = (int64_t)c;
    p->s = xstrdup(v, k->choices[c]);
    return p->s != NULL;
}

/* Fills p from JSON value j for key k; reports at obj.key when it does not fit. The default
 * values of a plugin's table were checked by the plugin host and pass here without reports. */
static bool fill_param(vctx_t *v, const smp_config_key_t *k, json_t *j, smp_param_t *p)
{
    char gb[128];
    static const want_t wants[] = {
        [SMP_KEY_STRING] = W_STRING, [SMP_KEY_INT] = W_INT,     [SMP_KEY_NUMBER] = W_NUMBER,
        [SMP_KEY_BOOL] = W_BOOL,     [SMP_KEY_ENUM] = W_STRING, [SMP_KEY_SECRET_FILE] = W_STRING,
    };
    want_t w = wants[k->type];
    if (!type_ok(j, w)) {
        err_key(v, k->name, AT_VALUE, "expected %s, got %s", want_name(w), got(j, gb, sizeof gb));
        return false;
    }
    switch (k->type) {
    case SMP_KEY_STRING:
        p->s = xstrdup(v, json_string_value(j));
        if (p->s == NULL) {
            return false;
        }
        break;
    case SMP_KEY_INT: {
        long long x = json_integer_value(j);
        if (x < k->min || x > k->max) {
            err_key(v, k->name, AT_VALUE, "%lld is out of range %lld..%lld", x, (long long)k->min,
                    (long long)k->max);
            return false;
        }
        p->i = x;
        p->d = (double)x;
        break;
    }
    case SMP_KEY_NUMBER:
        p->d = json_number_value(j);
        break;
    case SMP_KEY_SECRET_FILE: {
        /* The same path rules and checks as mqtt.password_file; the plugin sees the secret. */
        char *path = resolve(v, json_string_value(j));
        p->s = path != NULL ? read_password(v, k->name, path) : NULL;
        free(path);
        if (p->s == NULL) {
            return false;
        }
        break;
    }
    case SMP_KEY_BOOL:
        p->i = json_is_true(j);
        p->d = (double)p->i;
        break;
    case SMP_KEY_ENUM:
        if (!fill_enum(v, k, json_string_value(j), p)) {
            return false;
        }
        break;
    }
    p->set = true;
    return true;
}

/* Validates obj (at the current path) against a plugin key table into params (n entries).
 * For tags, the host's own fields are skipped. Returns the number of problems. */
static int check_params(vctx_t *v, json_t *obj, const smp_plugin_host_t *pl, bool tag,
                        smp_param_t *params)
{
    const smp_config_key_t *keys = tag ? pl->desc->tag_keys : pl->desc->conn_keys;
    size_t n = tag ? pl->ntag_keys : pl->nconn_keys;
    size_t before = v->ndiags;
    char what[96];
    snprintf(what, sizeof what, " for protocol \"%s\"", pl->name);

    const char *key;
    json_t *val;
    json_object_foreach(obj, key, val)
    {
        if (tag && in_list(key, generic_tag_keys)) {
            continue;
        }
        size_t i = 0;
        while (i < n && strcmp(keys[i].name, key) != 0) {
            i++;
        }
        if (i == n) {
            const char *cands[64 + 16];
            size_t nc = 0;
            for (size_t k = 0; k < n && nc < 64; k++) {
                cands[nc++] = keys[k].name;
            }
            for (size_t k = 0; tag && generic_tag_keys[k] != NULL; k++) {
                cands[nc++] = generic_tag_keys[k];
            }
            report_unknown_key(v, key, cands, nc, what);
        }
    }
    for (size_t i = 0; i < n; i++) {
        const smp_config_key_t *k = &keys[i];
        json_t *j = json_object_get(obj, k->name);
        if (j != NULL) {
            fill_param(v, k, j, &params[i]);
        } else if (k->required) {
            err(v, AT_VALUE, "missing required key \"%s\"%s", k->name, what);
        } else if (k->default_value != NULL) {
            json_t *d = json_loads(k->default_value, JSON_DECODE_ANY, NULL);
            if (d == NULL) {
                v->oom = true; /* checked at plugin load: only memory can fail here */
            } else {
                fill_param(v, k, d, &params[i]);
                json_decref(d);
            }
        }
    }
    /* After a failed allocation some param may be missing: never show the plugin that. */
    return (int)(v->ndiags - before) + (v->oom ? 1 : 0);
}

typedef struct report_ctx {
    vctx_t *v;
    int n;
} report_ctx_t;

/* smp_report_fn for check_connection / check_tag: `key` names a member of the object being
 * checked, which sits at the current path. */
__attribute__((format(printf, 3, 4))) static void plugin_report(void *ctx, const char *key,
                                                                const char *fmt, ...)
{
    report_ctx_t *rc = ctx;
    char msg[MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt != NULL ? fmt : "(no message)", ap);
    va_end(ap);
    if (key != NULL) {
        err_key(rc->v, key, AT_VALUE, "%s", msg);
    } else {
        err(rc->v, AT_VALUE, "%s", msg);
    }
    rc->n++;
}

/* ---- devices ----------------------------------------------------------------------------- */

static void free_params(smp_param_t *params, size_t n)
{
    if (params == NULL) {
        return;
    }
    for (size_t i = 0; i < n; i++) {
        free((char *)params[i].s);
    }
    free(params);
}

/* Secrets read from SMP_KEY_SECRET_FILE keys do not stay in freed heap memory. */
static void wipe_secrets(smp_param_t *params, const smp_config_key_t *keys, size_t n)
{
    for (size_t i = 0; params != NULL && i < n; i++) {
        if (keys[i].type == SMP_KEY_SECRET_FILE && params[i].s != NULL) {
            volatile char *p = (volatile char *)params[i].s;
            while (*p != '\0') {
                *p++ = '\0';
            }
        }
    }
}

static void copy_tag(vctx_t *v, smp_tag_cfg_t *dst, const smp_tag_cfg_t *src)
{
    *dst = *src;
    dst->name = xstrdup(v, src->name);
    dst->unit = xstrdup(v, src->unit);
    dst->params = NULL;
}

/* The protocol's check across the connection and all tags of a device (check_device), its
 * problems reported at the device's "connection". */
static void check_device_whole(vctx_t *v, smp_device_cfg_t *dev, report_ctx_t *rc)
{
    const smp_plugin_host_t *pl = dev->plugin;
    if (pl->desc->check_device == NULL) {
        return;
    }
    smp_tag_t *views = xcalloc(v, dev->ntags ? dev->ntags : 1, sizeof *views);
    if (views == NULL) {
        return;
    }
    for (size_t k = 0; k < dev->ntags; k++) {
        views[k] = (smp_tag_t){.name = dev->tags[k].name,
                               .type = dev->tags[k].type,
                               .writable = dev->tags[k].writable,
                               .params = dev->tags[k].params};
    }
    size_t old = push_key(v, "connection");
    rc->n = 0;
    int bad = pl->desc->check_device(dev->conn_params, views, dev->ntags, plugin_report, rc);
    if (bad > 0 && rc->n == 0) {
        err(v, AT_VALUE, "refused by protocol \"%s\"", pl->name);
    }
    pop(v, old);
    free(views);
}

/* The device's "connection" against the protocol's keys and its check; then its connection
 * key. 1 when the keys were valid (the device as a whole may be checked), 0 when not, -1 out
 * of memory. */
static int check_device_conn(vctx_t *v, smp_device_cfg_t *dev, json_t *d, report_ctx_t *rc)
{
    const smp_plugin_host_t *pl = dev->plugin;
    json_t *conn = json_object_get(d, "connection");
    json_t *empty = NULL;
    bool conn_ok = true, conn_checked = false;
    if (conn == NULL) {
        /* Absent is fine for a protocol without required keys; defaults still apply. */
        for (size_t i = 0; i < pl->nconn_keys; i++) {
            if (pl->desc->conn_keys[i].required) {
                err(v, AT_VALUE, "missing required key \"connection\"");
                conn_ok = false;
                break;
            }
        }
        conn = empty = json_object();
        if (empty == NULL) {
            v->oom = true;
            return -1;
        }
    } else if (!json_is_object(conn)) {
        conn_ok = false; /* reported by parse_device */
    }
    if (conn_ok) {
        size_t old = push_key(v, "connection");
        if (check_params(v, conn, pl, false, dev->conn_params) == 0) {
            conn_checked = true;
            int bad = 0;
            if (pl->desc->check_connection != NULL) {
                rc->n = 0;
                bad = pl->desc->check_connection(dev->conn_params, plugin_report, rc);
                if (bad > 0 && rc->n == 0) {
                    err(v, AT_VALUE, "refused by protocol \"%s\"", pl->name);
                }
            }
            if (bad == 0 && rc->n == 0 && !v->oom) {
                if (pl->desc->conn_key(dev->conn_params, dev->conn_key, sizeof dev->conn_key) !=
                    0) {
                    err(v, AT_VALUE, "protocol \"%s\" could not make a connection key", pl->name);
                }
                dev->conn_key[sizeof dev->conn_key - 1] = '\0';
            }
        }
        pop(v, old);
    }
    json_decref(empty);
    return conn_checked ? 1 : 0;
}

/* The plugin fields of every tag, each checked where it is written, which for a profile's tag
 * is the profile. */
static void check_device_tags(vctx_t *v, smp_device_cfg_t *dev, const tag_src_t *const *srcs,
                              report_ctx_t *rc)
{
    const smp_plugin_host_t *pl = dev->plugin;
    char *saved = xstrdup(v, cur_path(v));
    if (saved == NULL) {
        return;
    }
    for (size_t k = 0; k < dev->ntags; k++) {
        const tag_src_t *s = srcs[k];
        smp_tag_cfg_t *t = &dev->tags[k];
        if (!json_is_object(s->obj) || s->path == NULL) {
            continue;
        }
        t->params = xcalloc(v, pl->ntag_keys, sizeof *t->params);
        if (t->params == NULL) {
            break;
        }
        path_set(v, s->path);
        if (check_params(v, s->obj, pl, true, t->params) == 0 && s->ok &&
            pl->desc->check_tag != NULL) {
            smp_tag_t view = {
                .name = t->name, .type = t->type, .writable = t->writable, .params = t->params};
            rc->n = 0;
            int bad = pl->desc->check_tag(&view, plugin_report, rc);
            if (bad > 0 && rc->n == 0) {
                err(v, AT_VALUE, "refused by protocol \"%s\"", pl->name);
            }
        }
    }
    path_set(v, saved);
    free(saved);
}

/* The protocol's pass over a device: its connection and the plugin fields of every tag. */
static void check_device_plugin(vctx_t *v, smp_device_cfg_t *dev, json_t *d,
                                const tag_src_t *const *srcs)
{
    report_ctx_t rc = {.v = v};
    size_t diags_before = v->ndiags;

    dev->conn_params = xcalloc(v, dev->plugin->nconn_keys, sizeof *dev->conn_params);
    if (dev->conn_params == NULL) {
        return;
    }
    int conn_checked = check_device_conn(v, dev, d, &rc);
    if (conn_checked < 0) {
        return;
    }
    if (srcs == NULL) {
        return; /* the device shares tags checked already */
    }
    check_device_tags(v, dev, srcs, &rc);
    if (conn_checked == 1 && v->ndiags == diags_before) {
        check_device_whole(v, dev, &rc);
    }
}

/* A device's name: valid, and not taken by an earlier device (`names`: name -> index). */
static void device_name(vctx_t *v, smp_device_cfg_t *dev, size_t i, json_t *d, json_t *names)
{
    char sb[SHOW_MAX + 8];
    const char *name = get_name(v, d, "name", true);
    if (name == NULL) {
        return;
    }
    set_str(v, &dev->name, name);
    json_t *prev = json_object_get(names, name);
    if (prev != NULL) {
        char fp[48];
        snprintf(fp, sizeof fp, "devices[%lld].name", (long long)json_integer_value(prev));
        smp_jsonpos_loc_t first = locate(v, fp, AT_VALUE);
        err_key(v, "name", AT_VALUE, "duplicate device name %s (first at line %u, column %u)",
                show(name, sb, sizeof sb), (unsigned)first.line, (unsigned)first.col);
    } else if (json_object_set_new(names, name, json_integer((json_int_t)i)) != 0) {
        v->oom = true;
    }
}

/* The protocol (its plugin loaded), the intervals and the shape of "connection". */
static void device_basics(vctx_t *v, smp_config_t *cfg, smp_device_cfg_t *dev, json_t *d)
{
    char gb[128];
    const char *proto = get_str(v, d, "protocol", true);
    if (proto != NULL) {
        set_str(v, &dev->protocol, proto);
        char perr[1024];
        dev->plugin = smp_plugin_set_get(cfg->plugins, proto, perr, sizeof perr);
        if (dev->plugin == NULL) {
            /* The reason names the file; the device's name says who cannot start. */
            err_key(v, "protocol", AT_VALUE, "%s (device %s)",
                    perr[0] ? perr : "cannot load the plugin", dev->name != NULL ? dev->name : "?");
        }
    }
    long long x;
    if (get_int(v, d, "interval_ms", 10, 86400000, false, &x)) {
        dev->interval_ms = (uint32_t)x;
    }
    if (get_int(v, d, "refresh_s", 1, 86400, false, &x)) {
        dev->refresh_s = (uint32_t)x;
    }
    json_t *conn = json_object_get(d, "connection");
    if (conn != NULL && !json_is_object(conn)) {
        err_key(v, "connection", AT_VALUE, "expected an object, got %s", got(conn, gb, sizeof gb));
    }
}

/* The profile a device names, or NULL (absent, or unknown: reported with a suggestion). */
static profile_t *device_profile(vctx_t *v, smp_device_cfg_t *dev, json_t *d, profiles_t *ps)
{
    char sb[SHOW_MAX + 8];
    const char *pname = get_str(v, d, "profile", false);
    if (pname == NULL) {
        return NULL;
    }
    set_str(v, &dev->profile, pname);
    json_t *idx = json_object_get(ps->index, pname);
    if (idx != NULL) {
        return &ps->list[json_integer_value(idx)];
    }
    const char *cands[64];
    size_t nc = 0;
    const char *k;
    json_t *val;
    json_object_foreach(ps->index, k, val)
    {
        if (nc < 64) {
            cands[nc++] = k;
        }
    }
    const char *s = suggest(pname, cands, nc);
    char sug[SHOW_MAX + 32] = "";
    if (s != NULL) {
        snprintf(sug, sizeof sug, " (did you mean \"%s\"?)", s);
    }
    err_key(v, "profile", AT_VALUE, "unknown profile %s%s", show(pname, sb, sizeof sb), sug);
    return NULL;
}

/* dev->tags: the profile's tags first, then the device's own, a device tag that repeats a
 * profile tag's name reported (duplicates inside one list were reported by parse_tag_list).
 * srcs[k] is where tag k was written. */
static void merge_tags(vctx_t *v, smp_device_cfg_t *dev, const profile_t *prof,
                       const tag_src_t *own, const smp_tag_cfg_t *own_cfgs, size_t nown,
                       const tag_src_t **srcs)
{
    char sb[SHOW_MAX + 8], gb[128];
    size_t nprof = prof != NULL ? prof->n : 0;
    json_t *seen = json_object();
    if (seen == NULL) {
        v->oom = true;
        return;
    }
    for (size_t k = 0; k < nprof + nown; k++) {
        const tag_src_t *s = k < nprof ? &prof->srcs[k] : &own[k - nprof];
        const smp_tag_cfg_t *c = k < nprof ? &prof->cfgs[k] : &own_cfgs[k - nprof];
        srcs[k] = s;
        copy_tag(v, &dev->tags[k], c);
        dev->ntags = k + 1;
        if (c->name == NULL) {
            continue;
        }
        json_t *prev = json_object_get(seen, c->name);
        if (prev == NULL) {
            if (json_object_set_new(seen, c->name, json_integer((json_int_t)k)) != 0) {
                v->oom = true;
            }
        } else if (k >= nprof && (size_t)json_integer_value(prev) < nprof) {
            const tag_src_t *fs = srcs[json_integer_value(prev)];
            smp_jsonpos_loc_t first = locate_member(v, fs->path != NULL ? fs->path : "", "name");
            char *saved = xstrdup(v, cur_path(v));
            if (saved != NULL && s->path != NULL) {
                path_set(v, s->path);
                err_key(v, "name", AT_VALUE,
                        "duplicate tag name %s: profile %s has it (line %u, column %u)",
                        show(c->name, sb, sizeof sb),
                        show(dev->profile != NULL ? dev->profile : "?", gb, sizeof gb),
                        (unsigned)first.line, (unsigned)first.col);
                path_set(v, saved);
            }
            free(saved);
        }
    }
    json_decref(seen);
}

/* At city scale most devices take a profile's tags unchanged: they share one copy of the
 * definitions (about 250 bytes per tag), checked once with the first such device. */
static bool share_profile_tags(vctx_t *v, smp_device_cfg_t *dev, json_t *d, const profile_t *prof)
{
    if (prof == NULL || json_object_get(d, "tags") != NULL || prof->owner == NULL ||
        prof->owner->plugin != dev->plugin) {
        return false;
    }
    dev->tags = prof->owner->tags;
    dev->ntags = prof->owner->ntags;
    dev->tags_shared = true;
    check_device_plugin(v, dev, d, NULL);
    return true;
}

static void parse_device(vctx_t *v, smp_config_t *cfg, size_t i, json_t *d, profiles_t *ps,
                         json_t *names)
{
    static const char *const keys[] = {"name",        "protocol",  "profile",    "tags",
                                       "interval_ms", "refresh_s", "connection", NULL};
    char gb[128];
    smp_device_cfg_t *dev = &cfg->devices[i];
    dev->interval_ms = 1000;
    dev->refresh_s = 300;
    if (!json_is_object(d)) {
        err(v, AT_VALUE, "expected an object, got %s", got(d, gb, sizeof gb));
        return;
    }
    check_known(v, d, keys);
    device_name(v, dev, i, d, names);
    device_basics(v, cfg, dev, d);
    bool profile_given = json_object_get(d, "profile") != NULL;
    profile_t *prof = device_profile(v, dev, d, ps);
    if (share_profile_tags(v, dev, d, prof)) {
        return;
    }
    size_t ndiags_before = v->ndiags;

    tag_src_t *own = NULL;
    smp_tag_cfg_t *own_cfgs = NULL;
    size_t nown = 0;
    json_t *tags = get(v, d, "tags", W_ARRAY, false);
    bool tags_given = json_object_get(d, "tags") != NULL;
    if (tags != NULL) {
        size_t old = push_key(v, "tags");
        parse_tag_list(v, tags, &own, &own_cfgs, &nown);
        pop(v, old);
    }
    size_t total = (prof != NULL ? prof->n : 0) + nown;
    const tag_src_t **srcs = xcalloc(v, total, sizeof *srcs);
    dev->tags = xcalloc(v, total, sizeof *dev->tags);
    if (srcs != NULL && dev->tags != NULL) {
        merge_tags(v, dev, prof, own, own_cfgs, nown, srcs);
        if (total == 0 && !(profile_given && prof == NULL) && !(tags_given && tags == NULL)) {
            err(v, AT_VALUE, "the device has no tags: give a \"profile\" or \"tags\"");
        }
        if (dev->plugin != NULL) {
            check_device_plugin(v, dev, d, srcs);
        }
        if (prof != NULL && !tags_given && prof->owner == NULL && dev->plugin != NULL &&
            v->ndiags == ndiags_before && !v->oom) {
            prof->owner = dev; /* later devices of this profile share its tags */
        }
    }
    free(srcs);
    for (size_t k = 0; own_cfgs != NULL && k < nown; k++) {
        free_tag(&own_cfgs[k], 0);
    }
    free(own_cfgs);
    free_srcs(own, nown);
}

static void parse_devices(vctx_t *v, smp_config_t *cfg, json_t *root, profiles_t *ps)
{
    json_t *arr = get(v, root, "devices", W_ARRAY, true);
    if (arr == NULL) {
        return;
    }
    size_t n = json_array_size(arr);
    cfg->devices = xcalloc(v, n, sizeof *cfg->devices);
    json_t *names = json_object();
    if (cfg->devices == NULL || names == NULL) {
        v->oom = true;
        json_decref(names);
        return;
    }
    size_t old = push_key(v, "devices");
    for (size_t i = 0; i < n; i++) {
        size_t o2 = push_index(v, i);
        cfg->ndevices = i + 1;
        parse_device(v, cfg, i, json_array_get(arr, i), ps, names);
        pop(v, o2);
    }
    pop(v, old);
    json_decref(names);
}

/* ---- load -------------------------------------------------------------------------------- */

static int set_defaults(vctx_t *v, smp_config_t *cfg)
{
    cfg->gateway.data_dir = resolve(v, "./data");
    cfg->gateway.log_level = xstrdup(v, "info");
    cfg->gateway.metrics_interval_s = 60;
    cfg->mqtt.host = xstrdup(v, "127.0.0.1");
    cfg->mqtt.port = 1883;
    cfg->mqtt.topic_prefix = xstrdup(v, "simpul");
    cfg->mqtt.qos = 1;
    cfg->mqtt.keepalive_s = 30;
    cfg->mqtt.version = 4;
    cfg->mqtt.inflight_max = 256;
    cfg->mqtt.format = SMP_FORMAT_JSON;
    cfg->mqtt.sparkplug.use_aliases = true;
    cfg->store.history_retention_h = 168;
    cfg->store.outbox_max_mb = 256;
    for (size_t k = 0; k < sizeof command_keys / sizeof command_keys[0]; k++) {
        *(int *)((char *)cfg + command_keys[k].off) = (int)command_keys[k].dflt;
    }
    cfg->store.history_max_mb = 256;
    cfg->store.history_chunk_max_s = 900;
    cfg->store.commit_interval_ms = 1000;
    return v->oom ? -ENOMEM : 0;
}

/* Derived values that depend on several keys. */
static void finish(vctx_t *v, smp_config_t *cfg)
{
    if (cfg->mqtt.client_id == NULL && cfg->gateway.id != NULL) {
        size_t n = strlen(cfg->gateway.id) + sizeof "simpul-";
        cfg->mqtt.client_id = xmalloc(v, n);
        if (cfg->mqtt.client_id != NULL) {
            snprintf(cfg->mqtt.client_id, n, "simpul-%s", cfg->gateway.id);
        }
    }
    if (cfg->mqtt.sparkplug.edge_node_id == NULL && cfg->gateway.id != NULL) {
        cfg->mqtt.sparkplug.edge_node_id = xstrdup(v, cfg->gateway.id);
    }
    if (cfg->store.path == NULL && cfg->gateway.data_dir != NULL) {
        size_t n = strlen(cfg->gateway.data_dir) + sizeof "/simpul.db";
        cfg->store.path = xmalloc(v, n);
        if (cfg->store.path != NULL) {
            snprintf(cfg->store.path, n, "%s/simpul.db", cfg->gateway.data_dir);
        }
    }
    if (cfg->store.runtime_dir == NULL && cfg->gateway.id != NULL) {
        /* systemd's RuntimeDirectory= (tmpfs under /run), else the shared-memory tmpfs. */
        const char *rd = getenv("RUNTIME_DIRECTORY");
        size_t n = (rd != NULL ? strlen(rd) : 0) + strlen(cfg->gateway.id) + 32;
        cfg->store.runtime_dir = xmalloc(v, n);
        if (cfg->store.runtime_dir != NULL && rd != NULL && rd[0] == '/') {
            snprintf(cfg->store.runtime_dir, n, "%s", rd);
        } else if (cfg->store.runtime_dir != NULL) {
            snprintf(cfg->store.runtime_dir, n, "/dev/shm/simpul-%s", cfg->gateway.id);
        }
    }
}

static void report_syntax(vctx_t *v, const char *text, size_t len, const json_error_t *je)
{
    char path[SMP_JSONPOS_MAX_PATH + 1];
    /* jansson knows where it stopped; the scanner knows which value that was in. */
    smp_jsonpos_path_at(text, len, (size_t)(je->position > 0 ? je->position : 0), path,
                        sizeof path);
    smp_jsonpos_loc_t loc = {.line = je->line > 0 ? (uint32_t)je->line : 1,
                             .col = je->column > 0 ? (uint32_t)je->column : 1};
    char msg[sizeof je->text + 32];
    snprintf(msg, sizeof msg, "invalid JSON: %s", je->text);
    add_diag(v, loc, path, msg);
}

/* The directory of the config file, for relative paths. */
static void set_dir(vctx_t *v)
{
    const char *slash = strrchr(v->name, '/');
    if (slash != NULL) {
        size_t n = slash == v->name ? 1 : (size_t)(slash - v->name);
        v->dir = xmalloc(v, n + 1);
        if (v->dir != NULL) {
            memcpy(v->dir, v->name, n);
            v->dir[n] = '\0';
        }
    }
}

/* The JSON text as a tree, its duplicate keys reported; NULL when it is no JSON object (or
 * out of memory). */
static json_t *parse_root(vctx_t *v, const char *text, size_t len)
{
    json_error_t je;
    /* No JSON_DECODE_INT_AS_REAL: integers stay exact (64-bit). No JSON_REJECT_DUPLICATES:
     * that stops at the first duplicate, jsonpos reports all of them. */
    json_t *root = json_loadb(text != NULL ? text : "", text != NULL ? len : 0, 0, &je);
    if (root == NULL) {
        report_syntax(v, text != NULL ? text : "", text != NULL ? len : 0, &je);
        return NULL;
    }
    if (smp_jsonpos_scan(text, len, &v->pos) != 0) {
        v->oom = true;
        json_decref(root);
        return NULL;
    }
    for (size_t i = 0; i < smp_jsonpos_ndups(v->pos); i++) {
        const smp_jsonpos_dup_t *d = smp_jsonpos_dup(v->pos, i);
        char msg[96];
        snprintf(msg, sizeof msg, "duplicate key (first at line %u, column %u)",
                 (unsigned)d->first.line, (unsigned)d->first.col);
        add_diag(v, d->at, d->path, msg);
    }
    if (!json_is_object(root)) {
        char gb[128];
        err(v, AT_VALUE, "the config must be a JSON object, got %s", got(root, gb, sizeof gb));
        json_decref(root);
        return NULL;
    }
    return root;
}

/* The plugin set for the devices' protocols, from the override, gateway.plugin_dir or the
 * default search path. -1 out of memory. */
static int open_plugins(vctx_t *v, smp_config_t *cfg, const char *plugin_dir_override)
{
    const char *dir = plugin_dir_override;
    if (dir == NULL && cfg->gateway.plugin_dir != NULL) {
        struct stat st;
        dir = cfg->gateway.plugin_dir;
        if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
            char sb[PATH_SHOW];
            size_t old = push_key(v, "gateway");
            err_key(v, "plugin_dir", AT_VALUE, "%s is not a directory", show(dir, sb, sizeof sb));
            pop(v, old);
        }
    }
    cfg->plugins = smp_plugin_set_new(dir);
    if (cfg->plugins == NULL) {
        v->oom = true;
        return -1;
    }
    return 0;
}

/* The loader behind both public entry points. `preset` (unit tests) is a plugin set to use
 * instead of a new one; it is owned by this call. */
static int load_text(const char *name, const char *text, size_t len,
                     const char *plugin_dir_override, smp_plugin_set_t *preset, FILE *errs,
                     smp_config_t **out)
{
    vctx_t v = {.name = name != NULL ? name : "(config)"};
    json_t *root = NULL;
    profiles_t ps = {0};
    *out = NULL;

    smp_config_t *cfg = calloc(1, sizeof *cfg);
    if (cfg == NULL) {
        v.oom = true;
        smp_plugin_set_free(preset);
        return flush_diags(&v, errs);
    }
    cfg->plugins = preset;
    cfg->path = xstrdup(&v, v.name);
    set_dir(&v);
    if (set_defaults(&v, cfg) != 0 || (root = parse_root(&v, text, len)) == NULL) {
        goto done;
    }
    static const char *const root_keys[] = {"gateway", "mqtt",     "store", "profiles",
                                            "devices", "commands", NULL};
    check_known(&v, root, root_keys);
    parse_gateway(&v, cfg, root);
    parse_mqtt(&v, cfg, root);
    parse_store(&v, cfg, root);
    parse_commands(&v, cfg, root);

    if (cfg->plugins == NULL && open_plugins(&v, cfg, plugin_dir_override) < 0) {
        goto done;
    }
    parse_profiles(&v, root, &ps);
    parse_devices(&v, cfg, root, &ps);
    finish(&v, cfg);

done:
    free_profiles(&ps);
    json_decref(root);
    smp_jsonpos_free(v.pos);
    int n = 0;
    if (v.ndiags > 0 || v.oom) {
        n = flush_diags(&v, errs);
        smp_config_free(cfg);
    } else {
        *out = cfg;
    }
    free_diags(&v);
    free(v.path);
    free(v.dir);
    return n;
}

int smp_config_load_text(const char *name, const char *text, size_t len,
                         const char *plugin_dir_override, FILE *errs, smp_config_t **out)
{
    return load_text(name, text, len, plugin_dir_override, NULL, errs, out);
}

/* Reads a whole file of at most FILE_MAX_BYTES. Returns NULL with *why set on failure. */
static char *read_file(FILE *f, size_t *len, const char **why)
{
    size_t cap = 64 * 1024, n = 0;
    char *buf = malloc(cap);
    *why = NULL;
    while (buf != NULL) {
        n += fread(buf + n, 1, cap - n, f);
        if (ferror(f)) {
            *why = strerror(errno);
            break;
        }
        if (n > FILE_MAX_BYTES) {
            *why = "the file is larger than 16 MiB";
            break;
        }
        if (n < cap) {
            *len = n;
            return buf; /* end of file */
        }
        /* Grow to one byte past the limit at most, to tell "exactly 16 MiB" from "more". */
        size_t ncap = cap * 2 > FILE_MAX_BYTES ? (size_t)FILE_MAX_BYTES + 1 : cap * 2;
        char *nb = realloc(buf, ncap);
        if (nb == NULL) {
            break;
        }
        buf = nb;
        cap = ncap;
    }
    if (*why == NULL) {
        *why = "out of memory";
    }
    free(buf);
    return NULL;
}

int smp_config_load(const char *path, const char *plugin_dir_override, FILE *errs,
                    smp_config_t **out)
{
    *out = NULL;
    const char *name = path != NULL ? path : "(null)";
    const char *why = NULL;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = path != NULL ? fopen(path, "rbe") : NULL;
    if (f == NULL) {
        why = strerror(path != NULL ? errno : EINVAL);
    } else {
        struct stat st;
        if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
            why = "is a directory";
        } else {
            buf = read_file(f, &len, &why);
        }
        fclose(f);
    }
    if (why != NULL) {
        if (errs != NULL) {
            fprintf(errs, "%s:1:1: (root): cannot read the config: %s\n", name, why);
        }
        return 1;
    }
    int rc = load_text(name, buf, len, plugin_dir_override, NULL, errs, out);
    free(buf);
    return rc;
}

void smp_config_free(smp_config_t *cfg)
{
    if (cfg == NULL) {
        return;
    }
    for (size_t i = 0; cfg->devices != NULL && i < cfg->ndevices; i++) {
        smp_device_cfg_t *d = &cfg->devices[i];
        size_t ntag_keys = d->plugin != NULL ? d->plugin->ntag_keys : 0;
        for (size_t k = 0; !d->tags_shared && d->tags != NULL && k < d->ntags; k++) {
            free_tag(&d->tags[k], ntag_keys);
        }
        if (!d->tags_shared) {
            free(d->tags);
        }
        if (d->plugin != NULL) {
            wipe_secrets(d->conn_params, d->plugin->desc->conn_keys, d->plugin->nconn_keys);
        }
        free_params(d->conn_params, d->plugin != NULL ? d->plugin->nconn_keys : 0);
        free(d->name);
        free(d->protocol);
        free(d->profile);
    }
    free(cfg->devices);
    free(cfg->path);
    free(cfg->gateway.id);
    free(cfg->gateway.data_dir);
    free(cfg->gateway.plugin_dir);
    free(cfg->gateway.log_level);
    free(cfg->mqtt.host);
    free(cfg->mqtt.client_id);
    free(cfg->mqtt.topic_prefix);
    free(cfg->mqtt.username);
    if (cfg->mqtt.password != NULL) {
        /* Do not leave the secret lying in freed heap memory. */
        volatile char *p = cfg->mqtt.password;
        while (*p != '\0') {
            *p++ = '\0';
        }
        free(cfg->mqtt.password);
    }
    free(cfg->mqtt.password_file);
    free(cfg->mqtt.tls_ca_file);
    free(cfg->mqtt.tls_cert_file);
    free(cfg->mqtt.tls_key_file);
    free(cfg->store.path);
    free(cfg->store.runtime_dir);
    free(cfg->mqtt.sparkplug.group_id);
    free(cfg->mqtt.sparkplug.edge_node_id);
    free(cfg->mqtt.sparkplug.primary_host_id);
    /* Last: the devices above borrowed the plugins' tables. */
    smp_plugin_set_free(cfg->plugins);
    free(cfg);
}

const smp_device_cfg_t *smp_config_device(const smp_config_t *cfg, const char *name)
{
    for (size_t i = 0; cfg != NULL && name != NULL && i < cfg->ndevices; i++) {
        if (cfg->devices[i].name != NULL && strcmp(cfg->devices[i].name, name) == 0) {
            return &cfg->devices[i];
        }
    }
    return NULL;
}

static bool str_eq(const char *a, const char *b)
{
    return a == b || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static bool params_eq(const smp_param_t *a, const smp_param_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i].set != b[i].set || a[i].i != b[i].i || a[i].d != b[i].d ||
            !str_eq(a[i].s, b[i].s)) {
            return false;
        }
    }
    return true;
}

static bool tag_eq(const smp_tag_cfg_t *a, const smp_tag_cfg_t *b, size_t nkeys)
{
    return str_eq(a->name, b->name) && a->type == b->type && a->scale == b->scale &&
           a->offset == b->offset && str_eq(a->unit, b->unit) && a->interval_ms == b->interval_ms &&
           a->deadband == b->deadband && a->writable == b->writable && a->has_min == b->has_min &&
           a->has_max == b->has_max && a->min == b->min && a->max == b->max &&
           a->min_is_int == b->min_is_int && a->max_is_int == b->max_is_int &&
           a->min_i == b->min_i && a->max_i == b->max_i && params_eq(a->params, b->params, nkeys);
}

bool smp_plugin_host_same(const smp_plugin_host_t *a, const smp_plugin_host_t *b)
{
    /* Each config has its own host record; dlopen gives both the one library's handle. */
    return a != NULL && b != NULL && a->handle == b->handle && strcmp(a->name, b->name) == 0;
}

bool smp_device_cfg_equal(const smp_device_cfg_t *a, const smp_device_cfg_t *b)
{
    /* Not the profile's name: the tags it gives are compared themselves. */
    if (!str_eq(a->name, b->name) || !str_eq(a->protocol, b->protocol) ||
        a->interval_ms != b->interval_ms || a->refresh_s != b->refresh_s ||
        !smp_plugin_host_same(a->plugin, b->plugin) || strcmp(a->conn_key, b->conn_key) != 0 ||
        a->ntags != b->ntags) {
        return false;
    }
    if (!params_eq(a->conn_params, b->conn_params, a->plugin->nconn_keys)) {
        return false;
    }
    for (size_t t = 0; t < a->ntags; t++) {
        if (!tag_eq(&a->tags[t], &b->tags[t], a->plugin->ntag_keys)) {
            return false;
        }
    }
    return true;
}

bool smp_config_mqtt_equal(const smp_config_t *a, const smp_config_t *b)
{
    return str_eq(a->mqtt.host, b->mqtt.host) && a->mqtt.port == b->mqtt.port &&
           str_eq(a->mqtt.client_id, b->mqtt.client_id) && a->mqtt.qos == b->mqtt.qos &&
           a->mqtt.keepalive_s == b->mqtt.keepalive_s && a->mqtt.version == b->mqtt.version &&
           str_eq(a->mqtt.username, b->mqtt.username) &&
           str_eq(a->mqtt.password, b->mqtt.password) &&
           str_eq(a->mqtt.tls_ca_file, b->mqtt.tls_ca_file) &&
           str_eq(a->mqtt.tls_cert_file, b->mqtt.tls_cert_file) &&
           str_eq(a->mqtt.tls_key_file, b->mqtt.tls_key_file) &&
           a->mqtt.tls_no_verify == b->mqtt.tls_no_verify &&
           a->mqtt.inflight_max == b->mqtt.inflight_max;
}

/* The keys a running gateway cannot take over: the store is open on them, or every topic and
 * session is named after them. */
const char *smp_config_fixed_change(const smp_config_t *a, const smp_config_t *b)
{
    const struct {
        bool changed;
        const char *key;
    } fixed[] = {
        {!str_eq(a->gateway.id, b->gateway.id), "gateway.id"},
        {!str_eq(a->gateway.data_dir, b->gateway.data_dir), "gateway.data_dir"},
        {!str_eq(a->mqtt.topic_prefix, b->mqtt.topic_prefix), "mqtt.topic_prefix"},
        {a->mqtt.format != b->mqtt.format, "mqtt.format"},
        {!str_eq(a->mqtt.sparkplug.group_id, b->mqtt.sparkplug.group_id) ||
             !str_eq(a->mqtt.sparkplug.edge_node_id, b->mqtt.sparkplug.edge_node_id) ||
             !str_eq(a->mqtt.sparkplug.primary_host_id, b->mqtt.sparkplug.primary_host_id) ||
             a->mqtt.sparkplug.use_aliases != b->mqtt.sparkplug.use_aliases,
         "mqtt.sparkplug"},
        {a->mqtt.format != SMP_FORMAT_JSON && !str_eq(a->mqtt.client_id, b->mqtt.client_id),
         "mqtt.client_id (with a sparkplug format)"},
        {!str_eq(a->store.path, b->store.path), "store.path"},
        {!str_eq(a->store.runtime_dir, b->store.runtime_dir), "store.runtime_dir"},
        {a->store.history_retention_h != b->store.history_retention_h ||
             a->store.outbox_max_mb != b->store.outbox_max_mb ||
             a->store.sync_normal != b->store.sync_normal ||
             a->store.on_error_refuse != b->store.on_error_refuse ||
             a->store.history_max_mb != b->store.history_max_mb ||
             a->store.history_chunk_max_s != b->store.history_chunk_max_s ||
             a->store.commit_interval_ms != b->store.commit_interval_ms,
         "store"},
        {a->commands.dedup_window_s != b->commands.dedup_window_s ||
             a->commands.audit_max_rows != b->commands.audit_max_rows ||
             a->commands.audit_retention_days != b->commands.audit_retention_days,
         "commands.dedup_window_s/audit_max_rows/audit_retention_days"},
    };
    for (size_t k = 0; k < sizeof fixed / sizeof fixed[0]; k++) {
        if (fixed[k].changed) {
            return fixed[k].key;
        }
    }
    return NULL;
}
