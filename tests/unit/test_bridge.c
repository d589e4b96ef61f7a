/* Bridge tests, against a real mosquitto broker started per test on a free 127.0.0.1 port.
 *
 * The bridge runs on this test's libuv loop. The observing client is a plain libmosquitto
 * client with its own thread (mosquitto_loop_start); it records what it receives under a mutex
 * and wakes the loop with a uv_async, so every wait is "run the loop until a condition holds or
 * a deadline passes" (WAIT_UNTIL). The broker's log comes back through a pipe on the same loop:
 * the tests wait for its "running" line before connecting, and count its "New connection" lines
 * to see the reconnect backoff. A test that must show something does *not* happen (no second
 * on_disconnect, no connect with a wrong password) runs the loop for a fixed exposure window
 * and then asserts; that window is what is being measured, not a synchronisation. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <uv.h>

#include "bridge.h"
#include "log.h"

extern char **environ;

#define MOSQUITTO_BIN        "/usr/sbin/mosquitto"
#define MOSQUITTO_PASSWD_BIN "/usr/bin/mosquitto_passwd"
#define OPENSSL_BIN          "/usr/bin/openssl"
#define TEST_WATCHDOG_S      40
#define STATUS_TOPIC         "simpul/gw1/status"

/* ---- fixture -------------------------------------------------------------------------------- */

typedef struct broker {
    pid_t pid;
    int port;
    int tls_port; /* 0: no TLS listener */
    uv_pipe_t *log_pipe;
    char *log;
    size_t log_len;
    bool log_eof;
} broker_t;

typedef struct obs obs_t;

static struct {
    uv_loop_t loop;
    uv_timer_t deadline;
    bool deadline_hit;
    uv_async_t wake;
    char dir[64];
    broker_t broker;
    pid_t child;
    obs_t *observers[8];
    int nobservers;
    int next_obs_id;
} fx;

/* Killed from the watchdog: a hung test must not leave brokers behind. */
static volatile sig_atomic_t watchdog_broker_pid;
static volatile sig_atomic_t watchdog_child_pid;

static void on_watchdog(int sig)
{
    (void)sig;
    static const char msg[] = "test_bridge: watchdog expired, killing test servers\n";
    if (watchdog_broker_pid > 0) {
        kill((pid_t)watchdog_broker_pid, SIGKILL);
    }
    if (watchdog_child_pid > 0) {
        kill((pid_t)watchdog_child_pid, SIGKILL);
    }
    ssize_t w = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)w;
    _exit(124);
}

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void on_deadline(uv_timer_t *t)
{
    (void)t;
    fx.deadline_hit = true;
}

static void on_wake(uv_async_t *a)
{
    (void)a; /* only here to make uv_run return */
}

/* Runs the loop until `cond` holds or `ms` milliseconds pass. The caller asserts afterwards. */
#define WAIT_UNTIL(cond, ms)                                                                       \
    do {                                                                                           \
        fx.deadline_hit = false;                                                                   \
        uv_timer_start(&fx.deadline, on_deadline, (ms), 0);                                        \
        while (!(cond) && !fx.deadline_hit) {                                                      \
            uv_run(&fx.loop, UV_RUN_ONCE);                                                         \
        }                                                                                          \
        uv_timer_stop(&fx.deadline);                                                               \
    } while (0)

/* An exposure window: runs the loop for `ms` whatever happens. */
#define RUN_FOR(ms) WAIT_UNTIL(false, ms)

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa;
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    socklen_t len = sizeof sa;
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sa, &len), 0);
    close(fd);
    return ntohs(sa.sin_port);
}

/* posix_spawn with stdin from /dev/null, stdout+stderr to `out_fd` (or /dev/null), and every
 * other descriptor closed, so the child holds none of our sockets. */
static pid_t spawn(char *const argv[], int out_fd)
{
    posix_spawn_file_actions_t fa;
    assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    if (out_fd >= 0) {
        posix_spawn_file_actions_adddup2(&fa, out_fd, 1);
        posix_spawn_file_actions_adddup2(&fa, out_fd, 2);
    } else {
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
        posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    }
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    pid_t pid = 0;
    int rc = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    assert_int_equal(rc, 0);
    return pid;
}

/* Runs a short helper program (mosquitto_passwd, openssl) to completion. */
static int run_tool(char *const argv[])
{
    pid_t pid = spawn(argv, -1);
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void path_in_dir(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", fx.dir, name);
}

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    /* The broker drops root privileges before reading its password and ACL files. */
    chmod(path, 0644);
}

/* ---- the broker ----------------------------------------------------------------------------- */

static void log_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    (void)h;
    (void)suggested;
    static char chunk[4096];
    *buf = uv_buf_init(chunk, sizeof chunk);
}

static void log_closed(uv_handle_t *h)
{
    free(h);
}

static void log_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    broker_t *br = s->data;
    if (n > 0) {
        char *grown = realloc(br->log, br->log_len + (size_t)n + 1);
        assert_non_null(grown);
        br->log = grown;
        memcpy(br->log + br->log_len, buf->base, (size_t)n);
        br->log_len += (size_t)n;
        br->log[br->log_len] = '\0';
    } else if (n < 0) {
        br->log_eof = true;
        uv_close((uv_handle_t *)s, log_closed);
        if (br->log_pipe == (uv_pipe_t *)s) {
            br->log_pipe = NULL;
        }
    }
}

static int count_in(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; p != NULL && (p = strstr(p, needle)) != NULL; p += strlen(needle)) {
        n++;
    }
    return n;
}

typedef struct broker_opts {
    bool anonymous; /* default true via broker_start_default */
    const char *password_file;
    const char *acl_file;
    const char *tls_ca, *tls_cert, *tls_key; /* for the TLS listener (tls_port) */
    /* Keep mosquitto's default max_queued_messages instead of 0 (unlimited). Debian's 2.0.11
     * (CVE-2023-28366 backport) answers any refused PUBLISH with a disconnect when the limit is
     * 0: its check "out_packet_count >= max_queued_messages" is then always true. */
    bool default_queue_limit;
} broker_opts_t;

