"""The community ledger: append-only entries, each a COSE_Sign1 (RFC 9052,
EdDSA over Ed25519) signed by the gateway and chained to the one before by
its SHA-256. Anyone with the export and nothing else can check every
signature and link, and re-run every settlement from its recorded inputs.

Entry payload (deterministic CBOR map):
    {"n": index from 0, "prev": SHA-256 of the previous entry's bytes
     (32 zero bytes for the first), "type": kind, "t": Unix seconds,
     "body": map}
Kinds: "genesis" (community id and the gateway's public key), "settlement"
(interval, tariff, the members' flows and the results), "adjustment",
"member_joined", "member_left", "member_key", "tariff", "interval", and the
governance kinds of peergrid.market.governance ("proposal", "ballot",
"tally", "split", "payout", "witness").

COSE_Sign1: 18([protected = {1: -8}, {4: kid}, payload, signature]); the
signature is over ["Signature1", protected, h'', payload].

Export format: the entries' COSE_Sign1 bytes one after another, a CBOR
sequence (RFC 8742); the first entry is the genesis entry.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

ALG_EDDSA = -8
PROTECTED = cbor2.dumps({1: ALG_EDDSA}, canonical=True)
ZERO = bytes(32)


def sig_structure(protected: bytes, payload: bytes, external_aad: bytes = b"") -> bytes:
    return cbor2.dumps(["Signature1", protected, external_aad, payload], canonical=True)


def sign1(key: Ed25519PrivateKey, kid: bytes, payload: bytes, protected: bytes = PROTECTED) -> bytes:
    sig = key.sign(sig_structure(protected, payload))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {4: kid}, payload, sig]), canonical=True)


def open_sign1(data: bytes, pub: Ed25519PublicKey, kid: bytes | None = None) -> bytes:
    """The payload of a valid COSE_Sign1; raises LedgerError otherwise. The
    unsigned parts are pinned too: the kid must be the ledger's and the
    bytes must be the structure's deterministic encoding, so no byte of an
    entry can change without that entry failing."""
    try:
        obj = cbor2.loads(data)
    except Exception as e:  # noqa: BLE001
        raise LedgerError(f"not CBOR: {e}") from None
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != 18 or not isinstance(obj.value, (list, tuple)) \
            or len(obj.value) != 4:
        raise LedgerError("not a COSE_Sign1")
    protected, unprotected, payload, sig = obj.value
    if protected != PROTECTED or not isinstance(payload, bytes) or not isinstance(sig, bytes):
        raise LedgerError("unexpected COSE header or types")
    if kid is not None and unprotected != {4: kid}:
        raise LedgerError("unexpected key id")
    if cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, sig]), canonical=True) != data:
        raise LedgerError("not in deterministic form")
    try:
        pub.verify(sig, sig_structure(protected, payload))
    except InvalidSignature:
        raise LedgerError("signature does not verify") from None
    return payload


class LedgerError(ValueError):
    def __init__(self, msg: str, index: int | None = None) -> None:
        super().__init__(msg if index is None else f"entry {index}: {msg}")
        self.index = index


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass
class Entry:
    n: int
    prev: bytes
    type: str
    t: int
    body: dict[str, Any]
    raw: bytes

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.raw).digest()


class Ledger:
    """Appends signed entries to a list of raw entries (the gateway keeps
    them in its database; see export/append_raw)."""

    def __init__(self, key: Ed25519PrivateKey, community: str, kid: bytes = b"gateway") -> None:
        self.key = key
        self.kid = kid
        self.community = community
        self.entries: list[bytes] = []
        self._prev = ZERO

    def load(self, raws: list[bytes]) -> None:
        self.entries = list(raws)
        self._prev = hashlib.sha256(raws[-1]).digest() if raws else ZERO

    def truncate(self, n: int) -> None:
        """Forget the entries from n on (appended, then not committed)."""
        self.load(self.entries[:n])

    def append(self, kind: str, t: int, body: dict[str, Any]) -> bytes:
        if not self.entries and kind != "genesis":
            self.append("genesis", t, {"community": self.community, "key": public_bytes(self.key),
                                       "kid": self.kid})
        payload = cbor2.dumps({"n": len(self.entries), "prev": self._prev, "type": kind, "t": int(t),
                               "body": body}, canonical=True)
        raw = sign1(self.key, self.kid, payload)
        self.entries.append(raw)
        self._prev = hashlib.sha256(raw).digest()
        return raw

    def export(self) -> bytes:
        return b"".join(self.entries)


def _skip(data: bytes, pos: int, depth: int = 0) -> int:
    """The end of the CBOR item at pos, from its headers alone (strings are
    skipped, not copied). Raises ValueError on what it cannot walk."""
    if depth > 16:
        raise ValueError("nested too deep")
    ib = data[pos]
    major, info = ib >> 5, ib & 31
    pos += 1
    if info < 24:
        arg = info
    elif info <= 27:
        n = 1 << (info - 24)
        if pos + n > len(data):
            raise ValueError("truncated")
        arg = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    else:
        raise ValueError("indefinite or reserved length")
    if major in (2, 3):
        pos += arg
    elif major == 4:
        for _ in range(arg):
            pos = _skip(data, pos, depth + 1)
    elif major == 5:
        for _ in range(2 * arg):
            pos = _skip(data, pos, depth + 1)
    elif major == 6:
        pos = _skip(data, pos, depth + 1)
    if pos > len(data):
        raise ValueError("truncated")
    return pos


def iter_export(data: bytes):
    """The raw bytes of each item of a CBOR sequence, one at a time (so a
    verifier reports a damaged entry before it trips over the next one).
    Items are delimited from their headers; the decoder only runs to name
    what is wrong with bytes that cannot be walked."""
    pos = 0
    i = 0
    n = len(data)
    while pos < n:
        try:
            end = _skip(data, pos)
        except (ValueError, IndexError):
            break
        yield data[pos:end]
        pos = end
        i += 1
    if pos >= n:
        return
    f = io.BytesIO(data)
    f.seek(pos)
    dec = cbor2.CBORDecoder(f)
    while f.tell() < len(data):
        start = f.tell()
        try:
            dec.decode()
        except Exception as e:  # noqa: BLE001
            raise LedgerError(f"undecodable bytes at offset {start}: {e}", i) from None
        yield data[start:f.tell()]
        i += 1


def parse_export(data: bytes) -> list[bytes]:
    return list(iter_export(data))


def _genesis(raw: bytes, public_key: bytes | None) -> tuple[bytes, bytes]:
    """(public key, kid) named by the genesis entry (or the pinned key)."""
    try:
        obj = cbor2.loads(raw)
        first = cbor2.loads(obj.value[2])
        return public_key or bytes(first["body"]["key"]), bytes(first["body"]["kid"])
    except Exception as e:  # noqa: BLE001
        raise LedgerError(f"genesis entry unreadable: {e}", 0) from None


def _verify_range(raws: list[bytes], first: int, prev: bytes, key: bytes, kid: bytes,
                  pinned: bytes | None) -> list[Entry]:
    """Verify entries first .. first + len(raws) - 1, given the hash the
    first one must chain to."""
    pub = Ed25519PublicKey.from_public_bytes(key)
    out: list[Entry] = []
    for j, raw in enumerate(raws):
        i = first + j
        try:
            payload = open_sign1(raw, pub, kid)
        except LedgerError as e:
            raise LedgerError(str(e), i) from None
        # (the signature covers the payload's exact bytes; no re-encoding needed)
        m = cbor2.loads(payload)
        if not isinstance(m, dict):
            raise LedgerError("payload is not a map", i)
        if m.get("n") != i:
            raise LedgerError(f"numbered {m.get('n')}", i)
        if m.get("prev") != prev:
            raise LedgerError("does not chain to the entry before", i)
        if i == 0 and (m.get("type") != "genesis" or (pinned and m["body"].get("key") != pinned)):
            raise LedgerError("first entry is not the genesis of this key", i)
        e = Entry(i, m["prev"], m["type"], m["t"], m["body"], raw)
        if e.type == "settlement":
            _check_settlement(e, i)
        elif e.type == "adjustment":
            _check_adjustment(e, i)
        out.append(e)
        prev = hashlib.sha256(raw).digest()
    return out


def _chunk(args: tuple) -> tuple[int, str] | list[tuple[int, str, int, tuple | None]]:
    raws, first, prev, key, kid, pinned = args
    try:
        done = _verify_range(raws, first, prev, key, kid, pinned)
    except LedgerError as e:
        return (e.index if e.index is not None else first, str(e))
    # governance entries travel back with their bodies (they are few)
    from peergrid.market.governance import GOV

    return [(e.n, e.type, e.t, _ref(e), e.body if e.type in GOV else None) for e in done]


def _governance(entries: list["Entry"]) -> None:
    from peergrid.market.governance import GovernanceError, replay

    try:
        replay(entries)
    except GovernanceError as e:
        msg = str(e)
        idx = None
        if msg.startswith("entry "):
            head, _, rest = msg.partition(": ")
            idx, msg = int(head.split()[1]), rest
        raise LedgerError(msg, idx) from None


def result_digest(b: dict[str, Any]) -> bytes:
    """What identifies a settlement's outcome: inputs and money."""
    return hashlib.sha256(cbor2.dumps([b["tariff"], b["flows"], b.get("limits"), b.get("partners"), b["amounts"], b["grid"],
                                       b["fund"]], canonical=True)).digest()


