/* The SNMP protocol driver plugin: SNMP v1, v2c and v3 GET and SET through net-snmp.
 *
 * net-snmp and threads. Debian builds net-snmp without --enable-reentrant, so the library's
 * global state (the session list, request ids, the USM user and engine-time tables, the
 * statistics) has no locks of its own. The driver therefore:
 *   - initialises the library once, from the entry point (the host's main thread, before any
 *     worker exists), with config files, persistent state and MIB loading all off;
 *   - uses only the single-session API (snmp_sess_*), one session per device, each used only
 *     by the device's connection worker thread;
 *   - holds one plugin-wide mutex around every net-snmp call, but never while it waits for a
 *     reply: the wait is a poll() on the session's socket outside the lock, so a silent agent
 *     delays only the devices of its own connection.
 * docs/snmp.md explains the same for integrators.
 *
 * A "connection" is one agent address (udp:HOST:PORT); every device on it has its own session
 * (its own community or v3 user). UDP has no connection to open: conn_open only checks that
 * the host resolves, and sessions open on first use and close with the connection.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <net-snmp/net-snmp-config.h>
#include <net-snmp/net-snmp-includes.h>
#include <net-snmp/library/large_fd_set.h>

#include <simpul/plugin.h>

#define SNMP_PLUGIN_VERSION "1.0.0"

static const smp_host_api_t *host;

#define SN_LOG(ctx, level, ...)                                                                    \
    do {                                                                                           \
        if (host != NULL && host->log != NULL) {                                                   \
            host->log((ctx), (level), __VA_ARGS__);                                                \
        }                                                                                          \
    } while (0)

/* Serialises every call into net-snmp (see the top of this file). */
static pthread_mutex_t lib_mu = PTHREAD_MUTEX_INITIALIZER;

/* ---- config tables ---------------------------------------------------------------------- */

enum {
    CK_HOST,
    CK_PORT,
    CK_VERSION,
    CK_COMMUNITY,
    CK_WRITE_COMMUNITY,
    CK_TIMEOUT_MS,
    CK_RETRIES,
    CK_MAX_VARBINDS,
    CK_USER,
    CK_SECURITY_LEVEL,
    CK_AUTH_PROTOCOL,
    CK_AUTH_PASSWORD,
    CK_PRIV_PROTOCOL,
    CK_PRIV_PASSWORD,
    CK_COUNT
};

enum { TK_OID, TK_COUNT };

enum { V1 = 0, V2C, V3 };
enum { SEC_NOAUTH = 0, SEC_AUTH, SEC_PRIV };
enum { AUTH_MD5 = 0, AUTH_SHA, AUTH_SHA256, AUTH_SHA512 };
enum { PRIV_DES = 0, PRIV_AES, PRIV_AES256 };

static const char *const version_choices[] = {"1", "2c", "3", NULL};
static const char *const level_choices[] = {"noAuthNoPriv", "authNoPriv", "authPriv", NULL};
static const char *const auth_choices[] = {"MD5", "SHA", "SHA-256", "SHA-512", NULL};
static const char *const priv_choices[] = {"DES", "AES", "AES-256", NULL};

#define DEFAULT_PORT         161
#define DEFAULT_TIMEOUT_MS   1000
#define DEFAULT_RETRIES      1
#define DEFAULT_MAX_VARBINDS 32

static const smp_config_key_t conn_keys[CK_COUNT + 1] = {
    [CK_HOST] = {"host", SMP_KEY_STRING, true, 0, 0, NULL, NULL,
                 "agent host name or IP address (IPv4 or IPv6)"},
    [CK_PORT] = {"port", SMP_KEY_INT, false, 1, 65535, NULL, "161", "agent UDP port"},
    [CK_VERSION] = {"version", SMP_KEY_ENUM, false, 0, 0, version_choices, "\"2c\"",
                    "SNMP version: \"1\", \"2c\" or \"3\""},
    [CK_COMMUNITY] = {"community", SMP_KEY_STRING, false, 0, 0, NULL, NULL,
                      "v1/v2c: community for GET (default \"public\")"},
    [CK_WRITE_COMMUNITY] = {"write_community", SMP_KEY_STRING, false, 0, 0, NULL, NULL,
                            "v1/v2c: community for SET (default: community)"},
    [CK_TIMEOUT_MS] = {"timeout_ms", SMP_KEY_INT, false, 10, 60000, NULL, "1000",
                       "time to wait for one reply, in ms"},
    [CK_RETRIES] = {"retries", SMP_KEY_INT, false, 0, 10, NULL, "1",
                    "requests re-sent after a timeout before the call fails"},
    [CK_MAX_VARBINDS] = {"max_varbinds_per_request", SMP_KEY_INT, false, 1, 1000, NULL, "32",
                         "most OIDs one GET may ask for (a tooBig answer halves it)"},
    [CK_USER] = {"user", SMP_KEY_STRING, false, 0, 0, NULL, NULL,
                 "v3 (required there): USM user name"},
    [CK_SECURITY_LEVEL] = {"security_level", SMP_KEY_ENUM, false, 0, 0, level_choices, NULL,
                           "v3: noAuthNoPriv, authNoPriv or authPriv (default authPriv)"},
    [CK_AUTH_PROTOCOL] = {"auth_protocol", SMP_KEY_ENUM, false, 0, 0, auth_choices, NULL,
                          "v3 authNoPriv/authPriv: MD5, SHA, SHA-256 or SHA-512 (default SHA)"},
    [CK_AUTH_PASSWORD] = {"auth_password_file", SMP_KEY_SECRET_FILE, false, 0, 0, NULL, NULL,
                          "v3 authNoPriv/authPriv: file holding the authentication password "
                          "(8 characters or more)"},
    [CK_PRIV_PROTOCOL] = {"priv_protocol", SMP_KEY_ENUM, false, 0, 0, priv_choices, NULL,
                          "v3 authPriv: DES, AES or AES-256 (default AES)"},
    [CK_PRIV_PASSWORD] = {"priv_password_file", SMP_KEY_SECRET_FILE, false, 0, 0, NULL, NULL,
                          "v3 authPriv: file holding the privacy password (8 characters or "
                          "more)"},
    [CK_COUNT] = {NULL, 0, false, 0, 0, NULL, NULL, NULL},
};

