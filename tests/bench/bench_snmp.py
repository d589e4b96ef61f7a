"""CPU per GET: N SNMP devices polled through Debian's snmpd, simpul's CPU from /proc.

Real mosquitto, simpul and A snmpd agents on loopback; N devices spread over the agents
(devices on one agent share one worker thread, as the ABI's connections do), each with T
tags of several types (10 INTEGER/Gauge32/Counter32/TimeTicks/OCTET STRING objects by default)
polled every I ms (one GET per poll: T <= max_varbinds_per_request). Values are static: this
measures the poll path (GET, decode, deadband), not publishing. Reports simpul's CPU seconds
(utime + stime of /proc/PID/stat) over D seconds, the GETs done (P/G/metrics "requests") and
CPU per GET. Never fails on time.

    /usr/bin/python3 tests/bench/bench_snmp.py [N=100] [D=60] [A=4] [T=10] [I=1000]
    (env SIMPUL, SIMPUL_PLUGIN_DIR as for the other benches)
"""
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as h  # noqa: E402
from test_snmp import BASE, Snmpd, device, tag  # noqa: E402

TYPES = [("1.0", "int32"), ("3.0", "uint32"), ("4.0", "uint64"), ("5.0", "uint32"),
         ("6.0", "string"), ("2.0", "int64"), ("8.0", "int32")]


def cpu_s(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    args = [int(a) for a in sys.argv[1:]]
    n, dur, nagents, ntags, interval = (args + [100, 60, 4, 10, 1000][len(args):])[:5]
    t = h.TestCase()
    t.workdir = tempfile.mkdtemp(prefix="simpul-bench-")
    try:
        b = t.broker()
        agents = []
        for k in range(nagents):
            agents.append(Snmpd(t.workdir, name="snmpd%d" % k).start())
            t.defer(agents[-1].stop)
        tags = [tag("t%d" % k, TYPES[k % len(TYPES)][0], TYPES[k % len(TYPES)][1])
                for k in range(ntags)]
        devs = [device("dev-%03d" % i, agents[i % nagents].port, tags, interval=interval,
                       timeout_ms=1000) for i in range(n)]
        cfg = h.base_config(t.workdir, b.port, devs)
        cfg["gateway"]["metrics_interval_s"] = 5
        sub = t.subscriber(b.port, ["simpul/gw-test/metrics", "simpul/gw-test/+/status"])
        g = t.gateway(cfg, log_level="warn")
        h.wait_for(lambda: len(sub.messages()) >= n, 60, "devices online")
        time.sleep(5)  # warm-up; a bench, not a test: measuring a period is the point
        m0 = len(sub.json("simpul/gw-test/metrics"))
        h.wait_for(lambda: len(sub.json("simpul/gw-test/metrics")) > m0, 10, "metrics")
        first = sub.json("simpul/gw-test/metrics")[-1]
        c0, t0 = cpu_s(g.proc.pid), time.monotonic()
        time.sleep(dur)
        m1 = len(sub.json("simpul/gw-test/metrics"))
        h.wait_for(lambda: len(sub.json("simpul/gw-test/metrics")) > m1, 10, "metrics")
        c1, t1 = cpu_s(g.proc.pid), time.monotonic()
        last = sub.json("simpul/gw-test/metrics")[-1]
        # GET rate from the metrics window, applied to the CPU window (both ~D seconds).
        span = (last["ts"] - first["ts"]) / 1000.0
        rate = (last["requests"] - first["requests"]) / span
        polls = last["polls"] - first["polls"]
        errors = last["poll_errors"] - first["poll_errors"]
        cpu = c1 - c0
        gets = rate * (t1 - t0)
        print("devices %d, agents %d, tags/device %d, interval %d ms, %.0f s" %
              (n, nagents, ntags, interval, t1 - t0))
        print("%.1f GETs/s over %.0f s of metrics (polls %d, poll errors %d)" %
              (rate, span, polls, errors))
        print("simpul CPU %.2f s over %.0f s = %.1f %% of one core; %.1f us CPU per GET "
              "(%.2f us per tag value); RSS %s" %
              (cpu, t1 - t0, 100 * cpu / (t1 - t0), 1e6 * cpu / max(gets, 1),
               1e6 * cpu / max(gets * ntags, 1), last.get("rss_kb")))
        g.stop()
    finally:
        t.cleanup_all()


if __name__ == "__main__":
    main()
