#include "value.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool scaled(const smp_tag_cfg_t *tag)
{
    return tag->scale != 1.0 || tag->offset != 0.0;
}

/* Decimal places of a number as a person wrote it in the config (0.1 -> 1, 0.25 -> 2). */
static int decimals_of(double x)
{
    char buf[64];
    int n = snprintf(buf, sizeof buf, "%.15g", fabs(x));
    const char *dot = memchr(buf, '.', (size_t)n);
    if (dot == NULL || strchr(buf, 'e') != NULL) {
        return strchr(buf, 'e') != NULL ? -1 : 0;
    }
    return (int)(buf + n - dot - 1);
}

/* raw * 0.1 is 34.800000000000004 in binary floating point; the engineer who wrote scale 0.1
 * means 34.8. A scaled integer is rounded to the decimals its scale and offset carry. */
static int scale_decimals(const smp_tag_cfg_t *tag)
{
    int a = decimals_of(tag->scale), b = decimals_of(tag->offset);
    if (a < 0 || b < 0) {
        return -1; /* exponent notation: leave the value alone */
    }
    return a > b ? a : b;
}

static double round_to_decimals(double d, int decimals)
{
    if (decimals < 0 || decimals > 15 || fabs(d) >= 1e15) {
        return d;
    }
    char buf[64];
    snprintf(buf, sizeof buf, "%.*f", decimals, d);
    return strtod(buf, NULL);
}

int smp_eval_from_raw(const smp_tag_cfg_t *tag, const smp_value_t *raw, smp_eval_t *out)
{
    memset(out, 0, sizeof *out);
    double d = 0;
    bool numeric = true;
    switch (tag->type) {
    case SMP_TYPE_BOOL:
        out->kind = SMP_EV_BOOL;
        out->b = raw->v.b;
        return 0;
    case SMP_TYPE_STRING: {
        char *s = malloc(raw->len + 1);
        if (s == NULL) {
            return -ENOMEM;
        }
        if (raw->len > 0) {
            memcpy(s, raw->s, raw->len);
        }
        s[raw->len] = '\0';
        out->kind = SMP_EV_STRING;
        out->s = s;
        return 0;
    }
    case SMP_TYPE_INT16:
    case SMP_TYPE_INT32:
    case SMP_TYPE_INT64:
        if (!scaled(tag)) {
            out->kind = SMP_EV_INT;
            out->i = raw->v.i;
            return 0;
        }
        d = (double)raw->v.i;
        break;
    case SMP_TYPE_UINT16:
    case SMP_TYPE_UINT32:
    case SMP_TYPE_UINT64:
        if (!scaled(tag)) {
            out->kind = SMP_EV_UINT;
            out->u = raw->v.u;
            return 0;
        }
        d = (double)raw->v.u;
        break;
    case SMP_TYPE_FLOAT32:
        if (!scaled(tag)) {
            if (!isfinite(raw->v.d)) {
                return -EDOM;
            }
            out->kind = SMP_EV_FLOAT32;
            out->d = (double)(float)raw->v.d;
            return 0;
        }
        d = raw->v.d;
        break;
    case SMP_TYPE_FLOAT64:
        d = raw->v.d;
        break;
    default:
        numeric = false;
        break;
    }
    if (!numeric) {
        return -EINVAL;
    }
    d = d * tag->scale + tag->offset;
    if (isfinite(d) && tag->type != SMP_TYPE_FLOAT32 && tag->type != SMP_TYPE_FLOAT64) {
        /* Only an integer raw value has no digits beyond what scale and offset give it. */
        d = round_to_decimals(d, scale_decimals(tag));
    }
    if (!isfinite(d)) {
        return -EDOM;
    }
    out->kind = SMP_EV_DOUBLE;
    out->d = d;
    return 0;
}

void smp_eval_clear(smp_eval_t *v)
{
    if (v->kind == SMP_EV_STRING) {
        free(v->s);
    }
    memset(v, 0, sizeof *v);
}

int smp_eval_copy(smp_eval_t *dst, const smp_eval_t *src)
{
    *dst = *src;
    if (src->kind == SMP_EV_STRING) {
        dst->s = strdup(src->s);
        if (dst->s == NULL) {
            dst->kind = SMP_EV_NONE;
            return -ENOMEM;
        }
    }
    return 0;
}

bool smp_eval_as_double(const smp_eval_t *v, double *out)
{
    switch (v->kind) {
    case SMP_EV_BOOL:
        *out = v->b ? 1.0 : 0.0;
        return true;
    case SMP_EV_INT:
        *out = (double)v->i;
        return true;
    case SMP_EV_UINT:
        *out = (double)v->u;
        return true;
    case SMP_EV_FLOAT32:
    case SMP_EV_DOUBLE:
        *out = v->d;
        return true;
    default:
        return false;
    }
}

