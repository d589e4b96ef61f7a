/* The Modbus protocol driver plugin: Modbus TCP, RTU on a serial line, and RTU over TCP.
 *
 * The host calls everything for one connection from that connection's worker thread, so the
 * per-connection and per-device state below needs no locks; the only global is the host API
 * table, written once by smp_plugin_entry() before any other call.
 *
 * Layering: codec.c turns registers into values and back, planner.c decides which requests to
 * issue, frame.c builds requests and checks replies, link.c owns the socket or tty and does one
 * exchange on it; this file maps the outcomes (a device exception fails the tags of one
 * request, a garbled RTU reply fails that request's tags and the line is drained, anything
 * else fails the whole call so the host reconnects) and validates the config cross-field rules.
 */
#include <errno.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <simpul/plugin.h>

#include "codec.h"
#include "frame.h"
#include "link.h"
#include "planner.h"

#define MB_PLUGIN_VERSION "1.0.0"

/* One FC16 request carries at most this many registers (a read carries 125). */
#define MB_MAX_WRITE_REGS 123u

static const smp_host_api_t *host;

#define MB_LOG(ctx, level, ...)                                                                    \
    do {                                                                                           \
        if (host != NULL && host->log != NULL) {                                                   \
            host->log((ctx), (level), __VA_ARGS__);                                                \
        }                                                                                          \
    } while (0)

/* ---- config tables ---------------------------------------------------------------------- */

/* Indices into conn_keys (and into the smp_param_t arrays the host resolves against it). */
enum {
    CK_TRANSPORT,
    CK_HOST,
    CK_PORT,
    CK_UNIT_ID,
    CK_TIMEOUT_MS,
    CK_DEVICE,
    CK_BAUD,
    CK_PARITY,
    CK_DATA_BITS,
    CK_STOP_BITS,
    CK_MAX_GAP,
    CK_MAX_REGS,
    CK_MAX_BITS,
    CK_ALLOW_BROADCAST,
    CK_FRAME_GAP_MS,
    CK_COUNT
};

/* Same order as transport_choices. */
enum { TRANSPORT_TCP = 0, TRANSPORT_RTU, TRANSPORT_RTU_TCP };

/* Indices into tag_keys. */
enum { TK_TABLE, TK_ADDRESS, TK_ORDER, TK_BIT, TK_LENGTH, TK_COUNT };

static const char *const transport_choices[] = {"tcp", "rtu", "rtu_tcp", NULL};
static const char *const parity_choices[] = {"N", "E", "O", NULL};
/* Same order as smp_mb_table_t and smp_mb_order_t, so an enum param's index is the value. */
static const char *const table_choices[] = {"coil", "discrete_input", "input_register",
                                            "holding_register", NULL};
static const char *const order_choices[] = {"ABCD", "BADC", "CDAB", "DCBA", NULL};

/* Defaults the driver applies itself. The keys that belong to one transport only carry no
 * default in the tables: the host marks a key with a default as `set`, and check_connection
 * must tell a key the integrator wrote from one the host filled in. */
#define DEFAULT_PORT       502
#define DEFAULT_BAUD       9600
#define DEFAULT_DATA_BITS  8
#define DEFAULT_STOP_BITS  1
#define DEFAULT_UNIT_ID    1
#define DEFAULT_TIMEOUT_MS 1000
#define DEFAULT_MAX_GAP    8

static const smp_config_key_t conn_keys[CK_COUNT + 1] = {
    [CK_TRANSPORT] = {"transport", SMP_KEY_ENUM, true, 0, 0, transport_choices, NULL,
                      "\"tcp\" (Modbus TCP), \"rtu\" (Modbus RTU on a serial line) or "
                      "\"rtu_tcp\" (RTU frames over TCP to a serial server)"},
    [CK_HOST] = {"host", SMP_KEY_STRING, false, 0, 0, NULL, NULL,
                 "tcp, rtu_tcp: server host name or IP address (required there)"},
    [CK_PORT] = {"port", SMP_KEY_INT, false, 1, 65535, NULL, NULL,
                 "tcp, rtu_tcp: server port (default 502)"},
    [CK_UNIT_ID] = {"unit_id", SMP_KEY_INT, false, 0, 255, NULL, "1",
                    "Modbus unit id of the device: 0-247 or 255 for tcp, 1-247 for rtu and "
                    "rtu_tcp"},
    [CK_TIMEOUT_MS] = {"timeout_ms", SMP_KEY_INT, false, 10, 60000, NULL, "1000",
                       "response timeout of one request, and of a tcp connect, in ms"},
    [CK_DEVICE] = {"device", SMP_KEY_STRING, false, 0, 0, NULL, NULL,
                   "rtu: serial device, e.g. /dev/ttyUSB0 (required for rtu)"},
    [CK_BAUD] = {"baud", SMP_KEY_INT, false, 110, 4000000, NULL, NULL,
                 "rtu: a standard baud rate (default 9600)"},
    [CK_PARITY] = {"parity", SMP_KEY_ENUM, false, 0, 0, parity_choices, NULL,
                   "rtu: parity N, E or O (default N)"},
    [CK_DATA_BITS] = {"data_bits", SMP_KEY_INT, false, 7, 8, NULL, NULL,
                      "rtu: data bits, 7 or 8 (default 8)"},
    [CK_STOP_BITS] = {"stop_bits", SMP_KEY_INT, false, 1, 2, NULL, NULL,
                      "rtu: stop bits, 1 or 2 (default 1)"},
    [CK_MAX_GAP] = {"max_gap", SMP_KEY_INT, false, 0, 125, NULL, "8",
                    "unrequested registers (bits for coil/discrete tables) one read may "
                    "bridge to merge two tags; 0 reads only requested addresses"},
    [CK_MAX_REGS] = {"max_regs_per_request", SMP_KEY_INT, false, 1, 125, NULL, "125",
                     "most registers one read request may ask for"},
    [CK_MAX_BITS] = {"max_bits_per_request", SMP_KEY_INT, false, 1, 2000, NULL, "2000",
                     "most coils or discrete inputs one read request may ask for"},
    [CK_ALLOW_BROADCAST] =
        {"allow_broadcast_writes", SMP_KEY_BOOL, false, 0, 0, NULL, NULL,
         "tcp (default false): allow writable tags on unit id 0, which a TCP-to-RTU gateway "
         "broadcasts to every device on its bus"},
    [CK_FRAME_GAP_MS] = {"frame_gap_ms", SMP_KEY_INT, false, 0, 10000, NULL, NULL,
                         "rtu_tcp: least silence between a reply and the next request, for "
                         "slow serial servers (default 0)"},
    [CK_COUNT] = {NULL, 0, false, 0, 0, NULL, NULL, NULL},
};

