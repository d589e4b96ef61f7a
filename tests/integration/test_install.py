"""`meson install` alone lays out a working simpul: installed into a DESTDIR, the tree holds the
programs, the Modbus plugin, the plugin header and simpul-plugin.pc, the systemd unit (which
`systemd-analyze verify` accepts, with an exposure of at most 2.0), the sysusers.d and tmpfiles.d entries, the site config and
the JSON Schema; the installed daemon validates the installed site config with the installed
plugin, and a plugin builds against the installed header found through the .pc file.
"""
import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import SOURCE_ROOT, Failure, TestCase  # noqa: E402

BUILD_ROOT = os.environ.get("SIMPUL_BUILD_ROOT", os.path.join(SOURCE_ROOT, "build"))


def run(argv, env=None, check=True, cwd=None):
    e = dict(os.environ)
    if env:
        e.update(env)
    p = subprocess.run(argv, env=e, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=120)
    out = p.stdout.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise Failure("%s exited %d:\n%s" % (" ".join(argv), p.returncode, out))
    return p.returncode, out


def build_options():
    _, out = run(["meson", "introspect", BUILD_ROOT, "--buildoptions"])
    return {o["name"]: o["value"] for o in json.loads(out)}


class InstallTest(TestCase):
    def install(self):
        dest = os.path.join(self.workdir, "dest")
        run(["meson", "install", "-C", BUILD_ROOT, "--no-rebuild", "--quiet", "--destdir", dest])
        o = build_options()
        prefix = o["prefix"]

        def p(*parts):  # an installed path, absolute as on the target
            return os.path.normpath(os.path.join(prefix, *parts))

        paths = {
            "simpul": p(o["bindir"], "simpul"),
            "sim": p(o["bindir"], "simpul-sim"),
            "plugins": p(o["libdir"], "simpul", "plugins"),
            "modbus": p(o["libdir"], "simpul", "plugins", "modbus.so"),
            "header": p(o["includedir"], "simpul", "plugin.h"),
            "pc": p(o["libdir"], "pkgconfig", "simpul-plugin.pc"),
            "config": p(o["sysconfdir"], "simpul", "simpul.json"),
            "schema": p(o["datadir"], "simpul", "simpul.schema.json"),
            "man": p(o["mandir"], "man1", "simpul.1"),
        }
        for key, opt, sub in [("unit", "systemdsystemunitdir", "lib/systemd/system"),
                              ("sysusers", "sysusersdir", "lib/sysusers.d"),
                              ("tmpfiles", "tmpfilesdir", "lib/tmpfiles.d")]:
            d = o[opt] or (prefix + "/" + sub if prefix != "/usr" else None)
            if d is None:  # systemd's own directories for a /usr prefix
                d = run(["pkg-config", "--variable=" + opt, "systemd"])[1].strip()
            paths[key] = os.path.join(d, "simpul.service" if key == "unit" else "simpul.conf")
        return dest, prefix, paths

    def test_tree(self):
        dest, prefix, paths = self.install()
        missing = [k + ": " + v for k, v in paths.items()
                   if k != "plugins" and not os.path.isfile(dest + v)]
        if missing:
            found = [os.path.join(r, f) for r, _, fs in os.walk(dest) for f in fs]
            raise Failure("not installed:\n  %s\ninstalled:\n  %s" %
                          ("\n  ".join(missing), "\n  ".join(sorted(found))))
        for k in ("simpul", "sim"):
            if not os.access(dest + paths[k], os.X_OK):
                raise Failure("%s is not executable" % paths[k])
        # Nothing outside the prefix unless the prefix is /usr (/etc then, as Debian wants).
        for r, _, fs in os.walk(dest):
            for f in fs:
                t = os.path.join(r, f)[len(dest):]
                if not (t.startswith(prefix + "/") or (prefix == "/usr" and t.startswith("/etc/"))):
                    raise Failure("%s installed outside the prefix %s" % (t, prefix))
        with open(dest + paths["sysusers"]) as f:
            users = f.read()
        for line in (r"^u simpul ", r"^m simpul dialout$"):
            if not re.search(line, users, re.M):
                raise Failure("sysusers entry lacks %r:\n%s" % (line, users))
        with open(dest + paths["tmpfiles"]) as f:
            if not re.search(r"^d /var/lib/simpul 0750 simpul simpul", f.read(), re.M):
                raise Failure("tmpfiles entry does not create /var/lib/simpul for simpul")

    def test_unit_verifies(self):
        dest, prefix, paths = self.install()
        with open(dest + paths["unit"]) as f:
            unit = f.read()
        for want in ("ExecStart=%s -c %s\n" % (paths["simpul"], paths["config"]),
                     "User=simpul\n", "StateDirectory=simpul\n"):
            if want not in unit:
                raise Failure("unit lacks %r:\n%s" % (want, unit))
        # systemd-analyze checks that the programs exist: point them into the DESTDIR.
        local = os.path.join(self.workdir, "simpul.service")
        with open(local, "w") as f:
            f.write(unit.replace(paths["simpul"], dest + paths["simpul"]))
        # The manual page is installed in the DESTDIR, not where man looks: the package test
        # (scripts/test-deb.sh) verifies with it.
        rc, out = run(["systemd-analyze", "verify", "--man=no", local], check=False)
        if rc != 0 or out.strip():
            raise Failure("systemd-analyze verify: exit %d\n%s\n%s" % (rc, out, unit))
        # The sandbox: docs/install.md states the figure.
        rc, out = run(["systemd-analyze", "security", "--offline=yes", local], check=False)
        m = re.search(r"Overall exposure level for simpul.service: ([0-9.]+)", out)
        if m is None or float(m.group(1)) > 2.0:
            raise Failure("systemd-analyze security: exposure above 2.0:\n" + out)

    def test_installed_check(self):
        # The installed daemon and plugin validate the installed site template. Its paths are
        # /var/lib/simpul; point them at a temp dir so any user can run this.
        dest, prefix, paths = self.install()
        with open(dest + paths["config"]) as f:
            text = f.read()
        if '"data_dir": "/var/lib/simpul"' not in text or "/var/lib/simpul/simpul.db" not in text:
            raise Failure("the site template's paths are not under /var/lib/simpul:\n" + text)
        state = os.path.join(self.workdir, "state")
        cfg = os.path.join(self.workdir, "site.json")
        with open(cfg, "w") as f:
            f.write(text.replace("/var/lib/simpul", state))
        rc, out = run([dest + paths["simpul"], "-c", cfg, "--check", "--plugin-dir",
                       dest + paths["plugins"]], env={"SIMPUL_PLUGIN_DIR": ""})
        if "OK (" not in out:
            raise Failure(out)

    def test_plugin_builds_against_pc(self):
        dest, prefix, paths = self.install()
        env = {"PKG_CONFIG_PATH": os.path.dirname(dest + paths["pc"]),
               "PKG_CONFIG_SYSROOT_DIR": ""}
        _, plugindir = run(["pkg-config", "--variable=plugindir", "simpul-plugin"], env=env)
        if plugindir.strip() != paths["plugins"]:
            raise Failure("plugindir %r, expected %r" % (plugindir.strip(), paths["plugins"]))
        # The sysroot maps the .pc file's /usr/... include path into the DESTDIR.
        env["PKG_CONFIG_SYSROOT_DIR"] = dest
        _, cflags = run(["pkg-config", "--cflags", "simpul-plugin"], env=env)
        # Only the installed header: the example plugin's source is copied away from the tree.
        src = os.path.join(self.workdir, "example.c")
        shutil.copy(os.path.join(SOURCE_ROOT, "plugins", "example", "example.c"), src)
        so = os.path.join(self.workdir, "example.so")
        run(["cc", "-std=c11", "-O1", "-shared", "-fPIC", "-fvisibility=hidden"] +
            cflags.split() + ["-o", so, src, "-lm"])
        cfg = os.path.join(self.workdir, "ex.json")
        with open(cfg, "w") as f:
            json.dump({"gateway": {"id": "gw", "data_dir": os.path.join(self.workdir, "d")},
                       "devices": [{"name": "demo-01", "protocol": "example",
                                    "connection": {"host": "sim-a"},
                                    "tags": [{"name": "count", "type": "uint32",
                                              "signal": "counter"}]}]}, f)
        _, out = run([dest + paths["simpul"], "-c", cfg, "--check", "--plugin-dir",
                      self.workdir], env={"SIMPUL_PLUGIN_DIR": ""})
        if "OK (1 devices, 1 tags)" not in out:
            raise Failure(out)


if __name__ == "__main__":
    InstallTest().run_all()
