/* jsonpos: a second, position-recording pass over a JSON text (see jsonpos.h).
 *
 * The scanner is a small recursive-descent parser. Recursion is capped at
 * SMP_JSONPOS_MAX_DEPTH; anything deeper is skipped by an iterative loop, so a hostile input of a
 * million '[' cannot exhaust the stack. Positions are kept in an open-addressing hash table keyed
 * by path, so the config loader's many lookups stay cheap on large files. */
#include "jsonpos.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct entry {
    char *path; /* NULL: free slot */
    uint32_t hash;
    bool has_key;
    uint32_t obj;            /* serial of the object the key belongs to; duplicates share it */
    smp_jsonpos_loc_t key;   /* the last occurrence of the key */
    smp_jsonpos_loc_t first; /* the first occurrence of the key */
    smp_jsonpos_loc_t val;
} entry_t;

struct smp_jsonpos {
    entry_t *slots;
    size_t cap; /* power of two */
    size_t used;
    smp_jsonpos_dup_t *dups;
    size_t ndups, dups_cap;
};

typedef struct scanner {
    const char *s;
    size_t len;
    size_t i;          /* next byte */
    uint32_t line;     /* line of s[i] */
    uint32_t chars;    /* characters consumed on the current line: the column of s[i] - 1 */
    smp_jsonpos_t *jp; /* NULL: do not record (path_at mode) */
    char path[SMP_JSONPOS_MAX_PATH + 1];
    size_t plen;
    unsigned over; /* > 0 while the path is too long to record */
    unsigned depth;
    uint32_t next_obj;
    bool stop_mode; /* path_at: stop at the token ending at or after stop_at */
    size_t stop_at;
    bool stopped;                             /* a syntax error, the stop token, or out of memory */
    char stop_path[SMP_JSONPOS_MAX_PATH + 1]; /* the path when it stopped */
    int err;                                  /* -ENOMEM when recording failed */
} scanner_t;

/* ---- hash table ------------------------------------------------------------------------- */

static uint32_t hash_str(const char *s)
{
    /* FNV-1a: short keys, no adversarial concern beyond cost, and the table grows anyway. */
    uint32_t h = 2166136261u;
    for (; *s != '\0'; s++) {
        h ^= (unsigned char)*s;
        h *= 16777619u;
    }
    return h;
}

static entry_t *find_slot(entry_t *slots, size_t cap, const char *path, uint32_t h)
{
    size_t mask = cap - 1;
    for (size_t i = h & mask;; i = (i + 1) & mask) {
        entry_t *e = &slots[i];
        if (e->path == NULL || (e->hash == h && strcmp(e->path, path) == 0)) {
            return e;
        }
    }
}

static int grow(smp_jsonpos_t *jp)
{
    size_t ncap = jp->cap ? jp->cap * 2 : 64;
    entry_t *ns = calloc(ncap, sizeof *ns);
    if (ns == NULL) {
        return -ENOMEM;
    }
    for (size_t i = 0; i < jp->cap; i++) {
        if (jp->slots[i].path != NULL) {
            *find_slot(ns, ncap, jp->slots[i].path, jp->slots[i].hash) = jp->slots[i];
        }
    }
    free(jp->slots);
    jp->slots = ns;
    jp->cap = ncap;
    return 0;
}

/* Finds or creates the entry for `path`. NULL on allocation failure. */
static entry_t *upsert(smp_jsonpos_t *jp, const char *path, bool *created)
{
    if ((jp->used + 1) * 10 > jp->cap * 7 && grow(jp) != 0) {
        return NULL;
    }
    uint32_t h = hash_str(path);
    entry_t *e = find_slot(jp->slots, jp->cap, path, h);
    *created = e->path == NULL;
    if (*created) {
        e->path = strdup(path);
        if (e->path == NULL) {
            return NULL;
        }
        e->hash = h;
        jp->used++;
    }
    return e;
}

static const entry_t *lookup(const smp_jsonpos_t *jp, const char *path)
{
    if (jp == NULL || jp->cap == 0 || path == NULL) {
        return NULL;
    }
    const entry_t *e = find_slot(jp->slots, jp->cap, path, hash_str(path));
    return e->path != NULL ? e : NULL;
}

/* ---- scanner primitives ------------------------------------------------------------------ */

