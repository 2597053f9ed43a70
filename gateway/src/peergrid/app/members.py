"""The member app's API (issue 21): what a resident's browser asks the
gateway, under /app/api/ (the page itself: peergrid/app/static).

Sign-in with the member's own Ed25519 key, which never leaves the browser:
  POST /app/api/challenge {member}            -> {nonce, community, expires}
  POST /app/api/signin {member, nonce, sig}   -> {token, member, name, expires}
The browser signs the deterministic CBOR of
  ["peergrid sign-in", community, member, nonce]
with WebCrypto; the gateway checks it against the member's key in the
registry (the one the ledger holds), once per nonce, within `challenge_s`.
The token is then sent as `Authorization: Bearer <token>`; it lasts
`session_h` hours and lives only in the gateway's memory (a restart signs
everyone out).

Everything below needs a session; /m/<member>/... answers only for the
session's own member (403 for another house: a member sees its house in
detail and the community only in aggregate):
  GET  /app/api/me                       member, name, community, boards, key
  GET  /app/api/m/<m>/now                the house now; the community in aggregate
  GET  /app/api/m/<m>/series?span=day|month&end=<unix>   per interval (day) or day (month)
  GET  /app/api/m/<m>/statement.csv?from=&to=            the member's own lines
  GET  /app/api/m/<m>/limits             auction limits and preferred partners
  POST /app/api/m/<m>/limits {bid, ask}  (null: the default)
  POST /app/api/m/<m>/partner {buyer, discount}  |  {buyer, remove: true}
  GET  /app/api/ledger/head              height, hash of the newest entry, the gateway's key
  GET  /app/api/ledger/export            the whole ledger (CBOR sequence, as `peergrid ledger export`)
  GET  /app/api/proposals                open and decided proposals, with this member's ballot
  POST /app/api/ballot {proposal, vote, sig}             signed in the browser, checked as the CLI's
  POST /app/api/propose {change, from, deadline, sig}

Bounds: outstanding challenges and sessions are capped (oldest dropped);
failed sign-ins are counted and, beyond `signin_failures_per_min` from one
address, refused with 429 for the rest of the minute; every refusal is a
counted 4xx with a reason, never an exception's text.
"""
from __future__ import annotations

import csv
import io
import json
import re
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from peergrid.app.actions import Actions
from peergrid.app.signin import AppError, SignIn, _int
from peergrid.community import registry as reg

MAX_BODY = 4096
_M_PATH = re.compile(r"^/app/api/m/([0-9]{1,9})/([a-z.]+)$")


