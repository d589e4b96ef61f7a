/* Sparkplug B payload codec on protobuf-c (see spb_codec.h). */
#include "spb_codec.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "sparkplug_b.pb-c.h"

typedef Org__Eclipse__Tahu__Protobuf__Payload pb_payload_t;
typedef Org__Eclipse__Tahu__Protobuf__Payload__Metric pb_metric_t;

#define PB_PAYLOAD_INIT ORG__ECLIPSE__TAHU__PROTOBUF__PAYLOAD__INIT
#define PB_METRIC_INIT  ORG__ECLIPSE__TAHU__PROTOBUF__PAYLOAD__METRIC__INIT
#define V(x)            ORG__ECLIPSE__TAHU__PROTOBUF__PAYLOAD__METRIC__VALUE_##x

static bool scaled(const smp_tag_cfg_t *tag)
{
    return tag->scale != 1.0 || tag->offset != 0.0;
}

uint32_t smp_spb_datatype(const smp_tag_cfg_t *tag)
{
    if (tag->type != SMP_TYPE_BOOL && tag->type != SMP_TYPE_STRING && scaled(tag)) {
        return SMP_SPB_DOUBLE;
    }
    switch (tag->type) {
    case SMP_TYPE_BOOL:
        return SMP_SPB_BOOLEAN;
    case SMP_TYPE_INT16:
        return SMP_SPB_INT16;
    case SMP_TYPE_UINT16:
        return SMP_SPB_UINT16;
    case SMP_TYPE_INT32:
        return SMP_SPB_INT32;
    case SMP_TYPE_UINT32:
        return SMP_SPB_UINT32;
    case SMP_TYPE_INT64:
        return SMP_SPB_INT64;
    case SMP_TYPE_UINT64:
        return SMP_SPB_UINT64;
    case SMP_TYPE_FLOAT32:
        return SMP_SPB_FLOAT;
    case SMP_TYPE_FLOAT64:
        return SMP_SPB_DOUBLE;
    case SMP_TYPE_STRING:
        return SMP_SPB_STRING;
    }
    return SMP_SPB_UNKNOWN;
}

const char *smp_spb_datatype_name(uint32_t datatype)
{
    static const char *const names[] = {"Unknown", "Int8",    "Int16",  "Int32",    "Int64",
                                        "UInt8",   "UInt16",  "UInt32", "UInt64",   "Float",
                                        "Double",  "Boolean", "String", "DateTime", "Text"};
    return datatype < sizeof names / sizeof names[0] ? names[datatype] : "other";
}

static bool is_signed_dt(uint32_t dt)
{
    return dt == SMP_SPB_INT8 || dt == SMP_SPB_INT16 || dt == SMP_SPB_INT32 || dt == SMP_SPB_INT64;
}

/* The value as a signed / unsigned integer, when it is one (exactly). */
static bool as_i64(const smp_eval_t *v, int64_t *out)
{
    if (v->kind == SMP_EV_INT) {
        *out = v->i;
        return true;
    }
    if (v->kind == SMP_EV_UINT && v->u <= (uint64_t)INT64_MAX) {
        *out = (int64_t)v->u;
        return true;
    }
    return false;
}

static bool as_u64(const smp_eval_t *v, uint64_t *out)
{
    if (v->kind == SMP_EV_UINT) {
        *out = v->u;
        return true;
    }
    if (v->kind == SMP_EV_INT && v->i >= 0) {
        *out = (uint64_t)v->i;
        return true;
    }
    return false;
}

