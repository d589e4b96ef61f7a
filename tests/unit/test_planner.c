/* Unit tests of the Modbus read planner (protocols/modbus/planner.c). */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "planner.h"

#define HR SMP_MB_HOLDING_REGISTER
#define IR SMP_MB_INPUT_REGISTER
#define CO SMP_MB_COIL
#define DI SMP_MB_DISCRETE_INPUT

static const smp_mb_limits_t defaults = {.max_regs = 125, .max_bits = 2000, .max_gap = 8};

/* Identity subset 0..n-1. */
static uint32_t *all_idx(size_t n)
{
    uint32_t *idx = test_malloc((n ? n : 1) * sizeof(*idx));
    for (size_t i = 0; i < n; i++) {
        idx[i] = (uint32_t)i;
    }
    return idx;
}

static void plan_all(smp_mb_plan_t *plan, const smp_mb_span_t *spans, size_t n,
                     const smp_mb_limits_t *lim)
{
    uint32_t *idx = all_idx(n);
    assert_int_equal(smp_mb_plan_build(plan, spans, n, idx, n, lim), 0);
    test_free(idx);
}

static void assert_req(const smp_mb_plan_t *plan, size_t r, smp_mb_table_t table, unsigned address,
                       unsigned count, size_t nitems)
{
    assert_true(r < plan->nreqs);
    const smp_mb_request_t *q = &plan->reqs[r];
    if (q->table != table || q->address != address || q->count != count || q->nitems != nitems) {
        fail_msg("request %zu: table %d %u+%u (%zu tags), want table %d %u+%u (%zu tags)", r,
                 (int)q->table, q->address, q->count, q->nitems, (int)table, address, count,
                 nitems);
    }
}

/* Checks the invariants every plan must satisfy, for any input:
 * each subset position is served exactly once or listed as unplanned; each tag lies inside its
 * request at the recorded offset; requests respect the caps; bridged gaps respect max_gap;
 * requests are ordered by (table, address); and no request could have absorbed the next one's
 * first tag (so the greedy sweep did not close a request early). */
static void check_invariants(const smp_mb_plan_t *plan, const smp_mb_span_t *spans,
                             const uint32_t *idx, size_t n, const smp_mb_limits_t *lim)
{
    unsigned cap_regs = lim->max_regs < 1 ? 1 : lim->max_regs > 125 ? 125 : lim->max_regs;
    unsigned cap_bits = lim->max_bits < 1 ? 1 : lim->max_bits > 2000 ? 2000 : lim->max_bits;
    int *seen = test_calloc(n ? n : 1, sizeof(int));
    for (size_t u = 0; u < plan->nunplanned; u++) {
        seen[plan->unplanned[u]]++;
    }
    for (size_t r = 0; r < plan->nreqs; r++) {
        const smp_mb_request_t *q = &plan->reqs[r];
        unsigned cap = smp_mb_table_is_bits(q->table) ? cap_bits : cap_regs;
        assert_true(q->count >= 1 && q->count <= cap);
        assert_true((uint32_t)q->address + q->count <= 65536u);
        if (r > 0) {
            const smp_mb_request_t *p = &plan->reqs[r - 1];
            assert_true(p->table < q->table || (p->table == q->table && p->address <= q->address));
        }
        uint32_t covered_end = q->address;
        uint32_t max_end = q->address;
        for (size_t j = 0; j < q->nitems; j++) {
            const smp_mb_item_t *it = &plan->items[q->first + j];
            assert_true(it->k < n);
            seen[it->k]++;
            const smp_mb_span_t *s = &spans[idx[it->k]];
            assert_int_equal(s->table, q->table);
            assert_int_equal(s->address, q->address + it->offset);
            assert_true(it->offset + s->count <= q->count);
            if (s->address > covered_end) {
                assert_true(s->address - covered_end <= lim->max_gap);
            }
            if (s->address + s->count > covered_end) {
                covered_end = s->address + s->count;
            }
            max_end = covered_end > max_end ? covered_end : max_end;
            if (q->nitems > 1) {
                assert_false(s->isolated);
            }
        }
        assert_int_equal(max_end, q->address + q->count);
        /* Greedy closure: the next request of the same table starts with a tag that could not
         * have joined this one. */
        if (r + 1 < plan->nreqs && plan->reqs[r + 1].table == q->table) {
            const smp_mb_request_t *nx = &plan->reqs[r + 1];
            const smp_mb_span_t *s = &spans[idx[plan->items[nx->first].k]];
            const smp_mb_span_t *head = &spans[idx[plan->items[q->first].k]];
            uint32_t end = (uint32_t)q->address + q->count;
            uint32_t gap = s->address > end ? s->address - end : 0;
            uint32_t new_end = s->address + s->count > end ? s->address + s->count : end;
            bool could_join = !s->isolated && !(q->nitems == 1 && head->isolated) &&
                              gap <= lim->max_gap && new_end - q->address <= cap;
            assert_false(could_join);
        }
    }
    for (size_t k = 0; k < n; k++) {
        if (seen[k] != 1) {
            fail_msg("subset position %zu served %d times", k, seen[k]);
        }
    }
    test_free(seen);
}

