/* Unit tests of the Modbus value codec (protocols/modbus/codec.c): every type in every byte
 * order against byte vectors worked out by hand from the contract (design.md Part B), strings,
 * bits, round trips and refusals. */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "codec.h"

/* ---- helpers ----------------------------------------------------------------------------- */

static smp_value_t decode_ok(const uint16_t *regs, size_t n, smp_type_t type, smp_mb_order_t order)
{
    smp_value_t v;
    assert_int_equal(smp_mb_decode_regs(regs, n, type, order, -1, NULL, 0, &v), 0);
    return v;
}

static void encode_ok(smp_value_t v, smp_type_t type, smp_mb_order_t order, const uint16_t *want,
                      size_t n)
{
    uint16_t regs[8] = {0};
    assert_int_equal(smp_mb_encode_regs(&v, type, order, regs, n), 0);
    for (size_t i = 0; i < n; i++) {
        if (regs[i] != want[i]) {
            fail_msg("register %zu: got 0x%04x, want 0x%04x (order %d)", i, regs[i], want[i],
                     (int)order);
        }
    }
}

static smp_value_t val_i(int64_t i)
{
    smp_value_t v = {0};
    v.v.i = i;
    return v;
}

static smp_value_t val_u(uint64_t u)
{
    smp_value_t v = {0};
    v.v.u = u;
    return v;
}

static smp_value_t val_d(double d)
{
    smp_value_t v = {0};
    v.v.d = d;
    return v;
}

/* Independent UTF-8 check (decodes code points, unlike the codec which works on byte ranges):
 * no overlong forms, no surrogates, nothing above U+10FFFF, no truncation. */
static bool utf8_valid(const char *s, size_t len)
{
    const uint8_t *p = (const uint8_t *)s;
    size_t i = 0;
    while (i < len) {
        uint32_t cp;
        size_t n;
        if (p[i] < 0x80) {
            i++;
            continue;
        } else if ((p[i] & 0xe0) == 0xc0) {
            cp = p[i] & 0x1fu;
            n = 2;
        } else if ((p[i] & 0xf0) == 0xe0) {
            cp = p[i] & 0x0fu;
            n = 3;
        } else if ((p[i] & 0xf8) == 0xf0) {
            cp = p[i] & 0x07u;
            n = 4;
        } else {
            return false;
        }
        if (i + n > len) {
            return false;
        }
        for (size_t j = 1; j < n; j++) {
            if ((p[i + j] & 0xc0) != 0x80) {
                return false;
            }
            cp = (cp << 6) | (p[i + j] & 0x3fu);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += n;
    }
    return true;
}

static const smp_mb_order_t all_orders[] = {SMP_MB_ABCD, SMP_MB_BADC, SMP_MB_CDAB, SMP_MB_DCBA};

/* ---- sizes ------------------------------------------------------------------------------- */

static void test_type_regs(void **state)
{
    (void)state;
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_BOOL, 0), 1);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_INT16, 0), 1);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_UINT16, 0), 1);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_INT32, 0), 2);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_UINT32, 0), 2);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_FLOAT32, 0), 2);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_INT64, 0), 4);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_UINT64, 0), 4);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_FLOAT64, 0), 4);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_STRING, 10), 10);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_STRING, 125), 125);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_STRING, 0), 0);
    assert_int_equal(smp_mb_type_regs(SMP_TYPE_STRING, 126), 0);
    assert_int_equal(smp_mb_type_regs((smp_type_t)99, 0), 0);
    assert_true(smp_mb_table_is_bits(SMP_MB_COIL));
    assert_true(smp_mb_table_is_bits(SMP_MB_DISCRETE_INPUT));
    assert_false(smp_mb_table_is_bits(SMP_MB_INPUT_REGISTER));
    assert_false(smp_mb_table_is_bits(SMP_MB_HOLDING_REGISTER));
}

/* ---- 16-bit types and bool --------------------------------------------------------------- */

