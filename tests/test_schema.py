"""The database's schema version and its migrations (peergrid/schema.py):
a database made before versions were recorded (tests/data/gateway-v1.sqlite,
made by tools/make_gateway_fixture.py with the code of that time) is
upgraded in place when the gateway opens it, keeps every row, and its ledger
verifies and settles on; a database from a newer gateway is refused and left
as it was; a step that fails leaves the database at its old version."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from peergrid import schema
from peergrid.commissioning import installer
from peergrid.community import registry as reg
from peergrid.control import loop
from peergrid.ingest.store import Store
from peergrid.ingest.validate import Accepted, Duplicate, Rejected, Validator
from peergrid.market import ledger
from peergrid.market.settle import Tariff
from peergrid.market.settler import SCHEMA as SETTLER_SCHEMA
from peergrid.market.settler import Settler, load_key
from protocol.errors import E_REPLAY
from protocol.link import DeviceLink

DATA = Path(__file__).parent / "data"
INFO = json.loads((DATA / "gateway-v1.json").read_text())
C = INFO["community"]
T0 = INFO["t0"]


def _v1(tmp: Path) -> tuple[Path, Path]:
    """A copy of the version-1 database and its ledger key."""
    db, key = tmp / "gw.db", tmp / "ledger.key"
    shutil.copyfile(DATA / "gateway-v1.sqlite", db)
    shutil.copyfile(DATA / "gateway-v1.ledger.key", key)
    return db, key


def _raw(p: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(p), isolation_level=None)


def _shape(db: sqlite3.Connection) -> dict[str, object]:
    """Every table's columns and every index's table and columns."""
    out: dict[str, object] = {}
    for kind, name, tbl in db.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"):
        if kind == "table":
            out[name] = [(c[1], c[2], c[3], c[5]) for c in db.execute(f"PRAGMA table_info({name})")]
        elif kind == "index":
            out[name] = (tbl, [c[2] for c in db.execute(f"PRAGMA index_info({name})")])
        else:
            out[name] = (kind, tbl)
    return out


def _dump(p: Path) -> tuple[int, list[str]]:
    with _raw(p) as db:
        return schema.version(db), list(db.iterdump())


def test_version_1_database_is_upgraded_keeps_its_data_and_settles_on(tmp_path, caplog) -> None:
    dbp, keyp = _v1(tmp_path)
    with _raw(dbp) as raw:
        assert schema.version(raw) == 0 and not schema.table_exists(raw, "schema_history")
    with caplog.at_level(logging.INFO, logger="peergrid.schema"):
        db = reg.connect(dbp)
    assert schema.version(db) == schema.CURRENT == 4
    hist = list(db.execute("SELECT version, what FROM schema_history ORDER BY version"))
    assert [v for v, _ in hist] == [1, 2, 3, 4] and "before schema versions" in hist[0][1]
    logged = [r.getMessage() for r in caplog.records if r.name == "peergrid.schema"]
    assert len(logged) == 4 and "schema version 2" in logged[1] and str(dbp) in logged[1]
    assert "schema version 3" in logged[2] and "schema version 4" in logged[3]
    assert db.execute("SELECT sql FROM sqlite_master WHERE name='readings_t'").fetchone() is not None
    plan = " ".join(r[3] for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT 1 FROM readings WHERE community=? AND t_recv > ? AND t >= ? AND t <= ? LIMIT 1",
        (C, 0, 0, 1)))
    assert "readings_t" in plan, plan
    # every row is still there
    for table, n in INFO["counts"].items():
        assert db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == n, table
    assert reg.connect(dbp) is not None and schema.migrate(db) == []       # once only
    assert schema.version(db) == 4 and db.execute("SELECT COUNT(*) FROM schema_history").fetchone()[0] == 4

    # the ledger: the same entries, verifying, and settlement goes on from its head
    st = Settler(db, C, load_key(keyp), Tariff(*INFO["tariff"]), INFO["interval_s"], INFO["grace_s"])
    before = st.export()
    assert len(ledger.verify(before)) == INFO["ledger_entries"]
    assert hashlib.sha256(st.ledger.entries[-1]).hexdigest() == INFO["ledger_head_sha256"]
    assert st.settle_due(INFO["last_reading_t"] + INFO["grace_s"]) == 3
    assert st.settle_due(INFO["last_reading_t"] + INFO["grace_s"]) == 0
    after = st.export()
    assert after.startswith(before)
    entries = ledger.verify(after)
    starts = [e.body["start"] for e in entries if e.type == "settlement"]
    assert starts == INFO["settled"] + [T0 + 1800, T0 + 2700, T0 + 3600]
    last = [e for e in entries if e.type == "settlement"][-1]
    assert last.body["tariff"][:2] == [32, 9]            # the tariff change recorded in the old ledger
    assert sum(last.body["flows"][1::3]) > 0

    # the replay state rebuilt from the old frames: a redelivered frame is a
    # duplicate, an old number with other bytes a replay, the next reading accepted
    r = reg.Registry(db)
    store = Store(reg.connect(dbp), lambda c, d: 0, read_db=db)
    val = Validator(C, r.device, 300, 3600, history=store.history, readings=store.energy_history)
    dev = INFO["devices"][0]
    link = DeviceLink(C, dev, hashlib.sha256(f"peergrid fixture device {dev}".encode()).digest())
    t = INFO["last_reading_t"]
    (old,) = db.execute("SELECT frame FROM frames WHERE device=? AND kind='reading' AND seq=76", (dev,)).fetchone()
    assert isinstance(val.check(link.t_reading, bytes(old), t + 5), Duplicate)
    imp = db.execute("SELECT grid_imp_wh FROM readings WHERE device=? AND seq=76", (dev,)).fetchone()[0]
    with pytest.raises(Rejected) as e:
        val.check(link.t_reading, bytes(link.reading(1, 40, t, 0, 2300, 5000, [1, imp, 0, 5, 0, 0, 0, 0], 2)), t + 5)
    assert e.value.code == E_REPLAY
    new = val.check(link.t_reading, bytes(link.reading(1, 77, t + 60, 0, 2300, 5000,
                                                       [1800, imp + 30, 0, 5, 0, 0, 0, 0], 2)), t + 61)
    assert isinstance(new, Accepted)
    store.write([new], [], {})
    assert db.execute("SELECT MAX(seq) FROM readings WHERE device=?", (dev,)).fetchone()[0] == 77


def test_a_new_database_has_the_schema_of_an_upgraded_one(tmp_path) -> None:
    old, _ = _v1(tmp_path)
    reg.connect(old).close()
    new = reg.connect(tmp_path / "new.db")
    assert schema.version(new) == schema.CURRENT
    assert [v for (v,) in new.execute("SELECT version FROM schema_history")] == [1, 2, 3, 4]
    # every owner creates its tables, as a gateway does on first use
    reg.Registry(new)
    Store(new, lambda c, d: 0)
    new.executescript(SETTLER_SCHEMA + loop.SCHEMA + installer.SCHEMA)
    with _raw(old) as o:
        assert _shape(new) == _shape(o)


def test_a_database_of_a_newer_gateway_is_refused_untouched(tmp_path) -> None:
    dbp, _ = _v1(tmp_path)
    reg.connect(dbp).close()
    with _raw(dbp) as raw:
        raw.execute(f"PRAGMA user_version = {schema.CURRENT + 1}")
    before = _dump(dbp)
    with pytest.raises(schema.SchemaError) as e:
        reg.connect(dbp)
    msg = str(e.value)
    assert f"schema version {schema.CURRENT + 1}, newer than this gateway knows ({schema.CURRENT})" in msg
    assert str(dbp) in msg
    assert _dump(dbp) == before
    # the command line stops with the message, not a traceback
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n')
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfg), "status"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "newer than this gateway knows" in r.stderr and "Traceback" not in r.stderr
    assert _dump(dbp) == before


def _breaks(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE half_done (x)")
    db.execute("DELETE FROM readings")
    db.execute("CREATE INDEX frames_t ON frames (t_recv)")
    raise RuntimeError("step failed halfway")


@pytest.mark.parametrize("broken", [_breaks, ("CREATE TABLE half_done (x)", "DELETE FROM frames", "NOT SQL")],
                         ids=["function", "sql"])
def test_a_failing_step_leaves_the_database_at_its_old_version(tmp_path, broken) -> None:
    dbp, _ = _v1(tmp_path)
    steps = schema.MIGRATIONS + (schema.Migration("a step that fails", broken),)
    # from the version-1 database without a recorded version: nothing of the
    # good step before the broken one stays either
    before = _dump(dbp)
    assert before[0] == 0
    db = _raw(dbp)
    with pytest.raises(schema.SchemaError) as e:
        schema.migrate(db, steps)
    assert f"from schema version 0 to {schema.CURRENT + 1} failed at the step to version {schema.CURRENT + 1}" in str(e.value)
    assert "still at version 0" in str(e.value) and not db.in_transaction
    db.close()
    assert _dump(dbp) == before
    # from the current version
    reg.connect(dbp).close()
    before = _dump(dbp)
    assert before[0] == schema.CURRENT
    db = _raw(dbp)
    with pytest.raises(schema.SchemaError, match=f"still at version {schema.CURRENT}"):
        schema.migrate(db, steps)
    db.close()
    assert _dump(dbp) == before
    # and the gateway still opens it as it was
    assert reg.connect(dbp).execute("SELECT COUNT(*) FROM readings").fetchone()[0] == INFO["counts"]["readings"]
