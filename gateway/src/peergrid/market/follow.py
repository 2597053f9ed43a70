"""Following a ledger entry by entry (issue 22): what a member's mirror
checks as entries arrive, the same checks `ledger verify` makes on a whole
export, without starting over each time.

A Follower holds the verified entries' bytes and hashes, the signing key
from the genesis entry (or one pinned), which settlement is in force for
each interval, and the governance state. `extend(raws)` checks new entries
after the last one held and keeps them only if all of them pass; it raises
Divergence when the gateway's entries no longer continue this copy (an
entry it already holds was changed, or the chain was re-signed with
another key), LedgerError for anything else wrong with them.
"""
from __future__ import annotations

import hashlib

from peergrid.market.governance import GovernanceError, State
from peergrid.market.ledger import ZERO, Entry, LedgerError, _genesis, _ref, _verify_range, iter_export


class Divergence(LedgerError):
    """The gateway's ledger is not a continuation of the one held."""

    def __init__(self, msg: str, kind: str, index: int | None = None) -> None:
        super().__init__(msg, index)
        self.kind = kind          # "truncated", "rewritten", "key", "fork"


class Follower:
    def __init__(self, community: str = "", pinned_key: bytes | None = None) -> None:
        self.raws: list[bytes] = []
        self.digests: list[bytes] = []
        self.key: bytes | None = pinned_key
        self.pinned = pinned_key
        self.kid = b""
        self.state = State(community)
        self.refs_latest: dict[int, tuple[int, bytes]] = {}     # interval start -> (entry, result digest) in force

    @property
    def height(self) -> int:
        return len(self.raws)

    @property
    def head(self) -> bytes:
        return self.digests[-1] if self.digests else ZERO

    def extend(self, raws: list[bytes]) -> int:
        """Check entries height, height + 1, ... and keep them; returns how
        many were added. Nothing is kept from a batch that fails."""
        if not raws:
            return 0
        first = self.height
        if first == 0:
            key, kid = _genesis(raws[0], self.pinned)
        else:
            key, kid = self.key or b"", self.kid
        try:
            entries = _verify_range(raws, first, self.head, key, kid, self.pinned)
        except LedgerError as e:
            if first and e.index == first and "does not chain" in str(e):
                raise Divergence(f"entry {first} does not continue the {first} entries this mirror holds: "
                                 "an entry it holds was changed", "rewritten", first) from None
            if first and "signature" in str(e):
                raise Divergence(f"entry {e.index} is not signed with the ledger's key: the key changed "
                                 "without an entry that rotates it", "key", e.index) from None
            raise
        refs = [r for r in map(_ref, entries) if r is not None]
        latest = self._check_refs(refs)
        st = self.state
        try:
            for e in entries:
                st.digests.append(e.digest)
                st.apply(e.n, e.type, e.t, e.body)
        except (GovernanceError, KeyError, TypeError) as err:
            # (rare: the mirror alarms) the state is rebuilt from the entries it keeps
            self.state = self._replay_held()
            raise LedgerError(f"entry {e.n}: {err}", e.n) from None
        # all passed: keep them
        self.key, self.kid = key, kid
        for e in entries:
            self.raws.append(e.raw)
            self.digests.append(e.digest)
        self.refs_latest.update(latest)
        return len(entries)

    def _check_refs(self, refs: list[tuple]) -> dict[int, tuple[int, bytes]]:
        """ledger._check_refs for new entries only: each interval settled
        once, an adjustment replacing the figures in force. Returns what is
        in force after them (applied once the whole batch passes)."""
        upd: dict[int, tuple[int, bytes]] = {}
        for r in refs:
            start, n = r[1], r[2]
            cur = upd.get(start, self.refs_latest.get(start))
            if r[0] == "S":
                if cur is not None:
                    raise LedgerError(f"interval {start} settled a second time", n)
                upd[start] = (n, r[3])
            else:
                if cur != (r[3], r[4]):
                    raise LedgerError("adjustment does not start from the figures in force", n)
                upd[start] = (n, r[5])
        return upd

    def _replay_held(self) -> State:
        from peergrid.market.governance import replay

        return replay([self.entry(i) for i in range(self.height)], self.state.community)

    def load(self, data: bytes) -> None:
        """A whole export (a mirror's own copy at start), checked as it loads."""
        self.extend(list(iter_export(data)))

    def export(self) -> bytes:
        return b"".join(self.raws)

    def entry(self, n: int) -> Entry:
        from peergrid.market.ledger import decode_entry

        m = decode_entry(self.raws[n])
        return Entry(n, m["prev"], m["type"], m["t"], m["body"], self.raws[n])

    def digest_at(self, height: int) -> bytes | None:
        """SHA-256 of the newest entry when the ledger had `height` entries."""
        return self.digests[height - 1] if 1 <= height <= self.height else None


def sha(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def check_head(f: Follower, height: int, digest: bytes | None, key: bytes | None) -> None:
    """What the gateway says its head is, against this copy: shorter, or a
    different entry at a height held, or another key, is a Divergence."""
    if key is not None and f.key is not None and key != f.key:
        raise Divergence(f"the gateway now signs with key {key.hex()[:16]}..., the ledger's key is "
                         f"{f.key.hex()[:16]}...; no entry rotates it", "key")
    if height < f.height:
        raise Divergence(f"the gateway's ledger has {height} entries; this mirror verified {f.height}: "
                         "entries were removed", "truncated", height)
    if digest is not None and height == f.height and digest != f.head:
        raise Divergence(f"the gateway's entry {height - 1} differs from the one this mirror holds", "rewritten",
                         height - 1)


def witness_conflict(f: Follower, member: int, height: int, digest: bytes) -> str | None:
    """Another member's mirror signed (height, digest): if this copy holds
    that height with another entry, the gateway showed them a fork."""
    mine = f.digest_at(height)
    if mine is not None and mine != digest:
        return (f"member {member}'s mirror holds a different entry {height - 1} ({digest.hex()[:16]}...) than this "
                f"one ({mine.hex()[:16]}...): the gateway showed two ledgers")
    return None

