/* Modbus value codec (see codec.h). */
#include "codec.h"

#include <errno.h>
#include <float.h>
#include <math.h>
#include <string.h>

bool smp_mb_table_is_bits(smp_mb_table_t table)
{
    return table == SMP_MB_COIL || table == SMP_MB_DISCRETE_INPUT;
}

const char *smp_mb_table_name(smp_mb_table_t table)
{
    switch (table) {
    case SMP_MB_COIL:
        return "coil";
    case SMP_MB_DISCRETE_INPUT:
        return "discrete_input";
    case SMP_MB_INPUT_REGISTER:
        return "input_register";
    case SMP_MB_HOLDING_REGISTER:
        return "holding_register";
    default:
        return "?";
    }
}

unsigned smp_mb_type_regs(smp_type_t type, unsigned length)
{
    switch (type) {
    case SMP_TYPE_BOOL:
    case SMP_TYPE_INT16:
    case SMP_TYPE_UINT16:
        return 1;
    case SMP_TYPE_INT32:
    case SMP_TYPE_UINT32:
    case SMP_TYPE_FLOAT32:
        return 2;
    case SMP_TYPE_INT64:
    case SMP_TYPE_UINT64:
    case SMP_TYPE_FLOAT64:
        return 4;
    case SMP_TYPE_STRING:
        return length >= 1 && length <= SMP_MB_STRING_MAX_REGS ? length : 0;
    }
    return 0;
}

size_t smp_mb_string_bufsize(unsigned length)
{
    return (size_t)length * 2 * 3 + 1;
}

uint16_t smp_mb_bit_apply(uint16_t reg, unsigned bit, bool value)
{
    uint16_t mask = (uint16_t)(1u << (bit & 15u));
    return value ? (uint16_t)(reg | mask) : (uint16_t)(reg & ~mask);
}

/* The value byte (0 = most significant, "A") that travels at wire position p (0 = high byte of
 * the first register) in a value of n bytes. Every order is its own inverse, so the same map
 * serves decoding and encoding. */
static size_t value_index(size_t p, size_t n, smp_mb_order_t order)
{
    switch (order) {
    case SMP_MB_BADC:
        return p ^ 1u;
    case SMP_MB_CDAB: {
        /* Registers in reverse order, bytes inside each register unchanged. */
        size_t nregs = n / 2;
        return (nregs - 1 - p / 2) * 2 + (p & 1u);
    }
    case SMP_MB_DCBA:
        return n - 1 - p;
    case SMP_MB_ABCD:
    default:
        return p;
    }
}

/* Registers -> value bytes, most significant first. */
static void regs_to_bytes(const uint16_t *regs, size_t nregs, smp_mb_order_t order, uint8_t *out)
{
    size_t n = nregs * 2;
    for (size_t p = 0; p < n; p++) {
        uint16_t r = regs[p / 2];
        uint8_t wire = (p & 1u) ? (uint8_t)(r & 0xffu) : (uint8_t)(r >> 8);
        out[value_index(p, n, order)] = wire;
    }
}

/* Value bytes, most significant first -> registers. */
static void bytes_to_regs(const uint8_t *in, size_t nregs, smp_mb_order_t order, uint16_t *regs)
{
    size_t n = nregs * 2;
    for (size_t r = 0; r < nregs; r++) {
        uint8_t hi = in[value_index(2 * r, n, order)];
        uint8_t lo = in[value_index(2 * r + 1, n, order)];
        regs[r] = (uint16_t)((hi << 8) | lo);
    }
}

static uint64_t bytes_to_u64(const uint8_t *b, size_t n)
{
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        v = (v << 8) | b[i];
    }
    return v;
}

static void u64_to_bytes(uint64_t v, uint8_t *b, size_t n)
{
    for (size_t i = n; i-- > 0;) {
        b[i] = (uint8_t)(v & 0xffu);
        v >>= 8;
    }
}

/* Appends U+FFFD (EF BF BD). */
static size_t put_replacement(char *out, size_t o)
{
    out[o++] = (char)0xef;
    out[o++] = (char)0xbf;
    out[o++] = (char)0xbd;
    return o;
}

