"""Governance in the ledger (issue 10): member keys, proposals, signed
ballots, tallies that change settlement from their boundary, quorum,
forged and duplicate ballots, a tampered ballot caught by `ledger verify`,
and a 40-of-100 break-away whose two ledgers verify on their own."""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_settler import DAY0, _day

from peergrid.market import governance as gv
from peergrid.market import ledger
from peergrid.community import registry as reg
from peergrid.market import settler as stl
from peergrid.market.settle import Tariff
from peergrid.market.settler import Settler, load_key

NEW = [3500, 700, 0, "mmr", 0, 0]


def _community(tmp_path, members=5):
    dbp = tmp_path / "gw.db"
    _day(dbp, members=members)
    db = reg.connect(dbp)
    st = Settler(db, "oak", load_key(tmp_path / "k"), Tariff(3187, 812, 20000), first_start=DAY0)
    keys = {}
    for m in range(1, members + 1):
        k, pub = gv.new_key()
        keys[m] = k
        st.registry.set_member_key("oak", m, pub)
        st.record("member_joined", DAY0, {"member": m, "name": f"house {m}", "key": pub})
    return st, keys


def _vote(st, keys, proposal, votes, t):
    for m, v in votes.items():
        stl.ballot(st, gv.sign_ballot(keys[m], "oak", proposal, m, v), t)


def test_accepted_proposal_changes_settlement_from_its_boundary(tmp_path) -> None:
    st, keys = _community(tmp_path)
    assert st.settle_due(DAY0 + 4 * 900 + 120) == 4
    T = DAY0 + 5000
    p = stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "tariff", "tariff": NEW},
                                         DAY0 + 8 * 900, T + 600), T)
    _vote(st, keys, p, {1: "yes", 2: "yes", 3: "yes", 4: "no"}, T + 60)
    with pytest.raises(gv.GovernanceError, match="open until"):
        stl.tally(st, p, T + 300)                               # not before the deadline
    n, res = stl.tally(st, p, T + 700)
    assert res == {"proposal": p, "eligible": 5, "yes": 3, "no": 1, "quorum": True, "accepted": True}
    st.settle_due(DAY0 + 12 * 900 + 120)
    entries = ledger.verify(st.export())
    sett = [e for e in entries if e.type == "settlement"]
    assert [e.body["tariff"] for e in sett] == [[3187, 812, 20000, "sdr", 0, 0]] * 8 + [NEW] * 4
    assert [e for e in entries if e.type == "tariff"][0].body["by_vote"] == p


def test_interval_length_changed_by_vote(tmp_path) -> None:
    st, keys = _community(tmp_path)
    T = DAY0 + 3000
    with pytest.raises(gv.GovernanceError, match="full hour"):
        stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "interval", "minutes": 30},
                                         DAY0 + 5 * 900, T + 600), T)
    with pytest.raises(gv.GovernanceError, match="divides the hour"):
        stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "interval", "minutes": 25},
                                         DAY0 + 4 * 3600, T + 600), T)
    p = stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "interval", "minutes": 30},
                                         DAY0 + 2 * 3600, T + 600), T)
    _vote(st, keys, p, {1: "yes", 2: "yes", 3: "no"}, T + 60)
    assert stl.tally(st, p, T + 700)[1]["accepted"]
    st.settle_due(DAY0 + 4 * 3600 + 120)
    entries = ledger.verify(st.export())
    spans = [(e.body["start"], e.body["end"] - e.body["start"]) for e in entries if e.type == "settlement"]
    assert [d for s, d in spans if s < DAY0 + 2 * 3600] == [900] * 8
    assert [d for s, d in spans if s >= DAY0 + 2 * 3600] == [1800] * 4
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)
    from peergrid.market import statements as stm
    c = stm.statements(entries, DAY0, DAY0 + 4 * 3600)
    assert sum(s.intervals for s in c.members.values()) == 12 * 5


