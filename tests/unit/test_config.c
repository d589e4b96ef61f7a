/* Config loader: every class of bad config is reported at the right FILE:LINE:COL and path, all
 * problems are collected, a valid config parses to the documented values and defaults, and no
 * input (random mutations, binary, huge, deep, allocation failures) crashes or leaks.
 *
 * The loader is #included so that allocations can be made to fail and so a test can hand it a
 * plugin set holding a fixture plugin ("fix", defined below) next to the real example.so. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

/* ---- allocation failure injection (only the loader's own allocations and jansson's) ------ */

static long alloc_countdown = -1; /* < 0: never fail; 0: fail this one and the rest */
static bool alloc_failed;

static bool alloc_should_fail(void)
{
    if (alloc_countdown < 0) {
        return false;
    }
    if (alloc_countdown == 0) {
        alloc_failed = true;
        return true;
    }
    alloc_countdown--;
    return false;
}

static void *fail_malloc(size_t n)
{
    return alloc_should_fail() ? NULL : malloc(n);
}

static void *fail_calloc(size_t n, size_t m)
{
    return alloc_should_fail() ? NULL : calloc(n, m);
}

static void *fail_realloc(void *p, size_t n)
{
    return alloc_should_fail() ? NULL : realloc(p, n);
}

static char *fail_strdup(const char *s)
{
    return alloc_should_fail() ? NULL : strdup(s);
}

#undef strdup
#define malloc  fail_malloc
#define calloc  fail_calloc
#define realloc fail_realloc
#define strdup  fail_strdup
#include "../../gateway/config.c"
#undef malloc
#undef calloc
#undef realloc
#undef strdup

/* ---- the fixture plugin ------------------------------------------------------------------ */

enum { FC_ADDR, FC_PORT, FC_MODE, FC_RATIO, FC_ON };
static const char *const fix_modes[] = {"fast", "slow", NULL};
static const smp_config_key_t fix_conn_keys[] = {
    {.name = "addr", .type = SMP_KEY_STRING, .required = true},
    {.name = "port", .type = SMP_KEY_INT, .min = 1, .max = 65535, .default_value = "502"},
    {.name = "mode", .type = SMP_KEY_ENUM, .choices = fix_modes, .default_value = "\"fast\""},
    {.name = "ratio", .type = SMP_KEY_NUMBER},
    {.name = "on", .type = SMP_KEY_BOOL, .default_value = "true"},
    {.name = NULL},
};
enum { FT_REG, FT_KIND };
static const char *const fix_kinds[] = {"a", "b", NULL};
static const smp_config_key_t fix_tag_keys[] = {
    {.name = "reg", .type = SMP_KEY_INT, .required = true, .min = 0, .max = 65535},
    {.name = "kind", .type = SMP_KEY_ENUM, .choices = fix_kinds, .default_value = "\"a\""},
    {.name = NULL},
};

static int fix_check_connection(const smp_param_t *c, smp_report_fn report, void *ctx)
{
    if (strcmp(c[FC_ADDR].s, "refuse") == 0) {
        return 1; /* a refusal without a message: the host must still say something */
    }
    if (c[FC_MODE].i == 1 && !c[FC_RATIO].set) {
        report(ctx, "ratio", "needed in slow mode");
        return 1;
    }
    return 0;
}

static int fix_check_tag(const smp_tag_t *t, smp_report_fn report, void *ctx)
{
    if (t->params[FT_KIND].i == 1 && t->type != SMP_TYPE_BOOL) {
        report(ctx, "kind", "kind b needs type bool");
        return 1;
    }
    if (t->params[FT_REG].i == 999) {
        report(ctx, NULL, "register %d is reserved", 999);
        return 1;
    }
    return 0;
}

static int fix_conn_key(const smp_param_t *c, char *buf, size_t n)
{
    int k = snprintf(buf, n, "fix:%s:%lld", c[FC_ADDR].s, (long long)c[FC_PORT].i);
    return k < 0 || (size_t)k >= n ? -ENOSPC : 0;
}

/* Never called by the loader; present because the host requires them. */
static void *fix_conn_create(const smp_param_t *c, void *log_ctx)
{
    (void)c;
    (void)log_ctx;
    return NULL;
}
static int fix_conn_open(void *c)
{
    (void)c;
    return -ENOTSUP;
}
static void fix_conn_close(void *c)
{
    (void)c;
}
static void *fix_device_create(void *c, const smp_param_t *p, const smp_tag_t *t, size_t n,
                               void *log_ctx)
{
    (void)c, (void)p, (void)t, (void)n, (void)log_ctx;
    return NULL;
}
static int fix_device_read(void *d, const uint32_t *idx, size_t n, smp_reading_t *out)
{
    (void)d, (void)idx, (void)n, (void)out;
    return -ENOTSUP;
}
static int fix_device_write(void *d, uint32_t idx, const smp_value_t *in, smp_reading_t *rb,
                            const char **msg)
{
    (void)d, (void)idx, (void)in, (void)rb, (void)msg;
    return -ENOTSUP;
}

static const smp_plugin_t fix_plugin = {
    .abi_version = SMP_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(smp_plugin_t),
    .name = "fix",
    .version = "0.0.1",
    .conn_keys = fix_conn_keys,
    .tag_keys = fix_tag_keys,
    .check_connection = fix_check_connection,
    .check_tag = fix_check_tag,
    .conn_key = fix_conn_key,
    .conn_create = fix_conn_create,
    .conn_open = fix_conn_open,
    .conn_close = fix_conn_close,
    .conn_destroy = fix_conn_close,
    .device_create = fix_device_create,
    .device_destroy = fix_conn_close,
    .device_read = fix_device_read,
    .device_write = fix_device_write,
};

/* ---- helpers ----------------------------------------------------------------------------- */

typedef struct res {
    int n;
    char *errs;
    size_t errs_len;
    smp_config_t *cfg;
} res_t;

/* A plugin set with the fixture plugin; example.so and badabi.so are found by dlopen in the
 * build's plugins directory. */
static smp_plugin_set_t *test_set(void)
{
    smp_plugin_set_t *s = smp_plugin_set_new(SMP_TEST_EXAMPLE_PLUGIN_DIR);
    assert_non_null(s);
    char err[256];
    assert_int_equal(smp_plugin_set_add_static(s, &fix_plugin, err, sizeof err), 0);
    return s;
}

static res_t load_as(const char *name, const char *text, size_t len)
{
    res_t r = {0};
    FILE *f = open_memstream(&r.errs, &r.errs_len);
    assert_non_null(f);
    r.n = load_text(name, text, len, NULL, test_set(), f, &r.cfg);
    fclose(f);
    return r;
}

static res_t load(const char *text)
{
    return load_as("t.json", text, strlen(text));
}

static void res_free(res_t *r)
{
    smp_config_free(r->cfg);
    free(r->errs);
    memset(r, 0, sizeof *r);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s != '\0'; s++) {
        n += *s == '\n';
    }
    return n;
}

/* Asserts that `line` is one whole line of the output (or, with prefix, starts one). */
static void expect_line_(const res_t *r, const char *line, bool prefix)
{
    size_t n = strlen(line);
    for (const char *p = r->errs; p != NULL && *p != '\0';) {
        const char *nl = strchr(p, '\n');
        size_t len = nl != NULL ? (size_t)(nl - p) : strlen(p);
        if ((prefix ? len >= n : len == n) && memcmp(p, line, n) == 0) {
            return;
        }
        p = nl != NULL ? nl + 1 : NULL;
    }
    print_error("expected line%s: %s\nthe output was:\n%s", prefix ? " starting" : "", line,
                r->errs != NULL ? r->errs : "(none)");
    fail();
}

static void expect_line(const res_t *r, const char *line)
{
    expect_line_(r, line, false);
}

static void expect_prefix(const res_t *r, const char *line)
{
    expect_line_(r, line, true);
}

static void expect_errors(const res_t *r, int n)
{
    if (r->n != n || count_lines(r->errs) != n) {
        print_error("expected %d problems, got %d (%d lines):\n%s", n, r->n, count_lines(r->errs),
                    r->errs);
        fail();
    }
    assert_null(r->cfg);
}

static void expect_ok(const res_t *r)
{
    if (r->n != 0) {
        print_error("expected a valid config, got %d problems:\n%s", r->n, r->errs);
        fail();
    }
    assert_non_null(r->cfg);
    assert_string_equal(r->errs, "");
}

static char *make_tmpdir(void)
{
    char tmpl[] = "/tmp/simpul-cfg-XXXXXX";
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

static void write_file(const char *path, const char *content)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(content, f);
    fclose(f);
}

/* ---- jsonpos ---------------------------------------------------------------------------- */

static void expect_pos(const smp_jsonpos_t *jp, const char *path, bool key, unsigned line,
                       unsigned col)
{
    smp_jsonpos_loc_t loc = {0, 0};
    bool found = key ? smp_jsonpos_key(jp, path, &loc) : smp_jsonpos_value(jp, path, &loc);
    if (!found || loc.line != line || loc.col != col) {
        print_error("%s of \"%s\": expected %u:%u, got %s %u:%u", key ? "key" : "value", path, line,
                    col, found ? "" : "(not found)", loc.line, loc.col);
        fail();
    }
}