static void broker_start(broker_t *br, const broker_opts_t *o)
{
    if (br->port == 0) {
        br->port = free_port();
    }
    char conf[8192];
    int n = snprintf(conf, sizeof conf,
                     "listener %d 127.0.0.1\n"
                     "allow_anonymous %s\n"
                     "%s"
                     "persistence false\n"
                     "log_dest stderr\n"
                     "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
                     "%s",
                     br->port, o->anonymous ? "true" : "false",
                     o->default_queue_limit ? "" : "max_queued_messages 0\n",
                     smp__log_level >= SMP_LOG_DEBUG ? "log_type debug\n" : "");
    if (o->password_file != NULL) {
        n += snprintf(conf + n, sizeof conf - (size_t)n, "password_file %s\n", o->password_file);
    }
    if (o->acl_file != NULL) {
        n += snprintf(conf + n, sizeof conf - (size_t)n, "acl_file %s\n", o->acl_file);
    }
    if (o->tls_cert != NULL) {
        if (br->tls_port == 0) {
            br->tls_port = free_port();
        }
        n += snprintf(conf + n, sizeof conf - (size_t)n,
                      "listener %d 127.0.0.1\ncafile %s\ncertfile %s\nkeyfile %s\n", br->tls_port,
                      o->tls_ca, o->tls_cert, o->tls_key);
    }
    char path[128];
    snprintf(path, sizeof path, "%s/mosquitto-%d.conf", fx.dir, br->port);
    write_file(path, conf);

    int fds[2];
    assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
    char *argv[] = {MOSQUITTO_BIN, "-c", path, NULL};
    br->pid = spawn(argv, fds[1]);
    watchdog_broker_pid = br->pid;
    close(fds[1]);

    free(br->log);
    br->log = calloc(1, 1);
    br->log_len = 0;
    br->log_eof = false;
    br->log_pipe = malloc(sizeof *br->log_pipe);
    assert_int_equal(uv_pipe_init(&fx.loop, br->log_pipe, 0), 0);
    assert_int_equal(uv_pipe_open(br->log_pipe, fds[0]), 0);
    br->log_pipe->data = br;
    assert_int_equal(uv_read_start((uv_stream_t *)br->log_pipe, log_alloc, log_read), 0);

    WAIT_UNTIL(strstr(br->log, " running") != NULL || br->log_eof, 5000);
    if (strstr(br->log, " running") == NULL) {
        fprintf(stderr, "broker log:\n%s\n", br->log);
    }
    assert_non_null(strstr(br->log, " running"));
}

static void broker_start_default(broker_t *br)
{
    broker_opts_t o = {.anonymous = true};
    broker_start(br, &o);
}

static void broker_kill(broker_t *br)
{
    if (br->pid > 0) {
        kill(br->pid, SIGKILL);
        waitpid(br->pid, NULL, 0);
        br->pid = 0;
        watchdog_broker_pid = 0;
    }
}

/* ---- the observing client ------------------------------------------------------------------- */

typedef struct obs_msg {
    struct obs_msg *next;
    char *topic;
    unsigned char *payload;
    int len;
    bool retain;
    unsigned char *corr;
    uint16_t corr_len;
} obs_msg_t;

struct obs {
    struct mosquitto *m;
    pthread_mutex_t mu;
    obs_msg_t *head, *tail; /* append-only while the client runs */
    int nmsgs;
    int subacks;
    bool connected;
};

static void obs_on_connect(struct mosquitto *m, void *obj, int rc, int flags,
                           const mosquitto_property *props)
{
    (void)m;
    (void)flags;
    (void)props;
    obs_t *o = obj;
    pthread_mutex_lock(&o->mu);
    o->connected = rc == 0;
    pthread_mutex_unlock(&o->mu);
    uv_async_send(&fx.wake);
}

static void obs_on_subscribe(struct mosquitto *m, void *obj, int mid, int n, const int *granted,
                             const mosquitto_property *props)
{
    (void)m;
    (void)mid;
    (void)n;
    (void)granted;
    (void)props;
    obs_t *o = obj;
    pthread_mutex_lock(&o->mu);
    o->subacks++;
    pthread_mutex_unlock(&o->mu);
    uv_async_send(&fx.wake);
}

static void obs_on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg,
                           const mosquitto_property *props)
{
    (void)m;
    obs_t *o = obj;
    obs_msg_t *e = calloc(1, sizeof *e);
    assert_non_null(e);
    e->topic = strdup(msg->topic);
    e->len = msg->payloadlen;
    e->payload = malloc((size_t)msg->payloadlen + 1);
    memcpy(e->payload, msg->payload, (size_t)msg->payloadlen);
    e->payload[msg->payloadlen] = '\0';
    e->retain = msg->retain;
    void *corr = NULL;
    if (props != NULL) {
        mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &e->corr_len,
                                       false);
    }
    e->corr = corr;
    pthread_mutex_lock(&o->mu);
    if (o->tail != NULL) {
        o->tail->next = e;
    } else {
        o->head = e;
    }
    o->tail = e;
    o->nmsgs++;
    pthread_mutex_unlock(&o->mu);
    uv_async_send(&fx.wake);
}

static bool obs_connected(obs_t *o)
{
    pthread_mutex_lock(&o->mu);
    bool c = o->connected;
    pthread_mutex_unlock(&o->mu);
    return c;
}

static int obs_subacks(obs_t *o)
{
    pthread_mutex_lock(&o->mu);
    int n = o->subacks;
    pthread_mutex_unlock(&o->mu);
    return n;
}

/* The first message on `topic` whose payload contains `needle` (NULL: any), or NULL. Entries
 * are immutable once appended, so the pointer stays valid until obs_stop. */
static const obs_msg_t *obs_find(obs_t *o, const char *topic, const char *needle)
{
    pthread_mutex_lock(&o->mu);
    const obs_msg_t *found = NULL;
    for (const obs_msg_t *e = o->head; e != NULL; e = e->next) {
        if (strcmp(e->topic, topic) == 0 &&
            (needle == NULL || strstr((const char *)e->payload, needle) != NULL)) {
            found = e;
            break;
        }
    }
    pthread_mutex_unlock(&o->mu);
    return found;
}

static obs_t *obs_start_ex(int port, int version, const char *user, const char *pass)
{
    obs_t *o = calloc(1, sizeof *o);
    assert_non_null(o);
    pthread_mutex_init(&o->mu, NULL);
    char id[32];
    snprintf(id, sizeof id, "observer-%d", fx.next_obs_id++);
    o->m = mosquitto_new(id, true, o);
    assert_non_null(o->m);
    mosquitto_int_option(o->m, MOSQ_OPT_PROTOCOL_VERSION, version);
    mosquitto_connect_v5_callback_set(o->m, obs_on_connect);
    mosquitto_subscribe_v5_callback_set(o->m, obs_on_subscribe);
    mosquitto_message_v5_callback_set(o->m, obs_on_message);
    if (user != NULL) {
        mosquitto_username_pw_set(o->m, user, pass);
    }
    /* A blocking connect is fine here: this is the test's client, not the bridge. */
    assert_int_equal(mosquitto_connect(o->m, "127.0.0.1", port, 30), MOSQ_ERR_SUCCESS);
    assert_int_equal(mosquitto_loop_start(o->m), MOSQ_ERR_SUCCESS);
    fx.observers[fx.nobservers++] = o;
    WAIT_UNTIL(obs_connected(o), 5000);
    assert_true(obs_connected(o));
    return o;
}

static obs_t *obs_start(int port)
{
    return obs_start_ex(port, MQTT_PROTOCOL_V311, NULL, NULL);
}

static void obs_subscribe(obs_t *o, const char *topic)
{
    int before = obs_subacks(o);
    assert_int_equal(mosquitto_subscribe(o->m, NULL, topic, 1), MOSQ_ERR_SUCCESS);
    WAIT_UNTIL(obs_subacks(o) > before, 5000);
    assert_true(obs_subacks(o) > before);
}

