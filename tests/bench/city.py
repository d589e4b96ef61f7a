"""City scale on a small PC (issue #9): simpul next to Debian's collectd, and the ceilings of
simpul's dependencies, all in one run on the same machine. Reports; never fails on time.

    /usr/bin/python3 tests/bench/city.py [--scales 1k,10k,100k] [--rounds 2] [--window 20]
                                         [--out FILE]

Needs a release build in ./build (or the env SIMPUL, SIMPUL_PLUGIN_DIR, CITY_LOAD and
BENCH_CEILINGS, as `meson test -C build --benchmark city` sets them). About 8 minutes with the
defaults on 2 cores.

Load: N devices x M uint16 holding registers, on K Modbus TCP endpoints served by one
city-load thread (tests/bench/city_load.c); 10 % of the registers change per second. Every
device is polled each second. A local mosquitto (max_queued_messages 0) and a QoS 1
mosquitto_sub take everything published; the subscriber stamps each arrival.

Runs, interleaved per scale: simpul, collectd, simpul, collectd... (collectd only where K = N:
its modbus plugin has one connection per Host block). For each run, after a warm-up, over the
measurement window: CPU user+sys (/proc/PID/stat), peak RSS (VmHWM) and peak PSS
(/proc/PID/smaps_rollup), threads, disk bytes written (/proc/PID/io write_bytes), values/s and
msgs/s at the subscriber, lag (data ts -> arrival) p50/p99, poll jitter p99 (distance of the
spacing of consecutive data messages of one device from a multiple of the interval), start-up
(spawn -> ts of the first data message) and RSS when the first data message arrives.
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
BUILD = os.path.join(ROOT, "build")
os.environ.setdefault("SIMPUL", os.path.join(BUILD, "gateway", "simpul"))
os.environ.setdefault("SIMPUL_PLUGIN_DIR", os.path.join(BUILD, "protocols", "modbus"))
CITY_LOAD = os.environ.get("CITY_LOAD", os.path.join(BUILD, "tests", "bench", "city-load"))
CEILINGS = os.environ.get("BENCH_CEILINGS", os.path.join(BUILD, "tests", "bench",
                                                          "bench_ceilings"))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as h  # noqa: E402

TAGS_PER_DEVICE = 50
INTERVAL_MS = 1000
MAX_UNIT = 247
# scale name -> list of (devices, endpoints)
SCALES = {
    "1k": [(20, 20)],
    "10k": [(200, 200)],
    "100k": [(2000, 1), (2000, 500)],
    "100k1": [(2000, 1)],  # one of the two, for profiles
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))]


# ---- the devices ------------------------------------------------------------------------------

def layout(ndev, k):
    """Device j lives on endpoint j % K as unit 1 + i % 247 at register (i // 247) * M, where
    i = j // K: a shared endpoint carries up to 247 unit ids, then more register blocks."""
    per_ep = -(-ndev // k)
    units = min(MAX_UNIT, per_ep)
    regs = -(-per_ep // MAX_UNIT) * TAGS_PER_DEVICE
    devs = []
    for j in range(ndev):
        i = j // k
        devs.append(("d%04d" % j, j % k, 1 + i % MAX_UNIT, (i // MAX_UNIT) * TAGS_PER_DEVICE))
    return devs, units, regs


class Load:
    runs = 0

    def __init__(self, workdir, k, units, regs):
        Load.runs += 1
        pf = os.path.join(workdir, "ports-%d" % Load.runs)
        self.proc = h.Proc("city-load", [CITY_LOAD, "--endpoints", str(k), "--units", str(units),
                                         "--regs", str(regs), "--port-file", pf], workdir)
        h.wait_for(lambda: os.path.exists(pf) or not self.proc.alive(), 30, "city-load ports")
        self.t0 = time.monotonic()
        with open(pf) as f:
            self.ports = [int(x) for x in f.read().split()]
        if len(self.ports) != k:
            raise h.Failure("city-load: %s" % self.proc.output())

    def stop(self):
        self.proc.stop()


def simpul_config(workdir, broker_port, devs, ports):
    profiles = {}
    devices = []
    for name, ep, unit, base in devs:
        prof = "b%d" % base
        if prof not in profiles:
            profiles[prof] = {"tags": [{"name": "r%02d" % t, "table": "holding_register",
                                        "address": base + t, "type": "uint16"}
                                       for t in range(TAGS_PER_DEVICE)]}
        devices.append({"name": name, "protocol": "modbus", "profile": prof,
                        "interval_ms": INTERVAL_MS,
                        "connection": {"transport": "tcp", "host": "127.0.0.1", "port": ports[ep],
                                       "unit_id": unit, "timeout_ms": 1000}})
    cfg = h.base_config(workdir, broker_port, devices, profiles, gw_id="bench")
    cfg["gateway"]["log_level"] = "warn"
    return cfg


def collectd_config(workdir, broker_port, devs, ports):
    out = ['Hostname "bench"', "FQDNLookup false", 'BaseDir "%s"' % workdir,
           'PIDFile "%s/collectd.pid"' % workdir, 'TypesDB "/usr/share/collectd/types.db"',
           "Interval %g" % (INTERVAL_MS / 1000.0), "AutoLoadPlugin false",
           "LoadPlugin logfile", "<Plugin logfile>", "  LogLevel warning", '  File STDOUT',
           "</Plugin>", "LoadPlugin modbus", "LoadPlugin mqtt", "<Plugin modbus>"]
    bases = sorted({d[3] for d in devs})
    for base in bases:
        for t in range(TAGS_PER_DEVICE):
            out += ['  <Data "b%d-r%02d">' % (base, t), "    RegisterBase %d" % (base + t),
                    "    RegisterType Uint16", "    RegisterCmd ReadHolding", "    Type gauge",
                    '    Instance "r%02d"' % t, "  </Data>"]
    for name, ep, unit, base in devs:
        out += ['  <Host "%s">' % name, '    Address "127.0.0.1"', '    Port "%d"' % ports[ep],
                "    Interval %g" % (INTERVAL_MS / 1000.0), "    <Slave %d>" % unit,
                '      Instance "%s"' % name]
        out += ['      Collect "b%d-r%02d"' % (base, t) for t in range(TAGS_PER_DEVICE)]
        out += ["    </Slave>", "  </Host>"]
    out += ["</Plugin>", "<Plugin mqtt>", '  <Publish "bench">', '    Host "127.0.0.1"',
            '    Port "%d"' % broker_port, '    ClientId "collectd-bench"', "    QoS 1",
            '    Prefix "collectd"', "  </Publish>", "</Plugin>"]
    path = os.path.join(workdir, "collectd.conf")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return path


# ---- measuring a process ----------------------------------------------------------------------

def proc_cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.split()
    return out


def proc_field(path, key):
    """The number after `key` in a /proc file of `key: value` lines (0 when absent)."""
    with open(path) as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def proc_pss_kb(pid):
    return proc_field("/proc/%d/smaps_rollup" % pid, "Pss:")


def proc_write_bytes(pid):
    return proc_field("/proc/%d/io" % pid, "write_bytes:")


class Subscriber:
    """mosquitto_sub at QoS 1, line-buffered, each line: arrival time, topic, payload."""

    def __init__(self, workdir, port, topic, name):
        self.path = os.path.join(workdir, name + ".sub")
        self.port = port
        self.f = open(self.path, "wb")
        self.p = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
             "--nodelay", "-i", name, "-t", topic, "-t", "bench/probe", "-F", "%U %t %p"],
            stdout=self.f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        # Ready once a probe published now comes back.
        def probed():
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1",
                            "-t", "bench/probe", "-m", "probe"], check=True)
            return os.path.getsize(self.path) > 0
        h.wait_for(probed, 10, "subscriber ready", interval=0.1)
        self.probe_size = os.path.getsize(self.path)

    def got_data(self):
        return os.path.getsize(self.path) > self.probe_size  # only data topics come after it

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            # Still busy with a broker backlog (collectd behind): what it has written is kept.
            self.p.kill()
            self.p.wait()
        self.f.close()

    def lines(self):
        with open(self.path, "rb") as f:
            for line in f:
                parts = line.rstrip(b"\n").split(b" ", 2)
                if len(parts) == 3 and parts[1] != b"bench/probe":
                    yield float(parts[0]), parts[1].decode(), parts[2]


def analyse_simpul(sub, t0, t1, spawn):
    msgs = values = 0
    lags, jitter = [], []
    last = {}  # device -> (seq, ts)
    first_ts = None
    for arr, topic, payload in sub.lines():
        if not topic.endswith("/data"):
            continue
        j = json.loads(payload)
        ts = j["ts"] / 1000.0
        if first_ts is None and ts >= spawn:  # replayed messages keep their old ts
            first_ts = ts
        dev = topic.split("/")[2]
        prev = last.get(dev)
        last[dev] = (j["seq"], ts)
        if not t0 <= arr < t1:
            continue
        msgs += 1
        values += len(j.get("values", {}))
        lags.append((arr - ts) * 1000.0)
        if prev:
            # A poll without a change sends nothing: the spacing is a multiple of the interval.
            d = ((ts - prev[1]) * 1000.0) % INTERVAL_MS
            jitter.append(min(d, INTERVAL_MS - d))
    return msgs, values, lags, jitter, first_ts


def analyse_collectd(sub, t0, t1):
    msgs = 0
    lags = []
    first_ts = None
    for arr, topic, payload in sub.lines():
        if not topic.startswith("collectd/"):
            continue
        ts = float(payload.split(b":", 1)[0])
        if first_ts is None:
            first_ts = ts
        if not t0 <= arr < t1:
            continue
        msgs += 1
        lags.append((arr - ts) * 1000.0)
    return msgs, msgs, lags, [], first_ts


def measure(who, argv, env, sub, warmup, window, workdir, perf=None):
    """Starts argv, waits for its first data, warms up, measures over the window, stops it."""
    spawn = time.time()
    measure.runs += 1
    proc = h.Proc("%s-%d" % (who, measure.runs), argv, workdir, env=env)  # a log of its own
    try:
        return measure_proc(proc, who, sub, spawn, warmup, window, perf)
    finally:
        proc.stop()  # a no-op after a clean stop; otherwise no process outlives the bench


measure.runs = 0


def measure_proc(proc, who, sub, spawn, warmup, window, perf):
    pid = proc.pid
    rss_first = 0
    rss_start = None  # simpul: when it logs "started:", its set-up done and no poll run yet
    deadline = time.monotonic() + 60
    while True:
        if not proc.alive() or time.monotonic() > deadline:
            raise h.Failure("%s: no data\n%s" % (who, proc.output()[-3000:]))
        rss_first = int(proc_status(pid)["VmRSS"][0])  # the last sample before the data
        if rss_start is None and who == "simpul" and "] started:" in proc.output():
            rss_start = rss_first
        if sub.got_data():
            break
        time.sleep(0.005)
    time.sleep(warmup)
    callgrind = "callgrind" in " ".join(proc.argv[:3])
    if callgrind:
        # Count instructions over the window only: zero now, dump at its end.
        subprocess.run(["callgrind_control", "-z", str(pid)], stdout=subprocess.DEVNULL)
    rec = None
    if perf:
        rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-g", "-p", str(pid),
                                "-o", perf, "--", "sleep", str(window)])
    cpu0, wb0, w0 = proc_cpu_s(pid), proc_write_bytes(pid), time.time()
    pss_peak = threads = 0
    while time.time() < w0 + window:
        pss_peak = max(pss_peak, proc_pss_kb(pid))
        threads = max(threads, int(proc_status(pid)["Threads"][0]))
        time.sleep(min(1.0, max(0.0, w0 + window - time.time())))
    cpu1, wb1, w1 = proc_cpu_s(pid), proc_write_bytes(pid), time.time()
    if rec:
        rec.wait(30)
    if callgrind:
        subprocess.run(["callgrind_control", "-d", str(pid)], stdout=subprocess.DEVNULL)
    st = proc_status(pid)
    rc = proc.stop(timeout=15)
    if who == "simpul" and rc != 0:
        raise h.Failure("simpul exited %s after SIGTERM:\n%s" % (rc, proc.output()[-3000:]))
    return {"who": who, "cpu_pct": (cpu1 - cpu0) / (w1 - w0) * 100.0,
            "rss_mb": int(st["VmHWM"][0]) / 1024.0, "pss_mb": pss_peak / 1024.0,
            "rss_first_mb": rss_first / 1024.0, "threads": threads,
            "rss_start_mb": rss_start / 1024.0 if rss_start is not None else float("nan"),
            "disk_mb_s": (wb1 - wb0) / (w1 - w0) / 1e6, "window": (w0, w1), "spawn": spawn}


def run_one(who, workdir, broker, ndev, k, warmup, window, args):
    devs, units, regs = layout(ndev, k)
    load = Load(workdir, k, units, regs)
    sub = None
    try:
        if who == "simpul":
            sub = Subscriber(workdir, broker.port, "simpul/bench/+/data", "sub-simpul")
            cfg = simpul_config(workdir, broker.port, devs, load.ports)
            if args.sync:
                cfg["store"]["synchronous"] = args.sync
            db = cfg["store"]["path"]
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.remove(db + suffix)
            g = h.Gateway(workdir, cfg, name="simpul-city", log_level="warn")
            if args.restart:
                # Fill the store first (every tag's last value, seq, a few outbox rows): the
                # measured run is then a restart.
                pre = Subscriber(workdir, broker.port, "simpul/bench/+/data", "sub-pre")
                measure("simpul", [h.SIMPUL, "-c", g.config_path, "--log-level", "warn"],
                        {"SIMPUL_PLUGIN_DIR": h.PLUGIN_DIR}, pre, 2, 1, workdir)
                pre.stop()
            argv = args.wrap.split() + [h.SIMPUL, "-c", g.config_path, "--log-level", "info"]
            r = measure("simpul", argv, {"SIMPUL_PLUGIN_DIR": h.PLUGIN_DIR}, sub, warmup,
                        window, workdir, perf=args.perf)
            sub.stop()
            msgs, values, lags, jitter, first_ts = analyse_simpul(sub, *r["window"], r["spawn"])
        else:
            sub = Subscriber(workdir, broker.port, "collectd/#", "sub-collectd")
            conf = collectd_config(workdir, broker.port, devs, load.ports)
            r = measure("collectd", ["collectd", "-f", "-C", conf], None, sub, warmup, window,
                        workdir)
            sub.stop()
            msgs, values, lags, jitter, first_ts = analyse_collectd(sub, *r["window"])
        sub = None
        load_cpu = proc_cpu_s(load.proc.pid) / (time.monotonic() - load.t0) * 100.0
    finally:
        try:
            if sub:
                sub.stop()
        finally:
            load.stop()
    span = r["window"][1] - r["window"][0]
    r.update({"devices": ndev, "endpoints": k, "tags": ndev * TAGS_PER_DEVICE,
              "msgs_s": msgs / span, "values_s": values / span, "load_cpu_pct": load_cpu,
              "lag_p50": pct(lags, 50), "lag_p99": pct(lags, 99), "jitter_p99": pct(jitter, 99),
              "startup_s": (first_ts - r["spawn"]) if first_ts else float("nan")})
    return r


# ---- the dependencies' ceilings ---------------------------------------------------------------

def ceilings(workdir, broker, secs):
    out = {}
    load = Load(workdir, 1, 1, TAGS_PER_DEVICE)
    try:
        out["modbus"] = json.loads(subprocess.check_output(
            [CEILINGS, "modbus", str(load.ports[0]), str(TAGS_PER_DEVICE), str(secs)]))
    finally:
        load.stop()
    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q",
                            "1", "-t", "bench/ceiling"], stdout=subprocess.DEVNULL)
    try:
        time.sleep(0.5)  # not a synchronisation: the ceiling is a rate over secs seconds
        out["mqtt"] = json.loads(subprocess.check_output(
            [CEILINGS, "mqtt", str(broker.port), "128", str(secs)]))
    finally:
        sub.send_signal(signal.SIGTERM)
        sub.wait(10)
    out["sqlite"] = json.loads(subprocess.check_output([CEILINGS, "sqlite", workdir, str(secs)]))
    return out


