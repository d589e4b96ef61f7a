/* Engine internals shared by engine.c and sparkplug.c (which builds its messages from the
 * engine's device and tag state). Not a public surface: the command module reaches the engine
 * only through engine_cmd.h. */
#ifndef SMP_ENGINE_INTERNAL_H
#define SMP_ENGINE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include <simpul/plugin.h>
#include <uv.h>

#include "bridge.h"
#include "command.h"
#include "config.h"
#include "conn_load.h"
#include "devstats.h"
#include "engine.h"
#include "engine_cmd.h"
#include "log.h"
#include "store.h"
#include "value.h"

#define ERRMSG_LEN SMP_ENGINE_ERRMSG_LEN
/* Longest string value kept from a driver (a Modbus string is at most 250 bytes). */
#define SMP_STRING_MAX 1024

/* JOB_ATTACH/JOB_DETACH (a reload): the worker creates/destroys a device's driver object. */
enum job_type { JOB_READ = 1, JOB_WRITE, JOB_EXIT, JOB_ATTACH, JOB_DETACH };

struct conn;
struct device;
struct group;

/* A unit of work for a connection's worker. Owned by whichever side holds it. */
struct job {
    enum job_type type;
    struct job *next;
    struct conn *conn;
    struct device *dev;
    /* read */
    struct group *grp;
    const uint32_t *idx; /* borrowed from the group */
    size_t n;
    smp_reading_t *readings;
    char **strs; /* copies of string values */
    char *errs;  /* n * ERRMSG_LEN: per-tag error texts */
    /* write */
    uint32_t tag;
    smp_value_t write_raw;
    char *write_str; /* owned string behind write_raw.s */
    smp_reading_t rb;
    char *rb_str;
    bool started;
    void *cmd; /* the command this job serves (its cookie, command.h); NULL for polls */
    uint64_t deadline_mono_ms; /* commands with ttl_ms (CLOCK_MONOTONIC ms): no device write
                                * starts after it (expired), 0 for none */
    /* result */
    int status;
    char errmsg[ERRMSG_LEN];
    uint64_t done_wall_ms;
    smp_conn_sample_t sample; /* what the job tells about its connection's load */
    uint64_t read_us;         /* the driver's read call, for the device's health (devstats.h) */
    uint32_t backoff_ms;      /* the device's backoff after this job (worker's view) */
};
#define JOB_ERR(j, k) ((j)->errs + (size_t)(k)*ERRMSG_LEN)

struct group {
    struct device *dev;
    uint32_t interval_ms;
    uint32_t *idx;
    size_t n;
    uv_timer_t timer;
    bool timer_init;
    bool in_flight;
    struct job *spare; /* the last poll's job, reused by the next */
};

/* A tag's state, 56 bytes: a gateway holds one per tag, 100k of them at city scale. */
struct tag_rt {
    smp_eval_t current;  /* last value read (NONE when unknown or in error) */
    smp_eval_t reported; /* last value published: the deadband baseline */
    uint64_t current_ts;
    const char *errmsg; /* while err != 0: the error's text, interned (engine's err_texts) */
    int err;
    bool dirty; /* current differs from reported beyond the deadband */
    bool err_dirty;
};

struct device {
    smp_engine_t *eng;
    const smp_device_cfg_t *cfg;
    const smp_config_t *src; /* the config cfg belongs to (a reload keeps it while in use) */
    struct conn *conn;
    size_t index; /* in e->devs */
    /* A reload removed or changed it: no more polls or messages; freed once its worker has
     * let go of it (detached, or the worker exited) and its commands are answered. */
    bool retiring, detached;
    unsigned open_timers; /* group timers not closed yet, once retiring */
    char scope[160];
    smp_tag_t *ptags;  /* the driver's view of the tags */
    bool ptags_shared; /* ptags belong to an earlier device with the same definitions */
    struct tag_rt *tags;
    struct group *groups;
    size_t ngroups;
    char *topic_data, *topic_status, *topic_result;
    /* loop thread */
    int online; /* -1 not polled yet, 0 offline, 1 online */
    char status_err[ERRMSG_LEN];
    smp_episode_t offline; /* failed polls since the device went offline (log.h) */
    uint64_t status_ts;
    uint64_t seq;
    bool need_full;
    bool status_unsent; /* the last status change could not be published yet */
    uint64_t last_full_ms;
    smp_devstats_t health; /* P/G/metrics "devices" */
    /* worker */
    void *pdev;
    uint32_t w_backoff_ms;
    uint64_t w_next_try_ms;
};

