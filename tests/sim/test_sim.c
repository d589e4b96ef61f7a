/* Tests of simpul-sim, driven from outside as the gateway drives it: the real simulator
 * process on a free 127.0.0.1 port, read and written with libmodbus' client side.
 *
 * Usage: test_sim PATH-TO-simpul-sim (meson passes it). Each test starts its own simulator
 * with the options it needs and stops it with SIGTERM, expecting exit status 0. Nothing here
 * sleeps to synchronise: waits poll a condition until a deadline.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <modbus/modbus.h>

static const char *g_sim_path;

typedef struct sim {
    pid_t pid;
    int port;
    char dir[64];
    char out_path[96];  /* the simulator's stdout and stderr */
    char wlog_path[96]; /* --write-log */
} sim_t;

/* One simulator at a time, in static storage: a failed assertion longjmps out of the test,
 * and the teardown must still find the process to stop (and the test's stack is gone). */
static sim_t g_sim;
static bool g_running;

/* socat, for the RTU test; 0 when not running. */
static pid_t g_socat;
static char g_pty_dir[64];

/* Clients still open when an assertion fails, for the teardown. */
#define MAX_CLIENTS 8
static modbus_t *g_clients[MAX_CLIENTS];

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Lets the other process run between two checks of a condition (not a synchronisation). */
static void pause_briefly(void)
{
    struct timespec ts = {0, 5 * 1000000};
    nanosleep(&ts, NULL);
}

static int free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static int connect_raw(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET,
                            .sin_port = htons((uint16_t)port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Starts simpul-sim with the given extra arguments (NULL-terminated) and waits until it
 * accepts connections. */
static sim_t *sim_start(const char *first, ...)
{
    sim_t *s = &g_sim;
    const char *argv[32];
    int n = 0;
    char port[16];

    memset(s, 0, sizeof *s);
    strcpy(s->dir, "/tmp/simpul-sim-test-XXXXXX");
    assert_non_null(mkdtemp(s->dir));
    snprintf(s->out_path, sizeof s->out_path, "%s/sim.out", s->dir);
    snprintf(s->wlog_path, sizeof s->wlog_path, "%s/writes.log", s->dir);
    s->port = free_port();
    snprintf(port, sizeof port, "%d", s->port);

    argv[n++] = g_sim_path;
    argv[n++] = "--port";
    argv[n++] = port;
    argv[n++] = "--write-log";
    argv[n++] = s->wlog_path;
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a != NULL && n < 30; a = va_arg(ap, const char *)) {
        argv[n++] = a;
    }
    va_end(ap);
    argv[n] = NULL;

    s->pid = fork();
    assert_true(s->pid >= 0);
    if (s->pid == 0) {
        int fd = open(s->out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fd, 1);
        dup2(fd, 2);
        execv(g_sim_path, (char *const *)argv);
        _exit(127);
    }
    g_running = true;
    int64_t deadline = now_ms() + 10000;
    for (;;) {
        int fd = connect_raw(s->port);
        if (fd >= 0) {
            close(fd);
            return s;
        }
        int status;
        assert_int_equal(waitpid(s->pid, &status, WNOHANG), 0); /* still running */
        assert_true(now_ms() < deadline);
        pause_briefly();
    }
}

static void remove_dir(sim_t *s)
{
    unlink(s->out_path);
    unlink(s->wlog_path);
    rmdir(s->dir);
}

static char *read_file(const char *path)
{
    static char buf[65536];
    FILE *f = fopen(path, "r");
    size_t n = 0;
    if (f) {
        n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
    }
    buf[n] = '\0';
    return buf;
}

/* SIGTERM, and the simulator must exit 0 within 5 s. */
static void sim_stop(sim_t *s)
{
    int status = -1;
    assert_int_equal(kill(s->pid, SIGTERM), 0);
    int64_t deadline = now_ms() + 5000;
    while (waitpid(s->pid, &status, WNOHANG) == 0) {
        if (now_ms() > deadline) {
            fail_msg("simpul-sim did not stop within 5 s of SIGTERM"); /* teardown kills it */
        }
        pause_briefly();
    }
    g_running = false;
    /* UBSan only prints by default: its reports must fail the test too. */
    bool clean = strstr(read_file(s->out_path), "runtime error") == NULL;
    if (!clean) {
        fprintf(stderr, "%s", read_file(s->out_path));
    }
    remove_dir(s);
    assert_true(clean);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

/* After a failed assertion: kill the simulator and show what it said. */
static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (g_clients[i]) {
            modbus_close(g_clients[i]);
            modbus_free(g_clients[i]);
            g_clients[i] = NULL;
        }
    }
    if (g_socat > 0) {
        kill(g_socat, SIGTERM);
        waitpid(g_socat, NULL, 0);
        g_socat = 0;
        rmdir(g_pty_dir);
    }
    if (g_running) {
        sim_t *s = &g_sim;
        g_running = false;
        kill(s->pid, SIGKILL);
        waitpid(s->pid, NULL, 0);
        /* read_file() returns one static buffer: one call per statement. */
        fprintf(stderr, "---- simpul-sim output ----\n%s\n", read_file(s->out_path));
        fprintf(stderr, "---- write log ----\n%s\n", read_file(s->wlog_path));
        remove_dir(s);
    }
    return 0;
}

