/* Plugin host: loads the real example.so and drives it through the ABI; refuses a plugin of
 * another ABI version, a missing plugin, bad protocol names, files that are not plugins, and
 * descriptors that break the rules; honours the search order; the host API works. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "log.h"
#include "plugin_host.h"

#define EXAMPLE_DIR SMP_TEST_EXAMPLE_PLUGIN_DIR

/* ---- helpers ----------------------------------------------------------------------------- */

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/simpul-ph-XXXXXX";
    char *d = mkdtemp(tmpl);
    assert_non_null(d);
    return strdup(d);
}

static char *join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    assert_non_null(p);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}

static void copy_file(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb");
    assert_non_null(in);
    FILE *out = fopen(to, "wb");
    assert_non_null(out);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) {
        assert_int_equal(fwrite(buf, 1, n, out), n);
    }
    fclose(in);
    fclose(out);
}

static void expect_prefix(const char *s, const char *prefix)
{
    if (strncmp(s, prefix, strlen(prefix)) != 0) {
        print_error("expected a message starting \"%s\", got \"%s\"", prefix, s);
        fail();
    }
}

/* Collects what a check_* function reports. */
typedef struct reports {
    int n;
    char key[8][32];
    char msg[8][128];
} reports_t;

__attribute__((format(printf, 3, 4))) static void collect(void *ctx, const char *key,
                                                          const char *fmt, ...)
{
    reports_t *r = ctx;
    if (r->n < 8) {
        snprintf(r->key[r->n], sizeof r->key[0], "%s", key != NULL ? key : "(null)");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->msg[r->n], sizeof r->msg[0], fmt, ap);
        va_end(ap);
    }
    r->n++;
}

/* ---- the real example plugin ------------------------------------------------------------- */

