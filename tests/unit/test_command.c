/* Command parsing and validation: every rule that runs before any device I/O. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "command.h"

static int parse(const char *text, smp_cmd_t *c, smp_cmd_error_t *err)
{
    return smp_cmd_parse(text, strlen(text), c, err);
}

static void expect_bad(const char *text, const char *needle, bool id_read)
{
    smp_cmd_t c;
    smp_cmd_error_t err;
    assert_int_equal(parse(text, &c, &err), -EINVAL);
    assert_string_equal(err.code, "bad_request");
    if (strstr(err.message, needle) == NULL) {
        fail_msg("message '%s' lacks '%s' for %s", err.message, needle, text);
    }
    assert_int_equal(c.has_id, id_read);
    smp_cmd_free(&c);
}

static void test_parse_valid(void **state)
{
    (void)state;
    smp_cmd_t c;
    smp_cmd_error_t err;
    assert_int_equal(parse("{\"id\":\"c-1\",\"op\":\"write\",\"tag\":\"speed_rpm\",\"value\":1200,"
                           "\"ts\":1764293720123,\"ttl_ms\":5000}",
                           &c, &err),
                     0);
    assert_string_equal(c.id, "c-1");
    assert_int_equal(c.op, SMP_CMD_WRITE);
    assert_string_equal(c.tag, "speed_rpm");
    assert_int_equal(json_integer_value(c.value), 1200);
    assert_true(c.has_ts && c.has_ttl);
    assert_false(smp_cmd_expired(&c, 1764293720123 + 5000));
    assert_true(smp_cmd_expired(&c, 1764293720123 + 5001));
    smp_cmd_free(&c);

    assert_int_equal(parse("{\"id\":\"r\",\"op\":\"read\",\"tags\":[\"a\",\"b-2\"]}", &c, &err), 0);
    assert_int_equal(c.op, SMP_CMD_READ);
    assert_int_equal(c.ntags, 2);
    assert_string_equal(c.tags[1], "b-2");
    assert_false(smp_cmd_expired(&c, UINT64_MAX / 2)); /* no ts/ttl: never expires at receipt */
    smp_cmd_free(&c);

    assert_int_equal(
        parse(
            "{\"id\":\"h\",\"op\":\"history\",\"tag\":\"flow\",\"from\":10,\"to\":20,\"limit\":5}",
            &c, &err),
        0);
    assert_int_equal(c.from, 10);
    assert_int_equal(c.to, 20);
    assert_int_equal(c.limit, 5);
    smp_cmd_free(&c);
}

