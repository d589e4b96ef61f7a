"""Modbus RTU over TCP (transport rtu_tcp): RTU frames with their CRC over a TCP socket, as a
transparent serial server (Moxa NPort, USR-TCP232) carries them.

- simpul-sim's RTU-over-TCP mode: several unit ids on one line, a write confirmed in the
  simulator's write log, CRC errors injected and counted, and a dead unit whose neighbours keep
  their schedule (the jitter is measured and printed);
- socat (TCP listener <-> pty) in front of Debian's pymodbus RTU server: the independent stack;
- a reply that comes after its request timed out is drained, never taken as the answer to the
  next request (issue #8 item 5): a bit write's read-modify-write writes the right bits.
"""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
INTERVAL_MS = 200
TIMEOUT_MS = 300

PUMP_TAGS = [
    {"name": "speed_rpm", "table": "holding_register", "address": 10, "type": "uint16",
     "writable": True, "min": 0, "max": 3000},
    {"name": "flow_m3h", "table": "input_register", "address": 0, "type": "float32",
     "order": "CDAB"},
    {"name": "name", "table": "input_register", "address": 20, "type": "string", "length": 8},
    {"name": "heartbeat", "table": "input_register", "address": 30, "type": "uint32"},
]


def rtu_tcp_device(name, port, unit, tags, interval_ms=INTERVAL_MS, **conn):
    c = {"transport": "rtu_tcp", "host": "127.0.0.1", "port": port, "unit_id": unit,
         "timeout_ms": TIMEOUT_MS}
    c.update(conn)
    return {"name": name, "protocol": "modbus", "interval_ms": interval_ms, "connection": c,
            "tags": tags}


def write_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.split() for line in f if line.strip()]


def schedule(data_msgs):
    """Gaps between consecutive polls of one device, in ms, from the data messages' ts."""
    ts = sorted(j["ts"] for j in data_msgs)
    return [b - a for a, b in zip(ts, ts[1:])]