static void test_load_example_and_drive_it(void **state)
{
    (void)state;
    char err[512];
    smp_plugin_set_t *set = smp_plugin_set_new(EXAMPLE_DIR);
    assert_non_null(set);
    const smp_plugin_host_t *p = smp_plugin_set_get(set, "example", err, sizeof err);
    if (p == NULL) {
        print_error("%s", err);
        fail();
    }
    assert_string_equal(err, "");
    assert_non_null(p->handle);
    assert_string_equal(p->name, "example");
    assert_string_equal(p->path, EXAMPLE_DIR "/example.so");
    assert_int_equal(p->nconn_keys, 2);
    assert_int_equal(p->ntag_keys, 3);
    assert_ptr_equal(smp_plugin_set_get(set, "example", err, sizeof err), p); /* loaded once */
    const smp_plugin_t *d = p->desc;
    assert_int_equal(d->abi_version, SMP_PLUGIN_ABI_VERSION);
    assert_string_equal(d->name, "example");
    assert_string_equal(d->conn_keys[0].name, "host");
    assert_string_equal(d->tag_keys[0].name, "signal");

    /* Config-time functions. */
    smp_param_t conn[2] = {{.set = true, .s = "sim-a"}, {.set = true, .i = 0}};
    char key[32];
    assert_int_equal(d->conn_key(conn, key, sizeof key), 0);
    assert_string_equal(key, "example:sim-a");
    assert_int_equal(d->conn_key(conn, key, 5), -ENOSPC);
    reports_t rep = {0};
    assert_int_equal(d->check_connection(conn, collect, &rep), 0);
    assert_int_equal(rep.n, 0);
    smp_param_t empty_host[2] = {{.set = true, .s = ""}, {.set = true, .i = 0}};
    assert_int_equal(d->check_connection(empty_host, collect, &rep), 1);
    assert_int_equal(rep.n, 1);
    assert_string_equal(rep.key[0], "host");

    smp_param_t counter[3] = {{.set = true, .i = 0, .s = "counter"},
                              {.set = true, .i = 60, .d = 60},
                              {.set = true, .i = 1, .d = 1}};
    smp_param_t sine[3] = {
        {.set = true, .i = 1, .s = "sine"}, {.set = true, .i = 60, .d = 60}, {.set = true, .d = 2}};
    smp_param_t toggle[3] = {{.set = true, .i = 2, .s = "toggle"},
                             {.set = true, .i = 60, .d = 60},
                             {.set = true, .i = 1, .d = 1}};
    smp_tag_t tags[3] = {
        {.name = "count", .type = SMP_TYPE_UINT32, .writable = true, .params = counter},
        {.name = "wave", .type = SMP_TYPE_FLOAT64, .writable = false, .params = sine},
        {.name = "blink", .type = SMP_TYPE_BOOL, .writable = true, .params = toggle},
    };
    for (int i = 0; i < 3; i++) {
        assert_int_equal(d->check_tag(&tags[i], collect, &rep), 0);
    }
    smp_tag_t bad = {.name = "w", .type = SMP_TYPE_INT16, .params = sine};
    memset(&rep, 0, sizeof rep);
    assert_int_equal(d->check_tag(&bad, collect, &rep), 1);
    assert_string_equal(rep.key[0], "signal");
    assert_string_equal(rep.msg[0], "a sine needs type float32 or float64");

    /* Runtime functions, as a connection's worker thread would call them. */
    void *c = d->conn_create(conn, "example:test");
    assert_non_null(c);
    assert_int_equal(d->conn_open(c), 0);
    void *dev = d->device_create(c, conn, tags, 3, "example:dev");
    assert_non_null(dev);
    uint32_t idx[3] = {0, 1, 2};
    smp_reading_t out[3];
    assert_int_equal(d->device_read(dev, idx, 3, out), 1); /* one request for the batch */
    for (int i = 0; i < 3; i++) {
        assert_int_equal(out[i].status, 0);
    }
    assert_int_equal(out[0].value.v.u, 0);
    assert_true(fabs(out[1].value.v.d) <= 2.0);
    assert_false(out[2].value.v.b);
    assert_int_equal(d->device_read(dev, idx, 3, out), 1);
    assert_int_equal(out[0].value.v.u, 1);
    assert_true(out[2].value.v.b);

    smp_value_t in = {.v.u = 42};
    smp_reading_t rb;
    const char *msg = NULL;
    assert_int_equal(d->device_write(dev, 0, &in, &rb, &msg), 0);
    assert_int_equal(rb.status, 0);
    assert_int_equal(rb.value.v.u, 42);
    assert_int_equal(d->device_read(dev, idx, 1, out), 1);
    assert_int_equal(out[0].value.v.u, 42);
    in.v.d = 1.0;
    assert_int_equal(d->device_write(dev, 1, &in, &rb, &msg), SMP_EDEVICE);
    assert_string_equal(msg, "a sine is read-only");

    d->conn_close(c);
    d->conn_close(c); /* allowed on a closed connection */
    assert_int_equal(d->device_read(dev, idx, 3, out), -ENOTCONN);
    d->device_destroy(dev);
    d->conn_destroy(c);
    d->conn_destroy(NULL);
    smp_plugin_set_free(set);
    smp_plugin_set_free(NULL);
}

/* ---- refusals ---------------------------------------------------------------------------- */

static void test_refuses_other_abi(void **state)
{
    (void)state;
    char err[512];
    smp_plugin_set_t *set = smp_plugin_set_new(EXAMPLE_DIR);
    assert_null(smp_plugin_set_get(set, "badabi", err, sizeof err));
    assert_string_equal(err, "badabi.so: plugin ABI version 2, this simpul supports ABI version 1");
    smp_plugin_set_free(set);
}

static void test_refuses_missing_plugin(void **state)
{
    (void)state;
    char err[512];
    smp_plugin_set_t *set = smp_plugin_set_new(EXAMPLE_DIR);
    assert_null(smp_plugin_set_get(set, "nosuch", err, sizeof err));
    expect_prefix(err, "no plugin for protocol \"nosuch\": nosuch.so not found in " EXAMPLE_DIR);
    smp_plugin_set_free(set);
}

