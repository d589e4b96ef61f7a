/* Reload: a new config applied to the running engine (smp_engine_reload, engine.h).
 *
 * The store, the MQTT sessions and every device whose definition did not change stay as they
 * are: their timers run on and their worker keeps its connection. Removed and changed devices
 * retire: no more polls or messages, their queued commands are answered, their worker lets go
 * of them (JOB_DETACH, or the worker exits when none of its devices stayed), and they are freed
 * once nothing refers to them. Added and changed devices start at once, on a connection that
 * stayed (JOB_ATTACH) or on a new one; a new connection to an endpoint whose old connection is
 * closing starts when the old worker has exited (a serial line is opened by one at a time).
 * Loop thread throughout. */
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "bridge.h"
#include "command.h"
#include "engine_internal.h"
#include "log.h"
#include "sparkplug.h"

/* How often a reload's drain is checked (it also advances on every finished job). */
#define DRAIN_TICK_MS 20u

struct smp_gone {
    char *name;
    uint64_t seq;
};

struct smp_engine_reload_state {
    uv_timer_t timer;
    bool active;
    uint64_t started_ms;
    unsigned closing; /* retired devices whose timers are closing */
    void (*release)(void *arg, const smp_config_t *cfg);
    void *arg;
    const smp_config_t **held; /* configs before e->cfg, perhaps still referred to */
    size_t nheld;
};

enum { FATE_REMOVED, FATE_KEPT, FATE_REPLACED };

struct plan {
    struct device **devs; /* the new e->devs */
    size_t n;
    struct device **was; /* per new device: the old device of its name, or NULL */
    struct device **old; /* e->devs before, then sorted by name while planning */
    size_t nold;
    unsigned char *fate; /* per old device (by index): FATE_* */
    size_t kept, changed, added, removed, conns_kept, conns_new;
};

/* ---- the old devices ------------------------------------------------------------------------ */

static int cmp_dev_name(const void *a, const void *b)
{
    return strcmp((*(struct device *const *)a)->cfg->name, (*(struct device *const *)b)->cfg->name);
}

static int cmp_name_dev(const void *key, const void *elt)
{
    return strcmp(key, (*(struct device *const *)elt)->cfg->name);
}

/* The old device of that name (pl->old sorted by name): a reload of 10k devices must not
 * compare every name with every other on the loop. */
static struct device *find_old(const struct plan *pl, const char *name)
{
    struct device **d = bsearch(name, pl->old, pl->nold, sizeof *pl->old, cmp_name_dev);
    return d != NULL ? *d : NULL;
}

/* Takes d's queued jobs off its connection: polls are dropped, commands answered. */
static void unqueue_device(smp_engine_t *e, struct device *d)
{
    struct conn *c = d->conn;
    struct job *cancel = NULL, *drop = NULL;
    uv_mutex_lock(&c->mu);
    struct job **heads[] = {&c->cmd_head, &c->poll_head};
    struct job **tails[] = {&c->cmd_tail, &c->poll_tail};
    for (size_t q = 0; q < 2; q++) {
        struct job *keep = NULL, *keep_tail = NULL;
        for (struct job *j = *heads[q], *next; j != NULL; j = next) {
            next = j->next;
            struct job **to = j->dev != d ? &keep : q == 0 ? &cancel : &drop;
            j->next = NULL;
            if (to == &keep) {
                *(keep_tail != NULL ? &keep_tail->next : &keep) = j;
                keep_tail = j;
            } else {
                j->next = *to;
                *to = j;
            }
        }
        *heads[q] = keep;
        *tails[q] = keep_tail;
    }
    uv_mutex_unlock(&c->mu);
    for (struct job *j = drop, *next; j != NULL; j = next) {
        next = j->next;
        j->grp->in_flight = false;
        smp__job_free(j);
    }
    for (struct job *j = cancel, *next; j != NULL; j = next) {
        next = j->next;
        smp__engine_command_cancel(e, j);
    }
}

