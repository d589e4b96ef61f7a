#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

int smp__log_level = SMP_LOG_INFO;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

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

void smp__vlog(int level, const char *scope, const char *fmt, va_list ap)
{
    char line[1024];
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
    /* One write per line keeps lines from different threads whole. */
    ssize_t w = write(STDERR_FILENO, line, (size_t)n);
    (void)w;
}

void smp__log(int level, const char *scope, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    smp__vlog(level, scope, fmt, ap);
    va_end(ap);
}
