# Keys, topics, replay rules and the hot-path reading encoder.
from protocol import cbor, cose, gateway_end, link, messages, topics
from protocol.errors import E_REPLAY, E_TOPIC, E_TAG, E_SCHEMA
from protocol.replay import ReplayWindow, CounterGuard
from util import raises_code

SECRET = bytes(range(32))


def test_uplink_and_downlink_keys_differ():
    up, down = cose.derive_keys(SECRET)
    assert len(up) == 32 and len(down) == 32 and up != down
    assert cose.derive_keys(bytes(32)) != (up, down)


def test_topics():
    assert topics.topic("oak", "d3f9a2", "reading") == "pg/oak/d3f9a2/reading"
    assert topics.parse(b"pg/oak/d3f9a2/cmd") == ("oak", "d3f9a2", "cmd")
    for bad in ("pg/oak/d3f9a2", "pg/oak/D3/reading", "pg/oak/-x/reading", "xx/oak/d/reading",
                "pg/oak/d3f9a2/reading/x", "pg/oak/" + "a" * 17 + "/reading", "pg/oak/+/reading",
                "pg//d/reading"):
        raises_code(E_TOPIC, topics.parse, bad)
    acl = gateway_end.device_acl("oak", "d1")
    assert ("pg/oak/d1/cmd", "read") in acl and ("pg/oak/d1/reading", "write") in acl


def test_replay_window_accepts_out_of_order_once():
    w = ReplayWindow(window=64, boots=2)
    for s in (5, 9, 7, 6, 8):
        w.accept(1, s)
    for s in (5, 6, 7, 8, 9):
        raises_code(E_REPLAY, w.accept, 1, s)
    w.accept(1, 200)           # a jump clears the window
    raises_code(E_REPLAY, w.accept, 1, 100)   # older than the window
    w.accept(1, 150)           # inside the window, never seen
    w.accept(2, 0)
    w.accept(3, 0)             # boot 1 drops out of tracking
    raises_code(E_REPLAY, w.accept, 1, 201)
    w.accept(2, 1)
    assert w.seen() == [(2, 1), (3, 0)]


def test_counter_guard():
    g = CounterGuard(4)
    g.accept(5)
    raises_code(E_REPLAY, g.accept, 5)
    raises_code(E_REPLAY, g.accept, 3)
    g.accept(100)
    assert g.last == 100


def test_hot_encoder_matches_generic_encoder():
    d = link.DeviceLink("oak", "d3f9a2", SECRET)
    w = cbor.Writer(256)
    chans = [-1, 0, 0, 0, 65536, 4294967296, 7, 100000]
    messages.encode_reading(w, 1, 2, 3, 5, None, 6000, chans, 2, None, [1, -2, 3])
    fields = {"boot": 1, "seq": 2, "t": 3, "flags": 5, "freq_chz": 6000,
              "ch": [chans[0:4], chans[4:8]], "bat": [1, -2, 3]}
    w2 = cbor.Writer(256)
    messages.encode(w2, topics.READING, fields)
    assert w.getvalue() == w2.getvalue()
    got = messages.decode(topics.READING, w.getvalue())
    assert got["ch"] == [chans[0:4], chans[4:8]] and got["bat"] == [1, -2, 3]
    assert len(bytes(d.reading(1, 2, 3, 5, None, 6000, chans, 2, None, [1, -2, 3]))) > 26


def test_reading_fits_byte_budget():
    d = link.DeviceLink("oak", "d3f9a2", SECRET)
    ch = [-1520, 2412345, 1203456, 6800, 2890, 12, 3034567, 12600,
          -800, 1345678, 1298765, 3500, 1210, 4567890, 0, 5300]
    f = d.reading(12, 4711, 1795000000, 0, 2304, 5001, ch, 4, [4, 2890, 6012345], None)
    assert len(f) <= 120, len(f)


def test_command_cannot_pass_as_reading_and_vice_versa():
    d = link.DeviceLink("oak", "d3f9a2", SECRET)
    # A board's own status frame replayed onto its command topic does not open.
    st = bytes(d.status({"boot": 1, "seq": 1, "t": 1, "fw": "x", "cfg": b"", "reset": 0, "heap": 0,
                         "uptime": 0, "buffered": 0, "online": 1, "board": "sim"}))
    raises_code(E_TAG, d.open_command, d.t_cmd, st)
    raises_code(E_TOPIC, d.open_command, d.t_status, st)


def test_unknown_keys_are_counted_not_fatal():
    p = cbor.dumps({1: 1, 2: 2, 3: 3, 7: [0, 0, 0, 0], 25: "new"})
    m = messages.decode(topics.READING, p)
    assert m["_ext"] == 1 and m["seq"] == 2
    raises_code(E_SCHEMA, messages.decode, topics.READING, cbor.dumps({1: 1, 2: 2, 3: 3, 7: [0, 0, 0]}))


def _sealed_cmd(payload_map):
    down = cose.derive_keys(SECRET)[1]
    s = cose.Sealer(down, b"d3f9a2", cose.ALG_HMAC256)
    return bytes(s.seal(cbor.dumps(payload_map, 448), b"pg/oak/d3f9a2/cmd"))


def test_authentic_malformed_command_keeps_its_counter():
    dl = link.DeviceLink("oak", "d3f9a2", SECRET)
    # op 5 does not exist: verification passes, the schema refuses it, and
    # the counter is still there to acknowledge the refusal with
    frame = _sealed_cmd({1: 17, 2: 1795000000, 3: 60, 4: 5, 5: 0, 6: 1})
    payload = dl.verify_command("pg/oak/d3f9a2/cmd", frame)
    raises_code(45, messages.decode, topics.CMD, payload)
    assert link.command_counter(payload) == 17
    # no usable counter: nothing to acknowledge
    for bad in ({2: 1}, {1: 0, 2: 1}, {1: True}, {1: "x"}):
        p = dl.verify_command("pg/oak/d3f9a2/cmd", _sealed_cmd(bad))
        assert link.command_counter(p) is None
    assert link.command_counter(b"\xff\x00") is None
    # a forged one never gets as far as the payload
    bad = bytearray(frame)
    bad[-1] ^= 1
    raises_code(E_TAG, dl.verify_command, "pg/oak/d3f9a2/cmd", bytes(bad))
    raises_code(E_TOPIC, dl.verify_command, "pg/oak/other/cmd", frame)