static void test_jsonpos(void **state)
{
    (void)state;
    /* CRLF lines, a tab, escaped and raw UTF-8 keys (columns count characters), a duplicate. */
    const char *text = "{\r\n"
                       "\t\"k\\u00e9y\": {\"\xc3\xa9\": [1, {\"x\": true}]},\r\n"
                       "  \"a\": \"\\ud83d\\ude00\", \"b\": 1, \"b\": 2}";
    smp_jsonpos_t *jp = NULL;
    assert_int_equal(smp_jsonpos_scan(text, strlen(text), &jp), 0);
    expect_pos(jp, "", false, 1, 1);
    expect_pos(jp, "k\xc3\xa9y", true, 2, 2);
    expect_pos(jp, "k\xc3\xa9y", false, 2, 14);
    expect_pos(jp, "k\xc3\xa9y.\xc3\xa9", true, 2, 15);
    expect_pos(jp, "k\xc3\xa9y.\xc3\xa9", false, 2, 20);
    expect_pos(jp, "k\xc3\xa9y.\xc3\xa9[0]", false, 2, 21);
    expect_pos(jp, "k\xc3\xa9y.\xc3\xa9[1]", false, 2, 24);
    expect_pos(jp, "k\xc3\xa9y.\xc3\xa9[1].x", true, 2, 25);
    expect_pos(jp, "k\xc3\xa9y.\xc3\xa9[1].x", false, 2, 30);
    expect_pos(jp, "a", true, 3, 3);
    expect_pos(jp, "a", false, 3, 8);
    expect_pos(jp, "b", true, 3, 32); /* the last occurrence, the one jansson keeps */
    expect_pos(jp, "b", false, 3, 37);
    smp_jsonpos_loc_t loc;
    assert_false(smp_jsonpos_key(jp, "k\xc3\xa9y.\xc3\xa9[0]", &loc)); /* elements have no key */
    assert_false(smp_jsonpos_value(jp, "nope", &loc));
    assert_int_equal(smp_jsonpos_ndups(jp), 1);
    const smp_jsonpos_dup_t *d = smp_jsonpos_dup(jp, 0);
    assert_string_equal(d->path, "b");
    assert_true(d->at.line == 3 && d->at.col == 32 && d->first.line == 3 && d->first.col == 24);
    assert_null(smp_jsonpos_dup(jp, 1));
    smp_jsonpos_free(jp);
    smp_jsonpos_free(NULL);

    /* Where jansson stopped: the path of the value being read there. */
    const char *bad = "{\"a\": {\"b\": [1, 2 3]}}";
    char path[64];
    smp_jsonpos_path_at(bad, strlen(bad), (size_t)(strchr(bad, '3') - bad) + 1, path, sizeof path);
    assert_string_equal(path, "a.b");
    smp_jsonpos_path_at(bad, strlen(bad), 0, path, sizeof path);
    assert_string_equal(path, "");
    smp_jsonpos_path_at(bad, strlen(bad), 3, path, 2); /* cut to fit */
    assert_string_equal(path, "");
    const char *unterminated = "{\"gateway\": {\"id\": \"x";
    smp_jsonpos_path_at(unterminated, strlen(unterminated), strlen(unterminated), path,
                        sizeof path);
    assert_string_equal(path, "gateway.id");

    /* A key too long to record costs nothing and breaks nothing. */
    size_t n = SMP_JSONPOS_MAX_PATH * 3;
    char *big = malloc(n + 32);
    assert_non_null(big);
    big[0] = '{';
    big[1] = '"';
    memset(big + 2, 'k', n);
    strcpy(big + 2 + n, "\": {\"x\": 1}, \"y\": 2}");
    assert_int_equal(smp_jsonpos_scan(big, strlen(big), &jp), 0);
    expect_pos(jp, "y", true, 1, (unsigned)n + 16);
    assert_false(smp_jsonpos_value(jp, "x", &loc));
    smp_jsonpos_free(jp);
    free(big);
}

/* ---- valid configs ----------------------------------------------------------------------- */

static void test_valid_full(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *pw = join(dir, "secret.txt");
    char *ca = join(dir, "ca.pem");
    char *sub = join(dir, "sub");
    char *cert = join(dir, "sub/cert.pem");
    char *key = join(dir, "key.pem");
    char *name = join(dir, "site.json");
    write_file(pw, "s3cret\n");
    write_file(ca, "ca");
    assert_int_equal(mkdir(sub, 0700), 0);
    write_file(cert, "cert");
    write_file(key, "key");
    /* Secrets must not be accessible to other users. */
    assert_int_equal(chmod(pw, 0600), 0);
    assert_int_equal(chmod(key, 0640), 0);
    const char *text =
        "{\n"
        "  \"gateway\": {\"id\": \"dumai-gw-01\", \"data_dir\": \"state\", \"log_level\": "
        "\"debug\",\n"
        "              \"metrics_interval_s\": 10},\n"
        "  \"mqtt\": {\"host\": \"broker.local\", \"port\": 8883, \"topic_prefix\": "
        "\"city/dumai\",\n"
        "           \"qos\": 0, \"keepalive_s\": 15, \"version\": \"5\", \"username\": \"gw\",\n"
        "           \"password_file\": \"secret.txt\",\n"
        "           \"tls\": {\"ca_file\": \"ca.pem\", \"cert_file\": \"sub/cert.pem\",\n"
        "                   \"key_file\": \"./key.pem\"},\n"
        "           \"inflight_max\": 100},\n"
        "  \"store\": {\"history_retention_h\": 0, \"outbox_max_mb\": 1},\n"
        "  \"profiles\": {\n"
        "    \"p1\": {\"tags\": [\n"
        "      {\"name\": \"a\", \"type\": \"bool\", \"reg\": 0, \"kind\": \"b\", \"writable\": "
        "true},\n"
        "      {\"name\": \"b\", \"type\": \"float32\", \"reg\": 2, \"scale\": 0.1, \"offset\": "
        "-5,\n"
        "       \"unit\": \"bar\", \"deadband\": 0.5, \"min\": -10, \"max\": 10, \"interval_ms\": "
        "250}\n"
        "    ]},\n"
        "    \"unused\": {\"tags\": []}\n"
        "  },\n"
        "  \"devices\": [\n"
        "    {\"name\": \"d1\", \"protocol\": \"fix\", \"profile\": \"p1\", \"interval_ms\": "
        "2000,\n"
        "     \"refresh_s\": 60,\n"
        "     \"connection\": {\"addr\": \"10.0.0.1\", \"port\": 1502, \"mode\": \"slow\",\n"
        "                    \"ratio\": 2.5, \"on\": false},\n"
        "     \"tags\": [{\"name\": \"c\", \"type\": \"uint64\", \"reg\": 7}]},\n"
        "    {\"name\": \"d2\", \"protocol\": \"fix\", \"profile\": \"p1\",\n"
        "     \"connection\": {\"addr\": \"10.0.0.1\"}}\n"
        "  ]\n"
        "}\n";
    res_t r = load_as(name, text, strlen(text));
    expect_ok(&r);
    const smp_config_t *c = r.cfg;
    char *want;

    assert_string_equal(c->path, name);
    assert_string_equal(c->gateway.id, "dumai-gw-01");
    want = join(dir, "state");
    assert_string_equal(c->gateway.data_dir, want); /* relative to the config's directory */
    free(want);
    assert_null(c->gateway.plugin_dir);
    assert_string_equal(c->gateway.log_level, "debug");
    assert_int_equal(c->gateway.metrics_interval_s, 10);

    assert_string_equal(c->mqtt.host, "broker.local");
    assert_int_equal(c->mqtt.port, 8883);
    assert_string_equal(c->mqtt.client_id, "simpul-dumai-gw-01");
    assert_string_equal(c->mqtt.topic_prefix, "city/dumai");
    assert_int_equal(c->mqtt.qos, 0);
    assert_int_equal(c->mqtt.keepalive_s, 15);
    assert_int_equal(c->mqtt.version, 5);
    assert_string_equal(c->mqtt.username, "gw");
    assert_string_equal(c->mqtt.password, "s3cret"); /* trailing newline stripped */
    assert_string_equal(c->mqtt.password_file, pw);
    assert_string_equal(c->mqtt.tls_ca_file, ca);
    assert_string_equal(c->mqtt.tls_cert_file, cert);
    assert_string_equal(c->mqtt.tls_key_file, key);
    assert_int_equal(c->mqtt.inflight_max, 100);

    want = join(dir, "state/simpul.db");
    assert_string_equal(c->store.path, want); /* default: data_dir/simpul.db */
    free(want);
    assert_int_equal(c->store.history_retention_h, 0);
    assert_int_equal(c->store.outbox_max_mb, 1);

    assert_int_equal(c->ndevices, 2);
    const smp_device_cfg_t *d1 = &c->devices[0], *d2 = &c->devices[1];
    assert_ptr_equal(smp_config_device(c, "d2"), d2);
    assert_null(smp_config_device(c, "d3"));
    assert_string_equal(d1->name, "d1");
    assert_string_equal(d1->protocol, "fix");
    assert_string_equal(d1->profile, "p1");
    assert_string_equal(d1->plugin->name, "fix");
    assert_int_equal(d1->interval_ms, 2000);
    assert_int_equal(d1->refresh_s, 60);
    assert_string_equal(d1->conn_params[FC_ADDR].s, "10.0.0.1");
    assert_int_equal(d1->conn_params[FC_PORT].i, 1502);
    assert_true(d1->conn_params[FC_MODE].set);
    assert_int_equal(d1->conn_params[FC_MODE].i, 1);
    assert_string_equal(d1->conn_params[FC_MODE].s, "slow");
    assert_true(d1->conn_params[FC_RATIO].set);
    assert_true(d1->conn_params[FC_RATIO].d == 2.5);
    assert_true(d1->conn_params[FC_ON].set);
    assert_int_equal(d1->conn_params[FC_ON].i, 0);
    assert_string_equal(d1->conn_key, "fix:10.0.0.1:1502");

    /* The profile's tags first, then the device's own. */
    assert_int_equal(d1->ntags, 3);
    const smp_tag_cfg_t *ta = &d1->tags[0], *tb = &d1->tags[1], *tc = &d1->tags[2];
    assert_string_equal(ta->name, "a");
    assert_int_equal(ta->type, SMP_TYPE_BOOL);
    assert_true(ta->writable);
    assert_true(ta->scale == 1 && ta->offset == 0 && ta->deadband == 0);
    assert_false(ta->has_min || ta->has_max);
    assert_null(ta->unit);
    assert_int_equal(ta->interval_ms, 0);
    assert_int_equal(ta->params[FT_REG].i, 0);
    assert_int_equal(ta->params[FT_KIND].i, 1);
    assert_string_equal(ta->params[FT_KIND].s, "b");
    assert_string_equal(tb->name, "b");
    assert_int_equal(tb->type, SMP_TYPE_FLOAT32);
    assert_true(tb->scale == 0.1 && tb->offset == -5 && tb->deadband == 0.5);
    assert_true(tb->has_min && tb->min == -10 && tb->has_max && tb->max == 10);
    assert_string_equal(tb->unit, "bar");
    assert_int_equal(tb->interval_ms, 250);
    assert_false(tb->writable);
    assert_string_equal(tc->name, "c");
    assert_int_equal(tc->type, SMP_TYPE_UINT64);
    assert_int_equal(tc->params[FT_REG].i, 7);
    assert_true(tc->params[FT_KIND].set); /* default "a" */
    assert_int_equal(tc->params[FT_KIND].i, 0);

    /* Defaults of the device and of the plugin's keys. */
    assert_int_equal(d2->interval_ms, 1000);
    assert_int_equal(d2->refresh_s, 300);
    assert_int_equal(d2->ntags, 2);
    assert_int_equal(d2->conn_params[FC_PORT].i, 502);
    assert_int_equal(d2->conn_params[FC_MODE].i, 0);
    assert_string_equal(d2->conn_params[FC_MODE].s, "fast");
    assert_false(d2->conn_params[FC_RATIO].set);
    assert_int_equal(d2->conn_params[FC_ON].i, 1);
    assert_string_equal(d2->conn_key, "fix:10.0.0.1:502");
    assert_ptr_not_equal(d2->tags[0].name, d1->tags[0].name); /* each device owns its copy */

    res_free(&r);
    unlink(pw), unlink(ca), unlink(cert), unlink(key), rmdir(sub), rmdir(dir);
    free(pw), free(ca), free(cert), free(key), free(sub), free(name), free(dir);
}

