"""The power-cut harness (docs/store.md, "Power cuts").

One recorded run of simpul under tests/powercut/pcut.so (an LD_PRELOAD recorder of every write
and sync to the data directory): live polling, commands, a broker outage with a backlog, the
replay, more commands. Then, for PCUT_CUTS (default 200) cut points spread over that run, the
files are rebuilt offline as the power cut could have left them (everything synced before the
cut, plus a random subset of the unsynced writes, some torn at 512-byte sectors; the tmpfs
runtime directory is gone), and simpul is started on each rebuild for a moment. Each restart
must:
- open the store, or move it aside with a clear log, and stop cleanly (exit 0);
- never publish or keep a (device, seq) the platform already saw with different content;
- never execute again a command the device had already executed (the simulator's write log);
- lose no telemetry older than commit_interval_ms (plus the commit's own duration) at the cut.
"""
import json
import os
import random
import re
import shutil
import signal
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
import harness as h  # noqa: E402

P, GW = "simpul", "pc-gw"
IV = 200  # commit_interval_ms of the recorded run
CUTS = int(os.environ.get("PCUT_CUTS", "200"))
SLACK_MS = 1500  # the commit's own duration and scheduling on a loaded 2-core machine
DEVICES = ["pump-01", "pump-02", "pump-03"]
# Telemetry only: with them an outage's interval holds enough messages to be packed
# (docs/store.md, "Outbox packs"), so cut points also fall into packs being written.
EXTRA = ["pump-%02d" % u for u in range(4, 9)]
T_OPEN, T_WRITE, T_TRUNC, T_SYNC, T_RENAME, T_UNLINK = range(1, 7)
HDR = struct.Struct("<IIQQQII")


def device(name, unit, port):
    return {"name": name, "protocol": "modbus", "interval_ms": 100,
            "connection": {"transport": "tcp", "host": "127.0.0.1", "port": port,
                           "unit_id": unit, "timeout_ms": 500},
            "tags": [{"name": "tick", "table": "input_register", "address": 30, "type": "uint32"},
                     {"name": "speed_sp", "table": "holding_register", "address": 10,
                      "type": "uint16", "writable": True, "min": 0, "max": 3000}]}


class TimedSubscriber(h.Subscriber):
    """Records the arrival time (wall clock, seconds) of every message."""

    def _on_message(self, c, userdata, m):
        with self.lock:
            self.msgs.append((m.topic, m.payload, m.retain, None, time.time()))


class Tail(threading.Thread):
    """Notes when each line of the simulator's write log appeared (polled every 5 ms)."""

    def __init__(self, path):
        super().__init__(daemon=True)
        self.path, self.lines, self.stop_ev = path, [], threading.Event()

    def run(self):
        buf = b""
        while not self.stop_ev.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(sum(len(x) + 1 for _, x in self.lines) + len(buf))
                    buf += f.read()
            except OSError:
                pass
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                self.lines.append((time.time(), line.decode()))
            time.sleep(0.005)


def read_log(path):
    recs = []
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    while off + HDR.size <= len(data):
        magic, typ, t_ns, pos, ln, pl, pl2 = HDR.unpack_from(data, off)
        assert magic == 0x54554350, "bad record at %d" % off
        off += HDR.size
        p1 = data[off:off + pl].decode()
        off += pl
        p2 = data[off:off + pl2].decode()
        off += pl2
        payload = b""
        if typ == T_WRITE:
            payload = data[off:off + ln]
            off += ln
        recs.append((typ, t_ns / 1e9, p1, p2, pos, ln, payload))
    return recs


def apply_op(img, op, rng=None):
    kind, pos, data = op
    if kind == "t":
        del img[pos:]
        return
    if rng is not None and rng.random() < 0.25 and len(data) > 512:
        # A torn write: only some of its 512-byte sectors reached the medium.
        for s in range(0, len(data), 512):
            if rng.random() < 0.5:
                apply_op(img, ("w", pos + s, data[s:s + 512]))
        return
    if len(img) < pos:
        img.extend(b"\0" * (pos - len(img)))
    img[pos:pos + len(data)] = data


