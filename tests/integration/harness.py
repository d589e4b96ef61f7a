"""Shared pieces of simpul's integration tests: real processes on 127.0.0.1.

Everything here waits on a condition with a deadline; nothing sleeps to synchronise.
Every process is started on a free port and stopped by its PID.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import paho.mqtt.client as mqtt

SIMPUL = os.environ.get("SIMPUL", "build/gateway/simpul")
SIMPUL_SIM = os.environ.get("SIMPUL_SIM", "build/tests/sim/simpul-sim")
PLUGIN_DIR = os.environ.get("SIMPUL_PLUGIN_DIR", "build/protocols/modbus")
SOURCE_ROOT = os.environ.get(
    "SIMPUL_SOURCE_ROOT", os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
)
HERE = os.path.dirname(os.path.abspath(__file__))
SIGTERM = signal.SIGTERM


class Failure(AssertionError):
    pass


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(cond, timeout=10.0, what="condition", interval=0.01):
    """Polls cond() until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise Failure("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def wait_port(port, timeout=10.0, proc=None):
    def up():
        if proc is not None and proc.poll() is not None:
            raise Failure("process exited with %s before listening on %d" % (proc.returncode, port))
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for(up, timeout, "port %d" % port)


class Proc:
    """A child process with its output captured to a file (shown when a test fails)."""

    def __init__(self, name, argv, workdir, env=None):
        self.name = name
        self.argv = argv
        self.log_path = os.path.join(workdir, name + ".log")
        self.log = open(self.log_path, "ab")
        e = dict(os.environ)
        if env:
            e.update(env)
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=e,
                                  stdin=subprocess.DEVNULL)

    @property
    def pid(self):
        return self.p.pid

    def alive(self):
        return self.p.poll() is None

    def signal(self, sig):
        if self.alive():
            os.kill(self.p.pid, sig)

    def wait(self, timeout=10.0):
        try:
            return self.p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failure("%s did not exit within %.1fs" % (self.name, timeout))

    def stop(self, sig=None, timeout=10.0):
        # `signal` here would be the method above, not the module: resolve the default late.
        sig = SIGTERM if sig is None else sig
        if self.alive():
            os.kill(self.p.pid, sig)
            try:
                self.p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()
        return self.p.returncode

    def output(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""


class Broker:
    """A real mosquitto on a free loopback port, configured not to drop queued messages."""

    def __init__(self, workdir, port=None, persistence=False):
        self.workdir = workdir
        self.port = port or free_port()
        self.persistence = persistence
        self.proc = None

    def start(self):
        conf = os.path.join(self.workdir, "mosquitto-%d.conf" % self.port)
        with open(conf, "w") as f:
            f.write("listener %d 127.0.0.1\nallow_anonymous true\n" % self.port)
            f.write("max_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\n")
            if self.persistence:
                # Persistent sessions survive a broker restart (the platform's subscriber).
                pdir = os.path.join(self.workdir, "mosquitto-data")
                os.makedirs(pdir, exist_ok=True)
                os.chmod(self.workdir, 0o755)
                os.chmod(pdir, 0o777)
                f.write("persistence true\npersistence_location %s/\nautosave_interval 0\n" % pdir)
            else:
                f.write("persistence false\n")
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = Proc("mosquitto-%d" % self.port, [exe, "-c", conf], self.workdir)
        wait_port(self.port, 10, self.proc.p)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc:
            self.proc.stop(sig)
            self.proc = None


class Subscriber:
    """A paho client that records every message, keyed by topic, in arrival order."""

    def __init__(self, port, topics, protocol=mqtt.MQTTv311, client_id=None, clean_session=True):
        self.lock = threading.Lock()
        self.msgs = []  # (topic, payload bytes, retain, properties)
        self.port = port
        self.connected = threading.Event()
        self.protocol = protocol
        kw = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean_session}
        self.c = mqtt.Client(client_id=client_id or "t-%d-%d" % (os.getpid(), free_port()),
                             protocol=protocol, **kw)
        self.c.reconnect_delay_set(min_delay=1, max_delay=2)
        self.c.on_message = self._on_message
        self.c.on_connect = self._on_connect
        self.c.on_subscribe = self._on_subscribe
        self.topics = topics
        self.pending = set()  # mids of SUBSCRIBEs without their SUBACK yet
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        # Subscribed, not only connected: a message published after this returns is seen.
        wait_for(self.connected.is_set, 10, "subscriber connected and subscribed")

    def _on_connect(self, c, userdata, flags, rc, properties=None):
        # Like the gateway, the test client must not hold small packets back (Nagle).
        sock = c.socket()
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # on_subscribe runs on this same network thread, after this callback: no SUBACK can be
        # handled before its mid is in pending.
        with self.lock:
            for t in self.topics:
                self.pending.add(c.subscribe(t, qos=1)[1])
            done = not self.pending
        if done:
            self.connected.set()

    def _on_subscribe(self, c, userdata, mid, granted, properties=None):
        with self.lock:
            self.pending.discard(mid)
            done = not self.pending
        if done:
            self.connected.set()

    def _on_message(self, c, userdata, m):
        with self.lock:
            self.msgs.append((m.topic, m.payload, m.retain, getattr(m, "properties", None)))

    def messages(self, topic=None):
        with self.lock:
            return [m for m in self.msgs if topic is None or m[0] == topic]

    def json(self, topic):
        return [json.loads(m[1]) for m in self.messages(topic)]

    def wait_json(self, topic, pred=lambda j: True, timeout=10.0, what=None):
        """Waits for a message on topic whose JSON satisfies pred; returns it."""
        def find():
            for j in self.json(topic):
                if pred(j):
                    return j
            return None
        return wait_for(find, timeout, what or ("message on %s" % topic))

    def clear(self):
        with self.lock:
            self.msgs.clear()

    def publish(self, topic, payload, qos=1, properties=None):
        info = self.c.publish(topic, payload, qos=qos, properties=properties)
        info.wait_for_publish()

    def close(self):
        self.c.loop_stop()
        self.c.disconnect()