static modbus_t *client(const sim_t *s, int unit)
{
    modbus_t *mb = modbus_new_tcp("127.0.0.1", s->port);
    assert_non_null(mb);
    assert_int_equal(modbus_set_slave(mb, unit), 0);
    modbus_set_response_timeout(mb, 1, 0);
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (!g_clients[i]) {
            g_clients[i] = mb;
            break;
        }
    }
    assert_int_equal(modbus_connect(mb), 0);
    return mb;
}

static void client_free(modbus_t *mb)
{
    for (int i = 0; i < MAX_CLIENTS; i++) {
        if (g_clients[i] == mb) {
            g_clients[i] = NULL;
        }
    }
    modbus_close(mb);
    modbus_free(mb);
}

static uint16_t read_ir(modbus_t *mb, int addr)
{
    uint16_t v = 0;
    assert_int_equal(modbus_read_input_registers(mb, addr, /* nb = */ 1, &v), 1);
    return v;
}

static uint16_t read_hr(modbus_t *mb, int addr)
{
    uint16_t v = 0;
    assert_int_equal(modbus_read_registers(mb, addr, /* nb = */ 1, &v), 1);
    return v;
}

static uint8_t read_bit(modbus_t *mb, bool coil, int addr)
{
    uint8_t v = 0xAA;
    int rc = coil ? modbus_read_bits(mb, addr, 1, &v) : modbus_read_input_bits(mb, addr, 1, &v);
    assert_int_equal(rc, 1);
    return v;
}