static void test_adjacent_coalesce(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {{HR, 0, 1, false}, {HR, 1, 2, false}, {HR, 3, 1, false}};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 3, &defaults);
    assert_int_equal(plan.nreqs, 1);
    assert_req(&plan, 0, HR, 0, 4, 3);
    assert_int_equal(plan.reqs[0].gap, 0);
    assert_int_equal(plan.items[0].offset, 0);
    assert_int_equal(plan.items[1].offset, 1);
    assert_int_equal(plan.items[2].offset, 3);
    smp_mb_plan_free(&plan);
}

static void test_gap_bridged_within_max_gap(void **state)
{
    (void)state;
    /* 8 unrequested registers (1..8) between the tags: exactly max_gap. */
    smp_mb_span_t s[] = {{HR, 0, 1, false}, {HR, 9, 2, false}};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 2, &defaults);
    assert_int_equal(plan.nreqs, 1);
    assert_req(&plan, 0, HR, 0, 11, 2);
    assert_int_equal(plan.reqs[0].gap, 8);
    assert_int_equal(plan.items[1].offset, 9);
    smp_mb_plan_free(&plan);
}

static void test_gap_beyond_max_gap_splits(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {{HR, 0, 1, false}, {HR, 10, 1, false}};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 2, &defaults); /* gap 9 > 8 */
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, HR, 0, 1, 1);
    assert_req(&plan, 1, HR, 10, 1, 1);

    smp_mb_limits_t nogap = defaults;
    nogap.max_gap = 0;
    smp_mb_span_t t[] = {{HR, 0, 1, false}, {HR, 2, 1, false}, {HR, 3, 1, false}};
    plan_all(&plan, t, 3, &nogap);
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, HR, 0, 1, 1);
    assert_req(&plan, 1, HR, 2, 2, 2);
    smp_mb_plan_free(&plan);
}

static void test_register_limit_125(void **state)
{
    (void)state;
    smp_mb_span_t s[126];
    for (unsigned i = 0; i < 126; i++) {
        s[i] = (smp_mb_span_t){HR, (uint16_t)i, 1, false};
    }
    smp_mb_plan_t plan = {0};
    smp_mb_limits_t huge = {.max_regs = 1000, .max_bits = 100000, .max_gap = 8}; /* clamped */
    plan_all(&plan, s, 126, &huge);
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, HR, 0, 125, 125);
    assert_req(&plan, 1, HR, 125, 1, 1);
    smp_mb_plan_free(&plan);
}

static void test_bit_limit_2000(void **state)
{
    (void)state;
    size_t n = 2001;
    smp_mb_span_t *s = test_malloc(n * sizeof(*s));
    for (size_t i = 0; i < n; i++) {
        s[i] = (smp_mb_span_t){CO, (uint16_t)(100 + i), 1, false};
    }
    smp_mb_plan_t plan = {0};
    smp_mb_limits_t huge = {.max_regs = 1000, .max_bits = 100000, .max_gap = 8};
    plan_all(&plan, s, n, &huge);
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, CO, 100, 2000, 2000);
    assert_req(&plan, 1, CO, 2100, 1, 1);
    test_free(s);
    smp_mb_plan_free(&plan);
}

