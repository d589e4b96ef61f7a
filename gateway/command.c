/* Operator commands: parsing, validation, at-most-once execution, results and audit. */
#include "command.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "store.h"
#include "value.h"

static void set_err(smp_cmd_error_t *err, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(smp_cmd_error_t *err, const char *code, const char *fmt, ...)
{
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------------------------------ */
/* Parsing                                                                                     */

static bool name_ok(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max) {
        return false;
    }
    for (size_t k = 0; k < n; k++) {
        char c = s[k];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-')) {
            return false;
        }
    }
    return true;
}

void smp_cmd_free(smp_cmd_t *cmd)
{
    if (cmd == NULL) {
        return;
    }
    json_decref(cmd->value);
    cmd->value = NULL;
    for (size_t k = 0; k < cmd->ntags; k++) {
        free(cmd->tags[k]);
    }
    free(cmd->tags);
    cmd->tags = NULL;
    cmd->ntags = 0;
}

static int get_int_field(json_t *root, const char *key, int64_t *out, bool *has, int64_t min,
                         smp_cmd_error_t *err)
{
    json_t *v = json_object_get(root, key);
    *has = false;
    if (v == NULL) {
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < min) {
        set_err(err, "bad_request", "%s must be an integer >= %" PRId64, key, min);
        return -EINVAL;
    }
    *out = json_integer_value(v);
    *has = true;
    return 0;
}

/* The id first, so that every later error can be answered with it. */
static int parse_id(json_t *root, smp_cmd_t *out, smp_cmd_error_t *err)
{
    json_t *id = json_object_get(root, "id");
    if (json_is_string(id) && json_string_length(id) >= 1 &&
        json_string_length(id) <= SMP_CMD_ID_MAX &&
        strlen(json_string_value(id)) == json_string_length(id)) {
        snprintf(out->id, sizeof out->id, "%s", json_string_value(id));
        out->has_id = true;
        return 0;
    }
    set_err(err, "bad_request", "id must be a string of 1 to %d characters", SMP_CMD_ID_MAX);
    return -EINVAL;
}

static int check_keys(json_t *root, smp_cmd_error_t *err)
{
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val)
    {
        static const char *const known[] = {"id",     "op",   "tag", "value", "tags", "ts",
                                            "ttl_ms", "from", "to",  "limit", NULL};
        bool ok = false;
        for (size_t k = 0; known[k] != NULL; k++) {
            ok = ok || strcmp(known[k], key) == 0;
        }
        if (!ok) {
            set_err(err, "bad_request", "unknown key '%.64s'", key);
            return -EINVAL;
        }
    }
    return 0;
}

static int parse_op(json_t *root, smp_cmd_t *out, smp_cmd_error_t *err)
{
    json_t *op = json_object_get(root, "op");
    const char *ops = json_is_string(op) ? json_string_value(op) : NULL;
    if (ops != NULL && strcmp(ops, "write") == 0) {
        out->op = SMP_CMD_WRITE;
        out->op_name = "write";
    } else if (ops != NULL && strcmp(ops, "read") == 0) {
        out->op = SMP_CMD_READ;
        out->op_name = "read";
    } else if (ops != NULL && strcmp(ops, "history") == 0) {
        out->op = SMP_CMD_HISTORY;
        out->op_name = "history";
    } else {
        set_err(err, "bad_request", "op must be \"write\", \"read\" or \"history\"");
        return -EINVAL;
    }
    return 0;
}

/* tag (write, history) or tags (read), value (write), and no key of another op. */
static int parse_operands(json_t *root, smp_cmd_t *out, smp_cmd_error_t *err)
{
    json_t *tag = json_object_get(root, "tag");
    json_t *value = json_object_get(root, "value");
    json_t *tags = json_object_get(root, "tags");
    bool wants_tag = out->op != SMP_CMD_READ;
    if (wants_tag) {
        if (!json_is_string(tag) || !name_ok(json_string_value(tag), sizeof out->tag - 1)) {
            set_err(err, "bad_request", "tag must be a tag name");
            return -EINVAL;
        }
        snprintf(out->tag, sizeof out->tag, "%s", json_string_value(tag));
        if (tags != NULL) {
            set_err(err, "bad_request", "tags is for op \"read\"");
            return -EINVAL;
        }
    } else if (tag != NULL) {
        set_err(err, "bad_request", "op \"read\" takes tags, not tag");
        return -EINVAL;
    }
    if (out->op == SMP_CMD_WRITE) {
        if (value == NULL) {
            set_err(err, "bad_request", "value is required for op \"write\"");
            return -EINVAL;
        }
        if (json_is_object(value) || json_is_array(value) || json_is_null(value)) {
            set_err(err, "bad_request", "value must be a number, a boolean or a string");
            return -EINVAL;
        }
        out->value = json_incref(value);
    } else if (value != NULL) {
        set_err(err, "bad_request", "value is only for op \"write\"");
        return -EINVAL;
    }
    if (out->op != SMP_CMD_HISTORY &&
        (json_object_get(root, "from") || json_object_get(root, "to") ||
         json_object_get(root, "limit"))) {
        set_err(err, "bad_request", "from, to and limit are for op \"history\"");
        return -EINVAL;
    }
    return 0;
}

/* A read's tags: an array of 1 to SMP_CMD_MAX_TAGS names, copied into out->tags. */
static int parse_tags(json_t *root, smp_cmd_t *out, smp_cmd_error_t *err)
{
    json_t *tags = json_object_get(root, "tags");
    if (!json_is_array(tags) || json_array_size(tags) == 0 ||
        json_array_size(tags) > SMP_CMD_MAX_TAGS) {
        set_err(err, "bad_request", "tags must be an array of 1 to %d tag names", SMP_CMD_MAX_TAGS);
        return -EINVAL;
    }
    out->tags = calloc(json_array_size(tags), sizeof *out->tags);
    if (out->tags == NULL) {
        set_err(err, "bad_request", "out of memory");
        return -EINVAL;
    }
    size_t k;
    json_t *t;
    json_array_foreach(tags, k, t)
    {
        if (!json_is_string(t) || !name_ok(json_string_value(t), 127)) {
            set_err(err, "bad_request", "tags[%zu] must be a tag name", k);
            return -EINVAL;
        }
        out->tags[out->ntags] = strdup(json_string_value(t));
        if (out->tags[out->ntags] == NULL) {
            set_err(err, "bad_request", "out of memory");
            return -EINVAL;
        }
        out->ntags++;
    }
    return 0;
}

/* A history query's range and page size. */
static int parse_range(json_t *root, smp_cmd_t *out, smp_cmd_error_t *err)
{
    bool has_from, has_to, has_limit;
    int64_t limit = 100;
    out->to = INT64_MAX;
    if (get_int_field(root, "from", &out->from, &has_from, 0, err) < 0 ||
        get_int_field(root, "to", &out->to, &has_to, 0, err) < 0 ||
        get_int_field(root, "limit", &limit, &has_limit, 1, err) < 0) {
        return -EINVAL;
    }
    if (!has_to) {
        out->to = INT64_MAX;
    }
    if (limit > SMP_CMD_HISTORY_MAX) {
        set_err(err, "bad_request", "limit must be at most %d", SMP_CMD_HISTORY_MAX);
        return -EINVAL;
    }
    if (out->to < out->from) {
        set_err(err, "bad_request", "to must not be before from");
        return -EINVAL;
    }
    out->limit = (size_t)limit;
    return 0;
}

/* The steps of smp_cmd_parse, in the order their errors are reported. */
static int parse_object(json_t *root, smp_cmd_t *out, smp_cmd_error_t *err)
{
    if (!json_is_object(root)) {
        set_err(err, "bad_request", "a command is a JSON object");
        return -EINVAL;
    }
    if (parse_id(root, out, err) < 0 || check_keys(root, err) < 0 || parse_op(root, out, err) < 0 ||
        get_int_field(root, "ts", &out->ts, &out->has_ts, 0, err) < 0 ||
        get_int_field(root, "ttl_ms", &out->ttl_ms, &out->has_ttl, 0, err) < 0 ||
        parse_operands(root, out, err) < 0) {
        return -EINVAL;
    }
    if (out->op == SMP_CMD_READ && parse_tags(root, out, err) < 0) {
        return -EINVAL;
    }
    if (out->op == SMP_CMD_HISTORY && parse_range(root, out, err) < 0) {
        return -EINVAL;
    }
    return 0;
}

