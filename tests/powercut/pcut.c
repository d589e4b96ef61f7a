/* Power-cut recorder: an LD_PRELOAD interposer that logs every write to a file under
 * $PCUT_DIR, with its data, and every fsync/fdatasync, truncate, rename and unlink, to the
 * binary log $PCUT_LOG. tests/powercut/test_powercut.py replays the log offline to rebuild
 * the files as a power cut at any point could have left them: what was synced, plus any
 * subset of the unsynced writes, torn ones included.
 *
 * Test-only code: it is never linked into simpul. Record layout (little endian, packed):
 *   u32 magic "PCUT", u32 type, u64 time_ns (CLOCK_REALTIME), u64 offset, u64 length,
 *   u32 path_len, u32 path2_len, path, path2, data (length bytes, writes only). */
/* Our open/pwrite/ftruncate must be the plain symbols: no redirection to the *64 names. */
#undef _FILE_OFFSET_BITS
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

enum { T_OPEN = 1, T_WRITE = 2, T_TRUNC = 3, T_SYNC = 4, T_RENAME = 5, T_UNLINK = 6 };
enum { MAX_FD = 65536 };

struct rec {
    uint32_t magic, type;
    uint64_t t_ns, off, len;
    uint32_t path_len, path2_len;
} __attribute__((packed));

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int log_fd = -1;
static const char *dir;
static size_t dir_len;
static char *paths[MAX_FD];
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int (*r_open)(const char *, int, ...);
static int (*r_openat)(int, const char *, int, ...);
static int (*r_close)(int);
static ssize_t (*r_write)(int, const void *, size_t);
static ssize_t (*r_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*r_pwrite64)(int, const void *, size_t, off64_t);
static ssize_t (*r_writev)(int, const struct iovec *, int);
static int (*r_ftruncate)(int, off_t);
static int (*r_ftruncate64)(int, off64_t);
static int (*r_fsync)(int);
static int (*r_fdatasync)(int);
static int (*r_rename)(const char *, const char *);
static int (*r_unlink)(const char *);

static void init(void)
{
    r_open = dlsym(RTLD_NEXT, "open");
    r_openat = dlsym(RTLD_NEXT, "openat");
    r_close = dlsym(RTLD_NEXT, "close");
    r_write = dlsym(RTLD_NEXT, "write");
    r_pwrite = dlsym(RTLD_NEXT, "pwrite");
    r_pwrite64 = dlsym(RTLD_NEXT, "pwrite64");
    r_writev = dlsym(RTLD_NEXT, "writev");
    r_ftruncate = dlsym(RTLD_NEXT, "ftruncate");
    r_ftruncate64 = dlsym(RTLD_NEXT, "ftruncate64");
    r_fsync = dlsym(RTLD_NEXT, "fsync");
    r_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    r_rename = dlsym(RTLD_NEXT, "rename");
    r_unlink = dlsym(RTLD_NEXT, "unlink");
    dir = getenv("PCUT_DIR");
    dir_len = dir != NULL ? strlen(dir) : 0;
    const char *log = getenv("PCUT_LOG");
    if (log != NULL && dir_len > 0) {
        log_fd = r_open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    }
}

static int tracked(const char *path)
{
    return log_fd >= 0 && path != NULL && strncmp(path, dir, dir_len) == 0;
}

static void put_all(const void *p, size_t n)
{
    const char *c = p;
    while (n > 0) {
        ssize_t w = r_write(log_fd, c, n);
        if (w <= 0) {
            if (w < 0 && errno == EINTR) {
                continue;
            }
            return;
        }
        c += w;
        n -= (size_t)w;
    }
}

/* One record, written whole under the lock (the store's writer and checkpointer threads both
 * write). The record goes out before the call it describes returns to the caller. */
static void emit(uint32_t type, const char *path, const char *path2, uint64_t off, const void *data,
                 uint64_t len)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct rec r = {0x54554350u,
                    type,
                    (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec,
                    off,
                    len,
                    (uint32_t)strlen(path),
                    path2 ? (uint32_t)strlen(path2) : 0};
    pthread_mutex_lock(&mu);
    put_all(&r, sizeof r);
    put_all(path, r.path_len);
    if (path2 != NULL) {
        put_all(path2, r.path2_len);
    }
    if (type == T_WRITE && len > 0) {
        put_all(data, (size_t)len);
    }
    pthread_mutex_unlock(&mu);
}

static const char *fd_path(int fd)
{
    return fd >= 0 && fd < MAX_FD ? paths[fd] : NULL;
}

static int opened(int fd, const char *path, int flags)
{
    pthread_once(&once, init);
    if (fd >= 0 && fd < MAX_FD && tracked(path)) {
        char *p = strdup(path);
        pthread_mutex_lock(&mu);
        free(paths[fd]);
        paths[fd] = p;
        pthread_mutex_unlock(&mu);
        emit(T_OPEN, path, NULL, (uint64_t)flags, NULL, 0);
        if (flags & O_TRUNC) {
            emit(T_TRUNC, path, NULL, 0, NULL, 0);
        }
    }
    return fd;
}

