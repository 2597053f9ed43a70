#!/usr/bin/env python3
"""Modbus RTU on a real-speed line: the board's master and SunSpec client
(firmware/modbus.py, firmware/sunspec.py) on the real MicroPython, reading a
pymodbus SunSpec inverter and battery over a pty cable throttled to 9600 Bd
(11 bits a character), the device starting each answer 0, 60, 150 and 300 ms
after the request. Each cycle is what the board does every period (inverter
and battery read); the device holds new values every cycle, so an answer
taken for the wrong request counts as wrong. The master runs with the
timeouts the board computes (board.json's rs485.latency_ms, 500 ms).

Then two hostile cases: a device 150 ms slow while the board was told 10 ms
(late answers: none may be taken for the next request), and a device that
stops answering (cycles until it is missing).

Prints a few human lines, then one JSON object as the last line."""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from modbus_line import Line  # noqa: E402

LATENCIES = (0, 60, 150, 300)


def run_latency(lat: int, cycles: int, out: dict) -> None:
    line = Line(lat)
    try:
        d = line.discovery()
        rs = [line.cycle(i) for i in range(cycles)]
        st = line.stats()
    finally:
        line.close()
    ms = sorted(r["ms"] for r in rs)
    out[lat] = {"discovered": bool(d["inv"] and d["bat"] and d["model"] == 103),
                "discovery_ms": d["ms"], "timeouts_ms": d["timeouts_ms"],
                "right": sum(1 for r in rs if r["inv_right"] and r["bat_right"]), "cycles": cycles,
                "cycle_ms_median": ms[len(ms) // 2], "cycle_ms_max": ms[-1],
                "timeouts": st["stats"]["timeouts"], "crc_errors": st["stats"]["crc_errors"],
                "frame_errors": st["stats"]["frame_errors"]}


def run_late(cycles: int, out: dict) -> None:
    line = Line(150, rs485={"latency_ms": 10})
    try:
        line.discovery()
        rs = []
        for i in range(cycles):
            time.sleep(0.3)
            rs.append(line.cycle(i))
        st = line.stats()
    finally:
        line.close()
    wrong = sum(1 for r in rs if (r["inv"] is not None and not r["inv_right"])
                or (r["bat"] is not None and not r["bat_right"]))
    first_right = next((i for i, r in enumerate(rs) if r["inv_right"] and r["bat_right"]), None)
    out["late"] = {"cycles": cycles, "wrong": wrong, "first_right_cycle": first_right,
                   "late_answers": st["stats"]["late"], "learned_latency_ms": st["latency"].get("1")}


def run_silent(out: dict) -> None:
    line = Line(60)
    try:
        line.discovery()
        line.cycle(0)
        line.sim.mute()
        n = None
        for i in range(1, 4):
            r = line.cycle(i)
            if r["inv"] is None and r["bat"] is None:
                n = i
                break
    finally:
        line.close()
    out["silent"] = {"cycles_to_missing": n}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10 cycles per latency (< 60 s)")
    ap.add_argument("--cycles", type=int, default=0)
    a = ap.parse_args()
    cycles = a.cycles or (10 if a.quick else 40)
    out: dict = {}
    t0 = time.monotonic()
    jobs = [threading.Thread(target=run_latency, args=(lat, cycles, out)) for lat in LATENCIES]
    jobs.append(threading.Thread(target=run_late, args=(6 if a.quick else 12, out)))
    jobs.append(threading.Thread(target=run_silent, args=(out,)))
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    wall = time.monotonic() - t0
    for lat in LATENCIES:
        r = out[lat]
        print(f"device latency {lat:3d} ms: {r['right']}/{r['cycles']} cycles every value right, "
              f"cycle {r['cycle_ms_median']} ms median, {r['cycle_ms_max']} max; timeouts {r['timeouts']}, "
              f"CRC {r['crc_errors']}; computed read timeouts {r['timeouts_ms']} ms (model 103, 802)")
    print(f"late answers (device 150 ms, board told 10 ms): {out['late']['wrong']} wrong values in "
          f"{out['late']['cycles']} cycles, {out['late']['late_answers']} late answers drained, latency learned "
          f"{out['late']['learned_latency_ms']} ms, right from cycle {out['late']['first_right_cycle']}")
    print(f"silent device: missing after {out['silent']['cycles_to_missing']} cycle(s)")
    res = {"bench": "modbus", "quick": a.quick, "baud": 9600, "cycles": cycles, "wall_s": round(wall, 1),
           "right_per_latency": {str(lat): out[lat]["right"] for lat in LATENCIES},
           "min_right_fraction": round(min(out[lat]["right"] / cycles for lat in LATENCIES), 4),
           "timeouts_per_latency": {str(lat): out[lat]["timeouts"] for lat in LATENCIES},
           "crc_errors_total": sum(out[lat]["crc_errors"] for lat in LATENCIES),
           "cycle_ms_median": {str(lat): out[lat]["cycle_ms_median"] for lat in LATENCIES},
           "read_timeouts_ms": out[0]["timeouts_ms"],
           "late_wrong_values": out["late"]["wrong"], "late_answers_drained": out["late"]["late_answers"],
           "late_learned_latency_ms": out["late"]["learned_latency_ms"],
           "silent_cycles_to_missing": out["silent"]["cycles_to_missing"]}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
