/* Unit tests of the Modbus framing (protocols/modbus/frame.c): requests built byte for byte,
 * CRC16 against the spec's example, and every way a reply can fail to answer its request. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "frame.h"

static const smp_mb_req_t read_hr = {.unit = 17, .fc = 3, .address = 0x006B, .count = 3};

static void test_crc16_spec_example(void **state)
{
    (void)state;
    /* Modbus over Serial Line v1.02, 6.2.2: 01 03 00 00 00 0A -> CRC C5 CD (low byte first). */
    const uint8_t f[] = {0x01, 0x03, 0x00, 0x00, 0x00, 0x0A};
    uint16_t crc = smp_mb_crc16(f, sizeof f);
    assert_int_equal(crc & 0xFF, 0xC5);
    assert_int_equal(crc >> 8, 0xCD);
}

static void test_encode_read(void **state)
{
    (void)state;
    uint8_t pdu[8];
    assert_int_equal(smp_mb_pdu_encode(&read_hr, pdu, sizeof pdu), 5);
    const uint8_t want[] = {0x03, 0x00, 0x6B, 0x00, 0x03};
    assert_memory_equal(pdu, want, sizeof want);
    assert_int_equal(smp_mb_reply_pdu_len(&read_hr), 2 + 6);
    smp_mb_req_t coils = {.unit = 1, .fc = 1, .address = 0, .count = 17};
    assert_int_equal(smp_mb_reply_pdu_len(&coils), 2 + 3);
}

static void test_encode_writes(void **state)
{
    (void)state;
    uint8_t pdu[16];
    smp_mb_req_t coil = {.unit = 1, .fc = 5, .address = 0xAC, .value = 1};
    assert_int_equal(smp_mb_pdu_encode(&coil, pdu, sizeof pdu), 5);
    const uint8_t want_coil[] = {0x05, 0x00, 0xAC, 0xFF, 0x00};
    assert_memory_equal(pdu, want_coil, 5);
    const uint16_t regs[] = {0x000A, 0x0102};
    smp_mb_req_t multi = {.unit = 1, .fc = 16, .address = 1, .count = 2, .regs = regs};
    assert_int_equal(smp_mb_pdu_encode(&multi, pdu, sizeof pdu), 10);
    const uint8_t want_multi[] = {0x10, 0x00, 0x01, 0x00, 0x02, 0x04, 0x00, 0x0A, 0x01, 0x02};
    assert_memory_equal(pdu, want_multi, sizeof want_multi);
    assert_int_equal(smp_mb_pdu_encode(&multi, pdu, 9), -ENOSPC);
}

static void test_encode_refuses_bad_requests(void **state)
{
    (void)state;
    uint8_t pdu[16];
    smp_mb_req_t r = {.unit = 1, .fc = 3, .address = 0, .count = 126};
    assert_int_equal(smp_mb_pdu_encode(&r, pdu, sizeof pdu), -EINVAL);
    r.count = 0;
    assert_int_equal(smp_mb_pdu_encode(&r, pdu, sizeof pdu), -EINVAL);
    r = (smp_mb_req_t){.unit = 1, .fc = 1, .address = 65535, .count = 2};
    assert_int_equal(smp_mb_pdu_encode(&r, pdu, sizeof pdu), -EINVAL);
    r = (smp_mb_req_t){.unit = 1, .fc = 8, .count = 1};
    assert_int_equal(smp_mb_pdu_encode(&r, pdu, sizeof pdu), -EINVAL);
    assert_int_equal(smp_mb_reply_pdu_len(&r), 0);
    r = (smp_mb_req_t){.unit = 1, .fc = 16, .count = 1, .regs = NULL};
    assert_int_equal(smp_mb_pdu_encode(&r, pdu, sizeof pdu), -EINVAL);
}

static void test_read_reply_ok(void **state)
{
    (void)state;
    const uint8_t pdu[] = {0x03, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00, 0x64};
    uint16_t regs[3];
    assert_int_equal(smp_mb_pdu_check(&read_hr, pdu, sizeof pdu, regs, NULL, NULL), SMP_MB_OK);
    assert_int_equal(regs[0], 0x022B);
    assert_int_equal(regs[2], 0x0064);
}

static void test_bits_reply_ok(void **state)
{
    (void)state;
    smp_mb_req_t rq = {.unit = 4, .fc = 2, .address = 0xC4, .count = 10};
    const uint8_t pdu[] = {0x02, 0x02, 0xAC, 0x02};
    uint8_t bits[10];
    assert_int_equal(smp_mb_pdu_check(&rq, pdu, sizeof pdu, NULL, bits, NULL), SMP_MB_OK);
    const uint8_t want[] = {0, 0, 1, 1, 0, 1, 0, 1, 0, 1};
    assert_memory_equal(bits, want, sizeof want);
}

