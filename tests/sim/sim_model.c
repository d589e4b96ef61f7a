/* simpul-sim device models: storm-water pumps and a street of LED streetlights in Dumai.
 *
 * Each unit keeps its physical state in doubles (sim_unit_t.m) and renders it into its
 * libmodbus mapping after every change, so a read never sees a half-updated value. The models
 * are deliberately simple but consistent: pump flow follows speed (affinity law), pressure
 * follows flow (system curve), current follows the cube of speed, motor temperature follows
 * current with a one-minute time constant and trips the pump when it gets too hot; a light's
 * power follows its dim level through a soft start, its driver temperature follows power.
 *
 * The initial state is chosen so that the numbers are exact in float32 and easy to assert in
 * tests (--static serves exactly these); docs/simulator.md lists them.
 */
#include "sim.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Index of a holding register in the mapping, which starts at SIM_HR_START. */
#define HR(addr) ((addr)-SIM_HR_START)

/* Byte orders of 32-bit values, named as in the gateway's config (A = most significant). */
typedef enum word_order {
    ORDER_ABCD,
    ORDER_BADC,
    ORDER_CDAB,
    ORDER_DCBA,
} word_order_t;

/* Pump model constants. The reference point is 1450 rpm (a 4-pole motor on 50 Hz), where the
 * pump delivers 12.5 m3/h at 2.25 bar and draws 7.5 A. */
#define PUMP_RPM_REF       1450.0
#define PUMP_FLOW_REF      12.5 /* m3/h at the reference speed */
#define PUMP_STATIC_HEAD   0.5  /* bar with no flow: the water column on the outlet */
#define PUMP_DYN_HEAD      1.75 /* bar added at the reference flow (grows with flow^2) */
#define PUMP_I_IDLE        2.0  /* A magnetising current */
#define PUMP_I_LOAD        5.5  /* A of load current at the reference speed (grows with n^3) */
#define PUMP_T_AMBIENT     30.0 /* degC, Dumai is warm all year */
#define PUMP_T_PER_AMP     (11.5 / 5.5) /* degC of steady-state rise per ampere of load current */
#define PUMP_T_TAU         60.0         /* s, thermal time constant of the winding */
#define PUMP_T_TRIP        95.0         /* degC: over-temperature trip */
#define PUMP_T_RESET       80.0         /* degC: a fault reset is accepted below this */
#define PUMP_KW_PER_AMP    0.5889       /* sqrt(3) * 0.4 kV * cos(phi) 0.85 */
#define PUMP_AT_SPEED_BAND 30.0         /* rpm */
#define PUMP_RAMP_FULL     3000.0       /* ramp_s is the time for 0 -> 3000 rpm */

/* Light model constants: a 120 W LED luminaire with a 0.5 W standby controller. */
#define LIGHT_P_RATED       120.0
#define LIGHT_P_STANDBY     0.5
#define LIGHT_SOFT_START    2.0 /* output fraction per second */
#define LIGHT_T_AMBIENT     30.0
#define LIGHT_T_PER_W       0.05
#define LIGHT_T_TAU         120.0
#define LIGHT_V_NOMINAL     230.0
#define LIGHT_FAILING_INDEX 4     /* light-04's lamp fails ... */
#define LIGHT_FAIL_AFTER_S  120.0 /* ... two minutes into a simulating run */

const char *smp__sim_table_name(sim_table_t table)
{
    switch (table) {
    case SIM_COIL:
        return "coil";
    case SIM_DISCRETE_INPUT:
        return "discrete_input";
    case SIM_INPUT_REGISTER:
        return "input_register";
    case SIM_HOLDING_REGISTER:
        return "holding_register";
    }
    return "?";
}

double smp__sim_rng_sym(sim_rng_t *rng)
{
    uint64_t x = rng->s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng->s = x;
    /* The top 53 bits of the xorshift64* output give a uniform double in [0, 1). */
    uint64_t r = (x * UINT64_C(0x2545F4914F6CDD1D)) >> 11;
    return (double)r / (double)(UINT64_C(1) << 53) * 2.0 - 1.0;
}

/* Noise factor 1 + pct * u, or exactly 1 without a generator (initial state, --static). */
static double jitter(sim_rng_t *rng, double pct)
{
    return rng ? 1.0 + pct * smp__sim_rng_sym(rng) : 1.0;
}

