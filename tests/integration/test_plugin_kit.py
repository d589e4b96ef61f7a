"""The plugin author's kit and robust loading.

- the example plugin builds out of tree against an installed prefix (meson install --destdir,
  pkg-config --cflags simpul-plugin) and that build is loaded and polled;
- --plugins and --plugin-help show what the key tables declare;
- the JSON Schema's per-protocol parts agree with the key tables (--plugin-schema);
- a missing .so, a missing entry symbol, a wrong ABI version, a smaller descriptor and a
  refusing entry point are config errors naming the file and the device at start, and on
  SIGHUP the old config keeps running.
"""
import json
import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

BUILD = os.environ.get("SIMPUL_BUILD_ROOT", "build")
EXAMPLE_DIR = os.path.join(BUILD, "plugins")
SCHEMA = os.path.join(h.SOURCE_ROOT, "config", "simpul.schema.json")


def simpul(*args, plugin_dir=None):
    argv = [h.SIMPUL] + list(args)
    if plugin_dir:
        argv += ["--plugin-dir", plugin_dir]
    r = subprocess.run(argv, capture_output=True, text=True,
                       env=dict(os.environ, SIMPUL_PLUGIN_DIR=h.PLUGIN_DIR))
    return r.returncode, r.stdout, r.stderr


def example_device(name, protocol="example"):
    return {"name": name, "protocol": protocol, "interval_ms": 100,
            "connection": {"host": "sim-" + name},
            "tags": [{"name": "count", "type": "uint32", "signal": "counter"}]}


