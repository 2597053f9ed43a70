#!/usr/bin/env python3
"""Benchmark: the board's heap on the ESP32's terms, and its store and forward.

1. For every board in boards/: the firmware compiled with mpy-cross runs a
   simulated day (24 h with a 3 h broker outage and leased commands; the tick
   clock starts 20 minutes before its 2^30 wrap) on the 32-bit MicroPython
   (tools/mp32) in one heap of the board's declared size that holds code and
   data, as a stock image's heap does (tools/footprint.py). Reports the code
   the firmware loads into the heap, the most code and data live after a
   collection, the least heap left free, and whether the board keeps the
   25 % margin; then the same board in the 111,936 bytes of an ESP32
   without PSRAM.
2. The virtual board (MicroPython unix port) against a real mosquitto with a
   broker outage: readings per hour, the spool's capacity in hours, and the
   replay rate once the broker is back.

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
sys.path.insert(0, str(ROOT / "tools"))

from harness import Broker, mpy_build  # noqa: E402
from peergrid.sim.vboard import VirtualBoard, default_config  # noqa: E402
from protocol import topics  # noqa: E402
import footprint  # noqa: E402

HEAP = 110 * 1024       # the unix port's data heap for part 2 (its code is counted apart)


def heap_figures(hours: float, outage_h: float, tmp: Path) -> dict:
    """Part 1: every board's day on the 32-bit MicroPython."""
    mpy = footprint.build_mpy(tmp / "mpy32")
    out = {}
    for bdir in sorted(p.parent for p in (ROOT / "boards").glob("*/board.json")):
        heap = footprint.declared_heap(bdir)
        r = footprint.day(bdir, mpy, heap, hours=hours, outage_h=outage_h, work=tmp)
        module = json.loads((bdir / "board.json").read_text()).get("module")
        fig = {k: r[k] for k in ("heap_cap_bytes", "code_heap_bytes", "peak_live_heap_bytes",
                                 "min_free_heap_bytes", "peak_in_use_bytes", "iteration_alloc_max_bytes",
                                 "readings_made", "readings_published", "dropped", "spool_errors",
                                 "missed_periods", "fits", "delivered_all")}
        fig["module"] = module
        fig["min_free_share"] = round(r["min_free_heap_bytes"] / heap, 3) if r["min_free_heap_bytes"] else None
        fig["acks"] = {str(k): v for k, v in r["acks"].items()}
        fig["error"] = r["error"]
        if heap != footprint.ESP32_HEAP:
            small = footprint.day(bdir, mpy, footprint.ESP32_HEAP, hours=min(hours, 1.0), outage_h=0.25, work=tmp)
            fig["without_psram"] = {"heap_cap_bytes": footprint.ESP32_HEAP, "runs": small["rc"] == 0,
                                    "fits": small["fits"],
                                    "error": (small["error"] or "").strip().splitlines()[-1:] or None}
        out[bdir.name] = fig
        print(f"{bdir.name}: {module}, heap {heap}: code {fig['code_heap_bytes']} B, live at most "
              f"{fig['peak_live_heap_bytes']} B, least free {fig['min_free_heap_bytes']} B "
              f"({fig['min_free_share']}), fits {fig['fits']}, all readings delivered {fig['delivered_all']}"
              + (f"; in {footprint.ESP32_HEAP} B (no PSRAM): runs {fig['without_psram']['runs']}"
                 if "without_psram" in fig else ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--store-and-forward-only", action="store_true", help="only part 2")
    ap.add_argument("--speed", type=float, default=400.0)
    a = ap.parse_args()
    hours = 2.0 if a.quick else 24.0
    outage_h = 0.5 if a.quick else 3.0
    speed = a.speed
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        boards = {} if a.store_and_forward_only else heap_figures(hours, outage_h, tmp)
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
            unix = {
                "runtime": "MicroPython unix port (64-bit), real mosquitto", "simulated_hours": round(sim_h, 2),
                "speed": speed, "real_s": round(real_s, 1),
                "readings": st["stats"]["readings"], "readings_per_hour": round(per_h, 1),
                "missed_periods": st["stats"]["missed_periods"],
                "outage_backlog": backlog, "replay_per_s": round(replay_per_s, 1),
                "spool_capacity_records": cap, "buffer_hours": round(cap / per_h, 1) if per_h else 0,
                "frame_bytes": frame_len, "dropped": st["dropped"],
                "spool_errors": st["stats"]["spool_errors"], "spool_failure": st.get("spool_failure"),
                "memory_errors": 0,
                "steady_free_heap_bytes_unix": steady,
            }
            result = {"bench": "board", "quick": a.quick, "runtime": "32-bit MicroPython v1.28 (WebAssembly port)",
                      "simulated_hours": hours, "outage_hours": outage_h, "boards": boards,
                      "store_and_forward": unix}
        finally:
            vb.close()
            broker.stop()
        if any("MemoryError" in line for line in vb.stderr):
            unix["memory_errors"] = sum("MemoryError" in line for line in vb.stderr)
        print(json.dumps(result))


if __name__ == "__main__":
    main()
