#!/usr/bin/python3
"""Bench: history bytes per sample on disk at the city load, end to end.

    /usr/bin/python3 tests/bench/bench_history.py [--duration S] [--chunk-s S]

Load: a pymodbus server (Debian's, the independent Modbus peer) with 200 units x 50 holding
registers; every second 10 % of the registers take a random step of +-1..50. simpul polls each
unit every second (200 devices, 10,000 uint16 tags, one request per poll) through a local
mosquitto, default store settings except `history_chunk_max_s` (--chunk-s, default 900, the
default). After --duration seconds (default 2400: chunks close after 900 s, so two generations
are in SQLite by then, a tag's first chunk in delta-of-delta, its next in the period form) it reports, while simpul runs, what `dbstat` says the stored chunks take
per sample; then it stops simpul (which writes the open chunks) and reports the whole history.
Also: simpul's disk write rate (/proc/PID/io write_bytes) and CPU. Reports, never fails on time.
Needs SIMPUL, SIMPUL_PLUGIN_DIR (as the integration tests).
"""
import argparse
import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))
import harness as h  # noqa: E402

NDEV, NREG = 200, 50


def serve(port):
    """The load: runs in a child process until SIGTERM."""
    from pymodbus.datastore import (ModbusServerContext, ModbusSequentialDataBlock,
                                    ModbusSlaveContext)
    from pymodbus.server.async_io import ModbusTcpServer
    rnd = random.Random(1)
    blocks = {}
    slaves = {}
    for u in range(1, NDEV + 1):
        blocks[u] = ModbusSequentialDataBlock(0, [rnd.randrange(4000) for _ in range(NREG)])
        slaves[u] = ModbusSlaveContext(hr=blocks[u], zero_mode=True)
    context = ModbusServerContext(slaves=slaves, single=False)

    async def change():
        while True:
            await asyncio.sleep(1.0)
            for b in blocks.values():
                for a in range(NREG):
                    if rnd.random() < 0.1:
                        v = b.values[a] + rnd.choice((-1, 1)) * rnd.randint(1, 50)
                        b.values[a] = min(65535, max(0, v))

    async def main():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        server = ModbusTcpServer(context, address=("127.0.0.1", port), allow_reuse_address=True)
        task = asyncio.create_task(server.serve_forever())
        await server.serving
        print("listening", flush=True)
        ch = asyncio.create_task(change())
        await stop.wait()
        ch.cancel()
        await server.server_close()
        task.cancel()
    asyncio.run(main())


def proc_io(pid):
    with open("/proc/%d/io" % pid) as f:
        return dict((k, int(v)) for k, v in (line.split(": ") for line in f))["write_bytes"]


def proc_cpu(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def history_on_disk(path):
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        used = db.execute("select coalesce(sum(pgsize), 0) from dbstat where name in"
                          " ('history_chunk', 'history_chunk_by_time')").fetchone()[0]
        rows, samples, blob = db.execute(
            "select count(*), coalesce(sum(n), 0), coalesce(sum(length(data)), 0)"
            " from history_chunk").fetchone()
        return used, rows, samples, blob
    finally:
        db.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=2400)
    ap.add_argument("--chunk-s", type=int, default=900)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        serve(a.serve)
        return
    workdir = __import__("tempfile").mkdtemp(prefix="bench-history-")
    procs = []
    try:
        broker = h.Broker(workdir).start()
        procs.append(broker.stop)
        port = h.free_port()
        load = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(port)],
                                stdout=subprocess.PIPE, text=True)
        procs.append(lambda: (load.send_signal(signal.SIGTERM), load.wait(10)))
        assert load.stdout.readline().strip() == "listening"
        devices = [{"name": "dev-%03d" % u, "protocol": "modbus", "interval_ms": 1000,
                    "connection": {"transport": "tcp", "host": "127.0.0.1", "port": port,
                                   "unit_id": u, "timeout_ms": 1000},
                    "tags": [{"name": "reg%02d" % r, "table": "holding_register", "address": r,
                              "type": "uint16"} for r in range(NREG)]}
                   for u in range(1, NDEV + 1)]
        cfg = h.base_config(workdir, broker.port, devices)
        cfg["gateway"]["log_level"] = "info"
        cfg["store"]["history_chunk_max_s"] = a.chunk_s
        g = h.Gateway(workdir, cfg, "simpul", log_level="info")
        g.start()
        procs.append(lambda: g.stop(signal.SIGKILL))
        pid = g.proc.pid
        t0, w0, c0 = time.monotonic(), proc_io(pid), proc_cpu(pid)
        print("load: %d devices x %d uint16 registers @ 1 s, 10 %% changing per second; "
              "history_chunk_max_s %d; %.0f s" % (NDEV, NREG, a.chunk_s, a.duration), flush=True)
        while time.monotonic() - t0 < a.duration:
            time.sleep(min(60, a.duration - (time.monotonic() - t0)))
            el = time.monotonic() - t0
            used, rows, samples, blob = history_on_disk(cfg["store"]["path"])
            print("  %5.0f s: %d chunks stored, %d samples, %d B on disk; simpul wrote %.1f KB/s,"
                  " cpu %.1f %%" % (el, rows, samples, used, (proc_io(pid) - w0) / el / 1024,
                                    100 * (proc_cpu(pid) - c0) / el), flush=True)
        el = time.monotonic() - t0
        used, rows, samples, blob = history_on_disk(cfg["store"]["path"])
        print("stored chunks while running: %d samples in %d chunks (%.1f per chunk), "
              "%d B on disk = %.2f B/sample (blob %.2f B/sample)"
              % (samples, rows, samples / max(rows, 1), used, used / max(samples, 1),
                 blob / max(samples, 1)))
        db = sqlite3.connect("file:%s?mode=ro" % cfg["store"]["path"], uri=True, timeout=10)
        for enc, n, per in db.execute("select encoding, count(*), sum(length(data)) * 1.0 /"
                                      " sum(n) from history_chunk group by encoding"):
            print("  encoding 0x%02x: %d chunks, %.2f B/sample in their blobs" % (enc, n, per))
        db.close()
        print("simpul: wrote %.1f KB/s to disk, cpu %.1f %% of a core (the machine was shared)"
              % ((proc_io(pid) - w0) / el / 1024, 100 * (proc_cpu(pid) - c0) / el))
        rc = g.stop()
        used, rows, samples, blob = history_on_disk(cfg["store"]["path"])
        print("after the clean stop (open chunks written, half-full): %d samples in %d chunks, "
              "%d B = %.2f B/sample; simpul exit %d"
              % (samples, rows, used, used / max(samples, 1), rc))
    finally:
        for fn in reversed(procs):
            try:
                fn()
            except Exception as e:  # noqa: BLE001
                print("cleanup: %r" % e)
        __import__("shutil").rmtree(workdir, ignore_errors=True)
        __import__("shutil").rmtree(h.runtime_dir(workdir), ignore_errors=True)


if __name__ == "__main__":
    main()
