"""`simpul -c FILE --check`: every problem of a bad config is printed as FILE:LINE:COL: path: message
and the exit code is 1; a good config (the fixtures' and the shipped Dumai demo) exits 0.

The fixtures live in tests/integration/configs/. Each bad-*.json lists here the exact
"FILE:LINE:COL: path: " prefix of every problem it must produce (plus the message where the
message is the gateway's own; the Modbus driver words its own messages). The count must match
too: a problem printed twice, or a spurious one, fails the test.
"""
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import HERE, PLUGIN_DIR, SIMPUL, SOURCE_ROOT, Failure, TestCase  # noqa: E402

CONFIGS = os.path.join(HERE, "configs")
DEMO = os.path.join(SOURCE_ROOT, "config", "dumai-demo.json")
SITE = os.path.join(SOURCE_ROOT, "config", "site.json")
SCHEMA = os.path.join(SOURCE_ROOT, "config", "simpul.schema.json")

EXPECT = {
    "bad-syntax.json": [
        "bad-syntax.json:5:61: devices[0].connection: invalid JSON: string or '}' expected "
        "near '}'",
    ],
    "bad-unknown-key.json": [
        'bad-unknown-key.json:2:29: gateway.loglevel: unknown key (did you mean "log_level"?)',
        "bad-unknown-key.json:4:47: devices[0].interval: unknown key",
        'bad-unknown-key.json:5:62: devices[0].connection.prot: unknown key for protocol '
        '"modbus" (did you mean "port"?)',
        'bad-unknown-key.json:6:15: devices[0].tags[0]: missing required key "address" for '
        'protocol "modbus"',
        'bad-unknown-key.json:6:52: devices[0].tags[0].adress: unknown key for protocol '
        '"modbus" (did you mean "address"?)',
    ],
    "bad-range.json": [
        "bad-range.json:3:19: mqtt.qos: 2 is out of range 0..1",
        "bad-range.json:3:37: mqtt.keepalive_s: 0 is out of range 1..65535",
        "bad-range.json:5:62: devices[0].interval_ms: 5 is out of range 10..86400000",
        "bad-range.json:7:73: devices[0].tags[0].address: 70000 is out of range 0..65535",
        "bad-range.json:9:70: devices[1].connection.port: 70000 is out of range 1..65535",
        "bad-range.json:11:28: devices[1].tags[0].deadband: deadband must be >= 0, got -1",
        "bad-range.json:11:50: devices[1].tags[0].max: max 0 is less than min 10",
    ],
    "bad-duplicates.json": [
        "bad-duplicates.json:11:75: devices[0].connection.port: duplicate key (first at line "
        "11, column 62)",
        'bad-duplicates.json:12:14: devices[1].name: duplicate device name "pump-01" (first at '
        "line 10, column 14)",
        'bad-duplicates.json:14:24: devices[1].tags[0].name: duplicate tag name "speed": '
        'profile "pump-v1" has it (line 6, column 16)',
    ],
    "bad-types-names.json": [
        'bad-types-names.json:2:21: gateway.id: invalid name "gw 01": use only A-Z, a-z, 0-9, '
        "_ and -",
        'bad-types-names.json:3:20: mqtt.port: expected an integer, got a string ("1883")',
        "bad-types-names.json:3:39: mqtt.version: expected a string, got an integer (5)",
        'bad-types-names.json:5:58: devices[0].profile: unknown profile "pump-v2"',
        'bad-types-names.json:6:70: devices[0].connection.port: expected an integer, got a '
        'string ("502")',
        'bad-types-names.json:7:14: devices[1].name: invalid name "pump/02": use only A-Z, '
        "a-z, 0-9, _ and -",
        "bad-types-names.json:7:55: devices[1].tags: expected an array, got an object",
        'bad-types-names.json:8:34: devices[1].connection.transport: unknown value "udp" (use '
        "one of: tcp, rtu, rtu_tcp)",
    ],
    # The Modbus driver's cross-field checks: positions and paths are the host's, the words
    # are the driver's, so only the prefixes are pinned.
    "bad-modbus.json": [
        "bad-modbus.json:5:20: devices[0].connection: ",
        "bad-modbus.json:5:49: devices[0].connection.baud: ",
        "bad-modbus.json:5:66: devices[0].connection.unit_id: ",
        "bad-modbus.json:6:69: devices[0].tags[0].type: ",
        "bad-modbus.json:7:15: devices[0].tags[1]: ",
        "bad-modbus.json:8:104: devices[0].tags[2].writable: ",
    ],
    # Unit id 0 over TCP with a writable tag, without allow_broadcast_writes (a broadcast
    # behind a TCP-to-RTU gateway); the key itself is for tcp only.
    "bad-broadcast.json": [
        'bad-broadcast.json:5:73: devices[0].connection.unit_id: unit id 0 with writable tag '
        '"sp": behind a TCP-to-RTU gateway 0 is a broadcast',
        "bad-broadcast.json:18:47: devices[3].connection.allow_broadcast_writes: only for "
        "transport tcp, not rtu",
    ],
    "bad-rtu-tcp.json": [
        'bad-rtu-tcp.json:5:20: devices[0].connection: transport rtu_tcp needs "host"',
        "bad-rtu-tcp.json:5:53: devices[0].connection.baud: only for transport rtu, not rtu_tcp",
        "bad-rtu-tcp.json:5:70: devices[0].connection.unit_id: must be 1-247 for transport "
        "rtu_tcp (got 0)",
        "bad-rtu-tcp.json:8:78: devices[1].connection.frame_gap_ms: only for transport rtu_tcp, "
        "not tcp",
    ],
    "bad-missing-plugin.json": [
        'bad-missing-plugin.json:4:38: devices[0].protocol: no plugin for protocol "bacnet": '
        "bacnet.so not found in ",
    ],
}