static void test_refuses_bad_protocol_names(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *sub = join(dir, "sub");
    assert_int_equal(mkdir(sub, 0700), 0);
    /* A real plugin one level up: a traversing name would reach it. */
    char *evil = join(dir, "evil.so");
    copy_file(EXAMPLE_DIR "/example.so", evil);
    smp_plugin_set_t *set = smp_plugin_set_new(sub);
    static const char *const names[] = {
        "",
        "../evil",
        "../example",
        "Example",
        "a/b",
        "ex ample",
        "example.so",
        "exa\nmple",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" /* 65 */,
    };
    char err[512];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        assert_null(smp_plugin_set_get(set, names[i], err, sizeof err));
        expect_prefix(err, "invalid protocol name \"");
        assert_null(strchr(err, '\n')); /* the message stays one line */
    }
    assert_null(smp_plugin_set_get(set, NULL, err, sizeof err));
    expect_prefix(err, "invalid protocol name");
    smp_plugin_set_free(set);
    unlink(evil);
    rmdir(sub);
    rmdir(dir);
    free(evil);
    free(sub);
    free(dir);
}

static void test_refuses_files_that_are_not_plugins(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *junk = join(dir, "junk.so");
    char *nosym = join(dir, "nosym.so");
    char *other = join(dir, "other.so");
    FILE *f = fopen(junk, "w");
    assert_non_null(f);
    fputs("this is not an ELF file\n", f);
    fclose(f);
    /* A valid shared object without the entry point: the ABI-2 build renamed is not that, so
     * use a system library. */
    copy_file("/lib/x86_64-linux-gnu/libjansson.so.4", nosym);
    /* A real plugin under another protocol's file name. */
    copy_file(EXAMPLE_DIR "/example.so", other);

    char err[512];
    smp_plugin_set_t *set = smp_plugin_set_new(dir);
    assert_null(smp_plugin_set_get(set, "junk", err, sizeof err));
    expect_prefix(err, "junk.so: cannot load plugin: ");
    assert_null(smp_plugin_set_get(set, "nosym", err, sizeof err));
    assert_string_equal(err, "nosym.so: not a simpul plugin (no smp_plugin_entry symbol)");
    assert_null(smp_plugin_set_get(set, "other", err, sizeof err));
    assert_string_equal(err, "other.so: the plugin is for protocol \"example\", not \"other\"");
    smp_plugin_set_free(set);

    unlink(junk), unlink(nosym), unlink(other), rmdir(dir);
    free(junk), free(nosym), free(other), free(dir);
}

static void test_search_order(void **state)
{
    (void)state;
    char err[512];
    char *empty = make_tmpdir();
    char *shadow = make_tmpdir();
    char *shadow_so = join(shadow, "example.so");
    /* The ABI-2 build under the name example.so: loading it proves which directory won. */
    copy_file(EXAMPLE_DIR "/badabi.so", shadow_so);
    const char *old = getenv("SIMPUL_PLUGIN_DIR");
    char *saved = old != NULL ? strdup(old) : NULL;

    /* The explicit directory comes first, and the first directory holding the file decides
     * (a broken plugin there is not skipped for another further down). */
    setenv("SIMPUL_PLUGIN_DIR", EXAMPLE_DIR, 1);
    smp_plugin_set_t *set = smp_plugin_set_new(shadow);
    assert_null(smp_plugin_set_get(set, "example", err, sizeof err));
    assert_string_equal(err,
                        "example.so: plugin ABI version 2, this simpul supports ABI version 1");
    smp_plugin_set_free(set);

    /* Not in the explicit directory: $SIMPUL_PLUGIN_DIR is next. */
    set = smp_plugin_set_new(empty);
    const smp_plugin_host_t *p = smp_plugin_set_get(set, "example", err, sizeof err);
    assert_non_null(p);
    assert_string_equal(p->path, EXAMPLE_DIR "/example.so");
    smp_plugin_set_free(set);

    /* $SIMPUL_PLUGIN_DIR before the built-in directories. */
    setenv("SIMPUL_PLUGIN_DIR", shadow, 1);
    set = smp_plugin_set_new(NULL);
    assert_null(smp_plugin_set_get(set, "example", err, sizeof err));
    expect_prefix(err, "example.so: plugin ABI version 2");
    assert_null(smp_plugin_set_get(set, "nosuch", err, sizeof err));
    expect_prefix(err, "no plugin for protocol \"nosuch\": nosuch.so not found in ");
    assert_non_null(strstr(err, shadow));
    smp_plugin_set_free(set);

    if (saved != NULL) {
        setenv("SIMPUL_PLUGIN_DIR", saved, 1);
    } else {
        unsetenv("SIMPUL_PLUGIN_DIR");
    }
    free(saved);
    unlink(shadow_so);
    rmdir(shadow);
    rmdir(empty);
    free(shadow_so);
    free(shadow);
    free(empty);
}

