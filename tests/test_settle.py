"""Interval settlement (peergrid.market.settle): the worked examples of
docs/SETTLEMENT.md, and properties over random communities: zero-sum,
individual rationality, energy conservation, determinism."""
from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peergrid.market.settle import Flow, Partner, Tariff, max_discount, prices, settle

EXAMPLE = [Flow(1, 3000, 0), Flow(2, 1000, 0), Flow(3, 0, 2000)]


def _amounts(s):
    return [s.members[i]["amount"] for i in (1, 2, 3)], s.grid, s.fund


def test_worked_example_sdr() -> None:
    s = settle(EXAMPLE, Tariff(30, 8, mechanism="sdr"))
    assert (s.p_sell, s.p_buy) == (Fraction(240, 19), Fraction(405, 19))
    assert _amounts(s) == ([64, 21, -25], -60, 0)


def test_worked_example_mid_market() -> None:
    s = settle(EXAMPLE, Tariff(30, 8, mechanism="mmr"))
    assert (s.p_sell, s.p_buy) == (Fraction(19), Fraction(49, 2))
    assert _amounts(s) == ([74, 24, -38], -60, 0)


def test_worked_example_fund_margin() -> None:
    s = settle(EXAMPLE, Tariff(30, 8, fund_margin_ppm=100_000, mechanism="sdr"))
    assert _amounts(s) == ([66, 22, -24], -60, -4)


def test_worked_example_grid_fee() -> None:
    s = settle(EXAMPLE, Tariff(30, 8, mechanism="sdr", grid_fee=4))
    assert (s.p_sell, s.p_buy) == (Fraction(208, 17), Fraction(393, 17))
    assert _amounts(s) == ([69, 23, -24], -68, 0)
    s = settle(EXAMPLE, Tariff(30, 8, mechanism="mmr", grid_fee=4))
    assert (s.p_sell, s.p_buy) == (Fraction(17), Fraction(51, 2))
    assert _amounts(s) == ([77, 25, -34], -68, 0)


def test_worked_example_export_share() -> None:
    s = settle([Flow(1, 500, 0), Flow(2, 0, 3000)], Tariff(30, 8, fund_export_ppm=250_000))
    assert (s.p_buy, s.p_sell) == (8, Fraction(19, 3))
    assert ([s.members[i]["amount"] for i in (1, 2)], s.grid, s.fund) == ([4, -19], 20, -5)


def test_worked_example_preferred_partner() -> None:
    s = settle(EXAMPLE, Tariff(30, 8), [Partner(3, 2, 10)])
    assert (s.p_sell, s.p_buy) == (Fraction(360, 23), Fraction(580, 23))
    assert _amounts(s) == ([76, 20, -36], -60, 0)
    assert s.preferred == 1000 and s.local == 2000
    assert s.members[2]["pref_bought_wh"] == 1000 and s.members[3]["pref_sold_wh"] == 1000
    # a partner rule for members without energy this interval changes nothing
    assert _amounts(settle(EXAMPLE, Tariff(30, 8), [Partner(1, 2, 10), Partner(7, 3, 5)])) == \
        _amounts(settle(EXAMPLE, Tariff(30, 8)))
    with pytest.raises(ValueError, match="discount"):
        settle(EXAMPLE, Tariff(30, 8), [Partner(3, 2, 23)])          # seller would get below feed-in
    with pytest.raises(ValueError, match="own"):
        settle(EXAMPLE, Tariff(30, 8), [Partner(3, 3, 1)])


def test_worked_example_auction_fee_and_export_share() -> None:
    s = settle(AUCTION, Tariff(30, 8, mechanism="auction", grid_fee=2, fund_export_ppm=500_000))
    assert (s.p_sell, s.p_buy) == (Fraction(45, 2), Fraction(49, 2))
    assert [s.members[i]["amount"] for i in (1, 2, 3, 4)] == [74, 30, -45, -25]
    assert (s.grid, s.fund, s.total()) == (-32, -2, 0)


