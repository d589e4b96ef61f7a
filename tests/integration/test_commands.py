"""Operator commands over MQTT, end to end, against real Modbus servers.

Writes are checked at the server, independently of simpul: the servers' write logs count the
writes they executed, and a separate Modbus client (pymodbus) reads the registers back.
"""
import json
import os
import signal
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402

P = "simpul/gw-test"


def peer_tags():
    return [
        {"name": "speed_rpm", "table": "holding_register", "address": 10, "type": "uint16",
         "writable": True, "min": 0, "max": 3000},
        {"name": "raw_sp", "table": "holding_register", "address": 11, "type": "uint16",
         "writable": True},
        {"name": "temp_sp", "table": "holding_register", "address": 12, "type": "int16",
         "scale": 0.1, "writable": True},
        {"name": "flow_sp", "table": "holding_register", "address": 14, "type": "float32",
         "order": "CDAB", "writable": True},
        {"name": "running", "table": "coil", "address": 0, "type": "bool", "writable": True},
        {"name": "flags_b3", "table": "holding_register", "address": 20, "type": "bool",
         "bit": 3, "writable": True},
        {"name": "label", "table": "holding_register", "address": 30, "type": "string",
         "length": 4, "writable": True},
        {"name": "flow", "table": "input_register", "address": 0, "type": "uint16"},
        {"name": "nowhere", "table": "holding_register", "address": 500, "type": "uint16",
         "writable": True},
    ]


PEER_SPEC = {
    "unit": 1,
    "sparse": True,
    "coils": {"0": 0},
    "holding_registers": {"10": 0, "11": 0, "12": 0, "13": 0, "14": 0, "15": 0, "20": 0x5AA5,
                          "30": [0, 0, 0, 0]},
    "input_registers": {"0": 42},
}


def device(name, port, unit=1, tags=None, interval=200, timeout=300):
    return {"name": name, "protocol": "modbus", "interval_ms": interval,
            "connection": {"transport": "tcp", "host": "127.0.0.1", "port": port,
                           "unit_id": unit, "timeout_ms": timeout},
            "tags": tags if tags is not None else peer_tags()}


def read_holding(port, address, count, unit=1):
    """Reads registers with pymodbus' own client: an observer independent of simpul."""
    from pymodbus.client import ModbusTcpClient
    c = ModbusTcpClient("127.0.0.1", port=port)
    assert c.connect()
    try:
        r = c.read_holding_registers(address, count, slave=unit)
        assert not r.isError(), r
        return list(r.registers)
    finally:
        c.close()


def read_coil(port, address, unit=1):
    from pymodbus.client import ModbusTcpClient
    c = ModbusTcpClient("127.0.0.1", port=port)
    assert c.connect()
    try:
        r = c.read_coils(address, 1, slave=unit)
        assert not r.isError(), r
        return bool(r.bits[0])
    finally:
        c.close()


def write_lines(path):
    try:
        with open(path) as f:
            return [line.split() for line in f if line.strip()]
    except FileNotFoundError:
        return []