int smp_cmd_parse(const void *payload, size_t len, smp_cmd_t *out, smp_cmd_error_t *err)
{
    memset(out, 0, sizeof *out);
    memset(err, 0, sizeof *err);
    if (len > SMP_CMD_MAX_PAYLOAD) {
        set_err(err, "bad_request", "payload of %zu bytes is larger than %d", len,
                SMP_CMD_MAX_PAYLOAD);
        return -EINVAL;
    }
    json_error_t jerr;
    json_t *root = json_loadb(payload, len, JSON_REJECT_DUPLICATES, &jerr);
    if (root == NULL) {
        set_err(err, "bad_request", "not valid JSON: %s", jerr.text);
        return -EINVAL;
    }
    int rc = parse_object(root, out, err);
    json_decref(root);
    return rc;
}

bool smp_cmd_reply_topic_ok(const char *topic, const char *prefix, const char *gateway_id)
{
    size_t lp = strlen(prefix), lg = strlen(gateway_id), lt = strlen(topic);
    static const char level[] = "/reply/";
    size_t head = lp + 1 + lg + sizeof level - 1;
    return lt > head && strncmp(topic, prefix, lp) == 0 && topic[lp] == '/' &&
           strncmp(topic + lp + 1, gateway_id, lg) == 0 &&
           strncmp(topic + lp + 1 + lg, level, sizeof level - 1) == 0 &&
           strpbrk(topic, "+#") == NULL;
}

int smp_cmd_delivery(const char *topic, const smp_mqtt_props_t *props, const char *prefix,
                     const char *gateway_id, smp_cmd_delivery_t *out)
{
    memset(out, 0, sizeof *out);
    /* topic = P/G/D/cmd: take D from between the known prefix and the suffix. */
    size_t lp = strlen(prefix), lg = strlen(gateway_id), lt = strlen(topic);
    if (lt < lp + lg + 2 + 4 || strncmp(topic, prefix, lp) != 0 || topic[lp] != '/' ||
        strncmp(topic + lp + 1, gateway_id, lg) != 0 || topic[lp + 1 + lg] != '/' ||
        strcmp(topic + lt - 4, "/cmd") != 0) {
        return -EINVAL;
    }
    const char *dn = topic + lp + lg + 2;
    size_t dlen = (size_t)(topic + lt - 4 - dn);
    if (dlen == 0 || dlen >= sizeof out->device) {
        return -EINVAL;
    }
    memcpy(out->device, dn, dlen);
    out->device[dlen] = '\0';
    if (props != NULL && props->retained) {
        /* Stored by the broker before this subscription: an old request, perhaps long since
         * carried out, delivered again on every (re)subscribe. Never acted upon. */
        out->refusal_code = "stale_retained";
        out->refusal_fmt = "retained command (published with the retain flag) not executed; "
                           "publish commands without retain%.0s%.0s";
    } else if (props != NULL && props->response_topic != NULL) {
        if (smp_cmd_reply_topic_ok(props->response_topic, prefix, gateway_id)) {
            out->use_response_topic = true;
        } else {
            /* A client that may only publish commands must not make the gateway publish
             * where it pleases (another device's data, say). Answered on the result topic. */
            out->refusal_code = "bad_request";
            out->refusal_fmt = "Response Topic must be under %s/%s/reply/";
        }
    }
    return 0;
}

int64_t smp_cmd_deadline(const smp_cmd_t *cmd)
{
    /* Both are >= 0 (the parser sees to it): only the upper end can overflow. */
    return cmd->ttl_ms > INT64_MAX - cmd->ts ? INT64_MAX : cmd->ts + cmd->ttl_ms;
}

bool smp_cmd_expired(const smp_cmd_t *cmd, uint64_t now_ms)
{
    if (!cmd->has_ts || !cmd->has_ttl || now_ms > (uint64_t)INT64_MAX) {
        return false;
    }
    return (int64_t)now_ms > smp_cmd_deadline(cmd);
}

/* ------------------------------------------------------------------------------------------ */
/* Validation and conversion                                                                   */

static bool raw_range(smp_type_t t, double *lo, double *hi)
{
    switch (t) {
    case SMP_TYPE_INT16:
        *lo = -32768.0;
        *hi = 32767.0;
        return true;
    case SMP_TYPE_UINT16:
        *lo = 0;
        *hi = 65535.0;
        return true;
    case SMP_TYPE_INT32:
        *lo = -2147483648.0;
        *hi = 2147483647.0;
        return true;
    case SMP_TYPE_UINT32:
        *lo = 0;
        *hi = 4294967295.0;
        return true;
    case SMP_TYPE_INT64:
        *lo = -9223372036854775808.0;
        *hi = 9223372036854775807.0;
        return true;
    case SMP_TYPE_UINT64:
        *lo = 0;
        *hi = 18446744073709551615.0;
        return true;
    case SMP_TYPE_FLOAT32:
        *lo = -FLT_MAX;
        *hi = FLT_MAX;
        return true;
    case SMP_TYPE_FLOAT64:
        *lo = -DBL_MAX;
        *hi = DBL_MAX;
        return true;
    default:
        return false;
    }
}

static bool is_int_type(smp_type_t t)
{
    return t == SMP_TYPE_INT16 || t == SMP_TYPE_UINT16 || t == SMP_TYPE_INT32 ||
           t == SMP_TYPE_UINT32 || t == SMP_TYPE_INT64 || t == SMP_TYPE_UINT64;
}

static bool is_signed(smp_type_t t)
{
    return t == SMP_TYPE_INT16 || t == SMP_TYPE_INT32 || t == SMP_TYPE_INT64;
}

/* Compares an integer with a double exactly: -1, 0 or 1 as x is below, equal to or above d
 * (finite). Converting x to a double instead would round it above 2^53. */
static int cmp_i64_f64(int64_t x, double d)
{
    if (d >= 9223372036854775808.0) {
        return -1;
    }
    if (d < -9223372036854775808.0) {
        return 1;
    }
    double t = trunc(d); /* now in [-2^63, 2^63): exact as an int64 */
    int64_t ti = (int64_t)t;
    if (x != ti) {
        return x < ti ? -1 : 1;
    }
    double frac = d - t;
    return frac > 0 ? -1 : (frac < 0 ? 1 : 0);
}

static void bound_err(smp_cmd_error_t *err, const smp_tag_cfg_t *tag, const char *vtext,
                      const char *rel, const char *which, bool is_int, int64_t bi, double bd)
{
    if (is_int) {
        set_err(err, "out_of_range", "%s: %s %s %s %" PRId64, tag->name, vtext, rel, which, bi);
    } else {
        set_err(err, "out_of_range", "%s: %s %s %s %.17g", tag->name, vtext, rel, which, bd);
    }
}

/* The tag's min and max, in engineering units. */
static int check_bounds(const smp_tag_cfg_t *tag, const json_t *value, double ev, const char *vtext,
                        smp_cmd_error_t *err)
{
    if (json_is_integer(value) && is_int_type(tag->type)) {
        /* Exact: a 64-bit integer and its bounds must not be rounded to doubles. */
        int64_t iv = json_integer_value(value);
        if (tag->has_min && (tag->min_is_int ? iv < tag->min_i : cmp_i64_f64(iv, tag->min) < 0)) {
            bound_err(err, tag, vtext, "<", "min", tag->min_is_int, tag->min_i, tag->min);
            return -ERANGE;
        }
        if (tag->has_max && (tag->max_is_int ? iv > tag->max_i : cmp_i64_f64(iv, tag->max) > 0)) {
            bound_err(err, tag, vtext, ">", "max", tag->max_is_int, tag->max_i, tag->max);
            return -ERANGE;
        }
    } else {
        if (tag->has_min && ev < tag->min) {
            set_err(err, "out_of_range", "%s: %s < min %.17g", tag->name, vtext, tag->min);
            return -ERANGE;
        }
        if (tag->has_max && ev > tag->max) {
            set_err(err, "out_of_range", "%s: %s > max %.17g", tag->name, vtext, tag->max);
            return -ERANGE;
        }
    }
    return 0;
}

