/* Sparkplug B payload codec: encode and decode the protobuf payload of the Eclipse Sparkplug
 * 3.0 specification (gateway/sparkplug_b.proto, compiled with protoc-c at build time).
 *
 * Pure functions, no state: the Sparkplug session (sparkplug.c) builds messages with them, the
 * unit tests and the fuzz harness drive them directly. Values travel as the host's engineering
 * values (smp_eval_t, value.h); the datatype says how a value sits on the wire. */
#ifndef SMP_SPB_CODEC_H
#define SMP_SPB_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "value.h"

/* Sparkplug datatypes (specification 6.4.16), the ones simpul uses or must recognise. */
enum {
    SMP_SPB_UNKNOWN = 0,
    SMP_SPB_INT8 = 1,
    SMP_SPB_INT16 = 2,
    SMP_SPB_INT32 = 3,
    SMP_SPB_INT64 = 4,
    SMP_SPB_UINT8 = 5,
    SMP_SPB_UINT16 = 6,
    SMP_SPB_UINT32 = 7,
    SMP_SPB_UINT64 = 8,
    SMP_SPB_FLOAT = 9,
    SMP_SPB_DOUBLE = 10,
    SMP_SPB_BOOLEAN = 11,
    SMP_SPB_STRING = 12,
    SMP_SPB_DATETIME = 13,
    SMP_SPB_TEXT = 14,
};

/* A payload's largest accepted size and metric count on decode (a DCMD or NCMD is small). */
#define SMP_SPB_MAX_PAYLOAD (256u * 1024u)
#define SMP_SPB_MAX_METRICS 4096u

/* One metric to encode. Everything is borrowed for the call. */
typedef struct smp_spb_metric {
    const char *name; /* NULL: not sent (DATA messages with aliases) */
    bool has_alias;
    uint64_t alias;
    bool has_ts;
    uint64_t ts;
    uint32_t datatype;  /* SMP_SPB_*; SMP_SPB_UNKNOWN: not sent */
    bool omit_datatype; /* the value is encoded by datatype, which is left out (DATA) */
    bool is_null;       /* the value is unknown (value ignored) */
    bool is_historical;
    const smp_eval_t *value; /* NULL or SMP_EV_NONE: is_null */
} smp_spb_metric_t;

/* The Sparkplug datatype of a tag: its contract type (bool -> Boolean, int16 -> Int16, ...,
 * float32 -> Float, float64 -> Double, string -> String), except that a numeric tag with a
 * scale or offset carries fractional engineering values and is a Double. */
uint32_t smp_spb_datatype(const smp_tag_cfg_t *tag);
const char *smp_spb_datatype_name(uint32_t datatype);

/* Encodes a payload: `ts` (0: none), `seq` (negative: none), the metrics. On success returns 0
 * and *out (owned: free()) with *len bytes. Returns -EINVAL when a value does not fit its
 * datatype, -ENOMEM. */
int smp_spb_encode(uint64_t ts, int64_t seq, const smp_spb_metric_t *metrics, size_t n,
                   uint8_t **out, size_t *len);

/* One decoded metric. value is SMP_EV_NONE when the metric carries no value of a kind simpul
 * knows (is_null, absent, bytes, datasets, templates, extensions: `unsupported` says which). */
typedef struct smp_spb_in_metric {
    char *name; /* NULL when absent; bytes as received (not checked for UTF-8) */
    bool has_alias;
    uint64_t alias;
    bool has_ts;
    uint64_t ts;
    bool has_datatype;
    uint32_t datatype;
    bool is_null, is_historical;
    bool unsupported;
    smp_eval_t value; /* int_value/long_value: SMP_EV_INT for signed datatypes, else UINT */
} smp_spb_in_metric_t;

typedef struct smp_spb_payload {
    bool has_ts, has_seq;
    uint64_t ts, seq;
    smp_spb_in_metric_t *metrics;
    size_t n;
} smp_spb_payload_t;

/* Decodes `len` bytes of untrusted input. Returns 0 and fills *out (free it with
 * smp_spb_payload_free), or -EMSGSIZE (too big, too many metrics), -EINVAL (not a valid
 * payload; *out is then empty), -ENOMEM. */
int smp_spb_decode(const void *buf, size_t len, smp_spb_payload_t *out);
void smp_spb_payload_free(smp_spb_payload_t *p);

#endif