static const smp_config_key_t tag_keys[TK_COUNT + 1] = {
    [TK_OID] = {"oid", SMP_KEY_STRING, true, 0, 0, NULL, NULL,
                "numeric dotted OID of the object, with or without the leading dot, e.g. "
                "1.3.6.1.2.1.33.1.2.4.0"},
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

/* Parses a numeric dotted OID into o (at most MAX_OID_LEN sub-identifiers). Returns the
 * number of sub-identifiers, or 0 when s is not such an OID. Own parser: net-snmp's
 * read_objid would consult the MIB tree, which is off. */
static size_t oid_parse(const char *s, oid *o)
{
    size_t n = 0;
    if (s == NULL) {
        return 0;
    }
    if (*s == '.') {
        s++;
    }
    while (*s != '\0') {
        if (*s < '0' || *s > '9' || n >= MAX_OID_LEN) {
            return 0;
        }
        uint64_t v = 0;
        while (*s >= '0' && *s <= '9') {
            v = v * 10 + (uint64_t)(*s - '0');
            if (v > 0xffffffffu) {
                return 0;
            }
            s++;
        }
        o[n++] = (oid)v;
        if (*s == '.') {
            s++;
            if (*s == '\0') {
                return 0;
            }
        } else if (*s != '\0') {
            return 0;
        }
    }
    return n >= 2 ? n : 0;
}

/* ---- config checks (main thread) ---------------------------------------------------------- */

static int check_v3(const smp_param_t *conn, smp_report_fn report, void *rctx)
{
    int problems = 0;
    if (param_str(&conn[CK_USER]) == NULL || conn[CK_USER].s[0] == '\0') {
        report(rctx, NULL, "version 3 needs \"user\"");
        problems++;
    }
    int64_t level = param_int(&conn[CK_SECURITY_LEVEL], SEC_PRIV);
    static const struct {
        int key, min_level;
    } need[] = {{CK_AUTH_PASSWORD, SEC_AUTH}, {CK_PRIV_PASSWORD, SEC_PRIV}};
    static const int only_auth[] = {CK_AUTH_PROTOCOL, CK_AUTH_PASSWORD};
    static const int only_priv[] = {CK_PRIV_PROTOCOL, CK_PRIV_PASSWORD};
    for (size_t i = 0; i < 2; i++) {
        const smp_param_t *p = &conn[need[i].key];
        if (level >= need[i].min_level && !p->set) {
            report(rctx, NULL, "security_level %s needs \"%s\"", level_choices[level],
                   conn_keys[need[i].key].name);
            problems++;
        } else if (p->set && strlen(p->s) < USM_LENGTH_P_MIN) {
            /* RFC 3414 key localisation needs at least 8 characters; net-snmp refuses less. */
            report(rctx, conn_keys[need[i].key].name, "the password is shorter than %d characters",
                   USM_LENGTH_P_MIN);
            problems++;
        }
    }
    for (size_t i = 0; i < 2; i++) {
        if (level < SEC_AUTH && conn[only_auth[i]].set) {
            report(rctx, conn_keys[only_auth[i]].name,
                   "only for security_level authNoPriv or "
                   "authPriv");
            problems++;
        }
        if (level < SEC_PRIV && conn[only_priv[i]].set) {
            report(rctx, conn_keys[only_priv[i]].name, "only for security_level authPriv");
            problems++;
        }
    }
    return problems;
}

static int check_connection(const smp_param_t *conn, smp_report_fn report, void *rctx)
{
    static const int v3_only[] = {CK_USER,          CK_SECURITY_LEVEL, CK_AUTH_PROTOCOL,
                                  CK_AUTH_PASSWORD, CK_PRIV_PROTOCOL,  CK_PRIV_PASSWORD};
    static const int v12_only[] = {CK_COMMUNITY, CK_WRITE_COMMUNITY};
    int problems = 0;
    const char *h = param_str(&conn[CK_HOST]);
    if (h == NULL || h[0] == '\0') {
        report(rctx, "host", "must not be empty");
        problems++;
    }
    if (param_int(&conn[CK_VERSION], V2C) == V3) {
        for (size_t i = 0; i < sizeof v12_only / sizeof v12_only[0]; i++) {
            if (conn[v12_only[i]].set) {
                report(rctx, conn_keys[v12_only[i]].name,
                       "only for version 1 or 2c (version 3 uses \"user\")");
                problems++;
            }
        }
        return problems + check_v3(conn, report, rctx);
    }
    for (size_t i = 0; i < sizeof v3_only / sizeof v3_only[0]; i++) {
        if (conn[v3_only[i]].set) {
            report(rctx, conn_keys[v3_only[i]].name, "only for version 3");
            problems++;
        }
    }
    return problems;
}

static int check_tag(const smp_tag_t *tag, smp_report_fn report, void *rctx)
{
    oid o[MAX_OID_LEN];
    int problems = 0;
    if (!tag->params[TK_OID].set) {
        report(rctx, "oid", "required key is missing");
        return 1;
    }
    if (oid_parse(tag->params[TK_OID].s, o) == 0) {
        report(rctx, "oid",
               "not a numeric OID (digits separated by dots, 2-%d sub-identifiers of at most "
               "4294967295, e.g. 1.3.6.1.2.1.1.3.0)",
               MAX_OID_LEN);
        problems++;
    }
    switch (tag->type) {
    case SMP_TYPE_INT32:
    case SMP_TYPE_INT64:
    case SMP_TYPE_UINT32:
    case SMP_TYPE_UINT64:
    case SMP_TYPE_STRING:
        break;
    default:
        report(rctx, "type",
               "SNMP values map to int32/int64 (INTEGER), uint32/uint64 (Counter32, Gauge32, "
               "TimeTicks, Counter64) or string (OCTET STRING, IpAddress)");
        problems++;
    }
    return problems;
}

static int conn_key(const smp_param_t *conn, char *buf, size_t n)
{
    const char *h = param_str(&conn[CK_HOST]);
    int len = snprintf(buf, n, "udp:%s:%lld", h ? h : "",
                       (long long)param_int(&conn[CK_PORT], DEFAULT_PORT));
    return len < 0 || (size_t)len >= n ? -ENOSPC : 0;
}

/* ---- errors ------------------------------------------------------------------------------ */

/* error-status names of RFC 3416 section 3, as the platform sees them. */
static const char *const error_names[] = {
    "noError",
    "tooBig",
    "noSuchName",
    "badValue",
    "readOnly",
    "genErr",
    "noAccess",
    "wrongType",
    "wrongLength",
    "wrongEncoding",
    "wrongValue",
    "noCreation",
    "inconsistentValue",
    "resourceUnavailable",
    "commitFailed",
    "undoFailed",
    "authorizationError",
    "notWritable",
    "inconsistentName",
};

static const char *error_name(long status)
{
    if (status >= 0 && (size_t)status < sizeof error_names / sizeof error_names[0]) {
        return error_names[status];
    }
    return "unknown error-status";
}

static const char *asn_name(u_char type)
{
    switch (type) {
    case ASN_INTEGER:
        return "INTEGER";
    case ASN_COUNTER:
        return "Counter32";
    case ASN_GAUGE:
        return "Gauge32";
    case ASN_TIMETICKS:
        return "TimeTicks";
    case ASN_COUNTER64:
        return "Counter64";
    case ASN_OCTET_STR:
        return "OCTET STRING";
    case ASN_IPADDRESS:
        return "IpAddress";
    case ASN_OBJECT_ID:
        return "OBJECT IDENTIFIER";
    case ASN_OPAQUE:
        return "Opaque";
    case ASN_NULL:
        return "NULL";
    case ASN_BIT_STR:
        return "BITS";
    default:
        return "an unknown type";
    }
}

/* ---- connection and sessions -------------------------------------------------------------- */

typedef struct sn_conn sn_conn_t;

typedef struct sn_tag {
    const char *name; /* borrowed from the host's smp_tag_t */
    smp_type_t type;
    bool writable;
    oid oid[MAX_OID_LEN];
    size_t oid_len;
    u_char asn_type; /* learned from the agent's last answer; 0 = not yet known */
    char *str;       /* strings: decoded text, valid until the next call on the device */
    size_t str_cap;
} sn_tag_t;

typedef struct sn_device {
    sn_conn_t *conn;
    struct sn_device *next; /* the connection's list */
    void *log_ctx;
    const smp_param_t *params; /* borrowed, outlives the device */
    void *sess;                /* snmp_sess_open handle, NULL when closed */
    unsigned max_varbinds;     /* lowered by tooBig answers */
    sn_tag_t *tags;
    size_t ntags;
    /* The reply of the request in flight, handed over by on_response(). */
    bool done;
    int op;
    netsnmp_pdu *resp;
    char msg[192];
    char auth_logged[192]; /* the last authentication failure logged, to log each once */
    bool answered;         /* the agent has answered this device at least once */
    bool silence_logged;
} sn_device_t;

struct sn_conn {
    const smp_param_t *params;
    void *log_ctx;
    sn_device_t *devs;
    char peer[INET6_ADDRSTRLEN + 16]; /* resolved "udp:ADDR:PORT", empty until conn_open */
};

static void *conn_create(const smp_param_t *conn, void *log_ctx)
{
    sn_conn_t *c = calloc(1, sizeof *c);
    if (c != NULL) {
        c->params = conn;
        c->log_ctx = log_ctx;
    }
    return c;
}

static void sess_close(sn_device_t *d)
{
    if (d->sess != NULL) {
        pthread_mutex_lock(&lib_mu);
        snmp_sess_close(d->sess);
        pthread_mutex_unlock(&lib_mu);
        d->sess = NULL;
    }
}

static void conn_close(void *cp)
{
    sn_conn_t *c = cp;
    if (c == NULL) {
        return;
    }
    for (sn_device_t *d = c->devs; d != NULL; d = d->next) {
        sess_close(d);
    }
    c->peer[0] = '\0';
}

/* Resolves the agent's address here, on the worker thread and outside the library lock, so
 * net-snmp is handed a numeric address and never blocks in DNS while holding it. */
static int conn_open(void *cp)
{
    sn_conn_t *c = cp;
    if (c == NULL) {
        return -EINVAL;
    }
    conn_close(c);
    const char *h = param_str(&c->params[CK_HOST]);
    struct addrinfo hints = {.ai_socktype = SOCK_DGRAM, .ai_family = AF_UNSPEC}, *res = NULL;
    int gai = h != NULL ? getaddrinfo(h, NULL, &hints, &res) : EAI_NONAME;
    if (gai != 0) {
        SN_LOG(c->log_ctx, SMP_LOG_WARN, "cannot resolve host %s: %s", h ? h : "(none)",
               gai_strerror(gai));
        return -EHOSTUNREACH;
    }
    char addr[INET6_ADDRSTRLEN] = "";
    bool v6 = res->ai_family == AF_INET6;
    const void *src = v6 ? (const void *)&((struct sockaddr_in6 *)res->ai_addr)->sin6_addr
                         : (const void *)&((struct sockaddr_in *)res->ai_addr)->sin_addr;
    inet_ntop(res->ai_family, src, addr, sizeof addr);
    freeaddrinfo(res);
    snprintf(c->peer, sizeof c->peer, v6 ? "udp6:[%s]:%lld" : "udp:%s:%lld", addr,
             (long long)param_int(&c->params[CK_PORT], DEFAULT_PORT));
    return 0;
}

static void conn_destroy(void *cp)
{
    sn_conn_t *c = cp;
    if (c == NULL) {
        return;
    }
    conn_close(c);
    free(c);
}

/* net-snmp's callback for a session's reply or timeout; runs inside snmp_sess_read or
 * snmp_sess_timeout, so under lib_mu on the device's own worker thread. The PDU belongs to
 * the library, hence the clone. */
static int on_response(int op, netsnmp_session *s, int reqid, netsnmp_pdu *pdu, void *magic)
{
    sn_device_t *d = magic;
    if (d->done || op == NETSNMP_CALLBACK_OP_RESEND || op == NETSNMP_CALLBACK_OP_CONNECT) {
        return 1; /* a retry going out, or a late answer to an earlier request */
    }
    d->done = true;
    d->op = op;
    if ((op == NETSNMP_CALLBACK_OP_RECEIVED_MESSAGE || op == NETSNMP_CALLBACK_OP_SEC_ERROR) &&
        pdu != NULL) {
        d->resp = snmp_clone_pdu(pdu);
    }
    return 1;
}

static const oid *auth_oid(int64_t proto, size_t *len)
{
    switch (proto) {
    case AUTH_MD5:
        *len = OID_LENGTH(usmHMACMD5AuthProtocol);
        return usmHMACMD5AuthProtocol;
    case AUTH_SHA256:
        *len = OID_LENGTH(usmHMAC192SHA256AuthProtocol);
        return usmHMAC192SHA256AuthProtocol;
    case AUTH_SHA512:
        *len = OID_LENGTH(usmHMAC384SHA512AuthProtocol);
        return usmHMAC384SHA512AuthProtocol;
    default:
        *len = OID_LENGTH(usmHMACSHA1AuthProtocol);
        return usmHMACSHA1AuthProtocol;
    }
}

static const oid *priv_oid(int64_t proto, size_t *len)
{
    switch (proto) {
    case PRIV_DES:
        *len = OID_LENGTH(usmDESPrivProtocol);
        return usmDESPrivProtocol;
    case PRIV_AES256:
        *len = OID_LENGTH(usmAES256PrivProtocol);
        return usmAES256PrivProtocol;
    default:
        *len = OID_LENGTH(usmAESPrivProtocol);
        return usmAESPrivProtocol;
    }
}

/* Fills the v3 part of a session: user, level, protocols and keys localised from the
 * passwords. Returns 0 or -EINVAL. Called under lib_mu. */
static int setup_v3(netsnmp_session *s, const smp_param_t *p)
{
    const char *user = param_str(&p[CK_USER]);
    int64_t level = param_int(&p[CK_SECURITY_LEVEL], SEC_PRIV);
    s->securityName = (char *)user;
    s->securityNameLen = user != NULL ? strlen(user) : 0;
    s->securityLevel = level == SEC_NOAUTH ? SNMP_SEC_LEVEL_NOAUTH
                       : level == SEC_AUTH ? SNMP_SEC_LEVEL_AUTHNOPRIV
                                           : SNMP_SEC_LEVEL_AUTHPRIV;
    if (level == SEC_NOAUTH) {
        return 0;
    }
    size_t alen;
    const oid *a = auth_oid(param_int(&p[CK_AUTH_PROTOCOL], AUTH_SHA), &alen);
    s->securityAuthProto = snmp_duplicate_objid(a, alen);
    s->securityAuthProtoLen = alen;
    s->securityAuthKeyLen = USM_AUTH_KU_LEN;
    const char *ap = param_str(&p[CK_AUTH_PASSWORD]);
    if (s->securityAuthProto == NULL || ap == NULL ||
        generate_Ku(s->securityAuthProto, (u_int)alen, (const u_char *)ap, strlen(ap),
                    s->securityAuthKey, &s->securityAuthKeyLen) != SNMPERR_SUCCESS) {
        return -EINVAL;
    }
    if (level == SEC_AUTH) {
        return 0;
    }
    size_t plen;
    const oid *pr = priv_oid(param_int(&p[CK_PRIV_PROTOCOL], PRIV_AES), &plen);
    s->securityPrivProto = snmp_duplicate_objid(pr, plen);
    s->securityPrivProtoLen = plen;
    s->securityPrivKeyLen = USM_PRIV_KU_LEN;
    const char *pp = param_str(&p[CK_PRIV_PASSWORD]);
    /* The privacy key is localised with the authentication hash (RFC 3414, 3826). */
    if (s->securityPrivProto == NULL || pp == NULL ||
        generate_Ku(s->securityAuthProto, (u_int)alen, (const u_char *)pp, strlen(pp),
                    s->securityPrivKey, &s->securityPrivKeyLen) != SNMPERR_SUCCESS) {
        return -EINVAL;
    }
    return 0;
}

/* Opens the device's session if it is closed. For v3 snmp_sess_open discovers the agent's
 * engine id with a blocking exchange; it runs under lib_mu, the one wait that does (see
 * docs/snmp.md). Returns 0 or a negative code with d->msg set. */
static int sess_ensure(sn_device_t *d)
{
    if (d->sess != NULL) {
        return 0;
    }
    const smp_param_t *p = d->params;
    if (d->conn->peer[0] == '\0') {
        snprintf(d->msg, sizeof d->msg, "not connected");
        return -ENOTCONN;
    }
    netsnmp_session s;
    pthread_mutex_lock(&lib_mu);
    snmp_sess_init(&s);
    s.peername = d->conn->peer;
    int64_t version = param_int(&p[CK_VERSION], V2C);
    s.version = version == V1 ? SNMP_VERSION_1 : version == V2C ? SNMP_VERSION_2c : SNMP_VERSION_3;
    const char *community = param_str(&p[CK_COMMUNITY]);
    if (community == NULL) {
        community = "public";
    }
    s.community = (u_char *)community;
    s.community_len = strlen(community);
    /* net-snmp counts in microseconds, and re-sends itself: the retries happen inside one
     * call, bounded by timeout_ms x (retries + 1). */
    s.timeout = (long)param_int(&p[CK_TIMEOUT_MS], DEFAULT_TIMEOUT_MS) * 1000L;
    s.retries = (int)param_int(&p[CK_RETRIES], DEFAULT_RETRIES);
    s.callback = on_response;
    s.callback_magic = d;
    int rc = version == V3 ? setup_v3(&s, p) : 0;
    if (rc == 0) {
        d->sess = snmp_sess_open(&s);
        if (d->sess == NULL) {
            int liberr = 0, syserr = 0;
            char *text = NULL;
            snmp_error(&s, &syserr, &liberr, &text);
            snprintf(d->msg, sizeof d->msg, "cannot open the session: %s",
                     text != NULL ? text : "unknown error");
            free(text);
            rc = liberr == SNMPERR_TIMEOUT ? -ETIMEDOUT
                 : liberr == SNMPERR_AUTHENTICATION_FAILURE || liberr == SNMPERR_UNKNOWN_USER_NAME
                     ? -EKEYREJECTED
                     : -EIO;
        }
    } else {
        snprintf(d->msg, sizeof d->msg, "cannot derive the v3 keys from the passwords");
    }
    /* snmp_sess_open copied what it needs; the protocol OIDs were ours. */
    free(s.securityAuthProto);
    free(s.securityPrivProto);
    pthread_mutex_unlock(&lib_mu);
    return rc;
}

/* Hands pdu (owned) to the library and returns the session's socket, or a negative code with
 * d->msg set. */
static int send_pdu(sn_device_t *d, netsnmp_pdu *pdu)
{
    d->done = false;
    d->resp = NULL;
    pthread_mutex_lock(&lib_mu);
    if (snmp_sess_send(d->sess, pdu) == 0) {
        snmp_free_pdu(pdu);
        int liberr = 0, syserr = 0;
        char *text = NULL;
        snmp_sess_error(d->sess, &syserr, &liberr, &text);
        snprintf(d->msg, sizeof d->msg, "send failed: %s", text != NULL ? text : "?");
        free(text);
        pthread_mutex_unlock(&lib_mu);
        return -EIO;
    }
    netsnmp_transport *t = snmp_sess_transport(d->sess);
    int sock = t != NULL ? t->sock : -1;
    pthread_mutex_unlock(&lib_mu);
    if (sock < 0) {
        snprintf(d->msg, sizeof d->msg, "session has no socket");
        return -EIO;
    }
    return sock;
}

/* Waits until on_response() has run: the library tells how long it may wait before the next
 * retry is due, the wait itself happens outside lib_mu. */
static void wait_reply(sn_device_t *d, int sock)
{
    while (!d->done) {
        /* block = 1 on input: "no upper bound of mine"; the library lowers it to 0 and sets tv
         * to the next retry's due time when a request is pending. With 0 on input it would
         * take tv (0) as a bound and make this loop spin. */
        struct timeval tv = {0, 0};
        int nfds = 0, block = 1;
        netsnmp_large_fd_set fds;
        pthread_mutex_lock(&lib_mu);
        netsnmp_large_fd_set_init(&fds, sock + 1);
        snmp_sess_select_info2(d->sess, &nfds, &fds, &tv, &block);
        pthread_mutex_unlock(&lib_mu);
        int ms = block ? 1000 : (int)(tv.tv_sec * 1000 + (tv.tv_usec + 999) / 1000);
        struct pollfd pfd = {.fd = sock, .events = POLLIN};
        int r = poll(&pfd, 1, ms);
        if (r < 0 && errno != EINTR) {
            r = 0;
        }
        pthread_mutex_lock(&lib_mu);
        if (r > 0) {
            NETSNMP_LARGE_FD_ZERO(&fds);
            NETSNMP_LARGE_FD_SET(sock, &fds);
            snmp_sess_read2(d->sess, &fds);
        } else if (r == 0) {
            snmp_sess_timeout(d->sess);
        }
        netsnmp_large_fd_set_cleanup(&fds);
        pthread_mutex_unlock(&lib_mu);
    }
}

/* v3: what the agent's Report, or our own check of its answer, says went wrong. */
static int security_failure(sn_device_t *d)
{
    int rc = -EKEYREJECTED;
    pthread_mutex_lock(&lib_mu);
    if (d->resp != NULL && d->resp->command == SNMP_MSG_REPORT) {
        int type = snmpv3_get_report_type(d->resp);
        snprintf(d->msg, sizeof d->msg, "%s", snmp_api_errstring(type));
        if (type != SNMPERR_AUTHENTICATION_FAILURE && type != SNMPERR_UNKNOWN_USER_NAME &&
            type != SNMPERR_UNSUPPORTED_SEC_LEVEL && type != SNMPERR_DECRYPTION_ERR) {
            rc = -EPROTO;
        }
    } else {
        int liberr = 0, syserr = 0;
        char *text = NULL;
        snmp_sess_error(d->sess, &syserr, &liberr, &text);
        snprintf(d->msg, sizeof d->msg, "%s", text != NULL ? text : "security error");
        free(text);
    }
    pthread_mutex_unlock(&lib_mu);
    snmp_free_pdu(d->resp);
    d->resp = NULL;
    return rc;
}

/* Sends pdu (owned) and waits for the answer: on success *resp (owned by the caller) holds
 * it. Returns 0, -ETIMEDOUT when the agent did not answer any retry, -EKEYREJECTED when v3
 * authentication failed, or another negative code; d->msg explains failures. */
static int transact(sn_device_t *d, netsnmp_pdu *pdu, netsnmp_pdu **resp)
{
    *resp = NULL;
    int rc = sess_ensure(d);
    if (rc < 0) {
        snmp_free_pdu(pdu);
        return rc;
    }
    int sock = send_pdu(d, pdu);
    if (sock < 0) {
        return sock;
    }
    wait_reply(d, sock);
    if (d->op == NETSNMP_CALLBACK_OP_TIMED_OUT) {
        snprintf(d->msg, sizeof d->msg, "no answer from the agent (timeout)");
        return -ETIMEDOUT;
    }
    if (d->op == NETSNMP_CALLBACK_OP_SEC_ERROR ||
        (d->resp != NULL && d->resp->command == SNMP_MSG_REPORT)) {
        return security_failure(d);
    }
    d->answered = true;
    if (d->resp == NULL) {
        snprintf(d->msg, sizeof d->msg, "no usable answer from the agent");
        return -EIO;
    }
    *resp = d->resp;
    d->resp = NULL;
    return 0;
}

/* ---- device ------------------------------------------------------------------------------ */

static void device_destroy(void *dp)
{
    sn_device_t *d = dp;
    if (d == NULL) {
        return;
    }
    sess_close(d);
    sn_device_t **pp = &d->conn->devs;
    while (*pp != NULL && *pp != d) {
        pp = &(*pp)->next;
    }
    if (*pp == d) {
        *pp = d->next;
    }
    for (size_t i = 0; i < d->ntags; i++) {
        free(d->tags[i].str);
    }
    free(d->tags);
    free(d);
}

static void *device_create(void *cp, const smp_param_t *dev_conn, const smp_tag_t *tags,
                           size_t ntags, void *log_ctx)
{
    sn_conn_t *c = cp;
    if (c == NULL || dev_conn == NULL || (ntags > 0 && tags == NULL)) {
        return NULL;
    }
    sn_device_t *d = calloc(1, sizeof *d);
    if (d == NULL) {
        return NULL;
    }
    d->conn = c;
    d->log_ctx = log_ctx;
    d->params = dev_conn;
    d->max_varbinds = (unsigned)param_int(&dev_conn[CK_MAX_VARBINDS], DEFAULT_MAX_VARBINDS);
    d->ntags = ntags;
    d->tags = calloc(ntags ? ntags : 1, sizeof *d->tags);
    d->next = c->devs;
    c->devs = d;
    if (d->tags == NULL) {
        device_destroy(d);
        return NULL;
    }
    for (size_t i = 0; i < ntags; i++) {
        sn_tag_t *t = &d->tags[i];
        t->name = tags[i].name;
        t->type = tags[i].type;
        t->writable = tags[i].writable;
        t->oid_len =
            tags[i].params != NULL ? oid_parse(param_str(&tags[i].params[TK_OID]), t->oid) : 0;
        if (t->oid_len == 0) {
            SN_LOG(log_ctx, SMP_LOG_ERROR, "tag %s: invalid oid", t->name);
            device_destroy(d);
            return NULL;
        }
    }
    return d;
}

static void fail_reading(smp_reading_t *out, int code, const char *message)
{
    memset(out, 0, sizeof *out);
    out->status = code;
    out->message = message;
}

/* Copies an OCTET STRING into the tag's buffer as UTF-8: every byte that does not start a
 * valid sequence becomes U+FFFD, so the platform never receives invalid JSON text. */
static int decode_string(sn_tag_t *t, const u_char *s, size_t n, smp_value_t *out)
{
    if (t->str_cap < 3 * n + 1) {
        char *p = realloc(t->str, 3 * n + 1);
        if (p == NULL) {
            return -ENOMEM;
        }
        t->str = p;
        t->str_cap = 3 * n + 1;
    }
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t len = c < 0x80             ? 1
                     : (c & 0xe0) == 0xc0 ? 2
                     : (c & 0xf0) == 0xe0 ? 3
                     : (c & 0xf8) == 0xf0 ? 4
                                          : 0;
        bool ok = len > 0 && i + len <= n && !(len == 2 && c < 0xc2) && !(len == 4 && c > 0xf4);
        for (size_t k = 1; ok && k < len; k++) {
            ok = (s[i + k] & 0xc0) == 0x80;
        }
        /* Overlong 3- and 4-byte forms, surrogates and code points past U+10FFFF. */
        if (ok && len == 3) {
            ok = !(c == 0xe0 && s[i + 1] < 0xa0) && !(c == 0xed && s[i + 1] >= 0xa0);
        } else if (ok && len == 4) {
            ok = !(c == 0xf0 && s[i + 1] < 0x90) && !(c == 0xf4 && s[i + 1] >= 0x90);
        }
        if (ok) {
            memcpy(t->str + o, s + i, len);
            o += len;
            i += len;
        } else {
            memcpy(t->str + o, "\xef\xbf\xbd", 3);
            o += 3;
            i++;
        }
    }
    t->str[o] = '\0';
    out->s = t->str;
    out->len = o;
    return 0;
}

