/* Bridge: the MQTT client, driven by the libuv loop (see bridge.h for the contract and
 * docs/mqtt-bridge.md for the design notes).
 *
 * Shape of a connection. Every connection attempt gets a fresh `struct mosquitto`: when a
 * connection ends, the instance is destroyed, together with whatever libmosquitto still held for
 * it (queued QoS 1 messages it would otherwise resend after the next CONNACK, behind the
 * caller's back, while the caller's outbox resends them too). The socket of an instance sits on
 * its own heap-allocated uv_poll_t; that handle is closed when the connection ends, so a new
 * connection, whose fd may well carry the same number, always gets a new handle.
 *
 * Callbacks from libmosquitto only record what happened (CONNACK, connection lost) or deliver
 * what cannot wait (a message, whose memory is libmosquitto's, and acknowledgements). Everything
 * that changes the shape of the bridge (tearing a connection down, destroying the instance,
 * reconnecting, finishing a stop) runs in after_io(), once the libmosquitto call has returned:
 * destroying an instance from inside one of its own callbacks would free memory that
 * libmosquitto is still using.
 *
 * Everything here runs on the loop thread. */
#include "bridge.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <mosquitto.h>
#include <mqtt_protocol.h>

#include "log.h"
#include "tls.h"

#define SCOPE            "mqtt"

#define MISC_INTERVAL_MS 500 /* mosquitto_loop_misc: keepalive pings and their timeouts */
#define BACKOFF_MIN_MS   1000
#define BACKOFF_MAX_MS   30000
#define MAX_ADDRS        8 /* addresses tried per resolution of the broker's host name */
#define DEFAULT_INFLIGHT 256
#define REASON_LEN       160
#define SUB_RETRY_MS     5000 /* a refused subscription is asked for again this often */

enum bridge_state {
    ST_IDLE,       /* created, not started */
    ST_RESOLVING,  /* uv_getaddrinfo in flight */
    ST_CONNECTING, /* socket open, CONNECT queued or sent, no CONNACK yet */
    ST_CONNECTED,  /* CONNACK accepted */
    ST_BACKOFF,    /* waiting for retry_timer */
    ST_CLOSING,    /* stop finished; waiting for handle close callbacks */
    ST_STOPPED,    /* on_stopped delivered */
};

typedef struct sub {
    char *topic;
    int qos;
    int mid;      /* of the SUBSCRIBE awaiting its SUBACK, 0 when none */
    bool refused; /* the broker's last SUBACK refused it (its ACL, typically) */
} sub_t;

/* One QoS 1 publish awaiting its PUBACK. mid 0 marks a free slot (0 is never a valid mid). */
typedef struct pending {
    uint16_t mid;
    uint64_t token;
} pending_t;

/* Mids of QoS 0 publishes queued inside libmosquitto and not yet written (see on_mosq_publish).
 * A ring buffer; it only grows while the socket cannot take what is published. */
typedef struct mid_fifo {
    uint16_t *buf;
    size_t cap, head, len;
} mid_fifo_t;

struct smp_bridge {
    uv_loop_t *loop;
    const smp_config_t *cfg;
    smp_bridge_cbs_t cbs;
    void *arg;

    /* Settings, with the defaults of config.h applied. */
    const char *host;
    int port;
    int keepalive;
    int version;
    int inflight_max;
    bool tls;
    smp_tls_diag_t tls_diag; /* why the current instance's TLS handshake failed */
    char *client_id;         /* owned */
    char *status_topic;      /* owned: P/G/status */

    enum bridge_state state;
    bool stopping;
    bool timers_init;
    unsigned pending_closes; /* handles closed whose close callback has not run yet */

    /* The current connection, if any. */
    struct mosquitto *mosq;
    uv_poll_t *poll; /* heap: freed in its close callback */
    int poll_events;
    uv_getaddrinfo_t *gai; /* heap: freed in its callback, which always runs */
    char addrs[MAX_ADDRS][INET6_ADDRSTRLEN];
    size_t naddrs, addr_idx;

    /* Recorded by libmosquitto callbacks, acted upon by after_io(). */
    bool ev_connack;
    int connack_rc;
    bool ev_lost;
    char lost_reason[REASON_LEN];

    /* Attribution of on_publish callbacks (see on_mosq_publish). */
    bool in_qos0_call;
    bool qos0_written_now;
    mid_fifo_t qos0;

    uv_timer_t misc_timer;
    uv_timer_t retry_timer;
    uv_timer_t stop_timer;
    uv_timer_t sub_timer; /* re-sends refused subscriptions */
    bool ev_suback;       /* a SUBACK changed what is refused: status and retry follow */

    /* Backoff and complaining: once per episode, once on recovery. */
    uint32_t backoff_ms;
    bool in_outage; /* an outage was reported (logged, on_disconnect called) */
    bool ever_connected;
    unsigned failed_attempts;

    sub_t *subs;
    size_t nsubs, subs_cap;

    pending_t *pending; /* open addressing, capacity pending_mask + 1 (a power of two) */
    size_t pending_mask;
    size_t inflight;

    smp_bridge_session_t ses; /* Sparkplug: ses.will != NULL (smp_bridge_set_session) */
    const char *will_topic;   /* the current connection's Will (Sparkplug) */
    const void *will_payload;
    size_t will_len;
    bool keep_backoff;  /* the last connection was dropped on purpose (smp_bridge_drop) */
    bool resolve_stale; /* settings changed while resolving: resolve again (a reload) */
};

static void begin_attempt(smp_bridge_t *b);
static int send_subscribe(smp_bridge_t *b, sub_t *s);
static void after_io(smp_bridge_t *b);
static void finish_stop(smp_bridge_t *b);
static void on_misc(uv_timer_t *t);

/* ---- small helpers ------------------------------------------------------------------------ */

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static char *dup_str(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d != NULL) {
        memcpy(d, s, n);
    }
    return d;
}

/* MOSQ_ERR_* to a negative errno, at the boundary (style.md: mosquitto's codes never leak). */
static int mosq_to_errno(int rc, int saved_errno)
{
    switch (rc) {
    case MOSQ_ERR_SUCCESS:
        return 0;
    case MOSQ_ERR_NOMEM:
        return -ENOMEM;
    case MOSQ_ERR_INVAL:
    case MOSQ_ERR_MALFORMED_UTF8:
        return -EINVAL;
    case MOSQ_ERR_NO_CONN:
    case MOSQ_ERR_CONN_LOST:
        return -ENOTCONN;
    case MOSQ_ERR_CONN_REFUSED:
        return -ECONNREFUSED;
    case MOSQ_ERR_PAYLOAD_SIZE:
    case MOSQ_ERR_OVERSIZE_PACKET:
        return -EMSGSIZE;
    case MOSQ_ERR_NOT_SUPPORTED:
    case MOSQ_ERR_QOS_NOT_SUPPORTED:
        return -ENOTSUP;
    case MOSQ_ERR_AUTH:
    case MOSQ_ERR_ACL_DENIED:
        return -EACCES;
    case MOSQ_ERR_KEEPALIVE:
        return -ETIMEDOUT;
    case MOSQ_ERR_EAI:
        return -EHOSTUNREACH;
    case MOSQ_ERR_ERRNO:
        return saved_errno > 0 ? -saved_errno : -EIO;
    default:
        return -EPROTO;
    }
}