def test_proposal_without_quorum_changes_nothing(tmp_path) -> None:
    st, keys = _community(tmp_path)
    T = DAY0 + 5000
    p = stl.propose(st, gv.sign_proposal(keys[2], "oak", 2, {"kind": "tariff", "tariff": NEW},
                                         DAY0 + 8 * 900, T + 600), T)
    _vote(st, keys, p, {1: "yes", 2: "yes"}, T + 60)            # 2 of 5: below the 50 % quorum
    _, res = stl.tally(st, p, T + 700)
    assert res["quorum"] is False and res["accepted"] is False
    st.settle_due(DAY0 + 12 * 900 + 120)
    entries = ledger.verify(st.export())
    assert not [e for e in entries if e.type == "tariff"]
    assert all(e.body["tariff"][0] == 3187 for e in entries if e.type == "settlement")


def test_rules_change_by_vote_then_applies_to_the_next_proposal(tmp_path) -> None:
    st, keys = _community(tmp_path)
    T = DAY0 + 5000
    p = stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "rules", "quorum_ppm": 800_000,
                                                              "majority_ppm": 660_000, "vote_s": 0},
                                         DAY0 + 8 * 900, T + 600), T)
    _vote(st, keys, p, {1: "yes", 2: "yes", 3: "yes"}, T + 60)
    assert stl.tally(st, p, T + 700)[1]["accepted"]
    q = stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "tariff", "tariff": NEW},
                                         DAY0 + 16 * 900, T + 1600), T + 800)
    _vote(st, keys, q, {1: "yes", 2: "yes", 3: "yes", 4: "no"}, T + 900)   # 4/5 quorum, 3/4 < 2/3? no: 75 % > 66 %
    assert stl.tally(st, q, T + 1700)[1]["accepted"]
    r = stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "feeder", "import_w": 90000,
                                                              "export_w": 90000}, DAY0 + 24 * 900, T + 2600), T + 1800)
    _vote(st, keys, r, {1: "yes", 2: "yes", 3: "no"}, T + 1900)              # 3/5 misses the new 80 % quorum
    assert not stl.tally(st, r, T + 2700)[1]["quorum"]
    ledger.verify(st.export())


def test_forged_duplicate_late_and_outsider_ballots_are_refused(tmp_path) -> None:
    st, keys = _community(tmp_path)
    T = DAY0 + 5000
    p = stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "tariff", "tariff": NEW},
                                         DAY0 + 8 * 900, T + 600), T)
    stl.ballot(st, gv.sign_ballot(keys[1], "oak", p, 1, "yes"), T + 10)
    with pytest.raises(gv.GovernanceError, match="already"):
        stl.ballot(st, gv.sign_ballot(keys[1], "oak", p, 1, "no"), T + 20)
    with pytest.raises(gv.GovernanceError, match="bad signature"):
        stl.ballot(st, gv.sign_ballot(keys[2], "oak", p, 3, "yes"), T + 20)      # member 2 signs for member 3
    with pytest.raises(gv.GovernanceError, match="bad signature"):
        stl.ballot(st, gv.sign_ballot(keys[3], "elm", p, 3, "yes"), T + 20)      # another community's ballot
    with pytest.raises(gv.GovernanceError, match="may not vote"):
        stl.ballot(st, gv.sign_ballot(Ed25519PrivateKey.generate(), "oak", p, 9, "yes"), T + 20)
    with pytest.raises(gv.GovernanceError, match="voting closed"):
        stl.ballot(st, gv.sign_ballot(keys[4], "oak", p, 4, "yes"), T + 601)
    with pytest.raises(gv.GovernanceError, match="not a member"):
        stl.propose(st, gv.sign_proposal(keys[1], "oak", 7, {"kind": "tariff", "tariff": NEW},
                                         DAY0 + 8 * 900, T + 600), T)
    assert [e.type for e in ledger.verify(st.export())].count("ballot") == 1


