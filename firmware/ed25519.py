# Ed25519 signature verification (RFC 8032, 5.1.7) and the SHA-512 it needs
# (FIPS 180-4), for checking signed firmware releases (COSE_Sign1, alg
# EdDSA) on the board. Verification only: the board never signs, so nothing
# here handles a secret and nothing needs to run in constant time.
#
# Runs unchanged on CPython, the MicroPython unix port and 32-bit MicroPython
# (the ESP32 port: 31-bit small ints, big ints are mpz). Everything is plain
# Python ints: field elements mod p = 2^255 - 19, and SHA-512's 64-bit words
# masked to 2^64 - 1.
#
#     sha512(data) -> 64 bytes   hashlib's when the interpreter has it
#                                (CPython), else Sha512 below
#     Sha512(data=b"")           the pure-Python hash, streaming: update(b),
#                                digest() (which leaves the state usable)
#     verify(public_key, message, signature) -> bool
#                                never raises: anything malformed is False
#
# The check is the cofactorless one, [S]B == R + [k]A, done as
# encode([S]B - [k]A) == R (R must also decode to a curve point, so its
# encoding is canonical and comparing bytes is comparing points). RFC 8032
# allows it ("sufficient, but not required"); it is stricter than the
# cofactored [8][S]B == [8]R + [8][k]A and the same for every honestly made
# signature. S must be below the group order L (a non-canonical S is
# refused), A and R must decode (y < p, x exists, no "-0").
#
# Cost: one pass of joint double-and-add over the 253 bits of S and k
# (Straus/Shamir), in extended twisted Edwards coordinates (X:Y:Z:T), x = X/Z,
# y = Y/Z, xy = T/Z, with the points added kept as (Y-X, Y+X, 2Z, 2dT); two
# square roots (decoding A and R) and one inversion (encoding the result).
import struct

import hashlib

_hashlib_sha512 = getattr(hashlib, "sha512", None)   # None on the MicroPython ports

_M64 = 0xFFFFFFFFFFFFFFFF


