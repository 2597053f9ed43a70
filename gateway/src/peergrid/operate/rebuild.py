"""`peergrid rebuild`: a new gateway from a member's mirror of the ledger
(issue 22, part 3), when the gateway and its backups are gone but the
houses still hold the ledger.

    peergrid -c /srv/peergrid/peergrid.toml rebuild MIRROR/ledger.cbor [--key-file ledger.key]

What the ledger gives back, and is written into the new gateway's empty
database after the whole copy verifies (signatures, chain, every settlement
re-run, every vote and witness checked):
  - the ledger itself, entry for entry, so the new gateway continues the
    same chain (its next entry points at the copy's last);
  - which intervals are settled (the next one is settled next);
  - the members, their names, their public keys and who has left;
  - tariffs, interval lengths and voting rules (entries the settler and the
    governance read from the ledger itself), balances and the fund (sums
    over the entries), and the last settled interval's auction limits and
    preferred partners;
  - feeder limits from the last accepted vote on them.

What it cannot give back, and how to replace it:
  - the ledger's signing key: the chain continues only with the same key
    (the operator's backup of ledger.key, peergrid backup). A mirror
    refuses entries signed by another key without an entry that rotates it;
    with the key lost, the community starts a new ledger whose genesis
    names the old one's head, and every member checks it against their
    mirror;
  - the boards' secrets and broker passwords: never in the ledger. Each
    board gets new ones (`peergrid device add` and the electrician's
    `peergrid commission` on its console), each member a new broker account
    (`peergrid member account`);
  - readings, control loads and batteries, installer tokens and firmware
    records: put in again (the readings of settled intervals are not needed,
    their figures are in the ledger).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from peergrid.community import registry as reg
from peergrid.config import Config
from peergrid.market import ledger
from peergrid.market.governance import replay


def rebuild(cfg: Config, mirror: bytes, key_path: Path) -> dict:
    if not key_path.exists():
        raise SystemExit(f"rebuild: {key_path} is missing: the chain continues only with the ledger's own key "
                         "(restore it from the operator's backup)")
    key = ledger.Ed25519PrivateKey.from_private_bytes(key_path.read_bytes())
    try:
        entries = ledger.verify(mirror, ledger.public_bytes(key))
    except ledger.LedgerError as e:
        raise SystemExit(f"rebuild: the mirror does not verify with this ledger key: {e}") from None
    community = entries[0].body.get("community")
    if community != cfg.community:
        raise SystemExit(f"rebuild: the mirror is community {community!r}, the config says {cfg.community!r}")
    db = reg.connect(cfg.db)
    from peergrid.market.settler import SCHEMA

    db.executescript(SCHEMA)
    if db.execute("SELECT COUNT(*) FROM ledger").fetchone()[0]:
        raise SystemExit(f"rebuild: {cfg.db} already holds a ledger; rebuild only into a new database")
    st = replay(entries, community)
    r = reg.Registry(db)
    names: dict[int, str] = {}
    left_at: dict[int, int] = {}
    last_sett = None
    for e in entries:
        if e.type == "member_joined":
            names[e.body["member"]] = e.body.get("name", "")
        elif e.type == "member_left":
            left_at[e.body["member"]] = int(e.body.get("from", e.t))
        elif e.type == "settlement" or e.type == "adjustment":
            last_sett = e.body["new"] if e.type == "adjustment" else e.body
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    try:
        r.add_community(community)
        for m in sorted(st.joined):
            r.add_member(community, names.get(m, f"member {m}"), st.keys.get(m), member_id=m)
            if m in left_at or m in st.left:
                db.execute("UPDATE members SET left_at=? WHERE community=? AND id=?",
                           (left_at.get(m, now), community, m))
        if last_sett is not None:
            fl = last_sett["flows"]
            for m, (bid, ask) in zip(fl[0::3], zip(last_sett.get("limits", [])[0::2], last_sett.get("limits", [])[1::2])):
                if m in st.joined:
                    db.execute("UPDATE members SET bid=?, ask=? WHERE community=? AND id=?", (bid, ask, community, m))
            pp = last_sett.get("partners", [])
            for k in range(0, len(pp), 3):
                db.execute("INSERT OR IGNORE INTO partners VALUES (?, ?, ?, ?, ?)",
                           (community, pp[k], pp[k + 1], pp[k + 2], now + k))
        for p_n, p in sorted(st.proposals.items()):
            tl = st.tallies.get(p_n)
            if tl and tl["accepted"] and p["change"]["kind"] == "feeder":
                r.set_feeder(community, p["change"]["import_w"], p["change"]["export_w"])
        db.executemany("INSERT INTO ledger VALUES (?, ?)", [(e.n, e.raw) for e in entries])
        settled = {}
        for e in entries:
            if e.type in ("settlement", "adjustment"):
                b = e.body["new"] if e.type == "adjustment" else e.body
                settled[b["start"]] = (e.n, int(bool(b.get("estimated"))), e.t)
        db.executemany("INSERT INTO settled VALUES (?, ?, ?, ?, ?)",
                       [(community, s, n, est, t) for s, (n, est, t) in sorted(settled.items())])
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    out = {"entries": len(entries), "head": entries[-1].digest.hex(), "members": len(st.members()),
           "settled": len(settled), "fund": st.fund, "last_interval": max(settled) if settled else None}
    db.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peergrid rebuild", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", "-c", required=True, help="the new gateway's config (its database must be new)")
    ap.add_argument("mirror", help="a member's verified copy: <mirror dir>/ledger.cbor")
    ap.add_argument("--key-file", help="the ledger key from the operator's backup (default: [settlement] key_file)")
    a = ap.parse_args(argv)
    cfg = Config.load(Path(a.config))
    st = cfg.extra.get("settlement") or {}
    key = Path(a.key_file or st.get("key_file", "ledger.key"))
    if not key.is_absolute() and not a.key_file:
        key = cfg.db.parent / key
    out = rebuild(cfg, Path(a.mirror).read_bytes(), key)
    print(f"rebuilt {cfg.db} from the mirror: {out['entries']} entries (head {out['head']}), {out['members']} "
          f"members, {out['settled']} settled intervals, fund {out['fund'] / 100:.2f}")
    print("not in the ledger, to be made again: the boards' secrets (peergrid device add, then peergrid commission "
          "on each board), members' broker accounts (peergrid member account N), loads and batteries "
          "(peergrid resource), installer tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