static const smp_config_key_t tag_keys[TK_COUNT + 1] = {
    [TK_TABLE] = {"table", SMP_KEY_ENUM, true, 0, 0, table_choices, NULL,
                  "coil, discrete_input, input_register or holding_register"},
    [TK_ADDRESS] = {"address", SMP_KEY_INT, true, 0, 65535, NULL, NULL,
                    "0-based address of the first register or bit"},
    [TK_ORDER] = {"order", SMP_KEY_ENUM, false, 0, 0, order_choices, NULL,
                  "byte order of multi-register types: ABCD (big-endian, default), BADC, "
                  "CDAB or DCBA; strings: ABCD or BADC"},
    [TK_BIT] = {"bit", SMP_KEY_INT, false, 0, 15, NULL, NULL,
                "bool only: bit 0-15 of a register (0 = least significant)"},
    [TK_LENGTH] = {"length", SMP_KEY_INT, false, 1, 125, NULL, NULL,
                   "string only (required there): length in registers, two characters each"},
    [TK_COUNT] = {NULL, 0, false, 0, 0, NULL, NULL, NULL},
};

static int64_t param_int(const smp_param_t *p, int64_t dflt)
{
    return p->set ? p->i : dflt;
}

static const char *param_str(const smp_param_t *p)
{
    return p->set && p->s != NULL ? p->s : NULL;
}

/* Baud rates libmodbus 3.1.6 maps to a termios speed (measured on a pty: every other rate,
 * 2000000 included, silently becomes 9600), so the config check refuses the others. */
static const int standard_bauds[] = {110,     300,     600,     1200,    2400,    4800,
                                     9600,    19200,   38400,   57600,   115200,  230400,
                                     460800,  500000,  576000,  921600,  1000000, 1152000,
                                     1500000, 2500000, 3000000, 3500000, 4000000};

static bool baud_is_standard(int64_t baud)
{
    for (size_t i = 0; i < sizeof(standard_bauds) / sizeof(standard_bauds[0]); i++) {
        if (standard_bauds[i] == baud) {
            return true;
        }
    }
    return false;
}

/* ---- config checks (main thread) ---------------------------------------------------------- */

static const char *transport_name(int64_t t)
{
    return t >= 0 && t <= TRANSPORT_RTU_TCP ? transport_choices[t] : "?";
}

/* Reports each key of `keys` that is set but does not belong to transport t. */
static int refuse_keys(const smp_param_t *conn, const int *keys, size_t n, const char *owner,
                       int64_t t, smp_report_fn report, void *rctx)
{
    int problems = 0;
    for (size_t i = 0; i < n; i++) {
        if (conn[keys[i]].set) {
            report(rctx, conn_keys[keys[i]].name, "only for transport %s, not %s", owner,
                   transport_name(t));
            problems++;
        }
    }
    return problems;
}

static int check_connection(const smp_param_t *conn, smp_report_fn report, void *rctx)
{
    static const int net_only[] = {CK_HOST, CK_PORT};
    static const int serial_only[] = {CK_DEVICE, CK_BAUD, CK_PARITY, CK_DATA_BITS, CK_STOP_BITS};
    static const int rtu_tcp_only[] = {CK_FRAME_GAP_MS};
    static const int tcp_only[] = {CK_ALLOW_BROADCAST};
    int problems = 0;

    if (!conn[CK_TRANSPORT].set) {
        report(rctx, "transport", "required key is missing");
        return 1;
    }
    int64_t t = conn[CK_TRANSPORT].i;
    int64_t unit = param_int(&conn[CK_UNIT_ID], DEFAULT_UNIT_ID);

    if (t == TRANSPORT_TCP || t == TRANSPORT_RTU_TCP) {
        const char *h = param_str(&conn[CK_HOST]);
        if (h == NULL || h[0] == '\0') {
            report(rctx, NULL, "transport %s needs \"host\"", transport_name(t));
            problems++;
        }
        problems += refuse_keys(conn, serial_only, sizeof serial_only / sizeof serial_only[0],
                                "rtu", t, report, rctx);
    } else {
        const char *d = param_str(&conn[CK_DEVICE]);
        if (d == NULL || d[0] == '\0') {
            report(rctx, NULL, "transport rtu needs \"device\"");
            problems++;
        }
        problems += refuse_keys(conn, net_only, sizeof net_only / sizeof net_only[0],
                                "tcp or rtu_tcp", t, report, rctx);
        if (conn[CK_BAUD].set && !baud_is_standard(conn[CK_BAUD].i)) {
            report(rctx, "baud", "%lld is not a standard baud rate", (long long)conn[CK_BAUD].i);
            problems++;
        }
    }
    if (t != TRANSPORT_TCP) {
        problems += refuse_keys(conn, tcp_only, sizeof tcp_only / sizeof tcp_only[0], "tcp", t,
                                report, rctx);
    }
    if (t != TRANSPORT_RTU_TCP) {
        problems += refuse_keys(conn, rtu_tcp_only, sizeof rtu_tcp_only / sizeof rtu_tcp_only[0],
                                "rtu_tcp", t, report, rctx);
    }
    if (t == TRANSPORT_TCP) {
        /* 248-254 are reserved; a TCP gateway in front of a serial bus would pass them on. */
        if (unit >= 248 && unit <= 254) {
            report(rctx, "unit_id", "unit id %lld is not supported over tcp (use 0-247 or 255)",
                   (long long)unit);
            problems++;
        }
    } else if (unit < 1 || unit > 247) {
        /* 0 is the broadcast address (no reply, so nothing can be read) and 248-255 are
         * reserved on a serial line, also behind a serial server. */
        report(rctx, "unit_id", "must be 1-247 for transport %s (got %lld)", transport_name(t),
               (long long)unit);
        problems++;
    }
    return problems;
}