static void obs_stop(obs_t *o)
{
    for (int i = 0; i < fx.nobservers; i++) {
        if (fx.observers[i] == o) {
            fx.observers[i] = fx.observers[--fx.nobservers];
            break;
        }
    }
    mosquitto_disconnect(o->m);
    mosquitto_loop_stop(o->m, false);
    mosquitto_destroy(o->m);
    for (obs_msg_t *e = o->head, *next; e != NULL; e = next) {
        next = e->next;
        free(e->topic);
        free(e->payload);
        free(e->corr);
        free(e);
    }
    pthread_mutex_destroy(&o->mu);
    free(o);
}

/* ---- the bridge under test ------------------------------------------------------------------ */

typedef struct rec_msg {
    char topic[128];
    unsigned char payload[256];
    size_t len;
    bool has_rt;
    char rt[128];
    unsigned char corr[64];
    size_t corr_len;
    bool corr_null;
} rec_msg_t;

typedef struct rec {
    smp_bridge_t *b;
    int connects, disconnects, stopped;
    uint64_t acks[64];
    int nacks;
    int acks_at_stop;
    bool connected_at_stop;
    rec_msg_t msgs[8];
    int nmsgs;
    bool echo; /* answer a message with a Response Topic, from inside on_message */
    int echo_rc;
    int child_fd; /* the Will test's child reports its connect here */
} rec_t;

static void cb_connect(void *arg)
{
    rec_t *r = arg;
    r->connects++;
    if (r->child_fd >= 0) {
        ssize_t w = write(r->child_fd, "c", 1);
        (void)w;
    }
}

static void cb_disconnect(void *arg)
{
    ((rec_t *)arg)->disconnects++;
}

static void cb_message(void *arg, const char *topic, const void *payload, size_t len,
                       const smp_mqtt_props_t *props)
{
    rec_t *r = arg;
    assert_non_null(props);
    if (r->nmsgs == (int)(sizeof r->msgs / sizeof r->msgs[0])) {
        return;
    }
    rec_msg_t *m = &r->msgs[r->nmsgs++];
    snprintf(m->topic, sizeof m->topic, "%s", topic);
    m->len = len < sizeof m->payload ? len : sizeof m->payload;
    if (len > 0) {
        memcpy(m->payload, payload, m->len);
    }
    m->has_rt = props->response_topic != NULL;
    if (m->has_rt) {
        snprintf(m->rt, sizeof m->rt, "%s", props->response_topic);
    }
    m->corr_null = props->correlation_data == NULL;
    m->corr_len = props->correlation_len < sizeof m->corr ? props->correlation_len : 0;
    if (!m->corr_null) {
        memcpy(m->corr, props->correlation_data, m->corr_len);
    }
    if (r->echo && props->response_topic != NULL) {
        r->echo_rc = smp_bridge_publish(r->b, props->response_topic, "pong", 4, 1, false,
                                        /* token = */ 99, props);
    }
}

static void cb_ack(void *arg, uint64_t token)
{
    rec_t *r = arg;
    if (r->nacks < (int)(sizeof r->acks / sizeof r->acks[0])) {
        r->acks[r->nacks] = token;
    }
    r->nacks++;
}

static void cb_stopped(void *arg)
{
    rec_t *r = arg;
    r->stopped++;
    r->acks_at_stop = r->nacks;
    r->connected_at_stop = smp_bridge_connected(r->b);
}

static const smp_bridge_cbs_t test_cbs = {
    .on_connect = cb_connect,
    .on_disconnect = cb_disconnect,
    .on_message = cb_message,
    .on_ack = cb_ack,
    .on_stopped = cb_stopped,
};

static smp_config_t base_cfg(int port)
{
    smp_config_t c;
    memset(&c, 0, sizeof c);
    c.gateway.id = "gw1";
    c.mqtt.host = "127.0.0.1";
    c.mqtt.port = port;
    c.mqtt.client_id = "simpul-gw1";
    c.mqtt.topic_prefix = "simpul";
    c.mqtt.qos = 1;
    c.mqtt.keepalive_s = 30;
    c.mqtt.version = 4;
    c.mqtt.inflight_max = 16;
    return c;
}

static smp_bridge_t *bridge_start(const smp_config_t *cfg, rec_t *r)
{
    smp_bridge_t *b = NULL;
    r->child_fd = -1;
    assert_int_equal(smp_bridge_new(&fx.loop, cfg, &test_cbs, r, &b), 0);
    r->b = b;
    assert_int_equal(smp_bridge_start(b), 0);
    return b;
}

static void bridge_stop_and_free(smp_bridge_t *b, rec_t *r)
{
    smp_bridge_stop(b, 3000);
    WAIT_UNTIL(r->stopped > 0, 5000);
    assert_int_equal(r->stopped, 1);
    smp_bridge_free(b);
    r->b = NULL;
}

static bool has_ack(const rec_t *r, uint64_t token)
{
    for (int i = 0; i < r->nacks && i < 64; i++) {
        if (r->acks[i] == token) {
            return true;
        }
    }
    return false;
}

/* The broker handles one client's packets in order: once a QoS 1 publish made after a SUBSCRIBE
 * is acknowledged, the subscription is in place. */
static void bridge_sync(smp_bridge_t *b, rec_t *r, uint64_t token)
{
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/sync", "s", 1, 1, false, token, NULL), 0);
    WAIT_UNTIL(has_ack(r, token), 5000);
    assert_true(has_ack(r, token));
}

/* Checks {"state":"<state>","version":"1.1.0","ts":N} with N in [lo, hi]. */
static void assert_status(const obs_msg_t *m, const char *state, uint64_t lo, uint64_t hi)
{
    assert_non_null(m);
    char prefix[64];
    snprintf(prefix, sizeof prefix, "{\"state\":\"%s\",\"version\":\"1.1.0\",\"ts\":", state);
    const char *p = (const char *)m->payload;
    assert_int_equal(strncmp(p, prefix, strlen(prefix)), 0);
    char *end = NULL;
    uint64_t ts = strtoull(p + strlen(prefix), &end, 10);
    assert_string_equal(end, "}");
    assert_true(ts >= lo);
    assert_true(ts <= hi);
}

/* ---- setup / teardown ----------------------------------------------------------------------- */

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static int count_handles_cb_n;
static void count_handle(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h)) {
        fprintf(stderr, "open handle left on the loop: %s\n", uv_handle_type_name(h->type));
    }
    count_handles_cb_n++;
}

