# COSE_Mac0 (RFC 9052 section 6.2) with HMAC (RFC 9053 section 3.1), built on
# hashlib alone because MicroPython has neither `hmac` nor `compare_digest`.
#
# The PeerGrid profile (`Sealer.seal`, `open_frame`): tag 17 required,
# exactly one protected header {1: alg}, exactly one unprotected header
# {4: kid}, the MQTT topic as external AAD, and the MAC over the exact
# received bytes. The general Mac0 verifier that the COSE working group's
# examples run through is protocol/mac0.py: a board never loads it.
import hashlib
import sys

from protocol import cbor
from protocol.errors import (
    ProtocolError, E_TOO_BIG, E_NOT_COSE, E_HEADER, E_ALG, E_KID, E_TAG,
    E_UNKNOWN_DEVICE,
)

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

COSE_MAC0_TAG = const(17)
ALG_HMAC256_64 = const(4)    # HMAC-SHA-256 truncated to 64 bits
ALG_HMAC256 = const(5)       # HMAC-SHA-256
ALG_HMAC384 = const(6)
ALG_HMAC512 = const(7)
HDR_ALG = const(1)
HDR_CRIT = const(2)
HDR_KID = const(4)

MAX_FRAME = const(512)

# alg -> (hash constructor name, block size, tag length)
_ALGS = {
    4: ("sha256", 64, 8),
    5: ("sha256", 64, 32),
    6: ("sha384", 128, 48),
    7: ("sha512", 128, 64),
}

# Encoded protected headers of the profile: h'A10104' and h'A10105'.
PROTECTED = {4: b"\xa1\x01\x04", 5: b"\xa1\x01\x05"}

_KDF_UP = b"peergrid/v1 uplink"
_KDF_DOWN = b"peergrid/v1 downlink"


class HmacKey:
    """An HMAC key with its padded inner and outer blocks computed once."""

    def __init__(self, key, alg=ALG_HMAC256):
        info = _ALGS.get(alg)
        if info is None or not hasattr(hashlib, info[0]):
            raise ProtocolError(E_ALG, "algorithm %r not available" % (alg,))
        self.alg = alg
        self._h = getattr(hashlib, info[0])
        block = info[1]
        self.tag_len = info[2]
        key = bytes(key)
        if len(key) > block:
            key = self._h(key).digest()
        ipad = bytearray(block)
        opad = bytearray(block)
        for i in range(block):
            b = key[i] if i < len(key) else 0
            ipad[i] = b ^ 0x36
            opad[i] = b ^ 0x5C
        self._ipad = bytes(ipad)
        self._opad = bytes(opad)

    def inner(self):
        h = self._h()
        h.update(self._ipad)
        return h

    def finish(self, inner):
        h = self._h()
        h.update(self._opad)
        h.update(inner.digest())
        return h.digest()[:self.tag_len]

    def mac(self, data):
        h = self.inner()
        h.update(data)
        return self.finish(h)


def ct_equal(a, b):
    """Compare two byte strings in time that depends only on their lengths."""
    if len(a) != len(b):
        return False
    acc = 0
    for i in range(len(a)):
        acc |= a[i] ^ b[i]
    return acc == 0


def derive_keys(secret):
    """Uplink and downlink MAC keys from a device's 32-byte secret."""
    if len(secret) != 32:
        raise ProtocolError(E_HEADER, "device secret must be 32 bytes")
    k = HmacKey(secret, ALG_HMAC256)
    return k.mac(_KDF_UP), k.mac(_KDF_DOWN)


_head_buf = cbor.Writer(9)
# One preallocated buffer on a board (one thread, no allocation in the hot
# path). CPython gets a fresh one a call: the gateway seals commands and
# checks frames on several threads at once, and a shared buffer made tags wrong.
_ONE_BUFFER = sys.implementation.name == "micropython"


def _feed_bstr(h, data):
    w = _head_buf if _ONE_BUFFER else cbor.Writer(9)
    w.reset()
    w.head(2, len(data))
    h.update(w.mv[:w.pos])
    h.update(data)


