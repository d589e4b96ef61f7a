"""Sparkplug B beside JSON at 10k tags: simpul's CPU and the bytes per message and per value.

The same load runs with mqtt.format "json", then "sparkplug", then "both": 4 simpul-sim servers
(50 lights each, simulating), 200 devices x 50 tags (input registers 0..31 as uint16, 0..17 as
int16) polled every second. After a warm-up (the births and the first full messages), a
subscriber counts the data messages (P/G/+/data, or spBv1.0/+/DDATA/#), their payload bytes and
the values they carry, and simpul's CPU time (utime + stime from /proc) is taken over the same
window. Never fails on time: the machine may be shared, so compare the modes within one run.

    /usr/bin/python3 tests/bench/bench_sparkplug.py [SECONDS]   (env SIMPUL, SIMPUL_SIM, ...)
"""
import os
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as h  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

PROTO_DIR = tempfile.mkdtemp(prefix="simpul-spb-proto-")
subprocess.check_call(["protoc", "--proto_path", os.path.join(h.SOURCE_ROOT, "gateway"),
                       "--python_out", PROTO_DIR,
                       os.path.join(h.SOURCE_ROOT, "gateway", "sparkplug_b.proto")])
sys.path.insert(0, PROTO_DIR)
import sparkplug_b_pb2 as spb  # noqa: E402
import json  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


class Counter:
    def __init__(self, port):
        self.lock = threading.Lock()
        self.on = False
        self.n = {"json": [0, 0, 0], "spb": [0, 0, 0]}  # messages, bytes, values
        self.c = mqtt.Client(client_id="bench-%d" % os.getpid())
        self.c.on_message = self.msg
        self.c.on_connect = lambda c, u, f, rc: (c.subscribe("simpul/+/+/data", 0),
                                                 c.subscribe("spBv1.0/+/DDATA/#", 0))
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def msg(self, c, u, m):
        if not self.on:
            return
        if m.topic.startswith("spBv1.0/"):
            k, vals = "spb", len(spb.Payload.FromString(m.payload).metrics)
        else:
            k, vals = "json", len(json.loads(m.payload)["values"])
        with self.lock:
            x = self.n[k]
            x[0] += 1
            x[1] += len(m.payload)
            x[2] += vals

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


def main():
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    t = h.TestCase()
    t.workdir = tempfile.mkdtemp(prefix="simpul-bench-")
    try:
        b = t.broker()
        sims = [t.sim(["--pumps", "0", "--lights", "50"], name="city%d" % k) for k in range(4)]
        tags = ([{"name": "u%02d" % a, "table": "input_register", "address": a,
                  "type": "uint16"} for a in range(32)] +
                [{"name": "s%02d" % a, "table": "input_register", "address": a,
                  "type": "int16"} for a in range(18)])
        devs = [{"name": "light-%d-%02d" % (k, u), "protocol": "modbus", "interval_ms": 1000,
                 "connection": {"transport": "tcp", "host": "127.0.0.1", "port": s.port,
                                "unit_id": u, "timeout_ms": 1000},
                 "tags": tags} for k, s in enumerate(sims) for u in range(11, 61)]
        print("load: %d devices x %d tags = %d tags @ 1 s; window %.0f s; shared machine: "
              "compare within this run" % (len(devs), len(tags), len(devs) * len(tags), secs))
        for fmt in ("json", "sparkplug", "both"):
            cfg = h.base_config(t.workdir, b.port, devs, gw_id="gw-bench",
                                mqtt_extra={"format": fmt, "sparkplug": {"group_id": "city"}})
            cfg["gateway"]["log_level"] = "warn"
            cfg["store"]["path"] = os.path.join(t.workdir, "simpul-%s.db" % fmt)
            cnt = Counter(b.port)
            g = h.Gateway(t.workdir, cfg, name="simpul-" + fmt, log_level="warn").start()
            time.sleep(8.0)  # warm-up: connections, births, first full messages (a bench)
            cnt.on = True
            c0, w0 = cpu_s(g.proc.pid), time.monotonic()
            time.sleep(secs)
            c1, w1 = cpu_s(g.proc.pid), time.monotonic()
            cnt.on = False
            g.stop()
            cnt.close()
            line = "%-9s cpu %5.1f %% of a core" % (fmt, 100.0 * (c1 - c0) / (w1 - w0))
            for k in ("json", "spb"):
                m, by, v = cnt.n[k]
                if m:
                    line += " | %s: %6.0f msg/s, %5.0f B/msg, %4.1f values/msg, %4.1f B/value" % (
                        k, m / (w1 - w0), by / m, v / m, by / max(v, 1))
            print(line, flush=True)
    finally:
        t.cleanup_all()


if __name__ == "__main__":
    main()