/* Unit id 0 over TCP: a device that answers on it itself is fine, but behind a TCP-to-RTU
 * gateway 0 is the broadcast address and one command would write every device on the bus.
 * The config must say which it is before any tag on it may be written. */
static int check_device(const smp_param_t *conn, const smp_tag_t *tags, size_t ntags,
                        smp_report_fn report, void *rctx)
{
    bool tcp = conn[CK_TRANSPORT].i == TRANSPORT_TCP;
    if (!tcp || param_int(&conn[CK_UNIT_ID], DEFAULT_UNIT_ID) != 0 ||
        (conn[CK_ALLOW_BROADCAST].set && conn[CK_ALLOW_BROADCAST].i != 0)) {
        return 0;
    }
    for (size_t k = 0; k < ntags; k++) {
        if (tags[k].writable) {
            report(rctx, "unit_id",
                   "unit id 0 with writable tag \"%s\": behind a TCP-to-RTU gateway 0 is a "
                   "broadcast that writes every device on the bus; use the device's own unit id, "
                   "or set \"allow_broadcast_writes\": true if the device itself answers on 0",
                   tags[k].name);
            return 1;
        }
    }
    return 0;
}

static int check_tag(const smp_tag_t *tag, smp_report_fn report, void *rctx)
{
    const smp_param_t *p = tag->params;
    int problems = 0;

    if (!p[TK_TABLE].set || !p[TK_ADDRESS].set) {
        report(rctx, p[TK_TABLE].set ? "address" : "table", "required key is missing");
        return 1;
    }
    smp_mb_table_t table = (smp_mb_table_t)p[TK_TABLE].i;
    bool bits = smp_mb_table_is_bits(table);
    smp_type_t type = tag->type;

    if (bits && type != SMP_TYPE_BOOL) {
        report(rctx, "type", "table %s holds bits: type must be bool", smp_mb_table_name(table));
        problems++;
    }
    if (type == SMP_TYPE_STRING && !p[TK_LENGTH].set) {
        report(rctx, NULL, "type string needs \"length\" (registers)");
        problems++;
    }
    if (type != SMP_TYPE_STRING && p[TK_LENGTH].set) {
        report(rctx, "length", "only for type string");
        problems++;
    }
    if (p[TK_BIT].set) {
        if (type != SMP_TYPE_BOOL) {
            report(rctx, "bit", "only for type bool");
            problems++;
        } else if (bits) {
            report(rctx, "bit", "only for a bool in a register table, not in table %s",
                   smp_mb_table_name(table));
            problems++;
        }
    }
    unsigned length = (unsigned)param_int(&p[TK_LENGTH], 1);
    unsigned count = bits ? 1 : smp_mb_type_regs(type, length);
    if (p[TK_ORDER].set) {
        if (bits || (type != SMP_TYPE_STRING && count < 2)) {
            report(rctx, "order", "only for multi-register types");
            problems++;
        } else if (type == SMP_TYPE_STRING && p[TK_ORDER].i != SMP_MB_ABCD &&
                   p[TK_ORDER].i != SMP_MB_BADC) {
            report(rctx, "order", "a string has order ABCD or BADC");
            problems++;
        }
    }
    if (count > 0 && p[TK_ADDRESS].i + (int64_t)count > 65536) {
        report(rctx, "address", "%lld + %u %s runs past address 65535", (long long)p[TK_ADDRESS].i,
               count, bits ? "bit" : "registers");
        problems++;
    }
    if (tag->writable) {
        if (table == SMP_MB_DISCRETE_INPUT || table == SMP_MB_INPUT_REGISTER) {
            report(rctx, "writable", "read-only table %s", smp_mb_table_name(table));
            problems++;
        } else if (type == SMP_TYPE_STRING && length > MB_MAX_WRITE_REGS) {
            report(rctx, "length", "a writable string is at most %u registers (one write)",
                   MB_MAX_WRITE_REGS);
            problems++;
        }
    }
    return problems;
}

static int conn_key(const smp_param_t *conn, char *buf, size_t n)
{
    int len;
    int64_t t = conn[CK_TRANSPORT].set ? conn[CK_TRANSPORT].i : TRANSPORT_RTU;
    if (t == TRANSPORT_TCP || t == TRANSPORT_RTU_TCP) {
        const char *h = param_str(&conn[CK_HOST]);
        len = snprintf(buf, n, "%s:%s:%lld", transport_name(t), h ? h : "",
                       (long long)param_int(&conn[CK_PORT], DEFAULT_PORT));
    } else {
        const char *d = param_str(&conn[CK_DEVICE]);
        len = snprintf(buf, n, "rtu:%s", d ? d : "");
    }
    return len < 0 || (size_t)len >= n ? -ENOSPC : 0;
}

/* ---- errors ------------------------------------------------------------------------------ */

/* Modbus exception names as the platform sees them (Modbus Application Protocol v1.1b3,
 * section 7), indexed by exception code. */
static const char *const exception_names[] = {
    [1] = "illegal function",
    [2] = "illegal data address",
    [3] = "illegal data value",
    [4] = "server device failure",
    [5] = "acknowledge",
    [6] = "server device busy",
    [7] = "negative acknowledge",
    [8] = "memory parity error",
    [10] = "gateway path unavailable",
    [11] = "gateway target device failed to respond",
};
#define EXC_ILLEGAL_DATA_ADDRESS 2
#define EXC_ILLEGAL_DATA_VALUE   3

