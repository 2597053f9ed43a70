# Runs under MicroPython (the unix port and the 32-bit one) and CPython: time
# to verify one Ed25519 signature over a 3 KB message (firmware/ed25519.py,
# hash included) and to hash 3 KB with SHA-512 (on MicroPython the
# pure-Python one, as on a board), averaged over N runs (argv[1], default 10).
# Prints one JSON line. The key and signature were made once with the
# `cryptography` package from the seed bytes(range(32)).
#
#   MICROPYPATH=. .venv/bin/micropython tests/bench/mpy_ed25519_bench.py 20
#   node tools/mp32/run.mjs --grow --copy firmware:/repo/firmware --sys /repo \
#       tests/bench/mpy_ed25519_bench.py 20
import binascii
import json
import sys
import time

from firmware import ed25519

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
PK = binascii.unhexlify("03a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8")
SIG = binascii.unhexlify("66365dd96e263051b5c9248c9b0e9cb73845c206f1f35b68e829b71091d7f317"
                         "36c5ca2e3a76d870eb7dd96dd8f9830e33807626b9ee40bfa217a82340c2d308")
MSG = bytes((i * 31 + 7) & 0xFF for i in range(3072))

if hasattr(time, "ticks_us"):
    def _us():
        return time.ticks_us()

    def _since(t0):
        return time.ticks_diff(time.ticks_us(), t0)
else:
    def _us():
        return time.perf_counter_ns() // 1000

    def _since(t0):
        return _us() - t0

assert ed25519.verify(PK, MSG, SIG)
assert not ed25519.verify(PK, MSG[1:], SIG)
t0 = _us()
for _ in range(n):
    ed25519.verify(PK, MSG, SIG)
dv = _since(t0)
t0 = _us()
for _ in range(n):
    ed25519.sha512(MSG)
dh = _since(t0)
print(json.dumps({"verify_ms": round(dv / n / 1000, 2), "sha512_3k_ms": round(dh / n / 1000, 2),
                  "impl": sys.implementation.name, "n": n}))