/* float32 from two registers in the named order (A = most significant byte, wire order). */
static float f32(const uint16_t *r, const char *order)
{
    uint8_t b[4] = {r[0] >> 8, r[0] & 0xFF, r[1] >> 8, r[1] & 0xFF}; /* wire bytes */
    uint8_t abcd[4];
    for (int i = 0; i < 4; i++) {
        abcd[order[i] - 'A'] = b[i];
    }
    uint32_t u =
        ((uint32_t)abcd[0] << 24) | ((uint32_t)abcd[1] << 16) | ((uint32_t)abcd[2] << 8) | abcd[3];
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- --static: the documented initial values, exactly ---- */

static void test_static_pump_register_map(void **state)
{
    (void)state;
    sim_t *s = sim_start("--static", NULL);
    modbus_t *mb = client(s, 1);

    uint16_t ir[32];
    assert_int_equal(modbus_read_input_registers(mb, 0, 32, ir), 32);
    static const uint16_t expect[14] = {0x0000, 0x4148, 0x4010, 0x0000, 0xF040, 0x0000, 0x05AA,
                                        0x019F, 0x0000, 0x0003, 0x0001, 0xE240, 0xDDD5, 0x0000};
    assert_memory_equal(ir, expect, sizeof expect);
    assert_true(f32(&ir[0], "CDAB") == 12.5f);
    assert_true(f32(&ir[2], "ABCD") == 2.25f);
    assert_true(f32(&ir[4], "BADC") == 7.5f);
    for (int i = 14; i < 20; i++) {
        assert_int_equal(ir[i], 0); /* reserved, readable */
    }
    char name[17] = {0};
    for (int i = 0; i < 8; i++) {
        name[2 * i] = (char)(ir[20 + i] >> 8);
        name[2 * i + 1] = (char)(ir[20 + i] & 0xFF);
    }
    assert_string_equal(name, "Dumai PS-01");
    assert_int_equal(ir[30], 0);
    assert_int_equal(ir[31], 0);

    uint8_t bits[3];
    assert_int_equal(modbus_read_bits(mb, 0, 2, bits), 2);
    assert_int_equal(bits[0], 1);
    assert_int_equal(bits[1], 0);
    assert_int_equal(modbus_read_input_bits(mb, 0, 3, bits), 3);
    assert_int_equal(bits[0], 0);
    assert_int_equal(bits[1], 1);
    assert_int_equal(bits[2], 0);
    uint16_t hr[4];
    assert_int_equal(modbus_read_registers(mb, 10, 4, hr), 4);
    assert_int_equal(hr[0], 1450);
    assert_int_equal(hr[1], 5);
    assert_true(f32(&hr[2], "CDAB") == 5.0f);

    /* Pump 2 runs at 1.5x the reference speed; pump 3 stands by. */
    modbus_set_slave(mb, 2);
    assert_int_equal(modbus_read_input_registers(mb, 0, 14, ir), 14);
    assert_true(f32(&ir[0], "CDAB") == 18.75f);
    assert_true(f32(&ir[2], "ABCD") == 4.4375f);
    assert_true(f32(&ir[4], "BADC") == 20.5625f);
    assert_int_equal(ir[6], 2175);
    assert_int_equal(ir[7], 688);
    assert_int_equal(((uint32_t)ir[10] << 16) | ir[11], 234567);
    assert_int_equal(((uint32_t)ir[13] << 16) | ir[12], 67900);
    modbus_set_slave(mb, 3);
    assert_int_equal(read_bit(mb, true, 0), 0);
    assert_int_equal(read_ir(mb, 6), 0);
    assert_int_equal(read_ir(mb, 9), 2);
    assert_int_equal(read_ir(mb, 7), 300);

    client_free(mb);
    sim_stop(s);
}

static void test_static_light_register_map(void **state)
{
    (void)state;
    sim_t *s = sim_start("--static", "--lights", "8", NULL);
    modbus_t *mb = client(s, 17);
    uint16_t ir[8];
    assert_int_equal(modbus_read_input_registers(mb, 0, 8, ir), 8);
    assert_true(f32(&ir[0], "DCBA") == 96.5f);
    assert_int_equal(ir[2], 2300);
    assert_int_equal((int16_t)ir[3], 348);
    assert_int_equal(((uint32_t)ir[4] << 16) | ir[5], 438100); /* light 7 */
    assert_int_equal(ir[6], 0);
    assert_int_equal(ir[7], 1);
    assert_int_equal(read_bit(mb, true, 0), 1);
    assert_int_equal(read_bit(mb, false, 0), 0);
    assert_int_equal(read_hr(mb, 10), 80);
    /* Units beyond --lights do not exist: a TCP gateway's answer. */
    modbus_set_slave(mb, 19);
    uint16_t v;
    assert_int_equal(modbus_read_registers(mb, 10, 1, &v), -1);
    assert_int_equal(errno, EMBXGTAR);
    client_free(mb);
    sim_stop(s);
}

/* ---- Writes, device-side validation, the write log ---- */

static void test_writes_and_write_log(void **state)
{
    (void)state;
    sim_t *s = sim_start("--static", NULL);
    modbus_t *mb = client(s, 1);

    assert_int_equal(modbus_write_register(mb, 10, 1200), 1);
    assert_int_equal(read_hr(mb, 10), 1200);
    assert_int_equal(modbus_write_register(mb, 10, 4000), -1);
    assert_int_equal(errno, EMBXILVAL);
    assert_int_equal(read_hr(mb, 10), 1200);                /* refused: nothing stored */
    assert_int_equal(modbus_write_register(mb, 11, 0), -1); /* ramp_s 1..60 */
    assert_int_equal(errno, EMBXILVAL);
    uint16_t lf[2] = {0x0000, 0x40E8}; /* 7.25, CDAB */
    assert_int_equal(modbus_write_registers(mb, 12, 2, lf), 2);
    uint16_t nan[2] = {0x0000, 0x7FC0};
    assert_int_equal(modbus_write_registers(mb, 12, 2, nan), -1);
    assert_int_equal(errno, EMBXILVAL);
    assert_int_equal(modbus_write_bit(mb, 0, 0), 1);
    assert_int_equal(read_bit(mb, true, 0), 0);
    /* Holding registers 0..9 do not exist. */
    assert_int_equal(modbus_write_register(mb, 0, 1), -1);
    assert_int_equal(errno, EMBXILADD);

    modbus_set_slave(mb, 17);
    assert_int_equal(modbus_write_register(mb, 10, 101), -1);
    assert_int_equal(errno, EMBXILVAL);
    assert_int_equal(modbus_write_register(mb, 10, 40), 1);
    /* --static: the write changes only what was written. */
    uint16_t p[2];
    assert_int_equal(modbus_read_input_registers(mb, 0, 2, p), 2);
    assert_true(f32(p, "DCBA") == 96.5f);

    /* The log line is flushed before the confirmation is sent: no waiting needed. */
    assert_string_equal(read_file(s->wlog_path), "1 6 10 1 1200 ok\n"
                                                 "1 6 10 1 4000 exception:3\n"
                                                 "1 6 11 1 0 exception:3\n"
                                                 "1 16 12 2 0 16616 ok\n"
                                                 "1 16 12 2 0 32704 exception:3\n"
                                                 "1 5 0 1 0 ok\n"
                                                 "1 6 0 1 1 exception:2\n"
                                                 "17 6 10 1 101 exception:3\n"
                                                 "17 6 10 1 40 ok\n");
    client_free(mb);
    sim_stop(s);
}

/* ---- --counter ---- */

static void test_counter_counts_reads(void **state)
{
    (void)state;
    sim_t *s = sim_start("--static", "--counter", NULL);
    modbus_t *mb = client(s, 1);
    uint16_t hb[2];
    for (uint16_t i = 1; i <= 3; i++) {
        assert_int_equal(modbus_read_input_registers(mb, 30, 2, hb), 2);
        assert_int_equal(hb[0], 0);
        assert_int_equal(hb[1], i);
    }
    (void)read_ir(mb, 0); /* does not cover the heartbeat */
    uint16_t all[32];
    assert_int_equal(modbus_read_input_registers(mb, 0, 32, all), 32);
    assert_int_equal(all[31], 4);
    modbus_set_slave(mb, 2); /* per unit */
    assert_int_equal(read_ir(mb, 31), 1);
    client_free(mb);
    sim_stop(s);
}

/* ---- --fail-unit, SIGUSR1, --exception ---- */

static void wait_output(const sim_t *s, const char *needle)
{
    int64_t deadline = now_ms() + 5000;
    while (!strstr(read_file(s->out_path), needle)) {
        assert_true(now_ms() < deadline);
        pause_briefly();
    }
}

static void test_fail_unit_and_toggle(void **state)
{
    (void)state;
    sim_t *s = sim_start("--static", "--fail-unit", "2", NULL);
    modbus_t *mb = client(s, 2);
    modbus_set_response_timeout(mb, 0, 200000);
    uint16_t v;
    assert_int_equal(modbus_read_input_registers(mb, 6, 1, &v), -1);
    assert_int_equal(errno, ETIMEDOUT);
    client_free(mb);

    kill(s->pid, SIGUSR1);
    wait_output(s, "--fail-unit units now answering");
    mb = client(s, 2);
    assert_int_equal(read_ir(mb, 6), 2175);
    client_free(mb);

    kill(s->pid, SIGUSR1);
    wait_output(s, "--fail-unit units now silent");
    mb = client(s, 2);
    modbus_set_response_timeout(mb, 0, 200000);
    assert_int_equal(modbus_write_register(mb, 10, 100), -1);
    assert_int_equal(errno, ETIMEDOUT);
    client_free(mb);
    assert_string_equal(read_file(s->wlog_path), "2 6 10 1 100 noreply\n");

    /* Other units are not affected. */
    mb = client(s, 1);
    assert_int_equal(read_ir(mb, 6), 1450);
    client_free(mb);
    sim_stop(s);
}

static void test_exception_rules(void **state)
{
    (void)state;
    sim_t *s = sim_start("--static", "--exception", "1:input_register:2-3:2", "--exception",
                         "11:any:0-65535", NULL);
    modbus_t *mb = client(s, 1);
    uint16_t r[32];
    assert_int_equal(modbus_read_input_registers(mb, 0, 32, r), -1); /* covers 2-3 */
    assert_int_equal(errno, EMBXILADD);
    assert_int_equal(modbus_read_input_registers(mb, 4, 2, r), 2); /* does not */
    assert_int_equal(read_hr(mb, 10), 1450);                       /* other table */
    modbus_set_slave(mb, 11);
    assert_int_equal(modbus_write_bit(mb, 0, 0), -1);
    assert_int_equal(errno, EMBXSFAIL); /* default code 4 */
    modbus_set_slave(mb, 12);
    assert_int_equal(modbus_write_bit(mb, 0, 0), 1);
    client_free(mb);
    sim_stop(s);
}

/* ---- Simulating ---- */

static void test_pump_ramps_and_stops(void **state)
{
    (void)state;
    sim_t *s = sim_start(NULL);
    modbus_t *mb = client(s, 3);
    assert_int_equal(read_ir(mb, 6), 0);
    assert_int_equal(modbus_write_bit(mb, 0, 1), 1);
    assert_int_equal(read_bit(mb, true, 0), 1); /* the command shows at once */

    /* 3000 rpm per 5 s: 1450 rpm after ~2.4 s. */
    int64_t deadline = now_ms() + 10000;
    while (!read_bit(mb, false, 1)) { /* at_speed */
        assert_true(now_ms() < deadline);
        pause_briefly();
    }
    uint16_t ir[10];
    assert_int_equal(modbus_read_input_registers(mb, 0, 10, ir), 10);
    assert_in_range(ir[6], 1420, 1480);
    float flow = f32(&ir[0], "CDAB"), bar = f32(&ir[2], "ABCD"), amps = f32(&ir[4], "BADC");
    assert_true(flow > 11.5f && flow < 13.5f);
    assert_true(bar > 2.0f && bar < 2.5f);
    assert_true(amps > 6.8f && amps < 8.2f);
    assert_int_equal(ir[9] & 1, 1); /* motor_on */

    assert_int_equal(modbus_write_bit(mb, 0, 0), 1);
    deadline = now_ms() + 10000;
    while (read_ir(mb, 6) != 0) {
        assert_true(now_ms() < deadline);
        pause_briefly();
    }
    assert_int_equal(read_ir(mb, 9) & 1, 0);
    assert_true(f32((uint16_t[]){read_ir(mb, 0), read_ir(mb, 1)}, "CDAB") == 0.0f);
    client_free(mb);
    sim_stop(s);
}

static void test_light_power_follows_dim(void **state)
{
    (void)state;
    sim_t *s = sim_start(NULL);
    modbus_t *mb = client(s, 15);
    assert_int_equal(modbus_write_register(mb, 10, 40), 1);
    int64_t deadline = now_ms() + 10000;
    for (;;) {
        uint16_t p[2];
        assert_int_equal(modbus_read_input_registers(mb, 0, 2, p), 2);
        float w = f32(p, "DCBA"); /* 0.5 + 120 W x 40 % = 48.5 W, +-0.5 % */
        if (w > 48.0f && w < 49.0f) {
            break;
        }
        assert_true(now_ms() < deadline);
        pause_briefly();
    }
    assert_int_equal(modbus_write_bit(mb, 0, 0), 1);
    deadline = now_ms() + 10000;
    while (read_ir(mb, 7) & 1) { /* lit */
        assert_true(now_ms() < deadline);
        pause_briefly();
    }
    uint16_t p[2];
    assert_int_equal(modbus_read_input_registers(mb, 0, 2, p), 2);
    assert_true(f32(p, "DCBA") == 0.5f);
    client_free(mb);
    sim_stop(s);
}

static void test_heartbeat_ticks_when_simulating(void **state)
{
    (void)state;
    sim_t *s = sim_start(NULL);
    modbus_t *mb = client(s, 1);
    uint16_t first = read_ir(mb, 31);
    int64_t deadline = now_ms() + 5000;
    while (read_ir(mb, 31) < first + 3) {
        assert_true(now_ms() < deadline);
        pause_briefly();
    }
    client_free(mb);
    sim_stop(s);
}

/* ---- Robustness ---- */

static void send_all(int fd, const void *p, size_t n)
{
    assert_int_equal(send(fd, p, n, MSG_NOSIGNAL), (ssize_t)n);
}

static void test_half_frame_does_not_block_others(void **state)
{
    (void)state;
    sim_t *s = sim_start("--static", NULL);
    int slow = connect_raw(s->port);
    assert_true(slow >= 0);
    static const uint8_t req[12] = {0, 7, 0, 0, 0, 6, 1, 3, 0, 10, 0, 1};
    send_all(slow, req, 8); /* half a frame */

    modbus_t *mb = client(s, 1);
    assert_int_equal(read_hr(mb, 10), 1450); /* answered meanwhile */
    client_free(mb);

    send_all(slow, req + 8, 4);
    uint8_t rsp[64];
    struct pollfd pfd = {.fd = slow, .events = POLLIN};
    assert_int_equal(poll(&pfd, 1, 5000), 1);
    assert_int_equal(recv(slow, rsp, sizeof rsp, 0), 11);
    static const uint8_t expect[11] = {0, 7, 0, 0, 0, 5, 1, 3, 2, 0x05, 0xAA};
    assert_memory_equal(rsp, expect, sizeof expect);
    close(slow);
    sim_stop(s);
}

static void test_garbage_never_stops_the_server(void **state)
{
    (void)state;
    sim_t *s = sim_start("--counter", NULL);
    uint64_t x = 0x1234567887654321ULL;
    for (int round = 0; round < 200; round++) {
        int fd = connect_raw(s->port);
        assert_true(fd >= 0);
        uint8_t buf[600];
        size_t n = 1 + (size_t)(round * 7 % (int)sizeof buf);
        for (size_t i = 0; i < n; i++) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[i] = (uint8_t)x;
        }
        if (round % 2) {
            /* A well-formed MBAP header in front of random PDUs: exercises every function. */
            size_t pdu = 1 + (size_t)(x % 40);
            uint8_t hdr[7] = {0, 1, 0, 0, 0, (uint8_t)(pdu + 1), (uint8_t)(x >> 8) % 20};
            send(fd, hdr, sizeof hdr, MSG_NOSIGNAL);
            n = pdu;
        }
        send(fd, buf, n, MSG_NOSIGNAL);
        close(fd);
    }
    /* Still serving: the read-counting heartbeat moves by exactly one per read. */
    modbus_t *mb = client(s, 1);
    uint16_t a = read_ir(mb, 31), b = read_ir(mb, 31);
    assert_int_equal((uint16_t)(b - a), 1);
    client_free(mb);
    sim_stop(s);
}

