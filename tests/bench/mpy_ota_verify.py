# Runs under MicroPython (the unix port and the 32-bit runtime of tools/mp32):
# the board's check of a release's signature as firmware/ota.py makes it
# (Ota._check_manifest): open the COSE_Sign1 (firmware.release.open_sign1),
# pick the trusted key by its kid, build the Sig_structure with
# protocol.cbor.dumps and verify with firmware.ed25519. Timed over N runs
# (argv[2], default 10) after one untimed run; the import of the verifier
# (which the agent does for every check) is timed once, first.
#
# argv[1]: a JSON file {"cose": hex of manifest.cose, "keys": [hex public key, ...]}
# (JSON because the 32-bit runner copies only .py/.mpy/.json files).
# Prints one JSON line.
import gc
import json
import sys
import time

from firmware.release import open_sign1, sha
from protocol import cbor

with open(sys.argv[1]) as f:
    A = json.load(f)
n = int(sys.argv[2]) if len(sys.argv) > 2 else 10
raw = bytes.fromhex(A["cose"])
keys = [bytes.fromhex(k) for k in A["keys"]]
A = None

t0 = time.ticks_us()
from firmware import ed25519  # noqa: E402  (timed: the agent imports it for each check)
import_us = time.ticks_diff(time.ticks_us(), t0)


def check():
    kid, prot, payload, sig = open_sign1(raw)
    key = None
    for k in keys:
        if sha(k).digest()[:8] == kid:
            key = k
    if key is None:
        raise SystemExit("no trusted key matches the kid")
    tbs = cbor.dumps(["Signature1", prot, b"", payload], len(payload) + 64)
    return ed25519.verify(key, tbs, sig)


if not check():
    raise SystemExit("the manifest's signature does not verify")
gc.collect()
parts = [0, 0, 0]
t_all = time.ticks_us()
for _ in range(n):
    t0 = time.ticks_us()
    kid, prot, payload, sig = open_sign1(raw)
    t1 = time.ticks_us()
    tbs = cbor.dumps(["Signature1", prot, b"", payload], len(payload) + 64)
    t2 = time.ticks_us()
    ok = ed25519.verify(keys[0], tbs, sig)
    t3 = time.ticks_us()
    parts[0] += time.ticks_diff(t1, t0)
    parts[1] += time.ticks_diff(t2, t1)
    parts[2] += time.ticks_diff(t3, t2)
    if not ok:
        raise SystemExit("verify failed in the loop")
total = 0
for _ in range(n):
    t0 = time.ticks_us()
    check()
    total += time.ticks_diff(time.ticks_us(), t0)
bad = bytearray(raw)
bad[-1] ^= 1
raw = bytes(bad)
rejects = not check()
print(json.dumps({"impl": sys.implementation.name, "platform": sys.platform, "n": n,
                  "manifest_cose_bytes": len(bad), "payload_bytes": len(payload),
                  "verify_ms": round(total / n / 1000, 2),
                  "open_sign1_ms": round(parts[0] / n / 1000, 3), "sig_structure_ms": round(parts[1] / n / 1000, 3),
                  "ed25519_verify_ms": round(parts[2] / n / 1000, 2),
                  "import_ed25519_ms": round(import_us / 1000, 2), "rejects_a_flipped_bit": rejects}))
