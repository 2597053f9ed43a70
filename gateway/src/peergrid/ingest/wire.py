"""Gateway side of the wire contract, at C speed.

The accept path decodes with cbor2 (depth limit, no indefinite lengths, no
duplicate keys), checks that the frame is in deterministic form by encoding
the decoded parts again and comparing bytes, and verifies the MAC with the
standard library's `hmac` over the exact received protected header and
payload bytes. The MAC itself is never computed over re-encoded data.

Whenever the fast path finds anything wrong, the frame is handed to the
reference implementation in `protocol/` (the code the boards run) so that
every rejection carries exactly the error code the protocol defines.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Callable

import cbor2

from protocol import cose, messages, topics
from protocol.errors import E_SCHEMA, E_TOO_BIG, E_TOPIC, ProtocolError

SecretLookup = Callable[[str, str], "bytes | None"]
_ALG_TAGLEN = {4: 8, 5: 32}
# must equal the limits messages.decode gives the reference decoder
_MAX_CONTAINER = 4 * messages.MAX_CHANNELS
_MAX_ITEMS = messages.MAX_ITEMS


@dataclass(frozen=True)
class Uplink:
    community: str
    device: str
    kind: str
    fields: dict[str, Any]


class _Refused(Exception):
    pass


def _items(v: Any, depth: int) -> int:
    """Items in v counted as protocol.cbor counts them; raises _Refused for
    anything the protocol's CBOR subset does not have (tags, simple values,
    undefined, floats, integers beyond 64 bits, bool or non-scalar keys) or
    for nesting and container sizes beyond its limits."""
    if v is None or v is True or v is False or isinstance(v, (str, bytes)):
        return 1
    if type(v) is int:
        if not -(2**64) <= v < 2**64:
            raise _Refused
        return 1
    if isinstance(v, (list, dict)):
        if depth >= 2 or len(v) > _MAX_CONTAINER:
            raise _Refused
        n = 1
        if isinstance(v, list):
            for x in v:
                n += _items(x, depth + 1)
        else:
            for k, x in v.items():
                if not (type(k) is int or type(k) is str) or (type(k) is int and not -(2**64) <= k < 2**64):
                    raise _Refused
                n += 1 + _items(x, depth + 1)
        return n
    raise _Refused


def mac_structure(protected: bytes, aad: bytes, payload: bytes) -> bytes:
    return b"".join((b"\x84\x64MAC0", cbor2.dumps(protected), cbor2.dumps(aad), cbor2.dumps(payload)))


class UplinkVerifier:
    """Verifies uplink frames; derived keys are cached per device."""

    def __init__(self, secret_for: SecretLookup) -> None:
        self._secret_for = secret_for
        self._keys: dict[tuple[str, str], bytes] = {}

    def forget(self, community: str, device: str) -> None:
        """Drop a cached key (after a rotation or revocation)."""
        self._keys.pop((community, device), None)

    def _uplink_key(self, community: str, device: str) -> bytes | None:
        k = self._keys.get((community, device))
        if k is None:
            secret = self._secret_for(community, device)
            if secret is None:
                return None
            k = cose.derive_keys(secret)[0]
            self._keys[(community, device)] = k
        return k

    def open(self, topic: str | bytes, frame: bytes) -> Uplink:
        community, device, kind = topics.parse(topic)
        if kind not in topics.UPLINK:
            raise ProtocolError(E_TOPIC, "not an uplink topic")
        if len(frame) > cose.MAX_FRAME:
            raise ProtocolError(E_TOO_BIG, f"frame of {len(frame)} bytes")
        aad = topic.encode() if isinstance(topic, str) else bytes(topic)
        try:
            fields = self._fast(community, device, kind, aad, frame)
        except Exception:  # noqa: BLE001 - any anomaly: let the reference name it
            fields = None
        if fields is None:
            self._reference(community, device, kind, aad, frame)
            # The reference accepted what the fast path refused: never accept
            # on disagreement, but say so.
            raise ProtocolError(E_SCHEMA, "fast and reference decoders disagree")
        return Uplink(community, device, kind, fields)

    def _fast(self, community: str, device: str, kind: str, aad: bytes, frame: bytes) -> dict | None:
        env = cbor2.loads(frame, max_depth=3, allow_indefinite=False, allow_duplicate_keys=False)
        if not isinstance(env, cbor2.CBORTag) or env.tag != cose.COSE_MAC0_TAG:
            return None
        parts = env.value
        if len(parts) != 4:
            return None
        prot, unprot, payload, tag = parts
        alg = messages.ALGS[kind][0]
        if prot != cose.PROTECTED[alg] or not isinstance(payload, bytes) or not isinstance(tag, bytes):
            return None
        kid = device.encode()
        if dict(unprot) != {cose.HDR_KID: kid}:
            return None
        # Deterministic form of the envelope: the same parts encoded afresh
        # must give the received bytes (only a check; the MAC uses the
        # received bytes).
        if cbor2.dumps(cbor2.CBORTag(17, [prot, {4: kid}, payload, tag]), canonical=True) != frame:
            return None
        key = self._uplink_key(community, device)
        if key is None or len(tag) != _ALG_TAGLEN[alg]:
            return None
        mac = hmac.new(key, mac_structure(prot, aad, payload), hashlib.sha256).digest()
        if not hmac.compare_digest(mac[: len(tag)], tag):
            return None
        if len(payload) > messages.MAX_PAYLOAD:
            return None
        body = cbor2.loads(payload, max_depth=2, allow_indefinite=False, allow_duplicate_keys=False)
        if not isinstance(body, dict) or cbor2.dumps(body, canonical=True) != payload:
            return None
        # only the data model and limits the reference decoder allows
        if _items(body, 0) > _MAX_ITEMS:
            return None
        return messages.check(kind, body)

    def _reference(self, community: str, device: str, kind: str, aad: bytes, frame: bytes) -> None:
        def key_for(kid: bytes, alg: int) -> bytes | None:
            return self._uplink_key(community, device)

        payload = cose.open_frame(frame, aad, device.encode(), key_for, messages.ALGS[kind])
        messages.decode(kind, payload)


def seal_command(community: str, device: str, secret: bytes, fields: dict[str, Any]) -> tuple[str, bytes]:
    """Topic and frame of a command (gateway to board)."""
    from protocol.gateway_end import CommandSealer

    s = CommandSealer(community, device, secret)
    return s.topic, s.seal(fields)