static const char *exception_name(int code)
{
    size_t n = sizeof exception_names / sizeof exception_names[0];
    return code > 0 && (size_t)code < n && exception_names[code] != NULL ? exception_names[code]
                                                                         : "unknown exception";
}

/* The outcome of one exchange. */
typedef struct mb_err {
    int code;            /* 0, SMP_EDEVICE, -EBADMSG (garbled RTU reply), or a link failure */
    int exception;       /* Modbus exception code when code == SMP_EDEVICE */
    const char *message; /* static text for SMP_EDEVICE; the link's text for the others */
} mb_err_t;

/* ---- connection ------------------------------------------------------------------------- */

typedef struct mb_conn {
    smp_mb_link_t link;
    const smp_param_t *params; /* borrowed from the host, outlives the connection */
    void *log_ctx;
    bool open;
    /* The last read's data. One set per connection, not per device (2.2 KB each: 4.4 MB at
     * 2000 devices): the devices of a connection are read one at a time, by its worker. */
    uint16_t regs[SMP_MB_MAX_READ_REGS];
    uint8_t bits[SMP_MB_MAX_READ_BITS];
} mb_conn_t;

static void *conn_create(const smp_param_t *conn, void *log_ctx)
{
    mb_conn_t *c = calloc(1, sizeof(*c));
    if (c == NULL) {
        return NULL;
    }
    c->params = conn;
    c->log_ctx = log_ctx;
    int64_t t = conn[CK_TRANSPORT].set ? conn[CK_TRANSPORT].i : TRANSPORT_TCP;
    smp_mb_link_t *l = &c->link;
    if (t == TRANSPORT_RTU) {
        smp_mb_link_init(l, SMP_MB_LINK_SERIAL);
        const char *par = param_str(&conn[CK_PARITY]);
        l->device = param_str(&conn[CK_DEVICE]);
        l->baud = (int)param_int(&conn[CK_BAUD], DEFAULT_BAUD);
        l->parity = par ? par[0] : 'N';
        l->data_bits = (int)param_int(&conn[CK_DATA_BITS], DEFAULT_DATA_BITS);
        l->stop_bits = (int)param_int(&conn[CK_STOP_BITS], DEFAULT_STOP_BITS);
        /* RTU frames are separated by 3.5 characters of 11 bits of silence; above 19200 baud
         * the spec fixes it at 1.75 ms. */
        l->gap_ns = l->baud > 19200 ? 1750000L : (long)(3.5 * 11 * 1e9 / l->baud);
    } else {
        smp_mb_link_init(l, t == TRANSPORT_RTU_TCP ? SMP_MB_LINK_RTU_TCP : SMP_MB_LINK_TCP);
        l->host = param_str(&conn[CK_HOST]);
        snprintf(l->service, sizeof l->service, "%lld",
                 (long long)param_int(&conn[CK_PORT], DEFAULT_PORT));
        /* The serial server keeps the bus's own t3.5 gap; some need more between requests. */
        l->gap_ns = (long)param_int(&conn[CK_FRAME_GAP_MS], 0) * 1000000L;
    }
    return c;
}

static void conn_close(void *cp)
{
    mb_conn_t *c = cp;
    if (c != NULL && c->open) {
        smp_mb_link_close(&c->link);
        c->open = false;
        MB_LOG(c->log_ctx, SMP_LOG_DEBUG, "connection closed");
    }
}

static int conn_open(void *cp)
{
    mb_conn_t *c = cp;
    if (c == NULL) {
        return -EINVAL;
    }
    conn_close(c);
    /* A TCP connect is bounded by the connection's own response timeout. */
    int rc =
        smp_mb_link_open(&c->link, (int)param_int(&c->params[CK_TIMEOUT_MS], DEFAULT_TIMEOUT_MS));
    if (rc < 0) {
        /* A name that does not resolve is worth a warning: it sends an integrator hunting for
         * a firewall otherwise. */
        MB_LOG(c->log_ctx, rc == -EHOSTUNREACH ? SMP_LOG_WARN : SMP_LOG_DEBUG, "%s", c->link.why);
        return rc;
    }
    c->open = true;
    MB_LOG(c->log_ctx, SMP_LOG_DEBUG, "connected");
    return 0;
}

static void conn_destroy(void *cp)
{
    mb_conn_t *c = cp;
    if (c == NULL) {
        return;
    }
    conn_close(c);
    free(c);
}

static void conn_stats(void *cp, smp_conn_stats_t *out)
{
    const mb_conn_t *c = cp;
    if (c == NULL || out == NULL) {
        return;
    }
    out->crc_errors = c->link.crc_errors;
    out->framing_errors = c->link.framing_errors;
}

/* ---- device ------------------------------------------------------------------------------ */

/* 32 bytes a tag (100k tags on one site is 3 MB): small fields, and the variable parts in two
 * arrays of the device instead of two allocations per tag. */
typedef struct mb_tag {
    const char *name; /* borrowed from the host's smp_tag_t */
    uint32_t raw_off; /* its registers (or bit) of the last successful read: d->raw[raw_off..] */
    uint32_t str_off; /* strings: decoded text at d->strs + str_off, valid until the next call
                         on the device; NO_STR otherwise */
    uint16_t address;
    uint16_t count; /* registers, or 1 for a bit table */
    uint8_t type;   /* smp_type_t */
    uint8_t table;  /* smp_mb_table_t */
    uint8_t order;  /* smp_mb_order_t */
    int8_t bit;     /* -1 = none */
    bool writable;
    bool raw_ok;
} mb_tag_t;
_Static_assert(sizeof(mb_tag_t) <= 32, "mb_tag_t stays small");
#define NO_STR UINT32_MAX