def test_ledger_verify_flags_a_tampered_ballot(tmp_path) -> None:
    st, keys = _community(tmp_path)
    T = DAY0 + 5000
    p = stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, {"kind": "tariff", "tariff": NEW},
                                         DAY0 + 8 * 900, T + 600), T)
    _vote(st, keys, p, {1: "yes", 2: "no", 3: "no", 4: "no"}, T + 60)
    stl.tally(st, p, T + 700)
    entries = ledger.verify(st.export())
    k = next(e.n for e in entries if e.type == "ballot" and e.body["member"] == 2)
    # an insider with the gateway's key turns member 2's "no" into "yes" and re-signs the whole chain:
    # every gateway signature is fine, the member's is not
    forged = ledger.Ledger(load_key(tmp_path / "k"), "oak")
    forged.load(st.ledger.entries[:k])
    for e in entries[k:]:
        body = dict(e.body)
        if e.n == k:
            body["vote"] = "yes"
        forged.append(e.type, e.t, body)
    with pytest.raises(ledger.LedgerError, match=f"entry {k}: ballot of member 2: bad signature"):
        ledger.verify(forged.export())
    # a tally that does not match its ballots is caught too
    forged = ledger.Ledger(load_key(tmp_path / "k"), "oak")
    t_n = next(e.n for e in entries if e.type == "tally")
    forged.load(st.ledger.entries[:t_n])
    forged.append("tally", entries[t_n].t, dict(entries[t_n].body, yes=4, no=0, accepted=True))
    with pytest.raises(ledger.LedgerError, match=f"entry {t_n}: tally .* does not match"):
        ledger.verify(forged.export())


def test_break_away_of_40_of_100(tmp_path) -> None:
    dbp = tmp_path / "gw.db"
    db = reg.connect(dbp)
    r = reg.Registry(db)
    r.add_community("oak")
    from peergrid.ingest import store as sto

    sto.init(db)
    db.execute("PRAGMA foreign_keys=OFF")
    rng = random.Random(40)
    st = Settler(db, "oak", load_key(tmp_path / "k"), Tariff(3187, 812, 20000), first_start=DAY0)
    keys = {}
    fid = 0
    db.execute("BEGIN")
    for m in range(1, 101):
        k, pub = gv.new_key()
        keys[m] = k
        mid = r.add_member("oak", f"house {m}", pub)
        r.add_device("oak", f"d{m}", "sim", [{"role": "grid", "rating_a": 100}], mid)
        imp = exp = 0
        for s in range(0, 3 * 3600 + 600, 60):
            if m % 3 == 0:
                exp += rng.randrange(0, 60)
            else:
                imp += rng.randrange(0, 40)
            fid += 1
            db.execute("INSERT INTO readings (frame_id, community, device, boot, seq, t, t_board, t_recv, flags,"
                       " grid_w, grid_imp_wh, grid_exp_wh, ch) VALUES (?, 'oak', ?, 1, ?, ?, ?, ?, 0, 0, ?, ?, '[]')",
                       (fid, f"d{m}", s, DAY0 + s, DAY0 + s, DAY0 + s, imp, exp))
    db.execute("COMMIT")
    for m in range(1, 101):
        st.record("member_joined", DAY0, {"member": m, "name": f"house {m}", "key": gv.public(keys[m])})
    assert st.settle_due(DAY0 + 2 * 3600 + 120) == 8
    before = stl.gov_state(st)
    total_before = sum(before.balances.values())
    assert len(before.balances) == 100 and total_before != 0
    leaving = sorted(rng.sample(range(1, 101), 40))
    new_db = tmp_path / "pine.db"
    res = stl.split(st, leaving, "pine", new_db, load_key(tmp_path / "k2"), DAY0 + 2 * 3600 + 200)
    assert res["at"] == DAY0 + 2 * 3600
    # the old ledger verifies on its own and states each leaving balance
    old = ledger.verify(st.export())
    closing = old[res["entry"]]
    assert closing.type == "split" and closing.body["members"] == leaving
    after = gv.replay(old, "oak")
    remaining = sum(after.balances[m] for m in after.members())
    stated = sum(closing.body["balances"].values())
    assert remaining + stated == total_before
    assert sorted(after.members()) == sorted(set(range(1, 101)) - set(leaving))
    # the old community settles on without them
    st.settle_due(DAY0 + 3 * 3600 + 120)
    later = [e for e in ledger.verify(st.export()) if e.type == "settlement" and e.body["start"] >= res["at"]]
    assert later and all(not set(e.body["flows"][0::3]) & set(leaving) for e in later)
    # the new community: its own ledger, verifying on its own, pointing at the closing entry
    db2 = reg.connect(new_db)
    new = Settler(db2, "pine", load_key(tmp_path / "k2"), Tariff(3187, 812, 20000))
    data = new.export()
    ents = ledger.verify(data)
    g = ents[0].body
    assert g["parent"]["community"] == "oak" and g["parent"]["entry"] == res["entry"]
    assert g["parent"]["digest"] == hashlib.sha256(st.ledger.entries[res["entry"]]).digest()
    assert sorted(int(m) for m in g["members"]) == leaving
    fresh = gv.replay(ents, "pine")
    assert sorted(fresh.members()) == leaving and sum(fresh.balances.values()) == 0     # from zero
    assert [m for m, _, _ in reg.Registry(db2).members("pine")] == leaving
    # a member of the new community can propose there with the same key
    p = stl.propose(new, gv.sign_proposal(keys[leaving[0]], "pine", leaving[0], {"kind": "tariff", "tariff": NEW},
                                          DAY0 + 8 * 3600, DAY0 + 4 * 3600), DAY0 + 3 * 3600)
    assert p == 1
    ledger.verify(new.export())


