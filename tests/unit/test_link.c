/* Unit tests of the driver's link (protocols/modbus/link.c) over a socket pair: the test plays
 * the device on the other end, writing replies (or nothing) before or after the request. */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include <simpul/plugin.h>

#include "link.h"

typedef struct pair {
    smp_mb_link_t l;
    int dev; /* the device's end */
} pair_t;

static int setup(void **state, smp_mb_link_kind_t kind)
{
    static pair_t p;
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0, sv), 0);
    smp_mb_link_init(&p.l, kind);
    p.l.fd = sv[0];
    p.dev = sv[1];
    *state = &p;
    return 0;
}

static int setup_rtu(void **state)
{
    return setup(state, SMP_MB_LINK_RTU_TCP);
}

static int setup_tcp(void **state)
{
    return setup(state, SMP_MB_LINK_TCP);
}

static int teardown(void **state)
{
    pair_t *p = *state;
    smp_mb_link_close(&p->l);
    close(p->dev);
    return 0;
}

static const smp_mb_req_t read1 = {.unit = 1, .fc = 3, .address = 10, .count = 1};

/* An RTU reply from unit to read1 holding v. */
static size_t rtu_reply(uint8_t unit, uint16_t v, uint8_t *out)
{
    const uint8_t pdu[] = {3, 2, (uint8_t)(v >> 8), (uint8_t)v};
    return (size_t)smp_mb_rtu_encode(unit, pdu, sizeof pdu, out, 16);
}

static void drain_request(int fd)
{
    uint8_t junk[300];
    while (read(fd, junk, sizeof junk) > 0) {
    }
}

/* A device that answers the next request it reads with buf[0..len), from its own thread. */
typedef struct answerer {
    pthread_t th;
    int fd;
    uint8_t buf[32];
    size_t len;
    uint8_t late[16]; /* sent 10 ms after the start, before waiting for the request */
    size_t late_len;
} answerer_t;

static void *answer_main(void *arg)
{
    answerer_t *a = arg;
    if (a->late_len > 0) {
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
        (void)!write(a->fd, a->late, a->late_len);
    }
    struct pollfd pfd = {.fd = a->fd, .events = POLLIN};
    if (poll(&pfd, 1, 2000) == 1) {
        uint8_t req[64];
        (void)!read(a->fd, req, sizeof req);
        (void)!write(a->fd, a->buf, a->len);
    }
    return NULL;
}

static void answer_with(answerer_t *a, int fd, const uint8_t *buf, size_t len)
{
    a->fd = fd;
    a->late_len = 0;
    memcpy(a->buf, buf, len);
    a->len = len;
    assert_int_equal(pthread_create(&a->th, NULL, answer_main, a), 0);
}

/* Answers the next request with unit's reply holding v. */
static void answer_next(answerer_t *a, int fd, uint8_t unit, uint16_t v)
{
    uint8_t r[16];
    answer_with(a, fd, r, rtu_reply(unit, v, r));
}

static void test_rtu_reply_taken(void **state)
{
    pair_t *p = *state;
    /* Bytes on the line before the request are not its answer. */
    assert_int_equal(write(p->dev, "\x01\x03", 2), 2);
    answerer_t a;
    answer_next(&a, p->dev, 1, 1450);
    uint16_t regs[1];
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), 0);
    pthread_join(a.th, NULL);
    assert_int_equal(regs[0], 1450);
}

static void test_rtu_crc_error_counted_and_drained(void **state)
{
    pair_t *p = *state;
    uint8_t r[16];
    size_t n = rtu_reply(1, 1450, r);
    r[n - 1] ^= 0xFF;
    answerer_t a;
    answer_with(&a, p->dev, r, n);
    uint16_t regs[1];
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), -EBADMSG);
    pthread_join(a.th, NULL);
    assert_int_equal(p->l.crc_errors, 1);
    assert_int_equal(p->l.verdict, SMP_MB_BAD_CRC);
    assert_true(p->l.drain_pending);
    /* The rest of a garbled frame, still on the line: drained before the next request. */
    assert_int_equal(write(p->dev, "\x01\x03\x02", 3), 3);
    drain_request(p->dev);
    answer_next(&a, p->dev, 1, 7);
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), 0);
    pthread_join(a.th, NULL);
    assert_int_equal(regs[0], 7);
    assert_false(p->l.drain_pending);
}