static void test_per_device_caps(void **state)
{
    (void)state;
    smp_mb_span_t s[20];
    for (unsigned i = 0; i < 20; i++) {
        s[i] = (smp_mb_span_t){IR, (uint16_t)i, 1, false};
    }
    smp_mb_limits_t small = {.max_regs = 10, .max_bits = 3, .max_gap = 8};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 20, &small);
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, IR, 0, 10, 10);
    assert_req(&plan, 1, IR, 10, 10, 10);

    smp_mb_span_t b[7];
    for (unsigned i = 0; i < 7; i++) {
        b[i] = (smp_mb_span_t){DI, (uint16_t)i, 1, false};
    }
    plan_all(&plan, b, 7, &small);
    assert_int_equal(plan.nreqs, 3);
    assert_req(&plan, 0, DI, 0, 3, 3);
    assert_req(&plan, 1, DI, 3, 3, 3);
    assert_req(&plan, 2, DI, 6, 1, 1);
    smp_mb_plan_free(&plan);
}

static void test_tables_never_merge_and_order(void **state)
{
    (void)state;
    /* Given in reverse table order; the plan comes out coil, discrete, input, holding. */
    smp_mb_span_t s[] = {{HR, 0, 1, false}, {IR, 0, 1, false}, {DI, 0, 1, false},
                         {CO, 0, 1, false}, {HR, 1, 1, false}, {CO, 1, 1, false}};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 6, &defaults);
    assert_int_equal(plan.nreqs, 4);
    assert_req(&plan, 0, CO, 0, 2, 2);
    assert_req(&plan, 1, DI, 0, 1, 1);
    assert_req(&plan, 2, IR, 0, 1, 1);
    assert_req(&plan, 3, HR, 0, 2, 2);
    assert_int_equal(plan.items[plan.reqs[0].first].k, 3);
    assert_int_equal(plan.items[plan.reqs[0].first + 1].k, 5);
    smp_mb_plan_free(&plan);
}

static void test_multi_register_tag_never_split(void **state)
{
    (void)state;
    /* Three float64 tags back to back with a 10-register cap: 0..7 fit, 8..11 cannot join. */
    smp_mb_span_t s[] = {{HR, 0, 4, false}, {HR, 4, 4, false}, {HR, 8, 4, false}};
    smp_mb_limits_t lim = {.max_regs = 10, .max_bits = 2000, .max_gap = 8};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 3, &lim);
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, HR, 0, 8, 2);
    assert_req(&plan, 1, HR, 8, 4, 1);

    /* A 125-register string takes a request of its own; the 2-register tag before it too. */
    smp_mb_span_t t[] = {{HR, 0, 2, false}, {HR, 2, 125, false}};
    plan_all(&plan, t, 2, &defaults);
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, HR, 0, 2, 1);
    assert_req(&plan, 1, HR, 2, 125, 1);
    smp_mb_plan_free(&plan);
}

static void test_subset(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {{HR, 0, 1, false},
                         {HR, 1, 1, false},
                         {HR, 2, 1, false},
                         {HR, 50, 2, false},
                         {CO, 7, 1, false}};
    uint32_t idx[] = {3, 1};
    smp_mb_plan_t plan = {0};
    assert_int_equal(smp_mb_plan_build(&plan, s, 5, idx, 2, &defaults), 0);
    assert_int_equal(plan.nreqs, 2);
    assert_req(&plan, 0, HR, 1, 1, 1);
    assert_int_equal(plan.items[plan.reqs[0].first].k, 1); /* position in idx, not tag index */
    assert_req(&plan, 1, HR, 50, 2, 1);
    assert_int_equal(plan.items[plan.reqs[1].first].k, 0);
    check_invariants(&plan, s, idx, 2, &defaults);

    /* Tags not in the subset are not read, even when they would fill the gap. */
    uint32_t idx2[] = {2, 0};
    assert_int_equal(smp_mb_plan_build(&plan, s, 5, idx2, 2, &defaults), 0);
    assert_int_equal(plan.nreqs, 1);
    assert_req(&plan, 0, HR, 0, 3, 2);
    assert_int_equal(plan.reqs[0].gap, 1);
    smp_mb_plan_free(&plan);
}