typedef struct mb_device {
    mb_conn_t *conn;
    void *log_ctx;
    int unit_id;
    int timeout_ms;
    int call_timeout_ms; /* > 0: this call's requests wait no longer (a command's deadline) */
    smp_mb_limits_t lim;
    mb_tag_t *tags;
    uint16_t *raw;        /* every tag's last raw read, at its raw_off */
    char *strs;           /* every string tag's decoded text, at its str_off */
    smp_mb_span_t *spans; /* index-aligned with tags; `isolated` is learned at run time */
    size_t ntags;
    smp_mb_plan_t plan;
    /* The subset `plan` was made for. A poll group reads the same tags every time: the plan
     * (a sort of its tags) is made again only when the subset or a tag's isolation changes. */
    uint32_t *plan_idx;
    size_t plan_n, plan_cap;
    bool plan_ok;
    char msg[160]; /* the current call's dynamic message (link errors, write refusals) */
} mb_device_t;

static void device_destroy(void *dp)
{
    mb_device_t *d = dp;
    if (d == NULL) {
        return;
    }
    free(d->tags);
    free(d->raw);
    free(d->strs);
    free(d->spans);
    smp_mb_plan_free(&d->plan);
    free(d->plan_idx);
    free(d);
}

static void *device_create(void *cp, const smp_param_t *dev_conn, const smp_tag_t *tags,
                           size_t ntags, void *log_ctx)
{
    mb_conn_t *c = cp;
    if (c == NULL || dev_conn == NULL || (ntags > 0 && tags == NULL)) {
        return NULL;
    }
    mb_device_t *d = calloc(1, sizeof(*d));
    if (d == NULL) {
        return NULL;
    }
    d->conn = c;
    d->log_ctx = log_ctx;
    d->unit_id = (int)param_int(&dev_conn[CK_UNIT_ID], DEFAULT_UNIT_ID);
    d->timeout_ms = (int)param_int(&dev_conn[CK_TIMEOUT_MS], DEFAULT_TIMEOUT_MS);
    d->lim.max_gap = (unsigned)param_int(&dev_conn[CK_MAX_GAP], DEFAULT_MAX_GAP);
    d->lim.max_regs = (unsigned)param_int(&dev_conn[CK_MAX_REGS], SMP_MB_MAX_READ_REGS);
    d->lim.max_bits = (unsigned)param_int(&dev_conn[CK_MAX_BITS], SMP_MB_MAX_READ_BITS);
    d->ntags = ntags;
    d->tags = calloc(ntags ? ntags : 1, sizeof(*d->tags));
    d->spans = calloc(ntags ? ntags : 1, sizeof(*d->spans));
    if (d->tags == NULL || d->spans == NULL) {
        device_destroy(d);
        return NULL;
    }

    size_t nraw = 0, nstr = 0;
    for (size_t i = 0; i < ntags; i++) {
        const smp_tag_t *st = &tags[i];
        const smp_param_t *p = st->params;
        mb_tag_t *t = &d->tags[i];
        /* check_tag has validated all of this; re-check what would make us index out of
         * bounds rather than trust it. */
        if (p == NULL || !p[TK_TABLE].set || p[TK_TABLE].i < 0 || p[TK_TABLE].i >= SMP_MB_NTABLES ||
            !p[TK_ADDRESS].set || p[TK_ADDRESS].i < 0 || p[TK_ADDRESS].i > 65535) {
            MB_LOG(log_ctx, SMP_LOG_ERROR, "tag %s: invalid table or address", st->name);
            device_destroy(d);
            return NULL;
        }
        int64_t order = param_int(&p[TK_ORDER], SMP_MB_ABCD);
        int64_t bit = param_int(&p[TK_BIT], -1);
        t->name = st->name;
        t->type = (uint8_t)st->type;
        t->writable = st->writable;
        t->table = (uint8_t)p[TK_TABLE].i;
        t->address = (uint16_t)p[TK_ADDRESS].i;
        unsigned length = (unsigned)param_int(&p[TK_LENGTH], 0);
        bool bits = smp_mb_table_is_bits(t->table);
        unsigned count = bits ? 1 : smp_mb_type_regs(st->type, length);
        if (count == 0 || order < 0 || order >= SMP_MB_NORDERS || bit < -1 || bit > 15 ||
            (unsigned)st->type > UINT8_MAX || (bits && st->type != SMP_TYPE_BOOL) ||
            t->address + count > 65536u) {
            MB_LOG(log_ctx, SMP_LOG_ERROR, "tag %s: invalid type, length, order or bit", st->name);
            device_destroy(d);
            return NULL;
        }
        if (nraw + count > UINT32_MAX || nstr + smp_mb_string_bufsize(count) >= NO_STR) {
            MB_LOG(log_ctx, SMP_LOG_ERROR, "tag %s: the device's tags are too large", st->name);
            device_destroy(d);
            return NULL;
        }
        t->order = (uint8_t)order;
        t->bit = (int8_t)bit;
        t->count = (uint16_t)count;
        t->raw_off = (uint32_t)nraw;
        nraw += count;
        t->str_off = NO_STR;
        if (st->type == SMP_TYPE_STRING) {
            t->str_off = (uint32_t)nstr;
            nstr += smp_mb_string_bufsize(count);
        }
        unsigned cap = bits ? d->lim.max_bits : d->lim.max_regs;
        if (count > cap) {
            MB_LOG(log_ctx, SMP_LOG_ERROR,
                   "tag %s spans %u registers but max_regs_per_request is %u: it cannot be read",
                   st->name, count, cap);
        }
        d->spans[i] = (smp_mb_span_t){
            .table = t->table, .address = t->address, .count = t->count, .isolated = false};
    }
    d->raw = calloc(nraw ? nraw : 1, sizeof(*d->raw));
    d->strs = nstr > 0 ? calloc(1, nstr) : NULL;
    if (d->raw == NULL || (nstr > 0 && d->strs == NULL)) {
        device_destroy(d);
        return NULL;
    }
    return d;
}