def test_governance_commands_say_what_is_wrong(tmp_path) -> None:
    cfgp = tmp_path / "gw.toml"
    cfgp.write_text('[gateway]\ncommunity = "oak"\ndb = "gw.db"\nhttp_port = -1\n'
                    '[settlement]\nretail = 30\nfeed_in = 8\n')

    def cli(*a, ok=True):
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfgp), *a], capture_output=True,
                           text=True, cwd=tmp_path)
        assert (r.returncode == 0) == ok, r.stderr + r.stdout
        return r.stdout + r.stderr

    for i in (1, 2, 3):
        cli("member", "add", f"house {i}")
        cli("member", "key", str(i), "--out", f"m{i}.key")
    assert (tmp_path / "m1.key").stat().st_mode & 0o777 == 0o600
    import time

    now = int(time.time())
    b = now + 3600 - (now + 3600) % 900
    out = cli("propose", "--member", "1", "--key-file", "m1.key", "--kind", "tariff", "--tariff", "35,7,0,mmr",
              "--from", str(b), "--deadline", str(now + 10))   # room for the votes below on a loaded machine
    pid = out.split()[1]
    cli("vote", pid, "yes", "--member", "1", "--key-file", "m1.key")
    assert "voted on proposal" in cli("vote", pid, "no", "--member", "1", "--key-file", "m1.key", ok=False)
    assert "bad signature" in cli("vote", pid, "yes", "--member", "2", "--key-file", "m3.key", ok=False)
    assert "not a member" in cli("propose", "--member", "9", "--key-file", "m1.key", "--kind", "tariff",
                                 "--tariff", "35,7", "--from", str(b), "--deadline", str(now + 60), ok=False)
    cli("vote", pid, "yes", "--member", "2", "--key-file", "m2.key")
    time.sleep(max(0.0, now + 11 - time.time()) + 0.1)        # a whole second past it (t is in seconds)
    assert "voting closed" in cli("vote", pid, "yes", "--member", "3", "--key-file", "m3.key", ok=False)
    assert "ACCEPTED" in cli("tally", pid)
    data = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfgp), "ledger", "export"],
                          capture_output=True, cwd=tmp_path).stdout
    (tmp_path / "ledger.cbor").write_bytes(data)
    out = cli("ledger", "verify", str(tmp_path / "ledger.cbor"))
    assert "ballot" in out and "tally" in out and "proposal" in out