/* Decodes vb into out->value when the tag's type can hold it. Returns 1 when it does, 0 for a
 * type mismatch, or -1 with out failed (a negative INTEGER for an unsigned tag, no memory). */
static int decode_value(sn_tag_t *t, const netsnmp_variable_list *vb, smp_reading_t *out)
{
    bool is_unsigned = t->type == SMP_TYPE_UINT32 || t->type == SMP_TYPE_UINT64;
    switch (vb->type) {
    case ASN_INTEGER: {
        int32_t x = (int32_t)*vb->val.integer;
        if (t->type == SMP_TYPE_INT32 || t->type == SMP_TYPE_INT64) {
            out->value.v.i = x;
            return 1;
        }
        /* MIBs declare many unsigned quantities as INTEGER (0..2147483647), e.g. UPS-MIB's
         * NonNegativeInteger: an unsigned tag takes them, a negative one is its error. */
        if (is_unsigned && x < 0) {
            fail_reading(out, -ERANGE, "the agent returned a negative INTEGER for an unsigned tag");
            return -1;
        }
        out->value.v.u = (uint64_t)x;
        return is_unsigned;
    }
    case ASN_COUNTER:
    case ASN_GAUGE:
    case ASN_TIMETICKS:
        out->value.v.u = (uint32_t)*vb->val.integer;
        return is_unsigned;
    case ASN_COUNTER64:
        out->value.v.u =
            ((uint64_t)(uint32_t)vb->val.counter64->high << 32) | (uint32_t)vb->val.counter64->low;
        return t->type == SMP_TYPE_UINT64;
    case ASN_OCTET_STR:
    case ASN_IPADDRESS: {
        if (t->type != SMP_TYPE_STRING || (vb->type == ASN_IPADDRESS && vb->val_len != 4)) {
            return 0;
        }
        char ip[INET_ADDRSTRLEN];
        const u_char *p = vb->val.string;
        size_t n = vb->val_len;
        if (vb->type == ASN_IPADDRESS) {
            inet_ntop(AF_INET, vb->val.string, ip, sizeof ip);
            p = (const u_char *)ip;
            n = strlen(ip);
        }
        if (decode_string(t, p, n, &out->value) < 0) {
            fail_reading(out, -ENOMEM, "out of memory");
            return -1;
        }
        return 1;
    }
    default:
        return 0;
    }
}

