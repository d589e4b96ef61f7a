"""Sparkplug B 3.0 edge node, checked by a test host application on a real mosquitto.

The host decodes payloads with Debian's python3-protobuf, from gateway/sparkplug_b.proto
compiled here with protoc --python_out (the same .proto simpul compiles with protoc-c). The
device is simpul-sim with --static --counter: known register values (docs/simulator.md,
"Initial values"), a heartbeat that changes on every poll, and a write log of what the device
executed. docs/sparkplug.md maps each Edge Node assertion of the specification to a test here.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402

G, E = "grp", "edge1"
NS = "spBv1.0/%s" % G
PROTO_DIR = tempfile.mkdtemp(prefix="simpul-spb-proto-")
subprocess.check_call(["protoc", "--proto_path", os.path.join(h.SOURCE_ROOT, "gateway"),
                       "--python_out", PROTO_DIR,
                       os.path.join(h.SOURCE_ROOT, "gateway", "sparkplug_b.proto")])
sys.path.insert(0, PROTO_DIR)
import sparkplug_b_pb2 as spb  # noqa: E402

DT = {name: num for num, name in enumerate(
    ["Unknown", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
     "Float", "Double", "Boolean", "String"])}

TAGS = [
    {"name": "running", "table": "coil", "address": 0, "type": "bool", "writable": True},
    {"name": "speed_rpm", "table": "holding_register", "address": 10, "type": "uint16",
     "writable": True, "min": 0, "max": 3000},
    {"name": "flow_m3h", "table": "input_register", "address": 0, "type": "float32",
     "order": "CDAB"},
    {"name": "motor_temp_c", "table": "input_register", "address": 7, "type": "int16",
     "scale": 0.1},
    {"name": "name", "table": "input_register", "address": 20, "type": "string", "length": 8},
    {"name": "heartbeat", "table": "input_register", "address": 30, "type": "uint32"},
]
# simpul-sim --static, pump 1: name -> (datatype, value).
KNOWN = {"running": ("Boolean", True), "speed_rpm": ("UInt16", 1450),
         "flow_m3h": ("Float", 12.5), "motor_temp_c": ("Double", 41.5),
         "name": ("String", "Dumai PS-01")}


def value_of(m):
    kind = m.WhichOneof("value")
    v = getattr(m, kind) if kind else None
    if kind == "int_value" and m.datatype in (DT["Int8"], DT["Int16"], DT["Int32"]):
        v = v - (1 << 32) if v >= 1 << 31 else v
    return v


class QosSubscriber(h.Subscriber):
    """Records the QoS of each delivery too (in the properties slot): subscribed at QoS 1, a
    message arrives with the QoS it was published with."""

    def _on_message(self, c, userdata, m):
        with self.lock:
            self.msgs.append((m.topic, m.payload, m.retain, m.qos))


class Host:
    """A Sparkplug host application: records every spBv1.0 message, decoded, in order."""

    def __init__(self, port, protocol=mqtt.MQTTv311):
        self.sub = QosSubscriber(port, ["spBv1.0/#"], protocol=protocol)

    def qos(self, kind):
        return {m[3] for m in self.sub.messages() if m[0].split("/")[2:3] == [kind]}

    def msgs(self, kind=None, device=None):
        out = []
        for topic, payload, retain, _ in self.sub.messages():
            parts = topic.split("/")
            if parts[0] != "spBv1.0" or parts[1] == "STATE":
                continue
            if kind is not None and parts[2] != kind:
                continue
            if device is not None and (len(parts) < 5 or parts[4] != device):
                continue
            out.append((topic, spb.Payload.FromString(payload), retain))
        return out

    def wait(self, kind, device=None, n=1, timeout=15.0, pred=lambda p: True):
        return h.wait_for(lambda: [m for m in self.msgs(kind, device) if pred(m[1])][n - 1:] and
                          [m for m in self.msgs(kind, device) if pred(m[1])],
                          timeout, "%d %s message(s)%s" % (n, kind, " for " + device if device
                                                           else ""))

    def command(self, kind, metrics, device=None, ts=None):
        p = spb.Payload()
        p.timestamp = ts if ts is not None else int(time.time() * 1000)
        for m in metrics:
            p.metrics.append(m)
        topic = "%s/%s/%s" % (NS, kind, E) + ("/" + device if device else "")
        self.sub.publish(topic, p.SerializeToString(), qos=0)


def metric(name=None, alias=None, datatype=None, **value):
    m = spb.Payload.Metric()
    if name is not None:
        m.name = name
    if alias is not None:
        m.alias = alias
    if datatype is not None:
        m.datatype = DT[datatype]
    for k, v in value.items():
        setattr(m, k, v)
    return m


def by_name(payload):
    return {m.name: m for m in payload.metrics}


class Proxy:
    """A TCP relay between simpul and the broker that a test can cut, to make an outage that
    the host (connected to the broker directly) does not see."""

    def __init__(self, target_port):
        self.target = target_port
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        self.cut = False
        self.socks = []
        self.lock = threading.Lock()
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            if self.cut:
                c.close()
                continue
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            with self.lock:
                self.socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def set_cut(self, cut):
        self.cut = cut
        if cut:
            with self.lock:
                for s in self.socks:
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    s.close()
                self.socks = []

    def close(self):
        self.running = False
        self.set_cut(True)
        self.ls.close()


class SparkplugTests(h.TestCase):
    def setup(self, fmt="sparkplug", spb_extra=None, mqtt_extra=None, sim_args=(),
              via_proxy=False, interval=200, start=True):
        self.b = self.broker()
        port = self.b.port
        if via_proxy:
            self.proxy = Proxy(self.b.port)
            self.defer(self.proxy.close)
            port = self.proxy.port
        self.wlog = os.path.join(self.workdir, "writes.log")
        self.s = self.sim(["--static", "--counter", "--pumps", "1", "--lights", "0",
                           "--write-log", self.wlog] + list(sim_args))
        dev = {"name": "pump-01", "protocol": "modbus", "interval_ms": interval,
               "connection": {"transport": "tcp", "host": "127.0.0.1", "port": self.s.port,
                              "unit_id": 1, "timeout_ms": 300},
               "tags": TAGS}
        sp = {"group_id": G, "edge_node_id": E}
        sp.update(spb_extra or {})
        mx = {"format": fmt, "sparkplug": sp}
        mx.update(mqtt_extra or {})
        self.cfg = h.base_config(self.workdir, port, [dev], mqtt_extra=mx)
        self.host = Host(self.b.port)
        self.defer(self.host.sub.close)
        self.gw = self.gateway(self.cfg, start=start)

    def writes(self):
        if not os.path.exists(self.wlog):
            return []
        with open(self.wlog) as f:
            return [line.split() for line in f if line.strip()]

    # ---- session, Will, births ----------------------------------------------------------------

    def test_births_and_will(self):
        self.setup()
        topic, nb, retain = self.host.wait("NBIRTH")[0]
        assert topic == "%s/NBIRTH/%s" % (NS, E), topic
        assert not retain, "NBIRTH must not be retained"
        assert nb.seq == 0 and nb.HasField("seq"), nb.seq
        assert nb.timestamp > 0
        m = by_name(nb)
        assert m["bdSeq"].datatype == DT["Int64"], m["bdSeq"]
        bdseq = m["bdSeq"].long_value
        with open(os.path.join(self.workdir, "sparkplug-bdseq")) as f:
            assert int(f.read()) == bdseq, "bdSeq persisted at CONNACK"
        assert m["Node Control/Rebirth"].datatype == DT["Boolean"]
        assert m["Node Control/Rebirth"].boolean_value is False
        for mm in nb.metrics:  # name, alias, datatype, value and timestamp on every metric
            assert mm.HasField("alias") and mm.datatype and mm.timestamp and mm.WhichOneof("value")
        topic, db, retain = self.host.wait("DBIRTH", "pump-01")[0]
        assert topic == "%s/DBIRTH/%s/pump-01" % (NS, E) and not retain
        assert db.seq == 1, db.seq
        dm = by_name(db)
        assert set(dm) == {t["name"] for t in TAGS}, set(dm)
        aliases = set()
        for name, (dtype, want) in KNOWN.items():
            mm = dm[name]
            assert mm.datatype == DT[dtype], (name, mm.datatype)
            assert mm.timestamp > 0 and mm.HasField("alias"), mm
            assert not mm.is_null
            got = value_of(mm)
            assert (abs(got - want) < 1e-9 if isinstance(want, float) else got == want), \
                (name, got, want)
            aliases.add(mm.alias)
        assert dm["heartbeat"].datatype == DT["UInt32"] and value_of(dm["heartbeat"]) >= 1
        assert len(aliases) == len(KNOWN), "aliases must be unique"
        assert not aliases & {mm.alias for mm in nb.metrics}, "unique across the edge node"
        assert self.host.qos("NBIRTH") == {0} and self.host.qos("DBIRTH") == {0}
        # Clean session ("c1" in mosquitto's connection line for the edge node's client).
        assert "as simpul-gw-test (p2, c1," in self.b.proc.output(), self.b.proc.output()
        # No JSON topics in "sparkplug" mode.
        assert not [t for t, *_ in self.host.sub.messages() if t.startswith("simpul/")]
        # The Will: NDEATH with only bdSeq (the one of NBIRTH), QoS 1, not retained.
        death = h.Subscriber(self.b.port, ["%s/NDEATH/%s" % (NS, E)])
        self.defer(death.close)
        self.gw.proc.signal(signal.SIGKILL)
        h.wait_for(lambda: death.messages(), 15, "NDEATH from the Will")
        topic, payload, retain, _ = death.messages()[0]
        nd = spb.Payload.FromString(payload)
        assert not retain
        assert self.host.wait("NDEATH") and self.host.qos("NDEATH") == {1}
        assert not nd.HasField("seq"), "NDEATH carries no seq"
        assert [(x.name, x.datatype, x.long_value) for x in nd.metrics] == \
            [("bdSeq", DT["Int64"], bdseq)], nd
        # bdSeq is persisted and goes up by one with the next CONNECT.
        self.host.sub.clear()
        self.gw.stop(signal.SIGKILL)
        self.gw.start()
        nb2 = self.host.wait("NBIRTH")[0][1]
        assert by_name(nb2)["bdSeq"].long_value == (bdseq + 1) % 256
        self.gw.stop()

    def test_bdseq_wraps(self):
        self.setup(start=False)
        with open(os.path.join(self.workdir, "sparkplug-bdseq"), "w") as f:
            f.write("255\n")
        self.gw.start()
        nb = self.host.wait("NBIRTH")[0][1]
        assert by_name(nb)["bdSeq"].long_value == 0, by_name(nb)["bdSeq"]
        self.gw.stop()

    # ---- data ---------------------------------------------------------------------------------

    def test_data_aliases_and_seq_wrap(self):
        self.setup(interval=20)
        db = self.host.wait("DBIRTH", "pump-01")[0][1]
        hb_alias = by_name(db)["heartbeat"].alias
        # The heartbeat changes on every poll: more than 256 DDATA wrap the seq.
        self.host.wait("DDATA", "pump-01", n=300, timeout=60)
        seqs = [p.seq for _, p, _ in self.host.msgs()]
        assert seqs[0] == 0
        for a, b in zip(seqs, seqs[1:]):
            assert b == (a + 1) % 256, "seq jumps from %d to %d" % (a, b)
        assert 255 in seqs and seqs.count(0) >= 2, "seq must wrap past 255"
        last = 0
        assert self.host.qos("DDATA") == {0}
        for _, p, retain in self.host.msgs("DDATA"):
            assert not retain
            for mm in p.metrics:
                assert mm.name == "" and mm.HasField("alias"), "DATA uses aliases only"
                assert not mm.HasField("datatype"), "no datatype in DATA"
                if mm.alias == hb_alias:
                    assert mm.int_value > last and mm.timestamp > 0
                    last = mm.int_value
        self.gw.stop()

    def test_names_without_aliases(self):
        self.setup(spb_extra={"use_aliases": False})
        db = self.host.wait("DBIRTH", "pump-01")[0][1]
        assert all(not m.HasField("alias") for m in db.metrics)
        # (DATA polled before the first CONNACK may come first, replayed as historical.)
        p = self.host.wait("DDATA", "pump-01", pred=lambda p: not p.metrics[0].is_historical)[0][1]
        assert [m.name for m in p.metrics] == ["heartbeat"], p
        self.gw.stop()

    def test_device_death_and_rebirth(self):
        self.setup(sim_args=["--fail-unit", "1"])
        self.s.proc.signal(signal.SIGUSR1)  # answering
        self.host.wait("DBIRTH", "pump-01")
        self.s.proc.signal(signal.SIGUSR1)  # silent: the device stops answering
        dd = self.host.wait("DDEATH", "pump-01", timeout=20)[0][1]
        assert dd.HasField("seq") and dd.timestamp > 0
        assert self.host.qos("DDEATH") == {0}
        n_data = len(self.host.msgs("DDATA", "pump-01"))
        self.s.proc.signal(signal.SIGUSR1)  # back
        self.host.wait("DBIRTH", "pump-01", n=2, timeout=20)
        order = [t.split("/")[2] for t, _, _ in self.host.msgs(device="pump-01")]
        i = order.index("DDEATH")
        assert order[i + 1] == "DBIRTH", order[i:i + 3]
        assert n_data == len([o for o in order[:i] if o == "DDATA"])
        self.gw.stop()

    def test_reload_changing_devices_rebirths(self):
        """A SIGHUP that changes the devices: DDEATH for the replaced device, then a rebirth in
        the same session (NBIRTH seq 0, same bdSeq: no reconnect) and DBIRTHs for the new list."""
        self.setup()
        nb = self.host.wait("NBIRTH")[0][1]
        self.host.wait("DBIRTH", "pump-01")
        dev = self.cfg["devices"][0]
        changed = dict(dev, tags=[t for t in TAGS if t["name"] != "name"])
        added = dict(dev, name="pump-01b")
        self.gw.config["devices"] = [changed, added]
        self.gw.write_config()
        self.gw.proc.signal(signal.SIGHUP)
        self.host.wait("DDEATH", "pump-01")
        nb2 = self.host.wait("NBIRTH", n=2)[1][1]
        assert nb2.seq == 0
        assert by_name(nb2)["bdSeq"].long_value == by_name(nb)["bdSeq"].long_value
        db = self.host.wait("DBIRTH", "pump-01", n=2)[1][1]
        assert set(by_name(db)) == {t["name"] for t in TAGS} - {"name"}, set(by_name(db))
        self.host.wait("DBIRTH", "pump-01b")
        kinds = [t.split("/")[2] for t, _, _ in self.host.msgs()]
        i = kinds.index("DDEATH")
        assert kinds.index("NBIRTH", 1) > i, kinds
        log = self.gw.proc.output()
        assert "1 changed, 1 added, 0 removed" in log and "MQTT unchanged" in log, log[-2000:]
        self.gw.stop()

    # ---- commands -----------------------------------------------------------------------------

    def test_rebirth_on_ncmd(self):
        self.setup()
        nb = self.host.wait("NBIRTH")[0][1]
        self.host.wait("DBIRTH", "pump-01")
        self.host.command("NCMD", [metric("Node Control/Rebirth", datatype="Boolean",
                                          boolean_value=True)])
        nb2 = self.host.wait("NBIRTH", n=2)[1][1]
        assert nb2.seq == 0
        assert by_name(nb2)["bdSeq"].long_value == by_name(nb)["bdSeq"].long_value
        self.host.wait("DBIRTH", "pump-01", n=2)
        kinds = [t.split("/")[2] for t, _, _ in self.host.msgs()]
        j = kinds.index("NBIRTH", 1)
        assert kinds[j + 1] == "DBIRTH", kinds[j:j + 3]
        self.gw.stop()

    def test_dcmd_write_confirmed(self):
        self.setup()
        db = self.host.wait("DBIRTH", "pump-01")[0][1]
        alias = by_name(db)["speed_rpm"].alias
        ts = int(time.time() * 1000)
        cmd = [metric("speed_rpm", datatype="UInt16", int_value=1200, timestamp=ts)]
        self.host.command("DCMD", cmd, "pump-01")
        h.wait_for(lambda: [w for w in self.writes() if w[:5] == ["1", "6", "10", "1", "1200"]],
                   10, "the write on the device")
        # The confirmed value goes out in a DDATA.
        self.host.wait("DDATA", "pump-01", pred=lambda p: any(
            m.alias == alias and m.int_value == 1200 for m in p.metrics))
        # The same DCMD again (a redelivery): never written twice.
        self.host.command("DCMD", cmd, "pump-01")
        # A new DCMD after it, by alias, shows the first one was handled.
        self.host.command("DCMD", [metric(alias=alias, datatype="UInt16", int_value=1300,
                                          timestamp=ts + 1)], "pump-01")
        h.wait_for(lambda: [w for w in self.writes() if w[4] == "1300"], 10, "second write")
        assert len([w for w in self.writes() if w[4] == "1200"]) == 1, self.writes()
        self.gw.stop()

    def test_bad_dcmd_refused(self):
        self.setup()
        self.host.wait("DBIRTH", "pump-01")
        ts = int(time.time() * 1000)
        bad = [
            metric("no_such_metric", datatype="UInt16", int_value=5, timestamp=ts),
            metric("speed_rpm", datatype="String", string_value="fast", timestamp=ts),
            metric("speed_rpm", datatype="Boolean", boolean_value=True, timestamp=ts),
            metric("speed_rpm", datatype="UInt16", int_value=4000, timestamp=ts),  # > max
            metric("flow_m3h", datatype="Float", float_value=3.0, timestamp=ts),  # read-only
        ]
        for m in bad:
            self.host.command("DCMD", [m], "pump-01")
        self.host.sub.publish("%s/DCMD/%s/pump-01" % (NS, E), b"\xff\xff garbage", qos=0)
        # A good one last: once it is written, every bad one before it has been handled.
        self.host.command("DCMD", [metric("running", datatype="Boolean", boolean_value=False,
                                          timestamp=ts)], "pump-01")
        h.wait_for(lambda: self.writes(), 10, "the good write")
        assert [w[:5] for w in self.writes()] == [["1", "5", "0", "1", "0"]], self.writes()
        out = self.gw.proc.output()
        assert "unknown metric no_such_metric" in out and "needs a UInt16 value" in out
        self.gw.stop()

    # ---- store and forward ----------------------------------------------------------------------

    def test_historical_replay_after_outage(self):
        self.setup(via_proxy=True)
        proxy = self.proxy
        self.host.wait("DBIRTH", "pump-01")
        self.host.wait("DDATA", "pump-01", n=2)
        t_cut = int(time.time() * 1000)
        proxy.set_cut(True)
        h.wait_for(lambda: self.host.msgs("NDEATH"), 20, "NDEATH after the link was lost")
        # Polls go on while the link is down: a failed reconnect attempt comes a second after
        # the loss, several polls later.
        h.wait_for(lambda: "attempt 1 to" in self.gw.proc.output(), 20, "a failed reconnect")
        proxy.set_cut(False)
        nb = self.host.wait("NBIRTH", n=2, timeout=40)[1][1]

        def replayed():
            # The first session may have replayed DATA polled before its own CONNACK: look
            # only after the second NBIRTH.
            m = self.host.msgs()
            k = [j for j, x in enumerate(m) if "/NBIRTH/" in x[0]][1]
            return [p for t, p, _ in m[k:] if "/DDATA/" in t and p.metrics[0].is_historical]
        h.wait_for(replayed, 10, "historical DATA after the new births")
        msgs = self.host.msgs()
        kinds = [t.split("/")[2] for t, _, _ in msgs]
        i = [k for k, x in enumerate(kinds) if x == "NBIRTH"][1]
        assert kinds[i + 1:i + 2] == ["DBIRTH"], (kinds, [p.seq for _, p, _ in msgs])
        after = [p for t, p, _ in msgs[i + 2:] if "/DDATA/" in t]
        hist = [p for p in after if p.metrics[0].is_historical]
        assert hist and after[:len(hist)] == hist, "historical DATA first, after the births"
        stamps = [p.metrics[0].timestamp for p in hist]
        assert stamps == sorted(stamps), "in order"
        assert all(t_cut - 1000 <= s <= nb.timestamp for s in stamps), (t_cut, stamps, nb.timestamp)
        seqs = [p.seq for _, p, _ in msgs[i:]]
        for a, b in zip(seqs, seqs[1:]):
            assert b == (a + 1) % 256
        self.gw.stop()

    # ---- STATE, both, clean stop ------------------------------------------------------------------

    def test_state_primary_host(self):
        self.setup(spb_extra={"primary_host_id": "scada"})
        h.wait_for(lambda: "connected to" in self.gw.proc.output(), 15, "the gateway connected")
        time.sleep(1.0)  # bounded negative check: no births before the host is online
        assert not self.host.msgs("NBIRTH"), "births before the primary host's STATE"
        state = "spBv1.0/STATE/scada"
        on = json.dumps({"online": True, "timestamp": int(time.time() * 1000)})
        info = self.host.sub.c.publish(state, on, qos=1, retain=True)
        info.wait_for_publish()
        self.host.wait("NBIRTH")
        self.host.wait("DBIRTH", "pump-01")
        self.host.wait("DDATA", "pump-01")
        off = json.dumps({"online": False, "timestamp": int(time.time() * 1000)})
        self.host.sub.c.publish(state, off, qos=1, retain=True).wait_for_publish()
        # 3.0: the edge node ends its session (no DISCONNECT: the broker sends the Will) ...
        nd = self.host.wait("NDEATH")[0][1]
        bdseq = by_name(self.host.msgs("NBIRTH")[0][1])["bdSeq"].long_value
        assert nd.metrics[0].long_value == bdseq, (nd, bdseq)
        # ... and reconnects, finds the host still offline (retained STATE), and leaves again.
        h.wait_for(lambda: self.gw.proc.output().count("primary host scada offline") >= 2, 20,
                   "a reconnect that met the offline STATE")
        assert len(self.host.msgs("NBIRTH")) == 1, "births while the primary host is offline"
        self.host.sub.c.publish(state, on, qos=1, retain=True).wait_for_publish()
        self.host.wait("NBIRTH", n=2, timeout=40)

        def replayed():
            m = self.host.msgs()
            k = [j for j, x in enumerate(m) if "/NBIRTH/" in x[0]][1]
            return [p for t, p, _ in m[k:] if "/DDATA/" in t and p.metrics[0].is_historical]
        h.wait_for(replayed, 10, "DATA kept while the host was offline, replayed")
        self.gw.stop()

    def test_both_formats_side_by_side(self):
        self.setup(fmt="both")
        js = self.subscriber(self.b.port, ["simpul/gw-test/#"])
        self.host.wait("DBIRTH", "pump-01")
        js.wait_json("simpul/gw-test/pump-01/data", lambda j: "speed_rpm" in j["values"] or
                     j["values"].get("heartbeat", 0) > 0)
        js.wait_json("simpul/gw-test/status", lambda j: j["state"] == "online")
        self.host.wait("DDATA", "pump-01", n=3)
        # Two sessions with their own client ids: neither takes the other's place.
        assert len(self.host.msgs("NBIRTH")) == 1
        assert all(j["state"] == "online" for j in js.json("simpul/gw-test/status"))
        # Each session has its own Will.
        self.gw.proc.signal(signal.SIGKILL)
        js.wait_json("simpul/gw-test/status", lambda j: j["state"] == "offline")
        self.host.wait("NDEATH")
        self.gw.stop(signal.SIGKILL)

    def test_clean_stop_mqtt311(self):
        self.setup()
        nb = self.host.wait("NBIRTH")[0][1]
        self.host.wait("DBIRTH", "pump-01")
        assert self.gw.stop() == 0
        nd = self.host.wait("NDEATH", timeout=5)[0][1]
        assert nd.metrics[0].long_value == by_name(nb)["bdSeq"].long_value

    def test_clean_stop_mqtt5(self):
        self.setup(mqtt_extra={"version": "5"})
        nb = self.host.wait("NBIRTH")[0][1]
        # MQTT 5 Clean Start with no Session Expiry property (0: the session ends with it).
        assert "as simpul-gw-test (p5, c1," in self.b.proc.output()
        self.host.wait("DBIRTH", "pump-01")
        assert self.gw.stop() == 0
        # DISCONNECT with reason 0x04: the broker publishes the Will.
        nd = self.host.wait("NDEATH", timeout=5)[0][1]
        assert nd.metrics[0].long_value == by_name(nb)["bdSeq"].long_value


if __name__ == "__main__":
    SparkplugTests().run_all()
