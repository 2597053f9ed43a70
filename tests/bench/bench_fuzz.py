#!/usr/bin/env python3
"""Benchmark: a long mutation-fuzzing run of the gateway's validator
(tests/fuzzing.py). Prints the frames tried, crashes (must be 0), forged
frames accepted (must be 0) and the rate.

    python tests/bench/bench_fuzz.py            # 2,000,000 frames
    python tests/bench/bench_fuzz.py --quick    # 300,000 frames
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fuzzing  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--frames", type=int)
    a = ap.parse_args()
    n = a.frames or (300_000 if a.quick else 2_000_000)
    r = fuzzing.run(n, seed=7)
    r["bench"] = "fuzz"
    r["quick"] = a.quick
    print(json.dumps(r))


if __name__ == "__main__":
    main()