static const char *tag_type_name(smp_type_t type)
{
    switch (type) {
    case SMP_TYPE_INT32:
        return "int32";
    case SMP_TYPE_INT64:
        return "int64";
    case SMP_TYPE_UINT32:
        return "uint32";
    case SMP_TYPE_UINT64:
        return "uint64";
    default:
        return "string";
    }
}

/* Turns one varbind into the tag's raw value. A type the tag cannot hold is a per-tag error
 * naming both types, never a converted value. */
static void decode_var(sn_tag_t *t, const netsnmp_variable_list *vb, smp_reading_t *out)
{
    memset(out, 0, sizeof *out);
    const char *exception = vb->type == SNMP_NOSUCHOBJECT     ? "noSuchObject"
                            : vb->type == SNMP_NOSUCHINSTANCE ? "noSuchInstance"
                            : vb->type == SNMP_ENDOFMIBVIEW   ? "endOfMibView"
                                                              : NULL;
    if (exception != NULL) {
        fail_reading(out, SMP_EDEVICE, exception);
        return;
    }
    int fits = decode_value(t, vb, out);
    if (fits > 0) {
        t->asn_type = vb->type;
    } else if (fits == 0) {
        /* The device's msg would be overwritten by the next tag: the text lives in the tag's
         * own buffer, valid until the next call like a string value. */
        char m[128];
        smp_value_t tmp;
        snprintf(m, sizeof m, "type mismatch: the agent returned %s, the tag is %s",
                 asn_name(vb->type), tag_type_name(t->type));
        bool ok = decode_string(t, (const u_char *)m, strlen(m), &tmp) == 0;
        fail_reading(out, -EINVAL, ok ? tmp.s : "type mismatch");
    }
}

