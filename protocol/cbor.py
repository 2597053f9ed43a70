# Deterministic CBOR (RFC 8949 section 4.2.1) for the PeerGrid wire contract.
#
# Runs unchanged on MicroPython and CPython. Only the subset the protocol uses:
# unsigned and negative integers (64-bit), byte and text strings, arrays, maps,
# false/true/null and, at the top level only, one tag. No floats, no
# indefinite lengths. The writer encodes into a caller-owned bytearray so a
# board can build every reading in the same buffer; the reader checks every
# length against the bytes that are really there before it copies anything.
import struct

from protocol.errors import (
    ProtocolError, E_TOO_BIG, E_TRUNCATED, E_TRAILING, E_DEPTH, E_INDEFINITE,
    E_DUPKEY, E_NONCANONICAL, E_TYPE, E_COUNT, E_UTF8, E_RANGE,
)

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

_MAJ_UINT = const(0)
_MAJ_NINT = const(1)
_MAJ_BSTR = const(2)
_MAJ_TSTR = const(3)
_MAJ_ARRAY = const(4)
_MAJ_MAP = const(5)
_MAJ_TAG = const(6)
_MAJ_SIMPLE = const(7)

# Defaults for the decoder; the message layer passes tighter ones.
MAX_DEPTH = const(4)
MAX_ITEMS = const(256)      # items in one decode, all containers together
MAX_CONTAINER = const(32)   # entries in one array or map
_U64 = 0xFFFFFFFFFFFFFFFF


class Tag:
    """A tagged item (only ever the top-level item of a frame)."""

    def __init__(self, tag, value):
        self.tag = tag
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Tag) and self.tag == other.tag and self.value == other.value

    def __repr__(self):
        return "Tag(%d, %r)" % (self.tag, self.value)


class Writer:
    """Encodes CBOR items into a fixed bytearray, allocation-free per item."""

    def __init__(self, size):
        self.buf = bytearray(size)
        self.mv = memoryview(self.buf)
        self.pos = 0

    def reset(self):
        self.pos = 0

    def _room(self, n):
        if self.pos + n > len(self.buf):
            raise ProtocolError(E_TOO_BIG, "encode buffer full")

    def head(self, major, val):
        buf = self.buf
        p = self.pos
        mb = major << 5
        if val < 24:
            self._room(1)
            buf[p] = mb | val
            self.pos = p + 1
        elif val < 0x100:
            self._room(2)
            buf[p] = mb | 24
            buf[p + 1] = val
            self.pos = p + 2
        elif val < 0x10000:
            self._room(3)
            buf[p] = mb | 25
            struct.pack_into(">H", buf, p + 1, val)
            self.pos = p + 3
        elif val < 0x100000000:
            self._room(5)
            buf[p] = mb | 26
            struct.pack_into(">I", buf, p + 1, val)
            self.pos = p + 5
        elif val <= _U64:
            self._room(9)
            buf[p] = mb | 27
            struct.pack_into(">Q", buf, p + 1, val)
            self.pos = p + 9
        else:
            raise ProtocolError(E_RANGE, "integer beyond 64 bits")

    def int(self, v):
        if v >= 0:
            self.head(_MAJ_UINT, v)
        else:
            self.head(_MAJ_NINT, -1 - v)

    def raw(self, data):
        n = len(data)
        self._room(n)
        self.mv[self.pos:self.pos + n] = data
        self.pos += n

    def bytes(self, data):
        self.head(_MAJ_BSTR, len(data))
        self.raw(data)

    def text(self, s):
        if isinstance(s, str):
            s = s.encode()
        self.head(_MAJ_TSTR, len(s))
        self.raw(s)

    def array(self, n):
        self.head(_MAJ_ARRAY, n)

    def map(self, n):
        self.head(_MAJ_MAP, n)

    def tag(self, t):
        self.head(_MAJ_TAG, t)

    def simple(self, v):
        if v is None:
            self.raw(b"\xf6")
        elif v:
            self.raw(b"\xf5")
        else:
            self.raw(b"\xf4")

    def value(self, obj):
        """Encode any supported object deterministically (not for hot paths)."""
        if obj is None or obj is True or obj is False:
            self.simple(obj)
        elif isinstance(obj, int):
            self.int(obj)
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self.bytes(obj)
        elif isinstance(obj, str):
            self.text(obj)
        elif isinstance(obj, (list, tuple)):
            self.array(len(obj))
            for item in obj:
                self.value(item)
        elif isinstance(obj, dict):
            # Deterministic order: bytewise order of the encoded keys.
            pairs = []
            for k in obj:
                kw = Writer(64)
                kw.value(k)
                pairs.append((bytes(kw.mv[:kw.pos]), k))
            pairs.sort(key=lambda p: p[0])
            self.map(len(pairs))
            prev = None
            for kb, k in pairs:
                if kb == prev:
                    raise ProtocolError(E_DUPKEY, "two keys encode alike")
                prev = kb
                self.raw(kb)
                self.value(obj[k])
        elif isinstance(obj, Tag):
            self.tag(obj.tag)
            self.value(obj.value)
        else:
            raise ProtocolError(E_TYPE, "cannot encode %s" % type(obj).__name__)

    def getvalue(self):
        return bytes(self.mv[:self.pos])


