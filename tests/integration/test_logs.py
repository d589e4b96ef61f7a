"""Logs that cannot hurt: a stalled stderr (a journald that stops reading, a full pipe) costs
dropped log lines, counted in metrics, never a stalled gateway.

simpul runs with --log-level debug (a line per MQTT packet) and its stderr on a pipe of 4 KiB
that the test does not read. Once the pipe is full, polling and publishing must go on at their
pace, P/G/metrics must count the dropped lines under "log", a SIGTERM must still stop simpul
with exit 0 within the contract's 5 s, and once the pipe is read again the writer says how many
lines it dropped.

And a repeated error is logged once per episode: a device that stays unreachable is reported
offline once however many polls fail, and its recovery is one line with the count.
"""
import re
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
F_SETPIPE_SZ = 1031


def pending(fd):
    import array
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


class LogsTest(h.TestCase):
    def start_flooding(self):
        b = self.broker()
        sim = self.sim(["--counter", "--pumps", "1", "--lights", "0"])
        heartbeat = {"name": "heartbeat", "table": "input_register", "address": 30,
                     "type": "uint32"}
        dev = h.tcp_device("pump-01", sim.port, [heartbeat], interval_ms=20)
        cfg = h.base_config(self.workdir, b.port, [dev])
        cfg["gateway"]["metrics_interval_s"] = 1
        path = os.path.join(self.workdir, "simpul.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        sub = self.subscriber(b.port, [P + "/pump-01/data", P + "/metrics"])
        r, wfd = os.pipe()
        fcntl.fcntl(wfd, F_SETPIPE_SZ, 4096)
        self.pipe_size = fcntl.fcntl(wfd, 1032)  # F_GETPIPE_SZ
        p = subprocess.Popen([h.SIMPUL, "-c", path, "--log-level", "debug"], stdin=subprocess.DEVNULL,
                             stdout=wfd, stderr=wfd,
                             env=dict(os.environ, SIMPUL_PLUGIN_DIR=h.PLUGIN_DIR))
        os.close(wfd)
        self.defer(os.close, r)
        self.defer(lambda: p.poll() is None and (p.kill(), p.wait()))
        # The pipe fills within moments: from then on every write to it would block.
        h.wait_for(lambda: pending(r) >= self.pipe_size - 1024, 10, "stderr pipe full")
        return p, r, sub

    def data_count(self, sub):
        return len(sub.messages(P + "/pump-01/data"))

    def test_stalled_stderr_does_not_stop_polling(self):
        p, r, sub = self.start_flooding()
        # Polls every 20 ms, a data message each (the heartbeat counts reads): 50 more in at
        # most 10 s proves the loop runs while nothing reads its log.
        n0 = self.data_count(sub)
        t0 = time.monotonic()
        h.wait_for(lambda: self.data_count(sub) >= n0 + 50, 10, "polling with stderr stalled")
        if pending(r) < self.pipe_size - 1024:
            raise h.Failure("the pipe drained: the test did not stall stderr")
        rate = 50 / (time.monotonic() - t0)

        def dropped():
            for m in sub.json(P + "/metrics"):
                if m.get("log", {}).get("dropped", 0) > 0:
                    return m["log"]
            return None
        # The writer's buffer (64 KiB) fills at the flood's pace, then lines are dropped.
        t1 = time.monotonic()
        log = h.wait_for(dropped, 60, "metrics log.dropped > 0")
        print("  buffer full after %.1f s" % (time.monotonic() - t1))
        if log["lines"] < log["dropped"]:
            raise h.Failure("log counters: %r" % log)
        # Read the pipe again: the writer catches up and says what it dropped.
        out = bytearray()
        stop = threading.Event()

        def drain():
            while not stop.is_set():
                try:
                    chunk = os.read(r, 65536)
                except OSError:
                    return
                if not chunk:
                    return
                out.extend(chunk)
        t = threading.Thread(target=drain, daemon=True)
        t.start()
        h.wait_for(lambda: b"line(s) dropped: stderr did not keep up" in bytes(out), 10,
                   "the dropped-lines report")
        p.send_signal(signal.SIGTERM)
        rc = p.wait(10)
        stop.set()
        if rc != 0:
            raise h.Failure("exit %s after SIGTERM:\n%s" % (rc, bytes(out)[-3000:].decode()))
        print("  %.0f data messages/s with stderr stalled; metrics log %r" % (rate, log))

    def test_sigterm_with_stderr_stalled(self):
        p, r, sub = self.start_flooding()
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            rc = p.wait(10)
        except subprocess.TimeoutExpired:
            raise h.Failure("no exit within 10 s of SIGTERM with stderr stalled")
        took = time.monotonic() - t0
        if rc != 0 or took > 5.0:
            raise h.Failure("SIGTERM with stderr stalled: exit %s after %.1f s" % (rc, took))

    def test_repeated_error_logged_once_per_episode(self):
        b = self.broker()
        sim = self.sim(["--pumps", "1", "--lights", "0"])
        dev = h.tcp_device("pump-01", sim.port, interval_ms=50, timeout_ms=200)
        cfg = h.base_config(self.workdir, b.port, [dev])
        cfg["gateway"]["metrics_interval_s"] = 1
        sub = self.subscriber(b.port, [P + "/metrics"])
        g = self.gateway(cfg, log_level="info")
        h.wait_for(lambda: "[modbus:pump-01] online" in g.proc.output(), 10, "online")
        port = sim.port
        sim.stop()
        h.wait_for(lambda: "[modbus:pump-01] offline: " in g.proc.output(), 10, "offline")
        again = h.Sim(self.workdir, ["--pumps", "1", "--lights", "0"], port, "sim2")
        # Let failures pile up (metrics count them), then bring the device back.
        sub.wait_json(P + "/metrics", lambda j: j["poll_errors"] >= 3, 15, "3 failed polls")
        again.start()
        self.defer(again.stop)
        m = h.wait_for(lambda: re.search(r"\[modbus:pump-01\] online again after (\d+) failed "
                                         r"poll\(s\) in ([0-9.]+) s", g.proc.output()), 20,
                       "the recovery line")
        out = g.proc.output()
        if out.count("[modbus:pump-01] offline: ") != 1 or int(m.group(1)) < 2:
            raise h.Failure("episode not logged once with its count:\n" + out[-3000:])
        g.stop()


if __name__ == "__main__":
    LogsTest().run_all()