static int select_device(mb_device_t *d)
{
    return d->conn->open ? 0 : -ENOTCONN;
}

/* Records a link failure's text for out[].message / *message. */
static const char *link_message(mb_device_t *d, const char *what, int code)
{
    const char *why = d->conn->link.why;
    if (why[0] != '\0') {
        snprintf(d->msg, sizeof(d->msg), "%s: %s", what, why);
    } else {
        snprintf(d->msg, sizeof(d->msg), "%s: %s", what, strerror(-code));
    }
    return d->msg;
}

/* One exchange with this device on its connection, mapped for the callers. */
static mb_err_t exchange(mb_device_t *d, const smp_mb_req_t *rq, const char *what)
{
    int ex = 0;
    int timeout_ms = d->call_timeout_ms > 0 ? d->call_timeout_ms : d->timeout_ms;
    int rc =
        smp_mb_link_transact(&d->conn->link, rq, timeout_ms, d->conn->regs, d->conn->bits, &ex);
    if (rc == 0) {
        return (mb_err_t){0, 0, NULL};
    }
    if (rc == SMP_EDEVICE) {
        return (mb_err_t){SMP_EDEVICE, ex, exception_name(ex)};
    }
    const char *m = link_message(d, what, rc);
    MB_LOG(d->log_ctx, rc == -EBADMSG || rc == -EPROTO ? SMP_LOG_WARN : SMP_LOG_DEBUG,
           "fc %u %u+%u: %s", rq->fc, rq->address, rq->count, m);
    return (mb_err_t){rc, 0, m};
}

static const uint8_t read_fc[SMP_MB_NTABLES] = {
    [SMP_MB_COIL] = SMP_MB_FC_READ_COILS,
    [SMP_MB_DISCRETE_INPUT] = SMP_MB_FC_READ_DISCRETE_INPUTS,
    [SMP_MB_INPUT_REGISTER] = SMP_MB_FC_READ_INPUT_REGISTERS,
    [SMP_MB_HOLDING_REGISTER] = SMP_MB_FC_READ_HOLDING_REGISTERS,
};

/* Issues one read (FC1/2/3/4) into d->conn->bits or d->conn->regs. */
static mb_err_t read_range(mb_device_t *d, smp_mb_table_t table, uint16_t addr, uint16_t count)
{
    if ((unsigned)table >= SMP_MB_NTABLES) {
        return (mb_err_t){-EINVAL, 0, NULL};
    }
    smp_mb_req_t rq = {
        .unit = (uint8_t)d->unit_id, .fc = read_fc[table], .address = addr, .count = count};
    return exchange(d, &rq, "read");
}

/* Decodes tag t from the buffer of the last read, whose first unit is `offset` units before the
 * tag's address. */
static void decode_tag(mb_device_t *d, mb_tag_t *t, uint16_t offset, smp_reading_t *out)
{
    memset(out, 0, sizeof(*out));
    t->raw_ok = true;
    uint16_t *raw = d->raw + t->raw_off;
    if (smp_mb_table_is_bits(t->table)) {
        out->value.v.b = d->conn->bits[offset] != 0;
        raw[0] = d->conn->bits[offset];
        return;
    }
    memcpy(raw, &d->conn->regs[offset], t->count * sizeof(*raw));
    char *str = t->str_off != NO_STR ? d->strs + t->str_off : NULL;
    size_t strsize = str != NULL ? smp_mb_string_bufsize(t->count) : 0;
    int rc = smp_mb_decode_regs(&d->conn->regs[offset], t->count, t->type, t->order, t->bit, str,
                                strsize, &out->value);
    if (rc < 0) {
        out->status = rc;
        out->message = "cannot decode the registers";
    }
}

static void fail_reading(smp_reading_t *out, int code, const char *message)
{
    memset(out, 0, sizeof(*out));
    out->status = code;
    out->message = message;
}

/* True for exceptions that may be caused by what a coalesced request added (bridged gaps,
 * neighbouring tags), so reading the tags one by one can get the good ones through. */
static bool exception_may_be_range(int exception)
{
    return exception == EXC_ILLEGAL_DATA_ADDRESS || exception == EXC_ILLEGAL_DATA_VALUE;
}

/* Fails every tag of the call with link error `code` and returns it. */
static int fail_all(mb_device_t *d, smp_reading_t *out, size_t n, int code)
{
    const char *m = link_message(d, "read", code);
    for (size_t k = 0; k < n; k++) {
        fail_reading(&out[k], code, m);
    }
    return code;
}

/* Fails the tags of one request with a static text (the exception's name, or the garbled
 * reply's verdict), so several failed requests of one call each keep their own. */
static void fail_request(const smp_mb_request_t *req, const smp_mb_item_t *items,
                         smp_reading_t *out, int code, const char *m)
{
    for (size_t j = 0; j < req->nitems; j++) {
        fail_reading(&out[items[j].k], code, m);
    }
}

/* Makes d->plan the plan for idx[0..n), reusing the last one when it was made for the same
 * subset. */
static int plan_for(mb_device_t *d, const uint32_t *idx, size_t n)
{
    if (d->plan_ok && d->plan_n == n && memcmp(d->plan_idx, idx, n * sizeof *idx) == 0) {
        return 0;
    }
    d->plan_ok = false;
    int rc = smp_mb_plan_build(&d->plan, d->spans, d->ntags, idx, n, &d->lim);
    if (rc < 0) {
        return rc;
    }
    if (n > d->plan_cap) {
        uint32_t *p = realloc(d->plan_idx, n * sizeof *p);
        if (p == NULL) {
            return 0; /* the plan is good; it is just not remembered */
        }
        d->plan_idx = p;
        d->plan_cap = n;
    }
    memcpy(d->plan_idx, idx, n * sizeof *idx);
    d->plan_n = n;
    d->plan_ok = true;
    return 0;
}

