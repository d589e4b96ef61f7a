#include "sdnotify.h"

#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

int smp_sd_notify(const char *state)
{
    const char *addr = getenv("NOTIFY_SOCKET");
    if (addr == NULL || addr[0] == '\0') {
        return 0;
    }
    struct sockaddr_un sun;
    memset(&sun, 0, sizeof sun);
    sun.sun_family = AF_UNIX;
    size_t n = strlen(addr);
    /* A path must be absolute; "@name" is an abstract socket: a leading NUL, not terminated. */
    if ((addr[0] != '/' && addr[0] != '@') || n >= sizeof sun.sun_path) {
        return -EINVAL;
    }
    memcpy(sun.sun_path, addr, n);
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n);
    if (addr[0] == '@') {
        sun.sun_path[0] = '\0';
    } else {
        len++; /* the terminating NUL */
    }
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return -errno;
    }
    struct iovec iov = {.iov_base = (void *)state, .iov_len = strlen(state)};
    struct msghdr mh = {.msg_name = &sun, .msg_namelen = len, .msg_iov = &iov, .msg_iovlen = 1};
    ssize_t w = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
    int rc = w < 0 ? -errno : 1;
    close(fd);
    return rc;
}

int smp_sd_notifyf(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return smp_sd_notify(buf);
}

uint64_t smp_sd_watchdog_usec(void)
{
    const char *pid = getenv("WATCHDOG_PID");
    if (pid != NULL && pid[0] != '\0') {
        char *end = NULL;
        errno = 0;
        unsigned long long p = strtoull(pid, &end, 10);
        if (errno != 0 || *end != '\0' || p != (unsigned long long)getpid()) {
            return 0; /* meant for another process (a parent that exec'd us, say) */
        }
    }
    const char *us = getenv("WATCHDOG_USEC");
    if (us == NULL || us[0] == '\0') {
        return 0;
    }
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(us, &end, 10);
    if (errno != 0 || *end != '\0' || us[0] == '-') {
        return 0;
    }
    return (uint64_t)v;
}

uint64_t smp_sd_monotonic_usec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}