static void test_int16_uint16(void **state)
{
    (void)state;
    uint16_t r = 0xffff;
    assert_int_equal(decode_ok(&r, 1, SMP_TYPE_INT16, SMP_MB_ABCD).v.i, -1);
    assert_int_equal(decode_ok(&r, 1, SMP_TYPE_UINT16, SMP_MB_ABCD).v.u, 65535);
    r = 0x8000;
    assert_int_equal(decode_ok(&r, 1, SMP_TYPE_INT16, SMP_MB_ABCD).v.i, -32768);
    r = 0x1234;
    /* One register has no byte order: every order reads it big-endian. */
    for (size_t o = 0; o < 4; o++) {
        assert_int_equal(decode_ok(&r, 1, SMP_TYPE_INT16, all_orders[o]).v.i, 0x1234);
        assert_int_equal(decode_ok(&r, 1, SMP_TYPE_UINT16, all_orders[o]).v.u, 0x1234);
    }
    encode_ok(val_i(-2), SMP_TYPE_INT16, SMP_MB_ABCD, (uint16_t[]){0xfffe}, 1);
    encode_ok(val_u(0xbeef), SMP_TYPE_UINT16, SMP_MB_DCBA, (uint16_t[]){0xbeef}, 1);
}

static void test_bool_from_register(void **state)
{
    (void)state;
    smp_value_t v;
    uint16_t r = 0;
    assert_int_equal(smp_mb_decode_regs(&r, 1, SMP_TYPE_BOOL, SMP_MB_ABCD, -1, NULL, 0, &v), 0);
    assert_false(v.v.b);
    r = 0x0100; /* any non-zero register is true */
    assert_int_equal(smp_mb_decode_regs(&r, 1, SMP_TYPE_BOOL, SMP_MB_ABCD, -1, NULL, 0, &v), 0);
    assert_true(v.v.b);
}

static void test_bool_bit_extraction(void **state)
{
    (void)state;
    smp_value_t v;
    uint16_t r = 0x8101; /* bits 0, 8 and 15 */
    for (int bit = 0; bit < 16; bit++) {
        assert_int_equal(smp_mb_decode_regs(&r, 1, SMP_TYPE_BOOL, SMP_MB_ABCD, bit, NULL, 0, &v),
                         0);
        bool want = bit == 0 || bit == 8 || bit == 15;
        if (v.v.b != want) {
            fail_msg("bit %d: got %d", bit, v.v.b);
        }
    }
}

static void test_bit_apply(void **state)
{
    (void)state;
    assert_int_equal(smp_mb_bit_apply(0x0000, 3, true), 0x0008);
    assert_int_equal(smp_mb_bit_apply(0xffff, 15, false), 0x7fff);
    assert_int_equal(smp_mb_bit_apply(0xffff, 0, false), 0xfffe);
    /* Other bits are untouched, and applying twice changes nothing more. */
    assert_int_equal(smp_mb_bit_apply(0xa5a5, 1, true), 0xa5a7);
    assert_int_equal(smp_mb_bit_apply(smp_mb_bit_apply(0xa5a5, 1, true), 1, true), 0xa5a7);
    assert_int_equal(smp_mb_bit_apply(0xa5a5, 0, true), 0xa5a5);
    assert_int_equal(smp_mb_bit_apply(0xa5a5, 5, false), 0xa585);
}

static void test_bool_encode(void **state)
{
    (void)state;
    smp_value_t v = {0};
    v.v.b = true;
    encode_ok(v, SMP_TYPE_BOOL, SMP_MB_ABCD, (uint16_t[]){1}, 1);
    v.v.b = false;
    encode_ok(v, SMP_TYPE_BOOL, SMP_MB_ABCD, (uint16_t[]){0}, 1);
}

/* ---- 32-bit ------------------------------------------------------------------------------ */

static void test_float32_orders(void **state)
{
    (void)state;
    /* 12.5f = 0x41480000: A=41 B=48 C=00 D=00. */
    static const uint16_t want[4][2] = {
        [SMP_MB_ABCD] = {0x4148, 0x0000},
        [SMP_MB_BADC] = {0x4841, 0x0000},
        [SMP_MB_CDAB] = {0x0000, 0x4148},
        [SMP_MB_DCBA] = {0x0000, 0x4841},
    };
    for (size_t o = 0; o < 4; o++) {
        smp_value_t v = decode_ok(want[o], 2, SMP_TYPE_FLOAT32, all_orders[o]);
        assert_true(v.v.d == 12.5);
        encode_ok(val_d(12.5), SMP_TYPE_FLOAT32, all_orders[o], want[o], 2);
    }
}

