"""Polling end to end: Modbus TCP devices -> simpul -> real mosquitto -> a real subscriber.

The independent peer is Debian's pymodbus serving known register values; every type and byte
order of the contract must decode to the expected JSON value. simpul-sim provides changing
values, for seq and for devices sharing one connection.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

# Holding registers laid out by hand from the contract's byte-order rules.
HOLDING = {
    0: 0xFFFE,                                   # int16 -2
    1: 0xFFFF,                                   # uint16 65535
    2: 0xFFFE, 3: 0x7960,                        # int32 ABCD -100000
    4: 0x5E00, 5: 0xB2D0,                        # uint32 CDAB 3000000000 (0xB2D05E00)
    6: 0xFFFF, 7: 0xFFFF, 8: 0xFFFF, 9: 0xFFFB,  # int64 ABCD -5
    10: 0x0807, 11: 0x0605, 12: 0x0403, 13: 0x0201,  # uint64 DCBA 0x0102030405060708
    14: 0x0000, 15: 0x4148,                      # float32 CDAB 12.5
    16: 0xCC3D, 17: 0xCDCC,                      # float32 BADC 0.1 (0x3DCCCCCD)
    18: 0x4005, 19: 0xBF0A, 20: 0x8B14, 21: 0x5769,  # float64 ABCD e
    22: 0x0000, 23: 0xC0BF,                      # float32 DCBA -1.5 (0xBFC00000)
    24: 0x4475, 25: 0x6D61, 26: 0x6900, 27: 0x0000,  # string "Dumai" (4 registers)
    28: 0x0008,                                  # bit 3 set, bit 2 clear
    29: 1234,                                    # uint16, scale 0.1 -> 123.4
    30: 0x0708, 31: 0x0506, 32: 0x0304, 33: 0x0102,  # uint64 CDAB (GHEFCDAB)
    34: 0x0201, 35: 0x0403, 36: 0x0605, 37: 0x0807,  # uint64 BADC (BADCFEHG)
    38: 0x7544, 39: 0x616D, 40: 0x0069,          # string BADC "Dumai" (3 registers)
    41: 0,                                       # bool from a whole register: false
    42: 0x4148, 43: 0x0000,                      # float32 ABCD 12.5
}
SPEC = {
    "unit": 1,
    "coils": {"0": 1, "1": 0},
    "discrete_inputs": {"0": 1},
    "holding_registers": {str(k): v for k, v in HOLDING.items()},
    "input_registers": {"0": 0x1234},
}
TAGS = [
    ("i16", "holding_register", 0, "int16", {}, -2),
    ("u16", "holding_register", 1, "uint16", {}, 65535),
    ("i32", "holding_register", 2, "int32", {}, -100000),
    ("u32_cdab", "holding_register", 4, "uint32", {"order": "CDAB"}, 3000000000),
    ("i64", "holding_register", 6, "int64", {}, -5),
    ("u64_dcba", "holding_register", 10, "uint64", {"order": "DCBA"}, 72623859790382856),
    ("f32_cdab", "holding_register", 14, "float32", {"order": "CDAB"}, 12.5),
    ("f32_badc", "holding_register", 16, "float32", {"order": "BADC"}, 0.1),
    ("f64", "holding_register", 18, "float64", {}, 2.718281828459045),
    ("f32_dcba", "holding_register", 22, "float32", {"order": "DCBA"}, -1.5),
    ("name", "holding_register", 24, "string", {"length": 4}, "Dumai"),
    ("bit3", "holding_register", 28, "bool", {"bit": 3}, True),
    ("bit2", "holding_register", 28, "bool", {"bit": 2}, False),
    ("scaled", "holding_register", 29, "uint16", {"scale": 0.1}, 123.4),
    ("u64_cdab", "holding_register", 30, "uint64", {"order": "CDAB"}, 72623859790382856),
    ("u64_badc", "holding_register", 34, "uint64", {"order": "BADC"}, 72623859790382856),
    ("name_badc", "holding_register", 38, "string", {"length": 3, "order": "BADC"}, "Dumai"),
    ("reg_bool", "holding_register", 41, "bool", {}, False),
    ("f32_abcd", "holding_register", 42, "float32", {}, 12.5),
    ("coil0", "coil", 0, "bool", {}, True),
    ("coil1", "coil", 1, "bool", {}, False),
    ("di0", "discrete_input", 0, "bool", {}, True),
    ("ir0", "input_register", 0, "uint16", {}, 4660),
]


def tag_defs():
    out = []
    for name, table, addr, typ, extra, _ in TAGS:
        t = {"name": name, "table": table, "address": addr, "type": typ}
        t.update(extra)
        out.append(t)
    return out


class PollingTest(h.TestCase):
    def test_every_type_and_order_decodes(self):
        b = self.broker()
        pm = self.pymodbus(SPEC)
        dev = {"name": "peer-01", "protocol": "modbus", "interval_ms": 200,
               "connection": {"transport": "tcp", "host": "127.0.0.1", "port": pm.port,
                              "unit_id": 1, "timeout_ms": 500},
               "tags": tag_defs()}
        cfg = h.base_config(self.workdir, b.port, [dev])
        sub = self.subscriber(b.port, ["simpul/gw-test/#"])
        self.gateway(cfg)
        msg = sub.wait_json("simpul/gw-test/peer-01/data", lambda j: "values" in j, 20,
                            "first data message")
        want = {t[0]: t[5] for t in TAGS}
        got = msg["values"]
        assert set(got) == set(want), "tags: got %s" % sorted(got)
        for k, v in want.items():
            if isinstance(v, float):
                assert isinstance(got[k], (int, float)) and abs(got[k] - v) < 1e-12, (k, got[k], v)
            else:
                assert got[k] == v and type(got[k]) is type(v), (k, got[k], v)
        assert "errors" not in msg, msg
        assert msg["seq"] >= 1 and isinstance(msg["ts"], int)
        # The raw payload must print 0.1 and 12.5 exactly so (shortest float32 text).
        raw = [m[1] for m in sub.messages("simpul/gw-test/peer-01/data")][0].decode()
        assert '"f32_badc":0.1' in raw and '"f32_cdab":12.5' in raw, raw
        assert '"u64_dcba":72623859790382856' in raw, raw
        st = sub.wait_json("simpul/gw-test/peer-01/status", lambda j: j["state"] == "online", 10)
        assert isinstance(st["ts"], int)
        gw = sub.wait_json("simpul/gw-test/status", lambda j: j["state"] == "online", 10)
        assert gw["version"]

    def test_errors_reported_per_tag(self):
        b = self.broker()
        pm = self.pymodbus(dict(SPEC, sparse=True))  # unlisted addresses: illegal data address
        tags = [{"name": "ok", "table": "holding_register", "address": 1, "type": "uint16"},
                {"name": "missing", "table": "holding_register", "address": 9000,
                 "type": "uint16"}]
        dev = {"name": "peer-02", "protocol": "modbus", "interval_ms": 200,
               "connection": {"transport": "tcp", "host": "127.0.0.1", "port": pm.port,
                              "unit_id": 1, "timeout_ms": 500}, "tags": tags}
        cfg = h.base_config(self.workdir, b.port, [dev])
        sub = self.subscriber(b.port, ["simpul/gw-test/#"])
        self.gateway(cfg)
        msg = sub.wait_json("simpul/gw-test/peer-02/data", lambda j: "errors" in j, 20)
        assert msg["values"] == {"ok": 65535}, msg
        assert "illegal data address" in msg["errors"]["missing"], msg

    def test_seq_increases_by_one_on_shared_connection(self):
        b = self.broker()
        sim = self.sim(["--pumps", "2", "--lights", "0"])
        devs = []
        for n, unit in (("pump-a", 1), ("pump-b", 2)):
            devs.append({"name": n, "protocol": "modbus", "interval_ms": 100,
                         "connection": {"transport": "tcp", "host": "127.0.0.1",
                                        "port": sim.port, "unit_id": unit, "timeout_ms": 500},
                         "tags": [{"name": "tick", "table": "input_register",
                                   "address": SIM_TICK_ADDR, "type": "uint32"}]})
        cfg = h.base_config(self.workdir, b.port, devs)
        sub = self.subscriber(b.port, ["simpul/gw-test/+/data"])
        self.gateway(cfg)
        for n in ("pump-a", "pump-b"):
            topic = "simpul/gw-test/%s/data" % n
            h.wait_for(lambda: len(sub.messages(topic)) >= 10, 20, "10 messages from " + n)
            seqs = [j["seq"] for j in sub.json(topic)]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


    def test_per_tag_interval(self):
        b = self.broker()
        sim = self.sim(["--pumps", "1", "--lights", "0"])
        dev = {"name": "pump-a", "protocol": "modbus", "interval_ms": 100,
               "connection": {"transport": "tcp", "host": "127.0.0.1", "port": sim.port,
                              "unit_id": 1, "timeout_ms": 500},
               "tags": [{"name": "fast", "table": "input_register", "address": SIM_TICK_ADDR,
                         "type": "uint32"},
                        {"name": "slow", "table": "input_register", "address": SIM_TICK_ADDR,
                         "type": "uint32", "interval_ms": 1000}]}
        cfg = h.base_config(self.workdir, b.port, [dev])
        topic = "simpul/gw-test/pump-a/data"
        sub = self.subscriber(b.port, [topic])
        self.gateway(cfg)
        h.wait_for(lambda: sum("fast" in j["values"] for j in sub.json(topic)) >= 31, 20,
                   "31 polls of the fast tag")
        msgs = sub.json(topic)
        fast = sum("fast" in j["values"] for j in msgs)
        slow = sum("slow" in j["values"] for j in msgs)
        # The slow tag is read once a second over the span of the messages (whatever the load
        # did to the fast polls), and far less often than the fast one.
        span_s = (msgs[-1]["ts"] - msgs[0]["ts"]) / 1000.0
        assert abs(slow - (int(span_s) + 1)) <= 1, (slow, span_s)
        assert fast >= 3 * slow, (fast, slow)

    def test_refused_merged_read_is_split_once(self):
        # Holding registers 10-12 are read in one request until the device refuses it (11 is
        # "illegal"); then the three tags are read one by one on every later poll. The driver
        # keeps its read plan between polls: the refusal must drop that plan, or the merged
        # read would be refused again on every poll.
        b = self.broker()
        sim = self.sim(["--pumps", "1", "--lights", "0", "-v",
                        "--exception", "1:holding_register:11:2"])
        dev = {"name": "pump-a", "protocol": "modbus", "interval_ms": 100,
               "connection": {"transport": "tcp", "host": "127.0.0.1", "port": sim.port,
                              "unit_id": 1, "timeout_ms": 500},
               "tags": [{"name": "r%d" % a, "table": "holding_register", "address": a,
                         "type": "uint16"} for a in (10, 11, 12)]}
        cfg = h.base_config(self.workdir, b.port, [dev])
        topic = "simpul/gw-test/pump-a/data"
        sub = self.subscriber(b.port, [topic])
        g = self.gateway(cfg)
        h.wait_for(lambda: sim.proc.output().count("fc 3 read 12+1") >= 10, 20,
                   "10 polls reading register 12 on its own")
        assert sim.proc.output().count("fc 3 read 10+3") == 1, sim.proc.output()[-2000:]
        assert g.proc.output().count("one by one") == 1, g.proc.output()[-2000:]
        msg = sub.wait_json(topic, lambda j: "errors" in j, 10)
        assert set(msg["values"]) == {"r10", "r12"}, msg
        assert "illegal data address" in msg["errors"]["r11"], msg


# simpul-sim's free-running tick register (docs/simulator.md).
SIM_TICK_ADDR = int(os.environ.get("SIM_TICK_ADDR", "30"))

if __name__ == "__main__":
    PollingTest().run_all()