size_t smp_mb_utf8_sanitize(const uint8_t *in, size_t len, char *out)
{
    size_t i = 0, o = 0;
    while (i < len) {
        uint8_t b = in[i];
        if (b < 0x80) {
            out[o++] = (char)b;
            i++;
            continue;
        }
        /* Well-formed sequences per Unicode table 3-7: the lead byte fixes the number of
         * continuation bytes and the range of the first one (which excludes overlong forms,
         * surrogates and code points above U+10FFFF). */
        unsigned need;
        uint8_t lo = 0x80, hi = 0xbf;
        if (b >= 0xc2 && b <= 0xdf) {
            need = 1;
        } else if (b == 0xe0) {
            need = 2;
            lo = 0xa0;
        } else if (b == 0xed) {
            need = 2;
            hi = 0x9f;
        } else if (b >= 0xe1 && b <= 0xef) {
            need = 2;
        } else if (b == 0xf0) {
            need = 3;
            lo = 0x90;
        } else if (b >= 0xf1 && b <= 0xf3) {
            need = 3;
        } else if (b == 0xf4) {
            need = 3;
            hi = 0x8f;
        } else {
            o = put_replacement(out, o);
            i++;
            continue;
        }
        size_t j = i + 1;
        unsigned got = 0;
        while (got < need && j < len) {
            uint8_t c = in[j];
            uint8_t clo = got == 0 ? lo : 0x80;
            uint8_t chi = got == 0 ? hi : 0xbf;
            if (c < clo || c > chi) {
                break;
            }
            j++;
            got++;
        }
        if (got == need) {
            memcpy(out + o, in + i, j - i);
            o += j - i;
        } else {
            /* One replacement for the whole maximal subpart; the byte that broke the sequence
             * is examined afresh as a possible lead byte. */
            o = put_replacement(out, o);
        }
        i = j;
    }
    out[o] = '\0';
    return o;
}

static int decode_string(const uint16_t *regs, size_t nregs, smp_mb_order_t order, char *strbuf,
                         size_t strsize, smp_value_t *out)
{
    if (order != SMP_MB_ABCD && order != SMP_MB_BADC) {
        return -EINVAL;
    }
    if (strbuf == NULL || strsize < smp_mb_string_bufsize((unsigned)nregs)) {
        return -EINVAL;
    }
    uint8_t raw[SMP_MB_STRING_MAX_REGS * 2];
    regs_to_bytes(regs, nregs, order, raw);
    size_t n = nregs * 2;
    while (n > 0 && (raw[n - 1] == '\0' || raw[n - 1] == ' ')) {
        n--;
    }
    out->len = smp_mb_utf8_sanitize(raw, n, strbuf);
    out->s = strbuf;
    return 0;
}

int smp_mb_decode_regs(const uint16_t *regs, size_t nregs, smp_type_t type, smp_mb_order_t order,
                       int bit, char *strbuf, size_t strsize, smp_value_t *out)
{
    if (regs == NULL || out == NULL || (unsigned)order >= SMP_MB_NORDERS) {
        return -EINVAL;
    }
    unsigned want = smp_mb_type_regs(type, type == SMP_TYPE_STRING ? (unsigned)nregs : 0);
    if (want == 0 || want != nregs || nregs > SMP_MB_STRING_MAX_REGS) {
        return -EINVAL;
    }
    if (bit != -1 && (type != SMP_TYPE_BOOL || bit < 0 || bit > 15)) {
        return -EINVAL;
    }
    memset(out, 0, sizeof(*out));

    if (type == SMP_TYPE_STRING) {
        return decode_string(regs, nregs, order, strbuf, strsize, out);
    }
    if (type == SMP_TYPE_BOOL) {
        out->v.b = bit < 0 ? regs[0] != 0 : ((regs[0] >> bit) & 1u) != 0;
        return 0;
    }

    uint8_t b[8];
    /* Single-register types have no byte order in the contract: a register is big-endian. */
    regs_to_bytes(regs, nregs, nregs == 1 ? SMP_MB_ABCD : order, b);
    uint64_t u = bytes_to_u64(b, nregs * 2);

    switch (type) {
    case SMP_TYPE_INT16:
        out->v.i = (int16_t)(uint16_t)u;
        break;
    case SMP_TYPE_UINT16:
    case SMP_TYPE_UINT32:
    case SMP_TYPE_UINT64:
        out->v.u = u;
        break;
    case SMP_TYPE_INT32:
        out->v.i = (int32_t)(uint32_t)u;
        break;
    case SMP_TYPE_INT64:
        out->v.i = (int64_t)u;
        break;
    case SMP_TYPE_FLOAT32: {
        uint32_t w = (uint32_t)u;
        float f;
        memcpy(&f, &w, sizeof(f));
        out->v.d = (double)f;
        break;
    }
    case SMP_TYPE_FLOAT64: {
        double d;
        memcpy(&d, &u, sizeof(d));
        out->v.d = d;
        break;
    }
    default:
        return -EINVAL;
    }
    return 0;
}