static void test_int32_orders(void **state)
{
    (void)state;
    /* 0x12345678: A=12 B=34 C=56 D=78 */
    static const uint16_t want[4][2] = {
        [SMP_MB_ABCD] = {0x1234, 0x5678},
        [SMP_MB_BADC] = {0x3412, 0x7856},
        [SMP_MB_CDAB] = {0x5678, 0x1234},
        [SMP_MB_DCBA] = {0x7856, 0x3412},
    };
    for (size_t o = 0; o < 4; o++) {
        assert_int_equal(decode_ok(want[o], 2, SMP_TYPE_INT32, all_orders[o]).v.i, 0x12345678);
        assert_int_equal(decode_ok(want[o], 2, SMP_TYPE_UINT32, all_orders[o]).v.u, 0x12345678);
        encode_ok(val_i(0x12345678), SMP_TYPE_INT32, all_orders[o], want[o], 2);
        encode_ok(val_u(0x12345678), SMP_TYPE_UINT32, all_orders[o], want[o], 2);
    }
}

static void test_int32_sign(void **state)
{
    (void)state;
    uint16_t r[2] = {0xffff, 0xfffe};
    assert_int_equal(decode_ok(r, 2, SMP_TYPE_INT32, SMP_MB_ABCD).v.i, -2);
    assert_int_equal(decode_ok(r, 2, SMP_TYPE_UINT32, SMP_MB_ABCD).v.u, 0xfffffffeu);
    uint16_t m[2] = {0x0000, 0x8000}; /* INT32_MIN in CDAB */
    assert_int_equal(decode_ok(m, 2, SMP_TYPE_INT32, SMP_MB_CDAB).v.i, INT32_MIN);
    encode_ok(val_i(INT32_MIN), SMP_TYPE_INT32, SMP_MB_CDAB, m, 2);
}

/* ---- 64-bit ------------------------------------------------------------------------------ */

static void test_64bit_orders(void **state)
{
    (void)state;
    /* 0x0102030405060708: A=01 ... H=08. The contract's extension of the letters:
     * ABCD = ABCDEFGH, CDAB = GHEFCDAB, BADC = BADCFEHG, DCBA = HGFEDCBA. */
    static const uint16_t want[4][4] = {
        [SMP_MB_ABCD] = {0x0102, 0x0304, 0x0506, 0x0708},
        [SMP_MB_BADC] = {0x0201, 0x0403, 0x0605, 0x0807},
        [SMP_MB_CDAB] = {0x0708, 0x0506, 0x0304, 0x0102},
        [SMP_MB_DCBA] = {0x0807, 0x0605, 0x0403, 0x0201},
    };
    for (size_t o = 0; o < 4; o++) {
        assert_true(decode_ok(want[o], 4, SMP_TYPE_UINT64, all_orders[o]).v.u ==
                    0x0102030405060708ull);
        assert_true(decode_ok(want[o], 4, SMP_TYPE_INT64, all_orders[o]).v.i ==
                    0x0102030405060708ll);
        encode_ok(val_u(0x0102030405060708ull), SMP_TYPE_UINT64, all_orders[o], want[o], 4);
        encode_ok(val_i(0x0102030405060708ll), SMP_TYPE_INT64, all_orders[o], want[o], 4);
    }
}

static void test_float64_orders(void **state)
{
    (void)state;
    /* 1.5 = 0x3FF8000000000000 */
    static const uint16_t want[4][4] = {
        [SMP_MB_ABCD] = {0x3ff8, 0, 0, 0},
        [SMP_MB_BADC] = {0xf83f, 0, 0, 0},
        [SMP_MB_CDAB] = {0, 0, 0, 0x3ff8},
        [SMP_MB_DCBA] = {0, 0, 0, 0xf83f},
    };
    for (size_t o = 0; o < 4; o++) {
        assert_true(decode_ok(want[o], 4, SMP_TYPE_FLOAT64, all_orders[o]).v.d == 1.5);
        encode_ok(val_d(1.5), SMP_TYPE_FLOAT64, all_orders[o], want[o], 4);
    }
}

