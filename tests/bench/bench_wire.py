#!/usr/bin/env python3
"""Wire cost of one reading: bytes on the wire and time to seal and to verify.

The reading is the one a 4-CT board with an inverter sends (values of a house
some years into service, so the energy registers take their long forms).
Prints a few human lines, then one JSON object as the last line."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from protocol import cose, gateway_end, link, messages  # noqa: E402
from peergrid.ingest.wire import UplinkVerifier  # noqa: E402

SECRET = bytes(range(32))
CH = [-1520, 2412345, 1203456, 6800, 2890, 12, 3034567, 12600,
      -800, 1345678, 1298765, 3500, 1210, 4567890, 0, 5300]
INV = [4, 2890, 6012345]


def mqtt_publish_len(topic: str, payload_len: int, qos: int = 1) -> int:
    """Size of an MQTT 3.1.1 PUBLISH packet: fixed header + variable header + payload."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    varint = 1
    while remaining >= 128 ** varint:
        varint += 1
    return 1 + varint + remaining


def micropython_bench(n: int) -> tuple[float, float, float]:
    mp = Path(sys.executable).parent / "micropython"
    env = dict(os.environ, MICROPYPATH=f"{ROOT}/build/mpy:{ROOT}")
    out = subprocess.run([str(mp), "tests/bench/mpy_wire_bench.py", str(n)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    if not line:
        raise SystemExit(f"MicroPython bench failed: {out.stdout}{out.stderr}")
    _, n_, enc_us, alloc, ver_us = line[0].split()
    return int(enc_us) / int(n_), int(alloc) / int(n_), int(ver_us) / int(n_)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer iterations (under 60 s)")
    args = ap.parse_args()
    n_mpy = 300 if args.quick else 5000
    n_cpy = 2000 if args.quick else 50000

    d = link.DeviceLink("oak", "d3f9a2", SECRET)
    frame = bytes(d.reading(12, 4711, 1795000000, 0, 2304, 5001, CH, 4, INV, None))
    msg = gateway_end.open_uplink(d.t_reading, frame, lambda c, dv: SECRET)[3]
    w = link.cbor.Writer(512)
    messages.encode_reading(w, 12, 4711, 1795000000, 0, 2304, 5001, CH, 4, INV, None)
    payload_len = w.pos
    alg5_frame = bytes(cose.Sealer(cose.derive_keys(SECRET)[0], b"d3f9a2", 5).seal(w.getvalue(), d.t_reading.encode()))
    plain = {k: v for k, v in msg.items() if k != "flags"}
    plain["device"] = "d3f9a2"
    json_len = len(json.dumps(plain, separators=(",", ":")))
    # worst case within the limits a house reaches: long seq, every register long
    worst = bytes(d.reading(4000, 2**31, 1795000000, 0x7F, 2540, 6099,
                            [-65000, 2**31, 2**31, 65000] * 4, 4, [65000 // 1000, -65000, 2**31], None))

    # make sure build/mpy is current (the Makefile's `mpy` target does the same)
    subprocess.run(["make", "-s", "mpy"], cwd=ROOT, check=True, capture_output=True)
    enc_us, alloc_b, mpy_verify_us = micropython_bench(n_mpy)

    ver = UplinkVerifier(lambda c, dv: SECRET)
    ver.open(d.t_reading, frame)
    t0 = time.perf_counter()
    for _ in range(n_cpy):
        ver.open(d.t_reading, frame)
    gw_us = (time.perf_counter() - t0) / n_cpy * 1e6
    t0 = time.perf_counter()
    n_ref = max(200, n_cpy // 10)
    for _ in range(n_ref):
        gateway_end.open_uplink(d.t_reading, frame, lambda c, dv: SECRET)
    ref_us = (time.perf_counter() - t0) / n_ref * 1e6

    res = {
        "bench": "wire",
        "quick": args.quick,
        "reading_payload_bytes": payload_len,
        "envelope_bytes": len(frame) - payload_len,
        "signed_reading_bytes": len(frame),
        "signed_reading_bytes_alg5": len(alg5_frame),
        "signed_reading_bytes_worst": len(worst),
        "json_equivalent_bytes": json_len,
        "mqtt_packet_bytes": mqtt_publish_len(d.t_reading, len(frame)),
        "encode_sign_us_micropython": round(enc_us, 1),
        "heap_bytes_per_reading_micropython": round(alloc_b, 1),
        "verify_decode_us_micropython": round(mpy_verify_us, 1),
        "verify_decode_us_cpython": round(gw_us, 2),
        "verify_decode_us_cpython_reference": round(ref_us, 1),
        "readings_per_s_cpython": int(1e6 / gw_us),
    }
    print(f"signed reading: {len(frame)} B (payload {payload_len} B + envelope {len(frame) - payload_len} B, "
          f"alg 4); with alg 5 it would be {len(alg5_frame)} B; worst case {len(worst)} B; JSON {json_len} B")
    print(f"MQTT PUBLISH QoS 1 on {d.t_reading}: {res['mqtt_packet_bytes']} B")
    print(f"MicroPython (unix port, this machine): seal {enc_us:.1f} us, open {mpy_verify_us:.1f} us per reading")
    print(f"CPython gateway (cbor2 + hmac): verify+decode {gw_us:.2f} us per reading; reference path {ref_us:.1f} us")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
