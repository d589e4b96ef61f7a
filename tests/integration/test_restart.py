"""Restarts: seq keeps going across a clean restart and across SIGKILL; the state cache is kept."""
import os
import signal
import sqlite3
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402


def counter_device(port):
    return {"name": "pump-01", "protocol": "modbus", "interval_ms": 100,
            "connection": {"transport": "tcp", "host": "127.0.0.1", "port": port,
                           "unit_id": 1, "timeout_ms": 500},
            "tags": [{"name": "tick", "table": "input_register", "address": SIM_TICK_ADDR,
                      "type": "uint32"},
                     {"name": "speed_sp", "table": "holding_register", "address": 10,
                      "type": "uint16"}]}


class RestartTest(h.TestCase):
    def run_restart(self, sig):
        b = self.broker()
        sim = self.sim(["--pumps", "1", "--lights", "0"])
        cfg = h.base_config(self.workdir, b.port, [counter_device(sim.port)])
        topic = "simpul/gw-test/pump-01/data"
        sub = self.subscriber(b.port, [topic])
        g = self.gateway(cfg)
        h.wait_for(lambda: len(sub.messages(topic)) >= 5, 20, "5 messages")
        g.stop(sig)
        before = [j["seq"] for j in sub.json(topic)]
        sub.clear()
        g2 = self.gateway(cfg, name="simpul2")
        h.wait_for(lambda: len(sub.messages(topic)) >= 3, 20, "messages after restart")
        after = [j["seq"] for j in sub.json(topic)]
        g2.stop()
        # Every seq after the restart is new and consecutive (replayed ones keep their seq).
        assert min(after) > 0
        new = [s for s in after if s > max(before)]
        assert new, (before[-3:], after[:5])
        assert new == list(range(new[0], new[0] + len(new))), new
        assert new[0] == max(before) + 1 or sig == signal.SIGKILL, (max(before), new[:3])
        return max(before), after

    def test_seq_continues_after_clean_restart(self):
        last, after = self.run_restart(signal.SIGTERM)
        assert min(after) == last + 1, (last, after[:3])

    def test_seq_continues_after_sigkill(self):
        last, after = self.run_restart(signal.SIGKILL)
        # A killed gateway may have committed messages the subscriber had not seen yet; they are
        # replayed with their own seq, so nothing already published is ever reused.
        assert max(after) > last

    def run_store_lost(self, damage, cfg_extra=None, wrapper=()):
        """A store that loses its memory between two runs must never make seq repeat: what a
        platform de-duplicating on (device, seq) saw before is never shadowed."""
        b = self.broker()
        sim = self.sim(["--pumps", "1", "--lights", "0"])
        cfg = h.base_config(self.workdir, b.port, [counter_device(sim.port)])
        cfg["store"].update(cfg_extra or {})
        topic = "simpul/gw-test/pump-01/data"
        sub = self.subscriber(b.port, [topic])
        g = self.gateway(cfg)
        h.wait_for(lambda: len(sub.messages(topic)) >= 5, 20, "5 messages")
        g.stop()
        before = [j["seq"] for j in sub.json(topic)]
        sub.clear()
        damage(cfg)
        g2 = self.gateway(cfg, name="simpul2", wrapper=list(wrapper))
        h.wait_for(lambda: len(sub.messages(topic)) >= 3, 20, "messages after restart")
        after = [j["seq"] for j in sub.json(topic)]
        g2.stop()
        assert min(after) > max(before), (before[-3:], after[:3])
        assert after == list(range(after[0], after[0] + len(after))), after[:10]
        return g2

    def test_seq_never_repeats_after_store_moved_aside(self):
        def truncate(cfg):
            path = cfg["store"]["path"]
            with open(path, "r+b") as f:
                f.truncate(1000)
        g2 = self.run_store_lost(truncate)
        assert "moved" in g2.proc.output()

    def test_seq_never_repeats_with_in_memory_store(self):
        self.run_store_lost(lambda cfg: None, {"path": ":memory:"})

    def test_seq_never_repeats_with_read_only_store(self):
        # root ignores file modes, so the second run is nobody against a root-owned database.
        def read_only(cfg):
            os.chmod(self.workdir, 0o755)
            for ext in ("", "-wal", "-shm"):
                if os.path.exists(cfg["store"]["path"] + ext):
                    os.chmod(cfg["store"]["path"] + ext, 0o444)
        g2 = self.run_store_lost(read_only, wrapper=["setpriv", "--reuid=65534", "--regid=65534",
                                                     "--clear-groups"])
        assert "memory" in g2.proc.output().lower()

    def test_state_cache_survives_restart(self):
        b = self.broker()
        sim = self.sim(["--pumps", "1", "--lights", "0"])
        cfg = h.base_config(self.workdir, b.port, [counter_device(sim.port)])
        topic = "simpul/gw-test/pump-01/data"
        sub = self.subscriber(b.port, [topic])
        g = self.gateway(cfg)
        first = sub.wait_json(topic, lambda j: "speed_sp" in j["values"], 20)
        g.stop()
        db = sqlite3.connect(cfg["store"]["path"])
        rows = dict(db.execute("select tag, value_json from last_value where device='pump-01'"))
        db.close()
        assert rows.get("speed_sp") == str(first["values"]["speed_sp"]), rows
        assert "tick" in rows, rows

    def test_restored_values_are_not_history_again(self):
        # Unchanging values, several devices: after a restart each tag's last value comes back
        # from the store as its baseline, so the first poll reports everything (a full message)
        # but writes no history row for a value that did not change.
        b = self.broker()
        sim = self.sim(["--pumps", "3", "--lights", "0", "--static"])
        devs = [{"name": "pump-%02d" % u, "protocol": "modbus", "interval_ms": 100,
                 "connection": {"transport": "tcp", "host": "127.0.0.1", "port": sim.port,
                                "unit_id": u, "timeout_ms": 500},
                 "tags": [{"name": "r%d" % a, "table": "holding_register", "address": a,
                           "type": "uint16"} for a in (10, 11, 12, 13)]} for u in (1, 2, 3)]
        cfg = h.base_config(self.workdir, b.port, devs)
        sub = self.subscriber(b.port, ["simpul/gw-test/+/data"])

        def history_rows():
            db = sqlite3.connect(cfg["store"]["path"])
            try:
                # Samples in the history's chunks (a clean stop writes the open ones).
                return db.execute("select coalesce(sum(n), 0) from history_chunk").fetchone()[0]
            finally:
                db.close()

        for run in range(2):
            sub.clear()
            g = self.gateway(cfg, name="simpul%d" % run)
            for d in devs:
                topic = "simpul/gw-test/%s/data" % d["name"]
                sub.wait_json(topic, lambda j: len(j["values"]) == 4, 20, "full message " + topic)
            g.stop()
            if run == 0:
                rows = history_rows()
                assert rows == 12, rows  # one per tag: the first value of each
        assert history_rows() == rows, (rows, history_rows())


