"""Bounded everything, and a ledger that survives a failed write (issue 17):

- E_TAG failures throttled per device: past the limit within a second, a
  device's frames are dropped unverified and counted, and only for the rest
  of that second (a flood under an honest board's id costs it no more);
- the quarantine within its bytes as well as its rows, large frames kept as
  a prefix with their length and SHA-256;
- a full disk reported as SQLite reports it ("database or disk is full"),
  logged with the exception, nothing acknowledged meanwhile;
- a ledger whose database fills up in the middle of settling: an append
  that does not commit leaves no trace in memory or on disk, the next one
  continues the chain, and after freeing space `peergrid ledger verify`
  passes with every interval settled exactly once;
- NaN and infinities refused wherever numbers come in (registry, command
  line, config; a registry row from before fails closed);
- the database, its WAL and SHM readable by the gateway's user only.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from peergrid.market import ledger
from peergrid.community import registry as reg
from peergrid.community.registry import Device
from peergrid.market.settle import Tariff
from peergrid.market.settler import Settler, load_key
from peergrid.ingest.store import Store, quarantined
from peergrid.ingest.validate import Accepted, Rejected, Throttled, Validator
from protocol import cose
from protocol.errors import E_PLAUSIBILITY, E_TAG
from protocol.link import DeviceLink
from test_settler import DAY0, _day

C = "oak"
SECRET = bytes(range(32))
WRONG = bytes(range(1, 33))
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]


def _validator(limit: int = 5, channels: list | None = None) -> Validator:
    def lookup(c: str, d: str) -> Device | None:
        return Device(c, d, None, SECRET, "sim", channels or CH, None, 1, None) if d in ("d1", "d2") else None

    return Validator(C, lookup, tag_failures_per_s=limit)


class _Board:
    def __init__(self, device: str, secret: bytes = SECRET) -> None:
        self.link = DeviceLink(C, device, secret)
        self.seq = 0

    def reading(self, t: float) -> tuple[str, bytes]:
        self.seq += 1
        f = self.link.reading(1, self.seq, int(t), 0, 2300, 5000, [500, 1000 + self.seq, 10, 2100, 0, 0, 0, 0], 2)
        return self.link.t_reading, bytes(f)


# -- E_TAG throttle ---------------------------------------------------------------------

def test_tag_failures_throttle_a_device_for_the_rest_of_the_second() -> None:
    v = _validator(limit=5)
    calls = [0]
    real = v.verifier.open

    def counting(topic, frame):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(topic, frame)

    v.verifier.open = counting  # type: ignore[method-assign]
    honest, forger, other = _Board("d1"), _Board("d1", WRONG), _Board("d2")
    t = 1000.0
    # five forged tags are verified and rejected...
    for k in range(5):
        with pytest.raises(Rejected) as e:
            v.check(*forger.reading(t + 0.01 * k), t + 0.01 * k)
        assert e.value.code == E_TAG
    # ...then the device's frames are dropped unverified, the honest one too
    for k in range(100):
        with pytest.raises(Throttled):
            v.check(*forger.reading(t + 0.1), t + 0.1)
    with pytest.raises(Throttled):
        v.check(*honest.reading(t + 0.5), t + 0.5)
    assert calls[0] == 5
    # another device is not affected
    assert isinstance(v.check(*other.reading(t + 0.5), t + 0.5), Accepted)
    # the drop window ends with the second: the honest board is heard again
    assert isinstance(v.check(*honest.reading(t + 1.0), t + 1.0), Accepted)
    # a tag limit of 0 throttles nothing
    v0 = _validator(limit=0)
    for k in range(50):
        with pytest.raises(Rejected):
            v0.check(*forger.reading(t), t)


def test_a_forgery_flood_costs_an_honest_board_only_the_throttled_part_of_each_second() -> None:
    """1000 forged frames a second for 20 s under d1's id while d1 reads every
    second at a random point of it: per second at most 5 verifications; an
    honest reading is lost only when it falls after the fifth forgery of its
    second, every loss is a counted drop, and the first reading after the
    flood is accepted."""
    v = _validator(limit=5)
    rng = random.Random(7)
    honest, forger = _Board("d1"), _Board("d1", WRONG)
    events = [(1000 + k / 1000, "f") for k in range(20_000)]
    events += [(1000 + s + rng.random(), "h") for s in range(20)]
    events += [(1020.0 + 0.5, "h")]                                  # after the flood
    events.sort()
    verified: dict[int, int] = {}
    got = {"h_ok": 0, "h_dropped": 0, "f_rejected": 0, "f_dropped": 0}
    last = None
    for t, who in events:
        b = honest if who == "h" else forger
        try:
            r = v.check(*b.reading(t), t)
            assert who == "h" and isinstance(r, Accepted)
            got["h_ok"] += 1
            last = t
        except Throttled:
            got[f"{who}_dropped"] += 1
        except Rejected as e:
            assert who == "f" and e.code == E_TAG
            got["f_rejected"] += 1
            verified[int(t)] = verified.get(int(t), 0) + 1
    assert max(verified.values()) == 5 and got["f_rejected"] == 5 * 20
    assert got["f_dropped"] == 20_000 - 100
    assert got["h_ok"] + got["h_dropped"] == 21 and last == 1020.5
    # an honest reading in the first 5 ms of its second got through
    assert got["h_ok"] >= 1


# -- quarantine within its bytes ------------------------------------------------------------

def test_quarantine_stays_within_its_bytes_and_rows(tmp_path) -> None:
    db = reg.connect(tmp_path / "gw.db")
    budget = 64 * 1024
    s = Store(db, lambda c, d: 0, quarantine_max=400, quarantine_bytes=budget, frame_bytes=512)
    rng = random.Random(1)
    big = os.urandom(1 << 20)
    for batch in range(200):
        rej = []
        for k in range(10):
            frame = big[: rng.choice((0, 40, 120, 511, 512, 513, 5000, 1 << 20))]
            item = (time.time(), f"pg/oak/d{k}/reading", f"d{k}", 24, "forged tag " * rng.randrange(30), frame)
            rej.append(item if k % 2 else item[:5] + quarantined(frame, 512))
        s.write([], rej, {})
        size, rows = s.quarantine_size()
        assert size <= budget and rows <= 400, (batch, size, rows)
    # the newest are kept; a long frame as its prefix, length and digest
    newest = db.execute("SELECT frame, length, digest FROM quarantine ORDER BY id DESC LIMIT 10").fetchall()
    assert any(n == 1 << 20 for _, n, _ in newest)
    for frame, n, digest in newest:
        assert frame == big[: min(n, 512)] and digest == hashlib.sha256(big[:n]).digest()
    # the row bound alone, with a generous byte budget
    s2 = Store(reg.connect(tmp_path / "gw2.db"), lambda c, d: 0, quarantine_max=50, quarantine_bytes=1 << 30)
    for _ in range(30):
        s2.write([], [(0.0, "t", None, 1, "r", b"x")] * 7, {})
        assert s2.quarantine_size()[1] <= 50


# -- a full disk -----------------------------------------------------------------------------

def _fill(db: sqlite3.Connection, spare: int = 0) -> None:
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + spare}")


def test_full_disk_is_reported_as_sqlite_says_and_nothing_is_lost(tmp_path, caplog) -> None:
    from peergrid.config import Config
    from peergrid.ingest.service import Gateway

    cfg = Config(community=C, db=tmp_path / "gw.db", batch=50, batch_ms=5)
    gw = Gateway(cfg)
    db = gw.store.db
    # the store itself: the real error, and nothing of the batch kept
    _fill(db)
    rej = [(time.time(), "pg/oak/x/reading", "x", 24, "forged", os.urandom(400)) for _ in range(200)]
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        gw.store.write([], rej, {(C, "x", "reject:tag"): 200})
    assert not db.in_transaction
    assert db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM counters").fetchone()[0] == 0
    # the writer: logs that error with its exception and retries; once there
    # is room, everything queued is stored
    caplog.set_level(logging.ERROR, "peergrid.gateway")
    for k, item in enumerate(rej):
        gw.q.put(("rej", k, 0, item[:5] + quarantined(item[5]), "tag", time.monotonic()))
    th = threading.Thread(target=gw._writer, daemon=True)
    th.start()
    deadline = time.monotonic() + 20
    while gw.metrics.counts.get("store_errors", 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    recs = [r for r in caplog.records if "store failed" in r.getMessage()]
    assert recs and "database or disk is full" in recs[0].getMessage() and recs[0].exc_info is not None
    assert "cannot rollback" not in caplog.text
    db.execute("PRAGMA max_page_count = 1073741823")
    while db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0] < 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gw.stop_event.set()
    th.join(5)
    assert db.execute("SELECT SUM(n) FROM counters WHERE what='reject:tag'").fetchone()[0] == 200


def test_ledger_survives_a_disk_that_fills_up_while_settling(tmp_path) -> None:
    dbp = tmp_path / "gw.db"
    _day(dbp, members=5)
    db = reg.connect(dbp)
    s = Settler(db, C, load_key(tmp_path / "ledger.key"), Tariff(3187, 812, 20000), first_start=DAY0)
    s.record("member_joined", DAY0, {"member": 1, "name": "house 0"})
    rng = random.Random(17)
    failures = 0
    end = DAY0 + 86400 + 120
    while True:
        # a little room, sometimes none: the disk fills in the middle of
        # settling, at a different point each time
        _fill(db, rng.choice((0, 0, 1, 2)))
        try:
            if s.settle_due(end) == 0:
                break
        except sqlite3.OperationalError as e:
            failures += 1
            assert "database or disk is full" in str(e), e
            assert not db.in_transaction
            disk = [bytes(r[0]) for r in db.execute("SELECT raw FROM ledger ORDER BY n")]
            # no trace: memory is what the disk holds, and the chain continues from it
            assert s.ledger.entries == disk
            assert s.ledger._prev == hashlib.sha256(disk[-1]).digest()
            if failures % 5 == 0:
                # records fail the same way (a tariff change on a full disk)
                _fill(db)
                with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
                    s.record("tariff", DAY0, {"from": DAY0 + 2 * 86400, "tariff": Tariff(1, 1).as_list()})
                assert s.ledger.entries == disk
            db.execute("PRAGMA max_page_count = 1073741823")
            if rng.random() < 0.5:
                continue                                # freed at once, or filled again
    assert failures >= 5
    db.execute("PRAGMA max_page_count = 1073741823")
    assert s.settle_due(end) == 0
    starts = [r[0] for r in db.execute("SELECT start FROM settled WHERE community=? ORDER BY start", (C,))]
    assert starts == list(range(DAY0, DAY0 + 86400, 900))           # none missing
    out = tmp_path / "ledger.cbor"
    out.write_bytes(s.export())
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "ledger", "verify", str(out)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "ledger verifies" in r.stdout, r.stderr
    entries = ledger.verify(out.read_bytes())
    sett = [e.body["start"] for e in entries if e.type == "settlement"]
    assert sett == starts                                            # each once, in order
    assert [e.n for e in entries] == list(range(len(entries)))
    assert not [e for e in entries if e.type == "tariff"]           # the failed records left nothing


# -- NaN and infinities --------------------------------------------------------------------------

@pytest.mark.parametrize("rating", [float("nan"), float("inf"), -float("inf"), "100", True, None, 0, -5, 1e6])
def test_registry_refuses_ratings_that_are_not_amperes(tmp_path, rating) -> None:
    r = reg.Registry(reg.connect(tmp_path / "gw.db"))
    r.add_community(C)
    with pytest.raises(reg.RegistryError, match="rating_a"):
        r.add_device(C, "d1", "sim", [{"role": "grid", "rating_a": rating}])
    assert r.device(C, "d1") is None


def test_a_nan_rating_from_an_old_registry_fails_closed() -> None:
    for bad in (float("nan"), float("inf")):
        v = _validator(channels=[{"role": "grid", "rating_a": bad}, {"role": "pv", "rating_a": 50}])
        with pytest.raises(Rejected) as e:
            v.check(*_Board("d1").reading(1000), 1000)
        assert e.value.code == E_PLAUSIBILITY


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfg), *args], capture_output=True,
                          text=True, timeout=60)


def test_command_line_and_config_refuse_nan_and_infinities(tmp_path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n')
    for ch in ("grid:nan", "grid:inf", "grid:-inf", "grid:1e400", "grid:NaN", "grid:0", "grid:x"):
        r = _cli(cfg, "device", "add", "d1", "--channel", ch)
        assert r.returncode == 1 and "rating" in r.stderr, (ch, r.stderr)
    r = _cli(cfg, "device", "list")
    assert r.returncode == 0 and "d1" not in r.stdout
    for args in (("installer-token", "x", "--days", "nan"), ("installer-token", "x", "--days", "inf"),
                 ("resource", "feeder", "--import-kw", "nan", "--export-kw", "1"),
                 ("resource", "battery", "b", "--device", "d", "--capacity-wh", "1", "--max-charge-w", "1",
                  "--max-discharge-w", "1", "--efficiency", "nan")):
        r = _cli(cfg, *args)
        assert r.returncode == 2 and "finite" in r.stderr, (args, r.stderr)
    from peergrid.commissioning import installer

    with pytest.raises(reg.RegistryError):
        installer.make_token(reg.connect(tmp_path / "gw.db"), "x", float("nan"))
    for line in ("[ingest]\nmax_skew_s = nan\n", "[ingest]\nmax_future_s = inf\n", "[control]\nperiod_s = -inf\n"):
        cfg.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n' + line)
        r = _cli(cfg, "status")
        assert r.returncode != 0 and "not a finite number" in r.stderr, (line, r.stderr)


# -- the database is the gateway's alone -------------------------------------------------------

def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_database_wal_and_shm_are_private(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        p = tmp_path / "gw.db"
        db = reg.connect(p)
        reg.Registry(db).add_community(C)
        for f in (p, tmp_path / "gw.db-wal", tmp_path / "gw.db-shm"):
            assert f.exists() and _mode(f) == 0o600, (f, oct(_mode(f)))
        db.close()
        # a database made before (0644, and its WAL and SHM) is made private
        q = tmp_path / "old.db"
        raw = sqlite3.connect(str(q))
        raw.execute("PRAGMA journal_mode=WAL")
        raw.execute("CREATE TABLE t (x)")
        raw.execute("INSERT INTO t VALUES (1)")
        raw.commit()
        assert _mode(q) == 0o644 and _mode(tmp_path / "old.db-wal") == 0o644
        reg.connect(q).execute("SELECT 1")
        for f in (q, tmp_path / "old.db-wal", tmp_path / "old.db-shm"):
            assert _mode(f) == 0o600, (f, oct(_mode(f)))
        raw.close()
    finally:
        os.umask(old)
    # the command line under a permissive umask: database and keys private
    cfg = tmp_path / "c" / "gw.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n[settlement]\nretail = 30\nfeed_in = 8\n')
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfg), "member", "add", "house 1"],
                       capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0o022))
    assert r.returncode == 0, r.stderr
    for f in ("gw.db", "ledger.key"):
        assert _mode(cfg.parent / f) == 0o600, f


def test_quarantine_keeps_frames_small_on_the_way_in() -> None:
    frame = os.urandom(3 << 20)
    prefix, n, digest = quarantined(frame, 512)
    assert prefix == frame[:512] and n == len(frame) and digest == hashlib.sha256(frame).digest()


# -- end to end: a forgery flood through mosquitto -----------------------------------------------

@pytest.mark.broker
def test_forgery_flood_through_the_broker_is_throttled_counted_and_bounded(tmp_path) -> None:
    """A flood of forged tags under house-a's id, published on house-a's own
    broker account (the only one the ACL lets write its topics), with big
    frames among them, while house-a and house-b keep reading: at most
    `tag_failures_per_s` verifications a second, every frame accounted for
    (verified and rejected, dropped and counted, or stored), the quarantine
    within its bytes, and house-a heard again as soon as the flood stops."""
    import urllib.request

    from test_gateway_ingest import Rig, _reseal

    rig = Rig(tmp_path)
    rig.cfg.write_text(rig.cfg.read_text() + "tag_failures_per_s = 5\nquarantine_bytes = 20000\n")
    try:
        rig.start_gateway()
        a, b = rig.board("house-a"), rig.board("house-b")
        evil = rig.board("house-a")
        t, good = a.reading(seq=10_000)
        payload = cose.open_frame(good, t.encode(), b"house-a",
                                  lambda k, al: cose.derive_keys(rig.creds["house-a"][0])[0], (4,))
        forged = _reseal(rig.creds["house-b"][0], "house-a", payload)
        honest = 0
        sent = 0
        infos = []
        t0 = time.monotonic()
        next_honest = t0
        while time.monotonic() - t0 < 3:
            for _ in range(50):
                infos.append(evil.c.publish(t, forged if sent % 100 else forged + bytes(200_000), qos=1))
                sent += 1
            infos[-50].wait_for_publish(10)           # a pipeline, not an unbounded queue here
            if time.monotonic() >= next_honest:
                a.send(*a.reading())
                b.send(*b.reading())
                honest += 1
                next_honest += 0.2
        for i in infos:
            i.wait_for_publish(30)
        flood_s = time.monotonic() - t0
        time.sleep(1.2)                               # the drop window is over
        after = [a.reading() for _ in range(5)]
        for x in after:
            a.send(*x)

        def counts() -> dict[str, int]:
            with rig.db() as db:
                return {w: n for w, n in db.execute("SELECT what, SUM(n) FROM counters WHERE device='house-a'"
                                                    " GROUP BY what")}

        total = sent + honest + len(after)
        rig.wait(lambda: counts().get("reject:tag", 0) + counts().get("reject:too_big", 0)
                 + counts().get("drop:tag_throttled", 0) + len(rig.stored("house-a")) == total, 60,
                 f"{total} frames for house-a accounted for")
        c = counts()
        # verified forgeries: at most 5 in each second the flood touched
        assert c["reject:tag"] <= 5 * (int(flood_s) + 3), (c, flood_s)
        assert c["drop:tag_throttled"] >= sent - c["reject:tag"] - c.get("reject:too_big", 0)
        # house-a is heard again at once, house-b never stopped
        seqs = {s for _, s in rig.stored("house-a")}
        assert all(s in seqs for s in range(honest, honest + 5))
        assert len(rig.stored("house-b")) == honest
        with rig.db() as db:
            size = db.execute("SELECT SUM(length(frame) + length(CAST(topic AS BLOB)) + length(CAST(reason AS BLOB))"
                              " + 64), MAX(length), MAX(length(frame)) FROM quarantine").fetchone()
        assert size[0] <= 20000 and size[2] <= 512, size
        text = urllib.request.urlopen(f"http://127.0.0.1:{rig.http_port}/metrics", timeout=5).read().decode()
        assert 'peergrid_rejected_total{reason="tag_throttled",device="house-a"}' in text
        log = (tmp_path / "gw.log").read_text()
        assert log.count("forged tags (E_TAG) within a second") == 1
        for x in (a, b, evil):
            x.close()
    finally:
        rig.stop()
