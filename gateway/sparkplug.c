/* Sparkplug B 3.0 edge node (see sparkplug.h and docs/sparkplug.md).
 *
 * Session. Each CONNECT gets the next bdSeq (persisted in gateway.data_dir, 255 wraps to 0) in
 * its Will, an NDEATH. Once connected (and, with primary_host_id, once that host's STATE says
 * online) the node is "live": NBIRTH with seq 0, then a DBIRTH per online device, then the
 * DATA kept while the session was not live (is_historical), then live DATA. Every message of
 * the node shares one seq, 0..255. NBIRTH, DBIRTH, DATA and DDEATH are QoS 0, not retained, as
 * the specification requires; only the NDEATH (the Will) is QoS 1.
 *
 * Everything runs on the loop thread. */
#include "sparkplug.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "log.h"
#include "spb_codec.h"

#define SCOPE "sparkplug"
#define NS    "spBv1.0"

/* DATA kept while the session is not live, replayed after the next births. */
#define HIST_MAX_BYTES (8u * 1024u * 1024u)
#define HIST_MAX_MSGS  100000u

/* Node metrics of the NBIRTH; their aliases are 1..4, device metrics follow. */
#define M_REBIRTH    "Node Control/Rebirth"
#define M_VERSION    "Properties/Version"
#define M_DEVICES    "Properties/Devices"
#define ALIAS_DEVICE 16u

struct hist {
    struct hist *next;
    size_t dev;
    uint8_t *payload; /* encoded without seq: it is appended when sent */
    size_t len;
};

struct spb_dev {
    uint64_t alias0; /* alias of the device's first tag */
    char *t_birth, *t_death, *t_data, *t_cmd_json;
    bool born; /* DBIRTH sent in this session */
};

struct smp_sparkplug {
    smp_engine_t *e;
    const smp_config_t *cfg;
    smp_bridge_t *bridge;
    struct spb_dev *devs;
    size_t ndevs; /* e->ndevs when devs was made (a reload changes e->devs) */
    char *client_id, *bdseq_path;
    char *t_nbirth, *t_ndeath, *t_ncmd, *t_dcmd_sub, *t_state;
    int bdseq; /* of the current CONNECT; -1 before the first */
    uint8_t *will;
    size_t will_len;
    bool connected, host_online, live, stopped;
    uint8_t seq; /* of the last message sent */
    struct hist *hist_head, *hist_tail;
    size_t hist_bytes, hist_n;
    uint64_t hist_dropped;
};

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    int n = vasprintf(&s, fmt, ap);
    va_end(ap);
    return n < 0 ? NULL : s;
}

static size_t dev_index(const smp_sparkplug_t *s, const struct device *d)
{
    (void)s;
    return d->index;
}

/* ---- bdSeq ----------------------------------------------------------------------------------- */

static int bdseq_load(const char *path)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }
    int v = -1;
    if (fscanf(f, "%d", &v) != 1 || v < 0 || v > 255) {
        v = -1;
    }
    fclose(f);
    return v;
}

/* A few bytes, once per established session (CONNACK): a bdSeq that only went out in the Will
 * of a refused or failed attempt never reached a host, so it need not survive a restart, and
 * a broker that stays down costs no flash writes. Written in place, without fsync, so the loop
 * never waits on the flash: a power cut may repeat a bdSeq; hosts compare a session's NDEATH
 * with its own NBIRTH, which always agree. */
static void bdseq_save(const char *path, int v)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        LOG_WARN(SCOPE, "cannot write %s: %s", path, strerror(errno));
        return;
    }
    char buf[8];
    int n = snprintf(buf, sizeof buf, "%d\n", v);
    if (write(fd, buf, (size_t)n) != n) {
        LOG_WARN(SCOPE, "cannot write %s: %s", path, strerror(errno));
    }
    close(fd);
}