static void test_64bit_extremes(void **state)
{
    (void)state;
    uint16_t ones[4] = {0xffff, 0xffff, 0xffff, 0xffff};
    assert_true(decode_ok(ones, 4, SMP_TYPE_INT64, SMP_MB_DCBA).v.i == -1);
    assert_true(decode_ok(ones, 4, SMP_TYPE_UINT64, SMP_MB_ABCD).v.u == UINT64_MAX);
    uint16_t min[4] = {0x8000, 0, 0, 0};
    assert_true(decode_ok(min, 4, SMP_TYPE_INT64, SMP_MB_ABCD).v.i == INT64_MIN);
    encode_ok(val_i(INT64_MIN), SMP_TYPE_INT64, SMP_MB_ABCD, min, 4);
}

/* ---- round trips and ranges --------------------------------------------------------------- */

static void test_round_trips(void **state)
{
    (void)state;
    static const struct {
        smp_type_t type;
        size_t n;
        smp_value_t v;
    } cases[] = {
        {SMP_TYPE_INT16, 1, {.v.i = -12345}},
        {SMP_TYPE_UINT16, 1, {.v.u = 54321}},
        {SMP_TYPE_INT32, 2, {.v.i = -123456789}},
        {SMP_TYPE_UINT32, 2, {.v.u = 4000000000u}},
        {SMP_TYPE_INT64, 4, {.v.i = -1234567890123456789ll}},
        {SMP_TYPE_UINT64, 4, {.v.u = 18000000000000000000ull}},
        {SMP_TYPE_FLOAT32, 2, {.v.d = -0.15625}},
        {SMP_TYPE_FLOAT64, 4, {.v.d = 3.141592653589793}},
    };
    for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
        for (size_t o = 0; o < 4; o++) {
            uint16_t regs[4];
            smp_value_t back;
            assert_int_equal(
                smp_mb_encode_regs(&cases[c].v, cases[c].type, all_orders[o], regs, cases[c].n), 0);
            assert_int_equal(smp_mb_decode_regs(regs, cases[c].n, cases[c].type, all_orders[o], -1,
                                                NULL, 0, &back),
                             0);
            assert_memory_equal(&back.v, &cases[c].v.v, sizeof(back.v));
        }
    }
    /* float32 narrows: 0.1 comes back as the float nearest to it. */
    uint16_t regs[2];
    smp_value_t v = val_d(0.1), back;
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_FLOAT32, SMP_MB_CDAB, regs, 2), 0);
    assert_int_equal(smp_mb_decode_regs(regs, 2, SMP_TYPE_FLOAT32, SMP_MB_CDAB, -1, NULL, 0, &back),
                     0);
    assert_true(back.v.d == (double)0.1f);
}

static void test_encode_range(void **state)
{
    (void)state;
    uint16_t regs[4];
    smp_value_t v = val_i(32768);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_INT16, SMP_MB_ABCD, regs, 1), -ERANGE);
    v = val_i(-32769);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_INT16, SMP_MB_ABCD, regs, 1), -ERANGE);
    v = val_u(65536);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_UINT16, SMP_MB_ABCD, regs, 1), -ERANGE);
    v = val_i(2147483648ll);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_INT32, SMP_MB_ABCD, regs, 2), -ERANGE);
    v = val_u(4294967296ull);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_UINT32, SMP_MB_ABCD, regs, 2), -ERANGE);
    v = val_d(1e39);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_FLOAT32, SMP_MB_ABCD, regs, 2), -ERANGE);
    v = val_d(-1e39);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_FLOAT32, SMP_MB_ABCD, regs, 2), -ERANGE);
    /* The edges themselves fit. */
    v = val_i(-32768);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_INT16, SMP_MB_ABCD, regs, 1), 0);
    assert_int_equal(regs[0], 0x8000);
    v = val_u(65535);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_UINT16, SMP_MB_ABCD, regs, 1), 0);
    assert_int_equal(regs[0], 0xffff);
}