/* ---- RTU, over a pty pair made by socat ---- */

static void test_rtu_over_pty(void **state)
{
    (void)state;
    char sim_tty[96], gw_tty[96], a1[128], a2[128];
    strcpy(g_pty_dir, "/tmp/simpul-sim-pty-XXXXXX");
    assert_non_null(mkdtemp(g_pty_dir));
    snprintf(sim_tty, sizeof sim_tty, "%s/sim", g_pty_dir);
    snprintf(gw_tty, sizeof gw_tty, "%s/gw", g_pty_dir);
    snprintf(a1, sizeof a1, "pty,raw,echo=0,link=%s", sim_tty);
    snprintf(a2, sizeof a2, "pty,raw,echo=0,link=%s", gw_tty);
    g_socat = fork();
    assert_true(g_socat >= 0);
    if (g_socat == 0) {
        execlp("socat", "socat", a1, a2, (char *)NULL);
        _exit(127);
    }
    int64_t deadline = now_ms() + 5000;
    while (access(sim_tty, F_OK) != 0 || access(gw_tty, F_OK) != 0) {
        int status;
        if (waitpid(g_socat, &status, WNOHANG) == g_socat) {
            g_socat = 0;
            rmdir(g_pty_dir);
            skip(); /* no socat here */
        }
        assert_true(now_ms() < deadline);
        pause_briefly();
    }

    sim_t *s = sim_start("--static", "--rtu", sim_tty, "--baud", "19200", NULL);
    wait_output(s, "listening on tcp"); /* the tty is open once this line is out */
    modbus_t *mb = modbus_new_rtu(gw_tty, 19200, 'N', 8, 1);
    assert_non_null(mb);
    g_clients[MAX_CLIENTS - 1] = mb;
    assert_int_equal(modbus_connect(mb), 0);
    modbus_set_response_timeout(mb, 1, 0);
    modbus_set_slave(mb, 1);
    assert_int_equal(read_hr(mb, 10), 1450);
    assert_int_equal(modbus_write_register(mb, 10, 1000), 1);
    assert_int_equal(read_hr(mb, 10), 1000);
    assert_int_equal(modbus_write_register(mb, 10, 3001), -1);
    assert_int_equal(errno, EMBXILVAL);
    modbus_set_slave(mb, 17);
    uint16_t p[2];
    assert_int_equal(modbus_read_input_registers(mb, 0, 2, p), 2);
    assert_true(f32(p, "DCBA") == 96.5f);
    /* On a bus, nobody answers for an absent unit. */
    modbus_set_slave(mb, 5);
    modbus_set_response_timeout(mb, 0, 300000);
    uint16_t v;
    assert_int_equal(modbus_read_registers(mb, 10, 1, &v), -1);
    assert_int_equal(errno, ETIMEDOUT);
    /* The serial side and the TCP side serve the same devices. */
    modbus_t *tcp = client(s, 1);
    assert_int_equal(read_hr(tcp, 10), 1000);
    client_free(tcp);
    g_clients[MAX_CLIENTS - 1] = NULL;
    modbus_close(mb);
    modbus_free(mb);
    assert_string_equal(read_file(s->wlog_path), "1 6 10 1 1000 ok\n1 6 10 1 3001 exception:3\n");
    sim_stop(s);

    kill(g_socat, SIGTERM);
    waitpid(g_socat, NULL, 0);
    g_socat = 0;
    rmdir(g_pty_dir);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PATH-TO-simpul-sim\n", argv[0]);
        return 2;
    }
    g_sim_path = argv[1];
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_static_pump_register_map, teardown),
        cmocka_unit_test_teardown(test_static_light_register_map, teardown),
        cmocka_unit_test_teardown(test_writes_and_write_log, teardown),
        cmocka_unit_test_teardown(test_counter_counts_reads, teardown),
        cmocka_unit_test_teardown(test_fail_unit_and_toggle, teardown),
        cmocka_unit_test_teardown(test_exception_rules, teardown),
        cmocka_unit_test_teardown(test_pump_ramps_and_stops, teardown),
        cmocka_unit_test_teardown(test_light_power_follows_dim, teardown),
        cmocka_unit_test_teardown(test_heartbeat_ticks_when_simulating, teardown),
        cmocka_unit_test_teardown(test_half_frame_does_not_block_others, teardown),
        cmocka_unit_test_teardown(test_garbage_never_stops_the_server, teardown),
        cmocka_unit_test_teardown(test_rtu_over_pty, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