static void test_defaults(void **state)
{
    (void)state;
    res_t r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": []}");
    expect_ok(&r);
    const smp_config_t *c = r.cfg;
    assert_string_equal(c->gateway.data_dir, "./data"); /* no directory in the name: the cwd */
    assert_null(c->gateway.plugin_dir);
    assert_string_equal(c->gateway.log_level, "info");
    assert_int_equal(c->gateway.metrics_interval_s, 60);
    assert_string_equal(c->mqtt.host, "127.0.0.1");
    assert_int_equal(c->mqtt.port, 1883);
    assert_string_equal(c->mqtt.client_id, "simpul-gw-1");
    assert_string_equal(c->mqtt.topic_prefix, "simpul");
    assert_int_equal(c->mqtt.qos, 1);
    assert_int_equal(c->mqtt.keepalive_s, 30);
    assert_int_equal(c->mqtt.version, 4);
    assert_int_equal(c->mqtt.inflight_max, 256);
    assert_null(c->mqtt.username);
    assert_null(c->mqtt.password);
    assert_null(c->mqtt.tls_ca_file);
    assert_string_equal(c->store.path, "./data/simpul.db");
    assert_int_equal(c->store.history_retention_h, 168);
    assert_int_equal(c->store.outbox_max_mb, 256);
    assert_int_equal(c->ndevices, 0);
    res_free(&r);

    r = load("{\"gateway\": {\"id\": \"g\"}, \"mqtt\": {\"version\": \"3.1\"},"
             " \"store\": {\"path\": \":memory:\"}, \"devices\": []}");
    expect_ok(&r);
    assert_int_equal(r.cfg->mqtt.version, 3);
    assert_string_equal(r.cfg->store.path, ":memory:");
    res_free(&r);

    /* Absolute paths stay as they are; relative ones follow the config's directory. */
    const char *abs = "{\"gateway\": {\"id\": \"g\", \"data_dir\": \"/var/lib/simpul\"},"
                      " \"mqtt\": {\"version\": \"3.1.1\"}, \"devices\": []}";
    r = load_as("/etc/simpul/site.json", abs, strlen(abs));
    expect_ok(&r);
    assert_int_equal(r.cfg->mqtt.version, 4);
    assert_string_equal(r.cfg->gateway.data_dir, "/var/lib/simpul");
    assert_string_equal(r.cfg->store.path, "/var/lib/simpul/simpul.db");
    res_free(&r);
    const char *rel = "{\"gateway\": {\"id\": \"g\"}, \"store\": {\"path\": \"./db/x.db\"}, "
                      "\"devices\": []}";
    r = load_as("/etc/simpul/site.json", rel, strlen(rel));
    expect_ok(&r);
    assert_string_equal(r.cfg->gateway.data_dir, "/etc/simpul/data");
    assert_string_equal(r.cfg->store.path, "/etc/simpul/db/x.db");
    res_free(&r);
}

static void test_range_boundaries_accepted(void **state)
{
    (void)state;
    res_t r = load(
        "{\"gateway\": {\"id\": \"g\", \"metrics_interval_s\": 86400},\n"
        " \"mqtt\": {\"port\": 65535, \"qos\": 0, \"keepalive_s\": 65535, \"inflight_max\": "
        "65535},\n"
        " \"store\": {\"history_retention_h\": 87600, \"outbox_max_mb\": 1048576},\n"
        " \"devices\": [{\"name\": \"d\", \"protocol\": \"fix\", \"interval_ms\": 86400000,\n"
        "   \"refresh_s\": 1, \"connection\": {\"addr\": \"a\", \"port\": 1},\n"
        "   \"tags\": [{\"name\": \"t\", \"type\": \"float64\", \"reg\": 65535, \"deadband\": 0,\n"
        "             \"min\": 3, \"max\": 3, \"interval_ms\": 10, \"scale\": -0.5}]}]}\n");
    expect_ok(&r);
    assert_int_equal(r.cfg->mqtt.port, 65535);
    assert_int_equal(r.cfg->store.outbox_max_mb, 1048576);
    assert_int_equal(r.cfg->devices[0].interval_ms, 86400000);
    assert_int_equal(r.cfg->devices[0].conn_params[FC_PORT].i, 1);
    assert_true(r.cfg->devices[0].tags[0].scale == -0.5);
    res_free(&r);
}

/* ---- each class of problem --------------------------------------------------------------- */

static void test_syntax_error(void **state)
{
    (void)state;
    res_t r = load("{\n  \"gateway\": {\"id\": \"x\",}\n}\n");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:2:25: gateway: invalid JSON: string or '}' expected near '}'");
    res_free(&r);

    r = load("{\n"
             "  \"devices\": [\n"
             "    {\"name\": \"d1\", \"interval_ms\": 10 20}\n"
             "  ]\n"
             "}\n");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:3:39: devices[0]: invalid JSON: '}' expected near '20'");
    res_free(&r);

    r = load("");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:1:1: (root): invalid JSON: '[' or '{' expected near end of file");
    res_free(&r);

    /* An integer jansson cannot hold exactly is refused, not rounded. */
    r = load("{\"mqtt\": {\"port\": 99999999999999999999}}");
    expect_errors(&r, 1);
    expect_prefix(&r, "t.json:1:38: mqtt.port: invalid JSON: too big integer");
    res_free(&r);
}

static void test_unknown_keys_every_level(void **state)
{
    (void)state;
    res_t r = load(
        "{\n"
        "  \"gateway\": {\"id\": \"gw-1\", \"idd\": 1},\n"
        "  \"mqtt\": {\"hots\": \"h\", \"tls\": {\"crt\": 1, \"ca_file\": \"" SMP_SOURCE_ROOT
        "/meson.build\"}},\n"
        "  \"store\": {\"pth\": \"x\"},\n"
        "  \"profiles\": {\"p\": {\"tags\": [], \"extra\": 1}},\n"
        "  \"devices\": [\n"
        "    {\"name\": \"d1\", \"protocol\": \"fix\", \"profile\": \"p\", \"colour\": \"red\",\n"
        "     \"connection\": {\"addr\": \"a\", \"prot\": 1},\n"
        "     \"tags\": [{\"name\": \"t1\", \"type\": \"int16\", \"reg\": 1, \"regg\": 2}]}\n"
        "  ],\n"
        "  \"extra\": true\n"
        "}\n");
    expect_errors(&r, 9);
    expect_line(&r, "t.json:2:29: gateway.idd: unknown key (did you mean \"id\"?)");
    expect_line(&r, "t.json:3:12: mqtt.hots: unknown key (did you mean \"host\"?)");
    expect_line(&r, "t.json:3:33: mqtt.tls.crt: unknown key");
    expect_line(&r, "t.json:4:13: store.pth: unknown key (did you mean \"path\"?)");
    expect_line(&r, "t.json:5:34: profiles.p.extra: unknown key");
    expect_line(&r, "t.json:7:55: devices[0].colour: unknown key");
    expect_line(&r, "t.json:8:34: devices[0].connection.prot: unknown key for protocol \"fix\" "
                    "(did you mean \"port\"?)");
    expect_line(&r, "t.json:9:57: devices[0].tags[0].regg: unknown key for protocol \"fix\" "
                    "(did you mean \"reg\"?)");
    expect_line(&r, "t.json:11:3: extra: unknown key");
    res_free(&r);
}

