/* The engine: scheduling, workers, decoding, deadband, payloads and the outbox pump.
 *
 * Threads. Everything in this file runs on the loop thread except worker_main() and the
 * run_*() functions it calls, which run on a connection's worker thread. The two sides share
 * only the job queues (conn->mu) and the done queue (e->done_mu); a job belongs to exactly one
 * side at a time. Fields marked "worker" are touched only by the worker thread. */
#include "engine.h"

#include <errno.h>
#include <pthread.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bridge.h"
#include "command.h"
#include "engine_internal.h"
#include "log.h"
#include "plugin_host.h"
#include "sparkplug.h"
#include "store.h"
#include "value.h"

/* Backoff of a connection (or a silent device) after a failure: 1 s doubling to 30 s. */
#define BACKOFF_INITIAL_MS 1000u
#define BACKOFF_MAX_MS     30000u
/* Consecutive timeouts on one connection, across its devices, before it is reopened. */
#define TIMEOUTS_BEFORE_REOPEN 2
/* A worker's stack. glibc's default is RLIMIT_STACK (8 MB): 500 workers would reserve 4 GB of
 * address space. A driver's blocking calls (libmodbus, getaddrinfo, net-snmp, formatting) need
 * far less; only the pages a worker touches count in RSS either way. */
#define WORKER_STACK_BYTES (512u * 1024u)
/* Finished jobs a worker hands to the loop at once, at most, while more are queued. */
#define DONE_BATCH_MAX 16
/* ... and only while requests are quick (a fast TCP line): after a request that took longer
 * than this (RTU at 9600 baud, a 60 ms reply) the finished job goes to the loop at once, or
 * its group would still count as in flight at its next tick (an overrun, an idle line) and its
 * data would wait for the next request. A batch is never older than the same bound. */
#define DONE_BATCH_MAX_NS (1000u * 1000u)
/* Outbox rows fetched per round trip while replaying. */
#define REPLAY_BATCH 500u

static uint64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

uint64_t smp__wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0) {
        s = NULL;
    }
    va_end(ap);
    return s;
}

