/* simpul: the edge gateway daemon. CLI, signals, and the loop. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <malloc.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#include "bridge.h"
#include "config.h"
#include "engine.h"
#include "log.h"
#include "probe.h"
#include "plugin_info.h"
#include "paths.h"
#include "sdnotify.h"

/* SIGTERM/SIGINT must end the process within 5 s (the contract); leave a margin. */
#define STOP_TIMEOUT_MS 4000u
/* READY=1 waits for every device's first poll, but no longer than this: a bus of dead devices
 * must not hold up the start (systemd's TimeoutStartSec). */
#define READY_MAX_WAIT_MS 10000u
#define SD_TICK_MS        500u
/* At exit, buffered log lines get this long to reach a slow stderr (inside the 5 s stop). */
#define LOG_FLUSH_MS 500u

static void usage(FILE *f)
{
    fprintf(
        f,
        "Usage: simpul -c FILE [--check] [--log-level LEVEL] [--plugin-dir DIR]\n"
        "       simpul -c FILE --probe DEVICE\n"
        "       simpul --plugins | --plugin-help NAME | --plugin-schema NAME\n"
        "       simpul --version | --help\n"
        "\n"
        "Edge gateway: polls field devices (Modbus TCP/RTU, SNMP) and bridges them to MQTT.\n"
        "\n"
        "  -c, --config FILE      the JSON config file (see docs/config.md)\n"
        "      --check            validate FILE and every plugin's part of it, and check that\n"
        "                         this user can write gateway.data_dir and store.path; print\n"
        "                         each problem as FILE:LINE:COL: path.to.key: message;\n"
        "                         exit 0 when valid, 1 when not\n"
        "      --probe DEVICE     read every tag of DEVICE once, print tag, address, raw\n"
        "                         data, decoded value, unit, error; never writes; exit 0\n"
        "                         all read, 3 some tags failed, 1 unreachable\n"
        "  -l, --log-level LEVEL  error | warn | info | debug (overrides gateway.log_level)\n"
        "      --plugin-dir DIR   where protocol plugins (NAME.so) are found\n"
        "      --plugins          list the plugins found, with their versions and ABI\n"
        "      --plugin-help NAME print protocol NAME's connection and tag keys\n"
        "      --plugin-schema NAME  the same keys as JSON Schema (config/simpul.schema.json)\n"
        "  -V, --version          print the version and exit\n"
        "  -h, --help             print this help and exit\n"
        "\n"
        "Signals: SIGTERM/SIGINT stop gracefully (offline status published, store flushed);\n"
        "SIGHUP reloads the config (a bad new config is rejected, the old one keeps running).\n");
}

struct app {
    uv_loop_t *loop;
    const char *config_path;
    const char *plugin_dir;
    int cli_log_level;
    smp_config_t *cfg;
    smp_engine_t *engine;
    uv_signal_t sigterm, sigint, sighup;
    bool stopping;
    bool reload_pending;     /* the new config is being read off the loop */
    smp_config_t **old_cfgs; /* configs a reload replaced that the engine may still refer to */
    size_t nold_cfgs;
    int exit_code;
    /* systemd notifications (sdnotify.h); all no-ops without $NOTIFY_SOCKET */
    bool sd_on;
    uv_timer_t sd_timer; /* readiness, then STATUS= updates */
    uv_timer_t wd_timer; /* WATCHDOG=1, on the loop thread so a stuck loop stops the pings */
    uint64_t wd_usec;    /* the watchdog period systemd asked for; 0: none */
    bool sd_ready;       /* READY=1 sent for the running engine */
    uint64_t sd_since;   /* loop time the running engine started */
    char sd_status[160]; /* the last STATUS= sent */
};

static void apply_log_level(struct app *a, const smp_config_t *cfg)
{
    int level = a->cli_log_level;
    if (level < 0 && cfg != NULL && cfg->gateway.log_level != NULL) {
        level = smp_log_level_parse(cfg->gateway.log_level);
    }
    smp_log_set_level(level >= 0 ? level : SMP_LOG_INFO);
}

static void sd_status_text(const smp_engine_health_t *h, char *buf, size_t n)
{
    snprintf(buf, n, "%zu/%zu devices online, outbox %" PRIu64 ", mqtt %s%s", h->online, h->devices,
             h->outbox_depth, h->mqtt_connected ? "connected" : "disconnected",
             h->store_degraded ? ", store DEGRADED (in memory, writes refused)" : "");
}

/* READY=1 once the store is open, the plugins are loaded (both before the engine exists) and
 * every device has been polled once (or READY_MAX_WAIT_MS passed); then STATUS= on change. */
