/* simpul: the edge gateway daemon. CLI, signals, and the loop. */
#include <errno.h>
#include <getopt.h>
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

/* SIGTERM/SIGINT must end the process within 5 s (the contract); leave a margin. */
#define STOP_TIMEOUT_MS 4000u

static void usage(FILE *f)
{
    fprintf(
        f,
        "Usage: simpul -c FILE [--check] [--log-level LEVEL] [--plugin-dir DIR]\n"
        "       simpul --version | --help\n"
        "\n"
        "Edge gateway: polls field devices (Modbus TCP/RTU) and bridges them to MQTT.\n"
        "\n"
        "  -c, --config FILE      the JSON config file (see docs/config.md)\n"
        "      --check            validate FILE and every plugin's part of it; print each\n"
        "                         problem as FILE:LINE:COL: path.to.key: message;\n"
        "                         exit 0 when valid, 1 when not\n"
        "  -l, --log-level LEVEL  error | warn | info | debug (overrides gateway.log_level)\n"
        "      --plugin-dir DIR   where protocol plugins (NAME.so) are found\n"
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
    bool reloading;
    smp_config_t *next_cfg; /* validated config waiting for the engine to stop */
    int exit_code;
};

static void apply_log_level(struct app *a, const smp_config_t *cfg)
{
    int level = a->cli_log_level;
    if (level < 0 && cfg != NULL && cfg->gateway.log_level != NULL) {
        level = smp_log_level_parse(cfg->gateway.log_level);
    }
    smp_log_set_level(level >= 0 ? level : SMP_LOG_INFO);
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
    smp_engine_stop(a->engine, STOP_TIMEOUT_MS, on_engine_stopped, a);
}

static void on_hup(uv_signal_t *s, int signum)
{
    (void)signum;
    struct app *a = s->data;
    if (a->stopping || a->reloading) {
        return;
    }
    LOG_INFO("main", "SIGHUP: reloading %s", a->config_path);
    char *buf = NULL;
    size_t len = 0;
    FILE *errs = open_memstream(&buf, &len);
    smp_config_t *cfg = NULL;
    int n = smp_config_load(a->config_path, a->plugin_dir, errs ? errs : stderr, &cfg);
    if (errs != NULL) {
        fclose(errs);
    }
    if (n != 0 || cfg == NULL) {
        LOG_ERR("main", "reload rejected, %d problem(s); the running config stays:", n);
        if (buf != NULL) {
            char *save = NULL;
            for (char *line = strtok_r(buf, "\n", &save); line;
                 line = strtok_r(NULL, "\n", &save)) {
                LOG_ERR("main", "%s", line);
            }
        }
        free(buf);
        return;
    }
    free(buf);
    /* Restart the engine on the new config: polls pause for the stop, nothing queued is lost
     * (the outbox is in the store and is replayed by the new engine). */
    a->reloading = true;
    a->next_cfg = cfg;
    smp_engine_stop(a->engine, STOP_TIMEOUT_MS, on_engine_stopped, a);
}

/* Frees the stopped engine. When a worker thread is stuck in a driver call past the stop
 * deadline its memory cannot be freed safely: the store is already committed, so the process
 * ends here. After a reload request that is exit 1, so that systemd (Restart=always) starts
 * simpul again on the new config. */
static void engine_free_or_exit(struct app *a)
{
    if (smp_engine_free(a->engine) == -EBUSY) {
        LOG_ERR("main", "exiting without freeing: a device call did not return in time");
        _exit(a->reloading && !a->stopping ? 1 : a->exit_code);
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
        {"version", no_argument, NULL, 'V'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct app a;
    memset(&a, 0, sizeof a);
    a.cli_log_level = -1;
    bool check = false;
    int c;
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
        case 'V':
            printf("simpul %s (plugin ABI %u)\n", SMP_VERSION, SMP_PLUGIN_ABI_VERSION);
            return 0;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
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

    /* glibc returns freed memory of its per-thread arenas with madvise(), and every madvise
     * flushes the TLB of every core: with buffers passed between the loop, the workers and the
     * store's writer, that was 40 % of the CPU time of an outbox replay. Keep a few MiB. */
    mallopt(M_TRIM_THRESHOLD, 8 * 1024 * 1024);
    mallopt(M_MMAP_THRESHOLD, 1024 * 1024);
    /* One arena per thread (loop, store writer, checkpointer, a worker per connection) kept
     * ~5 MB of RSS at 200 devices; two arenas are enough for threads that mostly hand buffers
     * to each other. */
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
    a.loop = uv_default_loop();
    LOG_INFO("main", "simpul %s starting, gateway %s", SMP_VERSION, a.cfg->gateway.id);

    uv_signal_init(a.loop, &a.sigterm);
    uv_signal_init(a.loop, &a.sigint);
    uv_signal_init(a.loop, &a.sighup);
    a.sigterm.data = a.sigint.data = a.sighup.data = &a;
    uv_signal_start(&a.sigterm, on_stop_signal, SIGTERM);
    uv_signal_start(&a.sigint, on_stop_signal, SIGINT);
    uv_signal_start(&a.sighup, on_hup, SIGHUP);

    for (;;) {
        int rc = smp_engine_new(a.loop, a.cfg, &a.engine);
        if (rc == 0) {
            rc = smp_engine_start(a.engine);
        }
        if (rc < 0) {
            a.exit_code = 1;
            if (a.engine != NULL) {
                a.stopping = true;
                smp_engine_stop(a.engine, STOP_TIMEOUT_MS, on_engine_stopped, &a);
                uv_run(a.loop, UV_RUN_DEFAULT);
                engine_free_or_exit(&a);
            }
            break;
        }
        uv_run(a.loop, UV_RUN_DEFAULT);
        engine_free_or_exit(&a);
        if (a.reloading && !a.stopping) {
            smp_config_free(a.cfg);
            a.cfg = a.next_cfg;
            a.next_cfg = NULL;
            a.reloading = false;
            apply_log_level(&a, a.cfg);
            LOG_INFO("main", "config reloaded");
            continue;
        }
        break;
    }
    smp_config_free(a.next_cfg);
    uv_close((uv_handle_t *)&a.sigterm, NULL);
    uv_close((uv_handle_t *)&a.sigint, NULL);
    uv_close((uv_handle_t *)&a.sighup, NULL);
    uv_run(a.loop, UV_RUN_DEFAULT);
    uv_loop_close(a.loop);
    smp_config_free(a.cfg);
    LOG_INFO("main", "stopped");
    return a.exit_code;
}