SIM_TICK_ADDR = int(os.environ.get("SIM_TICK_ADDR", "30"))



class ReloadTest(h.TestCase):
    def test_sighup_rejects_bad_and_applies_good_config(self):
        b = self.broker()
        sim = self.sim(["--pumps", "2", "--lights", "0"])
        cfg = h.base_config(self.workdir, b.port, [counter_device(sim.port)])
        sub = self.subscriber(b.port, ["simpul/gw-test/+/data"])
        g = self.gateway(cfg)
        h.wait_for(lambda: sub.json("simpul/gw-test/pump-01/data"), 20, "pump-01 data")
        # A bad config: rejected, logged, the running one keeps publishing.
        with open(g.config_path, "w") as f:
            f.write('{"gateway": {"id": "gw-test", "bogus": 1}}')
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "reload rejected" in g.proc.output(), 10, "reload rejected")
        # The problems are logged one line each, after the "rejected" line.
        h.wait_for(lambda: "gateway.bogus: unknown key" in g.proc.output(), 5, "the problem")
        n = len(sub.json("simpul/gw-test/pump-01/data"))
        h.wait_for(lambda: len(sub.json("simpul/gw-test/pump-01/data")) >= n + 5, 10,
                   "data after the rejected reload")
        # A good config with a second device: applied.
        d2 = counter_device(sim.port)
        d2["name"] = "pump-02"
        d2["connection"]["unit_id"] = 2
        cfg["devices"].append(d2)
        g.config = cfg
        g.write_config()
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: sub.json("simpul/gw-test/pump-02/data"), 20, "pump-02 after reload")
        assert g.proc.alive()
        # seq of pump-01 went on across the reload.
        seqs = sorted({j["seq"] for j in sub.json("simpul/gw-test/pump-01/data")})
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), seqs[-10:]
        assert g.stop() == 0


class AllTests(RestartTest, ReloadTest):
    pass


if __name__ == "__main__":
    AllTests().run_all()
