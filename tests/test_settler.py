"""Settling from the store into the ledger, each interval exactly once, with
the settling process killed (SIGKILL) at random points of a simulated day."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peergrid.market import ledger
from peergrid.community import registry as reg
from peergrid.ingest import store as st
from peergrid.market.settle import Tariff
from peergrid.market.settler import Settler, load_key

DAY0 = 1_795_046_400 - (1_795_046_400 % 86400)      # a midnight
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]


def _day(db_path: Path, members: int = 5) -> None:
    db = reg.connect(db_path)
    r = reg.Registry(db)
    r.add_community("oak")
    st.init(db)
    db.execute("PRAGMA foreign_keys=OFF")     # readings without their raw frames, for this test only
    rng = random.Random(11)
    fid = 0
    for m in range(members):
        mid = r.add_member("oak", f"house {m}")
        r.add_device("oak", f"d{m}", "sim", CH, mid)
        imp = exp = 0
        boot = 1
        db.execute("BEGIN")
        for k in range(0, 86400 + 1800, 60):
            t = DAY0 + k
            hod = k / 3600
            pv = max(0.0, 3000 * (1 - abs(hod - 12) / 6)) if m % 2 == 0 else 0
            load = 300 + rng.randrange(0, 900)
            net = load - pv
            if net >= 0:
                imp += int(net / 60)
            else:
                exp += int(-net / 60)
            if m == 3 and k == 40000:
                boot += 1                      # a reboot with registers restored a little lower
                imp -= 20
            fid += 1
            db.execute("INSERT INTO readings (frame_id, community, device, boot, seq, t, t_board, t_recv, flags,"
                       " grid_w, grid_imp_wh, grid_exp_wh, ch) VALUES (?, 'oak', ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, '[]')",
                       (fid, f"d{m}", boot, k, t, t, t, imp, exp))
        db.execute("COMMIT")
    db.close()


CHILD = r"""
import sys, time
from pathlib import Path
from peergrid.community import registry as reg
from peergrid.market.settle import Tariff
from peergrid.market.settler import Settler, load_key
db = reg.connect(sys.argv[1])
s = Settler(db, "oak", load_key(Path(sys.argv[2])), Tariff(3187, 812, 20000), first_start=int(sys.argv[3]))
now = int(sys.argv[3])
while now <= int(sys.argv[3]) + 86400 + 900:
    if s.settle_due(now, limit=1):
        time.sleep(0.01)
    else:
        now += 300