/* The bridge asks for the Will before each CONNECT: the next bdSeq, in an NDEATH. */
static void on_will(void *arg, const char **topic, const void **payload, size_t *len)
{
    smp_sparkplug_t *s = arg;
    s->bdseq = (s->bdseq + 1) % 256;
    smp_eval_t v = {.kind = SMP_EV_INT, .i = s->bdseq};
    smp_spb_metric_t m = {.name = "bdSeq", .datatype = SMP_SPB_INT64, .value = &v};
    uint8_t *buf = NULL;
    size_t n = 0;
    if (smp_spb_encode(0, -1, &m, 1, &buf, &n) == 0) {
        free(s->will);
        s->will = buf;
        s->will_len = n;
    }
    *topic = s->t_ndeath;
    *payload = s->will;
    *len = s->will_len;
}

/* ---- publishing ------------------------------------------------------------------------------ */

/* Appends field 3 (seq, a varint) to an encoded payload: protobuf readers take fields in any
 * order, so a stored message gets its seq when it is sent. */
static uint8_t *with_seq(const uint8_t *p, size_t len, uint8_t seq, size_t *out_len)
{
    uint8_t *b = malloc(len + 3);
    if (b == NULL) {
        return NULL;
    }
    memcpy(b, p, len);
    size_t k = len;
    b[k++] = 0x18; /* field 3, varint */
    if (seq < 0x80) {
        b[k++] = seq;
    } else {
        b[k++] = (uint8_t)(0x80 | (seq & 0x7f));
        b[k++] = (uint8_t)(seq >> 7);
    }
    *out_len = k;
    return b;
}

static uint8_t next_seq(smp_sparkplug_t *s)
{
    s->seq = (uint8_t)(s->seq + 1); /* 255 wraps to 0 */
    return s->seq;
}

static void send_raw(smp_sparkplug_t *s, const char *topic, const uint8_t *p, size_t len)
{
    int rc = smp_bridge_publish(s->bridge, topic, p, len, /* qos = */ 0, /* retain = */ false,
                                /* token = */ 0, NULL);
    if (rc < 0) {
        LOG_DEBUG(SCOPE, "publish to %s failed: %s", topic, strerror(-rc));
    } else {
        s->e->stats.publishes++;
    }
}

/* Encodes with the next seq (or seq 0 for an NBIRTH) and sends. */
static void send_msg(smp_sparkplug_t *s, const char *topic, uint64_t ts, const smp_spb_metric_t *m,
                     size_t n, bool nbirth)
{
    int64_t seq = nbirth ? 0 : next_seq(s);
    if (nbirth) {
        s->seq = 0;
    }
    uint8_t *p = NULL;
    size_t len = 0;
    int rc = smp_spb_encode(ts, seq, m, n, &p, &len);
    if (rc < 0) {
        LOG_WARN(SCOPE, "cannot encode a message for %s: %s", topic, strerror(-rc));
        return;
    }
    send_raw(s, topic, p, len);
    free(p);
}

/* ---- metrics of a device --------------------------------------------------------------------- */

/* The metric of tag t: value, or is_null when unknown or in error. */
static void tag_metric(smp_sparkplug_t *s, const struct device *d, size_t t, uint64_t ts,
                       bool birth, smp_spb_metric_t *m)
{
    const struct tag_rt *tr = &d->tags[t];
    const smp_tag_cfg_t *tc = &d->cfg->tags[t];
    bool aliases = s->cfg->mqtt.sparkplug.use_aliases;
    *m = (smp_spb_metric_t){0};
    m->name = birth || !aliases ? tc->name : NULL;
    m->has_alias = aliases;
    m->alias = s->devs[dev_index(s, d)].alias0 + t;
    m->has_ts = true;
    m->ts = tr->current_ts ? tr->current_ts : ts;
    if (tr->err != 0 || tr->current_ts == 0) {
        m->ts = ts;
    }
    m->datatype = smp_spb_datatype(tc);
    m->omit_datatype = !birth; /* the specification: not in DATA, the birth gave it */
    m->value = tr->err == 0 ? &tr->current : NULL;
}

static void send_dbirth(smp_sparkplug_t *s, struct device *d, uint64_t ts)
{
    size_t n = d->cfg->ntags;
    smp_spb_metric_t *m = calloc(n ? n : 1, sizeof *m);
    if (m == NULL) {
        return;
    }
    for (size_t t = 0; t < n; t++) {
        tag_metric(s, d, t, ts, /* birth = */ true, &m[t]);
    }
    struct spb_dev *sd = &s->devs[dev_index(s, d)];
    send_msg(s, sd->t_birth, ts, m, n, false);
    sd->born = true;
    free(m);
}