static void test_rtu_late_reply_drained(void **state)
{
    pair_t *p = *state;
    uint16_t regs[1];
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 60, regs, NULL, NULL), -ETIMEDOUT);
    drain_request(p->dev);
    /* The late reply to the request that timed out: same unit, function and count. */
    uint8_t r[16];
    size_t n = rtu_reply(1, 1450, r);
    assert_int_equal(write(p->dev, r, n), (ssize_t)n);
    /* The next request gets its own answer (5), never the late 1450. */
    answerer_t a;
    answer_next(&a, p->dev, 1, 5);
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), 0);
    pthread_join(a.th, NULL);
    assert_int_equal(regs[0], 5);
    assert_int_equal(p->l.crc_errors + p->l.framing_errors, 0);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void test_rtu_timeout_costs_other_units_nothing(void **state)
{
    pair_t *p = *state;
    uint16_t regs[1];
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 400, regs, NULL, NULL), -ETIMEDOUT);
    drain_request(p->dev);
    /* Unit 2 is asked at once: no quiet gap (200 ms here) is waited for it. */
    answerer_t a;
    answer_next(&a, p->dev, 2, 9);
    const smp_mb_req_t read2 = {.unit = 2, .fc = 3, .address = 10, .count = 1};
    int64_t t0 = now_ms();
    assert_int_equal(smp_mb_link_transact(&p->l, &read2, 400, regs, NULL, NULL), 0);
    pthread_join(a.th, NULL);
    assert_true(now_ms() - t0 < 150);
    assert_int_equal(regs[0], 9);
    /* Unit 1's late reply turning up during unit 2's request is refused, not taken. */
    answer_next(&a, p->dev, 1, 1450);
    assert_int_equal(smp_mb_link_transact(&p->l, &read2, 500, regs, NULL, NULL), -EBADMSG);
    pthread_join(a.th, NULL);
    assert_int_equal(p->l.verdict, SMP_MB_BAD_UNIT);
}

static void test_rtu_two_units_time_out(void **state)
{
    pair_t *p = *state;
    uint16_t regs[1];
    const smp_mb_req_t read2 = {.unit = 2, .fc = 3, .address = 10, .count = 1};
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 400, regs, NULL, NULL), -ETIMEDOUT);
    assert_int_equal(smp_mb_link_transact(&p->l, &read2, 400, regs, NULL, NULL), -ETIMEDOUT);
    drain_request(p->dev);
    /* Unit 1's late reply comes after unit 2 timed out too: unit 1's next request still waits
     * for the line to go quiet, so the late reply cannot pass for its answer. The quiet gap
     * is half the timeout (200 ms): the answering thread, 10 ms in, has ample time to send
     * the late reply inside it even on a loaded machine (with 60 ms timeouts, 20 ms late
     * was too late). */
    answerer_t a = {.fd = p->dev};
    a.late_len = rtu_reply(1, 1450, a.late);
    a.len = rtu_reply(1, 5, a.buf);
    assert_int_equal(pthread_create(&a.th, NULL, answer_main, &a), 0);
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), 0);
    pthread_join(a.th, NULL);
    assert_int_equal(regs[0], 5);
}

static void test_rtu_frame_gap_kept(void **state)
{
    pair_t *p = *state;
    p->l.gap_ns = 80 * 1000000L; /* frame_gap_ms 80 */
    uint16_t regs[1];
    answerer_t a;
    answer_next(&a, p->dev, 1, 1);
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), 0);
    pthread_join(a.th, NULL);
    int64_t t0 = now_ms();
    answer_next(&a, p->dev, 1, 2);
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), 0);
    pthread_join(a.th, NULL);
    assert_true(now_ms() - t0 >= 75);
    assert_int_equal(regs[0], 2);
}

static void test_rtu_wrong_unit_is_framing_error(void **state)
{
    pair_t *p = *state;
    answerer_t a;
    answer_next(&a, p->dev, 2, 1450);
    uint16_t regs[1];
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, regs, NULL, NULL), -EBADMSG);
    pthread_join(a.th, NULL);
    assert_int_equal(p->l.framing_errors, 1);
    assert_int_equal(p->l.verdict, SMP_MB_BAD_UNIT);
}

static void test_rtu_exception(void **state)
{
    pair_t *p = *state;
    const uint8_t pdu[] = {0x83, 2};
    uint8_t r[8];
    int n = smp_mb_rtu_encode(1, pdu, sizeof pdu, r, sizeof r);
    answerer_t a;
    answer_with(&a, p->dev, r, (size_t)n);
    int ex = 0;
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 500, NULL, NULL, &ex), SMP_EDEVICE);
    pthread_join(a.th, NULL);
    assert_int_equal(ex, 2);
}