static void test_overlap_and_duplicates(void **state)
{
    (void)state;
    /* A bool at a bit of register 2 inside a float64 at 0..3, and the same tag asked twice. */
    smp_mb_span_t s[] = {{HR, 0, 4, false}, {HR, 2, 1, false}};
    uint32_t idx[] = {1, 0, 1};
    smp_mb_plan_t plan = {0};
    assert_int_equal(smp_mb_plan_build(&plan, s, 2, idx, 3, &defaults), 0);
    assert_int_equal(plan.nreqs, 1);
    assert_req(&plan, 0, HR, 0, 4, 3);
    assert_int_equal(plan.reqs[0].gap, 0);
    check_invariants(&plan, s, idx, 3, &defaults);
    smp_mb_plan_free(&plan);
}

static void test_isolated(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {{HR, 0, 1, false}, {HR, 1, 1, true}, {HR, 2, 1, false}, {HR, 3, 1, false}};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 4, &defaults);
    assert_int_equal(plan.nreqs, 3);
    assert_req(&plan, 0, HR, 0, 1, 1);
    assert_req(&plan, 1, HR, 1, 1, 1);
    assert_req(&plan, 2, HR, 2, 2, 2); /* the others still merge among themselves */
    smp_mb_plan_free(&plan);
}

static void test_unplanned(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {
        {HR, 0, 20, false},    /* more than the 10-register cap */
        {HR, 65535, 2, false}, /* runs past the last address */
        {HR, 5, 0, false},     /* empty */
        {HR, 30, 2, false},    /* fine */
        {(smp_mb_table_t)9, 0, 1, false},
    };
    smp_mb_limits_t lim = {.max_regs = 10, .max_bits = 2000, .max_gap = 8};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 5, &lim);
    assert_int_equal(plan.nreqs, 1);
    assert_req(&plan, 0, HR, 30, 2, 1);
    assert_int_equal(plan.nunplanned, 4);
    assert_int_equal(plan.unplanned[0], 0);
    assert_int_equal(plan.unplanned[1], 1);
    assert_int_equal(plan.unplanned[2], 2);
    assert_int_equal(plan.unplanned[3], 4);
    smp_mb_plan_free(&plan);
}

static void test_last_address(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {{HR, 65534, 2, false}, {CO, 65535, 1, false}};
    smp_mb_plan_t plan = {0};
    plan_all(&plan, s, 2, &defaults);
    assert_int_equal(plan.nreqs, 2);
    assert_int_equal(plan.nunplanned, 0);
    assert_req(&plan, 0, CO, 65535, 1, 1);
    assert_req(&plan, 1, HR, 65534, 2, 1);
    smp_mb_plan_free(&plan);
}

static void test_empty_and_invalid(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {{HR, 0, 1, false}};
    smp_mb_plan_t plan = {0};
    assert_int_equal(smp_mb_plan_build(&plan, s, 1, NULL, 0, &defaults), 0);
    assert_int_equal(plan.nreqs, 0);
    assert_int_equal(plan.nitems, 0);
    uint32_t bad[] = {1};
    assert_int_equal(smp_mb_plan_build(&plan, s, 1, bad, 1, &defaults), -EINVAL);
    assert_int_equal(plan.nreqs, 0);
    assert_int_equal(smp_mb_plan_build(&plan, s, 1, bad, 1, NULL), -EINVAL);
    assert_int_equal(smp_mb_plan_build(NULL, s, 1, bad, 1, &defaults), -EINVAL);
    smp_mb_plan_free(&plan);
    smp_mb_plan_free(NULL);
}

