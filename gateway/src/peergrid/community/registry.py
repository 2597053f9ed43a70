"""The registry: communities, members (houses) and devices (boards) in SQLite,
and the broker's password and ACL files made from it.

Each device has its own 32-byte secret (the root of its MAC keys, PROTOCOL.md
section 5) and its own broker account. The broker password is shown once,
when the device is added or rotated; the registry keeps only mosquitto's
PBKDF2-SHA512 hash of it (the `$7$` format of mosquitto_passwd), so the
password file can be rewritten at any time without knowing the passwords.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peergrid import schema
from peergrid.community import hatopics
from protocol import gateway_end, topics

SCHEMA = """
CREATE TABLE IF NOT EXISTS communities (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (
    id INTEGER PRIMARY KEY, community TEXT NOT NULL REFERENCES communities(id),
    name TEXT NOT NULL, created REAL NOT NULL, left_at REAL);
CREATE TABLE IF NOT EXISTS devices (
    community TEXT NOT NULL REFERENCES communities(id), id TEXT NOT NULL,
    member INTEGER REFERENCES members(id), secret BLOB NOT NULL, board TEXT NOT NULL,
    channels TEXT NOT NULL, broker_hash TEXT NOT NULL, fw TEXT, generation INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL, revoked REAL, PRIMARY KEY (community, id));
CREATE TABLE IF NOT EXISTS partners (
    community TEXT NOT NULL REFERENCES communities(id), seller INTEGER NOT NULL REFERENCES members(id),
    buyer INTEGER NOT NULL REFERENCES members(id), discount INTEGER NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (community, seller, buyer));
CREATE TABLE IF NOT EXISTS loads (
    community TEXT NOT NULL REFERENCES communities(id), id TEXT NOT NULL, device TEXT NOT NULL,
    relay INTEGER NOT NULL, rated_w INTEGER NOT NULL, priority INTEGER NOT NULL, min_on_s INTEGER NOT NULL,
    min_off_s INTEGER NOT NULL, need_wh INTEGER NOT NULL, deadline_s INTEGER, available_s INTEGER,
    max_switches_day INTEGER NOT NULL, PRIMARY KEY (community, id), UNIQUE (community, device, relay));
CREATE TABLE IF NOT EXISTS batteries (
    community TEXT NOT NULL REFERENCES communities(id), id TEXT NOT NULL, device TEXT NOT NULL,
    target INTEGER NOT NULL, capacity_wh INTEGER NOT NULL, max_charge_w INTEGER NOT NULL,
    max_discharge_w INTEGER NOT NULL, soc_min REAL NOT NULL, soc_max REAL NOT NULL, efficiency REAL NOT NULL,
    PRIMARY KEY (community, id), UNIQUE (community, device, target));
CREATE TABLE IF NOT EXISTS feeders (
    community TEXT PRIMARY KEY REFERENCES communities(id), import_w INTEGER NOT NULL, export_w INTEGER NOT NULL);
"""
# columns added after the first release, with what older databases get
MIGRATIONS = (("members", "bid", "INTEGER"), ("members", "ask", "INTEGER"), ("members", "pubkey", "BLOB"),
              ("devices", "version", "INTEGER NOT NULL DEFAULT 0"), ("members", "broker_hash", "TEXT"))
# The registry's change counter (issue 17): whatever writes the devices table
# (the CLI, the installer API, a split, another tool), a trigger in the same
# transaction counts the change and marks the device with the new count, so a
# running gateway finds what changed with two indexed reads
# (Registry.changes), polled a few times a second. A firmware version
# reported by a board (fw) is not a change of identity and is not counted.
WATCH = """
CREATE TABLE IF NOT EXISTS registry_version (id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL);
INSERT OR IGNORE INTO registry_version VALUES (0, 0);
CREATE INDEX IF NOT EXISTS devices_version ON devices (version);
CREATE TRIGGER IF NOT EXISTS devices_added AFTER INSERT ON devices BEGIN
    UPDATE registry_version SET n = n + 1 WHERE id = 0;
    UPDATE devices SET version = (SELECT n FROM registry_version WHERE id = 0) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER IF NOT EXISTS devices_changed
AFTER UPDATE OF secret, revoked, channels, member, board, generation ON devices BEGIN
    UPDATE registry_version SET n = n + 1 WHERE id = 0;
    UPDATE devices SET version = (SELECT n FROM registry_version WHERE id = 0) WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER IF NOT EXISTS devices_removed AFTER DELETE ON devices BEGIN
    UPDATE registry_version SET n = n + 1 WHERE id = 0;
END;
"""


class RegistryError(ValueError):
    pass


MAX_RATING_A = 10000          # a CT's rating in A; beyond is a typo (and would switch the power check off)


def finite(v: Any) -> bool:
    """A real number (int or float, not bool) that is neither NaN nor infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def valid_rating(v: Any) -> bool:
    return finite(v) and 0 < v <= MAX_RATING_A


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """A password hash in mosquitto's own format ($7$: PBKDF2-SHA512)."""
    salt = salt or os.urandom(12)
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


@dataclass
class Device:
    community: str
    id: str
    member: int | None
    secret: bytes
    board: str
    channels: list[dict[str, Any]]
    fw: str | None
    generation: int
    revoked: float | None

    def grid_index(self) -> int | None:
        for i, c in enumerate(self.channels):
            if c.get("role") == "grid":
                return i
        return None


def private_file(path: Path) -> None:
    """The database holds device secrets and token hashes: it is made, or
    made again, readable and writable by its owner only. SQLite gives its
    -wal and -shm files the database's own mode."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = p.stat()
            if st.st_mode & 0o077 and st.st_uid == os.geteuid():
                os.chmod(p, 0o600)
        except FileNotFoundError:
            pass


def connect(path: str | Path) -> sqlite3.Connection:
    if str(path) != ":memory:":
        private_file(Path(path))
    db = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    # an older database is upgraded here, a newer one refused (peergrid/schema.py)
    schema.migrate(db)
    return db


class Registry:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        db.executescript(SCHEMA)
        for table, col, decl in MIGRATIONS:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if col not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
        if not db.execute("SELECT 1 FROM sqlite_master WHERE type='trigger' AND name='devices_removed'").fetchone():
            db.executescript(WATCH)

    # -- communities and members ----------------------------------------------

    def add_community(self, cid: str, name: str = "") -> None:
        if not topics.valid_id(cid):
            raise RegistryError("a community id is 1-16 of a-z, 0-9 and '-'")
        self.db.execute("INSERT OR IGNORE INTO communities VALUES (?, ?, ?)", (cid, name or cid, time.time()))

    def add_member(self, community: str, name: str, key: bytes | None = None, member_id: int | None = None) -> int:
        """A member (house); `key` is its Ed25519 public key (32 bytes) for
        signing proposals and ballots."""
        self._community(community)
        if key is not None and len(key) != 32:
            raise RegistryError("a member key is a 32-byte Ed25519 public key")
        cur = self.db.execute("INSERT INTO members (id, community, name, created, pubkey) VALUES (?, ?, ?, ?, ?)",
                              (member_id, community, name, time.time(), key))
        return int(cur.lastrowid or 0)

    def set_member_key(self, community: str, member: int, key: bytes) -> None:
        if len(key) != 32:
            raise RegistryError("a member key is a 32-byte Ed25519 public key")
        self._current(community, member)
        self.db.execute("UPDATE members SET pubkey=? WHERE community=? AND id=?", (key, community, member))

    def member_key(self, community: str, member: int) -> bytes | None:
        r = self.db.execute("SELECT pubkey FROM members WHERE community=? AND id=?", (community, member)).fetchone()
        return bytes(r[0]) if r and r[0] is not None else None

    def leave(self, community: str, member: int, at: float | None = None) -> None:
        """The member leaves; its boards are not settled for intervals from `at` on."""
        cur = self.db.execute("UPDATE members SET left_at=? WHERE community=? AND id=? AND left_at IS NULL",
                              (time.time() if at is None else at, community, member))
        if cur.rowcount == 0:
            raise RegistryError(f"no current member {member}")

    def members(self, community: str) -> list[tuple[int, str, float | None]]:
        return list(self.db.execute("SELECT id, name, left_at FROM members WHERE community=? ORDER BY id",
                                    (community,)))

    def _current(self, community: str, member: int) -> None:
        if not self.db.execute("SELECT 1 FROM members WHERE community=? AND id=? AND left_at IS NULL",
                               (community, member)).fetchone():
            raise RegistryError(f"no current member {member} in {community!r}")

    def set_limits(self, community: str, member: int, bid: int | None, ask: int | None) -> None:
        """A member's price limits for the double auction, per kWh in minor
        units (None: the default, bid = retail and ask = feed-in). At
        settlement a bid above retail counts as retail and an ask below
        feed-in as feed-in."""
        self._current(community, member)
        for v in (bid, ask):
            if v is not None and (type(v) is not int or v < 0):
                raise RegistryError("price limits are whole minor units per kWh, not negative")
        self.db.execute("UPDATE members SET bid=?, ask=? WHERE community=? AND id=?", (bid, ask, community, member))

    def set_member_account(self, community: str, member: int) -> tuple[str, str]:
        """A broker account for the member's own programs (Home Assistant,
        peergrid.app.homeassistant): it reads only its house's topics and the
        community's aggregate. Returns (user, password); the password is shown
        once and only its hash is kept. A second call replaces it."""
        self._current(community, member)
        password = secrets.token_urlsafe(18)
        self.db.execute("UPDATE members SET broker_hash=? WHERE community=? AND id=?",
                        (mosquitto_hash(password), community, member))
        return member_user(community, member), password

    def limits(self, community: str) -> dict[int, tuple[int | None, int | None]]:
        return {r[0]: (r[1], r[2]) for r in self.db.execute(
            "SELECT id, bid, ask FROM members WHERE community=? ORDER BY id", (community,))}

    def add_partner(self, community: str, seller: int, buyer: int, discount: int) -> None:
        """The seller offers its export to the buyer first, at retail minus
        `discount` per kWh (capped at settlement so the seller never gets
        less than feed-in)."""
        self._current(community, seller)
        self._current(community, buyer)
        if seller == buyer:
            raise RegistryError("a member cannot be its own preferred partner")
        if type(discount) is not int or discount < 0:
            raise RegistryError("the discount is whole minor units per kWh, not negative")
        self.db.execute("INSERT INTO partners VALUES (?, ?, ?, ?, ?) ON CONFLICT(community, seller, buyer)"
                        " DO UPDATE SET discount=excluded.discount", (community, seller, buyer, discount, time.time()))

    def remove_partner(self, community: str, seller: int, buyer: int) -> None:
        cur = self.db.execute("DELETE FROM partners WHERE community=? AND seller=? AND buyer=?",
                              (community, seller, buyer))
        if cur.rowcount == 0:
            raise RegistryError(f"member {seller} has no preferred partner {buyer}")

    def partners(self, community: str) -> list[tuple[int, int, int]]:
        """(seller, buyer, discount) between current members, in matching
        order: sellers by id, each seller's partners in the order added."""
        return [(r[0], r[1], r[2]) for r in self.db.execute(
            "SELECT p.seller, p.buyer, p.discount FROM partners p JOIN members s ON s.id = p.seller"
            " JOIN members b ON b.id = p.buyer WHERE p.community=? AND s.left_at IS NULL AND b.left_at IS NULL"
            " ORDER BY p.seller, p.created, p.buyer", (community,))]

    def _community(self, cid: str) -> None:
        if not self.db.execute("SELECT 1 FROM communities WHERE id=?", (cid,)).fetchone():
            raise RegistryError(f"no community {cid!r}: add it first")

    # -- devices ----------------------------------------------------------------

    def add_device(self, community: str, device: str, board: str, channels: list[dict[str, Any]],
                   member: int | None = None, secret: bytes | None = None) -> tuple[bytes, str]:
        """Register a board; returns (device secret, broker password), shown
        once to the commissioning tool."""
        self._community(community)
        if not topics.valid_id(device):
            raise RegistryError("a device id is 1-16 of a-z, 0-9 and '-', not starting with '-'")
        if self.db.execute("SELECT 1 FROM devices WHERE community=? AND id=?", (community, device)).fetchone():
            raise RegistryError(f"device {device!r} exists: rotate its key or revoke it")
        for c in channels:
            if not isinstance(c, dict):
                raise RegistryError("a channel is a role and a rating_a")
            if c.get("role") not in ("grid", "pv", "battery", "load", "ev", "unused"):
                raise RegistryError(f"channel role {c.get('role')!r} is not grid, pv, battery, load, ev or unused")
            if not valid_rating(c.get("rating_a")):
                raise RegistryError(f"every channel needs a rating_a in A, a number above 0 and at most {MAX_RATING_A}")
        secret = secret or secrets.token_bytes(32)
        if len(secret) != 32:
            raise RegistryError("a device secret is 32 bytes")
        password = secrets.token_urlsafe(18)
        self.db.execute("INSERT INTO devices (community, id, member, secret, board, channels, broker_hash, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (community, device, member, secret, board, json.dumps(channels, allow_nan=False),
                         mosquitto_hash(password), time.time()))
        return secret, password

    def rotate(self, community: str, device: str) -> tuple[bytes, str]:
        """New secret and broker password; the old ones stop working."""
        d = self.device(community, device)
        if d is None:
            raise RegistryError(f"no device {device!r}")
        secret = secrets.token_bytes(32)
        password = secrets.token_urlsafe(18)
        self.db.execute("UPDATE devices SET secret=?, broker_hash=?, generation=generation+1, revoked=NULL"
                        " WHERE community=? AND id=?", (secret, mosquitto_hash(password), community, device))
        return secret, password

    def revoke(self, community: str, device: str) -> None:
        cur = self.db.execute("UPDATE devices SET revoked=? WHERE community=? AND id=? AND revoked IS NULL",
                              (time.time(), community, device))
        if cur.rowcount == 0:
            raise RegistryError(f"no active device {device!r}")

    def set_fw(self, community: str, device: str, fw: str) -> None:
        self.db.execute("UPDATE devices SET fw=? WHERE community=? AND id=?", (fw, community, device))

    def device(self, community: str, device: str) -> Device | None:
        r = self.db.execute("SELECT community, id, member, secret, board, channels, fw, generation, revoked"
                            " FROM devices WHERE community=? AND id=?", (community, device)).fetchone()
        if r is None:
            return None
        return Device(r[0], r[1], r[2], bytes(r[3]), r[4], json.loads(r[5]), r[6], r[7], r[8])

    def devices(self, community: str) -> list[Device]:
        return [Device(r[0], r[1], r[2], bytes(r[3]), r[4], json.loads(r[5]), r[6], r[7], r[8])
                for r in self.db.execute("SELECT community, id, member, secret, board, channels, fw, generation,"
                                         " revoked FROM devices WHERE community=? ORDER BY id", (community,))]

    def version(self) -> int:
        """The registry's change counter (see WATCH)."""
        return int(self.db.execute("SELECT n FROM registry_version WHERE id = 0").fetchone()[0])

    def changes(self, community: str, since: int) -> tuple[int, list[Device], bool]:
        """What changed after counter value `since`: (the counter now, the
        devices of `community` added or changed since, whether a device was
        deleted, which names none). Devices changed again meanwhile come
        back at the next call."""
        now = self.version()
        if now == since:
            return now, [], False
        rows = self.db.execute("SELECT community, id, member, secret, board, channels, fw, generation, revoked"
                               " FROM devices WHERE version > ? AND version <= ? AND community = ?",
                               (since, now, community)).fetchall()
        devs = [Device(r[0], r[1], r[2], bytes(r[3]), r[4], json.loads(r[5]), r[6], r[7], r[8]) for r in rows]
        # a deletion bumps the counter without marking a row: when the rows
        # marked do not account for every step, something was deleted (or
        # changed again meanwhile; the caller then reloads what it knows)
        marked = {r[0] for r in self.db.execute("SELECT version FROM devices WHERE version > ? AND version <= ?",
                                               (since, now))}
        return now, devs, len(marked) < now - since

    def secret_for(self, community: str, device: str) -> bytes | None:
        """The active secret of a device, None if unknown or revoked."""
        r = self.db.execute("SELECT secret FROM devices WHERE community=? AND id=? AND revoked IS NULL",
                            (community, device)).fetchone()
        return bytes(r[0]) if r else None

    # -- controllable resources (issue 7) ----------------------------------------

    def add_load(self, community: str, load: Any) -> None:
        """A switchable load behind a board's relay (peergrid.control.controller.Load)."""
        d = self.device(community, load.device)
        if d is None or d.revoked:
            raise RegistryError(f"no active device {load.device!r}")
        if not all(finite(v) for v in (load.relay, load.rated_w, load.priority, load.min_on_s, load.min_off_s,
                                       load.need_wh, load.max_switches_day)):
            raise RegistryError("relay, power, priority, times, need and switches are finite numbers")
        if not 0 <= load.relay <= 15:
            raise RegistryError("a relay index is 0..15")
        if load.rated_w <= 0 or load.min_on_s < 0 or load.min_off_s < 0 or load.need_wh < 0:
            raise RegistryError("rated power must be positive; times and the need not negative")
        if load.need_wh and load.deadline_s is None:
            raise RegistryError("a daily energy need needs a deadline (--deadline HH:MM)")
        for v in (load.deadline_s, load.available_s):
            if v is not None and not 0 <= v < 86400:
                raise RegistryError("times of day are 00:00..23:59")
        try:
            self.db.execute("INSERT INTO loads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (community, load.id, load.device, load.relay, load.rated_w, load.priority, load.min_on_s,
                             load.min_off_s, load.need_wh, load.deadline_s, load.available_s,
                             load.max_switches_day))
        except sqlite3.IntegrityError:
            raise RegistryError(f"load {load.id!r} or relay {load.relay} of {load.device} is registered already") \
                from None

    def add_battery(self, community: str, b: Any) -> None:
        d = self.device(community, b.device)
        if d is None or d.revoked:
            raise RegistryError(f"no active device {b.device!r}")
        if not all(finite(v) for v in (b.target, b.capacity_wh, b.max_charge_w, b.max_discharge_w, b.soc_min,
                                       b.soc_max, b.efficiency)):
            raise RegistryError("battery figures are finite numbers")
        if b.capacity_wh <= 0 or b.max_charge_w < 0 or b.max_discharge_w < 0:
            raise RegistryError("capacity must be positive, power limits not negative")
        if not 0 <= b.soc_min < b.soc_max <= 1 or not 0 < b.efficiency <= 1:
            raise RegistryError("need 0 <= soc_min < soc_max <= 1 and 0 < efficiency <= 1")
        try:
            self.db.execute("INSERT INTO batteries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (community, b.id, b.device, b.target, b.capacity_wh, b.max_charge_w, b.max_discharge_w,
                             b.soc_min, b.soc_max, b.efficiency))
        except sqlite3.IntegrityError:
            raise RegistryError(f"battery {b.id!r} or target {b.target} of {b.device} is registered already") \
                from None

    def remove_resource(self, community: str, rid: str) -> None:
        n = self.db.execute("DELETE FROM loads WHERE community=? AND id=?", (community, rid)).rowcount
        n += self.db.execute("DELETE FROM batteries WHERE community=? AND id=?", (community, rid)).rowcount
        if not n:
            raise RegistryError(f"no load or battery {rid!r}")

    def set_feeder(self, community: str, import_w: int, export_w: int) -> None:
        if not finite(import_w) or not finite(export_w) or import_w <= 0 or export_w <= 0:
            raise RegistryError("feeder limits are positive")
        self.db.execute("INSERT INTO feeders VALUES (?, ?, ?) ON CONFLICT(community) DO UPDATE SET"
                        " import_w=excluded.import_w, export_w=excluded.export_w", (community, import_w, export_w))

    def resource_rows(self, community: str) -> tuple[list[tuple], list[tuple], tuple | None]:
        """The community's loads, batteries and feeder limits as rows, in the
        field order of peergrid.control.controller's Load, Battery and Feeder
        (controller.resources() builds them)."""
        loads = [tuple(r) for r in self.db.execute(
            "SELECT id, device, relay, rated_w, priority, min_on_s, min_off_s, need_wh, deadline_s, available_s,"
            " max_switches_day FROM loads WHERE community=? ORDER BY id", (community,))]
        bats = [tuple(r) for r in self.db.execute(
            "SELECT id, device, target, capacity_wh, max_charge_w, max_discharge_w, soc_min, soc_max, efficiency"
            " FROM batteries WHERE community=? ORDER BY id", (community,))]
        f = self.db.execute("SELECT import_w, export_w FROM feeders WHERE community=?", (community,)).fetchone()
        return loads, bats, (tuple(f) if f else None)

    # -- broker files ---------------------------------------------------------

    def broker_files(self, passwd: Path, acl: Path, gateway_user: str, gateway_hash: str) -> int:
        """Write mosquitto's password and ACL files (atomically); returns
        the number of device accounts. Revoked devices get no account."""
        pw_lines = [f"{gateway_user}:{gateway_hash}"]
        acl_lines = [f"user {gateway_user}"]
        comms = [r[0] for r in self.db.execute("SELECT id FROM communities ORDER BY id")]
        for c in comms:
            acl_lines += [f"topic read {t}" for t in gateway_end.subscriptions(c)]
            acl_lines.append(f"topic write {topics.ROOT}/{c}/+/{topics.CMD}")
            acl_lines.append(f"topic write {topics.ROOT}/{c}/+/{topics.FW}")
            acl_lines.append(f"topic readwrite pgw/{c}/#")
            acl_lines.append(f"topic readwrite {hatopics.HA_ROOT}/{c}/#")
            acl_lines.append(f"topic readwrite {hatopics.LEDGER_ROOT}/{c}/#")
        # Home Assistant's discovery configs and its announcements
        acl_lines += [f"topic write {hatopics.DISCOVERY}/#", f"topic read {hatopics.HA_STATUS}"]
        acl_lines.append("")
        n = 0
        for c, dev, h in self.db.execute("SELECT community, id, broker_hash FROM devices WHERE revoked IS NULL"
                                         " ORDER BY community, id"):
            user = broker_user(c, dev)
            pw_lines.append(f"{user}:{h}")
            acl_lines.append(f"user {user}")
            acl_lines += [f"topic {access} {pattern}" for pattern, access in gateway_end.device_acl(c, dev)]
            acl_lines.append("")
            n += 1
        for c, mid, h in self.db.execute("SELECT community, id, broker_hash FROM members WHERE broker_hash IS NOT NULL"
                                         " AND (left_at IS NULL OR left_at > ?) ORDER BY community, id",
                                         (time.time(),)):
            user = member_user(c, mid)
            pw_lines.append(f"{user}:{h}")
            acl_lines.append(f"user {user}")
            acl_lines += [f"topic {access} {pattern}" for pattern, access in hatopics.member_acl(c, mid)]
            acl_lines.append("")
        atomic_write(passwd, "\n".join(pw_lines) + "\n")
        atomic_write(acl, "\n".join(acl_lines) + "\n")
        return n


def broker_user(community: str, device: str) -> str:
    """A device's broker account name (ids never contain '.')."""
    return f"{community}.{device}"


def member_user(community: str, member: int) -> str:
    """A member's broker account name ('_' never occurs in a device id, so
    it cannot be a device's account)."""
    return f"{community}.member_{int(member)}"


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a private file (0600) whole or not at all."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
