/* example: the smallest complete simpul driver plugin, and the one to copy.
 *
 * It talks to no real device: each "device" produces simulated values, so the whole path from
 * driver to MQTT can be tried on a laptop. Everything a real driver needs is here: the config
 * keys it declares, cross-field checks, the connection key that decides which devices share a
 * connection, the connection and device lifecycle, batched reads and a write with read-back.
 *
 * It is built like an out-of-tree plugin, against the public header only:
 *
 *   cc -std=c11 -O2 -shared -fPIC -fvisibility=hidden -I<simpul>/plugins/include \
 *      -o example.so example.c -lm
 *
 * Config (a device using it):
 *
 *   { "name": "demo-01", "protocol": "example",
 *     "connection": { "host": "sim-a", "latency_ms": 5 },
 *     "tags": [ { "name": "count", "type": "uint32", "signal": "counter" },
 *               { "name": "wave",  "type": "float64", "signal": "sine", "period_s": 30,
 *                 "amplitude": 10, "unit": "V" },
 *               { "name": "blink", "type": "bool", "signal": "toggle", "writable": true } ] }
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <simpul/plugin.h>

/* The build can override these to produce deliberately broken variants for the host's tests
 * (plugins/meson.build builds "badabi.so" with EXAMPLE_ABI_VERSION=2). */
#ifndef EXAMPLE_ABI_VERSION
#define EXAMPLE_ABI_VERSION SMP_PLUGIN_ABI_VERSION
#endif
#ifndef EXAMPLE_PROTOCOL
#define EXAMPLE_PROTOCOL "example"
#endif
/* badsize.so claims a descriptor smaller than ABI 1's; badinit.so refuses to start. */
#ifndef EXAMPLE_STRUCT_SIZE
#define EXAMPLE_STRUCT_SIZE sizeof(smp_plugin_t)
#endif

#define COUNTER_WRAP 10000 /* a counter runs 0..9999, so it fits every integer type */
#define EXAMPLE_PI   3.14159265358979323846

/* Set once by the entry point; the host keeps the table valid until the plugin is unloaded. */
static const smp_host_api_t *host;

/* ---- config keys ---------------------------------------------------------------------------
 * The host validates the config against these tables (unknown keys, types, ranges, choices,
 * required keys) and fills in defaults before any function below runs, so the code can trust
 * every param that is `set`. The params arrive index-aligned with the table: keep the enums in
 * step with the tables. */

enum { CONN_HOST, CONN_LATENCY_MS };

static const smp_config_key_t conn_keys[] = {
    {.name = "host",
     .type = SMP_KEY_STRING,
     .required = true,
     .description = "Name of the simulated endpoint; devices with equal host share a connection"},
    {.name = "latency_ms",
     .type = SMP_KEY_INT,
     .min = 0,
     .max = 10000,
     .default_value = "0",
     .description = "Simulated round-trip time of every read or write, in milliseconds"},
    {.name = NULL},
};

enum { TAG_SIGNAL, TAG_PERIOD_S, TAG_AMPLITUDE };
enum { SIG_COUNTER, SIG_SINE, SIG_TOGGLE }; /* indices into signal_choices */

static const char *const signal_choices[] = {"counter", "sine", "toggle", NULL};

static const smp_config_key_t tag_keys[] = {
    {.name = "signal",
     .type = SMP_KEY_ENUM,
     .required = true,
     .choices = signal_choices,
     .description = "counter: counts up by one per read; sine: a sine wave; toggle: flips"},
    {.name = "period_s",
     .type = SMP_KEY_INT,
     .min = 1,
     .max = 86400,
     .default_value = "60",
     .description = "Period of a sine, in seconds"},
    {.name = "amplitude",
     .type = SMP_KEY_NUMBER,
     .default_value = "1",
     .description = "Amplitude of a sine"},
    {.name = NULL},
};

/* ---- checks (main thread, while the config loads) -------------------------------------- */

static int check_connection(const smp_param_t *conn, smp_report_fn report, void *report_ctx)
{
    if (conn[CONN_HOST].s[0] == '\0') {
        report(report_ctx, "host", "must not be empty");
        return 1;
    }
    return 0;
}

static bool is_integer_type(smp_type_t t)
{
    return t >= SMP_TYPE_INT16 && t <= SMP_TYPE_UINT64;
}

static bool is_float_type(smp_type_t t)
{
    return t == SMP_TYPE_FLOAT32 || t == SMP_TYPE_FLOAT64;
}