AUCTION = [Flow(1, 3000, 0, bid=25), Flow(2, 1000, 0, bid=20), Flow(3, 0, 2000, ask=10), Flow(4, 0, 1500, ask=22)]


def test_worked_example_double_auction() -> None:
    s = settle(AUCTION, Tariff(30, 8, mechanism="auction"))
    assert s.p_buy == s.p_sell == Fraction(47, 2)           # between the last matched bid 25 and ask 22
    assert [s.members[i]["bought_local_wh"] for i in (1, 2)] == ["3000", "0"]
    assert [s.members[i]["sold_local_wh"] for i in (3, 4)] == ["2000", "1000"]
    assert [s.members[i]["amount"] for i in (1, 2, 3, 4)] == [71, 30, -47, -28]
    assert (s.grid, s.fund, s.total()) == (-26, 0, 0)
    with pytest.raises(ValueError):
        settle([Flow(1, 10, 0, bid=31)], Tariff(30, 8, mechanism="auction"))
    with pytest.raises(ValueError):
        settle([Flow(1, 0, 10, ask=7)], Tariff(30, 8, mechanism="auction"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 30), st.integers(8, 40)),
                min_size=1, max_size=30), st.integers(0, 1_000_000))
def test_auction_properties(com, margin) -> None:
    t = Tariff(30, 8, margin, "auction")
    flows = [Flow(k + 1, i, e, bid=b, ask=min(a, 30)) for k, (i, e, b, a) in enumerate(com)]
    s = settle(flows, t)
    assert s.total() == 0
    bought = sum(int(m["bought_local_wh"]) for m in s.members.values())
    sold = sum(int(m["sold_local_wh"]) for m in s.members.values())
    assert bought == sold == s.local <= min(s.demand, s.supply)
    for f in flows:
        m = s.members[f.member]
        assert m["amount"] <= math.ceil(Fraction(t.retail * f.imp - t.feed_in * f.exp, 1000))
        if int(m["bought_local_wh"]):
            assert s.p_buy <= f.bid                     # nobody pays above its limit
        if int(m["sold_local_wh"]):
            assert s.p_sell >= f.ask


def test_surplus_community_sells_at_feed_in() -> None:
    s = settle([Flow(1, 500, 0), Flow(2, 0, 3000)], Tariff(30, 8))
    assert s.p_buy == s.p_sell == 8
    assert s.grid == 20 and s.total() == 0          # the grid pays for 2.5 kWh


def test_bad_inputs() -> None:
    for t in (Tariff(8, 30), Tariff(30, 8, mechanism="vickrey"), Tariff(30, 8, fund_margin_ppm=-1)):
        with pytest.raises(ValueError):
            settle(EXAMPLE, t)
    with pytest.raises(ValueError):
        settle([Flow(1, 10, 0), Flow(1, 0, 10)], Tariff(30, 8))
    with pytest.raises(ValueError):
        settle([Flow(1, -10, 0)], Tariff(30, 8))


communities = st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 20000)), min_size=1, max_size=40)
tariffs = st.tuples(st.integers(1, 100), st.integers(0, 99), st.integers(0, 1_000_000),
                    st.sampled_from(["sdr", "mmr"])).filter(lambda t: t[1] < t[0])


