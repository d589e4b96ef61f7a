/* simpul-sim: a Modbus TCP / RTU server that simulates Dumai's storm-water pumps and a street
 * of LED streetlights, for simpul's demo and integration tests.
 *
 * Every simulated device is its own Modbus unit id on one server (pumps 1..N, lights 11..),
 * so a gateway reaches them all through one shared connection. The register map and every
 * option are documented in docs/simulator.md.
 *
 * One thread, one ppoll() loop: the listening socket, every TCP client, the optional serial
 * port, and a 100 ms simulation tick. libmodbus does the Modbus work proper (modbus_reply
 * against a modbus_mapping_t per unit, modbus_reply_exception), but the simulator frames the
 * requests itself instead of calling modbus_receive(): modbus_receive() blocks until a whole
 * frame has arrived, so one client that sends half a frame would stall every other client,
 * and on RTU it only answers the single slave id of its context, while here every unit id
 * answers. Each request is also validated completely (length, quantities, byte counts)
 * before modbus_reply() sees it, because modbus_reply() answers some malformed requests by
 * sleeping for the response timeout and flushing the connection.
 */
#include "sim.h"

#include "frame.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define SIM_VERSION    "1.0.0"
#define DEFAULT_PORT   15020
#define DEFAULT_BIND   "127.0.0.1"
#define DEFAULT_PUMPS  3
#define DEFAULT_LIGHTS 8
#define TICK_NS        (100 * 1000000LL)
#define MAX_DT_S       1.0 /* a stalled process does not make pumps jump */
#define MAX_CLIENTS    64
#define MAX_RULES      32
#define MAX_UNIT       247
#define MBAP_LEN       7
#define CLIENT_BUF     1024 /* > one maximal TCP ADU (260), so a frame always fits */
#define RTU_BUF        512
#define RTU_MIN_GAP_NS (20 * 1000000LL)
#define MAX_FAULTS     16
#define MAX_DELAYED    64

typedef struct rule {
    int unit;
    int table; /* sim_table_t, or -1 for any table */
    int first, last;
    int code;
    int every; /* --delay: only every EVERY-th matching reply (1: all) */
} rule_t;

/* --fault KIND:UNIT:EVERY: every EVERY-th reply to UNIT (0: any unit) is spoiled. */
typedef enum fault_kind {
    FAULT_CRC,      /* RTU: a CRC byte flipped */
    FAULT_TRUNCATE, /* the reply cut to half its length */
    FAULT_PROTOCOL, /* MBAP: protocol id 1 */
    FAULT_UNIT,     /* the reply carries another unit id (RTU: with a valid CRC) */
    FAULT_DROP,     /* no reply: the TCP connection is closed instead */
} fault_kind_t;

typedef struct fault {
    fault_kind_t kind;
    int unit;
    int every;
} fault_t;

typedef struct options {
    const char *bind;
    int port; /* -1: no TCP */
    bool port_given;
    const char *rtu_device;
    int baud;
    char parity;
    int stop_bits;
    int pumps, lights;
    bool is_static;
    bool counter;
    const char *write_log;
    bool fail_unit[MAX_UNIT + 1];
    rule_t rules[MAX_RULES];
    int nrules;
    rule_t delays[MAX_RULES]; /* code = delay in ms */
    int ndelays;
    fault_t faults[MAX_FAULTS];
    int nfaults;
    bool rtu_tcp; /* the TCP port speaks RTU framing (a transparent serial server) */
    uint64_t seed;
    bool verbose;
} options_t;

typedef struct client {
    int fd;
    size_t len;
    uint8_t buf[CLIENT_BUF];
} client_t;

typedef struct rtu_port {
    modbus_t *ctx; /* owns the tty file descriptor */
    int fd;
    size_t len;
    bool discarding; /* after a bad frame: drop bytes until the line is silent */
    int64_t last_rx_ns;
    int64_t gap_ns;
    uint8_t buf[RTU_BUF];
} rtu_port_t;

/* A reply held back until `due_ns`: by --delay, or because it queues behind a delayed one. */
typedef struct delayed {
    int fd; /* -1: free slot */
    int64_t due_ns;
    size_t len;
    uint8_t buf[MODBUS_TCP_MAX_ADU_LENGTH];
} delayed_t;

typedef struct server {
    options_t opt;
    sim_unit_t *units[MAX_UNIT + 1]; /* by unit id; NULL = no such unit */
    int listen_fd;
    modbus_t *tcp; /* reply context: its socket is pointed at the client being answered */
    client_t *clients[MAX_CLIENTS];
    rtu_port_t rtu;
    FILE *wlog;
    sim_rng_t rng;
    bool fail_active; /* SIGUSR1 toggles whether the --fail-unit units are silent */
    /* Fault injection: replies are framed by libmodbus into cap[0], taken from cap[1], spoiled
     * or delayed, then sent. Without --fault/--delay/--rtu-tcp replies go out directly. */
    int cap[2];
    modbus_t *rtu_reply;            /* --rtu-tcp: frames RTU replies for TCP clients */
    unsigned replies[MAX_UNIT + 1]; /* replies per unit, for --fault EVERY */
    unsigned delay_hits[MAX_RULES]; /* matching replies per --delay rule, for its EVERY */
    delayed_t delayed[MAX_DELAYED]; /* FIFO: replies leave in the order they were made */
    int dhead, dcount;
} server_t;

/* A parsed request: an optional read range and an optional write range. */
typedef struct request {
    int unit;
    int fc;
    bool reads, writes;
    sim_table_t rtable, wtable;
    int raddr, rcount;
    int waddr, wcount;
    uint16_t and_mask, or_mask;            /* FC 22 */
    uint16_t wvals[MODBUS_MAX_WRITE_BITS]; /* bits as 0/1, registers raw; last, see below */
} request_t;

static volatile sig_atomic_t g_stop;
static volatile sig_atomic_t g_toggle_fail;