def _iroot(n, k):
    # floor of the k-th root of n (n >= 1), by Newton's method on ints
    b = 0
    while n >> b:
        b += 1
    x = 1 << ((b + k - 1) // k)     # above the root (MicroPython has no bit_length)
    while True:
        y = ((k - 1) * x + n // x ** (k - 1)) // k
        if y >= x:
            return x
        x = y


def _primes(n):
    out = []
    c = 2
    while len(out) < n:
        for q in out:
            if q * q > c:
                out.append(c)
                break
            if c % q == 0:
                break
        else:
            out.append(c)
        c += 1
    return out


# FIPS 180-4, 4.2.3 and 5.3.5: the round constants are the first 64 bits of
# the fractional parts of the cube roots of the first 80 primes, the initial
# hash value those of the square roots of the first 8; computed once here.
_P80 = _primes(80)
_K = tuple(_iroot(q << 192, 3) & _M64 for q in _P80)
_H0 = tuple(_iroot(q << 128, 2) & _M64 for q in _P80[:8])
del _P80


def _compress(h, buf, off, K=_K, M=_M64):
    # one 128-byte block buf[off:off+128] into the state list h
    w = list(struct.unpack_from(">16Q", buf, off))
    # a 64-bit rotation is a shift of x | x << 64 (one mask for three of them)
    for t in range(16, 80):
        x = w[t - 15]
        y = w[t - 2]
        x2 = x | (x << 64)
        y2 = y | (y << 64)
        w.append((w[t - 16] + w[t - 7] + (((x2 >> 1) ^ (x2 >> 8) ^ (x >> 7)) & M)
                  + (((y2 >> 19) ^ (y2 >> 61) ^ (y >> 6)) & M)) & M)
    a, b, c, d, e, f, g, hh = h
    for t in range(80):
        x2 = e | (e << 64)
        t1 = hh + (((x2 >> 14) ^ (x2 >> 18) ^ (x2 >> 41)) & M) + (g ^ (e & (f ^ g))) + K[t] + w[t]
        x2 = a | (a << 64)
        t2 = (((x2 >> 28) ^ (x2 >> 34) ^ (x2 >> 39)) & M) + ((a & b) | (c & (a | b)))
        hh = g
        g = f
        f = e
        e = (d + t1) & M
        d = c
        c = b
        b = a
        a = (t1 + t2) & M
    h[0] = (h[0] + a) & M
    h[1] = (h[1] + b) & M
    h[2] = (h[2] + c) & M
    h[3] = (h[3] + d) & M
    h[4] = (h[4] + e) & M
    h[5] = (h[5] + f) & M
    h[6] = (h[6] + g) & M
    h[7] = (h[7] + hh) & M


class Sha512:
    """SHA-512 in Python (FIPS 180-4), fed in pieces: update(b), digest()."""

    def __init__(self, data=b""):
        self._h = list(_H0)
        self._buf = b""         # under 128 bytes not yet compressed
        self._n = 0             # bytes taken in
        if data:
            self.update(data)

    def update(self, data):
        n = len(data)
        self._n += n
        buf = self._buf
        i = 0
        if buf:
            i = 128 - len(buf)
            buf += bytes(data[:i])
            if len(buf) < 128:
                self._buf = buf
                return
            _compress(self._h, buf, 0)
        while i + 128 <= n:
            _compress(self._h, data, i)
            i += 128
        self._buf = bytes(data[i:])

    def digest(self):
        h = list(self._h)
        n = self._n
        tail = self._buf + b"\x80" + bytes((111 - n) % 128) + struct.pack(">QQ", n >> 61, (n << 3) & _M64)
        for off in range(0, len(tail), 128):
            _compress(h, tail, off)
        return struct.pack(">8Q", *h)


def _new_hash():
    return _hashlib_sha512() if _hashlib_sha512 is not None else Sha512()


def sha512(data):
    """The SHA-512 digest (64 bytes) of data."""
    s = _new_hash()
    s.update(data)
    return s.digest()


# --- the curve: -x^2 + y^2 = 1 + d x^2 y^2 over GF(p) (RFC 8032, 5.1) -------

try:
    pow(2, 3, 5)
    _powmod = pow
except Exception:           # a build without 3-argument pow
    def _powmod(b, e, m):  # type: ignore[misc]  # only where pow() lacks a modulus
        r = 1
        b %= m
        while e:
            if e & 1:
                r = r * b % m
            b = b * b % m
            e >>= 1
        return r

_P = (1 << 255) - 19
_L = (1 << 252) + 27742317777372353535851937790883648493     # the order of B
_D = -121665 * _powmod(121666, _P - 2, _P) % _P
_D2 = 2 * _D % _P
_SQRT_M1 = _powmod(2, (_P - 1) // 4, _P)                       # sqrt(-1)


def _decode(s):
    # 32 bytes -> (X, Y, Z, T), or None when s encodes no point (5.1.3)
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    p = _P
    if y >= p:
        return None
    yy = y * y % p
    u = (yy - 1) % p
    v = (_D * yy + 1) % p
    v3 = v * v % p * v % p
    x = u * v3 % p * _powmod(u * v3 % p * v3 % p * v % p, (p - 5) // 8, p) % p
    vxx = v * x % p * x % p
    if vxx != u:
        if vxx != p - u:
            return None
        x = x * _SQRT_M1 % p
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = p - x
    return (x, y, 1, x * y % p)


def _encode(pt):
    X, Y, Z, _ = pt
    p = _P
    zi = _powmod(Z, p - 2, p)
    x = X * zi % p
    y = Y * zi % p
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def _cached(pt):
    # a point to be added, as (Y-X, Y+X, 2Z, 2dT)
    X, Y, Z, T = pt
    p = _P
    return ((Y - X) % p, (Y + X) % p, 2 * Z % p, _D2 * T % p)


def _add(P1, q):
    # extended P1 + cached q (add-2008-hwcd-3 with a = -1; RFC 8032, 5.1.4)
    X1, Y1, Z1, T1 = P1
    ymx, ypx, z2, t2d = q
    p = _P
    a = (Y1 - X1) * ymx % p
    b = (Y1 + X1) * ypx % p
    c = T1 * t2d % p
    d = Z1 * z2 % p
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % p, g * h % p, f * g % p, e * h % p)


def _double(P1):
    # dbl-2008-hwcd with a = -1 (RFC 8032, 5.1.4); T1 is not needed
    X1, Y1, Z1, _ = P1
    p = _P
    a = X1 * X1 % p
    b = Y1 * Y1 % p
    c = 2 * Z1 * Z1 % p
    h = a + b
    s = X1 + Y1
    e = h - s * s % p
    g = a - b
    f = c + g
    return (e * f % p, g * h % p, f * g % p, e * h % p)


_B = _decode((4 * _powmod(5, _P - 2, _P) % _P).to_bytes(32, "little"))   # y = 4/5, x even
_B_CACHED = _cached(_B)


def _check(public_key, message, signature):
    A = _decode(public_key)
    if A is None:
        return False
    r = signature[:32]
    if _decode(r) is None:
        return False
    s = int.from_bytes(signature[32:], "little")
    if s >= _L:
        return False
    hs = _new_hash()
    hs.update(r)
    hs.update(public_key)
    hs.update(message)
    k = int.from_bytes(hs.digest(), "little") % _L
    # [s]B + [k](-A) by one pass of double-and-add over both scalars
    p = _P
    X, Y, Z, T = A
    negA = (p - X, Y, Z, p - T)
    table = (None, _B_CACHED, _cached(negA), _cached(_add(_B, _cached(negA))))
    acc = (0, 1, 1, 0)          # the neutral element
    top = 252                   # s, k < L < 2^253: start at the highest bit set
    while top >= 0 and not ((s | k) >> top) & 1:
        top -= 1
    for i in range(top, -1, -1):
        acc = _double(acc)
        j = ((s >> i) & 1) | (((k >> i) & 1) << 1)
        if j:
            acc = _add(acc, table[j])
    return _encode(acc) == r


def verify(public_key, message, signature):
    """True when signature (64 bytes) is public_key's (32 bytes) Ed25519
    signature of message (bytes, bytearray or memoryview); False for
    anything else, malformed input included."""
    try:
        public_key = bytes(public_key)
        signature = bytes(signature)
        if len(public_key) != 32 or len(signature) != 64:
            return False
        return _check(public_key, message, signature)
    except Exception:       # fail closed: a verifier answers, it never raises
        return False