static int setup(void **state)
{
    (void)state;
    memset(&fx, 0, sizeof fx);
    alarm(TEST_WATCHDOG_S);
    snprintf(fx.dir, sizeof fx.dir, "/tmp/smp-test-bridge-XXXXXX");
    assert_non_null(mkdtemp(fx.dir));
    chmod(fx.dir, 0755); /* the broker reads its files as the mosquitto user */
    assert_int_equal(uv_loop_init(&fx.loop), 0);
    uv_timer_init(&fx.loop, &fx.deadline);
    uv_async_init(&fx.loop, &fx.wake, on_wake);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    while (fx.nobservers > 0) {
        obs_stop(fx.observers[0]);
    }
    if (fx.child > 0) {
        kill(fx.child, SIGKILL);
        waitpid(fx.child, NULL, 0);
        fx.child = 0;
        watchdog_child_pid = 0;
    }
    broker_kill(&fx.broker);
    if (smp__log_level >= SMP_LOG_DEBUG && fx.broker.log != NULL) {
        fprintf(stderr, "---- broker log ----\n%s---- end of broker log ----\n", fx.broker.log);
    }
    uv_close((uv_handle_t *)&fx.deadline, NULL);
    uv_close((uv_handle_t *)&fx.wake, NULL);
    if (fx.broker.log_pipe != NULL) {
        uv_close((uv_handle_t *)fx.broker.log_pipe, log_closed);
        fx.broker.log_pipe = NULL;
    }
    /* Close callbacks run in the next iteration; two are plenty. Whatever is still there
     * belongs to the bridge: it must not leave handles behind. */
    uv_run(&fx.loop, UV_RUN_NOWAIT);
    uv_run(&fx.loop, UV_RUN_NOWAIT);
    count_handles_cb_n = 0;
    uv_walk(&fx.loop, count_handle, NULL);
    int left = count_handles_cb_n;
    int close_rc = uv_loop_close(&fx.loop);
    free(fx.broker.log);
    nftw(fx.dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
    alarm(0);
    assert_int_equal(left, 0);
    assert_int_equal(close_rc, 0);
    return 0;
}

/* ---- tests ---------------------------------------------------------------------------------- */

typedef struct child_wait {
    int fd;
    bool connected, failed;
} child_wait_t;

static void on_child_ready(uv_poll_t *p, int status, int events)
{
    child_wait_t *cw = p->data;
    char c = 0;
    if (status < 0 || !(events & UV_READABLE) || read(cw->fd, &c, 1) != 1) {
        cw->failed = true; /* the child died before connecting: EOF */
    } else {
        cw->connected = c == 'c';
    }
    uv_poll_stop(p);
}

/* The Will: a bridge process killed with SIGKILL cannot say goodbye; the broker says it. Runs
 * first, while this process has no threads but libuv's idle pool: the child is forked. */
static void test_will_published_when_process_killed(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    int fds[2];
    assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
    uint64_t t0 = wall_ms();
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* Child: its own loop, a bridge, and nothing else. It never returns into cmocka. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        signal(SIGALRM, SIG_DFL); /* the inherited watchdog would kill the parent's broker */
        alarm(TEST_WATCHDOG_S);
        close(fds[0]);
        uv_loop_t loop;
        if (uv_loop_init(&loop) != 0) {
            _exit(2);
        }
        smp_config_t cfg = base_cfg(fx.broker.port);
        static rec_t r;
        smp_bridge_t *b = NULL;
        if (smp_bridge_new(&loop, &cfg, &test_cbs, &r, &b) != 0) {
            _exit(3);
        }
        r.child_fd = fds[1];
        r.b = b;
        if (smp_bridge_start(b) != 0) {
            _exit(4);
        }
        uv_run(&loop, UV_RUN_DEFAULT);
        _exit(5);
    }
    fx.child = pid;
    watchdog_child_pid = pid;
    close(fds[1]);

    /* Wait for the child's on_connect, reported as one byte on the pipe. */
    child_wait_t cw = {.fd = fds[0]};
    uv_poll_t ready;
    assert_int_equal(uv_poll_init(&fx.loop, &ready, fds[0]), 0);
    ready.data = &cw;
    assert_int_equal(uv_poll_start(&ready, UV_READABLE, on_child_ready), 0);
    WAIT_UNTIL(cw.connected || cw.failed, 5000);
    uv_close((uv_handle_t *)&ready, NULL);
    uv_run(&fx.loop, UV_RUN_NOWAIT); /* runs the close callback: `ready` lives on this stack */
    close(fds[0]);
    bool child_connected = cw.connected;
    assert_true(child_connected);

    obs_t *o = obs_start(fx.broker.port);
    obs_subscribe(o, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, "\"online\"") != NULL, 5000);
    assert_status(obs_find(o, STATUS_TOPIC, "\"online\""), "online", t0, wall_ms());

    assert_int_equal(kill(pid, SIGKILL), 0);
    assert_int_equal(waitpid(pid, NULL, 0), pid);
    fx.child = 0;
    watchdog_child_pid = 0;

    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, "\"offline\"") != NULL, 5000);
    assert_status(obs_find(o, STATUS_TOPIC, "\"offline\""), "offline", t0, wall_ms());

    /* And it is retained: a newcomer sees offline. */
    obs_t *late = obs_start(fx.broker.port);
    obs_subscribe(late, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(late, STATUS_TOPIC, NULL) != NULL, 5000);
    const obs_msg_t *m = obs_find(late, STATUS_TOPIC, NULL);
    assert_status(m, "offline", t0, wall_ms());
    assert_true(m->retain);
    obs_stop(late);
    obs_stop(o);
}

/* Connects (through a host name resolved off the loop) and leaves a retained online status that
 * a subscriber arriving later still gets. */
static void test_connect_publishes_retained_online(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    cfg.mqtt.host = "localhost";
    rec_t r = {0};
    uint64_t t0 = wall_ms();
    smp_bridge_t *b = bridge_start(&cfg, &r);
    assert_false(smp_bridge_connected(b));
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_int_equal(r.connects, 1);
    assert_int_equal(r.disconnects, 0);
    assert_true(smp_bridge_connected(b));

    obs_t *o = obs_start(fx.broker.port);
    obs_subscribe(o, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, NULL) != NULL, 5000);
    const obs_msg_t *m = obs_find(o, STATUS_TOPIC, NULL);
    assert_status(m, "online", t0, wall_ms());
    assert_true(m->retain);
    obs_stop(o);
    bridge_stop_and_free(b, &r);
}

/* QoS 1: on_ack with the publish's own token after the PUBACK; the payload arrives byte for
 * byte (NULs included). QoS 0: delivered, never acknowledged. */
static void test_publish_qos1_acked_with_token(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_true(smp_bridge_connected(b));

    obs_t *o = obs_start(fx.broker.port);
    obs_subscribe(o, "simpul/gw1/pump-01/#");
    static const unsigned char bin[] = {0x00, 0x01, 'a', 0x00, 0xff, '{'};
    const char *text = "{\"ts\":1,\"seq\":42,\"values\":{\"running\":true}}";
    assert_int_equal(
        smp_bridge_publish(b, "simpul/gw1/pump-01/bin", bin, sizeof bin, 1, false, 42, NULL), 0);
    assert_int_equal(
        smp_bridge_publish(b, "simpul/gw1/pump-01/data", text, strlen(text), 1, false, 43, NULL),
        0);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/pump-01/q0", "zero", 4, 0, false, 44, NULL),
                     0);
    assert_true(smp_bridge_inflight(b) >= 2);
    WAIT_UNTIL(r.nacks >= 2 && obs_find(o, "simpul/gw1/pump-01/q0", NULL) != NULL, 5000);
    assert_int_equal(r.nacks, 2);
    assert_true(r.acks[0] == 42 && r.acks[1] == 43);
    assert_int_equal(smp_bridge_inflight(b), 0);

    const obs_msg_t *m = obs_find(o, "simpul/gw1/pump-01/bin", NULL);
    assert_non_null(m);
    assert_int_equal(m->len, sizeof bin);
    assert_memory_equal(m->payload, bin, sizeof bin);
    m = obs_find(o, "simpul/gw1/pump-01/data", NULL);
    assert_non_null(m);
    assert_string_equal((const char *)m->payload, text);
    assert_false(m->retain);

    /* The QoS 0 message has been delivered; its token must never be acknowledged. */
    bridge_sync(b, &r, 45);
    assert_false(has_ack(&r, 44));
    obs_stop(o);
    bridge_stop_and_free(b, &r);
}