/* An integer tag without scale or offset: the JSON integer itself, if the type holds it. */
static int raw_unscaled_int(const smp_tag_cfg_t *tag, const json_t *value, const char *vtext,
                            double lo, double hi, smp_value_t *raw, smp_cmd_error_t *err)
{
    json_int_t iv = json_integer_value(value);
    bool bad =
        is_signed(tag->type) ? ((double)iv < lo || (double)iv > hi) : (iv < 0 || (double)iv > hi);
    if (tag->type == SMP_TYPE_INT64) {
        bad = false;
    }
    if (bad) {
        set_err(err, "out_of_range", "%s: %s does not fit %s", tag->name, vtext,
                smp_type_name(tag->type));
        return -ERANGE;
    }
    if (is_signed(tag->type)) {
        raw->v.i = iv;
    } else {
        raw->v.u = (uint64_t)iv;
    }
    return 0;
}

/* Any other number: (ev - offset) / scale, a whole number for an integer type. */
static int raw_scaled(const smp_tag_cfg_t *tag, double ev, const char *vtext, double lo, double hi,
                      smp_value_t *raw, smp_cmd_error_t *err)
{
    double r = (ev - tag->offset) / tag->scale;
    if (!isfinite(r) || r < lo || r > hi) {
        set_err(err, "out_of_range", "%s: %s does not fit %s after scale and offset", tag->name,
                vtext, smp_type_name(tag->type));
        return -ERANGE;
    }
    if (!is_int_type(tag->type)) {
        raw->v.d = tag->type == SMP_TYPE_FLOAT32 ? (double)(float)r : r;
        return 0;
    }
    double rr = nearbyint(r);
    /* Allow only the rounding noise of the division (a few ulps of its operands, seen
     * at the raw scale), not a relative tolerance: that one grows with |raw| and let
     * 100000.05 through as a multiple of 0.1 once |raw| passed ~500,000. */
    double noise =
        8 * DBL_EPSILON * (fmax(fabs(ev), fabs(tag->offset)) / fabs(tag->scale) + fabs(r));
    if (fabs(r - rr) > noise) {
        set_err(err, "type_mismatch", "%s: %s is not a whole multiple of scale %.17g", tag->name,
                vtext, tag->scale);
        return -EINVAL;
    }
    if (rr < lo || rr > hi || (tag->type == SMP_TYPE_INT64 && rr >= 9223372036854775807.0) ||
        (tag->type == SMP_TYPE_UINT64 && rr >= 18446744073709551615.0)) {
        set_err(err, "out_of_range", "%s: %s does not fit %s", tag->name, vtext,
                smp_type_name(tag->type));
        return -ERANGE;
    }
    if (is_signed(tag->type)) {
        raw->v.i = (int64_t)rr;
    } else {
        raw->v.u = (uint64_t)rr;
    }
    return 0;
}

/* A boolean or string tag's value. */
static int raw_bool_string(const smp_tag_cfg_t *tag, const json_t *value, smp_value_t *raw,
                           char **owned, smp_cmd_error_t *err)
{
    if (tag->type == SMP_TYPE_BOOL) {
        if (!json_is_boolean(value)) {
            set_err(err, "type_mismatch", "%s: expected true or false", tag->name);
            return -EINVAL;
        }
        raw->v.b = json_is_true(value);
        return 0;
    }
    if (!json_is_string(value)) {
        set_err(err, "type_mismatch", "%s: expected a string", tag->name);
        return -EINVAL;
    }
    *owned = strndup(json_string_value(value), json_string_length(value));
    if (*owned == NULL) {
        set_err(err, "busy", "out of memory");
        return -ENOMEM;
    }
    raw->s = *owned;
    raw->len = strlen(*owned); /* an embedded NUL ends the string */
    return 0;
}

int smp_cmd_to_raw(const smp_tag_cfg_t *tag, const json_t *value, smp_value_t *raw, char **owned,
                   smp_cmd_error_t *err)
{
    memset(raw, 0, sizeof *raw);
    *owned = NULL;
    char vtext[64];
    if (!tag->writable) {
        set_err(err, "not_writable", "%s is read-only", tag->name);
        return -EPERM;
    }
    if (tag->type == SMP_TYPE_BOOL || tag->type == SMP_TYPE_STRING) {
        return raw_bool_string(tag, value, raw, owned, err);
    }
    if (!json_is_number(value)) {
        set_err(err, "type_mismatch", "%s: expected a number", tag->name);
        return -EINVAL;
    }
    bool scaled = tag->scale != 1.0 || tag->offset != 0.0;
    double ev = json_number_value(value);
    if (json_is_integer(value)) {
        snprintf(vtext, sizeof vtext, "%" PRId64, (int64_t)json_integer_value(value));
    } else {
        snprintf(vtext, sizeof vtext, "%.17g", ev);
    }
    if (is_int_type(tag->type) && !scaled && !json_is_integer(value)) {
        set_err(err, "type_mismatch", "%s: expected an integer, got %s", tag->name, vtext);
        return -EINVAL;
    }
    int rc = check_bounds(tag, value, ev, vtext, err);
    if (rc < 0) {
        return rc;
    }
    double lo = 0, hi = 0;
    raw_range(tag->type, &lo, &hi);
    if (is_int_type(tag->type) && !scaled) {
        return raw_unscaled_int(tag, value, vtext, lo, hi, raw, err);
    }
    return raw_scaled(tag, ev, vtext, lo, hi, raw, err);
}

bool smp_cmd_raw_equal(const smp_tag_cfg_t *tag, const smp_value_t *a, const smp_value_t *b)
{
    switch (tag->type) {
    case SMP_TYPE_BOOL:
        return a->v.b == b->v.b;
    case SMP_TYPE_STRING:
        return a->len == b->len && (a->len == 0 || memcmp(a->s, b->s, a->len) == 0);
    case SMP_TYPE_FLOAT32:
        return (float)a->v.d == (float)b->v.d;
    case SMP_TYPE_FLOAT64:
        return a->v.d == b->v.d;
    default:
        return is_signed(tag->type) ? a->v.i == b->v.i : a->v.u == b->v.u;
    }
}

/* Execution through the engine's interface (engine_cmd.h)                                     */

/* A remembered command: the at-most-once record. result is NULL while it runs. */
struct cmd_entry {
    struct cmd_entry *hnext;         /* hash chain */
    struct cmd_entry *older, *newer; /* age list, for expiry */
    char *key;                       /* device "\n" id */
    char *result;                    /* JSON text once answered */
    uint64_t mono_ms;                /* when first seen */
    unsigned waiting;                /* duplicates received while it ran */
};

#define CMD_BUCKETS 4096u
/* Answers waiting for room in the MQTT window or for the broker; beyond this many the oldest
 * is dropped (its result is stored: a retry with the same id gets it). */
#define UNSENT_MAX 1024u
#define ERRMSG_LEN SMP_ENGINE_ERRMSG_LEN

/* A token bucket: `rate` commands per second, bursts of as many. */
struct bucket {
    double tokens;
    uint64_t last_ms;
};

/* An answer that could not be handed to the bridge yet. */
struct unsent {
    struct unsent *next;
    char *topic;
    char *text;
    void *corr;
    size_t corr_len;
    uint64_t token; /* of its publish, once sent */
};
static void unsent_free(struct unsent *u);
static struct unsent *unsent_pop(smp_commands_t *s);

/* What the commands keep per device. */
struct cmd_dev {
    struct bucket rate; /* commands.rate_per_device */
    unsigned queued;    /* commands accepted and not yet answered */
};

struct smp_commands {
    smp_cmd_engine_t eng;
    struct cmd_entry *buckets[CMD_BUCKETS];
    struct cmd_entry *oldest, *newest;
    size_t count;
    unsigned in_progress; /* accepted, not yet answered */
    uint64_t window_ms;   /* commands.dedup_window_s */
    bool history_lost;    /* the recorded commands could not be loaded at start */
    struct unsent *unsent_head, *unsent_tail; /* waiting for room, oldest first */
    size_t unsent_n;
    struct unsent *sent; /* published, waiting for the PUBACK (newest first) */
    uint64_t answer_seq;
    uint64_t answered;    /* metrics "commands" */
    struct bucket global; /* commands.rate_global */
    struct cmd_dev *devs; /* one per device (eng.ndevs); NULL: out of memory at a reload */
    struct cmd *live;     /* every command being handled (a reload renumbers their devices) */
};

