/* Modbus read planner: coalesces the tags to read into as few requests as the protocol and the
 * device allow.
 *
 * One request reads one contiguous range of one table. Tags of the same table are merged into a
 * request while the range stays within the per-request limit (125 registers / 2000 bits, or the
 * device's smaller cap) and the unrequested space bridged between two tags is at most max_gap
 * units (registers for register tables, bits for bit tables). A tag is never split across
 * requests. Pure code: no I/O, no libmodbus.
 *
 * Reading fewer, larger requests is the biggest lever on a Modbus link (a 125-register read
 * costs about as much as a 10-register one), but bridging a gap reads addresses nobody asked
 * for, which some devices refuse; max_gap is the knob, and `isolated` lets the driver read a tag
 * on its own once a device has shown it cannot be read together with its neighbours.
 */
#ifndef SMP_MODBUS_PLANNER_H
#define SMP_MODBUS_PLANNER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "codec.h"

/* Protocol limits of one read request (FC1/FC2 and FC3/FC4). */
#define SMP_MB_MAX_READ_BITS 2000u
#define SMP_MB_MAX_READ_REGS 125u

/* Where one tag lives. count is in registers for register tables and in bits for bit tables
 * (always 1 there). */
typedef struct smp_mb_span {
    smp_mb_table_t table;
    uint16_t address;
    uint16_t count;
    bool isolated; /* never merged with another tag */
} smp_mb_span_t;

typedef struct smp_mb_limits {
    unsigned max_regs; /* per request, clamped to 1..SMP_MB_MAX_READ_REGS */
    unsigned max_bits; /* per request, clamped to 1..SMP_MB_MAX_READ_BITS */
    unsigned max_gap;  /* unrequested units one request may bridge between two tags */
} smp_mb_limits_t;

/* One tag served by a request: the subset position k (the tag is spans[idx[k]]) and the offset
 * of its first unit from the request's start address. */
typedef struct smp_mb_item {
    uint32_t k;
    uint16_t offset;
} smp_mb_item_t;

typedef struct smp_mb_request {
    smp_mb_table_t table;
    uint16_t address;
    uint16_t count; /* units to read: registers or bits */
    uint16_t gap;   /* unrequested units inside the range (0 = tags cover it fully) */
    size_t first;   /* items[first .. first + nitems) are the tags served */
    size_t nitems;
} smp_mb_request_t;

/* A plan. Reuse one across calls: smp_mb_plan_build() keeps the buffers and grows them only when
 * a larger subset comes. Zero-initialise before first use; free with smp_mb_plan_free(). */
typedef struct smp_mb_plan {
    smp_mb_request_t *reqs;
    size_t nreqs;
    smp_mb_item_t *items; /* grouped by request, in address order inside each */
    size_t nitems;
    uint32_t *unplanned; /* subset positions k of tags that cannot be read with these limits */
    size_t nunplanned;
    size_t cap; /* capacity of each array, in elements */
} smp_mb_plan_t;

/* Plans a read of spans[idx[0..n)] (spans has nspans entries; indices may repeat, each
 * occurrence is served). Requests come out ordered by table, then address; tags inside a
 * request by address, then span size, then tag index. The result depends only on the inputs.
 *
 * A tag that can never be read with `lim` (count 0, a range beyond address 65535, an invalid
 * table, or more units than the request cap) is not planned: its k goes to plan->unplanned.
 * Returns 0, -EINVAL for an index >= nspans or NULL arguments (plan left empty), or -ENOMEM. */
int smp_mb_plan_build(smp_mb_plan_t *plan, const smp_mb_span_t *spans, size_t nspans,
                      const uint32_t *idx, size_t n, const smp_mb_limits_t *lim);

/* Frees the plan's buffers and zeroes it. NULL is a no-op. */
void smp_mb_plan_free(smp_mb_plan_t *plan);

#endif /* SMP_MODBUS_PLANNER_H */