static void test_wrong_types(void **state)
{
    (void)state;
    res_t r = load(
        "{\n"
        "  \"gateway\": {\"id\": 7, \"log_level\": [\"x\"]},\n"
        "  \"mqtt\": {\"port\": \"1883\", \"qos\": 1.5, \"tls\": \"yes\"},\n"
        "  \"profiles\": {\"p\": {\"tags\": {}}},\n"
        "  \"devices\": [\n"
        "    {\"name\": \"d1\", \"protocol\": \"fix\", \"interval_ms\": 1e3,\n"
        "     \"connection\": {\"addr\": 5, \"port\": 502.0, \"on\": \"true\", \"ratio\": \"2\"},\n"
        "     \"tags\": [{\"name\": \"t1\", \"type\": \"int16\", \"reg\": 1, \"writable\": 1, "
        "\"scale\": \"2\"}]},\n"
        "    \"d2\"\n"
        "  ]\n"
        "}\n");
    expect_errors(&r, 14);
    expect_line(&r, "t.json:2:21: gateway.id: expected a string, got an integer (7)");
    expect_line(&r, "t.json:2:37: gateway.log_level: expected a string, got an array");
    expect_line(&r, "t.json:3:20: mqtt.port: expected an integer, got a string (\"1883\")");
    expect_line(&r, "t.json:3:35: mqtt.qos: expected an integer, got a number (1.5)");
    expect_line(&r, "t.json:3:47: mqtt.tls: expected an object, got a string (\"yes\")");
    expect_line(&r, "t.json:4:30: profiles.p.tags: expected an array, got an object");
    expect_line(&r,
                "t.json:6:54: devices[0].interval_ms: expected an integer, got a number (1000.0)");
    expect_line(&r,
                "t.json:7:29: devices[0].connection.addr: expected a string, got an integer (5)");
    expect_line(
        &r, "t.json:7:40: devices[0].connection.port: expected an integer, got a number (502.0)");
    expect_line(
        &r,
        "t.json:7:53: devices[0].connection.on: expected true or false, got a string (\"true\")");
    expect_line(
        &r, "t.json:7:70: devices[0].connection.ratio: expected a number, got a string (\"2\")");
    expect_line(
        &r, "t.json:8:69: devices[0].tags[0].writable: expected true or false, got an integer (1)");
    expect_line(&r,
                "t.json:8:81: devices[0].tags[0].scale: expected a number, got a string (\"2\")");
    expect_line(&r, "t.json:9:5: devices[1]: expected an object, got a string (\"d2\")");
    res_free(&r);

    r = load("[1]");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:1:1: (root): the config must be a JSON object, got an array");
    res_free(&r);
}

#define A64 "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

static void test_invalid_names(void **state)
{
    (void)state;
    res_t r = load(
        "{\n"
        "  \"gateway\": {\"id\": \"gw 1\"},\n"
        "  \"profiles\": {\"p.x\": {\"tags\": []}},\n"
        "  \"devices\": [\n"
        "    {\"name\": \"pump/01\", \"protocol\": \"fix\", \"connection\": {\"addr\": \"a\"},\n"
        "     \"tags\": [{\"name\": \"" A64 "b\", \"type\": \"bool\", \"reg\": 1}]},\n"
        "    {\"name\": \"" A64 "\", \"protocol\": \"fix\", \"connection\": {\"addr\": \"a\"},\n"
        "     \"tags\": [{\"name\": \"\", \"type\": \"bool\", \"reg\": 1}]}\n"
        "  ]\n"
        "}\n");
    expect_errors(&r, 5);
    expect_line(&r,
                "t.json:2:21: gateway.id: invalid name \"gw 1\": use only A-Z, a-z, 0-9, _ and -");
    expect_line(&r,
                "t.json:3:16: profiles.p.x: invalid name \"p.x\": use only A-Z, a-z, 0-9, _ and -");
    expect_line(
        &r,
        "t.json:5:14: devices[0].name: invalid name \"pump/01\": use only A-Z, a-z, 0-9, _ and -");
    expect_line(&r, "t.json:6:24: devices[0].tags[0].name: name is 65 characters long, at most 64 "
                    "are allowed");
    expect_line(&r, "t.json:8:24: devices[1].tags[0].name: must not be empty");
    res_free(&r);
}

static void test_unknown_profile(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"gw-1\"},\n"
                   "  \"profiles\": {\"pump-v1\": {\"tags\": [{\"name\": \"t\", \"type\": "
                   "\"bool\", \"reg\": 1}]}},\n"
                   "  \"devices\": [\n"
                   "    {\"name\": \"d1\", \"protocol\": \"fix\", \"profile\": \"pump-v2\", "
                   "\"connection\": {\"addr\": \"a\"}},\n"
                   "    {\"name\": \"d2\", \"protocol\": \"fix\", \"profile\": \"zzz\", "
                   "\"connection\": {\"addr\": \"a\"}}\n"
                   "  ]\n"
                   "}\n");
    /* No "has no tags" on top: the profile's problem is the one to fix. */
    expect_errors(&r, 2);
    expect_line(&r, "t.json:5:50: devices[0].profile: unknown profile \"pump-v2\" (did you mean "
                    "\"pump-v1\"?)");
    expect_line(&r, "t.json:6:50: devices[1].profile: unknown profile \"zzz\"");
    res_free(&r);
}

/* Devices built from one profile alone share its tag definitions (one copy per profile, not
 * per device); a device with tags of its own gets its own array; each keeps its connection. */
static void test_profile_tags_shared(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"gw-1\"},\n"
                   "  \"profiles\": {\"p\": {\"tags\": [{\"name\": \"t\", \"type\": \"bool\", "
                   "\"reg\": 1}, {\"name\": \"u\", \"type\": \"bool\", \"reg\": 2}]}},\n"
                   "  \"devices\": [\n"
                   "    {\"name\": \"d1\", \"protocol\": \"fix\", \"profile\": \"p\", "
                   "\"connection\": {\"addr\": \"a\"}},\n"
                   "    {\"name\": \"d2\", \"protocol\": \"fix\", \"profile\": \"p\", "
                   "\"connection\": {\"addr\": \"b\"}},\n"
                   "    {\"name\": \"d3\", \"protocol\": \"fix\", \"profile\": \"p\", "
                   "\"connection\": {\"addr\": \"c\"}, \"tags\": [{\"name\": \"v\", "
                   "\"type\": \"bool\", \"reg\": 3}]}\n"
                   "  ]\n"
                   "}\n");
    assert_int_equal(r.n, 0);
    const smp_device_cfg_t *d1 = &r.cfg->devices[0], *d2 = &r.cfg->devices[1],
                           *d3 = &r.cfg->devices[2];
    assert_false(d1->tags_shared);
    assert_true(d2->tags_shared);
    assert_ptr_equal(d2->tags, d1->tags);
    assert_int_equal(d2->ntags, 2);
    assert_string_equal(d2->tags[1].name, "u");
    assert_int_equal(d2->tags[1].params[FT_REG].i, 2);
    assert_string_equal(d2->conn_params[FC_ADDR].s, "b");
    assert_false(d3->tags_shared);
    assert_int_equal(d3->ntags, 3);
    assert_string_equal(d3->tags[2].name, "v");
    assert_int_equal(d3->tags[0].params[FT_REG].i, 1);
    res_free(&r);
}

/* A reload's diff: devices compared by content across two loads (a profile's shared tags
 * against the same tags given inline), MQTT settings, and the keys that cannot change live. */
static void test_reload_diff(void **state)
{
    (void)state;
    const char *fmt = "{\"gateway\": {\"id\": \"gw-1\"}, \"mqtt\": {\"keepalive_s\": %d},\n"
                      " \"store\": {\"path\": \"%s\"},\n"
                      " \"profiles\": {\"p\": {\"tags\": [{\"name\": \"t\", \"type\": \"bool\", "
                      "\"reg\": 1}]}},\n"
                      " \"devices\": [\n"
                      "  {\"name\": \"d1\", \"protocol\": \"fix\", %s, "
                      "\"connection\": {\"addr\": \"%s\"}}]}\n";
    const char *profile = "\"profile\": \"p\"";
    const char *inline_tags = "\"tags\": [{\"name\": \"t\", \"type\": \"bool\", \"reg\": 1}]";
    const char *other_reg = "\"tags\": [{\"name\": \"t\", \"type\": \"bool\", \"reg\": 2}]";
    char text[1024];
    res_t r[5];
    snprintf(text, sizeof text, fmt, 30, "a.db", profile, "a");
    r[0] = load(text);
    snprintf(text, sizeof text, fmt, 30, "a.db", inline_tags, "a");
    r[1] = load(text);
    snprintf(text, sizeof text, fmt, 30, "a.db", other_reg, "a");
    r[2] = load(text);
    snprintf(text, sizeof text, fmt, 30, "a.db", profile, "b");
    r[3] = load(text);
    snprintf(text, sizeof text, fmt, 45, "b.db", profile, "a");
    r[4] = load(text);
    for (size_t k = 0; k < 5; k++) {
        assert_int_equal(r[k].n, 0);
    }
    const smp_device_cfg_t *d0 = &r[0].cfg->devices[0];
    assert_true(smp_device_cfg_equal(d0, &r[1].cfg->devices[0]));
    assert_false(smp_device_cfg_equal(d0, &r[2].cfg->devices[0])); /* a tag's protocol key */
    assert_false(smp_device_cfg_equal(d0, &r[3].cfg->devices[0])); /* its connection */
    assert_true(smp_device_cfg_equal(d0, &r[4].cfg->devices[0]));
    assert_true(smp_config_mqtt_equal(r[0].cfg, r[3].cfg));
    assert_false(smp_config_mqtt_equal(r[0].cfg, r[4].cfg)); /* keepalive */
    assert_null(smp_config_fixed_change(r[0].cfg, r[3].cfg));
    assert_string_equal(smp_config_fixed_change(r[0].cfg, r[4].cfg), "store.path");
    for (size_t k = 0; k < 5; k++) {
        res_free(&r[k]);
    }
}

