/* Engineering values: the host's side of a tag value.
 *
 * A driver returns raw values (smp_value_t). The host applies scale and offset
 * (value = raw * scale + offset), keeps the result as an smp_eval_t, compares it against the
 * last reported value with the tag's deadband, and prints it as JSON exactly as the contract
 * says: integers exact (64-bit included) when no scaling applies, float32 with the shortest
 * text that reads back to the same float32, float64 likewise for doubles, and NaN/infinity
 * refused (they are not JSON). For writes the conversion runs backwards. */
#ifndef SMP_VALUE_H
#define SMP_VALUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <simpul/plugin.h>

#include "config.h"

typedef enum smp_eval_kind {
    SMP_EV_NONE = 0,
    SMP_EV_BOOL,
    SMP_EV_INT,     /* i */
    SMP_EV_UINT,    /* u */
    SMP_EV_FLOAT32, /* d holds a float32 value exactly */
    SMP_EV_DOUBLE,  /* d */
    SMP_EV_STRING,  /* s (owned, NUL-terminated, valid UTF-8) */
} smp_eval_kind_t;

/* One value of the kind named by `kind` (16 bytes: a gateway keeps two per tag). */
typedef struct smp_eval {
    smp_eval_kind_t kind;
    union {
        bool b;
        int64_t i;
        uint64_t u;
        double d;
        char *s;
    };
} smp_eval_t;

/* Converts a raw reading of `tag` into an engineering value. Returns 0, or -EDOM when the
 * result is NaN or infinite (out is then SMP_EV_NONE), or -ENOMEM. out must be freed with
 * smp_eval_clear. */
int smp_eval_from_raw(const smp_tag_cfg_t *tag, const smp_value_t *raw, smp_eval_t *out);
/* Frees a string value and resets to SMP_EV_NONE. */
void smp_eval_clear(smp_eval_t *v);
/* Deep copy; returns 0 or -ENOMEM. */
int smp_eval_copy(smp_eval_t *dst, const smp_eval_t *src);
/* True when `now` differs from `last` by more than the tag's deadband (any difference when the
 * deadband is 0; a change of kind or a NONE `last` always counts). */
bool smp_eval_changed(const smp_tag_cfg_t *tag, const smp_eval_t *last, const smp_eval_t *now);
/* Numeric view (bool as 0/1); false for strings and NONE. */
bool smp_eval_as_double(const smp_eval_t *v, double *out);

/* Appends the value's JSON text to buf. Returns the number of bytes the full text needs
 * (like snprintf); the text is complete when the return value < n. */
size_t smp_eval_to_json(const smp_eval_t *v, char *buf, size_t n);
/* Parses JSON text produced by smp_eval_to_json back (restoring the state cache at start).
 * `tag` chooses the kind. Returns 0 or -EINVAL. */
int smp_eval_from_json(const smp_tag_cfg_t *tag, const char *text, smp_eval_t *out);

/* Shortest decimal text that reads back to the same float32 / double. Returns the length. */
int smp_format_float32(float f, char *buf, size_t n);
int smp_format_double(double d, char *buf, size_t n);

/* A growable string buffer for building payloads. */
typedef struct smp_buf {
    char *p;
    size_t len, cap;
    bool oom;
} smp_buf_t;
void smp_buf_init(smp_buf_t *b);
void smp_buf_free(smp_buf_t *b);
/* Empties b for reuse, keeping its memory (and clearing an out-of-memory mark). */
void smp_buf_reset(smp_buf_t *b);
void smp_buf_add(smp_buf_t *b, const char *s, size_t n);
void smp_buf_puts(smp_buf_t *b, const char *s);
void smp_buf_printf(smp_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends s as a JSON string literal (quotes, escapes; invalid UTF-8 bytes become U+FFFD). */
void smp_buf_json_string(smp_buf_t *b, const char *s, size_t n);
void smp_buf_eval(smp_buf_t *b, const smp_eval_t *v);

#endif