def rebuild(recs, cuts, outdir_of, seed=7):
    """Replays the log; at each cut index writes the files as a power cut there could leave
    them into outdir_of(k). -shm files are left out (SQLite rebuilds the WAL index)."""
    rng = random.Random(seed)
    files = {}  # path -> [durable bytearray, pending ops]
    ci = 0
    for i, (typ, t, p1, p2, pos, ln, payload) in enumerate(recs + [(0, 0, "", "", 0, 0, b"")]):
        while ci < len(cuts) and cuts[ci] == i:
            d = outdir_of(ci)
            os.makedirs(d, exist_ok=True)
            for path, (dur, pend) in files.items():
                if path.endswith("-shm"):
                    continue
                img = bytearray(dur)
                for op in pend:
                    if rng.random() < 0.5:
                        apply_op(img, op, rng)
                with open(os.path.join(d, os.path.basename(path)), "wb") as f:
                    f.write(img)
            ci += 1
        if typ == T_OPEN:
            files.setdefault(p1, [bytearray(), []])
        elif typ == T_WRITE and p1 in files:
            files[p1][1].append(("w", pos, payload))
        elif typ == T_TRUNC and p1 in files:
            files[p1][1].append(("t", pos, b""))
        elif typ == T_SYNC and p1 in files:
            dur, pend = files[p1]
            for op in pend:
                apply_op(dur, op)
            files[p1][1] = []
        elif typ == T_RENAME and p1 in files:
            files[p2] = files.pop(p1)
        elif typ == T_UNLINK:
            files.pop(p1, None)


def data_msgs(sub):
    out = []
    for m in sub.messages():
        if m[0].endswith("/data"):
            j = json.loads(m[1])
            out.append((m[0].split("/")[2], j["seq"], m[1], j["ts"], m[4]))
    return out


