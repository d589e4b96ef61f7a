/* The driver's own Modbus links (see link.h). */
#include "link.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <modbus.h>

#include <simpul/plugin.h>

/* A line that never goes quiet (another master, a babbling device) is given up after this
 * many quiet gaps, and the link reports -EIO so the host reopens it. */
#define DRAIN_MAX_GAPS 8
#define DRAIN_MIN_MS   20

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t ts_ns(const struct timespec *ts)
{
    return (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec;
}

static void set_why(smp_mb_link_t *l, const char *fmt, const char *arg)
{
    snprintf(l->why, sizeof l->why, fmt, arg);
}

void smp_mb_link_init(smp_mb_link_t *l, smp_mb_link_kind_t kind)
{
    memset(l, 0, sizeof *l);
    l->kind = kind;
    l->fd = -1;
}

static bool is_rtu(const smp_mb_link_t *l)
{
    return l->kind != SMP_MB_LINK_TCP;
}

/* Waits until fd is ready for `events` or the deadline passes: 1 ready, 0 timed out, or a
 * negative errno. A hang-up with nothing left to read is -EIO (a tty whose other end went
 * away reads 0 bytes forever, like an idle one); other POLLHUP/POLLERR count as ready: the
 * read or write that follows tells. */
static int wait_fd(int fd, short events, int64_t deadline_ns)
{
    for (;;) {
        int64_t left = deadline_ns - mono_ns();
        if (left <= 0) {
            return 0;
        }
        struct pollfd p = {.fd = fd, .events = events};
        int ms = (int)((left + 999999) / 1000000);
        int n = poll(&p, 1, ms);
        if (n > 0 && (p.revents & POLLNVAL)) {
            return -EBADF;
        }
        if (n > 0 && events == POLLIN && !(p.revents & POLLIN)) {
            return -EIO;
        }
        if (n > 0) {
            return 1;
        }
        if (n < 0 && errno != EINTR) {
            return -errno;
        }
    }
}

/* One read of what is there. Returns bytes read (> 0), 0 when nothing is there, or a negative
 * errno; a TCP peer closing (EOF) is -ECONNRESET. A tty set up with VMIN = VTIME = 0 reads 0
 * bytes when idle: that is "nothing there", and wait_fd tells a hang-up. */
static ssize_t read_some(smp_mb_link_t *l, uint8_t *buf, size_t n)
{
    for (;;) {
        ssize_t r = read(l->fd, buf, n);
        if (r > 0) {
            return r;
        }
        if (r == 0) {
            return l->kind == SMP_MB_LINK_SERIAL ? 0 : -ECONNRESET;
        }
        if (errno == EINTR) {
            continue;
        }
        return errno == EAGAIN || errno == EWOULDBLOCK ? 0 : -errno;
    }
}

/* Reads exactly n bytes by the deadline. Returns 0, -ETIMEDOUT (*got says how many came), or
 * a negative errno. */
static int read_exact(smp_mb_link_t *l, uint8_t *buf, size_t n, int64_t deadline_ns, size_t *got)
{
    *got = 0;
    while (*got < n) {
        ssize_t r = read_some(l, buf + *got, n - *got);
        if (r < 0) {
            return (int)r;
        }
        if (r > 0) {
            *got += (size_t)r;
            continue;
        }
        int w = wait_fd(l->fd, POLLIN, deadline_ns);
        if (w <= 0) {
            return w == 0 ? -ETIMEDOUT : w;
        }
    }
    return 0;
}

static int write_all(smp_mb_link_t *l, const uint8_t *buf, size_t n, int64_t deadline_ns)
{
    size_t off = 0;
    while (off < n) {
        ssize_t w = l->kind == SMP_MB_LINK_SERIAL ? write(l->fd, buf + off, n - off)
                                                  : send(l->fd, buf + off, n - off, MSG_NOSIGNAL);
        if (w > 0) {
            off += (size_t)w;
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            return -errno;
        }
        int r = wait_fd(l->fd, POLLOUT, deadline_ns);
        if (r <= 0) {
            return r == 0 ? -ETIMEDOUT : r;
        }
    }
    return 0;
}

/* Discards whatever is already buffered on the line, without waiting. A byte found there is a
 * late one: the drain's quiet gap starts again. Returns 0 or a negative errno. */
static int discard_buffered(smp_mb_link_t *l)
{
    uint8_t junk[256];
    for (;;) {
        ssize_t r = read_some(l, junk, sizeof junk);
        if (r <= 0) {
            return (int)r;
        }
        l->drain_since_ns = mono_ns();
    }
}

/* Discards what arrives until the line has been quiet for the drain gap, counted from the
 * failure or the last late byte. Returns 0, or a negative errno when the link failed or the
 * line never went quiet. */
static int drain(smp_mb_link_t *l)
{
    int64_t quiet = (int64_t)l->drain_quiet_ms * 1000000LL;
    if (quiet < l->gap_ns) {
        quiet = l->gap_ns;
    }
    int64_t last = l->drain_since_ns;
    int64_t give_up = mono_ns() + DRAIN_MAX_GAPS * quiet;
    uint8_t junk[256];
    for (;;) {
        ssize_t r = read_some(l, junk, sizeof junk);
        if (r < 0) {
            return (int)r;
        }
        int64_t now = mono_ns();
        if (r > 0) {
            last = now;
            continue;
        }
        if (now - last >= quiet) {
            break;
        }
        if (now >= give_up) {
            set_why(l, "%s", "the line does not go quiet");
            return -EIO;
        }
        int w = wait_fd(l->fd, POLLIN, last + quiet < give_up ? last + quiet : give_up);
        if (w < 0) {
            return w;
        }
    }
    if (last != l->drain_since_ns) {
        clock_gettime(CLOCK_MONOTONIC, &l->last_io); /* late bytes came: keep the gap after them */
        l->io_seen = true;
    }
    l->drain_pending = false;
    l->drain_any = false;
    memset(l->drain_units, 0, sizeof l->drain_units);
    return 0;
}

static bool must_drain(const smp_mb_link_t *l, int unit)
{
    return l->drain_pending &&
           (l->drain_any || (l->drain_units[(unit & 0xFF) / 32] >> (unit % 32) & 1u) != 0);
}

/* Arms the drain after a failed exchange with `unit`. After a timeout only a request to the
 * same unit could take the late reply for its own: a request to another unit would see the
 * wrong unit id and refuse it. So only the next request to a unit that timed out (they are
 * kept in a set until a drain) waits for the quiet gap, and a dead unit costs its neighbours
 * its timeout and nothing more. After a garbled reply the line holds an unknown rest: every
 * next request waits. */
static void arm_drain(smp_mb_link_t *l, int unit, bool any, int timeout_ms)
{
    l->drain_pending = true;
    l->drain_any = l->drain_any || any;
    l->drain_units[(unit & 0xFF) / 32] |= 1u << (unit % 32);
    l->drain_since_ns = mono_ns();
    l->drain_quiet_ms = timeout_ms / 2 > DRAIN_MIN_MS ? timeout_ms / 2 : DRAIN_MIN_MS;
}

/* ---- open / close ------------------------------------------------------------------------ */

static int connect_one(const struct addrinfo *ai, int64_t deadline_ns)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
        return -errno;
    }
    int rc = 0;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
        rc = errno == EINPROGRESS ? 0 : -errno;
        if (rc == 0) {
            int w = wait_fd(fd, POLLOUT, deadline_ns);
            int err = 0;
            socklen_t len = sizeof err;
            if (w <= 0) {
                rc = w == 0 ? -ETIMEDOUT : w;
            } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
                rc = -(err ? err : errno);
            }
        }
    }
    if (rc < 0) {
        close(fd);
        return rc;
    }
    /* Requests are small and each waits for its reply: never let Nagle hold one back. */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return fd;
}