@settings(max_examples=400, deadline=None)
@given(communities, tariffs, st.randoms(use_true_random=False))
def test_properties(com, tar, rnd) -> None:
    flows = [Flow(i + 1, imp, exp) for i, (imp, exp) in enumerate(com)]
    t = Tariff(tar[0], tar[1], tar[2], tar[3])
    s = settle(flows, t)
    # zero-sum, exactly
    assert s.total() == 0
    # individual rationality against the grid-only bill (rounded up)
    for f in flows:
        grid_only = Fraction(t.retail * f.imp - t.feed_in * f.exp, 1000)
        assert s.members[f.member]["amount"] <= math.ceil(grid_only)
    assert t.feed_in <= s.p_sell <= s.p_buy <= t.retail
    # energy: what members bought locally is what members sold locally
    bought = sum(Fraction(m["bought_local_wh"]) for m in s.members.values())
    sold = sum(Fraction(m["sold_local_wh"]) for m in s.members.values())
    assert bought == sold == s.local == min(s.supply, s.demand)
    # the fund never pays out
    assert s.fund <= 0
    # determinism: same inputs in any order give the same bytes
    shuffled = list(flows)
    rnd.shuffle(shuffled)
    assert settle(shuffled, t).canonical() == s.canonical()


def test_prices_are_continuous_at_balance() -> None:
    # just below balance the prices are within a hundredth of those at balance
    for mech in ("sdr", "mmr"):
        below = prices(mech, 9999, 10000, 30, 8)
        at = prices(mech, 10000, 10000, 30, 8)
        assert abs(below[0] - at[0]) < Fraction(1, 100), mech
        assert abs(below[1] - at[1]) < Fraction(1, 100), mech


def test_large_random_interval_balances() -> None:
    rng = random.Random(3)
    flows = [Flow(i, rng.randrange(0, 5000), rng.randrange(0, 5000)) for i in range(5000)]
    s = settle(flows, Tariff(3187, 812, fund_margin_ppm=50_000))
    assert s.total() == 0 and len(s.members) == 5000


partner_lists = st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(0, 1_000_000)), max_size=8)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 20000), st.integers(0, 60), st.integers(0, 60)),
                min_size=1, max_size=12),
       tariffs, st.integers(0, 1_000_000), st.integers(0, 1_000_000), partner_lists,
       st.sampled_from(["sdr", "mmr", "auction"]), st.randoms(use_true_random=False))
def test_properties_with_fees_partners_and_export_share(com, tar, fee_ppm, xppm, plist, mech, rnd) -> None:
    retail, feed_in, margin = tar[0], tar[1], tar[2]
    fee = (retail - feed_in) * fee_ppm // 1_000_000
    t = Tariff(retail, feed_in, margin, mech, fee, xppm)
    flows = [Flow(k + 1, i, e, bid=min(b, retail), ask=max(a, feed_in)) for k, (i, e, b, a) in enumerate(com)]
    partners = [Partner(a, b, d * max_discount(t) // 1_000_000) for a, b, d in plist if a != b]
    s = settle(flows, t, partners)
    assert s.total() == 0
    bought = sum(Fraction(m["bought_local_wh"]) for m in s.members.values())
    sold = sum(Fraction(m["sold_local_wh"]) for m in s.members.values())
    assert bought == sold == s.local <= min(s.demand, s.supply)
    pref_b = sum(m["pref_bought_wh"] for m in s.members.values()) if partners else 0
    assert pref_b == s.preferred <= s.local
    for f in flows:
        m = s.members[f.member]
        assert Fraction(m["bought_local_wh"]) <= f.imp and Fraction(m["sold_local_wh"]) <= f.exp
        if xppm == 0:
            # individual rationality holds for every mechanism, fee and partner rule
            assert m["amount"] <= math.ceil(Fraction(retail * f.imp - feed_in * f.exp, 1000))
        else:
            # the export share costs a member at most that share of its export at feed-in
            levy = Fraction(feed_in * f.exp * xppm, 1000 * 1_000_000)
            assert m["amount"] <= math.ceil(Fraction(retail * f.imp - feed_in * f.exp, 1000) + levy)
    if partners:
        named = {(p.seller, p.buyer) for p in partners}
        for mid, m in s.members.items():
            if m["pref_bought_wh"]:
                assert any(b == mid for _, b in named)
    assert s.fund <= 0
    shuffled = list(flows)
    rnd.shuffle(shuffled)
    assert settle(shuffled, t, partners).canonical() == s.canonical()
