/* The command module alone (command.h), through its engine interface (engine_cmd.h): a fake
 * engine records the jobs, readings and answers; the store is a real one in a temporary
 * directory (the at-most-once records). */
#include <errno.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "command.h"
#include "store.h"

#define DEADLINE_MS 5000
#define MAX_PUBS    16

/* The fake engine's device job: what the command asked for. */
struct smp_cmd_job {
    smp_cmd_job_spec_t spec;
    smp_value_t raw;
};

struct pub {
    char topic[160];
    char text[1024];
    uint64_t token;
};

static struct fake {
    uv_loop_t loop;
    char dir[64], path[96];
    smp_config_t cfg;
    smp_device_cfg_t dev;
    smp_tag_cfg_t tags[2];
    smp_store_t *store;
    smp_commands_t *cmds;
    smp_cmd_engine_t ce;
    /* what the engine reports */
    int online;
    bool stopping;
    int publish_rc;
    /* what the commands did */
    struct pub pubs[MAX_PUBS];
    size_t npubs;
    smp_cmd_job_t *job; /* the last job queued */
    void *cookie;
    smp_cmd_job_t *jobs[8]; /* every job queued, and its cookie */
    void *cookies[8];
    uint64_t deadline;
    size_t jobs_queued, jobs_live;
    size_t emits;
    uint32_t emit_tag;
    uint64_t emit_raw;
} f;

static int fake_find_device(void *eng, const char *name)
{
    (void)eng;
    return strcmp(name, f.dev.name) == 0 ? 0 : -1;
}

static void fake_device(void *eng, size_t dev, smp_cmd_device_t *out)
{
    (void)eng;
    assert_int_equal(dev, 0);
    *out = (smp_cmd_device_t){.cfg = &f.dev,
                              .topic_result = "simpul/gw1/pump/cmd/result",
                              .online = f.online,
                              .status_err = "no response"};
}

static smp_cmd_job_t *fake_job_new(void *eng, size_t dev, const smp_cmd_job_spec_t *spec)
{
    (void)eng;
    assert_int_equal(dev, 0);
    smp_cmd_job_t *j = calloc(1, sizeof *j);
    assert_non_null(j);
    j->spec = *spec;
    if (spec->write) {
        j->raw = *spec->raw;
    }
    f.jobs_live++;
    return j;
}

static void fake_job_free(void *eng, smp_cmd_job_t *job)
{
    (void)eng;
    f.jobs_live--;
    free(job);
}

static void fake_job_enqueue(void *eng, smp_cmd_job_t *job, uint64_t deadline_mono_ms, void *cookie)
{
    (void)eng;
    assert_true(f.jobs_queued < 8);
    f.job = f.jobs[f.jobs_queued] = job;
    f.cookie = f.cookies[f.jobs_queued] = cookie;
    f.deadline = deadline_mono_ms;
    f.jobs_queued++;
}

static void fake_emit_reading(void *eng, size_t dev, uint32_t tag, const smp_reading_t *r,
                              uint64_t ts_ms)
{
    (void)eng;
    (void)dev;
    (void)ts_ms;
    f.emits++;
    f.emit_tag = tag;
    f.emit_raw = r->value.v.u;
}

static int fake_publish(void *eng, const char *topic, const char *text, size_t len, uint64_t token,
                        const smp_mqtt_props_t *props)
{
    (void)eng;
    (void)len;
    (void)props;
    if (f.publish_rc != 0) {
        return f.publish_rc;
    }
    assert_true(f.npubs < MAX_PUBS);
    struct pub *p = &f.pubs[f.npubs++];
    snprintf(p->topic, sizeof p->topic, "%s", topic);
    snprintf(p->text, sizeof p->text, "%s", text);
    p->token = token;
    return 0;
}

static bool fake_stopping(void *eng)
{
    (void)eng;
    return f.stopping;
}

static void fake_progress(void *eng)
{
    (void)eng;
}

static const smp_cmd_engine_ops_t fake_ops = {
    .find_device = fake_find_device,
    .device = fake_device,
    .job_new = fake_job_new,
    .job_free = fake_job_free,
    .job_enqueue = fake_job_enqueue,
    .emit_reading = fake_emit_reading,
    .publish = fake_publish,
    .stopping = fake_stopping,
    .progress = fake_progress,
};

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int g_rate_per_device = 100;

