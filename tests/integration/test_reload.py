"""SIGHUP: the new config is read and its plugins loaded off the loop, so polling and
publishing go on while a reload is prepared; and a reload does not read the whole store again
(PRAGMA quick_check runs at start only), so a big store costs a reload nothing.

The test makes reading the config slow on purpose: after start the config path becomes a FIFO
that the test writes only later. While simpul waits on it, data must keep flowing; once the
test writes the new config (one more device), the reload applies it and seq goes on.
"""
import json
import os
import signal
import sqlite3
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
HEARTBEAT = {"name": "heartbeat", "table": "input_register", "address": 30, "type": "uint32"}


class ReloadTest(h.TestCase):
    def test_config_read_off_the_loop(self):
        b = self.broker()
        sim = self.sim(["--counter", "--pumps", "2", "--lights", "0"])
        cfg = h.base_config(self.workdir, b.port,
                            [h.tcp_device("pump-01", sim.port, [HEARTBEAT], interval_ms=50)])
        sub = self.subscriber(b.port, [P + "/+/data"])
        g = self.gateway(cfg)
        topic1 = P + "/pump-01/data"
        h.wait_for(lambda: len(sub.messages(topic1)) >= 5, 10, "pump-01 data")
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
        h.wait_for(lambda: len(sub.messages(topic)) >= 10, 20, "data")

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
        # The largest gap between two polls of pump-01 (data ts: poll completion) from a second
        # before the reload on: the engine restart is the only pause left.
        ts = sorted(j["ts"] for j in sub.json(topic) if j["ts"] >= hup_ms - 1000)
        gap = max(b_ - a_ for a_, b_ in zip(ts, ts[1:]))
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
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "config reloaded" in g.proc.output(), 20, "reload applied")
        h.wait_for(lambda: sub.messages(P + "/pump-03/data"), 10, "the added device")
        h.wait_for(lambda: any("speed_rpm" in j["values"] for j in sub.json(P + "/pump-04/data")),
                   10, "the changed device's new tag")
        late = self.subscriber(b.port, [P + "/pump-02/status"])
        st = late.wait_json(P + "/pump-02/status", lambda j: j["state"] == "offline", 10,
                            "the removed device's retained offline status")
        if st.get("error") != "removed from the config":
            raise h.Failure("removed device status: %r" % st)
        seqs = sorted(j["seq"] for j in sub.json(P + "/pump-01/data"))
        if seqs != list(range(seqs[0], seqs[-1] + 1)):
            raise h.Failure("seq gap for the unchanged device: %r" % seqs[-20:])
        g.stop()


if __name__ == "__main__":
    ReloadTest().run_all()
