"""The validator under mutated frames: 100,000 seeded mutations plus
hypothesis-generated ones. Nothing may crash it and no forged frame may be
accepted (the longer run is tests/bench/bench_fuzz.py)."""
from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

import fuzzing
from peergrid.ingest.validate import Accepted, Duplicate, Rejected

POOL = fuzzing.originals()
VALID = {f for _, f in POOL}


def test_100k_mutated_frames() -> None:
    r = fuzzing.run(100_000, seed=20261124)
    assert r["crashes"] == 0, r
    assert r["forged_accepted"] == 0, r
    # the mutations reach deep: refused at many different pipeline steps
    assert len(r["reasons"]) >= 12, r["reasons"]
    assert r["rejected"] + r["accepted_originals"] <= r["frames"]


def test_originals_accepted_once_then_duplicates() -> None:
    v = fuzzing.validator()
    now = time.time()
    for topic, frame in POOL:
        assert isinstance(v.check(topic, frame, now), Accepted)
    for topic, frame in POOL:
        assert isinstance(v.check(topic, frame, now), Duplicate)


@settings(max_examples=3000, deadline=None)
@given(idx=st.integers(0, len(POOL) - 1), data=st.binary(max_size=64), pos=st.integers(0, 600),
       cut=st.integers(0, 600))
def test_hypothesis_splices(idx: int, data: bytes, pos: int, cut: int) -> None:
    topic, frame = POOL[idx]
    m = frame[: min(pos, len(frame))] + data + frame[min(cut, len(frame)):]
    v = fuzzing.validator()
    try:
        r = v.check(topic, m, time.time())
    except Rejected:
        return
    assert isinstance(r, (Accepted, Duplicate))
    assert m in VALID, "a modified frame was accepted"


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=700), st.sampled_from([t for t, _ in POOL] + ["pg/oak/d1/cmd", "x/y", ""]))
def test_hypothesis_random_bytes(frame: bytes, topic: str) -> None:
    v = fuzzing.validator()
    try:
        v.check(topic, frame, time.time())
    except Rejected:
        return
    assert frame in VALID
