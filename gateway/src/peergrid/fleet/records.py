"""What the fleet keeps in the gateway's database (tables made by schema
version 3, peergrid.schema.FLEET_TABLES):

- `firmware_events`: every step of every board's firmware, kept for good
  (an auditor reads which release measured a house's energy when): running
  (first seen, or another release), fetching, installed (the trial
  started), confirmed, refused, rolled_back, and the gateway's own
  update_sent, confirm_sent, update_timeout and claim_unproven (a board
  that answered an update with "runs it already" it never proved here),
  each with the board's boot, the release's seq and digest (the store's
  whole SHA-256 when the store has the release, else the 8 bytes the board
  reports) and a detail.
- `fleet_devices`: per board, the newest status's firmware fields.
- `fleet_rollouts` and `fleet_rollout_boards`: rollouts, written by the
  command line and driven by the running gateway (peergrid.fleet.service).

`derive` turns two successive views of a board into events; it is pure.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass
from typing import Any

from peergrid.schema import FLEET_TABLES
from peergrid.sqltx import transaction
from protocol import messages

OTA_NAMES = {messages.OTA_IDLE: "idle", messages.OTA_FETCH: "fetching", messages.OTA_TRIAL: "trial",
             messages.OTA_CONFIRMED: "confirmed", messages.OTA_REFUSED: "refused",
             messages.OTA_ROLLED_BACK: "rolled_back"}
ACTIVE = ("wave1", "wave2")          # rollout states the service drives
# a board in a rollout: waiting (its wave has not started), sent (OP_UPDATE out,
# no answer yet), started (acked or fetching), ok, failed, skipped (halted first)
OPEN = ("waiting", "sent", "started")


@dataclass
class View:
    """One board's firmware as its newest status says."""
    device: str
    board: str | None = None
    boot: int | None = None
    rel: int | None = None
    rel_dig: str | None = None       # hex
    ota: int | None = None
    ota_rel: int | None = None
    ota_why: str | None = None
    ota_got: int | None = None
    fw: str | None = None
    last_status: float | None = None

    @staticmethod
    def of_status(device: str, msg: dict[str, Any], t: float) -> "View":
        dig = msg.get("rel_dig")
        return View(device, msg.get("board"), msg.get("boot"), msg.get("rel"),
                    dig.hex() if isinstance(dig, bytes) else None, msg.get("ota"), msg.get("ota_rel"),
                    msg.get("ota_why"), msg.get("ota_got"), msg.get("fw"), t)


def derive(prev: View | None, new: View) -> list[tuple[str, int | None, str]]:
    """Events (name, release, detail) for a board whose status went from
    `prev` (None: never seen) to `new`."""
    out: list[tuple[str, int | None, str]] = []
    if new.rel is not None and (prev is None or prev.rel != new.rel):
        was = "first seen" if prev is None or prev.rel is None else f"was {prev.rel}"
        out.append(("running", new.rel, f"{was}; fw {new.fw or '?'}"))
    ota = new.ota
    if ota is None or ota == messages.OTA_IDLE:
        return out
    changed = prev is None or (prev.ota, prev.ota_rel, prev.rel) != (ota, new.ota_rel, new.rel)
    if ota == messages.OTA_TRIAL and prev is not None and prev.boot != new.boot:
        changed = True                # the trial started again (a reset during it)
    if not changed:
        return out
    if ota == messages.OTA_FETCH:
        out.append(("fetching", new.ota_rel, f"{new.ota_got or 0} bytes so far"))
    elif ota == messages.OTA_TRIAL:
        out.append(("installed", new.rel, f"on trial from boot {new.boot}"))
    elif ota == messages.OTA_CONFIRMED:
        out.append(("confirmed", new.rel, ""))
    elif ota == messages.OTA_REFUSED:
        out.append(("refused", new.ota_rel, new.ota_why or ""))
    elif ota == messages.OTA_ROLLED_BACK:
        out.append(("rolled_back", new.ota_rel, f"{new.ota_why or ''}; back on {new.rel}"))
    return out


