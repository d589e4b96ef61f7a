"""Where the store lives must be usable, and the integrator decides what happens when it is not.

- `--check` reports a data_dir or store.path the user running it cannot create or write, at the
  key's LINE:COL (the README's old recipe: a demo config copied to /etc, whose ../demo-data the
  service user cannot create, passed the check and then ran without a durable store);
- `store.on_error: "refuse"`: simpul exits 1 at start instead of running on memory;
- `store.on_error: "degraded"` (the default): simpul polls and publishes, logs DEGRADED, and
  refuses write commands (it could not remember after a restart that it executed them).
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

P = "simpul/gw-test"


def check(cfg_path, as_nobody=False):
    argv = [h.SIMPUL, "-c", cfg_path, "--check"]
    if as_nobody:
        argv = ["runuser", "-u", "nobody", "--"] + argv
    p = subprocess.run(argv, env=dict(os.environ, SIMPUL_PLUGIN_DIR=h.PLUGIN_DIR),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    return p.returncode, p.stdout.decode() + p.stderr.decode()


def sim_device(port):
    return h.tcp_device("pump-01", port, [dict(h.SPEED_TAG, writable=True, min=0, max=3000)])


def write_cfg(path, cfg):
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


class StorePathsTest(h.TestCase):
    def unusable(self):
        """A store path no one can create, root included: its parent is a regular file."""
        blocker = os.path.join(self.workdir, "not-a-dir")
        with open(blocker, "w") as f:
            f.write("x")
        return os.path.join(blocker, "state")

    def test_check_reports_data_dir_the_user_cannot_create(self):
        # Like /etc/simpul/simpul.json with data_dir "../demo-data": the parent is not
        # writable for the user who runs the check.
        etc = os.path.join(self.workdir, "etc")
        os.makedirs(os.path.join(etc, "simpul"))
        os.chmod(self.workdir, 0o755)
        cfg = h.base_config(self.workdir, 1883, [sim_device(1502)])
        cfg["gateway"]["data_dir"] = "../demo-data"
        del cfg["store"]["path"]
        path = os.path.join(etc, "simpul", "simpul.json")
        write_cfg(path, cfg)
        as_nobody = os.geteuid() == 0
        if not as_nobody:
            os.chmod(etc, 0o555)
            self.defer(os.chmod, etc, 0o755)
        rc, out = check(path, as_nobody)
        want = "%s:4:17: gateway.data_dir: %s/simpul/../demo-data does not exist and cannot " \
               "be created: cannot write in %s/simpul/..: Permission denied" % (path, etc, etc)
        if rc != 1 or want not in out or "1 problem" not in out:
            raise h.Failure("exit %d, want %r in:\n%s" % (rc, want, out))

    def test_check_reports_unusable_store_path(self):
        cfg = h.base_config(self.workdir, 1883, [sim_device(1502)])
        cfg["store"]["path"] = os.path.join(self.unusable(), "simpul.db")
        path = os.path.join(self.workdir, "c.json")
        write_cfg(path, cfg)
        rc, out = check(path)
        if rc != 1 or ": store.path: cannot use " not in out or "Not a directory" not in out:
            raise h.Failure("exit %d:\n%s" % (rc, out))
        # And a store file that is a directory.
        cfg["store"]["path"] = self.workdir
        write_cfg(path, cfg)
        rc, out = check(path)
        if rc != 1 or "store.path: %s is not a regular file" % self.workdir not in out:
            raise h.Failure("exit %d:\n%s" % (rc, out))

    def test_check_ok_for_usable_paths(self):
        cfg = h.base_config(self.workdir, 1883, [sim_device(1502)])
        cfg["store"]["path"] = os.path.join(self.workdir, "new", "deeper", "simpul.db")
        path = os.path.join(self.workdir, "c.json")
        write_cfg(path, cfg)
        rc, out = check(path)
        if rc != 0 or "OK (1 devices, 1 tags)" not in out:
            raise h.Failure("exit %d:\n%s" % (rc, out))

    def test_on_error_refuse_exits_1(self):
        b = self.broker()
        cfg = h.base_config(self.workdir, b.port, [sim_device(h.free_port())])
        cfg["store"]["path"] = os.path.join(self.unusable(), "simpul.db")
        cfg["store"]["on_error"] = "refuse"
        g = self.gateway(cfg)
        rc = g.proc.wait(10)
        if rc != 1 or 'store.on_error is "refuse"' not in g.proc.output():
            raise h.Failure("exit %s:\n%s" % (rc, g.proc.output()))

    def test_on_error_degraded_polls_and_refuses_writes(self):
        b = self.broker()
        sim = self.sim()
        cfg = h.base_config(self.workdir, b.port, [sim_device(sim.port)])
        cfg["store"]["path"] = os.path.join(self.unusable(), "simpul.db")
        sub = self.subscriber(b.port, [P + "/#"])
        g = self.gateway(cfg)
        sub.wait_json(P + "/pump-01/data", lambda j: "speed_rpm" in j.get("values", {}),
                      what="data while degraded")
        h.wait_for(lambda: "DEGRADED" in g.proc.output(), 5, "the DEGRADED log line")
        sub.publish(P + "/pump-01/cmd", json.dumps(
            {"id": "w-1", "op": "write", "tag": "speed_rpm", "value": 1200}))
        r = sub.wait_json(P + "/pump-01/cmd/result", lambda j: j.get("id") == "w-1")
        if r.get("ok") or r["error"]["code"] != "not_durable":
            raise h.Failure("write while degraded: %r" % r)
        sub.publish(P + "/pump-01/cmd", json.dumps(
            {"id": "r-1", "op": "read", "tags": ["speed_rpm"]}))
        r = sub.wait_json(P + "/pump-01/cmd/result", lambda j: j.get("id") == "r-1")
        if not r.get("ok"):
            raise h.Failure("a read while degraded must work: %r" % r)
        g.stop()


if __name__ == "__main__":
    StorePathsTest().run_all()