def dumps(obj, size=1024):
    w = Writer(size)
    w.value(obj)
    return w.getvalue()


def valid_utf8(buf, i, end):
    """True when buf[i:end] is well-formed UTF-8 (RFC 3629): every sequence
    complete, in its shortest form, no UTF-16 surrogate (U+D800..U+DFFF),
    nothing above U+10FFFF. Reads the bytes in place and allocates nothing.
    MicroPython's str(b, "utf-8") only checks the lead/continuation pattern,
    so the decoder asks this first, on every interpreter alike."""
    while i < end:
        b = buf[i]
        i += 1
        if b < 0x80:
            continue
        # the lead byte gives the number of continuation bytes and the range
        # the first of them must lie in; the tighter first ranges are what
        # exclude overlong forms (E0, F0), surrogates (ED) and > U+10FFFF (F4)
        if b < 0xC2:                # a stray continuation byte, or C0/C1 (overlong)
            return False
        if b < 0xE0:
            n = 1
            lo = 0x80
            hi = 0xBF
        elif b < 0xF0:
            n = 2
            lo = 0xA0 if b == 0xE0 else 0x80
            hi = 0x9F if b == 0xED else 0xBF
        elif b < 0xF5:
            n = 3
            lo = 0x90 if b == 0xF0 else 0x80
            hi = 0x8F if b == 0xF4 else 0xBF
        else:
            return False
        if i + n > end:
            return False
        c = buf[i]
        if c < lo or c > hi:
            return False
        i += 1
        n -= 1
        while n:
            if buf[i] & 0xC0 != 0x80:
                return False
            i += 1
            n -= 1
    return True


def _key_cmp(buf, a0, a1, b0, b1):
    # Bytewise comparison of buf[a0:a1] and buf[b0:b1] without slicing.
    i = a0
    j = b0
    while i < a1 and j < b1:
        x = buf[i]
        y = buf[j]
        if x != y:
            return -1 if x < y else 1
        i += 1
        j += 1
    la = a1 - a0
    lb = b1 - b0
    if la == lb:
        return 0
    return -1 if la < lb else 1