static void send_nbirth(smp_sparkplug_t *s)
{
    uint64_t ts = smp__wall_ms();
    smp_eval_t bd = {.kind = SMP_EV_INT, .i = s->bdseq};
    smp_eval_t rebirth = {.kind = SMP_EV_BOOL, .b = false};
    smp_eval_t ver = {.kind = SMP_EV_STRING, .s = (char *)SMP_VERSION};
    smp_eval_t ndev = {.kind = SMP_EV_UINT, .u = s->e->ndevs};
    bool al = s->cfg->mqtt.sparkplug.use_aliases;
    smp_spb_metric_t m[] = {
        {.name = "bdSeq",
         .has_alias = al,
         .alias = 4,
         .has_ts = true,
         .ts = ts,
         .datatype = SMP_SPB_INT64,
         .value = &bd},
        {.name = M_REBIRTH,
         .has_alias = al,
         .alias = 1,
         .has_ts = true,
         .ts = ts,
         .datatype = SMP_SPB_BOOLEAN,
         .value = &rebirth},
        {.name = M_VERSION,
         .has_alias = al,
         .alias = 2,
         .has_ts = true,
         .ts = ts,
         .datatype = SMP_SPB_STRING,
         .value = &ver},
        {.name = M_DEVICES,
         .has_alias = al,
         .alias = 3,
         .has_ts = true,
         .ts = ts,
         .datatype = SMP_SPB_UINT32,
         .value = &ndev},
    };
    send_msg(s, s->t_nbirth, ts, m, sizeof m / sizeof m[0], /* nbirth = */ true);
}

/* DDATA of what changed in device d since it was last reported. Returns the encoded payload
 * without seq (NULL when nothing changed). */
static uint8_t *build_ddata(smp_sparkplug_t *s, struct device *d, uint64_t ts, bool historical,
                            size_t *len)
{
    size_t n = d->cfg->ntags, k = 0;
    smp_spb_metric_t *m = calloc(n ? n : 1, sizeof *m);
    if (m == NULL) {
        return NULL;
    }
    for (size_t t = 0; t < n; t++) {
        const struct tag_rt *tr = &d->tags[t];
        bool changed =
            tr->err != 0 ? tr->err_dirty : (tr->dirty && tr->current.kind != SMP_EV_NONE);
        if (changed) {
            tag_metric(s, d, t, ts, /* birth = */ false, &m[k]);
            m[k].is_historical = historical;
            k++;
        }
    }
    uint8_t *p = NULL;
    if (k > 0 && smp_spb_encode(ts, -1, m, k, &p, len) < 0) {
        p = NULL;
    }
    free(m);
    return p;
}

/* ---- store and forward ----------------------------------------------------------------------- */

static void hist_drop_oldest(smp_sparkplug_t *s)
{
    struct hist *h = s->hist_head;
    s->hist_head = h->next;
    if (s->hist_head == NULL) {
        s->hist_tail = NULL;
    }
    s->hist_bytes -= h->len;
    s->hist_n--;
    free(h->payload);
    free(h);
}

static void hist_push(smp_sparkplug_t *s, size_t dev, uint8_t *payload, size_t len)
{
    struct hist *h = calloc(1, sizeof *h);
    if (h == NULL) {
        free(payload);
        s->hist_dropped++;
        return;
    }
    h->dev = dev;
    h->payload = payload;
    h->len = len;
    if (s->hist_tail != NULL) {
        s->hist_tail->next = h;
    } else {
        s->hist_head = h;
    }
    s->hist_tail = h;
    s->hist_bytes += len;
    s->hist_n++;
    bool warned = s->hist_dropped > 0;
    while (s->hist_bytes > HIST_MAX_BYTES || s->hist_n > HIST_MAX_MSGS) {
        hist_drop_oldest(s);
        s->hist_dropped++;
    }
    if (!warned && s->hist_dropped > 0) {
        LOG_WARN(SCOPE, "store-and-forward queue full: dropping the oldest DATA");
    }
}