bool smp_eval_changed(const smp_tag_cfg_t *tag, const smp_eval_t *last, const smp_eval_t *now)
{
    if (last->kind != now->kind || last->kind == SMP_EV_NONE) {
        return true;
    }
    switch (now->kind) {
    case SMP_EV_BOOL:
        return last->b != now->b;
    case SMP_EV_STRING:
        return strcmp(last->s, now->s) != 0;
    case SMP_EV_INT:
        if (tag->deadband <= 0) {
            return last->i != now->i;
        }
        break;
    case SMP_EV_UINT:
        if (tag->deadband <= 0) {
            return last->u != now->u;
        }
        break;
    default:
        if (tag->deadband <= 0) {
            return last->d != now->d;
        }
        break;
    }
    double a = 0, b = 0;
    smp_eval_as_double(last, &a);
    smp_eval_as_double(now, &b);
    /* "Beyond the deadband": a change of exactly the deadband is not reported. */
    return fabs(b - a) > tag->deadband;
}

int smp_format_float32(float f, char *buf, size_t n)
{
    /* Whole numbers print without an exponent ("10", not "1e+01"). Otherwise the shortest of
     * %.1g .. %.9g that reads back to the same float32; 9 digits always do. */
    if (f == nearbyintf(f) && fabsf(f) < 1e16f) {
        return snprintf(buf, n, "%.0f", (double)f);
    }
    int len = 0;
    for (int prec = 1; prec <= 9; prec++) {
        len = snprintf(buf, n, "%.*g", prec, (double)f);
        if (strtof(buf, NULL) == f) {
            break;
        }
    }
    return len;
}

int smp_format_double(double d, char *buf, size_t n)
{
    if (d == nearbyint(d) && fabs(d) < 1e16) {
        return snprintf(buf, n, "%.0f", d);
    }
    int len = 0;
    for (int prec = 1; prec <= 17; prec++) {
        len = snprintf(buf, n, "%.*g", prec, d);
        if (strtod(buf, NULL) == d) {
            break;
        }
    }
    return len;
}

size_t smp_eval_to_json(const smp_eval_t *v, char *buf, size_t n)
{
    smp_buf_t b;
    smp_buf_init(&b);
    smp_buf_eval(&b, v);
    size_t len = b.len;
    if (n > 0) {
        size_t c = len < n - 1 ? len : n - 1;
        if (c > 0) {
            memcpy(buf, b.p, c);
        }
        buf[c] = '\0';
    }
    smp_buf_free(&b);
    return len;
}

int smp_eval_from_json(const smp_tag_cfg_t *tag, const char *text, smp_eval_t *out)
{
    memset(out, 0, sizeof *out);
    char *end = NULL;
    if (text == NULL) {
        return -EINVAL;
    }
    if (tag->type == SMP_TYPE_BOOL) {
        if (strcmp(text, "true") == 0 || strcmp(text, "false") == 0) {
            out->kind = SMP_EV_BOOL;
            out->b = text[0] == 't';
            return 0;
        }
        return -EINVAL;
    }
    if (tag->type == SMP_TYPE_STRING) {
        /* Stored strings are JSON literals written by smp_buf_json_string; decode the escapes
         * that function produces. */
        size_t len = strlen(text);
        if (len < 2 || text[0] != '"' || text[len - 1] != '"') {
            return -EINVAL;
        }
        char *s = malloc(len);
        if (s == NULL) {
            return -ENOMEM;
        }
        size_t o = 0;
        for (size_t k = 1; k + 1 < len; k++) {
            char c = text[k];
            if (c == '\\' && k + 2 < len) {
                char e = text[++k];
                switch (e) {
                case 'n':
                    c = '\n';
                    break;
                case 't':
                    c = '\t';
                    break;
                case 'r':
                    c = '\r';
                    break;
                case 'b':
                    c = '\b';
                    break;
                case 'f':
                    c = '\f';
                    break;
                case 'u':
                    if (k + 4 < len) {
                        unsigned cp = (unsigned)strtoul(
                            (char[5]){text[k + 1], text[k + 2], text[k + 3], text[k + 4], 0}, NULL,
                            16);
                        k += 4;
                        c = cp < 0x80 ? (char)cp : '?';
                    }
                    break;
                default:
                    c = e;
                    break;
                }
            }
            s[o++] = c;
        }
        s[o] = '\0';
        out->kind = SMP_EV_STRING;
        out->s = s;
        return 0;
    }
    errno = 0;
    if (!scaled(tag) && (tag->type == SMP_TYPE_INT16 || tag->type == SMP_TYPE_INT32 ||
                         tag->type == SMP_TYPE_INT64)) {
        long long i = strtoll(text, &end, 10);
        if (errno != 0 || end == text || *end != '\0') {
            return -EINVAL;
        }
        out->kind = SMP_EV_INT;
        out->i = i;
        return 0;
    }
    if (!scaled(tag) && (tag->type == SMP_TYPE_UINT16 || tag->type == SMP_TYPE_UINT32 ||
                         tag->type == SMP_TYPE_UINT64)) {
        if (text[0] == '-') {
            return -EINVAL;
        }
        unsigned long long u = strtoull(text, &end, 10);
        if (errno != 0 || end == text || *end != '\0') {
            return -EINVAL;
        }
        out->kind = SMP_EV_UINT;
        out->u = u;
        return 0;
    }
    double d = strtod(text, &end);
    if (end == text || *end != '\0' || !isfinite(d)) {
        return -EINVAL;
    }
    out->kind = (!scaled(tag) && tag->type == SMP_TYPE_FLOAT32) ? SMP_EV_FLOAT32 : SMP_EV_DOUBLE;
    out->d = out->kind == SMP_EV_FLOAT32 ? (double)(float)d : d;
    return 0;
}

