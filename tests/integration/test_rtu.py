"""Modbus RTU over a serial line: socat makes a pty pair, simpul-sim serves RTU on one end and
simpul polls the other, two units on one bus (one connection, one worker)."""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"


class RtuTest(h.TestCase):
    def test_rtu_bus_poll_and_write(self):
        sim_tty, gw_tty = self.pty_pair()
        wlog = os.path.join(self.workdir, "writes.log")
        sim = h.Proc("sim-rtu", [h.SIMPUL_SIM, "--rtu", sim_tty, "--baud", "19200",
                                 "--pumps", "2", "--lights", "0", "--static",
                                 "--write-log", wlog], self.workdir)
        self.defer(sim.stop)
        h.wait_for(lambda: "listening" in sim.output(), 10, "simulator on the tty")
        b = self.broker()
        tags = [{"name": "speed_rpm", "table": "holding_register", "address": 10,
                 "type": "uint16", "writable": True, "min": 0, "max": 3000},
                {"name": "flow_m3h", "table": "input_register", "address": 0, "type": "float32",
                 "order": "CDAB"},
                {"name": "name", "table": "input_register", "address": 20, "type": "string",
                 "length": 8}]
        devs = [{"name": "pump-%02d" % u, "protocol": "modbus", "interval_ms": 300,
                 "connection": {"transport": "rtu", "device": gw_tty, "baud": 19200,
                                "unit_id": u, "timeout_ms": 500},
                 "tags": tags} for u in (1, 2)]
        cfg = h.base_config(self.workdir, b.port, devs)
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)
        d1 = sub.wait_json(P + "/pump-01/data", lambda j: "name" in j["values"], 20)
        d2 = sub.wait_json(P + "/pump-02/data", lambda j: "name" in j["values"], 20)
        assert d1["values"] == {"speed_rpm": 1450, "flow_m3h": 12.5, "name": "Dumai PS-01"}, d1
        assert d2["values"]["name"] == "Dumai PS-02" and d2["values"]["flow_m3h"] == 18.75, d2
        assert "devices on 1 connections" in g.proc.output()
        sub.publish(P + "/pump-02/cmd", json.dumps(
            {"id": "rtu-1", "op": "write", "tag": "speed_rpm", "value": 900}))
        r = sub.wait_json(P + "/pump-02/cmd/result", lambda j: j["id"] == "rtu-1", 10)
        assert r["ok"] is True and r["value"] == 900, r
        with open(wlog) as f:
            lines = [line.split() for line in f if line.strip()]
        assert [line[:5] for line in lines] == [["2", "6", "10", "1", "900"]], lines


if __name__ == "__main__":
    RtuTest().run_all()