static smp_jsonpos_loc_t here(const scanner_t *sc)
{
    return (smp_jsonpos_loc_t){.line = sc->line, .col = sc->chars + 1};
}

static int peek(const scanner_t *sc)
{
    return sc->i < sc->len ? (unsigned char)sc->s[sc->i] : -1;
}

static void adv(scanner_t *sc)
{
    unsigned char c = (unsigned char)sc->s[sc->i++];
    if (c == '\n') {
        sc->line++;
        sc->chars = 0;
    } else if ((c & 0xC0) != 0x80) {
        /* Count lead bytes only: a column is a character, as in jansson. */
        sc->chars++;
    }
}

static void skip_ws(scanner_t *sc)
{
    for (int c = peek(sc); c == ' ' || c == '\t' || c == '\n' || c == '\r'; c = peek(sc)) {
        adv(sc);
    }
}

/* Stops the scan, remembering where: the recursion unwinds the path afterwards. */
static bool fail(scanner_t *sc)
{
    if (!sc->stopped) {
        memcpy(sc->stop_path, sc->path, sc->plen + 1);
        sc->stopped = true;
    }
    return false;
}

/* Called after a token [start, sc->i) was consumed: in path_at mode, stops when this is the
 * token jansson complained about. */
static bool token_done(scanner_t *sc)
{
    if (sc->stop_mode && sc->i >= sc->stop_at) {
        return fail(sc);
    }
    return true;
}

static bool recording(const scanner_t *sc)
{
    return sc->jp != NULL && sc->over == 0 && !sc->stopped;
}

/* Appends ".key" (or "key" at the root) or "[i]". Returns the length to restore, or SIZE_MAX
 * when the path became too long (nothing below it is recorded). */
static size_t path_push(scanner_t *sc, const char *part, size_t n, bool is_key)
{
    size_t need = n + (is_key && sc->plen > 0 ? 1 : 0);
    if (sc->over > 0 || sc->plen + need > SMP_JSONPOS_MAX_PATH || memchr(part, '\0', n) != NULL) {
        sc->over++;
        return SIZE_MAX;
    }
    size_t old = sc->plen;
    if (is_key && sc->plen > 0) {
        sc->path[sc->plen++] = '.';
    }
    memcpy(sc->path + sc->plen, part, n);
    sc->plen += n;
    sc->path[sc->plen] = '\0';
    return old;
}

static void path_pop(scanner_t *sc, size_t old)
{
    if (old == SIZE_MAX) {
        sc->over--;
        return;
    }
    sc->plen = old;
    sc->path[old] = '\0';
}

static bool oom(scanner_t *sc)
{
    sc->err = -ENOMEM;
    return fail(sc);
}

static bool record_value(scanner_t *sc, smp_jsonpos_loc_t loc)
{
    if (!recording(sc)) {
        return true;
    }
    bool created;
    entry_t *e = upsert(sc->jp, sc->path, &created);
    if (e == NULL) {
        return oom(sc);
    }
    e->val = loc;
    return true;
}

static bool record_key(scanner_t *sc, smp_jsonpos_loc_t loc, uint32_t obj)
{
    if (!recording(sc)) {
        return true;
    }
    bool created;
    smp_jsonpos_t *jp = sc->jp;
    entry_t *e = upsert(jp, sc->path, &created);
    if (e == NULL) {
        return oom(sc);
    }
    if (!created && e->has_key && e->obj == obj) {
        if (jp->ndups == jp->dups_cap) {
            size_t ncap = jp->dups_cap ? jp->dups_cap * 2 : 8;
            smp_jsonpos_dup_t *nd = realloc(jp->dups, ncap * sizeof *nd);
            if (nd == NULL) {
                return oom(sc);
            }
            jp->dups = nd;
            jp->dups_cap = ncap;
        }
        char *p = strdup(sc->path);
        if (p == NULL) {
            return oom(sc);
        }
        jp->dups[jp->ndups++] = (smp_jsonpos_dup_t){.path = p, .at = loc, .first = e->first};
    } else {
        /* A new key, or the same path reached through another object (a key repeated in the
         * parent, whose last value jansson keeps): start afresh. */
        e->first = loc;
        e->obj = obj;
    }
    e->has_key = true;
    e->key = loc;
    return true;
}

