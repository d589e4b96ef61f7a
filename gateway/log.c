#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int smp__log_level = SMP_LOG_INFO;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

/* The writer (smp_log_start): lines go into a bounded ring and a thread of their own writes
 * them to stderr, so a reader that stops reading (a stalled journald, a full pipe) blocks that
 * thread only. When the ring is full a line is dropped and counted; the writer says how many
 * once it catches up. Without the writer (before start, after stop) lines are written
 * directly: start-up and --check may block, the loop never does. */
#define RING_BYTES (64u * 1024u) /* ~500 lines: seconds of a busy log, minutes of a normal one */
#define LINE_MAX   1024

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* the writer waits for lines */
    pthread_cond_t idle;   /* smp_log_stop waits for the ring to empty */
    char ring[RING_BYTES]; /* whole lines, each one write(2) */
    size_t head, len;      /* start and bytes used, wrapping */
    bool running, stopping, writing;
    pthread_t thread;
    uint64_t dropped_unreported;
} w = {.mu = PTHREAD_MUTEX_INITIALIZER,
       .cv = PTHREAD_COND_INITIALIZER,
       .idle = PTHREAD_COND_INITIALIZER};

static atomic_uint_fast64_t n_lines, n_dropped;

int smp_log_level_parse(const char *s)
{
    for (int i = 0; i < 4; i++) {
        if (s != NULL && strcmp(s, level_names[i]) == 0) {
            return i;
        }
    }
    return -1;
}

void smp_log_set_level(int level)
{
    smp__log_level = level;
}

static void write_all(const char *p, size_t n)
{
    while (n > 0) {
        ssize_t k = write(STDERR_FILENO, p, n);
        if (k <= 0) {
            return; /* EPIPE, EBADF...: the log has nowhere to go; nothing to do about it */
        }
        p += k;
        n -= (size_t)k;
    }
}

/* Takes up to `max` bytes of whole lines off the ring (mutex held). */
static size_t ring_take(char *out, size_t max)
{
    size_t n = 0;
    while (n < w.len && n < max) {
        out[n] = w.ring[(w.head + n) % RING_BYTES];
        n++;
    }
    /* Cut after the last newline so a line is never split across two writes. */
    while (n > 0 && out[n - 1] != '\n' && n < w.len) {
        n--;
    }
    w.head = (w.head + n) % RING_BYTES;
    w.len -= n;
    return n;
}

static void *writer_main(void *arg)
{
    (void)arg;
    static char chunk[16384];
    pthread_mutex_lock(&w.mu);
    for (;;) {
        while (w.len == 0 && !w.stopping) {
            w.writing = false;
            pthread_cond_broadcast(&w.idle);
            pthread_cond_wait(&w.cv, &w.mu);
        }
        if (w.len == 0) {
            break;
        }
        w.writing = true;
        size_t n = ring_take(chunk, sizeof chunk);
        uint64_t lost = w.len == 0 ? w.dropped_unreported : 0;
        if (lost > 0) {
            w.dropped_unreported = 0;
        }
        pthread_mutex_unlock(&w.mu);
        write_all(chunk, n);
        if (lost > 0) {
            char line[160];
            int k = snprintf(line, sizeof line,
                             "log: %llu line(s) dropped: stderr did not keep up (counted in "
                             "metrics log.dropped)\n",
                             (unsigned long long)lost);
            write_all(line, (size_t)k);
        }
        pthread_mutex_lock(&w.mu);
    }
    w.writing = false;
    pthread_cond_broadcast(&w.idle);
    pthread_mutex_unlock(&w.mu);
    return NULL;
}

int smp_log_start(void)
{
    pthread_mutex_lock(&w.mu);
    int rc = 0;
    if (!w.running) {
        w.stopping = false;
        rc = -pthread_create(&w.thread, NULL, writer_main, NULL);
        w.running = rc == 0;
    }
    pthread_mutex_unlock(&w.mu);
    return rc;
}

void smp_log_stop(unsigned timeout_ms)
{
    pthread_mutex_lock(&w.mu);
    if (!w.running) {
        pthread_mutex_unlock(&w.mu);
        return;
    }
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000u;
    until.tv_nsec += (long)(timeout_ms % 1000u) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    int rc = 0;
    while ((w.len > 0 || w.writing) && rc == 0) {
        rc = pthread_cond_timedwait(&w.idle, &w.mu, &until);
    }
    w.stopping = true;
    pthread_cond_signal(&w.cv);
    bool drained = w.len == 0 && !w.writing;
    pthread_mutex_unlock(&w.mu);
    if (drained) {
        pthread_join(w.thread, NULL);
    } else {
        /* Blocked on a stalled stderr: leave it; the process is about to end. */
        pthread_detach(w.thread);
    }
    pthread_mutex_lock(&w.mu);
    w.running = false;
    pthread_mutex_unlock(&w.mu);
}

bool smp_episode_fail(smp_episode_t *ep, uint64_t now_ms)
{
    if (ep->failures++ == 0) {
        ep->since_ms = now_ms;
        return true;
    }
    return false;
}

uint64_t smp_episode_end(smp_episode_t *ep, uint64_t now_ms, uint64_t *duration_ms)
{
    uint64_t n = ep->failures;
    *duration_ms = n > 0 && now_ms > ep->since_ms ? now_ms - ep->since_ms : 0;
    ep->failures = 0;
    return n;
}

void smp_log_counters(uint64_t *lines, uint64_t *dropped)
{
    *lines = atomic_load(&n_lines);
    *dropped = atomic_load(&n_dropped);
}

static void emit(const char *line, size_t n)
{
    atomic_fetch_add(&n_lines, 1);
    pthread_mutex_lock(&w.mu);
    if (!w.running) {
        pthread_mutex_unlock(&w.mu);
        write_all(line, n); /* one write per line keeps lines from different threads whole */
        return;
    }
    if (RING_BYTES - w.len < n) {
        w.dropped_unreported++;
        pthread_mutex_unlock(&w.mu);
        atomic_fetch_add(&n_dropped, 1);
        return;
    }
    for (size_t k = 0; k < n; k++) {
        w.ring[(w.head + w.len + k) % RING_BYTES] = line[k];
    }
    w.len += n;
    pthread_cond_signal(&w.cv);
    pthread_mutex_unlock(&w.mu);
}

void smp__vlog(int level, const char *scope, const char *fmt, va_list ap)
{
    char line[LINE_MAX];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %-5s ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec,
                     (int)(tv.tv_usec / 1000), level >= 0 && level < 4 ? level_names[level] : "?");
    if (scope != NULL && n < (int)sizeof line) {
        n += snprintf(line + n, sizeof line - (size_t)n, "[%s] ", scope);
    }
    if (n < (int)sizeof line) {
        n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    }
    if (n >= (int)sizeof line - 1) {
        n = (int)sizeof line - 2;
    }
    line[n++] = '\n';
    emit(line, (size_t)n);
}

void smp__log(int level, const char *scope, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    smp__vlog(level, scope, fmt, ap);
    va_end(ap);
}