static const char *err_text(int code, const char *message)
{
    if (message != NULL && message[0] != '\0') {
        return message;
    }
    switch (code) {
    case -ECONNREFUSED:
        return "connection refused";
    case -ETIMEDOUT:
        return "timeout";
    case -ENOTCONN:
        return "not connected";
    case -ECONNRESET:
        return "connection reset";
    case -EHOSTUNREACH:
        return "host unreachable";
    case -EKEYREJECTED:
        return "authentication failure";
    case -ENOMEM:
        return "out of memory";
    default:
        return strerror(-code);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Jobs and the worker thread                                                                  */

void smp__job_free(struct job *j)
{
    if (j == NULL) {
        return;
    }
    if (j->strs != NULL) {
        for (size_t k = 0; k < j->n; k++) {
            free(j->strs[k]);
        }
    }
    free(j->strs);
    free(j->errs);
    free(j->readings);
    free(j->write_str);
    free(j->rb_str);
    free(j);
}

/* Hands finished jobs head..tail (linked, in order) to the loop: one wake-up for all. */
static void done_push(smp_engine_t *e, struct job *head, struct job *tail)
{
    uv_mutex_lock(&e->done_mu);
    tail->next = NULL;
    if (e->done_tail != NULL) {
        e->done_tail->next = head;
    } else {
        e->done_head = head;
    }
    e->done_tail = tail;
    uv_mutex_unlock(&e->done_mu);
    uv_async_send(&e->done_async);
}

static void set_worker_error(struct job *j, int code, const char *message)
{
    j->status = code;
    snprintf(j->errmsg, sizeof j->errmsg, "%s", err_text(code, message));
}

/* Opens the connection if it is closed and its backoff allows. Worker thread. */
static int ensure_open(struct conn *c, uint64_t now, struct job *j)
{
    const smp_plugin_t *p = c->plugin->desc;
    if (c->pconn == NULL) {
        set_worker_error(j, -ENOMEM, "driver could not create the connection");
        return -1;
    }
    if (c->open) {
        return 0;
    }
    if (now < c->next_open_ms) {
        set_worker_error(j, c->last_open_err ? c->last_open_err : -ENOTCONN, c->last_open_msg);
        return -1;
    }
    int rc = p->conn_open(c->pconn);
    if (rc < 0) {
        c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : BACKOFF_INITIAL_MS;
        if (c->backoff_ms > BACKOFF_MAX_MS) {
            c->backoff_ms = BACKOFF_MAX_MS;
        }
        c->next_open_ms = now + c->backoff_ms;
        c->last_open_err = rc;
        snprintf(c->last_open_msg, sizeof c->last_open_msg, "%s", err_text(rc, NULL));
        set_worker_error(j, rc, NULL);
        return -1;
    }
    c->open = true;
    c->backoff_ms = 0;
    c->timeouts = 0;
    c->reconnects += c->ever_open;
    c->ever_open = true;
    return 0;
}

/* After a failed device call: decides between "this device is silent" and "the connection is
 * broken". Worker thread. */
static void after_failure(struct conn *c, struct device *d, int rc, uint64_t now)
{
    const smp_plugin_t *p = c->plugin->desc;
    if (rc == -ETIMEDOUT) {
        /* One silent unit id must not take down the others sharing the connection: back off
         * this device only, and reopen the connection when timeouts pile up across it. */
        d->w_backoff_ms = d->w_backoff_ms ? d->w_backoff_ms * 2 : BACKOFF_INITIAL_MS;
        if (d->w_backoff_ms > BACKOFF_MAX_MS) {
            d->w_backoff_ms = BACKOFF_MAX_MS;
        }
        d->w_next_try_ms = now + d->w_backoff_ms;
        if (++c->timeouts < TIMEOUTS_BEFORE_REOPEN) {
            return;
        }
    }
    p->conn_close(c->pconn);
    c->open = false;
    c->timeouts = 0;
    c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : BACKOFF_INITIAL_MS;
    if (c->backoff_ms > BACKOFF_MAX_MS) {
        c->backoff_ms = BACKOFF_MAX_MS;
    }
    /* The first reopen after a broken connection is immediate; repeated failures back off. */
    c->next_open_ms = now;
    c->last_open_err = rc;
    snprintf(c->last_open_msg, sizeof c->last_open_msg, "%s", err_text(rc, NULL));
}

/* A command's deadline, checked on the monotonic clock (a wall-clock step cannot move it). */
static bool deadline_passed(const struct job *j)
{
    return j->deadline_mono_ms != 0 && mono_ms() >= j->deadline_mono_ms;
}

/* Copies tag k's string value into the job. The copies' table is made on the first string
 * only: a poll without string tags allocates nothing. Worker thread. */
static int keep_string(struct job *j, size_t k)
{
    smp_reading_t *r = &j->readings[k];
    if (j->strs == NULL && (j->strs = calloc(j->n, sizeof *j->strs)) == NULL) {
        return -ENOMEM;
    }
    size_t len = r->value.len > SMP_STRING_MAX ? SMP_STRING_MAX : r->value.len;
    j->strs[k] = malloc(len + 1);
    if (j->strs[k] == NULL) {
        return -ENOMEM;
    }
    if (len > 0 && r->value.s != NULL) {
        memcpy(j->strs[k], r->value.s, len);
    } else {
        len = 0;
    }
    j->strs[k][len] = '\0';
    r->value.s = j->strs[k];
    r->value.len = len;
    return 0;
}

/* Copies the text of tag k's error into the job, where the loop reads it. The texts' table is
 * made on the first error only: a healthy poll allocates nothing. Without memory for it the
 * loop falls back to the error code's own text. Worker thread. */
static void keep_error(struct job *j, size_t k)
{
    smp_reading_t *r = &j->readings[k];
    if (j->errs == NULL) {
        j->errs = calloc(j->n, ERRMSG_LEN);
    }
    if (j->errs != NULL) {
        snprintf(JOB_ERR(j, k), ERRMSG_LEN, "%s", err_text(r->status, r->message));
    }
    r->message = NULL;
}

static void run_read(struct conn *c, struct job *j)
{
    struct device *d = j->dev;
    const smp_plugin_t *p = c->plugin->desc;
    uint64_t now = mono_ms();
    if (ensure_open(c, now, j) < 0) {
        return;
    }
    if (d->pdev == NULL) {
        set_worker_error(j, -EINVAL, "driver could not create the device");
        return;
    }
    if (now < d->w_next_try_ms) {
        set_worker_error(j, -ETIMEDOUT, "no response (retrying with backoff)");
        return;
    }
    if (deadline_passed(j)) {
        set_worker_error(j, -ETIME, "expired before the read could be sent");
        return;
    }
    memset(j->readings, 0, j->n * sizeof *j->readings);
    uint64_t t0 = uv_hrtime();
    int rc = p->device_read(d->pdev, j->idx, j->n, j->readings);
    j->read_us = (uv_hrtime() - t0) / 1000u;
    j->done_wall_ms = smp__wall_ms();
    if (rc < 0) {
        set_worker_error(j, rc, NULL);
        after_failure(c, d, rc, now);
        return;
    }
    d->w_backoff_ms = 0;
    d->w_next_try_ms = 0;
    c->timeouts = 0;
    j->status = rc;
    /* Driver strings and messages are valid only until the next call on the device: copy
     * them now. */
    for (size_t k = 0; k < j->n; k++) {
        smp_reading_t *r = &j->readings[k];
        if (r->status == 0 && d->cfg->tags[j->idx[k]].type == SMP_TYPE_STRING &&
            keep_string(j, k) < 0) {
            r->status = -ENOMEM;
            r->message = "out of memory";
        }
        if (r->status != 0) {
            keep_error(j, k);
        }
    }
}

static void run_write(struct conn *c, struct job *j)
{
    struct device *d = j->dev;
    const smp_plugin_t *p = c->plugin->desc;
    uint64_t now = mono_ms();
    if (ensure_open(c, now, j) < 0) {
        j->status = -ENOTCONN;
        return;
    }
    if (d->pdev == NULL) {
        set_worker_error(j, -EINVAL, "driver could not create the device");
        return;
    }
    /* Opening the connection may have taken up to timeout_ms: the deadline again, right
     * before anything can reach the device. */
    if (deadline_passed(j)) {
        set_worker_error(j, -ETIME, "expired before the write could be sent");
        return;
    }
    const char *message = NULL;
    smp_reading_t rb;
    memset(&rb, 0, sizeof rb);
    /* From here on the request may reach the device: a link error no longer means "nothing
     * was written". */
    j->started = true;
    smp__host_set_call_deadline(j->deadline_mono_ms);
    int rc = p->device_write(d->pdev, j->tag, &j->write_raw, &rb, &message);
    smp__host_set_call_deadline(0);
    j->done_wall_ms = smp__wall_ms();
    if (rc < 0) {
        set_worker_error(j, rc, message);
        /* The driver refused the value itself (-ERANGE, -EPERM, -E2BIG), found the deadline
         * passed before writing (-ETIME), the device answered with an exception, or an RTU
         * reply was garbled (-EBADMSG, the driver drains the line): the connection is fine. */
        if (rc != SMP_EDEVICE && rc != -ERANGE && rc != -EPERM && rc != -E2BIG && rc != -EINVAL &&
            rc != -ETIME && rc != -EBADMSG) {
            after_failure(c, d, rc, now);
        }
        return;
    }
    j->status = 0;
    j->rb = rb;
    if (rb.status == 0 && d->cfg->tags[j->tag].type == SMP_TYPE_STRING) {
        size_t len = rb.value.len > SMP_STRING_MAX ? SMP_STRING_MAX : rb.value.len;
        j->rb_str = malloc(len + 1);
        if (j->rb_str != NULL) {
            if (len > 0 && rb.value.s != NULL) {
                memcpy(j->rb_str, rb.value.s, len);
            } else {
                len = 0;
            }
            j->rb_str[len] = '\0';
        }
        j->rb.value.s = j->rb_str;
        j->rb.value.len = j->rb_str ? len : 0;
    } else if (rb.status != 0) {
        snprintf(j->errmsg, sizeof j->errmsg, "%s", err_text(rb.status, rb.message));
        j->rb.message = NULL;
    }
}

/* Records what job j cost its connection, for the connection's load. Worker thread. */
static void sample_job(struct conn *c, struct job *j, uint64_t start_ns)
{
    const smp_plugin_t *p = c->plugin->desc;
    j->sample.busy_us = (uv_hrtime() - start_ns) / 1000u;
    j->sample.requests = j->type == JOB_READ ? (j->status > 0 ? (uint32_t)j->status : 0) : 1;
    if (p->conn_stats != NULL && c->pconn != NULL) {
        p->conn_stats(c->pconn, &j->sample.link);
    }
    j->sample.reconnects = c->reconnects;
}

/* The driver's object for device d. Worker thread. */
static void create_device(struct conn *c, struct device *d)
{
    if (c->pconn != NULL) {
        d->pdev = c->plugin->desc->device_create(c->pconn, d->cfg->conn_params, d->ptags,
                                                 d->cfg->ntags, d->scope);
        if (d->pdev == NULL) {
            LOG_ERR(d->scope, "driver could not create the device");
        }
    }
}

/* A reload's JOB_ATTACH (freed here) or JOB_DETACH (handed back: the device may be freed).
 * Worker thread. */
static struct job *run_ctl(struct conn *c, struct job *j)
{
    struct device *d = j->dev;
    if (j->type == JOB_ATTACH) {
        free(j);
        if (c->nwdevs == c->wcap) {
            size_t cap = c->wcap ? 2 * c->wcap : 4;
            struct device **p = realloc(c->wdevs, cap * sizeof *p);
            if (p == NULL) {
                LOG_ERR(d->scope, "out of memory: the device is not polled");
                return NULL;
            }
            c->wdevs = p;
            c->wcap = cap;
        }
        c->wdevs[c->nwdevs++] = d;
        create_device(c, d);
        return NULL;
    }
    for (size_t k = 0; k < c->nwdevs; k++) {
        if (c->wdevs[k] == d) {
            c->wdevs[k] = c->wdevs[--c->nwdevs];
            break;
        }
    }
    if (d->pdev != NULL) {
        c->plugin->desc->device_destroy(d->pdev);
        d->pdev = NULL;
    }
    return j;
}

static void worker_main(void *arg)
{
    struct conn *c = arg;
    /* Thread names show in top -H, perf and gdb. */
    pthread_setname_np(pthread_self(), "smp-worker");
    const smp_plugin_t *p = c->plugin->desc;
    c->pconn = p->conn_create(c->params, c->scope);
    if (c->pconn == NULL) {
        LOG_ERR(c->scope, "driver could not create the connection");
    }
    for (size_t k = 0; k < c->nwdevs; k++) {
        create_device(c, c->wdevs[k]);
    }
    /* Finished jobs go to the loop in batches while more are queued (a busy shared line),
     * at most DONE_BATCH_MAX at a time, and always in the order they ran. */
    struct job *batch = NULL, *batch_tail = NULL;
    size_t nbatch = 0;
    uint64_t batch_ns = 0;
    for (;;) {
        uv_mutex_lock(&c->mu);
        bool more =
            c->ctl_head != NULL || c->cmd_head != NULL || (c->poll_head != NULL && !c->stop);
        if (nbatch > 0 &&
            (!more || nbatch >= DONE_BATCH_MAX || uv_hrtime() - batch_ns >= DONE_BATCH_MAX_NS)) {
            uv_mutex_unlock(&c->mu);
            done_push(c->eng, batch, batch_tail);
            batch = batch_tail = NULL;
            nbatch = 0;
            continue;
        }
        while (c->ctl_head == NULL && c->cmd_head == NULL && c->poll_head == NULL && !c->stop) {
            uv_cond_wait(&c->cv, &c->mu);
        }
        struct job *j = NULL;
        if (c->ctl_head != NULL) {
            j = c->ctl_head;
            c->ctl_head = j->next;
            if (c->ctl_head == NULL) {
                c->ctl_tail = NULL;
            }
        } else if (c->cmd_head != NULL && !c->cancel_cmds) {
            j = c->cmd_head;
            c->cmd_head = j->next;
            if (c->cmd_head == NULL) {
                c->cmd_tail = NULL;
            }
        } else if (c->poll_head != NULL && !c->stop) {
            j = c->poll_head;
            c->poll_head = j->next;
            if (c->poll_head == NULL) {
                c->poll_tail = NULL;
            }
        }
        uv_mutex_unlock(&c->mu);
        if (j == NULL) {
            break; /* stop requested and no command left */
        }
        uint64_t start_ns = uv_hrtime();
        if (j->type == JOB_ATTACH || j->type == JOB_DETACH) {
            if ((j = run_ctl(c, j)) == NULL) {
                continue;
            }
        } else if (deadline_passed(j)) {
            set_worker_error(j, -ETIME, "expired while waiting in the device's queue");
        } else if (j->type == JOB_READ) {
            run_read(c, j);
            j->backoff_ms = j->dev->w_backoff_ms ? j->dev->w_backoff_ms
                            : c->open            ? 0
                                                 : c->backoff_ms;
        } else {
            run_write(c, j);
        }
        if (j->type != JOB_DETACH) {
            sample_job(c, j, start_ns);
        }
        j->next = NULL;
        if (batch_tail != NULL) {
            batch_tail->next = j;
        } else {
            batch = j;
        }
        batch_tail = j;
        if (nbatch == 0) {
            batch_ns = uv_hrtime();
        }
        /* A command's answer does not wait for the batch (nor overtakes the polls before it). */
        bool slow = uv_hrtime() - start_ns >= DONE_BATCH_MAX_NS;
        nbatch = j->cmd != NULL || j->type == JOB_DETACH || slow ? DONE_BATCH_MAX : nbatch + 1;
    }
    if (nbatch > 0) {
        done_push(c->eng, batch, batch_tail);
    }
    for (size_t k = 0; k < c->nwdevs; k++) {
        if (c->wdevs[k]->pdev != NULL) {
            p->device_destroy(c->wdevs[k]->pdev);
            c->wdevs[k]->pdev = NULL;
        }
    }
    c->nwdevs = 0;
    if (c->pconn != NULL) {
        p->conn_close(c->pconn);
        p->conn_destroy(c->pconn);
        c->pconn = NULL;
    }
    struct job *bye = calloc(1, sizeof *bye);
    if (bye != NULL) {
        bye->type = JOB_EXIT;
        bye->conn = c;
        done_push(c->eng, bye, bye);
    } else {
        /* Without memory for the notice the loop learns of the exit from the stop timeout. */
        LOG_ERR(c->scope, "out of memory at worker exit");
    }
}

/* Queues a job for a connection's worker. Commands go ahead of polls. Loop thread. */
void smp__engine_enqueue(struct conn *c, struct job *j)
{
    j->next = NULL;
    j->conn = c;
    uv_mutex_lock(&c->mu);
    bool idle = c->ctl_head == NULL && c->cmd_head == NULL && c->poll_head == NULL;
    if (j->type == JOB_ATTACH || j->type == JOB_DETACH) {
        if (c->ctl_tail != NULL) {
            c->ctl_tail->next = j;
        } else {
            c->ctl_head = j;
        }
        c->ctl_tail = j;
    } else if (j->cmd != NULL) {
        if (c->cmd_tail != NULL) {
            c->cmd_tail->next = j;
        } else {
            c->cmd_head = j;
        }
        c->cmd_tail = j;
    } else {
        if (c->poll_tail != NULL) {
            c->poll_tail->next = j;
        } else {
            c->poll_head = j;
        }
        c->poll_tail = j;
    }
    /* The worker waits only when both queues are empty: a busy one finds this job itself. */
    if (idle) {
        uv_cond_signal(&c->cv);
    }
    uv_mutex_unlock(&c->mu);
}

/* ------------------------------------------------------------------------------------------ */
/* Publishing: status, data through the outbox, metrics                                        */

static void publish_direct(smp_engine_t *e, const char *topic, const smp_buf_t *b, bool retain)
{
    if (b->oom || !smp_bridge_connected(e->bridge)) {
        return;
    }
    int rc = smp_bridge_publish(e->bridge, topic, b->p, b->len, e->cfg->mqtt.qos, retain, 0, NULL);
    if (rc == 0) {
        e->stats.publishes++;
    } else {
        LOG_DEBUG("engine", "publish to %s failed: %s", topic, strerror(-rc));
    }
}

static void publish_device_status(smp_engine_t *e, struct device *d)
{
    if (d->online < 0) {
        return; /* not polled yet: nothing true to say */
    }
    smp_buf_t b;
    smp_buf_init(&b);
    smp_buf_printf(&b, "{\"state\":\"%s\",\"ts\":%" PRIu64, d->online ? "online" : "offline",
                   d->status_ts);
    if (!d->online && d->status_err[0] != '\0') {
        smp_buf_puts(&b, ",\"error\":");
        smp_buf_json_string(&b, d->status_err, strlen(d->status_err));
    }
    smp_buf_puts(&b, "}");
    /* Status has reserved room in the window: data cannot crowd it out. If even that is
     * taken, it goes out on the next PUBACK (and after every connect anyway). */
    d->status_unsent = false;
    if (!b.oom && smp_bridge_connected(e->bridge)) {
        int rc = smp_bridge_publish_reserved(e->bridge, d->topic_status, b.p, b.len,
                                             e->cfg->mqtt.qos, true, 0, NULL);
        if (rc == 0) {
            e->stats.publishes++;
        } else {
            d->status_unsent = rc == -EAGAIN;
            LOG_DEBUG(d->scope, "status not published yet: %s", strerror(-rc));
        }
    }
    smp_buf_free(&b);
}

/* Answers and statuses that waited for room in the window go first when room frees up. */
static void flush_reserved(smp_engine_t *e)
{
    smp_commands_flush(e->cmds);
    for (size_t k = 0; k < e->ndevs; k++) {
        if (e->devs[k]->status_unsent) {
            publish_device_status(e, e->devs[k]);
        }
    }
}

static void set_device_state(smp_engine_t *e, struct device *d, bool online, const char *err)
{
    if (d->retiring) {
        return; /* a reload replaced it: its successor reports */
    }
    if (!online) {
        smp_episode_fail(&d->offline, uv_now(e->loop));
    }
    if (d->online == (int)online &&
        (online || strcmp(d->status_err, err != NULL ? err : "") == 0)) {
        return;
    }
    if (online) {
        uint64_t ms;
        uint64_t n = smp_episode_end(&d->offline, uv_now(e->loop), &ms);
        if (d->online == 0) {
            LOG_INFO(d->scope, "online again after %" PRIu64 " failed poll(s) in %.1f s", n,
                     (double)ms / 1000.0);
        } else {
            LOG_INFO(d->scope, "online");
        }
        d->status_err[0] = '\0';
        d->need_full = true; /* a device that comes back reports everything */
    } else if (d->online != 0) {
        LOG_WARN(d->scope, "offline: %s", err);
    }
    d->online = online;
    if (!online) {
        snprintf(d->status_err, sizeof d->status_err, "%s", err != NULL ? err : "");
    }
    d->status_ts = smp__wall_ms();
    publish_device_status(e, d);
    smp__sparkplug_device_state(e->spb, d);
}

/* Live ids published ahead of the replay cursor, so the replay skips them. */
static void live_add(smp_engine_t *e, int64_t id)
{
    if (e->live_n == e->live_cap) {
        size_t cap = e->live_cap ? e->live_cap * 2 : 64;
        int64_t *p = realloc(e->live_ids, cap * sizeof *p);
        if (p == NULL) {
            return; /* worst case the message is sent twice: at-least-once still holds */
        }
        e->live_ids = p;
        e->live_cap = cap;
    }
    e->live_ids[e->live_n++] = id;
}

static bool live_take(smp_engine_t *e, int64_t id)
{
    for (size_t k = 0; k < e->live_n; k++) {
        if (e->live_ids[k] == id) {
            e->live_ids[k] = e->live_ids[--e->live_n];
            return true;
        }
    }
    return false;
}

static void pump(smp_engine_t *e);

/* Drops live ids the replay cursor has passed: they were skipped, or acked and deleted. */
static void live_prune(smp_engine_t *e)
{
    size_t w = 0;
    for (size_t k = 0; k < e->live_n; k++) {
        if (e->live_ids[k] > e->cursor) {
            e->live_ids[w++] = e->live_ids[k];
        }
    }
    e->live_n = w;
}
static void flush_acks(smp_engine_t *e);

static size_t replay_window(const smp_engine_t *e)
{
    /* Replay may use three quarters of the in-flight window, so live data always has room. */
    size_t w = (size_t)e->cfg->mqtt.inflight_max;
    size_t r = w - w / 4;
    return r ? r : 1;
}

static int publish_row(smp_engine_t *e, int64_t id, const char *topic, const void *payload,
                       size_t len)
{
    int qos = e->cfg->mqtt.qos;
    int rc = smp_bridge_publish(e->bridge, topic, payload, len, qos, false,
                                qos > 0 ? (uint64_t)id : 0, NULL);
    if (rc == 0) {
        e->stats.publishes++;
        if (qos == 0) {
            /* QoS 0 is best effort: the message leaves the outbox once handed to the socket. */
            smp_store_outbox_ack(e->store, id);
        }
    }
    return rc;
}

static void on_fetch(void *arg, int status, const smp_outbox_row_t *rows, size_t n)
{
    smp_engine_t *e = arg;
    e->fetch_in_flight = false;
    if (status < 0) {
        if (smp_episode_fail(&e->fetch_errors, uv_now(e->loop))) {
            LOG_WARN("engine", "outbox read failed: %s (further failures are counted)",
                     strerror(-status));
        }
        e->backlog = true;
        return;
    }
    uint64_t ms;
    uint64_t failed = smp_episode_end(&e->fetch_errors, uv_now(e->loop), &ms);
    if (failed > 0) {
        LOG_INFO("engine", "outbox reads work again after %" PRIu64 " failure(s) in %.1f s", failed,
                 (double)ms / 1000.0);
    }
    if (e->stopping || !smp_bridge_connected(e->bridge)) {
        return;
    }
    if (e->fetch_epoch != e->conn_epoch) {
        pump(e); /* rows read for an earlier connection: start over from the new cursor */
        return;
    }
    bool blocked = false;
    for (size_t k = 0; k < n; k++) {
        if (live_take(e, rows[k].id)) {
            e->cursor = rows[k].id;
            continue;
        }
        int rc = publish_row(e, rows[k].id, rows[k].topic, rows[k].payload, rows[k].len);
        if (rc != 0 && rc != -EMSGSIZE && rc != -EINVAL) {
            /* The window is full, or the link failed (perhaps not noticed by the bridge yet):
             * resume from here later. Only a message itself at fault is ever dropped. */
            blocked = true;
            break;
        }
        if (rc != 0) {
            /* A message the broker can never take (e.g. larger than it accepts) must not block
             * the queue behind it forever: drop it, count it, say so. */
            LOG_ERR("engine", "dropping outbox message %" PRId64 " for %s: %s", rows[k].id,
                    rows[k].topic, strerror(-rc));
            smp_store_outbox_ack(e->store, rows[k].id);
            e->stats.lost++;
        } else {
            e->stats.replayed++;
        }
        e->cursor = rows[k].id;
    }
    live_prune(e);
    if (!blocked && n < e->fetch_max) {
        e->backlog = false; /* caught up: live messages go straight out from now on */
        return;
    }
    if (!blocked) {
        pump(e);
    }
}

static void pump(smp_engine_t *e)
{
    if (!e->backlog || e->fetch_in_flight || e->stopping || !smp_bridge_connected(e->bridge)) {
        return;
    }
    size_t inflight = smp_bridge_inflight(e->bridge);
    size_t window = replay_window(e);
    /* Refill in batches of at least a quarter window: one store round trip per ack would make
     * the writer thread, not the broker, the limit of the replay rate. */
    size_t min_batch = window / 4 ? window / 4 : 1;
    if (inflight >= window || window - inflight < min_batch) {
        return; /* an ack will call us again */
    }
    size_t space = window - inflight;
    e->fetch_max = space < REPLAY_BATCH ? space : REPLAY_BATCH;
    e->fetch_in_flight = true;
    e->fetch_epoch = e->conn_epoch;
    flush_acks(e); /* store ops run in order: the fetch must not see acked rows */
    smp_store_outbox_fetch(e->store, e->cursor, e->fetch_max, on_fetch, e);
}

/* A data message waiting for its outbox row; one allocation, the payload inside. */
struct pending {
    smp_engine_t *e;
    const char *topic; /* a copy after the payload: a reload may free the device before */
    size_t len;
    char payload[];
};

static void on_outbox_added(void *arg, int status, int64_t id)
{
    struct pending *m = arg;
    smp_engine_t *e = m->e;
    e->pending_adds--;
    if (status < 0) {
        /* Not persisted (disk full, I/O error): publish from memory, best effort. */
        e->stats.store_errors++;
        if (smp_bridge_connected(e->bridge) &&
            smp_bridge_publish(e->bridge, m->topic, m->payload, m->len, e->cfg->mqtt.qos, false, 0,
                               NULL) == 0) {
            e->stats.publishes++;
        } else {
            e->stats.lost++;
        }
    } else if (!e->stopping && smp_bridge_connected(e->bridge) &&
               smp_bridge_inflight(e->bridge) < (size_t)e->cfg->mqtt.inflight_max &&
               publish_row(e, id, m->topic, m->payload, m->len) == 0) {
        if (e->cfg->mqtt.qos > 0) {
            /* Sent ahead of the outbox cursor: a later replay pass must skip it until its
             * PUBACK (which removes it from this set) or a reconnect (which resends all). */
            live_add(e, id);
        }
    } else {
        e->backlog = true; /* it waits in the outbox; the pump sends it */
    }
    free(m);
    pump(e);
    if (e->stopping) {
        smp__engine_stop_progress(e);
    }
}

static void queue_data(smp_engine_t *e, struct device *d, const smp_buf_t *b)
{
    size_t tlen = strlen(d->topic_data) + 1;
    struct pending *m = b->oom ? NULL : malloc(sizeof *m + b->len + tlen);
    if (m == NULL) {
        e->stats.lost++;
        return;
    }
    m->e = e;
    m->len = b->len;
    memcpy(m->payload, b->p, b->len);
    memcpy(m->payload + b->len, d->topic_data, tlen);
    m->topic = m->payload + b->len;
    e->pending_adds++;
    smp_store_outbox_add(e->store, d->cfg->name, d->seq, m->topic, m->payload, m->len,
                         on_outbox_added, m);
}

/* Appends "name":value; returns where the value's text starts in b. */
static size_t add_value(smp_buf_t *b, bool *first, const char *name, const smp_eval_t *v)
{
    smp_buf_puts(b, *first ? "\"" : ",\"");
    smp_buf_puts(b, name); /* names are [A-Za-z0-9_-]+: no escaping needed */
    smp_buf_add(b, "\":", 2);
    size_t at = b->len;
    smp_buf_eval(b, v);
    *first = false;
    return at;
}

static void add_error(smp_buf_t *b, bool *first, const char *name, const char *msg)
{
    smp_buf_puts(b, *first ? "\"" : ",\"");
    smp_buf_puts(b, name);
    smp_buf_puts(b, "\":");
    smp_buf_json_string(b, msg, strlen(msg));
    *first = false;
}

/* Stores a changed value, given as the JSON text just written into the message. */
static void record_value(smp_engine_t *e, struct device *d, size_t t, uint64_t ts, const char *json,
                         size_t len)
{
    char text[64];
    char *s = len < sizeof text ? text : malloc(len + 1); /* only long strings need the heap */
    if (s == NULL) {
        LOG_ERR(d->scope, "%s: out of memory for its history row", d->cfg->tags[t].name);
        return;
    }
    memcpy(s, json, len);
    s[len] = '\0';
    smp_store_put_value(e->store, d->cfg->name, d->cfg->tags[t].name, s, (int64_t)ts);
    if (s != text) {
        free(s);
    }
}

/* Builds and queues a data message from the tags whose state changed in this poll. `polled`
 * lists the tags this poll read (all tags are candidates on a full refresh). */
void smp__engine_emit(smp_engine_t *e, struct device *d, uint64_t ts, bool full)
{
    if (d->retiring) {
        return; /* a reload replaced it: the seq goes on in its successor */
    }
    smp__sparkplug_emit(e->spb, d, ts); /* reads the dirty flags the loop below clears */
    /* The engine's buffers, reused: a message costs no allocation but its outbox copy. */
    smp_buf_t *vals = &e->emit_vals, *errs = &e->emit_errs;
    smp_buf_reset(vals);
    smp_buf_reset(errs);
    bool vfirst = true, efirst = true;
    for (size_t t = 0; t < d->cfg->ntags; t++) {
        struct tag_rt *tr = &d->tags[t];
        if (tr->err != 0) {
            if (tr->err_dirty || full) {
                add_error(errs, &efirst, d->cfg->tags[t].name, tr->errmsg);
            }
            tr->err_dirty = false;
            continue;
        }
        if (tr->current.kind == SMP_EV_NONE) {
            continue;
        }
        if (tr->dirty || full) {
            size_t at = add_value(vals, &vfirst, d->cfg->tags[t].name, &tr->current);
            if (tr->dirty && !vals->oom) {
                record_value(e, d, t, tr->current_ts ? tr->current_ts : ts, vals->p + at,
                             vals->len - at);
            }
            smp_eval_clear(&tr->reported);
            smp_eval_copy(&tr->reported, &tr->current);
            tr->dirty = false;
            e->stats.values++;
        }
    }
    if ((!vfirst || !efirst) && e->cfg->mqtt.format != SMP_FORMAT_SPARKPLUG) {
        smp_buf_t *b = &e->emit_msg;
        smp_buf_reset(b);
        d->seq++;
        smp_buf_printf(b, "{\"ts\":%" PRIu64 ",\"seq\":%" PRIu64 ",\"values\":{", ts, d->seq);
        if (vals->len > 0) {
            smp_buf_add(b, vals->p, vals->len);
        }
        smp_buf_add(b, "}", 1);
        if (!efirst) {
            smp_buf_puts(b, ",\"errors\":{");
            smp_buf_add(b, errs->p, errs->len);
            smp_buf_add(b, "}", 1);
        }
        smp_buf_add(b, "}", 1);
        queue_data(e, d, b);
    }
}

/* The interned copy of an error text. Tag errors come from a small set (errno texts, Modbus
 * exceptions, link failures), so each tag keeps a pointer instead of its own copy; past
 * ERR_TEXTS_MAX distinct texts, new ones share one generic text rather than grow the set. */
#define ERR_TEXTS_MAX 512
static const char *intern_err(smp_engine_t *e, const char *msg)
{
    for (size_t k = 0; k < e->err_texts_n; k++) {
        if (strcmp(e->err_texts[k], msg) == 0) {
            return e->err_texts[k];
        }
    }
    if (e->err_texts_n == ERR_TEXTS_MAX) {
        return "read failed (the gateway keeps no more distinct error texts)";
    }
    if (e->err_texts_n == e->err_texts_cap) {
        size_t cap = e->err_texts_cap ? e->err_texts_cap * 2 : 16;
        char **p = realloc(e->err_texts, cap * sizeof *p);
        if (p == NULL) {
            return "out of memory";
        }
        e->err_texts = p;
        e->err_texts_cap = cap;
    }
    char *copy = strndup(msg, ERRMSG_LEN - 1);
    if (copy == NULL) {
        return "out of memory";
    }
    e->err_texts[e->err_texts_n++] = copy;
    return copy;
}

/* Applies one tag reading (from a poll or a command's read-back) to the tag's state. */
void smp__engine_apply_reading(smp_engine_t *e, struct device *d, uint32_t t,
                               const smp_reading_t *r, const char *errmsg, uint64_t ts)
{
    struct tag_rt *tr = &d->tags[t];
    const smp_tag_cfg_t *tc = &d->cfg->tags[t];
    if (r->status != 0) {
        const char *msg = errmsg != NULL && errmsg[0] ? errmsg : err_text(r->status, NULL);
        if (tr->err == 0 || strcmp(tr->errmsg, msg) != 0) {
            tr->err_dirty = true;
            tr->errmsg = intern_err(e, msg);
        }
        tr->err = r->status;
        /* The value is unknown now; when it comes back it is reported again. */
        smp_eval_clear(&tr->current);
        smp_eval_clear(&tr->reported);
        tr->dirty = false;
        return;
    }
    smp_eval_t v;
    int rc = smp_eval_from_raw(tc, &r->value, &v);
    if (rc < 0) {
        smp_reading_t bad = *r;
        bad.status = rc;
        smp__engine_apply_reading(e, d, t, &bad,
                                  rc == -EDOM ? "value is not a finite number" : NULL, ts);
        return;
    }
    if (tr->err != 0) {
        tr->err = 0;
        tr->err_dirty = false;
    }
    bool changed = smp_eval_changed(tc, &tr->reported, &v);
    smp_eval_clear(&tr->current);
    tr->current = v;
    tr->current_ts = ts;
    if (changed) {
        tr->dirty = true;
    }
}

static void handle_read(smp_engine_t *e, struct job *j)
{
    struct group *g = j->grp;
    struct device *d = j->dev;
    g->in_flight = false;
    if (e->stopping || d->retiring) {
        return;
    }
    smp_devstats_poll(&d->health, j->status >= 0, j->read_us, j->done_wall_ms, j->backoff_ms);
    if (j->status < 0) {
        e->stats.poll_errors++;
        set_device_state(e, d, false, j->errmsg);
        return;
    }
    e->stats.polls++;
    e->stats.requests += (uint64_t)j->status;
    set_device_state(e, d, true, NULL);
    uint64_t now = uv_now(e->loop);
    bool full = d->need_full || now - d->last_full_ms >= (uint64_t)d->cfg->refresh_s * 1000u;
    for (size_t k = 0; k < j->n; k++) {
        smp__engine_apply_reading(e, d, j->idx[k], &j->readings[k],
                                  j->readings[k].status && j->errs ? JOB_ERR(j, k) : NULL,
                                  j->done_wall_ms);
    }
    smp__engine_emit(e, d, j->done_wall_ms, full);
    if (full) {
        d->need_full = false;
        d->last_full_ms = now;
    }
}

static void on_group_timer(uv_timer_t *t)
{
    struct group *g = t->data;
    struct device *d = g->dev;
    smp_engine_t *e = d->eng;
    if (e->stopping || d->retiring) {
        return;
    }
    if (g->in_flight) {
        /* The previous poll of this group has not come back (slow or dead device): skip rather
         * than pile up requests behind it. */
        e->stats.overruns++;
        smp__conn_load_overrun(&d->conn->load);
        return;
    }
    /* The group's previous job comes back for the next poll: a steady poll allocates nothing. */
    struct job *j = g->spare;
    g->spare = NULL;
    if (j == NULL) {
        j = calloc(1, sizeof *j);
        if (j != NULL) {
            j->readings = calloc(g->n, sizeof *j->readings);
        }
        if (j == NULL || j->readings == NULL) {
            smp__job_free(j);
            e->stats.poll_errors++;
            return;
        }
        j->type = JOB_READ;
        j->dev = d;
        j->grp = g;
        j->idx = g->idx;
        j->n = g->n;
    }
    g->in_flight = true;
    smp__engine_enqueue(d->conn, j);
}

/* ,"connections":{"KEY":{...},...}: one object per connection (conn_load.c). */
static void metrics_connections(smp_engine_t *e, smp_buf_t *b)
{
    smp_buf_puts(b, ",\"connections\":{");
    bool first = true;
    for (size_t m = 0; m < e->nconns; m++) {
        if (e->conns[m]->retiring) {
            continue; /* a reload closes it; a new one to its endpoint may be listed */
        }
        smp_buf_puts(b, first ? "" : ",");
        first = false;
        smp__conn_load_json(&e->conns[m]->load, e->conns[m]->key, b, uv_now(e->loop));
    }
    smp_buf_puts(b, "}");
}

/* "devices": each device's health (devstats.h). */
static void metrics_devices(const smp_engine_t *e, smp_buf_t *b)
{
    smp_buf_printf(b, ",\"devices\":{");
    for (size_t k = 0; k < e->ndevs; k++) {
        if (k > 0) {
            smp_buf_printf(b, ",");
        }
        smp_devstats_json(&e->devs[k]->health, e->devs[k]->cfg->name, b);
    }
    smp_buf_printf(b, "}");
}

/* "log": lines logged and lines dropped because stderr did not keep up (log.h). */
static void metrics_log(smp_buf_t *b)
{
    uint64_t lines, dropped;
    smp_log_counters(&lines, &dropped);
    smp_buf_printf(b, ",\"log\":{\"lines\":%" PRIu64 ",\"dropped\":%" PRIu64 "}", lines, dropped);
}

/* Bytes this process caused to be written to storage (/proc/self/io write_bytes), -1 if unknown. */
static long long proc_write_bytes(void)
{
    long long v = -1;
    char line[128];
    FILE *f = fopen("/proc/self/io", "r");
    while (f != NULL && fgets(line, sizeof line, f) != NULL) {
        if (sscanf(line, "write_bytes: %lld", &v) == 1) {
            break;
        }
    }
    if (f != NULL) {
        fclose(f);
    }
    return v;
}

/* The "store" group of P/G/metrics (docs/contract.md). */
static void metrics_store(smp_buf_t *b, const smp_store_stats_t *ss)
{
    smp_buf_printf(b,
                   ",\"store\":{\"bytes_written\":%lld,\"commits\":%" PRIu64
                   ",\"outbox_written\":%" PRIu64 ",\"ring_messages\":%" PRIu64
                   ",\"powercut_lost\":%" PRIu64 ",\"powercut_restart\":%s",
                   proc_write_bytes(), ss->commits, ss->outbox_written, ss->ring_messages,
                   ss->powercut_lost, ss->powercut_events ? "true" : "false");
    smp_buf_printf(b, ",\"history_bytes\":%" PRIu64 ",\"history_samples\":%" PRIu64,
                   ss->history_bytes, ss->history_samples);
    smp_buf_puts(b, "}");
}

static void metrics_publish(smp_engine_t *e)
{
    smp_store_stats_t ss;
    smp_store_stats(e->store, &ss);
    long rss_kb = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f != NULL) {
        long pages_total = 0, pages_rss = 0;
        if (fscanf(f, "%ld %ld", &pages_total, &pages_rss) == 2) {
            rss_kb = pages_rss * (sysconf(_SC_PAGESIZE) / 1024);
        }
        fclose(f);
    }
    smp_buf_t b;
    smp_buf_init(&b);
    smp_buf_printf(&b,
                   "{\"ts\":%" PRIu64 ",\"uptime_s\":%" PRIu64 ",\"polls\":%" PRIu64
                   ",\"poll_errors\":%" PRIu64 ",\"requests\":%" PRIu64 ",\"overruns\":%" PRIu64,
                   smp__wall_ms(), (uv_now(e->loop) - e->started_ms) / 1000u, e->stats.polls,
                   e->stats.poll_errors, e->stats.requests, e->stats.overruns);
    smp_buf_printf(&b,
                   ",\"values\":%" PRIu64 ",\"publishes\":%" PRIu64 ",\"acked\":%" PRIu64
                   ",\"replayed\":%" PRIu64,
                   e->stats.values, e->stats.publishes, e->stats.acked, e->stats.replayed);
    smp_buf_printf(&b,
                   ",\"commands\":%" PRIu64 ",\"outbox_depth\":%" PRIu64
                   ",\"outbox_bytes\":%" PRIu64 ",\"dropped\":%" PRIu64 ",\"store_errors\":%" PRIu64
                   ",\"rss_kb\":%ld",
                   smp_commands_answered(e->cmds), ss.outbox_rows, ss.outbox_bytes,
                   ss.outbox_dropped + e->stats.lost, ss.errors + e->stats.store_errors, rss_kb);
    metrics_connections(e, &b);
    metrics_log(&b);
    metrics_devices(e, &b);
    metrics_store(&b, &ss);
    smp_buf_puts(&b, "}");
    publish_direct(e, e->topic_metrics, &b, false);
    smp_buf_free(&b);
}

void smp_engine_health(smp_engine_t *e, smp_engine_health_t *out)
{
    smp_store_stats_t ss;
    smp_store_stats(e->store, &ss);
    *out = (smp_engine_health_t){.devices = e->ndevs,
                                 .outbox_depth = ss.outbox_rows,
                                 .mqtt_connected = smp_bridge_connected(e->bridge),
                                 .store_degraded = e->store_degraded};
    for (size_t k = 0; k < e->ndevs; k++) {
        out->online += e->devs[k]->online == 1;
        out->tried += e->devs[k]->online >= 0;
    }
}

static void on_metrics_timer(uv_timer_t *t)
{
    metrics_publish(t->data);
}

/* The pump runs on acks and new messages; this timer restarts it when neither comes (the
 * window was filled by messages without an outbox row, or a fetch failed). */
static void on_pump_timer(uv_timer_t *t)
{
    pump(t->data);
}

/* ------------------------------------------------------------------------------------------ */
/* Bridge callbacks                                                                            */

/* Devices a reload removed: at the next connect (or now, when connected) each one's retained
 * status says so, so the platform does not see a removed device online forever. */
int smp__engine_retire_names(smp_engine_t *e, const char *const *names, size_t n)
{
    char **p = realloc(e->retired, (e->nretired + n + 1) * sizeof *p);
    if (p == NULL) {
        return -ENOMEM;
    }
    e->retired = p;
    for (size_t k = 0; k < n; k++) {
        e->retired[e->nretired] = strdup(names[k]);
        if (e->retired[e->nretired] == NULL) {
            return -ENOMEM; /* the ones copied are still published; smp_engine_free frees */
        }
        e->nretired++;
    }
    return 0;
}

static void free_retired(smp_engine_t *e)
{
    for (size_t k = 0; k < e->nretired; k++) {
        free(e->retired[k]);
    }
    free(e->retired);
    e->retired = NULL;
    e->nretired = 0;
}

/* Once, at the first connect after a reload that removed devices (or at once if connected). */
void smp__engine_publish_retired(smp_engine_t *e)
{
    if (!smp_bridge_connected(e->bridge)) {
        return;
    }
    for (size_t k = 0; k < e->nretired; k++) {
        char *topic = xasprintf("%s/%s/%s/status", e->cfg->mqtt.topic_prefix, e->cfg->gateway.id,
                                e->retired[k]);
        if (topic != NULL) {
            smp_buf_t b;
            smp_buf_init(&b);
            smp_buf_printf(&b,
                           "{\"state\":\"offline\",\"ts\":%" PRIu64
                           ",\"error\":\"removed from the config\"}",
                           smp__wall_ms());
            publish_direct(e, topic, &b, true);
            smp_buf_free(&b);
            LOG_INFO("engine", "%s: removed from the config, status offline", e->retired[k]);
        }
        free(topic);
    }
    free_retired(e);
}

static void on_mqtt_connect(void *arg)
{
    smp_engine_t *e = arg;
    e->conn_epoch++;
    e->cursor = 0;
    e->live_n = 0;
    e->backlog = true;
    /* A fetch still out for the previous connection is recognised by its epoch in on_fetch;
     * clearing fetch_in_flight here would start a second replay chain beside it. */
    smp_commands_flush(e->cmds);
    for (size_t k = 0; k < e->ndevs; k++) {
        struct device *d = e->devs[k];
        publish_device_status(e, d);
        d->need_full = true; /* the platform may have missed changes: send everything */
    }
    smp__engine_publish_retired(e);
    pump(e);
}

static void on_mqtt_disconnect(void *arg)
{
    smp_engine_t *e = arg;
    e->backlog = true;
    e->conn_epoch++;
    smp_commands_disconnected(e->cmds);
}

static void flush_acks(smp_engine_t *e)
{
    if (e->acks_n > 0) {
        smp_store_outbox_ack_many(e->store, e->acks, e->acks_n);
        e->acks_n = 0;
    }
}

static void on_acks_check(uv_check_t *c)
{
    smp_engine_t *e = c->data;
    flush_acks(e);
    uv_check_stop(c);
}

static void on_mqtt_ack(void *arg, uint64_t token)
{
    smp_engine_t *e = arg;
    if (smp_commands_acked(e->cmds, token)) {
        flush_reserved(e); /* an answer: not an outbox row, not counted in "acked" */
        return;
    }
    e->stats.acked++;
    flush_reserved(e);
    /* A burst of PUBACKs arrives in one read: delete them with one store operation, after the
     * loop iteration (uv_check), rather than waking the writer thread once per ack. */
    if (e->acks_n == e->acks_cap) {
        size_t cap = e->acks_cap ? e->acks_cap * 2 : 256;
        int64_t *p = realloc(e->acks, cap * sizeof *p);
        if (p == NULL) {
            smp_store_outbox_ack(e->store, (int64_t)token);
            if (!e->fetch_in_flight) {
                live_take(e, (int64_t)token);
            }
            pump(e);
            return;
        }
        e->acks = p;
        e->acks_cap = cap;
    }
    e->acks[e->acks_n++] = (int64_t)token;
    if (e->acks_n == 1) {
        uv_check_start(&e->acks_check, on_acks_check);
    }
    /* A fetch already under way may have read this row before the ack deletes it: the id must
     * stay in the live set until that fetch has been through it (on_fetch prunes the set). */
    if (!e->fetch_in_flight) {
        live_take(e, (int64_t)token);
    }
    pump(e);
}

static void on_mqtt_message(void *arg, const char *topic, const void *payload, size_t len,
                            const smp_mqtt_props_t *props)
{
    smp_engine_t *e = arg;
    smp_commands_receive(e->cmds, topic, payload, len, props);
}

static void on_bridge_stopped(void *arg)
{
    smp_engine_t *e = arg;
    e->bridge_stopped = true;
    smp__engine_stop_progress(e);
}

/* ------------------------------------------------------------------------------------------ */
/* Done queue, set-up, stop                                                                    */

/* Keeps a finished poll's job (and its buffers) in its group for the next poll. */
static void recycle_read_job(struct job *j)
{
    struct group *g = j->grp;
    for (size_t k = 0; j->strs != NULL && k < j->n; k++) {
        free(j->strs[k]);
        j->strs[k] = NULL;
    }
    smp__job_free(g->spare); /* never set while a poll is in flight; kept for safety */
    g->spare = j;
}

static void command_job_done(smp_engine_t *e, struct job *j);
static smp_commands_t *commands_new(smp_engine_t *e);

static void on_done(uv_async_t *a)
{
    smp_engine_t *e = a->data;
    uv_mutex_lock(&e->done_mu);
    struct job *j = e->done_head;
    e->done_head = e->done_tail = NULL;
    uv_mutex_unlock(&e->done_mu);
    while (j != NULL) {
        struct job *next = j->next;
        if (j->type == JOB_READ || j->type == JOB_WRITE) {
            smp__conn_load_add(&j->conn->load, j->conn->key, &j->sample, uv_now(e->loop));
        }
        switch (j->type) {
        case JOB_READ:
            if (j->cmd != NULL) {
                command_job_done(e, j); /* a command's read; takes ownership */
                break;
            }
            handle_read(e, j);
            recycle_read_job(j);
            break;
        case JOB_WRITE:
            command_job_done(e, j); /* takes ownership */
            break;
        case JOB_EXIT:
            j->conn->exited = true;
            e->workers_alive--;
            free(j);
            smp__engine_stop_progress(e);
            break;
        case JOB_DETACH:
            j->dev->detached = true;
            free(j);
            break;
        case JOB_ATTACH:
            free(j); /* never handed back; kept for completeness */
            break;
        }
        j = next;
    }
    smp__engine_reload_progress(e);
}

/* A connection (and, once started, its worker) for dc's endpoint, in e->conns. */
struct conn *smp__engine_new_conn(smp_engine_t *e, const smp_device_cfg_t *dc,
                                  const smp_config_t *src)
{
    struct conn *c = calloc(1, sizeof *c);
    if (c == NULL) {
        return NULL;
    }
    struct conn **p = realloc(e->conns, (e->nconns + 1) * sizeof *p);
    if (p == NULL) {
        free(c);
        return NULL;
    }
    e->conns = p;
    e->conns[e->nconns++] = c;
    c->eng = e;
    c->src = src;
    c->plugin = dc->plugin;
    c->params = dc->conn_params;
    snprintf(c->key, sizeof c->key, "%s", dc->conn_key);
    snprintf(c->scope, sizeof c->scope, "%s:%s", dc->protocol, dc->conn_key);
    uv_mutex_init(&c->mu);
    uv_cond_init(&c->cv);
    c->sync_init = true;
    return c;
}

/* Adds d to c's devices (loop side). Before the worker starts it gets d's driver object at
 * once; after, through a JOB_ATTACH (engine_reload.c). */
int smp__engine_conn_add_device(struct conn *c, struct device *d)
{
    /* Grown, not sized for every device: 500 connections x 2000 devices would be 8 MB. */
    if ((c->ndevs & (c->ndevs - 1)) == 0) {
        struct device **p = realloc(c->devs, (c->ndevs ? 2 * c->ndevs : 1) * sizeof *p);
        if (p == NULL) {
            return -ENOMEM;
        }
        c->devs = p;
    }
    c->devs[c->ndevs++] = d;
    d->conn = c;
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Sets up device d for dc (of config src); shares the driver's tag view with one of `peers`
 * of the same profile. The seq is the caller's to set. */
int smp__engine_setup_device(smp_engine_t *e, struct device *d, const smp_device_cfg_t *dc,
                             const smp_config_t *src, struct device *const *peers, size_t npeers)
{
    const char *pre = src->mqtt.topic_prefix;
    const char *gid = src->gateway.id;
    d->eng = e;
    d->cfg = dc;
    d->src = src;
    d->online = -1;
    d->need_full = true;
    snprintf(d->scope, sizeof d->scope, "%s:%s", dc->protocol, dc->name);
    d->topic_data = xasprintf("%s/%s/%s/data", pre, gid, dc->name);
    d->topic_status = xasprintf("%s/%s/%s/status", pre, gid, dc->name);
    d->topic_result = xasprintf("%s/%s/%s/cmd/result", pre, gid, dc->name);
    d->tags = calloc(dc->ntags, sizeof *d->tags);
    if (!d->topic_data || !d->topic_status || !d->topic_result || !d->tags) {
        return -ENOMEM;
    }
    /* Devices sharing their tag definitions (one profile) share the driver's view of them
     * too; the nearest earlier one is usually the previous device. */
    for (size_t k = npeers; dc->tags_shared && k-- > 0;) {
        if (peers[k] != NULL && peers[k]->cfg->tags == dc->tags) {
            d->ptags = peers[k]->ptags;
            d->ptags_shared = true;
            break;
        }
    }
    if (!d->ptags_shared) {
        d->ptags = calloc(dc->ntags, sizeof *d->ptags);
        if (d->ptags == NULL) {
            return -ENOMEM;
        }
    }
    for (size_t t = 0; !d->ptags_shared && t < dc->ntags; t++) {
        d->ptags[t].name = dc->tags[t].name;
        d->ptags[t].type = dc->tags[t].type;
        d->ptags[t].writable = dc->tags[t].writable;
        d->ptags[t].params = dc->tags[t].params;
    }
    /* One poll group per distinct interval: tags polled together are planned together. */
    uint32_t *ivals = calloc(dc->ntags, sizeof *ivals);
    if (ivals == NULL) {
        return -ENOMEM;
    }
    size_t ni = 0;
    for (size_t t = 0; t < dc->ntags; t++) {
        uint32_t iv = dc->tags[t].interval_ms ? dc->tags[t].interval_ms : dc->interval_ms;
        bool seen = false;
        for (size_t k = 0; k < ni; k++) {
            seen = seen || ivals[k] == iv;
        }
        if (!seen) {
            ivals[ni++] = iv;
        }
    }
    qsort(ivals, ni, sizeof *ivals, cmp_u32);
    d->groups = calloc(ni, sizeof *d->groups);
    if (d->groups == NULL) {
        free(ivals);
        return -ENOMEM;
    }
    d->ngroups = ni;
    for (size_t k = 0; k < ni; k++) {
        struct group *g = &d->groups[k];
        g->dev = d;
        g->interval_ms = ivals[k];
        g->idx = calloc(dc->ntags, sizeof *g->idx);
        if (g->idx == NULL) {
            free(ivals);
            return -ENOMEM;
        }
        for (size_t t = 0; t < dc->ntags; t++) {
            uint32_t iv = dc->tags[t].interval_ms ? dc->tags[t].interval_ms : dc->interval_ms;
            if (iv == g->interval_ms) {
                g->idx[g->n++] = (uint32_t)t;
            }
        }
        uv_timer_init(e->loop, &g->timer);
        g->timer.data = g;
        g->timer_init = true;
    }
    free(ivals);
    return 0;
}

/* Rows come ordered by their key (device, tag): a search that goes on from the last match
 * finds each row's device and tag at once. Scanning every device for every row made a restart
 * at 100k tags take seconds. */
struct restore_ctx {
    smp_engine_t *e;
    size_t dev, tag; /* the last match */
};

static void restore_last(void *arg, const char *device, const char *tag, const char *value_json,
                         int64_t ts_ms)
{
    struct restore_ctx *rc = arg;
    smp_engine_t *e = rc->e;
    for (size_t i = 0; i < e->ndevs; i++) {
        size_t k = (rc->dev + i) % e->ndevs;
        struct device *d = e->devs[k];
        if (strcmp(d->cfg->name, device) != 0) {
            continue;
        }
        size_t start = k == rc->dev ? rc->tag + 1 : 0;
        rc->dev = k;
        for (size_t j = 0; j < d->cfg->ntags; j++) {
            size_t t = (start + j) % d->cfg->ntags;
            if (strcmp(d->cfg->tags[t].name, tag) == 0) {
                rc->tag = t;
                smp_eval_t v;
                if (smp_eval_from_json(&d->cfg->tags[t], value_json, &v) == 0) {
                    smp_eval_clear(&d->tags[t].reported);
                    d->tags[t].reported = v;
                }
                return;
            }
        }
        return;
    }
}

/* The store could not use its file and runs in memory: store.on_error decides. Degraded keeps
 * polling and publishing, but refuses write commands, because nothing would remember after a
 * restart that a command id was already executed (at-most-once), nor the outbox and seq. */
static int store_on_error(smp_engine_t *e)
{
    if (e->cfg->store.on_error_refuse) {
        LOG_ERR("engine", "store.on_error is \"refuse\": not starting without the database %s",
                e->cfg->store.path);
        return -EIO;
    }
    LOG_ERR("engine",
            "DEGRADED (store.on_error \"degraded\"): no durable store at %s; polling and "
            "publishing go on, write commands are refused until simpul restarts with a usable "
            "database",
            e->cfg->store.path);
    e->store_degraded = true;
    return 0;
}

int smp_engine_new(uv_loop_t *loop, const smp_config_t *cfg, smp_engine_t **out)
{
    *out = NULL;
    smp_engine_t *e = calloc(1, sizeof *e);
    if (e == NULL) {
        return -ENOMEM;
    }
    e->loop = loop;
    e->cfg = cfg;
    uv_mutex_init(&e->done_mu);
    smp_store_opts_t so = {
        .path = cfg->store.path,
        .history_retention_h = cfg->store.history_retention_h,
        .outbox_max_bytes = (int64_t)(cfg->store.outbox_max_mb * 1024.0 * 1024.0),
        .sync_normal = cfg->store.sync_normal,
        /* Results are looked up only within the de-dup window: twice that is plenty. */
        .cmd_keep_ms = 2 * (int64_t)cfg->commands.dedup_window_s * 1000,
        .audit_keep_ms = (int64_t)cfg->commands.audit_retention_days * 24 * 3600000,
        .audit_max_rows = cfg->commands.audit_max_rows,
        .history_max_bytes = (int64_t)(cfg->store.history_max_mb * 1024.0 * 1024.0),
        .history_chunk_max_s = cfg->store.history_chunk_max_s,
        .commit_interval_ms = cfg->store.commit_interval_ms,
        .runtime_dir = cfg->store.runtime_dir,
        .skip_check = cfg->store.skip_check,
    };
    int rc = smp_store_open(loop, &so, &e->store);
    if (rc == 0 && smp_store_degraded(e->store)) {
        rc = store_on_error(e);
    }
    if (rc < 0) {
        LOG_ERR("engine", "cannot open the store %s: %s", cfg->store.path, strerror(-rc));
        smp_store_close(e->store);
        uv_mutex_destroy(&e->done_mu);
        free(e);
        return rc;
    }
    e->topic_metrics = xasprintf("%s/%s/metrics", cfg->mqtt.topic_prefix, cfg->gateway.id);
    e->topic_cmd_sub = xasprintf("%s/%s/+/cmd", cfg->mqtt.topic_prefix, cfg->gateway.id);
    e->devs = calloc(cfg->ndevices ? cfg->ndevices : 1, sizeof *e->devs);
    if (e->topic_metrics == NULL || e->topic_cmd_sub == NULL || e->devs == NULL) {
        rc = -ENOMEM;
        goto fail;
    }
    for (size_t k = 0; k < cfg->ndevices; k++) {
        struct device *d = calloc(1, sizeof *d);
        if (d == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
        e->devs[e->ndevs++] = d;
        d->index = k;
        rc = smp__engine_setup_device(e, d, &cfg->devices[k], cfg, e->devs, k);
        if (rc < 0) {
            goto fail;
        }
        rc = smp_store_load_seq(e->store, d->cfg->name, &d->seq);
        if (rc < 0) {
            LOG_WARN(d->scope, "seq continues from %" PRIu64 " (%s)", d->seq, strerror(-rc));
        }
    }
    /* Devices with the same connection key share one connection and one worker. */
    for (size_t k = 0; k < e->ndevs; k++) {
        struct device *d = e->devs[k];
        struct conn *c = NULL;
        for (size_t m = 0; m < e->nconns && c == NULL; m++) {
            if (e->conns[m]->plugin == d->cfg->plugin &&
                strcmp(e->conns[m]->key, d->cfg->conn_key) == 0) {
                c = e->conns[m];
            }
        }
        if (c == NULL && (c = smp__engine_new_conn(e, d->cfg, cfg)) == NULL) {
            rc = -ENOMEM;
            goto fail;
        }
        if ((rc = smp__engine_conn_add_device(c, d)) < 0) {
            goto fail;
        }
    }
    struct restore_ctx restore = {.e = e};
    rc = smp_store_load_last(e->store, restore_last, &restore);
    if (rc < 0) {
        LOG_WARN("engine", "could not restore last values: %s", strerror(-rc));
    }
    e->cmds = commands_new(e);
    smp_bridge_cbs_t cbs = {
        .on_connect = on_mqtt_connect,
        .on_disconnect = on_mqtt_disconnect,
        .on_message = on_mqtt_message,
        .on_ack = on_mqtt_ack,
        .on_stopped = on_bridge_stopped,
    };
    rc = smp_bridge_new(loop, cfg, &cbs, e, &e->bridge);
    if (rc == 0) {
        rc = smp__sparkplug_new(e, &e->spb);
    }
    if (rc < 0) {
        goto fail;
    }
    uv_async_init(loop, &e->done_async, on_done);
    e->done_async.data = e;
    uv_timer_init(loop, &e->metrics_timer);
    e->metrics_timer.data = e;
    uv_timer_init(loop, &e->stop_timer);
    e->stop_timer.data = e;
    uv_check_init(loop, &e->acks_check);
    e->acks_check.data = e;
    uv_timer_init(loop, &e->pump_timer);
    e->pump_timer.data = e;
    e->handles_init = true;
    *out = e;
    return 0;
fail:
    LOG_ERR("engine", "set-up failed: %s", strerror(-rc));
    smp_engine_free(e);
    return rc;
}

/* Starts c's worker thread with the devices c has now (later ones come by JOB_ATTACH). */
int smp__engine_start_conn(smp_engine_t *e, struct conn *c)
{
    c->wdevs = malloc((c->ndevs ? c->ndevs : 1) * sizeof *c->wdevs);
    if (c->wdevs == NULL) {
        return -ENOMEM;
    }
    memcpy(c->wdevs, c->devs, c->ndevs * sizeof *c->wdevs);
    c->nwdevs = c->wcap = c->ndevs;
    uv_thread_options_t topt = {.flags = UV_THREAD_HAS_STACK_SIZE,
                                .stack_size = WORKER_STACK_BYTES};
    if (uv_thread_create_ex(&c->thread, &topt, worker_main, c) != 0) {
        LOG_ERR(c->scope, "cannot start the worker thread");
        return -EAGAIN;
    }
    c->started = true;
    e->workers_alive++;
    smp__conn_load_init(&c->load, uv_now(e->loop));
    return 0;
}

/* Starts the poll timers of d, the k-th device. */
void smp__engine_start_device(smp_engine_t *e, struct device *d, size_t k)
{
    (void)e;
    for (size_t g = 0; g < d->ngroups; g++) {
        /* Spread first polls a little so a street of lights does not fire at once. */
        uint64_t first = (k * 37u) % (d->groups[g].interval_ms < 250 ? 1 : 250);
        uv_timer_start(&d->groups[g].timer, on_group_timer, first, d->groups[g].interval_ms);
    }
}

int smp_engine_start(smp_engine_t *e)
{
    e->started_ms = uv_now(e->loop);
    for (size_t m = 0; m < e->nconns; m++) {
        int rc = smp__engine_start_conn(e, e->conns[m]);
        if (rc < 0) {
            return rc;
        }
    }
    for (size_t k = 0; k < e->ndevs; k++) {
        smp__engine_start_device(e, e->devs[k], k);
    }
    uint64_t mi =
        (uint64_t)(e->cfg->gateway.metrics_interval_s ? e->cfg->gateway.metrics_interval_s : 60) *
        1000u;
    uv_timer_start(&e->metrics_timer, on_metrics_timer, mi, mi);
    uv_timer_start(&e->pump_timer, on_pump_timer, 1000, 1000);
    int rc = smp__sparkplug_start(e->spb);
    if (rc == 0 && e->cfg->mqtt.format != SMP_FORMAT_SPARKPLUG) {
        smp_bridge_subscribe(e->bridge, e->topic_cmd_sub, 1);
        rc = smp_bridge_start(e->bridge);
    }
    if (rc < 0) {
        LOG_ERR("engine", "mqtt start failed: %s", strerror(-rc));
        return rc;
    }
    LOG_INFO("engine", "started: %zu devices on %zu connections", e->ndevs, e->nconns);
    return 0;
}

/* Forced stop: commands still waiting for their worker never start; each is answered. */
static void cancel_queued_commands(smp_engine_t *e)
{
    for (size_t m = 0; m < e->nconns; m++) {
        struct conn *c = e->conns[m];
        uv_mutex_lock(&c->mu);
        c->cancel_cmds = true;
        struct job *j = c->cmd_head;
        c->cmd_head = c->cmd_tail = NULL;
        uv_mutex_unlock(&c->mu);
        while (j != NULL) {
            struct job *next = j->next;
            smp__engine_command_cancel(e, j);
            j = next;
        }
    }
}

static void on_stop_timeout(uv_timer_t *t)
{
    smp_engine_t *e = t->data;
    if (!e->stop_forced) {
        LOG_WARN("engine", "stop deadline reached; finishing now");
        e->stop_forced = true;
        cancel_queued_commands(e);
        smp__engine_stop_progress(e);
        if (!e->stop_done) {
            /* The bridge gets a last moment to close (it may be waiting on a DNS lookup that
             * cannot be cancelled); after that the process ends without it. */
            uv_timer_start(&e->stop_timer, on_stop_timeout, 500, 0);
        }
        return;
    }
    LOG_WARN("engine", "the MQTT client did not close in time; leaving it");
    e->bridge_abandoned = true;
    smp__engine_stop_progress(e);
}

/* Advances the stop sequence: workers exit -> pending outbox adds committed -> bridge stops
 * (offline status) -> done. Called whenever one of those conditions may have changed. */
void smp__engine_stop_progress(smp_engine_t *e)
{
    if (!e->stopping || e->stop_done) {
        return;
    }
    if ((e->workers_alive > 0 || e->pending_adds > 0 || smp_commands_busy(e->cmds)) &&
        !e->stop_forced) {
        return;
    }
    if (!e->bridge_stop_called) {
        /* The bridge's own wait for PUBACKs must end by the stop deadline: it gets what is
         * left of it (at least a moment to send the offline status). */
        uint64_t now = uv_now(e->loop);
        uint64_t left = e->stop_deadline_ms > now ? e->stop_deadline_ms - now : 0;
        uint32_t wait = left < 1500 ? (uint32_t)left : 1500;
        e->bridge_stop_called = true;
        smp_bridge_stop(e->bridge, wait < 200 ? 200 : wait);
        smp__sparkplug_stop(e->spb, wait < 200 ? 200 : wait);
        return;
    }
    /* Done only once the bridge has closed its handles: its callbacks use the engine. The
     * bridge's stop is bounded by the wait given above. */
    if ((!e->bridge_stopped || !smp__sparkplug_stopped(e->spb)) && !e->bridge_abandoned) {
        return;
    }
    e->stop_done = true;
    uv_timer_stop(&e->stop_timer);
    if (e->stop_cb != NULL) {
        e->stop_cb(e->stop_arg);
    }
}

void smp_engine_stop(smp_engine_t *e, uint32_t timeout_ms, void (*done)(void *arg), void *arg)
{
    if (e->stopping) {
        return;
    }
    e->stopping = true;
    e->stop_cb = done;
    e->stop_arg = arg;
    LOG_INFO("engine", "stopping");
    for (size_t k = 0; k < e->ndevs; k++) {
        for (size_t g = 0; g < e->devs[k]->ngroups; g++) {
            uv_timer_stop(&e->devs[k]->groups[g].timer);
        }
    }
    uv_timer_stop(&e->metrics_timer);
    uv_timer_stop(&e->pump_timer);
    for (size_t m = 0; m < e->nconns; m++) {
        struct conn *c = e->conns[m];
        uv_mutex_lock(&c->mu);
        c->stop = true;
        /* Queued polls are dropped; queued commands still run (they were accepted), unless
         * their worker never started (a reload's, waiting for its endpoint to be free). */
        struct job *j = c->poll_head, *cmds = c->started ? NULL : c->cmd_head;
        c->poll_head = c->poll_tail = NULL;
        if (!c->started) {
            c->cmd_head = c->cmd_tail = NULL;
        }
        uv_cond_signal(&c->cv);
        uv_mutex_unlock(&c->mu);
        while (cmds != NULL) {
            struct job *next = cmds->next;
            smp__engine_command_cancel(e, cmds);
            cmds = next;
        }
        while (j != NULL) {
            struct job *next = j->next;
            j->grp->in_flight = false;
            smp__job_free(j);
            j = next;
        }
    }
    e->stop_deadline_ms = uv_now(e->loop) + timeout_ms;
    uv_timer_start(&e->stop_timer, on_stop_timeout, timeout_ms, 0);
    smp__engine_stop_progress(e);
}

void smp__engine_free_device(struct device *d)
{
    free(d->topic_data);
    free(d->topic_status);
    free(d->topic_result);
    if (d->tags != NULL) {
        for (size_t t = 0; t < d->cfg->ntags; t++) {
            smp_eval_clear(&d->tags[t].current);
            smp_eval_clear(&d->tags[t].reported);
        }
    }
    free(d->tags);
    if (!d->ptags_shared) {
        free(d->ptags);
    }
    for (size_t g = 0; g < d->ngroups; g++) {
        free(d->groups[g].idx);
        smp__job_free(d->groups[g].spare);
    }
    free(d->groups);
}

static void close_noop(uv_handle_t *h)
{
    (void)h;
}

static void close_device_timers(struct device *d)
{
    for (size_t g = 0; g < d->ngroups; g++) {
        if (d->groups[g].timer_init) {
            uv_close((uv_handle_t *)&d->groups[g].timer, close_noop);
            d->groups[g].timer_init = false;
        }
    }
}

/* After its worker has exited (or never started): the jobs left in its queues go too. */
void smp__engine_free_conn(struct conn *c)
{
    struct job *lists[] = {c->ctl_head, c->poll_head};
    for (size_t k = 0; k < 2; k++) {
        for (struct job *j = lists[k], *next; j != NULL; j = next) {
            next = j->next;
            if (j->type == JOB_READ && j->grp != NULL) {
                j->grp->in_flight = false;
            }
            smp__job_free(j);
        }
    }
    if (c->sync_init) {
        uv_mutex_destroy(&c->mu);
        uv_cond_destroy(&c->cv);
    }
    free(c->wdevs);
    free(c->devs);
    free(c);
}

int smp_engine_free(smp_engine_t *e)
{
    if (e == NULL) {
        return 0;
    }
    /* Workers that exited after the loop stopped have left their notice in the done queue. */
    uv_mutex_lock(&e->done_mu);
    for (struct job *j = e->done_head; j != NULL; j = j->next) {
        if (j->type == JOB_EXIT) {
            j->conn->exited = true;
        }
    }
    uv_mutex_unlock(&e->done_mu);
    bool workers_stuck = false;
    for (size_t m = 0; m < e->nconns; m++) {
        struct conn *c = e->conns[m];
        if (c->started && !c->exited) {
            workers_stuck = true;
        }
    }
    if (workers_stuck || e->bridge_abandoned) {
        /* A worker is still inside a blocking driver call past the stop deadline. Nothing it
         * may touch can be freed; commit what is queued and let the caller end the process. */
        LOG_WARN("engine", "%s after the stop deadline",
                 workers_stuck ? "a worker is still busy in its driver"
                               : "the MQTT client is still closing");
        smp_store_close(e->store);
        return -EBUSY;
    }
    for (size_t m = 0; m < e->nconns; m++) {
        if (e->conns[m]->started) {
            uv_thread_join(&e->conns[m]->thread);
        }
    }
    for (size_t k = 0; k < e->ndevs; k++) {
        close_device_timers(e->devs[k]);
    }
    /* A reload's retiring devices: their timers may be closing already. */
    for (size_t k = 0; k < e->ndraining; k++) {
        close_device_timers(e->draining[k]);
    }
    smp__engine_reload_free(e);
    if (e->handles_init) {
        /* Close our handles and let the loop run their close callbacks. */
        uv_close((uv_handle_t *)&e->done_async, close_noop);
        uv_close((uv_handle_t *)&e->metrics_timer, close_noop);
        uv_close((uv_handle_t *)&e->stop_timer, close_noop);
        uv_close((uv_handle_t *)&e->acks_check, close_noop);
        uv_close((uv_handle_t *)&e->pump_timer, close_noop);
    }
    uv_run(e->loop, UV_RUN_NOWAIT);
    /* Jobs that finished after the loop stopped. */
    struct job *j = e->done_head;
    while (j != NULL) {
        struct job *next = j->next;
        if (j->type == JOB_READ && j->cmd == NULL) {
            smp__job_free(j);
        } else if (j->type == JOB_READ || j->type == JOB_WRITE) {
            smp_commands_job_discard(e->cmds, j->cmd);
            smp__job_free(j);
        } else if (j->type == JOB_DETACH) {
            j->dev->detached = true;
            free(j);
        } else {
            free(j);
        }
        j = next;
    }
    flush_acks(e);
    free(e->acks);
    /* The store first: closing it runs its last callbacks, which use the bridge and the
     * command state. */
    smp_store_close(e->store);
    e->store = NULL;
    smp_bridge_free(e->bridge);
    smp__sparkplug_free(e->spb);
    smp_commands_free(e->cmds);
    e->cmds = NULL;
    free_retired(e);
    for (size_t k = 0; k < e->ndevs; k++) {
        smp__engine_free_device(e->devs[k]);
        free(e->devs[k]);
    }
    for (size_t k = 0; k < e->ndraining; k++) {
        smp__engine_free_device(e->draining[k]);
        free(e->draining[k]);
    }
    free(e->draining);
    for (size_t m = 0; m < e->nconns; m++) {
        smp__engine_free_conn(e->conns[m]);
    }
    free(e->conns);
    free(e->devs);
    free(e->live_ids);
    for (size_t k = 0; k < e->err_texts_n; k++) {
        free(e->err_texts[k]);
    }
    free(e->err_texts);
    smp_buf_free(&e->emit_vals);
    smp_buf_free(&e->emit_errs);
    smp_buf_free(&e->emit_msg);
    free(e->topic_metrics);
    free(e->topic_cmd_sub);
    uv_mutex_destroy(&e->done_mu);
    free(e);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* The engine's side of the command interface (engine_cmd.h); results go back via command.h   */

static int cmd_find_device(void *eng, const char *name)
{
    smp_engine_t *e = eng;
    for (size_t k = 0; k < e->ndevs; k++) {
        if (strcmp(e->devs[k]->cfg->name, name) == 0) {
            return (int)k;
        }
    }
    return -1;
}

static void cmd_device(void *eng, size_t dev, smp_cmd_device_t *out)
{
    const struct device *d = ((smp_engine_t *)eng)->devs[dev];
    *out = (smp_cmd_device_t){.cfg = d->cfg,
                              .topic_result = d->topic_result,
                              .online = d->online,
                              .status_err = d->status_err};
}

static smp_cmd_job_t *cmd_job_new(void *eng, size_t dev, const smp_cmd_job_spec_t *spec)
{
    smp_engine_t *e = eng;
    struct job *j = calloc(1, sizeof *j);
    if (j == NULL) {
        return NULL;
    }
    j->dev = e->devs[dev];
    if (spec->write) {
        j->type = JOB_WRITE;
        j->tag = spec->tag;
        j->write_raw = *spec->raw; /* the string behind it stays the command's */
        return (smp_cmd_job_t *)j;
    }
    j->type = JOB_READ;
    j->idx = spec->idx;
    j->n = spec->n;
    j->readings = calloc(j->n, sizeof *j->readings);
    j->strs = calloc(j->n, sizeof *j->strs);
    j->errs = calloc(j->n, ERRMSG_LEN);
    if (!j->readings || !j->strs || !j->errs) {
        smp__job_free(j);
        return NULL;
    }
    return (smp_cmd_job_t *)j;
}

static void cmd_job_free(void *eng, smp_cmd_job_t *job)
{
    (void)eng;
    smp__job_free((struct job *)job);
}

static void cmd_job_enqueue(void *eng, smp_cmd_job_t *job, uint64_t deadline_mono_ms, void *cookie)
{
    (void)eng;
    struct job *j = (struct job *)job;
    j->cmd = cookie;
    j->deadline_mono_ms = deadline_mono_ms;
    smp__engine_enqueue(j->dev->conn, j);
}

static void cmd_emit_reading(void *eng, size_t dev, uint32_t tag, const smp_reading_t *r,
                             uint64_t ts_ms)
{
    smp_engine_t *e = eng;
    smp__engine_apply_reading(e, e->devs[dev], tag, r, NULL, ts_ms);
    smp__engine_emit(e, e->devs[dev], ts_ms, false);
}

static int cmd_publish(void *eng, const char *topic, const char *text, size_t len, uint64_t token,
                       const smp_mqtt_props_t *props)
{
    smp_engine_t *e = eng;
    return smp_bridge_publish_reserved(e->bridge, topic, text, len, 1, false, token, props);
}

static bool cmd_stopping(void *eng)
{
    return ((smp_engine_t *)eng)->stopping;
}

static void cmd_progress(void *eng)
{
    smp__engine_stop_progress(eng);
    smp__engine_reload_progress(eng);
}

static const smp_cmd_engine_ops_t cmd_ops = {
    .find_device = cmd_find_device,
    .device = cmd_device,
    .job_new = cmd_job_new,
    .job_free = cmd_job_free,
    .job_enqueue = cmd_job_enqueue,
    .emit_reading = cmd_emit_reading,
    .publish = cmd_publish,
    .stopping = cmd_stopping,
    .progress = cmd_progress,
};

static smp_commands_t *commands_new(smp_engine_t *e)
{
    smp_cmd_engine_t ce = {.ops = &cmd_ops,
                           .eng = e,
                           .loop = e->loop,
                           .cfg = e->cfg,
                           .store = e->store,
                           .ndevs = e->ndevs};
    return smp_commands_new(&ce);
}

/* A command's job is back from its worker: its result goes to the command module. */
static void command_job_done(smp_engine_t *e, struct job *j)
{
    smp_cmd_outcome_t o = {.status = j->status,
                           .errmsg = j->errmsg,
                           .started = j->started,
                           .done_wall_ms = j->done_wall_ms,
                           .rb = &j->rb,
                           .readings = j->readings,
                           .tag_errs = j->errs};
    smp_commands_job_done(e->cmds, j->cmd, &o);
    smp__job_free(j);
    smp__engine_stop_progress(e);
    smp__engine_reload_progress(e);
}

/* A command's job that never reached its worker (a forced stop, a reload replacing its
 * device): answered "cancelled" by the command module. */
void smp__engine_command_cancel(smp_engine_t *e, struct job *j)
{
    void *cookie = j->cmd;
    bool replaced = j->dev != NULL && j->dev->retiring && !e->stopping;
    smp__job_free(j);
    if (replaced) {
        smp_commands_job_replaced(e->cmds, cookie);
    } else {
        smp_commands_job_cancelled(e->cmds, cookie);
    }
}