/* One command being handled. */
struct cmd {
    smp_commands_t *s;
    struct cmd *lprev, *lnext; /* s->live */
    int dev;                   /* the device's index, -1 when there is none of that name, or
                                * when a reload replaced or removed it (`replaced`) */
    bool replaced;
    const smp_device_cfg_t *cfg; /* the device's, NULL with dev -1 */
    char device[128];
    smp_cmd_t c;
    smp_cmd_error_t err;
    uint64_t recv_wall_ms;
    uint64_t recv_hr_ns;
    char *resp_topic; /* MQTT 5 Response Topic, else NULL */
    void *corr;
    size_t corr_len;
    struct cmd_entry *entry; /* NULL when the command has no id */
    char *value_json;        /* for the audit */
    uint32_t *tag_idx;       /* read */
    uint32_t write_tag;      /* write: the tag, its raw value and the string behind it */
    smp_value_t write_raw;
    char *write_str;
    uint64_t deadline_mono_ms; /* ttl_ms on the monotonic clock, 0 for none */
};

/* The per-device state of `dev`; a scratch one for no device (-1, or after an OOM). */
static struct cmd_dev *cdev(smp_commands_t *s, int dev)
{
    static struct cmd_dev none;
    if (dev < 0 || s->devs == NULL || (size_t)dev >= s->eng.ndevs) {
        none = (struct cmd_dev){.rate = {.tokens = 1e9}};
        return &none;
    }
    return &s->devs[dev];
}

static smp_cmd_device_t dev_info(const smp_commands_t *s, int dev)
{
    smp_cmd_device_t d;
    s->eng.ops->device(s->eng.eng, (size_t)dev, &d);
    return d;
}

static uint32_t hash_str(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) {
        h = (h ^ (uint8_t)*s) * 16777619u;
    }
    return h;
}

static char *make_key(const char *device, const char *id)
{
    size_t a = strlen(device), b = strlen(id);
    char *k = malloc(a + b + 2);
    if (k != NULL) {
        memcpy(k, device, a);
        k[a] = '\n';
        memcpy(k + a + 1, id, b + 1);
    }
    return k;
}

static struct cmd_entry *entry_find(smp_commands_t *s, const char *key)
{
    for (struct cmd_entry *x = s->buckets[hash_str(key) % CMD_BUCKETS]; x; x = x->hnext) {
        if (strcmp(x->key, key) == 0) {
            return x;
        }
    }
    return NULL;
}

static void entry_unlink(smp_commands_t *s, struct cmd_entry *x)
{
    struct cmd_entry **pp = &s->buckets[hash_str(x->key) % CMD_BUCKETS];
    while (*pp != x) {
        pp = &(*pp)->hnext;
    }
    *pp = x->hnext;
    if (x->older) {
        x->older->newer = x->newer;
    } else {
        s->oldest = x->newer;
    }
    if (x->newer) {
        x->newer->older = x->older;
    } else {
        s->newest = x->older;
    }
    s->count--;
    free(x->key);
    free(x->result);
    free(x);
}

/* Forgets answered commands older than the dedup window. */
static void entries_expire(smp_commands_t *s, uint64_t now_mono)
{
    while (s->oldest != NULL && s->oldest->result != NULL &&
           now_mono - s->oldest->mono_ms > s->window_ms) {
        entry_unlink(s, s->oldest);
    }
}

static struct cmd_entry *entry_add(smp_commands_t *s, char *key, uint64_t mono_ms)
{
    struct cmd_entry *x = calloc(1, sizeof *x);
    if (x == NULL) {
        free(key);
        return NULL;
    }
    x->key = key;
    x->mono_ms = mono_ms;
    uint32_t b = hash_str(key) % CMD_BUCKETS;
    x->hnext = s->buckets[b];
    s->buckets[b] = x;
    x->older = s->newest;
    if (s->newest) {
        s->newest->newer = x;
    } else {
        s->oldest = x;
    }
    s->newest = x;
    s->count++;
    return x;
}

static void restore_cmd(void *arg, const char *device, const char *id, const char *result_json,
                        int64_t ts_ms)
{
    smp_commands_t *s = arg;
    uint64_t age = smp__wall_ms() - (uint64_t)ts_ms;
    if ((int64_t)age < 0) {
        age = 0;
    }
    char *key = make_key(device, id);
    if (key == NULL || entry_find(s, key) != NULL) {
        free(key);
        return;
    }
    uint64_t now = uv_now(s->eng.loop);
    struct cmd_entry *x = entry_add(s, key, now > age ? now - age : 0);
    if (x == NULL) {
        return;
    }
    if (result_json != NULL) {
        x->result = strdup(result_json);
    } else {
        /* The gateway stopped while this command ran: whether the device took the write is
         * unknown, so a retry must not run it again. */
        smp_buf_t b;
        smp_buf_init(&b);
        smp_buf_puts(&b, "{\"id\":");
        smp_buf_json_string(&b, id, strlen(id));
        smp_buf_printf(&b,
                       ",\"ok\":false,\"error\":{\"code\":\"timeout\",\"message\":\"the "
                       "gateway restarted before the device confirmed; outcome unknown\"},"
                       "\"ts\":%" PRIu64 "}",
                       smp__wall_ms());
        x->result = b.oom ? NULL : strdup(b.p);
        smp_buf_free(&b);
        smp_store_cmd_put(s->eng.store, device, id, x->result, ts_ms, NULL, NULL);
    }
    if (x->result == NULL) {
        entry_unlink(s, x);
    }
}

smp_commands_t *smp_commands_new(const smp_cmd_engine_t *eng)
{
    smp_commands_t *s = calloc(1, sizeof *s);
    struct cmd_dev *devs = calloc(eng->ndevs ? eng->ndevs : 1, sizeof *devs);
    if (s == NULL || devs == NULL) {
        free(s);
        free(devs);
        LOG_ERR("cmd", "out of memory");
        return NULL;
    }
    s->eng = *eng;
    s->devs = devs;
    const smp_config_t *cfg = eng->cfg;
    s->window_ms = (uint64_t)cfg->commands.dedup_window_s * 1000u;
    uint64_t now = uv_now(eng->loop);
    s->global = (struct bucket){.tokens = cfg->commands.rate_global, .last_ms = now};
    for (size_t k = 0; k < eng->ndevs; k++) {
        s->devs[k].rate = (struct bucket){.tokens = cfg->commands.rate_per_device, .last_ms = now};
    }
    int64_t since = (int64_t)smp__wall_ms() - (int64_t)s->window_ms;
    int rc = smp_store_load_cmds(eng->store, since, restore_cmd, s);
    if (rc < 0) {
        /* Ids run before the restart are unknown now: a retry of one could run twice. */
        s->history_lost = true;
        LOG_ERR("cmd", "could not restore recent command results: %s; writes are refused",
                strerror(-rc));
    }
    if (!smp_store_durable(eng->store)) {
        LOG_ERR("cmd", "the store is in memory: writes are refused (not_durable)");
    }
    return s;
}

void smp_commands_free(smp_commands_t *s)
{
    if (s == NULL) {
        return;
    }
    while (s->oldest != NULL) {
        entry_unlink(s, s->oldest);
    }
    smp_commands_disconnected(s);
    while (s->unsent_head != NULL) {
        unsent_free(unsent_pop(s));
    }
    free(s->devs);
    free(s);
}

bool smp_commands_busy(const smp_commands_t *s)
{
    return s != NULL && s->in_progress > 0;
}

void smp_commands_devices_changed(smp_commands_t *s, const smp_config_t *cfg, size_t ndevs,
                                  const int *map, size_t nold)
{
    if (s == NULL) {
        return;
    }
    uint64_t now = uv_now(s->eng.loop);
    struct cmd_dev *devs = calloc(ndevs ? ndevs : 1, sizeof *devs);
    if (devs == NULL) {
        LOG_ERR("cmd", "out of memory: no per-device command rate limit until a restart");
    }
    for (size_t k = 0; devs != NULL && k < ndevs; k++) {
        devs[k].rate = (struct bucket){.tokens = cfg->commands.rate_per_device, .last_ms = now};
    }
    for (size_t k = 0; devs != NULL && s->devs != NULL && map != NULL && k < nold; k++) {
        if (map[k] >= 0 && (size_t)map[k] < ndevs) {
            devs[map[k]] = s->devs[k]; /* a kept device keeps its bucket and queue count */
        }
    }
    for (struct cmd *m = s->live; m != NULL; m = m->lnext) {
        if (m->dev < 0) {
            continue;
        }
        int to = map != NULL && (size_t)m->dev < nold ? map[m->dev] : -1;
        m->replaced = to < 0;
        m->dev = to;
    }
    free(s->devs);
    s->devs = devs;
    s->eng.ndevs = ndevs;
    s->eng.cfg = cfg;
}