static void test_reply_wrong_count_or_function(void **state)
{
    (void)state;
    uint16_t regs[3];
    const uint8_t short_count[] = {0x03, 0x04, 0x02, 0x2B, 0x00, 0x00};
    assert_int_equal(smp_mb_pdu_check(&read_hr, short_count, sizeof short_count, regs, NULL, NULL),
                     SMP_MB_BAD_COUNT);
    /* The right byte count with bytes missing or extra is refused too. */
    const uint8_t truncated[] = {0x03, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00};
    assert_int_equal(smp_mb_pdu_check(&read_hr, truncated, sizeof truncated, regs, NULL, NULL),
                     SMP_MB_BAD_COUNT);
    const uint8_t fc4[] = {0x04, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00, 0x64};
    assert_int_equal(smp_mb_pdu_check(&read_hr, fc4, sizeof fc4, regs, NULL, NULL),
                     SMP_MB_BAD_FUNCTION);
}

static void test_exception_reply(void **state)
{
    (void)state;
    int ex = -1;
    const uint8_t pdu[] = {0x83, 0x02};
    assert_int_equal(smp_mb_pdu_check(&read_hr, pdu, sizeof pdu, NULL, NULL, &ex),
                     SMP_MB_EXCEPTION);
    assert_int_equal(ex, 2);
    const uint8_t long_exc[] = {0x83, 0x02, 0x00};
    assert_int_equal(smp_mb_pdu_check(&read_hr, long_exc, sizeof long_exc, NULL, NULL, &ex),
                     SMP_MB_BAD_LENGTH);
    const uint8_t zero_exc[] = {0x83, 0x00};
    assert_int_equal(smp_mb_pdu_check(&read_hr, zero_exc, sizeof zero_exc, NULL, NULL, &ex),
                     SMP_MB_BAD_COUNT);
    const uint8_t other_exc[] = {0x84, 0x02};
    assert_int_equal(smp_mb_pdu_check(&read_hr, other_exc, sizeof other_exc, NULL, NULL, &ex),
                     SMP_MB_BAD_FUNCTION);
}

static void test_write_echo(void **state)
{
    (void)state;
    smp_mb_req_t rq = {.unit = 1, .fc = 6, .address = 1, .value = 3};
    const uint8_t ok[] = {0x06, 0x00, 0x01, 0x00, 0x03};
    assert_int_equal(smp_mb_pdu_check(&rq, ok, sizeof ok, NULL, NULL, NULL), SMP_MB_OK);
    const uint8_t other_value[] = {0x06, 0x00, 0x01, 0x00, 0x04};
    assert_int_equal(smp_mb_pdu_check(&rq, other_value, sizeof other_value, NULL, NULL, NULL),
                     SMP_MB_BAD_ECHO);
    const uint16_t regs[] = {1, 2};
    smp_mb_req_t multi = {.unit = 1, .fc = 16, .address = 7, .count = 2, .regs = regs};
    const uint8_t multi_ok[] = {0x10, 0x00, 0x07, 0x00, 0x02};
    assert_int_equal(smp_mb_pdu_check(&multi, multi_ok, sizeof multi_ok, NULL, NULL, NULL),
                     SMP_MB_OK);
    const uint8_t multi_bad[] = {0x10, 0x00, 0x08, 0x00, 0x02};
    assert_int_equal(smp_mb_pdu_check(&multi, multi_bad, sizeof multi_bad, NULL, NULL, NULL),
                     SMP_MB_BAD_ECHO);
}

static void test_mbap_round_trip(void **state)
{
    (void)state;
    uint8_t pdu[8], adu[SMP_MB_TCP_MAX_ADU];
    int n = smp_mb_pdu_encode(&read_hr, pdu, sizeof pdu);
    assert_int_equal(smp_mb_mbap_encode(0x1234, 17, pdu, (size_t)n, adu, sizeof adu), 12);
    const uint8_t want[] = {0x12, 0x34, 0x00, 0x00, 0x00, 0x06, 0x11};
    assert_memory_equal(adu, want, sizeof want);
    uint16_t tid;
    uint8_t unit;
    size_t len;
    assert_int_equal(smp_mb_mbap_header(adu, &tid, &unit, &len), SMP_MB_OK);
    assert_int_equal(tid, 0x1234);
    assert_int_equal(unit, 17);
    assert_int_equal(len, 5);
}