/* ---- string buffer ---- */

void smp_buf_init(smp_buf_t *b)
{
    memset(b, 0, sizeof *b);
}

void smp_buf_free(smp_buf_t *b)
{
    free(b->p);
    memset(b, 0, sizeof *b);
}

void smp_buf_reset(smp_buf_t *b)
{
    b->len = 0;
    b->oom = false;
    if (b->p != NULL) {
        b->p[0] = '\0';
    }
}

static bool reserve(smp_buf_t *b, size_t extra)
{
    if (b->oom) {
        return false;
    }
    if (b->len + extra + 1 <= b->cap) {
        return true;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra + 1) {
        cap *= 2;
    }
    char *p = realloc(b->p, cap);
    if (p == NULL) {
        b->oom = true;
        return false;
    }
    b->p = p;
    b->cap = cap;
    return true;
}

void smp_buf_add(smp_buf_t *b, const char *s, size_t n)
{
    if (!reserve(b, n)) {
        return;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void smp_buf_puts(smp_buf_t *b, const char *s)
{
    smp_buf_add(b, s, strlen(s));
}

void smp_buf_printf(smp_buf_t *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char tmp[256];
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) {
        return;
    }
    if ((size_t)n < sizeof tmp) {
        smp_buf_add(b, tmp, (size_t)n);
        return;
    }
    if (!reserve(b, (size_t)n)) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* Length of the valid UTF-8 sequence at s (max n bytes), or 0 if invalid. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80) {
        return 1;
    } else if ((c & 0xE0) == 0xC0) {
        len = 2;
        min = 0x80;
        c &= 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
        len = 3;
        min = 0x800;
        c &= 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
        len = 4;
        min = 0x10000;
        c &= 0x07;
    } else {
        return 0;
    }
    if (len > n) {
        return 0;
    }
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) {
            return 0;
        }
        c = (c << 6) | (s[k] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) {
        return 0;
    }
    return len;
}

void smp_buf_json_string(smp_buf_t *b, const char *str, size_t n)
{
    const unsigned char *s = (const unsigned char *)str;
    smp_buf_add(b, "\"", 1);
    size_t run = 0; /* start of a run of bytes copied verbatim */
    size_t k = 0;
    while (k < n) {
        unsigned c = s[k];
        const char *esc = NULL;
        char ubuf[8];
        size_t adv = 1;
        if (c == '"') {
            esc = "\\\"";
        } else if (c == '\\') {
            esc = "\\\\";
        } else if (c == '\n') {
            esc = "\\n";
        } else if (c == '\r') {
            esc = "\\r";
        } else if (c == '\t') {
            esc = "\\t";
        } else if (c < 0x20 || c == 0x7F) {
            snprintf(ubuf, sizeof ubuf, "\\u%04x", c);
            esc = ubuf;
        } else if (c >= 0x80) {
            adv = utf8_len(s + k, n - k);
            if (adv == 0) {
                esc = "\xEF\xBF\xBD"; /* U+FFFD for a byte that is not valid UTF-8 */
                adv = 1;
            }
        }
        if (esc != NULL) {
            smp_buf_add(b, str + run, k - run);
            smp_buf_puts(b, esc);
            run = k + adv;
        }
        k += adv;
    }
    smp_buf_add(b, str + run, n - run);
    smp_buf_add(b, "\"", 1);
}

void smp_buf_eval(smp_buf_t *b, const smp_eval_t *v)
{
    char tmp[64];
    switch (v->kind) {
    case SMP_EV_BOOL:
        smp_buf_puts(b, v->b ? "true" : "false");
        break;
    case SMP_EV_INT:
        smp_buf_printf(b, "%" PRId64, v->i);
        break;
    case SMP_EV_UINT:
        smp_buf_printf(b, "%" PRIu64, v->u);
        break;
    case SMP_EV_FLOAT32:
        smp_format_float32((float)v->d, tmp, sizeof tmp);
        smp_buf_puts(b, tmp);
        break;
    case SMP_EV_DOUBLE:
        smp_format_double(v->d, tmp, sizeof tmp);
        smp_buf_puts(b, tmp);
        break;
    case SMP_EV_STRING:
        smp_buf_json_string(b, v->s, strlen(v->s));
        break;
    default:
        smp_buf_puts(b, "null");
        break;
    }
}