uint64_t smp_commands_answered(const smp_commands_t *s)
{
    return s != NULL ? s->answered : 0;
}

static void cmd_free(struct cmd *m)
{
    if (m == NULL) {
        return;
    }
    if (m->lprev != NULL) {
        m->lprev->lnext = m->lnext;
    } else if (m->s != NULL && m->s->live == m) {
        m->s->live = m->lnext;
    }
    if (m->lnext != NULL) {
        m->lnext->lprev = m->lprev;
    }
    smp_cmd_free(&m->c);
    free(m->resp_topic);
    free(m->corr);
    free(m->value_json);
    free(m->tag_idx);
    free(m->write_str);
    free(m);
}

static void unsent_free(struct unsent *u)
{
    free(u->topic);
    free(u->text);
    free(u->corr);
    free(u);
}

static struct unsent *unsent_pop(smp_commands_t *s)
{
    struct unsent *u = s->unsent_head;
    s->unsent_head = u->next;
    if (s->unsent_head == NULL) {
        s->unsent_tail = NULL;
    }
    s->unsent_n--;
    u->next = NULL;
    return u;
}

/* A copy of an answer, for the queue; NULL without memory. */
static struct unsent *unsent_new(const char *topic, const char *text, const void *corr,
                                 size_t corr_len)
{
    struct unsent *u = calloc(1, sizeof *u);
    if (u != NULL) {
        u->topic = strdup(topic);
        u->text = strdup(text);
        if (corr != NULL && corr_len > 0) {
            u->corr = malloc(corr_len);
            if (u->corr != NULL) {
                memcpy(u->corr, corr, corr_len);
                u->corr_len = corr_len;
            }
        }
    }
    if (u == NULL || u->topic == NULL || u->text == NULL || (corr_len > 0 && u->corr == NULL)) {
        if (u != NULL) {
            unsent_free(u);
        }
        return NULL;
    }
    return u;
}

/* Queues an answer; smp_commands_flush sends what the window has room for. */
static void unsent_push(smp_commands_t *s, const char *topic, const char *text, const void *corr,
                        size_t corr_len)
{
    if (s->unsent_n >= UNSENT_MAX) {
        struct unsent *old = unsent_pop(s);
        LOG_ERR("cmd",
                "too many answers waiting for the broker: one to %s dropped (a retry "
                "with its id gets the stored result)",
                old->topic);
        unsent_free(old);
    }
    struct unsent *u = unsent_new(topic, text, corr, corr_len);
    if (u == NULL) {
        LOG_ERR("cmd", "out of memory keeping an answer for %s", topic);
        return;
    }
    if (s->unsent_tail != NULL) {
        s->unsent_tail->next = u;
    } else {
        s->unsent_head = u;
    }
    s->unsent_tail = u;
    s->unsent_n++;
}

void smp_commands_flush(smp_commands_t *s)
{
    while (s != NULL && s->unsent_head != NULL) {
        struct unsent *u = s->unsent_head;
        u->token = SMP_CMD_ANSWER_TOKEN | ++s->answer_seq;
        smp_mqtt_props_t props = {.correlation_data = u->corr, .correlation_len = u->corr_len};
        int rc = s->eng.ops->publish(s->eng.eng, u->topic, u->text, strlen(u->text), u->token,
                                     u->corr != NULL ? &props : NULL);
        if (rc == -EAGAIN || rc == -ENOTCONN) {
            return; /* the next PUBACK or connect calls again */
        }
        unsent_pop(s);
        if (rc < 0) {
            LOG_WARN("cmd", "answer to %s not published: %s", u->topic, strerror(-rc));
            unsent_free(u);
            continue;
        }
        /* Kept until its PUBACK: a connection lost before it sends the answer again. */
        u->next = s->sent;
        s->sent = u;
    }
}

bool smp_commands_acked(smp_commands_t *s, uint64_t token)
{
    if ((token & SMP_CMD_ANSWER_TOKEN) == 0) {
        return false;
    }
    if (s == NULL) {
        return true;
    }
    for (struct unsent **pp = &s->sent; *pp != NULL; pp = &(*pp)->next) {
        if ((*pp)->token == token) {
            struct unsent *u = *pp;
            *pp = u->next;
            unsent_free(u);
            break;
        }
    }
    return true;
}

void smp_commands_disconnected(smp_commands_t *s)
{
    /* Answers sent and not acknowledged go again, first and in their order (the list holds
     * the newest first). QoS 1: the broker may then deliver one twice, the same text. */
    while (s != NULL && s->sent != NULL) {
        struct unsent *u = s->sent;
        s->sent = u->next;
        u->next = s->unsent_head;
        s->unsent_head = u;
        if (s->unsent_tail == NULL) {
            s->unsent_tail = u;
        }
        s->unsent_n++;
    }
}

static void publish_result(smp_commands_t *s, struct cmd *m, const char *text)
{
    const char *topic = m->resp_topic;
    char *fallback = NULL;
    if (topic == NULL) {
        if (m->dev >= 0) {
            topic = dev_info(s, m->dev).topic_result;
        } else {
            if (asprintf(&fallback, "%s/%s/%s/cmd/result", s->eng.cfg->mqtt.topic_prefix,
                         s->eng.cfg->gateway.id, m->device) < 0) {
                return;
            }
            topic = fallback;
        }
    }
    /* Through the queue, in order, kept until acknowledged. */
    unsent_push(s, topic, text, m->corr, m->corr_len);
    smp_commands_flush(s);
    free(fallback);
}

static void audit(smp_commands_t *s, struct cmd *m, const char *code, const char *message)
{
    smp_audit_row_t row = {
        .received_ms = (int64_t)m->recv_wall_ms,
        .id = m->c.has_id ? m->c.id : NULL,
        .device = m->device,
        .op = m->c.op_name,
        .tag = m->c.op == SMP_CMD_READ ? NULL : (m->c.tag[0] ? m->c.tag : NULL),
        .value_json = m->value_json,
        .code = code,
        .message = message,
        .latency_us = (int64_t)((uv_hrtime() - m->recv_hr_ns) / 1000u),
    };
    smp_store_audit(s->eng.store, &row);
}

struct result_ctx {
    struct cmd *m;
    char *text;
    char *kept; /* what later duplicates get (kept_answer), owned */
    bool published;
};

static void begin_result(smp_buf_t *b, const struct cmd *m, bool ok);

/* What is kept of an answer for later duplicates, in memory and in the store: the answer
 * itself, or a short stand-in when it is larger than commands.result_max_bytes (a read of 256
 * tags, a page of history), so a flood of them cannot pile up megabytes for the window. */
static char *kept_answer(const smp_commands_t *s, const struct cmd *m, const char *text)
{
    size_t n = strlen(text);
    if (n <= (size_t)s->eng.cfg->commands.result_max_bytes) {
        return strdup(text);
    }
    smp_buf_t b;
    begin_result(&b, m, false);
    smp_buf_printf(&b,
                   ",\"error\":{\"code\":\"duplicate\",\"message\":\"already answered; the "
                   "first answer (%zu bytes) was larger than commands.result_max_bytes and is "
                   "not kept\"},\"ts\":%" PRIu64 "}",
                   n, smp__wall_ms());
    if (b.oom) {
        smp_buf_free(&b);
        return NULL;
    }
    return b.p;
}

static void after_result_stored(void *arg, int status, int64_t id)
{
    (void)id;
    struct result_ctx *rc = arg;
    struct cmd *m = rc->m;
    smp_commands_t *s = m->s;
    if (status < 0) {
        LOG_WARN("cmd", "result of %s not persisted: %s", m->c.id, strerror(-status));
    }
    unsigned times = rc->published ? 0 : 1;
    if (m->entry != NULL) {
        /* Only now is the entry answered (and so may expire); duplicates that arrived in the
         * meantime waited for this. */
        free(m->entry->result);
        m->entry->result = rc->kept;
        rc->kept = NULL;
        if (m->entry->result == NULL) {
            /* An entry without a result would never expire: give it the text itself. */
            m->entry->result = rc->text;
            rc->text = NULL;
        }
        times += m->entry->waiting;
        m->entry->waiting = 0;
    }
    const char *text = rc->text != NULL ? rc->text : m->entry->result;
    for (unsigned k = 0; k < times; k++) {
        publish_result(s, m, text);
    }
    free(rc->text);
    free(rc->kept);
    free(rc);
    cmd_free(m);
    s->in_progress--;
    s->eng.ops->progress(s->eng.eng);
}

