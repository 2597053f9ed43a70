"""Gateway side (CPython, cbor2) against the golden frames and the MicroPython side."""
from __future__ import annotations

import json
import random

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import ROOT, MpyPeer
from jsonx import from_json
from peergrid.ingest.wire import UplinkVerifier, seal_command
from protocol import cbor, gateway_end, link, messages, topics
from protocol.errors import E_REPLAY, ProtocolError
from protocol.replay import ReplayWindow

VECTORS = json.loads((ROOT / "protocol" / "vectors" / "frames.json").read_text())["vectors"]
UPLINK_VECTORS = [v for v in VECTORS if v["kind"] != topics.CMD]
SECRET = bytes(range(32))


def _msg(v: dict) -> dict:
    return {k: (bytes.fromhex(x) if k in ("cfg", "rel_dig") else x) for k, x in v["message"].items()}


def _verifier(v: dict) -> UplinkVerifier:
    secret = bytes.fromhex(v["secret"]) if v["secret"] else None
    return UplinkVerifier(lambda c, d: secret)


@pytest.mark.parametrize("v", UPLINK_VECTORS, ids=[v["name"] for v in UPLINK_VECTORS])
def test_gateway_on_golden_uplink_frames(v: dict) -> None:
    ver = _verifier(v)
    frame = bytes.fromhex(v["frame"])
    try:
        up = ver.open(v["topic"], frame)
        w = ReplayWindow()
        for boot, seq in v.get("state", {}).get("seen", []):
            w.accept(boot, seq)
        w.accept(up.fields["boot"], up.fields["seq"])
    except ProtocolError as e:
        assert e.code == v["expect"], f"expected {v['error']}, got {e}"
        return
    assert v["expect"] == 0, f"{v['name']} accepted"
    assert up.fields == _msg(v)
    # cbor2 reads the same frame independently as a COSE_Mac0 with this payload
    env = cbor2.loads(frame)
    assert env.tag == 17 and cbor2.loads(env.value[2]) is not None


def test_gateway_fast_path_is_taken_for_valid_frames(mocker) -> None:
    # Valid frames must not need the slow reference path.
    spy = mocker.spy(UplinkVerifier, "_reference")
    for v in UPLINK_VECTORS:
        if v["expect"] == 0:
            _verifier(v).open(v["topic"], bytes.fromhex(v["frame"]))
    assert spy.call_count == 0


@pytest.mark.parametrize("v", [v for v in VECTORS if v["kind"] == topics.CMD and v["expect"] == 0],
                         ids=lambda v: v["name"])
def test_gateway_builds_golden_commands(v: dict) -> None:
    topic, frame = seal_command("oak", "d3f9a2", SECRET, v["build"])
    assert topic == v["topic"] and frame.hex() == v["frame"]


@pytest.fixture(scope="module")
def peer(mpy_dir):
    p = MpyPeer([mpy_dir, ROOT / "tests" / "shared", ROOT / "tests"])
    yield p
    p.close()


def test_every_message_type_from_micropython_verifies_on_gateway(peer) -> None:
    ver = UplinkVerifier(lambda c, d: SECRET)
    r = dict(boot=7, seq=123456, t=1795000123, flags=messages.F_BUFFERED, vrms_dv=2297, freq_chz=4999,
             ch=[-3000, 5, 99999999, 13050, 2500, 0, 1234567, 10900], nch=2, inv=[4, 2500, 123456], bat=[3, -700, 512])
    out = peer.call(op="reading", secret=SECRET.hex(), r=r)
    up = ver.open(out["topic"], bytes.fromhex(out["frame"]))
    assert up.kind == "reading" and up.fields["ch"] == [r["ch"][:4], r["ch"][4:]] and up.fields["bat"] == r["bat"]
    status = dict(boot=7, seq=1, t=5, flags=1, fw="0.2.0", cfg={"$b": "00ff"}, reset=4, heap=70000, uptime=9,
                  buffered=3, online=1, board="sim", dropped=2, lost_wh=0)
    out = peer.call(op="status", secret=SECRET.hex(), fields=status)
    up = ver.open(out["topic"], bytes.fromhex(out["frame"]))
    assert up.kind == "status" and up.fields["cfg"] == b"\x00\xff" and up.fields["dropped"] == 2
    ack = dict(boot=7, seq=2, t=6, ctr=9, result=0, value=-2500, lease=30)
    out = peer.call(op="ack", secret=SECRET.hex(), fields=ack)
    up = ver.open(out["topic"], bytes.fromhex(out["frame"]))
    assert up.kind == "ack" and up.fields == {**ack, "flags": 0}
    # and a forged copy is refused by the gateway
    bad = bytearray.fromhex(out["frame"])
    bad[-1] ^= 1
    with pytest.raises(ProtocolError) as ei:
        ver.open(out["topic"], bytes(bad))
    assert ei.value.name() == "tag"