/* ---- descriptor checks -------------------------------------------------------------------- */

static int st_conn_key(const smp_param_t *c, char *buf, size_t n)
{
    (void)c;
    snprintf(buf, n, "k");
    return 0;
}
static void *st_conn_create(const smp_param_t *c, void *log_ctx)
{
    (void)c, (void)log_ctx;
    return NULL;
}
static int st_conn_open(void *c)
{
    (void)c;
    return 0;
}
static void st_void(void *c)
{
    (void)c;
}
static void *st_device_create(void *c, const smp_param_t *p, const smp_tag_t *t, size_t n,
                              void *log_ctx)
{
    (void)c, (void)p, (void)t, (void)n, (void)log_ctx;
    return NULL;
}
static int st_device_read(void *d, const uint32_t *idx, size_t n, smp_reading_t *out)
{
    (void)d, (void)idx, (void)n, (void)out;
    return 0;
}
static int st_device_write(void *d, uint32_t idx, const smp_value_t *in, smp_reading_t *rb,
                           const char **msg)
{
    (void)d, (void)idx, (void)in, (void)rb, (void)msg;
    return 0;
}

static const char *const st_choices[] = {"x", "y", NULL};
static const smp_config_key_t st_conn_keys[] = {
    {.name = "port", .type = SMP_KEY_INT, .min = 1, .max = 65535, .default_value = "502"},
    {.name = "mode", .type = SMP_KEY_ENUM, .choices = st_choices, .default_value = "\"y\""},
    {.name = NULL},
};
static const smp_config_key_t st_tag_keys[] = {
    {.name = "reg", .type = SMP_KEY_INT, .required = true, .min = 0, .max = 9},
    {.name = NULL},
};

static smp_plugin_t good_desc(void)
{
    smp_plugin_t d = {
        .abi_version = SMP_PLUGIN_ABI_VERSION,
        .struct_size = sizeof(smp_plugin_t),
        .name = "stat",
        .conn_keys = st_conn_keys,
        .tag_keys = st_tag_keys,
        .conn_key = st_conn_key,
        .conn_create = st_conn_create,
        .conn_open = st_conn_open,
        .conn_close = st_void,
        .conn_destroy = st_void,
        .device_create = st_device_create,
        .device_destroy = st_void,
        .device_read = st_device_read,
        .device_write = st_device_write,
    };
    return d;
}

static void expect_refused(const smp_plugin_t *d, const char *want)
{
    char err[512];
    assert_int_equal(smp_plugin_check(d, "t.so", err, sizeof err), -EINVAL);
    if (strstr(err, want) == NULL) {
        print_error("expected \"%s\" in \"%s\"", want, err);
        fail();
    }
}

static void expect_keys_refused(const smp_config_key_t *conn, const smp_config_key_t *tag,
                                const char *want)
{
    smp_plugin_t d = good_desc();
    if (conn != NULL) {
        d.conn_keys = conn;
    }
    if (tag != NULL) {
        d.tag_keys = tag;
    }
    expect_refused(&d, want);
}

