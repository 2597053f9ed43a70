# Runs under MicroPython: the board's Modbus master and SunSpec client
# (firmware/modbus.py, firmware/sunspec.py) on a serial port, built as the
# board builds them (modbus.master_for from board.json's rs485 and the
# config). argv: port, rs485 JSON, config JSON (its inverter/battery entries).
# Prints one JSON line after discovery, then one per line read on stdin:
# "go" reads the inverter and the battery as the board does each period
# (firmware/inverters.py's poll: a device not found is looked for again, one
# whose unit backs off is lost until found again), "stats" prints the
# master's counters and latencies, "quit" ends.
import json
import sys
import time

from firmware import sunspec
from firmware.modbus import master_for
from boardsim.uart_posix import PosixUart


class Clock:
    def ticks_ms(self):
        return time.ticks_ms()

    def ticks_add(self, t, d):
        return time.ticks_add(t, d)

    def ticks_diff(self, a, b):
        return time.ticks_diff(a, b)

    def sleep_ms(self, ms):
        time.sleep_ms(ms)


def call(fn):
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001 - reported to the test
        return None, "%s: %s" % (type(e).__name__, e)


def period(dev, ok):
    """One device's part of a reading: (values, error, found)."""
    err = None
    if not ok:
        ok, err = call(dev.discover)
    if not ok:
        return None, err, ok
    v, err = call(dev.read)
    if v is None and m.is_down(dev.unit):
        ok = None
    return v, err, ok


rs = json.loads(sys.argv[2])
cfg = json.loads(sys.argv[3])
m = master_for(PosixUart(sys.argv[1], rs.get("baud", 9600)), Clock(), rs, cfg)
inv = sunspec.Inverter(m, (cfg.get("inverter") or {}).get("unit", 1))
bat = sunspec.Battery(m, (cfg.get("battery") or {}).get("unit", 1))
t0 = time.ticks_ms()
ok_i, err_i = call(inv.discover)
ok_b, err_b = call(bat.discover)
print(json.dumps({"inv": ok_i, "inv_err": err_i, "model": getattr(inv, "model", None), "serial": inv.serial,
                  "bat": ok_b, "bat_err": err_b, "max_w": getattr(bat, "max_w", None),
                  "ms": time.ticks_diff(time.ticks_ms(), t0),
                  "timeouts_ms": [m.read_timeout_ms(inv.unit, 37), m.read_timeout_ms(bat.unit, 62)]}))
while True:
    line = sys.stdin.readline()
    if not line or line.strip() == "quit":
        break
    if line.strip() == "stats":
        print(json.dumps({"stats": m.stats, "latency": m.latency}))
        continue
    t0 = time.ticks_ms()
    iv, ie, ok_i = period(inv, ok_i)
    bv, be, ok_b = period(bat, ok_b)
    print(json.dumps({"inv": iv, "inv_err": ie, "bat": bv, "bat_err": be,
                      "ms": time.ticks_diff(time.ticks_ms(), t0)}))
