"""Commands that cannot misfire (issue #8): stale, forged, flooded or half-done commands never
move a device. Each test drives the real gateway through a real mosquitto against a Modbus
server whose write log shows, independently of simpul, what reached the device.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from test_commands import PEER_SPEC, device, write_lines  # noqa: E402

P = "simpul/gw-test"
RESULT = P + "/pump-01/cmd/result"


def publish_retained(port, topic, payload, protocol=mqtt.MQTTv311):
    """Publishes one retained message with a client of its own and waits for the PUBACK."""
    c = mqtt.Client(client_id="ret-%d-%d" % (os.getpid(), h.free_port()), protocol=protocol)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1, retain=True).wait_for_publish()
    finally:
        c.loop_stop()
        c.disconnect()


def kick(port, client_id):
    """Makes the broker drop the gateway's session: a client with its id connects (MQTT session
    take-over), then leaves. The gateway reconnects with its own backoff."""
    c = mqtt.Client(client_id=client_id)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        h.wait_for(c.is_connected, 10, "take-over client connected")
    finally:
        c.loop_stop()
        c.disconnect()


class CommandSafetyTest(h.TestCase):
    def start(self, commands=None, mqtt_extra=None, before_start=None, spec_extra=None,
              dev_kw=None, wait_online=True):
        self.b = self.broker()
        self.wlog = os.path.join(self.workdir, "writes.log")
        spec = dict(PEER_SPEC, write_log=self.wlog)
        spec.update(spec_extra or {})
        self.pm = self.pymodbus(spec)
        self.cfg = h.base_config(self.workdir, self.b.port,
                                 [device("pump-01", self.pm.port, **(dev_kw or {}))],
                                 mqtt_extra=mqtt_extra)
        if commands is not None:
            self.cfg["commands"] = commands
        v5 = (mqtt_extra or {}).get("version") == "5"
        self.sub = self.subscriber(self.b.port, [P + "/#"],
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        if before_start is not None:
            before_start()
        self.gw = self.gateway(self.cfg)
        if wait_online:
            self.sub.wait_json(P + "/pump-01/status", lambda j: j["state"] == "online", 20)

    def answers(self, cid):
        return [j for j in self.sub.json(RESULT) if j.get("id") == cid]

    def cmd(self, payload, timeout=10):
        before = len(self.sub.messages(RESULT))
        self.sub.publish(P + "/pump-01/cmd", json.dumps(payload))

        def answer():
            for j in self.sub.json(RESULT)[before:]:
                if j.get("id") == payload.get("id"):
                    return j
            return None
        return h.wait_for(answer, timeout, "result of %r" % payload.get("id"))

    def writes_to(self, address):
        return [w for w in write_lines(self.wlog) if w[2] == str(address)]

    # ---- 1. retained commands ----------------------------------------------------------------

    def test_retained_command_waiting_before_start_is_not_executed(self):
        cmd = {"id": "ret-1", "op": "write", "tag": "raw_sp", "value": 41}
        self.start(before_start=lambda: publish_retained(
            self.b.port, P + "/pump-01/cmd", json.dumps(cmd)))
        r = h.wait_for(lambda: self.answers("ret-1"), 10, "answer to the retained command")
        assert len(r) == 1 and r[0]["ok"] is False, r
        assert r[0]["error"]["code"] == "stale_retained", r
        # The same id sent live (no retain flag) is a new request and runs.
        r = self.cmd({"id": "ret-1", "op": "write", "tag": "raw_sp", "value": 42})
        assert r["ok"] is True, r
        assert [w[4] for w in self.writes_to(11)] == ["42"], write_lines(self.wlog)

    def test_retained_command_after_dedup_window_and_reconnect_is_not_rerun(self):
        self.start(commands={"dedup_window_s": 1})
        # Published live with the retain flag: the broker delivers it now (flag cleared, a
        # live request) and keeps it for every later subscription.
        publish_retained(self.b.port, P + "/pump-01/cmd",
                         json.dumps({"id": "ret-2", "op": "write", "tag": "raw_sp", "value": 7}))
        r = h.wait_for(lambda: self.answers("ret-2"), 10, "answer to the live command")
        assert r[0]["ok"] is True, r
        assert len(self.writes_to(11)) == 1
        # Past the de-dup window, the uplink flaps: the broker delivers the retained copy again.
        t_end = time.monotonic() + 1.2
        h.wait_for(lambda: time.monotonic() > t_end, 5, "the de-dup window to pass")
        self.sub.clear()
        kick(self.b.port, self.cfg["mqtt"]["client_id"])
        self.sub.wait_json(P + "/status", lambda j: j["state"] == "online", 20)
        r = h.wait_for(lambda: self.answers("ret-2"), 10, "answer to the redelivered copy")
        assert r[0]["ok"] is False and r[0]["error"]["code"] == "stale_retained", r
        assert len(self.writes_to(11)) == 1, write_lines(self.wlog)

    def test_mqtt5_subscribes_without_retained_messages(self):
        cmd = {"id": "ret-5", "op": "write", "tag": "raw_sp", "value": 5}
        self.start(mqtt_extra={"version": "5"}, before_start=lambda: publish_retained(
            self.b.port, P + "/pump-01/cmd", json.dumps(cmd), protocol=mqtt.MQTTv5))
        # A later live command is answered; the retained one was never even delivered (the
        # broker sends retained messages right after the SUBACK, before later publishes).
        r = self.cmd({"id": "live-5", "op": "read", "tags": ["flow"]})
        assert r["ok"] is True, r
        assert self.answers("ret-5") == []
        assert "stale_retained" not in self.gw.proc.output()
        assert self.writes_to(11) == []


    # ---- 3. at-most-once cannot fail open ----------------------------------------------------

    def test_writes_refused_on_an_in_memory_store(self):
        # The store's directory cannot be created (its parent is a file): the store falls back
        # to an in-memory database, whose records would not survive a restart.
        blocker = os.path.join(self.workdir, "not-a-dir")
        with open(blocker, "w") as f:
            f.write("x")

        def unwritable():
            self.cfg["store"]["path"] = os.path.join(blocker, "simpul.db")
        self.start(before_start=unwritable)
        assert "IN-MEMORY" in self.gw.proc.output()
        r = self.cmd({"id": "mem-1", "op": "write", "tag": "raw_sp", "value": 9})
        assert r["ok"] is False and r["error"]["code"] == "not_durable", r
        # Reads move nothing: they still run.
        r = self.cmd({"id": "mem-2", "op": "read", "tags": ["flow"]})
        assert r["ok"] is True and r["values"] == {"flow": 42}, r
        assert write_lines(self.wlog) == [], write_lines(self.wlog)


if __name__ == "__main__":
    CommandSafetyTest().run_all()
