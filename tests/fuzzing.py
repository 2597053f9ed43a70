"""Mutation fuzzing of the gateway's validator, shared by the test (100,000
frames in `make test`) and the benchmark (a longer run in `make bench`).

Valid frames of every uplink kind from two devices are mutated (bit flips,
byte changes, insertions, deletions, truncation, splices of two frames,
random lengths and topics) and fed to peergrid.ingest.validate.Validator. Anything
but Accepted, Duplicate or Rejected is a crash; an accepted frame that is
not one of the valid originals is a forgery that got through."""
from __future__ import annotations

import random
import time
from typing import Any

from peergrid.community.registry import Device
from peergrid.ingest.validate import Accepted, Duplicate, Rejected, Validator
from protocol import topics
from protocol.link import DeviceLink

COMMUNITY = "oak"
SECRETS = {"d1": bytes(range(32)), "d2": bytes(range(1, 33))}
CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]


def originals() -> list[tuple[str, bytes]]:
    out = []
    now = int(time.time())
    for dev, secret in SECRETS.items():
        dl = DeviceLink(COMMUNITY, dev, secret)
        for seq in range(8):
            out.append((dl.t_reading, bytes(dl.reading(1, seq, now, 0, 2300, 5000,
                                                       [100 * seq, 1000 + seq, 5, 400, -50, 0, 7 + seq, 300], 2,
                                                       [4, 900, 123456] if seq % 2 else None))))
        out.append((dl.t_status, bytes(dl.status({"boot": 1, "seq": 9, "t": now, "fw": "0.4.0", "cfg": b"\x01" * 8,
                                                  "reset": 1, "heap": 50000, "uptime": 9, "buffered": 0,
                                                  "online": 1, "board": "sim"}))))
        out.append((dl.t_ack, bytes(dl.ack({"boot": 1, "seq": 10, "t": now, "ctr": 3, "result": 0,
                                            "value": 1, "lease": 60}))))
    return out


def validator() -> Validator:
    def lookup(c: str, d: str) -> Device | None:
        s = SECRETS.get(d)
        return None if s is None else Device(c, d, None, s, "sim", CHANNELS, None, 1, None)

    # every frame is verified here: no E_TAG throttle (all come at one `now`)
    return Validator(COMMUNITY, lookup, tag_failures_per_s=0)


def mutate(rng: random.Random, frame: bytes, pool: list[tuple[str, bytes]]) -> bytes:
    b = bytearray(frame)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        op = rng.randrange(8)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5)))
        elif op == 3 and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randrange(1, 5)]
        elif op == 4:
            b = b[: rng.randrange(len(b) + 1)]
        elif op == 5:
            other = rng.choice(pool)[1]
            i = rng.randrange(len(b) + 1)
            j = rng.randrange(len(other) + 1)
            b = b[:i] + bytearray(other[j:])
        elif op == 6 and b:
            # a CBOR head byte with a random major type / length
            b[rng.randrange(min(len(b), 24))] = rng.choice((0x18, 0x19, 0x1a, 0x1b, 0x5f, 0x9f, 0xbf, 0xff,
                                                            0xf9, 0xfa, 0xfb, 0xd8, 0xc0))
        elif op == 7:
            b = bytearray(rng.randrange(256) for _ in range(rng.randrange(0, 600)))
    return bytes(b)


def run(n: int, seed: int = 1) -> dict[str, Any]:
    rng = random.Random(seed)
    pool = originals()
    valid = {f for _, f in pool}
    v = validator()
    now = time.time()
    reasons: dict[str, int] = {}
    accepted = forged = crashes = 0
    t0 = time.perf_counter()
    for i in range(n):
        topic, frame = pool[rng.randrange(len(pool))]
        if rng.random() < 0.02:
            topic = rng.choice((topic.replace("d1", "d2"), topic.replace("reading", "status"),
                                "pg/oak/zz/reading", "junk", "pg/oak/d1/cmd"))
        m = mutate(rng, frame, pool)
        try:
            r = v.check(topic, m, now)
        except Rejected as e:
            reasons[e.name] = reasons.get(e.name, 0) + 1
            continue
        except Exception:  # noqa: BLE001 - counted as a crash
            crashes += 1
            continue
        if isinstance(r, (Accepted, Duplicate)):
            if m not in valid:
                forged += 1
            elif isinstance(r, Accepted):
                accepted += 1
    dt = time.perf_counter() - t0
    return {"frames": n, "crashes": crashes, "forged_accepted": forged, "accepted_originals": accepted,
            "rejected": sum(reasons.values()), "reasons": reasons, "seconds": round(dt, 2),
            "frames_per_s": round(n / dt)}