static void test_duplicate_device(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"gw-1\"},\n"
                   "  \"devices\": [\n"
                   "    {\"name\": \"d1\", \"protocol\": \"fix\", \"connection\": {\"addr\": "
                   "\"a\"}, \"tags\": [{\"name\": \"t\", \"type\": \"bool\", \"reg\": 1}]},\n"
                   "    {\"name\": \"d2\", \"protocol\": \"fix\", \"connection\": {\"addr\": "
                   "\"a\"}, \"tags\": [{\"name\": \"t\", \"type\": \"bool\", \"reg\": 1}]},\n"
                   "    {\"name\": \"d1\", \"protocol\": \"fix\", \"connection\": {\"addr\": "
                   "\"a\"}, \"tags\": [{\"name\": \"t\", \"type\": \"bool\", \"reg\": 1}]}\n"
                   "  ]\n"
                   "}\n");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:6:14: devices[2].name: duplicate device name \"d1\" (first at line 4, "
                    "column 14)");
    res_free(&r);
}

static void test_duplicate_tag(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"gw-1\"},\n"
                   "  \"profiles\": {\"p\": {\"tags\": [\n"
                   "    {\"name\": \"a\", \"type\": \"bool\", \"reg\": 1},\n"
                   "    {\"name\": \"b\", \"type\": \"bool\", \"reg\": 2},\n"
                   "    {\"name\": \"a\", \"type\": \"bool\", \"reg\": 3}\n"
                   "  ]}},\n"
                   "  \"devices\": [\n"
                   "    {\"name\": \"d1\", \"protocol\": \"fix\", \"profile\": \"p\", "
                   "\"connection\": {\"addr\": \"a\"},\n"
                   "     \"tags\": [{\"name\": \"b\", \"type\": \"bool\", \"reg\": 4}, {\"name\": "
                   "\"c\", \"type\": \"bool\", \"reg\": 5},\n"
                   "             {\"name\": \"c\", \"type\": \"bool\", \"reg\": 6}]}\n"
                   "  ]\n"
                   "}\n");
    expect_errors(&r, 3);
    expect_line(&r, "t.json:6:14: profiles.p.tags[2].name: duplicate tag name \"a\" (first at line "
                    "4, column 14)");
    expect_line(&r,
                "t.json:10:24: devices[0].tags[0].name: duplicate tag name \"b\": profile \"p\" "
                "has it (line 5, column 14)");
    expect_line(&r,
                "t.json:11:23: devices[0].tags[2].name: duplicate tag name \"c\" (first at line "
                "10, column 65)");
    res_free(&r);
}

static void test_duplicate_json_keys(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"gw-1\", \"id\": \"gw-2\"},\n"
                   "  \"mqtt\": {\"port\": 1, \"port\": 2, \"port\": 3},\n"
                   "  \"devices\": [],\n"
                   "  \"devices\": []\n"
                   "}\n");
    /* Every repetition, not only the first (JSON_REJECT_DUPLICATES would stop there). */
    expect_errors(&r, 4);
    expect_line(&r, "t.json:2:29: gateway.id: duplicate key (first at line 2, column 15)");
    expect_line(&r, "t.json:3:23: mqtt.port: duplicate key (first at line 3, column 12)");
    expect_line(&r, "t.json:3:34: mqtt.port: duplicate key (first at line 3, column 12)");
    expect_line(&r, "t.json:5:3: devices: duplicate key (first at line 4, column 3)");
    res_free(&r);
}

static void test_store_choices(void **state)
{
    (void)state;
    res_t r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"store\": "
                   "{\"synchronous\": \"normal\", \"on_error\": \"refuse\", "
                   "\"quick_check\": \"off\"}}");
    assert_int_equal(r.n, 0);
    assert_true(r.cfg->store.sync_normal);
    assert_true(r.cfg->store.on_error_refuse);
    assert_true(r.cfg->store.skip_check);
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": []}");
    assert_int_equal(r.n, 0);
    assert_false(r.cfg->store.sync_normal);     /* full is the default: power cuts lose nothing */
    assert_false(r.cfg->store.on_error_refuse); /* degraded is the default: keep polling */
    assert_false(r.cfg->store.skip_check);      /* checked at start by default */
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"store\": {\"synchronous\": "
             "\"off\", \"on_error\": \"exit\"}}");
    expect_errors(&r, 2);
    expect_line(&r, "t.json:1:69: store.synchronous: \"off\" is not \"full\" or \"normal\"");
    expect_line(&r, "t.json:1:88: store.on_error: \"exit\" is not \"degraded\" or \"refuse\"");
    res_free(&r);
}

static void test_commands_section(void **state)
{
    (void)state;
    res_t r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": []}");
    assert_int_equal(r.n, 0);
    assert_int_equal(r.cfg->commands.dedup_window_s, 600);
    assert_int_equal(r.cfg->commands.rate_per_device, 20);
    assert_int_equal(r.cfg->commands.rate_global, 200);
    assert_int_equal(r.cfg->commands.dedup_max, 10000);
    assert_int_equal(r.cfg->commands.result_max_bytes, 4096);
    assert_int_equal(r.cfg->commands.audit_max_rows, 1000000);
    assert_int_equal(r.cfg->commands.audit_retention_days, 90);
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"commands\": "
             "{\"dedup_window_s\": 5, \"rate_global\": 7}}");
    assert_int_equal(r.n, 0);
    assert_int_equal(r.cfg->commands.dedup_window_s, 5);
    assert_int_equal(r.cfg->commands.rate_global, 7);
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"commands\": "
             "{\"dedup_window_s\": 0, \"dedup\": 1}}");
    expect_errors(&r, 2);
    expect_line(&r, "t.json:1:75: commands.dedup_window_s: 0 is out of range 1..86400");
    expect_line(&r, "t.json:1:78: commands.dedup: unknown key");
    res_free(&r);
}

static void test_store_history_keys(void **state)
{
    (void)state;
    res_t r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": []}");
    assert_int_equal(r.n, 0);
    assert_true(r.cfg->store.history_max_mb == 256);
    assert_int_equal(r.cfg->store.history_chunk_max_s, 900);
    assert_non_null(r.cfg->store.runtime_dir);
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"store\": "
             "{\"history_max_mb\": 0, \"history_chunk_max_s\": 60, \"runtime_dir\": \"/run/x\"}}");
    assert_int_equal(r.n, 0);
    assert_true(r.cfg->store.history_max_mb == 0); /* no size bound */
    assert_int_equal(r.cfg->store.history_chunk_max_s, 60);
    assert_string_equal(r.cfg->store.runtime_dir, "/run/x");
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"store\": "
             "{\"history_max_mb\": 0.001, \"history_chunk_max_s\": 0}}");
    expect_errors(&r, 2);
    expect_line(&r, "t.json:1:72: store.history_max_mb: 0.001 is not 0 or in range 0.01..1048576");
    res_free(&r);
}

static void test_store_commit_interval_and_runtime_dir(void **state)
{
    (void)state;
    unsetenv("RUNTIME_DIRECTORY");
    res_t r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": []}");
    assert_int_equal(r.n, 0);
    assert_int_equal(r.cfg->store.commit_interval_ms, 1000);
    assert_string_equal(r.cfg->store.runtime_dir, "/dev/shm/simpul-gw-1");
    res_free(&r);
    setenv("RUNTIME_DIRECTORY", "/run/simpul", 1); /* systemd's RuntimeDirectory= */
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"store\": "
             "{\"commit_interval_ms\": 0}}");
    unsetenv("RUNTIME_DIRECTORY");
    assert_int_equal(r.n, 0);
    assert_int_equal(r.cfg->store.commit_interval_ms, 0);
    assert_string_equal(r.cfg->store.runtime_dir, "/run/simpul");
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"store\": "
             "{\"runtime_dir\": \"/tmp/rt\", \"commit_interval_ms\": 60001}}");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:1:102: store.commit_interval_ms: 60001 is out of range 0..60000");
    res_free(&r);
}

static void test_sparkplug(void **state)
{
    (void)state;
    res_t r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": []}");
    assert_int_equal(r.n, 0);
    assert_int_equal(r.cfg->mqtt.format, SMP_FORMAT_JSON);
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"mqtt\": {\"format\": "
             "\"both\", \"sparkplug\": {\"group_id\": \"G\"}}}");
    assert_int_equal(r.n, 0);
    assert_int_equal(r.cfg->mqtt.format, SMP_FORMAT_BOTH);
    assert_string_equal(r.cfg->mqtt.sparkplug.group_id, "G");
    assert_string_equal(r.cfg->mqtt.sparkplug.edge_node_id, "gw-1"); /* default: gateway.id */
    assert_null(r.cfg->mqtt.sparkplug.primary_host_id);
    assert_true(r.cfg->mqtt.sparkplug.use_aliases);
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [], \"mqtt\": {\"format\": "
             "\"sparkplug\", \"sparkplug\": {\"group_id\": \"G\", \"edge_node_id\": \"E\", "
             "\"primary_host_id\": \"scada\", \"use_aliases\": false}}}");
    assert_int_equal(r.n, 0);
    assert_int_equal(r.cfg->mqtt.format, SMP_FORMAT_SPARKPLUG);
    assert_string_equal(r.cfg->mqtt.sparkplug.edge_node_id, "E");
    assert_string_equal(r.cfg->mqtt.sparkplug.primary_host_id, "scada");
    assert_false(r.cfg->mqtt.sparkplug.use_aliases);
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [],\n"
             "\"mqtt\": {\"format\": \"sparkplug\"}}");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:2:20: mqtt.format: a sparkplug format needs mqtt.sparkplug.group_id");
    res_free(&r);
    r = load("{\"gateway\": {\"id\": \"gw-1\"}, \"devices\": [],\n"
             "\"mqtt\": {\"format\": \"xml\", \"sparkplug\": {\"edge_node_id\": \"a/b\", "
             "\"x\": 1}}}");
    expect_errors(&r, 4);
    expect_line(&r, "t.json:2:20: mqtt.format: unknown format \"xml\" (use \"json\", "
                    "\"sparkplug\" or \"both\")");
    expect_line(&r, "t.json:2:57: mqtt.sparkplug.edge_node_id: must not contain '/', '+' or '#' "
                    "(it is a topic level)");
    res_free(&r);
}

