"""Storage of what the gateway accepted, rejected and saw, in SQLite (WAL).

- `frames`: every accepted uplink frame as received (members can re-verify
  their own), unique per (community, device, kind, boot, seq).
- `readings`: the decoded readings, with the grid channel's registers in
  columns for settlement and every channel as JSON.
- `quarantine`: rejected frames with their reason, bounded in rows and in
  bytes (oldest go); a frame longer than `frame_bytes` is kept as its
  prefix, with its length and SHA-256.
- `counters`: rejections and warnings by reason and device.
- `presence`: per device, online state from status messages and last seen.

Acknowledgement point: the gateway's MQTT session acknowledges a message
(PUBACK) only after the batch holding it was committed with
synchronous=FULL, so a crash or power cut loses nothing that was
acknowledged; the broker redelivers the rest.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from typing import Any, Iterable

from peergrid.sqltx import transaction
from peergrid.ingest.validate import Accepted
from protocol import topics

SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    id INTEGER PRIMARY KEY, community TEXT NOT NULL, device TEXT NOT NULL, kind TEXT NOT NULL,
    boot INTEGER NOT NULL, seq INTEGER NOT NULL, t_recv REAL NOT NULL, frame BLOB NOT NULL,
    digest BLOB NOT NULL, UNIQUE (community, device, kind, boot, seq));
CREATE TABLE IF NOT EXISTS readings (
    frame_id INTEGER PRIMARY KEY REFERENCES frames(id), community TEXT NOT NULL, device TEXT NOT NULL,
    boot INTEGER NOT NULL, seq INTEGER NOT NULL, t REAL NOT NULL, t_board INTEGER NOT NULL,
    t_recv REAL NOT NULL, flags INTEGER NOT NULL, grid_w INTEGER, grid_imp_wh INTEGER,
    grid_exp_wh INTEGER, vrms_dv INTEGER, freq_chz INTEGER, ch TEXT NOT NULL, inv TEXT, bat TEXT);
CREATE INDEX IF NOT EXISTS readings_dev_t ON readings (community, device, t);
CREATE INDEX IF NOT EXISTS readings_t ON readings (community, t, t_recv);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY, t_recv REAL NOT NULL, topic TEXT NOT NULL, device TEXT,
    code INTEGER NOT NULL, reason TEXT NOT NULL, frame BLOB NOT NULL, length INTEGER, digest BLOB);
CREATE TABLE IF NOT EXISTS counters (
    community TEXT NOT NULL, device TEXT NOT NULL, what TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (community, device, what));
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, first_frame INTEGER, last_frame INTEGER, n INTEGER NOT NULL, t_done REAL NOT NULL);
CREATE TABLE IF NOT EXISTS presence (
    community TEXT NOT NULL, device TEXT NOT NULL, online INTEGER, last_seen REAL,
    last_status TEXT, PRIMARY KEY (community, device));
"""


# what a quarantine row counts against the byte budget (TEXT as UTF-8 bytes)
_Q_SIZE = "length(frame) + length(CAST(topic AS BLOB)) + length(CAST(reason AS BLOB)) + 64"


def init(db: sqlite3.Connection) -> None:
    db.executescript(SCHEMA)
    have = {r[1] for r in db.execute("PRAGMA table_info(quarantine)")}
    for col, decl in (("length", "INTEGER"), ("digest", "BLOB")):
        if col not in have:
            db.execute(f"ALTER TABLE quarantine ADD COLUMN {col} {decl}")


def quarantined(frame: bytes, keep: int = 512) -> tuple[bytes, int, bytes]:
    """What the quarantine keeps of a rejected frame: (at most `keep` bytes
    of it, its length, its SHA-256)."""
    return bytes(frame[:keep]), len(frame), hashlib.sha256(frame).digest()


