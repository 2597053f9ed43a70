"""`peergrid fleet ...`: the operator's side of firmware updates (docs/OTA.md 4).

These commands only read and write the database and the release store;
the running gateway (peergrid.fleet.service) picks up a new rollout or a
halt within a second. Every listing has `--json` (one JSON document).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from peergrid.community import registry as reg
from peergrid.config import Config
from peergrid.fleet.records import OTA_NAMES, Records
from peergrid.fleet.release import ReleaseError, ReleaseStore


def add_parser(sub: Any) -> None:
    """The `fleet` sub-command and its own sub-commands."""
    f = sub.add_parser("fleet", help="firmware updates: releases, every board's release, updates and rollouts")
    f.add_argument("--json", action="store_true", help="one JSON document")
    fs = f.add_subparsers(dest="fcmd")

    def js(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="one JSON document")

    a = fs.add_parser("add", help="check a release directory (make release) and copy it into the store")
    a.add_argument("dir")
    js(fs.add_parser("releases", help="the releases in the store"))
    u = fs.add_parser("update", help="update one board to a release")
    u.add_argument("device")
    u.add_argument("seq", type=int)
    r = fs.add_parser("rollout", help="a release to every board of a type: N first, then the rest")
    r.add_argument("seq", type=int)
    r.add_argument("--board", required=True, help="the board type (its board definition's name)")
    r.add_argument("--first", type=int, default=2, help="boards in the first wave (default 2)")
    r.add_argument("--max-fail", type=int, default=1, help="failures that halt the rollout (default 1)")
    h = fs.add_parser("halt", help="halt a rollout (default: every one under way)")
    h.add_argument("id", type=int, nargs="?")
    hi = fs.add_parser("history", help="firmware events: sent, fetching, installed, confirmed, refused, rolled back")
    hi.add_argument("device", nargs="?")
    hi.add_argument("--last", type=int, default=1000)
    js(hi)
    js(fs.add_parser("rollouts", help="rollouts and where each board stands"))


def _out(obj: Any) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def fleet(args: argparse.Namespace, cfg: Config) -> int:
    store = ReleaseStore(cfg.releases)
    if args.fcmd == "add":
        if not cfg.release_keys:
            print("warning: [fleet] release_keys is not set: the release's signature is NOT checked here "
                  "(the boards still check it against the keys they trust)", file=sys.stderr)
        try:
            m, added = store.add(args.dir, cfg.release_keys)
        except ReleaseError as e:
            print(f"refused: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"refused: {e}", file=sys.stderr)
            return 1
        s = m.summary()
        print(f"release {m.seq} for {m.board} (version {m.version}, {s['files']} files, {s['bytes']} bytes, "
              f"digest {s['digest'][:16]}) " + ("added to" if added else "already in") + f" {store.dir(m.board, m.seq)}"
              + ("; signature verified" if cfg.release_keys else ""))
        return 0
    if args.fcmd == "releases":
        rows = [m.summary() for m in store.list()]
        if args.json:
            _out(rows)
        else:
            for x in rows:
                print(f"{x['board']:<16} {x['seq']:>6}  {x['version']:<16} {x['digest'][:16]}  {x['files']:>3} files "
                      f"{x['bytes']:>8} B  created {_when(x['created'])}")
            print(f"{len(rows)} release(s) in {store.root}")
        return 0
    db = reg.connect(cfg.db)
    rec = Records(db, cfg.community)
    r = reg.Registry(db)
    if args.fcmd in ("update", "rollout"):
        if args.fcmd == "update":
            d = r.device(cfg.community, args.device)
            if d is None or d.revoked is not None:
                print(f"refused: no active device {args.device}", file=sys.stderr)
                return 1
            v = rec.views().get(args.device)
            board = v.board if v is not None and v.board else d.board
            seq, first, k, device = args.seq, 1, 1, args.device
        else:
            board, seq, first, k, device = args.board, args.seq, args.first, args.max_fail, None
            if first < 1 or k < 1:
                print("refused: --first and --max-fail must be at least 1", file=sys.stderr)
                return 1
        if store.manifest(board, seq) is None:
            print(f"refused: the store has no release {seq} for board {board} (peergrid fleet add it first)",
                  file=sys.stderr)
            return 1
        try:
            rid = rec.add_rollout(board, seq, first, k, device)
        except ValueError as e:
            print(f"refused: {e}", file=sys.stderr)
            return 1
        what = f"{device}" if device else f"every {board} board ({first} first, halted after {k} failure(s))"
        print(f"rollout {rid}: release {seq} to {what}; the running gateway starts it within a second")
        return 0
    if args.fcmd == "halt":
        ids = rec.halt(args.id, "halted by hand")
        if not ids:
            print("no rollout under way" + (f" with id {args.id}" if args.id is not None else ""), file=sys.stderr)
            return 1
        print(f"halted: rollout {', '.join(map(str, ids))}; no further board is sent the release")
        return 0
    if args.fcmd == "history":
        rows = rec.history(args.device, args.last)
        if args.json:
            _out(rows)
        else:
            for ev in rows:
                print(f"{_when(ev['t'])}  {ev['device']:<16} boot {ev['boot'] if ev['boot'] is not None else '-':>5}  "
                      f"{ev['event']:<14} rel {ev['rel'] if ev['rel'] is not None else '-':>5} "
                      f"{(ev['digest'] or '-')[:16]:<16}  {ev['detail']}")
        return 0
    if args.fcmd == "rollouts":
        rows = rec.rollouts()
        for x in rows:
            x["boards"] = rec.boards(x["id"])
        if args.json:
            _out(rows)
        else:
            for x in rows:
                print(f"rollout {x['id']}: release {x['seq']} to {x['device'] or x['board']}: {x['state']}"
                      + (f" ({x['reason']})" if x["reason"] else ""))
                for b in x["boards"]:
                    print(f"   wave {b['wave']} {b['device']:<16} {b['state']:<8} tries {b['tries']}  {b['detail']}")
        return 0
    return _list(args, cfg, rec, r, store)


def _list(args: argparse.Namespace, cfg: Config, rec: Records, r: reg.Registry, store: ReleaseStore) -> int:
    views = rec.views()
    seen = {d: t for d, t in rec.db.execute("SELECT device, last_seen FROM presence WHERE community=?",
                                            (cfg.community,))} if _has(rec, "presence") else {}
    pending: dict[str, str] = {}
    for ro in rec.rollouts(active_only=True):
        for b in rec.boards(ro["id"]):
            pending[b["device"]] = f"rollout {ro['id']} ({ro['seq']}): {b['state']}"
    rows = []
    for d in r.devices(cfg.community):
        v = views.get(d.id)
        row: dict[str, Any] = {"device": d.id, "board": (v.board if v and v.board else d.board),
                               "revoked": d.revoked is not None, "last_seen": seen.get(d.id),
                               "rollout": pending.get(d.id)}
        for k in ("rel", "rel_dig", "ota", "ota_rel", "ota_why", "ota_got", "fw", "boot", "last_status"):
            row[k] = getattr(v, k) if v is not None else None
        row["ota_state"] = OTA_NAMES.get(row["ota"]) if row["ota"] is not None else None
        m = store.manifest(row["board"], row["rel"]) if row["rel"] else None
        row["digest"] = m.digest.hex() if m is not None else row["rel_dig"]
        rows.append(row)
    if args.json:
        _out(rows)
        return 0
    for x in rows:
        upd = x["ota_state"] or "-"
        if x["ota"] in (1, 4, 5) and x["ota_rel"]:
            upd += f" {x['ota_rel']}"
        if x["ota"] == 1:
            upd += f" ({x['ota_got'] or 0} B)"
        if x["ota_why"] and x["ota"] in (4, 5):
            upd += f" ({x['ota_why']})"
        print(f"{x['device']:<16} {x['board'] or '?':<14} rel {x['rel'] if x['rel'] else '-':>5} "
              f"{(x['digest'] or '-')[:16]:<16} {upd:<24} seen {_when(x['last_seen'])}"
              + (f"  [{x['rollout']}]" if x["rollout"] else "") + ("  REVOKED" if x["revoked"] else ""))
    return 0


def _has(rec: Records, table: str) -> bool:
    return rec.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None