static int device_read(void *dp, const uint32_t *idx, size_t n, smp_reading_t *out)
{
    mb_device_t *d = dp;
    if (d == NULL || (n > 0 && (idx == NULL || out == NULL))) {
        return -EINVAL;
    }
    if (n == 0) {
        return 0;
    }
    d->call_timeout_ms = 0; /* polls always wait the device's whole timeout */
    int rc = select_device(d);
    if (rc == 0) {
        rc = plan_for(d, idx, n);
    }
    if (rc < 0) {
        return fail_all(d, out, n, rc);
    }

    const smp_mb_plan_t *plan = &d->plan;
    for (size_t u = 0; u < plan->nunplanned; u++) {
        fail_reading(&out[plan->unplanned[u]], -E2BIG,
                     "tag does not fit in one request (max_regs_per_request)");
    }

    int requests = 0;
    for (size_t r = 0; r < plan->nreqs; r++) {
        const smp_mb_request_t *req = &plan->reqs[r];
        const smp_mb_item_t *items = &plan->items[req->first];
        mb_err_t e = read_range(d, req->table, req->address, req->count);
        requests++;

        if (e.code == 0) {
            for (size_t j = 0; j < req->nitems; j++) {
                decode_tag(d, &d->tags[idx[items[j].k]], items[j].offset, &out[items[j].k]);
            }
        } else if (e.code == -EBADMSG) {
            /* A garbled RTU reply costs this request only: the line will be drained. */
            fail_request(req, items, out, e.code, smp_mb_verdict_str(d->conn->link.verdict));
        } else if (e.code != SMP_EDEVICE) {
            return fail_all(d, out, n, e.code);
        } else if (req->nitems > 1 && exception_may_be_range(e.exception)) {
            /* A device that refuses a merged read may still serve each tag alone (it does not
             * map the bridged gap, or one tag's address is bad). Read them one by one, and
             * keep them apart from now on so the refusal does not repeat every poll. */
            MB_LOG(d->log_ctx, SMP_LOG_WARN,
                   "%s %u+%u refused (%s): reading its %zu tags one by one from now on",
                   smp_mb_table_name(req->table), req->address, req->count, e.message, req->nitems);
            for (size_t j = 0; j < req->nitems; j++) {
                uint32_t k = items[j].k;
                mb_tag_t *t = &d->tags[idx[k]];
                d->spans[idx[k]].isolated = true;
                d->plan_ok = false; /* the next read plans this tag on its own */
                mb_err_t e1 = read_range(d, t->table, t->address, t->count);
                requests++;
                if (e1.code == 0) {
                    decode_tag(d, t, 0, &out[k]);
                } else if (e1.code == SMP_EDEVICE) {
                    fail_reading(&out[k], SMP_EDEVICE, e1.message);
                } else if (e1.code == -EBADMSG) {
                    fail_reading(&out[k], e1.code, smp_mb_verdict_str(d->conn->link.verdict));
                } else {
                    return fail_all(d, out, n, e1.code);
                }
            }
        } else {
            fail_request(req, items, out, SMP_EDEVICE, e.message);
        }
    }
    return requests;
}

/* The host's deadline for this write (commands with ttl_ms; 0: none or an older host). */
static uint64_t call_deadline(void)
{
    if (host->struct_size <
            offsetof(smp_host_api_t, call_deadline_ms) + sizeof(host->call_deadline_ms) ||
        host->call_deadline_ms == NULL) {
        return 0;
    }
    return host->call_deadline_ms();
}

/* Before each request of a write: -ETIME once the deadline has passed (nothing more is
 * sent), else the response timeout shrunk to what is left of it. */
static int fit_deadline(mb_device_t *d)
{
    uint64_t dl = call_deadline();
    if (dl == 0) {
        return 0;
    }
    uint64_t now = host->monotonic_ms();
    if (now >= dl) {
        return -ETIME;
    }
    uint64_t left = dl - now;
    d->call_timeout_ms =
        left < (uint64_t)d->timeout_ms ? (int)(left < 10 ? 10 : left) : d->timeout_ms;
    return 0;
}

/* Issues the write itself: FC5 for a coil, FC3 + FC6 for a bit of a register, FC6 for one
 * register, FC16 for more. Returns the mapped outcome; sets *message for local refusals. */
static mb_err_t write_tag(mb_device_t *d, const mb_tag_t *t, const smp_value_t *in,
                          const char **message)
{
    uint16_t regs[MB_MAX_WRITE_REGS];
    smp_mb_req_t rq = {.unit = (uint8_t)d->unit_id, .address = t->address};

    /* Only what comes before the write is bounded by the deadline: once the write is sent,
     * its answer and the read-back get the device's whole timeout. */
    if (t->table == SMP_MB_COIL) {
        rq.fc = SMP_MB_FC_WRITE_SINGLE_COIL;
        rq.value = in->v.b ? 1 : 0;
    } else if (t->type == SMP_TYPE_BOOL && t->bit >= 0) {
        /* Read the register, change the bit, write it back. Another master changing the
         * register in between would be overwritten; mask write (FC22) would avoid that, but
         * few devices implement it. */
        mb_err_t e = read_range(d, SMP_MB_HOLDING_REGISTER, t->address, 1);
        if (fit_deadline(d) < 0) {
            /* The read took the time that was left: the write is not sent. */
            *message = "expired before the write was sent (the read of the register took "
                       "too long)";
            return (mb_err_t){-ETIME, 0, NULL};
        }
        if (e.code != 0) {
            return e;
        }
        rq.fc = SMP_MB_FC_WRITE_SINGLE_REGISTER;
        rq.value = smp_mb_bit_apply(d->conn->regs[0], (unsigned)t->bit, in->v.b);
    } else {
        if (t->count > MB_MAX_WRITE_REGS) {
            *message = "too many registers for one write";
            return (mb_err_t){-E2BIG, 0, NULL};
        }
        int rc = smp_mb_encode_regs(in, t->type, t->order, regs, t->count);
        if (rc < 0) {
            *message = rc == -ERANGE ? "value does not fit the tag's raw type"
                                     : "value cannot be encoded for this tag";
            return (mb_err_t){rc, 0, NULL};
        }
        if (t->count == 1) {
            rq.fc = SMP_MB_FC_WRITE_SINGLE_REGISTER;
            rq.value = regs[0];
        } else {
            rq.fc = SMP_MB_FC_WRITE_MULTIPLE_REGISTERS;
            rq.count = t->count;
            rq.regs = regs;
        }
    }
    d->call_timeout_ms = 0; /* the write and its answer get the device's whole timeout */
    mb_err_t e = exchange(d, &rq, "write");
    if (e.code == -EBADMSG) {
        /* The request went out; only the answer was garbled. */
        snprintf(d->msg, sizeof(d->msg),
                 "the reply was garbled (%s): the write may have "
                 "taken effect",
                 d->conn->link.why);
        e.message = d->msg;
        *message = d->msg;
    }
    return e;
}

