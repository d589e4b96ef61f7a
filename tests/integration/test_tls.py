"""The MQTT bridge over TLS, against a real mosquitto TLS listener, with certificates the test
makes with openssl:

- the broker's certificate is verified against mqtt.tls.ca_file by default; a wrong CA, an
  expired certificate and a certificate for another host name are each refused, with the reason
  in the log, and the gateway stays offline (no "online" status reaches the broker);
- mqtt.tls.verify false connects anyway and logs a warning at every connect;
- mutual TLS: with the client certificate and key the gateway connects, without them the broker
  refuses it;
- TLS 1.2 is the minimum even when the system's OpenSSL policy would allow TLS 1.1;
- a password_file or key_file that other users can read is refused by --check.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"
CERTS = None


def openssl(*args, cwd):
    p = subprocess.run(["openssl"] + list(args), cwd=cwd, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    if p.returncode != 0:
        raise h.Failure("openssl %s: %s" % (" ".join(args), p.stdout.decode()))


def make_certs():
    """CA, a second CA, server certificates (good, expired, other host) and a client one."""
    d = tempfile.mkdtemp(prefix="simpul-tls-")
    os.chmod(d, 0o755)  # mosquitto may read them after dropping root
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "ca2"):
        openssl("req", "-x509", *ec, "-keyout", ca + ".key", "-out", ca + ".crt", "-days", "30",
                "-subj", "/CN=simpul test " + ca, cwd=d)

    def leaf(name, san, days="30", ca="ca"):
        openssl("req", *ec, "-keyout", name + ".key", "-out", name + ".csr",
                "-subj", "/CN=" + name, cwd=d)
        with open(os.path.join(d, name + ".ext"), "w") as f:
            f.write("subjectAltName=%s\n" % san)
        openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".crt", "-CAkey", ca + ".key",
                "-CAcreateserial", "-out", name + ".crt", "-days", days,
                "-extfile", name + ".ext", cwd=d)

    leaf("server", "DNS:localhost,IP:127.0.0.1")
    leaf("expired", "DNS:localhost,IP:127.0.0.1", days="-1")  # notAfter is yesterday
    leaf("otherhost", "DNS:broker.elsewhere.example")
    leaf("client", "DNS:gw-test")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)
    os.chmod(os.path.join(d, "client.key"), 0o600)  # the gateway's own secret
    return d


def cert(name):
    return os.path.join(CERTS, name)


class TlsBroker:
    """mosquitto with a TLS listener and a plain one (for the test's observer)."""

    def __init__(self, workdir, server="server", require_cert=False, tls_version=None,
                 tls_port=None):
        self.workdir = workdir
        self.port = h.free_port()
        self.tls_port = tls_port or h.free_port()
        conf = os.path.join(workdir, "mosquitto-tls-%d.conf" % self.tls_port)
        with open(conf, "w") as f:
            f.write("per_listener_settings false\nallow_anonymous true\n"
                    "max_queued_messages 0\npersistence false\n")
            f.write("listener %d 127.0.0.1\n" % self.port)
            f.write("listener %d 127.0.0.1\n" % self.tls_port)
            f.write("cafile %s\ncertfile %s\nkeyfile %s\n" %
                    (cert("ca.crt"), cert(server + ".crt"), cert(server + ".key")))
            f.write("require_certificate %s\n" % ("true" if require_cert else "false"))
            if tls_version:
                f.write("tls_version %s\n" % tls_version)
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = h.Proc("mosquitto-tls-%d" % self.tls_port, [exe, "-c", conf], workdir)
        h.wait_port(self.port, 10, self.proc.p)
        h.wait_port(self.tls_port, 10, self.proc.p)

    def stop(self):
        self.proc.stop()


class TlsTest(h.TestCase):
    def tls_broker(self, **kw):
        b = TlsBroker(self.workdir, **kw)
        self.defer(b.stop)
        return b

    def gw(self, b, tls, env=None):
        sim = self.sim()
        cfg = h.base_config(self.workdir, b.tls_port, [h.tcp_device("pump-01", sim.port,
                                                                     interval_ms=500)])
        cfg["mqtt"]["tls"] = tls
        g = self.gateway(cfg, start=env is None)
        if env is not None:
            e = {"SIMPUL_PLUGIN_DIR": h.PLUGIN_DIR}
            e.update(env)
            g.proc = h.Proc(g.name, [h.SIMPUL, "-c", g.config_path, "--log-level", "debug"],
                            self.workdir, env=e)
        return g

    def expect_online(self, b, g):
        sub = self.subscriber(b.port, [P + "/status"])
        sub.wait_json(P + "/status", lambda j: j["state"] == "online", 15, "gateway online")
        return sub

    def expect_refused(self, b, tls, reason, env=None):
        sub = self.subscriber(b.port, [P + "/status"])
        g = self.gw(b, tls, env)
        reasons = reason if isinstance(reason, tuple) else (reason,)
        lines = ["cannot connect to 127.0.0.1:%d: %s" % (b.tls_port, r) for r in reasons]
        h.wait_for(lambda: any(line in g.proc.output() for line in lines), 15,
                   "log line %r" % lines)
        # Refused before any MQTT: the broker never saw the gateway, so no online status.
        if any(j["state"] == "online" for j in sub.json(P + "/status")):
            raise h.Failure("the gateway got online through a refused TLS connection")
        g.stop()

    def test_verified_connection(self):
        b = self.tls_broker()
        g = self.gw(b, {"ca_file": cert("ca.crt")})
        self.expect_online(b, g)
        if "without verification" in g.proc.output():
            raise h.Failure("verification warning with verification on")
        g.stop()

    def test_wrong_ca_refused(self):
        b = self.tls_broker()
        self.expect_refused(b, {"ca_file": cert("ca2.crt")},
                            "the broker's certificate was refused: ")

    def test_expired_certificate_refused(self):
        b = self.tls_broker(server="expired")
        self.expect_refused(b, {"ca_file": cert("ca.crt")},
                            "the broker's certificate was refused: certificate has expired")

    def test_host_name_mismatch_refused(self):
        b = self.tls_broker(server="otherhost")
        self.expect_refused(b, {"ca_file": cert("ca.crt")},
                            "the broker's certificate is not valid for host name \"127.0.0.1\"")

    def test_verify_off_warns_at_every_connect(self):
        port = h.free_port()
        b = self.tls_broker(tls_port=port)
        g = self.gw(b, {"ca_file": cert("ca2.crt"), "verify": False})
        self.expect_online(b, g)
        warn = "TLS without verification (mqtt.tls.verify is false)"
        h.wait_for(lambda: g.proc.output().count(warn) == 1, 5, "one warning")
        b.stop()
        b = self.tls_broker(tls_port=port)  # the same port: the gateway reconnects
        self.expect_online(b, g)
        h.wait_for(lambda: g.proc.output().count(warn) == 2, 15, "a warning at the reconnect")
        g.stop()

    def test_mutual_tls(self):
        b = self.tls_broker(require_cert=True)
        g = self.gw(b, {"ca_file": cert("ca.crt"), "cert_file": cert("client.crt"),
                        "key_file": cert("client.key")})
        self.expect_online(b, g)
        g.stop()

    def test_mutual_tls_without_client_certificate_refused(self):
        b = self.tls_broker(require_cert=True)
        # With TLS 1.3 the client finishes its handshake before the broker checks the client
        # certificate: the broker's alert can arrive after the connection is already gone.
        self.expect_refused(b, {"ca_file": cert("ca.crt")},
                            ("TLS alert from the broker: certificate required",
                             "Protocol error", "Connection reset by peer"))

    def test_tls_1_2_minimum(self):
        # A server that speaks TLS 1.1 only, and a system policy relaxed for both sides (TLS 1.0
        # and weak ciphers allowed): only simpul's own minimum can refuse it.
        conf = os.path.join(self.workdir, "openssl-weak.cnf")
        with open(conf, "w") as f:
            f.write("openssl_conf = c\n[c]\nssl_conf = s\n[s]\nsystem_default = d\n"
                    "[d]\nMinProtocol = TLSv1\nCipherString = DEFAULT@SECLEVEL=0\n")
        env = {"OPENSSL_CONF": conf}
        port = h.free_port()
        srv = h.Proc("s_server", ["openssl", "s_server", "-accept", "127.0.0.1:%d" % port,
                                  "-cert", cert("server.crt"), "-key", cert("server.key"),
                                  "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0",
                                  "-www"],  # -www: serves on, without reading stdin
                     self.workdir, env=env)
        self.defer(srv.stop)
        h.wait_port(port, 10, srv.p)
        # The control: a client that allows TLS 1.1 gets it from this server.
        p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % port,
                            "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
                           input=b"", stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           env=dict(os.environ, **env), timeout=30)
        if b"Protocol  : TLSv1.1" not in p.stdout:
            raise h.Failure("the TLS 1.1 server does not work:\n" + p.stdout.decode())

        class Endpoint:
            pass
        b = Endpoint()
        b.tls_port = port
        b.port = self.broker().port  # the observer's broker: the gateway never reaches it
        self.expect_refused(b, {"ca_file": cert("ca.crt")}, "TLS alert ", env=env)
        if "protocol version" not in srv.output() + self.gateway_log():
            raise h.Failure("no protocol version alert:\n" + self.gateway_log()[-3000:])

    def gateway_log(self):
        with open(os.path.join(self.workdir, "simpul.log"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def test_loose_secret_permissions_refused(self):
        pw = os.path.join(self.workdir, "password")
        with open(pw, "w") as f:
            f.write("secret\n")
        os.chmod(pw, 0o644)
        key = os.path.join(self.workdir, "client.key")
        shutil.copy(cert("client.key"), key)
        os.chmod(key, 0o604)
        cfg = h.base_config(self.workdir, 1883, [])
        cfg["mqtt"].update({"username": "gw", "password_file": pw,
                            "tls": {"ca_file": cert("ca.crt"), "cert_file": cert("client.crt"),
                                    "key_file": key}})
        path = os.path.join(self.workdir, "c.json")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        p = subprocess.run([h.SIMPUL, "-c", path, "--check"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=dict(os.environ,
                                                              SIMPUL_PLUGIN_DIR=h.PLUGIN_DIR))
        out = p.stdout.decode()
        for want in ("mqtt.password_file: \"%s\" is accessible to other users (mode 0644)" % pw,
                     "mqtt.tls.key_file: \"%s\" is accessible to other users (mode 0604)" % key):
            if want not in out:
                raise h.Failure("want %r in:\n%s" % (want, out))
        os.chmod(pw, 0o640)
        os.chmod(key, 0o600)
        p = subprocess.run([h.SIMPUL, "-c", path, "--check"], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=dict(os.environ,
                                                              SIMPUL_PLUGIN_DIR=h.PLUGIN_DIR))
        if p.returncode != 0:
            raise h.Failure("0640/0600 secrets refused:\n" + p.stdout.decode())


if __name__ == "__main__":
    CERTS = make_certs()
    try:
        TlsTest().run_all()
    finally:
        shutil.rmtree(CERTS, ignore_errors=True)
