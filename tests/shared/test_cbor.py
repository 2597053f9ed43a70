# Deterministic CBOR codec of protocol/, under CPython and MicroPython.
from protocol import cbor
from protocol.errors import (E_TRUNCATED, E_TRAILING, E_DEPTH, E_INDEFINITE, E_DUPKEY,
                             E_NONCANONICAL, E_TYPE, E_COUNT, E_UTF8, E_TOO_BIG)
from util import unhex, raises_code, IS_MICROPYTHON, Skip

# (value, deterministic encoding) from RFC 8949 appendix A and our own.
KNOWN = [
    (0, "00"), (1, "01"), (10, "0a"), (23, "17"), (24, "1818"), (25, "1819"),
    (100, "1864"), (1000, "1903e8"), (1000000, "1a000f4240"),
    (1000000000000, "1b000000e8d4a51000"), (18446744073709551615, "1bffffffffffffffff"),
    (-1, "20"), (-10, "29"), (-100, "3863"), (-1000, "3903e7"),
    (-18446744073709551616, "3bffffffffffffffff"),
    (False, "f4"), (True, "f5"), (None, "f6"),
    (b"", "40"), (b"\x01\x02\x03\x04", "4401020304"), ("", "60"), ("a", "6161"),
    ("IETF", "6449455446"), ("\u00fc", "62c3bc"), ("\u6c34", "63e6b0b4"),
    ([], "80"), ([1, 2, 3], "83010203"), ([1, [2, 3], [4, 5]], "8301820203820405"),
    ({}, "a0"), ({1: 2, 3: 4}, "a201020304"), ({"a": 1, "b": [2, 3]}, "a26161016162820203"),
    ({10: 1, -1: 2, "z": 3, 100: 4}, "a40a011864042002617a03"),
]


def test_encode_known():
    for value, hexs in KNOWN:
        got = cbor.dumps(value)
        assert got == unhex(hexs), "%r -> %s, want %s" % (value, got, hexs)


def test_decode_known():
    for value, hexs in KNOWN:
        assert cbor.loads(unhex(hexs), max_depth=8) == value, hexs


def test_map_key_order_is_bytewise_on_encoding():
    # 10 (0a) < 100 (1864) < -1 (20) < "z" (617a)
    enc = cbor.dumps({"z": 3, -1: 2, 100: 4, 10: 1})
    assert enc == unhex("a40a011864042002617a03")


def test_writer_reuses_its_buffer():
    w = cbor.Writer(16)
    w.int(1000)
    first = w.getvalue()
    w.reset()
    w.int(5)
    assert first == unhex("1903e8") and w.getvalue() == unhex("05")


def test_writer_full_is_an_error():
    w = cbor.Writer(4)
    raises_code(E_TOO_BIG, w.bytes, b"12345")


def test_rejections():
    cases = [
        ("1903", E_TRUNCATED), ("82 01", E_TRUNCATED), ("5a ffffffff 00", E_TRUNCATED),
        ("0102", E_TRAILING), ("9f01ff", E_INDEFINITE), ("5f4101ff", E_INDEFINITE),
        ("a2 01 02 01 03", E_DUPKEY), ("a2 02 01 01 02", E_NONCANONICAL),
        ("1817", E_NONCANONICAL), ("190017", E_NONCANONICAL), ("1a0000ffff", E_NONCANONICAL),
        ("1b00000000ffffffff", E_NONCANONICAL), ("3800", E_NONCANONICAL),
        ("f93c00", E_TYPE), ("fb3ff0000000000000", E_TYPE), ("f0", E_TYPE), ("1c", E_TYPE),
        ("c100", E_TYPE), ("a1 40 01", E_TYPE), ("a1 f5 01", E_TYPE), ("a1 f4 01", E_TYPE),
        ("62 c3 28", E_UTF8),
    ]
    for hexs, code in cases:
        raises_code(code, cbor.loads, unhex(hexs.replace(" ", "")))


def test_tag_only_where_allowed():
    t = cbor.loads(unhex("d18101"), allow_tag=True)
    assert t == cbor.Tag(17, [1])
    raises_code(E_TYPE, cbor.loads, unhex("d18101"))
    raises_code(E_TYPE, cbor.loads, unhex("81d101"), 4, 256, 32, True)


def test_depth_limit():
    ok = unhex("818181" + "01")
    assert cbor.loads(ok, max_depth=3) == [[[1]]]
    raises_code(E_DEPTH, cbor.loads, ok, 2)
    raises_code(E_DEPTH, cbor.loads, b"\x81" * 200 + b"\x01")


def test_count_limits():
    raises_code(E_COUNT, cbor.loads, unhex("98ff") + b"\x01" * 255)
    raises_code(E_COUNT, cbor.loads, unhex("8a") + b"\x01" * 10, 4, 5)