class Sim:
    """simpul-sim, the project's own Modbus simulator, on a free port."""

    def __init__(self, workdir, args=(), port=None, name="sim"):
        self.port = port or free_port()
        self.workdir = workdir
        self.args = list(args)
        self.name = name
        self.proc = None

    def start(self):
        self.proc = Proc("%s-%d" % (self.name, self.port),
                         [SIMPUL_SIM, "--port", str(self.port)] + self.args, self.workdir)
        wait_port(self.port, 10, self.proc.p)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc:
            self.proc.stop(sig)
            self.proc = None


class PyModbus:
    """Debian's python3-pymodbus serving known registers (tests/integration/pymodbus_server.py)."""

    def __init__(self, workdir, spec, port=None):
        self.port = port or free_port()
        self.workdir = workdir
        self.spec_path = os.path.join(workdir, "pymodbus-%d.json" % self.port)
        with open(self.spec_path, "w") as f:
            json.dump(spec, f)
        self.proc = None

    def start(self):
        self.proc = Proc("pymodbus-%d" % self.port,
                         ["/usr/bin/python3", os.path.join(HERE, "pymodbus_server.py"),
                          "--port", str(self.port), "--spec", self.spec_path], self.workdir)
        wait_port(self.port, 20, self.proc.p)
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc:
            self.proc.stop(sig)
            self.proc = None


