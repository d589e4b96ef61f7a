"""systemd's notification protocol, observed on a test NOTIFY_SOCKET (a unix datagram socket,
bound here as systemd would), with WATCHDOG_USEC set:

- READY=1 comes once the store is open, the plugins are loaded and every device was polled once:
  its STATUS= already counts a dead device as tried and offline ("1/2 devices online");
- WATCHDOG=1 arrives every WATCHDOG_USEC / 2, from the loop;
- SIGHUP sends RELOADING=1 (with MONOTONIC_USEC) and READY=1 again once the new config runs;
  the reload never stops the loop (the store stays open), so the watchdog period stays as it
  is and the pings go on through it;
- SIGTERM sends STOPPING=1, and simpul still exits 0;
- an abstract socket name ("@name") works; WATCHDOG_PID naming another process turns pings off.
Without NOTIFY_SOCKET (every other test) simpul runs the same.

And the unit's MemoryDenyWriteExecute=yes: under the kernel's own form of it (prctl
PR_SET_MDWE, Linux 6.3+, inherited across exec) simpul still dlopen()s the Modbus plugin and
publishes data.
"""
import os
import re
import signal
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402


class NotifySocket:
    def __init__(self, path=None, abstract=None):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.s.bind("\0" + abstract)
            self.env = "@" + abstract
        else:
            self.s.bind(path)
            self.env = path
        self.s.settimeout(0.2)
        self.lock = threading.Lock()
        self.msgs = []  # (monotonic time, {key: value}, raw text)
        self.running = True
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while self.running:
            try:
                data = self.s.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            text = data.decode("utf-8", "replace")
            kv = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            with self.lock:
                self.msgs.append((time.monotonic(), kv, text))

    def all(self):
        with self.lock:
            return list(self.msgs)

    def with_key(self, key, value=None):
        return [m for m in self.all() if key in m[1] and (value is None or m[1][key] == value)]

    def wait(self, key, value=None, count=1, timeout=10.0):
        return h.wait_for(lambda: len(self.with_key(key, value)) >= count and
                          self.with_key(key, value), timeout, "%s=%s x%d" % (key, value, count))

    def close(self):
        self.running = False
        self.s.close()


def devices(port):
    return [h.tcp_device("pump-01", port, unit=1, timeout_ms=300),
            h.tcp_device("pump-02", port, unit=2, timeout_ms=300)]


