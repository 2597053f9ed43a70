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
import hashlib
import io
import json
import re
import secrets
import threading
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import cbor2

from peergrid.community import registry as reg

MAX_BODY = 4096
_M_PATH = re.compile(r"^/app/api/m/([0-9]{1,9})/([a-z.]+)$")


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


def _describe(change: dict[str, Any]) -> str:
    """A proposal's effect in words, for the page."""
    k = change.get("kind")
    if k == "tariff":
        t = change["tariff"]
        return (f"tariff: retail {t[0]}, feed-in {t[1]} per kWh (minor units), fund margin {t[2] / 10000:g} %, "
                f"mechanism {t[3]}, grid fee {t[4]}, fund share of export {t[5] / 10000:g} %")
    if k == "rules":
        return (f"voting rules: quorum {change['quorum_ppm'] / 10000:g} %, majority {change['majority_ppm'] / 10000:g} %,"
                f" at least {change.get('vote_s', 0)} s to vote")
    if k == "feeder":
        return f"feeder limits: import {change['import_w']} W, export {change['export_w']} W"
    if k == "interval":
        return f"settlement interval: {change['minutes']} minutes"
    if k == "admit":
        return f"admit {change['name']!r} as a member (key {bytes(change['key']).hex()[:16]}...)"
    return str(k)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class MemberApp:
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

    # -- sessions ------------------------------------------------------------------

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
                         "paid": s.paid, "grid_only": s.grid_only, "saving": s.saving,
                         "p_buy": round(p[0], 3) if p[0] is not None else None,
                         "p_sell": round(p[1], 3) if p[1] is not None else None})
        tot = {k: sum(r[k] for r in rows) for k in ("paid", "grid_only", "saving")}
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
                    "sold_grid_kwh", "paid", "grid_only", "saving"])
        for r in span:
            w.writerow([who, time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["start"])),
                        f"{r['bought_local_wh'] / 1000:.3f}", f"{r['bought_grid_wh'] / 1000:.3f}",
                        f"{r['sold_local_wh'] / 1000:.3f}", f"{r['sold_grid_wh'] / 1000:.3f}",
                        _money(r["paid"]), _money(r["grid_only"]), _money(r["saving"])])
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
                            "saving": s.saving})
        return out

    def _adjusting(self, e: Any) -> list[Any]:
        return [x for x in self._entries if x.type == "adjustment" and x.body.get("replaces") == e.n]

    # -- votes ---------------------------------------------------------------------------

    def _st(self, fresh: bool = False) -> Any:
        """A settler on the app's own connection. Governance entries are
        checked against the ledger as the database holds it now (the
        gateway's settler appends meanwhile), so those get a fresh one, as
        the CLI does."""
        if self._settler is None or fresh:
            st = self.gw._settler()
            if st is None:
                raise AppError(409, "this gateway keeps no ledger ([settlement] is not configured)")
            if fresh:
                return st
            self._settler = st
        return self._settler

    def proposals(self, who: int) -> dict[str, Any]:
        from peergrid.market.governance import replay

        st = replay(self.entries(), self.c)
        now = int(self.gw.clock())
        out = []
        for n, p in sorted(st.proposals.items(), reverse=True):
            votes = st.ballots.get(n, {})
            out.append({"id": n, "by": p["by"], "change": _jsonable(p["change"]), "text": _describe(p["change"]),
                        "from": p["from"], "deadline": p["deadline"], "open": now <= p["deadline"] and n not in
                        st.tallies, "eligible": who in p["eligible"], "my_vote": votes.get(who),
                        "votes": len(votes), "of": len(p["eligible"]), "tally": st.tallies.get(n)})
        return {"community": self.c, "proposals": out[:100], "rules": st.rules, "now": now,
                "fund": st.fund, "members": st.members()}

    def ballot(self, who: int, body: Any) -> dict[str, Any]:
        from peergrid.market import governance as gv
        from peergrid.market import settler as stl

        if not isinstance(body, dict):
            raise AppError(400, "a ballot is a JSON object")
        if body.get("member", who) != who:
            self.metrics.inc("app_ballot_refused")
            raise AppError(403, "a ballot is cast only by the member signed in")
        signed = {"proposal": _int(body.get("proposal"), "proposal"), "member": who,
                  "vote": body.get("vote"), "sig": _hex(body.get("sig"), "sig", 64)}
        if signed["vote"] not in ("yes", "no"):
            raise AppError(400, "a vote is yes or no")
        try:
            with self.dblock:
                st = self._st(fresh=True)
                try:
                    n = stl.ballot(st, signed, int(self.gw.clock()))
                finally:
                    st.db.close()
        except gv.GovernanceError as e:
            self.metrics.inc("app_ballot_refused")
            raise AppError(422, str(e)) from None
        self.metrics.inc("app_ballots")
        return {"entry": n, "proposal": signed["proposal"], "vote": signed["vote"]}

    def propose(self, who: int, body: Any) -> dict[str, Any]:
        from peergrid.market import governance as gv
        from peergrid.market import settler as stl

        if not isinstance(body, dict) or not isinstance(body.get("change"), dict):
            raise AppError(400, "a proposal is {change, from, deadline, sig}")
        change = dict(body["change"])
        if change.get("kind") == "admit":
            change["key"] = _hex(change.get("key"), "key", 32)
        signed = {"by": who, "change": change, "from": _int(body.get("from"), "from", 0, 2 ** 40),
                  "deadline": _int(body.get("deadline"), "deadline", 0, 2 ** 40), "sig": _hex(body.get("sig"), "sig", 64)}
        try:
            gv.check_change(change)
            with self.dblock:
                st = self._st(fresh=True)
                try:
                    n = stl.propose(st, signed, int(self.gw.clock()))
                finally:
                    st.db.close()
        except gv.GovernanceError as e:
            self.metrics.inc("app_proposal_refused")
            raise AppError(422, str(e)) from None
        return {"proposal": n}

    # -- limits and partners ---------------------------------------------------------------

    def limits(self, who: int) -> dict[str, Any]:
        with self.dblock:
            bid, ask = self.registry.limits(self.c).get(who, (None, None))
            partners = [{"buyer": b, "discount": d} for s, b, d in self.registry.partners(self.c) if s == who]
            members = [{"member": m, "name": n} for m, n, left in self.registry.members(self.c)
                       if left is None and m != who]
        t = self._tariff()
        return {"bid": bid, "ask": ask, "partners": partners, "members": members,
                "tariff": {"retail": t.retail, "feed_in": t.feed_in, "grid_fee": t.grid_fee,
                           "mechanism": t.mechanism} if t else None,
                "max_discount": (t.retail - t.grid_fee - t.feed_in) if t else None}

    def _tariff(self) -> Any:
        try:
            st = self._st()
        except AppError:
            return None
        return st.tariff_for(int(self.gw.clock()))

    def set_limits(self, who: int, body: Any) -> None:
        if not isinstance(body, dict):
            raise AppError(400, "limits are {bid, ask}")
        t = self._tariff()
        vals = []
        for k in ("bid", "ask"):
            v = body.get(k)
            if v is not None:
                # within the community's rules: whole minor units, from 0 to ten times retail
                v = _int(v, k, 0, 10 * t.retail if t else 10 ** 6)
            vals.append(v)
        try:
            with self.dblock:
                self.registry.set_limits(self.c, who, vals[0], vals[1])
        except reg.RegistryError as e:
            raise AppError(422, str(e)) from None
        self.metrics.inc("app_limits_set")

    def partner(self, who: int, body: Any) -> None:
        if not isinstance(body, dict):
            raise AppError(400, "a partner is {buyer, discount} or {buyer, remove: true}")
        buyer = _int(body.get("buyer"), "buyer", 1, 2 ** 31)
        try:
            with self.dblock:
                if body.get("remove") is True:
                    self.registry.remove_partner(self.c, who, buyer)
                    return
                t = self._tariff()
                hi = (t.retail - t.grid_fee - t.feed_in) if t else 10 ** 6
                self.registry.add_partner(self.c, who, buyer, _int(body.get("discount"), "discount", 0, max(0, hi)))
        except reg.RegistryError as e:
            raise AppError(422, str(e)) from None


def _money(v: int) -> str:
    sign = "-" if v < 0 else ""
    return f"{sign}{abs(v) // 100}.{abs(v) % 100:02d}"


def reg_table(db: Any, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None
