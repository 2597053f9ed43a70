"""Signing in to the member app with the member's own key (see
peergrid.app.members for the whole API): challenges, sessions, and the
bounds that keep a hostile client from guessing or flooding."""
from __future__ import annotations

import hashlib
import re
import secrets
import time
from typing import Any

import cbor2


class AppError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


def signin_msg(community: str, member: int, nonce: bytes) -> bytes:
    return cbor2.dumps(["peergrid sign-in", community, member, nonce], canonical=True)


def _int(v: Any, what: str, lo: int = 0, hi: int = 2 ** 53) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise AppError(400, f"{what} must be a whole number from {lo} to {hi}")
    return v


def _hex(v: Any, what: str, n: int) -> bytes:
    if not isinstance(v, str) or len(v) != 2 * n or not re.fullmatch(r"[0-9a-f]+", v):
        raise AppError(400, f"{what} must be {n} bytes in lower-case hex")
    return bytes.fromhex(v)



class SignIn:
    """Mixed into MemberApp: uses its lock, db, dblock, metrics, c and the
    limits set in MemberApp.__init__."""

    def _fail(self, addr: str, why: str) -> AppError:
        now = time.monotonic()
        with self.lock:
            t0, n = self.failures.get(addr, (now, 0))
            if now - t0 > 60:
                t0, n = now, 0
            self.failures[addr] = (t0, n + 1)
            if len(self.failures) > 10000:
                self.failures.clear()
        self.metrics.inc("app_signin_refused")
        return AppError(401, why)

    def _throttled(self, addr: str) -> None:
        with self.lock:
            t0, n = self.failures.get(addr, (0.0, 0))
        if n >= self.fail_limit and time.monotonic() - t0 <= 60:
            self.metrics.inc("app_signin_throttled")
            raise AppError(429, "too many failed sign-ins from this address; wait a minute")

    def challenge(self, body: dict[str, Any], addr: str) -> dict[str, Any]:
        self._throttled(addr)
        m = _int(body.get("member"), "member", 1, 2 ** 31)
        nonce = secrets.token_bytes(32)
        now = time.monotonic()
        with self.lock:
            for k in [k for k, (_, exp) in self.challenges.items() if exp < now]:
                del self.challenges[k]
            while len(self.challenges) >= self.max_challenges:
                self.challenges.pop(next(iter(self.challenges)))
                self.metrics.inc("app_challenges_dropped")
            self.challenges[nonce] = (m, now + self.challenge_s)
        return {"nonce": nonce.hex(), "community": self.c, "member": m, "expires_s": self.challenge_s}

    def signin(self, body: dict[str, Any], addr: str) -> dict[str, Any]:
        self._throttled(addr)
        m = _int(body.get("member"), "member", 1, 2 ** 31)
        nonce = _hex(body.get("nonce"), "nonce", 32)
        sig = _hex(body.get("sig"), "sig", 64)
        with self.lock:
            ch = self.challenges.pop(nonce, None)
        if ch is None or ch[0] != m or ch[1] < time.monotonic():
            raise self._fail(addr, "unknown or expired challenge; ask for a new one")
        with self.dblock:
            row = self.db.execute("SELECT name, pubkey, left_at FROM members WHERE community=? AND id=?",
                                  (self.c, m)).fetchone()
        if row is None or row[1] is None or (row[2] is not None and row[2] <= time.time()):
            raise self._fail(addr, "no current member with a key under that number")
        from peergrid.market.governance import _verify

        if not _verify(bytes(row[1]), sig, signin_msg(self.c, m, nonce)):
            raise self._fail(addr, "the signature does not match this member's key")
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        with self.lock:
            for k in [k for k, (_, exp) in self.sessions.items() if exp < now]:
                del self.sessions[k]
            while len(self.sessions) >= self.max_sessions:
                self.sessions.pop(next(iter(self.sessions)))
            self.sessions[hashlib.sha256(token.encode()).digest()] = (m, now + self.session_s)
        self.metrics.inc("app_signins")
        return {"token": token, "member": m, "name": row[0], "expires_s": self.session_s}

    def authenticate(self, header: str | None) -> int:
        if not header or not header.startswith("Bearer ") or len(header) > 200:
            raise AppError(401, "sign in first (Authorization: Bearer <token>)")
        h = hashlib.sha256(header[7:].strip().encode()).digest()
        with self.lock:
            s = self.sessions.get(h)
        if s is None or s[1] < time.monotonic():
            self.metrics.inc("app_unauthenticated")
            raise AppError(401, "the session has ended; sign in again")
        return s[0]

    def signout(self, header: str | None) -> dict[str, Any]:
        if header and header.startswith("Bearer "):
            with self.lock:
                self.sessions.pop(hashlib.sha256(header[7:].strip().encode()).digest(), None)
        return {"ok": True}

    # -- dispatch ------------------------------------------------------------------