static void conn_remove_device(struct conn *c, struct device *d)
{
    for (size_t k = 0; k < c->ndevs; k++) {
        if (c->devs[k] == d) {
            memmove(&c->devs[k], &c->devs[k + 1], (c->ndevs - k - 1) * sizeof *c->devs);
            c->ndevs--;
            return;
        }
    }
}

/* e->draining has room for d (plan_devices made it). */
static void retire_device(smp_engine_t *e, struct device *d)
{
    e->draining[e->ndraining++] = d;
    d->retiring = true;
    for (size_t g = 0; g < d->ngroups; g++) {
        uv_timer_stop(&d->groups[g].timer);
    }
    unqueue_device(e, d);
    conn_remove_device(d->conn, d);
}

/* The old connections: one left without devices closes; one that kept devices lets go of
 * those that retired. */
static void retire_conns(smp_engine_t *e, struct plan *pl)
{
    for (size_t m = 0; m < e->nconns; m++) {
        struct conn *c = e->conns[m];
        if (c->ndevs > 0 || c->retiring) {
            pl->conns_kept += c->ndevs > 0;
            continue;
        }
        c->retiring = true;
        uv_mutex_lock(&c->mu);
        c->stop = true;
        uv_cond_signal(&c->cv);
        uv_mutex_unlock(&c->mu);
    }
    for (size_t k = 0; k < e->ndraining; k++) {
        struct device *d = e->draining[k];
        if (d->conn->retiring || d->detached) {
            continue;
        }
        struct job *j = calloc(1, sizeof *j);
        if (j == NULL) {
            LOG_ERR(d->scope, "out of memory: kept until its connection closes");
            continue;
        }
        j->type = JOB_DETACH;
        j->dev = d;
        smp__engine_enqueue(d->conn, j);
    }
}

/* ---- the new devices ------------------------------------------------------------------------ */

static bool same_endpoint(const struct conn *c, const smp_device_cfg_t *dc)
{
    return smp_plugin_host_same(c->plugin, dc->plugin) && strcmp(c->key, dc->conn_key) == 0;
}

/* Puts a new device on a connection that stayed, on one made in this reload, or on a new one
 * (which waits for an old one to the same endpoint to close). */
static int place_device(smp_engine_t *e, struct plan *pl, struct device *d)
{
    struct conn *c = NULL, *closing = NULL;
    for (size_t m = 0; m < e->nconns; m++) {
        if (same_endpoint(e->conns[m], d->cfg)) {
            *(e->conns[m]->retiring ? &closing : &c) = e->conns[m];
        }
    }
    if (c == NULL) {
        c = smp__engine_new_conn(e, d->cfg, e->cfg);
        if (c == NULL) {
            return -ENOMEM;
        }
        c->after = closing;
        pl->conns_new++;
    }
    if (c->started) {
        struct job *j = calloc(1, sizeof *j);
        if (j == NULL) {
            return -ENOMEM;
        }
        j->type = JOB_ATTACH;
        j->dev = d;
        if (smp__engine_conn_add_device(c, d) < 0) {
            free(j);
            return -ENOMEM;
        }
        smp__engine_enqueue(c, j);
        return 0;
    }
    return smp__engine_conn_add_device(c, d);
}

/* A new device's seq: its predecessor's (a changed device), or what a removed one of the name
 * left, or the store's. */
static void new_seq(smp_engine_t *e, struct device *d, const struct device *was)
{
    if (was != NULL) {
        d->seq = was->seq;
        return;
    }
    for (size_t k = 0; k < e->nretired; k++) {
        if (strcmp(e->retired[k], d->cfg->name) == 0) {
            free(e->retired[k]); /* back before its "removed" status went out */
            e->retired[k] = e->retired[--e->nretired];
            break;
        }
    }
    for (size_t k = 0; k < e->ngone; k++) {
        if (strcmp(e->gone[k].name, d->cfg->name) == 0) {
            d->seq = e->gone[k].seq;
            free(e->gone[k].name);
            e->gone[k] = e->gone[--e->ngone];
            return;
        }
    }
    int rc = smp_store_load_seq(e->store, d->cfg->name, &d->seq);
    if (rc < 0) {
        LOG_WARN(d->scope, "seq continues from %" PRIu64 " (%s)", d->seq, strerror(-rc));
    }
}

