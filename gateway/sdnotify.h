/* sdnotify: the service manager's notification protocol (sd_notify(3)), without libsystemd.
 *
 * systemd passes the address of a datagram socket in $NOTIFY_SOCKET (a path, or an abstract
 * name written "@name"); the service sends newline-separated "KEY=VALUE" lines to it: READY=1,
 * RELOADING=1, STOPPING=1, WATCHDOG=1, STATUS=... Without $NOTIFY_SOCKET every call is a no-op,
 * so simpul runs the same outside systemd. Sends never block (MSG_DONTWAIT): a service manager
 * that does not read costs a lost notification, not a stalled loop. Thread-safe (no state). */
#ifndef SMP_SDNOTIFY_H
#define SMP_SDNOTIFY_H

#include <stdbool.h>
#include <stdint.h>

/* Sends `state` (borrowed). Returns 1 when sent, 0 when there is no $NOTIFY_SOCKET, or a
 * negative errno (bad address, socket or send failure). */
int smp_sd_notify(const char *state);
/* printf-style wrapper of smp_sd_notify; lines longer than 1 KiB are cut. */
int smp_sd_notifyf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* The watchdog period the service manager asks for, in microseconds: $WATCHDOG_USEC when set,
 * valid and meant for this process ($WATCHDOG_PID absent or equal to getpid()); else 0. */
uint64_t smp_sd_watchdog_usec(void);
/* CLOCK_MONOTONIC now, in microseconds (what MONOTONIC_USEC= carries with RELOADING=1). */
uint64_t smp_sd_monotonic_usec(void);

#endif
