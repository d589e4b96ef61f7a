"""Instructions per poll request under callgrind: SNMP GET vs Modbus read, same shape.

20 devices at 1 s (2 snmpd agents, or 2 simpul-sim servers with 3 unit ids each), 10 values per
device, values static. simpul runs under `valgrind --tool=callgrind`; the counters are zeroed
after warm-up and dumped D seconds later; requests in that window come from P/G/metrics.
Instruction counts are repeatable on a shared machine where wall-clock CPU is not; they count
user space only (no kernel).

    /usr/bin/python3 tests/bench/bench_poll_callgrind.py snmp|modbus [D=20]
    (env SIMPUL, SIMPUL_SIM, SIMPUL_PLUGIN_DIR as for the other benches)
"""
import glob
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
sys.path.insert(0, HERE)
import harness as h  # noqa: E402
from bench_snmp import TYPES  # noqa: E402
from test_snmp import Snmpd, device, tag  # noqa: E402

N = 20


def devices(t, proto):
    if proto == "snmp":
        agents = []
        for k in range(2):
            agents.append(Snmpd(t.workdir, name="snmpd%d" % k).start())
            t.defer(agents[-1].stop)
        tags = [tag("t%d" % k, TYPES[k % len(TYPES)][0], TYPES[k % len(TYPES)][1])
                for k in range(10)]
        return [device("dev-%03d" % i, agents[i % 2].port, tags, interval=1000)
                for i in range(N)]
    sims = [t.sim(["--pumps", "3", "--lights", "0", "--static"], name="sim%d" % k)
            for k in range(2)]
    return [{"name": "dev-%03d" % i, "protocol": "modbus", "interval_ms": 1000,
             "connection": {"transport": "tcp", "host": "127.0.0.1", "port": sims[i % 2].port,
                            "unit_id": 1 + (i // 2) % 3, "timeout_ms": 2000},
             "tags": [{"name": "r%d" % k, "table": "input_register", "address": k,
                       "type": "uint16"} for k in range(10)]} for i in range(N)]


def next_metrics(sub):
    n = len(sub.json("simpul/gw-test/metrics"))
    h.wait_for(lambda: len(sub.json("simpul/gw-test/metrics")) > n, 30, "metrics")
    return sub.json("simpul/gw-test/metrics")[-1]


def main():
    proto = sys.argv[1] if len(sys.argv) > 1 else "snmp"
    dur = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    t = h.TestCase()
    t.workdir = tempfile.mkdtemp(prefix="simpul-bench-")
    try:
        b = t.broker()
        cfg = h.base_config(t.workdir, b.port, devices(t, proto))
        cfg["gateway"]["metrics_interval_s"] = 5
        sub = t.subscriber(b.port, ["simpul/gw-test/metrics", "simpul/gw-test/+/status"])
        out = os.path.join(t.workdir, "callgrind.out")
        g = t.gateway(cfg, log_level="warn",
                      wrapper=["valgrind", "--tool=callgrind", "--callgrind-out-file=" + out])
        h.wait_for(lambda: len(sub.messages()) >= N, 120, "devices online")
        time.sleep(8)  # warm-up under valgrind
        subprocess.run(["callgrind_control", "-z", str(g.proc.pid)], capture_output=True)
        tz = time.monotonic()
        first = next_metrics(sub)
        time.sleep(dur)
        last = next_metrics(sub)
        subprocess.run(["callgrind_control", "-d", str(g.proc.pid)], capture_output=True)
        td = time.monotonic()
        rate = (last["requests"] - first["requests"]) / ((last["ts"] - first["ts"]) / 1000.0)
        h.wait_for(lambda: glob.glob(out + ".*"), 10, "the dump")
        ir = 0
        for line in open(sorted(glob.glob(out + ".*"))[-1]):
            if line.startswith(("summary:", "totals:")):
                ir = max(ir, int(line.split()[1]))
        requests = rate * (td - tz)
        print("%s: %d devices, %.1f requests/s; %d instructions over %.1f s = %.0f per request"
              % (proto, N, rate, ir, td - tz, ir / requests))
        g.stop()
    finally:
        t.cleanup_all()


if __name__ == "__main__":
    main()