struct conn {
    smp_engine_t *eng;
    const smp_plugin_host_t *plugin;
    const smp_param_t *params;
    char key[256];
    char scope[300];
    struct device **devs;
    size_t ndevs;
    uv_thread_t thread;
    bool started, exited, sync_init;
    uv_mutex_t mu;
    uv_cond_t cv;
    struct job *cmd_head, *cmd_tail, *poll_head, *poll_tail;
    struct job *ctl_head, *ctl_tail; /* JOB_ATTACH/JOB_DETACH, ahead of everything */
    bool stop;
    const smp_config_t *src; /* the config params and plugin belong to */
    bool retiring;           /* a reload closes it: no device of it stayed */
    struct conn *after;      /* a reload: starts once this one (same endpoint) has exited */
    bool cancel_cmds;        /* forced stop: the worker starts no further command */
    /* worker */
    struct device **wdevs; /* the devices with a driver object; set before the thread starts */
    size_t nwdevs, wcap;
    void *pconn;
    bool open;
    uint32_t backoff_ms;
    uint64_t next_open_ms;
    int timeouts;
    int last_open_err;
    char last_open_msg[ERRMSG_LEN];
    bool ever_open;
    uint64_t reconnects;
    /* loop thread */
    smp_conn_load_t load;
};

struct smp_engine_stats {
    uint64_t polls, poll_errors, requests, overruns, values, publishes, acked, replayed;
    uint64_t store_errors, lost;
};

struct smp_engine {
    uv_loop_t *loop;
    const smp_config_t *cfg;
    smp_store_t *store;
    smp_bridge_t *bridge;
    struct device **devs;
    size_t ndevs;
    struct device **draining; /* retiring devices not freed yet (a reload) */
    size_t ndraining;
    struct smp_engine_reload_state *reload; /* engine_reload.c; NULL when none under way */
    struct conn **conns;
    size_t nconns;
    uv_async_t done_async;
    uv_mutex_t done_mu;
    struct job *done_head, *done_tail;
    uv_timer_t metrics_timer, stop_timer;
    bool handles_init;
    char *topic_metrics, *topic_cmd_sub;
    uint64_t started_ms;
    struct smp_engine_stats stats;
    /* outbox pump */
    bool backlog;
    bool fetch_in_flight;
    size_t fetch_max;
    int64_t cursor;
    unsigned conn_epoch, fetch_epoch;
    int64_t *live_ids;
    size_t live_n, live_cap;
    unsigned pending_adds;
    int64_t *acks; /* PUBACKed ids, deleted in one store operation per loop iteration */
    size_t acks_n, acks_cap;
    uv_check_t acks_check;
    uv_timer_t pump_timer;
    /* stop */
    bool stopping, stop_forced, stop_done, bridge_stop_called, bridge_stopped, bridge_abandoned;
    uint64_t stop_deadline_ms; /* loop time by which the stop must be done */
    int workers_alive;
    void (*stop_cb)(void *arg);
    void *stop_arg;
    smp_commands_t *cmds; /* command.c; NULL without memory for it */
    bool store_degraded;  /* store.on_error "degraded" in effect: write commands are refused */
    /* Distinct texts of tag errors, owned: tags in error point into this small set. */
    char **err_texts;
    size_t err_texts_n, err_texts_cap;
    /* smp__engine_emit's buffers, reused from message to message */
    smp_buf_t emit_vals, emit_errs, emit_msg;
    smp_episode_t fetch_errors; /* failed outbox reads (log.h) */
    char **retired;             /* removed devices whose offline status is still to publish */
    size_t nretired;
    struct smp_gone *gone; /* seqs of devices a reload removed, for a later re-add */
    size_t ngone;
    struct smp_sparkplug *spb; /* sparkplug.c; NULL with mqtt.format "json" */
};

/* Frees a job and everything it owns (not the command it serves). NULL is a no-op. */
void smp__job_free(struct job *j);
void smp__engine_enqueue(struct conn *c, struct job *j);
void smp__engine_stop_progress(smp_engine_t *e);
void smp__engine_apply_reading(smp_engine_t *e, struct device *d, uint32_t t,
                               const smp_reading_t *r, const char *errmsg, uint64_t ts);
void smp__engine_emit(smp_engine_t *e, struct device *d, uint64_t ts, bool full);

/* engine.c, for engine_reload.c */
int smp__engine_setup_device(smp_engine_t *e, struct device *d, const smp_device_cfg_t *dc,
                             const smp_config_t *src, struct device *const *peers, size_t npeers);
void smp__engine_free_device(struct device *d);
void smp__engine_start_device(smp_engine_t *e, struct device *d, size_t k);
int smp__engine_start_conn(smp_engine_t *e, struct conn *c);
struct conn *smp__engine_new_conn(smp_engine_t *e, const smp_device_cfg_t *dc,
                                  const smp_config_t *src);
int smp__engine_conn_add_device(struct conn *c, struct device *d);
void smp__engine_free_conn(struct conn *c);
int smp__engine_retire_names(smp_engine_t *e, const char *const *names, size_t n);
void smp__engine_publish_retired(smp_engine_t *e);
/* engine_reload.c: a reload's drain went on (a worker let go of a device, a command ended). */
void smp__engine_reload_progress(smp_engine_t *e);
void smp__engine_reload_free(smp_engine_t *e);
/* engine.c: a command's job that never reached its worker is answered "cancelled" and freed. */
void smp__engine_command_cancel(smp_engine_t *e, struct job *j);
#endif
