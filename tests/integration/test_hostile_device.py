"""A hostile Modbus TCP device: every other reply is malformed. simpul must never crash and never
publish a value it did not really read: the only value that may ever appear is the true one."""
import os
import socket
import struct
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

TRUE_VALUE = 1234


def good(tid, uid, fc, count):
    data = struct.pack(">H", TRUE_VALUE) * count
    pdu = bytes([fc, len(data)]) + data
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, uid) + pdu


def bad_replies(tid, uid, fc, count):
    data = struct.pack(">H", 4321) * count
    yield struct.pack(">HHHB", tid, 0, 3 + len(data), uid) + bytes([fc, len(data) + 2]) + data
    yield struct.pack(">HHHB", tid, 0, 3 + len(data), uid) + bytes([fc + 1, len(data)]) + data
    yield struct.pack(">HHHB", tid, 0, 3 + len(data), uid) + bytes([fc, len(data)]) + data[:1]
    yield struct.pack(">HHHB", tid + 1, 0, 3 + len(data), uid) + bytes([fc, len(data)]) + data
    yield struct.pack(">HHHB", tid, 0, 3, uid) + bytes([fc | 0x80, 99])
    yield struct.pack(">HHHB", tid, 0, 250, uid) + bytes([fc, 248]) + b"\xff" * 248
    yield b"\x00" * 3
    yield os.urandom(40)
    # Well-formed but for one field: a non-zero MBAP protocol id, then another unit id.
    pdu = bytes([fc, len(data)]) + data
    yield struct.pack(">HHHB", tid, 7, len(pdu) + 1, uid) + pdu
    yield struct.pack(">HHHB", tid, 0, len(pdu) + 1, (uid + 1) & 0xFF) + pdu


class Hostile:
    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests = 0
        self.stop = False
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.client, args=(c,), daemon=True).start()

    def client(self, c):
        c.settimeout(5)
        try:
            while not self.stop:
                hdr = c.recv(7)
                if len(hdr) < 7:
                    return
                tid, pid, length, uid = struct.unpack(">HHHB", hdr)
                pdu = c.recv(length - 1)
                fc = pdu[0]
                count = struct.unpack(">H", pdu[3:5])[0] if len(pdu) >= 5 else 1
                self.requests += 1
                variants = list(bad_replies(tid, uid, fc, count))
                k = self.requests % (len(variants) + 1)
                if k == len(variants):
                    c.sendall(good(tid, uid, fc, count))
                else:
                    c.sendall(variants[k])
                    if k in (6, 7):
                        c.close()  # garbage, then hang up
                        return
        except OSError:
            return
        finally:
            c.close()

    def close(self):
        self.stop = True
        self.sock.close()


class HostileTest(h.TestCase):
    def test_garbage_replies_never_become_values(self):
        dev = Hostile()
        self.defer(dev.close)
        b = self.broker()
        cfg = h.base_config(self.workdir, b.port, [
            {"name": "evil-01", "protocol": "modbus", "interval_ms": 50,
             "connection": {"transport": "tcp", "host": "127.0.0.1", "port": dev.port,
                            "unit_id": 1, "timeout_ms": 200},
             "tags": [{"name": "v", "table": "holding_register", "address": 0,
                       "type": "uint16"},
                      {"name": "w", "table": "holding_register", "address": 1,
                       "type": "uint16"}]}])
        cfg["devices"][0]["refresh_s"] = 1
        sub = self.subscriber(b.port, ["simpul/gw-test/evil-01/#"])
        g = self.gateway(cfg)
        # Malformed replies close the connection and back off, so requests come slowly.
        h.wait_for(lambda: dev.requests >= 40 and sub.json("simpul/gw-test/evil-01/data"), 90,
                   "40 requests to the hostile device and a value")
        assert g.proc.alive(), g.proc.output()[-3000:]
        data = sub.json("simpul/gw-test/evil-01/data")
        seen = [v for j in data for v in j["values"].values()]
        assert seen, "no value ever read, even from the good replies"
        assert set(seen) == {TRUE_VALUE}, sorted(set(seen))
        states = {j["state"] for j in sub.json("simpul/gw-test/evil-01/status")}
        assert "offline" in states and "online" in states, states
        # The strict framing refused both frames that libmodbus 3.1.6 would have let through.
        out = g.proc.output()
        assert "MBAP protocol id is not 0" in out, out[-3000:]
        assert "reply from another unit id" in out, out[-3000:]
        assert g.stop() == 0

    def test_sim_faults_on_tcp_are_refused_and_counted(self):
        # simpul-sim spoils some replies' framing only (their registers stay true), so here
        # the proof is the refusal itself: logged, counted, and the device keeps being read.
        sim = self.sim(["--pumps", "1", "--lights", "0", "--static", "--counter",
                        "--fault", "protocol:1:3", "--fault", "unit:1:4",
                        "--fault", "truncate:1:5"])
        b = self.broker()
        cfg = h.base_config(self.workdir, b.port, [
            {"name": "pump-01", "protocol": "modbus", "interval_ms": 50,
             "connection": {"transport": "tcp", "host": "127.0.0.1", "port": sim.port,
                            "unit_id": 1, "timeout_ms": 200},
             "tags": [{"name": "heartbeat", "table": "input_register", "address": 30,
                       "type": "uint32"}]}])
        cfg["gateway"]["metrics_interval_s"] = 1
        sub = self.subscriber(b.port, ["simpul/gw-test/#"])
        g = self.gateway(cfg)
        key = "tcp:127.0.0.1:%d" % sim.port

        def framing_errors():
            m = sub.json("simpul/gw-test/metrics")
            return m[-1]["connections"][key]["framing_errors"] if m else 0
        h.wait_for(lambda: framing_errors() >= 3, 30, "framing errors counted")
        out = g.proc.output()
        for why in ("MBAP protocol id is not 0", "reply from another unit id",
                    "frame length does not agree"):
            assert why in out, (why, out[-3000:])
        beats = [j["values"]["heartbeat"] for j in sub.json("simpul/gw-test/pump-01/data")
                 if "heartbeat" in j["values"]]
        assert len(beats) >= 3 and beats == sorted(beats), beats
        assert g.stop() == 0


if __name__ == "__main__":
    HostileTest().run_all()