/* Replays the kept DATA, oldest first, for the devices born in this session. */
static void hist_replay(smp_sparkplug_t *s)
{
    size_t sent = 0, skipped = 0;
    while (s->hist_head != NULL) {
        struct hist *h = s->hist_head;
        struct spb_dev *sd = h->dev < s->ndevs ? &s->devs[h->dev] : NULL;
        if (sd != NULL && sd->born) {
            size_t len = 0;
            uint8_t *p = with_seq(h->payload, h->len, next_seq(s), &len);
            if (p != NULL) {
                send_raw(s, sd->t_data, p, len);
                free(p);
                sent++;
            }
        } else {
            skipped++; /* no DATA for a device whose birth this session has not seen */
        }
        hist_drop_oldest(s);
    }
    if (sent + skipped > 0 || s->hist_dropped > 0) {
        LOG_INFO(SCOPE,
                 "replayed %zu historical DATA message(s); %zu for offline devices and %" PRIu64
                 " beyond the queue's bound were dropped",
                 sent, skipped, s->hist_dropped);
    }
    s->hist_dropped = 0;
}

/* ---- births ---------------------------------------------------------------------------------- */

/* NBIRTH, a DBIRTH per online device, then the kept DATA: the session is live from here. */
static void births(smp_sparkplug_t *s)
{
    s->live = true;
    send_nbirth(s);
    uint64_t ts = smp__wall_ms();
    for (size_t k = 0; k < s->e->ndevs; k++) {
        s->devs[k].born = false;
        if (s->e->devs[k]->online == 1) {
            send_dbirth(s, s->e->devs[k], ts);
        }
    }
    hist_replay(s);
}

static void maybe_births(smp_sparkplug_t *s)
{
    if (s->connected && !s->live &&
        (s->cfg->mqtt.sparkplug.primary_host_id == NULL || s->host_online)) {
        births(s);
    }
}

/* ---- engine hooks ---------------------------------------------------------------------------- */

void smp__sparkplug_emit(smp_sparkplug_t *s, struct device *d, uint64_t ts)
{
    if (s == NULL || s->stopped) {
        return;
    }
    size_t k = dev_index(s, d);
    struct spb_dev *sd = &s->devs[k];
    if (s->live && !sd->born) {
        if (d->online == 1) {
            send_dbirth(s, d, ts);
        }
        return;
    }
    size_t len = 0;
    uint8_t *p = build_ddata(s, d, ts, /* historical = */ !s->live, &len);
    if (p == NULL) {
        return;
    }
    if (s->live) {
        size_t slen = 0;
        uint8_t *q = with_seq(p, len, next_seq(s), &slen);
        if (q != NULL) {
            send_raw(s, sd->t_data, q, slen);
            free(q);
        }
        free(p);
    } else {
        hist_push(s, k, p, len);
    }
}

void smp__sparkplug_device_state(smp_sparkplug_t *s, struct device *d)
{
    if (s == NULL || d->online != 0) {
        return; /* back online: the next emit sends its DBIRTH */
    }
    struct spb_dev *sd = &s->devs[dev_index(s, d)];
    if (s->live && sd->born) {
        send_msg(s, sd->t_death, smp__wall_ms(), NULL, 0, false);
    }
    sd->born = false;
}

/* ---- commands -------------------------------------------------------------------------------- */

static int find_tag(const struct device *d, const smp_sparkplug_t *s, const smp_spb_in_metric_t *m)
{
    const struct spb_dev *sd = &s->devs[dev_index(s, d)];
    for (size_t t = 0; t < d->cfg->ntags; t++) {
        if (m->name != NULL ? strcmp(d->cfg->tags[t].name, m->name) == 0
                            : (m->has_alias && m->alias == sd->alias0 + t)) {
            return (int)t;
        }
    }
    return -1;
}