/* Fails every tag of a call with link error `code` and returns it. */
static int fail_all(sn_device_t *d, smp_reading_t *out, size_t n, int code)
{
    for (size_t k = 0; k < n; k++) {
        fail_reading(&out[k], code, d->msg);
    }
    return code;
}

/* One GET for tags idx[k] of ks[0..m) (positions into out). Handles the error-status of the
 * answer: tooBig splits the batch, a v1 error with an index drops that tag and asks again.
 * Returns the number of PDUs sent (>= 1) or a negative link error. */
static int get_batch(sn_device_t *d, const uint32_t *idx, uint32_t *ks, size_t m,
                     smp_reading_t *out)
{
    int requests = 0;
    while (m > 0) {
        netsnmp_pdu *pdu = snmp_pdu_create(SNMP_MSG_GET);
        if (pdu == NULL) {
            return -ENOMEM;
        }
        for (size_t j = 0; j < m; j++) {
            const sn_tag_t *t = &d->tags[idx[ks[j]]];
            snmp_add_null_var(pdu, t->oid, t->oid_len);
        }
        netsnmp_pdu *resp;
        int rc = transact(d, pdu, &resp);
        requests++;
        if (rc < 0) {
            return rc;
        }
        long status = resp->errstat, index = resp->errindex;
        if (status == SNMP_ERR_NOERROR) {
            netsnmp_variable_list *vb = resp->variables;
            for (size_t j = 0; j < m; j++, vb = vb != NULL ? vb->next_variable : NULL) {
                sn_tag_t *t = &d->tags[idx[ks[j]]];
                if (vb == NULL ||
                    snmp_oid_compare(vb->name, vb->name_length, t->oid, t->oid_len) != 0) {
                    fail_reading(&out[ks[j]], -EPROTO, "the agent answered another OID");
                } else {
                    decode_var(t, vb, &out[ks[j]]);
                }
            }
            snmp_free_pdu(resp);
            return requests;
        }
        snmp_free_pdu(resp);
        if (status == SNMP_ERR_TOOBIG && m > 1) {
            size_t half = m / 2;
            if (d->max_varbinds > half) {
                SN_LOG(d->log_ctx, SMP_LOG_WARN,
                       "the agent answered tooBig to %zu OIDs: at most %zu per GET from now on", m,
                       half);
                d->max_varbinds = (unsigned)half;
            }
            int r1 = get_batch(d, idx, ks, half, out);
            if (r1 < 0) {
                return r1;
            }
            int r2 = get_batch(d, idx, ks + half, m - half, out);
            return r2 < 0 ? r2 : requests + r1 + r2;
        }
        if (index >= 1 && (size_t)index <= m && m > 1) {
            /* v1 fails the whole PDU for one bad OID: fail that tag, ask for the rest. */
            fail_reading(&out[ks[index - 1]], SMP_EDEVICE, error_name(status));
            memmove(&ks[index - 1], &ks[index], (m - (size_t)index) * sizeof *ks);
            m--;
            continue;
        }
        for (size_t j = 0; j < m; j++) {
            fail_reading(&out[ks[j]], SMP_EDEVICE, error_name(status));
        }
        return requests;
    }
    return requests;
}