def _ref(e: Entry) -> tuple | None:
    if e.type == "settlement":
        return ("S", e.body["start"], e.n, result_digest(e.body))
    if e.type == "adjustment":
        return ("A", e.body["start"], e.n, e.body["replaces"], result_digest(e.body["old"]),
                result_digest(e.body["new"]))
    return None


def _check_refs(refs: list[tuple]) -> None:
    """Each interval settled once; an adjustment replaces exactly the entry
    currently in force for its interval, with that entry's figures."""
    latest: dict[int, tuple[int, bytes]] = {}
    for r in refs:
        if r[0] == "S":
            _, start, n, dig = r
            if start in latest:
                raise LedgerError(f"interval {start} settled a second time", n)
            latest[start] = (n, dig)
        else:
            _, start, n, replaces, old, new = r
            if latest.get(start) != (replaces, old):
                raise LedgerError("adjustment does not start from the figures in force", n)
            latest[start] = (n, new)


def verify(data: bytes, public_key: bytes | None = None, workers: int = 1) -> list[Entry]:
    """Check a whole export: signatures, the hash chain, numbering, and that
    every settlement entry's money follows from its inputs. Returns the
    entries; raises LedgerError naming the first bad entry. With workers > 1
    the signatures and settlements of a long ledger are checked in that many
    processes (each chunk knows the hash its first entry must chain to), and
    the entries come back without their bodies."""
    raws = []
    try:
        for raw in iter_export(data):
            raws.append(raw)
    except LedgerError as e:
        # what came before the undecodable bytes is checked first, so a
        # damaged earlier entry is the one reported
        if raws:
            key, kid = _genesis(raws[0], public_key)
            _verify_range(raws, 0, ZERO, key, kid, public_key)
        raise e
    if not raws:
        raise LedgerError("empty ledger")
    key, kid = _genesis(raws[0], public_key)
    if workers > 1 and len(raws) > 2000:
        import concurrent.futures as cf

        size = (len(raws) + workers - 1) // workers
        jobs = []
        for a in range(0, len(raws), size):
            prev = ZERO if a == 0 else hashlib.sha256(raws[a - 1]).digest()
            jobs.append((raws[a:a + size], a, prev, key, kid, public_key))
        with cf.ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_chunk, jobs))
        bad = [r for r in results if isinstance(r, tuple)]
        if bad:
            idx, msg = min(bad)
            raise LedgerError(msg.split(": ", 1)[1] if msg.startswith("entry ") else msg, idx)
        _check_refs([ref for r in results for _, _, _, ref, _ in r if ref is not None])
        # headers only, but governance entries with their bodies
        out = [Entry(n, b"", kind, t, body or {}, raws[n]) for r in results for n, kind, t, _, body in r]
        if any(e.type == "split" for e in out):
            # a split states balances: those need every settlement's body
            out = [_decode(raws[e.n], e) if e.type in ("settlement", "adjustment") else e for e in out]
        if any(e.type in ("proposal", "ballot", "tally", "split", "interval", "witness", "payout")
               or (e.type == "tariff" and "by_vote" in e.body) for e in out):
            _governance(out)
        return out
    entries = _verify_range(raws, 0, ZERO, key, kid, public_key)
    _check_refs([ref for ref in map(_ref, entries) if ref is not None])
    _governance(entries)
    return entries


