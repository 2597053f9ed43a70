"""The installer API: what `peergrid commission` on an electrician's laptop
may ask of the gateway, over the gateway's HTTP server.

Authentication: an installer token, made by the operator with `peergrid
installer-token NAME --days 7` and shown once. Why a token and not an
account on the gateway: the electrician needs exactly three things (register
a house and its board, see the board's first readings, get a report signed)
for a few days; a token does only that, expires by itself, can be revoked
(`--revoke NAME`), and every use is logged under its name. The registry keeps
only its SHA-256. The gateway's HTTP server listens on 127.0.0.1 unless
[gateway] http_host says otherwise; on a LAN put it behind TLS (the token
and the device secret travel in the request).

Requests are authenticated before a byte of their body is read; a body is
at most 256 KiB of strict JSON (peergrid.http.server: no NaN or infinities)
whose fields are checked here (check_register, check_report), each fault a
400 that names it. Requests are handled one at a time.

Endpoints (JSON):
  POST /installer/register   {member, device, board, channels, rotate?}
        -> {community, device, secret (hex), broker_user, broker_password,
            broker_host, broker_port, member, broker_tls, ntp}
        broker_tls, when the gateway has a TLS listener for the boards
        ([broker] tls_port): {port, ca: the community CA certificate as
        base64 of its DER, name: the name the board checks in the broker's
        certificate ([broker] names' first, else the broker_host given
        to installers)}; otherwise null and the board talks plain text.
        creates the member (if new) and the device, writes the broker's
        password and ACL files and reloads the broker; with rotate (resuming
        a commissioning whose secret was not written) it issues new ones.
  GET  /installer/device/<id>  -> what the gateway has seen from the board
  POST /installer/report     a commissioning report -> {id, signature, key}
        the gateway signs the report's canonical JSON with its Ed25519 key
        and keeps it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from peergrid.community import registry as reg
from peergrid.http.server import HttpError, parse_json
from protocol import messages, topics

SCHEMA = """
CREATE TABLE IF NOT EXISTS installer_tokens (name TEXT PRIMARY KEY, hash BLOB NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL, revoked REAL);
CREATE TABLE IF NOT EXISTS commission_reports (id INTEGER PRIMARY KEY, community TEXT NOT NULL, device TEXT NOT NULL,
    t REAL NOT NULL, installer TEXT NOT NULL, report TEXT NOT NULL, signature BLOB NOT NULL);
"""


class ApiError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


MAX_BODY = 256 * 1024           # a commissioning report is a few KB
_REGISTER = {"member", "device", "board", "channels", "rotate", "member_key"}
_ROLES = ("grid", "pv", "battery", "load", "ev", "unused")


def _text(req: dict[str, Any], key: str, most: int) -> str:
    v = req.get(key)
    if not isinstance(v, str) or not 0 < len(v) <= most or not v.isprintable():
        raise ApiError(400, f"{key} is text of 1-{most} printable characters")
    return v


def check_register(req: Any) -> dict[str, Any]:
    """The register request's shape: ApiError(400) naming the first fault."""
    if not isinstance(req, dict):
        raise ApiError(400, "the request is a JSON object")
    for k in ("member", "device", "board", "channels"):
        if k not in req:
            raise ApiError(400, f"{k} missing")
    extra = sorted(set(req) - _REGISTER)
    if extra:
        raise ApiError(400, f"unknown field {extra[0]!r}")
    _text(req, "member", 200)
    if not topics.valid_id(req["device"]):
        raise ApiError(400, "device is an id of 1-16 of a-z, 0-9 and '-', not starting with '-'")
    _text(req, "board", 64)
    ch = req["channels"]
    if not isinstance(ch, list) or not 0 < len(ch) <= messages.MAX_CHANNELS:
        raise ApiError(400, f"channels is a list of 1-{messages.MAX_CHANNELS} channels")
    for i, c in enumerate(ch):
        if not isinstance(c, dict) or set(c) != {"role", "rating_a"}:
            raise ApiError(400, f"channel {i} is an object with exactly role and rating_a")
        if c["role"] not in _ROLES:
            raise ApiError(400, f"channel {i}: role is one of {', '.join(_ROLES)}")
        if not reg.valid_rating(c["rating_a"]):
            raise ApiError(400, f"channel {i}: rating_a is a number of amperes above 0 and at most "
                                f"{reg.MAX_RATING_A}")
    if not isinstance(req.get("rotate", False), bool):
        raise ApiError(400, "rotate is true or false")
    mk = req.get("member_key")
    if mk is not None and (not isinstance(mk, str) or len(mk) != 64
                           or any(x not in "0123456789abcdefABCDEF" for x in mk)):
        raise ApiError(400, "member_key is a 32-byte Ed25519 public key in hex (64 digits)")
    return req


