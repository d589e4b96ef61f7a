/* Sparkplug B payload codec (gateway/spb_codec.c): datatypes, round trips through protobuf-c,
 * refusals, and hostile input. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "spb_codec.h"

static smp_tag_cfg_t tag(smp_type_t t, double scale)
{
    smp_tag_cfg_t c;
    memset(&c, 0, sizeof c);
    c.name = "t";
    c.type = t;
    c.scale = scale;
    return c;
}

static void test_datatypes(void **state)
{
    (void)state;
    static const struct {
        smp_type_t t;
        uint32_t dt;
    } map[] = {
        {SMP_TYPE_BOOL, SMP_SPB_BOOLEAN},   {SMP_TYPE_INT16, SMP_SPB_INT16},
        {SMP_TYPE_UINT16, SMP_SPB_UINT16},  {SMP_TYPE_INT32, SMP_SPB_INT32},
        {SMP_TYPE_UINT32, SMP_SPB_UINT32},  {SMP_TYPE_INT64, SMP_SPB_INT64},
        {SMP_TYPE_UINT64, SMP_SPB_UINT64},  {SMP_TYPE_FLOAT32, SMP_SPB_FLOAT},
        {SMP_TYPE_FLOAT64, SMP_SPB_DOUBLE}, {SMP_TYPE_STRING, SMP_SPB_STRING},
    };
    for (size_t k = 0; k < sizeof map / sizeof map[0]; k++) {
        smp_tag_cfg_t c = tag(map[k].t, 1);
        assert_int_equal(smp_spb_datatype(&c), map[k].dt);
    }
    /* Scaled values are fractional engineering values. */
    smp_tag_cfg_t c = tag(SMP_TYPE_INT16, 0.1);
    assert_int_equal(smp_spb_datatype(&c), SMP_SPB_DOUBLE);
    c = tag(SMP_TYPE_FLOAT32, 2);
    assert_int_equal(smp_spb_datatype(&c), SMP_SPB_DOUBLE);
    c = tag(SMP_TYPE_BOOL, 2);
    assert_int_equal(smp_spb_datatype(&c), SMP_SPB_BOOLEAN);
    assert_string_equal(smp_spb_datatype_name(SMP_SPB_UINT16), "UInt16");
    assert_string_equal(smp_spb_datatype_name(99), "other");
}

/* Encodes one metric and decodes it back. */
static void round_trip(uint32_t dt, const smp_eval_t *v, smp_spb_payload_t *out)
{
    smp_spb_metric_t m = {.name = "m",
                          .has_alias = true,
                          .alias = 77,
                          .has_ts = true,
                          .ts = 1764293720123u,
                          .datatype = dt,
                          .value = v};
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(smp_spb_encode(1764293720000u, 42, &m, 1, &buf, &len), 0);
    assert_int_equal(smp_spb_decode(buf, len, out), 0);
    free(buf);
    assert_true(out->has_ts && out->ts == 1764293720000u);
    assert_true(out->has_seq && out->seq == 42);
    assert_int_equal(out->n, 1);
    assert_string_equal(out->metrics[0].name, "m");
    assert_true(out->metrics[0].has_alias && out->metrics[0].alias == 77);
    assert_true(out->metrics[0].has_ts && out->metrics[0].ts == 1764293720123u);
    assert_true(out->metrics[0].has_datatype && out->metrics[0].datatype == dt);
}

static void test_round_trips(void **state)
{
    (void)state;
    smp_spb_payload_t p;
    smp_eval_t v = {.kind = SMP_EV_BOOL, .b = true};
    round_trip(SMP_SPB_BOOLEAN, &v, &p);
    assert_int_equal(p.metrics[0].value.kind, SMP_EV_BOOL);
    assert_true(p.metrics[0].value.b);
    smp_spb_payload_free(&p);

    v = (smp_eval_t){.kind = SMP_EV_INT, .i = -1234};
    round_trip(SMP_SPB_INT16, &v, &p); /* two's complement in a uint32 on the wire */
    assert_int_equal(p.metrics[0].value.kind, SMP_EV_INT);
    assert_int_equal(p.metrics[0].value.i, -1234);
    smp_spb_payload_free(&p);

    v = (smp_eval_t){.kind = SMP_EV_INT, .i = INT64_MIN};
    round_trip(SMP_SPB_INT64, &v, &p);
    assert_true(p.metrics[0].value.i == INT64_MIN);
    smp_spb_payload_free(&p);

    v = (smp_eval_t){.kind = SMP_EV_UINT, .u = UINT64_MAX};
    round_trip(SMP_SPB_UINT64, &v, &p);
    assert_int_equal(p.metrics[0].value.kind, SMP_EV_UINT);
    assert_true(p.metrics[0].value.u == UINT64_MAX);
    smp_spb_payload_free(&p);

    v = (smp_eval_t){.kind = SMP_EV_UINT, .u = 4000000000u};
    round_trip(SMP_SPB_UINT32, &v, &p);
    assert_true(p.metrics[0].value.u == 4000000000u);
    smp_spb_payload_free(&p);

    v = (smp_eval_t){.kind = SMP_EV_FLOAT32, .d = 12.5};
    round_trip(SMP_SPB_FLOAT, &v, &p);
    assert_int_equal(p.metrics[0].value.kind, SMP_EV_FLOAT32);
    assert_true(p.metrics[0].value.d == 12.5);
    smp_spb_payload_free(&p);

    v = (smp_eval_t){.kind = SMP_EV_DOUBLE, .d = 41.5};
    round_trip(SMP_SPB_DOUBLE, &v, &p);
    assert_true(p.metrics[0].value.d == 41.5);
    smp_spb_payload_free(&p);

    v = (smp_eval_t){.kind = SMP_EV_STRING, .s = "Dumai PS-01"};
    round_trip(SMP_SPB_STRING, &v, &p);
    assert_int_equal(p.metrics[0].value.kind, SMP_EV_STRING);
    assert_string_equal(p.metrics[0].value.s, "Dumai PS-01");
    smp_spb_payload_free(&p);
}