static void on_signal(int sig)
{
    if (sig == SIGUSR1) {
        g_toggle_fail = 1;
    } else {
        g_stop = 1;
    }
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("simpul-sim: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static void vlog(const server_t *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void vlog(const server_t *s, const char *fmt, ...)
{
    if (!s->opt.verbose) {
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    fputs("simpul-sim: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static unsigned be16(const uint8_t *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

/* ---- Options ---- */

static long parse_long(const char *opt, const char *s, long lo, long hi)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 0);
    if (errno || end == s || *end || v < lo || v > hi) {
        die("%s: expected an integer in %ld..%ld, got '%s'", opt, lo, hi, s);
    }
    return v;
}

static int parse_table(const char *s, size_t n)
{
    static const struct {
        const char *name;
        int table;
    } names[] = {
        {"coil", SIM_COIL},
        {"discrete_input", SIM_DISCRETE_INPUT},
        {"input_register", SIM_INPUT_REGISTER},
        {"holding_register", SIM_HOLDING_REGISTER},
        {"any", -1},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strlen(names[i].name) == n && strncmp(names[i].name, s, n) == 0) {
            return names[i].table;
        }
    }
    return -2;
}

/* UNIT:TABLE:FIRST[-LAST][:CODE] for --exception; --delay uses the same shape with the delay
 * in ms as its CODE (required there). */
static void parse_rule_as(const char *opt, rule_t *rules, int *nrules, const char *spec,
                          long code_max, bool code_required)
{
    if (*nrules == MAX_RULES) {
        die("%s: at most %d rules", opt, MAX_RULES);
    }
    rule_t *r = &rules[*nrules];
    char buf[128];
    if (strlen(spec) >= sizeof buf) {
        die("%s: '%s' is too long", opt, spec);
    }
    strcpy(buf, spec);
    char *unit = buf, *table = strchr(unit, ':');
    if (!table) {
        die("%s: expected UNIT:TABLE:FIRST[-LAST]:..., got '%s'", opt, spec);
    }
    *table++ = '\0';
    char *range = strchr(table, ':');
    if (!range) {
        die("%s: expected UNIT:TABLE:FIRST[-LAST]:..., got '%s'", opt, spec);
    }
    *range++ = '\0';
    char *code = strchr(range, ':');
    if (code) {
        *code++ = '\0';
    } else if (code_required) {
        die("%s: expected UNIT:TABLE:FIRST[-LAST]:MS[:EVERY], got '%s'", opt, spec);
    }
    char *every = code_required && code ? strchr(code, ':') : NULL;
    if (every) {
        *every++ = '\0';
    }
    char *last = strchr(range, '-');
    if (last) {
        *last++ = '\0';
    }
    char what[64];
    snprintf(what, sizeof what, "%s unit", opt);
    r->unit = (int)parse_long(what, unit, 1, MAX_UNIT);
    r->table = parse_table(table, strlen(table));
    if (r->table == -2) {
        die("%s: unknown table '%s' (coil, discrete_input, input_register, "
            "holding_register, any)",
            opt, table);
    }
    snprintf(what, sizeof what, "%s first address", opt);
    r->first = (int)parse_long(what, range, 0, 65535);
    snprintf(what, sizeof what, "%s last address", opt);
    r->last = last ? (int)parse_long(what, last, r->first, 65535) : r->first;
    snprintf(what, sizeof what, "%s %s", opt, code_required ? "delay" : "code");
    r->code = code ? (int)parse_long(what, code, 1, code_max) : SIM_EX_DEVICE_FAILURE;
    snprintf(what, sizeof what, "%s every", opt);
    r->every = every ? (int)parse_long(what, every, 1, 1000000) : 1;
    (*nrules)++;
}

static void parse_rule(options_t *o, const char *spec)
{
    parse_rule_as("--exception", o->rules, &o->nrules, spec, MODBUS_EXCEPTION_MAX - 1, false);
}

/* KIND:UNIT:EVERY */
static void parse_fault(options_t *o, const char *spec)
{
    static const char *const kinds[] = {[FAULT_CRC] = "crc",
                                        [FAULT_TRUNCATE] = "truncate",
                                        [FAULT_PROTOCOL] = "protocol",
                                        [FAULT_UNIT] = "unit",
                                        [FAULT_DROP] = "drop"};
    if (o->nfaults == MAX_FAULTS) {
        die("--fault: at most %d faults", MAX_FAULTS);
    }
    const char *c1 = strchr(spec, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
    if (!c2) {
        die("--fault: expected KIND:UNIT:EVERY, got '%s'", spec);
    }
    fault_t *f = &o->faults[o->nfaults];
    size_t kn = (size_t)(c1 - spec);
    int kind = -1;
    for (int k = 0; k < (int)(sizeof kinds / sizeof kinds[0]); k++) {
        if (strlen(kinds[k]) == kn && strncmp(kinds[k], spec, kn) == 0) {
            kind = k;
        }
    }
    if (kind < 0) {
        die("--fault: unknown kind in '%s' (crc, truncate, protocol, unit, drop)", spec);
    }
    char unit[16];
    size_t un = (size_t)(c2 - c1 - 1);
    if (un == 0 || un >= sizeof unit) {
        die("--fault: bad unit in '%s'", spec);
    }
    memcpy(unit, c1 + 1, un);
    unit[un] = '\0';
    f->kind = (fault_kind_t)kind;
    f->unit = (int)parse_long("--fault unit", unit, 0, MAX_UNIT);
    f->every = (int)parse_long("--fault every", c2 + 1, 1, 1000000);
    o->nfaults++;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: simpul-sim [options]\n"
            "Simulates Dumai's storm-water pumps (units 1..) and streetlights (units 11..)\n"
            "as a Modbus TCP and/or RTU server. Register map: docs/simulator.md.\n"
            "\n"
            "  --port P            TCP port (default %d); with --rtu, also serve TCP\n"
            "  --bind ADDR         TCP address to listen on (default %s)\n"
            "  --rtu DEV           serve Modbus RTU on the tty DEV (TCP only if --port too)\n"
            "  --baud N            RTU baud rate (default 9600)\n"
            "  --parity N|E|O      RTU parity (default N)\n"
            "  --stop-bits 1|2     RTU stop bits (default 1)\n"
            "  --pumps N           number of pumps, units 1..N (0..%d, default %d)\n"
            "  --lights N          number of lights, units 11..10+N (0..%d, default %d)\n"
            "  --static            freeze the simulation: values change only when written\n"
            "  --counter           the heartbeat (input registers 30-31) counts reads instead\n"
            "                      of time: every read request covering it adds one\n"
            "  --write-log FILE    append one line per write request received, flushed\n"
            "  --fail-unit N       unit N never answers (repeatable); SIGUSR1 toggles this\n"
            "  --exception SPEC    UNIT:TABLE:FIRST[-LAST][:CODE]: answer requests touching\n"
            "                      those addresses with exception CODE (default 4);\n"
            "                      TABLE is coil, discrete_input, input_register,\n"
            "                      holding_register or any (repeatable)\n"
            "  --delay SPEC        UNIT:TABLE:FIRST[-LAST]:MS[:EVERY]: answer requests\n"
            "                      touching those addresses MS ms late (only every\n"
            "                      EVERY-th of them, default all; repeatable)\n"
            "  --fault SPEC        KIND:UNIT:EVERY: spoil every EVERY-th reply to UNIT\n"
            "                      (0 = any unit); KIND is crc, truncate, protocol, unit\n"
            "                      or drop (repeatable)\n"
            "  --rtu-tcp           the TCP port speaks RTU framing with CRC, like a\n"
            "                      transparent serial server (absent units stay silent)\n"
            "  --seed N            noise generator seed (default 1)\n"
            "  -v, --verbose       log every request to stderr\n"
            "  -h, --help          this help\n"
            "  -V, --version       print the version\n",
            DEFAULT_PORT, DEFAULT_BIND, SIM_MAX_PUMPS, DEFAULT_PUMPS, SIM_MAX_LIGHTS,
            DEFAULT_LIGHTS);
}

static void parse_options(options_t *o, int argc, char **argv)
{
    enum {
        OPT_PORT = 256,
        OPT_BIND,
        OPT_RTU,
        OPT_BAUD,
        OPT_PARITY,
        OPT_STOP,
        OPT_PUMPS,
        OPT_LIGHTS,
        OPT_STATIC,
        OPT_COUNTER,
        OPT_WLOG,
        OPT_FAIL,
        OPT_EXCEPTION,
        OPT_SEED,
        OPT_DELAY,
        OPT_FAULT,
        OPT_RTU_TCP,
    };
    static const struct option longopts[] = {
        {"port", required_argument, NULL, OPT_PORT},
        {"bind", required_argument, NULL, OPT_BIND},
        {"rtu", required_argument, NULL, OPT_RTU},
        {"baud", required_argument, NULL, OPT_BAUD},
        {"parity", required_argument, NULL, OPT_PARITY},
        {"stop-bits", required_argument, NULL, OPT_STOP},
        {"pumps", required_argument, NULL, OPT_PUMPS},
        {"lights", required_argument, NULL, OPT_LIGHTS},
        {"static", no_argument, NULL, OPT_STATIC},
        {"counter", no_argument, NULL, OPT_COUNTER},
        {"write-log", required_argument, NULL, OPT_WLOG},
        {"fail-unit", required_argument, NULL, OPT_FAIL},
        {"exception", required_argument, NULL, OPT_EXCEPTION},
        {"seed", required_argument, NULL, OPT_SEED},
        {"delay", required_argument, NULL, OPT_DELAY},
        {"fault", required_argument, NULL, OPT_FAULT},
        {"rtu-tcp", no_argument, NULL, OPT_RTU_TCP},
        {"verbose", no_argument, NULL, 'v'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };

    memset(o, 0, sizeof *o);
    o->bind = DEFAULT_BIND;
    o->port = DEFAULT_PORT;
    o->baud = 9600;
    o->parity = 'N';
    o->stop_bits = 1;
    o->pumps = DEFAULT_PUMPS;
    o->lights = DEFAULT_LIGHTS;
    o->seed = 1;

    int c;
    while ((c = getopt_long(argc, argv, "vhV", longopts, NULL)) != -1) {
        switch (c) {
        case OPT_PORT:
            o->port = (int)parse_long("--port", optarg, 1, 65535);
            o->port_given = true;
            break;
        case OPT_BIND:
            o->bind = optarg;
            break;
        case OPT_RTU:
            o->rtu_device = optarg;
            break;
        case OPT_BAUD:
            o->baud = (int)parse_long("--baud", optarg, 300, 4000000);
            break;
        case OPT_PARITY:
            if (strlen(optarg) != 1 || !strchr("NEO", optarg[0])) {
                die("--parity: expected N, E or O, got '%s'", optarg);
            }
            o->parity = optarg[0];
            break;
        case OPT_STOP:
            o->stop_bits = (int)parse_long("--stop-bits", optarg, 1, 2);
            break;
        case OPT_PUMPS:
            o->pumps = (int)parse_long("--pumps", optarg, 0, SIM_MAX_PUMPS);
            break;
        case OPT_LIGHTS:
            o->lights = (int)parse_long("--lights", optarg, 0, SIM_MAX_LIGHTS);
            break;
        case OPT_STATIC:
            o->is_static = true;
            break;
        case OPT_COUNTER:
            o->counter = true;
            break;
        case OPT_WLOG:
            o->write_log = optarg;
            break;
        case OPT_FAIL:
            o->fail_unit[parse_long("--fail-unit", optarg, 1, MAX_UNIT)] = true;
            break;
        case OPT_EXCEPTION:
            parse_rule(o, optarg);
            break;
        case OPT_SEED:
            o->seed = (uint64_t)parse_long("--seed", optarg, 0, LONG_MAX);
            break;
        case OPT_DELAY:
            parse_rule_as("--delay", o->delays, &o->ndelays, optarg, 600000, true);
            break;
        case OPT_FAULT:
            parse_fault(o, optarg);
            break;
        case OPT_RTU_TCP:
            o->rtu_tcp = true;
            break;
        case 'v':
            o->verbose = true;
            break;
        case 'h':
            usage(stdout);
            exit(0);
        case 'V':
            printf("simpul-sim %s (libmodbus %s)\n", SIM_VERSION, LIBMODBUS_VERSION_STRING);
            exit(0);
        default:
            usage(stderr);
            exit(2);
        }
    }
    if (optind < argc) {
        die("unexpected argument '%s' (see --help)", argv[optind]);
    }
    if (o->rtu_device && !o->port_given) {
        o->port = -1; /* --rtu alone serves only the tty */
    }
}

/* ---- Request handling ---- */

static sim_table_t table_of_fc(int fc)
{
    switch (fc) {
    case MODBUS_FC_READ_COILS:
    case MODBUS_FC_WRITE_SINGLE_COIL:
    case MODBUS_FC_WRITE_MULTIPLE_COILS:
        return SIM_COIL;
    case MODBUS_FC_READ_DISCRETE_INPUTS:
        return SIM_DISCRETE_INPUT;
    case MODBUS_FC_READ_INPUT_REGISTERS:
        return SIM_INPUT_REGISTER;
    default:
        return SIM_HOLDING_REGISTER;
    }
}

/* Checks a PDU completely and fills rq. Returns 0, or the exception code to answer with. */
static int parse_pdu(const uint8_t *pdu, size_t len, request_t *rq)
{
    rq->fc = pdu[0];
    switch (rq->fc) {
    case MODBUS_FC_READ_COILS:
    case MODBUS_FC_READ_DISCRETE_INPUTS:
    case MODBUS_FC_READ_HOLDING_REGISTERS:
    case MODBUS_FC_READ_INPUT_REGISTERS: {
        if (len != 5) {
            return SIM_EX_ILLEGAL_VALUE;
        }
        int max = rq->fc <= MODBUS_FC_READ_DISCRETE_INPUTS ? MODBUS_MAX_READ_BITS
                                                           : MODBUS_MAX_READ_REGISTERS;
        rq->reads = true;
        rq->rtable = table_of_fc(rq->fc);
        rq->raddr = (int)be16(pdu + 1);
        rq->rcount = (int)be16(pdu + 3);
        return rq->rcount >= 1 && rq->rcount <= max ? 0 : SIM_EX_ILLEGAL_VALUE;
    }
    case MODBUS_FC_WRITE_SINGLE_COIL:
    case MODBUS_FC_WRITE_SINGLE_REGISTER: {
        if (len != 5) {
            return SIM_EX_ILLEGAL_VALUE;
        }
        unsigned v = be16(pdu + 3);
        rq->writes = true;
        rq->wtable = table_of_fc(rq->fc);
        rq->waddr = (int)be16(pdu + 1);
        rq->wcount = 1;
        if (rq->fc == MODBUS_FC_WRITE_SINGLE_COIL) {
            if (v != 0 && v != 0xFF00) {
                return SIM_EX_ILLEGAL_VALUE;
            }
            v = v ? 1 : 0;
        }
        rq->wvals[0] = (uint16_t)v;
        return 0;
    }
    case MODBUS_FC_WRITE_MULTIPLE_COILS:
    case MODBUS_FC_WRITE_MULTIPLE_REGISTERS: {
        if (len < 6) {
            return SIM_EX_ILLEGAL_VALUE;
        }
        bool bits = rq->fc == MODBUS_FC_WRITE_MULTIPLE_COILS;
        int n = (int)be16(pdu + 3);
        size_t bc = pdu[5];
        int max = bits ? MODBUS_MAX_WRITE_BITS : MODBUS_MAX_WRITE_REGISTERS;
        if (n < 1 || n > max || bc != (size_t)(bits ? (n + 7) / 8 : 2 * n) || len != 6 + bc) {
            return SIM_EX_ILLEGAL_VALUE;
        }
        rq->writes = true;
        rq->wtable = table_of_fc(rq->fc);
        rq->waddr = (int)be16(pdu + 1);
        rq->wcount = n;
        for (int i = 0; i < n; i++) {
            rq->wvals[i] = bits ? (uint16_t)((pdu[6 + i / 8] >> (i % 8)) & 1)
                                : (uint16_t)be16(pdu + 6 + 2 * i);
        }
        return 0;
    }
    case MODBUS_FC_MASK_WRITE_REGISTER:
        if (len != 7) {
            return SIM_EX_ILLEGAL_VALUE;
        }
        rq->writes = true;
        rq->wtable = SIM_HOLDING_REGISTER;
        rq->waddr = (int)be16(pdu + 1);
        rq->wcount = 1;
        rq->and_mask = (uint16_t)be16(pdu + 3);
        rq->or_mask = (uint16_t)be16(pdu + 5);
        return 0; /* wvals[0] is computed from the register when it is known to exist */
    case MODBUS_FC_WRITE_AND_READ_REGISTERS: {
        if (len < 10) {
            return SIM_EX_ILLEGAL_VALUE;
        }
        int nr = (int)be16(pdu + 3), nw = (int)be16(pdu + 7);
        size_t bc = pdu[9];
        if (nr < 1 || nr > MODBUS_MAX_WR_READ_REGISTERS || nw < 1 ||
            nw > MODBUS_MAX_WR_WRITE_REGISTERS || bc != (size_t)(2 * nw) || len != 10 + bc) {
            return SIM_EX_ILLEGAL_VALUE;
        }
        rq->reads = rq->writes = true;
        rq->rtable = rq->wtable = SIM_HOLDING_REGISTER;
        rq->raddr = (int)be16(pdu + 1);
        rq->rcount = nr;
        rq->waddr = (int)be16(pdu + 5);
        rq->wcount = nw;
        for (int i = 0; i < nw; i++) {
            rq->wvals[i] = (uint16_t)be16(pdu + 10 + 2 * i);
        }
        return 0;
    }
    case MODBUS_FC_REPORT_SLAVE_ID:
        return len == 1 ? 0 : SIM_EX_ILLEGAL_VALUE;
    default:
        return SIM_EX_ILLEGAL_FUNCTION;
    }
}

static bool overlaps(int a_first, int a_count, int b_first, int b_last)
{
    return a_first <= b_last && a_first + a_count - 1 >= b_first;
}

static const rule_t *match_in(const rule_t *rules, int n, const request_t *rq)
{
    for (int i = 0; i < n; i++) {
        const rule_t *r = &rules[i];
        if (r->unit != rq->unit) {
            continue;
        }
        if (rq->reads && (r->table < 0 || r->table == (int)rq->rtable) &&
            overlaps(rq->raddr, rq->rcount, r->first, r->last)) {
            return r;
        }
        if (rq->writes && (r->table < 0 || r->table == (int)rq->wtable) &&
            overlaps(rq->waddr, rq->wcount, r->first, r->last)) {
            return r;
        }
    }
    return NULL;
}

static const rule_t *match_rule(const server_t *s, const request_t *rq)
{
    return match_in(s->opt.rules, s->opt.nrules, rq);
}

static bool in_table(const sim_unit_t *u, sim_table_t t, int addr, int count)
{
    int start, nb;
    smp__sim_table_range(u, t, &start, &nb);
    return addr >= start && addr + count <= start + nb;
}

/* The table with the write applied, for smp__sim_unit_check_write(). Also completes an FC 22
 * request, whose value depends on the register's present contents. */
static void propose_write(const sim_unit_t *u, request_t *rq, uint16_t *proposed)
{
    int start, nb;
    smp__sim_table_range(u, rq->wtable, &start, &nb);
    for (int i = 0; i < nb; i++) {
        proposed[i] = rq->wtable == SIM_COIL ? u->map->tab_bits[i] : u->map->tab_registers[i];
    }
    if (rq->fc == MODBUS_FC_MASK_WRITE_REGISTER) {
        uint16_t cur = proposed[rq->waddr - start];
        rq->wvals[0] = (uint16_t)((cur & rq->and_mask) | (rq->or_mask & ~rq->and_mask));
    }
    for (int i = 0; i < rq->wcount; i++) {
        proposed[rq->waddr - start + i] = rq->wvals[i];
    }
}

static void log_write(server_t *s, const request_t *rq, const char *result)
{
    if (!s->wlog) {
        return;
    }
    /* "UNIT FC ADDRESS N V1 .. VN RESULT"; FC 22 logs its AND and OR masks as the values. */
    if (rq->fc == MODBUS_FC_MASK_WRITE_REGISTER) {
        fprintf(s->wlog, "%d %d %d 2 %u %u", rq->unit, rq->fc, rq->waddr, rq->and_mask,
                rq->or_mask);
    } else {
        fprintf(s->wlog, "%d %d %d %d", rq->unit, rq->fc, rq->waddr, rq->wcount);
        for (int i = 0; i < rq->wcount; i++) {
            fprintf(s->wlog, " %u", rq->wvals[i]);
        }
    }
    fprintf(s->wlog, " %s\n", result);
    fflush(s->wlog);
}

/* Answers one complete, CRC-checked (RTU) or length-checked (TCP) frame. `adu` holds the frame
 * followed by zeroed slack, because modbus_reply() reads a few header bytes at fixed offsets
 * whatever the function. Returns -1 when the answer could not be sent (TCP: drop the client). */
static int handle_frame(server_t *s, modbus_t *ctx, bool rtu, const uint8_t *adu, int adu_len,
                        int unit, const uint8_t *pdu, size_t pdu_len)
{
    request_t rq;
    /* wvals (4 KB) is filled by parse_pdu as far as it is used: not worth clearing. */
    memset(&rq, 0, offsetof(request_t, wvals));
    rq.unit = unit;
    int ex = parse_pdu(pdu, pdu_len, &rq);
    if (ex) {
        rq.reads = rq.writes = false; /* malformed: nothing to log as a write */
    }
    sim_unit_t *u = unit >= 1 && unit <= MAX_UNIT ? s->units[unit] : NULL;
    char result[32];

    if (!u) {
        /* On a serial bus nobody answers for an absent unit; a TCP gateway says so. */
        if (rtu) {
            vlog(s, "unit %d fc %d: no such unit, no answer", unit, rq.fc);
            if (rq.writes) {
                log_write(s, &rq, "noreply");
            }
            return 0;
        }
        ex = SIM_EX_GATEWAY_TARGET;
    } else if (s->opt.fail_unit[unit] && s->fail_active) {
        vlog(s, "unit %d fc %d: --fail-unit, no answer", unit, rq.fc);
        if (rq.writes) {
            log_write(s, &rq, "noreply");
        }
        return 0;
    } else if (!ex) {
        const rule_t *r = match_rule(s, &rq);
        uint16_t proposed[64];
        if (r) {
            ex = r->code;
        } else if ((rq.reads && !in_table(u, rq.rtable, rq.raddr, rq.rcount)) ||
                   (rq.writes && !in_table(u, rq.wtable, rq.waddr, rq.wcount))) {
            ex = SIM_EX_ILLEGAL_ADDRESS;
        } else if (rq.writes) {
            propose_write(u, &rq, proposed);
            ex = smp__sim_unit_check_write(u, rq.wtable, proposed, !s->opt.is_static);
        }
    }

    /* The write log line is flushed before the answer leaves, so a client holding its
     * confirmation always finds the line in the file. */
    int rc;
    if (ex) {
        snprintf(result, sizeof result, "exception:%d", ex);
        if (rq.writes) {
            log_write(s, &rq, result);
        }
        rc = modbus_reply_exception(ctx, adu, (unsigned)ex);
    } else {
        snprintf(result, sizeof result, "ok");
        if (rq.writes) {
            log_write(s, &rq, result);
        }
        if (s->opt.counter && rq.reads && rq.rtable == SIM_INPUT_REGISTER &&
            overlaps(rq.raddr, rq.rcount, SIM_IR_HEARTBEAT, SIM_IR_HEARTBEAT + 1)) {
            smp__sim_unit_count_read(u);
        }
        /* Every check modbus_reply() would make has passed: it stores the write, then sends. */
        rc = modbus_reply(ctx, adu, adu_len, u->map);
        if (rq.writes) {
            /* The model takes the new values from the mapping, even if the answer could not
             * be sent: the device did the write. */
            smp__sim_unit_after_write(u, rq.wtable, !s->opt.is_static);
        }
    }
    vlog(s, "unit %d fc %d %s %d+%d -> %s", unit, rq.fc, rq.writes ? "write" : "read",
         rq.writes ? rq.waddr : rq.raddr, rq.writes ? rq.wcount : rq.rcount, result);
    if (rc < 0) {
        vlog(s, "reply to unit %d fc %d not sent: %s", unit, rq.fc, modbus_strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- Fault injection (--fault, --delay, --rtu-tcp) ---- */

static bool capturing(const server_t *s)
{
    return s->cap[0] >= 0;
}

/* Writes a whole reply to a client or the tty (both non-blocking; replies are small). */
static int send_all(int fd, const uint8_t *buf, size_t len)
{
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(fd, buf + off, len - off);
        if (n > 0) {
            off += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            if (poll(&p, 1, 1000) <= 0) {
                return -1;
            }
        } else {
            return -1;
        }
    }
    return 0;
}

/* Takes the reply libmodbus framed into cap[0]. */
static size_t take_captured(server_t *s, uint8_t *buf, size_t cap)
{
    size_t len = 0;
    for (;;) {
        ssize_t n = read(s->cap[1], buf + len, cap - len);
        if (n <= 0 || (len += (size_t)n) == cap) {
            return len;
        }
    }
}

/* Spoils a reply as the --fault rules say. Returns false when the connection is to be dropped
 * instead of answered. */
static bool apply_faults(server_t *s, int unit, bool rtu, uint8_t *buf, size_t *len)
{
    unsigned nth = ++s->replies[unit];
    for (int i = 0; i < s->opt.nfaults; i++) {
        const fault_t *f = &s->opt.faults[i];
        if ((f->unit != 0 && f->unit != unit) || nth % (unsigned)f->every != 0) {
            continue;
        }
        vlog(s, "unit %d: fault %d on reply %u", unit, (int)f->kind, nth);
        switch (f->kind) {
        case FAULT_CRC:
            if (rtu && *len >= 4) {
                buf[*len - 1] ^= 0xFF;
            }
            break;
        case FAULT_TRUNCATE:
            *len = *len > 1 ? *len / 2 : *len;
            break;
        case FAULT_PROTOCOL:
            if (!rtu && *len >= MBAP_LEN) {
                buf[3] = 1;
            }
            break;
        case FAULT_UNIT:
            if (rtu && *len >= 4) {
                buf[0] = (uint8_t)(unit + 1);
                uint16_t crc = smp_mb_crc16(buf, *len - 2);
                buf[*len - 2] = (uint8_t)(crc & 0xFF);
                buf[*len - 1] = (uint8_t)(crc >> 8);
            } else if (!rtu && *len >= MBAP_LEN) {
                buf[6] = (uint8_t)(unit + 1);
            }
            break;
        case FAULT_DROP:
            return false;
        }
    }
    return true;
}

/* Holds a reply back for `ms`, and never lets it overtake one held back before it: a device
 * that answers late answers everything after that late too, in order. */
static void queue_delayed(server_t *s, int fd, const uint8_t *buf, size_t len, int ms)
{
    if (s->dcount == MAX_DELAYED) {
        vlog(s, "delayed reply dropped: %d replies already held back", MAX_DELAYED);
        return;
    }
    int64_t due = now_ns() + (int64_t)ms * 1000000LL;
    if (s->dcount > 0) {
        int64_t last = s->delayed[(s->dhead + s->dcount - 1) % MAX_DELAYED].due_ns;
        due = due > last ? due : last;
    }
    delayed_t *d = &s->delayed[(s->dhead + s->dcount) % MAX_DELAYED];
    d->fd = fd;
    d->due_ns = due;
    d->len = len;
    memcpy(d->buf, buf, len);
    s->dcount++;
}

/* Sends the held-back replies that are due; returns the next due time (INT64_MAX: none). */
static int64_t send_delayed(server_t *s, int64_t now)
{
    while (s->dcount > 0) {
        delayed_t *d = &s->delayed[s->dhead];
        if (d->due_ns > now) {
            return d->due_ns;
        }
        if (d->fd >= 0) {
            send_all(d->fd, d->buf, d->len); /* a client gone meanwhile: nothing to do */
        }
        s->dhead = (s->dhead + 1) % MAX_DELAYED;
        s->dcount--;
    }
    return INT64_MAX;
}

static void cancel_delayed(server_t *s, int fd)
{
    for (int i = 0; i < s->dcount; i++) {
        delayed_t *d = &s->delayed[(s->dhead + i) % MAX_DELAYED];
        if (d->fd == fd) {
            d->fd = -1;
        }
    }
}

/* Answers a frame that came from fd (a TCP client or the tty) with ctx, through the fault
 * injection when it is on. Returns -1 to drop the TCP client. */
static int answer(server_t *s, int fd, modbus_t *ctx, bool rtu, const uint8_t *adu, int adu_len,
                  int unit, const uint8_t *pdu, size_t pdu_len)
{
    if (!capturing(s)) {
        return handle_frame(s, ctx, rtu, adu, adu_len, unit, pdu, pdu_len);
    }
    int saved = modbus_get_socket(ctx);
    modbus_set_socket(ctx, s->cap[0]);
    int rc = handle_frame(s, ctx, rtu, adu, adu_len, unit, pdu, pdu_len);
    modbus_set_socket(ctx, saved);
    uint8_t buf[MODBUS_TCP_MAX_ADU_LENGTH];
    size_t len = take_captured(s, buf, sizeof buf);
    if (rc < 0 || len == 0 || unit < 0 || unit > MAX_UNIT) {
        return rc; /* no answer: an absent or failed unit */
    }
    if (!apply_faults(s, unit, rtu, buf, &len)) {
        return fd == s->rtu.fd ? 0 : -1;
    }
    request_t rq;
    memset(&rq, 0, offsetof(request_t, wvals));
    rq.unit = unit;
    parse_pdu(pdu, pdu_len, &rq);
    const rule_t *d = match_in(s->opt.delays, s->opt.ndelays, &rq);
    if (d && ++s->delay_hits[d - s->opt.delays] % (unsigned)d->every != 0) {
        d = NULL;
    }
    if (d) {
        vlog(s, "unit %d fc %d: reply delayed %d ms", unit, rq.fc, d->code);
    }
    if (d || s->dcount > 0) {
        queue_delayed(s, fd, buf, len, d ? d->code : 0);
        return 0;
    }
    return send_all(fd, buf, len) < 0 && fd != s->rtu.fd ? -1 : 0;
}

/* ---- TCP ---- */

static int open_listener(const char *bind_addr, int port)
{
    struct addrinfo hints = {0}, *res = NULL;
    char service[8];
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICHOST | AI_NUMERICSERV;
    snprintf(service, sizeof service, "%d", port);
    int rc = getaddrinfo(bind_addr, service, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "simpul-sim: --bind %s: %s\n", bind_addr, gai_strerror(rc));
        return -1;
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "simpul-sim: socket: %s\n", strerror(errno));
        freeaddrinfo(res);
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 64) < 0) {
        fprintf(stderr, "simpul-sim: listen on %s:%d: %s\n", bind_addr, port, strerror(errno));
        close(fd);
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    return fd;
}

static void client_close(server_t *s, int slot)
{
    client_t *c = s->clients[slot];
    vlog(s, "client %d disconnected", c->fd);
    cancel_delayed(s, c->fd);
    close(c->fd);
    free(c);
    s->clients[slot] = NULL;
}

static void accept_clients(server_t *s)
{
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
                errno != ECONNABORTED) {
                fprintf(stderr, "simpul-sim: accept: %s\n", strerror(errno));
            }
            return;
        }
        int slot = -1;
        for (int i = 0; i < MAX_CLIENTS; i++) {
            if (!s->clients[i]) {
                slot = i;
                break;
            }
        }
        client_t *c = slot >= 0 ? malloc(sizeof *c) : NULL;
        if (!c) {
            /* Full (or out of memory): refuse this one rather than degrade the others. */
            fprintf(stderr, "simpul-sim: refusing a client: %d clients already\n", MAX_CLIENTS);
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        c->fd = fd;
        c->len = 0;
        s->clients[slot] = c;
        vlog(s, "client %d connected", fd);
    }
}

/* Appends what the client sent to its buffer: 1 bytes came, 0 none yet, -1 drop the client. */
static int client_fill(client_t *c)
{
    ssize_t n = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (n == 0) {
        return -1;
    }
    if (n < 0) {
        return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR ? 0 : -1;
    }
    c->len += (size_t)n;
    return 1;
}

/* Reads what the client sent and answers every complete frame. Returns -1 to drop it. */
static int client_read(server_t *s, client_t *c)
{
    int got = client_fill(c);
    if (got <= 0) {
        return got;
    }

    size_t off = 0;
    while (c->len - off >= MBAP_LEN) {
        const uint8_t *f = c->buf + off;
        unsigned proto = be16(f + 2), mlen = be16(f + 4);
        /* The MBAP length covers the unit id and the PDU (1..253 bytes). Beyond that there
         * is no way to find the next frame: drop the connection, as a device would. */
        if (mlen < 2 || mlen > 1 + MODBUS_MAX_PDU_LENGTH) {
            vlog(s, "client %d: bad MBAP length %u, disconnecting", c->fd, mlen);
            return -1;
        }
        size_t flen = 6 + (size_t)mlen;
        if (c->len - off < flen) {
            break;
        }
        if (proto == 0) {
            uint8_t adu[MODBUS_TCP_MAX_ADU_LENGTH + 16] = {0};
            memcpy(adu, f, flen);
            modbus_set_socket(s->tcp, c->fd);
            if (answer(s, c->fd, s->tcp, false, adu, (int)flen, f[6], adu + MBAP_LEN,
                       flen - MBAP_LEN) < 0) {
                return -1;
            }
        } else {
            vlog(s, "client %d: protocol id %u is not Modbus, frame ignored", c->fd, proto);
        }
        off += flen;
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

/* ---- RTU ---- */

static bool crc_ok(const uint8_t *p, size_t n)
{
    if (n < 4) {
        return false;
    }
    uint16_t crc = smp_mb_crc16(p, n - 2);
    return p[n - 2] == (crc & 0xFF) && p[n - 1] == (crc >> 8);
}

/* Length of the RTU request starting at b (unit, function, ...). 0: not enough bytes yet to
 * tell; SIZE_MAX: a function whose length is not known here, framed by line silence. */
static size_t rtu_request_len(const uint8_t *b, size_t n)
{
    if (n < 2) {
        return 0;
    }
    switch (b[1]) {
    case MODBUS_FC_READ_COILS:
    case MODBUS_FC_READ_DISCRETE_INPUTS:
    case MODBUS_FC_READ_HOLDING_REGISTERS:
    case MODBUS_FC_READ_INPUT_REGISTERS:
    case MODBUS_FC_WRITE_SINGLE_COIL:
    case MODBUS_FC_WRITE_SINGLE_REGISTER:
    case 0x08: /* diagnostics, with one data word */
        return 8;
    case MODBUS_FC_WRITE_MULTIPLE_COILS:
    case MODBUS_FC_WRITE_MULTIPLE_REGISTERS:
        return n >= 7 ? 9 + (size_t)b[6] : 0;
    case MODBUS_FC_MASK_WRITE_REGISTER:
        return 10;
    case MODBUS_FC_WRITE_AND_READ_REGISTERS:
        return n >= 11 ? 13 + (size_t)b[10] : 0;
    case MODBUS_FC_READ_EXCEPTION_STATUS:
    case 0x0B: /* get comm event counter */
    case 0x0C: /* get comm event log */
    case MODBUS_FC_REPORT_SLAVE_ID:
        return 4;
    default:
        return SIZE_MAX;
    }
}

/* Answers one CRC-checked RTU frame from fd with ctx. Returns -1 to drop a TCP client. */
static int rtu_answer(server_t *s, int fd, modbus_t *ctx, const uint8_t *frame, size_t len)
{
    uint8_t adu[MODBUS_RTU_MAX_ADU_LENGTH + 16] = {0};
    memcpy(adu, frame, len);
    /* The broadcast unit 0 is not a simulated device: it finds no unit and gets no answer. */
    return answer(s, fd, ctx, true, adu, (int)len, adu[0], adu + 1, len - 3);
}

static void rtu_handle(server_t *s, const uint8_t *frame, size_t len)
{
    rtu_answer(s, s->rtu.fd, s->rtu.ctx, frame, len);
}

/* --rtu-tcp: a TCP client sends RTU frames, as through a transparent serial server. Frames are
 * delimited by the function's length (a TCP stream has no line silence); a bad CRC or an
 * unknown function discards what is buffered. Returns -1 to drop the client. */
static int client_read_rtu(server_t *s, client_t *c)
{
    int got = client_fill(c);
    if (got <= 0) {
        return got;
    }
    size_t off = 0;
    while (c->len - off >= 2) {
        size_t need = rtu_request_len(c->buf + off, c->len - off);
        if (need == 0 || (need != SIZE_MAX && need > c->len - off)) {
            break; /* wait for the rest */
        }
        if (need == SIZE_MAX || need > MODBUS_RTU_MAX_ADU_LENGTH || !crc_ok(c->buf + off, need)) {
            vlog(s, "client %d: bad RTU frame, %zu bytes discarded", c->fd, c->len - off);
            off = c->len;
            break;
        }
        if (rtu_answer(s, c->fd, s->rtu_reply, c->buf + off, need) < 0) {
            return -1;
        }
        off += need;
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

/* Frames by length where the function code tells it, so back-to-back requests need no gap;
 * a frame with a bad CRC makes the port discard everything until the line goes silent. */
static void rtu_read(server_t *s)
{
    rtu_port_t *p = &s->rtu;
    ssize_t n = read(p->fd, p->buf + p->len, sizeof p->buf - p->len);
    if (n <= 0) {
        return;
    }
    p->last_rx_ns = now_ns();
    if (p->discarding) {
        p->len = 0;
        return;
    }
    p->len += (size_t)n;
    size_t off = 0;
    while (p->len - off >= 2) {
        size_t need = rtu_request_len(p->buf + off, p->len - off);
        if (need == 0 || need == SIZE_MAX) {
            break; /* wait for more bytes, or for silence */
        }
        bool complete = need <= p->len - off;
        if (need > MODBUS_RTU_MAX_ADU_LENGTH || (complete && !crc_ok(p->buf + off, need))) {
            vlog(s, "rtu: bad frame, discarding until the line is silent");
            p->discarding = true;
            p->len = 0;
            return;
        }
        if (!complete) {
            break; /* wait for the rest */
        }
        rtu_handle(s, p->buf + off, need);
        off += need;
    }
    memmove(p->buf, p->buf + off, p->len - off);
    p->len -= off;
    if (p->len > MODBUS_RTU_MAX_ADU_LENGTH) {
        /* Bytes of an unknown function beyond the longest ADU: noise. */
        p->discarding = true;
        p->len = 0;
    }
}

/* The line has been silent for the inter-frame gap: end a discard, or take what is buffered
 * as one frame if its function code's length is not known here. */
static void rtu_silence(server_t *s)
{
    rtu_port_t *p = &s->rtu;
    if (!p->discarding && p->len >= 4 && rtu_request_len(p->buf, p->len) == SIZE_MAX &&
        crc_ok(p->buf, p->len)) {
        rtu_handle(s, p->buf, p->len);
    } else if (p->len) {
        vlog(s, "rtu: dropping %zu bytes of an incomplete frame", p->len);
    }
    p->discarding = false;
    p->len = 0;
}

static int open_rtu(server_t *s)
{
    const options_t *o = &s->opt;
    s->rtu.ctx = modbus_new_rtu(o->rtu_device, o->baud, o->parity, 8, o->stop_bits);
    if (!s->rtu.ctx) {
        fprintf(stderr, "simpul-sim: --rtu %s: %s\n", o->rtu_device, modbus_strerror(errno));
        return -1;
    }
    if (modbus_connect(s->rtu.ctx) < 0) {
        fprintf(stderr, "simpul-sim: --rtu %s: %s\n", o->rtu_device, modbus_strerror(errno));
        return -1;
    }
    s->rtu.fd = modbus_get_socket(s->rtu.ctx);
    int fl = fcntl(s->rtu.fd, F_GETFL);
    if (fl < 0 || fcntl(s->rtu.fd, F_SETFL, fl | O_NONBLOCK) < 0) {
        fprintf(stderr, "simpul-sim: --rtu %s: %s\n", o->rtu_device, strerror(errno));
        return -1;
    }
    /* Modbus RTU delimits frames by 3.5 character times of silence (1.75 ms above 19200
     * baud). Only incomplete frames and unknown functions depend on it here, so a longer gap
     * is used: a pseudo-terminal may deliver one frame in pieces a few ms apart. */
    int64_t t35 = o->baud > 19200 ? 1750000LL : 38500000000LL / o->baud; /* 3.5 x 11 bits */
    s->rtu.gap_ns = t35 > RTU_MIN_GAP_NS ? t35 : RTU_MIN_GAP_NS;
    return 0;
}

/* ---- Main loop ---- */

static void tick_all(server_t *s, double dt)
{
    for (int id = 1; id <= MAX_UNIT; id++) {
        if (s->units[id]) {
            smp__sim_unit_tick(s->units[id], dt, !s->opt.counter, &s->rng);
        }
    }
}

static int run(server_t *s, const sigset_t *wait_mask)
{
    struct pollfd fds[MAX_CLIENTS + 2];
    int slot_of[MAX_CLIENTS + 2];
    int64_t last_tick = now_ns(), next_tick = last_tick + TICK_NS;

    while (!g_stop) {
        int nfds = 0;
        if (s->listen_fd >= 0) {
            fds[nfds] = (struct pollfd){.fd = s->listen_fd, .events = POLLIN};
            slot_of[nfds++] = -1;
        }
        if (s->rtu.ctx) {
            fds[nfds] = (struct pollfd){.fd = s->rtu.fd, .events = POLLIN};
            slot_of[nfds++] = -2;
        }
        for (int i = 0; i < MAX_CLIENTS; i++) {
            if (s->clients[i]) {
                fds[nfds] = (struct pollfd){.fd = s->clients[i]->fd, .events = POLLIN};
                slot_of[nfds++] = i;
            }
        }

        int64_t now = now_ns(), deadline = next_tick;
        int64_t due = send_delayed(s, now);
        if (due < deadline) {
            deadline = due;
        }
        bool rtu_pending = s->rtu.ctx && (s->rtu.len || s->rtu.discarding);
        if (rtu_pending && s->rtu.last_rx_ns + s->rtu.gap_ns < deadline) {
            deadline = s->rtu.last_rx_ns + s->rtu.gap_ns;
        }
        int64_t wait = deadline > now ? deadline - now : 0;
        struct timespec ts = {.tv_sec = wait / 1000000000LL, .tv_nsec = wait % 1000000000LL};
        int n = ppoll(fds, (nfds_t)nfds, &ts, wait_mask);
        if (n < 0 && errno != EINTR) {
            fprintf(stderr, "simpul-sim: ppoll: %s\n", strerror(errno));
            return -1;
        }
        if (g_toggle_fail) {
            g_toggle_fail = 0;
            s->fail_active = !s->fail_active;
            printf("simpul-sim: --fail-unit units now %s\n",
                   s->fail_active ? "silent" : "answering");
            fflush(stdout);
        }
        for (int i = 0; n > 0 && i < nfds; i++) {
            if (!fds[i].revents) {
                continue;
            }
            if (slot_of[i] == -1) {
                accept_clients(s);
            } else if (slot_of[i] == -2) {
                if (fds[i].revents & (POLLERR | POLLNVAL | POLLHUP)) {
                    /* e.g. socat, which holds the other end of the pty, has exited */
                    fprintf(stderr, "simpul-sim: rtu: %s was closed or failed\n",
                            s->opt.rtu_device);
                    return -1;
                }
                rtu_read(s);
            } else if (s->clients[slot_of[i]] &&
                       (s->opt.rtu_tcp ? client_read_rtu(s, s->clients[slot_of[i]])
                                       : client_read(s, s->clients[slot_of[i]])) < 0) {
                client_close(s, slot_of[i]);
            }
        }

        now = now_ns();
        if (s->rtu.ctx && (s->rtu.len || s->rtu.discarding) &&
            now - s->rtu.last_rx_ns >= s->rtu.gap_ns) {
            rtu_silence(s);
        }
        if (now >= next_tick) {
            double dt = (double)(now - last_tick) / 1e9;
            if (!s->opt.is_static) {
                tick_all(s, dt > MAX_DT_S ? MAX_DT_S : dt);
            }
            last_tick = now;
            next_tick += TICK_NS;
            if (next_tick <= now) {
                next_tick = now + TICK_NS; /* fell behind (suspended): don't burst */
            }
        }
    }
    return 0;
}

/* The reply capture for --fault, --delay and --rtu-tcp. */
static int open_fault_injection(server_t *s)
{
    const options_t *o = &s->opt;
    if (o->nfaults == 0 && o->ndelays == 0 && !o->rtu_tcp) {
        return 0;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, s->cap) < 0) {
        fprintf(stderr, "simpul-sim: socketpair: %s\n", strerror(errno));
        return -1;
    }
    if (o->rtu_tcp) {
        /* Never connected: it only frames replies, into the capture socket. */
        s->rtu_reply = modbus_new_rtu("/dev/null", 9600, 'N', 8, 1);
        if (!s->rtu_reply) {
            fprintf(stderr, "simpul-sim: out of memory\n");
            return -1;
        }
        modbus_set_socket(s->rtu_reply, s->cap[0]);
    }
    return 0;
}

static void format_units(const server_t *s, char *buf, size_t len)
{
    const options_t *o = &s->opt;
    int n = 0;
    if (o->pumps) {
        n += snprintf(buf + n, len - (size_t)n, "pumps: units 1-%d", o->pumps);
    } else {
        n += snprintf(buf + n, len - (size_t)n, "no pumps");
    }
    if (o->lights) {
        snprintf(buf + n, len - (size_t)n, ", lights: units %d-%d", SIM_LIGHT_BASE + 1,
                 SIM_LIGHT_BASE + o->lights);
    } else {
        snprintf(buf + n, len - (size_t)n, ", no lights");
    }
}

static void server_free(server_t *s)
{
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (s->clients[i]) {
            close(s->clients[i]->fd);
            free(s->clients[i]);
        }
    }
    if (s->listen_fd >= 0) {
        close(s->listen_fd);
    }
    if (s->tcp) {
        modbus_set_socket(s->tcp, -1); /* the client sockets are closed above */
        modbus_free(s->tcp);
    }
    if (s->rtu.ctx) {
        modbus_close(s->rtu.ctx);
        modbus_free(s->rtu.ctx);
    }
    if (s->rtu_reply) {
        modbus_set_socket(s->rtu_reply, -1);
        modbus_free(s->rtu_reply);
    }
    for (int i = 0; i < 2; i++) {
        if (s->cap[i] >= 0) {
            close(s->cap[i]);
        }
    }
    for (int id = 0; id <= MAX_UNIT; id++) {
        smp__sim_unit_free(s->units[id]);
    }
    if (s->wlog) {
        fclose(s->wlog);
    }
}

int main(int argc, char **argv)
{
    static server_t srv; /* large (client buffers live in their own allocations) */
    server_t *s = &srv;
    parse_options(&s->opt, argc, argv);
    s->listen_fd = -1;
    s->fail_active = true;
    s->cap[0] = s->cap[1] = -1;
    s->rtu.fd = -1;

    s->rng.s = s->opt.seed ? s->opt.seed : 0x9E3779B97F4A7C15ULL; /* xorshift needs non-zero */
    int status = 1;

    /* Signals are blocked except while waiting in ppoll(), so a stop request can never slip in
     * between the check of g_stop and the wait. */
    sigset_t block, wait_mask;
    sigemptyset(&block);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGUSR1);
    sigprocmask(SIG_BLOCK, &block, &wait_mask);
    sigdelset(&wait_mask, SIGTERM);
    sigdelset(&wait_mask, SIGINT);
    sigdelset(&wait_mask, SIGUSR1);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    for (int i = 1; i <= s->opt.pumps; i++) {
        if (!(s->units[i] = smp__sim_unit_new(SIM_PUMP, i, i))) {
            fprintf(stderr, "simpul-sim: out of memory\n");
            goto out;
        }
    }
    for (int i = 1; i <= s->opt.lights; i++) {
        int id = SIM_LIGHT_BASE + i;
        if (!(s->units[id] = smp__sim_unit_new(SIM_LIGHT, id, i))) {
            fprintf(stderr, "simpul-sim: out of memory\n");
            goto out;
        }
    }
    if (s->opt.write_log && !(s->wlog = fopen(s->opt.write_log, "a"))) {
        fprintf(stderr, "simpul-sim: --write-log %s: %s\n", s->opt.write_log, strerror(errno));
        goto out;
    }
    if (s->opt.port > 0) {
        /* The context only frames replies: its address is never used to connect. */
        s->tcp = modbus_new_tcp("127.0.0.1", s->opt.port);
        if (!s->tcp || (s->listen_fd = open_listener(s->opt.bind, s->opt.port)) < 0) {
            goto out;
        }
    }
    if (s->opt.rtu_device && open_rtu(s) < 0) {
        goto out;
    }
    if (open_fault_injection(s) < 0) {
        goto out;
    }

    char units[96], where[320];
    format_units(s, units, sizeof units);
    if (s->opt.port > 0 && s->opt.rtu_device) {
        snprintf(where, sizeof where, "tcp %s:%d and rtu %s %d %c%d", s->opt.bind, s->opt.port,
                 s->opt.rtu_device, s->opt.baud, s->opt.parity, s->opt.stop_bits);
    } else if (s->opt.port > 0) {
        snprintf(where, sizeof where, "%s %s:%d", s->opt.rtu_tcp ? "rtu-over-tcp" : "tcp",
                 s->opt.bind, s->opt.port);
    } else {
        snprintf(where, sizeof where, "rtu %s %d 8%c%d", s->opt.rtu_device, s->opt.baud,
                 s->opt.parity, s->opt.stop_bits);
    }
    printf("simpul-sim: listening on %s (%s; %s%s)\n", where, units,
           s->opt.is_static ? "static" : "simulating", s->opt.counter ? ", counter" : "");
    fflush(stdout);

    if (run(s, &wait_mask) == 0) {
        printf("simpul-sim: stopped\n");
        status = 0;
    }
out:
    server_free(s);
    return status;
}