def check_report(req: Any) -> dict[str, Any]:
    if not isinstance(req, dict):
        raise ApiError(400, "a report is a JSON object")
    if not topics.valid_id(req.get("device")):
        raise ApiError(400, "a report names its device (a device id)")
    return req


def make_token(db: sqlite3.Connection, name: str, days: float) -> str:
    db.executescript(SCHEMA)
    if not isinstance(days, (int, float)) or not math.isfinite(days) or days <= 0 or days > 90:
        raise reg.RegistryError("a token lives 0..90 days")
    tok = "pgi_" + secrets.token_urlsafe(24)
    db.execute("INSERT INTO installer_tokens VALUES (?, ?, ?, ?, NULL) ON CONFLICT(name) DO UPDATE SET"
               " hash=excluded.hash, created=excluded.created, expires=excluded.expires, revoked=NULL",
               (name, hashlib.sha256(tok.encode()).digest(), time.time(), time.time() + days * 86400))
    return tok


def revoke_token(db: sqlite3.Connection, name: str) -> None:
    db.executescript(SCHEMA)
    if db.execute("UPDATE installer_tokens SET revoked=? WHERE name=? AND revoked IS NULL",
                  (time.time(), name)).rowcount == 0:
        raise reg.RegistryError(f"no active installer token {name!r}")