static int device_read(void *dp, const uint32_t *idx, size_t n, smp_reading_t *out)
{
    sn_device_t *d = dp;
    if (d == NULL || (n > 0 && (idx == NULL || out == NULL))) {
        return -EINVAL;
    }
    uint32_t *ks = malloc((n ? n : 1) * sizeof *ks);
    if (ks == NULL) {
        return -ENOMEM;
    }
    int requests = 0;
    for (size_t first = 0; first < n;) {
        size_t m = n - first < d->max_varbinds ? n - first : d->max_varbinds;
        for (size_t j = 0; j < m; j++) {
            if (idx[first + j] >= d->ntags) {
                free(ks);
                snprintf(d->msg, sizeof d->msg, "no such tag");
                return fail_all(d, out, n, -EINVAL);
            }
            ks[j] = (uint32_t)(first + j);
        }
        int rc = get_batch(d, idx, ks, m, out);
        if (rc < 0) {
            free(ks);
            if (rc == -ETIMEDOUT && !d->answered && !d->silence_logged) {
                /* v1/v2c agents drop a request with a community they do not know: from here a
                 * wrong community and a dead agent look the same. */
                SN_LOG(d->log_ctx, SMP_LOG_WARN,
                       "no answer from %s yet: check host, port, version and community",
                       d->conn->peer);
                d->silence_logged = true;
            }
            if (rc == -EKEYREJECTED && strcmp(d->auth_logged, d->msg) != 0) {
                SN_LOG(d->log_ctx, SMP_LOG_WARN, "the agent refused us: %s", d->msg);
                snprintf(d->auth_logged, sizeof d->auth_logged, "%s", d->msg);
            }
            if (rc == -ETIMEDOUT || rc == -EKEYREJECTED) {
                /* A fresh session next time re-discovers a v3 engine that restarted. */
                sess_close(d);
            }
            return fail_all(d, out, n, rc);
        }
        requests += rc;
        first += m;
    }
    free(ks);
    return requests;
}

