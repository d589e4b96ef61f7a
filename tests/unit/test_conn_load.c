/* Unit tests of the connection load (gateway/conn_load.c): utilisation and requests per second
 * in the metrics, and one over-subscription episode per overload, with its recovery. Time is
 * the loop time the engine passes in, so the tests drive it by hand. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "conn_load.c"

static void feed(smp_conn_load_t *l, uint64_t *now, uint64_t until, uint64_t busy_us,
                 uint64_t step_ms, bool overrun)
{
    while (*now < until) {
        *now += step_ms;
        smp_conn_sample_t s = {.busy_us = busy_us, .requests = 1};
        if (overrun) {
            smp__conn_load_overrun(l);
        }
        smp__conn_load_add(l, "rtu_tcp:10.0.0.40:4001", &s, *now);
    }
}

static void test_over_subscription_episode(void **state)
{
    (void)state;
    smp_conn_load_t l;
    uint64_t now = 1000;
    smp__conn_load_init(&l, now);
    /* Jobs of 60 ms every 60 ms with a skipped poll each time: busy 100 %, demand 200 %. */
    feed(&l, &now, 7000, 60000, 60, true);
    assert_true(l.over);
    /* Still over: no second warning, the episode goes on. */
    feed(&l, &now, 13000, 60000, 60, true);
    assert_true(l.over);
    /* Light load without skipped polls: the episode ends once a whole window is clean. */
    feed(&l, &now, 25000, 1000, 100, false);
    assert_false(l.over);
}

static void test_busy_but_keeping_up_is_not_over(void **state)
{
    (void)state;
    smp_conn_load_t l;
    uint64_t now = 0;
    smp__conn_load_init(&l, now);
    /* 90 % busy, never a poll skipped: not an episode. */
    feed(&l, &now, 12000, 90000, 100, false);
    assert_false(l.over);
    /* One slow reply's skipped poll on a lightly loaded bus is not one either. */
    smp__conn_load_overrun(&l);
    feed(&l, &now, 18000, 1000, 100, false);
    assert_false(l.over);
}

static void test_json(void **state)
{
    (void)state;
    smp_conn_load_t l;
    uint64_t now = 0;
    smp__conn_load_init(&l, now);
    feed(&l, &now, 2000, 50000, 100, false); /* 20 jobs of 50 ms in 2 s: 50 %, 10/s */
    smp_conn_sample_t s = {.link = {.crc_errors = 3, .framing_errors = 1}, .reconnects = 2};
    smp__conn_load_add(&l, "k", &s, now);
    smp_buf_t b;
    smp_buf_init(&b);
    smp__conn_load_json(&l, "rtu:/dev/ttyUSB0", &b, now);
    assert_string_equal(b.p, "\"rtu:/dev/ttyUSB0\":{\"utilisation\":0.500,\"requests_per_s\":10.0,"
                             "\"overruns\":0,\"crc_errors\":3,\"framing_errors\":1,"
                             "\"reconnects\":2,\"over_subscribed\":false}");
    smp_buf_free(&b);
    /* The next window starts at the publish. */
    smp_buf_init(&b);
    smp__conn_load_json(&l, "k", &b, now + 1000);
    assert_non_null(strstr(b.p, "\"utilisation\":0.000,\"requests_per_s\":0.0"));
    smp_buf_free(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_over_subscription_episode),
        cmocka_unit_test(test_busy_but_keeping_up_is_not_over),
        cmocka_unit_test(test_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