print("done", flush=True)
"""


def test_every_interval_once_despite_kills(tmp_path) -> None:
    dbp = tmp_path / "gw.db"
    _day(dbp)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    keyp = tmp_path / "ledger.key"
    rng = random.Random(3)
    kills = 0
    for _ in range(40):
        p = subprocess.Popen([sys.executable, str(script), str(dbp), str(keyp), str(DAY0)],
                             stdout=subprocess.PIPE, text=True)
        try:
            out, _ = p.communicate(timeout=rng.uniform(0.3, 0.9))
            if "done" in out:
                break
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
            kills += 1
    else:
        raise AssertionError("never finished")
    assert kills >= 2
    db = reg.connect(dbp)
    starts = [r[0] for r in db.execute("SELECT start FROM settled ORDER BY start")]
    assert starts == list(range(DAY0, DAY0 + 86400, 900))      # the 96 intervals of the day
    s = Settler(db, "oak", load_key(keyp), Tariff(3187, 812, 20000))
    entries = ledger.verify(s.export())
    sett = [e for e in entries if e.type == "settlement"]
    assert [e.body["start"] for e in sett] == starts                  # once each, in order
    # the day's energy went through: what members imported and exported
    total_imp = sum(sum(e.body["flows"][1::3]) for e in sett)
    total_exp = sum(sum(e.body["flows"][2::3]) for e in sett)
    assert total_imp > 5 * 24 * 300 * 0.5 and total_exp > 0
    assert all(sum(e.body["amounts"]) + e.body["grid"] + e.body["fund"] == 0 for e in sett)


def test_not_due_before_the_grace_period(tmp_path) -> None:
    dbp = tmp_path / "gw.db"
    _day(dbp, members=2)
    db = reg.connect(dbp)
    s = Settler(db, "oak", load_key(tmp_path / "k"), Tariff(30, 8), grace_s=120, first_start=DAY0)
    assert s.settle_due(DAY0 + 900 + 119) == 0
    assert s.settle_due(DAY0 + 900 + 120) == 1
    assert s.settle_due(DAY0 + 900 + 120) == 0                        # never twice
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600


def test_statements_from_the_ledger(tmp_path) -> None:
    from peergrid.market import statements as stm

    dbp = tmp_path / "gw.db"
    _day(dbp, members=3)
    db = reg.connect(dbp)
    s = Settler(db, "oak", load_key(tmp_path / "k"), Tariff(3187, 812, 20000), first_start=DAY0)
    assert s.settle_due(DAY0 + 86400 + 120) == 96
    entries = ledger.verify(s.export())
    c = stm.statements(entries, DAY0, DAY0 + 86400)
    assert sorted(c.members) == [1, 2, 3] and all(m.intervals == 96 for m in c.members.values())
    # energy adds up: locally bought = locally sold = local; every Wh is somewhere
    assert sum(m.bought_local_wh for m in c.members.values()) == c.local_wh
    assert sum(m.sold_local_wh for m in c.members.values()) == c.local_wh
    assert sum(m.bought_local_wh + m.bought_grid_wh for m in c.members.values()) == c.demand_wh
    # money: members, grid and fund balance over the day; nobody worse off
    grid = sum(e.body["grid"] for e in entries if e.type == "settlement")
    assert sum(m.paid for m in c.members.values()) + grid - c.fund == 0
    assert all(m.saving >= 0 for m in c.members.values())
    assert c.fund > 0 and 0 < c.self_sufficiency <= 1 and 0 < c.self_consumption <= 1
    text = stm.to_table(c)
    assert "self-sufficiency" in text and len(text.splitlines()) == 11
    # the three baselines: exports unpaid costs the most; netting at retail values exports highest
    for m in c.members.values():
        assert m.grid_only >= m.feed_in_only >= m.net_metering(feed_in=c.feed_in) - 1, m
    b = stm.baselines(c, grid_g_per_kwh=400)
    assert b.grid_only >= b.feed_in_only and b.paid == sum(m.paid for m in c.members.values())
    assert b.co2_kg == pytest.approx(float(c.grid_import_wh) * 400 / 1e6) and b.peak_import_w > 0
    assert "net metering (netted over the period at retail)" in text
    csv_text = stm.to_csv(c)
    assert csv_text.splitlines()[0].startswith("member,intervals,bought_local_kwh")
    assert len(csv_text.splitlines()) == 4


def test_late_readings_become_adjustments(tmp_path) -> None:
    from peergrid.market import statements as stm

    dbp = tmp_path / "gw.db"
    _day(dbp, members=3)
    db = reg.connect(dbp)
    # device d1 was offline from 10:00 to 14:00: its readings are not there
    # when the day is settled, and arrive (buffered) afterwards
    lo, hi = DAY0 + 10 * 3600, DAY0 + 14 * 3600
    late = db.execute("SELECT * FROM readings WHERE device='d1' AND t > ? AND t < ?", (lo, hi)).fetchall()
    db.execute("DELETE FROM readings WHERE device='d1' AND t > ? AND t < ?", (lo, hi))
    s = Settler(db, "oak", load_key(tmp_path / "k"), Tariff(3187, 812, 20000), first_start=DAY0)
    settled_at = DAY0 + 86400 + 120
    assert s.settle_due(settled_at) == 96
    assert s.adjust_due(settled_at + 60) == 0              # nothing new yet
    db.execute("PRAGMA foreign_keys=OFF")
    db.execute("BEGIN")
    for row in late:
        row = list(row)
        row[7] = settled_at + 600                          # t_recv: after the settlement
        db.execute(f"INSERT INTO readings VALUES ({','.join('?' * len(row))})", row)
    db.execute("COMMIT")
    n = s.adjust_due(settled_at + 900)
    assert n > 0
    assert s.adjust_due(settled_at + 1200) == 0            # each difference recorded once
    entries = ledger.verify(s.export())
    adj = [e for e in entries if e.type == "adjustment"]
    assert len(adj) == n
    for e in adj:
        assert sum(d for _, d in e.body["delta"]["members"]) + e.body["delta"]["grid"] + e.body["delta"]["fund"] == 0
        assert lo - 900 <= e.body["start"] < hi + 900
    # statements follow the adjusted figures: the same as settling with all data
    c = stm.statements(entries, DAY0, DAY0 + 86400)
    db2p = tmp_path / "ref.db"
    _day(db2p, members=3)
    ref = Settler(reg.connect(db2p), "oak", load_key(tmp_path / "k2"), Tariff(3187, 812, 20000), first_start=DAY0)
    ref.settle_due(settled_at)
    c_ref = stm.statements(ledger.verify(ref.export()), DAY0, DAY0 + 86400)
    for m in (1, 2, 3):
        assert c.members[m].paid == c_ref.members[m].paid
        assert c.members[m].bought_local_wh == c_ref.members[m].bought_local_wh
    assert c.fund == c_ref.fund
    # a forged adjustment that does not start from the figures in force is refused
    body = dict(adj[0].body)
    body["replaces"] = 1
    s.record("adjustment", 0, body)
    import pytest
    with pytest.raises(ledger.LedgerError, match="figures in force"):
        ledger.verify(s.export())


def test_tariff_change_takes_effect_at_a_later_boundary(tmp_path) -> None:
    import pytest

    dbp = tmp_path / "gw.db"
    _day(dbp, members=2)
    db = reg.connect(dbp)
    s = Settler(db, "oak", load_key(tmp_path / "k"), Tariff(3000, 800), first_start=DAY0)
    assert s.settle_due(DAY0 + 4 * 900 + 120) == 4
    with pytest.raises(ValueError):
        s.set_tariff(Tariff(3500, 700), DAY0 + 900, DAY0 + 5000)        # already settled
    with pytest.raises(ValueError):
        s.set_tariff(Tariff(3500, 700), DAY0 + 8 * 900 + 1, DAY0 + 5000)  # not a boundary
    s.set_tariff(Tariff(3500, 700, 0, "mmr"), DAY0 + 8 * 900, DAY0 + 5000)
    s.settle_due(DAY0 + 12 * 900 + 120)
    entries = ledger.verify(s.export())
    sett = [e for e in entries if e.type == "settlement"]
    assert [e.body["tariff"][0] for e in sett] == [3000] * 8 + [3500] * 4
    assert sett[-1].body["tariff"][3] == "mmr"
    assert any(e.type == "tariff" for e in entries)


def test_registry_limits_and_partners_reach_the_ledger(tmp_path) -> None:
    import pytest

    from peergrid.community.registry import RegistryError

    dbp = tmp_path / "gw.db"
    _day(dbp, members=4)            # members 1 and 3 have PV
    db = reg.connect(dbp)
    r = reg.Registry(db)
    r.add_partner("oak", 1, 2, 2500)            # more than the tariff allows: capped at 3000-100-800
    r.add_partner("oak", 3, 4, 300)
    r.set_limits("oak", 2, 2900, None)
    r.set_limits("oak", 3, 5000, 900)            # a bid above retail counts as retail
    with pytest.raises(RegistryError):
        r.add_partner("oak", 2, 2, 10)
    with pytest.raises(RegistryError):
        r.set_limits("oak", 9, 10, 10)
    assert r.partners("oak") == [(1, 2, 2500), (3, 4, 300)]
    s = Settler(db, "oak", load_key(tmp_path / "k"), Tariff(3000, 800, 0, "auction", 100, 100_000),
                first_start=DAY0)
    assert s.settle_due(DAY0 + 86400 + 120) == 96
    entries = ledger.verify(s.export())
    sett = [e for e in entries if e.type == "settlement"]
    assert all(e.body["partners"] == [1, 2, 2100, 3, 4, 300] for e in sett)
    assert all(e.body["limits"] == [3000, 800, 2900, 800, 3000, 900, 3000, 800] for e in sett)
    from peergrid.market import statements as stm
    c = stm.statements(entries, DAY0, DAY0 + 86400)
    assert c.preferred_wh > 0 and c.fund > 0          # the fund's balance
    # a partner rule removed later does not change how late data is adjusted
    r.remove_partner("oak", 1, 2)
    assert r.partners("oak") == [(3, 4, 300)]


def test_two_writers_continue_one_chain(tmp_path) -> None:
    """The running gateway's settler and a command in another process
    (`peergrid member add` records a ledger entry) share the database: each
    append continues from what the database holds, none fails on a number
    the other took."""
    dbp = tmp_path / "gw.db"
    _day(dbp, members=2)
    gw = Settler(reg.connect(dbp), "oak", load_key(tmp_path / "k"), Tariff(30, 8), grace_s=0, first_start=DAY0)
    cli = Settler(reg.connect(dbp), "oak", load_key(tmp_path / "k"), Tariff(30, 8), grace_s=0, first_start=DAY0)
    assert gw.settle_due(DAY0 + 900) == 1
    n1 = cli.record("member_joined", DAY0 + 950, {"member": 7, "name": "late"})
    assert gw.settle_due(DAY0 + 1800) == 1                   # the gateway's memory was one entry behind
    n2 = cli.record("member_left", DAY0 + 1850, {"member": 7, "balance": 0})
    entries = ledger.verify(gw.export())
    assert [e.type for e in entries].count("settlement") == 2 and n2 == n1 + 2 == len(entries) - 1
