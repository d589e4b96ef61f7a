"""Buses that come and go while simpul runs: a serial port (a socat pty, as a USB RS-485 adapter
that is unplugged and plugged back) deleted and re-created, and an RTU-over-TCP serial server
that drops its connection and comes back. Polling resumes without a restart; the device goes
offline, then online, with one log line each way."""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
TAGS = [{"name": "speed_rpm", "table": "holding_register", "address": 10, "type": "uint16"},
        {"name": "heartbeat", "table": "input_register", "address": 30, "type": "uint32"}]


def lines(g, device, word):
    return [x for x in g.proc.output().splitlines()
            if "[modbus:%s]" % device in x and word in x and " debug " not in x]


class BusComesBackTest(h.TestCase):
    def start_serial(self, socat, sim_tty, gw_tty):
        pty = h.Proc("socat", [socat, "-d", "-d", "pty,raw,echo=0,link=" + sim_tty,
                               "pty,raw,echo=0,link=" + gw_tty], self.workdir)
        h.wait_for(lambda: os.path.exists(sim_tty) and os.path.exists(gw_tty), 10, "pty pair")
        sim = h.Proc("sim-rtu", [h.SIMPUL_SIM, "--rtu", sim_tty, "--baud", "19200",
                                 "--pumps", "1", "--lights", "0", "--static", "--counter"],
                     self.workdir)
        h.wait_for(lambda: "listening" in sim.output(), 10, "simulator on the tty")
        return pty, sim

    def assert_comes_back(self, sub, g, device, interrupt, restore):
        sub.wait_json(P + "/%s/status" % device, lambda j: j["state"] == "online", 20)
        sub.wait_json(P + "/%s/data" % device, lambda j: "heartbeat" in j["values"], 20)
        interrupt()
        sub.wait_json(P + "/%s/status" % device, lambda j: j["state"] == "offline", 20)
        restore()
        sub.clear()
        sub.wait_json(P + "/%s/status" % device, lambda j: j["state"] == "online", 40)
        sub.wait_json(P + "/%s/data" % device, lambda j: "heartbeat" in j["values"], 20)
        assert len(lines(g, device, "offline")) == 1, lines(g, device, "offline")
        assert len(lines(g, device, "online again")) == 1, lines(g, device, "online")

    def test_serial_port_deleted_and_recreated(self):
        socat = shutil.which("socat")
        assert socat, "socat is required (scripts/install-deps.sh installs it)"
        sim_tty = os.path.join(self.workdir, "sim-tty")
        gw_tty = os.path.join(self.workdir, "gw-tty")
        procs = list(self.start_serial(socat, sim_tty, gw_tty))
        self.defer(lambda: [p.stop() for p in procs])
        b = self.broker()
        devs = [{"name": "pump-01", "protocol": "modbus", "interval_ms": 200,
                 "connection": {"transport": "rtu", "device": gw_tty, "baud": 19200,
                                "unit_id": 1, "timeout_ms": 300},
                 "tags": TAGS}]
        cfg = h.base_config(self.workdir, b.port, devs)
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)

        def unplug():
            for p in procs:
                p.stop()
            h.wait_for(lambda: not os.path.lexists(gw_tty), 10, "the pty gone")
            # Stay unplugged until simpul has tried to reopen the port and failed.
            h.wait_for(lambda: "No such file or directory" in g.proc.output(), 20,
                       "a failed reopen")

        def plug_back():
            procs[:] = self.start_serial(socat, sim_tty, gw_tty)

        self.assert_comes_back(sub, g, "pump-01", unplug, plug_back)
        assert g.stop() == 0

    def test_rtu_tcp_server_drops_and_returns(self):
        sim = self.sim(["--rtu-tcp", "--pumps", "1", "--lights", "0", "--static", "--counter"])
        b = self.broker()
        devs = [{"name": "pump-01", "protocol": "modbus", "interval_ms": 200,
                 "connection": {"transport": "rtu_tcp", "host": "127.0.0.1", "port": sim.port,
                                "unit_id": 1, "timeout_ms": 300},
                 "tags": TAGS}]
        cfg = h.base_config(self.workdir, b.port, devs)
        cfg["gateway"]["metrics_interval_s"] = 1
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)
        def drop():
            sim.stop()
            h.wait_for(lambda: "Connection refused" in g.proc.output(), 20, "a failed reconnect")

        self.assert_comes_back(sub, g, "pump-01", drop, sim.start)
        key = "rtu_tcp:127.0.0.1:%d" % sim.port
        m = sub.wait_json(P + "/metrics", lambda j: j["connections"][key]["reconnects"] >= 1, 10)
        assert m["connections"][key]["crc_errors"] == 0, m
        assert g.stop() == 0


if __name__ == "__main__":
    BusComesBackTest().run_all()