/* Copies a library message without its final full stop: it is embedded in a longer line. */
static void copy_reason(char *buf, size_t n, const char *msg)
{
    snprintf(buf, n, "%s", msg);
    size_t len = strlen(buf);
    if (len > 0 && buf[len - 1] == '.') {
        buf[len - 1] = '\0';
    }
}

static void describe_mosq_err(char *buf, size_t n, int rc, int saved_errno)
{
    if (rc == MOSQ_ERR_ERRNO && saved_errno > 0) {
        copy_reason(buf, n, strerror(saved_errno));
    } else if (rc == MOSQ_ERR_EAI) {
        /* libmosquitto stores the getaddrinfo() code in errno. */
        copy_reason(buf, n, gai_strerror(saved_errno));
    } else {
        copy_reason(buf, n, mosquitto_strerror(rc));
    }
}

/* ---- in-flight table ------------------------------------------------------------------------ */

static size_t pending_slot(const smp_bridge_t *b, uint16_t mid)
{
    /* Mids are sequential: a multiplicative hash spreads neighbours over the table. */
    return ((size_t)mid * 40503u) & b->pending_mask;
}

static int pending_put(smp_bridge_t *b, uint16_t mid, uint64_t token)
{
    /* Keep at least half the table free so probes stay short and always end. */
    if (b->inflight + 1 > (b->pending_mask + 1) / 2) {
        return -ENOBUFS;
    }
    size_t i = pending_slot(b, mid);
    while (b->pending[i].mid != 0 && b->pending[i].mid != mid) {
        i = (i + 1) & b->pending_mask;
    }
    if (b->pending[i].mid == 0) {
        b->inflight++;
    }
    b->pending[i].mid = mid;
    b->pending[i].token = token;
    return 0;
}

static bool pending_take(smp_bridge_t *b, uint16_t mid, uint64_t *token)
{
    size_t i = pending_slot(b, mid);
    while (b->pending[i].mid != mid) {
        if (b->pending[i].mid == 0) {
            return false;
        }
        i = (i + 1) & b->pending_mask;
    }
    *token = b->pending[i].token;
    b->pending[i].mid = 0;
    b->inflight--;
    /* Backward-shift deletion: move later members of the probe run into the hole so lookups
     * never stop early at it (no tombstones to clean up). */
    size_t hole = i;
    size_t j = (i + 1) & b->pending_mask;
    while (b->pending[j].mid != 0) {
        size_t home = pending_slot(b, b->pending[j].mid);
        /* Entry j may move to the hole only if its home is not cyclically in (hole, j]. */
        bool home_in_range = hole <= j ? (home > hole && home <= j) : (home > hole || home <= j);
        if (!home_in_range) {
            b->pending[hole] = b->pending[j];
            b->pending[j].mid = 0;
            hole = j;
        }
        j = (j + 1) & b->pending_mask;
    }
    return true;
}

static void pending_clear(smp_bridge_t *b)
{
    memset(b->pending, 0, (b->pending_mask + 1) * sizeof *b->pending);
    b->inflight = 0;
}

static int fifo_push(mid_fifo_t *f, uint16_t mid)
{
    if (f->len == f->cap) {
        size_t cap = f->cap != 0 ? f->cap * 2 : 64;
        uint16_t *buf = malloc(cap * sizeof *buf);
        if (buf == NULL) {
            return -ENOMEM;
        }
        for (size_t i = 0; i < f->len; i++) {
            buf[i] = f->buf[(f->head + i) % f->cap];
        }
        free(f->buf);
        f->buf = buf;
        f->cap = cap;
        f->head = 0;
    }
    f->buf[(f->head + f->len) % f->cap] = mid;
    f->len++;
    return 0;
}

static bool fifo_pop_if(mid_fifo_t *f, uint16_t mid)
{
    if (f->len == 0 || f->buf[f->head] != mid) {
        return false;
    }
    f->head = (f->head + 1) % f->cap;
    f->len--;
    return true;
}

/* ---- uv handles ----------------------------------------------------------------------------- */

static void maybe_stopped(smp_bridge_t *b)
{
    if (b->state != ST_CLOSING || b->pending_closes != 0 || b->gai != NULL) {
        return;
    }
    b->state = ST_STOPPED;
    /* Last thing: the callee may free the bridge. */
    if (b->cbs.on_stopped != NULL) {
        b->cbs.on_stopped(b->arg);
    }
}

static void on_handle_closed(uv_handle_t *h)
{
    smp_bridge_t *b = h->data;
    b->pending_closes--;
    maybe_stopped(b);
}

static void on_poll_closed(uv_handle_t *h)
{
    smp_bridge_t *b = h->data;
    free(h);
    b->pending_closes--;
    maybe_stopped(b);
}

static void poll_close(smp_bridge_t *b)
{
    if (b->poll == NULL) {
        return;
    }
    /* uv_close stops the watcher at once (the fd leaves epoll and libuv's fd table now), only
     * the memory waits for the close callback. Callers close the handle before libmosquitto
     * closes the socket wherever they can, so the epoll removal happens while the fd is still
     * ours; where libmosquitto closed it first (a read error), the kernel already dropped it
     * from epoll, and FD_CLOEXEC (set in try_connect) makes sure no exec'd child keeps the
     * description alive. Either way the next connection, even on the same fd number, gets a
     * new handle and libuv never sees two handles for one fd. */
    uv_close((uv_handle_t *)b->poll, on_poll_closed);
    b->poll = NULL;
    b->poll_events = 0;
    b->pending_closes++;
}

static void on_poll(uv_poll_t *h, int status, int events);

static void poll_update(smp_bridge_t *b)
{
    if (b->poll == NULL || b->mosq == NULL) {
        return;
    }
    int want = UV_READABLE | (mosquitto_want_write(b->mosq) ? UV_WRITABLE : 0);
    if (want != b->poll_events) {
        int rc = uv_poll_start(b->poll, want, on_poll);
        if (rc < 0) {
            LOG_ERR(SCOPE, "uv_poll_start: %s", uv_strerror(rc));
            return;
        }
        b->poll_events = want;
    }
}

/* ---- libmosquitto callbacks: record, or deliver what cannot wait ---------------------------- */

/* A failed TLS handshake says why (tls.h), where libmosquitto has only "TLS error". */
static void tls_reason(const smp_bridge_t *b, char *buf, size_t n)
{
    if (b->tls && b->tls_diag.refusal[0] != '\0') {
        copy_reason(buf, n, b->tls_diag.refusal);
    }
}

static void mark_lost(smp_bridge_t *b, int rc, int saved_errno)
{
    if (b->ev_lost) {
        return;
    }
    b->ev_lost = true;
    describe_mosq_err(b->lost_reason, sizeof b->lost_reason, rc, saved_errno);
    tls_reason(b, b->lost_reason, sizeof b->lost_reason);
}

static void on_mosq_connect(struct mosquitto *m, void *obj, int rc, int flags,
                            const mosquitto_property *props)
{
    smp_bridge_t *b = obj;
    (void)m;
    (void)flags;
    (void)props;
    b->ev_connack = true;
    b->connack_rc = rc;
}

static void on_mosq_disconnect(struct mosquitto *m, void *obj, int rc,
                               const mosquitto_property *props)
{
    int saved_errno = errno;
    smp_bridge_t *b = obj;
    (void)m;
    (void)props;
    if (rc == MOSQ_ERR_SUCCESS && !b->ev_lost) {
        /* Our own DISCONNECT, or the broker's (MQTT 5), after which libmosquitto reports 0. */
        b->ev_lost = true;
        snprintf(b->lost_reason, sizeof b->lost_reason, "connection closed");
    } else {
        mark_lost(b, rc, saved_errno);
    }
}