def decode_entry(raw: bytes) -> dict[str, Any]:
    """An entry's signed payload (n, prev, type, t, body), unchecked: for
    readers of the gateway's own database, not for a ledger to be trusted."""
    return cbor2.loads(cbor2.loads(raw).value[2])


def _decode(raw: bytes, e: "Entry") -> "Entry":
    m = cbor2.loads(cbor2.loads(raw).value[2])
    return Entry(e.n, m["prev"], m["type"], m["t"], m["body"], raw)


def settlement_body(start: int, end: int, flows: list[Any], tariff: Any, result: Any) -> dict[str, Any]:
    """The body of a settlement entry: the inputs needed to re-run it (the
    tariff, the flows, for an auction the price limits, the preferred
    partners in matching order) and the money it came to."""
    fl = sorted(flows, key=lambda f: f.member)
    body: dict[str, Any] = {"start": start, "end": end, "tariff": tariff.as_list(),
                            "flows": [x for f in fl for x in (f.member, f.imp, f.exp)]}  # flat: member, imp, exp
    if tariff.mechanism == "auction":
        body["limits"] = [x for f in fl for x in (result.members[f.member]["bid"], result.members[f.member]["ask"])]
    if result.partners:
        body["partners"] = [x for p in result.partners for x in (p.seller, p.buyer, p.discount)]
    body.update({"amounts": [result.members[f.member]["amount"] for f in fl],
                 "grid": result.grid, "fund": result.fund,
                 "price": [result.p_buy.numerator, result.p_buy.denominator,
                           result.p_sell.numerator, result.p_sell.denominator]})
    return body