/* A decoded value as the JSON value of a command; NULL when it has none JSON can carry. */
static json_t *value_json(const smp_eval_t *v)
{
    switch (v->kind) {
    case SMP_EV_BOOL:
        return json_boolean(v->b);
    case SMP_EV_INT:
        return json_integer(v->i);
    case SMP_EV_UINT:
        return v->u <= (uint64_t)INT64_MAX ? json_integer((json_int_t)v->u) : NULL;
    case SMP_EV_FLOAT32:
    case SMP_EV_DOUBLE:
        return json_real(v->d); /* NULL for NaN and infinities */
    case SMP_EV_STRING:
        return json_string(v->s); /* NULL for invalid UTF-8 */
    default:
        return NULL;
    }
}

static uint64_t fnv1a64(uint64_t h, const void *p, size_t n)
{
    const uint8_t *b = p;
    for (size_t k = 0; k < n; k++) {
        h = (h ^ b[k]) * 1099511628211u;
    }
    return h;
}

/* One DCMD metric: refused here when it names no tag or carries a value of another datatype;
 * otherwise handed to the command path as a JSON write whose id is derived from (device,
 * metric, value, timestamp), so a redelivered DCMD is never written twice. */
static void dcmd_metric(smp_sparkplug_t *s, struct device *d, const smp_spb_in_metric_t *m,
                        uint64_t payload_ts, const smp_mqtt_props_t *props)
{
    int t = find_tag(d, s, m);
    if (t < 0) {
        LOG_WARN(SCOPE, "DCMD for %s refused: unknown metric %s", d->cfg->name,
                 m->name != NULL ? m->name : "(by alias)");
        return;
    }
    const smp_tag_cfg_t *tc = &d->cfg->tags[t];
    uint32_t want = smp_spb_datatype(tc);
    json_t *val = m->is_null || m->unsupported ? NULL : value_json(&m->value);
    if ((m->has_datatype && m->datatype != want) || val == NULL) {
        LOG_WARN(SCOPE, "DCMD for %s refused: %s needs a %s value, got %s", d->cfg->name, tc->name,
                 smp_spb_datatype_name(want),
                 m->has_datatype ? smp_spb_datatype_name(m->datatype) : "no datatype");
        json_decref(val);
        return;
    }
    char *vtext = json_dumps(val, JSON_ENCODE_ANY | JSON_COMPACT);
    bool has_ts = m->has_ts || payload_ts != 0;
    uint64_t ts = m->has_ts ? m->ts : payload_ts;
    char id[64];
    if (has_ts) {
        uint64_t h = 14695981039346656037u;
        h = fnv1a64(h, d->cfg->name, strlen(d->cfg->name) + 1);
        h = fnv1a64(h, tc->name, strlen(tc->name) + 1);
        h = fnv1a64(h, vtext != NULL ? vtext : "", vtext != NULL ? strlen(vtext) : 0);
        snprintf(id, sizeof id, "spb-%" PRIu64 "-%016" PRIx64, ts, h);
    } else {
        /* Without a timestamp nothing tells a redelivery from a new command. */
        static uint64_t counter;
        snprintf(id, sizeof id, "spb-nots-%" PRIu64 "-%" PRIu64, smp__wall_ms(), ++counter);
    }
    json_t *cmd =
        json_pack("{s:s, s:s, s:s, s:o}", "id", id, "op", "write", "tag", tc->name, "value", val);
    char *text = cmd != NULL ? json_dumps(cmd, JSON_COMPACT) : NULL;
    if (text != NULL) {
        LOG_INFO(SCOPE, "DCMD %s on %s: %s = %s", id, d->cfg->name, tc->name,
                 vtext != NULL ? vtext : "?");
        /* The delivery's properties go along, so the command path's rules for them apply
         * to a DCMD as to a JSON command. */
        smp_commands_receive(s->e->cmds, s->devs[dev_index(s, d)].t_cmd_json, text, strlen(text),
                             props);
    }
    free(text);
    free(vtext);
    json_decref(cmd);
}

static void on_dcmd(smp_sparkplug_t *s, const char *dev_name, const smp_spb_payload_t *p,
                    const smp_mqtt_props_t *props)
{
    struct device *d = NULL;
    for (size_t k = 0; k < s->e->ndevs; k++) {
        if (strcmp(s->e->devs[k]->cfg->name, dev_name) == 0) {
            d = s->e->devs[k];
        }
    }
    if (d == NULL) {
        LOG_WARN(SCOPE, "DCMD for unknown device %s ignored", dev_name);
        return;
    }
    for (size_t k = 0; k < p->n; k++) {
        dcmd_metric(s, d, &p->metrics[k], p->has_ts ? p->ts : 0, props);
    }
}