/* libmosquitto reports two different events through on_publish: the PUBACK of a QoS 1 message
 * (from handle__pubackcomp, while reading) and the moment a QoS 0 message has been written to
 * the socket (from packet__write). Both carry only the mid, and mids come from one 16-bit
 * counter that wraps: a QoS 0 publish made while a QoS 1 message waits for its PUBACK can carry
 * the same mid, and taking its write for the PUBACK would acknowledge, and let the caller delete
 * from its outbox, a message the broker never confirmed. QoS 0 packets leave in the order they
 * were queued, so the bridge keeps their mids in a FIFO: a report for the mid at the head of it
 * is a QoS 0 write, anything else is a PUBACK. During a QoS 0 mosquitto_publish() call, every
 * report is a write (nothing is read there); one that is not at the head is the message being
 * published itself, written before its mid could be queued. */
static void on_mosq_publish(struct mosquitto *m, void *obj, int mid, int reason_code,
                            const mosquitto_property *props)
{
    smp_bridge_t *b = obj;
    (void)m;
    (void)props;
    if (mid <= 0 || mid > UINT16_MAX) {
        return;
    }
    if (fifo_pop_if(&b->qos0, (uint16_t)mid)) {
        return;
    }
    if (b->in_qos0_call) {
        b->qos0_written_now = true;
        return;
    }
    uint64_t token;
    if (!pending_take(b, (uint16_t)mid, &token)) {
        return; /* not ours any more: forgotten on a disconnect */
    }
    if (reason_code >= 0x80) {
        /* MQTT 5: the broker refused the message. It is not delivered, so it is not
         * acknowledged: the caller keeps it and sends it again later. */
        LOG_WARN(SCOPE, "broker refused publish (mid %d): %s (0x%02x)", mid,
                 mosquitto_reason_string(reason_code), (unsigned)reason_code);
        return;
    }
    if (token != 0 && b->cbs.on_ack != NULL) {
        b->cbs.on_ack(b->arg, token);
    }
}

static void on_mosq_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg,
                            const mosquitto_property *props)
{
    smp_bridge_t *b = obj;
    (void)m;
    char *response_topic = NULL;
    void *corr = NULL;
    uint16_t corr_len = 0;
    if (props != NULL) {
        /* Both allocate copies; freed below. */
        mosquitto_property_read_string(props, MQTT_PROP_RESPONSE_TOPIC, &response_topic, false);
        mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false);
    }
    smp_mqtt_props_t p = {
        .response_topic = response_topic,
        .correlation_data = corr,
        .correlation_len = corr != NULL ? corr_len : 0,
        .retained = msg->retain,
    };
    if (b->cbs.on_message != NULL) {
        b->cbs.on_message(b->arg, msg->topic, msg->payload,
                          msg->payloadlen > 0 ? (size_t)msg->payloadlen : 0, &p);
    }
    free(response_topic);
    free(corr);
}

/* A SUBACK: a granted QoS of 0x80 or more is a refusal (MQTT 5 reason codes, or 3.1.1's
 * 0x80). Only recorded here; after_io republishes the status and schedules the retry. */
static void on_mosq_subscribe(struct mosquitto *m, void *obj, int mid, int qos_count,
                              const int *granted_qos, const mosquitto_property *props)
{
    smp_bridge_t *b = obj;
    (void)m;
    (void)props;
    for (size_t i = 0; i < b->nsubs; i++) {
        sub_t *s = &b->subs[i];
        if (s->mid != mid || mid == 0) {
            continue;
        }
        s->mid = 0;
        bool refused = qos_count < 1 || granted_qos[0] >= 0x80;
        if (refused) {
            LOG_ERR(SCOPE, "broker refused the subscription to %s (0x%02x)%s; retrying every %d s",
                    s->topic, qos_count > 0 ? (unsigned)granted_qos[0] : 0u,
                    s->refused ? " again" : "", SUB_RETRY_MS / 1000);
        } else if (s->refused) {
            LOG_INFO(SCOPE, "subscribed to %s after it had been refused", s->topic);
        }
        if (refused != s->refused) {
            b->ev_suback = true;
        }
        s->refused = refused;
        if (refused) {
            b->ev_suback = true; /* schedule the retry */
        }
    }
}

static void on_mosq_log(struct mosquitto *m, void *obj, int level, const char *str)
{
    (void)m;
    (void)obj;
    (void)level;
    LOG_DEBUG(SCOPE, "libmosquitto: %s", str);
}

/* ---- publishing ----------------------------------------------------------------------------- */

/* Publishes on the current connection without the state and window checks of the public
 * function (the status messages use it too). QoS 1 messages are tracked for their PUBACK. */
static int do_publish(smp_bridge_t *b, const char *topic, const void *payload, size_t len, int qos,
                      bool retain, uint64_t token, const smp_mqtt_props_t *props)
{
    mosquitto_property *plist = NULL;
    if (props != NULL && b->version == MQTT_PROTOCOL_V5 && props->correlation_data != NULL &&
        props->correlation_len > 0) {
        if (props->correlation_len > UINT16_MAX) {
            return -EINVAL;
        }
        int rc = mosquitto_property_add_binary(&plist, MQTT_PROP_CORRELATION_DATA,
                                               props->correlation_data,
                                               (uint16_t)props->correlation_len);
        if (rc != MOSQ_ERR_SUCCESS) {
            mosquitto_property_free_all(&plist);
            return mosq_to_errno(rc, errno);
        }
    }

    int mid = 0;
    b->in_qos0_call = qos == 0;
    b->qos0_written_now = false;
    errno = 0;
    int rc = mosquitto_publish_v5(b->mosq, &mid, topic, (int)len, payload, qos, retain, plist);
    int saved_errno = errno;
    b->in_qos0_call = false;
    mosquitto_property_free_all(&plist);

    if (qos == 0 && mid > 0 && !b->qos0_written_now) {
        /* Queued, not yet written (or queued and failed; the connection then goes down and
         * the FIFO is cleared with it). */
        if (fifo_push(&b->qos0, (uint16_t)mid) < 0) {
            LOG_WARN(SCOPE, "out of memory tracking QoS 0 publishes");
        }
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        /* A QoS 1 message may sit in libmosquitto's queue now; it dies with the connection,
         * which is failing. Not tracked, so never acknowledged: the caller keeps it. */
        LOG_DEBUG(SCOPE, "publish on %s failed: %s", topic, mosquitto_strerror(rc));
        poll_update(b);
        return mosq_to_errno(rc, saved_errno);
    }
    if (qos == 1) {
        int prc = pending_put(b, (uint16_t)mid, token);
        if (prc < 0) {
            /* Cannot happen with the window enforced; never fabricate an ack for it. */
            LOG_ERR(SCOPE, "in-flight table full; mid %d will not be acknowledged", mid);
        }
    }
    poll_update(b);
    return 0;
}