/* Puts `v` into `m` as datatype `dt`. Returns 0 or -EINVAL. */
static int set_value(pb_metric_t *m, uint32_t dt, const smp_eval_t *v)
{
    int64_t i;
    uint64_t u;
    double d;
    switch (dt) {
    case SMP_SPB_BOOLEAN:
        if (v->kind != SMP_EV_BOOL) {
            return -EINVAL;
        }
        m->value_case = V(BOOLEAN_VALUE);
        m->boolean_value = v->b;
        return 0;
    case SMP_SPB_INT8:
    case SMP_SPB_INT16:
    case SMP_SPB_INT32:
        if (!as_i64(v, &i) || i < INT32_MIN || i > INT32_MAX) {
            return -EINVAL;
        }
        m->value_case = V(INT_VALUE);
        m->int_value = (uint32_t)(int32_t)i; /* two's complement, as the specification says */
        return 0;
    case SMP_SPB_UINT8:
    case SMP_SPB_UINT16:
    case SMP_SPB_UINT32:
        if (!as_u64(v, &u) || u > UINT32_MAX) {
            return -EINVAL;
        }
        m->value_case = V(INT_VALUE);
        m->int_value = (uint32_t)u;
        return 0;
    case SMP_SPB_INT64:
        if (!as_i64(v, &i)) {
            return -EINVAL;
        }
        m->value_case = V(LONG_VALUE);
        m->long_value = (uint64_t)i;
        return 0;
    case SMP_SPB_UINT64:
    case SMP_SPB_DATETIME:
        if (!as_u64(v, &u)) {
            return -EINVAL;
        }
        m->value_case = V(LONG_VALUE);
        m->long_value = u;
        return 0;
    case SMP_SPB_FLOAT:
    case SMP_SPB_DOUBLE:
        if (v->kind == SMP_EV_BOOL || !smp_eval_as_double(v, &d)) {
            return -EINVAL;
        }
        if (dt == SMP_SPB_FLOAT) {
            m->value_case = V(FLOAT_VALUE);
            m->float_value = (float)d;
        } else {
            m->value_case = V(DOUBLE_VALUE);
            m->double_value = d;
        }
        return 0;
    case SMP_SPB_STRING:
    case SMP_SPB_TEXT:
        if (v->kind != SMP_EV_STRING) {
            return -EINVAL;
        }
        m->value_case = V(STRING_VALUE);
        m->string_value = v->s;
        return 0;
    default:
        return -EINVAL;
    }
}

int smp_spb_encode(uint64_t ts, int64_t seq, const smp_spb_metric_t *metrics, size_t n,
                   uint8_t **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    pb_payload_t p = PB_PAYLOAD_INIT;
    pb_metric_t *ms = n ? calloc(n, sizeof *ms) : NULL;
    pb_metric_t **mp = n ? calloc(n, sizeof *mp) : NULL;
    if (n > 0 && (ms == NULL || mp == NULL)) {
        free(ms);
        free(mp);
        return -ENOMEM;
    }
    int rc = 0;
    for (size_t k = 0; k < n && rc == 0; k++) {
        const smp_spb_metric_t *in = &metrics[k];
        pb_metric_t *m = &ms[k];
        *m = (pb_metric_t)PB_METRIC_INIT;
        m->name = (char *)in->name; /* protobuf-c does not write through it */
        m->has_alias = in->has_alias;
        m->alias = in->alias;
        m->has_timestamp = in->has_ts;
        m->timestamp = in->ts;
        m->has_datatype = in->datatype != SMP_SPB_UNKNOWN && !in->omit_datatype;
        m->datatype = in->datatype;
        if (in->is_historical) {
            m->has_is_historical = m->is_historical = true;
        }
        if (in->is_null || in->value == NULL || in->value->kind == SMP_EV_NONE) {
            m->has_is_null = m->is_null = true;
        } else {
            rc = set_value(m, in->datatype, in->value);
        }
        mp[k] = m;
    }
    if (rc == 0) {
        p.has_timestamp = ts != 0;
        p.timestamp = ts;
        p.has_seq = seq >= 0;
        p.seq = seq >= 0 ? (uint64_t)seq : 0;
        p.n_metrics = n;
        p.metrics = mp;
        size_t sz = org__eclipse__tahu__protobuf__payload__get_packed_size(&p);
        uint8_t *buf = malloc(sz ? sz : 1);
        if (buf == NULL) {
            rc = -ENOMEM;
        } else {
            *len = org__eclipse__tahu__protobuf__payload__pack(&p, buf);
            *out = buf;
        }
    }
    free(ms);
    free(mp);
    return rc;
}