/* The raw bit pattern of a numeric value, or -ERANGE when it does not fit the type. */
static int numeric_bits(const smp_value_t *in, smp_type_t type, uint64_t *u)
{
    switch (type) {
    case SMP_TYPE_BOOL:
        *u = in->v.b ? 1u : 0u;
        return 0;
    case SMP_TYPE_INT16:
        if (in->v.i < INT16_MIN || in->v.i > INT16_MAX) {
            return -ERANGE;
        }
        *u = (uint16_t)(int16_t)in->v.i;
        return 0;
    case SMP_TYPE_UINT16:
        if (in->v.u > UINT16_MAX) {
            return -ERANGE;
        }
        *u = in->v.u;
        return 0;
    case SMP_TYPE_INT32:
        if (in->v.i < INT32_MIN || in->v.i > INT32_MAX) {
            return -ERANGE;
        }
        *u = (uint32_t)(int32_t)in->v.i;
        return 0;
    case SMP_TYPE_UINT32:
        if (in->v.u > UINT32_MAX) {
            return -ERANGE;
        }
        *u = in->v.u;
        return 0;
    case SMP_TYPE_INT64:
        *u = (uint64_t)in->v.i;
        return 0;
    case SMP_TYPE_UINT64:
        *u = in->v.u;
        return 0;
    case SMP_TYPE_FLOAT32: {
        double d = in->v.d;
        /* A finite double beyond float32's range would silently become infinity. */
        if (isfinite(d) && (d > FLT_MAX || d < -FLT_MAX)) {
            return -ERANGE;
        }
        float f = (float)d;
        uint32_t w;
        memcpy(&w, &f, sizeof(w));
        *u = w;
        return 0;
    }
    case SMP_TYPE_FLOAT64: {
        uint64_t w;
        memcpy(&w, &in->v.d, sizeof(w));
        *u = w;
        return 0;
    }
    default:
        return -EINVAL;
    }
}

int smp_mb_encode_regs(const smp_value_t *in, smp_type_t type, smp_mb_order_t order, uint16_t *regs,
                       size_t nregs)
{
    if (in == NULL || regs == NULL || (unsigned)order >= SMP_MB_NORDERS) {
        return -EINVAL;
    }
    unsigned want = smp_mb_type_regs(type, type == SMP_TYPE_STRING ? (unsigned)nregs : 0);
    if (want == 0 || want != nregs || nregs > SMP_MB_STRING_MAX_REGS) {
        return -EINVAL;
    }

    uint8_t b[SMP_MB_STRING_MAX_REGS * 2];
    if (type == SMP_TYPE_STRING) {
        if (order != SMP_MB_ABCD && order != SMP_MB_BADC) {
            return -EINVAL;
        }
        if (in->len > nregs * 2) {
            return -ERANGE;
        }
        if (in->len > 0 && in->s == NULL) {
            return -EINVAL;
        }
        memset(b, 0, nregs * 2);
        if (in->len > 0) {
            memcpy(b, in->s, in->len);
        }
        bytes_to_regs(b, nregs, order, regs);
        return 0;
    }

    uint64_t u;
    int rc = numeric_bits(in, type, &u);
    if (rc < 0) {
        return rc;
    }
    u64_to_bytes(u, b, nregs * 2);
    bytes_to_regs(b, nregs, nregs == 1 ? SMP_MB_ABCD : order, regs);
    return 0;
}
