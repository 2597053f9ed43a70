# Golden frames (protocol/vectors/frames.json) through the reference code that
# the boards run: every valid frame is rebuilt byte for byte from its inputs
# and opens to its stated message; every invalid frame fails with its code.
from protocol import gateway_end, link, topics
from protocol.errors import ProtocolError, E_REPLAY
from protocol.replay import ReplayWindow, CounterGuard
from util import frames, unhex

C, D = "oak", "d3f9a2"


def _fields(kind, d):
    out = {}
    for k in d:
        v = d[k]
        out[k] = unhex(v) if k in ("cfg", "rel_dig") else v
    return out


def receive(v):
    """What a receiver does with a vector: open it and apply replay state."""
    secret = unhex(v["secret"]) if v["secret"] else None
    state = v.get("state") or {}
    if v["kind"] == topics.CMD:
        board = link.DeviceLink(C, D, secret)
        msg = board.open_command(v["topic"], unhex(v["frame"]))
        CounterGuard(state.get("last_ctr", 0)).accept(msg["ctr"])
        return msg
    msg = gateway_end.open_uplink(v["topic"], unhex(v["frame"]), lambda c, d: secret)[3]
    w = ReplayWindow()
    for boot, seq in state.get("seen", []):
        w.accept(boot, seq)
    w.accept(msg["boot"], msg["seq"])
    return msg


def build(v):
    secret = unhex(v["secret"])
    b = _fields(v["kind"], v["build"])
    if v["kind"] == topics.CMD:
        return gateway_end.CommandSealer(C, D, secret).seal(b)
    d = link.DeviceLink(C, D, secret)
    if v["kind"] == topics.READING:
        return bytes(d.reading(b["boot"], b["seq"], b["t"], b["flags"], b["vrms_dv"], b["freq_chz"],
                               b["ch"], b["nch"], b["inv"], b["bat"]))
    if v["kind"] == topics.STATUS:
        return bytes(d.status(b))
    if v["kind"] == topics.FWGET:
        return bytes(d.fwget(b))
    return bytes(d.ack(b))


def test_vector_set_is_complete():
    vs = frames()
    kinds = set(v["kind"] for v in vs if v["expect"] == 0)
    assert kinds == set(topics.KINDS) - set([topics.FW]), kinds    # fw pieces are not sealed
    assert len([v for v in vs if v["expect"]]) >= 25


def test_valid_frames_rebuild_byte_for_byte():
    n = 0
    for v in frames():
        if v["expect"] == 0:
            got = build(v)
            assert got == unhex(v["frame"]), v["name"]
            n += 1
    assert n >= 9


def test_valid_frames_open_to_their_message():
    for v in frames():
        if v["expect"] == 0:
            msg = receive(v)
            assert msg == _fields(v["kind"], v["message"]), v["name"]


def test_invalid_frames_fail_with_their_code():
    for v in frames():
        if v["expect"] == 0:
            continue
        try:
            receive(v)
        except ProtocolError as e:
            assert e.code == v["expect"], "%s: expected %s, got %s" % (v["name"], v["error"], e)
        else:
            raise AssertionError("%s was accepted" % v["name"])


def test_replay_needs_state_to_fail():
    # The replay vectors are valid frames: without history they are accepted.
    for v in frames():
        if v["expect"] == E_REPLAY:
            w = dict(v)
            w["state"] = {}
            receive(w)