/* Final answer: audit, publish, remember (memory + store). Takes ownership of m and of the
 * buffer's text.
 *
 * The answer goes out before its row is committed: what makes a command at-most-once is the
 * "accepted" record committed before any device I/O, not this row. Waiting for this commit too
 * would put a second fsync on every command's path (p99 5.1 ms instead of 3 ms here). If the
 * machine loses power in between, a retry finds the accepted record without a result and is
 * answered "timeout, outcome unknown" — never run again. */
static void finish(smp_commands_t *s, struct cmd *m, smp_buf_t *b, const char *code,
                   const char *message)
{
    if (b->oom) {
        smp_buf_free(b);
        smp_buf_init(b);
        smp_buf_puts(b,
                     "{\"ok\":false,\"error\":{\"code\":\"busy\",\"message\":\"out of memory\"}}");
    }
    audit(s, m, code, message);
    s->answered++;
    char *text = b->p;
    b->p = NULL;
    struct result_ctx *rc = calloc(1, sizeof *rc);
    s->in_progress++;
    if (rc == NULL || text == NULL) {
        free(text);
        free(rc);
        cmd_free(m);
        s->in_progress--;
        return;
    }
    rc->m = m;
    rc->text = text;
    if (m->entry != NULL) {
        /* In the at-most-once table: remembered in the store too. Commands refused before
         * the table (no id, retained, rate limits) are not, so their id can still run. */
        publish_result(s, m, text);
        rc->published = true;
        rc->kept = kept_answer(s, m, text);
        smp_store_cmd_put(s->eng.store, m->device, m->c.id, rc->kept != NULL ? rc->kept : text,
                          (int64_t)m->recv_wall_ms, after_result_stored, rc);
    } else {
        after_result_stored(rc, 0, 0);
    }
}

static void begin_result(smp_buf_t *b, const struct cmd *m, bool ok)
{
    smp_buf_init(b);
    smp_buf_puts(b, "{\"id\":");
    if (m->c.has_id) {
        smp_buf_json_string(b, m->c.id, strlen(m->c.id));
    } else {
        smp_buf_puts(b, "null");
    }
    smp_buf_printf(b, ",\"ok\":%s", ok ? "true" : "false");
    if (m->c.op != SMP_CMD_READ && m->c.tag[0] != '\0') {
        smp_buf_puts(b, ",\"tag\":");
        smp_buf_json_string(b, m->c.tag, strlen(m->c.tag));
    }
}

static void fail(smp_commands_t *s, struct cmd *m, const char *code, const char *message)
{
    smp_buf_t b;
    begin_result(&b, m, false);
    smp_buf_puts(&b, ",\"error\":{\"code\":\"");
    smp_buf_puts(&b, code);
    smp_buf_puts(&b, "\",\"message\":");
    smp_buf_json_string(&b, message, strlen(message));
    smp_buf_printf(&b, "},\"ts\":%" PRIu64 "}", smp__wall_ms());
    LOG_INFO("cmd", "%s %s on %s: %s (%s)", m->c.op_name ? m->c.op_name : "?",
             m->c.has_id ? m->c.id : "(no id)", m->device, code, message);
    finish(s, m, &b, code, message);
    smp_buf_free(&b);
}

/* The answer to a command for a device that is offline. */
static void fail_offline(smp_commands_t *s, struct cmd *m)
{
    char msg[ERRMSG_LEN + 32];
    snprintf(msg, sizeof msg, "device is offline: %s", dev_info(s, m->dev).status_err);
    fail(s, m, "device_offline", msg);
}

static const char *code_for(int status)
{
    switch (status) {
    case SMP_EDEVICE:
        return "device_error";
    case -ETIMEDOUT:
        return "timeout";
    case -ETIME:
        return "expired";
    case -E2BIG:
    case -ERANGE:
        return "out_of_range";
    case -EINVAL:
        return "type_mismatch";
    case -EPERM:
        return "not_writable";
    default:
        return "device_offline";
    }
}

static int find_tag(const smp_device_cfg_t *d, const char *name)
{
    for (size_t t = 0; t < d->ntags; t++) {
        if (strcmp(d->tags[t].name, name) == 0) {
            return (int)t;
        }
    }
    return -1;
}

static bool bucket_take(struct bucket *b, double rate, uint64_t now_ms)
{
    double refill = (double)(now_ms - b->last_ms) * rate / 1000.0;
    b->tokens = b->tokens + refill > rate ? rate : b->tokens + refill;
    b->last_ms = now_ms;
    if (b->tokens < 1.0) {
        return false;
    }
    b->tokens -= 1.0;
    return true;
}

/* Rate limits, per device and in all: NULL when the command may go on, else why not. */
static const char *over_rate(smp_commands_t *s, int dev, uint64_t now_ms)
{
    if (dev >= 0 &&
        !bucket_take(&cdev(s, dev)->rate, s->eng.cfg->commands.rate_per_device, now_ms)) {
        return "too many commands for this device (commands.rate_per_device)";
    }
    if (!bucket_take(&s->global, s->eng.cfg->commands.rate_global, now_ms)) {
        return "too many commands (commands.rate_global)";
    }
    return NULL;
}

/* Why a write cannot be made at-most-once now, or NULL when it can. */
static const char *durable_problem(const smp_commands_t *s)
{
    if (!smp_store_durable(s->eng.store)) {
        return "the store runs in memory: the command could not be recorded durably, so a "
               "retry after a restart could run it twice";
    }
    if (s->history_lost) {
        return "the command history could not be loaded at start: a retry of an earlier "
               "command could run twice";
    }
    return NULL;
}

/* Queues the device I/O of a validated command. */
/* The caller has counted the command in the device's queue (at acceptance, so that the queue
 * limit also covers commands still waiting for their durable record). */
static void dispatch(smp_commands_t *s, struct cmd *m, smp_cmd_job_t *j)
{
    s->in_progress++;
    s->eng.ops->job_enqueue(s->eng.eng, j, m->deadline_mono_ms, m);
}

struct begin_ctx {
    struct cmd *m;
    smp_cmd_job_t *j;
};

static void after_begin_stored(void *arg, int status, int64_t id)
{
    (void)id;
    struct begin_ctx *bc = arg;
    struct cmd *m = bc->m;
    smp_commands_t *s = m->s;
    s->in_progress--;
    if (status < 0) {
        /* Without a durable record a restart could run the write twice: refuse it. */
        cdev(s, m->dev)->queued--;
        s->eng.ops->job_free(s->eng.eng, bc->j);
        fail(s, m, m->c.op == SMP_CMD_WRITE ? "not_durable" : "busy",
             "the gateway cannot record the command (store error)");
    } else if (s->eng.ops->stopping(s->eng.eng) || m->replaced) {
        cdev(s, m->dev)->queued--;
        s->eng.ops->job_free(s->eng.eng, bc->j);
        fail(s, m, "cancelled",
             m->replaced ? "a config reload replaced the device; nothing was written"
                         : "the gateway is stopping; nothing was written");
    } else if (dev_info(s, m->dev).online == 0) {
        /* The device went offline while the record was being committed. */
        cdev(s, m->dev)->queued--;
        s->eng.ops->job_free(s->eng.eng, bc->j);
        fail_offline(s, m);
    } else {
        dispatch(s, m, bc->j);
    }
    free(bc);
    s->eng.ops->progress(s->eng.eng);
}

