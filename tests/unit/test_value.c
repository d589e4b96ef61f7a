/* Engineering values: scale/offset, deadband, JSON text of every kind. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "value.h"

static smp_tag_cfg_t tag_of(smp_type_t type, double scale, double offset, double deadband)
{
    smp_tag_cfg_t t;
    memset(&t, 0, sizeof t);
    t.name = "t";
    t.type = type;
    t.scale = scale;
    t.offset = offset;
    t.deadband = deadband;
    return t;
}

static void expect_json(const smp_tag_cfg_t *t, smp_value_t raw, const char *want)
{
    smp_eval_t v;
    assert_int_equal(smp_eval_from_raw(t, &raw, &v), 0);
    char buf[128];
    smp_eval_to_json(&v, buf, sizeof buf);
    assert_string_equal(buf, want);
    smp_eval_clear(&v);
}

static void test_float32_shortest(void **state)
{
    (void)state;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_FLOAT32, 1, 0, 0);
    smp_value_t r = {0};
    r.v.d = 12.5;
    expect_json(&t, r, "12.5");
    r.v.d = (double)0.1f; /* the float32 nearest 0.1 prints as 0.1, not 0.100000001 */
    expect_json(&t, r, "0.1");
    r.v.d = (double)3.14159274f;
    expect_json(&t, r, "3.1415927");
    r.v.d = -0.0;
    expect_json(&t, r, "-0");
    r.v.d = (double)16777216.0f;
    expect_json(&t, r, "16777216");
}

static void test_integers_exact(void **state)
{
    (void)state;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_UINT64, 1, 0, 0);
    smp_value_t r = {0};
    r.v.u = UINT64_MAX;
    expect_json(&t, r, "18446744073709551615");
    t = tag_of(SMP_TYPE_INT64, 1, 0, 0);
    r.v.i = INT64_MIN;
    expect_json(&t, r, "-9223372036854775808");
    t = tag_of(SMP_TYPE_INT16, 1, 0, 0);
    r.v.i = -1;
    expect_json(&t, r, "-1");
}

static void test_scale_offset(void **state)
{
    (void)state;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_INT16, 0.1, 0, 0);
    smp_value_t r = {0};
    r.v.i = 1234;
    expect_json(&t, r, "123.4");
    t = tag_of(SMP_TYPE_UINT16, 0.5, -40, 0);
    r.v.u = 100;
    expect_json(&t, r, "10");
    t = tag_of(SMP_TYPE_FLOAT32, 2, 1, 0);
    r.v.d = 1.5;
    expect_json(&t, r, "4");
    /* 348 * 0.1 is 34.800000000000004 in binary; the scale's one decimal gives 34.8. */
    t = tag_of(SMP_TYPE_INT16, 0.1, 0, 0);
    r.v.i = 348;
    expect_json(&t, r, "34.8");
    t = tag_of(SMP_TYPE_UINT16, 0.1, 0, 0);
    r.v.u = 2301;
    expect_json(&t, r, "230.1");
    t = tag_of(SMP_TYPE_UINT32, 0.01, 0, 0);
    r.v.u = 123457;
    expect_json(&t, r, "1234.57");
}

static void test_not_finite_refused(void **state)
{
    (void)state;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_FLOAT32, 1, 0, 0);
    smp_value_t r = {0};
    smp_eval_t v;
    r.v.d = NAN;
    assert_int_equal(smp_eval_from_raw(&t, &r, &v), -EDOM);
    r.v.d = INFINITY;
    assert_int_equal(smp_eval_from_raw(&t, &r, &v), -EDOM);
    t = tag_of(SMP_TYPE_FLOAT64, 1e308, 0, 0);
    r.v.d = 1e10; /* finite raw, infinite after scaling */
    assert_int_equal(smp_eval_from_raw(&t, &r, &v), -EDOM);
}