class Store:
    def __init__(self, db: sqlite3.Connection, grid_index: Any, quarantine_max: int = 10000,
                 read_db: sqlite3.Connection | None = None, quarantine_bytes: int = 8 << 20,
                 frame_bytes: int = 512) -> None:
        """db: the writer's connection (one thread); read_db: another
        connection for lookups from other threads. grid_index(community,
        device) -> index of the grid channel or None. The quarantine keeps
        at most quarantine_max rows and quarantine_bytes bytes (frames,
        topics, reasons and 64 bytes a row)."""
        self.db = db
        self.read_db = read_db or db
        self.grid_index = grid_index
        self.quarantine_max = quarantine_max
        self.quarantine_bytes = quarantine_bytes
        self.frame_bytes = frame_bytes
        self._q: list[int] | None = None          # [bytes, rows] in the quarantine; None: count again
        self.keep_batches = False
        init(db)
        # devices that have stored frames, so a first message from any other
        # device needs no history query
        self.with_frames: set[tuple[str, str]] | None = {
            (c, d) for c, d in self.read_db.execute("SELECT DISTINCT community, device FROM frames")}

    def history(self, community: str, device: str, kind: str) -> list[tuple[int, int, bytes]]:
        """Accepted (boot, seq, digest) of a device's four newest boots."""
        rdb = self.read_db
        if self.with_frames is not None and (community, device) not in self.with_frames:
            return []
        boots = [r[0] for r in rdb.execute(
            "SELECT DISTINCT boot FROM frames WHERE community=? AND device=? AND kind=? ORDER BY boot DESC LIMIT 4",
            (community, device, kind))]
        out: list[tuple[int, int, bytes]] = []
        for b in boots:
            out += [(b, s, bytes(d)) for s, d in rdb.execute(
                "SELECT seq, digest FROM frames WHERE community=? AND device=? AND kind=? AND boot=?"
                " ORDER BY seq DESC LIMIT 32768", (community, device, kind, b))]
        return out

    def energy_history(self, community: str, device: str, per_boot: int = 64) -> list[tuple[Any, ...]]:
        """Stored readings to rebuild a device's energy state after a
        restart (peergrid.ingest.energycheck): for each of its five newest boots
        the first reading and the newest `per_boot`, as (boot, seq, t,
        t_board, t_recv, flags, vrms_dv, channels)."""
        rdb = self.read_db
        if self.with_frames is not None and (community, device) not in self.with_frames:
            return []
        boots = [r[0] for r in rdb.execute(
            "SELECT DISTINCT boot FROM frames WHERE community=? AND device=? AND kind=? ORDER BY boot DESC LIMIT 5",
            (community, device, topics.READING))]
        q = ("SELECT r.boot, r.seq, r.t, r.t_board, r.t_recv, r.flags, r.vrms_dv, r.ch FROM frames f"
             " JOIN readings r ON r.frame_id = f.id WHERE f.community=? AND f.device=? AND f.kind=? AND f.boot=?"
             " ORDER BY f.seq {} LIMIT ?")
        out: dict[tuple[int, int], tuple[Any, ...]] = {}
        for b in boots:
            for order, n in (("ASC", 1), ("DESC", per_boot)):
                for row in rdb.execute(q.format(order), (community, device, topics.READING, b, n)):
                    out[(row[0], row[1])] = row[:7] + (json.loads(row[7]),)
        return list(out.values())

    def write(self, accepted: Iterable[Accepted], rejected: Iterable[tuple[Any, ...]],
              counts: dict[tuple[str, str, str], int]) -> None:
        """One transaction for a batch. A rejected frame is (t_recv, topic,
        device, code, reason, frame) or, already cut by quarantined(),
        (t_recv, topic, device, code, reason, prefix, length, digest). On an
        error (a full disk: sqlite3.OperationalError "database or disk is
        full") nothing of the batch is kept and that error is raised."""
        try:
            self._write(accepted, rejected, counts)
        except BaseException:
            self._q = None
            raise

    def _write(self, accepted: Iterable[Accepted], rejected: Iterable[tuple[Any, ...]],
               counts: dict[tuple[str, str, str], int]) -> None:
        db = self.db
        first = last = None
        n = 0
        seen: dict[tuple[str, str], float] = {}
        with transaction(db):
            for a in accepted:
                m = a.msg
                cur = db.execute(
                    "INSERT OR IGNORE INTO frames (community, device, kind, boot, seq, t_recv, frame, digest)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (a.community, a.device, a.kind, m["boot"], m["seq"], a.t_recv, a.frame,
                     a.digest or hashlib.sha256(a.frame).digest()))
                if cur.rowcount == 0:
                    continue
                fid = cur.lastrowid
                first = fid if first is None else first
                last = fid
                n += 1
                if a.kind == topics.READING:
                    gi = self.grid_index(a.community, a.device)
                    g = m["ch"][gi] if gi is not None and gi < len(m["ch"]) else None
                    db.execute(
                        "INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (fid, a.community, a.device, m["boot"], m["seq"], a.t_eff, m["t"], a.t_recv, m["flags"],
                         g[0] if g else None, g[1] if g else None, g[2] if g else None, m.get("vrms_dv"),
                         m.get("freq_chz"), json.dumps(m["ch"]), json.dumps(m.get("inv")) if "inv" in m else None,
                         json.dumps(m.get("bat")) if "bat" in m else None))
                elif a.kind == topics.STATUS:
                    st = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in m.items()}
                    db.execute("INSERT INTO presence VALUES (?, ?, ?, ?, ?) ON CONFLICT(community, device) DO UPDATE"
                               " SET online=excluded.online, last_seen=excluded.last_seen,"
                               " last_status=excluded.last_status",
                               (a.community, a.device, m["online"], a.t_recv, json.dumps(st)))
                if a.kind != topics.STATUS:
                    seen[(a.community, a.device)] = a.t_recv
            # last seen: one row per device and batch, not one per message
            db.executemany("INSERT INTO presence (community, device, online, last_seen) VALUES (?, ?, 1, ?)"
                           " ON CONFLICT(community, device) DO UPDATE SET last_seen=excluded.last_seen",
                           [(c, d, t) for (c, d), t in seen.items()])
            added = [0, 0]
            for r in rejected:
                t, topic, device, code, reason, frame = r[:6]
                if len(r) == 8:
                    length, digest = r[6], r[7]
                    frame = frame[:self.frame_bytes]
                else:
                    frame, length, digest = quarantined(frame, self.frame_bytes)
                topic, reason = topic[:200], reason[:200]
                db.execute("INSERT INTO quarantine (t_recv, topic, device, code, reason, frame, length, digest)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (t, topic, device, code, reason, frame, length, digest))
                added[0] += len(frame) + len(topic.encode()) + len(reason.encode()) + 64
                added[1] += 1
            for (c, d, what), k in counts.items():
                db.execute("INSERT INTO counters VALUES (?, ?, ?, ?) ON CONFLICT(community, device, what)"
                           " DO UPDATE SET n = n + excluded.n", (c, d, what, k))
            if added[1]:
                self._trim_quarantine(added)
        if n and self.keep_batches:
            # when each batch became durable (for latency figures); not
            # needed for correctness, so outside the batch's transaction
            db.execute("INSERT INTO batches (first_frame, last_frame, n, t_done) VALUES (?, ?, ?, ?)",
                       (first, last, n, time.time()))

    def _trim_quarantine(self, added: list[int]) -> None:
        """Keep the quarantine within its rows and bytes: past either, the
        oldest rows go until it is at 90 % of both (so a flood of rejects
        trims now and then, not on every batch)."""
        db = self.db
        if self._q is None:
            b, n = db.execute(f"SELECT COALESCE(SUM({_Q_SIZE}), 0), COUNT(*) FROM quarantine").fetchone()
            self._q = [b, n]
        else:
            self._q[0] += added[0]
            self._q[1] += added[1]
        if self._q[0] <= self.quarantine_bytes and self._q[1] <= self.quarantine_max:
            return
        row = db.execute(
            f"SELECT id FROM (SELECT id, SUM({_Q_SIZE}) OVER w AS b, COUNT(*) OVER w AS n FROM quarantine"
            " WINDOW w AS (ORDER BY id DESC)) WHERE b > ? OR n > ? ORDER BY id DESC LIMIT 1",
            (self.quarantine_bytes * 9 // 10, self.quarantine_max * 9 // 10)).fetchone()
        if row is None:
            return
        b, n = db.execute(f"SELECT COALESCE(SUM({_Q_SIZE}), 0), COUNT(*) FROM quarantine WHERE id <= ?",
                          (row[0],)).fetchone()
        db.execute("DELETE FROM quarantine WHERE id <= ?", (row[0],))
        self._q[0] -= b
        self._q[1] -= n

    def quarantine_size(self) -> tuple[int, int]:
        """(bytes as the budget counts them, rows) in the quarantine."""
        b, n = self.read_db.execute(f"SELECT COALESCE(SUM({_Q_SIZE}), 0), COUNT(*) FROM quarantine").fetchone()
        return int(b), int(n)

    def retain(self, now: float, raw_days: float, full_days: float, keep_every_s: int = 900) -> tuple[int, int]:
        """Retention and downsampling: raw frames older than raw_days go
        (the decoded readings stay); readings older than full_days are
        thinned to the first one of each device in every keep_every_s slot
        (the cumulative registers make any reading a valid boundary value,
        so settlement over older intervals loses only resolution). Returns
        (frames dropped, readings dropped)."""
        db = self.db
        with transaction(db):
            cut = now - raw_days * 86400
            f = db.execute("UPDATE frames SET frame = x'' WHERE t_recv < ? AND length(frame) > 0", (cut,)).rowcount
            cut = now - full_days * 86400
            r = db.execute(
                "DELETE FROM readings WHERE t < ? AND frame_id NOT IN ("
                " SELECT MIN(frame_id) FROM readings WHERE t < ? GROUP BY community, device, CAST(t / ? AS INTEGER))",
                (cut, cut, keep_every_s)).rowcount
        return f, r

    def mark_offline(self, community: str, device: str, t: float) -> None:
        self.db.execute("UPDATE presence SET online=0 WHERE community=? AND device=?", (community, device))