static int publish_status(smp_bridge_t *b, const char *state)
{
    if (b->ses.will != NULL) {
        /* Sparkplug has no status topic: its clean stop is the NDEATH, published here on MQTT
         * 3.1.1; on MQTT 5 the DISCONNECT with reason 0x04 has the broker send the Will. */
        if (strcmp(state, "offline") != 0 || b->version == MQTT_PROTOCOL_V5) {
            return 0;
        }
        return do_publish(b, b->will_topic, b->will_payload, b->will_len, /* qos = */ 1,
                          /* retain = */ false, /* token = */ 0, NULL);
    }
    /* Online but deaf to what it cannot subscribe to: the status says so. */
    const sub_t *bad = NULL;
    for (size_t i = 0; i < b->nsubs && strcmp(state, "online") == 0; i++) {
        if (b->subs[i].refused) {
            bad = &b->subs[i];
            break;
        }
    }
    char payload[96 + 512];
    int n =
        snprintf(payload, sizeof payload, "{\"state\":\"%s\",\"version\":\"%s\",\"ts\":%" PRIu64,
                 state, SMP_VERSION, wall_ms());
    if (bad != NULL) {
        /* The topic as a JSON string: ours are made of names and the prefix, but escape the
         * two characters JSON needs escaped anyway. */
        n += snprintf(payload + n, sizeof payload - (size_t)n, ",\"error\":\"subscribe refused: ");
        for (const char *c = bad->topic; *c != '\0' && (size_t)n < sizeof payload - 8; c++) {
            if (*c == '"' || *c == '\\') {
                payload[n++] = '\\';
            }
            payload[n++] = *c;
        }
        n += snprintf(payload + n, sizeof payload - (size_t)n, "\"");
    }
    n += snprintf(payload + n, sizeof payload - (size_t)n, "}");
    return do_publish(b, b->status_topic, payload, (size_t)n, /* qos = */ 1, /* retain = */ true,
                      /* token = */ 0, NULL);
}

static void on_sub_timer(uv_timer_t *t)
{
    smp_bridge_t *b = t->data;
    if (b->state != ST_CONNECTED || b->stopping) {
        return;
    }
    for (size_t i = 0; i < b->nsubs; i++) {
        if (b->subs[i].refused && b->subs[i].mid == 0) {
            int rc = send_subscribe(b, &b->subs[i]);
            if (rc < 0) {
                LOG_WARN(SCOPE, "cannot subscribe to %s: %s", b->subs[i].topic, strerror(-rc));
            }
        }
    }
    poll_update(b);
}

/* After a SUBACK that refused a subscription, or granted one that had been refused: the
 * status tells, and refused ones are asked for again later. */
static void after_suback(smp_bridge_t *b)
{
    b->ev_suback = false;
    if (b->state != ST_CONNECTED || b->stopping) {
        return;
    }
    int rc = publish_status(b, "online");
    if (rc < 0) {
        LOG_WARN(SCOPE, "cannot publish the status: %s", strerror(-rc));
    }
    for (size_t i = 0; i < b->nsubs; i++) {
        if (b->subs[i].refused && !uv_is_active((uv_handle_t *)&b->sub_timer)) {
            uv_timer_start(&b->sub_timer, on_sub_timer, SUB_RETRY_MS, 0);
        }
    }
}

/* ---- connection lifecycle ------------------------------------------------------------------- */

/* Ends the current connection, if any: poll handle first (see poll_close), then the instance. */
static void teardown_conn(smp_bridge_t *b, bool send_disconnect)
{
    poll_close(b);
    if (b->timers_init) {
        uv_timer_stop(&b->misc_timer);
    }
    if (b->mosq != NULL) {
        if (send_disconnect) {
            /* Queues DISCONNECT and, the socket permitting, writes it (and whatever was queued
             * before it) right now. If the socket cannot take it, the socket is closed below
             * without it and the broker publishes the Will, which says offline as well. */
            if (b->ses.will != NULL && b->version == MQTT_PROTOCOL_V5) {
                mosquitto_disconnect_v5(b->mosq, MQTT_RC_DISCONNECT_WITH_WILL_MSG, NULL);
            } else {
                mosquitto_disconnect(b->mosq);
            }
        }
        mosquitto_destroy(b->mosq);
        b->mosq = NULL;
    }
    /* Never acknowledged now: the caller's outbox keeps those messages. */
    pending_clear(b);
    for (size_t i = 0; i < b->nsubs; i++) {
        b->subs[i].mid = 0; /* no SUBACK comes for this connection's SUBSCRIBEs any more */
    }
    b->qos0.head = b->qos0.len = 0;
    b->ev_connack = false;
    b->ev_lost = false;
}

static void on_retry(uv_timer_t *t)
{
    begin_attempt(t->data);
}

/* An attempt failed, or a connection was lost: complain once per episode, call on_disconnect
 * once per episode, and retry after the backoff delay (1 s doubling to 30 s). */
static void attempt_failed(smp_bridge_t *b, bool was_connected, const char *reason)
{
    if (!was_connected) {
        b->failed_attempts++;
    }
    b->state = ST_BACKOFF;
    uint32_t delay = b->backoff_ms;
    b->backoff_ms = b->backoff_ms >= BACKOFF_MAX_MS / 2 ? BACKOFF_MAX_MS : b->backoff_ms * 2;
    uv_timer_start(&b->retry_timer, on_retry, delay, 0);

    bool first = !b->in_outage;
    if (first) {
        b->in_outage = true;
        LOG_WARN(SCOPE, "%s %s:%d: %s; retrying with backoff (1 s doubling to 30 s)",
                 was_connected ? "lost connection to" : "cannot connect to", b->host, b->port,
                 reason);
    } else {
        LOG_DEBUG(SCOPE, "attempt %u to %s:%d failed: %s; next in %" PRIu32 " ms",
                  b->failed_attempts, b->host, b->port, reason, delay);
    }
    /* Last: the callee may call back into the bridge (smp_bridge_stop, for one). */
    if (first && b->cbs.on_disconnect != NULL) {
        b->cbs.on_disconnect(b->arg);
    }
}

/* Applies the configuration to a fresh instance: protocol version, window, Will, credentials,
 * TLS, callbacks. Returns a MOSQ_ERR_* code. */
static int configure(smp_bridge_t *b, struct mosquitto *m)
{
    int rc = mosquitto_int_option(m, MOSQ_OPT_PROTOCOL_VERSION, b->version);
    if (rc != MOSQ_ERR_SUCCESS) {
        return rc;
    }
    /* Small packets (PUBACKs, command results) must not wait for Nagle's algorithm to meet the
     * peer's delayed ACK: that costs 40 ms a round trip on Linux. */
    rc = mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    if (rc != MOSQ_ERR_SUCCESS) {
        return rc;
    }
    /* The caller's window, its reserved room, and one more: the retained offline status at
     * stop may join a full window, and libmosquitto should send it rather than hold it back.
     * (With MQTT 5 the broker's Receive Maximum can lower libmosquitto's own limit; the excess
     * then waits in libmosquitto's queue and still counts as in flight here.) */
    rc = mosquitto_max_inflight_messages_set(m,
                                             (unsigned)b->inflight_max + SMP_BRIDGE_RESERVED + 1u);
    if (rc != MOSQ_ERR_SUCCESS) {
        return rc;
    }
    /* The Will's ts is the time of the connection attempt: the broker sends it unchanged. */
    char will[96];
    int n =
        snprintf(will, sizeof will, "{\"state\":\"offline\",\"version\":\"%s\",\"ts\":%" PRIu64 "}",
                 SMP_VERSION, wall_ms());
    if (b->ses.will != NULL) {
        b->ses.will(b->ses.arg, &b->will_topic, &b->will_payload, &b->will_len);
        rc = mosquitto_will_set(m, b->will_topic, (int)b->will_len, b->will_payload,
                                /* qos = */ 1, /* retain = */ false);
    } else {
        rc = mosquitto_will_set(m, b->status_topic, n, will, /* qos = */ 1, /* retain = */ true);
    }
    if (rc != MOSQ_ERR_SUCCESS) {
        return rc;
    }
    if (b->cfg->mqtt.username != NULL) {
        rc = mosquitto_username_pw_set(m, b->cfg->mqtt.username, b->cfg->mqtt.password);
        if (rc != MOSQ_ERR_SUCCESS) {
            return rc;
        }
    }
    if (b->tls) {
        rc = smp__tls_configure(m, b->cfg, b->host, &b->tls_diag);
        if (rc != MOSQ_ERR_SUCCESS) {
            return rc;
        }
    }
    mosquitto_connect_v5_callback_set(m, on_mosq_connect);
    mosquitto_disconnect_v5_callback_set(m, on_mosq_disconnect);
    mosquitto_publish_v5_callback_set(m, on_mosq_publish);
    mosquitto_message_v5_callback_set(m, on_mosq_message);
    mosquitto_subscribe_v5_callback_set(m, on_mosq_subscribe);
    /* libmosquitto formats a log line for every packet whenever a log callback is set, so set
     * it only when those lines will be printed: it costs ~10 % of the CPU of a replay. */
    if (smp__log_level >= SMP_LOG_DEBUG) {
        mosquitto_log_callback_set(m, on_mosq_log);
    }
    return MOSQ_ERR_SUCCESS;
}