/* Cross-field rules the tables cannot express: which value types each signal can produce. */
static int check_tag(const smp_tag_t *tag, smp_report_fn report, void *report_ctx)
{
    switch (tag->params[TAG_SIGNAL].i) {
    case SIG_COUNTER:
        if (!is_integer_type(tag->type) && !is_float_type(tag->type)) {
            report(report_ctx, "signal", "a counter needs a numeric type");
            return 1;
        }
        return 0;
    case SIG_SINE:
        if (!is_float_type(tag->type)) {
            report(report_ctx, "signal", "a sine needs type float32 or float64");
            return 1;
        }
        if (tag->writable) {
            report(report_ctx, "writable", "a sine cannot be written");
            return 1;
        }
        return 0;
    default: /* SIG_TOGGLE */
        if (tag->type != SMP_TYPE_BOOL) {
            report(report_ctx, "signal", "a toggle needs type bool");
            return 1;
        }
        return 0;
    }
}

/* Devices whose keys are equal share one connection, hence one worker thread. */
static int conn_key(const smp_param_t *conn, char *buf, size_t n)
{
    int k = snprintf(buf, n, "example:%s", conn[CONN_HOST].s);
    return k < 0 || (size_t)k >= n ? -ENOSPC : 0;
}

/* ---- connection (its worker thread) ------------------------------------------------------ */

typedef struct example_conn {
    const smp_param_t *params; /* borrowed: the host keeps them alive longer than us */
    void *log_ctx;
    bool open;
} example_conn_t;

static void *conn_create(const smp_param_t *conn, void *log_ctx)
{
    example_conn_t *c = calloc(1, sizeof *c);
    if (c != NULL) {
        c->params = conn;
        c->log_ctx = log_ctx;
    }
    return c;
}