static void on_ncmd(smp_sparkplug_t *s, const smp_spb_payload_t *p)
{
    for (size_t k = 0; k < p->n; k++) {
        const smp_spb_in_metric_t *m = &p->metrics[k];
        bool rebirth = (m->name != NULL && strcmp(m->name, M_REBIRTH) == 0) ||
                       (m->name == NULL && m->has_alias && m->alias == 1);
        if (rebirth && m->value.kind == SMP_EV_BOOL && m->value.b) {
            if (s->live) {
                LOG_INFO(SCOPE, "rebirth requested");
                births(s);
            }
        } else {
            LOG_WARN(SCOPE, "NCMD metric %s not supported; ignored",
                     m->name != NULL ? m->name : "(by alias)");
        }
    }
}

/* spBv1.0/STATE/<host>: {"online":bool,"timestamp":ms}. Births wait for online; offline ends
 * the live session until the host is back (the node keeps its DATA for replay). */
static void on_state(smp_sparkplug_t *s, const void *payload, size_t len)
{
    json_error_t je;
    json_t *j = json_loadb(payload, len, 0, &je);
    json_t *on = j != NULL ? json_object_get(j, "online") : NULL;
    if (!json_is_boolean(on)) {
        LOG_WARN(SCOPE, "STATE message from the primary host is not valid; ignored");
        json_decref(j);
        return;
    }
    bool online = json_is_true(on);
    json_decref(j);
    if (online && !s->host_online) {
        LOG_INFO(SCOPE, "primary host %s online", s->cfg->mqtt.sparkplug.primary_host_id);
        s->host_online = true;
        maybe_births(s);
    } else if (!online && s->connected) {
        /* Sparkplug 3.0: end the session (the broker publishes our NDEATH) and try again;
         * DATA is kept for the replay after the next births. */
        LOG_WARN(SCOPE, "primary host %s offline: disconnecting, DATA held until it is back",
                 s->cfg->mqtt.sparkplug.primary_host_id);
        s->host_online = false;
        s->live = false;
        smp_bridge_drop(s->bridge, "the primary host is offline");
    }
}

/* ---- bridge callbacks ------------------------------------------------------------------------ */

static void on_connect(void *arg)
{
    smp_sparkplug_t *s = arg;
    s->connected = true;
    s->live = false;
    bdseq_save(s->bdseq_path, s->bdseq);
    maybe_births(s);
}

static void on_disconnect(void *arg)
{
    smp_sparkplug_t *s = arg;
    s->connected = false;
    s->live = false;
    s->host_online = false; /* the retained STATE comes again with the next subscription */
}

static void on_message(void *arg, const char *topic, const void *payload, size_t len,
                       const smp_mqtt_props_t *props)
{
    smp_sparkplug_t *s = arg;
    if (s->t_state != NULL && strcmp(topic, s->t_state) == 0) {
        on_state(s, payload, len);
        return;
    }
    smp_spb_payload_t p;
    int rc = smp_spb_decode(payload, len, &p);
    if (rc < 0) {
        LOG_WARN(SCOPE, "undecodable payload on %s ignored: %s", topic, strerror(-rc));
        return;
    }
    size_t lp = strlen(s->t_dcmd_sub) - 1; /* ".../DCMD/E/" */
    if (strcmp(topic, s->t_ncmd) == 0) {
        on_ncmd(s, &p);
    } else if (strncmp(topic, s->t_dcmd_sub, lp) == 0 && strchr(topic + lp, '/') == NULL) {
        on_dcmd(s, topic + lp, &p, props);
    }
    smp_spb_payload_free(&p);
}

static void on_ack(void *arg, uint64_t token)
{
    (void)arg;
    (void)token;
}

static void on_stopped(void *arg)
{
    smp_sparkplug_t *s = arg;
    s->stopped = true;
    smp__engine_stop_progress(s->e);
}

/* ---- life cycle ------------------------------------------------------------------------------ */

