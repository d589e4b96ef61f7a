"""What the store costs the flash: 200 devices x 50 registers polled every second.

Load: 4 simpul-sim servers with 50 streetlights each (200 devices); every device reads its 32
input registers as 50 tags (0..31 as uint16, 0..17 again as int16), once a second. The
simulation moves the heartbeat, power, voltage and temperature registers, so about a tenth of
the registers change per second and every device publishes one data message a second.

Each configuration runs the same load twice, broker up then a broker outage, and reports for
simpul: bytes it wrote to storage per second (/proc/PID/io write_bytes), RSS, CPU, commits and
outbox rows written, then the replay rate of the outage's backlog. The configurations are
`commit_interval_ms: 0` (commit-before-publish, as 1.0.0 did) and the default 1000, in the same
run, so the figures compare on a shared machine. Never fails on time.

    /usr/bin/python3 tests/bench/bench_store_flash.py [UP_S [OUTAGE_S]]   (default 60 60)
    env FLASH_INTERVALS (default "0,1000"): the commit_interval_ms values to run;
    env FLASH_CHUNK_S: store.history_chunk_max_s, so that history chunks close (and are
    written) inside a short window (the default 900 s needs a run of more than 15 minutes)
    (env SIMPUL, SIMPUL_SIM, SIMPUL_PLUGIN_DIR, as for meson test --benchmark)
"""
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as h  # noqa: E402

P = "simpul/gw-flash"
WARMUP_S = 10


def proc_stats(pid):
    """(write_bytes, rss_kb, cpu_s) of a process."""
    wb = 0
    with open("/proc/%d/io" % pid) as f:
        for line in f:
            if line.startswith("write_bytes:"):
                wb = int(line.split()[1])
    rss = 0
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return wb, rss, cpu


def devices(sims):
    tags = [{"name": "r%02d" % a, "table": "input_register", "address": a, "type": "uint16"}
            for a in range(32)]
    tags += [{"name": "s%02d" % a, "table": "input_register", "address": a, "type": "int16"}
             for a in range(18)]
    out = []
    for k, s in enumerate(sims):
        for u in range(11, 61):
            out.append({"name": "light-%d-%02d" % (k, u), "protocol": "modbus",
                        "interval_ms": 1000,
                        "connection": {"transport": "tcp", "host": "127.0.0.1", "port": s.port,
                                       "unit_id": u, "timeout_ms": 1000},
                        "tags": tags})
    return out


def window(g, seconds):
    """Measures simpul over `seconds`: bytes/s written, peak RSS, CPU share."""
    w0, _, c0 = proc_stats(g.proc.pid)
    t0 = time.monotonic()
    peak = 0
    while time.monotonic() - t0 < seconds:
        time.sleep(1)
        peak = max(peak, proc_stats(g.proc.pid)[1])
    w1, _, c1 = proc_stats(g.proc.pid)
    dt = time.monotonic() - t0
    return {"write_Bps": (w1 - w0) / dt, "rss_kb": peak, "cpu_pct": 100 * (c1 - c0) / dt}


def data_count(sub):
    return len([m for m in sub.messages() if m[0].endswith("/data")])


class Seqs:
    """Per device seqs seen, read incrementally from the subscriber's messages."""

    def __init__(self, sub):
        self.sub, self.n, self.seqs = sub, 0, {}

    def update(self):
        msgs = self.sub.messages()
        for m in msgs[self.n:]:
            if m[0].endswith("/data"):
                seq = int(re.search(rb'"seq":(\d+)', m[1]).group(1))
                self.seqs.setdefault(m[0], set()).add(seq)
        self.n = len(msgs)

    def holes(self):
        self.update()
        return sum(max(v) - min(v) + 1 - len(v) for v in self.seqs.values())


def run(t, sims, interval_ms, up_s, outage_s):
    wd = tempfile.mkdtemp(prefix="flash-", dir=t.workdir)
    b = t.broker(persistence=True)
    cfg = h.base_config(wd, b.port, devices(sims), gw_id="gw-flash")
    cfg["gateway"]["log_level"] = "warn"
    cfg["gateway"]["metrics_interval_s"] = 5
    cfg["store"]["commit_interval_ms"] = interval_ms
    cfg["store"]["runtime_dir"] = h.runtime_dir(wd)
    if os.environ.get("FLASH_CHUNK_S"):  # history chunks that close within the window
        cfg["store"]["history_chunk_max_s"] = int(os.environ["FLASH_CHUNK_S"])
    sub = t.subscriber(b.port, [P + "/+/data", P + "/metrics"], client_id="flash-%d" % interval_ms,
                       clean_session=False)
    seqs = Seqs(sub)
    g = t.gateway(cfg, name="simpul-%d" % interval_ms, log_level="warn")
    h.wait_for(lambda: data_count(sub) >= 200, 30, "data from every device")
    time.sleep(WARMUP_S)  # noqa: a warm-up before measuring, not a synchronisation
    up = window(g, up_s)
    port = b.port
    b.stop()
    out = window(g, outage_s)
    seqs.update()
    n_before = data_count(sub)
    b2 = h.Broker(t.workdir, port, persistence=True).start()
    t.defer(b2.stop)
    # From the reconnect (simpul's backoff may wait up to 30 s) to no hole left in any device's
    # seqs: the backlog's replay.
    h.wait_for(lambda: data_count(sub) > n_before, 60, "simpul reconnected", interval=0.01)
    t0 = time.monotonic()
    h.wait_for(lambda: seqs.holes() == 0, 600, "the replay", interval=0.05)
    replay_s = time.monotonic() - t0
    # Live messages kept coming meanwhile (200/s): the rest is the backlog.
    replayed = data_count(sub) - n_before - 200 * replay_s
    n_metrics = len(sub.messages(P + "/metrics"))
    h.wait_for(lambda: len(sub.messages(P + "/metrics")) > n_metrics, 15, "metrics after the replay")
    metrics = [json.loads(m[1]) for m in sub.messages(P + "/metrics")]
    store = metrics[-1].get("store", {}) if metrics else {}
    g.stop()
    b2.stop()
    return up, out, replayed / replay_s, store


def main():
    up_s = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    outage_s = int(sys.argv[2]) if len(sys.argv) > 2 else 60
    t = h.TestCase()
    t.workdir = tempfile.mkdtemp(prefix="simpul-bench-flash-")
    try:
        sims = [t.sim(["--pumps", "0", "--lights", "50"], name="sim%d" % k) for k in range(4)]
        print("200 devices x 50 registers @ 1 s; broker up %d s, outage %d s; machine shared"
              % (up_s, outage_s))
        print("%-22s %12s %9s %7s %12s %9s %7s %10s %s" % (
            "config", "up B/s", "up RSS", "up CPU", "outage B/s", "out RSS", "out CPU",
            "replay/s", "store metrics"))
        for iv in [int(x) for x in os.environ.get("FLASH_INTERVALS", "0,1000").split(",")]:
            up, out, rate, store = run(t, sims, iv, up_s, outage_s)
            print("%-22s %12.0f %7d kB %6.1f%% %12.0f %6d kB %6.1f%% %10.0f %s" % (
                "commit_interval_ms %d" % iv, up["write_Bps"], up["rss_kb"], up["cpu_pct"],
                out["write_Bps"], out["rss_kb"], out["cpu_pct"], rate, json.dumps(store)),
                flush=True)
    finally:
        t.cleanup_all()
        import shutil
        shutil.rmtree(t.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