class PluginKitTest(h.TestCase):
    def test_out_of_tree_example_from_installed_prefix(self):
        dest = os.path.join(self.workdir, "dest")
        r = subprocess.run(["meson", "install", "-C", BUILD, "--destdir", dest, "--no-rebuild"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        pcs = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs
               if f == "simpul-plugin.pc"]
        assert len(pcs) == 1, pcs
        env = dict(os.environ, PKG_CONFIG_PATH=os.path.dirname(pcs[0]),
                   PKG_CONFIG_SYSROOT_DIR=dest)
        cflags = subprocess.run(["pkg-config", "--cflags", "simpul-plugin"], env=env,
                                capture_output=True, text=True, check=True).stdout.split()
        assert any(f.startswith("-I" + dest) for f in cflags), cflags
        # Only the installed header: a copy of the source in a directory of its own.
        src_dir = os.path.join(self.workdir, "mydriver")
        os.mkdir(src_dir)
        with open(os.path.join(h.SOURCE_ROOT, "plugins", "example", "example.c")) as f:
            src = f.read()
        with open(os.path.join(src_dir, "example.c"), "w") as f:
            f.write(src)
        so = os.path.join(src_dir, "example.so")
        r = subprocess.run(["cc", "-std=c11", "-O2", "-Wall", "-Werror", "-shared", "-fPIC",
                            "-fvisibility=hidden"] + cflags +
                           ["-o", so, os.path.join(src_dir, "example.c"), "-lm"],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        rc, out, err = simpul("--plugins", plugin_dir=src_dir)
        assert rc == 0 and "example      1.0.0      ABI 1  " + so in out, out + err
        b = self.broker()
        cfg = h.base_config(self.workdir, b.port, [example_device("demo-01")])
        cfg["gateway"]["plugin_dir"] = src_dir
        sub = self.subscriber(b.port, ["simpul/gw-test/#"])
        g = self.gateway(cfg)
        d = sub.wait_json("simpul/gw-test/demo-01/data", lambda j: "count" in j["values"], 20)
        assert isinstance(d["values"]["count"], int), d
        assert "loaded example 1.0.0 from " + so in g.proc.output()
        g.stop()

    def test_plugins_and_help(self):
        rc, out, err = simpul("--plugins")
        assert rc == 0, out + err
        for name in ("modbus", "snmp"):
            assert any(line.split()[:4] == [name, "1.0.0", "ABI", "1"]
                       for line in out.splitlines()), out
        rc, out, err = simpul("--plugins", plugin_dir=EXAMPLE_DIR)
        assert rc != 0 and "badabi       unusable: badabi.so: plugin ABI version 2" in out, out
        rc, out, err = simpul("--plugin-help", "snmp")
        assert rc == 0, err
        assert "max_varbinds_per_request   integer 1..1000, default 32" in out, out
        assert "oid                        string, required" in out, out
        assert "auth_password_file         secret file" in out, out
        rc, out, err = simpul("--plugin-help", "nosuch")
        assert rc == 1 and "nosuch.so not found" in err, err

    def test_schema_agrees_with_key_tables(self):
        with open(SCHEMA) as f:
            defs = json.load(f)["$defs"]
        for proto, plugin_dir in (("modbus", None), ("snmp", None), ("example", EXAMPLE_DIR)):
            rc, out, err = simpul("--plugin-schema", proto, plugin_dir=plugin_dir)
            assert rc == 0, err
            gen = json.loads(out)
            for part, name in (("connection", proto + "Connection"), ("tag", proto + "Tag")):
                self.compare(proto, part, gen[part], defs[name])

    def compare(self, proto, part, gen, sch):
        where = "%s %s" % (proto, part)
        props = dict(sch["properties"])
        if part == "tag":
            props.pop("type", None)  # a host field, narrowed by some drivers
        assert set(props) == set(gen["properties"]), (where, set(props) ^ set(gen["properties"]))
        assert set(sch.get("required", [])) == set(gen["required"]), where
        for key, g in gen["properties"].items():
            s = props[key]
            what = "%s.%s" % (where, key)
            if "enum" in g:
                assert s.get("enum") == g["enum"], (what, s, g)
            else:
                assert s.get("type") == g["type"], (what, s, g)
            if g.get("type") == "integer":
                lo = s.get("minimum", min(s.get("enum", [g["minimum"]])))
                hi = s.get("maximum", max(s.get("enum", [g["maximum"]])))
                assert g["minimum"] <= lo and hi <= g["maximum"], (what, s, g)
                assert "minimum" not in s or s["minimum"] == g["minimum"], (what, s, g)
                assert "maximum" not in s or s["maximum"] == g["maximum"], (what, s, g)
            if "default" in g:
                assert s.get("default") == g["default"], (what, s, g)

    def bad_config(self, protocol):
        cfg = h.base_config(self.workdir, 1883, [example_device("good-01"),
                                                  example_device("bad-01", protocol)])
        cfg["gateway"]["plugin_dir"] = os.path.abspath(EXAMPLE_DIR)
        return cfg

    CASES = [
        ("nothere", "nothere.so not found in"),
        ("noentry", "noentry.so: not a simpul plugin (no smp_plugin_entry symbol)"),
        ("badabi", "badabi.so: plugin ABI version 2, this simpul supports ABI version 1"),
        ("badsize", "badsize.so: plugin descriptor is 16 bytes, ABI version 1 needs at least"),
        ("badinit", "badinit.so: the plugin refused to start (its entry point returned NULL)"),
    ]

    def test_bad_plugins_refused_at_start(self):
        for proto, want in self.CASES:
            cfg = self.bad_config(proto)
            g = h.Gateway(self.workdir, cfg, name="start-" + proto)
            g.start()
            rc = g.proc.wait(10)
            out = g.proc.output()
            g.proc.stop()
            assert rc == 1, (proto, rc, out)
            assert "devices[1].protocol: " in out and want in out, (proto, out)
            assert "(device bad-01)" in out and "not starting" in out, (proto, out)

    def test_bad_plugins_on_reload_keep_the_old_config(self):
        b = self.broker()
        cfg = h.base_config(self.workdir, b.port, [example_device("good-01")])
        cfg["gateway"]["plugin_dir"] = os.path.abspath(EXAMPLE_DIR)
        sub = self.subscriber(b.port, ["simpul/gw-test/#"])
        g = self.gateway(cfg)
        topic = "simpul/gw-test/good-01/data"
        sub.wait_json(topic, lambda j: "count" in j["values"], 20)
        for proto, want in self.CASES:
            g.config = self.bad_config(proto)
            g.config["mqtt"]["port"] = b.port
            g.write_config()
            g.proc.signal(signal.SIGHUP)
            h.wait_for(lambda: want in g.proc.output(), 10, "reload of %s rejected" % proto)
            sub.clear()
            d = sub.wait_json(topic, lambda j: True, 10, "old config still polling")
            assert d["seq"] > 0
        assert "config reloaded" not in g.proc.output()
        g.stop()


if __name__ == "__main__":
    PluginKitTest().run_all()
