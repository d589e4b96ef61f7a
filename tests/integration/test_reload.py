"""SIGHUP: the new config is read and its plugins loaded off the loop, so polling and
publishing go on while a reload is prepared.

The test makes reading the config slow on purpose: after start the config path becomes a FIFO
that the test writes only later. While simpul waits on it, data must keep flowing; once the
test writes the new config (one more device), the reload applies it and seq goes on.
"""
import json
import os
import signal
import sys
import threading

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


if __name__ == "__main__":
    ReloadTest().run_all()
