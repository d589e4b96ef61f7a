/* city-load: the load generator of the city bench (tests/bench/city.py).
 *
 * One thread serves every simulated device: K Modbus TCP endpoints on 127.0.0.1 (ephemeral
 * ports, written one per line to --port-file once all listen), each with U unit ids of R
 * holding registers (function 3; function 4 reads the same registers). Every 100 ms a random
 * 1/100 of all registers is incremented, so 10 % of the registers change per second (the
 * rate is --change-pct per second).
 *
 * It is deliberately not simpul-sim: the bench needs thousands of connections and plain
 * register blocks, where simpul-sim models pumps and lights on one port. Framing is done here
 * (read requests only), so one slow client never stalls the others and the generator's own
 * cost per request stays small next to the gateways it feeds.
 *
 *   city-load --endpoints K --units U --regs R [--change-pct P] --port-file FILE
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TICK_NS   (100 * 1000000LL)
#define MBAP_LEN  7
#define BUF_LEN   512
#define MAX_READ  125
#define MAX_UNITS 247

typedef struct endpoint {
    int fd;
    uint16_t *regs; /* units * nregs, unit u (1-based) at (u - 1) * nregs */
} endpoint_t;

typedef struct client {
    int fd;
    endpoint_t *ep;
    size_t len;
    uint8_t buf[BUF_LEN];
} client_t;

static volatile sig_atomic_t g_stop;
static int g_units, g_nregs;
static uint64_t g_rng = 0x9e3779b97f4a7c15u;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

static uint64_t rng_next(void)
{
    /* xorshift64*: cheap and good enough to pick registers. */
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return g_rng * 0x2545f4914f6cdd1dULL;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int listen_on_free_port(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -1;
    }
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t alen = sizeof a;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 512) != 0 ||
        getsockname(fd, (struct sockaddr *)&a, &alen) != 0) {
        close(fd);
        return -1;
    }
    *port = ntohs(a.sin_port);
    return fd;
}

static void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

static unsigned get16(const uint8_t *p)
{
    return (unsigned)p[0] << 8 | p[1];
}

/* Answers one complete request frame; returns -1 when the client must be dropped. */
static int answer(client_t *c, const uint8_t *f, size_t len)
{
    uint8_t out[MBAP_LEN + 2 + 2 * MAX_READ];
    unsigned unit = f[6], fc = f[7];
    memcpy(out, f, 4); /* transaction and protocol id */
    out[6] = (uint8_t)unit;
    size_t n;
    if ((fc == 3 || fc == 4) && len == MBAP_LEN + 5) {
        unsigned addr = get16(f + 8), qty = get16(f + 10);
        if (qty == 0 || qty > MAX_READ) {
            out[7] = (uint8_t)(fc | 0x80);
            out[8] = 3;
            n = 9;
        } else if (unit < 1 || unit > (unsigned)g_units || addr + qty > (unsigned)g_nregs) {
            out[7] = (uint8_t)(fc | 0x80);
            out[8] = 2;
            n = 9;
        } else {
            const uint16_t *r = c->ep->regs + (size_t)(unit - 1) * (size_t)g_nregs + addr;
            out[7] = (uint8_t)fc;
            out[8] = (uint8_t)(2 * qty);
            for (unsigned k = 0; k < qty; k++) {
                put16(out + 9 + 2 * k, r[k]);
            }
            n = 9 + 2 * qty;
        }
    } else {
        out[7] = (uint8_t)(fc | 0x80);
        out[8] = 1; /* illegal function */
        n = 9;
    }
    put16(out + 4, (unsigned)(n - 6));
    return send(c->fd, out, n, MSG_NOSIGNAL) == (ssize_t)n ? 0 : -1;
}

static int client_read(client_t *c)
{
    ssize_t r = recv(c->fd, c->buf + c->len, BUF_LEN - c->len, 0);
    if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
        return -1;
    }
    if (r < 0) {
        return 0;
    }
    c->len += (size_t)r;
    size_t off = 0;
    while (c->len - off >= MBAP_LEN) {
        size_t flen = 6 + get16(c->buf + off + 4);
        if (flen < MBAP_LEN + 1 || flen > 260) {
            return -1;
        }
        if (c->len - off < flen) {
            break;
        }
        if (answer(c, c->buf + off, flen) != 0) {
            return -1;
        }
        off += flen;
    }
    memmove(c->buf, c->buf + off, c->len - off);
    c->len -= off;
    return 0;
}