static void test_descriptor_checks(void **state)
{
    (void)state;
    char err[512];
    smp_plugin_t d = good_desc();
    assert_int_equal(smp_plugin_check(&d, "t.so", err, sizeof err), 0);
    /* Optional members and reserved[] do not matter. */
    d.reserved[0] = (void *)&d;
    assert_int_equal(smp_plugin_check(&d, "t.so", err, sizeof err), 0);

    expect_refused(NULL, "t.so: no plugin descriptor");
    d = good_desc();
    d.abi_version = 2;
    expect_refused(&d, "t.so: plugin ABI version 2, this simpul supports ABI version 1");
    d = good_desc();
    d.struct_size = 16;
    expect_refused(&d, "t.so: plugin descriptor is 16 bytes, ABI version 1 needs at least");
    d = good_desc();
    d.name = NULL;
    expect_refused(&d, "plugin name \"(null)\"");
    d.name = "Bad-Name";
    expect_refused(&d, "plugin name \"Bad-Name\" is not 1-64 of [a-z0-9_]");
    d = good_desc();
    d.device_read = NULL;
    expect_refused(&d, "t.so: plugin \"stat\" has no device_read function");
    d = good_desc();
    d.conn_key = NULL;
    expect_refused(&d, "has no conn_key function");
    d = good_desc();
    d.conn_keys = NULL;
    expect_refused(&d, "connection key table is NULL");

    const smp_config_key_t bad_type[] = {{.name = "k", .type = (smp_key_type_t)99}, {0}};
    expect_keys_refused(bad_type, NULL, "connection key \"k\" has unknown type 99");
    const smp_config_key_t bad_range[] = {{.name = "k", .type = SMP_KEY_INT, .min = 5, .max = 4},
                                          {0}};
    expect_keys_refused(bad_range, NULL, "connection key \"k\": min > max");
    const smp_config_key_t no_choices[] = {{.name = "k", .type = SMP_KEY_ENUM}, {0}};
    expect_keys_refused(no_choices, NULL, "an enum needs 1-64 non-empty choices");
    static const char *const empty_choice[] = {"a", "", NULL};
    const smp_config_key_t bad_choice[] = {
        {.name = "k", .type = SMP_KEY_ENUM, .choices = empty_choice}, {0}};
    expect_keys_refused(bad_choice, NULL, "an enum needs 1-64 non-empty choices");
    const smp_config_key_t def_type[] = {
        {.name = "k", .type = SMP_KEY_INT, .max = 9, .default_value = "\"1\""}, {0}};
    expect_keys_refused(def_type, NULL, "key \"k\": default does not match the key's type");
    const smp_config_key_t def_range[] = {
        {.name = "k", .type = SMP_KEY_INT, .max = 9, .default_value = "10"}, {0}};
    expect_keys_refused(def_range, NULL, "key \"k\": default is out of the key's range");
    const smp_config_key_t def_json[] = {
        {.name = "k", .type = SMP_KEY_STRING, .default_value = "abc"}, {0}};
    expect_keys_refused(def_json, NULL, "key \"k\": default is not valid JSON");
    const smp_config_key_t def_choice[] = {
        {.name = "k", .type = SMP_KEY_ENUM, .choices = st_choices, .default_value = "\"z\""}, {0}};
    expect_keys_refused(def_choice, NULL, "key \"k\": default is not one of the key's choices");
    const smp_config_key_t def_secret[] = {
        {.name = "k", .type = SMP_KEY_SECRET_FILE, .default_value = "\"pw\""}, {0}};
    expect_keys_refused(def_secret, NULL,
                        "key \"k\": default is not allowed: a secret file has no default");
    const smp_config_key_t type7[] = {{.name = "k", .type = (smp_key_type_t)7}, {0}};
    expect_keys_refused(type7, NULL, "connection key \"k\" has unknown type 7");
    const smp_config_key_t twice[] = {
        {.name = "k", .type = SMP_KEY_BOOL}, {.name = "k", .type = SMP_KEY_BOOL}, {0}};
    expect_keys_refused(NULL, twice, "tag key \"k\" is declared twice");
    const smp_config_key_t generic[] = {{.name = "scale", .type = SMP_KEY_NUMBER}, {0}};
    expect_keys_refused(NULL, generic, "tag key \"scale\" is a host tag field");
    const smp_config_key_t bad_name[] = {{.name = "Bad-Key", .type = SMP_KEY_BOOL}, {0}};
    expect_keys_refused(bad_name, NULL, "connection key \"Bad-Key\": a key name is 1-64 of");
    smp_config_key_t many[70];
    char names[70][8];
    memset(many, 0, sizeof many);
    for (int i = 0; i < 69; i++) {
        snprintf(names[i], sizeof names[i], "k%d", i);
        many[i].name = names[i];
        many[i].type = SMP_KEY_BOOL;
    }
    expect_keys_refused(NULL, many, "more than 64 tag keys, or a missing terminator");
    many[64].name = NULL; /* exactly 64 is fine */
    d = good_desc();
    d.tag_keys = many;
    assert_int_equal(smp_plugin_check(&d, "t.so", err, sizeof err), 0);
}

