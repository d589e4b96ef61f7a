#!/usr/bin/python3
"""An independent Modbus TCP server for simpul's integration tests, on Debian's pymodbus 3.0.

simpul-sim is the project's own simulator; this server is the *other* implementation, so a
test can show the gateway agrees with a Modbus stack it did not grow up with. It serves
exactly the values a JSON spec lists and records every write it executes.

    /usr/bin/python3 pymodbus_server.py --port P --spec FILE [--bind ADDR] [-v]
    /usr/bin/python3 pymodbus_server.py --rtu TTY [--baud N] --spec FILE [-v]

With --rtu it is a Modbus RTU server on the serial device TTY (e.g. one end of a socat pty
pair) instead of a TCP server.

The spec (unknown keys are errors, so a typo cannot silently serve zeros):

    {
      "unit": 1,                                   one unit (default 1) ...
      "coils":             {"0": 1, "5": [1, 0, 1]},
      "discrete_inputs":   {"0": 0},
      "holding_registers": {"0": 4660, "10": [16968, 0]},
      "input_registers":   {"100": 65535},

      "units": {"1": {"coils": {...}, ...}, "2": {...}},   ... or several (not both forms)

      "sparse": false,             true: only the listed addresses exist, any other address
                                   is answered with exception 2 (illegal data address);
                                   false (default): all 65536 addresses exist, unlisted read 0
      "ignore_missing_units": false,   true: no answer for an unknown unit id (a timeout);
                                   false (default): exception 0x0B (gateway target failed)
      "write_log": "/path"         append one line per write executed, flushed before the
                                   answer is sent
    }

Addresses are 0-based (PDU addresses) and given as strings; a value is a raw 16-bit register
(0..65535) or a bit (0/1/true/false), or a list of them for consecutive addresses.

Write log lines have the same shape as simpul-sim's --write-log:
    UNIT FC ADDRESS N V1 .. VN ok
e.g. "1 6 10 1 1200 ok", "1 16 0 2 16968 0 ok", "1 5 3 1 1 ok". Only writes that were executed
are logged (a write to an address that does not exist is answered with an exception and not
logged). For function 22 (mask write) the single value is the register's resulting value.

Prints one "listening" line on stdout once it accepts connections; SIGTERM or SIGINT stops it
cleanly (exit 0). Exit 2 on a bad spec.
"""
import argparse
import asyncio
import json
import logging
import signal
import sys

from pymodbus.datastore import (
    ModbusServerContext,
    ModbusSlaveContext,
    ModbusSequentialDataBlock,
    ModbusSparseDataBlock,
)
from pymodbus.framer.rtu_framer import ModbusRtuFramer
from pymodbus.server.async_io import ModbusSerialServer, ModbusTcpServer

TABLES = {
    # spec key: (ModbusSlaveContext keyword, is a bit table)
    "coils": ("co", True),
    "discrete_inputs": ("di", True),
    "holding_registers": ("hr", False),
    "input_registers": ("ir", False),
}
TOP_KEYS = {"unit", "units", "sparse", "ignore_missing_units", "write_log"} | set(TABLES)


class SpecError(Exception):
    pass


class WriteLog:
    """Appends one line per executed write and flushes it at once."""

    def __init__(self, path):
        self.f = open(path, "a", encoding="ascii")

    def write(self, unit, fc, address, values):
        vals = [int(v) for v in values]  # coils arrive as bools
        self.f.write("%d %d %d %d %s ok\n" % (unit, fc, address, len(vals),
                                              " ".join(str(v) for v in vals)))
        self.f.flush()

    def close(self):
        self.f.close()


class LoggingSlaveContext(ModbusSlaveContext):
    """A slave context that reports every write to the write log.

    pymodbus 3.0 calls setValues(function_code, address, values) once per write request
    (FC 5, 6, 15, 16, 22, 23), after validate() has accepted the address range, and before
    the answer is built, so a logged line always precedes the client's confirmation.
    """

    def __init__(self, unit, log, **kwargs):
        super().__init__(**kwargs)
        self.unit = unit
        self.log = log

    def setValues(self, fc_as_hex, address, values):  # noqa: N802 - pymodbus' name
        super().setValues(fc_as_hex, address, values)
        if self.log is not None:
            self.log.write(self.unit, fc_as_hex, address, values)