def run_check(path, cwd=None):
    env = dict(os.environ)
    env["SIMPUL_PLUGIN_DIR"] = PLUGIN_DIR
    p = subprocess.run([SIMPUL, "-c", path, "--check"], cwd=cwd, env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def problem_lines(name, text):
    pat = re.compile(re.escape(name) + r":\d+:\d+: ")
    return [line for line in text.splitlines() if pat.match(line)]


class CheckTest(TestCase):
    def test_every_bad_fixture_has_expectations(self):
        fixtures = sorted(f for f in os.listdir(CONFIGS) if f.startswith("bad-"))
        if sorted(EXPECT) != fixtures:
            raise Failure("fixtures %s vs expectations %s" % (fixtures, sorted(EXPECT)))

    def test_bad_configs(self):
        failures = []
        for name, wants in sorted(EXPECT.items()):
            # Run from the fixtures' directory with a relative name: FILE is the path as given.
            rc, out, err = run_check(name, cwd=CONFIGS)
            got = problem_lines(name, out + err)
            why = []
            if rc != 1:
                why.append("exit code %s, expected 1" % rc)
            for want in wants:
                if not any(line.startswith(want) for line in got):
                    why.append("missing: " + want)
            if len(got) != len(wants):
                why.append("%d problems printed, expected %d" % (len(got), len(wants)))
            if why:
                failures.append("%s:\n  %s\n  output:\n%s%s" % (name, "\n  ".join(why), out, err))
        if failures:
            raise Failure("\n".join(failures))

    def test_good_fixture(self):
        rc, out, err = run_check("good-modbus.json", cwd=CONFIGS)
        if rc != 0 or "OK (4 devices, 12 tags)" not in out:
            raise Failure("exit %s\nstdout:\n%s\nstderr:\n%s" % (rc, out, err))
        if problem_lines("good-modbus.json", out + err):
            raise Failure("a good config printed problems:\n" + out + err)

    def test_dumai_demo(self):
        # The shipped example must always pass its own check.
        if not os.path.exists(DEMO):
            raise Failure("%s is missing" % DEMO)
        rc, out, err = run_check(DEMO)
        if rc != 0 or "OK" not in out:
            raise Failure("exit %s\nstdout:\n%s\nstderr:\n%s" % (rc, out, err))

    def test_missing_file(self):
        path = os.path.join(self.workdir, "nope.json")
        rc, out, err = run_check(path)
        want = "%s:1:1: (root): cannot read the config: No such file or directory" % path
        if rc != 1 or want not in err.splitlines():
            raise Failure("exit %s\nstdout:\n%s\nstderr:\n%s" % (rc, out, err))

    def test_schema_agrees(self):
        # The JSON Schema is for editors; --check is the authority. They must not disagree on
        # the fixtures. scripts/install-deps.sh installs Debian's python3-jsonschema.
        import jsonschema
        with open(SCHEMA) as f:
            schema = json.load(f)
        jsonschema.Draft202012Validator.check_schema(schema)
        v = jsonschema.Draft202012Validator(schema)
        for path in [DEMO, SITE, os.path.join(CONFIGS, "good-modbus.json")]:
            with open(path) as f:
                errs = list(v.iter_errors(json.load(f)))
            if errs:
                raise Failure("%s fails the schema: %s" % (path, [e.message for e in errs]))
        for name in ["bad-unknown-key.json", "bad-range.json", "bad-types-names.json",
                     "bad-modbus.json", "bad-rtu-tcp.json"]:
            with open(os.path.join(CONFIGS, name)) as f:
                if v.is_valid(json.load(f)):
                    raise Failure("%s passes the schema" % name)


if __name__ == "__main__":
    CheckTest().run_all()
