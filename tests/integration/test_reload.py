"""SIGHUP: the new config is read and its plugins loaded off the loop, so polling and
publishing go on while a reload is prepared; then the running engine takes it over: the store
stays open (no quick_check, no reopen: a big store costs a reload nothing), an unchanged device
keeps its timers and its connection (seq +1 with no gap, no pause in its polls), removed devices
get an offline status, added ones start, changed ones are replaced (seq goes on), and MQTT
reconnects once when its settings changed, never when they did not.

The test makes reading the config slow on purpose: after start the config path becomes a FIFO
that the test writes only later. While simpul waits on it, data must keep flowing; once the
test writes the new config (one more device), the reload applies it and seq goes on.
"""
import json
import os
import re
import signal
import sqlite3
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
HEARTBEAT = {"name": "heartbeat", "table": "input_register", "address": 30, "type": "uint32"}


def broker_connects(b):
    """The keepalive of each CONNECT of the gateway's JSON session the broker logged."""
    return [int(k) for k in re.findall(r"New client connected from \S+ as simpul-gw-test "
                                       r"\(p\d+, c\d+, k(\d+)", b.proc.output())]


def check_seq_and_gap(sub, topic, since_ms, interval_ms, what):
    """seq +1 per message with no gap and no repeat, in arrival order; returns the largest gap
    between two consecutive data messages (their ts: poll completion) from since_ms on."""
    msgs = sub.json(topic)
    seqs = [j["seq"] for j in msgs]
    if any(b_ != a_ + 1 for a_, b_ in zip(seqs, seqs[1:])):
        raise h.Failure("%s: seq not +1 across the reload: %r" % (what, seqs[-40:]))
    ts = [j["ts"] for j in msgs if j["ts"] >= since_ms]
    gap = max(b_ - a_ for a_, b_ in zip(ts, ts[1:]))
    if gap >= interval_ms + 250:
        raise h.Failure("%s: a %d ms pause in its polls around the reload (interval %d ms)" %
                        (what, gap, interval_ms))
    return gap


