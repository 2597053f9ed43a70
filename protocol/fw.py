# fw: a piece of a firmware release, gateway -> board (docs/OTA.md 2,
# PROTOCOL.md 6.8); apart from messages.py so that a board at work, which
# is not updating, does not carry it in its heap.
#
# Not sealed: every byte is checked against the release's signed manifest
# (the file's SHA-256) and in transit by its own check value, the first 8
# bytes of the piece's SHA-256. Keys: 1 rel, 2 file, 3 off, 4 size (of the
# whole file), 5 data, 6 check; or 1-3 and 7, an E_* code (nothing to send).
from protocol import cbor
from protocol.errors import ProtocolError, E_SCHEMA, E_RANGE, E_TOO_BIG
from protocol.messages import FW_CHUNK, _int_in, _U32

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

FW_MAX = const(1088)          # FW_CHUNK and the map around it


def encode_chunk(w, rel, file, off, size, data, check):
    w.map(6)
    for k, v in ((1, rel), (2, file), (3, off), (4, size)):
        w.int(k)
        w.int(v)
    w.int(5)
    w.value(bytes(data))
    w.int(6)
    w.value(bytes(check))


def encode_chunk_error(w, rel, file, off, code):
    w.map(4)
    for k, v in ((1, rel), (2, file), (3, off), (7, code)):
        w.int(k)
        w.int(v)


def decode_chunk(b):
    """(rel, file, off, size, data, check, error) from a fw message; raises
    ProtocolError when it is not one. error is 0 for a piece."""
    if len(b) > FW_MAX:
        raise ProtocolError(E_TOO_BIG, "fw message of %d bytes" % len(b))
    m = cbor.loads(b, max_depth=1, max_items=16, max_container=8, max_size=FW_MAX)
    if not isinstance(m, dict):
        raise ProtocolError(E_SCHEMA, "fw must be a map")
    rel = _int_in(m.get(1), 1, _U32, "rel")
    file = _int_in(m.get(2), 0, 255, "file")
    off = _int_in(m.get(3), 0, 1 << 24, "off")
    if 7 in m:
        return rel, file, off, 0, b"", b"", _int_in(m[7], 1, 255, "error")
    size = _int_in(m.get(4), 0, 1 << 24, "size")
    data = m.get(5)
    check = m.get(6)
    if not isinstance(data, bytes) or len(data) > FW_CHUNK or not isinstance(check, bytes) or len(check) != 8:
        raise ProtocolError(E_SCHEMA, "fw data or check malformed")
    if off + len(data) > size:
        raise ProtocolError(E_RANGE, "fw piece beyond the file's end")
    return rel, file, off, size, data, check, 0