static int open_tcp(smp_mb_link_t *l, int timeout_ms)
{
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM}, *res = NULL;
    int gai = l->host ? getaddrinfo(l->host, l->service, &hints, &res) : EAI_NONAME;
    if (gai != 0) {
        snprintf(l->why, sizeof l->why, "cannot resolve host %s: %s", l->host ? l->host : "",
                 gai_strerror(gai));
        return -EHOSTUNREACH;
    }
    int64_t deadline = mono_ns() + (int64_t)timeout_ms * 1000000LL;
    int rc = -ECONNREFUSED;
    for (const struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        rc = connect_one(ai, deadline);
        if (rc >= 0) {
            break;
        }
    }
    freeaddrinfo(res);
    if (rc < 0) {
        snprintf(l->why, sizeof l->why, "connect to %s:%s: %s", l->host, l->service, strerror(-rc));
        return rc;
    }
    l->fd = rc;
    return 0;
}

static int open_serial(smp_mb_link_t *l)
{
    /* libmodbus knows how to turn baud, parity and bits into termios settings; it opens the
     * tty non-blocking, and from then on the driver reads and writes the fd itself. */
    modbus_t *ctx = l->device
                        ? modbus_new_rtu(l->device, l->baud, l->parity, l->data_bits, l->stop_bits)
                        : NULL;
    if (ctx == NULL) {
        set_why(l, "cannot set up serial device %s", l->device ? l->device : "");
        return -EINVAL;
    }
    if (modbus_connect(ctx) != 0) {
        int err = errno;
        modbus_free(ctx);
        snprintf(l->why, sizeof l->why, "open %s: %s", l->device, strerror(err));
        return err > 0 && err < MODBUS_ENOBASE ? -err : -EIO;
    }
    int fd = modbus_get_socket(ctx);
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) {
        int err = errno;
        modbus_close(ctx);
        modbus_free(ctx);
        return -err;
    }
    l->serial = ctx;
    l->fd = fd;
    return 0;
}