static void test_out_of_range(void **state)
{
    (void)state;
    res_t r = load(
        "{\n"
        "  \"gateway\": {\"id\": \"gw-1\", \"metrics_interval_s\": 0},\n"
        "  \"mqtt\": {\"port\": 0, \"qos\": 2, \"keepalive_s\": 65536, \"inflight_max\": 0},\n"
        "  \"store\": {\"history_retention_h\": 87601, \"outbox_max_mb\": 0},\n"
        "  \"devices\": [\n"
        "    {\"name\": \"d1\", \"protocol\": \"fix\", \"interval_ms\": 9, \"refresh_s\": 86401,\n"
        "     \"connection\": {\"addr\": \"a\", \"port\": 70000},\n"
        "     \"tags\": [{\"name\": \"t\", \"type\": \"int16\", \"reg\": 65536, \"scale\": 0, "
        "\"deadband\": -1,\n"
        "               \"min\": 5, \"max\": 4, \"interval_ms\": 86400001}]}\n"
        "  ]\n"
        "}\n");
    expect_errors(&r, 15);
    expect_line(&r, "t.json:2:51: gateway.metrics_interval_s: 0 is out of range 1..86400");
    expect_line(&r, "t.json:3:20: mqtt.port: 0 is out of range 1..65535");
    expect_line(&r, "t.json:3:30: mqtt.qos: 2 is out of range 0..1");
    expect_line(&r, "t.json:3:48: mqtt.keepalive_s: 65536 is out of range 1..65535");
    expect_line(&r, "t.json:3:71: mqtt.inflight_max: 0 is out of range 1..65535");
    expect_line(&r, "t.json:4:36: store.history_retention_h: 87601 is out of range 0..87600");
    expect_line(&r, "t.json:4:60: store.outbox_max_mb: 0 is out of range 0.01..1048576");
    expect_line(&r, "t.json:6:54: devices[0].interval_ms: 9 is out of range 10..86400000");
    expect_line(&r, "t.json:6:70: devices[0].refresh_s: 86401 is out of range 1..86400");
    expect_line(&r, "t.json:7:42: devices[0].connection.port: 70000 is out of range 1..65535");
    expect_line(&r, "t.json:8:53: devices[0].tags[0].reg: 65536 is out of range 0..65535");
    expect_line(&r,
                "t.json:8:69: devices[0].tags[0].scale: scale must not be 0 (writes divide by it)");
    expect_line(&r, "t.json:8:84: devices[0].tags[0].deadband: deadband must be >= 0, got -1");
    expect_line(&r, "t.json:9:33: devices[0].tags[0].max: max 4 is less than min 5");
    expect_line(
        &r, "t.json:9:51: devices[0].tags[0].interval_ms: 86400001 is out of range 10..86400000");
    res_free(&r);
}

static void test_missing_required(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {},\n"
                   "  \"profiles\": {\"p\": {}},\n"
                   "  \"devices\": [\n"
                   "    {\"protocol\": \"fix\", \"tags\": [{\"reg\": 1}]},\n"
                   "    {\"name\": \"d2\", \"tags\": [{\"name\": \"t\", \"type\": \"bool\"}]},\n"
                   "    {\"name\": \"d3\", \"protocol\": \"fix\", \"tags\": [{\"name\": \"t\", "
                   "\"type\": \"bool\"}]}\n"
                   "  ]\n"
                   "}\n");
    expect_errors(&r, 9);
    expect_line(&r, "t.json:2:14: gateway: missing required key \"id\"");
    expect_line(&r, "t.json:3:21: profiles.p: missing required key \"tags\"");
    expect_line(&r, "t.json:5:5: devices[0]: missing required key \"name\"");
    expect_line(&r, "t.json:5:5: devices[0]: missing required key \"connection\"");
    expect_line(&r, "t.json:5:34: devices[0].tags[0]: missing required key \"name\"");
    expect_line(&r, "t.json:5:34: devices[0].tags[0]: missing required key \"type\"");
    expect_line(&r, "t.json:6:5: devices[1]: missing required key \"protocol\"");
    expect_line(&r, "t.json:7:5: devices[2]: missing required key \"connection\"");
    expect_line(&r, "t.json:7:48: devices[2].tags[0]: missing required key \"reg\" for protocol "
                    "\"fix\"");
    res_free(&r);

    r = load("{}");
    expect_errors(&r, 2);
    expect_line(&r, "t.json:1:1: (root): missing required key \"gateway\"");
    expect_line(&r, "t.json:1:1: (root): missing required key \"devices\"");
    res_free(&r);

    r = load("{\n"
             "  \"gateway\": {\"id\": \"g\"},\n"
             "  \"devices\": [{\"name\": \"d\", \"protocol\": \"fix\", \"connection\": {\"addr\": "
             "\"a\"}}]\n"
             "}\n");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:3:15: devices[0]: the device has no tags: give a \"profile\" or "
                    "\"tags\"");
    res_free(&r);
}

static void test_bad_plugin_keys(void **state)
{
    (void)state;
    res_t r = load(
        "{\n"
        "  \"gateway\": {\"id\": \"gw-1\"},\n"
        "  \"devices\": [\n"
        "    {\"name\": \"d1\", \"protocol\": \"fix\", \"connection\": {\"addr\": \"a\", \"mode\": "
        "\"medium\"},\n"
        "     \"tags\": [{\"name\": \"t\", \"type\": \"int16\", \"reg\": 1, \"kind\": \"c\"}]},\n"
        "    {\"name\": \"d2\", \"protocol\": \"fix\", \"connection\": {\"addr\": \"a\", \"mode\": "
        "\"slow\"},\n"
        "     \"tags\": [{\"name\": \"t\", \"type\": \"int16\", \"reg\": 1, \"kind\": \"b\"}]},\n"
        "    {\"name\": \"d3\", \"protocol\": \"fix\", \"connection\": {\"addr\": \"refuse\"},\n"
        "     \"tags\": [{\"name\": \"t\", \"type\": \"int16\", \"reg\": 999}]}\n"
        "  ]\n"
        "}\n");
    expect_errors(&r, 6);
    /* Table checks: enum choices. */
    expect_line(&r,
                "t.json:4:75: devices[0].connection.mode: unknown value \"medium\" (use one of: "
                "fast, slow)");
    expect_line(&r, "t.json:5:64: devices[0].tags[0].kind: unknown value \"c\" (use one of: a, b)");
    /* The plugin's own checks: a key it names that is absent points at the object... */
    expect_line(&r, "t.json:6:53: devices[1].connection.ratio: needed in slow mode");
    /* ...one that is present at its value, and NULL at the object itself. */
    expect_line(&r, "t.json:7:64: devices[1].tags[0].kind: kind b needs type bool");
    expect_line(&r, "t.json:8:53: devices[2].connection: refused by protocol \"fix\"");
    expect_line(&r, "t.json:9:15: devices[2].tags[0]: register 999 is reserved");
    res_free(&r);
}

static void test_type_restrictions(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"g\"},\n"
                   "  \"devices\": [{\"name\": \"d\", \"protocol\": \"fix\", \"connection\": "
                   "{\"addr\": \"a\"},\n"
                   "    \"tags\": [{\"name\": \"t\", \"type\": \"bool\", \"reg\": 1, \"scale\": 2, "
                   "\"max\": 1},\n"
                   "             {\"name\": \"u\", \"type\": \"str\", \"reg\": 2}]}]\n"
                   "}\n");
    expect_errors(&r, 3);
    expect_line(&r, "t.json:4:54: devices[0].tags[0].scale: not allowed for type bool");
    expect_line(&r, "t.json:4:66: devices[0].tags[0].max: not allowed for type bool");
    expect_line(&r, "t.json:5:36: devices[0].tags[1].type: unknown type \"str\" (use bool, int16, "
                    "uint16, int32, uint32, int64, uint64, float32, float64 or string)");
    res_free(&r);
}

static void test_mqtt_and_files(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"g\", \"log_level\": \"verbose\"},\n"
                   "  \"mqtt\": {\"version\": 5, \"topic_prefix\": \"a/+\", \"password_file\": "
                   "\"/nonexistent/pw\",\n"
                   "           \"tls\": {\"cert_file\": \"/nonexistent/c.pem\"}},\n"
                   "  \"devices\": []\n"
                   "}\n");
    expect_errors(&r, 8);
    expect_line(&r, "t.json:2:39: gateway.log_level: unknown log level \"verbose\" (use error, "
                    "warn, info or debug)");
    expect_line(&r, "t.json:3:23: mqtt.version: expected a string, got an integer (5)");
    expect_line(&r, "t.json:3:42: mqtt.topic_prefix: invalid topic prefix \"a/+\": no '+' or "
                    "'#', no leading, trailing or double '/'");
    expect_line(&r, "t.json:3:49: mqtt.password_file: a password needs mqtt.username as well");
    expect_line(&r, "t.json:3:66: mqtt.password_file: cannot read \"/nonexistent/pw\": No such "
                    "file or directory");
    expect_line(&r, "t.json:4:19: mqtt.tls: missing required key \"ca_file\"");
    expect_line(&r, "t.json:4:19: mqtt.tls: cert_file and key_file must be given together");
    expect_line(&r, "t.json:4:33: mqtt.tls.cert_file: cannot read \"/nonexistent/c.pem\": No such "
                    "file or directory");
    res_free(&r);

    r = load("{\"gateway\": {\"id\": \"g\"}, \"mqtt\": {\"version\": \"4\"}, \"devices\": []}");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:1:46: mqtt.version: unknown MQTT version \"4\" (use \"3.1\", \"3.1.1\" "
                    "or \"5\")");
    res_free(&r);
}