static void test_deterministic_and_reuse(void **state)
{
    (void)state;
    smp_mb_span_t s[] = {{HR, 40, 2, false}, {HR, 10, 1, false}, {IR, 3, 4, false},
                         {HR, 10, 1, false}, {HR, 12, 2, false}, {CO, 9, 1, false}};
    uint32_t fwd[] = {0, 1, 2, 3, 4, 5};
    uint32_t rev[] = {5, 4, 3, 2, 1, 0};
    smp_mb_plan_t a = {0}, b = {0};
    assert_int_equal(smp_mb_plan_build(&a, s, 6, fwd, 6, &defaults), 0);
    assert_int_equal(smp_mb_plan_build(&b, s, 6, rev, 6, &defaults), 0);
    assert_int_equal(a.nreqs, b.nreqs);
    assert_int_equal(a.nreqs, 4);
    for (size_t r = 0; r < a.nreqs; r++) {
        assert_int_equal(a.reqs[r].table, b.reqs[r].table);
        assert_int_equal(a.reqs[r].address, b.reqs[r].address);
        assert_int_equal(a.reqs[r].count, b.reqs[r].count);
        for (size_t j = 0; j < a.reqs[r].nitems; j++) {
            /* Same tags in the same order (mapped through each subset). */
            assert_int_equal(fwd[a.items[a.reqs[r].first + j].k],
                             rev[b.items[b.reqs[r].first + j].k]);
        }
    }
    assert_req(&a, 0, CO, 9, 1, 1);
    assert_req(&a, 1, IR, 3, 4, 1);
    assert_req(&a, 2, HR, 10, 4, 3);
    assert_req(&a, 3, HR, 40, 2, 1);
    /* Equal spans come in tag order: tags 1 and 3 are both HR 10+1. */
    assert_int_equal(a.items[a.reqs[2].first].k, 1);
    assert_int_equal(a.items[a.reqs[2].first + 1].k, 3);

    /* Reusing a plan for a smaller, then a larger subset. */
    assert_int_equal(smp_mb_plan_build(&a, s, 6, fwd, 1, &defaults), 0);
    assert_int_equal(a.nreqs, 1);
    assert_int_equal(smp_mb_plan_build(&a, s, 6, fwd, 6, &defaults), 0);
    assert_int_equal(a.nreqs, 4);
    smp_mb_plan_free(&a);
    smp_mb_plan_free(&b);
}

/* xorshift32: a fixed sequence, so a failure reproduces. */
static uint32_t rnd_state = 2463534242u;
static uint32_t rnd(void)
{
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 17;
    rnd_state ^= rnd_state << 5;
    return rnd_state;
}

/* Random layouts, caps and gaps: the invariants hold every time. */
static void test_random_invariants(void **state)
{
    (void)state;
    smp_mb_plan_t plan = {0};
    for (int iter = 0; iter < 2000; iter++) {
        size_t nspans = 1 + rnd() % 60;
        smp_mb_span_t *s = test_malloc(nspans * sizeof(*s));
        for (size_t i = 0; i < nspans; i++) {
            smp_mb_table_t t = (smp_mb_table_t)(rnd() % 4);
            uint16_t count = smp_mb_table_is_bits(t) ? 1 : (uint16_t)(1 + rnd() % 6);
            uint16_t addr = (uint16_t)(rnd() % 300);
            if (rnd() % 50 == 0) {
                addr = (uint16_t)(65530 + rnd() % 6);
            }
            bool isolated = rnd() % 15 == 0;
            s[i] = (smp_mb_span_t){t, addr, count, isolated};
        }
        size_t n = rnd() % (nspans + 5);
        uint32_t *idx = test_malloc((n ? n : 1) * sizeof(*idx));
        for (size_t k = 0; k < n; k++) {
            idx[k] = rnd() % (uint32_t)nspans;
        }
        smp_mb_limits_t lim;
        lim.max_regs = 1 + rnd() % 130;
        lim.max_bits = 1 + rnd() % 40;
        lim.max_gap = rnd() % 12;
        assert_int_equal(smp_mb_plan_build(&plan, s, nspans, idx, n, &lim), 0);
        check_invariants(&plan, s, idx, n, &lim);
        test_free(idx);
        test_free(s);
    }
    smp_mb_plan_free(&plan);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_adjacent_coalesce),
        cmocka_unit_test(test_gap_bridged_within_max_gap),
        cmocka_unit_test(test_gap_beyond_max_gap_splits),
        cmocka_unit_test(test_register_limit_125),
        cmocka_unit_test(test_bit_limit_2000),
        cmocka_unit_test(test_per_device_caps),
        cmocka_unit_test(test_tables_never_merge_and_order),
        cmocka_unit_test(test_multi_register_tag_never_split),
        cmocka_unit_test(test_subset),
        cmocka_unit_test(test_overlap_and_duplicates),
        cmocka_unit_test(test_isolated),
        cmocka_unit_test(test_unplanned),
        cmocka_unit_test(test_last_address),
        cmocka_unit_test(test_empty_and_invalid),
        cmocka_unit_test(test_deterministic_and_reuse),
        cmocka_unit_test(test_random_invariants),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