/* The in-flight window: QoS 1 publishes beyond inflight_max are refused with -EAGAIN (the caller
 * keeps them) and accepted again once PUBACKs free the window. QoS 0 is not limited by it. */
static void test_inflight_window_full_is_eagain(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    cfg.mqtt.inflight_max = 3;
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0 && smp_bridge_inflight(b) == 0, 5000);
    assert_int_equal(smp_bridge_inflight(b), 0);

    /* No loop turn in between: no PUBACK can be processed. */
    int accepted = 0;
    int rc = 0;
    for (uint64_t token = 1; token <= 10; token++) {
        rc = smp_bridge_publish(b, "simpul/gw1/d/data", "x", 1, 1, false, token, NULL);
        if (rc != 0) {
            break;
        }
        accepted++;
    }
    assert_int_equal(rc, -EAGAIN);
    assert_int_equal(accepted, 3);
    assert_int_equal(smp_bridge_inflight(b), 3);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "y", 1, 0, false, 0, NULL), 0);

    WAIT_UNTIL(r.nacks >= 3, 5000);
    assert_int_equal(r.nacks, 3);
    assert_int_equal(smp_bridge_inflight(b), 0);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "z", 1, 1, false, 11, NULL), 0);
    WAIT_UNTIL(has_ack(&r, 11), 5000);
    assert_true(has_ack(&r, 11));
    bridge_stop_and_free(b, &r);
}

/* Nobody listening: -ENOTCONN (nothing queued inside libmosquitto), one on_disconnect for the
 * failed connect, and a stop that does not wait for anything. */
static void test_enotconn_while_broker_down(void **state)
{
    (void)state;
    smp_config_t cfg = base_cfg(free_port());
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "x", 1, 1, false, 1, NULL),
                     -ENOTCONN);
    WAIT_UNTIL(r.disconnects > 0, 5000);
    assert_int_equal(r.disconnects, 1);
    assert_int_equal(r.connects, 0);
    assert_false(smp_bridge_connected(b));
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "x", 1, 1, false, 2, NULL),
                     -ENOTCONN);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "x", 1, 0, false, 0, NULL),
                     -ENOTCONN);
    assert_int_equal(smp_bridge_inflight(b), 0);

    uint64_t t0 = mono_ms();
    smp_bridge_stop(b, 10000);
    WAIT_UNTIL(r.stopped > 0, 5000);
    assert_int_equal(r.stopped, 1);
    assert_true(mono_ms() - t0 < 1000);
    assert_int_equal(r.nacks, 0);
    smp_bridge_free(b);
}

/* Broker killed: one on_disconnect for the whole outage (however many retries fail), in-flight
 * messages forgotten; broker back on the same port: reconnect, online status again (the new
 * broker has no retained state of its own), subscriptions restored, on_connect again. */
static void test_reconnects_after_broker_killed(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    rec_t r = {0};
    smp_bridge_t *b = NULL;
    assert_int_equal(smp_bridge_new(&fx.loop, &cfg, &test_cbs, &r, &b), 0);
    r.b = b;
    r.child_fd = -1;
    assert_int_equal(smp_bridge_subscribe(b, "simpul/gw1/+/cmd", 1), 0);
    assert_int_equal(smp_bridge_start(b), 0);
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_int_equal(r.connects, 1);
    bridge_sync(b, &r, 1000);

    /* One more publish that the dead broker will never acknowledge. */
    broker_kill(&fx.broker);
    (void)smp_bridge_publish(b, "simpul/gw1/d/data", "lost", 4, 1, false, 7, NULL);
    WAIT_UNTIL(r.disconnects > 0, 5000);
    assert_int_equal(r.disconnects, 1);
    assert_false(smp_bridge_connected(b));
    assert_int_equal(smp_bridge_inflight(b), 0);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "x", 1, 1, false, 8, NULL),
                     -ENOTCONN);

    /* Exposure window: the retry after 1 s fails too, and must not be reported again. */
    RUN_FOR(1500);
    assert_int_equal(r.disconnects, 1);
    assert_int_equal(r.connects, 1);

    uint64_t t_restart = wall_ms();
    broker_start_default(&fx.broker); /* same port */
    WAIT_UNTIL(r.connects > 1, 8000);
    assert_int_equal(r.connects, 2);
    assert_int_equal(r.disconnects, 1);
    assert_true(smp_bridge_connected(b));
    assert_false(has_ack(&r, 7));

    obs_t *o = obs_start(fx.broker.port);
    obs_subscribe(o, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, NULL) != NULL, 5000);
    assert_status(obs_find(o, STATUS_TOPIC, NULL), "online", t_restart, wall_ms());

    /* The subscription made before the outage works on the new connection. */
    bridge_sync(b, &r, 1001);
    assert_int_equal(mosquitto_publish(o->m, NULL, "simpul/gw1/pump-01/cmd", 5, "hello", 1, false),
                     MOSQ_ERR_SUCCESS);
    WAIT_UNTIL(r.nmsgs > 0, 5000);
    assert_int_equal(r.nmsgs, 1);
    assert_string_equal(r.msgs[0].topic, "simpul/gw1/pump-01/cmd");
    obs_stop(o);
    bridge_stop_and_free(b, &r);
}

/* A Sparkplug session (smp_bridge_set_session): its own client id, no status topic, a Will
 * asked for before every CONNECT; smp_bridge_drop ends the connection without DISCONNECT (the
 * broker publishes that Will) and reconnects; a clean stop on MQTT 3.1.1 publishes the Will's
 * payload itself. */
struct will_ctx {
    int calls;
    char payload[32];
};

static void test_will(void *arg, const char **topic, const void **payload, size_t *len)
{
    struct will_ctx *w = arg;
    w->calls++;
    snprintf(w->payload, sizeof w->payload, "death-%d", w->calls);
    *topic = "spBv1.0/G/NDEATH/E";
    *payload = w->payload;
    *len = strlen(w->payload);
}