static void test_refusals(void **state)
{
    (void)state;
    uint16_t regs[4] = {0};
    smp_value_t v = {0};
    char buf[64];
    /* Register count must match the type. */
    assert_int_equal(smp_mb_decode_regs(regs, 1, SMP_TYPE_FLOAT32, SMP_MB_ABCD, -1, NULL, 0, &v),
                     -EINVAL);
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_INT64, SMP_MB_ABCD, regs, 2), -EINVAL);
    /* bit is for bool only, and only 0..15. */
    assert_int_equal(smp_mb_decode_regs(regs, 1, SMP_TYPE_INT16, SMP_MB_ABCD, 3, NULL, 0, &v),
                     -EINVAL);
    assert_int_equal(smp_mb_decode_regs(regs, 1, SMP_TYPE_BOOL, SMP_MB_ABCD, 16, NULL, 0, &v),
                     -EINVAL);
    /* Strings: only ABCD/BADC, and a big enough buffer. */
    assert_int_equal(
        smp_mb_decode_regs(regs, 2, SMP_TYPE_STRING, SMP_MB_CDAB, -1, buf, sizeof(buf), &v),
        -EINVAL);
    assert_int_equal(
        smp_mb_decode_regs(regs, 2, SMP_TYPE_STRING, SMP_MB_DCBA, -1, buf, sizeof(buf), &v),
        -EINVAL);
    assert_int_equal(smp_mb_decode_regs(regs, 2, SMP_TYPE_STRING, SMP_MB_ABCD, -1, buf, 12, &v),
                     -EINVAL);
    assert_int_equal(smp_mb_decode_regs(regs, 2, SMP_TYPE_STRING, SMP_MB_ABCD, -1, NULL, 0, &v),
                     -EINVAL);
    assert_int_equal(
        smp_mb_decode_regs(regs, 1, SMP_TYPE_INT16, (smp_mb_order_t)7, -1, NULL, 0, &v), -EINVAL);
    v.s = "ab";
    v.len = 2;
    assert_int_equal(smp_mb_encode_regs(&v, SMP_TYPE_STRING, SMP_MB_CDAB, regs, 2), -EINVAL);
}

/* ---- strings ----------------------------------------------------------------------------- */

static smp_value_t decode_str(const uint16_t *regs, size_t n, smp_mb_order_t order, char *buf,
                              size_t size)
{
    smp_value_t v;
    assert_int_equal(smp_mb_decode_regs(regs, n, SMP_TYPE_STRING, order, -1, buf, size, &v), 0);
    assert_ptr_equal(v.s, buf);
    assert_int_equal(v.s[v.len], '\0');
    assert_true(utf8_valid(v.s, v.len));
    return v;
}

static void test_string_basic_and_trim(void **state)
{
    (void)state;
    char buf[64];
    uint16_t hello[3] = {0x4845, 0x4c4c, 0x4f00}; /* "HELLO\0" */
    smp_value_t v = decode_str(hello, 3, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 5);
    assert_string_equal(v.s, "HELLO");

    uint16_t spaces[4] = {0x4142, 0x2020, 0x0020, 0x2000}; /* "AB  \0  \0": all trailing */
    v = decode_str(spaces, 4, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 2);
    assert_string_equal(v.s, "AB");

    uint16_t inner[3] = {0x4120, 0x4200, 0x0000}; /* inner space kept */
    v = decode_str(inner, 3, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 3);
    assert_string_equal(v.s, "A B");

    uint16_t empty[2] = {0x0000, 0x2020};
    v = decode_str(empty, 2, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 0);
    assert_string_equal(v.s, "");
}