static int device_write(void *dp, uint32_t ti, const smp_value_t *in, smp_reading_t *readback,
                        const char **message)
{
    mb_device_t *d = dp;
    const char *unused;
    if (message == NULL) {
        message = &unused;
    }
    *message = NULL;
    if (d == NULL || in == NULL || readback == NULL) {
        *message = "invalid arguments";
        return -EINVAL;
    }
    memset(readback, 0, sizeof(*readback));
    if (ti >= d->ntags) {
        *message = "no such tag";
        fail_reading(readback, -EINVAL, *message);
        return -EINVAL;
    }
    mb_tag_t *t = &d->tags[ti];
    /* Never write where the config did not allow it, whatever the host asks. */
    if (!t->writable || t->table == SMP_MB_DISCRETE_INPUT || t->table == SMP_MB_INPUT_REGISTER) {
        *message = "tag is not writable";
        fail_reading(readback, -EPERM, *message);
        return -EPERM;
    }
    d->call_timeout_ms = 0;
    int rc = select_device(d);
    if (rc < 0) {
        *message = link_message(d, "write", rc);
        fail_reading(readback, rc, *message);
        return rc;
    }

    if (fit_deadline(d) < 0) {
        *message = "expired before the write was sent";
        fail_reading(readback, -ETIME, *message);
        return -ETIME;
    }
    mb_err_t e = write_tag(d, t, in, message);
    if (e.code != 0) {
        if (*message == NULL) {
            *message = e.code == SMP_EDEVICE ? e.message : link_message(d, "write", e.code);
        }
        fail_reading(readback, e.code, *message);
        return e.code;
    }

    e = read_range(d, t->table, t->address, t->count);
    if (e.code == SMP_EDEVICE) {
        /* The device took the write but will not show the result: say so rather than report
         * a plain refusal, because the value may well have changed. */
        snprintf(d->msg, sizeof(d->msg), "written, but the read-back failed: %s", e.message);
        *message = d->msg;
        fail_reading(readback, SMP_EDEVICE, *message);
        return SMP_EDEVICE;
    }
    if (e.code == -EBADMSG) {
        snprintf(d->msg, sizeof(d->msg), "written, but the read-back reply was garbled: %s",
                 smp_mb_verdict_str(d->conn->link.verdict));
        *message = d->msg;
        fail_reading(readback, e.code, *message);
        return e.code;
    }
    if (e.code < 0) {
        *message = link_message(d, "read-back", e.code);
        fail_reading(readback, e.code, *message);
        return e.code;
    }
    decode_tag(d, t, 0, readback);
    if (readback->status != 0) {
        *message = readback->message;
        return readback->status;
    }
    return 0;
}

static int tag_detail(void *dp, uint32_t ti, char *where, size_t wn, char *raw, size_t rn)
{
    const mb_device_t *d = dp;
    if (d == NULL || ti >= d->ntags || where == NULL || raw == NULL || wn == 0 || rn == 0) {
        return -EINVAL;
    }
    const mb_tag_t *t = &d->tags[ti];
    if (t->count > 1) {
        snprintf(where, wn, "%s %u-%u", smp_mb_table_name(t->table), t->address,
                 t->address + t->count - 1u);
    } else if (t->bit >= 0) {
        snprintf(where, wn, "%s %u bit %d", smp_mb_table_name(t->table), t->address, t->bit);
    } else {
        snprintf(where, wn, "%s %u", smp_mb_table_name(t->table), t->address);
    }
    raw[0] = '\0';
    size_t len = 0;
    for (unsigned i = 0; t->raw_ok && i < t->count && len + 6 <= rn; i++) {
        len += (size_t)snprintf(raw + len, rn - len,
                                smp_mb_table_is_bits(t->table) ? "%s%u" : "%s%04X", i ? " " : "",
                                d->raw[t->raw_off + i]);
    }
    return 0;
}

/* ---- descriptor ----------------------------------------------------------------------------- */

static const smp_plugin_t descriptor = {
    .abi_version = SMP_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(smp_plugin_t),
    .name = "modbus",
    .version = MB_PLUGIN_VERSION,
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
    .check_device = check_device,
    .reserved = {NULL},
    .conn_stats = conn_stats,
    .tag_detail = tag_detail,
};

SMP_PLUGIN_EXPORT const smp_plugin_t *smp_plugin_entry(const smp_host_api_t *h);

SMP_PLUGIN_EXPORT const smp_plugin_t *smp_plugin_entry(const smp_host_api_t *h)
{
    /* Only fields up to `log` are needed; anything shorter is a host we cannot talk to. */
    if (h == NULL || h->abi_version != SMP_PLUGIN_ABI_VERSION ||
        h->struct_size < offsetof(smp_host_api_t, log) + sizeof(h->log) || h->log == NULL) {
        return NULL;
    }
    host = h;
    return &descriptor;
}