static void test_mbap_refusals(void **state)
{
    (void)state;
    uint16_t tid;
    uint8_t unit;
    size_t len;
    const uint8_t proto[] = {0x00, 0x01, 0x00, 0x01, 0x00, 0x05, 0x01};
    assert_int_equal(smp_mb_mbap_header(proto, &tid, &unit, &len), SMP_MB_BAD_PROTOCOL);
    assert_int_equal(len, 4); /* a sane length still lets the caller skip the frame */
    const uint8_t zero_len[] = {0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x01};
    assert_int_equal(smp_mb_mbap_header(zero_len, &tid, &unit, &len), SMP_MB_BAD_LENGTH);
    const uint8_t huge_len[] = {0x00, 0x01, 0x00, 0x00, 0x00, 0xFF, 0x01};
    assert_int_equal(smp_mb_mbap_header(huge_len, &tid, &unit, &len), SMP_MB_BAD_LENGTH);
    uint8_t pdu[1] = {3}, adu[8];
    assert_int_equal(smp_mb_mbap_encode(1, 1, pdu, 1, adu, 7), -ENOSPC);
    assert_int_equal(smp_mb_mbap_encode(1, 1, pdu, 0, adu, 8), -EINVAL);
}

static void test_rtu_round_trip(void **state)
{
    (void)state;
    const uint8_t pdu[] = {0x03, 0x06, 0x02, 0x2B, 0x00, 0x00, 0x00, 0x64};
    uint8_t adu[SMP_MB_RTU_MAX_ADU];
    int n = smp_mb_rtu_encode(17, pdu, sizeof pdu, adu, sizeof adu);
    assert_int_equal(n, 11);
    smp_mb_verdict_t why;
    assert_int_equal(smp_mb_rtu_reply_len(&read_hr, adu, &why), 11);
    assert_int_equal(why, SMP_MB_OK);
    uint16_t regs[3];
    assert_int_equal(smp_mb_rtu_check(&read_hr, adu, (size_t)n, regs, NULL, NULL), SMP_MB_OK);
    assert_int_equal(regs[1], 0);
    adu[4] ^= 0x01;
    assert_int_equal(smp_mb_rtu_check(&read_hr, adu, (size_t)n, regs, NULL, NULL), SMP_MB_BAD_CRC);
}

static void test_rtu_expected_lengths(void **state)
{
    (void)state;
    smp_mb_verdict_t why;
    const uint8_t exc[] = {17, 0x83};
    assert_int_equal(smp_mb_rtu_reply_len(&read_hr, exc, &why), SMP_MB_RTU_EXC_LEN);
    const uint8_t other_unit[] = {18, 0x03};
    assert_int_equal(smp_mb_rtu_reply_len(&read_hr, other_unit, &why), 0);
    assert_int_equal(why, SMP_MB_BAD_UNIT);
    const uint8_t other_fc[] = {17, 0x04};
    assert_int_equal(smp_mb_rtu_reply_len(&read_hr, other_fc, &why), 0);
    assert_int_equal(why, SMP_MB_BAD_FUNCTION);
    smp_mb_req_t wr = {.unit = 2, .fc = 5, .address = 3, .value = 0};
    const uint8_t wr_head[] = {2, 5};
    assert_int_equal(smp_mb_rtu_reply_len(&wr, wr_head, &why), 8);
    smp_mb_req_t coils = {.unit = 2, .fc = 1, .address = 0, .count = 2000};
    const uint8_t c_head[] = {2, 1};
    assert_int_equal(smp_mb_rtu_reply_len(&coils, c_head, &why), 1 + 2 + 250 + 2);
}

static void test_rtu_wrong_unit_with_good_crc(void **state)
{
    (void)state;
    const uint8_t pdu[] = {0x83, 0x02};
    uint8_t adu[8];
    int n = smp_mb_rtu_encode(9, pdu, sizeof pdu, adu, sizeof adu);
    int ex = 0;
    assert_int_equal(smp_mb_rtu_check(&read_hr, adu, (size_t)n, NULL, NULL, &ex), SMP_MB_BAD_UNIT);
    assert_int_equal(smp_mb_rtu_check(&read_hr, adu, 4, NULL, NULL, &ex), SMP_MB_BAD_LENGTH);
}

static void test_verdict_strings(void **state)
{
    (void)state;
    for (int v = SMP_MB_OK; v <= SMP_MB_BAD_ECHO; v++) {
        assert_string_not_equal(smp_mb_verdict_str((smp_mb_verdict_t)v), "unknown verdict");
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_crc16_spec_example),
        cmocka_unit_test(test_encode_read),
        cmocka_unit_test(test_encode_writes),
        cmocka_unit_test(test_encode_refuses_bad_requests),
        cmocka_unit_test(test_read_reply_ok),
        cmocka_unit_test(test_bits_reply_ok),
        cmocka_unit_test(test_reply_wrong_count_or_function),
        cmocka_unit_test(test_exception_reply),
        cmocka_unit_test(test_write_echo),
        cmocka_unit_test(test_mbap_round_trip),
        cmocka_unit_test(test_mbap_refusals),
        cmocka_unit_test(test_rtu_round_trip),
        cmocka_unit_test(test_rtu_expected_lengths),
        cmocka_unit_test(test_rtu_wrong_unit_with_good_crc),
        cmocka_unit_test(test_verdict_strings),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