# ---- report -----------------------------------------------------------------------------------

def fmt(x, spec):
    return "—" if x != x else format(x, spec)  # NaN -> dash


def report(results, ceil, args):
    lines = ["| tags | devices / endpoints | who | CPU % of a core | ratio to collectd | "
             "peak RSS MB | peak PSS MB | RSS at start MB | RSS at first data MB | threads | "
             "disk MB/s | msgs/s | values/s | lag p50 / p99 ms | jitter p99 ms | start-up s |",
             "|" + "---|" * 16]
    for r in results:
        ratio = r.get("ratio")
        lines.append("| %d | %d / %d | %s | %s | %s | %s | %s | %s | %s | %d | %s | %s | %s | %s "
                     "/ %s | %s | %s |" % (
                         r["tags"], r["devices"], r["endpoints"], r["who"],
                         fmt(r["cpu_pct"], ".1f"), fmt(ratio, ".3f") if ratio else "",
                         fmt(r["rss_mb"], ".1f"), fmt(r["pss_mb"], ".1f"),
                         fmt(r["rss_start_mb"], ".1f"), fmt(r["rss_first_mb"], ".1f"),
                         r["threads"], fmt(r["disk_mb_s"], ".2f"),
                         fmt(r["msgs_s"], ".0f"), fmt(r["values_s"], ".0f"),
                         fmt(r["lag_p50"], ".1f"), fmt(r["lag_p99"], ".1f"),
                         fmt(r["jitter_p99"], ".1f"), fmt(r["startup_s"], ".2f")))
    lines += ["", "| ceiling (same run) | rate |", "|---|---|",
              "| libmodbus, one connection, %d-register reads | %d requests/s (%d values/s) |" % (
                  TAGS_PER_DEVICE, ceil["modbus"]["requests_per_s"],
                  ceil["modbus"]["values_per_s"]),
              "| libmosquitto QoS 1, 128-byte messages, 500 in flight, QoS 1 subscriber | "
              "%d msgs/s |" % ceil["mqtt"]["msgs_per_s"],
              "| SQLite WAL synchronous=NORMAL, history-like rows, 1000 per commit | "
              "%d rows/s |" % ceil["sqlite"]["rows_per_s"]]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", default="1k,10k,100k")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--ceiling-s", type=float, default=5.0)
    ap.add_argument("--no-collectd", action="store_true")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--restart", action="store_true",
                    help="measure simpul restarting on a store its previous run filled")
    ap.add_argument("--sync", choices=["full", "normal"],
                    help="simpul's store.synchronous (default: simpul's own default, full)")
    ap.add_argument("--perf", metavar="FILE",
                    help="perf record -e cpu-clock -g simpul over the window into FILE")
    ap.add_argument("--wrap", default="", metavar="CMD",
                    help='run simpul under CMD, e.g. "valgrind --tool=callgrind'
                         ' --callgrind-out-file=FILE"')
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="simpul-city-")
    broker = h.Broker(workdir).start()
    results = []
    try:
        t_start = time.monotonic()
        ceil = ceilings(workdir, broker, args.ceiling_s)
        for scale in args.scales.split(","):
            for ndev, k in SCALES[scale]:
                who_list = ["simpul"]
                if k == ndev and not args.no_collectd:
                    who_list.append("collectd")
                for rnd in range(args.rounds):
                    pair = {}
                    for who in who_list:
                        r = run_one(who, workdir, broker, ndev, k, args.warmup, args.window,
                                    args)
                        r["round"] = rnd
                        pair[who] = r
                        results.append(r)
                        print("%s %d tags (%d/%d) round %d: %.1f %% CPU, %.1f MB, %.0f msgs/s, "
                              "lag p99 %.1f ms (city-load %.1f %% CPU)" % (
                                  who, r["tags"], ndev, k, rnd, r["cpu_pct"], r["rss_mb"],
                                  r["msgs_s"], r["lag_p99"], r["load_cpu_pct"]), flush=True)
                    if "collectd" in pair:
                        pair["simpul"]["ratio"] = pair["simpul"]["cpu_pct"] / max(
                            pair["collectd"]["cpu_pct"], 1e-9)
        table = report(results, ceil, args)
        head = ("city bench, %s, %d rounds, window %.0f s, total %.0f s; machine %s (shared: "
                "compare ratios within this run)" % (
                    time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args.rounds,
                    args.window, time.monotonic() - t_start, os.uname().nodename))
        print("\n" + head + "\n\n" + table)
        if args.out:
            with open(args.out, "w") as f:
                f.write(head + "\n\n" + table + "\n")
    finally:
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