def test_declared_length_is_not_trusted():
    # A 4 GB byte string declared in 6 bytes: refused before any allocation.
    raises_code(E_TRUNCATED, cbor.loads, unhex("5affffffff41"))
    raises_code(E_TRUNCATED, cbor.loads, unhex("9affffffff"), 4, 256, 0xFFFFFFFF)


def test_size_limit():
    raises_code(E_TOO_BIG, cbor.loads, b"\x40" + b"\x00" * 10, 4, 256, 32, False, 5)


# Text strings must be well-formed UTF-8 (PROTOCOL.md section 3, E_UTF8).
# MicroPython's str(b, "utf-8") lets most of these through, so the decoder
# checks them itself; these run under both interpreters.
BAD_UTF8 = [
    "80",               # a continuation byte with no lead
    "bf",
    "c0af",             # overlong "/" (2 bytes)
    "c1bf",             # overlong U+007F
    "e080af",           # overlong "/" (3 bytes)
    "e09fbf",           # overlong U+07FF
    "f08080af",         # overlong "/" (4 bytes)
    "f08fbfbf",         # overlong U+FFFF
    "eda080",           # U+D800, a UTF-16 surrogate
    "edbfbf",           # U+DFFF
    "eda0bdedb880",     # a surrogate pair spelled out (CESU-8)
    "f4908080",         # U+110000, above the last code point
    "f5808080",         # lead bytes F5..FF never occur
    "f8888080",
    "ff",
    "c3",               # truncated sequences
    "e282",
    "f09f98",
    "c328",             # a lead byte followed by ASCII
    "e228a1",
    "f0289fbf",
    "e282ac80",         # one continuation byte too many
    "41c0af42",         # bad in the middle of good text
]

GOOD_UTF8 = [
    ("7f", 0x7F), ("c280", 0x80), ("dfbf", 0x7FF), ("e0a080", 0x800),
    ("ed9fbf", 0xD7FF), ("ee8080", 0xE000), ("efbfbf", 0xFFFF),
    ("f0908080", 0x10000), ("f48fbfbf", 0x10FFFF), ("f09f9880", 0x1F600),
]


def _tstr(hexs):
    raw = unhex(hexs)
    assert len(raw) < 24
    return bytes([0x60 + len(raw)]) + raw


def test_text_must_be_utf8():
    for hexs in BAD_UTF8:
        e = raises_code(E_UTF8, cbor.loads, _tstr(hexs))
        assert "offset 0" in str(e), (hexs, e)
        # the same bytes as a byte string are fine
        raw = unhex(hexs)
        assert cbor.loads(bytes([0x40 + len(raw)]) + raw) == raw
        assert not cbor.valid_utf8(raw, 0, len(raw)), hexs
    # inside containers and as a map key, at the right offset
    e = raises_code(E_UTF8, cbor.loads, unhex("8201") + _tstr("eda080"))
    assert "offset 2" in str(e), e
    raises_code(E_UTF8, cbor.loads, unhex("a1") + _tstr("c0af") + unhex("01"))


def test_text_utf8_boundaries_accepted():
    for hexs, cp in GOOD_UTF8:
        assert cbor.loads(_tstr(hexs)) == chr(cp), hexs
        assert cbor.loads(_tstr("41" + hexs + "42")) == "A" + chr(cp) + "B", hexs
    s = "gr\u00fc\u00dfe \u6c34 \U0001f600"
    assert cbor.loads(cbor.dumps(s)) == s


def test_utf8_check_reads_only_its_span():
    data = unhex("41eda08042")
    assert cbor.valid_utf8(data, 0, 1) and cbor.valid_utf8(data, 4, 5)
    assert not cbor.valid_utf8(data, 0, 5) and not cbor.valid_utf8(data, 1, 4)
    assert not cbor.valid_utf8(unhex("e282ac"), 0, 2)     # cut short by `end`
    assert cbor.valid_utf8(memoryview(unhex("e282ac")), 0, 3)


def test_utf8_check_agrees_with_cpython():
    # CPython's codec is strict: compare on every 1- and 2-byte string and on
    # pseudo-random longer ones weighted towards the bytes that matter
    if IS_MICROPYTHON:
        raise Skip("needs a strict UTF-8 codec (CPython)")
    def strict(b):
        try:
            b.decode("utf-8")
            return True
        except UnicodeError:
            return False
    for a in range(256):
        assert cbor.valid_utf8(bytes([a]), 0, 1) == strict(bytes([a])), a
        for b in range(256):
            s = bytes([a, b])
            assert cbor.valid_utf8(s, 0, 2) == strict(s), s
    picks = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF,
             0xE0, 0xE1, 0xEC, 0xED, 0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    x = 12345
    for _ in range(40000):
        n = 3 + x % 4
        out = bytearray()
        for _ in range(n):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF
            out.append(picks[(x >> 8) % len(picks)])
        s = bytes(out)
        assert cbor.valid_utf8(s, 0, len(s)) == strict(s), s