class GatewayServerContext(ModbusServerContext):
    """Answers requests for unknown unit ids with exception 0x0B, like a Modbus TCP gateway.

    pymodbus 3.0's TCP framer silently drops a request whose unit id is not in slaves()
    unless unit 0 is listed, in which case every request reaches the server, and the server
    answers an unknown unit with "gateway target device failed to respond" (its
    ignore_missing_slaves=False behaviour, otherwise unreachable on TCP). Listing 0 here is
    how to get there; a request for unit 0 itself is then also answered with 0x0B unless the
    spec defines unit 0.
    """

    def slaves(self):
        units = super().slaves()
        return units if 0 in units else units + [0]


class QuietDisconnects(logging.Filter):
    """pymodbus 3.0 logs every client disconnect as an ERROR; those are normal here."""

    def filter(self, record):
        return "has been canceled" not in record.getMessage()


def parse_addr(where, key):
    try:
        a = int(key, 10)
    except (TypeError, ValueError):
        raise SpecError("%s: address %r is not a decimal integer" % (where, key))
    if not 0 <= a <= 65535:
        raise SpecError("%s: address %d out of range 0..65535" % (where, a))
    return a


def parse_value(where, v, is_bit):
    if is_bit:
        if isinstance(v, bool) or (isinstance(v, int) and v in (0, 1)):
            return bool(v)
        raise SpecError("%s: a bit must be 0, 1, true or false, not %r" % (where, v))
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise SpecError("%s: a register must be an integer 0..65535, not %r" % (where, v))
    return v


def parse_table(where, obj, is_bit):
    """Returns {address: value} for one table of the spec."""
    if not isinstance(obj, dict):
        raise SpecError("%s: expected an object of address: value" % where)
    out = {}
    for key, v in obj.items():
        a = parse_addr(where, key)
        vals = v if isinstance(v, list) else [v]
        for i, item in enumerate(vals):
            if a + i > 65535:
                raise SpecError("%s.%s: list runs past address 65535" % (where, key))
            out[a + i] = parse_value("%s.%s" % (where, key), item, is_bit)
    return out


def make_block(values, is_bit, sparse):
    if sparse:
        # An empty sparse block answers every address with "illegal data address".
        return ModbusSparseDataBlock(dict(values))
    block = ModbusSequentialDataBlock(0, [False if is_bit else 0] * 65536)
    for a, v in values.items():
        block.values[a] = v
    return block


def build_context(spec, log, ignore_missing):
    unknown = set(spec) - TOP_KEYS
    if unknown:
        raise SpecError("unknown keys: %s" % ", ".join(sorted(unknown)))
    sparse = spec.get("sparse", False)
    if not isinstance(sparse, bool):
        raise SpecError("sparse: expected true or false")

    if "units" in spec:
        if "unit" in spec or any(k in spec for k in TABLES):
            raise SpecError("give either 'units' or 'unit' with tables at the top, not both")
        if not isinstance(spec["units"], dict) or not spec["units"]:
            raise SpecError("units: expected a non-empty object of unit id: tables")
        per_unit = {}
        for key, tables in spec["units"].items():
            per_unit[parse_unit("units." + key, key)] = (tables, "units." + key)
    else:
        unit = spec.get("unit", 1)
        per_unit = {parse_unit("unit", unit): ({k: spec[k] for k in TABLES if k in spec}, "")}

    slaves = {}
    for unit, (tables, where) in per_unit.items():
        if not isinstance(tables, dict):
            raise SpecError("%s: expected an object of tables" % where)
        bad = set(tables) - set(TABLES)
        if bad:
            raise SpecError("%s: unknown keys: %s" % (where or "spec", ", ".join(sorted(bad))))
        blocks = {}
        for name, (kw, is_bit) in TABLES.items():
            path = (where + "." if where else "") + name
            blocks[kw] = make_block(parse_table(path, tables.get(name, {}), is_bit), is_bit,
                                    sparse)
        # zero_mode: pymodbus 3.0 otherwise adds one to every address (see notes.md).
        slaves[unit] = LoggingSlaveContext(unit, log, zero_mode=True, **blocks)
    cls = ModbusServerContext if ignore_missing else GatewayServerContext
    return cls(slaves=slaves, single=False)


