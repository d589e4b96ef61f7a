/* The driver's own Modbus links: the socket or tty of one connection, and one request/reply
 * exchange on it with the strict checks of frame.h.
 *
 * Three kinds: Modbus TCP (MBAP framing over a TCP socket), RTU over TCP (RTU frames, CRC
 * included, over a TCP socket to a transparent serial server) and RTU on a serial line
 * (libmodbus only opens and configures the tty; the bytes are ours). All I/O is non-blocking
 * with poll() deadlines, on the connection's worker thread; nothing here is thread-safe.
 *
 * An RTU line has no transaction ids, so a reply that comes after its request timed out would
 * look like the answer to the next one to the same unit. After a timeout the link drains the
 * line before its next request to that unit (after a garbled reply, before any request): it
 * discards whatever arrives until the line has been quiet for half the timeout of the request
 * that failed (at least the inter-frame gap), counted from the failure or the last late byte.
 * Requests to other units only drop what is already buffered: a late reply that still comes
 * during theirs carries the wrong unit id and is refused.
 */
#ifndef SMP_MB_LINK_H
#define SMP_MB_LINK_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "frame.h"

typedef enum smp_mb_link_kind {
    SMP_MB_LINK_TCP = 0,
    SMP_MB_LINK_SERIAL,
    SMP_MB_LINK_RTU_TCP,
} smp_mb_link_kind_t;

typedef struct smp_mb_link {
    smp_mb_link_kind_t kind;
    /* where: host/service for the TCP kinds, device and line settings for serial (borrowed) */
    const char *host;
    char service[16];
    const char *device;
    int baud, data_bits, stop_bits;
    char parity;
    long gap_ns; /* least silence before a request: t3.5 on serial, frame_gap_ms on rtu_tcp */

    int fd;       /* -1 when closed */
    void *serial; /* serial: the libmodbus context that owns fd */
    uint16_t tid; /* TCP: transaction id of the last request */
    bool io_seen; /* last_io is valid */
    struct timespec last_io;
    bool drain_pending;
    bool drain_any;          /* every next request drains (after a garbled reply) */
    uint32_t drain_units[8]; /* otherwise a request to one of these units (timed out) */
    int64_t drain_since_ns;  /* the last failure, or the last late byte seen since */
    int drain_quiet_ms;
    /* cumulative, for the connection's metrics */
    uint64_t crc_errors, framing_errors;
    smp_mb_verdict_t verdict; /* why the last garbled reply was refused */
    char why[96];             /* text of the last failure */
} smp_mb_link_t;

/* Prepares a closed link. host, device are borrowed and must outlive the link. */
void smp_mb_link_init(smp_mb_link_t *l, smp_mb_link_kind_t kind);

/* Connects (TCP kinds: resolve and connect, bounded by timeout_ms) or opens the tty. Returns 0,
 * -EHOSTUNREACH (name does not resolve), -ECONNREFUSED, -ETIMEDOUT, -ENOENT, or another
 * negative errno; l->why says what failed. */
int smp_mb_link_open(smp_mb_link_t *l, int timeout_ms);

/* Closes the link; a no-op when closed. */
void smp_mb_link_close(smp_mb_link_t *l);

/* Sends rq and waits up to timeout_ms for its reply. Returns:
 *   0            the reply answers rq; regs/bits are filled for reads (may be NULL otherwise);
 *   SMP_EDEVICE  the device answered with exception *exception;
 *   -ETIMEDOUT   no reply (RTU: the line is drained before the next request);
 *   -EBADMSG     RTU: the reply was garbled (CRC or framing, counted); the line is drained,
 *                the link is still good;
 *   -EPROTO      TCP: the reply breaks the framing (counted); the stream cannot be trusted;
 *   another negative errno for a link that failed (-ECONNRESET, -EIO, -EPIPE, -ENOTCONN).
 * On failure l->why holds the text. */
int smp_mb_link_transact(smp_mb_link_t *l, const smp_mb_req_t *rq, int timeout_ms, uint16_t *regs,
                         uint8_t *bits, int *exception);

#endif