static int hexval(int c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

static bool read_u4(scanner_t *sc, unsigned *out)
{
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(peek(sc));
        if (h < 0) {
            return false;
        }
        v = v * 16 + (unsigned)h;
        adv(sc);
    }
    *out = v;
    return true;
}

static void put(char *buf, size_t cap, size_t *n, bool *trunc, const char *src, size_t k)
{
    if (buf == NULL) {
        return;
    }
    if (*n + k > cap) {
        *trunc = true;
        return;
    }
    memcpy(buf + *n, src, k);
    *n += k;
}

/* Reads a string token at '"'. When buf is non-NULL, decodes it into buf (cap bytes, not
 * terminated) and sets *n; *trunc is set when it did not fit. Escapes are checked the way
 * jansson checks them, so both agree on what is valid. */
static bool read_string(scanner_t *sc, char *buf, size_t cap, size_t *n, bool *trunc)
{
    size_t dummy_n = 0;
    bool dummy_t = false;
    if (n == NULL) {
        n = &dummy_n;
        trunc = &dummy_t;
    }
    *n = 0;
    *trunc = false;
    adv(sc); /* the opening quote */
    for (;;) {
        int c = peek(sc);
        if (c < 0 || c < 0x20) {
            return fail(sc); /* unterminated, or a raw control character */
        }
        if (c == '"') {
            adv(sc);
            return token_done(sc);
        }
        if (c != '\\') {
            char ch = (char)c;
            put(buf, cap, n, trunc, &ch, 1);
            adv(sc);
            continue;
        }
        adv(sc);
        c = peek(sc);
        if (c < 0) {
            return fail(sc);
        }
        const char *simple = NULL;
        switch (c) {
        case '"':
            simple = "\"";
            break;
        case '\\':
            simple = "\\";
            break;
        case '/':
            simple = "/";
            break;
        case 'b':
            simple = "\b";
            break;
        case 'f':
            simple = "\f";
            break;
        case 'n':
            simple = "\n";
            break;
        case 'r':
            simple = "\r";
            break;
        case 't':
            simple = "\t";
            break;
        case 'u':
            break;
        default:
            return fail(sc);
        }
        adv(sc);
        if (simple != NULL) {
            put(buf, cap, n, trunc, simple, 1);
            continue;
        }
        unsigned cp;
        if (!read_u4(sc, &cp)) {
            return fail(sc);
        }
        if (cp >= 0xDC00 && cp <= 0xDFFF) {
            return fail(sc); /* a lone low surrogate */
        }
        if (cp >= 0xD800 && cp <= 0xDBFF) {
            unsigned lo;
            if (peek(sc) != '\\') {
                return fail(sc);
            }
            adv(sc);
            if (peek(sc) != 'u') {
                return fail(sc);
            }
            adv(sc);
            if (!read_u4(sc, &lo) || lo < 0xDC00 || lo > 0xDFFF) {
                return fail(sc);
            }
            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        }
        if (cp == 0) {
            return fail(sc); /* jansson refuses \u0000 unless JSON_ALLOW_NUL */
        }
        char u[4];
        size_t k;
        if (cp < 0x80) {
            u[0] = (char)cp;
            k = 1;
        } else if (cp < 0x800) {
            u[0] = (char)(0xC0 | (cp >> 6));
            u[1] = (char)(0x80 | (cp & 0x3F));
            k = 2;
        } else if (cp < 0x10000) {
            u[0] = (char)(0xE0 | (cp >> 12));
            u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
            u[2] = (char)(0x80 | (cp & 0x3F));
            k = 3;
        } else {
            u[0] = (char)(0xF0 | (cp >> 18));
            u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
            u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
            u[3] = (char)(0x80 | (cp & 0x3F));
            k = 4;
        }
        put(buf, cap, n, trunc, u, k);
    }
}

static bool is_digit(int c)
{
    return c >= '0' && c <= '9';
}

static bool read_number(scanner_t *sc)
{
    if (peek(sc) == '-') {
        adv(sc);
    }
    if (peek(sc) == '0') {
        adv(sc);
    } else if (is_digit(peek(sc))) {
        while (is_digit(peek(sc))) {
            adv(sc);
        }
    } else {
        return fail(sc);
    }
    if (peek(sc) == '.') {
        adv(sc);
        if (!is_digit(peek(sc))) {
            return fail(sc);
        }
        while (is_digit(peek(sc))) {
            adv(sc);
        }
    }
    if (peek(sc) == 'e' || peek(sc) == 'E') {
        adv(sc);
        if (peek(sc) == '+' || peek(sc) == '-') {
            adv(sc);
        }
        if (!is_digit(peek(sc))) {
            return fail(sc);
        }
        while (is_digit(peek(sc))) {
            adv(sc);
        }
    }
    return token_done(sc);
}

