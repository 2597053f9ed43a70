#!/usr/bin/env python3
"""Benchmark: settling one interval for 100 to 100,000 members, and
verifying a year of 15-minute settlements for 100 members from the export
alone (signatures, hash chain, every settlement re-run), and a member's
mirror following that year entry by entry as it is appended.

    python tests/bench/bench_settlement.py            # a full year (35,040 intervals)
    python tests/bench/bench_settlement.py --quick    # 35 days, scaled to a year
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "gateway" / "src"))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from peergrid.market import ledger  # noqa: E402
from peergrid.market.settle import Flow, Partner, Tariff, settle  # noqa: E402


def flows(rng: random.Random, n: int) -> list[Flow]:
    return [Flow(i, rng.randrange(0, 800), rng.randrange(0, 800) if i % 3 == 0 else 0) for i in range(1, n + 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rng = random.Random(2026)
    tariff = Tariff(3187, 812, 20_000, "sdr")
    settle_ms = {}
    for n in (100, 1000, 10000, 100000):
        fl = flows(rng, n)
        reps = 20 if n <= 1000 else 3
        t = time.perf_counter()
        for _ in range(reps):
            settle(fl, tariff)
        settle_ms[str(n)] = round((time.perf_counter() - t) / reps * 1000, 2)
    # the same with a grid fee, an export share and a partner rule for every 20th member
    full = Tariff(3187, 812, 20_000, "sdr", 500, 50_000)
    fl = flows(rng, 100000)
    partners = [Partner(i, i + 1, 300) for i in range(3, 100000, 20)]
    t = time.perf_counter()
    for _ in range(3):
        settle(fl, full, partners)
    settle_full_ms = round((time.perf_counter() - t) / 3 * 1000, 2)
    intervals = 35040 // 10 if a.quick else 35040
    lg = ledger.Ledger(Ed25519PrivateKey.from_private_bytes(bytes(range(32))), "oak")
    start = 1_767_225_600          # 2026-01-01T00:00Z
    t0 = time.perf_counter()
    for i in range(intervals):
        fl = flows(rng, 100)
        s = settle(fl, tariff)
        b = start + 900 * i
        lg.append("settlement", b + 1200, ledger.settlement_body(b, b + 900, fl, tariff, s))
    build_s = time.perf_counter() - t0
    data = lg.export()
    t0 = time.perf_counter()
    entries = ledger.verify(data, workers=2)
    verify_s = time.perf_counter() - t0
    scale = 35040 / intervals
    # a member's mirror (peergrid mirror) following the same year as it is
    # appended: one entry at a time, each checked (signature, chain,
    # settlement re-run, interval refs, governance state) and kept
    from peergrid.market.follow import Follower

    raws = list(ledger.iter_export(data))
    f = Follower()
    t0 = time.perf_counter()
    for raw in raws:
        f.extend([raw])
    follow_s = time.perf_counter() - t0
    assert f.height == len(raws) and f.head == entries[-1].digest
    print(json.dumps({"bench": "settlement", "quick": a.quick, "settle_ms": settle_ms,
                      "mirror_follow_entries_per_s": round(len(raws) / follow_s, 1),
                      "mirror_follow_year_100_s": round(follow_s * scale, 1),
                      "settle_100000_fee_partners_ms": settle_full_ms,
                      "verify_intervals": intervals, "verify_s": round(verify_s, 2),
                      "verify_year_100_s": round(verify_s * scale, 2), "entries": len(entries),
                      "export_mb": round(len(data) / 1e6, 1), "build_s": round(build_s, 1)}))


if __name__ == "__main__":
    main()