static int setup(void **state)
{
    (void)state;
    memset(&f, 0, sizeof f);
    snprintf(f.dir, sizeof f.dir, "/tmp/simpul-cmdmod-XXXXXX");
    if (mkdtemp(f.dir) == NULL || uv_loop_init(&f.loop) != 0) {
        return -1;
    }
    snprintf(f.path, sizeof f.path, "%s/simpul.db", f.dir);
    f.cfg.gateway.id = "gw1";
    f.cfg.mqtt.topic_prefix = "simpul";
    f.cfg.commands.dedup_window_s = 600;
    f.cfg.commands.rate_per_device = g_rate_per_device;
    f.cfg.commands.rate_global = 200;
    f.cfg.commands.dedup_max = 100;
    f.cfg.commands.result_max_bytes = 4096;
    /* speed: raw uint16 in tenths, writable 0..1000; temp: read-only */
    f.tags[0] = (smp_tag_cfg_t){.name = "speed",
                                .type = SMP_TYPE_UINT16,
                                .scale = 0.1,
                                .writable = true,
                                .has_min = true,
                                .has_max = true,
                                .max = 1000};
    f.tags[1] = (smp_tag_cfg_t){.name = "temp", .type = SMP_TYPE_FLOAT32, .scale = 1};
    f.dev = (smp_device_cfg_t){.name = "pump", .tags = f.tags, .ntags = 2};
    f.cfg.devices = &f.dev;
    f.cfg.ndevices = 1;
    f.online = 1;
    smp_store_opts_t so = {.path = f.path, .cmd_keep_ms = 1200000};
    if (smp_store_open(&f.loop, &so, &f.store) != 0) {
        return -1;
    }
    f.ce = (smp_cmd_engine_t){
        .ops = &fake_ops, .eng = &f, .loop = &f.loop, .cfg = &f.cfg, .store = f.store, .ndevs = 1};
    f.cmds = smp_commands_new(&f.ce);
    return f.cmds != NULL ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    smp_store_close(f.store); /* runs the last store callbacks, which use the commands */
    smp_commands_free(f.cmds);
    uv_run(&f.loop, UV_RUN_NOWAIT);
    int rc = uv_loop_close(&f.loop);
    nftw(f.dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    assert_int_equal(f.jobs_live, 0); /* every job made was queued or freed */
    return rc;
}

static void on_deadline(uv_timer_t *t)
{
    *(bool *)t->data = true;
}

/* Runs the loop until `expr` holds or DEADLINE_MS pass, then asserts `expr`. */
#define WAIT_FOR(expr)                                                                             \
    do {                                                                                           \
        bool fired_ = false;                                                                       \
        uv_timer_t t_;                                                                             \
        uv_timer_init(&f.loop, &t_);                                                               \
        t_.data = &fired_;                                                                         \
        uv_timer_start(&t_, on_deadline, DEADLINE_MS, 0);                                          \
        while (!(expr) && !fired_) {                                                               \
            uv_run(&f.loop, UV_RUN_ONCE);                                                          \
        }                                                                                          \
        uv_close((uv_handle_t *)&t_, NULL);                                                        \
        uv_run(&f.loop, UV_RUN_NOWAIT);                                                            \
        assert_true(expr);                                                                         \
    } while (0)

static void deliver(const char *device, const char *json, bool retained)
{
    char topic[128];
    snprintf(topic, sizeof topic, "simpul/gw1/%s/cmd", device);
    smp_mqtt_props_t props = {.retained = retained};
    smp_commands_receive(f.cmds, topic, json, strlen(json), &props);
}

static const struct pub *last_pub(void)
{
    assert_true(f.npubs > 0);
    return &f.pubs[f.npubs - 1];
}

static void assert_contains(const char *text, const char *needle)
{
    if (strstr(text, needle) == NULL) {
        fail_msg("'%s' lacks '%s'", text, needle);
    }
}

/* The device confirms the write of the last job with read-back `raw`. */
static void complete_write(uint64_t raw)
{
    smp_reading_t rb = {.value.v.u = raw};
    smp_cmd_outcome_t o = {.errmsg = "", .started = true, .done_wall_ms = 1000, .rb = &rb};
    fake_job_free(NULL, f.job);
    smp_commands_job_done(f.cmds, f.cookie, &o);
}

static void test_write_confirmed(void **state)
{
    (void)state;
    deliver("pump", "{\"id\":\"w1\",\"op\":\"write\",\"tag\":\"speed\",\"value\":12.5}", false);
    /* Queued only once the "accepted" record is committed. */
    WAIT_FOR(f.jobs_queued == 1);
    assert_true(f.job->spec.write);
    assert_int_equal(f.job->spec.tag, 0);
    assert_int_equal(f.job->raw.v.u, 125); /* 12.5 / scale 0.1 */
    assert_int_equal(f.deadline, 0);       /* no ttl_ms */
    assert_true(smp_commands_busy(f.cmds));
    complete_write(125);
    assert_int_equal(f.emits, 1); /* the confirmed value goes out as data */
    assert_int_equal(f.emit_raw, 125);
    assert_string_equal(last_pub()->topic, "simpul/gw1/pump/cmd/result");
    assert_contains(last_pub()->text, "\"id\":\"w1\",\"ok\":true,\"tag\":\"speed\",\"value\":12.5");
    WAIT_FOR(!smp_commands_busy(f.cmds));
    assert_int_equal(smp_commands_answered(f.cmds), 1);
}

static void test_duplicate_not_run_again(void **state)
{
    (void)state;
    const char *cmd = "{\"id\":\"w2\",\"op\":\"write\",\"tag\":\"speed\",\"value\":3}";
    deliver("pump", cmd, false);
    WAIT_FOR(f.jobs_queued == 1);
    /* A duplicate while the first runs waits for its result... */
    deliver("pump", cmd, false);
    complete_write(30);
    WAIT_FOR(!smp_commands_busy(f.cmds) && f.npubs == 2);
    assert_string_equal(f.pubs[0].text, f.pubs[1].text);
    /* ...and one after it is answered at once with the same text, never queued. */
    deliver("pump", cmd, false);
    assert_int_equal(f.npubs, 3);
    assert_string_equal(f.pubs[2].text, f.pubs[0].text);
    assert_int_equal(f.jobs_queued, 1);
}

static void test_readback_mismatch(void **state)
{
    (void)state;
    deliver("pump",
            "{\"id\":\"w3\",\"op\":\"write\",\"tag\":\"speed\",\"value\":1,\"ttl_ms\":60000}",
            false);
    uint64_t now_mono = uv_hrtime() / 1000000u;
    WAIT_FOR(f.jobs_queued == 1);
    /* The ttl becomes a deadline on the monotonic clock. */
    assert_true(f.deadline > now_mono + 59000 && f.deadline <= now_mono + 60000);
    complete_write(11);
    assert_contains(last_pub()->text, "\"ok\":false");
    assert_contains(last_pub()->text, "\"code\":\"device_error\"");
    assert_contains(last_pub()->text, "device reads back 1.1");
    assert_contains(last_pub()->text, "after the write of 1");
    WAIT_FOR(!smp_commands_busy(f.cmds));
}

static void test_refusals_before_io(void **state)
{
    (void)state;
    deliver("pump", "{\"id\":\"r1\",\"op\":\"write\",\"tag\":\"speed\",\"value\":1}", true);
    assert_contains(last_pub()->text, "\"code\":\"stale_retained\"");
    deliver("nope", "{\"id\":\"r2\",\"op\":\"read\",\"tags\":[\"temp\"]}", false);
    assert_string_equal(last_pub()->topic, "simpul/gw1/nope/cmd/result");
    assert_contains(last_pub()->text, "\"code\":\"unknown_device\"");
    deliver("pump", "{\"id\":\"r3\",\"op\":\"write\",\"tag\":\"temp\",\"value\":1}", false);
    assert_contains(last_pub()->text, "\"code\":\"not_writable\"");
    deliver("pump", "{\"id\":\"r4\",\"op\":\"write\",\"tag\":\"speed\",\"value\":2000}", false);
    assert_contains(last_pub()->text, "\"code\":\"out_of_range\"");
    f.online = 0;
    deliver("pump", "{\"id\":\"r5\",\"op\":\"read\",\"tags\":[\"temp\"]}", false);
    assert_contains(last_pub()->text, "\"code\":\"device_offline\"");
    assert_contains(last_pub()->text, "device is offline: no response");
    WAIT_FOR(!smp_commands_busy(f.cmds));
    assert_int_equal(f.jobs_queued, 0);
}

static void test_rate_per_device(void **state)
{
    (void)state;
    /* rate_per_device 2: a burst of two, the third refused */
    for (int k = 0; k < 3; k++) {
        char cmd[96];
        snprintf(cmd, sizeof cmd, "{\"id\":\"q%d\",\"op\":\"read\",\"tags\":[\"temp\"]}", k);
        deliver("pump", cmd, false);
    }
    assert_contains(last_pub()->text, "\"id\":\"q2\"");
    assert_contains(last_pub()->text, "commands.rate_per_device");
    WAIT_FOR(f.jobs_queued == 2);
    assert_false(f.job->spec.write);
    assert_int_equal(f.job->spec.n, 1);
    assert_int_equal(f.job->spec.idx[0], 1);
    /* q0: the tag failed on the device; q1: its value. */
    smp_reading_t r = {.status = -ETIMEDOUT};
    char errs[SMP_ENGINE_ERRMSG_LEN] = "no response";
    smp_cmd_outcome_t o = {.errmsg = "", .done_wall_ms = 7, .readings = &r, .tag_errs = errs};
    fake_job_free(NULL, f.jobs[0]);
    smp_commands_job_done(f.cmds, f.cookies[0], &o);
    assert_contains(
        last_pub()->text,
        "\"id\":\"q0\",\"ok\":true,\"values\":{},\"errors\":{\"temp\":\"no response\"}");
    r = (smp_reading_t){.value.v.d = 21.5};
    fake_job_free(NULL, f.jobs[1]);
    smp_commands_job_done(f.cmds, f.cookies[1], &o);
    assert_contains(last_pub()->text, "\"id\":\"q1\",\"ok\":true,\"values\":{\"temp\":21.5}");
    WAIT_FOR(!smp_commands_busy(f.cmds));
}

/* At most once across restarts: the results, and the commands that never finished, come back
 * from the store. */
static void test_restart_remembers(void **state)
{
    (void)state;
    deliver("pump", "{\"id\":\"k1\",\"op\":\"write\",\"tag\":\"speed\",\"value\":2}", false);
    WAIT_FOR(f.jobs_queued == 1);
    complete_write(20);
    WAIT_FOR(!smp_commands_busy(f.cmds));
    char first[1024];
    snprintf(first, sizeof first, "%s", last_pub()->text);
    deliver("pump", "{\"id\":\"k2\",\"op\":\"write\",\"tag\":\"speed\",\"value\":3}", false);
    WAIT_FOR(f.jobs_queued == 2);
    /* The gateway goes down while k2 is on the device. */
    fake_job_free(NULL, f.job);
    smp_commands_job_discard(f.cmds, f.cookie);
    smp_commands_free(f.cmds);
    f.cmds = smp_commands_new(&f.ce);
    assert_non_null(f.cmds);
    deliver("pump", "{\"id\":\"k1\",\"op\":\"write\",\"tag\":\"speed\",\"value\":2}", false);
    assert_string_equal(last_pub()->text, first);
    deliver("pump", "{\"id\":\"k2\",\"op\":\"write\",\"tag\":\"speed\",\"value\":3}", false);
    assert_contains(last_pub()->text, "\"code\":\"timeout\"");
    assert_contains(last_pub()->text, "outcome unknown");
    assert_int_equal(f.jobs_queued, 2); /* neither ran again */
    WAIT_FOR(!smp_commands_busy(f.cmds));
}

static int setup_rate2(void **state)
{
    g_rate_per_device = 2;
    int rc = setup(state);
    g_rate_per_device = 100;
    return rc;
}

static void test_cancelled_and_stopping(void **state)
{
    (void)state;
    deliver("pump", "{\"id\":\"c1\",\"op\":\"write\",\"tag\":\"speed\",\"value\":1}", false);
    WAIT_FOR(f.jobs_queued == 1);
    fake_job_free(NULL, f.job);
    smp_commands_job_cancelled(f.cmds, f.cookie);
    assert_contains(last_pub()->text, "\"code\":\"cancelled\"");
    f.stopping = true;
    deliver("pump", "{\"id\":\"c2\",\"op\":\"write\",\"tag\":\"speed\",\"value\":1}", false);
    assert_contains(last_pub()->text, "the gateway is stopping; nothing was written");
    WAIT_FOR(!smp_commands_busy(f.cmds));
    assert_int_equal(f.jobs_queued, 1);
}

static void test_answers_wait_for_the_window(void **state)
{
    (void)state;
    f.publish_rc = -EAGAIN; /* the window is full */
    deliver("pump", "{\"id\":\"a1\",\"op\":\"write\",\"tag\":\"nope\",\"value\":1}", false);
    deliver("pump", "{\"id\":\"a2\",\"op\":\"write\",\"tag\":\"nope\",\"value\":1}", false);
    assert_int_equal(f.npubs, 0);
    f.publish_rc = 0;
    smp_commands_flush(f.cmds);
    assert_int_equal(f.npubs, 2); /* in the order they were answered */
    assert_contains(f.pubs[0].text, "\"id\":\"a1\"");
    assert_contains(f.pubs[1].text, "\"id\":\"a2\"");
    assert_true(f.pubs[0].token & SMP_CMD_ANSWER_TOKEN);
    /* An outbox row's PUBACK is not the commands'. */
    assert_false(smp_commands_acked(f.cmds, 42));
    assert_true(smp_commands_acked(f.cmds, f.pubs[0].token));
    /* The connection drops before a2's PUBACK: a2 goes again, a1 does not. */
    smp_commands_disconnected(f.cmds);
    smp_commands_flush(f.cmds);
    assert_int_equal(f.npubs, 3);
    assert_string_equal(f.pubs[2].text, f.pubs[1].text);
    WAIT_FOR(!smp_commands_busy(f.cmds));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_write_confirmed, setup, teardown),
        cmocka_unit_test_setup_teardown(test_duplicate_not_run_again, setup, teardown),
        cmocka_unit_test_setup_teardown(test_readback_mismatch, setup, teardown),
        cmocka_unit_test_setup_teardown(test_refusals_before_io, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rate_per_device, setup_rate2, teardown),
        cmocka_unit_test_setup_teardown(test_cancelled_and_stopping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_restart_remembers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_answers_wait_for_the_window, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