static int setup_devices(smp_sparkplug_t *s);

static int setup_topics(smp_sparkplug_t *s)
{
    const char *g = s->cfg->mqtt.sparkplug.group_id, *n = s->cfg->mqtt.sparkplug.edge_node_id;
    s->t_nbirth = xasprintf(NS "/%s/NBIRTH/%s", g, n);
    s->t_ndeath = xasprintf(NS "/%s/NDEATH/%s", g, n);
    s->t_ncmd = xasprintf(NS "/%s/NCMD/%s", g, n);
    s->t_dcmd_sub = xasprintf(NS "/%s/DCMD/%s/+", g, n);
    if (s->cfg->mqtt.sparkplug.primary_host_id != NULL) {
        s->t_state = xasprintf(NS "/STATE/%s", s->cfg->mqtt.sparkplug.primary_host_id);
        if (s->t_state == NULL) {
            return -ENOMEM;
        }
    }
    if (!s->t_nbirth || !s->t_ndeath || !s->t_ncmd || !s->t_dcmd_sub) {
        return -ENOMEM;
    }
    return setup_devices(s);
}

static void free_devices(smp_sparkplug_t *s)
{
    for (size_t k = 0; s->devs != NULL && k < s->ndevs; k++) {
        free(s->devs[k].t_birth);
        free(s->devs[k].t_death);
        free(s->devs[k].t_data);
        free(s->devs[k].t_cmd_json);
    }
    free(s->devs);
    s->devs = NULL;
    s->ndevs = 0;
}

/* Per-device topics and alias ranges, for the engine's devices as they are now. */
static int setup_devices(smp_sparkplug_t *s)
{
    const char *g = s->cfg->mqtt.sparkplug.group_id, *n = s->cfg->mqtt.sparkplug.edge_node_id;
    s->devs = calloc(s->e->ndevs ? s->e->ndevs : 1, sizeof *s->devs);
    if (s->devs == NULL) {
        return -ENOMEM;
    }
    s->ndevs = s->e->ndevs;
    uint64_t alias = ALIAS_DEVICE;
    for (size_t k = 0; k < s->e->ndevs; k++) {
        struct spb_dev *sd = &s->devs[k];
        const char *dn = s->e->devs[k]->cfg->name;
        sd->alias0 = alias;
        alias += s->e->devs[k]->cfg->ntags;
        sd->t_birth = xasprintf(NS "/%s/DBIRTH/%s/%s", g, n, dn);
        sd->t_death = xasprintf(NS "/%s/DDEATH/%s/%s", g, n, dn);
        sd->t_data = xasprintf(NS "/%s/DDATA/%s/%s", g, n, dn);
        sd->t_cmd_json =
            xasprintf("%s/%s/%s/cmd", s->cfg->mqtt.topic_prefix, s->cfg->gateway.id, dn);
        if (!sd->t_birth || !sd->t_death || !sd->t_data || !sd->t_cmd_json) {
            return -ENOMEM;
        }
    }
    return 0;
}

int smp__sparkplug_new(smp_engine_t *e, smp_sparkplug_t **out)
{
    *out = NULL;
    const smp_config_t *cfg = e->cfg;
    if (cfg->mqtt.format != SMP_FORMAT_SPARKPLUG && cfg->mqtt.format != SMP_FORMAT_BOTH) {
        return 0;
    }
    smp_sparkplug_t *s = calloc(1, sizeof *s);
    if (s == NULL) {
        return -ENOMEM;
    }
    s->e = e;
    s->cfg = cfg;
    /* With both formats each session needs its own client id: the broker would otherwise
     * close one when the other connects. */
    s->client_id = cfg->mqtt.format == SMP_FORMAT_BOTH ? xasprintf("%s-spb", cfg->mqtt.client_id)
                                                       : xasprintf("%s", cfg->mqtt.client_id);
    s->bdseq_path = xasprintf("%s/sparkplug-bdseq", cfg->gateway.data_dir);
    int rc = s->client_id && s->bdseq_path ? setup_topics(s) : -ENOMEM;
    if (rc == 0) {
        s->bdseq = bdseq_load(s->bdseq_path);
        smp_bridge_cbs_t cbs = {
            .on_connect = on_connect,
            .on_disconnect = on_disconnect,
            .on_message = on_message,
            .on_ack = on_ack,
            .on_stopped = on_stopped,
        };
        rc = smp_bridge_new(e->loop, cfg, &cbs, s, &s->bridge);
    }
    if (rc == 0) {
        smp_bridge_session_t ses = {.client_id = s->client_id, .will = on_will, .arg = s};
        rc = smp_bridge_set_session(s->bridge, &ses);
    }
    if (rc < 0) {
        s->stopped = true;
        smp__sparkplug_free(s);
        return rc;
    }
    *out = s;
    return 0;
}