class Records:
    """The fleet's tables for one community, on one connection (callers
    serialise their use of it)."""

    def __init__(self, db: sqlite3.Connection, community: str) -> None:
        self.db = db
        self.community = community
        for sql in FLEET_TABLES:
            db.execute(sql)

    # -- events and views ---------------------------------------------------------

    def event(self, device: str, event: str, rel: int | None = None, boot: int | None = None,
              digest: str | None = None, detail: str = "", t: float | None = None) -> None:
        self.db.execute("INSERT INTO firmware_events (community, device, t, boot, rel, digest, event, detail)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (self.community, device, time.time() if t is None else t, boot, rel, digest, event,
                         detail[:200]))

    def save(self, v: View) -> None:
        self.db.execute("INSERT OR REPLACE INTO fleet_devices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (self.community, v.device, v.board, v.boot, v.rel, v.rel_dig, v.ota, v.ota_rel, v.ota_why,
                         v.ota_got, v.fw, v.last_status))

    def views(self) -> dict[str, View]:
        out = {}
        for row in self.db.execute("SELECT device, board, boot, rel, rel_dig, ota, ota_rel, ota_why, ota_got, fw,"
                                   " last_status FROM fleet_devices WHERE community=?", (self.community,)):
            out[row[0]] = View(*row)
        return out

    def has_event(self, device: str, event: str, rel: int, since: float) -> bool:
        return self.db.execute("SELECT 1 FROM firmware_events WHERE community=? AND device=? AND event=? AND rel=?"
                               " AND t >= ? LIMIT 1", (self.community, device, event, rel, since)).fetchone() is not None

    def history(self, device: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        q = "SELECT device, t, boot, rel, digest, event, detail FROM firmware_events WHERE community=?"
        args: list[Any] = [self.community]
        if device:
            q += " AND device=?"
            args.append(device)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        rows = list(self.db.execute(q, args))[::-1]
        return [dict(zip(("device", "t", "boot", "rel", "digest", "event", "detail"), r)) for r in rows]

    # -- rollouts ------------------------------------------------------------------

    def add_rollout(self, board: str, seq: int, first_n: int, max_fail: int, device: str | None = None) -> int:
        """A rollout for the running gateway to start (state 'new')."""
        now = time.time()
        with transaction(self.db):
            busy = self.db.execute(
                "SELECT id FROM fleet_rollouts WHERE community=? AND state IN ('new', 'wave1', 'wave2') AND"
                " (board=? OR device=?)", (self.community, board, device)).fetchall()
            if device is None and busy:
                raise ValueError(f"rollout {busy[0][0]} for board {board} is still under way "
                                 "(peergrid fleet halt it first)")
            if device is not None:
                for (rid,) in busy:
                    if self.db.execute("SELECT 1 FROM fleet_rollout_boards WHERE rollout=? AND device=? AND"
                                       " state IN ('waiting', 'sent', 'started')", (rid, device)).fetchone() or \
                            self.db.execute("SELECT 1 FROM fleet_rollouts WHERE id=? AND device=?",
                                            (rid, device)).fetchone():
                        raise ValueError(f"{device} is in rollout {rid}, still under way")
            cur = self.db.execute("INSERT INTO fleet_rollouts (community, board, seq, first_n, max_fail, device,"
                                  " state, created, updated) VALUES (?, ?, ?, ?, ?, ?, 'new', ?, ?)",
                                  (self.community, board, seq, first_n, max_fail, device, now, now))
            return int(cur.lastrowid or 0)

    def rollouts(self, active_only: bool = False) -> list[dict[str, Any]]:
        q = ("SELECT id, board, seq, first_n, max_fail, device, state, reason, created, updated FROM fleet_rollouts"
             " WHERE community=?" + (" AND state IN ('new', 'wave1', 'wave2')" if active_only else "") +
             " ORDER BY id")
        keys = ("id", "board", "seq", "first_n", "max_fail", "device", "state", "reason", "created", "updated")
        return [dict(zip(keys, r)) for r in self.db.execute(q, (self.community,))]

    def boards(self, rollout: int) -> list[dict[str, Any]]:
        keys = ("device", "wave", "state", "first_sent", "sent_at", "tries", "done_t", "detail")
        return [dict(zip(keys, r)) for r in self.db.execute(
            "SELECT device, wave, state, first_sent, sent_at, tries, done_t, detail FROM fleet_rollout_boards"
            " WHERE rollout=? ORDER BY wave, device", (rollout,))]

    def set_state(self, rollout: int, state: str, reason: str = "", only_from: tuple[str, ...] = ()) -> bool:
        """Change a rollout's state (only from one of `only_from` when given:
        a halt by hand is never overwritten). True when it changed."""
        q = "UPDATE fleet_rollouts SET state=?, reason=?, updated=? WHERE id=? AND community=?"
        args: list[Any] = [state, reason[:300], time.time(), rollout, self.community]
        if only_from:
            q += f" AND state IN ({','.join('?' * len(only_from))})"
            args += list(only_from)
        return self.db.execute(q, args).rowcount > 0

    def put_board(self, rollout: int, device: str, wave: int, state: str) -> None:
        self.db.execute("INSERT OR IGNORE INTO fleet_rollout_boards (rollout, device, wave, state) VALUES (?, ?, ?, ?)",
                        (rollout, device, wave, state))

    def update_board(self, rollout: int, device: str, **cols: Any) -> None:
        sets = ", ".join(f"{k}=?" for k in cols)
        self.db.execute(f"UPDATE fleet_rollout_boards SET {sets} WHERE rollout=? AND device=?",
                        (*cols.values(), rollout, device))

    def halt(self, rollout: int | None, reason: str) -> list[int]:
        """Halt one rollout, or every one under way: boards not yet sent the
        release are skipped. Returns the ids halted."""
        out = []
        with transaction(self.db):
            for r in self.rollouts(active_only=True):
                if rollout is not None and r["id"] != rollout:
                    continue
                if self.set_state(r["id"], "halted", reason, only_from=("new", "wave1", "wave2")):
                    self.db.execute("UPDATE fleet_rollout_boards SET state='skipped', detail=? WHERE rollout=? AND"
                                    " state='waiting'", ("halted", r["id"]))
                    out.append(r["id"])
        return out


def as_dict(v: View) -> dict[str, Any]:
    return asdict(v)
