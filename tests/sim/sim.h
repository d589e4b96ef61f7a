/* simpul-sim internals shared by the server loop (simpul-sim.c) and the device models
 * (sim_model.c).
 *
 * simpul-sim is a stand-alone test and demo program, not part of the gateway. The register map
 * defined here is documented, field by field, in docs/simulator.md and mirrored by
 * config/dumai-demo.json: change all three together.
 *
 * Threads: everything here runs on the simulator's single thread.
 */
#ifndef SIMPUL_SIM_H
#define SIMPUL_SIM_H

#include <stdbool.h>
#include <stdint.h>

#include <modbus/modbus.h>

/* Unit ids: pumps are 1..SIM_MAX_PUMPS, lights start at SIM_LIGHT_BASE + 1. */
#define SIM_MAX_PUMPS  10
#define SIM_LIGHT_BASE 10
#define SIM_MAX_LIGHTS 237 /* units 11..247: 247 is the highest Modbus unit id */

/* The four Modbus tables, in the order the design's config names them. */
typedef enum sim_table {
    SIM_COIL = 0,
    SIM_DISCRETE_INPUT,
    SIM_INPUT_REGISTER,
    SIM_HOLDING_REGISTER,
} sim_table_t;

typedef enum sim_kind {
    SIM_PUMP = 0,
    SIM_LIGHT,
} sim_kind_t;

/* ---- Register map (docs/simulator.md) ---- */

/* Common to every unit. */
#define SIM_IR_COUNT     32 /* input registers 0..31 exist; unlisted ones read 0 */
#define SIM_HR_START     10 /* holding registers start at 10; 0..9 are illegal addresses */
#define SIM_IR_NAME      20 /* string, 8 registers = 16 characters, NUL padded */
#define SIM_NAME_REGS    8
#define SIM_IR_HEARTBEAT 30 /* uint32 ABCD, 30..31 */

/* Pump. */
#define SIM_PUMP_COIL_RUNNING     0
#define SIM_PUMP_COIL_FAULT_RESET 1
#define SIM_PUMP_NB_COILS         2
#define SIM_PUMP_DI_FAULT         0
#define SIM_PUMP_DI_AT_SPEED      1
#define SIM_PUMP_DI_LOW_FLOW      2
#define SIM_PUMP_NB_DI            3
#define SIM_PUMP_HR_SPEED_SP      10 /* uint16 rpm, 0..3000 */
#define SIM_PUMP_HR_RAMP_S        11 /* uint16 s, 1..60 */
#define SIM_PUMP_HR_LOW_FLOW      12 /* float32 CDAB m3/h, 12..13, 0..100 */
#define SIM_PUMP_NB_HR            4
#define SIM_PUMP_IR_FLOW          0  /* float32 CDAB m3/h */
#define SIM_PUMP_IR_PRESSURE      2  /* float32 ABCD bar */
#define SIM_PUMP_IR_CURRENT       4  /* float32 BADC A */
#define SIM_PUMP_IR_RPM           6  /* uint16 rpm */
#define SIM_PUMP_IR_TEMP          7  /* int16 0.1 degC */
#define SIM_PUMP_IR_FAULT_CODE    8  /* uint16 */
#define SIM_PUMP_IR_STATUS        9  /* bit 0 motor on, bit 1 remote */
#define SIM_PUMP_IR_RUN_HOURS     10 /* uint32 ABCD 0.01 h */
#define SIM_PUMP_IR_ENERGY        12 /* uint32 CDAB 0.1 kWh */

#define SIM_PUMP_SPEED_MAX        3000
#define SIM_PUMP_RAMP_MIN         1
#define SIM_PUMP_RAMP_MAX         60
#define SIM_PUMP_LOW_FLOW_MAX     100.0f
#define SIM_PUMP_FAULT_OVERTEMP   1