static bool read_literal(scanner_t *sc, const char *word)
{
    size_t n = strlen(word);
    if (sc->len - sc->i < n || memcmp(sc->s + sc->i, word, n) != 0) {
        return fail(sc);
    }
    for (size_t k = 0; k < n; k++) {
        adv(sc);
    }
    return token_done(sc);
}

/* A punctuation token. */
static bool punct(scanner_t *sc)
{
    adv(sc);
    return token_done(sc);
}

/* Skips one value without recording anything below it; iterative so depth costs no stack. The
 * structure is checked loosely: this only runs past SMP_JSONPOS_MAX_DEPTH, where a config has
 * nothing the loader would ask about. */
static bool skip_value(scanner_t *sc)
{
    size_t d = 0;
    do {
        skip_ws(sc);
        int c = peek(sc);
        if (c < 0) {
            return fail(sc);
        }
        if (c == '"') {
            if (!read_string(sc, NULL, 0, NULL, NULL)) {
                return false;
            }
        } else if (c == '[' || c == '{') {
            d++;
            if (!punct(sc)) {
                return false;
            }
        } else if (c == ']' || c == '}') {
            if (d == 0) {
                return fail(sc);
            }
            d--;
            if (!punct(sc)) {
                return false;
            }
        } else if (c == ',' || c == ':') {
            if (d == 0) {
                return fail(sc);
            }
            if (!punct(sc)) {
                return false;
            }
        } else if (c == '-' || is_digit(c)) {
            if (!read_number(sc)) {
                return false;
            }
        } else if (c == 't' || c == 'f' || c == 'n') {
            if (!read_literal(sc, c == 't' ? "true" : c == 'f' ? "false" : "null")) {
                return false;
            }
        } else {
            return fail(sc);
        }
    } while (d > 0);
    return true;
}

static bool parse_value(scanner_t *sc);

/* After a member of an object or array: 1 when a ',' says another member follows, 0 when
 * `close` ended the container, -1 on a syntax error. */
static int next_member(scanner_t *sc, int close)
{
    skip_ws(sc);
    int c = peek(sc);
    if (c == ',') {
        return punct(sc) ? 1 : -1;
    }
    if (c == close) {
        return punct(sc) ? 0 : -1;
    }
    fail(sc);
    return -1;
}

static bool parse_object(scanner_t *sc)
{
    uint32_t obj = ++sc->next_obj;
    if (!punct(sc)) { /* '{' */
        return false;
    }
    skip_ws(sc);
    if (peek(sc) == '}') {
        return punct(sc);
    }
    for (;;) {
        skip_ws(sc);
        if (peek(sc) != '"') {
            return fail(sc);
        }
        smp_jsonpos_loc_t kloc = here(sc);
        char key[SMP_JSONPOS_MAX_PATH + 1];
        size_t klen;
        bool trunc;
        if (!read_string(sc, key, sizeof key - 1, &klen, &trunc)) {
            return false;
        }
        skip_ws(sc);
        if (peek(sc) != ':') {
            return fail(sc);
        }
        if (!punct(sc)) {
            return false;
        }
        /* A key too long to decode whole cannot be looked up: record nothing below it. */
        size_t saved = trunc ? (sc->over++, SIZE_MAX) : path_push(sc, key, klen, true);
        bool ok = record_key(sc, kloc, obj) && parse_value(sc);
        path_pop(sc, saved);
        if (!ok) {
            return false;
        }
        int more = next_member(sc, '}');
        if (more <= 0) {
            return more == 0;
        }
    }
}

static bool parse_array(scanner_t *sc)
{
    if (!punct(sc)) { /* '[' */
        return false;
    }
    skip_ws(sc);
    if (peek(sc) == ']') {
        return punct(sc);
    }
    for (size_t idx = 0;; idx++) {
        char part[32];
        int k = snprintf(part, sizeof part, "[%zu]", idx);
        size_t saved = path_push(sc, part, (size_t)k, false);
        bool ok = parse_value(sc);
        path_pop(sc, saved);
        if (!ok) {
            return false;
        }
        int more = next_member(sc, ']');
        if (more <= 0) {
            return more == 0;
        }
    }
}