/* Stands in for network I/O: a real driver blocks in its library here, bounded by a timeout. */
static void simulate_latency(const example_conn_t *c)
{
    int64_t ms = c->params[CONN_LATENCY_MS].i;
    if (ms > 0) {
        struct timespec ts = {.tv_sec = (time_t)(ms / 1000),
                              .tv_nsec = (long)(ms % 1000) * 1000000L};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

static int conn_open(void *cv)
{
    example_conn_t *c = cv;
    simulate_latency(c);
    c->open = true;
    host->log(c->log_ctx, SMP_LOG_INFO, "connected to simulated host %s", c->params[CONN_HOST].s);
    return 0;
}

static void conn_close(void *cv)
{
    example_conn_t *c = cv;
    c->open = false; /* safe on a closed connection, as the ABI requires */
}

static void conn_destroy(void *cv)
{
    free(cv); /* free(NULL) is a no-op, as the ABI requires of conn_destroy */
}

/* ---- devices ------------------------------------------------------------------------------ */

typedef struct example_dev {
    example_conn_t *conn;
    const smp_tag_t *tags; /* borrowed for the device's lifetime */
    size_t ntags;
    void *log_ctx;
    int64_t *counter; /* per tag: the counter value, or the toggle state */
} example_dev_t;

static void *device_create(void *cv, const smp_param_t *dev_conn, const smp_tag_t *tags,
                           size_t ntags, void *log_ctx)
{
    (void)dev_conn;
    example_dev_t *d = calloc(1, sizeof *d);
    if (d == NULL) {
        return NULL;
    }
    d->counter = calloc(ntags ? ntags : 1, sizeof *d->counter);
    if (d->counter == NULL) {
        free(d);
        return NULL;
    }
    d->conn = cv;
    d->tags = tags;
    d->ntags = ntags;
    d->log_ctx = log_ctx;
    return d;
}

static void device_destroy(void *dv)
{
    example_dev_t *d = dv;
    if (d != NULL) {
        free(d->counter);
        free(d);
    }
}

/* Stores a number into the union member the tag's type calls for (see smp_value_t). */
static void put_number(smp_type_t t, double x, smp_value_t *v)
{
    memset(v, 0, sizeof *v);
    if (is_float_type(t)) {
        v->v.d = t == SMP_TYPE_FLOAT32 ? (double)(float)x : x;
    } else if (t == SMP_TYPE_INT16 || t == SMP_TYPE_INT32 || t == SMP_TYPE_INT64) {
        v->v.i = (int64_t)x;
    } else {
        v->v.u = (uint64_t)x;
    }
}

/* The current value of tag i, without advancing it. */
static void current(const example_dev_t *d, uint32_t i, smp_value_t *v)
{
    const smp_tag_t *t = &d->tags[i];
    switch (t->params[TAG_SIGNAL].i) {
    case SIG_COUNTER:
        put_number(t->type, (double)d->counter[i], v);
        break;
    case SIG_SINE: {
        /* Wall time, so every gateway shows the same phase: handy when comparing two. */
        uint64_t period_ms = (uint64_t)t->params[TAG_PERIOD_S].i * 1000u;
        double phase = (double)(host->wall_ms() % period_ms) / (double)period_ms;
        put_number(t->type, t->params[TAG_AMPLITUDE].d * sin(2.0 * EXAMPLE_PI * phase), v);
        break;
    }
    default:
        memset(v, 0, sizeof *v);
        v->v.b = d->counter[i] != 0;
        break;
    }
}

/* One simulated request serves the whole batch: that is what a real driver aims for. */
static int device_read(void *dv, const uint32_t *idx, size_t n, smp_reading_t *out)
{
    example_dev_t *d = dv;
    if (!d->conn->open) {
        return -ENOTCONN;
    }
    simulate_latency(d->conn);
    for (size_t k = 0; k < n; k++) {
        uint32_t i = idx[k];
        out[k].status = 0;
        out[k].message = NULL;
        if (i >= d->ntags) {
            out[k].status = -EINVAL;
            out[k].message = "no such tag";
            continue;
        }
        current(d, i, &out[k].value);
        /* Advance after reading, so the first read shows 0 / false. */
        switch (d->tags[i].params[TAG_SIGNAL].i) {
        case SIG_COUNTER:
            d->counter[i] = (d->counter[i] + 1) % COUNTER_WRAP;
            break;
        case SIG_TOGGLE:
            d->counter[i] = !d->counter[i];
            break;
        default:
            break;
        }
    }
    return 1;
}

/* The host has already checked the value against the tag (type, min/max, writable) and turned
 * engineering units into the raw value. A driver reports a refusal by the device as
 * SMP_EDEVICE with a message for the operator. */
static int device_write(void *dv, uint32_t idx, const smp_value_t *in, smp_reading_t *readback,
                        const char **message)
{
    example_dev_t *d = dv;
    if (!d->conn->open) {
        return -ENOTCONN;
    }
    if (idx >= d->ntags) {
        *message = "no such tag";
        return SMP_EDEVICE;
    }
    const smp_tag_t *t = &d->tags[idx];
    simulate_latency(d->conn);
    switch (t->params[TAG_SIGNAL].i) {
    case SIG_COUNTER: {
        double x =
            is_float_type(t->type) ? in->v.d
            : (t->type == SMP_TYPE_INT16 || t->type == SMP_TYPE_INT32 || t->type == SMP_TYPE_INT64)
                ? (double)in->v.i
                : (double)in->v.u;
        if (!(x >= 0 && x < COUNTER_WRAP)) {
            *message = "counter value out of range 0..9999";
            return SMP_EDEVICE;
        }
        d->counter[idx] = (int64_t)x;
        break;
    }
    case SIG_TOGGLE:
        d->counter[idx] = in->v.b;
        break;
    default:
        *message = "a sine is read-only";
        return SMP_EDEVICE;
    }
    readback->status = 0;
    readback->message = NULL;
    current(d, idx, &readback->value);
    return 0;
}

/* ---- the descriptor and the one exported symbol ------------------------------------------ */

static const smp_plugin_t descriptor = {
    .abi_version = EXAMPLE_ABI_VERSION,
    .struct_size = EXAMPLE_STRUCT_SIZE,
    .name = EXAMPLE_PROTOCOL,
    .version = "1.0.0",
    .conn_keys = conn_keys,
    .tag_keys = tag_keys,
    .check_connection = check_connection,
    .check_tag = check_tag,
    .conn_key = conn_key,
    .conn_create = conn_create,
    .conn_open = conn_open,
    .conn_close = conn_close,
    .conn_destroy = conn_destroy,
    .device_create = device_create,
    .device_destroy = device_destroy,
    .device_read = device_read,
    .device_write = device_write,
};

SMP_PLUGIN_EXPORT const smp_plugin_t *smp_plugin_entry(const smp_host_api_t *h);

SMP_PLUGIN_EXPORT const smp_plugin_t *smp_plugin_entry(const smp_host_api_t *h)
{
    /* Refuse a host whose table lacks what this plugin calls. */
    if (h == NULL || h->abi_version != SMP_PLUGIN_ABI_VERSION ||
        h->struct_size < offsetof(smp_host_api_t, wall_ms) + sizeof h->wall_ms) {
        return NULL;
    }
    host = h;
#ifdef EXAMPLE_REFUSE
    (void)descriptor;
    return NULL;
#else
    return &descriptor;
#endif
}