/* int_value / long_value with the signedness and width the datatype gives them. */
static void decode_int(smp_spb_in_metric_t *o, uint64_t raw, bool is_long)
{
    uint32_t dt = o->has_datatype ? o->datatype : SMP_SPB_UNKNOWN;
    if (is_signed_dt(dt)) {
        o->value.kind = SMP_EV_INT;
        if (is_long) {
            o->value.i = (int64_t)raw;
        } else if (dt == SMP_SPB_INT8) {
            o->value.i = (int8_t)(uint8_t)raw;
        } else if (dt == SMP_SPB_INT16) {
            o->value.i = (int16_t)(uint16_t)raw;
        } else {
            o->value.i = (int32_t)(uint32_t)raw;
        }
    } else {
        o->value.kind = SMP_EV_UINT;
        o->value.u = raw;
    }
}

static int decode_metric(const pb_metric_t *m, smp_spb_in_metric_t *o)
{
    if (m->name != NULL) {
        o->name = strdup(m->name);
        if (o->name == NULL) {
            return -ENOMEM;
        }
    }
    o->has_alias = m->has_alias;
    o->alias = m->alias;
    o->has_ts = m->has_timestamp;
    o->ts = m->timestamp;
    o->has_datatype = m->has_datatype;
    o->datatype = m->datatype;
    o->is_null = m->has_is_null && m->is_null;
    o->is_historical = m->has_is_historical && m->is_historical;
    if (o->is_null) {
        return 0;
    }
    switch (m->value_case) {
    case V(INT_VALUE):
        decode_int(o, m->int_value, false);
        break;
    case V(LONG_VALUE):
        decode_int(o, m->long_value, true);
        break;
    case V(FLOAT_VALUE):
        o->value.kind = SMP_EV_FLOAT32;
        o->value.d = (double)m->float_value;
        break;
    case V(DOUBLE_VALUE):
        o->value.kind = SMP_EV_DOUBLE;
        o->value.d = m->double_value;
        break;
    case V(BOOLEAN_VALUE):
        o->value.kind = SMP_EV_BOOL;
        o->value.b = m->boolean_value != 0;
        break;
    case V(STRING_VALUE):
        o->value.s = strdup(m->string_value != NULL ? m->string_value : "");
        if (o->value.s == NULL) {
            return -ENOMEM;
        }
        o->value.kind = SMP_EV_STRING;
        break;
    case V(_NOT_SET):
        break;
    default:
        o->unsupported = true; /* bytes, datasets, templates, extensions */
        break;
    }
    return 0;
}

int smp_spb_decode(const void *buf, size_t len, smp_spb_payload_t *out)
{
    memset(out, 0, sizeof *out);
    if (len > SMP_SPB_MAX_PAYLOAD) {
        return -EMSGSIZE;
    }
    pb_payload_t *p = org__eclipse__tahu__protobuf__payload__unpack(NULL, len, buf);
    if (p == NULL) {
        return -EINVAL;
    }
    int rc = 0;
    if (p->n_metrics > SMP_SPB_MAX_METRICS) {
        rc = -EMSGSIZE;
        goto done;
    }
    out->has_ts = p->has_timestamp;
    out->ts = p->timestamp;
    out->has_seq = p->has_seq;
    out->seq = p->seq;
    if (p->n_metrics > 0) {
        out->metrics = calloc(p->n_metrics, sizeof *out->metrics);
        if (out->metrics == NULL) {
            rc = -ENOMEM;
            goto done;
        }
    }
    for (size_t k = 0; k < p->n_metrics; k++) {
        out->n = k + 1;
        rc = decode_metric(p->metrics[k], &out->metrics[k]);
        if (rc < 0) {
            break;
        }
    }
done:
    org__eclipse__tahu__protobuf__payload__free_unpacked(p, NULL);
    if (rc < 0) {
        smp_spb_payload_free(out);
    }
    return rc;
}

void smp_spb_payload_free(smp_spb_payload_t *p)
{
    if (p == NULL) {
        return;
    }
    for (size_t k = 0; k < p->n; k++) {
        free(p->metrics[k].name);
        smp_eval_clear(&p->metrics[k].value);
    }
    free(p->metrics);
    memset(p, 0, sizeof *p);
}