class CommandsTest(h.TestCase):
    def setup_peer(self, extra_devices=()):
        self.b = self.broker()
        self.wlog = os.path.join(self.workdir, "writes.log")
        spec = dict(PEER_SPEC, write_log=self.wlog)
        self.pm = self.pymodbus(spec)
        cfg = h.base_config(self.workdir, self.b.port,
                            [device("pump-01", self.pm.port)] + list(extra_devices))
        self.cfg = cfg
        self.sub = self.subscriber(self.b.port, [P + "/#"])
        self.gw = self.gateway(cfg)
        self.sub.wait_json(P + "/pump-01/status", lambda j: j["state"] == "online", 20)
        return cfg

    def cmd(self, payload, device="pump-01", timeout=10):
        """Publishes a command and waits for its single answer (matched by id)."""
        if isinstance(payload, dict):
            cid = payload.get("id")
            raw = json.dumps(payload)
        else:
            cid = None
            raw = payload
        topic = "%s/%s/cmd/result" % (P, device)
        before = len(self.sub.messages(topic))
        self.sub.publish("%s/%s/cmd" % (P, device), raw)

        def answer():
            for j in self.sub.json(topic)[before:]:
                if j.get("id") == cid:
                    return j
            return None
        return h.wait_for(answer, timeout, "result of %r" % (cid,))

    def test_write_lands_and_is_confirmed(self):
        self.setup_peer()
        r = self.cmd({"id": "w1", "op": "write", "tag": "speed_rpm", "value": 1200})
        assert r["ok"] is True and r["value"] == 1200 and r["tag"] == "speed_rpm", r
        assert read_holding(self.pm.port, 10, 1) == [1200]
        assert [line[:5] for line in write_lines(self.wlog)] == [["1", "6", "10", "1", "1200"]]
        # The confirmed value shows up in a data message at once.
        self.sub.wait_json(P + "/pump-01/data", lambda j: j["values"].get("speed_rpm") == 1200, 5)
        # Scaled, float32, coil, string: each lands as the raw value the contract implies.
        r = self.cmd({"id": "w2", "op": "write", "tag": "temp_sp", "value": -12.5})
        assert r["ok"] and r["value"] == -12.5, r
        assert read_holding(self.pm.port, 12, 1) == [(-125) & 0xFFFF]
        r = self.cmd({"id": "w3", "op": "write", "tag": "flow_sp", "value": 12.5})
        assert r["ok"] and r["value"] == 12.5, r
        assert read_holding(self.pm.port, 14, 2) == [0x0000, 0x4148]
        r = self.cmd({"id": "w4", "op": "write", "tag": "running", "value": True})
        assert r["ok"] and r["value"] is True, r
        assert read_coil(self.pm.port, 0) is True
        r = self.cmd({"id": "w5", "op": "write", "tag": "label", "value": "PS-01"})
        assert r["ok"] and r["value"] == "PS-01", r
        assert read_holding(self.pm.port, 30, 4) == [0x5053, 0x2D30, 0x3100, 0x0000]

    def test_bit_write_keeps_other_bits(self):
        self.setup_peer()
        r = self.cmd({"id": "b1", "op": "write", "tag": "flags_b3", "value": True})
        assert r["ok"] is True and r["value"] is True, r
        assert read_holding(self.pm.port, 20, 1) == [0x5AA5 | 0x0008]
        r = self.cmd({"id": "b2", "op": "write", "tag": "flags_b3", "value": False})
        assert r["ok"] is True, r
        assert read_holding(self.pm.port, 20, 1) == [0x5AA5]

    def test_same_id_twice_writes_once(self):
        self.setup_peer()
        c = {"id": "dup-1", "op": "write", "tag": "raw_sp", "value": 77}
        r1 = self.cmd(c)
        r2 = self.cmd(c)
        assert r1 == r2, (r1, r2)
        assert r1["ok"] is True
        writes = [line for line in write_lines(self.wlog) if line[2] == "11"]
        assert len(writes) == 1, writes
        # Across a restart too: the result is kept in the store.
        self.gw.stop()
        self.sub.clear()
        self.gw = self.gateway(self.cfg, name="simpul2")
        # "online" is published after the command subscription, so commands are heard now.
        self.sub.wait_json(P + "/status", lambda j: j["state"] == "online", 20)
        r3 = self.cmd(c)
        assert r3 == r1, (r3, r1)
        writes = [line for line in write_lines(self.wlog) if line[2] == "11"]
        assert len(writes) == 1, writes
        def audit_codes():
            db = sqlite3.connect(self.cfg["store"]["path"], timeout=5)
            try:
                return [row[0] for row in db.execute(
                    "select code from audit where cmd_id='dup-1' order by id")]
            finally:
                db.close()
        # The audit row of an answer is committed in the store's next batch: wait for it.
        h.wait_for(lambda: len(audit_codes()) >= 3, 10, "three audit rows")
        assert audit_codes() == ["ok", "duplicate", "duplicate"], audit_codes()

    def test_error_codes(self):
        self.setup_peer()
        cases = [
            ({"id": "e1", "op": "write", "tag": "nope", "value": 1}, "pump-01", "unknown_tag"),
            ({"id": "e2", "op": "write", "tag": "flow", "value": 1}, "pump-01", "not_writable"),
            ({"id": "e3", "op": "write", "tag": "speed_rpm", "value": "fast"}, "pump-01",
             "type_mismatch"),
            ({"id": "e4", "op": "write", "tag": "speed_rpm", "value": 1.5}, "pump-01",
             "type_mismatch"),
            ({"id": "e5", "op": "write", "tag": "running", "value": 1}, "pump-01",
             "type_mismatch"),
            ({"id": "e6", "op": "write", "tag": "speed_rpm", "value": 4000}, "pump-01",
             "out_of_range"),
            ({"id": "e7", "op": "write", "tag": "raw_sp", "value": 70000}, "pump-01",
             "out_of_range"),
            ({"id": "e8", "op": "write", "tag": "temp_sp", "value": 4000}, "pump-01",
             "out_of_range"),
            ({"id": "e9", "op": "write", "tag": "speed_rpm", "value": 5, "ts": 1000,
              "ttl_ms": 10}, "pump-01", "expired"),
            ({"id": "e10", "op": "write", "tag": "nowhere", "value": 5}, "pump-01",
             "device_error"),
            ({"id": "e11", "op": "write", "tag": "speed_rpm", "value": 5}, "pump-99",
             "unknown_device"),
            ({"id": "e12", "op": "launch", "tag": "speed_rpm"}, "pump-01", "bad_request"),
        ]
        for c, dev, code in cases:
            r = self.cmd(c, device=dev)
            assert r["ok"] is False and r["error"]["code"] == code, (c, r)
            assert r["error"]["message"], r
        r = self.cmd({"id": "e10b", "op": "write", "tag": "nowhere", "value": 5})
        assert "illegal data address" in r["error"]["message"], r
        r = self.cmd({"id": "e6b", "op": "write", "tag": "speed_rpm", "value": 4000})
        assert r["error"]["message"] == "speed_rpm: 4000 > max 3000", r
        # Nothing above reached the device (e10's address does not exist: refused, not logged).
        assert write_lines(self.wlog) == [], write_lines(self.wlog)
        def audit_rows():
            db = sqlite3.connect(self.cfg["store"]["path"], timeout=5)
            try:
                return db.execute("select count(*) from audit").fetchone()[0]
            finally:
                db.close()
        # An answer is published before the store's next batch commits its audit row.
        h.wait_for(lambda: audit_rows() >= len(cases) + 2, 10, "an audit row per command")

    def test_read(self):
        self.setup_peer()
        r = self.cmd({"id": "r1", "op": "read", "tags": ["flow", "speed_rpm"]})
        assert r["ok"] is True and r["values"] == {"flow": 42, "speed_rpm": 0}, r
        r = self.cmd({"id": "r2", "op": "read", "tags": ["flow", "ghost"]})
        assert r["ok"] is False and r["error"]["code"] == "unknown_tag", r

    def test_malformed_payloads(self):
        self.setup_peer()
        bad = [
            b"not json at all",
            b"\x00\xff\xfe binary \x01",
            b"[" * 50000 + b"]" * 50000,
            b'{"id":"m1","op":"write","tag":"speed_rpm","value":{"deep":[1,[2,[3]]]}}',
            b'{"id":"m2","op":"write","tag":7,"value":1}',
            b'{"id":"m3","op":"read","tags":"speed_rpm"}',
            b'{"id":"m4","op":"write","tag":"speed_rpm","value":1,"ts":"yesterday"}',
            b'{"id":"m5","op":"write","tag":"speed_rpm","value":1,"sneaky":true}',
            b'{"id":"m6","op":"write","tag":"speed_rpm","value":' + b"9" * 70000 + b"}",
            b"{}",
            b"",
        ]
        topic = P + "/pump-01/cmd/result"
        for raw in bad:
            before = len(self.sub.messages(topic))
            self.sub.publish(P + "/pump-01/cmd", raw)
            got = h.wait_for(lambda: self.sub.json(topic)[before:], 10, "answer to %r" % raw[:40])
            assert len(got) == 1 and got[0]["ok"] is False, got
            assert got[0]["error"]["code"] == "bad_request", (raw[:60], got)
        ids = [j["id"] for j in self.sub.json(topic)]
        assert ids[3:8] == ["m1", "m2", "m3", "m4", "m5"], ids
        assert ids[0] is None and ids[1] is None
        # Still alive and still writing.
        r = self.cmd({"id": "after", "op": "write", "tag": "raw_sp", "value": 5})
        assert r["ok"] is True, r
        assert write_lines(self.wlog)[0][:5] == ["1", "6", "11", "1", "5"]

    def test_offline_device_is_refused_and_never_written_later(self):
        self.setup_peer()
        self.pm.stop()
        self.sub.wait_json(P + "/pump-01/status", lambda j: j["state"] == "offline", 20)
        r = self.cmd({"id": "off-1", "op": "write", "tag": "raw_sp", "value": 9})
        assert r["ok"] is False and r["error"]["code"] == "device_offline", r
        # Bring the device back: the refused write must never happen.
        # Cleared first: the device may be back online before start() returns.
        self.sub.clear()
        pm2 = h.PyModbus(self.workdir, dict(PEER_SPEC, write_log=self.wlog), self.pm.port).start()
        self.defer(pm2.stop)
        self.sub.wait_json(P + "/pump-01/status", lambda j: j["state"] == "online", 40)
        self.sub.wait_json(P + "/pump-01/data", lambda j: True, 10)
        assert write_lines(self.wlog) == [], write_lines(self.wlog)

    def test_timeout_and_busy(self):
        self.b = self.broker()
        wlog = os.path.join(self.workdir, "sim-writes.log")
        sim = self.sim(["--pumps", "1", "--lights", "0", "--static", "--write-log", wlog,
                        "--fail-unit", "1"])
        # SIGUSR1 toggles the --fail-unit units between silent and answering (simulator.md).
        sim.proc.signal(signal.SIGUSR1)
        h.wait_for(lambda: "now answering" in sim.proc.output(), 10, "unit 1 answering")
        tags = [{"name": "speed_rpm", "table": "holding_register", "address": 10,
                 "type": "uint16", "writable": True}]
        cfg = h.base_config(self.workdir, self.b.port,
                            [device("pump-01", sim.port, tags=tags, interval=100, timeout=400)])
        self.sub = self.subscriber(self.b.port, [P + "/#"])
        self.gateway(cfg)
        self.sub.wait_json(P + "/pump-01/status", lambda j: j["state"] == "online", 20)
        sim.proc.signal(signal.SIGUSR1)
        h.wait_for(lambda: "now silent" in sim.proc.output(), 10, "unit 1 silent")
        topic = P + "/pump-01/cmd/result"
        for k in range(24):
            self.sub.publish(P + "/pump-01/cmd", json.dumps(
                {"id": "t%d" % k, "op": "write", "tag": "speed_rpm", "value": 100 + k}))
        h.wait_for(lambda: len(self.sub.json(topic)) >= 24, 60, "24 answers")
        codes = [j["error"]["code"] for j in self.sub.json(topic) if not j["ok"]]
        assert "timeout" in codes, codes
        assert "busy" in codes, codes
        assert len(self.sub.json(topic)) == 24

    def test_100_concurrent_commands_to_10_devices(self):
        self.b = self.broker()
        wlog = os.path.join(self.workdir, "sim-writes.log")
        sim = self.sim(["--pumps", "10", "--lights", "0", "--static", "--write-log", wlog])
        tags = [{"name": "speed_rpm", "table": "holding_register", "address": 10,
                 "type": "uint16", "writable": True, "min": 0, "max": 3000}]
        devs = [device("pump-%02d" % u, sim.port, unit=u, tags=tags, interval=500)
                for u in range(1, 11)]
        cfg = h.base_config(self.workdir, self.b.port, devs)
        self.sub = self.subscriber(self.b.port, [P + "/+/cmd/result", P + "/+/status"])
        self.gateway(cfg)
        for u in range(1, 11):
            self.sub.wait_json(P + "/pump-%02d/status" % u, lambda j: j["state"] == "online", 20)
        # 10 commands per device, interleaved, published as fast as paho queues them.
        for k in range(10):
            for u in range(1, 11):
                self.sub.c.publish(P + "/pump-%02d/cmd" % u, json.dumps(
                    {"id": "c-%d-%d" % (u, k), "op": "write", "tag": "speed_rpm",
                     "value": 1000 + u * 10 + k}), qos=1)
        results = lambda: [m for m in self.sub.messages() if m[0].endswith("/cmd/result")]  # noqa
        h.wait_for(lambda: len(results()) >= 100, 60, "100 results")
        ids = [json.loads(m[1])["id"] for m in results()]
        assert sorted(ids) == sorted("c-%d-%d" % (u, k) for u in range(1, 11)
                                     for k in range(10)), "each exactly once"
        assert all(json.loads(m[1])["ok"] for m in results()), results()[:3]
        writes = [w for w in write_lines(wlog) if w[-1] == "ok"]
        assert len(writes) == 100, len(writes)
        # The last write per device is the one that stands.
        for u in range(1, 11):
            mine = [w for w in writes if w[0] == str(u)]
            assert mine[-1][4] == str(1000 + u * 10 + 9), mine[-1]

    def test_mqtt5_response_topic_and_correlation(self):
        self.b = self.broker()
        self.pm = self.pymodbus(dict(PEER_SPEC))
        cfg = h.base_config(self.workdir, self.b.port, [device("pump-01", self.pm.port)],
                            mqtt_extra={"version": "5"})
        self.sub = self.subscriber(self.b.port, [P + "/#"], protocol=mqtt.MQTTv5)
        self.gateway(cfg)
        self.sub.wait_json(P + "/pump-01/status", lambda j: j["state"] == "online", 20)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = P + "/reply/op-7"
        props.CorrelationData = b"\x01corr-42"
        self.sub.publish(P + "/pump-01/cmd", json.dumps(
            {"id": "v5", "op": "write", "tag": "raw_sp", "value": 3}), properties=props)
        m = h.wait_for(lambda: self.sub.messages(P + "/reply/op-7"), 10,
                       "reply on response topic")
        j = json.loads(m[0][1])
        assert j["id"] == "v5" and j["ok"] is True, j
        assert m[0][3].CorrelationData == b"\x01corr-42", m[0][3]
        assert not self.sub.messages(P + "/pump-01/cmd/result")


if __name__ == "__main__":
    CommandsTest().run_all()