/* Starts one non-blocking connection attempt to `host` (a numeric address, or with TLS the host
 * name). Returns 0 when the attempt is under way (its outcome arrives through the poll handle),
 * or a negative code with `reason` filled in. */
static int try_connect(smp_bridge_t *b, const char *host, char *reason, size_t reason_len)
{
    struct mosquitto *m = mosquitto_new(b->client_id, /* clean_start = */ true, b);
    if (m == NULL) {
        snprintf(reason, reason_len, "mosquitto_new: %s", strerror(errno));
        return -ENOMEM;
    }
    int rc = configure(b, m);
    if (rc != MOSQ_ERR_SUCCESS) {
        /* Typically a TLS file that cannot be read: retried like any failure, so that fixing
         * the file is enough. */
        char why[96]; /* library messages are short; this keeps the line within REASON_LEN */
        int saved_errno = errno;
        describe_mosq_err(why, sizeof why, rc, saved_errno);
        snprintf(reason, reason_len, "cannot configure the client (credentials, TLS files): %.100s",
                 b->tls && b->tls_diag.refusal[0] != '\0' ? b->tls_diag.refusal : why);
        mosquitto_destroy(m);
        return mosq_to_errno(rc, saved_errno);
    }
    errno = 0;
    rc = mosquitto_connect_async(m, host, b->port, b->keepalive);
    int saved_errno = errno;
    if (rc != MOSQ_ERR_SUCCESS) {
        describe_mosq_err(reason, reason_len, rc, saved_errno);
        tls_reason(b, reason, reason_len);
        mosquitto_destroy(m);
        return mosq_to_errno(rc, saved_errno);
    }
    int fd = mosquitto_socket(m);
    if (fd < 0) {
        snprintf(reason, reason_len, "no socket after connect");
        mosquitto_destroy(m);
        return -ENOTCONN;
    }
    /* libmosquitto does not create its sockets close-on-exec. A child that inherited this one
     * would keep the connection (and its epoll registration) alive after we close it. */
    int fdflags = fcntl(fd, F_GETFD);
    if (fdflags >= 0) {
        (void)fcntl(fd, F_SETFD, fdflags | FD_CLOEXEC);
    }
    uv_poll_t *p = malloc(sizeof *p);
    if (p == NULL) {
        snprintf(reason, reason_len, "out of memory");
        mosquitto_destroy(m);
        return -ENOMEM;
    }
    int urc = uv_poll_init_socket(b->loop, p, fd);
    if (urc < 0) {
        snprintf(reason, reason_len, "uv_poll_init_socket: %s", uv_strerror(urc));
        free(p);
        mosquitto_destroy(m);
        return urc;
    }
    p->data = b;
    b->mosq = m;
    b->poll = p;
    b->poll_events = 0;
    b->ev_connack = false;
    b->ev_lost = false;
    b->state = ST_CONNECTING;
    poll_update(b); /* CONNECT is queued: readable and writable */
    uv_timer_start(&b->misc_timer, on_misc, MISC_INTERVAL_MS, MISC_INTERVAL_MS);
    return 0;
}

/* Tries the resolved addresses from addr_idx on, until one attempt is under way. */
static void connect_next(smp_bridge_t *b)
{
    char reason[REASON_LEN] = "no address";
    while (b->addr_idx < b->naddrs) {
        const char *addr = b->addrs[b->addr_idx];
        if (try_connect(b, addr, reason, sizeof reason) == 0) {
            LOG_DEBUG(SCOPE, "connecting to %s:%d (%s)", b->host, b->port, addr);
            return;
        }
        LOG_DEBUG(SCOPE, "connect to %s port %d failed: %s", addr, b->port, reason);
        b->addr_idx++;
    }
    attempt_failed(b, false, reason);
}

static void on_resolved(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    smp_bridge_t *b = req->data;
    free(req);
    b->gai = NULL;
    if (b->stopping) {
        /* Cancelled by finish_stop (or it completed anyway): the bridge is closing. */
        uv_freeaddrinfo(res);
        maybe_stopped(b);
        return;
    }
    if (b->resolve_stale) {
        b->resolve_stale = false;
        uv_freeaddrinfo(res);
        begin_attempt(b);
        return;
    }
    if (status < 0) {
        char reason[REASON_LEN];
        snprintf(reason, sizeof reason, "cannot resolve host name: %s", uv_strerror(status));
        attempt_failed(b, false, reason);
        return;
    }
    b->naddrs = 0;
    for (struct addrinfo *ai = res; ai != NULL && b->naddrs < MAX_ADDRS; ai = ai->ai_next) {
        char *dst = b->addrs[b->naddrs];
        int rc = -1;
        if (ai->ai_family == AF_INET) {
            rc = uv_ip4_name((const struct sockaddr_in *)ai->ai_addr, dst, INET6_ADDRSTRLEN);
        } else if (ai->ai_family == AF_INET6) {
            rc = uv_ip6_name((const struct sockaddr_in6 *)ai->ai_addr, dst, INET6_ADDRSTRLEN);
        }
        if (rc == 0) {
            b->naddrs++;
        }
    }
    uv_freeaddrinfo(res);
    b->addr_idx = 0;
    connect_next(b);
}

/* One connection attempt: resolve off the loop, then connect to the numeric address.
 *
 * With TLS the attempt connects by host name instead, because libmosquitto checks the broker's
 * certificate against the name it was given to connect to (and sends it as SNI); it then
 * resolves the name itself, with a blocking getaddrinfo() on the loop thread. That is instant
 * for a numeric address or a name in /etc/hosts; a TLS deployment that names its broker in DNS
 * accepts that lookup on the loop (see docs/mqtt-bridge.md). */
