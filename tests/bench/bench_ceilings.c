/* The dependencies' ceilings on this machine, for the city bench (tests/bench/city.py):
 * how fast each library goes when nothing else is in the way, so the bench can say what share
 * of the ceiling simpul reaches. Each mode runs for SECONDS and prints one JSON line.
 *
 *   bench_ceilings modbus PORT NREGS SECONDS   libmodbus TCP: read NREGS holding registers of
 *                                              unit 1 in a loop, one connection
 *   bench_ceilings mqtt PORT BYTES SECONDS     libmosquitto: QoS 1 publishes of BYTES bytes,
 *                                              500 in flight, counted when PUBACKed
 *   bench_ceilings sqlite DIR SECONDS          SQLite WAL, synchronous=NORMAL: history-like
 *                                              rows (device, tag, ts, value), 1000 per commit
 */
#include <errno.h>
#include <inttypes.h>
#include <modbus.h>
#include <mosquitto.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MQTT_WINDOW  500
#define SQLITE_BATCH 1000

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int ceil_modbus(int port, int nregs, double secs)
{
    modbus_t *ctx = modbus_new_tcp("127.0.0.1", port);
    if (ctx == NULL || modbus_connect(ctx) != 0) {
        fprintf(stderr, "modbus: connect: %s\n", modbus_strerror(errno));
        return 1;
    }
    modbus_set_slave(ctx, 1);
    uint16_t regs[125];
    uint64_t n = 0, errs = 0;
    double t0 = now_s(), t = t0;
    while (t - t0 < secs) {
        for (int k = 0; k < 100; k++) {
            if (modbus_read_registers(ctx, /* addr = */ 0, nregs, regs) == nregs) {
                n++;
            } else {
                errs++;
            }
        }
        t = now_s();
    }
    printf("{\"ceiling\":\"modbus\",\"requests_per_s\":%.0f,\"values_per_s\":%.0f,"
           "\"errors\":%" PRIu64 "}\n",
           (double)n / (t - t0), (double)n * nregs / (t - t0), errs);
    modbus_close(ctx);
    modbus_free(ctx);
    return 0;
}

static int g_inflight;
static uint64_t g_acked;

static void on_publish(struct mosquitto *m, void *arg, int mid)
{
    (void)m;
    (void)arg;
    (void)mid;
    g_inflight--;
    g_acked++;
}

static int ceil_mqtt(int port, int bytes, double secs)
{
    mosquitto_lib_init();
    struct mosquitto *m = mosquitto_new("bench-ceiling", true, NULL);
    char *payload = malloc((size_t)bytes);
    if (m == NULL || payload == NULL) {
        return 1;
    }
    memset(payload, 'x', (size_t)bytes);
    mosquitto_max_inflight_messages_set(m, MQTT_WINDOW);
    mosquitto_publish_callback_set(m, on_publish);
    if (mosquitto_connect(m, "127.0.0.1", port, 30) != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "mqtt: connect failed\n");
        return 1;
    }
    double t0 = now_s(), t = t0;
    while (t - t0 < secs) {
        while (g_inflight < MQTT_WINDOW) {
            if (mosquitto_publish(m, NULL, "bench/ceiling", bytes, payload, /* qos = */ 1, false) !=
                MOSQ_ERR_SUCCESS) {
                break;
            }
            g_inflight++;
        }
        if (mosquitto_loop(m, /* timeout_ms = */ 10, /* max_packets = */ MQTT_WINDOW) !=
            MOSQ_ERR_SUCCESS) {
            fprintf(stderr, "mqtt: connection lost\n");
            return 1;
        }
        t = now_s();
    }
    printf("{\"ceiling\":\"mqtt\",\"msgs_per_s\":%.0f,\"bytes\":%d}\n", (double)g_acked / (t - t0),
           bytes);
    mosquitto_disconnect(m);
    mosquitto_destroy(m);
    mosquitto_lib_cleanup();
    free(payload);
    return 0;
}

static int ceil_sqlite(const char *dir, double secs)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/ceiling.db", dir);
    sqlite3 *db;
    sqlite3_stmt *ins;
    if (sqlite3_open(path, &db) != SQLITE_OK ||
        sqlite3_exec(db,
                     "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;"
                     "CREATE TABLE IF NOT EXISTS h (device TEXT NOT NULL, tag TEXT NOT NULL,"
                     " ts_ms INTEGER NOT NULL, value_json TEXT NOT NULL);",
                     NULL, NULL, NULL) != SQLITE_OK ||
        sqlite3_prepare_v2(db, "INSERT INTO h VALUES (?1, ?2, ?3, ?4)", -1, &ins, NULL) !=
            SQLITE_OK) {
        fprintf(stderr, "sqlite: %s\n", sqlite3_errmsg(db));
        return 1;
    }
    uint64_t n = 0;
    double t0 = now_s(), t = t0;
    char dev[32], tag[16], val[16];
    while (t - t0 < secs) {
        sqlite3_exec(db, "BEGIN", NULL, NULL, NULL);
        for (int k = 0; k < SQLITE_BATCH; k++, n++) {
            snprintf(dev, sizeof dev, "dev-%04" PRIu64, (n / 50) % 2000);
            snprintf(tag, sizeof tag, "r%02" PRIu64, n % 50);
            snprintf(val, sizeof val, "%" PRIu64, n % 65536);
            sqlite3_bind_text(ins, 1, dev, -1, SQLITE_STATIC);
            sqlite3_bind_text(ins, 2, tag, -1, SQLITE_STATIC);
            sqlite3_bind_int64(ins, 3, (sqlite3_int64)n);
            sqlite3_bind_text(ins, 4, val, -1, SQLITE_STATIC);
            if (sqlite3_step(ins) != SQLITE_DONE) {
                fprintf(stderr, "sqlite: %s\n", sqlite3_errmsg(db));
                return 1;
            }
            sqlite3_reset(ins);
        }
        sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
        t = now_s();
    }
    printf("{\"ceiling\":\"sqlite\",\"rows_per_s\":%.0f,\"rows_per_commit\":%d}\n",
           (double)n / (t - t0), SQLITE_BATCH);
    sqlite3_finalize(ins);
    sqlite3_close(db);
    remove(path);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "modbus") == 0) {
        return ceil_modbus(atoi(argv[2]), atoi(argv[3]), atof(argv[4]));
    }
    if (argc == 5 && strcmp(argv[1], "mqtt") == 0) {
        return ceil_mqtt(atoi(argv[2]), atoi(argv[3]), atof(argv[4]));
    }
    if (argc == 4 && strcmp(argv[1], "sqlite") == 0) {
        return ceil_sqlite(argv[2], atof(argv[3]));
    }
    fprintf(stderr, "usage: see the comment at the top of tests/bench/bench_ceilings.c\n");
    return 2;
}
