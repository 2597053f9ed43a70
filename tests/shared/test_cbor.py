# Deterministic CBOR codec of protocol/, under CPython and MicroPython.
from protocol import cbor
from protocol.errors import (E_TRUNCATED, E_TRAILING, E_DEPTH, E_INDEFINITE, E_DUPKEY,
                             E_NONCANONICAL, E_TYPE, E_COUNT, E_UTF8, E_TOO_BIG)
from util import unhex, raises_code

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
