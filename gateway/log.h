/* Logging: one line per event to stderr (journald picks it up under systemd).
 * Macros test the level before evaluating their arguments. Thread-safe (one write(2) a line). */
#ifndef SMP_LOG_H
#define SMP_LOG_H

#include <simpul/plugin.h> /* SMP_LOG_ERROR .. SMP_LOG_DEBUG */

extern int smp__log_level;

/* Parses "error" | "warn" | "info" | "debug"; returns the level or -1. */
int smp_log_level_parse(const char *s);
void smp_log_set_level(int level);
/* `scope` may be NULL; otherwise it is printed as "[scope] " before the message. */
void smp__log(int level, const char *scope, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void smp__vlog(int level, const char *scope, const char *fmt, va_list ap);

#define SMP_LOG(level, scope, ...)                                                                 \
    do {                                                                                           \
        if ((level) <= smp__log_level) {                                                           \
            smp__log((level), (scope), __VA_ARGS__);                                               \
        }                                                                                          \
    } while (0)
#define LOG_ERR(scope, ...)   SMP_LOG(SMP_LOG_ERROR, scope, __VA_ARGS__)
#define LOG_WARN(scope, ...)  SMP_LOG(SMP_LOG_WARN, scope, __VA_ARGS__)
#define LOG_INFO(scope, ...)  SMP_LOG(SMP_LOG_INFO, scope, __VA_ARGS__)
#define LOG_DEBUG(scope, ...) SMP_LOG(SMP_LOG_DEBUG, scope, __VA_ARGS__)

#endif