static void on_sd_timer(uv_timer_t *t)
{
    struct app *a = t->data;
    if (a->engine == NULL || a->stopping) {
        return;
    }
    smp_engine_health_t h;
    smp_engine_health(a->engine, &h);
    char st[sizeof a->sd_status];
    sd_status_text(&h, st, sizeof st);
    if (!a->sd_ready) {
        if (h.tried < h.devices && uv_now(a->loop) - a->sd_since < READY_MAX_WAIT_MS) {
            return;
        }
        a->sd_ready = true;
        LOG_DEBUG("main", "ready: %zu of %zu devices polled once", h.tried, h.devices);
        smp_sd_notifyf("READY=1\nSTATUS=%s", st);
    } else if (strcmp(st, a->sd_status) != 0) {
        smp_sd_notifyf("STATUS=%s", st);
    }
    snprintf(a->sd_status, sizeof a->sd_status, "%s", st);
}

static void on_wd_timer(uv_timer_t *t)
{
    (void)t;
    smp_sd_notify("WATCHDOG=1");
}

static void sd_start(struct app *a)
{
    a->sd_on = getenv("NOTIFY_SOCKET") != NULL;
    uv_timer_init(a->loop, &a->sd_timer);
    uv_timer_init(a->loop, &a->wd_timer);
    a->sd_timer.data = a->wd_timer.data = a;
    uv_unref((uv_handle_t *)&a->sd_timer);
    uv_unref((uv_handle_t *)&a->wd_timer);
    if (!a->sd_on) {
        return;
    }
    uv_timer_start(&a->sd_timer, on_sd_timer, SD_TICK_MS, SD_TICK_MS);
    uint64_t wd = smp_sd_watchdog_usec();
    a->wd_usec = wd;
    if (wd > 0) {
        /* Half the period, as sd_watchdog_enabled(3) advises: one late tick is not fatal. */
        uint64_t ms = wd / 2000u > 0 ? wd / 2000u : 1;
        uv_timer_start(&a->wd_timer, on_wd_timer, ms, ms);
        LOG_INFO("main", "systemd watchdog: %" PRIu64 " ms, pinged every %" PRIu64 " ms",
                 wd / 1000u, ms);
    }
}

/* The engine started: readiness is judged from now. */
static void sd_engine_started(struct app *a)
{
    a->sd_ready = false;
    a->sd_since = uv_now(a->loop);
    a->sd_status[0] = '\0';
}

static void on_engine_stopped(void *arg)
{
    struct app *a = arg;
    uv_stop(a->loop);
}