class ReloadTest(h.TestCase):
    def one_pump_polling(self, pumps=1):
        """A broker, a simulator, a gateway polling pump-01 every 50 ms and a subscriber that
        has seen its first five data messages."""
        b = self.broker()
        sim = self.sim(["--counter", "--pumps", str(pumps), "--lights", "0"])
        cfg = h.base_config(self.workdir, b.port,
                            [h.tcp_device("pump-01", sim.port, [HEARTBEAT], interval_ms=50)])
        sub = self.subscriber(b.port, [P + "/+/data"])
        g = self.gateway(cfg)
        topic = P + "/pump-01/data"
        h.wait_for(lambda: len(sub.messages(topic)) >= 5, 10, "pump-01 data")
        return b, sim, cfg, sub, g, topic

    def test_config_read_off_the_loop(self):
        b, sim, cfg, sub, g, topic1 = self.one_pump_polling(pumps=2)
        # The config path becomes a FIFO: reading it blocks until the test writes it.
        os.unlink(g.config_path)
        os.mkfifo(g.config_path)
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "SIGHUP: reloading" in g.proc.output(), 5, "the reload started")
        n = len(sub.messages(topic1))
        h.wait_for(lambda: len(sub.messages(topic1)) >= n + 20, 10,
                   "data while the new config is being read")
        cfg["devices"].append(h.tcp_device("pump-02", sim.port, [HEARTBEAT], unit=2,
                                           interval_ms=50))
        text = json.dumps(cfg).encode()

        def write():
            with open(g.config_path, "wb") as f:
                f.write(text)
        t = threading.Thread(target=write, daemon=True)
        t.start()
        h.wait_for(lambda: sub.messages(P + "/pump-02/data"), 20, "pump-02 after the reload")
        t.join(5)
        seqs = sorted({j["seq"] for j in sub.json(topic1)})
        if seqs != list(range(seqs[0], seqs[-1] + 1)):
            raise h.Failure("seq gap across the reload: %r" % seqs[-20:])
        g.stop()

    def test_reload_with_a_large_store_reads_no_pages(self):
        b = self.broker()
        sim = self.sim(["--counter", "--pumps", "1", "--lights", "0"])
        cfg = h.base_config(self.workdir, b.port,
                            [h.tcp_device("pump-01", sim.port, [HEARTBEAT], interval_ms=50)])
        cfg["store"]["history_retention_h"] = 0  # keep every row: no pruning during the test
        db = cfg["store"]["path"]
        g = self.gateway(cfg, name="schema")  # creates the schema
        h.wait_for(lambda: "[store] opened" in g.proc.output(), 10, "store opened")
        g.stop()
        # Tens of MB of history (a real site holds more: quick_check time grows with it).
        con = sqlite3.connect(db)
        con.execute("PRAGMA synchronous = OFF")
        now = int(time.time() * 1000)
        # A table of its own: quick_check reads every page of every table, and the history's
        # chunks are encoded (docs/store.md), so plain rows stand in for a week of them.
        con.execute("CREATE TABLE filler (device TEXT, tag TEXT, ts_ms INTEGER, v TEXT)")
        con.executemany("INSERT INTO filler VALUES (?, ?, ?, ?)",
                        (("pump-%02d" % (i // 10000), "flow", now - 3600000 + i % 10000, str(i))
                         for i in range(300000)))
        con.commit()
        con.close()
        size = os.path.getsize(db)
        sub = self.subscriber(b.port, [P + "/pump-01/data"])
        g = self.gateway(cfg)
        topic = P + "/pump-01/data"
        h.wait_for(lambda: len(sub.messages(topic)) >= 30, 20, "data")

        def rchar():
            with open("/proc/%d/io" % g.proc.pid) as f:
                return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])
        before = rchar()
        t0 = time.monotonic()
        hup_ms = time.time() * 1000
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "config reloaded" in g.proc.output(), 20, "reload done")
        n = len(sub.messages(topic))
        h.wait_for(lambda: len(sub.messages(topic)) >= n + 10, 10, "data after the reload")
        read = rchar() - before
        # quick_check would read every page of the file; a reload must read almost nothing.
        if read > size // 10:
            raise h.Failure("the reload read %d bytes of a %d-byte store" % (read, size))
        # The largest gap between two polls of pump-01 (data ts: poll completion) from just
        # before the reload on (the first second after start has pauses of its own): the
        # engine goes on through the reload, so no pause beyond its interval.
        ts = sorted(j["ts"] for j in sub.json(topic) if j["ts"] >= hup_ms - 250)
        gap = max(b_ - a_ for a_, b_ in zip(ts, ts[1:]))
        if gap >= 50 + 250:
            raise h.Failure("a %d ms pause in the polls around the reload" % gap)
        seqs = sorted(j["seq"] for j in sub.json(topic))
        if seqs != list(range(seqs[0], seqs[-1] + 1)):
            raise h.Failure("seq gap across the reload: %r" % seqs[-20:])
        print("  store %.0f MB, reload read %.2f MB, done in %.2f s, largest gap between "
              "polls %d ms (interval 50 ms)" %
              (size / 1e6, read / 1e6, time.monotonic() - t0, gap))
        g.stop()

    def test_added_removed_changed_and_bad(self):
        b = self.broker()
        sim = self.sim(["--counter", "--pumps", "4", "--lights", "0"])
        speed = dict(h.SPEED_TAG)

        def dev(name, unit, tags=(HEARTBEAT,)):
            return h.tcp_device(name, sim.port, list(tags), unit=unit, interval_ms=50)
        cfg = h.base_config(self.workdir, b.port, [dev("pump-01", 1), dev("pump-02", 2),
                                                   dev("pump-04", 4)])
        sub = self.subscriber(b.port, [P + "/+/data"])
        g = self.gateway(cfg)
        h.wait_for(lambda: all(len(sub.messages(P + "/%s/data" % d)) >= 5
                               for d in ("pump-01", "pump-02", "pump-04")), 20, "data")
        # The three devices share one Modbus TCP connection (one endpoint, three unit ids).
        opened = g.proc.output().count("] connected\n")
        # A bad config is rejected; the running one goes on.
        with open(g.config_path, "w") as f:
            f.write('{"gateway": {"id": "gw-test"}, "devices": [{"name": "x"}]}')
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "reload rejected" in g.proc.output(), 10, "reload rejected")
        # pump-02 removed, pump-03 added, pump-04 changed (one more tag), pump-01 as it was.
        cfg["devices"] = [dev("pump-01", 1), dev("pump-03", 3), dev("pump-04", 4,
                                                                   (HEARTBEAT, speed))]
        g.config = cfg
        g.write_config()
        hup_ms = time.time() * 1000
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "config reloaded" in g.proc.output(), 20, "reload applied")
        h.wait_for(lambda: "reload complete" in g.proc.output(), 20, "replaced devices let go")
        if ("1 device(s) kept, 1 changed, 1 added, 1 removed; 1 connection(s) kept, 0 new; "
                "MQTT unchanged") not in g.proc.output():
            raise h.Failure("the reload's plan:\n" + g.proc.output()[-3000:])
        h.wait_for(lambda: sub.messages(P + "/pump-03/data"), 10, "the added device")
        h.wait_for(lambda: any("speed_rpm" in j["values"] for j in sub.json(P + "/pump-04/data")),
                   10, "the changed device's new tag")
        late = self.subscriber(b.port, [P + "/pump-02/status"])
        st = late.wait_json(P + "/pump-02/status", lambda j: j["state"] == "offline", 10,
                            "the removed device's retained offline status")
        if st.get("error") != "removed from the config":
            raise h.Failure("removed device status: %r" % st)
        n = len(sub.messages(P + "/pump-01/data"))
        h.wait_for(lambda: len(sub.messages(P + "/pump-01/data")) >= n + 20, 10,
                   "pump-01 data after the reload")
        gap = check_seq_and_gap(sub, P + "/pump-01/data", hup_ms - 250, 50, "pump-01")
        # The changed device's seq goes on from its predecessor's.
        seqs = [j["seq"] for j in sub.json(P + "/pump-04/data")]
        if any(b_ != a_ + 1 for a_, b_ in zip(seqs, seqs[1:])):
            raise h.Failure("pump-04 (changed) seq: %r" % seqs[-40:])
        # The shared connection stayed open: not closed, not opened again.
        log = g.proc.output()
        if "connection closed" in log or log.count("] connected\n") != opened:
            raise h.Failure("the shared Modbus connection was reopened:\n" + log[-3000:])
        if broker_connects(b) != [5]:
            raise h.Failure("MQTT reconnected on a reload that left it unchanged: %r" %
                            broker_connects(b))
        print("  unchanged device across a reload: largest gap between its data messages "
              "%d ms (interval 50 ms), seq +1 throughout" % gap)
        g.stop()

    def test_connection_settings_changed(self):
        """A device whose connection settings changed gets a new connection to its endpoint,
        opened only once the old one is closed (a serial line takes one master at a time)."""
        b, sim, cfg, sub, g, topic = self.one_pump_polling()
        cfg["devices"][0]["connection"]["timeout_ms"] = 700
        g.config = cfg
        g.write_config()
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "reload complete" in g.proc.output(), 10, "reload done")
        n = len(sub.messages(topic))
        h.wait_for(lambda: len(sub.messages(topic)) >= n + 10, 10, "data after the reload")
        log = g.proc.output()
        if "0 device(s) kept, 1 changed, 0 added, 0 removed; 0 connection(s) kept, 1 new" \
                not in log:
            raise h.Failure("the reload's plan:\n" + log[-3000:])
        after = log[log.index("SIGHUP: reloading"):]
        closed, opened = after.find("] connection closed"), after.find("] connected")
        if not 0 <= closed < opened:
            raise h.Failure("the new connection opened before the old one closed:\n" + after)
        seqs = [j["seq"] for j in sub.json(topic)]
        if any(b_ != a_ + 1 for a_, b_ in zip(seqs, seqs[1:])):
            raise h.Failure("seq across the replaced device: %r" % seqs[-40:])
        g.stop()

    def test_commands_on_a_replaced_device_are_answered(self):
        """Commands queued for a device a reload replaces are each answered: the one already at
        the device finishes, those still waiting are answered "cancelled" and never written."""
        b = self.broker()
        wlog = os.path.join(self.workdir, "writes.log")
        # Unit 4's speed register answers 800 ms late: a write (and its read-back) is slow.
        sim = self.sim(["--counter", "--pumps", "4", "--lights", "0", "--write-log", wlog,
                        "--delay", "4:holding_register:10:800"])
        speed = dict(h.SPEED_TAG, writable=True)

        def dev(name, unit, interval):
            return h.tcp_device(name, sim.port, [HEARTBEAT, speed], unit=unit,
                                interval_ms=interval, timeout_ms=3000)
        cfg = h.base_config(self.workdir, b.port,
                            [dev("pump-01", 1, 200), dev("pump-04", 4, 1000)])
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)
        sub.wait_json(P + "/pump-04/status", lambda j: j["state"] == "online", 20)
        for i in range(4):
            sub.publish(P + "/pump-04/cmd", json.dumps(
                {"id": "r%d" % i, "op": "write", "tag": "speed_rpm", "value": 1001 + i}))

        def writes():
            if not os.path.exists(wlog):
                return []
            with open(wlog) as f:
                return [line.split() for line in f if line.strip()]
        h.wait_for(lambda: any(w[4] == "1001" for w in writes()), 10,
                   "the first write at the device")
        cfg["devices"][1]["interval_ms"] = 900  # pump-04 changed
        g.config = cfg
        g.write_config()
        g.proc.signal(signal.SIGHUP)

        def answers():
            got = {j.get("id"): j for j in sub.json(P + "/pump-04/cmd/result")}
            return got if all("r%d" % i in got for i in range(4)) else None
        got = h.wait_for(answers, 20, "an answer to each of the 4 commands")
        if got["r0"].get("ok") is not True:
            raise h.Failure("the write already at the device: %r" % got["r0"])
        cancelled = [k for k, j in got.items()
                     if j.get("ok") is not True and j["error"]["code"] == "cancelled"]
        others = [j for k, j in got.items() if j.get("ok") is not True and k not in cancelled]
        if not cancelled or others:
            raise h.Failure("answers: %r" % got)
        if any("config reload replaced the device" not in got[k]["error"]["message"]
               for k in cancelled):
            raise h.Failure("cancelled answers: %r" % got)
        written = {w[4] for w in writes()}
        for k in cancelled:
            if str(1001 + int(k[1:])) in written:
                raise h.Failure("cancelled command %s was written: %r" % (k, writes()))
        h.wait_for(lambda: "reload complete" in g.proc.output(), 10, "the old pump-04 freed")
        g.stop()

    def test_stop_while_a_reload_drains(self):
        """SIGTERM while a replaced device's write is still at the device and its successor's
        connection waits for the old one: a clean stop all the same (exit 0; under ASan no
        leak), and the write is answered."""
        b = self.broker()
        wlog = os.path.join(self.workdir, "writes.log")
        sim = self.sim(["--counter", "--pumps", "4", "--lights", "0", "--write-log", wlog,
                        "--delay", "4:holding_register:10:800"])
        speed = dict(h.SPEED_TAG, writable=True)
        cfg = h.base_config(self.workdir, b.port, [h.tcp_device(
            "pump-04", sim.port, [HEARTBEAT, speed], unit=4, interval_ms=1000, timeout_ms=3000)])
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)
        sub.wait_json(P + "/pump-04/status", lambda j: j["state"] == "online", 20)
        sub.publish(P + "/pump-04/cmd", json.dumps(
            {"id": "s1", "op": "write", "tag": "speed_rpm", "value": 1234}))
        h.wait_for(lambda: os.path.exists(wlog) and os.path.getsize(wlog) > 0, 10,
                   "the write at the device")
        cfg["devices"][0]["connection"]["timeout_ms"] = 2500  # a new connection, after the old
        g.config = cfg
        g.write_config()
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "config reloaded" in g.proc.output(), 10, "reload applied")
        if "reload complete" in g.proc.output():
            raise h.Failure("the drain ended before the slow write did:\n" + g.proc.output())
        g.stop()
        sub.wait_json(P + "/pump-04/cmd/result", lambda j: j.get("id") == "s1", 5,
                      "the answer to the write")

    def test_fixed_keys_rejected(self):
        b, sim, cfg, sub, g, topic = self.one_pump_polling()
        cfg["store"]["path"] = os.path.join(self.workdir, "other.db")
        g.config = cfg
        g.write_config()
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "reload rejected: store.path cannot change while simpul runs"
                   in g.proc.output(), 10, "the reload rejected")
        n = len(sub.messages(topic))
        h.wait_for(lambda: len(sub.messages(topic)) >= n + 10, 10, "data after the rejection")
        if os.path.exists(cfg["store"]["path"]):
            raise h.Failure("the rejected store.path was opened")
        g.stop()

    def test_mqtt_changed_reconnects_once(self):
        b, sim, cfg, sub, g, topic = self.one_pump_polling()
        cfg["mqtt"]["keepalive_s"] = 7
        g.config = cfg
        g.write_config()
        hup_ms = time.time() * 1000
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: broker_connects(b) == [5, 7], 10, "one reconnect with keepalive 7")
        n = len(sub.messages(topic))
        h.wait_for(lambda: len(sub.messages(topic)) >= n + 20, 10, "data after the reconnect")
        if broker_connects(b) != [5, 7]:
            raise h.Failure("connects seen by the broker: %r" % broker_connects(b))
        # Polling went on through the reconnect; what waited went out of the outbox, in order.
        h.wait_for(lambda: sub.json(topic)[-1]["seq"] - sub.json(topic)[0]["seq"] + 1 ==
                   len({j["seq"] for j in sub.json(topic)}), 10, "every seq delivered")
        ts = sorted({j["ts"] for j in sub.json(topic) if j["ts"] >= hup_ms - 250})
        gap = max(b_ - a_ for a_, b_ in zip(ts, ts[1:]))
        if gap >= 50 + 250:
            raise h.Failure("a %d ms pause in the polls around an MQTT reconnect" % gap)
        g.stop()


if __name__ == "__main__":
    ReloadTest().run_all()