def test_gateway_frames_open_on_micropython(peer) -> None:
    cmd = dict(ctr=42, t=1795000000, lease=90, op=2, target=1, value=-3000)
    topic, frame = seal_command("oak", "d3f9a2", SECRET, cmd)
    out = peer.call(op="open_cmd", secret=SECRET.hex(), topic=topic, frame=frame.hex())
    assert out == {"msg": [[k, v] for k, v in out["msg"]]} and dict(out["msg"]) == cmd
    # wrong secret on the board: refused with the MAC error code
    out = peer.call(op="open_cmd", secret="11" * 32, topic=topic, frame=frame.hex())
    assert out["error"] == 24
    # uplink frames built by CPython's reference code open on MicroPython too
    dl = link.DeviceLink("oak", "d3f9a2", SECRET)
    st = bytes(dl.status(dict(boot=1, seq=2, t=3, fw="x", cfg=b"\x01", reset=0, heap=1, uptime=1,
                              buffered=0, online=0, board="sim")))
    out = peer.call(op="open_uplink", secret=SECRET.hex(), topic=dl.t_status, frame=st.hex())
    assert dict((k, from_json(v)) for k, v in out["msg"])["online"] == 0



def test_a_board_that_lies_in_its_tls_status_is_refused(monkeypatch) -> None:
    # a member's own board, its firmware changed to skip the schema: the frame
    # is authentic (its MAC is right) but claims what no board may say
    dl = link.DeviceLink("oak", "d3f9a2", SECRET)
    base = dict(boot=1, seq=2, t=3, fw="x", cfg=b"\x01", reset=0, heap=1, uptime=1, buffered=0, online=0,
                board="sim")
    ver = UplinkVerifier(lambda c, d: SECRET)
    honest = ver.open(dl.t_status, bytes(dl.status(dict(base, tls=1, tls_err=3, tls_why="wrong CA"))))
    assert (honest.fields["tls"], honest.fields["tls_err"], honest.fields["tls_why"]) == (1, 3, "wrong CA")
    lies = [dict(tls=2), dict(tls_why="x" * 25), dict(tls_err=2**32), dict(tls="yes")]
    with monkeypatch.context() as m:
        m.setattr(messages, "_check", lambda typ, v, lo, hi, name: v)
        frames = [bytes(dl.status(dict(base, **lie))) for lie in lies]
    for lie, frame in zip(lies, frames):
        with pytest.raises(ProtocolError) as ei:
            ver.open(dl.t_status, frame)
        assert ei.value.name() in ("range", "schema"), (lie, ei.value)


# ---- property tests: random messages and random CBOR through both codecs and cbor2

channels = st.lists(st.tuples(st.integers(-10_000_000, 10_000_000), st.integers(0, 2**48),
                              st.integers(0, 2**48), st.integers(0, 10_000_000)), min_size=1, max_size=12)
readings = st.fixed_dictionaries({
    "boot": st.integers(0, 2**32 - 1), "seq": st.integers(0, 2**32 - 1), "t": st.integers(0, 2**32 - 1),
    "flags": st.integers(0, 0xFFFF), "vrms_dv": st.none() | st.integers(0, 10000),
    "freq_chz": st.none() | st.integers(0, 10000), "ch": channels,
    # an item None: the device does not say (null on the wire, never 0)
    "inv": st.none() | st.tuples(st.none() | st.integers(0, 0xFFFF), st.none() | st.integers(-10**7, 10**7),
                                 st.none() | st.integers(0, 2**48)),
    "bat": st.none() | st.tuples(st.none() | st.integers(0, 0xFFFF), st.none() | st.integers(-10**7, 10**7),
                                 st.none() | st.integers(0, 1000)),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=readings, secret=st.binary(min_size=32, max_size=32))
def test_random_readings_agree_on_both_interpreters(peer, r, secret) -> None:
    flat = [x for c in r["ch"] for x in c]
    req = dict(r, ch=flat, nch=len(r["ch"]), inv=list(r["inv"]) if r["inv"] else None,
               bat=list(r["bat"]) if r["bat"] else None)
    out = peer.call(op="reading", secret=secret.hex(), r=req)
    frame = bytes.fromhex(out["frame"])
    dl = link.DeviceLink("oak", "d3f9a2", secret)
    mine = bytes(dl.reading(req["boot"], req["seq"], req["t"], req["flags"], req["vrms_dv"], req["freq_chz"],
                            flat, req["nch"], req["inv"], req["bat"]))
    assert frame == mine
    up = UplinkVerifier(lambda c, d: secret).open(out["topic"], frame)
    assert up.fields["ch"] == [list(c) for c in r["ch"]]
    assert up.fields["flags"] == r["flags"] and up.fields["seq"] == r["seq"]
    for k in ("inv", "bat"):
        assert up.fields.get(k) == (list(r[k]) if r[k] else None)
    # cbor2 with canonical encoding produces the very payload bytes
    payload = cbor2.loads(frame).value[2]
    assert cbor2.dumps(cbor2.loads(payload), canonical=True) == payload


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.binary(max_size=40) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.integers(-1000, 1000) | st.text(max_size=5),
                                                                 inner, max_size=5),
    max_leaves=25)