static void begin_attempt(smp_bridge_t *b)
{
    if (b->tls) {
        char reason[REASON_LEN];
        b->naddrs = 0;
        if (try_connect(b, b->host, reason, sizeof reason) < 0) {
            attempt_failed(b, false, reason);
        }
        return;
    }
    uv_getaddrinfo_t *req = malloc(sizeof *req);
    if (req == NULL) {
        attempt_failed(b, false, "out of memory");
        return;
    }
    req->data = b;
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    b->state = ST_RESOLVING;
    b->gai = req;
    int rc = uv_getaddrinfo(b->loop, req, on_resolved, b->host, NULL, &hints);
    if (rc < 0) {
        /* The callback will not run. */
        free(req);
        b->gai = NULL;
        char reason[REASON_LEN];
        snprintf(reason, sizeof reason, "uv_getaddrinfo: %s", uv_strerror(rc));
        attempt_failed(b, false, reason);
    }
}

/* Sends one SUBSCRIBE. With MQTT 5 the broker is asked not to send retained messages at all
 * (retain handling 2): a retained command is one published before this subscription, never a
 * request to act now. MQTT 3 has no such option; the caller sees the retain flag instead. */
static int send_subscribe(smp_bridge_t *b, sub_t *s)
{
    int opts = 0;
    if (b->version == MQTT_PROTOCOL_V5) {
        opts |= MQTT_SUB_OPT_SEND_RETAIN_NEVER;
    }
    errno = 0;
    int mid = 0;
    int rc = mosquitto_subscribe_v5(b->mosq, &mid, s->topic, s->qos, opts, NULL);
    int saved = errno;
    s->mid = rc == MOSQ_ERR_SUCCESS ? mid : 0;
    return mosq_to_errno(rc, saved);
}

/* CONNACK accepted: restore the subscriptions, announce the gateway, tell the caller. */
static void on_connected(smp_bridge_t *b)
{
    b->state = ST_CONNECTED;
    const char *addr = b->addr_idx < b->naddrs ? b->addrs[b->addr_idx] : b->host;
    if (b->in_outage) {
        /* The one line of recovery for the episode that attempt_failed reported. */
        LOG_INFO(SCOPE, "%s %s:%d (%s) after %u failed attempt(s)",
                 b->ever_connected ? "reconnected to" : "connected to", b->host, b->port, addr,
                 b->failed_attempts);
    } else {
        LOG_INFO(SCOPE, "connected to %s:%d (%s)", b->host, b->port, addr);
    }
    if (b->tls && b->cfg->mqtt.tls_no_verify) {
        LOG_WARN(SCOPE,
                 "TLS without verification (mqtt.tls.verify is false): the broker's "
                 "certificate was not checked; anyone on the path can pose as %s",
                 b->host);
    }
    b->in_outage = false;
    b->ever_connected = true;
    b->failed_attempts = 0;
    if (!b->keep_backoff) {
        b->backoff_ms = BACKOFF_MIN_MS;
    }
    b->keep_backoff = false;

    /* Subscriptions go out before the online status: the broker handles one client's packets
     * in order, so a platform that sees "online" can send commands and they are delivered. */
    int rc;
    for (size_t i = 0; i < b->nsubs; i++) {
        rc = send_subscribe(b, &b->subs[i]);
        if (rc < 0) {
            LOG_WARN(SCOPE, "cannot subscribe to %s: %s", b->subs[i].topic, strerror(-rc));
        }
    }
    rc = publish_status(b, "online");
    if (rc < 0) {
        LOG_WARN(SCOPE, "cannot publish online status: %s", strerror(-rc));
    }
    poll_update(b);
    if (b->cbs.on_connect != NULL) {
        b->cbs.on_connect(b->arg);
    }
}

/* The connection ended without a stop: forget it, then try the next address of this resolution
 * (only before a CONNACK) or back off. */
static void conn_lost(smp_bridge_t *b)
{
    bool was_connected = b->state == ST_CONNECTED;
    char reason[REASON_LEN + 64];
    if (b->ev_connack && b->connack_rc != 0) {
        char why[REASON_LEN];
        copy_reason(why, sizeof why,
                    b->version == MQTT_PROTOCOL_V5 ? mosquitto_reason_string(b->connack_rc)
                                                   : mosquitto_connack_string(b->connack_rc));
        snprintf(reason, sizeof reason, "broker refused the connection: %s", why);
    } else {
        snprintf(reason, sizeof reason, "%s", b->lost_reason);
    }
    teardown_conn(b, /* send_disconnect = */ false);
    if (b->stopping) {
        /* Lost while draining for a stop: nothing left to wait for. */
        b->state = ST_BACKOFF;
        finish_stop(b);
        if (was_connected && b->cbs.on_disconnect != NULL) {
            b->cbs.on_disconnect(b->arg);
        }
        return;
    }
    if (!was_connected && b->addr_idx + 1 < b->naddrs) {
        LOG_DEBUG(SCOPE, "%s port %d: %s; trying the next address", b->addrs[b->addr_idx], b->port,
                  reason);
        b->addr_idx++;
        connect_next(b);
        return;
    }
    attempt_failed(b, was_connected, reason);
}

/* Runs after every call into libmosquitto made from the loop (never from inside one of its
 * callbacks): acts on what the callbacks recorded. */
static void after_io(smp_bridge_t *b)
{
    if (b->ev_lost) {
        conn_lost(b);
        return;
    }
    if (b->ev_connack) {
        b->ev_connack = false;
        if (b->connack_rc == 0 && b->state == ST_CONNECTING) {
            on_connected(b); /* calls on_connect, which may call smp_bridge_stop */
        }
        /* A refusal is followed by an error from the same read (ev_lost above). */
    }
    if (b->ev_suback) {
        after_suback(b);
    }
    if (b->state == ST_CONNECTED && b->stopping && b->inflight == 0) {
        finish_stop(b);
        return;
    }
    poll_update(b);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    smp_bridge_t *b = h->data;
    if (b->mosq == NULL) {
        return;
    }
    int rc;
    if (status < 0) {
        /* libuv reports EPOLLERR as an error and stops the watcher. A read lets libmosquitto
         * see the socket's error (a refused connect, a reset), close it and say why. */
        rc = mosquitto_loop_read(b->mosq, 1);
        if (rc != MOSQ_ERR_SUCCESS) {
            mark_lost(b, rc, errno);
        } else if (!b->ev_lost) {
            b->ev_lost = true;
            snprintf(b->lost_reason, sizeof b->lost_reason, "socket error: %s",
                     uv_strerror(status));
        }
        after_io(b);
        return;
    }
    /* During a TLS handshake libmosquitto advances SSL_connect only from loop_read (loop_write
     * waits for the handshake to finish), whichever direction the handshake is waiting for. */
    bool tls_handshake = b->tls && b->state == ST_CONNECTING;
    if ((events & UV_READABLE) || tls_handshake) {
        rc = mosquitto_loop_read(b->mosq, 1);
        if (rc != MOSQ_ERR_SUCCESS) {
            mark_lost(b, rc, errno);
        }
    }
    /* After a failed read the socket is closed: a write would only report that again. */
    if ((events & UV_WRITABLE) && !b->ev_lost) {
        rc = mosquitto_loop_write(b->mosq, 1);
        if (rc != MOSQ_ERR_SUCCESS) {
            mark_lost(b, rc, errno);
        }
    }
    after_io(b);
}

static void on_misc(uv_timer_t *t)
{
    smp_bridge_t *b = t->data;
    if (b->mosq == NULL) {
        return;
    }
    /* Keepalive: sends PINGREQ when due, and closes the socket when the broker stays silent
     * for the keepalive period (which also bounds the wait for a CONNACK). */
    int rc = mosquitto_loop_misc(b->mosq);
    if (rc != MOSQ_ERR_SUCCESS) {
        mark_lost(b, rc, errno);
    }
    after_io(b);
}