static void test_rtu_peer_closed(void **state)
{
    pair_t *p = *state;
    close(p->dev);
    p->dev = -1;
    uint16_t regs[1];
    int rc = smp_mb_link_transact(&p->l, &read1, 100, regs, NULL, NULL);
    assert_true(rc == -ECONNRESET || rc == -EPIPE);
}

/* An MBAP reply to read1 with transaction id tid, protocol id proto, unit id unit. */
static size_t mbap_reply(uint16_t tid, uint16_t proto, uint8_t unit, uint16_t v, uint8_t *out)
{
    const uint8_t pdu[] = {3, 2, (uint8_t)(v >> 8), (uint8_t)v};
    int n = smp_mb_mbap_encode(tid, unit, pdu, sizeof pdu, out, 32);
    out[2] = (uint8_t)(proto >> 8);
    out[3] = (uint8_t)proto;
    return (size_t)n;
}

static void test_tcp_stale_transaction_skipped(void **state)
{
    pair_t *p = *state;
    uint8_t r[64];
    /* A late reply to transaction 0, then the answer to transaction 1. */
    size_t n = mbap_reply(0, 0, 1, 4321, r);
    n += mbap_reply(1, 0, 1, 1234, r + n);
    assert_int_equal(write(p->dev, r, n), (ssize_t)n);
    uint16_t regs[1];
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 100, regs, NULL, NULL), 0);
    assert_int_equal(regs[0], 1234);
}

static void test_tcp_protocol_id_refused(void **state)
{
    pair_t *p = *state;
    uint8_t r[32];
    size_t n = mbap_reply(1, 7, 1, 4321, r);
    assert_int_equal(write(p->dev, r, n), (ssize_t)n);
    uint16_t regs[1] = {0};
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 100, regs, NULL, NULL), -EPROTO);
    assert_int_equal(p->l.verdict, SMP_MB_BAD_PROTOCOL);
    assert_int_equal(p->l.framing_errors, 1);
    assert_int_equal(regs[0], 0);
}

static void test_tcp_wrong_unit_refused(void **state)
{
    pair_t *p = *state;
    uint8_t r[32];
    size_t n = mbap_reply(1, 0, 9, 4321, r);
    assert_int_equal(write(p->dev, r, n), (ssize_t)n);
    uint16_t regs[1] = {0};
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 100, regs, NULL, NULL), -EPROTO);
    assert_int_equal(p->l.verdict, SMP_MB_BAD_UNIT);
    assert_int_equal(regs[0], 0);
}

static void test_tcp_truncated_reply(void **state)
{
    pair_t *p = *state;
    uint8_t r[32];
    size_t n = mbap_reply(1, 0, 1, 4321, r);
    assert_int_equal(write(p->dev, r, n - 1), (ssize_t)(n - 1));
    uint16_t regs[1];
    assert_int_equal(smp_mb_link_transact(&p->l, &read1, 50, regs, NULL, NULL), -EPROTO);
    assert_int_equal(p->l.verdict, SMP_MB_BAD_LENGTH);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_rtu_reply_taken, setup_rtu, teardown),
        cmocka_unit_test_setup_teardown(test_rtu_crc_error_counted_and_drained, setup_rtu,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_rtu_late_reply_drained, setup_rtu, teardown),
        cmocka_unit_test_setup_teardown(test_rtu_timeout_costs_other_units_nothing, setup_rtu,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_rtu_two_units_time_out, setup_rtu, teardown),
        cmocka_unit_test_setup_teardown(test_rtu_frame_gap_kept, setup_rtu, teardown),
        cmocka_unit_test_setup_teardown(test_rtu_wrong_unit_is_framing_error, setup_rtu, teardown),
        cmocka_unit_test_setup_teardown(test_rtu_exception, setup_rtu, teardown),
        cmocka_unit_test_setup_teardown(test_rtu_peer_closed, setup_rtu, teardown),
        cmocka_unit_test_setup_teardown(test_tcp_stale_transaction_skipped, setup_tcp, teardown),
        cmocka_unit_test_setup_teardown(test_tcp_protocol_id_refused, setup_tcp, teardown),
        cmocka_unit_test_setup_teardown(test_tcp_wrong_unit_refused, setup_tcp, teardown),
        cmocka_unit_test_setup_teardown(test_tcp_truncated_reply, setup_tcp, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