static void test_string_badc(void **state)
{
    (void)state;
    char buf[64];
    uint16_t hello[3] = {0x4548, 0x4c4c, 0x004f}; /* "EHLL\0O" swapped in pairs */
    smp_value_t v = decode_str(hello, 3, SMP_MB_BADC, buf, sizeof(buf));
    assert_int_equal(v.len, 5);
    assert_string_equal(v.s, "HELLO");

    uint16_t regs[3];
    smp_value_t in = {0};
    in.s = "HELLO";
    in.len = 5;
    assert_int_equal(smp_mb_encode_regs(&in, SMP_TYPE_STRING, SMP_MB_BADC, regs, 3), 0);
    assert_memory_equal(regs, hello, sizeof(hello));
    assert_int_equal(smp_mb_encode_regs(&in, SMP_TYPE_STRING, SMP_MB_ABCD, regs, 3), 0);
    assert_int_equal(regs[0], 0x4845);
    assert_int_equal(regs[1], 0x4c4c);
    assert_int_equal(regs[2], 0x4f00); /* padded with NUL */
}

static void test_string_encode_limits(void **state)
{
    (void)state;
    uint16_t regs[2] = {0xaaaa, 0xaaaa};
    smp_value_t in = {0};
    in.s = "ABCDE";
    in.len = 5;
    assert_int_equal(smp_mb_encode_regs(&in, SMP_TYPE_STRING, SMP_MB_ABCD, regs, 2), -ERANGE);
    in.len = 4;
    assert_int_equal(smp_mb_encode_regs(&in, SMP_TYPE_STRING, SMP_MB_ABCD, regs, 2), 0);
    assert_int_equal(regs[0], 0x4142);
    assert_int_equal(regs[1], 0x4344);
    in.s = NULL;
    in.len = 0; /* the empty string clears the registers */
    assert_int_equal(smp_mb_encode_regs(&in, SMP_TYPE_STRING, SMP_MB_ABCD, regs, 2), 0);
    assert_int_equal(regs[0], 0);
    assert_int_equal(regs[1], 0);
}

static void test_string_invalid_utf8(void **state)
{
    (void)state;
    char buf[64];
    /* A lone 0xFF between ASCII letters. */
    uint16_t ff[2] = {0x41ff, 0x4200};
    smp_value_t v = decode_str(ff, 2, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 5);
    assert_memory_equal(v.s,
                        "A\xef\xbf\xbd"
                        "B",
                        5);

    /* Valid two-byte UTF-8 passes through: "é" = C3 A9. */
    uint16_t e[1] = {0xc3a9};
    v = decode_str(e, 1, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 2);
    assert_memory_equal(v.s, "\xc3\xa9", 2);

    /* A sequence cut short by the end of the string: one replacement for E2 82. */
    uint16_t cut[2] = {0x41e2, 0x8200};
    v = decode_str(cut, 2, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 4);
    assert_memory_equal(v.s, "A\xef\xbf\xbd", 4);

    /* Overlong C0 80: C0 can never start a sequence, 80 is a lone continuation byte. */
    uint16_t overlong[1] = {0xc080};
    v = decode_str(overlong, 1, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 6);
    assert_memory_equal(v.s, "\xef\xbf\xbd\xef\xbf\xbd", 6);

    /* A UTF-16 surrogate encoded in UTF-8 (ED A0 80) is not UTF-8: three replacements. */
    uint16_t sur[2] = {0xeda0, 0x8041};
    v = decode_str(sur, 2, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 10);
    assert_memory_equal(v.s,
                        "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
                        "A",
                        10);

    /* A broken sequence does not swallow the ASCII byte that broke it. */
    uint16_t broken[1] = {0xe241};
    v = decode_str(broken, 1, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 4);
    assert_memory_equal(v.s,
                        "\xef\xbf\xbd"
                        "A",
                        4);

    /* A four-byte sequence (U+1F600) passes; F4 90 (above U+10FFFF) does not. */
    uint16_t emoji[3] = {0xf09f, 0x9880, 0xf490};
    v = decode_str(emoji, 3, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 10);
    assert_memory_equal(v.s, "\xf0\x9f\x98\x80\xef\xbf\xbd\xef\xbf\xbd", 10);
}