static bool parse_value(scanner_t *sc)
{
    skip_ws(sc);
    if (sc->depth >= SMP_JSONPOS_MAX_DEPTH) {
        return skip_value(sc);
    }
    if (!record_value(sc, here(sc))) {
        return false;
    }
    int c = peek(sc);
    bool ok;
    sc->depth++;
    switch (c) {
    case '{':
        ok = parse_object(sc);
        break;
    case '[':
        ok = parse_array(sc);
        break;
    case '"':
        ok = read_string(sc, NULL, 0, NULL, NULL);
        break;
    case 't':
        ok = read_literal(sc, "true");
        break;
    case 'f':
        ok = read_literal(sc, "false");
        break;
    case 'n':
        ok = read_literal(sc, "null");
        break;
    default:
        ok = (c == '-' || is_digit(c)) ? read_number(sc) : fail(sc);
        break;
    }
    sc->depth--;
    return ok;
}

static void scanner_init(scanner_t *sc, const char *text, size_t len)
{
    memset(sc, 0, sizeof *sc);
    sc->s = text;
    sc->len = text != NULL ? len : 0;
    sc->line = 1;
}

/* ---- public ------------------------------------------------------------------------------ */

int smp_jsonpos_scan(const char *text, size_t len, smp_jsonpos_t **out)
{
    *out = NULL;
    smp_jsonpos_t *jp = calloc(1, sizeof *jp);
    if (jp == NULL) {
        return -ENOMEM;
    }
    scanner_t *sc = malloc(sizeof *sc);
    if (sc == NULL) {
        free(jp);
        return -ENOMEM;
    }
    scanner_init(sc, text, len);
    sc->jp = jp;
    if (parse_value(sc)) {
        /* Trailing garbage is jansson's to report; positions recorded so far stay valid. */
        skip_ws(sc);
    }
    int err = sc->err;
    free(sc);
    if (err != 0) {
        smp_jsonpos_free(jp);
        return err;
    }
    *out = jp;
    return 0;
}

bool smp_jsonpos_key(const smp_jsonpos_t *jp, const char *path, smp_jsonpos_loc_t *loc)
{
    const entry_t *e = lookup(jp, path);
    if (e == NULL || !e->has_key) {
        return false;
    }
    *loc = e->key;
    return true;
}

bool smp_jsonpos_value(const smp_jsonpos_t *jp, const char *path, smp_jsonpos_loc_t *loc)
{
    const entry_t *e = lookup(jp, path);
    if (e == NULL || e->val.line == 0) {
        return false;
    }
    *loc = e->val;
    return true;
}

size_t smp_jsonpos_ndups(const smp_jsonpos_t *jp)
{
    return jp != NULL ? jp->ndups : 0;
}

const smp_jsonpos_dup_t *smp_jsonpos_dup(const smp_jsonpos_t *jp, size_t i)
{
    return jp != NULL && i < jp->ndups ? &jp->dups[i] : NULL;
}

void smp_jsonpos_path_at(const char *text, size_t len, size_t offset, char *buf, size_t n)
{
    scanner_t *sc = malloc(sizeof *sc);
    if (sc == NULL) {
        if (n > 0) {
            buf[0] = '\0';
        }
        return;
    }
    scanner_init(sc, text, len);
    sc->stop_mode = true;
    sc->stop_at = offset;
    /* When the whole value parses, the problem lies after it: at the root. */
    const char *p = parse_value(sc) ? "" : sc->stop_path;
    if (n > 0) {
        size_t k = strlen(p);
        k = k < n - 1 ? k : n - 1;
        memcpy(buf, p, k);
        buf[k] = '\0';
    }
    free(sc);
}

void smp_jsonpos_free(smp_jsonpos_t *jp)
{
    if (jp == NULL) {
        return;
    }
    for (size_t i = 0; i < jp->cap; i++) {
        free(jp->slots[i].path);
    }
    free(jp->slots);
    for (size_t i = 0; i < jp->ndups; i++) {
        free((char *)jp->dups[i].path);
    }
    free(jp->dups);
    free(jp);
}