def percentile(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class RtuTcpTest(h.TestCase):
    def test_sim_units_write_crc_errors_and_a_dead_unit(self):
        wlog = os.path.join(self.workdir, "writes.log")
        # Unit 3 never answers; every 4th reply to unit 2 has a broken CRC. --counter makes
        # the heartbeat change on every read, so every poll publishes and shows its time.
        sim = self.sim(["--rtu-tcp", "--pumps", "3", "--lights", "0", "--static", "--counter",
                        "--write-log", wlog, "--fail-unit", "3", "--fault", "crc:2:4", "-v"])
        b = self.broker()
        devs = [rtu_tcp_device("pump-%02d" % u, sim.port, u, PUMP_TAGS) for u in (1, 2, 3)]
        cfg = h.base_config(self.workdir, b.port, devs)
        cfg["gateway"]["metrics_interval_s"] = 1
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)

        d1 = sub.wait_json(P + "/pump-01/data", lambda j: "name" in j["values"], 20)
        assert d1["values"]["name"] == "Dumai PS-01" and d1["values"]["speed_rpm"] == 1450, d1
        assert d1["values"]["flow_m3h"] == 12.5, d1
        d2 = sub.wait_json(P + "/pump-02/data", lambda j: "name" in j["values"], 20)
        assert d2["values"]["name"] == "Dumai PS-02" and d2["values"]["flow_m3h"] == 18.75, d2
        assert "3 devices on 1 connections" in g.proc.output(), g.proc.output()[-2000:]
        st3 = sub.wait_json(P + "/pump-03/status", lambda j: j["state"] == "offline", 20)
        assert st3.get("error") == "timeout", st3

        # A write through the shared line, confirmed by the device's own log.
        sub.publish(P + "/pump-01/cmd", json.dumps(
            {"id": "w-1", "op": "write", "tag": "speed_rpm", "value": 900}))
        r = sub.wait_json(P + "/pump-01/cmd/result", lambda j: j["id"] == "w-1", 10)
        assert r["ok"] is True and r["value"] == 900, r
        assert [x[:5] for x in write_log(wlog)] == [["1", "6", "10", "1", "900"]], write_log(wlog)

        # Live units beside the dead one: measure their schedule over a few backoff periods.
        sub.clear()
        h.wait_for(lambda: len(sub.json(P + "/pump-01/data")) >= 40, 30, "40 polls of pump-01")
        gaps = schedule(sub.json(P + "/pump-01/data"))
        dead_tries = g.proc.output().count("[modbus:pump-03]")
        p50, p99, worst = percentile(gaps, 0.5), percentile(gaps, 0.99), max(gaps)
        print("rtu_tcp schedule of pump-01 (interval %d ms, dead unit 3 with timeout %d ms): "
              "%d gaps, p50 %d ms, p99 %d ms, max %d ms, jitter (max - interval) %d ms"
              % (INTERVAL_MS, TIMEOUT_MS, len(gaps), p50, p99, worst, worst - INTERVAL_MS))
        assert dead_tries > 0
        assert abs(p50 - INTERVAL_MS) <= 60, gaps
        # A dead unit costs its neighbours at most one timeout per backoff period (the drain
        # after it waits only before that unit's own next request), never a stall per poll.
        assert worst <= INTERVAL_MS + TIMEOUT_MS + 120, gaps
        late = [x for x in gaps if x > INTERVAL_MS + 100]
        assert len(late) <= len(gaps) // 4, gaps

        # The injected CRC errors: counted, logged, never fatal (pump-02 stays online).
        def crc_count():
            m = sub.json(P + "/metrics")
            conn = m[-1].get("connections", {}).get("rtu_tcp:127.0.0.1:%d" % sim.port) if m else None
            return conn["crc_errors"] if conn else 0
        h.wait_for(lambda: crc_count() > 0, 10, "crc_errors in the metrics")
        assert "CRC error in the reply" in g.proc.output()
        states = [j["state"] for j in sub.json(P + "/pump-02/status")]
        assert "offline" not in states, states
        assert g.stop() == 0

    def test_pymodbus_rtu_server_behind_socat(self):
        socat = shutil.which("socat")
        assert socat, "socat is required (scripts/install-deps.sh installs it)"
        tty = os.path.join(self.workdir, "tty")
        port = h.free_port()
        # The pty first, so it exists before a client connects (docs: shared notes).
        bridge = h.Proc("socat", [socat, "-d", "-d", "pty,raw,echo=0,link=" + tty,
                                  "TCP-LISTEN:%d,bind=127.0.0.1,reuseaddr" % port],
                        self.workdir)
        self.defer(bridge.stop)
        h.wait_for(lambda: os.path.exists(tty), 10, "socat pty")
        wlog = os.path.join(self.workdir, "pymodbus-writes.log")
        spec = {"units": {"1": {"holding_registers": {"10": 1450, "11": 5},
                                "input_registers": {"0": [0, 16712]}},
                          "2": {"holding_registers": {"10": 2175, "11": 7},
                                "input_registers": {"0": [0, 16790]}}},
                "ignore_missing_units": True, "write_log": wlog}
        spec_path = os.path.join(self.workdir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        srv = h.Proc("pymodbus-rtu", ["/usr/bin/python3",
                                      os.path.join(h.HERE, "pymodbus_server.py"),
                                      "--rtu", tty, "--baud", "19200", "--spec", spec_path],
                     self.workdir)
        self.defer(srv.stop)
        h.wait_for(lambda: "listening" in srv.output(), 20, "pymodbus on the pty")
        b = self.broker()
        tags = [{"name": "speed_rpm", "table": "holding_register", "address": 10,
                 "type": "uint16", "writable": True},
                {"name": "ramp_s", "table": "holding_register", "address": 11, "type": "uint16"},
                {"name": "flow", "table": "input_register", "address": 0, "type": "float32",
                 "order": "CDAB"}]
        devs = [rtu_tcp_device("pump-%02d" % u, port, u, tags, interval_ms=300) for u in (1, 2, 3)]
        cfg = h.base_config(self.workdir, b.port, devs)
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)
        d1 = sub.wait_json(P + "/pump-01/data", lambda j: "flow" in j["values"], 20)
        d2 = sub.wait_json(P + "/pump-02/data", lambda j: "flow" in j["values"], 20)
        assert d1["values"] == {"speed_rpm": 1450, "ramp_s": 5, "flow": 12.5}, d1
        assert d2["values"] == {"speed_rpm": 2175, "ramp_s": 7, "flow": 18.75}, d2
        sub.wait_json(P + "/pump-03/status", lambda j: j["state"] == "offline", 20)
        sub.publish(P + "/pump-02/cmd", json.dumps(
            {"id": "pw-1", "op": "write", "tag": "speed_rpm", "value": 1200}))
        r = sub.wait_json(P + "/pump-02/cmd/result", lambda j: j["id"] == "pw-1", 10)
        assert r["ok"] is True and r["value"] == 1200, r
        assert [x[:5] for x in write_log(wlog)] == [["2", "6", "10", "1", "1200"]], write_log(wlog)
        assert g.stop() == 0

    def late_reply_case(self, sim_output, wlog, conn):
        """A poll reply held back past the timeout, then a bit write: the right bits written."""
        b = self.broker()
        # One register per request, so the late reply (FC3, 1 register, 1450) looks exactly
        # like the answer to the bit write's read of register 11 (FC3, 1 register, 5).
        tags = [{"name": "speed_rpm", "table": "holding_register", "address": 10,
                 "type": "uint16"},
                {"name": "ramp_bit1", "table": "holding_register", "address": 11,
                 "type": "bool", "bit": 1, "writable": True}]
        devs = []
        for u in (1, 2):
            c = dict(conn, unit_id=u, timeout_ms=TIMEOUT_MS, max_regs_per_request=1)
            devs.append({"name": "pump-%02d" % u, "protocol": "modbus", "interval_ms": 250,
                         "connection": c, "tags": tags})
        cfg = h.base_config(self.workdir, b.port, devs)
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)
        sub.wait_json(P + "/pump-02/data", lambda j: "speed_rpm" in j["values"], 20)
        # A command answered proves the gateway hears commands before the real test starts.
        sub.publish(P + "/pump-02/cmd", json.dumps(
            {"id": "ready", "op": "write", "tag": "ramp_bit1", "value": False}))
        sub.wait_json(P + "/pump-02/cmd/result", lambda j: j["id"] == "ready", 10)

        def delayed():
            return sim_output().count("unit 1 fc 3: reply delayed")
        # The device must be online when the command comes (an offline one is refused).
        h.wait_for(lambda: sub.json(P + "/pump-01/status")[-1]["state"] == "online", 20,
                   "pump-01 online")
        seen = delayed()
        h.wait_for(lambda: delayed() > seen, 40, "a delayed poll of unit 1 on the wire")
        # The poll is waiting for its (late) reply: the command queues right behind it.
        sub.publish(P + "/pump-01/cmd", json.dumps(
            {"id": "bit-1", "op": "write", "tag": "ramp_bit1", "value": True}))
        r = sub.wait_json(P + "/pump-01/cmd/result", lambda j: j["id"] == "bit-1", 10)
        unit1 = [x[:5] for x in write_log(wlog) if x[0] == "1"]
        # ramp_s is 5 (0b101): setting bit 1 must write 7. Taking the late 1450 (0x05AA) as
        # register 11 would write 1450 instead.
        assert unit1 == [["1", "6", "11", "1", "7"]], (unit1, r)
        assert r["ok"] is True and r["value"] is True, r
        assert g.stop() == 0

    # Every 4th reply to a read of unit 1's holding register 10 comes 400 ms after the request:
    # 100 ms after simpul's 300 ms timeout, when the next request may already be out.
    LATE = ["--pumps", "2", "--lights", "0", "--static", "--delay",
            "1:holding_register:10:400:4", "-v"]

    def test_late_reply_is_drained_before_a_bit_write(self):
        wlog = os.path.join(self.workdir, "writes.log")
        sim = self.sim(["--rtu-tcp", "--write-log", wlog] + self.LATE)
        self.late_reply_case(sim.proc.output, wlog,
                             {"transport": "rtu_tcp", "host": "127.0.0.1", "port": sim.port})

    def test_late_reply_is_drained_on_a_serial_line(self):
        sim_tty, gw_tty = self.pty_pair()
        wlog = os.path.join(self.workdir, "writes.log")
        sim = h.Proc("sim-rtu", [h.SIMPUL_SIM, "--rtu", sim_tty, "--baud", "19200",
                                 "--write-log", wlog] + self.LATE, self.workdir)
        self.defer(sim.stop)
        h.wait_for(lambda: "listening" in sim.output(), 10, "simulator on the tty")
        self.late_reply_case(sim.output, wlog,
                             {"transport": "rtu", "device": gw_tty, "baud": 19200})

    def test_over_subscribed_bus_is_named(self):
        # Each reply takes 60 ms; two units polled every 50 ms need 240 % of the line's time.
        sim = self.sim(["--rtu-tcp", "--pumps", "2", "--lights", "0", "--static",
                        "--delay", "1:any:0-65535:60", "--delay", "2:any:0-65535:60"])
        b = self.broker()
        tags = [{"name": "speed_rpm", "table": "holding_register", "address": 10,
                 "type": "uint16"}]
        devs = [rtu_tcp_device("pump-%02d" % u, sim.port, u, tags, interval_ms=50,
                               timeout_ms=1000) for u in (1, 2)]
        cfg = h.base_config(self.workdir, b.port, devs)
        cfg["gateway"]["metrics_interval_s"] = 2
        sub = self.subscriber(b.port, [P + "/metrics"])
        g = self.gateway(cfg)
        key = "rtu_tcp:127.0.0.1:%d" % sim.port
        h.wait_for(lambda: "bus %s is over-subscribed" % key in g.proc.output(), 20,
                   "the over-subscription warning")
        out = g.proc.output()
        line = [x for x in out.splitlines() if "is over-subscribed" in x]
        assert len(line) == 1 and "% over" in line[0], line
        m = sub.wait_json(P + "/metrics", lambda j: j["connections"][key]["over_subscribed"], 10)
        c = m["connections"][key]
        assert c["utilisation"] >= 0.9 and c["overruns"] > 0, c
        assert 10 <= c["requests_per_s"] <= 20, c  # one 60 ms request at a time
        assert c["crc_errors"] == 0 and c["framing_errors"] == 0, c
        assert g.stop() == 0


if __name__ == "__main__":
    RtuTcpTest().run_all()
