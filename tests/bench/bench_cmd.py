"""Command round trip: publish a write on P/G/D/cmd -> its result on P/G/D/cmd/result.

Real mosquitto, simpul and simpul-sim on loopback. Each command is a write of speed_rpm that the
device confirms by read-back; commands are sent one at a time (the operator's case), N of them.
Reports p50/p90/p99/max in ms. Never fails on time.

    /usr/bin/python3 tests/bench/bench_cmd.py [N]      (env SIMPUL, SIMPUL_SIM, SIMPUL_PLUGIN_DIR)
"""
import json
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as h  # noqa: E402


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    t = h.TestCase()
    import tempfile
    t.workdir = tempfile.mkdtemp(prefix="simpul-bench-")
    try:
        b = t.broker()
        sim = t.sim(["--pumps", "3", "--lights", "8", "--static"])
        devs = []
        for u in (1, 2, 3):
            devs.append({"name": "pump-%02d" % u, "protocol": "modbus", "interval_ms": 1000,
                         "connection": {"transport": "tcp", "host": "127.0.0.1",
                                        "port": sim.port, "unit_id": u, "timeout_ms": 1000},
                         "tags": [{"name": "speed_rpm", "table": "holding_register",
                                   "address": 10, "type": "uint16", "writable": True,
                                   "min": 0, "max": 3000},
                                  {"name": "flow_m3h", "table": "input_register", "address": 0,
                                   "type": "float32", "order": "CDAB"}]})
        cfg = h.base_config(t.workdir, b.port, devs)
        # The round trip is measured, not the rate limits: back-to-back commands go well
        # beyond the default 20 per second and device.
        cfg["commands"] = {"rate_per_device": 10000, "rate_global": 100000}
        g = t.gateway(cfg, log_level="warn")
        sub = t.subscriber(b.port, ["simpul/gw-test/+/status"])
        h.wait_for(lambda: len(sub.messages()) >= 3, 20, "devices online")
        got = threading.Event()
        box = {}

        def on_msg(c, u, m):
            box["t"] = time.perf_counter()
            box["p"] = m.payload
            got.set()
        sub.c.message_callback_add("simpul/gw-test/pump-01/cmd/result", on_msg)
        sub.c.subscribe("simpul/gw-test/pump-01/cmd/result", qos=1)
        h.wait_for(lambda: sub.c.is_connected(), 5)
        lat = []
        for k in range(n + 50):
            got.clear()
            payload = json.dumps({"id": "b%d" % k, "op": "write", "tag": "speed_rpm",
                                  "value": 1000 + k % 1000})
            t0 = time.perf_counter()
            sub.c.publish("simpul/gw-test/pump-01/cmd", payload, qos=1)
            if not got.wait(5):
                raise SystemExit("no result for command %d" % k)
            r = json.loads(box["p"])
            assert r["ok"] is True, r
            if k >= 50:  # warm-up excluded
                lat.append((box["t"] - t0) * 1000.0)
        lat.sort()
        pct = lambda p: lat[min(len(lat) - 1, int(p / 100.0 * len(lat)))]  # noqa: E731
        print("command round trip, %d sequential writes with read-back (ms): "
              "p50 %.2f  p90 %.2f  p99 %.2f  max %.2f" % (n, pct(50), pct(90), pct(99), lat[-1]))
        g.stop()
        import sqlite3
        db = sqlite3.connect(cfg["store"]["path"])
        inner = sorted(r[0] / 1000.0 for r in db.execute(
            "select latency_us from audit where code = 'ok'"))[50:]
        db.close()
        ipct = lambda p: inner[min(len(inner) - 1, int(p / 100.0 * len(inner)))]  # noqa: E731
        print("  inside simpul (MQTT message received -> device confirmed, audit latency_us, ms): "
              "p50 %.2f  p90 %.2f  p99 %.2f  max %.2f" % (ipct(50), ipct(90), ipct(99), inner[-1]))
    finally:
        t.cleanup_all()
        import shutil
        shutil.rmtree(t.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