static double approach(double x, double target, double max_step)
{
    if (x < target) {
        return x + max_step >= target ? target : x + max_step;
    }
    return x - max_step <= target ? target : x - max_step;
}

static uint16_t swap16(uint16_t v)
{
    return (uint16_t)((v >> 8) | (v << 8));
}

static void put_u32(uint16_t *r, uint32_t v, word_order_t order)
{
    uint16_t hi = (uint16_t)(v >> 16), lo = (uint16_t)(v & 0xFFFF);
    switch (order) {
    case ORDER_ABCD:
        r[0] = hi;
        r[1] = lo;
        break;
    case ORDER_CDAB:
        r[0] = lo;
        r[1] = hi;
        break;
    case ORDER_BADC:
        r[0] = swap16(hi);
        r[1] = swap16(lo);
        break;
    case ORDER_DCBA:
        r[0] = swap16(lo);
        r[1] = swap16(hi);
        break;
    }
}

static uint32_t get_u32(const uint16_t *r, word_order_t order)
{
    uint16_t hi = 0, lo = 0;
    switch (order) {
    case ORDER_ABCD:
        hi = r[0];
        lo = r[1];
        break;
    case ORDER_CDAB:
        lo = r[0];
        hi = r[1];
        break;
    case ORDER_BADC:
        hi = swap16(r[0]);
        lo = swap16(r[1]);
        break;
    case ORDER_DCBA:
        lo = swap16(r[0]);
        hi = swap16(r[1]);
        break;
    }
    return ((uint32_t)hi << 16) | lo;
}

static void put_f32(uint16_t *r, float f, word_order_t order)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    put_u32(r, bits, order);
}

