#include "paths.h"

#include <errno.h>
#include <stdarg.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "jsonpos.h"

struct pctx {
    const smp_config_t *cfg;
    smp_jsonpos_t *pos; /* NULL when the file cannot be read again: positions become 1:1 */
    FILE *errs;
    char who[96];
    int n;
};

static void problem(struct pctx *c, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void problem(struct pctx *c, const char *key, const char *fmt, ...)
{
    smp_jsonpos_loc_t loc = {1, 1};
    if (c->pos != NULL && !smp_jsonpos_value(c->pos, key, &loc)) {
        loc = (smp_jsonpos_loc_t){1, 1};
    }
    fprintf(c->errs, "%s:%u:%u: %s: ", c->cfg->path, loc.line, loc.col, key);
    va_list ap;
    va_start(ap, fmt);
    vfprintf(c->errs, fmt, ap);
    va_end(ap);
    fprintf(c->errs, " (checked as %s)\n", c->who);
    c->n++;
}

static char *parent_of(const char *path)
{
    char *d = strdup(path);
    if (d == NULL) {
        return NULL;
    }
    char *slash = strrchr(d, '/');
    while (slash != NULL && slash != d && slash[1] == '\0') { /* "a/b/" is "a/b" */
        *slash = '\0';
        slash = strrchr(d, '/');
    }
    if (slash == NULL) {
        strcpy(d, ".");
    } else if (slash == d) {
        d[1] = '\0';
    } else {
        *slash = '\0';
    }
    return d;
}

/* A directory simpul writes into: it exists and is writable, or the nearest existing parent
 * is, so that the store's mkdir -p can create it. Returns true when usable. */
static bool check_dir(struct pctx *c, const char *key, const char *dir)
{
    struct stat sb;
    if (stat(dir, &sb) == 0) {
        if (!S_ISDIR(sb.st_mode)) {
            problem(c, key, "%s is not a directory", dir);
            return false;
        }
        if (access(dir, W_OK | X_OK) != 0) {
            problem(c, key, "cannot write in %s: %s", dir, strerror(errno));
            return false;
        }
        return true;
    }
    if (errno != ENOENT) {
        problem(c, key, "cannot use %s: %s", dir, strerror(errno));
        return false;
    }
    char *up = parent_of(dir);
    if (up == NULL) {
        problem(c, key, "cannot check %s: %s", dir, strerror(ENOMEM));
        return false;
    }
    /* Walk up to the first directory that exists: that is where mkdir -p starts. */
    while (stat(up, &sb) != 0 && errno == ENOENT && strcmp(up, "/") != 0 && strcmp(up, ".") != 0) {
        char *next = parent_of(up);
        free(up);
        up = next;
        if (up == NULL) {
            problem(c, key, "cannot check %s: %s", dir, strerror(ENOMEM));
            return false;
        }
    }
    bool ok = access(up, W_OK | X_OK) == 0;
    if (!ok) {
        problem(c, key, "%s does not exist and cannot be created: cannot write in %s: %s", dir, up,
                strerror(errno));
    }
    free(up);
    return ok;
}

static void check_store_file(struct pctx *c, const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0) {
        if (errno != ENOENT) {
            problem(c, "store.path", "cannot use %s: %s", path, strerror(errno));
        }
        return; /* created at start */
    }
    if (!S_ISREG(sb.st_mode)) {
        problem(c, "store.path", "%s is not a regular file", path);
    } else if (access(path, R_OK | W_OK) != 0) {
        problem(c, "store.path", "cannot read and write %s: %s", path, strerror(errno));
    }
}

static smp_jsonpos_t *scan_file(const char *path)
{
    FILE *f = fopen(path, "rbe");
    if (f == NULL) {
        return NULL;
    }
    char *buf = NULL;
    size_t cap = 0, len = 0;
    for (;;) {
        if (len == cap) {
            size_t ncap = cap ? cap * 2 : 65536;
            char *nb = realloc(buf, ncap);
            if (nb == NULL) {
                break;
            }
            buf = nb;
            cap = ncap;
        }
        size_t r = fread(buf + len, 1, cap - len, f);
        len += r;
        if (r == 0) {
            break;
        }
    }
    fclose(f);
    smp_jsonpos_t *jp = NULL;
    if (buf != NULL && smp_jsonpos_scan(buf, len, &jp) != 0) {
        jp = NULL;
    }
    free(buf);
    return jp;
}

int smp_paths_check(const smp_config_t *cfg, FILE *errs)
{
    struct pctx c = {.cfg = cfg, .errs = errs};
    struct passwd pw, *pwp = NULL;
    char pwbuf[1024];
    uid_t uid = geteuid();
    if (getpwuid_r(uid, &pw, pwbuf, sizeof pwbuf, &pwp) == 0 && pwp != NULL) {
        snprintf(c.who, sizeof c.who, "user %s, uid %u", pw.pw_name, (unsigned)uid);
    } else {
        snprintf(c.who, sizeof c.who, "uid %u", (unsigned)uid);
    }
    c.pos = scan_file(cfg->path);
    bool data_ok =
        cfg->gateway.data_dir == NULL || check_dir(&c, "gateway.data_dir", cfg->gateway.data_dir);
    const char *db = cfg->store.path;
    if (db != NULL && strcmp(db, ":memory:") != 0) {
        char *dir = parent_of(db);
        /* The default store.path is data_dir/simpul.db: one problem, reported once. */
        bool same =
            dir != NULL && cfg->gateway.data_dir != NULL && strcmp(dir, cfg->gateway.data_dir) == 0;
        if (dir != NULL && (data_ok || !same) && check_dir(&c, "store.path", dir)) {
            check_store_file(&c, db);
        }
        free(dir);
    }
    smp_jsonpos_free(c.pos);
    return c.n;
}
