/* Logging: one line per event to stderr (journald picks it up under systemd).
 * Macros test the level before evaluating their arguments. Thread-safe: a line is written whole
 * (one write(2)). Between smp_log_start and smp_log_stop lines go through a bounded buffer to a
 * writer thread, so a stalled stderr never blocks the caller: lines that do not fit are dropped
 * and counted (smp_log_counters), and the writer logs how many once it catches up. */
#ifndef SMP_LOG_H
#define SMP_LOG_H

#include <stdbool.h>
#include <stdint.h>

#include <simpul/plugin.h> /* SMP_LOG_ERROR .. SMP_LOG_DEBUG */

extern int smp__log_level;

/* Parses "error" | "warn" | "info" | "debug"; returns the level or -1. */
int smp_log_level_parse(const char *s);
void smp_log_set_level(int level);
/* Starts the writer thread. Returns 0 or a negative errno (lines are then written directly). */
int smp_log_start(void);
/* Waits up to timeout_ms for the buffered lines to be written, then stops the writer (a writer
 * stuck on a stalled stderr is left behind: call this just before the process ends). */
void smp_log_stop(unsigned timeout_ms);
/* Lines logged and lines dropped since the start of the process. Any thread. */
void smp_log_counters(uint64_t *lines, uint64_t *dropped);
/* `scope` may be NULL; otherwise it is printed as "[scope] " before the message. */
void smp__log(int level, const char *scope, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
void smp__vlog(int level, const char *scope, const char *fmt, va_list ap);

/* An episode of repeated failures (collectd's "complain once" idea): the first failure is
 * logged, the rest only counted, and the recovery is one line with the count. Not thread-safe:
 * one per owner. Zero-initialised = no episode open. */
typedef struct smp_episode {
    uint64_t failures; /* in the open episode; 0 when none is open */
    uint64_t since_ms; /* when the episode began */
} smp_episode_t;
/* Counts a failure; true for the first of an episode (the one to log). */
bool smp_episode_fail(smp_episode_t *ep, uint64_t now_ms);
/* Ends the episode; returns its failure count (0 when none was open) and its length. */
uint64_t smp_episode_end(smp_episode_t *ep, uint64_t now_ms, uint64_t *duration_ms);

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