/* Ends everything: the connection (with DISCONNECT if it was up), the pending resolution, the
 * timers. on_stopped follows from the last close callback. */
static void finish_stop(smp_bridge_t *b)
{
    if (b->state == ST_CLOSING || b->state == ST_STOPPED) {
        return;
    }
    bool was_connected = b->state == ST_CONNECTED;
    if (was_connected && b->inflight > 0) {
        LOG_WARN(SCOPE, "stopping with %zu publish(es) unacknowledged", b->inflight);
    }
    teardown_conn(b, /* send_disconnect = */ was_connected);
    if (b->gai != NULL) {
        /* Its callback still runs (with UV_ECANCELED, or with a result if the lookup had
         * started); it frees the request and calls maybe_stopped. */
        uv_cancel((uv_req_t *)b->gai);
    }
    b->state = ST_CLOSING;
    uv_close((uv_handle_t *)&b->misc_timer, on_handle_closed);
    uv_close((uv_handle_t *)&b->retry_timer, on_handle_closed);
    uv_close((uv_handle_t *)&b->stop_timer, on_handle_closed);
    uv_close((uv_handle_t *)&b->sub_timer, on_handle_closed);
    b->pending_closes += 4;
    LOG_INFO(SCOPE, "stopped");
    if (was_connected && b->cbs.on_disconnect != NULL) {
        b->cbs.on_disconnect(b->arg);
    }
}

static void on_stop_timer(uv_timer_t *t)
{
    finish_stop(t->data);
}

static void init_timers(smp_bridge_t *b)
{
    if (b->timers_init) {
        return;
    }
    uv_timer_init(b->loop, &b->misc_timer);
    uv_timer_init(b->loop, &b->retry_timer);
    uv_timer_init(b->loop, &b->stop_timer);
    uv_timer_init(b->loop, &b->sub_timer);
    b->sub_timer.data = b;
    b->misc_timer.data = b;
    b->retry_timer.data = b;
    b->stop_timer.data = b;
    b->timers_init = true;
}

/* ---- public API ----------------------------------------------------------------------------- */

/* The settings of cfg, with the defaults of config.h applied; the client id unless a session
 * has its own. Only between connections: the pending table is made anew. */
static int apply_settings(smp_bridge_t *b, const smp_config_t *cfg)
{
    int version = cfg->mqtt.version != 0 ? cfg->mqtt.version : MQTT_PROTOCOL_V311;
    if (version != MQTT_PROTOCOL_V31 && version != MQTT_PROTOCOL_V311 &&
        version != MQTT_PROTOCOL_V5) {
        return -EINVAL;
    }
    int inflight_max = cfg->mqtt.inflight_max > 0 ? cfg->mqtt.inflight_max : DEFAULT_INFLIGHT;
    /* Mids are 16 bits: everything in flight at once must have distinct ones. */
    if (inflight_max > UINT16_MAX - 3 - SMP_BRIDGE_RESERVED) {
        inflight_max = UINT16_MAX - 3 - SMP_BRIDGE_RESERVED;
    }
    /* Twice the most that can be in flight (window + reserved room + offline status + online
     * status), as a power of two. */
    size_t cap = 16;
    while (cap < 2 * ((size_t)inflight_max + SMP_BRIDGE_RESERVED + 2)) {
        cap *= 2;
    }
    pending_t *pending = calloc(cap, sizeof *pending);
    char *id = NULL;
    if (b->ses.will == NULL && cfg->mqtt.client_id != NULL) {
        id = dup_str(cfg->mqtt.client_id);
    } else if (b->ses.will == NULL) {
        size_t clen = strlen(cfg->gateway.id) + sizeof "simpul-";
        id = malloc(clen);
        if (id != NULL) {
            snprintf(id, clen, "simpul-%s", cfg->gateway.id);
        }
    }
    if (pending == NULL || (b->ses.will == NULL && id == NULL)) {
        free(pending);
        free(id);
        return -ENOMEM;
    }
    if (id != NULL) {
        free(b->client_id);
        b->client_id = id;
    }
    free(b->pending);
    b->pending = pending;
    b->pending_mask = cap - 1;
    b->inflight = 0;
    b->inflight_max = inflight_max;
    b->cfg = cfg;
    b->version = version;
    b->host = cfg->mqtt.host != NULL ? cfg->mqtt.host : "127.0.0.1";
    b->port = cfg->mqtt.port > 0 ? cfg->mqtt.port : 1883;
    /* libmosquitto takes 0 or 5..65535. 0 (no keepalive) is not offered: the keepalive is what
     * detects a silent broker and bounds the wait for a CONNACK. */
    b->keepalive = cfg->mqtt.keepalive_s < 5 ? 5 : cfg->mqtt.keepalive_s;
    if (b->keepalive > UINT16_MAX) {
        b->keepalive = UINT16_MAX;
    }
    b->tls = cfg->mqtt.tls_ca_file != NULL || cfg->mqtt.tls_cert_file != NULL ||
             cfg->mqtt.tls_key_file != NULL;
    return 0;
}

int smp_bridge_new(uv_loop_t *loop, const smp_config_t *cfg, const smp_bridge_cbs_t *cbs, void *arg,
                   smp_bridge_t **out)
{
    if (loop == NULL || cfg == NULL || out == NULL || cfg->gateway.id == NULL) {
        return -EINVAL;
    }
    *out = NULL;
    smp_bridge_t *b = calloc(1, sizeof *b);
    if (b == NULL) {
        return -ENOMEM;
    }
    b->loop = loop;
    b->cfg = cfg;
    if (cbs != NULL) {
        b->cbs = *cbs;
    }
    b->arg = arg;
    b->state = ST_IDLE;
    b->backoff_ms = BACKOFF_MIN_MS;
    int rc = apply_settings(b, cfg);
    const char *prefix = cfg->mqtt.topic_prefix != NULL ? cfg->mqtt.topic_prefix : "simpul";
    size_t tlen = strlen(prefix) + strlen(cfg->gateway.id) + sizeof "//status";
    b->status_topic = malloc(tlen);
    if (rc < 0 || b->status_topic == NULL) {
        free(b->status_topic);
        free(b->client_id);
        free(b->pending);
        free(b);
        return rc < 0 ? rc : -ENOMEM;
    }
    snprintf(b->status_topic, tlen, "%s/%s/status", prefix, cfg->gateway.id);

    /* Reference-counted inside libmosquitto; balanced in smp_bridge_free. */
    rc = mosquitto_lib_init();
    if (rc != MOSQ_ERR_SUCCESS) {
        free(b->status_topic);
        free(b->client_id);
        free(b->pending);
        free(b);
        return mosq_to_errno(rc, errno);
    }
    *out = b;
    return 0;
}

int smp_bridge_start(smp_bridge_t *b)
{
    if (b == NULL) {
        return -EINVAL;
    }
    if (b->state != ST_IDLE || b->stopping) {
        return b->stopping ? -ESHUTDOWN : -EALREADY;
    }
    init_timers(b);
    begin_attempt(b);
    return 0;
}