static void test_session_will_drop_and_stop(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    rec_t r = {0};
    r.child_fd = -1;
    struct will_ctx w = {0};
    smp_bridge_t *b = NULL;
    assert_int_equal(smp_bridge_new(&fx.loop, &cfg, &test_cbs, &r, &b), 0);
    r.b = b;
    smp_bridge_session_t ses = {.client_id = "simpul-gw1-spb", .will = test_will, .arg = &w};
    assert_int_equal(smp_bridge_set_session(b, &ses), 0);
    obs_t *o = obs_start(fx.broker.port);
    obs_subscribe(o, "spBv1.0/#");
    obs_subscribe(o, STATUS_TOPIC);
    WAIT_UNTIL(obs_subacks(o) >= 2, 5000);
    assert_int_equal(smp_bridge_start(b), 0);
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_int_equal(w.calls, 1);

    smp_bridge_drop(b, "test drop");
    WAIT_UNTIL(obs_find(o, "spBv1.0/G/NDEATH/E", "death-1") != NULL, 5000);
    assert_false(obs_find(o, "spBv1.0/G/NDEATH/E", "death-1")->retain);
    WAIT_UNTIL(r.connects > 1, 8000); /* after the backoff, with the next Will */
    assert_int_equal(w.calls, 2);

    bridge_stop_and_free(b, &r);
    WAIT_UNTIL(obs_find(o, "spBv1.0/G/NDEATH/E", "death-2") != NULL, 5000);
    assert_null(obs_find(o, STATUS_TOPIC, NULL)); /* no JSON status from a Sparkplug session */
    obs_stop(o);
}

/* Messages on subscribed topics reach on_message with topic and payload intact: subscriptions
 * made before start (sent on connect) and while connected (sent at once). MQTT 3.1.1 has no
 * properties: both fields are NULL/0. */
static void test_incoming_message_delivered(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    rec_t r = {0};
    smp_bridge_t *b = NULL;
    assert_int_equal(smp_bridge_new(&fx.loop, &cfg, &test_cbs, &r, &b), 0);
    r.b = b;
    r.child_fd = -1;
    assert_int_equal(smp_bridge_subscribe(b, "simpul/gw1/+/cmd", 1), 0);
    assert_int_equal(smp_bridge_subscribe(b, "bad/#/topic", 1), -EINVAL);
    assert_int_equal(smp_bridge_start(b), 0);
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_int_equal(smp_bridge_subscribe(b, "simpul/gw1/late", 0), 0);
    bridge_sync(b, &r, 1);

    obs_t *o = obs_start(fx.broker.port);
    static const unsigned char cmd[] = "{\"id\":\"c-1\",\"op\":\"read\"}\0tail";
    assert_int_equal(
        mosquitto_publish(o->m, NULL, "simpul/gw1/pump-01/cmd", (int)sizeof cmd, cmd, 1, false),
        MOSQ_ERR_SUCCESS);
    assert_int_equal(mosquitto_publish(o->m, NULL, "simpul/gw1/late", 4, "late", 1, false),
                     MOSQ_ERR_SUCCESS);
    WAIT_UNTIL(r.nmsgs >= 2, 5000);
    assert_int_equal(r.nmsgs, 2);
    assert_string_equal(r.msgs[0].topic, "simpul/gw1/pump-01/cmd");
    assert_int_equal(r.msgs[0].len, sizeof cmd);
    assert_memory_equal(r.msgs[0].payload, cmd, sizeof cmd);
    assert_false(r.msgs[0].has_rt);
    assert_true(r.msgs[0].corr_null);
    assert_int_equal(r.msgs[0].corr_len, 0);
    assert_string_equal(r.msgs[1].topic, "simpul/gw1/late");
    assert_memory_equal(r.msgs[1].payload, "late", 4);
    obs_stop(o);
    bridge_stop_and_free(b, &r);
}

/* MQTT 5 request/response: Response Topic and Correlation Data reach on_message, and a reply
 * published with those props (from inside on_message) carries the Correlation Data back. */
static void test_mqtt5_response_topic_and_correlation_data(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    cfg.mqtt.version = 5;
    rec_t r = {0};
    r.echo = true;
    r.echo_rc = 1;
    smp_bridge_t *b = NULL;
    assert_int_equal(smp_bridge_new(&fx.loop, &cfg, &test_cbs, &r, &b), 0);
    r.b = b;
    r.child_fd = -1;
    assert_int_equal(smp_bridge_subscribe(b, "simpul/gw1/pump-01/cmd", 1), 0);
    assert_int_equal(smp_bridge_start(b), 0);
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_int_equal(r.connects, 1);
    bridge_sync(b, &r, 1); /* MQTT 5 PUBACK (0x10 "no matching subscribers") counts as acked */

    obs_t *o = obs_start_ex(fx.broker.port, MQTT_PROTOCOL_V5, NULL, NULL);
    obs_subscribe(o, "reply/gw1");
    static const unsigned char corr[] = {0x00, 0x42, 0xff, 0x10, 0x00};
    mosquitto_property *props = NULL;
    assert_int_equal(mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, "reply/gw1"),
                     MOSQ_ERR_SUCCESS);
    assert_int_equal(mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, corr,
                                                   (uint16_t)sizeof corr),
                     MOSQ_ERR_SUCCESS);
    assert_int_equal(
        mosquitto_publish_v5(o->m, NULL, "simpul/gw1/pump-01/cmd", 4, "ping", 1, false, props),
        MOSQ_ERR_SUCCESS);
    mosquitto_property_free_all(&props);

    WAIT_UNTIL(r.nmsgs > 0 && obs_find(o, "reply/gw1", NULL) != NULL && has_ack(&r, 99), 5000);
    assert_int_equal(r.nmsgs, 1);
    assert_true(r.msgs[0].has_rt);
    assert_string_equal(r.msgs[0].rt, "reply/gw1");
    assert_false(r.msgs[0].corr_null);
    assert_int_equal(r.msgs[0].corr_len, sizeof corr);
    assert_memory_equal(r.msgs[0].corr, corr, sizeof corr);
    assert_int_equal(r.echo_rc, 0);

    const obs_msg_t *reply = obs_find(o, "reply/gw1", NULL);
    assert_non_null(reply);
    assert_string_equal((const char *)reply->payload, "pong");
    assert_int_equal(reply->corr_len, sizeof corr);
    assert_non_null(reply->corr);
    assert_memory_equal(reply->corr, corr, sizeof corr);
    assert_true(has_ack(&r, 99));
    obs_stop(o);
    bridge_stop_and_free(b, &r);
}

/* MQTT 5: a PUBACK with a failure reason code (here 0x87, refused by the broker's ACL) frees
 * the window slot but is not an acknowledgement: the caller must send the message again. */
