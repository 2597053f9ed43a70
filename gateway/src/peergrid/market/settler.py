"""Settling intervals from the gateway's store into the ledger, each exactly
once (issue 6, items 1 and 6).

An interval [start, end) is due once `now >= end + grace_s` (late readings
get that long to arrive). Its flows come from every active device's `grid`
channel registers (peergrid.market.intervals), summed per member; the settlement
(peergrid.market.settle) and its ledger entry are written in one SQLite transaction
together with the row that marks the interval settled. A gateway killed at
any point therefore either settled an interval completely or not at all,
and settles it (once) after the restart. Readings that arrive after their
interval was settled are not rewritten into it: `adjust_due` records the
difference as an adjustment entry.

The ledger's signing key is an Ed25519 key in a file (created with mode 0600
on first use); its public key is in the ledger's genesis entry.
"""
from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from peergrid.market import ledger
from peergrid.market.intervals import Reading, intervals
from peergrid.community.registry import Registry
from peergrid.market.settle import Flow, Partner, Tariff, max_discount, settle
from peergrid.sqltx import transaction

log = logging.getLogger("peergrid.market.settler")

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (n INTEGER PRIMARY KEY, raw BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS settled (community TEXT NOT NULL, start INTEGER NOT NULL, ledger_n INTEGER NOT NULL,
    estimated INTEGER NOT NULL, settled_at REAL NOT NULL, PRIMARY KEY (community, start));
"""


def load_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        return Ed25519PrivateKey.from_private_bytes(path.read_bytes())
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    return key


class Settler:
    def __init__(self, db: sqlite3.Connection, community: str, key: Ed25519PrivateKey, tariff: Tariff,
                 length_s: int = 900, grace_s: int = 120, first_start: int | None = None) -> None:
        self.db = db
        db.executescript(SCHEMA)
        self.community = community
        self.tariff = tariff
        self.length = length_s
        self.grace = grace_s
        self.registry = Registry(db)
        self.ledger = ledger.Ledger(key, community)
        self.ledger.load([bytes(r[0]) for r in db.execute("SELECT raw FROM ledger ORDER BY n")])
        self.first_start = first_start
        self.held: list[list[Any]] = []         # devices the last flows() left out: [member, device, reason]
        self.on_held: Any = None                # called (member, device, reason, start) for each
        self._changes: list[tuple[str, dict]] = []     # tariff and interval entries, in ledger order
        self._seen = 0

    def _rule_changes(self) -> list[tuple[str, dict]]:
        """The `tariff` and `interval` entries (read once each)."""
        entries = self.ledger.entries
        if self._seen > len(entries):                  # reloaded after a rollback
            self._changes, self._seen = [], 0
        for raw in entries[self._seen:]:
            m = cbor2.loads(cbor2.loads(raw).value[2])
            if m["type"] in ("tariff", "interval"):
                self._changes.append((m["type"], m["body"]))
        self._seen = len(entries)
        return self._changes

    def _in_force(self, kind: str, start: int) -> dict | None:
        best = None
        for k, body in self._rule_changes():
            if k == kind and body["from"] <= start and (best is None or body["from"] >= best["from"]):
                best = body
        return best

    def tariff_for(self, start: int) -> Tariff:
        """The tariff in force for an interval: the newest `tariff` entry
        whose `from` is at or before its start, else the configured one."""
        best = self._in_force("tariff", start)
        if best is None:
            return self.tariff
        return Tariff.from_list(best["tariff"])

    def length_for(self, start: int) -> int:
        """The interval length in force from `start` (an `interval` entry,
        changed by vote, else the configured one), in seconds."""
        best = self._in_force("interval", start)
        return self.length if best is None else int(best["minutes"]) * 60

    def set_tariff(self, tariff: Tariff, from_t: int, now: int) -> int:
        """Record a tariff change that takes effect at a later interval
        boundary (never for an interval already settled)."""
        tariff.check()
        if from_t % self.length:
            raise ValueError("a tariff change takes effect at an interval boundary")
        nxt = self._next_start()
        if nxt is not None and from_t < nxt:
            raise ValueError("intervals before that are settled already")
        return self.record("tariff", now, {"from": from_t, "tariff": tariff.as_list()})

    def _next_start(self) -> int | None:
        r = self.db.execute("SELECT MAX(start) FROM settled WHERE community=?", (self.community,)).fetchone()
        if r[0] is not None:
            return int(r[0]) + self.length_for(int(r[0]))
        if self.first_start is not None:
            return self.first_start
        r = self.db.execute("SELECT MIN(t) FROM readings WHERE community=?", (self.community,)).fetchone()
        if r[0] is None:
            return None
        return int(r[0]) // self.length * self.length

    def flows(self, start: int, end: int) -> tuple[list[Flow], bool]:
        """Per member (imp, exp) Wh in [start, end), and whether any of it
        is estimated. A device whose readings cannot be settled (registers
        going backwards, anything that raises) is held: it adds nothing to
        its member's flows, the interval counts as estimated, and `held`
        says which and why ([member, device, reason], logged); everyone
        else is settled as usual."""
        per: dict[int, list[int]] = {}
        estimated = False
        self.held = []
        left = {m: at for m, _, at in self.registry.members(self.community) if at is not None}
        for d in self.registry.devices(self.community):
            if d.member is None or d.grid_index() is None:
                continue
            if d.member in left and left[d.member] <= start:
                continue                        # the member had left by then
            rows = self.db.execute(
                "SELECT t, boot, seq, grid_imp_wh, grid_exp_wh FROM readings WHERE community=? AND device=?"
                " AND t >= ? AND t <= ? ORDER BY t", (self.community, d.id, start - 6 * (end - start),
                                                     end + 6 * (end - start))).fetchall()
            try:
                rs = [Reading(t, b, s, i, e) for t, b, s, i, e in rows if i is not None]
                ivs = intervals(rs, start, end, end - start)
                for iv in ivs:
                    if type(iv.imp_wh) is not int or type(iv.exp_wh) is not int or iv.imp_wh < 0 or iv.exp_wh < 0:
                        raise ValueError(f"negative or non-integer energy {iv.imp_wh}/{iv.exp_wh} Wh")
            except Exception as e:  # noqa: BLE001 - one device's data never stops the community's settlement
                reason = str(e)[:200] or type(e).__name__
                log.warning("interval %d: device %s (member %d) held, not settled: %s", start, d.id, d.member,
                            reason, exc_info=not isinstance(e, ValueError))
                self.held.append([d.member, d.id, reason])
                if self.on_held is not None:
                    self.on_held(d.member, d.id, reason, start)
                estimated = True
                continue
            for iv in ivs:
                acc = per.setdefault(d.member, [0, 0])
                acc[0] += iv.imp_wh
                acc[1] += iv.exp_wh
                estimated = estimated or iv.estimated
        lim = self.registry.limits(self.community)
        return [Flow(m, v[0], v[1], *lim.get(m, (None, None))) for m, v in sorted(per.items())], estimated

    def market_inputs(self, flows: list[Flow], tariff: Tariff) -> tuple[list[Flow], list[Partner]]:
        """The registry's limits and partner rules as the tariff in force
        allows them: a bid above retail counts as retail, an ask below
        feed-in as feed-in, a discount above retail - fee - feed-in as that
        maximum (what is applied is what the ledger records)."""
        out = []
        for f in flows:
            bid = None if f.bid is None else min(f.bid, tariff.retail)
            ask = None if f.ask is None else max(f.ask, tariff.feed_in)
            out.append(Flow(f.member, f.imp, f.exp, bid, ask))
        hi = max_discount(tariff)
        partners = [Partner(s, b, min(d, hi)) for s, b, d in self.registry.partners(self.community)]
        return out, partners

    def _settle(self, start: int, end: int, like: dict | None = None) -> dict:
        """A settlement body for [start, end). With `like` (the figures in
        force, for an adjustment) the price limits and partner rules are the
        ones that interval was settled with, so only the late data changes
        the figures, not a later change in the registry."""
        flows, estimated = self.flows(start, end)
        tariff = self.tariff_for(start)
        flows, partners = self.market_inputs(flows, tariff)
        if like is not None:
            fl = like["flows"]
            if "limits" in like:
                old = dict(zip(fl[0::3], zip(like["limits"][0::2], like["limits"][1::2])))
                flows = [Flow(f.member, f.imp, f.exp, *old[f.member]) if f.member in old else f for f in flows]
            pp = like.get("partners", [])
            partners = [Partner(*pp[k:k + 3]) for k in range(0, len(pp), 3)]
        body = ledger.settlement_body(start, end, flows, tariff, settle(flows, tariff, partners))
        body["estimated"] = estimated
        if self.held:
            # the devices left out of this interval, and why (docs/SETTLEMENT.md)
            body["held"] = self.held
        return body

    def settle_due(self, now: float, limit: int = 1000) -> int:
        """Settle every interval that is due; returns how many."""
        n = 0
        while n < limit:
            start = self._next_start()
            if start is None:
                return n
            length = self.length_for(start)
            if now < start + length + self.grace:
                return n
            body = self._settle(start, start + length)
            self._append(("settlement", int(now), body), (self.community, start, int(body["estimated"]), now))
            n += 1
        return n

    def adjust_due(self, now: float, window_s: int = 2 * 86400) -> int:
        """Readings that arrived after their interval was settled (a board
        back from an outage) become adjustment entries: the interval's
        figures are computed again and, where they changed, the difference
        is recorded. The settled entry itself is never rewritten. Returns
        the number of adjustments written."""
        n = 0
        rows = self.db.execute("SELECT start, ledger_n, settled_at FROM settled WHERE community=? AND start >= ?"
                               " ORDER BY start", (self.community, int(now - window_s))).fetchall()
        for start, ledger_n, settled_at in rows:
            end = start + self.length_for(start)
            late = self.db.execute(
                "SELECT 1 FROM readings WHERE community=? AND t_recv > ? AND t >= ? AND t <= ? LIMIT 1",
                (self.community, settled_at, start - 6 * (end - start), end + 6 * (end - start))).fetchone()
            if late is None:
                continue
            cur = cbor2.loads(cbor2.loads(self.ledger.entries[ledger_n]).value[2])["body"]
            old = cur["new"] if "new" in cur else cur
            new = self._settle(start, end, like=old)
            estimated = new["estimated"]
            if new["flows"] == old["flows"] and new["tariff"] == old["tariff"]:
                self.db.execute("UPDATE settled SET settled_at=? WHERE community=? AND start=?",
                                (now, self.community, start))
                continue
            self._append(("adjustment", int(now), ledger.adjustment_body(old, new, ledger_n)),
                         (self.community, start, int(estimated), now))
            n += 1
        return n

    def record(self, kind: str, t: int, body: dict) -> int:
        """Append a non-settlement entry (member joined or left, tariff
        change) in its own transaction; returns its number."""
        return self._append((kind, t, body))

    def _append(self, entry: tuple, settled: tuple | None = None) -> int:
        """One transaction: the ledger entry (and the genesis before the
        first), and for a settlement the row that marks its interval done.
        An append that does not commit (a full disk: SQLite has rolled back
        by itself) leaves no trace, in the database or here: the next entry
        gets the same number and chains to the same predecessor."""
        before: int | None = None
        try:
            with transaction(self.db):
                # the write lock is held: another process (`peergrid member
                # add` while the gateway runs) may have appended since this
                # one last looked; continue from what the database holds
                on_disk = self.db.execute("SELECT COALESCE(MAX(n) + 1, 0) FROM ledger").fetchone()[0]
                if on_disk != len(self.ledger.entries):
                    self.ledger.load([bytes(r[0]) for r in self.db.execute("SELECT raw FROM ledger ORDER BY n")])
                before = len(self.ledger.entries)
                self.ledger.append(*entry)
                for k in range(before, len(self.ledger.entries)):
                    self.db.execute("INSERT INTO ledger VALUES (?, ?)", (k, self.ledger.entries[k]))
                if settled is not None:
                    c, start, est, at = settled
                    # the interval's row points at the entry now in force
                    self.db.execute("INSERT INTO settled VALUES (?, ?, ?, ?, ?) ON CONFLICT(community, start)"
                                    " DO UPDATE SET ledger_n=excluded.ledger_n, estimated=excluded.estimated,"
                                    " settled_at=excluded.settled_at",
                                    (c, start, len(self.ledger.entries) - 1, est, at))
        except BaseException:
            if before is not None:
                self.ledger.truncate(before)
            self._changes, self._seen = [], 0
            self._resync()
            raise
        return len(self.ledger.entries) - 1

    def _resync(self) -> None:
        """After a failed append: should the database hold another number of
        entries than memory (a COMMIT reported failed that did commit), the
        database is what counts. Unreadable now: memory stays as it is."""
        try:
            n = self.db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]
            if n != len(self.ledger.entries):
                log.warning("ledger: %d entries on disk, %d in memory after a failed append; reloading", n,
                            len(self.ledger.entries))
                self.ledger.load([bytes(r[0]) for r in self.db.execute("SELECT raw FROM ledger ORDER BY n")])
        except sqlite3.Error:
            log.warning("ledger: cannot read the database back after a failed append", exc_info=True)

    def sync(self) -> None:
        """Take up what other processes (the CLI, the member app) appended
        since this settler last looked."""
        on_disk = self.db.execute("SELECT COALESCE(MAX(n) + 1, 0) FROM ledger").fetchone()[0]
        if on_disk != len(self.ledger.entries):
            self.ledger.load([bytes(r[0]) for r in self.db.execute("SELECT raw FROM ledger ORDER BY n")])

    def export(self) -> bytes:
        return b"".join(bytes(r[0]) for r in self.db.execute("SELECT raw FROM ledger ORDER BY n"))


# -- governance (issue 10): the gateway's side of proposals, ballots, tallies, splits ---------

def _entries(st: Settler) -> list[ledger.Entry]:
    out = []
    for n, raw in enumerate(st.ledger.entries):
        m = cbor2.loads(cbor2.loads(raw).value[2])
        out.append(ledger.Entry(n, m["prev"], m["type"], m["t"], m["body"], raw))
    return out


def gov_state(st: Settler) -> "Any":
    from peergrid.market.governance import replay

    return replay(_entries(st), st.community)


def _check_then_append(st: Settler, kind: str, now: int, body: dict) -> int:
    """Append a governance entry only if the ledger's rules allow it (the same
    check `ledger verify` makes); raises GovernanceError with the reason."""
    st.sync()
    s = gov_state(st)
    s.apply(len(st.ledger.entries) or 1, kind, now, body)
    return st.record(kind, now, body)


def propose(st: Settler, signed: dict, now: int) -> int:
    from peergrid.market.governance import GovernanceError

    if signed["from"] % st.length_for(signed["from"]):
        raise GovernanceError("a change takes effect at an interval boundary")
    if signed["change"].get("kind") == "interval" and signed["from"] % 3600:
        raise GovernanceError("a new interval length takes effect at a full hour (a boundary of both lengths)")
    return _check_then_append(st, "proposal", now, signed)


def ballot(st: Settler, signed: dict, now: int) -> int:
    return _check_then_append(st, "ballot", now, signed)


def witness(st: Settler, signed: list[list[Any]], now: int) -> int:
    """Record members' witnesses of the ledger's head ([member, height,
    hash, signature] each, checked as `ledger verify` checks them)."""
    return _check_then_append(st, "witness", now, {"w": signed})


def tally(st: Settler, proposal: int, now: int) -> tuple[int, dict]:
    """Count a proposal whose voting has closed; an accepted change is put
    into force from its boundary (a tariff by a `tariff` entry, feeder limits
    in the registry, an admitted member as a new member)."""
    s = gov_state(st)
    result = s.count(proposal, now)
    n = _check_then_append(st, "tally", now, result)
    if result["accepted"]:
        p = s.proposals[proposal]
        ch = p["change"]
        if ch["kind"] == "tariff":
            st.record("tariff", now, {"from": p["from"], "tariff": ch["tariff"], "by_vote": proposal})
        elif ch["kind"] == "interval":
            st.record("interval", now, {"from": p["from"], "minutes": ch["minutes"], "by_vote": proposal})
        elif ch["kind"] == "feeder":
            st.registry.set_feeder(st.community, ch["import_w"], ch["export_w"])
        elif ch["kind"] == "spend":
            # paid from the fund only if it still holds the amount (else the
            # tally stands, the payout is refused and nothing is paid)
            if gov_state(st).fund >= ch["amount"]:
                _check_then_append(st, "payout", now, {"by_vote": proposal, "amount": ch["amount"],
                                                       "payee": ch["payee"], "purpose": ch["purpose"]})
            else:
                result = {**result, "payout": "refused: the fund holds less than the amount"}
        elif ch["kind"] == "admit":
            mid = st.registry.add_member(st.community, ch["name"], bytes(ch["key"]))
            st.record("member_joined", now, {"member": mid, "name": ch["name"], "key": bytes(ch["key"]),
                                             "from": p["from"], "by_vote": proposal})
    return n, result


def split(st: Settler, members: list[int], new_id: str, new_db: Path, new_key: Ed25519PrivateKey,
          now: int) -> dict:
    """A group of houses breaks away: every interval up to now is settled,
    the old ledger gets a closing `split` entry with each leaving member's
    balance, the members leave the old community from the next boundary and
    their boards are revoked there; a new database holds the new community
    (its members, keys and boards, which need their config re-written for the
    new community id) and a ledger whose genesis points at the closing entry.
    Returns what happened."""
    import hashlib

    from peergrid.market.governance import GovernanceError
    from protocol import topics

    if not topics.valid_id(new_id) or new_id == st.community:
        raise GovernanceError("the new community needs its own id (1-16 of a-z, 0-9, -)")
    if new_db.exists():
        raise GovernanceError(f"{new_db} exists already")
    members = sorted(set(members))
    st.settle_due(now)
    at = st._next_start()
    at = at if at is not None else now - now % st.length
    s = gov_state(st)
    current = s.members() or [m for m, _, left in st.registry.members(st.community) if left is None]
    missing = [m for m in members if m not in current]
    if missing:
        raise GovernanceError(f"not members: {missing}")
    before = sum(s.balances.get(m, 0) for m in set(s.balances) | set(current))
    body = {"at": at, "community": new_id, "members": members,
            "balances": {str(m): s.balances.get(m, 0) for m in members}, "fund": 0}
    for m in members:
        if m not in s.joined:                   # members from before the ledger kept its joins
            st.record("member_joined", now, {"member": m, "name": "", **(
                {"key": st.registry.member_key(st.community, m)} if st.registry.member_key(st.community, m) else {})})
    n = _check_then_append(st, "split", now, body)
    raw = st.ledger.entries[n]
    rows = {m: (name, st.registry.member_key(st.community, m)) for m, name, _ in st.registry.members(st.community)}
    devs = [d for d in st.registry.devices(st.community) if d.member in members and d.revoked is None]
    for m in members:
        st.registry.leave(st.community, m, at)
    for d in devs:
        st.registry.revoke(st.community, d.id)
    # the new community
    from peergrid.community import registry as reg

    db = reg.connect(new_db)
    r2 = reg.Registry(db)
    r2.add_community(new_id)
    for m in members:
        r2.add_member(new_id, rows[m][0], rows[m][1], member_id=m)
    for d in devs:
        r2.db.execute("INSERT INTO devices (community, id, member, secret, board, channels, broker_hash, created)"
                      " VALUES (?, ?, ?, ?, ?, ?, '', ?)", (new_id, d.id, d.member, d.secret, d.board,
                                                           __import__("json").dumps(d.channels), now))
    new = Settler(db, new_id, new_key, st.tariff, st.length, st.grace, first_start=at)
    new.ledger.append("genesis", now, {"community": new_id, "key": ledger.public_bytes(new_key),
                                       "kid": new.ledger.kid,
                                       "parent": {"community": st.community, "entry": n,
                                                  "digest": hashlib.sha256(raw).digest()},
                                       "members": {str(m): rows[m][1] or b"" for m in members}})
    with transaction(db):
        db.execute("INSERT INTO ledger VALUES (?, ?)", (0, new.ledger.entries[0]))
    after = gov_state(st)
    return {"entry": n, "at": at, "balances": body["balances"], "before": before,
            "after_old": sum(after.balances.get(m, 0) for m in after.members()),
            "devices": [d.id for d in devs]}