int smp_bridge_subscribe(smp_bridge_t *b, const char *topic, int qos)
{
    if (b == NULL || topic == NULL || qos < 0 || qos > 1) {
        return -EINVAL;
    }
    if (mosquitto_sub_topic_check(topic) != MOSQ_ERR_SUCCESS) {
        return -EINVAL;
    }
    sub_t *s = NULL;
    for (size_t i = 0; i < b->nsubs; i++) {
        if (strcmp(b->subs[i].topic, topic) == 0) {
            s = &b->subs[i];
            break;
        }
    }
    if (s == NULL) {
        if (b->nsubs == b->subs_cap) {
            size_t cap = b->subs_cap != 0 ? b->subs_cap * 2 : 8;
            sub_t *subs = realloc(b->subs, cap * sizeof *subs);
            if (subs == NULL) {
                return -ENOMEM;
            }
            b->subs = subs;
            b->subs_cap = cap;
        }
        char *copy = dup_str(topic);
        if (copy == NULL) {
            return -ENOMEM;
        }
        s = &b->subs[b->nsubs++];
        *s = (sub_t){.topic = copy};
    }
    s->qos = qos;
    if (b->state == ST_CONNECTED) {
        int rc = send_subscribe(b, s);
        if (rc < 0) {
            /* Kept: sent again after the next connect. */
            return rc;
        }
        poll_update(b);
    }
    return 0;
}

/* The checks of the public publish functions; `window` is the in-flight limit that applies. */
static int publish_within(smp_bridge_t *b, size_t window, const char *topic, const void *payload,
                          size_t len, int qos, bool retain, uint64_t token,
                          const smp_mqtt_props_t *props)
{
    if (b == NULL || topic == NULL || (payload == NULL && len > 0) || qos < 0 || qos > 1) {
        return -EINVAL;
    }
    if (len > MQTT_MAX_PAYLOAD) {
        return -EMSGSIZE;
    }
    /* Checked here, not left to libmosquitto: it would queue QoS 1 messages while disconnected
     * and send them after the next CONNACK, next to the caller's own resend from its outbox. */
    if (b->state != ST_CONNECTED || b->stopping) {
        return -ENOTCONN;
    }
    if (qos == 1 && b->inflight >= window) {
        return -EAGAIN;
    }
    return do_publish(b, topic, payload, len, qos, retain, token, props);
}

int smp_bridge_publish(smp_bridge_t *b, const char *topic, const void *payload, size_t len, int qos,
                       bool retain, uint64_t token, const smp_mqtt_props_t *props)
{
    size_t window = b != NULL ? (size_t)b->inflight_max : 0;
    return publish_within(b, window, topic, payload, len, qos, retain, token, props);
}

int smp_bridge_publish_reserved(smp_bridge_t *b, const char *topic, const void *payload, size_t len,
                                int qos, bool retain, uint64_t token, const smp_mqtt_props_t *props)
{
    size_t window = b != NULL ? (size_t)b->inflight_max + SMP_BRIDGE_RESERVED : 0;
    return publish_within(b, window, topic, payload, len, qos, retain, token, props);
}

int smp_bridge_set_session(smp_bridge_t *b, const smp_bridge_session_t *s)
{
    if (b == NULL || s == NULL || s->will == NULL || s->client_id == NULL || b->state != ST_IDLE) {
        return -EINVAL;
    }
    char *id = dup_str(s->client_id);
    if (id == NULL) {
        return -ENOMEM;
    }
    free(b->client_id);
    b->client_id = id;
    b->ses = *s;
    b->ses.client_id = b->client_id;
    return 0;
}

void smp_bridge_rebind(smp_bridge_t *b, const smp_config_t *cfg)
{
    if (b != NULL) {
        b->cfg = cfg;
        b->host = cfg->mqtt.host != NULL ? cfg->mqtt.host : "127.0.0.1";
    }
}

int smp_bridge_reconfigure(smp_bridge_t *b, const smp_config_t *cfg)
{
    if (b == NULL || b->stopping) {
        return -ESHUTDOWN;
    }
    bool was_connected = b->state == ST_CONNECTED;
    if (b->state == ST_CONNECTED || b->state == ST_CONNECTING) {
        /* A clean end (DISCONNECT: no Will, the offline status is not published). */
        teardown_conn(b, /* send_disconnect = */ was_connected);
        b->state = ST_BACKOFF;
    }
    int rc = apply_settings(b, cfg); /* after the teardown: it cleared the pending table */
    if (rc < 0) {
        LOG_ERR(SCOPE, "cannot take the new MQTT settings: %s; keeping the old ones",
                strerror(-rc));
    }
    LOG_INFO(SCOPE, "MQTT settings changed: %s %s:%d", was_connected ? "reconnecting to" : "now",
             b->host, b->port);
    b->backoff_ms = BACKOFF_MIN_MS;
    b->in_outage = false;
    if (b->state == ST_RESOLVING) {
        b->resolve_stale = true; /* on_resolved starts over with the new host */
    } else if (b->state == ST_BACKOFF) {
        uv_timer_stop(&b->retry_timer);
        begin_attempt(b);
    }
    /* Last: the callee may call back into the bridge. */
    if (was_connected && b->cbs.on_disconnect != NULL) {
        b->cbs.on_disconnect(b->arg);
    }
    return rc;
}

void smp_bridge_drop(smp_bridge_t *b, const char *reason)
{
    if (b == NULL || b->state != ST_CONNECTED || b->stopping || b->ev_lost) {
        return;
    }
    b->keep_backoff = true;
    b->ev_lost = true;
    copy_reason(b->lost_reason, sizeof b->lost_reason, reason);
}

bool smp_bridge_connected(const smp_bridge_t *b)
{
    return b != NULL && b->state == ST_CONNECTED;
}

size_t smp_bridge_inflight(const smp_bridge_t *b)
{
    return b != NULL ? b->inflight : 0;
}

void smp_bridge_stop(smp_bridge_t *b, uint32_t timeout_ms)
{
    if (b == NULL || b->stopping) {
        return;
    }
    b->stopping = true;
    init_timers(b); /* a bridge stopped before it started still ends through on_stopped */
    uv_timer_stop(&b->retry_timer);
    /* The teardown itself always runs from the stop timer or from after_io, never from here:
     * smp_bridge_stop may be called from inside a callback (on_message, on_ack, on_connect)
     * that libmosquitto or the bridge is still in the middle of. */
    if (b->state == ST_CONNECTED) {
        int rc = publish_status(b, "offline");
        if (rc < 0) {
            LOG_WARN(SCOPE, "cannot publish offline status: %s", strerror(-rc));
        }
        if (b->inflight > 0) {
            LOG_DEBUG(SCOPE, "stopping: waiting up to %" PRIu32 " ms for %zu acknowledgement(s)",
                      timeout_ms, b->inflight);
            uv_timer_start(&b->stop_timer, on_stop_timer, timeout_ms, 0);
            return;
        }
    }
    uv_timer_start(&b->stop_timer, on_stop_timer, 0, 0);
}

void smp_bridge_free(smp_bridge_t *b)
{
    if (b == NULL) {
        return;
    }
    if (!(b->state == ST_IDLE && !b->timers_init) && b->state != ST_STOPPED) {
        /* Freeing now would leave libuv with pointers into freed memory. A bug in the caller;
         * leaking is the lesser harm. */
        LOG_ERR(SCOPE, "smp_bridge_free before on_stopped: bridge leaked");
        return;
    }
    for (size_t i = 0; i < b->nsubs; i++) {
        free(b->subs[i].topic);
    }
    free(b->subs);
    free(b->pending);
    free(b->qos0.buf);
    free(b->status_topic);
    free(b->client_id);
    free(b);
    mosquitto_lib_cleanup();
}