int smp__sparkplug_start(smp_sparkplug_t *s)
{
    if (s == NULL) {
        return 0;
    }
    /* Subscriptions go out before any publish of a session (the bridge sends them first). */
    int rc = smp_bridge_subscribe(s->bridge, s->t_ncmd, 1);
    if (rc == 0) {
        rc = smp_bridge_subscribe(s->bridge, s->t_dcmd_sub, 1);
    }
    if (rc == 0 && s->t_state != NULL) {
        rc = smp_bridge_subscribe(s->bridge, s->t_state, 1);
    }
    if (rc == 0) {
        rc = smp_bridge_start(s->bridge);
    }
    if (rc < 0) {
        LOG_ERR(SCOPE, "cannot start: %s", strerror(-rc));
    }
    return rc;
}

void smp__sparkplug_stop(smp_sparkplug_t *s, uint32_t timeout_ms)
{
    if (s == NULL) {
        return;
    }
    s->live = false;
    smp_bridge_stop(s->bridge, timeout_ms);
}

bool smp__sparkplug_stopped(const smp_sparkplug_t *s)
{
    return s == NULL || s->stopped;
}

void smp__sparkplug_free(smp_sparkplug_t *s)
{
    if (s == NULL) {
        return;
    }
    smp_bridge_free(s->bridge);
    while (s->hist_head != NULL) {
        hist_drop_oldest(s);
    }
    free_devices(s);
    free(s->client_id);
    free(s->bdseq_path);
    free(s->t_nbirth);
    free(s->t_ndeath);
    free(s->t_ncmd);
    free(s->t_dcmd_sub);
    free(s->t_state);
    free(s->will);
    free(s);
}

/* A reload changed the engine's devices (`old`, indexed as before, is what they were): each
 * removed or changed device that was born gets its DDEATH, kept DATA follows its device to its
 * new index, and a live session is born again (NBIRTH, then a DBIRTH per online device): the
 * new device list, aliases and metrics are announced as a whole. */
int smp__sparkplug_devices_changed(smp_sparkplug_t *s, struct device *const *old, size_t nold)
{
    if (s == NULL || s->stopped) {
        return 0;
    }
    for (size_t k = 0; k < nold && k < s->ndevs; k++) {
        if (old[k]->retiring && s->live && s->devs[k].born) {
            send_msg(s, s->devs[k].t_death, smp__wall_ms(), NULL, 0, false);
        }
    }
    for (struct hist *h = s->hist_head; h != NULL; h = h->next) {
        h->dev = h->dev < nold && !old[h->dev]->retiring ? old[h->dev]->index : SIZE_MAX;
    }
    free_devices(s);
    int rc = setup_devices(s);
    if (rc < 0) {
        LOG_ERR(SCOPE, "out of memory after a reload: stopping the session");
        s->live = false;
        smp_bridge_drop(s->bridge, "out of memory");
        return rc;
    }
    if (s->live) {
        LOG_INFO(SCOPE, "the devices changed: rebirth");
        births(s);
    }
    return 0;
}

/* A reload's config: one reconnect with its MQTT settings when they changed. */
void smp__sparkplug_reconfigure(smp_sparkplug_t *s, const smp_config_t *cfg, bool reconnect)
{
    if (s == NULL || s->stopped) {
        return;
    }
    s->cfg = cfg;
    if (reconnect) {
        s->live = false;
        smp_bridge_reconfigure(s->bridge, cfg);
    } else {
        smp_bridge_rebind(s->bridge, cfg);
    }
}
