"""Store-and-forward: nothing accepted is lost across broker outages, restarts and kill -9.

A real mosquitto with persistence plays the central broker; the platform's subscriber has a
persistent session (clean_session false), so it receives what was queued for it while the
broker was down. simpul-sim's heartbeat register changes every 100 ms, so every poll produces a
new data message.
"""
import json
import os
import signal
import sqlite3
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
HEARTBEAT = 30  # input registers 30-31 of every simulated unit (docs/simulator.md)


def hb_device(name, port, unit, interval=100):
    return {"name": name, "protocol": "modbus", "interval_ms": interval,
            "connection": {"transport": "tcp", "host": "127.0.0.1", "port": port,
                           "unit_id": unit, "timeout_ms": 500},
            "tags": [{"name": "heartbeat", "table": "input_register", "address": HEARTBEAT,
                      "type": "uint32"}]}


def query(cfg, sql):
    db = sqlite3.connect("file:%s?mode=ro" % cfg["store"]["path"], uri=True, timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def outbox_rows(cfg):
    """Messages waiting in the outbox (single rows and packs)."""
    return len(h.outbox_messages(cfg["store"]["path"]))


def db_seqs(cfg):
    """Each device's highest seq the database knows: device_seq is written only at a clean stop
    and when a reservation moves (docs/store.md), the outage's backlog is in the outbox."""
    out = dict(query(cfg, "select device, seq from device_seq"))
    for _, dev, seq, _, _ in h.outbox_messages(cfg["store"]["path"]):
        out[dev] = max(out.get(dev, 0), seq)
    return out


def seqs_by_device(sub, devices):
    out = {}
    for d in devices:
        out[d] = sorted({j["seq"] for j in sub.json("%s/%s/data" % (P, d))})
    return out


def assert_no_gap(seqs, what):
    assert seqs, what + ": no messages"
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    assert not missing, "%s: %d missing seqs, first %s" % (what, len(missing), missing[:10])


class OutboxTest(h.TestCase):
    def setup(self, ndev=3, store_extra=None, gw_extra=None):
        self.b = self.broker(persistence=True)
        self.simu = self.sim(["--pumps", str(ndev), "--lights", "0"])
        self.devices = ["pump-%02d" % u for u in range(1, ndev + 1)]
        cfg = h.base_config(self.workdir, self.b.port,
                            [hb_device(d, self.simu.port, u + 1)
                             for u, d in enumerate(self.devices)])
        if store_extra:
            cfg["store"].update(store_extra)
        if gw_extra:
            cfg["gateway"].update(gw_extra)
        self.cfg = cfg
        self.sub = self.subscriber(self.b.port, [P + "/+/data", P + "/metrics"],
                                   client_id="platform-%d" % self.b.port, clean_session=False)
        return cfg

    def restart_broker(self):
        port = self.b.port
        self.b.stop()
        self.b = h.Broker(self.workdir, port, persistence=True).start()
        self.defer(self.b.stop)

    def wait_all_caught_up(self, timeout=60, allow_gaps=False):
        # Everything the gateway had produced when the broker came back must arrive, with no
        # hole: the seqs in the store are the high-water marks.
        target = db_seqs(self.cfg)

        def done():
            s = seqs_by_device(self.sub, self.devices)
            for d in self.devices:
                got = s[d]
                if not got or got[-1] < target.get(d, 0):
                    return False
                if not allow_gaps and len(got) != got[-1] - got[0] + 1:
                    return False
            return not allow_gaps or outbox_rows(self.cfg) < 5
        h.wait_for(done, timeout, "every seq up to %s delivered" % target)

    def test_broker_outage_30s_no_gap(self):
        cfg = self.setup()
        self.gateway(cfg)
        h.wait_for(lambda: all(len(v) >= 5 for v in seqs_by_device(self.sub, self.devices).values()),
                   20, "live data")
        self.b.stop()
        t0 = time.monotonic()
        # The outage lasts 30 s (the test's subject); meanwhile the outbox must fill.
        h.wait_for(lambda: time.monotonic() - t0 >= 30 and outbox_rows(cfg) >= 300, 60,
                   "a 30 s outage with messages queued")
        queued = outbox_rows(cfg)
        seen_before = sum(len(v) for v in seqs_by_device(self.sub, self.devices).values())
        self.restart_broker()
        self.wait_all_caught_up()
        s = seqs_by_device(self.sub, self.devices)
        for d in self.devices:
            assert_no_gap(s[d], d)
        total = sum(len(v) for v in s.values())
        assert total - seen_before >= queued, (total, seen_before, queued)
        # Replayed messages keep their original ts: the ts of consecutive seqs increase.
        for d in self.devices:
            msgs = {}
            for j in self.sub.json("%s/%s/data" % (P, d)):
                msgs[j["seq"]] = j["ts"]
            ordered = [msgs[k] for k in sorted(msgs)]
            assert ordered == sorted(ordered), d

    def test_outage_and_sigkill_no_gap(self):
        cfg = self.setup()
        g = self.gateway(cfg)
        h.wait_for(lambda: all(len(v) >= 5 for v in seqs_by_device(self.sub, self.devices).values()),
                   20, "live data")
        self.b.stop()
        h.wait_for(lambda: outbox_rows(cfg) >= 100, 30, "messages queued during the outage")
        g.stop(signal.SIGKILL)
        g2 = self.gateway(cfg, name="simpul2")
        # The restarted gateway keeps queueing (the broker is still down) ...
        n0 = outbox_rows(cfg)
        h.wait_for(lambda: outbox_rows(cfg) >= n0 + 50, 30, "new messages queued after restart")
        self.restart_broker()
        self.wait_all_caught_up()
        s = seqs_by_device(self.sub, self.devices)
        for d in self.devices:
            assert_no_gap(s[d], d)
        g2.stop()

    def test_tiny_outbox_drops_oldest_and_counts(self):
        # 0.01 MB = 10485 bytes on disk: about 150 heartbeat messages as single rows, about
        # ten times as many in the packs of an outage (docs/store.md, "Outbox packs").
        cfg = self.setup(ndev=10, store_extra={"outbox_max_mb": 0.01},
                         gw_extra={"metrics_interval_s": 1})
        self.gateway(cfg)
        h.wait_for(lambda: all(len(v) >= 3 for v in seqs_by_device(self.sub, self.devices).values()),
                   20, "live data")
        self.b.stop()
        # Read after the broker stopped: nothing reaches the subscriber after that, so the last
        # seq seen is the last one the broker took before the outage began.
        before = {d: v[-1] for d, v in seqs_by_device(self.sub, self.devices).items()}
        # Long enough to overflow the outbox about twice over.
        db_seq = lambda: sum(db_seqs(cfg).values())  # noqa: E731
        start_sum = db_seq()
        h.wait_for(lambda: db_seq() - start_sum >= 3000, 60, "3000 messages produced")
        self.restart_broker()
        self.wait_all_caught_up(90, allow_gaps=True)

        def dropped_metric():
            m = self.sub.json(P + "/metrics")
            return m[-1]["dropped"] if m and m[-1]["dropped"] > 0 else None
        dropped = h.wait_for(dropped_metric, 20, "metrics with a drop count")
        # Missing seqs per device (after the last one seen before the outage) add up to the
        # drop count; what survived is the newest part of each device's sequence.
        missing = 0
        s = seqs_by_device(self.sub, self.devices)
        for d in self.devices:
            after = [x for x in s[d] if x > before[d]]
            gap = sorted(set(range(before[d] + 1, after[-1] + 1)) - set(after))
            missing += len(gap)
            if gap:
                assert gap == list(range(gap[0], gap[-1] + 1)), "one hole per device: %s" % gap[:5]
                assert gap[0] <= before[d] + 2, "the oldest were dropped (%s, %s)" % (gap[0], before[d])
        m = self.sub.json(P + "/metrics")[-1]
        assert missing == m["dropped"], (missing, m)
        assert dropped > 0

    def test_history_window_exact(self):
        cfg = self.setup(ndev=1)
        self.sub2 = self.subscriber(self.b.port, [P + "/+/cmd/result"])
        self.gateway(cfg)
        h.wait_for(lambda: len(self.sub.json(P + "/pump-01/data")) >= 30, 20, "30 changes")
        msgs = self.sub.json(P + "/pump-01/data")
        lo, hi = msgs[5]["ts"], msgs[25]["ts"]
        want = [[j["ts"], j["values"]["heartbeat"]] for j in msgs if lo <= j["ts"] < hi]
        got = []
        frm = lo
        page = 0
        while True:
            cid = "h%d" % page
            self.sub2.publish(P + "/pump-01/cmd", json.dumps(
                {"id": cid, "op": "history", "tag": "heartbeat", "from": frm, "to": hi,
                 "limit": 7}))
            r = self.sub2.wait_json(P + "/pump-01/cmd/result", lambda j, c=cid: j["id"] == c, 10)
            assert r["ok"] is True, r
            got += r["values"]
            if "next" not in r:
                break
            frm = r["next"]
            page += 1
        assert got == want, (got[:3], want[:3], len(got), len(want))
        assert page >= 2

    def test_truncated_database_moved_aside(self):
        cfg = self.setup(ndev=1)
        g = self.gateway(cfg)
        h.wait_for(lambda: len(self.sub.json(P + "/pump-01/data")) >= 3, 20, "data")
        g.stop()
        path = cfg["store"]["path"]
        with open(path, "rb") as f:
            head = f.read(1000)
        for ext in ("", "-wal", "-shm"):
            if os.path.exists(path + ext):
                os.unlink(path + ext)
        with open(path, "wb") as f:
            f.write(head)
        self.sub.clear()
        g2 = self.gateway(cfg, name="simpul2")
        h.wait_for(lambda: len(self.sub.json(P + "/pump-01/data")) >= 3, 20, "data after restart")
        aside = [f for f in os.listdir(os.path.dirname(path)) if ".corrupt-" in f]
        assert aside, os.listdir(os.path.dirname(path))
        assert "corrupt" in g2.proc.output() or "moved" in g2.proc.output()

    def test_unwritable_database_keeps_publishing(self):
        # root ignores file modes, so simpul runs as nobody against a root-owned database.
        cfg = self.setup(ndev=1)
        g = self.gateway(cfg)
        h.wait_for(lambda: len(self.sub.json(P + "/pump-01/data")) >= 3, 20, "data")
        g.stop()
        os.chmod(self.workdir, 0o755)
        for ext in ("", "-wal", "-shm"):
            if os.path.exists(cfg["store"]["path"] + ext):
                os.chmod(cfg["store"]["path"] + ext, 0o444)
        self.sub.clear()
        g2 = self.gateway(cfg, name="simpul-ro",
                          wrapper=["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"])
        h.wait_for(lambda: len(self.sub.json(P + "/pump-01/data")) >= 5, 20, "live data, read-only db")
        out = g2.proc.output()
        assert "memory" in out.lower(), out[-2000:]

    def test_full_disk_keeps_publishing(self):
        # RLIMIT_FSIZE makes every write past 256 KiB fail with EFBIG, as a full disk would.
        cfg = self.setup(ndev=2)
        cfg["devices"][0]["tags"].append({"name": "name", "table": "input_register",
                                          "address": 20, "type": "string", "length": 8})
        g = self.gateway(cfg, wrapper=["prlimit", "--fsize=262144"], log_level="warn")
        h.wait_for(lambda: sum(len(v) for v in seqs_by_device(self.sub, self.devices).values())
                   >= 50, 20, "data")
        # Fill the database until it cannot grow, then check that live data still flows.
        def store_failing():
            return "store" in g.proc.output() and ("full" in g.proc.output().lower() or
                                                    "too large" in g.proc.output().lower() or
                                                    "i/o" in g.proc.output().lower())
        h.wait_for(store_failing, 120, "the store to hit the size limit")
        n = len(self.sub.json(P + "/pump-01/data"))
        h.wait_for(lambda: len(self.sub.json(P + "/pump-01/data")) >= n + 20, 20,
                   "live data while the store fails")
        assert g.proc.alive()


if __name__ == "__main__":
    OutboxTest().run_all()
