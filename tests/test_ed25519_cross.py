"""firmware/ed25519.py against the `cryptography` package (OpenSSL) under
CPython: signatures it makes verify, mutated ones do not; and the
pure-Python SHA-512 the boards use matches hashlib."""
from __future__ import annotations

import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from firmware import ed25519

L = (1 << 252) + 27742317777372353535851937790883648493


def _flip(b: bytes, rng: random.Random) -> bytes:
    out = bytearray(b)
    i = rng.randrange(len(out) * 8)
    out[i // 8] ^= 1 << (i % 8)
    return bytes(out)


def _signed(rng: random.Random) -> tuple[bytes, bytes, bytes]:
    sk = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    pk = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    msg = rng.randbytes(rng.choice((0, 1, rng.randrange(300), rng.randrange(3000))))
    return pk, msg, sk.sign(msg)


def test_agrees_with_cryptography() -> None:
    rng = random.Random(25519)
    for _ in range(200):
        pk, msg, sig = _signed(rng)
        assert ed25519.verify(pk, msg, sig)
        assert not ed25519.verify(pk, _flip(msg, rng) if msg else b"\x00", sig)
        assert not ed25519.verify(pk, msg, _flip(sig, rng))
        assert not ed25519.verify(_flip(pk, rng), msg, sig)
        s = int.from_bytes(sig[32:], "little")
        assert not ed25519.verify(pk, msg, sig[:32] + (s + L).to_bytes(32, "little"))


def test_pure_sha512_matches_hashlib(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(512)
    monkeypatch.setattr(ed25519, "_hashlib_sha512", None)      # what the boards run
    for n in list(range(0, 300, 1)) + [rng.randrange(300) for _ in range(50)]:
        data = rng.randbytes(n)
        want = hashlib.sha512(data).digest()
        assert ed25519.sha512(data) == want, n
        assert ed25519.Sha512(data).digest() == want, n
    pk, msg, sig = _signed(rng)
    assert ed25519.verify(pk, msg, sig)                      # verify on the fallback hash
    assert not ed25519.verify(pk, msg + b"!", sig)