static void remember_gone(smp_engine_t *e, const struct device *d)
{
    struct smp_gone *p = realloc(e->gone, (e->ngone + 1) * sizeof *p);
    char *name = strdup(d->cfg->name);
    if (p != NULL) {
        e->gone = p;
    }
    if (p == NULL || name == NULL) {
        free(name);
        return; /* a re-add reads the store's seq instead */
    }
    e->gone[e->ngone++] = (struct smp_gone){.name = name, .seq = d->seq};
    const char *names[] = {d->cfg->name};
    (void)smp__engine_retire_names(e, names, 1);
}

/* The new device list: the old device where nothing changed, a new one set up otherwise.
 * Changes nothing of the engine; on failure frees what it made. */
static int plan_devices(smp_engine_t *e, const smp_config_t *ncfg, struct plan *pl)
{
    size_t n = ncfg->ndevices;
    pl->n = n;
    pl->devs = calloc(n ? n : 1, sizeof *pl->devs);
    pl->was = calloc(n ? n : 1, sizeof *pl->was);
    pl->old = malloc((e->ndevs ? e->ndevs : 1) * sizeof *pl->old);
    pl->fate = calloc(e->ndevs ? e->ndevs : 1, 1);
    /* Room for every old device to retire: committing the plan cannot fail. */
    struct device **dr = realloc(e->draining, (e->ndraining + e->ndevs + 1) * sizeof *dr);
    if (dr != NULL) {
        e->draining = dr;
    }
    if (pl->devs == NULL || pl->was == NULL || pl->old == NULL || pl->fate == NULL || dr == NULL) {
        return -ENOMEM;
    }
    memcpy(pl->old, e->devs, e->ndevs * sizeof *pl->old);
    pl->nold = e->ndevs;
    qsort(pl->old, pl->nold, sizeof *pl->old, cmp_dev_name);
    for (size_t k = 0; k < n; k++) {
        const smp_device_cfg_t *dc = &ncfg->devices[k];
        struct device *od = find_old(pl, dc->name);
        pl->was[k] = od;
        if (od != NULL && smp_device_cfg_equal(od->cfg, dc)) {
            pl->devs[k] = od;
            pl->fate[od->index] = FATE_KEPT;
            pl->kept++;
            continue;
        }
        if (od != NULL) {
            pl->fate[od->index] = FATE_REPLACED;
        }
        struct device *d = calloc(1, sizeof *d);
        pl->devs[k] = d;
        if (d == NULL) {
            return -ENOMEM;
        }
        d->index = SIZE_MAX; /* marks it new until committed */
        if (smp__engine_setup_device(e, d, dc, ncfg, pl->devs, k) < 0) {
            return -ENOMEM;
        }
        *(od != NULL ? &pl->changed : &pl->added) += 1;
    }
    return 0;
}

/* ---- freeing ---------------------------------------------------------------------------- */

static void on_timer_closed(uv_handle_t *h)
{
    struct group *g = h->data;
    struct device *d = g->dev;
    if (--d->open_timers > 0) {
        return;
    }
    smp_engine_t *e = d->eng;
    smp__engine_free_device(d);
    free(d);
    if (e->reload != NULL && e->reload->closing-- == 1) {
        smp__engine_reload_progress(e);
    }
}

