"""Replay after an outage: >= 100k queued messages drain while live polling goes on.

Phase 1 (the outage): no broker. simpul polls 4 simpul-sim servers (50 units each, a
heartbeat every 20 ms per unit: 10k changes/s) and queues every data message in its SQLite
outbox, through the real path, until at least N messages wait. It is then stopped.
Phase 2 (the uplink returns): a real mosquitto and a subscriber come up, and simpul starts on
the same store with the demo's 11 live devices (3 pumps at 1 s, 8 lights at 5 s). The bench
measures how fast the backlog reaches the subscriber, and the delay of live messages meanwhile.
Never fails on time.

    /usr/bin/python3 tests/bench/bench_replay.py [N]   (env SIMPUL, SIMPUL_SIM, SIMPUL_PLUGIN_DIR)
"""
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as h  # noqa: E402

P = "simpul/gw-bench"


def outbox_rows(path):
    if not os.path.exists(path):
        return 0
    try:
        return len(h.outbox_messages(path))
    except sqlite3.OperationalError:
        return 0  # the schema is not there yet


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100000
    t = h.TestCase()
    t.workdir = tempfile.mkdtemp(prefix="simpul-bench-")
    try:
        dead_port = h.free_port()  # nothing listens here during the outage
        sims = [t.sim(["--pumps", "0", "--lights", "50"], name="burst%d" % k) for k in range(4)]
        devs = []
        for k, s in enumerate(sims):
            for u in range(11, 61):
                devs.append({"name": "burst-%d-%02d" % (k, u), "protocol": "modbus",
                             "interval_ms": 20,
                             "connection": {"transport": "tcp", "host": "127.0.0.1",
                                            "port": s.port, "unit_id": u, "timeout_ms": 1000},
                             "tags": [{"name": "heartbeat", "table": "input_register",
                                       "address": 30, "type": "uint32"}]})
        cfg = h.base_config(t.workdir, dead_port, devs, gw_id="gw-bench")
        cfg["store"]["outbox_max_mb"] = 1024
        store = cfg["store"]["path"]
        prefilled = os.environ.get("PREFILLED")  # reuse a phase-1 database (profiling runs)
        if prefilled and os.path.exists(prefilled):
            import shutil
            shutil.copy(prefilled, store)
            n = 0
        g1 = t.gateway(cfg, name="simpul-outage", log_level="warn")
        t0 = time.monotonic()
        h.wait_for(lambda: outbox_rows(store) >= n, 600,
                   "%d queued messages" % n)
        queued_s = time.monotonic() - t0
        g1.stop()
        for s in sims:
            s.stop()
        backlog = outbox_rows(store)
        if prefilled and not os.path.exists(prefilled):
            import shutil
            shutil.copy(store, prefilled)
        print("outage: %d messages queued in %.1f s through the real path (%.0f msg/s)" %
              (backlog, queued_s, backlog / queued_s))

        # Phase 2: the uplink is back.
        b = t.broker()
        sim = t.sim(["--pumps", "3", "--lights", "8"])
        live = []
        for u in (1, 2, 3):
            live.append({"name": "pump-%02d" % u, "protocol": "modbus", "interval_ms": 1000,
                         "connection": {"transport": "tcp", "host": "127.0.0.1",
                                        "port": sim.port, "unit_id": u},
                         "tags": [{"name": "heartbeat", "table": "input_register",
                                   "address": 30, "type": "uint32"}]})
        for u in range(11, 19):
            live.append({"name": "light-%02d" % (u - 10), "protocol": "modbus",
                         "interval_ms": 5000,
                         "connection": {"transport": "tcp", "host": "127.0.0.1",
                                        "port": sim.port, "unit_id": u},
                         "tags": [{"name": "heartbeat", "table": "input_register",
                                   "address": 30, "type": "uint32"}]})
        cfg2 = h.base_config(t.workdir, b.port, live, gw_id="gw-bench")
        cfg2["store"]["outbox_max_mb"] = 1024
        if os.environ.get("INFLIGHT"):
            cfg2["mqtt"]["inflight_max"] = int(os.environ["INFLIGHT"])
        # A C subscriber (mosquitto_sub) counts the backlog: a Python client tops out near
        # 10k msg/s and would measure itself, not simpul.
        import subprocess
        counter = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(b.port),
                                    "-q", os.environ.get("SUBQOS", "1"), "-t", P + "/+/data", "-C", str(backlog),
                                    "-F", "%U %t %p"], stdout=subprocess.PIPE, text=True)
        h.wait_for(lambda: "as auto-" in open(os.path.join(t.workdir, "mosquitto-%d.log"
                                                           % b.port)).read(), 10,
                   "mosquitto_sub connected")
        g2 = t.gateway(cfg2, name="simpul-replay", log_level="warn",
                       wrapper=os.environ.get("WRAP", "").split())
        t_start = time.monotonic()
        out, _ = counter.communicate(timeout=600)
        t_end = time.monotonic()
        got = out.splitlines()
        replayed = sum(1 for x in got if "/burst-" in x)
        dur = t_end - t_start
        lv = []
        for line in got:
            if "/burst-" not in line:
                at, _, payload = line.split(" ", 2)
                lv.append(float(at) * 1000.0 - json.loads(payload)["ts"])
        lv.sort()
        rate = len(got) / dur if dur > 0 else float("inf")
        print("replay: %d messages (%d replayed, %d live) in %.2f s from gateway start = "
              "%.0f msg/s (QoS 1, oldest first)" % (len(got), replayed, len(got) - replayed,
                                                   dur, rate))
        times = [float(x.split(" ", 1)[0]) for x in got if "/burst-" in x]
        span = max(times) - min(times)
        print("replay: first to last replayed message %.2f s = %.0f msg/s (inflight_max %s)" %
              (span, replayed / span, cfg2["mqtt"].get("inflight_max", 256)))
        if lv:
            print("live data during the replay: %d messages, delay poll->subscriber p50 %.1f ms, "
                  "max %.1f ms" % (len(lv), lv[len(lv) // 2], lv[-1]))
        def cpu_s(pid):
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        print("CPU time so far: simpul %.2f s, mosquitto %.2f s" %
              (cpu_s(g2.proc.pid), cpu_s(b.proc.pid)))
        rss = None
        with open("/proc/%d/status" % g2.proc.pid) as f:
            for line in f:
                if line.startswith("VmHWM"):
                    rss = line.split()[1]
        print("simpul peak RSS during the replay: %s kB" % rss)
        g2.stop()
    finally:
        t.cleanup_all()
        import shutil
        shutil.rmtree(t.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
