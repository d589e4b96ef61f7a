"""Per-device health in P/G/metrics, under "devices" (docs/contract.md): polls, errors, read
latency p50/p99, the last successful poll and the current backoff, for a device that answers
and for one that never does (a unit id simpul-sim leaves silent).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
KEYS = {"polls", "errors", "latency_ms_p50", "latency_ms_p99", "last_ok_ts", "backoff_ms"}


class DeviceHealthTest(h.TestCase):
    def test_devices_group(self):
        b = self.broker()
        sim = self.sim(["--pumps", "2", "--lights", "0", "--fail-unit", "2"])
        devs = [h.tcp_device("pump-01", sim.port, unit=1, interval_ms=100, timeout_ms=300),
                h.tcp_device("pump-02", sim.port, unit=2, interval_ms=100, timeout_ms=300)]
        cfg = h.base_config(self.workdir, b.port, devs)
        cfg["gateway"]["metrics_interval_s"] = 1
        sub = self.subscriber(b.port, [P + "/metrics"])
        g = self.gateway(cfg)

        def enough(m):
            d = m.get("devices", {})
            return d.get("pump-01", {}).get("polls", 0) >= 5 and \
                d.get("pump-02", {}).get("errors", 0) >= 2
        m = sub.wait_json(P + "/metrics", enough, 20, "metrics with both devices' health")
        now_ms = time.time() * 1000
        ok, dead = m["devices"]["pump-01"], m["devices"]["pump-02"]
        for name, d in (("pump-01", ok), ("pump-02", dead)):
            if set(d) != KEYS:
                raise h.Failure("%s: keys %s, expected %s" % (name, sorted(d), sorted(KEYS)))
        if ok["errors"] != 0 or ok["backoff_ms"] != 0 or ok["latency_ms_p50"] is None:
            raise h.Failure("a healthy device: %r" % ok)
        if not 0 < ok["latency_ms_p50"] <= ok["latency_ms_p99"] < 300:
            raise h.Failure("latency of a healthy loopback device: %r" % ok)
        if not now_ms - 10000 < ok["last_ok_ts"] <= now_ms + 1000:
            raise h.Failure("last_ok_ts %r is not recent (now %d)" % (ok["last_ok_ts"], now_ms))
        # The silent unit: every read ran into its 300 ms timeout, and it backs off.
        if dead["polls"] != 0 or dead["last_ok_ts"] is not None or dead["backoff_ms"] <= 0:
            raise h.Failure("a silent device: %r" % dead)
        if dead["latency_ms_p50"] is None or dead["latency_ms_p50"] < 250:
            raise h.Failure("a silent device's reads should last its timeout: %r" % dead)
        # The top-level counters stay as they were.
        if m["polls"] < ok["polls"] or m["poll_errors"] < dead["errors"]:
            raise h.Failure("device counters exceed the totals: %r" % m)
        g.stop()


if __name__ == "__main__":
    DeviceHealthTest().run_all()