def _as_request(v):
    if isinstance(v, bytes):
        return {"$b": v.hex()}
    if isinstance(v, list):
        return [_as_request(x) for x in v]
    if isinstance(v, dict):
        return {"$m": [[_as_request(k), _as_request(x)] for k, x in v.items()]}
    return v


def _small_keys(v) -> bool:
    if isinstance(v, list):
        return all(_small_keys(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, int) and 0 <= k < 24 and _small_keys(x) for k, x in v.items())
    return True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(v=cbor_values)
def test_random_cbor_three_codecs_agree(peer, v) -> None:
    ours = cbor.dumps(v, 65536)
    if _small_keys(v):
        # cbor2's canonical mode sorts keys length-first (RFC 7049); RFC 8949
        # sorts bytewise. They agree on the keys the protocol uses (0-23).
        assert ours == cbor2.dumps(v, canonical=True)
    assert cbor2.loads(ours) == v
    assert cbor.loads(ours, max_depth=8, max_items=4096, max_container=1024) == v
    out = peer.call(op="cbor_encode", value=_as_request(v))
    assert out.get("hex") == ours.hex(), out
    out = peer.call(op="cbor_roundtrip", hex=ours.hex())
    assert out["hex"] == ours.hex()


def test_random_garbage_never_crashes_either_side(peer) -> None:
    rnd = random.Random(7)
    ver = UplinkVerifier(lambda c, d: SECRET)
    base = bytes.fromhex(VECTORS[0]["frame"])
    for _ in range(300):
        b = bytearray(base)
        for _ in range(rnd.randint(1, 6)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        frame = bytes(b[: rnd.randint(0, len(b))]) if rnd.random() < 0.3 else bytes(b)
        try:
            ver.open("pg/oak/d3f9a2/reading", frame)
            gw = 0
        except ProtocolError as e:
            gw = e.code
        out = peer.call(op="open_uplink", secret=SECRET.hex(), topic="pg/oak/d3f9a2/reading", frame=frame.hex())
        assert "crash" not in out, out
        assert out.get("error", 0) == gw, (frame.hex(), out, gw)


def test_replay_window_duplicates(peer) -> None:
    w = ReplayWindow()
    w.accept(1, 1)
    with pytest.raises(ProtocolError) as ei:
        w.accept(1, 1)
    assert ei.value.code == E_REPLAY


@pytest.mark.parametrize("extra,code", [(60, "count"), (40, None)])
def test_limits_agree_on_fast_and_reference_paths(extra: int, code: str | None) -> None:
    from protocol import cose

    body = {1: 1, 2: 2, 3: 3, 7: [0, 0, 0, 0]}
    body.update({100 + i: i for i in range(extra)})
    payload = cbor.dumps(body, 4096)
    if len(payload) > messages.MAX_PAYLOAD:
        pytest.skip("payload too long for this case")
    topic = "pg/oak/d3f9a2/reading"
    frame = bytes(cose.Sealer(cose.derive_keys(SECRET)[0], b"d3f9a2", 4).seal(payload, topic.encode()))
    ver = UplinkVerifier(lambda c, d: SECRET)
    if code is None:
        assert ver.open(topic, frame).fields["_ext"] == extra
        return
    with pytest.raises(ProtocolError) as ei:
        ver.open(topic, frame)
    assert ei.value.name() == code
    with pytest.raises(ProtocolError) as ei:
        gateway_end.open_uplink(topic, frame, lambda c, d: SECRET)
    assert ei.value.name() == code


@pytest.mark.parametrize("ext,ok", [
    (cbor.dumps({1: 2}), True), (b"\xa0", True), (cbor.dumps(["a", None, b"x"]), True),
    (b"\xf7", False), (b"\xe0", False), (b"\xd9\x04\xd2\x01", False), (b"\xc2\x49\x01" + bytes(8), False),
    (b"\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00", False), (cbor.dumps([[1]]), False),
])
def test_extension_fields_agree_on_both_paths(ext: bytes, ok: bool) -> None:
    # A newer board may add fields of any type the CBOR subset has; anything
    # outside the subset is refused the same way by both decoders.
    from protocol import cose

    base = cbor.dumps({1: 7, 2: 5, 3: 1795000000, 7: [1, 2, 3, 4]})
    payload = bytes([base[0] + 1]) + base[1:] + b"\x0f" + ext
    topic = "pg/oak/d3f9a2/reading"
    frame = bytes(cose.Sealer(cose.derive_keys(SECRET)[0], b"d3f9a2", 4).seal(payload, topic.encode()))
    ver = UplinkVerifier(lambda c, d: SECRET)
    if ok:
        assert ver.open(topic, frame).fields["_ext"] == 1
        assert gateway_end.open_uplink(topic, frame, lambda c, d: SECRET)[3]["_ext"] == 1
        return
    with pytest.raises(ProtocolError) as g:
        ver.open(topic, frame)
    with pytest.raises(ProtocolError) as r:
        gateway_end.open_uplink(topic, frame, lambda c, d: SECRET)
    assert g.value.code == r.value.code and g.value.name() in ("type", "depth")


def test_open_uplink_takes_any_bytes_like_topic() -> None:
    dl = link.DeviceLink("oak", "d3f9a2", SECRET)
    f = bytes(dl.reading(1, 1, 1, 0, None, None, [0, 0, 0, 0], 1))
    for t in (dl.t_reading, dl.t_reading.encode(), memoryview(dl.t_reading.encode())):
        assert gateway_end.open_uplink(t, f, lambda c, d: SECRET)[2] == "reading"


@pytest.mark.parametrize("value,err", [(0, None), (125, None), (0xFFFFFFFF, None), (1 << 32, "range"), (-1, "range"),
                                       ("125", "schema"), (1.5, "type"), (True, "schema"), (None, "schema")])
def test_status_spool_err_from_an_authentic_board_is_bounded(value: object, err: str | None) -> None:
    """A member's own board, with its real key, seals a status whose spool_err
    is out of range or of the wrong type: both gateway paths refuse it with
    the same error; in range it arrives as the number the board counted."""
    from protocol import cose

    body = {1: 7, 2: 5, 3: 1795000000, 5: "0.4.0", 6: b"\x00" * 8, 7: 1, 8: 90000, 9: 60, 10: 0, 11: 1,
            12: "sim", 15: value}
    payload = cbor2.dumps(body, canonical=True)
    topic = "pg/oak/d3f9a2/status"
    frame = bytes(cose.Sealer(cose.derive_keys(SECRET)[0], b"d3f9a2", 5).seal(payload, topic.encode()))
    ver = UplinkVerifier(lambda c, d: SECRET)
    if err is None:
        assert ver.open(topic, frame).fields["spool_err"] == value
        assert gateway_end.open_uplink(topic, frame, lambda c, d: SECRET)[3]["spool_err"] == value
        return
    for open_ in (lambda: ver.open(topic, frame), lambda: gateway_end.open_uplink(topic, frame, lambda c, d: SECRET)):
        with pytest.raises(ProtocolError) as ei:
            open_()
        assert ei.value.name() == err, ei.value.name()


def test_commands_sealed_on_two_threads_at_once_keep_their_tags() -> None:
    """The gateway seals commands on the control loop's thread and the
    fleet's, and checks refused uplinks again with the reference decoder on
    the MQTT thread. A scratch buffer shared by the MAC code gave commands
    (and, in the demo, a simulated board's reading: 1 in 143,000) a wrong
    tag; here, with threads switched often, hundreds a second."""
    import time

    from harness import run_interleaved
    from protocol import cose

    secrets = {"d3f9a2": SECRET, "e7a1b2": bytes(range(1, 33))}
    sealers = {d: gateway_end.CommandSealer("oak", d, k) for d, k in secrets.items()}
    keys = {d: cose.derive_keys(k)[1] for d, k in secrets.items()}
    wrong: list[str] = []
    done = {d: 0 for d in secrets}
    stop = time.monotonic() + 2.0

    def run(device: str, value: int) -> None:
        s, n = sealers[device], 0
        try:
            while time.monotonic() < stop:
                n += 1
                frame = s.seal(dict(ctr=n, t=1795000000, lease=300, op=messages.OP_RELAY, target=0, value=value))
                cose.open_frame(frame, s.topic.encode(), device.encode(), lambda kid, alg: keys[device],
                                messages.ALGS[topics.CMD])
                done[device] = n
        except Exception as e:  # noqa: BLE001 - counted below, not lost in the thread
            wrong.append(f"{device} after {n}: {e!r}")

    run_interleaved(*[lambda d=d, i=i: run(d, i) for i, d in enumerate(secrets)])
    assert not wrong, wrong
    assert min(done.values()) > 1000, done