class PowerCutTest(h.TestCase):
    def rundir(self, d):
        """The tmpfs runtime directory of the run on data directory d."""
        return h.runtime_dir(self.workdir) + "-" + os.path.basename(d)

    def cfg(self, workdir, data_dir, broker_port, sim_port):
        cfg = h.base_config(workdir, broker_port,
                            [device(d, k + 1, sim_port) for k, d in enumerate(DEVICES + EXTRA)],
                            gw_id=GW)
        cfg["gateway"]["log_level"] = "info"
        cfg["store"] = {"path": os.path.join(data_dir, "simpul.db"),
                        "runtime_dir": self.rundir(data_dir), "commit_interval_ms": IV}
        self.defer(shutil.rmtree, self.rundir(data_dir), True)
        return cfg

    def command(self, sub, n, dev):
        payload = json.dumps({"id": "pc-%d" % n, "op": "write", "tag": "speed_sp",
                              "value": 1000 + n})
        sub.publish("%s/%s/%s/cmd" % (P, GW, dev), payload)
        return ("pc-%d" % n, dev, payload, time.time())

    def record(self):
        wd = self.workdir
        data = os.path.join(wd, "data")
        os.makedirs(data)
        # A persistent broker and session: the platform gets every replayed message, even if
        # simpul reconnects before the platform does.
        self.b = self.broker(persistence=True)
        self.wlog = os.path.join(wd, "writes.log")
        self.simu = self.sim(["--pumps", str(len(DEVICES + EXTRA)), "--lights", "0", "--write-log",
                              self.wlog])
        tail = Tail(self.wlog)
        tail.start()
        cfg = self.cfg(wd, data, self.b.port, self.simu.port)
        sub = TimedSubscriber(self.b.port, ["%s/%s/+/data" % (P, GW), "%s/%s/+/cmd/result" % (P, GW)],
                              client_id="pc-platform", clean_session=False)
        self.defer(sub.close)
        log = os.path.join(wd, "pcut.log")
        asan = os.environ.get("ASAN_OPTIONS", "")
        wrapper = ["env", "LD_PRELOAD=" + os.environ["PCUT_LIB"], "PCUT_LOG=" + log,
                   "PCUT_DIR=" + data + "/",
                   "ASAN_OPTIONS=" + (asan + ":" if asan else "") + "verify_asan_link_order=0"]
        g = self.gateway(cfg, name="simpul-rec", wrapper=wrapper, log_level="info")
        cmds = []
        answered = lambda n: len([m for m in sub.messages() if m[0].endswith("/result")]) >= n  # noqa
        h.wait_for(lambda: len(data_msgs(sub)) >= 30, 20, "live data")
        for n in range(3):
            cmds.append(self.command(sub, n, DEVICES[n]))
        h.wait_for(lambda: answered(3), 10, "3 command answers")
        time.sleep(0.5)  # noqa: a stretch of plain live polling to cut into, not a sync point
        # The outage: the backlog goes to the database in interval batches.
        port = self.b.port
        self.b.stop()
        t_out = self.t_outage = time.time()
        h.wait_for(lambda: time.time() - t_out > 2.5, 5, "an outage of 2.5 s")
        packs = h.query_rows(cfg["store"]["path"], "select count(*) from outbox_pack")[0][0]
        assert packs > 0, "the outage's backlog was not packed: the cut points miss packs"
        self.b = h.Broker(wd, port, persistence=True).start()
        self.t_back = time.time()
        self.defer(self.b.stop)
        # Back means simpul's session too: the subscriber alone gets its persisted queue at
        # once, and commands sent before simpul has subscribed again are dropped by the broker.
        # simpul subscribes before it publishes, so data stamped after the restart proves it.
        back_ms = self.t_back * 1000
        h.wait_for(lambda: answered(3) and any(m[3] > back_ms for m in data_msgs(sub)), 20,
                   "the subscriber and simpul back")
        for n in range(3, 6):
            cmds.append(self.command(sub, n, DEVICES[n % 3]))
        h.wait_for(lambda: answered(6), 20, "6 command answers")
        time.sleep(0.3)  # noqa: live polling after the replay
        g.stop()
        tail.stop_ev.set()
        tail.join()
        return cfg, read_log(log), data_msgs(sub), cmds, tail.lines

    def test_powercut_cut_points(self):
        t0 = time.monotonic()
        cfg, recs, seen, cmds, wlines = self.record()
        assert any(r[0] == T_SYNC for r in recs), "no syncs recorded: is the interposer loaded?"
        # Cut points: half spread by record index (where the writes are), half by time.
        rng = random.Random(11)
        n = len(recs)
        by_index = rng.sample(range(1, n), min(n - 1, CUTS // 2))
        times = [r[1] for r in recs]
        by_time = []
        for _ in range(CUTS - len(by_index)):
            t = rng.uniform(times[0], times[-1])
            by_time.append(next((i for i, x in enumerate(times) if x >= t), n - 1))
        cuts = set(by_index + by_time)
        while len(cuts) < min(CUTS, n - 1):
            cuts.add(rng.randrange(1, n))
        cuts = sorted(cuts)
        cutdir = lambda k: os.path.join(self.workdir, "cut-%03d" % k)  # noqa: E731
        rebuild(recs, cuts, cutdir)
        t_rebuilt = time.monotonic()

        b = self.broker()
        sub = TimedSubscriber(b.port, ["%s/%s/+/data" % (P, GW), "%s/%s/+/cmd/result" % (P, GW)])
        self.defer(sub.close)
        value_to_cmd = {str(json.loads(c[2])["value"]): c[0] for c in cmds}
        moved = worst_age = lost_total = pending = 0
        for k, idx in enumerate(cuts):
            t_cut = recs[idx][1]
            r = self.check_cut(k, cutdir(k), t_cut, b.port, sub, seen, cmds, wlines, value_to_cmd)
            moved += r["moved"]
            lost_total += r["lost"]
            pending += r["pending"]
            worst_age = max(worst_age, r["worst_age_ms"])
        print("powercut: %d records, %d cut points, %d moved aside; %d undelivered messages at "
              "the cuts, %d lost, the oldest lost %d ms before its cut (window %d + %d ms); "
              "record+rebuild %.1fs, checks %.1fs" % (
                  n, len(cuts), moved, pending, lost_total, worst_age, IV, SLACK_MS,
                  t_rebuilt - t0, time.monotonic() - t_rebuilt), flush=True)
        assert pending > lost_total, "no cut point fell where messages waited to be delivered"
        assert len(cuts) >= min(CUTS, n - 1), (len(cuts), n)

    def check_cut(self, k, d, t_cut, port, sub, seen, cmds, wlines, value_to_cmd):
        cfg = self.cfg(d, d, port, self.simu.port)
        shutil.rmtree(self.rundir(d), ignore_errors=True)  # tmpfs does not survive the cut
        sub.clear()
        with open(self.wlog) as f:
            wl0 = len(f.readlines())
        g = h.Gateway(d, cfg, name="simpul-cut", log_level="info").start()
        try:
            # Connected and subscribed: its own data comes through the broker.
            h.wait_for(lambda: data_msgs(sub) or not g.proc.alive(), 15, "cut %d: data" % k)
            assert g.proc.alive(), "cut %d: simpul died:\n%s" % (k, g.proc.output()[-3000:])
            # The platform retries every command it had sent before the cut.
            retry = [c for c in cmds if c[3] <= t_cut]
            for cid, dev, payload, _ in retry:
                sub.publish("%s/%s/%s/cmd" % (P, GW, dev), payload)
            h.wait_for(lambda: {json.loads(m[1]).get("id") for m in sub.messages()
                                if m[0].endswith("/result")} >= {c[0] for c in retry}, 10,
                       "cut %d: answers to the retried commands" % k)
        except h.Failure as e:
            raise h.Failure("%s\n%s" % (e, g.proc.output()[-4000:]))
        finally:
            g.stop()  # raises unless exit 0
        out = g.proc.output()
        assert "[store] opened" in out, "cut %d: store not opened:\n%s" % (k, out[-3000:])
        moved = int("moved the unusable database" in out)
        # Everything that survived: published in this run, or still in the outbox.
        survivors = {(dv, sq): pl for dv, sq, pl, _, _ in data_msgs(sub)}
        for _, dv, sq, _, pl in h.outbox_messages(cfg["store"]["path"]):
            assert survivors.get((dv, sq), pl) == pl, "cut %d: (%s, %d) twice" % (k, dv, sq)
            survivors[(dv, sq)] = bytes(pl)
        before = {(dv, sq): pl for dv, sq, pl, _, t in seen if t <= t_cut}
        for key, pl in survivors.items():
            if key in before:
                assert before[key] == pl, "cut %d: %s reused with other content:\n%s\n%s" % (
                    k, key, before[key], pl)
        # A command the device executed before the cut never runs again.
        done_before = {value_to_cmd.get(line.split()[4]) for t, line in wlines if t <= t_cut}
        with open(self.wlog) as f:
            again = [value_to_cmd.get(line.split()[4]) for line in f.readlines()[wl0:]]
        twice = [c for c in again if c is not None and c in done_before]
        assert not twice, "cut %d: commands executed twice: %s" % (k, twice)
        # Telemetry lost: produced well before the cut, not delivered by then, gone now. Not
        # those the broker had taken before its outage and delivered after its restart, nor,
        # for a cut after the restart, the outage's backlog the subscriber got after the cut:
        # the broker may have acknowledged them already (it feeds the subscriber its replay at
        # the subscriber's pace, and simpul may reconnect first), and then simpul rightly forgot
        # them. Cuts during the outage check that backlog in full.
        t_ms, t_out, t_back = t_cut * 1000, self.t_outage, self.t_back
        pending = [(dv, sq, ts) for dv, sq, pl, ts, t in seen
                   if ts < t_ms - 100 and t > t_cut and not (ts < t_out * 1000 and t > t_out)
                   and not (t_cut >= t_back and ts < t_back * 1000)]
        lost = [x for x in pending if (x[0], x[1]) not in survivors]
        worst = max((t_ms - ts for _, _, ts in lost), default=0)
        assert worst <= IV + SLACK_MS, "cut %d: lost %d messages, the oldest %d ms before the cut" % (
            k, len(lost), worst)
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.rundir(d), ignore_errors=True)
        return {"moved": moved, "lost": len(lost), "worst_age_ms": worst, "pending": len(pending)}


if __name__ == "__main__":
    PowerCutTest().run_all()