/* Light. */
#define SIM_LIGHT_COIL_ON       0
#define SIM_LIGHT_NB_COILS      1
#define SIM_LIGHT_DI_FAULT      0
#define SIM_LIGHT_NB_DI         1
#define SIM_LIGHT_HR_DIM        10 /* uint16 %, 0..100 */
#define SIM_LIGHT_NB_HR         1
#define SIM_LIGHT_IR_POWER      0 /* float32 DCBA W */
#define SIM_LIGHT_IR_VOLTAGE    2 /* uint16 0.1 V */
#define SIM_LIGHT_IR_TEMP       3 /* int16 0.1 degC */
#define SIM_LIGHT_IR_BURN_HOURS 4 /* uint32 ABCD 0.01 h */
#define SIM_LIGHT_IR_FAULT_CODE 6 /* uint16 */
#define SIM_LIGHT_IR_STATUS     7 /* bit 0 lit */

#define SIM_LIGHT_DIM_MAX       100
#define SIM_LIGHT_FAULT_LAMP    1

/* Modbus exception codes the simulator answers with. */
#define SIM_EX_ILLEGAL_FUNCTION 0x01
#define SIM_EX_ILLEGAL_ADDRESS  0x02
#define SIM_EX_ILLEGAL_VALUE    0x03
#define SIM_EX_DEVICE_FAILURE   0x04
#define SIM_EX_GATEWAY_TARGET   0x0B

/* A small deterministic PRNG (xorshift64*), so that --seed reproduces a run. */
typedef struct sim_rng {
    uint64_t s;
} sim_rng_t;

typedef struct sim_pump {
    /* Inputs, mirrored from the writable registers after every write. */
    bool cmd_run;
    uint16_t speed_sp;
    uint16_t ramp_s;
    float low_flow_m3h;
    /* State. */
    double rpm;         /* actual motor speed */
    double temp_c;      /* motor winding temperature */
    double run_ch;      /* running time in 0.01 h (the register unit), while turning */
    double energy_dkwh; /* energy in 0.1 kWh (the register unit) */
    uint16_t fault_code;
    /* Outputs of the last update (with noise), kept so registers always match. */
    double flow_m3h, pressure_bar, current_a;
} sim_pump_t;

typedef struct sim_light {
    bool cmd_on;
    uint16_t dim_pct;
    double output;  /* 0..1, the LED driver's soft start follows the command */
    double temp_c;  /* LED driver temperature */
    double burn_ch; /* burning time in 0.01 h (the register unit), while lit */
    double voltage_v;
    double power_w;
    double age_s; /* seconds simulated, for the scripted lamp failure */
    uint16_t fault_code;
} sim_light_t;

typedef struct sim_unit {
    int id; /* Modbus unit id */
    sim_kind_t kind;
    int index;             /* 1-based within its kind: pump-01 is index 1 */
    modbus_mapping_t *map; /* owned */
    uint32_t heartbeat;
    union {
        sim_pump_t pump;
        sim_light_t light;
    } m;
} sim_unit_t;

/* Creates a unit in its documented initial state (no noise), registers filled in.
 * Returns NULL on allocation failure. Free with smp__sim_unit_free (NULL is a no-op). */
sim_unit_t *smp__sim_unit_new(sim_kind_t kind, int id, int index);
void smp__sim_unit_free(sim_unit_t *u);

/* Advances the model by dt seconds and rewrites the registers. Not called with --static. */
void smp__sim_unit_tick(sim_unit_t *u, double dt, bool tick_heartbeat, sim_rng_t *rng);

/* Decides whether a write may be applied. `proposed` is the whole table (coils as 0/1 per
 * address, registers as raw words), indexed from the mapping's start address, with the
 * request's values already applied; the live mapping still holds the old values. Returns 0 to
 * accept or a Modbus exception code. `simulating` is false with --static: then only checks
 * that hold for a real device regardless of its state (ranges) are made. */
int smp__sim_unit_check_write(const sim_unit_t *u, sim_table_t table, const uint16_t *proposed,
                              bool simulating);

/* Takes the writable registers, just changed by a write, into the model and rewrites the
 * registers derived from them. With simulating false, nothing beyond the write changes. */
void smp__sim_unit_after_write(sim_unit_t *u, sim_table_t table, bool simulating);

/* --counter: one more read of the heartbeat registers. */
void smp__sim_unit_count_read(sim_unit_t *u);

/* Start address and size of a table in the unit's mapping. */
void smp__sim_table_range(const sim_unit_t *u, sim_table_t table, int *start, int *count);

/* Uniform double in [-1, 1). */
double smp__sim_rng_sym(sim_rng_t *rng);

const char *smp__sim_table_name(sim_table_t table);

#endif