static void test_add_static(void **state)
{
    (void)state;
    char err[512];
    smp_plugin_set_t *set = smp_plugin_set_new(NULL);

    /* The host keeps its own copy, of at most the size the plugin declared: a plugin that
     * claims less than the full struct cannot make the host read past it. */
    smp_plugin_t d = good_desc();
    d.struct_size = (uint32_t)offsetof(smp_plugin_t, reserved);
    d.reserved[0] = (void *)&d;
    assert_int_equal(smp_plugin_set_add_static(set, &d, err, sizeof err), 0);
    const smp_plugin_host_t *p = smp_plugin_set_get(set, "stat", err, sizeof err);
    assert_non_null(p);
    assert_null(p->handle);
    assert_ptr_not_equal(p->desc, &d);
    assert_null(p->desc->reserved[0]);
    assert_string_equal(p->desc->version, "unknown");
    assert_int_equal(p->nconn_keys, 2);
    assert_int_equal(p->ntag_keys, 1);
    assert_ptr_equal(p->desc->device_read, st_device_read);

    assert_int_equal(smp_plugin_set_add_static(set, &d, err, sizeof err), -EEXIST);
    assert_string_equal(err, "static plugin: protocol \"stat\" is already registered");
    smp_plugin_t bad = good_desc();
    bad.name = "other";
    bad.abi_version = 7;
    assert_int_equal(smp_plugin_set_add_static(set, &bad, err, sizeof err), -EINVAL);
    assert_string_equal(err, "static plugin: plugin ABI version 7, this simpul supports ABI "
                             "version 1");
    assert_null(smp_plugin_set_get(set, "other", err, sizeof err));
    smp_plugin_set_free(set);
}

/* ---- the host API ------------------------------------------------------------------------- */

/* Runs fn with stderr captured into buf. */
static void capture_stderr(void (*fn)(void), char *buf, size_t n)
{
    char path[] = "/tmp/simpul-ph-log-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    assert_true(saved >= 0);
    assert_true(dup2(fd, STDERR_FILENO) >= 0);
    fn();
    assert_true(dup2(saved, STDERR_FILENO) >= 0);
    close(saved);
    ssize_t k = pread(fd, buf, n - 1, 0);
    assert_true(k >= 0);
    buf[k] = '\0';
    close(fd);
    unlink(path);
}

static void log_some(void)
{
    smp_log_set_level(SMP_LOG_INFO);
    smp__host_api.log("modbus:pump-01", SMP_LOG_INFO, "online after %d tries", 3);
    smp__host_api.log("modbus:pump-01", SMP_LOG_DEBUG, "not shown at info");
    smp__host_api.log(NULL, SMP_LOG_WARN, "no scope");
    smp__host_api.log("x", 99, "level clamped to debug: not shown");
}

static void test_host_api(void **state)
{
    (void)state;
    assert_int_equal(smp__host_api.abi_version, SMP_PLUGIN_ABI_VERSION);
    assert_int_equal(smp__host_api.struct_size, sizeof(smp_host_api_t));
    uint64_t m1 = smp__host_api.monotonic_ms();
    uint64_t m2 = smp__host_api.monotonic_ms();
    assert_true(m2 >= m1);
    uint64_t w = smp__host_api.wall_ms();
    uint64_t now = (uint64_t)time(NULL) * 1000u;
    assert_true(w + 5000 > now && w < now + 5000);

    char out[2048];
    capture_stderr(log_some, out, sizeof out);
    assert_non_null(strstr(out, " info  [modbus:pump-01] online after 3 tries\n"));
    assert_non_null(strstr(out, " warn  no scope\n"));
    assert_null(strstr(out, "not shown"));
    int lines = 0;
    for (const char *c = out; *c != '\0'; c++) {
        lines += *c == '\n';
    }
    assert_int_equal(lines, 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_example_and_drive_it),
        cmocka_unit_test(test_refuses_other_abi),
        cmocka_unit_test(test_refuses_missing_plugin),
        cmocka_unit_test(test_refuses_bad_protocol_names),
        cmocka_unit_test(test_refuses_files_that_are_not_plugins),
        cmocka_unit_test(test_search_order),
        cmocka_unit_test(test_descriptor_checks),
        cmocka_unit_test(test_add_static),
        cmocka_unit_test(test_host_api),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