def mac_structure_tag(key, protected, aad, payload):
    """MAC over MAC_structure = ["MAC0", protected, external_aad, payload],
    fed to the hash piece by piece instead of building it in memory."""
    h = key.inner()
    h.update(b"\x84\x64MAC0")
    _feed_bstr(h, protected)
    _feed_bstr(h, aad)
    _feed_bstr(h, payload)
    return key.finish(h)


class Sealer:
    """Builds PeerGrid Mac0 frames into one reused buffer.

    Frame: 17([h'A1 01 alg', {4: kid}, payload, tag])
    """

    def __init__(self, key, kid, alg, size=MAX_FRAME, out=None):
        """out: a cbor.Writer to build frames in, shared with another
        Sealer whose frames are used up before this one seals (a board's
        link: one frame buffer for its readings and its other messages)."""
        if alg not in PROTECTED:
            raise ProtocolError(E_ALG, "profile allows alg 4 or 5")
        self.key = HmacKey(key, alg)
        self.protected = PROTECTED[alg]
        self.kid = bytes(kid)
        self.out = out if out is not None else cbor.Writer(size)
        # Everything in front of the payload is the same for every frame.
        w = cbor.Writer(32 + len(self.kid))
        w.tag(COSE_MAC0_TAG)
        w.array(4)
        w.bytes(self.protected)
        w.map(1)
        w.int(HDR_KID)
        w.bytes(self.kid)
        self._prefix = w.getvalue()

    def seal(self, payload, aad):
        """Return a memoryview of the frame (valid until the next seal)."""
        tag = mac_structure_tag(self.key, self.protected, aad, payload)
        o = self.out
        o.reset()
        o.raw(self._prefix)
        o.bytes(payload)
        o.bytes(tag)
        return o.mv[:o.pos]


def open_frame(frame, aad, kid_expected, key_for, allowed_algs, max_size=MAX_FRAME):
    """Verify a PeerGrid frame received on topic `aad`.

    kid_expected: the device id from the topic, as bytes.
    key_for(kid, alg): returns the key (raw bytes or an HmacKey) or None for
    an unknown device.
    Returns the payload bytes (still to be decoded and checked)."""
    n = len(frame)
    if n > max_size:
        raise ProtocolError(E_TOO_BIG, "frame of %d bytes" % n)
    msg = cbor.loads(frame, max_depth=2, max_items=16, max_container=4, allow_tag=True)
    if not isinstance(msg, cbor.Tag) or msg.tag != COSE_MAC0_TAG:
        raise ProtocolError(E_NOT_COSE, "not a tagged COSE_Mac0")
    msg = msg.value
    if not isinstance(msg, list) or len(msg) != 4:
        raise ProtocolError(E_NOT_COSE, "not an array of four")
    prot_raw, unprot, payload, tag = msg
    if not isinstance(prot_raw, bytes) or not isinstance(payload, bytes) \
            or not isinstance(tag, bytes) or not isinstance(unprot, dict):
        raise ProtocolError(E_NOT_COSE, "wrong item types")
    alg = 0
    for a in allowed_algs:
        if prot_raw == PROTECTED[a]:
            alg = a
    if not alg:
        if prot_raw == PROTECTED[4] or prot_raw == PROTECTED[5]:
            raise ProtocolError(E_ALG, "algorithm not allowed for this message")
        raise ProtocolError(E_HEADER, "protected header must be exactly {1: alg}")
    if len(unprot) != 1 or HDR_KID not in unprot:
        raise ProtocolError(E_HEADER, "unprotected header must be exactly {4: kid}")
    kid = unprot[HDR_KID]
    if not isinstance(kid, bytes) or kid != kid_expected:
        raise ProtocolError(E_KID, "kid is not the topic's device")
    key = key_for(kid, alg)
    if key is None:
        raise ProtocolError(E_UNKNOWN_DEVICE, "no key for this device")
    if isinstance(key, HmacKey):
        if key.alg != alg:
            raise ProtocolError(E_ALG, "key made for another algorithm")
        k = key
    else:
        k = HmacKey(key, alg)
    if len(tag) != k.tag_len or not ct_equal(mac_structure_tag(k, prot_raw, aad, payload), tag):
        raise ProtocolError(E_TAG, "MAC does not verify")
    return payload