class SdNotifyTest(h.TestCase):
    def start(self, env, sim_args=("--fail-unit", "2")):
        b = self.broker()
        sim = self.sim(list(sim_args))
        self.simulator = sim
        g = self.gateway(h.base_config(self.workdir, b.port, devices(sim.port)), start=False)
        e = {"SIMPUL_PLUGIN_DIR": h.PLUGIN_DIR}
        e.update(env)
        g.proc = h.Proc(g.name, [h.SIMPUL, "-c", g.config_path, "--log-level", "debug"],
                        self.workdir, env=e)
        return g

    def notify(self, **kw):
        n = NotifySocket(**kw)
        self.defer(n.close)
        return n

    def test_ready_watchdog_reload_stopping(self):
        n = self.notify(path=os.path.join(self.workdir, "notify.sock"))
        # A 1 s watchdog (pings every 0.5 s): a deadline that a loaded test machine's scheduling
        # pauses stay well inside, as a real unit's WatchdogSec does.
        g = self.start({"NOTIFY_SOCKET": n.env, "WATCHDOG_USEC": "1000000"})
        ready = n.wait("READY", "1")[0]
        status = ready[1].get("STATUS", "")
        # pump-02 never answers: READY waited for its first poll to fail.
        if not status.startswith("1/2 devices online, outbox "):
            raise h.Failure("READY's STATUS: %r" % ready[2])
        log = g.proc.output()
        if "[store] opened" not in log or "loaded modbus" not in log:
            raise h.Failure("READY before the store or the plugin:\n" + log[-3000:])
        # The watchdog: every 500 ms (half of WATCHDOG_USEC).
        t0 = time.monotonic()
        h.wait_for(lambda: len([m for m in n.with_key("WATCHDOG", "1") if m[0] > t0]) >= 6,
                   15, "6 watchdog pings")
        pings = [m[0] for m in n.with_key("WATCHDOG", "1") if m[0] > t0]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        mean = sum(gaps) / len(gaps)
        if not 0.35 <= mean <= 0.65 or max(gaps) > 1.0:
            raise h.Failure("watchdog gaps %r (want ~0.5 s, none past the 1 s deadline)" % gaps)
        # Reload.
        before = len(n.with_key("READY", "1"))
        g.proc.signal(signal.SIGHUP)
        rel = n.wait("RELOADING", "1")[0]
        if not re.fullmatch(r"[0-9]+", rel[1].get("MONOTONIC_USEC", "")):
            raise h.Failure("RELOADING without MONOTONIC_USEC: %r" % rel[2])
        again = n.wait("READY", "1", count=before + 1)[-1]
        if again[0] < rel[0]:
            raise h.Failure("READY=1 came before RELOADING=1")
        # The loop runs through the reload: no change of the watchdog period, no late ping.
        periods = [m[1]["WATCHDOG_USEC"] for m in n.with_key("WATCHDOG_USEC") if m[0] > rel[0]]
        if periods:
            raise h.Failure("watchdog period changed around the reload: %r" % periods)
        t1 = time.monotonic()
        h.wait_for(lambda: len([m for m in n.with_key("WATCHDOG", "1") if m[0] > t1]) >= 2,
                   5, "pings after the reload")
        pings = [m[0] for m in n.with_key("WATCHDOG", "1") if m[0] > rel[0] - 1.0]
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        if max(gaps) > 1.0:
            raise h.Failure("watchdog gaps around the reload %r (deadline 1 s)" % gaps)
        # Stop.
        g.proc.signal(signal.SIGTERM)
        rc = g.proc.wait(10)
        if rc != 0:
            raise h.Failure("exit %s after SIGTERM:\n%s" % (rc, g.proc.output()[-3000:]))
        stop = n.wait("STOPPING", "1", timeout=2)[0]
        late = [m for m in n.with_key("READY") if m[0] > stop[0]]
        if late:
            raise h.Failure("READY after STOPPING: %r" % late)

    def test_abstract_socket_and_status_updates(self):
        name = "simpul-test-%d-%d" % (os.getpid(), h.free_port())
        n = self.notify(abstract=name)
        g = self.start({"NOTIFY_SOCKET": n.env}, sim_args=())
        ready = n.wait("READY", "1")[0]
        if not ready[1].get("STATUS", "").startswith("2/2 devices online"):
            raise h.Failure("READY's STATUS: %r" % ready[2])
        # A STATUS= line follows a change: both devices go offline with the simulator.
        self.simulator.stop()
        n.wait("STATUS", None, timeout=15)
        h.wait_for(lambda: any(m[1]["STATUS"].startswith("0/2 devices online")
                               for m in n.with_key("STATUS")), 15, "STATUS 0/2 online")
        if n.with_key("WATCHDOG"):
            raise h.Failure("watchdog pings without WATCHDOG_USEC")
        g.stop()

    def test_watchdog_pid_of_another_process(self):
        n = self.notify(path=os.path.join(self.workdir, "notify.sock"))
        g = self.start({"NOTIFY_SOCKET": n.env, "WATCHDOG_USEC": "200000",
                        "WATCHDOG_PID": str(os.getpid())})
        ready = n.wait("READY", "1")[0]
        h.wait_for(lambda: time.monotonic() > ready[0] + 0.5, 2, "half a second")
        if n.with_key("WATCHDOG"):
            raise h.Failure("pinged although WATCHDOG_PID names another process")
        g.stop()

    def test_plugins_load_under_memory_deny_write_execute(self):
        mdwe = ("import ctypes, os, sys\n"
                "libc = ctypes.CDLL(None, use_errno=True)\n"
                "if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN\n"
                "    sys.exit('PR_SET_MDWE: errno %d' % ctypes.get_errno())\n"
                "libc.mmap.restype = ctypes.c_void_p\n"
                "rwx = libc.mmap(None, 4096, 7, 0x22, -1, 0)  # PROT_RWX, MAP_PRIVATE|ANON\n"
                "if rwx not in (None, ctypes.c_void_p(-1).value):\n"
                "    sys.exit('MDWE is not in force: a RWX mapping succeeded')\n"
                "os.execv(sys.argv[1], sys.argv[1:])  # MDWE is kept across exec\n")
        b = self.broker()
        sim = self.sim()
        sub = self.subscriber(b.port, ["simpul/gw-test/+/data"])
        cfg = h.base_config(self.workdir, b.port, devices(sim.port)[:1])
        g = self.gateway(cfg, wrapper=["/usr/bin/python3", "-c", mdwe])
        sub.wait_json("simpul/gw-test/pump-01/data", lambda j: "speed_rpm" in j["values"],
                      what="data from the dlopen()ed plugin under MDWE")
        g.stop()


if __name__ == "__main__":
    SdNotifyTest().run_all()