def rerun(b: dict[str, Any], detail: bool = False) -> tuple[list[tuple[int, int, int]], Any, Any]:
    """Re-run a settlement body from its recorded inputs: (flows, tariff,
    peergrid.market.settle.Result). ValueError, KeyError or TypeError if malformed."""
    from peergrid.market.settle import Partner, Tariff, check_inputs, market

    t = Tariff.from_list(b["tariff"])
    flat = b["flows"]
    if not isinstance(flat, list) or len(flat) % 3:
        raise ValueError("flows must be three integers per member")
    flows = list(zip(flat[0::3], flat[1::3], flat[2::3]))
    lim = None
    if t.mechanism == "auction":
        ll = b["limits"]
        if not isinstance(ll, list) or len(ll) != 2 * len(flows):
            raise ValueError("limits must be two integers per member")
        lim = list(zip(ll[0::2], ll[1::2]))
    pp = b.get("partners", [])
    if not isinstance(pp, list) or len(pp) % 3 or any(type(v) is not int for v in pp):
        raise ValueError("partners must be three integers each")
    partners = [Partner(*pp[k:k + 3]) for k in range(0, len(pp), 3)]
    check_inputs(t, flows, lim, partners, flat)
    return flows, t, market(t, flows, lim, partners, detail)


def adjustment_body(old: dict[str, Any], new: dict[str, Any], replaces: int) -> dict[str, Any]:
    """An adjustment: the figures in force (entry `replaces`), the new ones
    from the data that arrived late, and what changes for each member."""
    om = dict(zip(old["flows"][0::3], old["amounts"]))
    nm = dict(zip(new["flows"][0::3], new["amounts"]))
    delta = [[m, nm.get(m, 0) - om.get(m, 0)] for m in sorted(set(om) | set(nm))]
    return {"start": new["start"], "end": new["end"], "replaces": replaces, "old": old, "new": new,
            "delta": {"members": delta, "grid": new["grid"] - old["grid"], "fund": new["fund"] - old["fund"]}}


def _check_adjustment(e: Entry, i: int) -> None:
    b = e.body
    try:
        old, new, delta = b["old"], b["new"], b["delta"]
        if (old["start"], old["end"]) != (b["start"], b["end"]) or (new["start"], new["end"]) != (b["start"], b["end"]):
            raise ValueError("old and new figures are for another interval")
    except (KeyError, TypeError, ValueError) as err:
        raise LedgerError(f"adjustment entry malformed: {err}", i) from None
    _check_settlement(Entry(i, e.prev, "settlement", e.t, old, e.raw), i)
    _check_settlement(Entry(i, e.prev, "settlement", e.t, new, e.raw), i)
    want = adjustment_body(old, new, b["replaces"])["delta"]
    if delta != want:
        raise LedgerError("adjustment delta does not follow from the old and new figures", i)


def _check_settlement(e: Entry, i: int) -> None:
    b = e.body
    try:
        _, _, r = rerun(b)
    except (KeyError, TypeError, ValueError) as err:
        raise LedgerError(f"settlement entry malformed: {err}", i) from None
    pb, ps = r.p_buy, r.p_sell
    if r.amounts != b["amounts"] or r.grid != b["grid"] or r.fund != b["fund"] or \
            [pb.numerator, pb.denominator, ps.numerator, ps.denominator] != b["price"]:
        raise LedgerError("settlement result does not follow from its inputs", i)
