"""The SNMP driver against Debian's snmpd, with snmpget/snmpset as the independent client.

snmpd serves static objects through `override` lines (one of them writable with -rw); its own
SNMPv2-MIB counters (snmpInGetRequests, snmpOutTooBigs) and simpul's metrics show how many
PDUs went out.
"""
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

BASE = "1.3.6.1.4.1.99999.1."
# Debian ships no MIB files: keep every net-snmp tool from looking for them.
NOMIB = {"MIBS": "", "MIBDIRS": ""}
OUT_TOO_BIGS = "1.3.6.1.2.1.11.20.0"
IF_HC_IN_OCTETS_LO = "1.3.6.1.2.1.31.1.1.1.6.1"  # Counter64 of interface 1 (lo)

OBJECTS = [
    # (suffix, override type, value, writable)
    ("1.0", "integer", "-5", False),
    ("2.0", "integer", "100", True),
    ("3.0", "unsigned", "4000000000", False),
    ("4.0", "counter", "123", False),
    ("5.0", "timeticks", "4242", False),
    ("6.0", "octet_str", '"hello"', False),
    ("7.0", "octet_str", "0x41FF42", False),  # "A", a byte that is not UTF-8, "B"
    ("8.0", "integer", "9", False),
]


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Snmpd:
    """Debian's snmpd on a free loopback UDP port, from a config written for the test."""

    def __init__(self, workdir, extra=(), port=None, name="snmpd"):
        self.port = port or free_udp_port()
        self.workdir = workdir
        self.conf = os.path.join(workdir, "%s-%d.conf" % (name, self.port))
        self.name = name
        # persistentDir: snmpd keeps its state (v3 users, boot counter) in the test's directory,
        # never in /var/lib/snmp.
        lines = ["[snmp] persistentDir " + workdir, "rocommunity public 127.0.0.1",
                 "rwcommunity private 127.0.0.1"]
        for suffix, typ, val, rw in OBJECTS:
            lines.append("override %s%s%s %s %s" % ("-rw " if rw else "", BASE, suffix, typ, val))
        lines += list(extra)
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = None

    def start(self):
        self.proc = h.Proc("%s-%d" % (self.name, self.port),
                           ["/usr/sbin/snmpd", "-f", "-Lo", "-C", "-c", self.conf,
                            "-p", os.path.join(self.workdir, "%s.pid" % self.name),
                            "udp:127.0.0.1:%d" % self.port], self.workdir, env=NOMIB)
        h.wait_for(lambda: self.get("1.3.6.1.2.1.1.3.0", timeout=1) is not None, 20, "snmpd up")
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc:
            if sig == signal.SIGTERM:
                self.proc.signal(signal.SIGCONT)
            self.proc.stop(sig)
            self.proc = None

    def get(self, oid, community="public", timeout=2, extra=()):
        """snmpget's value text for oid, or None when the agent does not answer."""
        r = subprocess.run(["snmpget", "-v2c", "-c", community, "-On", "-Oqv", "-t", str(timeout),
                            "-r", "0"] + list(extra) + ["127.0.0.1:%d" % self.port, oid],
                           capture_output=True, text=True, env=dict(os.environ, **NOMIB))
        return r.stdout.strip() if r.returncode == 0 else None


def tag(name, suffix, typ, **kw):
    t = {"name": name, "oid": BASE + suffix, "type": typ}
    t.update(kw)
    return t


def device(name, port, tags, interval=200, **conn):
    # 1 s: a loaded CI machine must not turn a slow answer into a false timeout.
    c = {"host": "127.0.0.1", "port": port, "version": "2c", "community": "public",
         "timeout_ms": 1000, "retries": 1}
    c.update(conn)
    return {"name": name, "protocol": "snmp", "interval_ms": interval, "connection": c,
            "tags": tags}


TAGS = [
    tag("neg", "1.0", "int32"),
    tag("big", "1.0", "int64"),
    tag("setpoint", "2.0", "int32", writable=True, min=-1, max=3600),
    tag("gauge", "3.0", "uint32"),
    tag("count", "4.0", "uint64"),
    tag("ticks", "5.0", "uint32"),
    tag("text", "6.0", "string"),
    tag("bytes", "7.0", "string"),
    tag("ro", "8.0", "int32", writable=True),
    {"name": "hc", "oid": "." + IF_HC_IN_OCTETS_LO, "type": "uint64"},
    tag("wrongtype", "3.0", "int32"),
    tag("missing", "99.0", "int32"),
    tag("nonneg", "2.0", "uint32", writable=True),  # a non-negative INTEGER fits unsigned
    tag("negative", "1.0", "uint32"),
]