static void test_missing_or_bad_plugin(void **state)
{
    (void)state;
    res_t r = load("{\n"
                   "  \"gateway\": {\"id\": \"gw-1\"},\n"
                   "  \"devices\": [{\"name\": \"d1\", \"protocol\": \"nosuch\", \"tags\": "
                   "[{\"name\": \"t\", \"type\": \"bool\"}]},\n"
                   "              {\"name\": \"d2\", \"protocol\": \"Bad/Name\", \"tags\": "
                   "[{\"name\": \"t\", \"type\": \"bool\"}]},\n"
                   "              {\"name\": \"d3\", \"protocol\": \"badabi\", \"tags\": "
                   "[{\"name\": \"t\", \"type\": \"bool\"}]}]\n"
                   "}\n");
    expect_errors(&r, 3);
    expect_prefix(&r, "t.json:3:42: devices[0].protocol: no plugin for protocol \"nosuch\": "
                      "nosuch.so not found in " SMP_TEST_EXAMPLE_PLUGIN_DIR);
    expect_line(&r, "t.json:4:42: devices[1].protocol: invalid protocol name \"Bad/Name\": use "
                    "1-64 of a-z, 0-9 and _ (device d2)");
    expect_line(&r, "t.json:5:42: devices[2].protocol: badabi.so: plugin ABI version 2, this "
                    "simpul supports ABI version 1 (device d3)");
    res_free(&r);
}

static void test_errors_sorted_by_position(void **state)
{
    (void)state;
    /* Validated gateway first, devices second; reported in file order. */
    res_t r = load("{\n"
                   "  \"devices\": 5,\n"
                   "  \"gateway\": {\"id\": \"a b\"}\n"
                   "}\n");
    expect_errors(&r, 2);
    assert_int_equal(strncmp(r.errs, "t.json:2:", 9), 0);
    assert_non_null(strstr(r.errs, "\nt.json:3:"));
    res_free(&r);
}

/* ---- the real plugins -------------------------------------------------------------------- */

static void test_example_plugin(void **state)
{
    (void)state;
    res_t r = load(
        "{\n"
        "  \"gateway\": {\"id\": \"g\"},\n"
        "  \"devices\": [{\"name\": \"demo-01\", \"protocol\": \"example\",\n"
        "    \"connection\": {\"host\": \"sim-a\", \"latency_ms\": 5},\n"
        "    \"tags\": [{\"name\": \"count\", \"type\": \"uint32\", \"signal\": \"counter\"},\n"
        "             {\"name\": \"wave\", \"type\": \"float64\", \"signal\": \"sine\", "
        "\"period_s\": 30}]}]\n"
        "}\n");
    expect_ok(&r);
    const smp_device_cfg_t *d = &r.cfg->devices[0];
    assert_non_null(d->plugin->handle); /* really dlopen()ed */
    assert_string_equal(d->conn_key, "example:sim-a");
    assert_int_equal(d->tags[1].params[1].i, 30); /* period_s */
    assert_true(d->tags[1].params[2].d == 1);     /* amplitude defaults to 1 */
    res_free(&r);

    r = load("{\n"
             "  \"gateway\": {\"id\": \"g\"},\n"
             "  \"devices\": [{\"name\": \"demo-01\", \"protocol\": \"example\",\n"
             "    \"connection\": {\"host\": \"sim-a\", \"latency_ms\": 10001},\n"
             "    \"tags\": [{\"name\": \"wave\", \"type\": \"int16\", \"signal\": \"sine\"}]}]\n"
             "}\n");
    expect_errors(&r, 2);
    expect_line(&r,
                "t.json:4:51: devices[0].connection.latency_ms: 10001 is out of range 0..10000");
    expect_line(&r, "t.json:5:58: devices[0].tags[0].signal: a sine needs type float32 or float64");
    res_free(&r);
}

static void test_modbus_plugin(void **state)
{
    (void)state;
    const char *text =
        "{\n"
        "  \"gateway\": {\"id\": \"g\"},\n"
        "  \"profiles\": {\"pump-v1\": {\"tags\": [\n"
        "    {\"name\": \"running\", \"table\": \"coil\", \"address\": 0, \"type\": \"bool\", "
        "\"writable\": true},\n"
        "    {\"name\": \"flow\", \"table\": \"input_register\", \"address\": 0, \"type\": "
        "\"float32\", \"order\": \"CDAB\"}\n"
        "  ]}},\n"
        "  \"devices\": [\n"
        "    {\"name\": \"pump-01\", \"protocol\": \"modbus\", \"profile\": \"pump-v1\",\n"
        "     \"connection\": {\"transport\": \"tcp\", \"host\": \"127.0.0.1\", \"port\": "
        "70000}},\n"
        "    {\"name\": \"pump-02\", \"protocol\": \"modbus\", \"profile\": \"pump-v1\",\n"
        "     \"connection\": {\"transport\": \"tcp\", \"host\": \"127.0.0.1\", \"port\": 1502}}\n"
        "  ]\n"
        "}\n";
    smp_config_t *cfg = NULL;
    char *errs = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&errs, &len);
    int n = smp_config_load_text("m.json", text, strlen(text), SMP_TEST_PLUGIN_DIR, f, &cfg);
    fclose(f);
    if (n != 1 || strcmp(errs, "m.json:9:70: devices[0].connection.port: 70000 is out of range "
                               "1..65535\n") != 0) {
        print_error("got %d problems:\n%s", n, errs);
        fail();
    }
    assert_null(cfg);
    free(errs);
}

/* The worked example that ships with simpul must always pass --check. */
static void test_dumai_demo(void **state)
{
    (void)state;
    const char *path = SMP_SOURCE_ROOT "/config/dumai-demo.json";
    if (access(path, R_OK) != 0) {
        skip();
    }
    smp_config_t *cfg = NULL;
    char *errs = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&errs, &len);
    int n = smp_config_load(path, SMP_TEST_PLUGIN_DIR, f, &cfg);
    fclose(f);
    if (n != 0) {
        print_error("%s", errs);
        fail();
    }
    assert_non_null(cfg);
    assert_true(cfg->ndevices > 0);
    smp_config_free(cfg);
    free(errs);
}

/* ---- files and paths --------------------------------------------------------------------- */

static void test_load_file(void **state)
{
    (void)state;
    char *dir = make_tmpdir();
    char *path = join(dir, "site.json");
    write_file(path,
               "{\n"
               "  \"gateway\": {\"id\": \"g\", \"plugin_dir\": \"" SMP_TEST_EXAMPLE_PLUGIN_DIR
               "\"},\n"
               "  \"store\": {\"path\": \"db/s.db\"},\n"
               "  \"devices\": [{\"name\": \"d\", \"protocol\": \"example\",\n"
               "    \"connection\": {\"host\": \"h\"},\n"
               "    \"tags\": [{\"name\": \"t\", \"type\": \"bool\", \"signal\": \"toggle\"}]}]\n"
               "}\n");
    smp_config_t *cfg = NULL;
    /* The real entry point: no preset set, the plugin found through gateway.plugin_dir. */
    int n = smp_config_load(path, NULL, stderr, &cfg);
    assert_int_equal(n, 0);
    assert_non_null(cfg);
    char *want = join(dir, "db/s.db");
    assert_string_equal(cfg->store.path, want);
    free(want);
    assert_string_equal(cfg->gateway.plugin_dir, SMP_TEST_EXAMPLE_PLUGIN_DIR);
    assert_string_equal(cfg->devices[0].plugin->name, "example");
    smp_config_free(cfg);

    /* A relative plugin_dir that does not exist, relative to the file's directory. */
    write_file(path,
               "{\"gateway\": {\"id\": \"g\", \"plugin_dir\": \"plugins\"}, \"devices\": []}");
    char *errs = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&errs, &len);
    n = smp_config_load(path, NULL, f, &cfg);
    fclose(f);
    assert_int_equal(n, 1);
    char line[1024];
    snprintf(line, sizeof line, "%s:1:39: gateway.plugin_dir: \"%s/plugins\" is not a directory\n",
             path, dir);
    assert_string_equal(errs, line);
    free(errs);
    unlink(path);

    /* A file that is not there. */
    errs = NULL;
    f = open_memstream(&errs, &len);
    n = smp_config_load(path, NULL, f, &cfg);
    fclose(f);
    assert_int_equal(n, 1);
    assert_null(cfg);
    snprintf(line, sizeof line,
             "%s:1:1: (root): cannot read the config: No such file or directory\n", path);
    assert_string_equal(errs, line);
    free(errs);

    /* Larger than any sane config: refused before parsing. */
    f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fseek(f, FILE_MAX_BYTES, SEEK_SET), 0);
    fputc(' ', f);
    fclose(f);
    errs = NULL;
    f = open_memstream(&errs, &len);
    n = smp_config_load(path, NULL, f, &cfg);
    fclose(f);
    assert_int_equal(n, 1);
    snprintf(line, sizeof line,
             "%s:1:1: (root): cannot read the config: the file is larger than "
             "16 MiB\n",
             path);
    assert_string_equal(errs, line);
    free(errs);
    unlink(path);

    rmdir(dir);
    free(path);
    free(dir);
}

