/* Modbus read planner (see planner.h).
 *
 * Sorting the subset by (table, address) and sweeping it once, extending the current request
 * while the next tag fits, yields the fewest requests: with tags sorted by start, closing a
 * request only when the next tag cannot join is the classic greedy interval cover, and the cap
 * and gap rules are both monotone in the tag's start. */
#include "planner.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

/* A tag to plan with the fields the sort needs, so the comparator needs no context. */
typedef struct entry {
    uint32_t k;
    uint32_t tag;
    smp_mb_table_t table;
    uint32_t address;
    uint32_t count;
    bool isolated;
} entry_t;

static int entry_cmp(const void *pa, const void *pb)
{
    const entry_t *a = pa, *b = pb;
    if (a->table != b->table) {
        return a->table < b->table ? -1 : 1;
    }
    if (a->address != b->address) {
        return a->address < b->address ? -1 : 1;
    }
    /* Ties broken on every field so that qsort's instability cannot show. */
    if (a->count != b->count) {
        return a->count < b->count ? -1 : 1;
    }
    if (a->tag != b->tag) {
        return a->tag < b->tag ? -1 : 1;
    }
    if (a->k != b->k) {
        return a->k < b->k ? -1 : 1;
    }
    return 0;
}

static unsigned clamp(unsigned v, unsigned lo, unsigned hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

static int reserve(smp_mb_plan_t *plan, size_t n, entry_t **scratch)
{
    if (n == 0) {
        n = 1;
    }
    *scratch = NULL;
    if (plan->cap < n) {
        smp_mb_request_t *reqs = realloc(plan->reqs, n * sizeof(*reqs));
        if (reqs == NULL) {
            return -ENOMEM;
        }
        plan->reqs = reqs;
        smp_mb_item_t *items = realloc(plan->items, n * sizeof(*items));
        if (items == NULL) {
            return -ENOMEM;
        }
        plan->items = items;
        uint32_t *unplanned = realloc(plan->unplanned, n * sizeof(*unplanned));
        if (unplanned == NULL) {
            return -ENOMEM;
        }
        plan->unplanned = unplanned;
        plan->cap = n;
    }
    /* The sort buffer lives only for one call: plans are built once per poll, and keeping it
     * would add a field callers could misuse. */
    *scratch = malloc(n * sizeof(entry_t));
    return *scratch == NULL ? -ENOMEM : 0;
}

int smp_mb_plan_build(smp_mb_plan_t *plan, const smp_mb_span_t *spans, size_t nspans,
                      const uint32_t *idx, size_t n, const smp_mb_limits_t *lim)
{
    if (plan == NULL) {
        return -EINVAL;
    }
    plan->nreqs = plan->nitems = plan->nunplanned = 0;
    if (lim == NULL || (n > 0 && (spans == NULL || idx == NULL))) {
        return -EINVAL;
    }
    for (size_t k = 0; k < n; k++) {
        if (idx[k] >= nspans) {
            return -EINVAL;
        }
    }
    if (n > UINT32_MAX) {
        return -EINVAL;
    }

    entry_t *e = NULL;
    int rc = reserve(plan, n, &e);
    if (rc < 0) {
        return rc;
    }

    unsigned caps[SMP_MB_NTABLES];
    caps[SMP_MB_COIL] = caps[SMP_MB_DISCRETE_INPUT] = clamp(lim->max_bits, 1, SMP_MB_MAX_READ_BITS);
    caps[SMP_MB_INPUT_REGISTER] = caps[SMP_MB_HOLDING_REGISTER] =
        clamp(lim->max_regs, 1, SMP_MB_MAX_READ_REGS);

    size_t ne = 0;
    for (size_t k = 0; k < n; k++) {
        const smp_mb_span_t *s = &spans[idx[k]];
        bool ok = (unsigned)s->table < SMP_MB_NTABLES && s->count > 0 &&
                  (uint32_t)s->address + s->count <= 65536u && s->count <= caps[s->table];
        if (!ok) {
            plan->unplanned[plan->nunplanned++] = (uint32_t)k;
            continue;
        }
        e[ne++] = (entry_t){.k = (uint32_t)k,
                            .tag = idx[k],
                            .table = s->table,
                            .address = s->address,
                            .count = s->count,
                            .isolated = s->isolated};
    }
    qsort(e, ne, sizeof(*e), entry_cmp);

    smp_mb_request_t *cur = NULL;
    bool cur_isolated = false;
    uint32_t cur_gap = 0;
    for (size_t j = 0; j < ne; j++) {
        const entry_t *t = &e[j];
        if (cur != NULL && t->table == cur->table && !t->isolated && !cur_isolated) {
            uint32_t start = cur->address;
            uint32_t end = start + cur->count; /* the furthest end of any tag so far */
            uint32_t gap = t->address > end ? t->address - end : 0;
            uint32_t new_end = t->address + t->count > end ? t->address + t->count : end;
            if (gap <= lim->max_gap && new_end - start <= caps[t->table]) {
                cur->count = (uint16_t)(new_end - start);
                cur_gap += gap;
                cur->gap = (uint16_t)cur_gap;
                cur->nitems++;
                plan->items[plan->nitems++] =
                    (smp_mb_item_t){.k = t->k, .offset = (uint16_t)(t->address - start)};
                continue;
            }
        }
        cur = &plan->reqs[plan->nreqs++];
        *cur = (smp_mb_request_t){.table = t->table,
                                  .address = (uint16_t)t->address,
                                  .count = (uint16_t)t->count,
                                  .gap = 0,
                                  .first = plan->nitems,
                                  .nitems = 1};
        cur_isolated = t->isolated;
        cur_gap = 0;
        plan->items[plan->nitems++] = (smp_mb_item_t){.k = t->k, .offset = 0};
    }
    free(e);
    return 0;
}

void smp_mb_plan_free(smp_mb_plan_t *plan)
{
    if (plan == NULL) {
        return;
    }
    free(plan->reqs);
    free(plan->items);
    free(plan->unplanned);
    memset(plan, 0, sizeof(*plan));
}