static void test_null_historical_and_no_seq(void **state)
{
    (void)state;
    smp_spb_metric_t m[2] = {
        {.has_alias = true, .alias = 5, .datatype = SMP_SPB_UINT16, .is_null = true},
        {.has_alias = true,
         .alias = 6,
         .datatype = SMP_SPB_UINT16,
         .omit_datatype = true,
         .is_historical = true,
         .value = &(smp_eval_t){.kind = SMP_EV_INT, .i = 7}},
    };
    uint8_t *buf = NULL;
    size_t len = 0;
    assert_int_equal(smp_spb_encode(0, -1, m, 2, &buf, &len), 0);
    smp_spb_payload_t p;
    assert_int_equal(smp_spb_decode(buf, len, &p), 0);
    assert_false(p.has_seq);
    assert_false(p.has_ts);
    assert_null(p.metrics[0].name); /* DATA with aliases only */
    assert_true(p.metrics[0].is_null);
    assert_int_equal(p.metrics[0].value.kind, SMP_EV_NONE);
    assert_true(p.metrics[1].is_historical);
    assert_false(p.metrics[1].has_datatype); /* DATA leaves the datatype to the birth */
    assert_true(p.metrics[1].value.u == 7);
    smp_spb_payload_free(&p);

    /* A seq appended to an encoded payload (how kept DATA gets its seq when sent) is read. */
    uint8_t *b2 = malloc(len + 3);
    assert_non_null(b2);
    memcpy(b2, buf, len);
    b2[len] = 0x18;
    b2[len + 1] = 0x80 | (200 & 0x7f);
    b2[len + 2] = 200 >> 7;
    assert_int_equal(smp_spb_decode(b2, len + 3, &p), 0);
    assert_true(p.has_seq && p.seq == 200);
    assert_int_equal(p.n, 2);
    smp_spb_payload_free(&p);
    free(b2);
    free(buf);
}

static void test_encode_refuses_mismatches(void **state)
{
    (void)state;
    static const struct {
        uint32_t dt;
        smp_eval_t v;
    } bad[] = {
        {SMP_SPB_INT16, {.kind = SMP_EV_STRING, .s = "x"}},
        {SMP_SPB_INT32, {.kind = SMP_EV_INT, .i = INT64_C(1) << 40}},
        {SMP_SPB_UINT16, {.kind = SMP_EV_INT, .i = -1}},
        {SMP_SPB_INT64, {.kind = SMP_EV_UINT, .u = UINT64_MAX}},
        {SMP_SPB_BOOLEAN, {.kind = SMP_EV_UINT, .u = 1}},
        {SMP_SPB_DOUBLE, {.kind = SMP_EV_BOOL, .b = true}},
        {SMP_SPB_STRING, {.kind = SMP_EV_DOUBLE, .d = 1}},
        {SMP_SPB_UNKNOWN, {.kind = SMP_EV_DOUBLE, .d = 1}},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        smp_spb_metric_t m = {.name = "m", .datatype = bad[k].dt, .value = &bad[k].v};
        uint8_t *buf = (uint8_t *)1;
        size_t len = 1;
        assert_int_equal(smp_spb_encode(0, 0, &m, 1, &buf, &len), -EINVAL);
        assert_null(buf);
        assert_int_equal(len, 0);
    }
}

static void test_decode_hostile(void **state)
{
    (void)state;
    smp_spb_payload_t p;
    static const uint8_t garbage[] = {0xff, 0xff, 0xff, 0xff};
    assert_int_equal(smp_spb_decode(garbage, sizeof garbage, &p), -EINVAL);
    assert_int_equal(p.n, 0);
    assert_null(p.metrics);
    /* A metric whose length runs past the end. */
    static const uint8_t truncated[] = {0x12, 0x10, 0x0a, 0x01, 'a'};
    assert_int_equal(smp_spb_decode(truncated, sizeof truncated, &p), -EINVAL);
    /* bytes_value (field 16) is not a value simpul knows: flagged, not guessed. */
    static const uint8_t bytes_metric[] = {0x12, 0x04, 0x82, 0x01, 0x01, 'x'};
    assert_int_equal(smp_spb_decode(bytes_metric, sizeof bytes_metric, &p), 0);
    assert_int_equal(p.n, 1);
    assert_true(p.metrics[0].unsupported);
    assert_int_equal(p.metrics[0].value.kind, SMP_EV_NONE);
    smp_spb_payload_free(&p);
    /* Empty input is an empty payload. */
    assert_int_equal(smp_spb_decode("", 0, &p), 0);
    assert_int_equal(p.n, 0);
    smp_spb_payload_free(&p);
    /* Too big. */
    size_t big = SMP_SPB_MAX_PAYLOAD + 1;
    uint8_t *b = calloc(1, big);
    assert_non_null(b);
    assert_int_equal(smp_spb_decode(b, big, &p), -EMSGSIZE);
    free(b);
    smp_spb_payload_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_datatypes),
        cmocka_unit_test(test_round_trips),
        cmocka_unit_test(test_null_historical_and_no_seq),
        cmocka_unit_test(test_encode_refuses_mismatches),
        cmocka_unit_test(test_decode_hostile),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