class SnmpTest(h.TestCase):
    def snmpd(self, extra=(), port=None):
        s = Snmpd(self.workdir, extra, port).start()
        self.defer(s.stop)
        return s

    def start(self, devices, metrics=False):
        b = self.broker()
        cfg = h.base_config(self.workdir, b.port, devices)
        if metrics:
            cfg["gateway"]["metrics_interval_s"] = 1
        sub = self.subscriber(b.port, ["simpul/gw-test/#"])
        g = self.gateway(cfg)
        return b, sub, g

    def command(self, sub, dev, cmd):
        sub.publish("simpul/gw-test/%s/cmd" % dev, json.dumps(cmd))
        return sub.wait_json("simpul/gw-test/%s/cmd/result" % dev,
                             lambda j: j.get("id") == cmd["id"], 15, "result of " + cmd["id"])

    def test_types_arrive_and_one_pdu_per_poll(self):
        s = self.snmpd()
        _, sub, g = self.start([device("ups-01", s.port, TAGS)], metrics=True)
        d = sub.wait_json("simpul/gw-test/ups-01/data", lambda j: "neg" in j["values"], 20)
        v, e = d["values"], d.get("errors", {})
        assert v["neg"] == -5 and v["big"] == -5, d
        assert v["setpoint"] == 100 and v["gauge"] == 4000000000, d
        assert v["count"] == 123 and v["ticks"] == 4242, d
        assert v["text"] == "hello" and v["bytes"] == "A\ufffdB", d
        hc = s.get(IF_HC_IN_OCTETS_LO)
        assert isinstance(v["hc"], int) and v["hc"] >= 0 and hc is not None, (d, hc)
        # A type the tag cannot hold is an error of that tag, never a converted value.
        assert "wrongtype" not in v and "Gauge32" in e["wrongtype"], d
        assert e["missing"] == "noSuchObject", d
        assert v["nonneg"] == 100 and "negative INTEGER" in e["negative"], d
        # 14 tags, max_varbinds_per_request 32: every poll is one GET.
        ms = []
        h.wait_for(lambda: len([m for m in sub.json("simpul/gw-test/metrics")
                                if m["polls"] > 0]) >= 3, 20, "three metrics messages")
        ms = [m for m in sub.json("simpul/gw-test/metrics") if m["polls"] > 0]
        a, z = ms[0], ms[-1]
        # (polls counts answered polls only, so a slow moment cannot break the ratio)
        assert z["polls"] > a["polls"], ms
        assert z["requests"] - a["requests"] == z["polls"] - a["polls"], ms
        g.stop()

    def test_max_varbinds_per_request(self):
        # 14 tags, at most 5 OIDs per GET: 3 GETs per poll.
        s = self.snmpd()
        _, sub, g = self.start([device("ups-01", s.port, TAGS, max_varbinds_per_request=5)],
                               metrics=True)
        d = sub.wait_json("simpul/gw-test/ups-01/data", lambda j: "neg" in j["values"], 20)
        assert d["values"]["text"] == "hello", d
        h.wait_for(lambda: len([m for m in sub.json("simpul/gw-test/metrics")
                                if m["polls"] > 0]) >= 2, 20, "two metrics messages")
        ms = [m for m in sub.json("simpul/gw-test/metrics") if m["polls"] > 0]
        a, z = ms[0], ms[-1]
        assert z["polls"] > a["polls"], ms
        assert z["requests"] - a["requests"] == 3 * (z["polls"] - a["polls"]), ms
        g.stop()

    def test_v1_bad_oid_fails_only_its_tag(self):
        # SNMPv1 fails a whole GET for one unknown OID (noSuchName, with its index): the driver
        # drops that OID and asks again, so the other tags still arrive.
        s = self.snmpd()
        tags = [tag("neg", "1.0", "int32"), tag("missing", "99.0", "int32"),
                tag("text", "6.0", "string")]
        _, sub, g = self.start([device("ups-01", s.port, tags, version="1")])
        d = sub.wait_json("simpul/gw-test/ups-01/data", lambda j: "neg" in j["values"], 20)
        assert d["values"] == {"neg": -5, "text": "hello"}, d
        assert d["errors"] == {"missing": "noSuchName"}, d
        g.stop()

    def test_set_confirmed_by_snmpget(self):
        s = self.snmpd()
        _, sub, g = self.start([device("ups-01", s.port, TAGS, write_community="private")])
        sub.wait_json("simpul/gw-test/ups-01/status", lambda j: j["state"] == "online", 20)
        r = self.command(sub, "ups-01", {"id": "w-1", "op": "write", "tag": "setpoint",
                                         "value": 1200})
        assert r["ok"] is True and r["value"] == 1200, r
        assert s.get(BASE + "2.0") == "1200"
        # The agent refuses a read-only object: device_error with the SNMP error name.
        r = self.command(sub, "ups-01", {"id": "w-2", "op": "write", "tag": "ro", "value": 1})
        assert r["ok"] is False and r["error"]["code"] == "device_error", r
        assert "notWritable" in r["error"]["message"], r
        assert s.get(BASE + "8.0") == "9"
        # Out of range is refused by the host before any I/O: the object keeps its value.
        r = self.command(sub, "ups-01", {"id": "w-3", "op": "write", "tag": "setpoint",
                                         "value": 4000})
        assert r["ok"] is False and r["error"]["code"] == "out_of_range", r
        assert s.get(BASE + "2.0") == "1200"
        # An unsigned tag on an INTEGER object is written as an INTEGER.
        r = self.command(sub, "ups-01", {"id": "w-5", "op": "write", "tag": "nonneg",
                                         "value": 55})
        assert r["ok"] is True and r["value"] == 55, r
        assert s.get(BASE + "2.0") == "55"
        # Not writable in the config: never sent.
        r = self.command(sub, "ups-01", {"id": "w-4", "op": "write", "tag": "neg", "value": 1})
        assert r["ok"] is False and r["error"]["code"] == "not_writable", r
        g.stop()
        db = sqlite3.connect(os.path.join(self.workdir, "simpul.db"))
        codes = dict(db.execute("select cmd_id, code from audit"))
        assert codes.get("w-1") == "ok" and codes.get("w-2") == "device_error", codes

    def test_wrong_community_is_offline_with_reason(self):
        s = self.snmpd()
        _, sub, g = self.start([device("ups-01", s.port, TAGS[:2], community="nope")])
        off = sub.wait_json("simpul/gw-test/ups-01/status", lambda j: j["state"] == "offline",
                            20, "offline")
        assert "timeout" in off["error"], off
        h.wait_for(lambda: "check host, port, version and community" in g.proc.output(), 10,
                   "the hint in the log")
        g.stop()

    def test_agent_stops_answering_then_comes_back(self):
        s = self.snmpd()
        _, sub, g = self.start([device("ups-01", s.port, TAGS[:2])])
        topic = "simpul/gw-test/ups-01/status"
        sub.wait_json(topic, lambda j: j["state"] == "online", 20, "online")
        s.proc.signal(signal.SIGSTOP)
        off = sub.wait_json(topic, lambda j: j["state"] == "offline", 20, "offline")
        assert off["error"] == "timeout", off
        sub.clear()
        s.proc.signal(signal.SIGCONT)
        sub.wait_json(topic, lambda j: j["state"] == "online", 40, "online again")
        d = sub.wait_json("simpul/gw-test/ups-01/data", lambda j: "neg" in j["values"], 20)
        assert d["values"]["neg"] == -5, d
        g.stop()

    def test_too_big_splits_the_request(self):
        # snmpd answers tooBig when an answer would exceed 4000 bytes: 20 strings of 500 bytes
        # do not fit in one GET, 5 do.
        n = 20
        extra = ["[snmp] sendMessageMaxSize 4000"]
        extra += ["override %s%d.0 octet_str \"%s\"" % (BASE + "50.", i, "x" * 500)
                  for i in range(n)]
        s = self.snmpd(extra)
        before = int(s.get(OUT_TOO_BIGS) or "0")
        tags = [tag("s%d" % i, "50.%d.0" % i, "string") for i in range(n)]
        _, sub, g = self.start([device("ups-01", s.port, tags, interval=300,
                                       max_varbinds_per_request=64)], metrics=True)
        d = sub.wait_json("simpul/gw-test/ups-01/data", lambda j: len(j["values"]) == n, 20)
        assert d["values"]["s0"] == "x" * 500 and not d.get("errors"), d.get("errors")
        assert int(s.get(OUT_TOO_BIGS)) > before
        h.wait_for(lambda: len([m for m in sub.json("simpul/gw-test/metrics")
                                if m["polls"] > 1]) >= 2, 20, "two metrics messages")
        ms = [m for m in sub.json("simpul/gw-test/metrics") if m["polls"] > 1]
        a, z = ms[0], ms[-1]
        polls, reqs = z["polls"] - a["polls"], z["requests"] - a["requests"]
        # After the first tooBig the device remembers the smaller size: more than one GET per
        # poll, and far fewer than one per tag.
        assert polls > 0 and polls < reqs <= 4 * polls, ms
        assert "tooBig" in g.proc.output()
        g.stop()

    def v3_device(self, name, port, auth_pw, priv_pw="privpass123", user="simpul"):
        # Relative paths: resolved against the config file's directory, like mqtt's.
        for fn, pw in (("auth-%s.pw" % name, auth_pw), ("priv-%s.pw" % name, priv_pw)):
            with open(os.path.join(self.workdir, fn), "w") as f:
                f.write(pw + "\n")
            os.chmod(os.path.join(self.workdir, fn), 0o600)  # secrets: no access for others
        return device(name, port, TAGS[:3], version="3", community=None, user=user,
                      security_level="authPriv", auth_protocol="SHA",
                      auth_password_file="auth-%s.pw" % name, priv_protocol="AES",
                      priv_password_file="priv-%s.pw" % name)

    def test_v3_auth_priv_and_wrong_password(self):
        s = self.snmpd(["createUser simpul SHA authpass123 AES privpass123",
                        "createUser other SHA otherpass1 AES otherpass2",
                        "rwuser simpul priv", "rouser other priv"])
        good = self.v3_device("ups-01", s.port, "authpass123")
        # net-snmp keeps one key per agent and user name for the whole process, so the wrong
        # password goes with a user of its own (docs/snmp.md).
        bad = self.v3_device("ups-02", s.port, "wrongpass99", "otherpass2", user="other")
        for dev in (good, bad):
            del dev["connection"]["community"]
        _, sub, g = self.start([good, bad])
        d = sub.wait_json("simpul/gw-test/ups-01/data", lambda j: "neg" in j["values"], 20)
        assert d["values"]["neg"] == -5 and d["values"]["setpoint"] == 100, d
        r = self.command(sub, "ups-01", {"id": "v3-w", "op": "write", "tag": "setpoint",
                                         "value": 7})
        assert r["ok"] is True, r
        assert s.get(BASE + "2.0") == "7"
        off = sub.wait_json("simpul/gw-test/ups-02/status", lambda j: j["state"] == "offline",
                            20, "wrong password offline")
        assert off["error"] == "authentication failure", off
        g.stop()

    def test_reload_keeps_polling(self):
        # SIGHUP loads the plugins again for the new config: net-snmp, initialised once per
        # process, must serve the new device's session beside the running one's, and the
        # unchanged device goes on polling (its values do not change: counted in metrics).
        s = self.snmpd()
        b, sub, g = self.start([device("ups-01", s.port, TAGS[:2])], metrics=True)
        topic = "simpul/gw-test/ups-01/data"
        first = sub.wait_json(topic, lambda j: "neg" in j["values"], 20)
        assert first["values"]["neg"] == -5, first
        g.config["devices"].append(device("ups-02", s.port, TAGS[2:4]))
        g.write_config()
        g.proc.signal(signal.SIGHUP)
        h.wait_for(lambda: "config reloaded" in g.proc.output(), 20, "reload")
        assert "1 device(s) kept, 0 changed, 1 added" in g.proc.output(), g.proc.output()[-2000:]
        d2 = sub.wait_json("simpul/gw-test/ups-02/data", lambda j: "setpoint" in j["values"], 20)
        assert d2["values"]["setpoint"] == 100, d2
        polls = [j["devices"]["ups-01"]["polls"] for j in sub.json("simpul/gw-test/metrics")]
        sub.wait_json("simpul/gw-test/metrics",
                      lambda j: j["devices"]["ups-01"]["polls"] >= max(polls + [0]) + 2, 20,
                      "ups-01 polled after the reload")
        g.stop()

    def test_config_errors(self):
        pw = os.path.join(self.workdir, "short.pw")
        with open(pw, "w") as f:
            f.write("short\n")
        os.chmod(pw, 0o600)
        devs = [
            device("a", 161, [tag("t", "1.0", "float32"), {"name": "u", "oid": "1.3.x",
                                                           "type": "int32"}], user="u"),
            device("b", 161, [tag("t", "1.0", "int32")], version="3", community=None,
                   user="u", auth_password_file="short.pw"),
            device("c", 161, [tag("t", "1.0", "int32")], version="3", community=None,
                   user="u", security_level="authNoPriv", auth_password_file="nonexistent.pw"),
        ]
        for dev in devs:
            dev["connection"] = {k: v for k, v in dev["connection"].items() if v is not None}
        cfg = h.base_config(self.workdir, 1883, devs)
        path = os.path.join(self.workdir, "bad.json")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        r = subprocess.run([h.SIMPUL, "-c", path, "--check"], capture_output=True, text=True,
                           env=dict(os.environ, SIMPUL_PLUGIN_DIR=h.PLUGIN_DIR))
        out = r.stdout + r.stderr
        assert r.returncode == 1, out
        for want in ("devices[0].tags[0].type: SNMP values map to",
                     "devices[0].tags[1].oid: not a numeric OID",
                     "devices[0].connection.user: only for version 3",
                     "devices[1].connection: security_level authPriv needs \"priv_password_file\"",
                     "devices[1].connection.auth_password_file: the password is shorter",
                     "devices[2].connection.auth_password_file: cannot read"):
            assert want in out, (want, out)


if __name__ == "__main__":
    SnmpTest().run_all()