class Gateway:
    """The simpul daemon with a config written from a dict."""

    def __init__(self, workdir, config, name="simpul", extra_args=(), wrapper=(),
                 log_level="debug"):
        self.workdir = workdir
        self.config = config
        self.name = name
        self.config_path = os.path.join(workdir, name + ".json")
        self.extra_args = list(extra_args)
        self.wrapper = list(wrapper)  # e.g. prlimit or setpriv in front of simpul
        self.log_level = log_level
        self.proc = None
        self.write_config()

    def write_config(self):
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=2)

    def start(self):
        self.proc = Proc(self.name, self.wrapper + [SIMPUL, "-c", self.config_path,
                                                    "--log-level", self.log_level]
                         + self.extra_args, self.workdir,
                         env={"SIMPUL_PLUGIN_DIR": PLUGIN_DIR})
        return self

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        """Stops simpul. A clean stop must exit 0: under ASan a leak or a sanitizer report
        makes it non-zero, so every test that stops the gateway checks for those too."""
        rc = None
        if self.proc:
            was_alive = self.proc.alive()
            rc = self.proc.stop(sig, timeout)
            if sig == signal.SIGTERM and was_alive and rc != 0:
                raise Failure("%s exited %s after SIGTERM:\n%s" %
                              (self.name, rc, self.proc.output()[-4000:]))
        return rc


SPEED_TAG = {"name": "speed_rpm", "table": "holding_register", "address": 10, "type": "uint16"}


def _varint(b, i):
    v = shift = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7f) << shift
        shift += 7
        if not c & 0x80:
            return v, i


def query_rows(db_path, sql):
    """Rows of a read-only query on a store (another process may be writing it)."""
    import sqlite3
    db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def outbox_messages(db_path):
    """Every message waiting in a store's outbox: (id, device, seq, topic, payload) tuples in id
    order, from single rows and from packs (an interval's backlog in one deflated row; its
    format is in docs/store.md, decoded here independently of the gateway)."""
    import sqlite3
    import zlib
    db = sqlite3.connect("file:%s?mode=ro" % db_path, uri=True, timeout=5)
    try:
        out = [(i, d, s, t, bytes(p)) for i, d, s, t, p in
               db.execute("select id, device, seq, topic, payload from outbox")]
        try:
            packs = db.execute("select first_id, raw_len, members, data from outbox_pack").fetchall()
        except sqlite3.OperationalError:  # a store from before packs
            packs = []
    finally:
        db.close()
    for first, raw_len, members, data in packs:
        raw = zlib.decompress(data)
        assert len(raw) == raw_len, "pack %d: %d bytes, row says %d" % (first, len(raw), raw_len)
        i, mid, ts = 0, 0, 0
        while i < len(raw):
            d, i = _varint(raw, i)
            seq, i = _varint(raw, i)
            zz, i = _varint(raw, i)
            mid += d
            ts += (zz >> 1) ^ -(zz & 1)
            fields = []
            for nul in (True, True, False):
                n, i = _varint(raw, i)
                fields.append(raw[i:i + n])
                i += n + (1 if nul else 0)
            k = mid - first
            if k // 8 < len(members) and members[k // 8] >> (k % 8) & 1:
                out.append((mid, fields[0].decode(), seq, fields[1].decode(), fields[2]))
    return sorted(out)


def tcp_device(name, port, tags=(SPEED_TAG,), unit=1, interval_ms=200, timeout_ms=500):
    """A Modbus TCP device on 127.0.0.1 with its own tags (simpul-sim's speed_rpm by default)."""
    return {"name": name, "protocol": "modbus", "interval_ms": interval_ms,
            "connection": {"transport": "tcp", "host": "127.0.0.1", "port": port,
                           "unit_id": unit, "timeout_ms": timeout_ms},
            "tags": list(tags)}