def canonical(report: dict[str, Any]) -> bytes:
    return json.dumps(report, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class InstallerApi:
    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.cfg = gw.cfg
        conf = self.cfg.extra.get("installer", {})
        self.broker_host = conf.get("broker_host", self.cfg.broker_host)
        self.broker_port = int(conf.get("broker_port", self.cfg.broker_port))
        self.broker_tls_port = int(conf.get("broker_tls_port", self.cfg.broker_tls_port))
        # the router's NTP server for the boards ([installer] ntp_host): a
        # board checks the broker certificate's dates, so it needs a clock
        # even where the Internet (ntptime's default pool) is out of reach
        self.ntp_host = conf.get("ntp_host") or None
        key = Path(conf.get("key_file", "gateway.key"))
        self.key_path = key if key.is_absolute() else self.cfg.db.parent / key
        self._one = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        db = reg.connect(self.cfg.db)
        db.executescript(SCHEMA)
        return db

    def auth(self, db: sqlite3.Connection, header: str | None) -> str:
        if not header or not header.startswith("Bearer "):
            raise ApiError(401, "installer token missing (Authorization: Bearer ...)")
        h = hashlib.sha256(header[7:].strip().encode("utf-8", "replace")).digest()
        row = db.execute("SELECT name, expires, revoked FROM installer_tokens WHERE hash=?", (h,)).fetchone()
        if row is None:
            raise ApiError(401, "unknown installer token")
        if row[2] is not None:
            raise ApiError(401, f"installer token {row[0]!r} was revoked")
        if not row[1] >= time.time():           # (an expiry that is not a number has expired too)
            raise ApiError(401, f"installer token {row[0]!r} has expired; ask the operator for a new one")
        return str(row[0])

    def authenticate(self, header: str | None) -> str:
        """The token's name, before a byte of the body is read."""
        db = self._db()
        try:
            return self.auth(db, header)
        finally:
            db.close()

    def handle(self, method: str, path: str, who: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """An authenticated request with its body (at most MAX_BODY bytes).
        One at a time: registry writes do not interleave and at most one
        request's parsed JSON is in memory."""
        if not self._one.acquire(timeout=10):
            return 503, {"error": "the gateway is busy with another installer request; try again"}
        db = None
        try:
            req = parse_json(body) if body else None
            db = self._db()
            if method == "POST" and path == "/installer/register":
                return 200, self.register(db, who, check_register(req))
            if method == "GET" and path.startswith("/installer/device/"):
                dev = path[len("/installer/device/"):]
                if not topics.valid_id(dev):
                    raise ApiError(400, "not a device id")
                return 200, self.device(db, dev)
            if method == "POST" and path == "/installer/report":
                return 200, self.report(db, who, check_report(req))
            raise ApiError(404, "no such installer endpoint")
        except (ApiError, HttpError) as e:
            return e.status, {"error": e.msg}
        except reg.RegistryError as e:
            return 409, {"error": str(e)}
        finally:
            if db is not None:
                db.close()
            self._one.release()

    def broker_tls(self) -> dict[str, Any] | None:
        """What a board needs to reach the broker's TLS listener and check
        its certificate, or None when the gateway has no TLS listener."""
        if not self.cfg.broker_tls_port or self.cfg.ca_file is None:
            return None
        from cryptography.hazmat.primitives.serialization import Encoding

        from peergrid.community import pki

        try:
            der = pki.load_cert(self.cfg.ca_file).public_bytes(Encoding.DER)
        except pki.PkiError as e:
            raise ApiError(503, f"the broker's TLS listener has no community CA to give the board ({e}); "
                                "the operator runs `peergrid init`") from None
        name = self.cfg.broker_names[0] if self.cfg.broker_names else self.broker_host
        return {"port": self.broker_tls_port, "ca": base64.b64encode(der).decode(), "name": name}

    def register(self, db: sqlite3.Connection, who: str, req: dict[str, Any]) -> dict[str, Any]:
        c = self.cfg.community
        tls = self.broker_tls()         # before anything is written: a gateway that cannot say it refuses
        r = reg.Registry(db)
        member = None
        for mid, name, left in r.members(c):
            if name == req["member"] and left is None:
                member = mid
        new_member = member is None
        mkey = None
        if req.get("member_key"):
            try:
                mkey = bytes.fromhex(req["member_key"])
            except ValueError:
                raise ApiError(400, "member_key is hex") from None
            if len(mkey) != 32:
                raise ApiError(400, "member_key is a 32-byte Ed25519 public key")
        if new_member:
            member = r.add_member(c, req["member"], mkey)
        d = r.device(c, req["device"])
        if d is not None:
            if not req.get("rotate"):
                raise ApiError(409, f"device {req['device']!r} is registered already; resume the commissioning "
                                    "(it rotates the secret) or choose another id")
            if d.member != member:
                raise ApiError(409, f"device {req['device']!r} belongs to another member")
            secret, password = r.rotate(c, req["device"])
        else:
            secret, password = r.add_device(c, req["device"], req["board"], req["channels"], member)
        # the validator may have cached "unknown" or the old secret for this id
        self.gw.validator.forget(req["device"])
        self.gw.validator.preload([x for x in r.devices(c) if x.id == req["device"]])
        if self.cfg.passwd_file is not None and self.cfg.acl_file is not None:
            from peergrid.community.broker import write_broker_files

            write_broker_files(self.cfg, r)
        import logging

        logging.getLogger("peergrid.commissioning.installer").info("installer %s registered device %s for member %d%s", who,
                                                     req["device"], member, " (new)" if new_member else "")
        st = self.gw._settler() if self.cfg.extra.get("settlement") else None
        if new_member:
            if st is not None:
                st.record("member_joined", int(time.time()), {"member": member, "name": req["member"],
                                                               **({"key": mkey} if mkey else {})})
        elif mkey is not None and r.member_key(c, member) is None:
            r.set_member_key(c, member, mkey)
            if st is not None:
                st.record("member_key", int(time.time()), {"member": member, "key": mkey})
        return {"community": c, "device": req["device"], "member": member, "new_member": new_member,
                "member_has_key": r.member_key(c, member) == mkey if mkey else False, "secret": secret.hex(),
                "broker_user": reg.broker_user(c, req["device"]), "broker_password": password,
                "broker_host": self.broker_host, "broker_port": self.broker_port, "broker_tls": tls,
                "ntp": self.ntp_host}

    def device(self, db: sqlite3.Connection, device: str) -> dict[str, Any]:
        c = self.cfg.community
        if reg.Registry(db).device(c, device) is None:
            raise ApiError(404, f"no device {device!r}")
        n, last = db.execute("SELECT COUNT(*), MAX(t_recv) FROM readings WHERE community=? AND device=?",
                             (c, device)).fetchone()
        out: dict[str, Any] = {"device": device, "readings": n, "last_reading": last}
        if last is not None:
            row = db.execute("SELECT grid_w, vrms_dv, freq_chz, inv, grid_imp_wh, grid_exp_wh, boot, seq, flags"
                             " FROM readings WHERE community=? AND device=? ORDER BY t_recv DESC, seq DESC LIMIT 1",
                             (c, device)).fetchone()
            out.update({"grid_w": row[0], "vrms_dv": row[1], "freq_chz": row[2],
                        "inverter": json.loads(row[3]) if row[3] else None, "grid_imp_wh": row[4],
                        "grid_exp_wh": row[5], "boot": row[6], "seq": row[7], "flags": row[8]})
        rej = db.execute("SELECT what, SUM(n) FROM counters WHERE community=? AND device=? GROUP BY what",
                         (c, device)).fetchall()
        out["rejected"] = {w: k for w, k in rej}
        return out

    def report(self, db: sqlite3.Connection, who: str, report: dict[str, Any]) -> dict[str, Any]:
        from peergrid.market.ledger import public_bytes
        from peergrid.market.settler import load_key

        key = load_key(self.key_path)
        body = canonical(report)
        sig = key.sign(body)
        cur = db.execute("INSERT INTO commission_reports (community, device, t, installer, report, signature)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (self.cfg.community, report["device"], time.time(), who,
                                                         body.decode(), sig))
        return {"id": cur.lastrowid, "signature": sig.hex(), "key": public_bytes(key).hex(), "signed_by": "gateway"}