static void on_history(void *arg, int status, const smp_history_row_t *rows, size_t n)
{
    struct cmd *m = arg;
    smp_commands_t *s = m->s;
    s->in_progress--;
    cdev(s, m->dev)->queued--;
    if (status < 0) {
        fail(s, m, "busy", "history is not available (store error)");
        return;
    }
    smp_buf_t b;
    begin_result(&b, m, true);
    smp_buf_puts(&b, ",\"values\":[");
    for (size_t k = 0; k < n; k++) {
        smp_buf_printf(&b, "%s[%" PRId64 ",%s]", k ? "," : "", rows[k].ts_ms, rows[k].value_json);
    }
    smp_buf_puts(&b, "]");
    if (n == m->c.limit && n > 0) {
        /* A full page: the next one starts just after the last row returned. */
        smp_buf_printf(&b, ",\"next\":%" PRId64, rows[n - 1].ts_ms + 1);
    }
    smp_buf_printf(&b, ",\"ts\":%" PRIu64 "}", smp__wall_ms());
    finish(s, m, &b, "ok", NULL);
    smp_buf_free(&b);
}

/* Step 1: a command record for a delivery, its payload parsed (the outcome in *prc). */
static struct cmd *receive(smp_commands_t *s, const smp_cmd_delivery_t *dv,
                           const smp_mqtt_props_t *props, const void *payload, size_t len, int *prc)
{
    struct cmd *m = calloc(1, sizeof *m);
    if (m == NULL) {
        return NULL;
    }
    m->s = s;
    m->lnext = s->live;
    if (s->live != NULL) {
        s->live->lprev = m;
    }
    s->live = m;
    memcpy(m->device, dv->device, sizeof m->device);
    m->recv_wall_ms = smp__wall_ms();
    m->recv_hr_ns = uv_hrtime();
    if (dv->use_response_topic) {
        m->resp_topic = strdup(props->response_topic);
    }
    if (props != NULL && props->correlation_data != NULL && props->correlation_len > 0) {
        m->corr = malloc(props->correlation_len);
        if (m->corr != NULL) {
            memcpy(m->corr, props->correlation_data, props->correlation_len);
            m->corr_len = props->correlation_len;
        }
    }
    m->dev = s->eng.ops->find_device(s->eng.eng, m->device);
    m->cfg = m->dev >= 0 ? dev_info(s, m->dev).cfg : NULL;
    *prc = smp_cmd_parse(payload, len, &m->c, &m->err);
    if (m->c.value != NULL) {
        m->value_json = json_dumps(m->c.value, JSON_ENCODE_ANY | JSON_COMPACT);
    }
    return m;
}

/* Step 2: refusals that come before the de-dup table (a retained delivery, a Response Topic
 * outside the namespace, a rate limit): the same id may run later. True when answered. */
static bool refused_early(smp_commands_t *s, struct cmd *m, const smp_cmd_delivery_t *dv,
                          uint64_t now)
{
    if (dv->refusal_code != NULL) {
        char msg[300];
        snprintf(msg, sizeof msg, dv->refusal_fmt, s->eng.cfg->mqtt.topic_prefix,
                 s->eng.cfg->gateway.id);
        fail(s, m, dv->refusal_code, msg);
        return true;
    }
    const char *limit = over_rate(s, m->dev, now);
    if (limit != NULL) {
        fail(s, m, "busy", limit);
        return true;
    }
    return false;
}

/* Step 3: the at-most-once table. A known id is answered with its first result (now, or when
 * the first one finishes) and never run again; a new one is remembered, unless the table is
 * full. True when answered. */
static bool seen_before(smp_commands_t *s, struct cmd *m, uint64_t now)
{
    entries_expire(s, now);
    if (!m->c.has_id) {
        return false;
    }
    char *key = make_key(m->device, m->c.id);
    struct cmd_entry *x = key ? entry_find(s, key) : NULL;
    if (x == NULL && s->count >= (size_t)s->eng.cfg->commands.dedup_max) {
        free(key);
        fail(s, m, "busy", "too many recent commands to remember (commands.dedup_max)");
        return true;
    }
    if (x != NULL) {
        free(key);
        audit(s, m, "duplicate", "answered with the first result");
        if (x->result != NULL) {
            publish_result(s, m, x->result);
        } else {
            x->waiting++;
        }
        cmd_free(m);
        return true;
    }
    if (key != NULL) {
        m->entry = entry_add(s, key, now);
    }
    return false;
}

/* Step 4: what the request itself gets wrong (payload, device, expired on arrival). True
 * when answered. */
static bool invalid(smp_commands_t *s, struct cmd *m, int prc)
{
    if (prc < 0) {
        fail(s, m, m->err.code, m->err.message);
        return true;
    }
    if (m->dev < 0) {
        fail(s, m, "unknown_device", "no such device on this gateway");
        return true;
    }
    if (smp_cmd_expired(&m->c, m->recv_wall_ms)) {
        char msg[128];
        snprintf(msg, sizeof msg, "received %" PRIu64 " ms after ts + ttl_ms",
                 m->recv_wall_ms - (uint64_t)smp_cmd_deadline(&m->c));
        fail(s, m, "expired", msg);
        return true;
    }
    return false;
}

/* A history query: answered from the store, counted in the device's queue limit. */
static void run_history(smp_commands_t *s, struct cmd *m)
{
    if (find_tag(m->cfg, m->c.tag) < 0) {
        fail(s, m, "unknown_tag", "no such tag on this device");
        return;
    }
    if (cdev(s, m->dev)->queued >= SMP_CMD_QUEUE_MAX) {
        fail(s, m, "busy", "too many commands queued for the device");
        return;
    }
    cdev(s, m->dev)->queued++;
    s->in_progress++;
    smp_store_history(s->eng.store, m->device, m->c.tag, m->c.from, m->c.to, m->c.limit, on_history,
                      m);
}

/* Step 5a: the device job of a write, validated against its tag. NULL when answered. */
static smp_cmd_job_t *write_job(smp_commands_t *s, struct cmd *m)
{
    int t = find_tag(m->cfg, m->c.tag);
    if (t < 0) {
        fail(s, m, "unknown_tag", "no such tag on this device");
        return NULL;
    }
    const char *why = durable_problem(s);
    if (why != NULL) {
        fail(s, m, "not_durable", why);
        return NULL;
    }
    smp_cmd_error_t verr = {0};
    if (smp_cmd_to_raw(&m->cfg->tags[t], m->c.value, &m->write_raw, &m->write_str, &verr) < 0) {
        fail(s, m, verr.code, verr.message);
        return NULL;
    }
    m->write_tag = (uint32_t)t;
    smp_cmd_job_spec_t spec = {.write = true, .tag = m->write_tag, .raw = &m->write_raw};
    smp_cmd_job_t *j = s->eng.ops->job_new(s->eng.eng, (size_t)m->dev, &spec);
    if (j == NULL) {
        fail(s, m, "busy", "out of memory");
    }
    return j;
}

/* Step 5b: the device job of a read of m->c.tags. NULL when answered. */
static smp_cmd_job_t *read_job(smp_commands_t *s, struct cmd *m)
{
    m->tag_idx = calloc(m->c.ntags, sizeof *m->tag_idx);
    if (m->tag_idx == NULL) {
        fail(s, m, "busy", "out of memory");
        return NULL;
    }
    for (size_t k = 0; k < m->c.ntags; k++) {
        int t = find_tag(m->cfg, m->c.tags[k]);
        if (t < 0) {
            char msg[200];
            snprintf(msg, sizeof msg, "no tag %s on this device", m->c.tags[k]);
            fail(s, m, "unknown_tag", msg);
            return NULL;
        }
        m->tag_idx[k] = (uint32_t)t;
    }
    smp_cmd_job_spec_t spec = {.idx = m->tag_idx, .n = m->c.ntags};
    smp_cmd_job_t *j = s->eng.ops->job_new(s->eng.eng, (size_t)m->dev, &spec);
    if (j == NULL) {
        fail(s, m, "busy", "out of memory");
    }
    return j;
}

/* Step 6: the ttl as a deadline on the monotonic clock. Expiry applies to the time spent in
 * the queue and in opening the connection; the wall clock only says how much of the ttl was
 * left at receipt. */
static void set_deadline(struct cmd *m)
{
    if (!m->c.has_ttl) {
        return;
    }
    uint64_t left = (uint64_t)m->c.ttl_ms;
    if (m->c.has_ts) {
        /* Not expired at receipt (checked before), so the deadline is not in the past. */
        left = (uint64_t)smp_cmd_deadline(&m->c) - m->recv_wall_ms;
    }
    uint64_t now_mono = m->recv_hr_ns / 1000000u;
    m->deadline_mono_ms = left > UINT64_MAX - now_mono ? UINT64_MAX : now_mono + left;
    if (m->deadline_mono_ms == 0) {
        m->deadline_mono_ms = 1; /* 0 means "no deadline" */
    }
}