/* ---- robustness -------------------------------------------------------------------------- */

/* Every line of the output has the contract's shape: FILE:LINE:COL: path: message. */
static void expect_well_formed(const res_t *r)
{
    assert_true(r->n >= 0);
    if (r->n == 0) {
        assert_non_null(r->cfg);
        return;
    }
    assert_null(r->cfg);
    assert_int_equal(count_lines(r->errs), r->n);
    for (const char *p = r->errs; *p != '\0';) {
        unsigned line, col;
        int used = 0;
        assert_int_equal(sscanf(p, "t.json:%u:%u: %n", &line, &col, &used), 2);
        assert_true(used > 0 && line >= 1 && col >= 1);
        const char *nl = strchr(p, '\n');
        assert_non_null(nl);
        const char *sep = strstr(p + used, ": ");
        assert_true(sep != NULL && sep < nl);
        p = nl + 1;
    }
}

static const char fuzz_base[] =
    "{\n"
    "  \"gateway\": {\"id\": \"gw-1\", \"data_dir\": \"d\", \"log_level\": \"info\"},\n"
    "  \"mqtt\": {\"host\": \"h\", \"port\": 1883, \"qos\": 1, \"version\": \"3.1.1\"},\n"
    "  \"store\": {\"history_retention_h\": 1, \"outbox_max_mb\": 2},\n"
    "  \"profiles\": {\"p\": {\"tags\": [{\"name\": \"a\", \"type\": \"bool\", \"reg\": 1, "
    "\"kind\": \"b\"},\n"
    "    {\"name\": \"b\", \"type\": \"float32\", \"reg\": 2, \"scale\": 0.5, \"min\": 0, \"max\": "
    "9}]}},\n"
    "  \"devices\": [\n"
    "    {\"name\": \"d1\", \"protocol\": \"fix\", \"profile\": \"p\",\n"
    "     \"connection\": {\"addr\": \"x\", \"port\": 2, \"mode\": \"slow\", \"ratio\": 1.5}},\n"
    "    {\"name\": \"d2\", \"protocol\": \"fix\", \"interval_ms\": 100,\n"
    "     \"connection\": {\"addr\": \"y\"}, \"tags\": [{\"name\": \"c\", \"type\": \"int64\", "
    "\"reg\": 3}]}\n"
    "  ]\n"
    "}\n";

static void test_fuzz_mutations(void **state)
{
    (void)state;
    res_t r = load(fuzz_base);
    expect_ok(&r);
    res_free(&r);

    static const char alphabet[] = "{}[]\":,0123456789-.eE\\ \nntrufalsx\x01\xff\xc3\xa9";
    uint32_t seed = 12345;
    size_t base_len = sizeof fuzz_base - 1;
    char buf[sizeof fuzz_base * 2];
    int valid = 0, invalid = 0;
    for (int iter = 0; iter < 3000; iter++) {
        memcpy(buf, fuzz_base, base_len);
        size_t len = base_len;
        int nmut = 1 + (int)((seed = seed * 1103515245u + 12345u) >> 16) % 4;
        for (int m = 0; m < nmut; m++) {
            seed = seed * 1103515245u + 12345u;
            size_t pos = (seed >> 8) % (len ? len : 1);
            seed = seed * 1103515245u + 12345u;
            switch ((seed >> 16) % 4) {
            case 0: /* replace a byte */
                if (len > 0) {
                    buf[pos] = alphabet[(seed >> 4) % (sizeof alphabet - 1)];
                }
                break;
            case 1: { /* delete a run */
                size_t k = 1 + (seed >> 3) % 8;
                if (pos + k <= len) {
                    memmove(buf + pos, buf + pos + k, len - pos - k);
                    len -= k;
                }
                break;
            }
            case 2: /* insert a byte */
                if (len + 1 < sizeof buf) {
                    memmove(buf + pos + 1, buf + pos, len - pos);
                    buf[pos] = alphabet[(seed >> 4) % (sizeof alphabet - 1)];
                    len++;
                }
                break;
            default: /* truncate */
                len = pos;
                break;
            }
        }
        r = load_as("t.json", buf, len);
        expect_well_formed(&r);
        if (r.n == 0) {
            valid++;
        } else {
            invalid++;
        }
        res_free(&r);
    }
    /* The mutations must exercise both outcomes, or this test proves little. */
    assert_true(valid > 10);
    assert_true(invalid > 1000);
}

static void test_hostile_inputs(void **state)
{
    (void)state;
    /* Binary with NUL bytes. */
    char bin[512];
    for (size_t i = 0; i < sizeof bin; i++) {
        bin[i] = (char)(i * 37 + 11);
    }
    res_t r = load_as("t.json", bin, sizeof bin);
    expect_well_formed(&r);
    assert_true(r.n > 0);
    res_free(&r);

    /* Deep nesting, beyond jansson's limit and within it under an unknown key. */
    size_t depth = 100000;
    char *deep = malloc(depth * 2 + 64);
    assert_non_null(deep);
    memset(deep, '[', depth);
    memset(deep + depth, ']', depth);
    r = load_as("t.json", deep, depth * 2);
    expect_well_formed(&r);
    assert_int_equal(r.n, 1);
    res_free(&r);
    size_t d2 = 2000, k = 0;
    k += (size_t)sprintf(deep, "{\"x\": ");
    for (size_t i = 0; i < d2; i++) {
        k += (size_t)sprintf(deep + k, "{\"a\":");
    }
    deep[k++] = '1';
    memset(deep + k, '}', d2 + 1);
    k += d2 + 1;
    r = load_as("t.json", deep, k);
    expect_well_formed(&r);
    expect_line(&r, "t.json:1:2: x: unknown key");
    res_free(&r);
    free(deep);

    /* A huge key and a wide array of wrong things. */
    size_t big = 200000;
    char *huge = malloc(big + 1000);
    assert_non_null(huge);
    k = (size_t)sprintf(huge, "{\"gateway\": {\"id\": \"g\"}, \"devices\": [");
    for (size_t i = 0; i < 20000; i++) {
        k += (size_t)sprintf(huge + k, "%s1", i ? "," : "");
    }
    k += (size_t)sprintf(huge + k, "], \"");
    memset(huge + k, 'k', big - k);
    k = big;
    k += (size_t)sprintf(huge + k, "\": 1}");
    r = load_as("t.json", huge, k);
    expect_well_formed(&r);
    assert_int_equal(r.n, 20001); /* every device, plus the unknown key */
    expect_line(&r, "t.json:1:38: devices[0]: expected an object, got an integer (1)");
    expect_line(&r, "t.json:1:40036: devices[19999]: expected an object, got an integer (1)");
    res_free(&r);
    free(huge);

    /* Numbers at the edges of 64 bits stay exact and are range-checked, not wrapped. */
    r = load("{\"gateway\": {\"id\": \"g\"}, \"mqtt\": {\"port\": -9223372036854775808}, "
             "\"devices\": []}");
    expect_errors(&r, 1);
    expect_line(&r, "t.json:1:43: mqtt.port: -9223372036854775808 is out of range 1..65535");
    res_free(&r);
}

/* Makes the Nth allocation fail, for every N until the load no longer allocates that much:
 * every failure must end in a clean error (no crash, no leak: ASan watches). */
static void test_allocation_failures(void **state)
{
    (void)state;
    json_set_alloc_funcs(fail_malloc, free);
    int failures = 0;
    for (long nth = 0;; nth++) {
        res_t r = {0};
        FILE *f = open_memstream(&r.errs, &r.errs_len);
        assert_non_null(f);
        smp_plugin_set_t *set = test_set(); /* not under test: its checks use jansson too */
        alloc_countdown = nth;
        alloc_failed = false;
        r.n = load_text("t.json", fuzz_base, sizeof fuzz_base - 1, NULL, set, f, &r.cfg);
        alloc_countdown = -1;
        fclose(f);
        if (!alloc_failed) {
            expect_ok(&r);
            res_free(&r);
            break;
        }
        failures++;
        assert_true(r.n > 0);
        assert_null(r.cfg);
        assert_int_equal(count_lines(r.errs), r.n);
        res_free(&r);
    }
    json_set_alloc_funcs(malloc, free);
    assert_true(failures > 100); /* the loop really stepped through the loader */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_jsonpos),
        cmocka_unit_test(test_valid_full),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_range_boundaries_accepted),
        cmocka_unit_test(test_syntax_error),
        cmocka_unit_test(test_unknown_keys_every_level),
        cmocka_unit_test(test_wrong_types),
        cmocka_unit_test(test_invalid_names),
        cmocka_unit_test(test_unknown_profile),
        cmocka_unit_test(test_profile_tags_shared),
        cmocka_unit_test(test_reload_diff),
        cmocka_unit_test(test_duplicate_device),
        cmocka_unit_test(test_duplicate_tag),
        cmocka_unit_test(test_duplicate_json_keys),
        cmocka_unit_test(test_out_of_range),
        cmocka_unit_test(test_commands_section),
        cmocka_unit_test(test_store_choices),
        cmocka_unit_test(test_store_history_keys),
        cmocka_unit_test(test_store_commit_interval_and_runtime_dir),
        cmocka_unit_test(test_sparkplug),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_bad_plugin_keys),
        cmocka_unit_test(test_type_restrictions),
        cmocka_unit_test(test_mqtt_and_files),
        cmocka_unit_test(test_missing_or_bad_plugin),
        cmocka_unit_test(test_errors_sorted_by_position),
        cmocka_unit_test(test_example_plugin),
        cmocka_unit_test(test_modbus_plugin),
        cmocka_unit_test(test_dumai_demo),
        cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_fuzz_mutations),
        cmocka_unit_test(test_hostile_inputs),
        cmocka_unit_test(test_allocation_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