class MemberApp(SignIn, Actions):
    def __init__(self, gw: Any, opts: dict[str, Any] | None = None) -> None:
        opts = opts or {}
        self.gw = gw
        self.c = gw.cfg.community
        self.metrics = gw.metrics
        self.challenge_s = float(opts.get("challenge_s", 120))
        self.session_s = float(opts.get("session_h", 12)) * 3600
        self.max_sessions = int(opts.get("max_sessions", 1000))
        self.max_challenges = int(opts.get("max_challenges", 1000))
        self.fail_limit = int(opts.get("signin_failures_per_min", 20))
        self.lock = threading.Lock()
        self.challenges: dict[bytes, tuple[int, float]] = {}
        self.sessions: dict[bytes, tuple[int, float]] = {}
        self.failures: dict[str, tuple[float, int]] = {}
        self.db = reg.connect(gw.cfg.db)
        self.registry = reg.Registry(self.db)
        self.dblock = threading.Lock()
        self._entries: list[Any] = []
        self._settler: Any = None
        # members' witnesses of the head, the newest per member, until the
        # gateway's main loop puts them into the ledger (take_witnesses)
        self.witnesses: dict[int, list[Any]] = {}

    # -- sessions ------------------------------------------------------------------

    def handle(self, method: str, path: str, who: int, body: Any) -> tuple[int, Any, str]:
        """(status, object or text, content type) for a signed-in member."""
        u = urlsplit(path)
        q = {k: v[0] for k, v in parse_qs(u.query, max_num_fields=8).items()}
        p = u.path
        mm = _M_PATH.match(p)
        if mm:
            if int(mm.group(1)) != who:
                self.metrics.inc("app_other_house_refused")
                raise AppError(403, "that is another member's house; you can see your own and the community's"
                                    " totals")
            what = mm.group(2)
            if what == "now" and method == "GET":
                return 200, self.now(who), "json"
            if what == "series" and method == "GET":
                return 200, self.series(who, q.get("span", "day"), q.get("end")), "json"
            if what == "statement.csv" and method == "GET":
                return 200, self.statement_csv(who, q.get("from"), q.get("to")), "text/csv"
            if what == "limits":
                if method == "POST":
                    self.set_limits(who, body)
                return 200, self.limits(who), "json"
            if what == "partner" and method == "POST":
                self.partner(who, body)
                return 200, self.limits(who), "json"
            raise AppError(404, "not found")
        if p == "/app/api/me" and method == "GET":
            return 200, self.me(who), "json"
        if p == "/app/api/ledger/head" and method == "GET":
            return 200, self.head(), "json"
        if p == "/app/api/ledger/export" and method == "GET":
            return 200, self.export(), "application/cbor-seq"
        if p == "/app/api/ledger/since" and method == "GET":
            return 200, self.since(q.get("n", "0"), q.get("max", "1000")), "application/cbor-seq"
        if p == "/app/api/witness" and method == "POST":
            return 200, self.witness(who, body), "json"
        if p == "/app/api/proposals" and method == "GET":
            return 200, self.proposals(who), "json"
        if p == "/app/api/ballot" and method == "POST":
            return 200, self.ballot(who, body), "json"
        if p == "/app/api/propose" and method == "POST":
            return 200, self.propose(who, body), "json"
        raise AppError(404, "not found")

    # -- the house and the community -----------------------------------------------------

    def me(self, who: int) -> dict[str, Any]:
        with self.dblock:
            name, key = self.db.execute("SELECT name, pubkey FROM members WHERE community=? AND id=?",
                                        (self.c, who)).fetchone()
            devs = [d.id for d in self.registry.devices(self.c) if d.member == who and d.revoked is None]
        return {"member": who, "name": name, "community": self.c, "boards": devs,
                "key": bytes(key).hex() if key else None, "currency": self._currency()}

    def _currency(self) -> str:
        return str((self.gw.cfg.extra.get("app") or {}).get("currency", "EUR"))[:8]

    def _latest(self, devices: list[Any]) -> list[dict[str, Any]]:
        out = []
        for d in devices:
            row = self.db.execute("SELECT t, ch, inv, bat, flags FROM readings WHERE community=? AND device=?"
                                  " ORDER BY t DESC LIMIT 1", (self.c, d.id)).fetchone()
            if row is None:
                out.append({"board": d.id, "t": None})
                continue
            ch = json.loads(row[1])
            roles = [c.get("role") for c in d.channels]
            x: dict[str, Any] = {"board": d.id, "t": row[0], "grid_w": None, "import_wh": None, "export_wh": None}
            for i, c in enumerate(ch):
                role = roles[i] if i < len(roles) else None
                if role == "grid":
                    x.update(grid_w=c[0], import_wh=c[1], export_wh=c[2])
                elif role == "pv":
                    x["pv_w"] = max(0, -c[0]) + x.get("pv_w", 0)
            if row[2]:
                inv = json.loads(row[2])
                if inv and inv[1] is not None:
                    x["pv_w"] = max(0, inv[1])
            if row[3]:
                bat = json.loads(row[3])
                if bat:
                    x["battery_w"], x["battery_soc"] = bat[1], (bat[2] / 10 if bat[2] is not None else None)
            out.append(x)
        return out

    def now(self, who: int) -> dict[str, Any]:
        pres = self.gw.presence_safe()
        with self.dblock:
            devs = [d for d in self.registry.devices(self.c) if d.revoked is None]
            mine = [d for d in devs if d.member == who]
            house = self._latest(mine)
            for h in house:
                h["online"] = bool(pres.get(h["board"], {}).get("online"))
            ids = [d.id for d in mine]
            decisions = []
            if ids and reg_table(self.db, "decisions"):
                qs = ",".join("?" * len(ids))
                decisions = [{"t": r[0], "load": r[1], "board": r[2], "on": bool(r[3]), "why": r[4]}
                             for r in self.db.execute(
                                 f"SELECT t, id, device, value, reason FROM decisions WHERE community=? AND device IN"
                                 f" ({qs}) ORDER BY t DESC LIMIT 10", (self.c, *ids))]
            everyone = self._latest(devs)
        grid = sum(x.get("grid_w") or 0 for x in everyone)
        pv = sum(x.get("pv_w") or 0 for x in everyone)
        bat = sum(x.get("battery_w") or 0 for x in everyone)
        ha = self.gw.ha
        share = ha.community.get("local_share") if ha is not None else self._local_share()
        return {"t": int(self.gw.clock()), "house": house, "decisions": decisions,
                "community": {"houses": len({d.member for d in devs}), "boards": len(devs),
                              "online": sum(1 for d in devs if pres.get(d.id, {}).get("online")),
                              "grid_w": grid, "pv_w": pv, "load_w": grid + pv - bat, "local_share": share}}

    def _local_share(self) -> float | None:
        from peergrid.market.ledger import rerun

        for e in reversed(self.entries()):
            if e.type == "settlement":
                demand = sum(e.body["flows"][1::3])
                return round(100 * rerun(e.body)[2].local / demand, 1) if demand else None
        return None

    # -- the ledger ----------------------------------------------------------------------

    def entries(self) -> list[Any]:
        """The ledger's entries, decoded once each (the gateway's own database)."""
        from peergrid.market.ledger import Entry, decode_entry

        with self.dblock:
            if not reg_table(self.db, "ledger"):
                return []
            have = len(self._entries)
            rows = list(self.db.execute("SELECT n, raw FROM ledger WHERE n >= ? ORDER BY n", (have,)))
            if have and not self.db.execute("SELECT 1 FROM ledger WHERE n=?", (have - 1,)).fetchone():
                self._entries, rows = [], list(self.db.execute("SELECT n, raw FROM ledger ORDER BY n"))
            for n, raw in rows:
                m = decode_entry(bytes(raw))
                self._entries.append(Entry(n, m["prev"], m["type"], m["t"], m["body"], bytes(raw)))
            return list(self._entries)

    def head(self) -> dict[str, Any]:
        es = self.entries()
        if not es:
            return {"height": 0, "hash": None, "key": None}
        g = es[0].body
        return {"height": len(es), "n": es[-1].n, "hash": es[-1].digest.hex(), "key": bytes(g.get("key", b"")).hex(),
                "community": self.c, "verify": "peergrid ledger verify <file> (docs/SETTLEMENT.md)"}

    def export(self) -> bytes:
        return b"".join(e.raw for e in self.entries())

    def since(self, n: str, most: str) -> bytes:
        """Entries from number n on (at most `most`, and 4 MB): how a mirror
        catches up (peergrid.app.mirror)."""
        if not n.isdigit() or not most.isdigit() or len(n) > 12:
            raise AppError(400, "n and max are entry counts")
        es = self.entries()[int(n):int(n) + max(1, min(int(most), 5000))]
        out, size = [], 0
        for e in es:
            size += len(e.raw)
            if out and size > 4 << 20:
                break
            out.append(e.raw)
        return b"".join(out)

    def series(self, who: int, span: str, end: str | None) -> dict[str, Any]:
        from peergrid.market.statements import Community, _add

        if span not in ("day", "month"):
            raise AppError(400, "span is day or month")
        t_end = _int(int(end) if end and end.isdigit() else int(self.gw.clock()), "end", 0, 2 ** 40)
        length = 86400 if span == "day" else 31 * 86400
        start = t_end - length
        buckets: dict[int, Any] = {}
        for e in self.entries():
            if e.type not in ("settlement", "adjustment"):
                continue
            b = e.body["new"] if e.type == "adjustment" else e.body
            if not (start <= b["start"] and b["end"] <= t_end):
                continue
            key = b["start"] if span == "day" else b["start"] - b["start"] % 86400
            c = buckets.setdefault(key, Community(key, key))
            if e.type == "adjustment":
                _add(c, e.body["old"], -1, start, t_end)
                _add(c, e.body["new"], 1, start, t_end, count=False)
            else:
                _add(c, b, 1, start, t_end)
            pr = b.get("price")
            if pr:
                c.price = (pr[0] / pr[1], pr[2] / pr[3])
        rows = []
        for k in sorted(buckets):
            c = buckets[k]
            s = c.members.get(who)
            p = getattr(c, "price", (None, None))
            if s is None:
                continue
            rows.append({"start": k, "bought_local_wh": round(float(s.bought_local_wh), 1),
                         "bought_grid_wh": round(float(s.bought_grid_wh), 1),
                         "sold_local_wh": round(float(s.sold_local_wh), 1),
                         "sold_grid_wh": round(float(s.sold_grid_wh), 1),
                         "paid": s.paid, "grid_only": s.grid_only, "feed_in_only": s.feed_in_only,
                         "saving": s.saving,
                         "p_buy": round(p[0], 3) if p[0] is not None else None,
                         "p_sell": round(p[1], 3) if p[1] is not None else None})
        tot = {k: sum(r[k] for r in rows) for k in ("paid", "grid_only", "feed_in_only", "saving")}
        tot.update({k: round(sum(r[k] for r in rows), 1) for k in ("bought_local_wh", "bought_grid_wh",
                                                                    "sold_local_wh", "sold_grid_wh")})
        return {"span": span, "start": start, "end": t_end, "rows": rows, "total": tot,
                "money": "minor units", "currency": self._currency()}

    def statement_csv(self, who: int, t_from: str | None, t_to: str | None) -> str:
        now = int(self.gw.clock())
        a = int(t_from) if t_from and t_from.isdigit() else now - 31 * 86400
        b = int(t_to) if t_to and t_to.isdigit() else now
        if b - a > 400 * 86400 or b <= a:
            raise AppError(400, "a statement covers at most 400 days, from before to")
        span = self.series_range(who, a, b)
        f = io.StringIO()
        w = csv.writer(f)
        w.writerow(["member", "interval_start_utc", "bought_local_kwh", "bought_grid_kwh", "sold_local_kwh",
                    "sold_grid_kwh", "paid", "grid_only", "feed_in_only", "saving"])
        for r in span:
            w.writerow([who, time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["start"])),
                        f"{r['bought_local_wh'] / 1000:.3f}", f"{r['bought_grid_wh'] / 1000:.3f}",
                        f"{r['sold_local_wh'] / 1000:.3f}", f"{r['sold_grid_wh'] / 1000:.3f}",
                        _money(r["paid"]), _money(r["grid_only"]), _money(r["feed_in_only"]), _money(r["saving"])])
        return f.getvalue()

    def series_range(self, who: int, a: int, b: int) -> list[dict[str, Any]]:
        from peergrid.market.statements import statements

        out = []
        for e in self.entries():
            if e.type != "settlement" or not (a <= e.body["start"] and e.body["end"] <= b):
                continue
            c = statements([e] + [x for x in self._adjusting(e)], e.body["start"], e.body["end"])
            s = c.members.get(who)
            if s is not None:
                out.append({"start": e.body["start"], "bought_local_wh": float(s.bought_local_wh),
                            "bought_grid_wh": float(s.bought_grid_wh), "sold_local_wh": float(s.sold_local_wh),
                            "sold_grid_wh": float(s.sold_grid_wh), "paid": s.paid, "grid_only": s.grid_only,
                            "feed_in_only": s.feed_in_only, "saving": s.saving})
        return out

    def _adjusting(self, e: Any) -> list[Any]:
        return [x for x in self._entries if x.type == "adjustment" and x.body.get("replaces") == e.n]

    # -- votes ---------------------------------------------------------------------------


def _money(v: int) -> str:
    sign = "-" if v < 0 else ""
    return f"{sign}{abs(v) // 100}.{abs(v) % 100:02d}"


def reg_table(db: Any, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None