static void on_stop_signal(uv_signal_t *s, int signum)
{
    struct app *a = s->data;
    if (a->stopping) {
        return;
    }
    LOG_INFO("main", "%s received, stopping", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    a->stopping = true;
    smp_sd_notify("STOPPING=1");
    smp_engine_stop(a->engine, STOP_TIMEOUT_MS, on_engine_stopped, a);
}

/* A reload in preparation: the new config is read and its plugins loaded on libuv's thread
 * pool, so the loop goes on polling and publishing meanwhile. */
struct reload {
    uv_work_t req;
    struct app *a;
    smp_config_t *cfg;
    char *errs; /* the problems, one per line */
    size_t errs_len;
    int n;
};

static void reload_load(uv_work_t *req)
{
    struct reload *r = req->data;
    FILE *errs = open_memstream(&r->errs, &r->errs_len);
    r->n = smp_config_load(r->a->config_path, r->a->plugin_dir, errs ? errs : stderr, &r->cfg);
    if (errs != NULL) {
        fclose(errs);
    }
}

/* The engine no longer refers to `cfg`, a config an earlier reload replaced. */
static void release_config(void *arg, const smp_config_t *cfg)
{
    struct app *a = arg;
    for (size_t k = 0; k < a->nold_cfgs; k++) {
        if (a->old_cfgs[k] == cfg) {
            a->old_cfgs[k] = a->old_cfgs[--a->nold_cfgs];
            smp_config_free((smp_config_t *)cfg);
            return;
        }
    }
}

/* The running engine takes the new config over (smp_engine_reload): the store stays open,
 * unchanged devices go on polling, MQTT reconnects only if its settings changed. */
static void apply_reload(struct app *a, smp_config_t *cfg)
{
    smp_config_t **p = realloc(a->old_cfgs, (a->nold_cfgs + 1) * sizeof *p);
    int rc = p == NULL ? -ENOMEM : 0;
    if (p != NULL) {
        a->old_cfgs = p;
        a->old_cfgs[a->nold_cfgs] = a->cfg;
        rc = smp_engine_reload(a->engine, cfg, release_config, a);
    }
    if (rc < 0) {
        LOG_ERR("main", "reload rejected (%s); the running config stays", strerror(-rc));
        smp_config_free(cfg);
        smp_sd_notify("READY=1\nSTATUS=reload rejected: the running config stays");
        a->sd_status[0] = '\0';
        return;
    }
    a->nold_cfgs++;
    a->cfg = cfg;
    apply_log_level(a, cfg);
    LOG_INFO("main", "config reloaded");
    smp_sd_notify("READY=1");
    a->sd_status[0] = '\0';
}

static void reload_loaded(uv_work_t *req, int status)
{
    struct reload *r = req->data;
    struct app *a = r->a;
    a->reload_pending = false;
    if (status < 0 || a->stopping) {
        smp_config_free(r->cfg); /* a stop came first: the running config ends as it is */
    } else if (r->n != 0 || r->cfg == NULL) {
        LOG_ERR("main", "reload rejected, %d problem(s); the running config stays:", r->n);
        if (r->errs != NULL) {
            char *save = NULL;
            for (char *line = strtok_r(r->errs, "\n", &save); line;
                 line = strtok_r(NULL, "\n", &save)) {
                LOG_ERR("main", "%s", line);
            }
        }
        smp_sd_notifyf("READY=1\nSTATUS=reload rejected (%d problems): the running config stays",
                       r->n);
        a->sd_status[0] = '\0';
    } else {
        apply_reload(a, r->cfg);
    }
    free(r->errs);
    free(r);
}

static void on_hup(uv_signal_t *s, int signum)
{
    (void)signum;
    struct app *a = s->data;
    if (a->stopping || a->reload_pending) {
        return;
    }
    struct reload *r = calloc(1, sizeof *r);
    if (r == NULL) {
        LOG_ERR("main", "SIGHUP: out of memory; the running config stays");
        return;
    }
    r->a = a;
    r->req.data = r;
    LOG_INFO("main", "SIGHUP: reloading %s", a->config_path);
    /* MONOTONIC_USEC lets systemd (Type=notify-reload, 253+) match this to its reload. */
    smp_sd_notifyf("RELOADING=1\nMONOTONIC_USEC=%" PRIu64, smp_sd_monotonic_usec());
    int rc = uv_queue_work(a->loop, &r->req, reload_load, reload_loaded);
    if (rc < 0) {
        LOG_ERR("main", "SIGHUP: cannot prepare the reload (%s); the running config stays",
                uv_strerror(rc));
        smp_sd_notify("READY=1");
        free(r);
        return;
    }
    a->reload_pending = true;
}

/* Frees the stopped engine. When a worker thread is stuck in a driver call past the stop
 * deadline its memory cannot be freed safely: the store is already committed, so the process
 * ends here. */
static void engine_free_or_exit(struct app *a)
{
    if (smp_engine_free(a->engine) == -EBUSY) {
        LOG_ERR("main", "exiting without freeing: a device call did not return in time");
        smp_log_stop(LOG_FLUSH_MS);
        _exit(a->exit_code);
    }
    a->engine = NULL;
}

static int run_check(const char *path, const char *plugin_dir)
{
    smp_config_t *cfg = NULL;
    int n = smp_config_load(path, plugin_dir, stderr, &cfg);
    if (n != 0) {
        fprintf(stderr, "%s: %d problem%s\n", path, n, n == 1 ? "" : "s");
        return 1;
    }
    /* Valid is not enough: the user running the check (the service's, under systemd's
     * ExecStartPre) must be able to keep the store where the config says. */
    n = smp_paths_check(cfg, stderr);
    if (n != 0) {
        fprintf(stderr, "%s: %d problem%s\n", path, n, n == 1 ? "" : "s");
        smp_config_free(cfg);
        return 1;
    }
    size_t ntags = 0;
    for (size_t k = 0; k < cfg->ndevices; k++) {
        ntags += cfg->devices[k].ntags;
    }
    printf("%s: OK (%zu devices, %zu tags)\n", path, cfg->ndevices, ntags);
    smp_config_free(cfg);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check", no_argument, NULL, 'k'},
        {"log-level", required_argument, NULL, 'l'},
        {"plugin-dir", required_argument, NULL, 'p'},
        {"probe", required_argument, NULL, 'B'},
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {"plugins", no_argument, NULL, 'P'},
        {"plugin-help", required_argument, NULL, 'H'},
        {"plugin-schema", required_argument, NULL, 'S'},
        {NULL, 0, NULL, 0},
    };
    struct app a;
    memset(&a, 0, sizeof a);
    a.cli_log_level = -1;
    bool check = false;
    const char *probe = NULL;
    int c, info = 0;
    const char *info_name = NULL;
    while ((c = getopt_long(argc, argv, "c:l:Vh", opts, NULL)) != -1) {
        switch (c) {
        case 'c':
            a.config_path = optarg;
            break;
        case 'k':
            check = true;
            break;
        case 'l':
            a.cli_log_level = smp_log_level_parse(optarg);
            if (a.cli_log_level < 0) {
                fprintf(stderr,
                        "simpul: --log-level: '%s' is not one of error, warn, info, debug\n",
                        optarg);
                return 2;
            }
            smp_log_set_level(a.cli_log_level);
            break;
        case 'p':
            a.plugin_dir = optarg;
            break;
        case 'B':
            probe = optarg;
            break;
        case 'V':
            printf("simpul %s (plugin ABI %u)\n", SMP_VERSION, SMP_PLUGIN_ABI_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        case 'P':
        case 'H':
        case 'S':
            info = c;
            info_name = optarg;
            break;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (info != 0 && optind == argc) {
        /* After the loop, so that --plugin-dir counts wherever it stands. */
        int rc = info == 'P'   ? smp_plugin_list(stdout, a.plugin_dir)
                 : info == 'H' ? smp_plugin_help(stdout, a.plugin_dir, info_name, stderr)
                               : smp_plugin_schema(stdout, a.plugin_dir, info_name, stderr);
        return rc == 0 ? 0 : 1;
    }
    if (optind < argc || a.config_path == NULL) {
        if (optind < argc) {
            fprintf(stderr, "simpul: unexpected argument '%s'\n", argv[optind]);
        } else {
            fprintf(stderr, "simpul: a config file is required (-c FILE)\n");
        }
        usage(stderr);
        return 2;
    }
    if (check) {
        return run_check(a.config_path, a.plugin_dir);
    }
    if (probe != NULL) {
        smp_log_set_level(a.cli_log_level >= 0 ? a.cli_log_level : SMP_LOG_WARN);
        return smp_probe_run(a.config_path, a.plugin_dir, probe, stdout);
    }

    /* glibc returns freed memory of its per-thread arenas with madvise(), and every madvise
     * flushes the TLB of every core: with buffers passed between the loop, the workers and the
     * store's writer, that was 40 % of the CPU time of an outbox replay. Keep a few MiB. */
    mallopt(M_TRIM_THRESHOLD, 8 * 1024 * 1024);
    mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
    /* One arena per worker thread (up to 8 per core) costs RSS at hundreds of connections;
     * the workers allocate rarely, so two arenas see no contention. */
    mallopt(M_ARENA_MAX, 2);
    signal(SIGPIPE, SIG_IGN);
    /* A file-size limit must turn into a write error the store handles, not a dead gateway. */
    signal(SIGXFSZ, SIG_IGN);
    int n = smp_config_load(a.config_path, a.plugin_dir, stderr, &a.cfg);
    if (n != 0) {
        fprintf(stderr, "%s: %d problem%s; not starting\n", a.config_path, n, n == 1 ? "" : "s");
        return 1;
    }
    apply_log_level(&a, a.cfg);
    /* From here on the loop runs: log lines go through the writer thread, never blocking. */
    if (smp_log_start() < 0) {
        LOG_WARN("main", "no log writer thread: a stalled stderr can stall the gateway");
    }
    a.loop = uv_default_loop();
    LOG_INFO("main", "simpul %s starting, gateway %s", SMP_VERSION, a.cfg->gateway.id);

    uv_signal_init(a.loop, &a.sigterm);
    uv_signal_init(a.loop, &a.sigint);
    uv_signal_init(a.loop, &a.sighup);
    a.sigterm.data = a.sigint.data = a.sighup.data = &a;
    uv_signal_start(&a.sigterm, on_stop_signal, SIGTERM);
    uv_signal_start(&a.sigint, on_stop_signal, SIGINT);
    uv_signal_start(&a.sighup, on_hup, SIGHUP);
    sd_start(&a);

    int rc = smp_engine_new(a.loop, a.cfg, &a.engine);
    if (rc == 0) {
        rc = smp_engine_start(a.engine);
        sd_engine_started(&a);
    }
    if (rc < 0) {
        a.exit_code = 1;
        if (a.engine != NULL) {
            a.stopping = true;
            smp_engine_stop(a.engine, STOP_TIMEOUT_MS, on_engine_stopped, &a);
        }
    }
    if (a.engine != NULL) {
        uv_run(a.loop, UV_RUN_DEFAULT);
        engine_free_or_exit(&a);
    }
    uv_close((uv_handle_t *)&a.sd_timer, NULL);
    uv_close((uv_handle_t *)&a.wd_timer, NULL);
    uv_close((uv_handle_t *)&a.sigterm, NULL);
    uv_close((uv_handle_t *)&a.sigint, NULL);
    uv_close((uv_handle_t *)&a.sighup, NULL);
    uv_run(a.loop, UV_RUN_DEFAULT);
    uv_loop_close(a.loop);
    smp_config_free(a.cfg);
    for (size_t k = 0; k < a.nold_cfgs; k++) {
        smp_config_free(a.old_cfgs[k]);
    }
    free(a.old_cfgs);
    LOG_INFO("main", "stopped");
    smp_log_stop(LOG_FLUSH_MS);
    return a.exit_code;
}