/* Adds tag t's value `in` to a SET PDU with the ASN.1 type the agent uses for the object.
 * Returns 0, -ERANGE when the value does not fit that type, or -EINVAL. */
static int add_set_var(netsnmp_pdu *pdu, const sn_tag_t *t, const smp_value_t *in,
                       const char **message)
{
    long l;
    struct counter64 c64;
    in_addr_t ip;
    const void *val = &l;
    size_t len = sizeof l;
    switch (t->asn_type) {
    case ASN_INTEGER: {
        bool is_unsigned = t->type == SMP_TYPE_UINT32 || t->type == SMP_TYPE_UINT64;
        if (is_unsigned ? in->v.u > INT32_MAX : in->v.i < INT32_MIN || in->v.i > INT32_MAX) {
            *message = "value does not fit an SNMP INTEGER (32 bits)";
            return -ERANGE;
        }
        l = is_unsigned ? (long)in->v.u : (long)in->v.i;
        break;
    }
    case ASN_GAUGE:
    case ASN_COUNTER:
    case ASN_TIMETICKS:
        if (in->v.u > UINT32_MAX) {
            *message = "value does not fit an unsigned 32-bit SNMP type";
            return -ERANGE;
        }
        l = (long)in->v.u;
        break;
    case ASN_COUNTER64:
        c64.high = (u_long)(in->v.u >> 32);
        c64.low = (u_long)(in->v.u & 0xffffffffu);
        val = &c64;
        len = sizeof c64;
        break;
    case ASN_OCTET_STR:
        val = in->s != NULL ? in->s : "";
        len = in->s != NULL ? in->len : 0;
        break;
    case ASN_IPADDRESS: {
        char buf[INET_ADDRSTRLEN];
        if (in->s == NULL || in->len >= sizeof buf) {
            *message = "an IpAddress is written as dotted IPv4 text";
            return -EINVAL;
        }
        memcpy(buf, in->s, in->len);
        buf[in->len] = '\0';
        if (inet_pton(AF_INET, buf, &ip) != 1) {
            *message = "an IpAddress is written as dotted IPv4 text";
            return -EINVAL;
        }
        val = &ip;
        len = 4;
        break;
    }
    default:
        *message = "the agent's type for this object cannot be written";
        return -EINVAL;
    }
    if (snmp_pdu_add_variable(pdu, t->oid, t->oid_len, t->asn_type, val, len) == NULL) {
        *message = "out of memory";
        return -ENOMEM;
    }
    return 0;
}

