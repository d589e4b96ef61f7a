/* simpul --probe: commissioning. Reads every tag of one configured device once through its
 * real driver and prints what came back, decoded with the config's types, orders, scale and
 * offset. Blocking, on the main thread, with no loop, store or MQTT; it never writes. */
#include "probe.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "log.h"
#include "value.h"

#define COL_WHERE 28
#define COL_RAW   24

static const char *code_text(int code)
{
    return code == SMP_EDEVICE ? "device exception" : strerror(-code);
}

static const smp_device_cfg_t *find_device(const smp_config_t *cfg, const char *name)
{
    for (size_t k = 0; k < cfg->ndevices; k++) {
        if (strcmp(cfg->devices[k].name, name) == 0) {
            return &cfg->devices[k];
        }
    }
    return NULL;
}

/* One row of the table. r is the tag's reading from the driver. */
static void print_row(FILE *out, const smp_plugin_t *p, void *pdev, const smp_device_cfg_t *dc,
                      uint32_t t, const smp_reading_t *r)
{
    const smp_tag_cfg_t *tc = &dc->tags[t];
    char where[64] = "-", raw[160] = "", value[128] = "", err[160] = "";
    if (p->tag_detail == NULL || p->tag_detail(pdev, t, where, sizeof where, raw, sizeof raw)) {
        snprintf(where, sizeof where, "-");
    }
    if (r->status != 0) {
        snprintf(err, sizeof err, "%s", r->message != NULL ? r->message : code_text(r->status));
    } else {
        smp_eval_t v;
        int rc = smp_eval_from_raw(tc, &r->value, &v);
        if (rc == 0) {
            smp_eval_to_json(&v, value, sizeof value);
            smp_eval_clear(&v);
        } else {
            snprintf(err, sizeof err, "%s",
                     rc == -EDOM ? "value is not a finite number" : strerror(-rc));
        }
    }
    fprintf(out, "%-20s %-*s %-*s %-16s %-8s %s\n", tc->name, COL_WHERE, where, COL_RAW,
            raw[0] ? raw : "-", value[0] ? value : "-", tc->unit ? tc->unit : "-",
            err[0] ? err : "");
}

/* Reads every tag of dc once and prints the table. Returns the exit status. */
static int probe_device(const smp_device_cfg_t *dc, FILE *out)
{
    const smp_plugin_t *p = dc->plugin->desc;
    char scope[300];
    snprintf(scope, sizeof scope, "%s:%s", dc->protocol, dc->name);
    smp_tag_t *ptags = calloc(dc->ntags ? dc->ntags : 1, sizeof *ptags);
    uint32_t *idx = calloc(dc->ntags ? dc->ntags : 1, sizeof *idx);
    smp_reading_t *rd = calloc(dc->ntags ? dc->ntags : 1, sizeof *rd);
    int status = 1;
    void *conn = NULL, *pdev = NULL;
    if (ptags == NULL || idx == NULL || rd == NULL) {
        fprintf(stderr, "simpul: out of memory\n");
        goto out;
    }
    for (size_t t = 0; t < dc->ntags; t++) {
        /* Read-only views: the probe never writes, whatever the config allows. */
        ptags[t] = (smp_tag_t){dc->tags[t].name, dc->tags[t].type, false, dc->tags[t].params};
        idx[t] = (uint32_t)t;
    }
    conn = p->conn_create(dc->conn_params, scope);
    pdev = conn ? p->device_create(conn, dc->conn_params, ptags, dc->ntags, scope) : NULL;
    if (pdev == NULL) {
        fprintf(stderr, "simpul: %s: the driver could not set up the device\n", dc->name);
        goto out;
    }
    int rc = p->conn_open(conn);
    if (rc == 0) {
        rc = p->device_read(pdev, idx, dc->ntags, rd);
    }
    if (rc < 0) {
        fprintf(stderr, "simpul: %s (%s) cannot be reached: %s\n", dc->name, dc->conn_key,
                rd[0].message ? rd[0].message : code_text(rc));
        goto out;
    }
    fprintf(out, "%s (%s): %zu tags, %d requests\n", dc->name, dc->conn_key, dc->ntags, rc);
    fprintf(out, "%-20s %-*s %-*s %-16s %-8s %s\n", "tag", COL_WHERE, "table/address", COL_RAW,
            "raw", "value", "unit", "error");
    status = 0;
    for (uint32_t t = 0; t < dc->ntags; t++) {
        print_row(out, p, pdev, dc, t, &rd[t]);
        if (rd[t].status != 0) {
            status = 3;
        }
    }
out:
    if (pdev != NULL) {
        p->device_destroy(pdev);
    }
    if (conn != NULL) {
        p->conn_close(conn);
        p->conn_destroy(conn);
    }
    free(ptags);
    free(idx);
    free(rd);
    return status;
}

int smp_probe_run(const char *config_path, const char *plugin_dir, const char *device, FILE *out)
{
    smp_config_t *cfg = NULL;
    int n = smp_config_load(config_path, plugin_dir, stderr, &cfg);
    if (n != 0) {
        fprintf(stderr, "%s: %d problem%s\n", config_path, n, n == 1 ? "" : "s");
        return 2;
    }
    const smp_device_cfg_t *dc = find_device(cfg, device);
    int status = 2;
    if (dc == NULL) {
        fprintf(stderr, "simpul: --probe: no device \"%s\" in %s\n", device, config_path);
    } else {
        status = probe_device(dc, out);
    }
    smp_config_free(cfg);
    return status;
}