static void test_parse_bad(void **state)
{
    (void)state;
    expect_bad("not json", "not valid JSON", false);
    expect_bad("[1,2]", "JSON object", false);
    expect_bad("{\"op\":\"write\",\"tag\":\"a\",\"value\":1}", "id must be", false);
    expect_bad("{\"id\":42,\"op\":\"write\",\"tag\":\"a\",\"value\":1}", "id must be", false);
    expect_bad("{\"id\":\"\",\"op\":\"write\"}", "id must be", false);
    expect_bad("{\"id\":\"x\",\"op\":\"explode\"}", "op must be", true);
    expect_bad("{\"id\":\"x\",\"op\":\"write\",\"tag\":\"a\"}", "value is required", true);
    expect_bad("{\"id\":\"x\",\"op\":\"write\",\"tag\":\"a\",\"value\":{\"k\":1}}", "value must be",
               true);
    expect_bad("{\"id\":\"x\",\"op\":\"write\",\"tag\":\"a\",\"value\":null}", "value must be",
               true);
    expect_bad("{\"id\":\"x\",\"op\":\"write\",\"tag\":\"a/b\",\"value\":1}", "tag must be", true);
    expect_bad("{\"id\":\"x\",\"op\":\"write\",\"tag\":\"a\",\"value\":1,\"extra\":1}",
               "unknown key", true);
    expect_bad("{\"id\":\"x\",\"op\":\"read\",\"tags\":[]}", "tags must be", true);
    expect_bad("{\"id\":\"x\",\"op\":\"read\",\"tags\":[1]}", "tags[0]", true);
    expect_bad("{\"id\":\"x\",\"op\":\"read\",\"tag\":\"a\",\"tags\":[\"a\"]}", "takes tags", true);
    expect_bad("{\"id\":\"x\",\"op\":\"write\",\"tag\":\"a\",\"value\":1,\"ttl_ms\":-5}", "ttl_ms",
               true);
    expect_bad("{\"id\":\"x\",\"op\":\"write\",\"tag\":\"a\",\"value\":1,\"ts\":\"now\"}",
               "ts must", true);
    expect_bad("{\"id\":\"x\",\"id\":\"y\",\"op\":\"read\",\"tags\":[\"a\"]}", "not valid JSON",
               false);
    expect_bad("{\"id\":\"x\",\"op\":\"history\",\"tag\":\"a\",\"from\":5,\"to\":1}", "to must not",
               true);
    /* Binary garbage, deep nesting and a huge payload: an answer, never a crash. */
    const unsigned char bin[] = {0x00, 0xff, 0x7b, 0x22, 0xc3, 0x28, 0x01};
    smp_cmd_t c;
    smp_cmd_error_t err;
    assert_int_equal(smp_cmd_parse(bin, sizeof bin, &c, &err), -EINVAL);
    smp_cmd_free(&c);
    size_t depth = 100000;
    char *deep = malloc(depth * 2 + 1);
    memset(deep, '[', depth);
    memset(deep + depth, ']', depth);
    deep[depth * 2] = '\0';
    expect_bad(deep, "", false);
    free(deep);
    size_t big = SMP_CMD_MAX_PAYLOAD + 10;
    char *huge = malloc(big + 1);
    memset(huge, ' ', big);
    memcpy(huge, "{\"id\":\"big\"", 11);
    huge[big - 1] = '}';
    huge[big] = '\0';
    expect_bad(huge, "larger than", false);
    free(huge);
}

static smp_tag_cfg_t tag_of(smp_type_t type, bool writable)
{
    smp_tag_cfg_t t;
    memset(&t, 0, sizeof t);
    t.name = "t";
    t.type = type;
    t.scale = 1;
    t.writable = writable;
    return t;
}

static const char *to_raw_code(const smp_tag_cfg_t *t, const char *json, smp_value_t *raw)
{
    static smp_cmd_error_t err;
    json_error_t jerr;
    json_t *v = json_loads(json, JSON_DECODE_ANY, &jerr);
    assert_non_null(v);
    char *owned = NULL;
    memset(&err, 0, sizeof err);
    int rc = smp_cmd_to_raw(t, v, raw, &owned, &err);
    free(owned);
    json_decref(v);
    return rc == 0 ? "ok" : err.code;
}