static void change_some(endpoint_t *eps, int k, double pct_per_s)
{
    size_t per_ep = (size_t)g_units * (size_t)g_nregs;
    size_t total = per_ep * (size_t)k;
    size_t n = (size_t)((double)total * pct_per_s / 100.0 / 10.0 + 0.5);
    for (size_t i = 0; i < n; i++) {
        size_t x = (size_t)(rng_next() % total);
        eps[x / per_ep].regs[x % per_ep]++;
    }
}

int main(int argc, char **argv)
{
    int k = 1;
    double pct = 10.0;
    const char *port_file = NULL;
    static const struct option opts[] = {
        {"endpoints", required_argument, NULL, 'k'}, {"units", required_argument, NULL, 'u'},
        {"regs", required_argument, NULL, 'r'},      {"change-pct", required_argument, NULL, 'c'},
        {"port-file", required_argument, NULL, 'p'}, {NULL, 0, NULL, 0},
    };
    g_units = 1;
    g_nregs = 50;
    int o;
    while ((o = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (o) {
        case 'k':
            k = atoi(optarg);
            break;
        case 'u':
            g_units = atoi(optarg);
            break;
        case 'r':
            g_nregs = atoi(optarg);
            break;
        case 'c':
            pct = atof(optarg);
            break;
        case 'p':
            port_file = optarg;
            break;
        default:
            fprintf(stderr, "usage: city-load --endpoints K --units U --regs R "
                            "[--change-pct P] --port-file FILE\n");
            return 2;
        }
    }
    if (k < 1 || g_units < 1 || g_units > MAX_UNITS || g_nregs < 1 || g_nregs > 65536 ||
        port_file == NULL) {
        fprintf(stderr, "city-load: bad arguments (see the comment at the top of the source)\n");
        return 2;
    }
    /* Thousands of sockets: raise the descriptor limit to its hard maximum. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    int ep_fd = epoll_create1(EPOLL_CLOEXEC);
    endpoint_t *eps = calloc((size_t)k, sizeof *eps);
    /* Written under a temporary name and renamed: a reader never sees half the list. */
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", port_file);
    FILE *pf = fopen(tmp, "w");
    if (ep_fd < 0 || eps == NULL || pf == NULL) {
        perror("city-load");
        return 1;
    }
    for (int i = 0; i < k; i++) {
        int port;
        eps[i].fd = listen_on_free_port(&port);
        eps[i].regs = calloc((size_t)g_units * (size_t)g_nregs, sizeof(uint16_t));
        if (eps[i].fd < 0 || eps[i].regs == NULL) {
            perror("city-load: listen");
            return 1;
        }
        for (size_t x = 0; x < (size_t)g_units * (size_t)g_nregs; x++) {
            eps[i].regs[x] = (uint16_t)rng_next();
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &eps[i]};
        epoll_ctl(ep_fd, EPOLL_CTL_ADD, eps[i].fd, &ev);
        fprintf(pf, "%d\n", port);
    }
    fclose(pf);
    rename(tmp, port_file);

    int64_t next_tick = now_ns() + TICK_NS;
    struct epoll_event evs[256];
    while (!g_stop) {
        int64_t wait_ms = (next_tick - now_ns()) / 1000000LL;
        int n = epoll_wait(ep_fd, evs, 256, wait_ms < 0 ? 0 : (int)wait_ms + 1);
        for (int i = 0; i < n; i++) {
            /* Listening sockets and clients share the epoll set, told apart by address. */
            void *p = evs[i].data.ptr;
            if (p >= (void *)eps && p < (void *)(eps + k)) {
                endpoint_t *ep = p;
                int fd;
                while ((fd = accept4(ep->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    client_t *c = calloc(1, sizeof *c);
                    if (c == NULL) {
                        close(fd);
                        continue;
                    }
                    int one = 1;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c->fd = fd;
                    c->ep = ep;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep_fd, EPOLL_CTL_ADD, fd, &ev);
                }
            } else {
                client_t *c = p;
                if (client_read(c) != 0) {
                    epoll_ctl(ep_fd, EPOLL_CTL_DEL, c->fd, NULL);
                    close(c->fd);
                    free(c);
                }
            }
        }
        int64_t t = now_ns();
        if (t >= next_tick) {
            change_some(eps, k, pct);
            next_tick += TICK_NS;
            if (next_tick < t) {
                next_tick = t + TICK_NS; /* stalled: do not catch up in a burst */
            }
        }
    }
    return 0;
}