static void test_mqtt5_refused_puback_is_not_acked(void **state)
{
    (void)state;
    char acl[128];
    path_in_dir(acl, sizeof acl, "acl");
    write_file(acl, "topic readwrite simpul/#\n");
    broker_opts_t opts = {.anonymous = true, .acl_file = acl, .default_queue_limit = true};
    broker_start(&fx.broker, &opts);
    smp_config_t cfg = base_cfg(fx.broker.port);
    cfg.mqtt.version = 5;
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0 && smp_bridge_inflight(b) == 0, 5000);
    assert_int_equal(r.connects, 1);

    assert_int_equal(smp_bridge_publish(b, "forbidden/x", "no", 2, 1, false, 5, NULL), 0);
    assert_int_equal(smp_bridge_inflight(b), 1);
    WAIT_UNTIL(smp_bridge_inflight(b) == 0, 5000);
    assert_int_equal(smp_bridge_inflight(b), 0);
    bridge_sync(b, &r, 6); /* allowed topic: acknowledged, after the refused one */
    assert_false(has_ack(&r, 5));
    assert_true(smp_bridge_connected(b));
    assert_int_equal(r.connects, 1);
    bridge_stop_and_free(b, &r);
}

/* A clean stop: outstanding QoS 1 messages are acknowledged first, then the retained offline
 * status replaces the online one, and on_stopped comes last. Teardown checks no handle is left. */
static void test_stop_drains_and_publishes_offline(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0, 5000);
    obs_t *o = obs_start(fx.broker.port);
    obs_subscribe(o, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, "\"online\"") != NULL, 5000);
    assert_non_null(obs_find(o, STATUS_TOPIC, "\"online\""));

    for (uint64_t token = 1; token <= 5; token++) {
        assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "v", 1, 1, false, token, NULL),
                         0);
    }
    uint64_t t0 = wall_ms();
    smp_bridge_stop(b, 5000);
    smp_bridge_stop(b, 5000); /* idempotent */
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "v", 1, 1, false, 6, NULL),
                     -ENOTCONN);
    WAIT_UNTIL(r.stopped > 0, 6000);
    assert_int_equal(r.stopped, 1);
    assert_int_equal(r.acks_at_stop, 5);
    for (uint64_t token = 1; token <= 5; token++) {
        assert_true(has_ack(&r, token));
    }
    assert_false(r.connected_at_stop);
    assert_false(smp_bridge_connected(b));
    smp_bridge_free(b);

    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, "\"offline\"") != NULL, 5000);
    assert_status(obs_find(o, STATUS_TOPIC, "\"offline\""), "offline", t0, wall_ms());
    obs_t *late = obs_start(fx.broker.port);
    obs_subscribe(late, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(late, STATUS_TOPIC, NULL) != NULL, 5000);
    const obs_msg_t *m = obs_find(late, STATUS_TOPIC, NULL);
    assert_status(m, "offline", t0, wall_ms());
    assert_true(m->retain);
    obs_stop(late);
    obs_stop(o);
}

/* The wait for acknowledgements is bounded: a broker that stops answering (SIGSTOP) delays the
 * stop by timeout_ms, not forever, and nothing is acknowledged that the broker did not ack. */
static void test_stop_wait_is_bounded(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0 && smp_bridge_inflight(b) == 0, 5000);
    assert_int_equal(smp_bridge_inflight(b), 0);

    assert_int_equal(kill(fx.broker.pid, SIGSTOP), 0);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "v", 1, 1, false, 7, NULL), 0);
    uint64_t t0 = mono_ms();
    smp_bridge_stop(b, 300);
    WAIT_UNTIL(r.stopped > 0, 3000);
    uint64_t elapsed = mono_ms() - t0;
    assert_int_equal(r.stopped, 1);
    assert_true(elapsed >= 250);
    assert_true(elapsed < 2000);
    assert_false(has_ack(&r, 7));
    assert_int_equal(smp_bridge_inflight(b), 0);
    smp_bridge_free(b);
    broker_kill(&fx.broker); /* SIGKILL ends a stopped process too */
}

/* libmosquitto reports a QoS 0 message written to the socket through the same callback, with
 * the same 16-bit mid counter, as a QoS 1 PUBACK. With a QoS 1 message waiting, exactly 65535
 * QoS 0 publishes make the last one reuse its mid: its write must not pass for the PUBACK
 * while the broker (SIGSTOPped) has acknowledged nothing. */
static void test_qos0_mid_reuse_is_not_an_ack(void **state)
{
    (void)state;
    broker_start_default(&fx.broker);
    smp_config_t cfg = base_cfg(fx.broker.port);
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0 && smp_bridge_inflight(b) == 0, 5000);
    assert_int_equal(smp_bridge_inflight(b), 0);

    assert_int_equal(kill(fx.broker.pid, SIGSTOP), 0);
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "q1", 2, 1, false, 77, NULL), 0);
    for (int i = 0; i < 65535; i++) {
        assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/q0", "x", 1, 0, false, 0, NULL), 0);
    }
    RUN_FOR(200); /* whatever the socket takes gets written, and reported */
    assert_int_equal(r.nacks, 0);
    assert_int_equal(smp_bridge_inflight(b), 1);

    assert_int_equal(kill(fx.broker.pid, SIGCONT), 0);
    WAIT_UNTIL(r.nacks > 0, 15000);
    assert_int_equal(r.nacks, 1);
    assert_true(r.acks[0] == 77);
    assert_int_equal(smp_bridge_inflight(b), 0);
    bridge_stop_and_free(b, &r);
}

/* Stop before any connection: prompt, whether the bridge was started or not. */
static void test_stop_without_connection_is_prompt(void **state)
{
    (void)state;
    smp_config_t cfg = base_cfg(free_port());

    rec_t r = {0};
    smp_bridge_t *b = NULL;
    assert_int_equal(smp_bridge_new(&fx.loop, &cfg, &test_cbs, &r, &b), 0);
    r.b = b;
    smp_bridge_stop(b, 5000);
    WAIT_UNTIL(r.stopped > 0, 1000);
    assert_int_equal(r.stopped, 1);
    assert_int_equal(smp_bridge_start(b), -ESHUTDOWN);
    smp_bridge_free(b);

    rec_t r2 = {0};
    b = bridge_start(&cfg, &r2);
    uint64_t t0 = mono_ms();
    smp_bridge_stop(b, 5000);
    WAIT_UNTIL(r2.stopped > 0, 1000);
    assert_int_equal(r2.stopped, 1);
    assert_true(mono_ms() - t0 < 1000);
    smp_bridge_free(b);

    /* Never started, never stopped: nothing on the loop, so it can be freed right away. */
    assert_int_equal(smp_bridge_new(&fx.loop, &cfg, &test_cbs, &r, &b), 0);
    smp_bridge_free(b);
    smp_bridge_free(NULL);
}

/* Username and password: accepted with the right password; with a wrong one the broker refuses,
 * the bridge reports the outage once and retries with backoff (attempts at about 0, 1 and 3 s
 * within 3.5 s), never connecting. */