int smp_mb_link_open(smp_mb_link_t *l, int timeout_ms)
{
    smp_mb_link_close(l);
    l->why[0] = '\0';
    int rc = l->kind == SMP_MB_LINK_SERIAL ? open_serial(l) : open_tcp(l, timeout_ms);
    if (rc < 0) {
        return rc;
    }
    l->io_seen = false;
    l->drain_pending = l->drain_any = false;
    memset(l->drain_units, 0, sizeof l->drain_units);
    if (is_rtu(l)) {
        /* Whatever a device or a converter left in the line before we listened is not ours. */
        uint8_t junk[256];
        while (read_some(l, junk, sizeof junk) > 0) {
        }
    }
    return 0;
}

void smp_mb_link_close(smp_mb_link_t *l)
{
    if (l->serial != NULL) {
        modbus_close(l->serial);
        modbus_free(l->serial);
        l->serial = NULL;
    } else if (l->fd >= 0) {
        close(l->fd);
    }
    l->fd = -1;
}

/* ---- one exchange ------------------------------------------------------------------------ */

/* Records a framing or CRC problem: counted, explained, and the line drained before the next
 * request. */
static int garbled(smp_mb_link_t *l, const smp_mb_req_t *rq, smp_mb_verdict_t v, int timeout_ms)
{
    if (v == SMP_MB_BAD_CRC) {
        l->crc_errors++;
    } else {
        l->framing_errors++;
    }
    set_why(l, "%s", smp_mb_verdict_str(v));
    l->verdict = v;
    arm_drain(l, rq->unit, true, timeout_ms);
    return is_rtu(l) ? -EBADMSG : -EPROTO;
}

static int link_failed(smp_mb_link_t *l, int rc, const char *what)
{
    snprintf(l->why, sizeof l->why, "%s: %s", what, strerror(-rc));
    return rc;
}

/* Waits out the line's inter-frame gap since the last byte. */
static void keep_gap(smp_mb_link_t *l)
{
    if (!l->io_seen || l->gap_ns <= 0) {
        return;
    }
    int64_t left = l->gap_ns - (mono_ns() - ts_ns(&l->last_io));
    if (left > 0) {
        struct timespec ts = {(time_t)(left / 1000000000LL), (long)(left % 1000000000LL)};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
    }
}

static int transact_rtu(smp_mb_link_t *l, const smp_mb_req_t *rq, int timeout_ms, uint16_t *regs,
                        uint8_t *bits, int *exception)
{
    uint8_t pdu[SMP_MB_MAX_PDU], adu[SMP_MB_RTU_MAX_ADU];
    int n = smp_mb_pdu_encode(rq, pdu, sizeof pdu);
    n = n < 0 ? n : smp_mb_rtu_encode(rq->unit, pdu, (size_t)n, adu, sizeof adu);
    if (n < 0) {
        return link_failed(l, n, "request");
    }
    int rc = 0;
    if (must_drain(l, rq->unit)) {
        rc = drain(l);
    } else {
        rc = discard_buffered(l);
    }
    if (rc < 0) {
        return rc == -EIO && l->why[0] ? rc : link_failed(l, rc, "drain");
    }
    keep_gap(l);
    int64_t deadline = mono_ns() + (int64_t)timeout_ms * 1000000LL;
    rc = write_all(l, adu, (size_t)n, deadline);
    if (rc < 0) {
        return link_failed(l, rc, "send");
    }
    size_t got = 0;
    rc = read_exact(l, adu, SMP_MB_RTU_HEAD_LEN, deadline, &got);
    clock_gettime(CLOCK_MONOTONIC, &l->last_io);
    l->io_seen = true;
    if (rc == -ETIMEDOUT && got == 0) {
        arm_drain(l, rq->unit, false, timeout_ms);
        return link_failed(l, rc, "no reply");
    }
    if (rc == -ETIMEDOUT) {
        return garbled(l, rq, SMP_MB_BAD_LENGTH, timeout_ms);
    }
    if (rc < 0) {
        return link_failed(l, rc, "receive");
    }
    smp_mb_verdict_t v;
    size_t want = smp_mb_rtu_reply_len(rq, adu, &v);
    if (want == 0) {
        return garbled(l, rq, v, timeout_ms);
    }
    rc = read_exact(l, adu + SMP_MB_RTU_HEAD_LEN, want - SMP_MB_RTU_HEAD_LEN, deadline, &got);
    clock_gettime(CLOCK_MONOTONIC, &l->last_io);
    if (rc == -ETIMEDOUT) {
        return garbled(l, rq, SMP_MB_BAD_LENGTH, timeout_ms); /* a truncated frame */
    }
    if (rc < 0) {
        return link_failed(l, rc, "receive");
    }
    v = smp_mb_rtu_check(rq, adu, want, regs, bits, exception);
    if (v == SMP_MB_OK) {
        return 0;
    }
    return v == SMP_MB_EXCEPTION ? SMP_EDEVICE : garbled(l, rq, v, timeout_ms);
}

