/* jsonpos: where things are in a JSON text.
 *
 * jansson parses a config into values but forgets where each value came from, and it silently
 * keeps the last of two equal keys. The config loader must point at the offending line and
 * column of every problem and must refuse duplicate keys, so this small scanner walks the same
 * text a second time and records, for every object key and every value, its LINE:COL under a
 * path such as "devices[2].connection.port".
 *
 * Paths. A key of the root object is its own path ("mqtt"); a key below adds ".key"
 * ("mqtt.port"); an array element adds "[i]" ("devices[0]"). The root value has the path "".
 * Keys are used as decoded (escapes resolved), exactly as jansson hands them out, so a caller
 * that builds the same string while walking the json_t tree finds the position. Paths longer
 * than SMP_JSONPOS_MAX_PATH bytes and values nested deeper than SMP_JSONPOS_MAX_DEPTH are not
 * recorded (their lookups fail, and callers fall back to an enclosing path): this bounds the
 * memory a hostile input can make the scanner use.
 *
 * Positions. LINE and COL are 1-based; COL counts UTF-8 characters, not bytes, as jansson's
 * json_error_t does, so the two sources of positions agree. A key's position is its opening
 * quote; a value's is its first character.
 *
 * The scanner never reads outside [text, text + len) and never fails on malformed input: it
 * records what it has seen up to the first syntax error and stops. It is meant to run on text
 * jansson accepted; smp_jsonpos_path_at() serves the case where jansson did not. */
#ifndef SMP_JSONPOS_H
#define SMP_JSONPOS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define SMP_JSONPOS_MAX_PATH  1024
#define SMP_JSONPOS_MAX_DEPTH 64

typedef struct smp_jsonpos_loc {
    uint32_t line; /* 1-based */
    uint32_t col;  /* 1-based, in UTF-8 characters */
} smp_jsonpos_loc_t;

/* A key that appeared twice (or more) in one object. Each repetition after the first is one
 * entry; `first` is where the key appeared the first time. */
typedef struct smp_jsonpos_dup {
    const char *path; /* owned by the smp_jsonpos_t */
    smp_jsonpos_loc_t at;
    smp_jsonpos_loc_t first;
} smp_jsonpos_dup_t;

typedef struct smp_jsonpos smp_jsonpos_t;

/* Scans `text` (len bytes, need not be NUL-terminated; borrowed for the call only).
 * Returns 0 and *out (free with smp_jsonpos_free), or -ENOMEM. */
int smp_jsonpos_scan(const char *text, size_t len, smp_jsonpos_t **out);

/* Position of the key whose path is `path`. False when the path was not recorded or names an
 * array element or the root (which have no key). */
bool smp_jsonpos_key(const smp_jsonpos_t *jp, const char *path, smp_jsonpos_loc_t *loc);

/* Position of the value at `path` (for duplicate keys: of the last one, the value jansson
 * keeps). False when the path was not recorded. */
bool smp_jsonpos_value(const smp_jsonpos_t *jp, const char *path, smp_jsonpos_loc_t *loc);

/* Duplicate keys, in document order. */
size_t smp_jsonpos_ndups(const smp_jsonpos_t *jp);
const smp_jsonpos_dup_t *smp_jsonpos_dup(const smp_jsonpos_t *jp, size_t i);

/* For text jansson refused: writes into buf (size n, always NUL-terminated when n > 0) the path
 * of the innermost value the scanner was in when it reached the token that ends at or after
 * byte offset `offset` (jansson's json_error_t.position), or hit a syntax error of its own,
 * whichever came first. Gives "" when the problem is at the root. Never fails. */
void smp_jsonpos_path_at(const char *text, size_t len, size_t offset, char *buf, size_t n);

/* smp_jsonpos_free(NULL) is a no-op. */
void smp_jsonpos_free(smp_jsonpos_t *jp);

#endif
