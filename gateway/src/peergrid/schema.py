"""The version of the gateway's database and the steps between versions.

The version is SQLite's `PRAGMA user_version` (a number in the file's
header). Version 1 is the database every gateway made before versions were
recorded: its tables are created by the packages that own them (registry,
store, settler, control loop, installer) with CREATE TABLE IF NOT EXISTS,
and its user_version is 0. `migrate()` records such a database as version 1
and then runs every step from its version to CURRENT, in one transaction:
either the database is upgraded completely, with its version, or nothing of
it changed. A database of a newer gateway is refused, untouched.

`migrate` is called by peergrid.community.registry.connect, the one place
every part of the gateway opens its database; on a database that is up to
date it only reads the version. A new database is made at version 1 and
taken through the same steps, so a new gateway and an upgraded one end with
the same schema. Tables are still created by their owners when first used,
so a step that touches a table must allow for the table not to exist yet,
and the owner's own CREATE statements must make what the step makes.

Adding a version: append a Migration to MIGRATIONS (it brings version
len(MIGRATIONS) to len(MIGRATIONS) + 1), make the owning module's schema
create the same for new tables, and leave earlier steps as they are. Only
the standard library here: every package may import this module.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Callable, Sequence, Union

log = logging.getLogger("peergrid.schema")

Step = Union[Callable[[sqlite3.Connection], None], Sequence[str]]


@dataclass(frozen=True)
class Migration:
    what: str           # one line for the log and the schema history
    step: Step          # a function of the connection, or SQL statements run in order


class SchemaError(SystemExit):
    """The database cannot be used by this gateway as it is (made by a newer
    gateway, or an upgrade failed). A SystemExit: a gateway or command that
    meets it stops with this message, like a bad config."""


def table_exists(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


def _v2(db: sqlite3.Connection) -> None:
    # when each version was reached, and how long the step took
    db.execute("CREATE TABLE IF NOT EXISTS schema_history (version INTEGER NOT NULL, applied REAL NOT NULL,"
               " what TEXT NOT NULL, seconds REAL NOT NULL)")
    # readings by time for the whole community: the settler's search for
    # late readings (adjust_due, every 5 s for each interval of the last two
    # days) and its first interval (MIN(t)) read every reading of the
    # community through readings_dev_t; with t_recv in the index the search
    # is a range of the interval's own readings, answered from the index.
    # ingest/store.py's schema makes the same index on a new table.
    if table_exists(db, "readings"):
        db.execute("CREATE INDEX IF NOT EXISTS readings_t ON readings (community, t, t_recv)")


# firmware updates over the air (peergrid.fleet, docs/OTA.md 4): what each
# board runs and every step of its updates, and the rollouts. Created by
# version 3 and, with the same statements, by peergrid.fleet.records.
FLEET_TABLES = (
    "CREATE TABLE IF NOT EXISTS firmware_events (id INTEGER PRIMARY KEY, community TEXT NOT NULL,"
    " device TEXT NOT NULL, t REAL NOT NULL, boot INTEGER, rel INTEGER, digest TEXT, event TEXT NOT NULL,"
    " detail TEXT NOT NULL DEFAULT '')",
    "CREATE INDEX IF NOT EXISTS firmware_events_dev ON firmware_events (community, device, t)",
    "CREATE TABLE IF NOT EXISTS fleet_devices (community TEXT NOT NULL, device TEXT NOT NULL, board TEXT,"
    " boot INTEGER, rel INTEGER, rel_dig TEXT, ota INTEGER, ota_rel INTEGER, ota_why TEXT, ota_got INTEGER,"
    " fw TEXT, last_status REAL, PRIMARY KEY (community, device))",
    "CREATE TABLE IF NOT EXISTS fleet_rollouts (id INTEGER PRIMARY KEY, community TEXT NOT NULL,"
    " board TEXT NOT NULL, seq INTEGER NOT NULL, first_n INTEGER NOT NULL, max_fail INTEGER NOT NULL,"
    " device TEXT, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '', created REAL NOT NULL,"
    " updated REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fleet_rollout_boards (rollout INTEGER NOT NULL, device TEXT NOT NULL,"
    " wave INTEGER NOT NULL, state TEXT NOT NULL, first_sent REAL, sent_at REAL, tries INTEGER NOT NULL DEFAULT 0,"
    " done_t REAL, detail TEXT NOT NULL DEFAULT '', PRIMARY KEY (rollout, device))",
)

def _v4(db: sqlite3.Connection) -> None:
    # a member's own broker account (Home Assistant, peergrid.app): the
    # registry's own schema makes the column on a new members table
    if table_exists(db, "members") and "broker_hash" not in {r[1] for r in db.execute("PRAGMA table_info(members)")}:
        db.execute("ALTER TABLE members ADD COLUMN broker_hash TEXT")


# MIGRATIONS[k] brings version k + 1 to k + 2
MIGRATIONS: tuple[Migration, ...] = (
    Migration("schema history; readings indexed by time (the settler's late-reading search)", _v2),
    Migration("firmware updates: firmware_events, fleet_devices, fleet_rollouts, fleet_rollout_boards",
              FLEET_TABLES),
    Migration("members: broker_hash (a member's broker account for Home Assistant)", _v4),
)
CURRENT = 1 + len(MIGRATIONS)


def version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _where(db: sqlite3.Connection) -> str:
    try:
        for _, name, path in db.execute("PRAGMA database_list"):
            if name == "main":
                return path or "an in-memory database"
    except sqlite3.Error:
        pass
    return "the database"


def _newer(db: sqlite3.Connection, v: int, known: int) -> SchemaError:
    return SchemaError(f"{_where(db)} has schema version {v}, newer than this gateway knows ({known}): it was "
                       "written by a newer PeerGrid. Run that version (or newer), or restore a backup made "
                       "before the upgrade; this gateway leaves the database untouched.")


def migrate(db: sqlite3.Connection, migrations: Sequence[Migration] | None = None) -> list[str]:
    """Bring the database to the newest version this gateway knows, inside
    one transaction (BEGIN IMMEDIATE: two processes opening an old database
    at once upgrade it once). Returns what was done, one line a step (empty
    when it was up to date); each is logged. Raises SchemaError for a newer
    database and for a failed step (then nothing changed)."""
    migs = MIGRATIONS if migrations is None else tuple(migrations)
    target = 1 + len(migs)
    v = version(db)
    if v > target:
        raise _newer(db, v, target)
    if v == target:
        return []
    db.execute("BEGIN IMMEDIATE")
    start = v
    done: list[tuple[int, str, float]] = []
    try:
        start = v = version(db)        # as it is now that this connection holds the write lock
        if v > target:
            raise _newer(db, v, target)
        if v == 0:
            fresh = db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0
            done.append((1, "new database" if fresh else "recorded as version 1 (made before schema versions)", 0.0))
            v = 1
        for m in migs[v - 1:]:
            t0 = time.monotonic()
            if callable(m.step):
                m.step(db)
            else:
                for sql in m.step:
                    db.execute(sql)
            v += 1
            done.append((v, m.what, time.monotonic() - t0))
        db.execute(f"PRAGMA user_version = {int(v)}")
        if table_exists(db, "schema_history"):
            now = time.time()
            db.executemany("INSERT INTO schema_history VALUES (?, ?, ?, ?)", [(n, now, w, s) for n, w, s in done])
        db.execute("COMMIT")
    except BaseException as e:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                log.warning("schema: ROLLBACK failed", exc_info=True)
        if isinstance(e, SchemaError) or not isinstance(e, Exception):
            raise
        raise SchemaError(f"{_where(db)}: upgrading the database from schema version {start} to {target} failed "
                          f"at the step to version {v + 1} ({type(e).__name__}: {e}); nothing was changed, it is "
                          f"still at version {start}") from e
    lines = [f"schema version {n}: {w}" + (f" ({s:.2f} s)" if s >= 0.01 else "") for n, w, s in done]
    for line in lines:
        log.info("%s: %s", _where(db), line)
    return lines