/* Gives the driver's tag view d owns to another device that shares it, if any. */
static void hand_over_ptags(smp_engine_t *e, struct device *d)
{
    struct device **lists[] = {e->devs, e->draining};
    size_t ns[] = {e->ndevs, e->ndraining};
    for (size_t l = 0; !d->ptags_shared && l < 2; l++) {
        for (size_t k = 0; k < ns[l]; k++) {
            struct device *o = lists[l][k];
            if (o != d && o->ptags == d->ptags && o->ptags_shared) {
                o->ptags_shared = false;
                d->ptags_shared = true;
                break;
            }
        }
    }
}

/* Closes d's timers; d is freed in the last close callback. */
static void close_and_free(smp_engine_t *e, struct device *d)
{
    hand_over_ptags(e, d);
    for (size_t g = 0; g < d->ngroups; g++) {
        if (d->groups[g].timer_init) {
            d->groups[g].timer_init = false;
            d->open_timers++;
            uv_close((uv_handle_t *)&d->groups[g].timer, on_timer_closed);
        }
    }
    if (d->open_timers == 0) {
        smp__engine_free_device(d);
        free(d);
        return;
    }
    e->reload->closing++;
}

static void plan_free(smp_engine_t *e, struct plan *pl, bool failed)
{
    for (size_t k = 0; failed && pl->devs != NULL && k < pl->n; k++) {
        if (pl->devs[k] != NULL && pl->devs[k]->index == SIZE_MAX) {
            close_and_free(e, pl->devs[k]);
        }
    }
    free(pl->was);
    free(pl->old);
    free(pl->fate);
    if (failed) {
        free(pl->devs);
    }
}

/* ---- applying ------------------------------------------------------------------------------ */

/* The old devices that are not in the new list retire; the new ones get their place. */
static void commit_devices(smp_engine_t *e, struct plan *pl)
{
    memcpy(pl->old, e->devs, e->ndevs * sizeof *pl->old); /* in index order again */
    for (size_t k = 0; k < e->ndevs; k++) {
        struct device *d = e->devs[k];
        if (pl->fate[k] != FATE_KEPT) {
            retire_device(e, d);
        }
        if (pl->fate[k] == FATE_REMOVED) {
            pl->removed++;
            remember_gone(e, d);
        }
    }
}

/* Numbers the devices in their new order (map[old index] = new index for the kept ones) and
 * starts the new ones. */
static void start_new(smp_engine_t *e, struct plan *pl, int *map)
{
    for (size_t k = 0; k < pl->n; k++) {
        struct device *d = pl->devs[k];
        bool fresh = d->index == SIZE_MAX;
        if (!fresh && map != NULL && d->index < pl->nold) {
            map[d->index] = (int)k;
        }
        d->index = k;
        if (!fresh) {
            continue;
        }
        new_seq(e, d, pl->was[k]);
        if (place_device(e, pl, d) < 0) {
            LOG_ERR(d->scope, "out of memory: the device is not polled");
            continue;
        }
        smp__engine_start_device(e, d, k);
    }
    for (size_t m = 0; m < e->nconns; m++) {
        struct conn *c = e->conns[m];
        if (!c->started && !c->retiring && c->after == NULL && smp__engine_start_conn(e, c) < 0) {
            LOG_ERR(c->scope, "cannot start the connection's worker");
        }
    }
}

/* MQTT: one reconnect when its settings changed; otherwise the sessions only take the new
 * config's strings (the old config may be freed). */
static void apply_mqtt(smp_engine_t *e, const smp_config_t *old)
{
    bool same = smp_config_mqtt_equal(old, e->cfg);
    if (same) {
        smp_bridge_rebind(e->bridge, e->cfg);
    } else {
        smp_bridge_reconfigure(e->bridge, e->cfg);
    }
    smp__sparkplug_reconfigure(e->spb, e->cfg, !same);
    if (old->gateway.metrics_interval_s != e->cfg->gateway.metrics_interval_s) {
        uint64_t mi =
            (uint64_t)(e->cfg->gateway.metrics_interval_s ? e->cfg->gateway.metrics_interval_s
                                                          : 60) *
            1000u;
        uv_timer_set_repeat(&e->metrics_timer, mi);
        uv_timer_again(&e->metrics_timer);
    }
}