static float get_f32(const uint16_t *r, word_order_t order)
{
    uint32_t bits = get_u32(r, order);
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Tenths, rounded, as a two's-complement register (int16 with scale 0.1). */
static uint16_t put_tenths_i16(double v)
{
    long t = lround(v * 10.0);
    if (t > INT16_MAX) {
        t = INT16_MAX;
    } else if (t < INT16_MIN) {
        t = INT16_MIN;
    }
    return (uint16_t)(int16_t)t;
}

/* Counters accumulate in their register unit (0.01 h, 0.1 kWh) and are shown truncated, as a
 * meter shows whole counts. */
static uint32_t counter_u32(double v)
{
    if (v <= 0) {
        return 0;
    }
    return v >= 4294967295.0 ? UINT32_MAX : (uint32_t)v;
}

static void put_name(uint16_t *r, const char *name)
{
    /* Two characters per register, high byte first; NUL padded. */
    size_t n = strlen(name);
    for (int i = 0; i < SIM_NAME_REGS; i++) {
        uint8_t hi = (size_t)(2 * i) < n ? (uint8_t)name[2 * i] : 0;
        uint8_t lo = (size_t)(2 * i + 1) < n ? (uint8_t)name[2 * i + 1] : 0;
        r[i] = (uint16_t)((hi << 8) | lo);
    }
}

/* ---- Pumps ---- */

/* Counters are kept in their register units: centi-hours and deci-kWh. */
#define PUMP_RUN_CH_BASE 123456.0 /* pump-01: 1234.56 h */
#define PUMP_RUN_CH_STEP 111111.0
#define PUMP_ENERGY_BASE 56789.0 /* pump-01: 5678.9 kWh */
#define PUMP_ENERGY_STEP 11111.0

static bool pump_turning(const sim_pump_t *p)
{
    return p->rpm > 0.5;
}

static bool pump_at_speed(const sim_pump_t *p)
{
    return pump_turning(p) && p->cmd_run && p->speed_sp > 0 &&
           fabs(p->rpm - p->speed_sp) <= PUMP_AT_SPEED_BAND;
}

static double pump_nominal_current(double rpm)
{
    double r = rpm / PUMP_RPM_REF;
    return rpm > 0.5 ? PUMP_I_IDLE + PUMP_I_LOAD * r * r * r : 0.0;
}

static double pump_steady_temp(double rpm)
{
    double i = pump_nominal_current(rpm);
    return i > 0 ? PUMP_T_AMBIENT + (i - PUMP_I_IDLE) * PUMP_T_PER_AMP : PUMP_T_AMBIENT;
}

/* Hydraulic and electrical outputs for the current speed; noise only with a generator. */
static void pump_outputs(sim_pump_t *p, sim_rng_t *rng)
{
    double r = p->rpm / PUMP_RPM_REF;
    if (pump_turning(p)) {
        p->flow_m3h = PUMP_FLOW_REF * r * jitter(rng, 0.01);
        p->current_a = pump_nominal_current(p->rpm) * jitter(rng, 0.01);
    } else {
        p->flow_m3h = 0.0;
        p->current_a = 0.0;
    }
    double q = p->flow_m3h / PUMP_FLOW_REF;
    p->pressure_bar = (PUMP_STATIC_HEAD + PUMP_DYN_HEAD * q * q) * jitter(rng, 0.005);
}

static void pump_to_regs(sim_unit_t *u, sim_rng_t *rng)
{
    const sim_pump_t *p = &u->m.pump;
    modbus_mapping_t *m = u->map;
    bool low_flow = pump_at_speed(p) && p->flow_m3h < p->low_flow_m3h;

    m->tab_bits[SIM_PUMP_COIL_RUNNING] = p->cmd_run;
    m->tab_bits[SIM_PUMP_COIL_FAULT_RESET] = 0; /* momentary: always reads 0 */
    m->tab_input_bits[SIM_PUMP_DI_FAULT] = p->fault_code != 0;
    m->tab_input_bits[SIM_PUMP_DI_AT_SPEED] = pump_at_speed(p);
    m->tab_input_bits[SIM_PUMP_DI_LOW_FLOW] = low_flow;

    uint16_t *hr = m->tab_registers;
    hr[HR(SIM_PUMP_HR_SPEED_SP)] = p->speed_sp;
    hr[HR(SIM_PUMP_HR_RAMP_S)] = p->ramp_s;
    put_f32(&hr[HR(SIM_PUMP_HR_LOW_FLOW)], p->low_flow_m3h, ORDER_CDAB);

    uint16_t *ir = m->tab_input_registers;
    put_f32(&ir[SIM_PUMP_IR_FLOW], (float)p->flow_m3h, ORDER_CDAB);
    put_f32(&ir[SIM_PUMP_IR_PRESSURE], (float)p->pressure_bar, ORDER_ABCD);
    put_f32(&ir[SIM_PUMP_IR_CURRENT], (float)p->current_a, ORDER_BADC);
    /* A drive's speed readout wanders by a couple of rpm around the true speed. */
    double rpm = pump_turning(p) ? p->rpm + (rng ? 2.0 * smp__sim_rng_sym(rng) : 0.0) : 0.0;
    ir[SIM_PUMP_IR_RPM] = (uint16_t)(rpm < 0 ? 0 : lround(rpm));
    ir[SIM_PUMP_IR_TEMP] = put_tenths_i16(p->temp_c);
    ir[SIM_PUMP_IR_FAULT_CODE] = p->fault_code;
    ir[SIM_PUMP_IR_STATUS] = (uint16_t)((pump_turning(p) ? 1u : 0u) | 2u /* remote */);
    put_u32(&ir[SIM_PUMP_IR_RUN_HOURS], counter_u32(p->run_ch), ORDER_ABCD);
    put_u32(&ir[SIM_PUMP_IR_ENERGY], counter_u32(p->energy_dkwh), ORDER_CDAB);
    put_u32(&ir[SIM_IR_HEARTBEAT], u->heartbeat, ORDER_ABCD);
}

static void pump_init(sim_unit_t *u)
{
    sim_pump_t *p = &u->m.pump;
    /* Three duty patterns repeat: running at the reference speed, running at 1.5x (where every
     * derived value is still exact in float32), and a stopped standby pump. */
    switch ((u->index - 1) % 3) {
    case 0:
        p->cmd_run = true;
        p->speed_sp = 1450;
        break;
    case 1:
        p->cmd_run = true;
        p->speed_sp = 2175;
        break;
    default:
        p->cmd_run = false;
        p->speed_sp = 1450;
        break;
    }
    p->ramp_s = 5;
    p->low_flow_m3h = 5.0f;
    p->rpm = p->cmd_run ? p->speed_sp : 0.0;
    p->temp_c = pump_steady_temp(p->rpm);
    p->run_ch = PUMP_RUN_CH_BASE + PUMP_RUN_CH_STEP * (u->index - 1);
    p->energy_dkwh = PUMP_ENERGY_BASE + PUMP_ENERGY_STEP * (u->index - 1);
    p->fault_code = 0;
    pump_outputs(p, NULL);

    char name[2 * SIM_NAME_REGS + 1];
    snprintf(name, sizeof name, "Dumai PS-%02d", u->index);
    put_name(&u->map->tab_input_registers[SIM_IR_NAME], name);
    pump_to_regs(u, NULL);
}

static void pump_tick(sim_unit_t *u, double dt, sim_rng_t *rng)
{
    sim_pump_t *p = &u->m.pump;
    double target = p->cmd_run && p->fault_code == 0 ? p->speed_sp : 0.0;
    double rate = PUMP_RAMP_FULL / (p->ramp_s ? p->ramp_s : 1);

    p->rpm = approach(p->rpm, target, rate * dt);
    pump_outputs(p, rng);

    /* First-order thermal model: the winding heads for the steady-state temperature of the
     * present load with a time constant of a minute. */
    double t_ss = pump_steady_temp(p->rpm);
    p->temp_c += (t_ss - p->temp_c) * (1.0 - exp(-dt / PUMP_T_TAU));
    if (p->temp_c >= PUMP_T_TRIP && p->fault_code == 0) {
        /* The protection relay drops the run command, as a real starter does. */
        p->fault_code = SIM_PUMP_FAULT_OVERTEMP;
        p->cmd_run = false;
    }
    if (pump_turning(p)) {
        p->run_ch += dt / 36.0;                                        /* centi-hours */
        p->energy_dkwh += PUMP_KW_PER_AMP * p->current_a * dt / 360.0; /* deci-kWh */
    }
}

static int pump_check_write(const sim_unit_t *u, sim_table_t table, const uint16_t *proposed,
                            bool simulating)
{
    const sim_pump_t *p = &u->m.pump;
    if (table == SIM_HOLDING_REGISTER) {
        const uint16_t *hr = proposed;
        float lf = get_f32(&hr[HR(SIM_PUMP_HR_LOW_FLOW)], ORDER_CDAB);
        if (hr[HR(SIM_PUMP_HR_SPEED_SP)] > SIM_PUMP_SPEED_MAX ||
            hr[HR(SIM_PUMP_HR_RAMP_S)] < SIM_PUMP_RAMP_MIN ||
            hr[HR(SIM_PUMP_HR_RAMP_S)] > SIM_PUMP_RAMP_MAX || !isfinite(lf) || lf < 0.0f ||
            lf > SIM_PUMP_LOW_FLOW_MAX) {
            return SIM_EX_ILLEGAL_VALUE;
        }
    } else if (table == SIM_COIL && simulating) {
        /* A tripped pump refuses to start until its fault is reset: the operator gets a
         * "server device failure" instead of a write that silently does nothing. */
        if (proposed[SIM_PUMP_COIL_RUNNING] && !proposed[SIM_PUMP_COIL_FAULT_RESET] &&
            p->fault_code != 0) {
            return SIM_EX_DEVICE_FAILURE;
        }
    }
    return 0;
}

static void pump_after_write(sim_unit_t *u, sim_table_t table)
{
    sim_pump_t *p = &u->m.pump;
    modbus_mapping_t *m = u->map;
    if (table == SIM_COIL) {
        if (m->tab_bits[SIM_PUMP_COIL_FAULT_RESET] && p->fault_code != 0 &&
            p->temp_c < PUMP_T_RESET) {
            p->fault_code = 0;
        }
        /* A start command with a fault still present (reset refused: too hot) is dropped. */
        p->cmd_run = m->tab_bits[SIM_PUMP_COIL_RUNNING] && p->fault_code == 0;
    } else if (table == SIM_HOLDING_REGISTER) {
        const uint16_t *hr = m->tab_registers;
        p->speed_sp = hr[HR(SIM_PUMP_HR_SPEED_SP)];
        p->ramp_s = hr[HR(SIM_PUMP_HR_RAMP_S)];
        p->low_flow_m3h = get_f32(&hr[HR(SIM_PUMP_HR_LOW_FLOW)], ORDER_CDAB);
    }
}

/* ---- Lights ---- */

#define LIGHT_BURN_CH_BASE 432100.0 /* light-01: 4321.00 h */
#define LIGHT_BURN_CH_STEP 1000.0

static bool light_lit(const sim_light_t *l)
{
    return l->output > 0.0 && l->fault_code == 0;
}

static void light_to_regs(sim_unit_t *u)
{
    const sim_light_t *l = &u->m.light;
    modbus_mapping_t *m = u->map;

    m->tab_bits[SIM_LIGHT_COIL_ON] = l->cmd_on;
    m->tab_input_bits[SIM_LIGHT_DI_FAULT] = l->fault_code != 0;
    m->tab_registers[HR(SIM_LIGHT_HR_DIM)] = l->dim_pct;

    uint16_t *ir = m->tab_input_registers;
    put_f32(&ir[SIM_LIGHT_IR_POWER], (float)l->power_w, ORDER_DCBA);
    ir[SIM_LIGHT_IR_VOLTAGE] = (uint16_t)lround(l->voltage_v * 10.0);
    ir[SIM_LIGHT_IR_TEMP] = put_tenths_i16(l->temp_c);
    put_u32(&ir[SIM_LIGHT_IR_BURN_HOURS], counter_u32(l->burn_ch), ORDER_ABCD);
    ir[SIM_LIGHT_IR_FAULT_CODE] = l->fault_code;
    ir[SIM_LIGHT_IR_STATUS] = light_lit(l) ? 1u : 0u;
    put_u32(&ir[SIM_IR_HEARTBEAT], u->heartbeat, ORDER_ABCD);
}

static double light_power(const sim_light_t *l, sim_rng_t *rng)
{
    if (!light_lit(l)) {
        return LIGHT_P_STANDBY;
    }
    return LIGHT_P_STANDBY + LIGHT_P_RATED * l->output * jitter(rng, 0.005);
}

static void light_init(sim_unit_t *u)
{
    sim_light_t *l = &u->m.light;
    l->cmd_on = true;
    l->dim_pct = 80;
    l->output = 0.8;
    l->fault_code = 0;
    l->burn_ch = LIGHT_BURN_CH_BASE + LIGHT_BURN_CH_STEP * (u->index - 1);
    l->voltage_v = LIGHT_V_NOMINAL;
    l->power_w = light_power(l, NULL);
    l->temp_c = LIGHT_T_AMBIENT + LIGHT_T_PER_W * l->power_w;
    l->age_s = 0;

    char name[2 * SIM_NAME_REGS + 1];
    snprintf(name, sizeof name, "Sudirman L-%02d", u->index);
    put_name(&u->map->tab_input_registers[SIM_IR_NAME], name);
    light_to_regs(u);
}

static void light_tick(sim_unit_t *u, double dt, sim_rng_t *rng)
{
    sim_light_t *l = &u->m.light;
    l->age_s += dt;
    if (u->index == LIGHT_FAILING_INDEX && l->age_s >= LIGHT_FAIL_AFTER_S && l->fault_code == 0) {
        /* Scripted so the demo shows an alarm: light-04's lamp goes open circuit and stays
         * so (a lamp needs a site visit, not a command). */
        l->fault_code = SIM_LIGHT_FAULT_LAMP;
    }
    double target = l->cmd_on ? l->dim_pct / 100.0 : 0.0;
    l->output = approach(l->output, target, LIGHT_SOFT_START * dt);
    l->power_w = light_power(l, rng);
    /* Mains wanders slowly around nominal over a ten-minute cycle. */
    l->voltage_v =
        LIGHT_V_NOMINAL + 3.0 * sin(2.0 * M_PI * l->age_s / 600.0) + 0.3 * smp__sim_rng_sym(rng);
    double t_ss = LIGHT_T_AMBIENT + LIGHT_T_PER_W * l->power_w;
    l->temp_c += (t_ss - l->temp_c) * (1.0 - exp(-dt / LIGHT_T_TAU));
    if (light_lit(l)) {
        l->burn_ch += dt / 36.0; /* centi-hours */
    }
}

static void light_after_write(sim_unit_t *u, sim_table_t table)
{
    sim_light_t *l = &u->m.light;
    if (table == SIM_COIL) {
        l->cmd_on = u->map->tab_bits[SIM_LIGHT_COIL_ON] != 0;
    } else if (table == SIM_HOLDING_REGISTER) {
        l->dim_pct = u->map->tab_registers[HR(SIM_LIGHT_HR_DIM)];
    }
}

/* ---- Units ---- */

sim_unit_t *smp__sim_unit_new(sim_kind_t kind, int id, int index)
{
    sim_unit_t *u = calloc(1, sizeof *u);
    if (!u) {
        return NULL;
    }
    u->id = id;
    u->kind = kind;
    u->index = index;
    if (kind == SIM_PUMP) {
        u->map = modbus_mapping_new_start_address(0, SIM_PUMP_NB_COILS, 0, SIM_PUMP_NB_DI,
                                                  SIM_HR_START, SIM_PUMP_NB_HR, 0, SIM_IR_COUNT);
    } else {
        u->map = modbus_mapping_new_start_address(0, SIM_LIGHT_NB_COILS, 0, SIM_LIGHT_NB_DI,
                                                  SIM_HR_START, SIM_LIGHT_NB_HR, 0, SIM_IR_COUNT);
    }
    if (!u->map) {
        free(u);
        return NULL;
    }
    if (kind == SIM_PUMP) {
        pump_init(u);
    } else {
        light_init(u);
    }
    return u;
}

void smp__sim_unit_free(sim_unit_t *u)
{
    if (!u) {
        return;
    }
    modbus_mapping_free(u->map);
    free(u);
}

void smp__sim_unit_tick(sim_unit_t *u, double dt, bool tick_heartbeat, sim_rng_t *rng)
{
    if (tick_heartbeat) {
        u->heartbeat++;
    }
    if (u->kind == SIM_PUMP) {
        pump_tick(u, dt, rng);
        pump_to_regs(u, rng);
    } else {
        light_tick(u, dt, rng);
        light_to_regs(u);
    }
}

int smp__sim_unit_check_write(const sim_unit_t *u, sim_table_t table, const uint16_t *proposed,
                              bool simulating)
{
    if (u->kind == SIM_PUMP) {
        return pump_check_write(u, table, proposed, simulating);
    }
    if (table == SIM_HOLDING_REGISTER) {
        if (proposed[HR(SIM_LIGHT_HR_DIM)] > SIM_LIGHT_DIM_MAX) {
            return SIM_EX_ILLEGAL_VALUE;
        }
    }
    return 0;
}

void smp__sim_unit_after_write(sim_unit_t *u, sim_table_t table, bool simulating)
{
    if (!simulating) {
        return; /* --static: the write itself is the only change */
    }
    /* The effect of a write shows at once in the registers derived from it (a start command
     * sets the run coil, a fault reset clears the fault); the physics follows on the next
     * tick. No generator here: the speed readout shows the true speed until the next tick. */
    if (u->kind == SIM_PUMP) {
        pump_after_write(u, table);
        pump_to_regs(u, NULL);
    } else {
        light_after_write(u, table);
        light_to_regs(u);
    }
}

void smp__sim_unit_count_read(sim_unit_t *u)
{
    u->heartbeat++;
    put_u32(&u->map->tab_input_registers[SIM_IR_HEARTBEAT], u->heartbeat, ORDER_ABCD);
}

void smp__sim_table_range(const sim_unit_t *u, sim_table_t table, int *start, int *count)
{
    const modbus_mapping_t *m = u->map;
    switch (table) {
    case SIM_COIL:
        *start = m->start_bits;
        *count = m->nb_bits;
        break;
    case SIM_DISCRETE_INPUT:
        *start = m->start_input_bits;
        *count = m->nb_input_bits;
        break;
    case SIM_INPUT_REGISTER:
        *start = m->start_input_registers;
        *count = m->nb_input_registers;
        break;
    case SIM_HOLDING_REGISTER:
        *start = m->start_registers;
        *count = m->nb_registers;
        break;
    }
}