static void test_deadband(void **state)
{
    (void)state;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_FLOAT32, 1, 0, 0.5);
    smp_eval_t a = {.kind = SMP_EV_FLOAT32, .d = 10.0};
    smp_eval_t b = {.kind = SMP_EV_FLOAT32, .d = 10.5};
    smp_eval_t c = {.kind = SMP_EV_FLOAT32, .d = 10.75};
    smp_eval_t none = {0};
    assert_false(smp_eval_changed(&t, &a, &b)); /* exactly the deadband: not beyond it */
    assert_true(smp_eval_changed(&t, &a, &c));
    assert_true(smp_eval_changed(&t, &none, &a));
    t.deadband = 0;
    assert_true(smp_eval_changed(&t, &a, &b));
    assert_false(smp_eval_changed(&t, &a, &a));
    smp_tag_cfg_t bt = tag_of(SMP_TYPE_BOOL, 1, 0, 5);
    smp_eval_t f = {.kind = SMP_EV_BOOL, .b = false}, tr = {.kind = SMP_EV_BOOL, .b = true};
    assert_true(smp_eval_changed(&bt, &f, &tr));
    smp_tag_cfg_t it = tag_of(SMP_TYPE_UINT64, 1, 0, 0);
    smp_eval_t big1 = {.kind = SMP_EV_UINT, .u = UINT64_MAX};
    smp_eval_t big2 = {.kind = SMP_EV_UINT, .u = UINT64_MAX - 1};
    assert_true(smp_eval_changed(&it, &big1, &big2)); /* exact, not through double */
}

static void test_strings_escaped(void **state)
{
    (void)state;
    smp_tag_cfg_t t = tag_of(SMP_TYPE_STRING, 1, 0, 0);
    smp_value_t r = {0};
    r.s = "a\"b\\c\n\x01";
    r.len = strlen(r.s);
    expect_json(&t, r, "\"a\\\"b\\\\c\\n\\u0001\"");
    r.s = "ok\xff!";
    r.len = 4;
    expect_json(&t, r, "\"ok\xEF\xBF\xBD!\"");
    r.s = "Jl. Sudirman \xC3\xA9";
    r.len = strlen(r.s);
    expect_json(&t, r, "\"Jl. Sudirman \xC3\xA9\"");
}

static void test_json_round_trip(void **state)
{
    (void)state;
    const struct {
        smp_type_t type;
        double scale;
        const char *text;
    } cases[] = {
        {SMP_TYPE_BOOL, 1, "true"},
        {SMP_TYPE_INT32, 1, "-123456"},
        {SMP_TYPE_UINT64, 1, "18446744073709551615"},
        {SMP_TYPE_FLOAT32, 1, "0.1"},
        {SMP_TYPE_FLOAT64, 1, "2.718281828459045"},
        {SMP_TYPE_INT16, 0.1, "123.4"},
        {SMP_TYPE_STRING, 1, "\"pump \\\"A\\\"\""},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        smp_tag_cfg_t t = tag_of(cases[k].type, cases[k].scale, 0, 0);
        smp_eval_t v;
        assert_int_equal(smp_eval_from_json(&t, cases[k].text, &v), 0);
        char buf[128];
        smp_eval_to_json(&v, buf, sizeof buf);
        assert_string_equal(buf, cases[k].text);
        smp_eval_clear(&v);
    }
    smp_tag_cfg_t t = tag_of(SMP_TYPE_UINT16, 1, 0, 0);
    smp_eval_t v;
    assert_int_equal(smp_eval_from_json(&t, "-1", &v), -EINVAL);
    assert_int_equal(smp_eval_from_json(&t, "12x", &v), -EINVAL);
    t.type = SMP_TYPE_BOOL;
    assert_int_equal(smp_eval_from_json(&t, "1", &v), -EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_float32_shortest), cmocka_unit_test(test_integers_exact),
        cmocka_unit_test(test_scale_offset),     cmocka_unit_test(test_not_finite_refused),
        cmocka_unit_test(test_deadband),         cmocka_unit_test(test_strings_escaped),
        cmocka_unit_test(test_json_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