/* ---- the drain ------------------------------------------------------------------------------ */

static bool config_used(const smp_engine_t *e, const smp_config_t *cfg)
{
    for (size_t k = 0; k < e->ndevs; k++) {
        if (e->devs[k]->src == cfg) {
            return true;
        }
    }
    for (size_t k = 0; k < e->ndraining; k++) {
        if (e->draining[k]->src == cfg) {
            return true;
        }
    }
    for (size_t m = 0; m < e->nconns; m++) {
        if (e->conns[m]->src == cfg) {
            return true;
        }
    }
    return false;
}

/* Frees the retired devices nothing refers to any more. */
static void free_drained(smp_engine_t *e)
{
    for (size_t k = 0; k < e->ndraining;) {
        struct device *d = e->draining[k];
        if (d->detached || d->conn->exited) { /* commands hold no device, only its index */
            e->draining[k] = e->draining[--e->ndraining];
            close_and_free(e, d);
        } else {
            k++;
        }
    }
}

/* Joins the workers of closed connections and starts those that waited for them. */
static void free_closed_conns(smp_engine_t *e)
{
    for (size_t m = 0; m < e->nconns;) {
        struct conn *c = e->conns[m];
        bool busy = !c->retiring || !c->exited;
        for (size_t k = 0; !busy && k < e->ndraining; k++) {
            busy = e->draining[k]->conn == c;
        }
        if (busy) {
            m++;
            continue;
        }
        uv_thread_join(&c->thread);
        memmove(&e->conns[m], &e->conns[m + 1], (e->nconns - m - 1) * sizeof *e->conns);
        e->nconns--;
        for (size_t n = 0; n < e->nconns; n++) {
            if (e->conns[n]->after == c) {
                e->conns[n]->after = NULL;
                if (smp__engine_start_conn(e, e->conns[n]) < 0) {
                    LOG_ERR(e->conns[n]->scope, "cannot start the connection's worker");
                }
            }
        }
        smp__engine_free_conn(c);
    }
}

static void release_configs(smp_engine_t *e)
{
    struct smp_engine_reload_state *r = e->reload;
    for (size_t k = 0; k < r->nheld;) {
        /* A command being handled reads its device's tags in the config it came with. */
        if (r->held[k] == e->cfg || config_used(e, r->held[k]) || smp_commands_busy(e->cmds)) {
            k++;
            continue;
        }
        const smp_config_t *cfg = r->held[k];
        r->held[k] = r->held[--r->nheld];
        r->release(r->arg, cfg);
    }
}

void smp__engine_reload_progress(smp_engine_t *e)
{
    struct smp_engine_reload_state *r = e->reload;
    if (r == NULL || e->stopping) {
        return;
    }
    if (!r->active) {
        release_configs(e); /* a command that held an old config may have ended */
        return;
    }
    free_drained(e);
    free_closed_conns(e);
    bool waiting = e->ndraining > 0 || r->closing > 0;
    for (size_t m = 0; !waiting && m < e->nconns; m++) {
        waiting = e->conns[m]->retiring || e->conns[m]->after != NULL;
    }
    if (waiting) {
        return;
    }
    r->active = false;
    uv_timer_stop(&r->timer);
    release_configs(e);
    LOG_INFO("engine", "reload complete: the last replaced device let go after %" PRIu64 " ms",
             uv_now(e->loop) - r->started_ms);
}

static void on_drain_timer(uv_timer_t *t)
{
    smp__engine_reload_progress(t->data);
}

static void on_state_closed(uv_handle_t *h)
{
    struct smp_engine_reload_state *r = h->data;
    free(r->held);
    free(r);
}