#define MODE_ARG(flags, mode)                                                                      \
    do {                                                                                           \
        if ((flags) & (O_CREAT | O_TMPFILE)) {                                                     \
            va_list ap;                                                                            \
            va_start(ap, flags);                                                                   \
            (mode) = (mode_t)va_arg(ap, int);                                                      \
            va_end(ap);                                                                            \
        }                                                                                          \
    } while (0)

int open(const char *path, int flags, ...)
{
    pthread_once(&once, init);
    mode_t mode = 0;
    MODE_ARG(flags, mode);
    return opened(r_open(path, flags, mode), path, flags);
}

int open64(const char *path, int flags, ...)
{
    pthread_once(&once, init);
    mode_t mode = 0;
    MODE_ARG(flags, mode);
    return opened(r_open(path, flags | O_LARGEFILE, mode), path, flags);
}

int openat(int dfd, const char *path, int flags, ...)
{
    pthread_once(&once, init);
    mode_t mode = 0;
    MODE_ARG(flags, mode);
    return opened(r_openat(dfd, path, flags, mode), path, flags);
}

int openat64(int dfd, const char *path, int flags, ...)
{
    pthread_once(&once, init);
    mode_t mode = 0;
    MODE_ARG(flags, mode);
    return opened(r_openat(dfd, path, flags | O_LARGEFILE, mode), path, flags);
}

int close(int fd)
{
    pthread_once(&once, init);
    if (fd >= 0 && fd < MAX_FD && paths[fd] != NULL) {
        pthread_mutex_lock(&mu);
        free(paths[fd]);
        paths[fd] = NULL;
        pthread_mutex_unlock(&mu);
    }
    return r_close(fd);
}

static void wrote(int fd, const void *buf, ssize_t n, off_t off)
{
    const char *p = fd_path(fd);
    if (p != NULL && n > 0) {
        emit(T_WRITE, p, NULL, (uint64_t)off, buf, (uint64_t)n);
    }
}

ssize_t write(int fd, const void *buf, size_t n)
{
    pthread_once(&once, init);
    off_t off = fd_path(fd) != NULL ? lseek(fd, 0, SEEK_CUR) : 0;
    ssize_t w = r_write(fd, buf, n);
    wrote(fd, buf, w, off);
    return w;
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off)
{
    pthread_once(&once, init);
    ssize_t w = r_pwrite(fd, buf, n, off);
    wrote(fd, buf, w, off);
    return w;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off)
{
    pthread_once(&once, init);
    ssize_t w = r_pwrite64(fd, buf, n, off);
    wrote(fd, buf, w, off);
    return w;
}

ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
    pthread_once(&once, init);
    off_t off = fd_path(fd) != NULL ? lseek(fd, 0, SEEK_CUR) : 0;
    ssize_t w = r_writev(fd, iov, cnt);
    for (int k = 0; k < cnt && w > 0 && fd_path(fd) != NULL; k++) {
        ssize_t part = (ssize_t)iov[k].iov_len < w ? (ssize_t)iov[k].iov_len : w;
        wrote(fd, iov[k].iov_base, part, off);
        off += part;
        w -= part;
    }
    return w;
}

static int truncated(int fd, off_t len, int rc)
{
    const char *p = fd_path(fd);
    if (p != NULL && rc == 0) {
        emit(T_TRUNC, p, NULL, (uint64_t)len, NULL, 0);
    }
    return rc;
}

int ftruncate(int fd, off_t len)
{
    pthread_once(&once, init);
    return truncated(fd, len, r_ftruncate(fd, len));
}

int ftruncate64(int fd, off64_t len)
{
    pthread_once(&once, init);
    return truncated(fd, len, r_ftruncate64(fd, len));
}

static int synced(int fd, int rc)
{
    const char *p = fd_path(fd);
    if (p != NULL && rc == 0) {
        emit(T_SYNC, p, NULL, 0, NULL, 0); /* after the sync returned: durable from here */
    }
    return rc;
}

int fsync(int fd)
{
    pthread_once(&once, init);
    return synced(fd, r_fsync(fd));
}

int fdatasync(int fd)
{
    pthread_once(&once, init);
    return synced(fd, r_fdatasync(fd));
}

int rename(const char *from, const char *to)
{
    pthread_once(&once, init);
    int rc = r_rename(from, to);
    if (rc == 0 && (tracked(from) || tracked(to))) {
        emit(T_RENAME, from, to, 0, NULL, 0);
    }
    return rc;
}

int unlink(const char *path)
{
    pthread_once(&once, init);
    int rc = r_unlink(path);
    if (rc == 0 && tracked(path)) {
        emit(T_UNLINK, path, NULL, 0, NULL, 0);
    }
    return rc;
}