def parse_unit(where, v):
    try:
        u = int(v)
    except (TypeError, ValueError):
        raise SpecError("%s: unit id %r is not an integer" % (where, v))
    if isinstance(v, bool) or not 0 <= u <= 247:
        raise SpecError("%s: unit id %r out of range 0..247" % (where, v))
    return u


async def serve(args, context, ignore_missing):
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    if args.rtu:
        await serve_rtu(args, context, ignore_missing, stop)
        return
    server = ModbusTcpServer(context, address=(args.bind, args.port),
                             allow_reuse_address=True,
                             ignore_missing_slaves=ignore_missing)
    task = asyncio.create_task(server.serve_forever())
    # serve_forever() resolves `serving` once the socket listens; if binding fails the task
    # ends with the error instead, so wait for whichever happens first.
    done, _ = await asyncio.wait({task, server.serving}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()  # raises the bind error
        raise RuntimeError("server stopped before listening")
    units = ",".join(str(u) for u, _ in context)
    print("pymodbus_server: listening on %s:%d (units %s)" % (args.bind, args.port, units),
          flush=True)

    await stop.wait()
    await server.shutdown()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    print("pymodbus_server: stopped", flush=True)


async def serve_rtu(args, context, ignore_missing, stop):
    server = ModbusSerialServer(context, framer=ModbusRtuFramer, port=args.rtu,
                                baudrate=args.baud, ignore_missing_slaves=ignore_missing)
    await server.start()
    if server.transport is None:
        raise OSError("cannot open %s" % args.rtu)
    units = ",".join(str(u) for u, _ in context)
    print("pymodbus_server: listening on rtu %s %d (units %s)" % (args.rtu, args.baud, units),
          flush=True)
    await stop.wait()
    await server.shutdown()
    print("pymodbus_server: stopped", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int)
    ap.add_argument("--rtu", help="serve RTU on this serial device instead of TCP")
    ap.add_argument("--baud", type=int, default=9600)
    ap.add_argument("--spec", required=True, help="JSON spec (see the module docstring)")
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("-v", "--verbose", action="store_true", help="pymodbus debug logging")
    args = ap.parse_args()
    if (args.port is None) == (args.rtu is None):
        ap.error("give one of --port or --rtu")

    logging.basicConfig(stream=sys.stderr,
                        level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="pymodbus_server: %(levelname)s %(name)s: %(message)s",
                        force=True)  # pymodbus.constants calls basicConfig at import
    for handler in logging.getLogger().handlers:
        handler.addFilter(QuietDisconnects())
    try:
        with open(args.spec, encoding="utf-8") as f:
            spec = json.load(f)
        if not isinstance(spec, dict):
            raise SpecError("the spec must be a JSON object")
        ignore_missing = spec.get("ignore_missing_units", False)
        if not isinstance(ignore_missing, bool):
            raise SpecError("ignore_missing_units: expected true or false")
        log = WriteLog(spec["write_log"]) if spec.get("write_log") else None
        context = build_context(spec, log, ignore_missing)
    except (OSError, ValueError, SpecError) as e:
        print("pymodbus_server: %s: %s" % (args.spec, e), file=sys.stderr)
        return 2

    try:
        asyncio.run(serve(args, context, ignore_missing))
    except OSError as e:
        print("pymodbus_server: %s: %s" % (args.rtu or "%s:%d" % (args.bind, args.port), e),
              file=sys.stderr)
        return 1
    finally:
        if log is not None:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