/* Step 7: into the device's queue, if the device can take it, after the durable "accepted"
 * record: a crash cannot lead to a re-run. Reads take the same path: store operations
 * complete in order, so the commands of a device reach its queue in the order they arrived
 * (a read sent after a write sees the write). */
static void enqueue(smp_commands_t *s, struct cmd *m, smp_cmd_job_t *j)
{
    struct cmd_dev *cd = cdev(s, m->dev);
    bool stopping = s->eng.ops->stopping(s->eng.eng);
    if (dev_info(s, m->dev).online == 0) {
        s->eng.ops->job_free(s->eng.eng, j);
        fail_offline(s, m);
        return;
    }
    if (cd->queued >= SMP_CMD_QUEUE_MAX || stopping) {
        s->eng.ops->job_free(s->eng.eng, j);
        fail(s, m, stopping ? "cancelled" : "busy",
             stopping ? "the gateway is stopping; nothing was written"
                      : "too many commands queued for the device");
        return;
    }
    set_deadline(m);
    cd->queued++;
    if (!m->c.has_id) {
        dispatch(s, m, j);
        return;
    }
    struct begin_ctx *bc = calloc(1, sizeof *bc);
    if (bc == NULL) {
        cd->queued--;
        s->eng.ops->job_free(s->eng.eng, j);
        fail(s, m, "busy", "out of memory");
        return;
    }
    bc->m = m;
    bc->j = j;
    s->in_progress++;
    smp_store_cmd_put(s->eng.store, m->device, m->c.id, NULL, (int64_t)m->recv_wall_ms,
                      after_begin_stored, bc);
}

void smp_commands_receive(smp_commands_t *s, const char *topic, const void *payload, size_t len,
                          const smp_mqtt_props_t *props)
{
    smp_cmd_delivery_t dv;
    if (s == NULL || smp_cmd_delivery(topic, props, s->eng.cfg->mqtt.topic_prefix,
                                      s->eng.cfg->gateway.id, &dv) < 0) {
        return; /* not a command topic of this gateway */
    }
    int prc;
    struct cmd *m = receive(s, &dv, props, payload, len, &prc);
    if (m == NULL) {
        return;
    }
    uint64_t now = uv_now(s->eng.loop);
    if (refused_early(s, m, &dv, now) || seen_before(s, m, now) || invalid(s, m, prc)) {
        return;
    }
    if (m->c.op == SMP_CMD_HISTORY) {
        run_history(s, m);
        return;
    }
    smp_cmd_job_t *j = m->c.op == SMP_CMD_WRITE ? write_job(s, m) : read_job(s, m);
    if (j != NULL) {
        enqueue(s, m, j);
    }
}

static void append_reading(smp_buf_t *b, const smp_tag_cfg_t *tc, const smp_reading_t *r)
{
    smp_eval_t v;
    if (smp_eval_from_raw(tc, &r->value, &v) == 0) {
        smp_buf_eval(b, &v);
        smp_eval_clear(&v);
    } else {
        smp_buf_puts(b, "null");
    }
}

static void write_done(smp_commands_t *s, struct cmd *m, const smp_cmd_outcome_t *o)
{
    const smp_tag_cfg_t *tc = &m->cfg->tags[m->write_tag];
    if (o->status < 0) {
        const char *code = code_for(o->status);
        if (strcmp(code, "device_offline") == 0 && o->started) {
            /* The link failed after the request went out (a reset, a corrupted reply): the
             * device may have applied it. "device_offline" promises nothing was written, so
             * this is a timeout, outcome unknown. */
            char msg[ERRMSG_LEN + 64];
            snprintf(msg, sizeof msg,
                     "the link failed after the write was sent (%s); outcome unknown",
                     o->errmsg[0] ? o->errmsg : "error");
            fail(s, m, "timeout", msg);
            return;
        }
        fail(s, m, code, o->errmsg[0] ? o->errmsg : "write failed");
        return;
    }
    if (o->rb->status != 0) {
        char msg[ERRMSG_LEN + 64];
        snprintf(msg, sizeof msg, "write accepted but the read-back failed: %s", o->errmsg);
        fail(s, m, "device_error", msg);
        return;
    }
    /* The confirmed value is also the tag's newest state: it goes out in a data message now. */
    if (m->dev >= 0) { /* a device a reload replaced meanwhile publishes nothing more */
        s->eng.ops->emit_reading(s->eng.eng, (size_t)m->dev, m->write_tag, o->rb, o->done_wall_ms);
    }
    if (!smp_cmd_raw_equal(tc, &m->write_raw, &o->rb->value)) {
        smp_buf_t got;
        smp_buf_init(&got);
        append_reading(&got, tc, o->rb);
        char msg[256];
        snprintf(msg, sizeof msg, "device reads back %s after the write of %s", got.p ? got.p : "?",
                 m->value_json ? m->value_json : "?");
        smp_buf_free(&got);
        fail(s, m, "device_error", msg);
        return;
    }
    smp_buf_t b;
    begin_result(&b, m, true);
    smp_buf_puts(&b, ",\"value\":");
    append_reading(&b, tc, o->rb);
    smp_buf_printf(&b, ",\"ts\":%" PRIu64 "}", o->done_wall_ms);
    LOG_INFO("cmd", "write %s on %s: %s = %s confirmed", m->c.id, m->device, m->c.tag,
             m->value_json ? m->value_json : "?");
    finish(s, m, &b, "ok", NULL);
    smp_buf_free(&b);
}

static void read_done(smp_commands_t *s, struct cmd *m, const smp_cmd_outcome_t *o)
{
    if (o->status < 0) {
        fail(s, m, code_for(o->status), o->errmsg[0] ? o->errmsg : "read failed");
        return;
    }
    smp_buf_t b, errs;
    begin_result(&b, m, true);
    smp_buf_init(&errs);
    smp_buf_puts(&b, ",\"values\":{");
    bool first = true, efirst = true;
    for (size_t k = 0; k < m->c.ntags; k++) {
        const smp_tag_cfg_t *tc = &m->cfg->tags[m->tag_idx[k]];
        const smp_reading_t *r = &o->readings[k];
        smp_eval_t v;
        if (r->status == 0 && smp_eval_from_raw(tc, &r->value, &v) == 0) {
            smp_buf_printf(&b, "%s\"%s\":", first ? "" : ",", tc->name);
            smp_buf_eval(&b, &v);
            smp_eval_clear(&v);
            first = false;
        } else {
            const char *msg =
                r->status ? o->tag_errs + k * ERRMSG_LEN : "value is not a finite number";
            smp_buf_printf(&errs, "%s\"%s\":", efirst ? "" : ",", tc->name);
            smp_buf_json_string(&errs, msg, strlen(msg));
            efirst = false;
        }
    }
    smp_buf_puts(&b, "}");
    if (!efirst) {
        smp_buf_puts(&b, ",\"errors\":{");
        smp_buf_add(&b, errs.p, errs.len);
        smp_buf_puts(&b, "}");
    }
    smp_buf_printf(&b, ",\"ts\":%" PRIu64 "}", o->done_wall_ms);
    smp_buf_free(&errs);
    finish(s, m, &b, "ok", NULL);
    smp_buf_free(&b);
}

void smp_commands_job_done(smp_commands_t *s, void *cookie, const smp_cmd_outcome_t *out)
{
    struct cmd *m = cookie;
    cdev(s, m->dev)->queued--;
    s->in_progress--;
    if (m->c.op == SMP_CMD_WRITE) {
        write_done(s, m, out);
    } else {
        read_done(s, m, out);
    }
}

static void job_cancelled(smp_commands_t *s, struct cmd *m, const char *why)
{
    cdev(s, m->dev)->queued--;
    s->in_progress--;
    fail(s, m, "cancelled", why);
}

void smp_commands_job_cancelled(smp_commands_t *s, void *cookie)
{
    job_cancelled(s, cookie, "the gateway stopped before the command started; nothing was written");
}

void smp_commands_job_replaced(smp_commands_t *s, void *cookie)
{
    job_cancelled(s, cookie,
                  "a config reload replaced the device before the command started; nothing was "
                  "written");
}

void smp_commands_job_discard(smp_commands_t *s, void *cookie)
{
    (void)s;
    cmd_free(cookie);
}
