"""simpul -c FILE --probe DEVICE: every tag of one device read once through the real driver,
printed as tag, table/address, raw registers, decoded value, unit, error. Checked against
simpul-sim's register map (docs/simulator.md); the simulator's write log stays empty even though
the tags are writable; an unreachable device exits 1."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as h  # noqa: E402

TAGS = [
    {"name": "running", "table": "coil", "address": 0, "type": "bool", "writable": True},
    {"name": "speed_rpm", "table": "holding_register", "address": 10, "type": "uint16",
     "unit": "rpm", "writable": True, "min": 0, "max": 3000},
    {"name": "flow_m3h", "table": "input_register", "address": 0, "type": "float32",
     "order": "CDAB", "unit": "m3/h"},
    {"name": "pressure_bar", "table": "input_register", "address": 2, "type": "float32",
     "unit": "bar"},
    {"name": "current_a", "table": "input_register", "address": 4, "type": "float32",
     "order": "BADC", "unit": "A"},
    {"name": "motor_temp_c", "table": "input_register", "address": 7, "type": "int16",
     "scale": 0.1, "unit": "C"},
    {"name": "remote", "table": "input_register", "address": 9, "type": "bool", "bit": 1},
    {"name": "ramp_bit0", "table": "holding_register", "address": 11, "type": "bool", "bit": 0,
     "writable": True},
    {"name": "run_hours", "table": "input_register", "address": 10, "type": "uint32",
     "scale": 0.01, "unit": "h"},
    {"name": "name", "table": "input_register", "address": 20, "type": "string", "length": 8},
]

# (tag, table/address, raw, value) from the simulator's initial values, pump 1.
EXPECTED = [
    ("running", "coil 0", "1", "true"),
    ("speed_rpm", "holding_register 10", "05AA", "1450"),
    ("flow_m3h", "input_register 0-1", "0000 4148", "12.5"),
    ("pressure_bar", "input_register 2-3", "4010 0000", "2.25"),
    ("current_a", "input_register 4-5", "F040 0000", "7.5"),
    ("motor_temp_c", "input_register 7", "019F", "41.5"),
    ("remote", "input_register 9 bit 1", "0003", "true"),
    ("ramp_bit0", "holding_register 11 bit 0", "0005", "true"),
    ("run_hours", "input_register 10-11", "0001 E240", "1234.56"),
    ("name", "input_register 20-27", "4475 6D61 6920 5053 2D30 3100 0000 0000",
     '"Dumai PS-01"'),
]


def probe(cfg_path, device):
    env = dict(os.environ)
    env["SIMPUL_PLUGIN_DIR"] = h.PLUGIN_DIR
    p = subprocess.run([h.SIMPUL, "-c", cfg_path, "--probe", device], env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def write_config(workdir, conn, tags=TAGS):
    import json
    cfg = {"gateway": {"id": "gw-probe", "data_dir": workdir},
           "devices": [{"name": "pump-01", "protocol": "modbus", "connection": conn,
                        "tags": tags}]}
    path = os.path.join(workdir, "probe.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


class ProbeTest(h.TestCase):
    def check_table(self, out):
        rows = {line.split()[0]: line for line in out.splitlines()[2:] if line.strip()}
        assert len(rows) == len(EXPECTED), out
        for tag, where, raw, value in EXPECTED:
            row = rows[tag]
            rest = row[len(tag):].strip()
            assert rest.startswith(where + " "), (tag, row)
            rest = rest[len(where):].strip()
            assert rest.startswith(raw + " "), (tag, row)
            rest = rest[len(raw):].strip()
            assert rest.startswith(value + " "), (tag, row)

    def test_probe_reads_every_tag_and_writes_nothing(self):
        wlog = os.path.join(self.workdir, "writes.log")
        sim = self.sim(["--pumps", "1", "--lights", "0", "--static", "--write-log", wlog])
        path = write_config(self.workdir, {"transport": "tcp", "host": "127.0.0.1",
                                           "port": sim.port, "unit_id": 1})
        rc, out, err = probe(path, "pump-01")
        assert rc == 0, (rc, out, err)
        assert out.splitlines()[0].startswith("pump-01 (tcp:127.0.0.1:%d): 10 tags" % sim.port)
        self.check_table(out)
        assert os.path.getsize(wlog) == 0, open(wlog).read()

    def test_probe_over_rtu_tcp_and_a_refused_tag(self):
        wlog = os.path.join(self.workdir, "writes.log")
        sim = self.sim(["--rtu-tcp", "--pumps", "1", "--lights", "0", "--static",
                        "--write-log", wlog])
        bad = {"name": "missing", "table": "holding_register", "address": 0, "type": "uint16"}
        path = write_config(self.workdir, {"transport": "rtu_tcp", "host": "127.0.0.1",
                                           "port": sim.port, "unit_id": 1}, TAGS + [bad])
        rc, out, err = probe(path, "pump-01")
        assert rc == 3, (rc, out, err)  # reachable, one tag refused
        row = [line for line in out.splitlines() if line.startswith("missing ")]
        assert row and row[0].rstrip().endswith("illegal data address"), out
        self.check_table("\n".join(line for line in out.splitlines()
                                   if not line.startswith("missing ")))
        assert os.path.getsize(wlog) == 0, open(wlog).read()

    def test_probe_unreachable_and_unknown_device(self):
        port = h.free_port()
        path = write_config(self.workdir, {"transport": "tcp", "host": "127.0.0.1",
                                           "port": port, "unit_id": 1, "timeout_ms": 200})
        rc, out, err = probe(path, "pump-01")
        assert rc == 1 and "cannot be reached" in err, (rc, out, err)
        rc, out, err = probe(path, "pump-99")
        assert rc == 2 and 'no device "pump-99"' in err, (rc, out, err)


if __name__ == "__main__":
    ProbeTest().run_all()