static int transact_tcp(smp_mb_link_t *l, const smp_mb_req_t *rq, int timeout_ms, uint16_t *regs,
                        uint8_t *bits, int *exception)
{
    uint8_t pdu[SMP_MB_MAX_PDU], adu[SMP_MB_TCP_MAX_ADU];
    uint16_t tid = ++l->tid;
    int n = smp_mb_pdu_encode(rq, pdu, sizeof pdu);
    n = n < 0 ? n : smp_mb_mbap_encode(tid, rq->unit, pdu, (size_t)n, adu, sizeof adu);
    if (n < 0) {
        return link_failed(l, n, "request");
    }
    int64_t deadline = mono_ns() + (int64_t)timeout_ms * 1000000LL;
    int rc = write_all(l, adu, (size_t)n, deadline);
    if (rc < 0) {
        return link_failed(l, rc, "send");
    }
    for (;;) {
        size_t got = 0, pdu_len = 0;
        uint16_t rtid;
        uint8_t unit;
        rc = read_exact(l, adu, SMP_MB_MBAP_HDR, deadline, &got);
        if (rc == -ETIMEDOUT && got == 0) {
            return link_failed(l, rc, "no reply");
        }
        if (rc == -ETIMEDOUT) {
            return garbled(l, rq, SMP_MB_BAD_LENGTH, timeout_ms);
        }
        if (rc < 0) {
            return link_failed(l, rc, "receive");
        }
        smp_mb_verdict_t v = smp_mb_mbap_header(adu, &rtid, &unit, &pdu_len);
        if (v == SMP_MB_BAD_LENGTH) {
            return garbled(l, rq, v, timeout_ms);
        }
        rc = read_exact(l, adu + SMP_MB_MBAP_HDR, pdu_len, deadline, &got);
        if (rc == -ETIMEDOUT) {
            return garbled(l, rq, SMP_MB_BAD_LENGTH, timeout_ms);
        }
        if (rc < 0) {
            return link_failed(l, rc, "receive");
        }
        if (v != SMP_MB_OK) {
            return garbled(l, rq, v, timeout_ms);
        }
        if (rtid != tid) {
            /* A reply to an earlier request that timed out: skip it, ours may follow. */
            continue;
        }
        if (unit != rq->unit) {
            return garbled(l, rq, SMP_MB_BAD_UNIT, timeout_ms);
        }
        v = smp_mb_pdu_check(rq, adu + SMP_MB_MBAP_HDR, pdu_len, regs, bits, exception);
        if (v == SMP_MB_OK) {
            return 0;
        }
        return v == SMP_MB_EXCEPTION ? SMP_EDEVICE : garbled(l, rq, v, timeout_ms);
    }
}

int smp_mb_link_transact(smp_mb_link_t *l, const smp_mb_req_t *rq, int timeout_ms, uint16_t *regs,
                         uint8_t *bits, int *exception)
{
    l->why[0] = '\0';
    if (l->fd < 0) {
        return link_failed(l, -ENOTCONN, "link");
    }
    if (is_rtu(l)) {
        return transact_rtu(l, rq, timeout_ms, regs, bits, exception);
    }
    return transact_tcp(l, rq, timeout_ms, regs, bits, exception);
}
