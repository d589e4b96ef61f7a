"""The history command over chunked history: exact windows, paging, open chunks, restarts.

simpul-sim's heartbeat changes every 100 ms, so every poll records one history sample and sends
one data message with the same ts and value: the data messages the platform received are the
reference for what the history must return. `history_chunk_max_s` is 1 s, so a few seconds of
polling spread the samples over many stored chunks plus the open one (not yet in SQLite).
"""
import json
import os
import signal
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
HEARTBEAT = 30  # input registers 30-31 of every simulated unit (docs/simulator.md)


def device(port):
    return {"name": "pump-01", "protocol": "modbus", "interval_ms": 100,
            "connection": {"transport": "tcp", "host": "127.0.0.1", "port": port,
                           "unit_id": 1, "timeout_ms": 500},
            "tags": [{"name": "heartbeat", "table": "input_register", "address": HEARTBEAT,
                      "type": "uint32"}]}


def stored_chunks(cfg):
    db = sqlite3.connect("file:%s?mode=ro" % cfg["store"]["path"], uri=True, timeout=5)
    try:
        return db.execute("select count(*), coalesce(sum(n), 0) from history_chunk").fetchone()
    finally:
        db.close()


class HistoryTests(h.TestCase):
    def setup(self, store_extra=None):
        self.b = self.broker(persistence=True)
        self.simu = self.sim(["--pumps", "1", "--lights", "0"])
        cfg = h.base_config(self.workdir, self.b.port, [device(self.simu.port)])
        cfg["store"].update({"history_chunk_max_s": 1, "history_retention_h": 0})
        cfg["store"].update(store_extra or {})
        self.cfg = cfg
        cfg["gateway"]["metrics_interval_s"] = 1
        self.sub = self.subscriber(self.b.port, [P + "/+/data", P + "/+/cmd/result", P + "/metrics"],
                                   client_id="platform-%d" % self.b.port, clean_session=False)
        self.ncmd = 0
        return cfg

    def reference(self):
        """(ts, heartbeat) of every change the data messages carried, once per seq. The first
        message after a start carries every tag; it is a change only if the value moved."""
        seen = {}
        for j in self.sub.json(P + "/pump-01/data"):
            if "heartbeat" in j.get("values", {}):
                seen[j["seq"]] = [j["ts"], j["values"]["heartbeat"]]
        out, prev = [], None
        for seq in sorted(seen):
            if seen[seq][1] != prev:
                out.append(seen[seq])
            prev = seen[seq][1]
        return sorted(out)

    def history(self, frm, to, limit):
        """Pages through [frm, to) as an operator would, following `next`."""
        got, pages = [], 0
        while True:
            self.ncmd += 1
            cid = "h%d" % self.ncmd
            self.sub.publish(P + "/pump-01/cmd", json.dumps(
                {"id": cid, "op": "history", "tag": "heartbeat", "from": frm, "to": to,
                 "limit": limit}))
            r = self.sub.wait_json(P + "/pump-01/cmd/result", lambda j, c=cid: j["id"] == c, 10)
            assert r["ok"] is True, r
            assert len(r["values"]) <= limit
            got += r["values"]
            pages += 1
            if "next" not in r:
                return got, pages
            assert len(r["values"]) == limit, r
            frm = r["next"]

    def check_window(self, lo_i, hi_i, limit):
        ref = self.reference()
        lo, hi = ref[lo_i][0], ref[hi_i][0]
        want = [x for x in ref if lo <= x[0] < hi]
        got, pages = self.history(lo, hi, limit)
        assert got == want, ([x for x in want if x not in got][:5],
                             [x for x in got if x not in want][:5], len(got), len(want))
        return pages

    def wait_messages(self, n, what):
        h.wait_for(lambda: len(self.reference()) >= n, 30, what)

    def test_window_across_chunks_and_open_chunk(self):
        cfg = self.setup()
        self.gateway(cfg)
        self.wait_messages(45, "45 changes")
        # Several chunks are in SQLite by now, and the newest samples only in the open one.
        h.wait_for(lambda: stored_chunks(cfg)[0] >= 3, 10, "chunks stored")
        n = len(self.reference())
        assert self.check_window(2, n - 1, 7) >= 5
        # Everything received so far, the newest included (a window ending in the future).
        ref = self.reference()
        got, _ = self.history(ref[0][0], ref[-1][0] + 1, 1000)
        assert got[:len(ref)] == ref, (len(got), len(ref))
        # An empty window and a one-sample window are exact too.
        got, _ = self.history(ref[3][0] + 1, ref[4][0], 10)
        assert got == [], got
        got, _ = self.history(ref[3][0], ref[3][0] + 1, 10)
        assert got == [ref[3]], got
        # The metrics count the samples, open chunks included, and the bytes stored.
        n = len(self.reference())
        m = self.sub.wait_json(P + "/metrics",
                               lambda j: j["store"]["history_samples"] >= n, 10, "metrics")
        assert m["store"]["history_bytes"] > 0, m

    def test_window_across_clean_restart(self):
        cfg = self.setup()
        g = self.gateway(cfg)
        self.wait_messages(20, "20 changes")
        assert g.stop() == 0
        # A clean stop writes the open chunks: everything is in SQLite, the staging file gone.
        before = len(self.reference())
        assert stored_chunks(cfg)[1] >= before, (stored_chunks(cfg), before)
        stage = [f for f in os.listdir(cfg["store"]["runtime_dir"]) if f.endswith(".stage")]
        assert stage == [], stage
        self.gateway(cfg, name="simpul2")
        self.wait_messages(before + 20, "20 more changes after the restart")
        self.check_window(0, len(self.reference()) - 1, 9)

    def test_window_across_kill9(self):
        cfg = self.setup()
        g = self.gateway(cfg)
        self.wait_messages(25, "25 changes")
        g.stop(signal.SIGKILL)
        # The open chunks were only in the staging file (tmpfs): the restart recovers them.
        stage = [f for f in os.listdir(cfg["store"]["runtime_dir"]) if f.endswith(".stage")]
        assert len(stage) == 1, stage
        killed_at = len(self.reference())
        g2 = self.gateway(cfg, name="simpul2")
        h.wait_for(lambda: "history chunks from" in g2.proc.output(), 10, "history recovery logged")
        self.wait_messages(killed_at + 20, "20 more changes after the restart")
        # Every message sent before the kill (replayed from the outbox if need be) has its
        # sample in the history, once; and so has every one after. A sample may be there
        # without its message: recorded in the staging file, its message's commit cut by the
        # kill (that message was never published).
        ref = self.reference()
        got, _ = self.history(ref[0][0], ref[-1][0], 50)
        want = [x for x in ref if x[0] < ref[-1][0]]
        extra = [x for x in got if x not in want]
        missing = [x for x in want if x not in got]
        assert not missing, (missing[:5], len(missing))
        assert len(extra) <= 3, extra
        assert len(set(map(tuple, got))) == len(got), "a sample recovered twice"
        assert g2.stop() == 0

    def test_tiny_size_bound_holds(self):
        # Ten pumps, five changing tags each: ~500 samples/s, ~50 chunks closing per second.
        self.b = self.broker()
        self.simu = self.sim(["--pumps", "10", "--lights", "0"])
        tags = [("heartbeat", HEARTBEAT, "uint32", None), ("flow_m3h", 0, "float32", "CDAB"),
                ("pressure_bar", 2, "float32", "ABCD"), ("current_a", 4, "float32", "BADC"),
                ("actual_rpm", 6, "uint16", None)]
        devices = []
        for u in range(1, 11):
            d = device(self.simu.port)
            d["name"] = "pump-%02d" % u
            d["connection"]["unit_id"] = u
            d["tags"] = [dict({"name": n, "table": "input_register", "address": a, "type": t},
                              **({"order": o} if o else {})) for n, a, t, o in tags]
            devices.append(d)
        cfg = h.base_config(self.workdir, self.b.port, devices)
        bound = 0.05 * 1024 * 1024
        cfg["store"].update({"history_chunk_max_s": 1, "history_max_mb": 0.05})
        g = self.gateway(cfg)

        def oldest_pruned():
            try:
                db = sqlite3.connect("file:%s?mode=ro" % cfg["store"]["path"], uri=True,
                                     timeout=5)
                try:
                    return db.execute("select min(rowid) from history_chunk").fetchone()[0] or 0
                finally:
                    db.close()
            except sqlite3.Error:
                return 0  # not created yet
        # Well past the first prune: the bound has been holding for a while.
        h.wait_for(lambda: oldest_pruned() > 400, 60, "400 chunks pruned")
        assert g.stop() == 0
        db = sqlite3.connect(cfg["store"]["path"])
        try:
            used = db.execute("select coalesce(sum(pgsize), 0) from dbstat where name in"
                              " ('history_chunk', 'history_chunk_by_time')").fetchone()[0]
            rows, samples = db.execute("select count(*), sum(n) from history_chunk").fetchone()
        finally:
            db.close()
        print("history on disk %d bytes (bound %d), %d chunks, %d samples"
              % (used, bound, rows, samples))
        assert used <= bound, used
        assert rows > 0


if __name__ == "__main__":
    HistoryTests().run_all()