/* GETs one tag into *out; returns 0 (with out->status telling the tag's outcome), or a
 * negative link error. */
static int get_one(sn_device_t *d, uint32_t ti, smp_reading_t *out)
{
    uint32_t k = 0;
    int rc = get_batch(d, &ti, &k, 1, out);
    return rc < 0 ? rc : 0;
}

/* Sends the SET of `in` to tag t with the write community and waits for the answer. Returns
 * 0, SMP_EDEVICE with the agent's error-status name, or a negative code; sets *message. */
static int send_set(sn_device_t *d, const sn_tag_t *t, const smp_value_t *in, const char **message)
{
    netsnmp_pdu *pdu = snmp_pdu_create(SNMP_MSG_SET);
    if (pdu == NULL) {
        *message = "out of memory";
        return -ENOMEM;
    }
    int rc = add_set_var(pdu, t, in, message);
    const char *wc = param_str(&d->params[CK_WRITE_COMMUNITY]);
    if (rc == 0 && wc != NULL) {
        /* net-snmp sends a PDU's own community when it has one; the PDU frees it. */
        pdu->community = (u_char *)strdup(wc);
        pdu->community_len = strlen(wc);
        rc = pdu->community == NULL ? -ENOMEM : 0;
    }
    if (rc < 0) {
        snmp_free_pdu(pdu);
        return rc;
    }
    netsnmp_pdu *resp;
    rc = transact(d, pdu, &resp);
    if (rc < 0) {
        *message = d->msg;
        return rc;
    }
    long status = resp->errstat;
    snmp_free_pdu(resp);
    if (status != SNMP_ERR_NOERROR) {
        *message = error_name(status);
        return SMP_EDEVICE;
    }
    return 0;
}

static int device_write(void *dp, uint32_t ti, const smp_value_t *in, smp_reading_t *readback,
                        const char **message)
{
    sn_device_t *d = dp;
    const char *unused;
    if (message == NULL) {
        message = &unused;
    }
    *message = NULL;
    if (d == NULL || in == NULL || readback == NULL) {
        *message = "invalid arguments";
        return -EINVAL;
    }
    memset(readback, 0, sizeof *readback);
    if (ti >= d->ntags) {
        *message = "no such tag";
        return -EINVAL;
    }
    sn_tag_t *t = &d->tags[ti];
    if (!t->writable) {
        *message = "tag is not writable";
        return -EPERM;
    }
    /* A SET must carry the object's own ASN.1 type (Gauge32 and TimeTicks are both uint32
     * to the platform): learn it from the agent before the first write. */
    if (t->asn_type == 0) {
        int rc = get_one(d, ti, readback);
        if (rc < 0) {
            *message = d->msg;
            return rc;
        }
        if (readback->status != 0) {
            *message = readback->message;
            return readback->status == SMP_EDEVICE ? SMP_EDEVICE : -EINVAL;
        }
    }
    int rc = send_set(d, t, in, message);
    if (rc != 0) {
        return rc;
    }
    rc = get_one(d, ti, readback);
    if (rc < 0) {
        char why[sizeof d->msg - 40];
        snprintf(why, sizeof why, "%.*s", (int)sizeof why - 1, d->msg);
        snprintf(d->msg, sizeof d->msg, "written, but the read-back failed: %s", why);
        *message = d->msg;
        return rc;
    }
    if (readback->status != 0) {
        *message = readback->message;
        return readback->status;
    }
    return 0;
}

/* ---- library set-up and descriptor ---------------------------------------------------------- */

/* net-snmp's own log lines go through the host's log as debug lines of scope "snmp". */
static int on_log(int major, int minor, void *server, void *client)
{
    const struct snmp_log_message *m = server;
    if (m != NULL && m->msg != NULL) {
        size_t n = strlen(m->msg);
        while (n > 0 && m->msg[n - 1] == '\n') {
            n--;
        }
        SN_LOG((void *)"snmp", SMP_LOG_DEBUG, "net-snmp: %.*s", (int)n, m->msg);
    }
    return 0;
}

/* Once per process. The plugin is linked with -z nodelete, so this flag and the library's
 * state survive a config reload that unloads and reloads the plugin. */
static bool lib_ready;

static void lib_init(void)
{
    if (lib_ready) {
        return;
    }
    /* No config files, no persistent state under /var/lib/snmp, no MIBs (Debian ships none and
     * OIDs are numeric): the driver's behaviour depends on simpul's config alone. MIBS is read
     * by init_snmp; this runs on the main thread before any worker exists. */
    setenv("MIBS", "", 1);
    netsnmp_set_mib_directory("");
    netsnmp_ds_set_string(NETSNMP_DS_LIBRARY_ID, NETSNMP_DS_LIB_CONFIGURATION_DIR, "/dev/null");
    netsnmp_ds_set_string(NETSNMP_DS_LIBRARY_ID, NETSNMP_DS_LIB_PERSISTENT_DIR, "/dev/null");
    netsnmp_ds_set_boolean(NETSNMP_DS_LIBRARY_ID, NETSNMP_DS_LIB_DISABLE_PERSISTENT_LOAD, 1);
    netsnmp_ds_set_boolean(NETSNMP_DS_LIBRARY_ID, NETSNMP_DS_LIB_DISABLE_PERSISTENT_SAVE, 1);
    netsnmp_ds_set_boolean(NETSNMP_DS_LIBRARY_ID, NETSNMP_DS_LIB_DONT_PERSIST_STATE, 1);
    snmp_register_callback(SNMP_CALLBACK_LIBRARY, SNMP_CALLBACK_LOGGING, on_log, NULL);
    netsnmp_register_loghandler(NETSNMP_LOGHANDLER_CALLBACK, LOG_DEBUG);
    init_snmp("simpul");
    lib_ready = true;
}

static const smp_plugin_t descriptor = {
    .abi_version = SMP_PLUGIN_ABI_VERSION,
    .struct_size = sizeof(smp_plugin_t),
    .name = "snmp",
    .version = SNMP_PLUGIN_VERSION,
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
    .reserved = {NULL},
};

SMP_PLUGIN_EXPORT const smp_plugin_t *smp_plugin_entry(const smp_host_api_t *h);

SMP_PLUGIN_EXPORT const smp_plugin_t *smp_plugin_entry(const smp_host_api_t *h)
{
    if (h == NULL || h->abi_version != SMP_PLUGIN_ABI_VERSION ||
        h->struct_size < offsetof(smp_host_api_t, log) + sizeof(h->log) || h->log == NULL) {
        return NULL;
    }
    host = h;
    lib_init();
    return &descriptor;
}