void smp__engine_reload_free(smp_engine_t *e)
{
    for (size_t k = 0; k < e->ngone; k++) {
        free(e->gone[k].name);
    }
    free(e->gone);
    e->gone = NULL;
    e->ngone = 0;
    if (e->reload != NULL) {
        e->reload->timer.data = e->reload;
        uv_close((uv_handle_t *)&e->reload->timer, on_state_closed);
        e->reload = NULL;
    }
}

/* ---- the entry point ------------------------------------------------------------------------ */

static int reload_state(smp_engine_t *e, void (*release)(void *, const smp_config_t *), void *arg)
{
    if (e->reload == NULL) {
        e->reload = calloc(1, sizeof *e->reload);
        if (e->reload == NULL) {
            return -ENOMEM;
        }
        uv_timer_init(e->loop, &e->reload->timer);
        e->reload->timer.data = e;
    }
    struct smp_engine_reload_state *r = e->reload;
    const smp_config_t **p = realloc(r->held, (r->nheld + 1) * sizeof *p);
    if (p == NULL) {
        return -ENOMEM;
    }
    r->held = p;
    r->release = release;
    r->arg = arg;
    return 0;
}

int smp_engine_reload(smp_engine_t *e, const smp_config_t *cfg,
                      void (*release)(void *arg, const smp_config_t *cfg), void *arg)
{
    if (e->stopping) {
        return -ESHUTDOWN;
    }
    if (e->reload != NULL && e->reload->active) {
        LOG_ERR("engine", "reload refused: the previous one is still letting devices go");
        return -EBUSY;
    }
    const char *key = smp_config_fixed_change(e->cfg, cfg);
    if (key != NULL) {
        LOG_ERR("engine",
                "reload rejected: %s cannot change while simpul runs (restart simpul to apply "
                "it); the running config stays",
                key);
        return -EPERM;
    }
    uint64_t t0 = uv_hrtime();
    struct plan pl = {0};
    int rc = reload_state(e, release, arg);
    if (rc == 0) {
        rc = plan_devices(e, cfg, &pl);
    }
    if (rc < 0) {
        plan_free(e, &pl, true);
        LOG_ERR("engine", "reload failed: out of memory; the running config stays");
        return rc;
    }
    const smp_config_t *old = e->cfg;
    e->reload->held[e->reload->nheld++] = old;
    e->cfg = cfg;
    commit_devices(e, &pl);
    retire_conns(e, &pl);
    free(e->devs);
    e->devs = pl.devs;
    e->ndevs = pl.n;
    int *map = malloc((pl.nold ? pl.nold : 1) * sizeof *map);
    for (size_t k = 0; map != NULL && k < pl.nold; k++) {
        map[k] = -1;
    }
    start_new(e, &pl, map);
    smp_commands_devices_changed(e->cmds, e->cfg, e->ndevs, map, pl.nold);
    free(map);
    bool same_list = pl.nold == pl.n;
    for (size_t k = 0; same_list && k < pl.n; k++) {
        same_list = pl.old[k] == pl.devs[k];
    }
    if (!same_list) {
        smp__sparkplug_devices_changed(e->spb, pl.old, pl.nold);
    }
    apply_mqtt(e, old);
    LOG_INFO("engine",
             "reload: %zu device(s) kept, %zu changed, %zu added, %zu removed; %zu connection(s) "
             "kept, %zu new; MQTT %s; applied on the loop in %.1f ms",
             pl.kept, pl.changed, pl.added, pl.removed, pl.conns_kept, pl.conns_new,
             smp_config_mqtt_equal(old, cfg) ? "unchanged" : "settings changed: reconnecting",
             (double)(uv_hrtime() - t0) / 1e6);
    plan_free(e, &pl, false);
    smp__engine_publish_retired(e);
    e->reload->active = true;
    e->reload->started_ms = uv_now(e->loop);
    uv_timer_start(&e->reload->timer, on_drain_timer, DRAIN_TICK_MS, DRAIN_TICK_MS);
    smp__engine_reload_progress(e);
    return 0;
}