static void test_string_embedded_nul_kept(void **state)
{
    (void)state;
    char buf[64];
    /* Only trailing NULs are trimmed; an inner one is part of the value (len says so). */
    uint16_t r[3] = {0x4100, 0x4200, 0x0000};
    smp_value_t v = decode_str(r, 3, SMP_MB_ABCD, buf, sizeof(buf));
    assert_int_equal(v.len, 3);
    assert_memory_equal(v.s, "A\0B", 3);
}

/* Every register pattern, in both string orders, comes out as valid UTF-8 within the documented
 * buffer size. A deterministic generator keeps failures reproducible. */
static void test_string_always_valid_utf8(void **state)
{
    (void)state;
    uint32_t x = 0x12345678u;
    char buf[6 * 8 + 1];
    assert_int_equal(smp_mb_string_bufsize(8), sizeof(buf));
    for (int iter = 0; iter < 20000; iter++) {
        uint16_t regs[8];
        size_t n = 1 + (size_t)(iter % 8);
        for (size_t i = 0; i < n; i++) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            /* Bias towards the interesting bytes: continuation, leads, NUL, space. */
            static const uint8_t pick[] = {0x80, 0xbf, 0xc2, 0xe0, 0xed, 0xf0, 0xf4,
                                           0xff, 0x00, 0x20, 0x41, 0xa0, 0x9f, 0x90};
            uint8_t hi = (x & 1) ? (uint8_t)(x >> 8) : pick[(x >> 8) % sizeof(pick)];
            uint8_t lo = (x & 2) ? (uint8_t)(x >> 16) : pick[(x >> 16) % sizeof(pick)];
            regs[i] = (uint16_t)((hi << 8) | lo);
        }
        smp_value_t v;
        smp_mb_order_t order = (iter & 1) ? SMP_MB_BADC : SMP_MB_ABCD;
        assert_int_equal(smp_mb_decode_regs(regs, n, SMP_TYPE_STRING, order, -1, buf,
                                            smp_mb_string_bufsize((unsigned)n), &v),
                         0);
        assert_true(v.len < smp_mb_string_bufsize((unsigned)n));
        if (!utf8_valid(v.s, v.len)) {
            fail_msg("iteration %d produced invalid UTF-8", iter);
        }
        assert_false(v.len > 0 && (v.s[v.len - 1] == ' ' || v.s[v.len - 1] == '\0'));
    }
}

static void test_string_worst_case_size(void **state)
{
    (void)state;
    /* 125 registers of 0xFFFF: 250 replacements, the largest output there is. */
    uint16_t regs[125];
    for (size_t i = 0; i < 125; i++) {
        regs[i] = 0xffff;
    }
    size_t size = smp_mb_string_bufsize(125);
    char *buf = test_malloc(size);
    smp_value_t v;
    assert_int_equal(smp_mb_decode_regs(regs, 125, SMP_TYPE_STRING, SMP_MB_ABCD, -1, buf, size, &v),
                     0);
    assert_int_equal(v.len, 750);
    assert_int_equal(size, 751);
    test_free(buf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_regs),
        cmocka_unit_test(test_int16_uint16),
        cmocka_unit_test(test_bool_from_register),
        cmocka_unit_test(test_bool_bit_extraction),
        cmocka_unit_test(test_bit_apply),
        cmocka_unit_test(test_bool_encode),
        cmocka_unit_test(test_float32_orders),
        cmocka_unit_test(test_int32_orders),
        cmocka_unit_test(test_int32_sign),
        cmocka_unit_test(test_64bit_orders),
        cmocka_unit_test(test_float64_orders),
        cmocka_unit_test(test_64bit_extremes),
        cmocka_unit_test(test_round_trips),
        cmocka_unit_test(test_encode_range),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_string_basic_and_trim),
        cmocka_unit_test(test_string_badc),
        cmocka_unit_test(test_string_encode_limits),
        cmocka_unit_test(test_string_invalid_utf8),
        cmocka_unit_test(test_string_embedded_nul_kept),
        cmocka_unit_test(test_string_always_valid_utf8),
        cmocka_unit_test(test_string_worst_case_size),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