static void test_validate(void **state)
{
    (void)state;
    smp_value_t raw;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_UINT16, false);
    assert_string_equal(to_raw_code(&t, "5", &raw), "not_writable");
    t = tag_of(SMP_TYPE_UINT16, true);
    t.has_min = t.has_max = true;
    t.min = 0;
    t.max = 3000;
    assert_string_equal(to_raw_code(&t, "1200", &raw), "ok");
    assert_int_equal(raw.v.u, 1200);
    assert_string_equal(to_raw_code(&t, "4000", &raw), "out_of_range");
    assert_string_equal(to_raw_code(&t, "-1", &raw), "out_of_range");
    assert_string_equal(to_raw_code(&t, "1.5", &raw), "type_mismatch");
    assert_string_equal(to_raw_code(&t, "\"1200\"", &raw), "type_mismatch");
    assert_string_equal(to_raw_code(&t, "true", &raw), "type_mismatch");
    t.has_min = t.has_max = false;
    assert_string_equal(to_raw_code(&t, "65536", &raw), "out_of_range"); /* raw type range */
    assert_string_equal(to_raw_code(&t, "65535", &raw), "ok");

    smp_tag_cfg_t b = tag_of(SMP_TYPE_BOOL, true);
    assert_string_equal(to_raw_code(&b, "1", &raw), "type_mismatch");
    assert_string_equal(to_raw_code(&b, "true", &raw), "ok");
    assert_true(raw.v.b);

    /* Scaled: engineering 12.3 with scale 0.1 is raw 123; 12.34 is not a whole raw value. */
    smp_tag_cfg_t s = tag_of(SMP_TYPE_INT16, true);
    s.scale = 0.1;
    assert_string_equal(to_raw_code(&s, "12.3", &raw), "ok");
    assert_int_equal(raw.v.i, 123);
    assert_string_equal(to_raw_code(&s, "12.34", &raw), "type_mismatch");
    assert_string_equal(to_raw_code(&s, "4000", &raw), "out_of_range"); /* raw 40000 > int16 */
    s.offset = -40;
    s.scale = 0.5;
    assert_string_equal(to_raw_code(&s, "10", &raw), "ok");
    assert_int_equal(raw.v.i, 100);

    smp_tag_cfg_t f = tag_of(SMP_TYPE_FLOAT32, true);
    assert_string_equal(to_raw_code(&f, "12.5", &raw), "ok");
    assert_true(raw.v.d == 12.5);
    assert_string_equal(to_raw_code(&f, "1e300", &raw), "out_of_range");

    smp_tag_cfg_t str = tag_of(SMP_TYPE_STRING, true);
    assert_string_equal(to_raw_code(&str, "5", &raw), "type_mismatch");
    assert_string_equal(to_raw_code(&str, "\"Jl. Sudirman\"", &raw), "ok");
}

/* 64-bit bounds compared as integers: 2^53 + 1 is not 2^53. */
static void test_64bit_bounds_exact(void **state)
{
    (void)state;
    smp_value_t raw;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_INT64, true);
    t.has_max = t.max_is_int = true;
    t.max_i = 9007199254740993LL; /* 2^53 + 1 */
    t.max = (double)t.max_i;      /* rounds to 2^53 */
    t.has_min = t.min_is_int = true;
    t.min_i = -9007199254740993LL;
    t.min = (double)t.min_i;
    assert_string_equal(to_raw_code(&t, "9007199254740993", &raw), "ok");
    assert_int_equal(raw.v.i, 9007199254740993LL);
    assert_string_equal(to_raw_code(&t, "9007199254740994", &raw), "out_of_range");
    assert_string_equal(to_raw_code(&t, "-9007199254740993", &raw), "ok");
    assert_string_equal(to_raw_code(&t, "-9007199254740994", &raw), "out_of_range");
    assert_string_equal(to_raw_code(&t, "9223372036854775807", &raw), "out_of_range");
    /* A bound written as a non-integer number still compares exactly with the integer. */
    smp_tag_cfg_t u = tag_of(SMP_TYPE_UINT64, true);
    u.has_max = true;
    u.max = 9007199254740992.0; /* 2^53 */
    assert_string_equal(to_raw_code(&u, "9007199254740992", &raw), "ok");
    assert_string_equal(to_raw_code(&u, "9007199254740993", &raw), "out_of_range");
    u.max = 1e300;
    assert_string_equal(to_raw_code(&u, "9223372036854775807", &raw), "ok");
    assert_int_equal(raw.v.u, 9223372036854775807ULL);
    u.has_max = false;
    u.has_min = true;
    u.min = 10.5;
    assert_string_equal(to_raw_code(&u, "10", &raw), "out_of_range");
    assert_string_equal(to_raw_code(&u, "11", &raw), "ok");
}