def runtime_dir(workdir):
    """The tmpfs directory for a test's outbox ring (removed with its workdir)."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else workdir
    return os.path.join(base, os.path.basename(workdir) + "-run")


def base_config(workdir, broker_port, devices, profiles=None, gw_id="gw-test", mqtt_extra=None):
    cfg = {
        "gateway": {"id": gw_id, "data_dir": workdir, "log_level": "debug"},
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "client_id": "simpul-" + gw_id,
                 "topic_prefix": "simpul", "qos": 1, "keepalive_s": 5},
        "store": {"path": os.path.join(workdir, "simpul.db"), "runtime_dir": runtime_dir(workdir)},
        "profiles": profiles or {},
        "devices": devices,
    }
    if mqtt_extra:
        cfg["mqtt"].update(mqtt_extra)
    return cfg


class TestCase:
    """Minimal runner: each test_* method gets a fresh temp dir; cleanup always runs.

    Prints one line per test and a closing 'N passed, N failed' line; exits 1 on any failure.
    """

    def __init__(self):
        self.cleanups = []

    def defer(self, fn, *args):
        self.cleanups.append((fn, args))

    def run_all(self):
        names = sorted(n for n in dir(self) if n.startswith("test_"))
        only = os.environ.get("ONLY")
        if only:
            names = [n for n in names if only in n]
        passed = failed = 0
        for n in names:
            self.workdir = tempfile.mkdtemp(prefix="simpul-it-")
            self.cleanups = []
            self.procs = []
            t0 = time.monotonic()
            try:
                getattr(self, n)()
                passed += 1
                print("ok   %s (%.2fs)" % (n, time.monotonic() - t0), flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure kind
                failed += 1
                print("FAIL %s: %r" % (n, e), flush=True)
                import traceback
                traceback.print_exc()
                for f in sorted(os.listdir(self.workdir)):
                    if f.endswith(".log"):
                        with open(os.path.join(self.workdir, f), "rb") as fh:
                            tail = fh.read()[-6000:].decode("utf-8", "replace")
                        print("---- %s (tail) ----\n%s" % (f, tail))
            finally:
                for fn, args in reversed(self.cleanups):
                    try:
                        fn(*args)
                    except Exception as e:  # noqa: BLE001
                        print("cleanup error: %r" % e)
                if os.environ.get("KEEP") is None:
                    shutil.rmtree(self.workdir, ignore_errors=True)
                    shutil.rmtree(runtime_dir(self.workdir), ignore_errors=True)
        print("%d passed, %d failed" % (passed, failed))
        sys.exit(1 if failed else 0)

    def cleanup_all(self):
        """Runs the registered cleanups, newest first, reporting but surviving failures."""
        for fn, args in reversed(self.cleanups):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001
                print("cleanup error: %r" % e)
        self.cleanups = []

    # Convenience starters that register their own cleanup.
    def broker(self, port=None, persistence=False):
        b = Broker(self.workdir, port, persistence).start()
        self.defer(b.stop)
        return b

    def pty_pair(self):
        """A socat pty pair in the workdir, (simulator's end, gateway's end), stopped at cleanup."""
        socat = shutil.which("socat")
        assert socat, "socat is required (scripts/install-deps.sh installs it)"
        sim_tty = os.path.join(self.workdir, "sim-tty")
        gw_tty = os.path.join(self.workdir, "gw-tty")
        pty = Proc("socat", [socat, "-d", "-d", "pty,raw,echo=0,link=" + sim_tty,
                             "pty,raw,echo=0,link=" + gw_tty], self.workdir)
        self.defer(pty.stop)
        wait_for(lambda: os.path.exists(sim_tty) and os.path.exists(gw_tty), 10, "pty pair")
        return sim_tty, gw_tty

    def sim(self, args=(), port=None, name="sim"):
        s = Sim(self.workdir, args, port, name).start()
        self.defer(s.stop)
        return s

    def pymodbus(self, spec, port=None):
        p = PyModbus(self.workdir, spec, port).start()
        self.defer(p.stop)
        return p

    def gateway(self, config, name="simpul", start=True, **kw):
        g = Gateway(self.workdir, config, name, **kw)
        if start:
            g.start()
        self.defer(g.stop, signal.SIGKILL)
        return g

    def subscriber(self, port, topics, **kw):
        s = Subscriber(port, topics, **kw)
        self.defer(s.close)
        return s
