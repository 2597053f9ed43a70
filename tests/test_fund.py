"""The fund, spent by vote (issue 22, part 4): a spend proposal that passes
produces a payout that `ledger verify` recomputes; one that would overdraw
the fund is refused when proposed, and a second one that would overdraw
it by the time it is tallied is not paid; a payout the votes did not decide
fails verification."""
from __future__ import annotations

import subprocess
import sys

import pytest
from test_governance import _community, _vote
from test_settler import DAY0

from peergrid.market import governance as gv
from peergrid.market import ledger
from peergrid.market import settler as stl


N = 56                   # settled intervals: to 14:00, with the midday PV sold locally (the fund's margin)


def _spend(st, keys, amount, T, payee="the storage co-op", purpose="a shared battery"):
    ch = {"kind": "spend", "amount": amount, "payee": payee, "purpose": purpose}
    return stl.propose(st, gv.sign_proposal(keys[1], "oak", 1, ch, DAY0 + (N + 4) * 900, T + 600), T)


def test_a_spend_that_passes_is_paid_and_verified(tmp_path) -> None:
    st, keys = _community(tmp_path)
    assert st.settle_due(DAY0 + N * 900 + 120) == N
    fund = stl.gov_state(st).fund
    assert fund > 0, "the fund margin collected something"
    T = DAY0 + N * 900 + 200
    with pytest.raises(gv.GovernanceError, match="overdraw the fund"):
        _spend(st, keys, fund + 1, T)
    a = _spend(st, keys, fund * 6 // 10, T)
    b = _spend(st, keys, fund * 6 // 10, T, payee="the road fund", purpose="street lights")
    _vote(st, keys, a, {1: "yes", 2: "yes", 3: "yes"}, T + 60)
    _vote(st, keys, b, {1: "yes", 2: "yes", 3: "yes"}, T + 60)
    assert stl.tally(st, a, T + 700)[1]["accepted"]
    res_b = stl.tally(st, b, T + 700)[1]
    assert res_b["accepted"] and res_b["payout"].startswith("refused")        # the first payout left too little
    export = st.export()
    entries = ledger.verify(export)
    payouts = [e.body for e in entries if e.type == "payout"]
    assert payouts == [{"by_vote": a, "amount": fund * 6 // 10, "payee": "the storage co-op",
                        "purpose": "a shared battery"}]
    st_after = gv.replay(entries)
    assert st_after.fund == fund - fund * 6 // 10 >= 0
    # the fund's statement and the verifier's summary, from the export alone
    f = tmp_path / "ledger.cbor"
    f.write_bytes(export)
    out = subprocess.run([sys.executable, "-m", "peergrid.cli", "ledger", "fund", str(f)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"proposal {a}" in out.stdout and f"balance: {st_after.fund // 100}." in out.stdout
    out = subprocess.run([sys.executable, "-m", "peergrid.cli", "ledger", "verify", str(f)], capture_output=True,
                         text=True, timeout=60)
    assert f"fund: {st_after.fund / 100:.2f} after 1 payout(s) by vote" in out.stdout


def test_a_payout_no_vote_decided_fails_verification(tmp_path) -> None:
    st, keys = _community(tmp_path)
    st.settle_due(DAY0 + N * 900 + 120)
    fund = stl.gov_state(st).fund
    T = DAY0 + N * 900 + 200
    p = _spend(st, keys, fund // 2, T)
    _vote(st, keys, p, {1: "yes", 2: "no", 3: "no", 4: "no"}, T + 60)
    assert not stl.tally(st, p, T + 700)[1]["accepted"]
    # the gateway's own checks refuse it ...
    with pytest.raises(gv.GovernanceError, match="accepted spend"):
        stl._check_then_append(st, "payout", T + 800, {"by_vote": p, "amount": fund // 2,
                                                       "payee": "the storage co-op", "purpose": "a shared battery"})
    # ... and a gateway that writes it anyway is caught by every member's verify
    st.record("payout", T + 800, {"by_vote": p, "amount": fund // 2, "payee": "the storage co-op",
                                  "purpose": "a shared battery"})
    with pytest.raises(ledger.LedgerError, match="accepted spend"):
        ledger.verify(st.export())


def test_an_overdrawing_payout_fails_verification(tmp_path) -> None:
    st, keys = _community(tmp_path)
    st.settle_due(DAY0 + N * 900 + 120)
    fund = stl.gov_state(st).fund
    T = DAY0 + N * 900 + 200
    p = _spend(st, keys, fund, T)
    _vote(st, keys, p, {1: "yes", 2: "yes", 3: "yes"}, T + 60)
    stl.tally(st, p, T + 700)
    assert gv.replay(ledger.verify(st.export())).fund == 0
    # paid twice, written by hand: the fund would go below zero
    st.record("payout", T + 900, {"by_vote": p, "amount": fund, "payee": "the storage co-op",
                                  "purpose": "a shared battery"})
    with pytest.raises(ledger.LedgerError, match="paid out already|overdraw"):
        ledger.verify(st.export())
