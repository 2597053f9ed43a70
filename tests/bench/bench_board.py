#!/usr/bin/env python3
"""Benchmark: the virtual board (the firmware compiled with mpy-cross, on the
MicroPython unix port with the heap capped at an ESP32's ~110 KB) runs a
simulated day against a real mosquitto, with a broker outage in the middle.

Measures: peak heap and lowest free heap (the board's own gc.mem_free() after
every reading), readings per simulated hour, the spool's capacity in hours
for the frames this board makes, and the replay rate once the broker is back
(replay limit set high, so the board's own speed is what is measured).

    python tests/bench/bench_board.py            # 24 simulated hours, 3 h outage
    python tests/bench/bench_board.py --quick    # 2 simulated hours, 30 min outage
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Broker, mpy_build  # noqa: E402
from peergrid.vboard import VirtualBoard, default_config  # noqa: E402
from protocol import topics  # noqa: E402

HEAP = 110 * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--speed", type=float, default=400.0)
    a = ap.parse_args()
    hours = 2.0 if a.quick else 24.0
    outage_h = 0.5 if a.quick else 3.0
    speed = a.speed
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        mpy = mpy_build(tmp / "mpy")
        (tmp / "mq").mkdir()
        broker = Broker(tmp / "mq")
        secret = os.urandom(32)
        broker.add_user("bench1", "bench-pw", topics.device_acl("oak", "bench1"))
        broker.apply()
        cfg = default_config("oak", "bench1", secret, broker.host, broker.port, "bench1", "bench-pw",
                             replay_per_s=1000, backoff_s=[1, 2], status_s=600,
                             inverter={"unit": 1}, battery={"unit": 1, "max_w": 5000})
        vb = VirtualBoard(tmp / "board", cfg, speed=speed, data_heap=HEAP, mpy_dir=mpy)
        try:
            t_real0 = time.monotonic()
            vb.start(timeout=60)
            vb.sim.device.set_inverter(2500, 4_000_000, 4)
            vb.sim.device.set_battery(650)
            day_ms = int(hours * 3600 * 1000)
            out_start = int((hours - outage_h) / 2 * 3600 * 1000)
            vb.poll_state(lambda s: s["board_ms"] >= out_start, hours * 3600 / speed * 3 + 30, every=0.5)
            broker.stop()
            t_out = vb.poll_state(lambda s: not s["connected"], 60)["board_ms"]
            st = vb.poll_state(lambda s: s["board_ms"] >= t_out + outage_h * 3600 * 1000,
                               outage_h * 3600 / speed * 3 + 30, every=0.5)
            backlog = st["buffered"]
            os.kill(vb.proc.pid, signal.SIGSTOP)
            broker.start()
            os.kill(vb.proc.pid, signal.SIGCONT)
            st = vb.poll_state(lambda s: s["connected"], 60, every=0.05)
            t0 = time.monotonic()
            replayed0 = st["stats"]["replayed"]
            st = vb.poll_state(lambda s: s["buffered"] == 0, 600, every=0.05)
            dt = time.monotonic() - t0
            replay_per_s = (st["stats"]["replayed"] - replayed0) / dt if dt > 0 else 0.0
            st = vb.poll_state(lambda s: s["board_ms"] >= day_ms, hours * 3600 / speed * 3 + 60, every=0.5)
            real_s = time.monotonic() - t_real0
            vb.send(op="gc")
            steady = vb.wait_for(lambda e: e.get("ev") == "gc")["free"]
            frame_len = st["frame_len"]
            cap = st.get("spool_capacity_records", 0)
            sim_h = st["board_ms"] / 3600000
            per_h = st["stats"]["readings"] / sim_h
            result = {
                "bench": "board", "quick": a.quick, "simulated_hours": round(sim_h, 2),
                "speed": speed, "real_s": round(real_s, 1), "heap_cap_bytes": HEAP,
                "code_bytes": vb.code_bytes, "process_heap_bytes": int(vb.heap or 0),
                "peak_heap_bytes": st["heap_peak"] - vb.code_bytes, "min_free_heap_bytes": st["min_free"],
                "live_heap_bytes": st["heap_live"] - vb.code_bytes, "cycle_alloc_bytes": st["heap_cycle"],
                "steady_free_heap_bytes": steady,
                "readings": st["stats"]["readings"], "readings_per_hour": round(per_h, 1),
                "missed_periods": st["stats"]["missed_periods"],
                "outage_backlog": backlog, "replay_per_s": round(replay_per_s, 1),
                "spool_capacity_records": cap, "buffer_hours": round(cap / per_h, 1) if per_h else 0,
                "frame_bytes": frame_len, "dropped": st["dropped"],
                "spool_errors": st["stats"]["spool_errors"], "memory_errors": 0,
            }
        finally:
            vb.close()
            broker.stop()
        if any("MemoryError" in line for line in vb.stderr):
            result["memory_errors"] = sum("MemoryError" in line for line in vb.stderr)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