/* The whole-multiple-of-scale check keeps working at large |raw|. */
static void test_scale_multiple_large_raw(void **state)
{
    (void)state;
    smp_value_t raw;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_INT32, true);
    t.scale = 0.1;
    assert_string_equal(to_raw_code(&t, "100000.05", &raw), "type_mismatch"); /* raw 1000000.5 */
    assert_string_equal(to_raw_code(&t, "100000.1", &raw), "ok");
    assert_int_equal(raw.v.i, 1000001);
    assert_string_equal(to_raw_code(&t, "-200000000.05", &raw), "type_mismatch");
    assert_string_equal(to_raw_code(&t, "-200000000.1", &raw), "ok");
    assert_int_equal(raw.v.i, -2000000001);
    assert_string_equal(to_raw_code(&t, "0.3", &raw), "ok"); /* 0.3 / 0.1 = 2.9999999999999996 */
    assert_int_equal(raw.v.i, 3);
    smp_tag_cfg_t o = tag_of(SMP_TYPE_UINT32, true);
    o.scale = 0.5;
    o.offset = 1000.1;
    assert_string_equal(to_raw_code(&o, "1000.6", &raw), "ok");
    assert_int_equal(raw.v.u, 1);
    assert_string_equal(to_raw_code(&o, "2000000.35", &raw), "type_mismatch");
    smp_tag_cfg_t w = tag_of(SMP_TYPE_INT64, true);
    w.scale = 2;
    assert_string_equal(to_raw_code(&w, "4000000000001", &raw), "type_mismatch");
    assert_string_equal(to_raw_code(&w, "4000000000002", &raw), "ok");
    assert_int_equal(raw.v.i, 2000000000001LL);
}

/* A delivery's classification: the device from the topic, refusals before any parsing. */
static void test_delivery(void **state)
{
    (void)state;
    smp_cmd_delivery_t dv;
    smp_mqtt_props_t props = {0};
    assert_int_equal(smp_cmd_delivery("simpul/gw/pump-01/cmd", NULL, "simpul", "gw", &dv), 0);
    assert_string_equal(dv.device, "pump-01");
    assert_null(dv.refusal_code);
    assert_int_equal(smp_cmd_delivery("simpul/gw/pump-01/data", NULL, "simpul", "gw", &dv),
                     -EINVAL);
    assert_int_equal(smp_cmd_delivery("simpul/gw2/pump-01/cmd", NULL, "simpul", "gw", &dv),
                     -EINVAL);
    assert_int_equal(smp_cmd_delivery("simpul/gw//cmd", NULL, "simpul", "gw", &dv), -EINVAL);
    props.retained = true;
    assert_int_equal(smp_cmd_delivery("simpul/gw/p/cmd", &props, "simpul", "gw", &dv), 0);
    assert_string_equal(dv.refusal_code, "stale_retained");
    props.retained = false;
    props.response_topic = "simpul/gw/reply/op-1";
    assert_int_equal(smp_cmd_delivery("simpul/gw/p/cmd", &props, "simpul", "gw", &dv), 0);
    assert_null(dv.refusal_code);
    assert_true(dv.use_response_topic);
    static const char *const bad[] = {"simpul/gw/p2/data",
                                      "simpul/gw/reply/",
                                      "simpul/gw/replyx",
                                      "simpul/gw2/reply/x",
                                      "other/reply/x",
                                      "simpul/gw/reply/#",
                                      ""};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        props.response_topic = bad[k];
        assert_int_equal(smp_cmd_delivery("simpul/gw/p/cmd", &props, "simpul", "gw", &dv), 0);
        assert_non_null(dv.refusal_code);
        assert_string_equal(dv.refusal_code, "bad_request");
        assert_false(dv.use_response_topic);
    }
}

static void test_raw_equal(void **state)
{
    (void)state;
    smp_tag_cfg_t f = tag_of(SMP_TYPE_FLOAT32, true);
    smp_value_t a = {0}, b = {0};
    a.v.d = (double)0.1f;
    b.v.d = 0.1; /* same float32 */
    assert_true(smp_cmd_raw_equal(&f, &a, &b));
    b.v.d = 0.2;
    assert_false(smp_cmd_raw_equal(&f, &a, &b));
    smp_tag_cfg_t s = tag_of(SMP_TYPE_STRING, true);
    a.s = "abc";
    a.len = 3;
    b.s = "abd";
    b.len = 3;
    assert_false(smp_cmd_raw_equal(&s, &a, &b));
    b.s = "abc";
    assert_true(smp_cmd_raw_equal(&s, &a, &b));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_valid),
        cmocka_unit_test(test_parse_bad),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_raw_equal),
        cmocka_unit_test(test_64bit_bounds_exact),
        cmocka_unit_test(test_delivery),
        cmocka_unit_test(test_scale_multiple_large_raw),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