class _Reader:
    def __init__(self, data, max_depth, max_items, max_container, allow_tag):
        self.buf = data
        self.end = len(data)
        self.pos = 0
        self.max_depth = max_depth
        self.items = max_items
        self.max_container = max_container
        self.allow_tag = allow_tag

    def _need(self, n):
        if self.pos + n > self.end:
            raise ProtocolError(E_TRUNCATED, "need %d bytes at offset %d" % (n, self.pos))

    def _head(self):
        self._need(1)
        buf = self.buf
        p = self.pos
        ib = buf[p]
        major = ib >> 5
        ai = ib & 0x1F
        p += 1
        if ai < 24:
            self.pos = p
            return major, ai, ai
        if ai == 24:
            self.pos = p
            self._need(1)
            val = buf[p]
            self.pos = p + 1
            minimum = 24
        elif ai == 25:
            self.pos = p
            self._need(2)
            val = (buf[p] << 8) | buf[p + 1]
            self.pos = p + 2
            minimum = 0x100
        elif ai == 26:
            self.pos = p
            self._need(4)
            val = struct.unpack_from(">I", buf, p)[0]
            self.pos = p + 4
            minimum = 0x10000
        elif ai == 27:
            self.pos = p
            self._need(8)
            val = int.from_bytes(bytes(buf[p:p + 8]), "big")
            self.pos = p + 8
            minimum = 0x100000000
        elif ai == 31:
            raise ProtocolError(E_INDEFINITE, "indefinite length at offset %d" % (p - 1))
        else:
            raise ProtocolError(E_TYPE, "reserved additional info %d" % ai)
        if major == _MAJ_SIMPLE:
            # Half/single/double floats or 1-byte simple values: not used.
            raise ProtocolError(E_TYPE, "float or extended simple value")
        if val < minimum:
            raise ProtocolError(E_NONCANONICAL, "head not in shortest form at offset %d" % (p - 1))
        return major, ai, val

    def item(self, depth):
        self.items -= 1
        if self.items < 0:
            raise ProtocolError(E_COUNT, "too many items")
        start = self.pos
        major, ai, val = self._head()
        if major == _MAJ_UINT:
            return val
        if major == _MAJ_NINT:
            return -1 - val
        if major == _MAJ_BSTR or major == _MAJ_TSTR:
            self._need(val)
            p = self.pos
            if major == _MAJ_TSTR and not valid_utf8(self.buf, p, p + val):
                raise ProtocolError(E_UTF8, "bad text at offset %d" % start)
            raw = bytes(self.buf[p:p + val])
            self.pos = p + val
            if major == _MAJ_BSTR:
                return raw
            try:
                return str(raw, "utf-8")
            except UnicodeError:    # not after valid_utf8; kept as a backstop
                raise ProtocolError(E_UTF8, "bad text at offset %d" % start)
        if major == _MAJ_ARRAY or major == _MAJ_MAP:
            if depth >= self.max_depth:
                raise ProtocolError(E_DEPTH, "nesting deeper than %d" % self.max_depth)
            if val > self.max_container:
                raise ProtocolError(E_COUNT, "container of %d entries" % val)
            if major == _MAJ_ARRAY:
                out = []
                for _ in range(val):
                    out.append(self.item(depth + 1))
                return out
            out = {}
            buf = self.buf
            pk0 = -1
            pk1 = -1
            for _ in range(val):
                k0 = self.pos
                k = self.item(depth + 1)
                k1 = self.pos
                if k is True or k is False or not isinstance(k, (int, str)):
                    # (a bool would also compare equal to the keys 1 and 0)
                    raise ProtocolError(E_TYPE, "map key must be integer or text")
                if pk0 >= 0:
                    c = _key_cmp(buf, pk0, pk1, k0, k1)
                    if c == 0:
                        raise ProtocolError(E_DUPKEY, "key %r twice" % (k,))
                    if c > 0:
                        raise ProtocolError(E_NONCANONICAL, "map keys out of order")
                pk0 = k0
                pk1 = k1
                out[k] = self.item(depth + 1)
            return out
        if major == _MAJ_TAG:
            if not self.allow_tag or depth != 0:
                raise ProtocolError(E_TYPE, "tag %d not allowed here" % val)
            return Tag(val, self.item(depth))
        # major 7 with a direct value
        if val == 20:
            return False
        if val == 21:
            return True
        if val == 22:
            return None
        raise ProtocolError(E_TYPE, "simple value %d" % val)


def loads(data, max_depth=MAX_DEPTH, max_items=MAX_ITEMS, max_container=MAX_CONTAINER,
          allow_tag=False, max_size=0):
    """Decode exactly one deterministic CBOR item; raise ProtocolError otherwise."""
    if max_size and len(data) > max_size:
        raise ProtocolError(E_TOO_BIG, "%d bytes" % len(data))
    r = _Reader(data, max_depth, max_items, max_container, allow_tag)
    obj = r.item(0)
    if r.pos != r.end:
        raise ProtocolError(E_TRAILING, "%d bytes after the item" % (r.end - r.pos))
    return obj