static void test_password_accepted_and_refused(void **state)
{
    (void)state;
    char pw[128];
    path_in_dir(pw, sizeof pw, "passwd");
    write_file(pw, "");
    char *argv[] = {MOSQUITTO_PASSWD_BIN, "-b", pw, "simpul", "s3cret", NULL};
    assert_int_equal(run_tool(argv), 0);
    chmod(pw, 0644);
    broker_opts_t opts = {.anonymous = false, .password_file = pw};
    broker_start(&fx.broker, &opts);

    smp_config_t cfg = base_cfg(fx.broker.port);
    cfg.mqtt.username = "simpul";
    cfg.mqtt.password = "s3cret";
    rec_t r = {0};
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_int_equal(r.connects, 1);
    assert_int_equal(r.disconnects, 0);
    obs_t *o = obs_start_ex(fx.broker.port, MQTT_PROTOCOL_V311, "simpul", "s3cret");
    obs_subscribe(o, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, "\"online\"") != NULL, 5000);
    assert_non_null(obs_find(o, STATUS_TOPIC, "\"online\""));
    obs_stop(o);
    bridge_stop_and_free(b, &r);

    int before = count_in(fx.broker.log, "New connection from");
    int refused_before = count_in(fx.broker.log, "not authorised");
    cfg.mqtt.password = "wrong";
    rec_t bad = {0};
    b = bridge_start(&cfg, &bad);
    WAIT_UNTIL(bad.disconnects > 0, 5000);
    assert_int_equal(bad.disconnects, 1);
    RUN_FOR(3500);
    int attempts = count_in(fx.broker.log, "New connection from") - before;
    int refusals = count_in(fx.broker.log, "not authorised") - refused_before;
    assert_int_equal(bad.connects, 0);
    assert_int_equal(bad.disconnects, 1);
    assert_false(smp_bridge_connected(b));
    assert_int_equal(smp_bridge_publish(b, "simpul/gw1/d/data", "x", 1, 1, false, 1, NULL),
                     -ENOTCONN);
    assert_in_range(attempts, 2, 4);
    assert_in_range(refusals, 2, 4);
    bridge_stop_and_free(b, &bad);
}

/* TLS: with a CA file the bridge connects by host name and verifies the broker's certificate
 * against it; a certificate from another CA is refused. */
static void make_ca(const char *name, char *crt, char *key, size_t n)
{
    char subj[64];
    snprintf(subj, sizeof subj, "/CN=%s", name);
    snprintf(crt, n, "%s/%s.crt", fx.dir, name);
    snprintf(key, n, "%s/%s.key", fx.dir, name);
    char *argv[] = {OPENSSL_BIN,
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    key,
                    "-out",
                    crt,
                    "-days",
                    "2",
                    "-subj",
                    subj,
                    NULL};
    assert_int_equal(run_tool(argv), 0);
}

static void test_tls_verifies_broker_certificate(void **state)
{
    (void)state;
    if (access(OPENSSL_BIN, X_OK) != 0) {
        skip();
    }
    char ca_crt[128], ca_key[128], other_crt[128], other_key[128];
    make_ca("test-ca", ca_crt, ca_key, sizeof ca_crt);
    make_ca("other-ca", other_crt, other_key, sizeof other_crt);
    char srv_key[128], srv_csr[128], srv_crt[128], ext[128];
    path_in_dir(srv_key, sizeof srv_key, "server.key");
    path_in_dir(srv_csr, sizeof srv_csr, "server.csr");
    path_in_dir(srv_crt, sizeof srv_crt, "server.crt");
    path_in_dir(ext, sizeof ext, "server.ext");
    write_file(ext, "subjectAltName=DNS:localhost\n");
    char *req[] = {
        OPENSSL_BIN,     "req",     "-newkey", "ec",   "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes",        "-keyout", srv_key,   "-out", srv_csr,    "-subj",
        "/CN=localhost", NULL};
    assert_int_equal(run_tool(req), 0);
    char *sign[] = {
        OPENSSL_BIN,       "x509", "-req",  "-in",   srv_csr, "-CA",      ca_crt, "-CAkey", ca_key,
        "-CAcreateserial", "-out", srv_crt, "-days", "2",     "-extfile", ext,    NULL};
    assert_int_equal(run_tool(sign), 0);
    chmod(srv_key, 0644); /* read by the broker after it drops privileges */
    chmod(ca_key, 0644);

    broker_opts_t opts = {
        .anonymous = true, .tls_ca = ca_crt, .tls_cert = srv_crt, .tls_key = srv_key};
    broker_start(&fx.broker, &opts);

    smp_config_t cfg = base_cfg(fx.broker.tls_port);
    cfg.mqtt.host = "localhost";
    cfg.mqtt.tls_ca_file = ca_crt;
    rec_t r = {0};
    uint64_t t0 = wall_ms();
    smp_bridge_t *b = bridge_start(&cfg, &r);
    WAIT_UNTIL(r.connects > 0, 5000);
    assert_int_equal(r.connects, 1);
    obs_t *o = obs_start(fx.broker.port); /* the plain listener */
    obs_subscribe(o, STATUS_TOPIC);
    WAIT_UNTIL(obs_find(o, STATUS_TOPIC, "\"online\"") != NULL, 5000);
    assert_status(obs_find(o, STATUS_TOPIC, "\"online\""), "online", t0, wall_ms());
    bridge_sync(b, &r, 1);
    obs_stop(o);
    bridge_stop_and_free(b, &r);

    cfg.mqtt.tls_ca_file = other_crt;
    rec_t bad = {0};
    b = bridge_start(&cfg, &bad);
    WAIT_UNTIL(bad.disconnects > 0, 5000);
    assert_int_equal(bad.disconnects, 1);
    assert_int_equal(bad.connects, 0);
    assert_false(smp_bridge_connected(b));
    bridge_stop_and_free(b, &bad);
}

int main(void)
{
    /* SMP_TEST_DEBUG=1 shows the bridge's debug log (and libmosquitto's). */
    const char *dbg = getenv("SMP_TEST_DEBUG");
    if (dbg != NULL && dbg[0] == '1') {
        smp_log_set_level(SMP_LOG_DEBUG);
    }
    /* SMP_TEST_FILTER=pattern runs only the matching tests (cmocka's wildcard filter). */
    const char *filter = getenv("SMP_TEST_FILTER");
    if (filter != NULL) {
        cmocka_set_test_filter(filter);
    }
    signal(SIGALRM, on_watchdog);
    mosquitto_lib_init();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_will_published_when_process_killed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connect_publishes_retained_online, setup, teardown),
        cmocka_unit_test_setup_teardown(test_session_will_drop_and_stop, setup, teardown),
        cmocka_unit_test_setup_teardown(test_publish_qos1_acked_with_token, setup, teardown),
        cmocka_unit_test_setup_teardown(test_inflight_window_full_is_eagain, setup, teardown),
        cmocka_unit_test_setup_teardown(test_enotconn_while_broker_down, setup, teardown),
        cmocka_unit_test_setup_teardown(test_reconnects_after_broker_killed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_incoming_message_delivered, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mqtt5_response_topic_and_correlation_data, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_mqtt5_refused_puback_is_not_acked, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_drains_and_publishes_offline, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_wait_is_bounded, setup, teardown),
        cmocka_unit_test_setup_teardown(test_qos0_mid_reuse_is_not_an_ack, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_without_connection_is_prompt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_password_accepted_and_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tls_verifies_broker_certificate, setup, teardown),
    };
    int failed = cmocka_run_group_tests(tests, NULL, NULL);
    mosquitto_lib_cleanup();
    return failed;
}
