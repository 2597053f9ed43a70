"""Settlement of one interval as a local market: a pure function of the
interval's energies and the tariff (formulas and worked examples in
docs/SETTLEMENT.md).

Energies are whole Wh per member: `imp` bought from the connection point,
`exp` fed into it. Prices are minor currency units per kWh (integers in the
tariff; the market prices derived from them are exact fractions). Amounts
are integers in minor units, positive = paid into the community's pool:
members pay (or are paid, negative), the grid is paid for the residual
import (negative) or pays for the residual export (positive), the fund
receives its margin (negative). Every interval sums to exactly zero.

Rounding (deterministic): every party's exact amount is rounded down, and
the units missing to reach zero go, one each, to the parties with the
largest fractional parts (ties: members by id, then grid, then fund). No
member then pays more than the grid-only bill rounded up.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

MECHANISMS = ("sdr", "mmr", "auction")


@dataclass(frozen=True)
class Tariff:
    retail: int                 # grid import price, minor units per kWh
    feed_in: int                # grid export price, minor units per kWh
    fund_margin_ppm: int = 0    # the fund's share of the members' savings against grid-only
    mechanism: str = "sdr"

    def check(self) -> None:
        if not 0 <= self.feed_in < self.retail:
            raise ValueError("tariff: need 0 <= feed-in < retail")
        if not 0 <= self.fund_margin_ppm <= 1_000_000:
            raise ValueError("tariff: fund margin is 0..1,000,000 ppm")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"tariff: mechanism is one of {MECHANISMS}")


@dataclass(frozen=True)
class Flow:
    member: int
    imp: int                    # Wh bought at the connection point this interval
    exp: int                    # Wh fed in
    bid: int | None = None      # auction: most this member pays per kWh (default: retail)
    ask: int | None = None      # auction: least it sells for per kWh (default: feed-in)


@dataclass
class Settlement:
    mechanism: str
    p_buy: Fraction             # per kWh, what a member pays for what it buys
    p_sell: Fraction            # per kWh, what a member gets for what it sells
    demand: int                 # Wh, all members' imports
    supply: int                 # Wh, all members' exports
    local: int                  # Wh traded between members
    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    grid: int = 0
    fund: int = 0

    def total(self) -> int:
        return sum(m["amount"] for m in self.members.values()) + self.grid + self.fund

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "p_buy": _frac(self.p_buy), "p_sell": _frac(self.p_sell),
                "demand_wh": self.demand, "supply_wh": self.supply, "local_wh": self.local,
                "members": {str(k): v for k, v in sorted(self.members.items())},
                "grid": self.grid, "fund": self.fund}

    def canonical(self) -> bytes:
        """The same inputs give the same bytes (for hashing into a ledger)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def _frac(f: Fraction) -> str:
    return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else str(f.numerator)


def prices(mechanism: str, supply: int, demand: int, retail: int, feed_in: int) -> tuple[Fraction, Fraction]:
    """(p_buy, p_sell) per kWh for the local market."""
    lb, ls = Fraction(retail), Fraction(feed_in)
    if demand == 0:
        return lb, ls                 # nobody buys: exporters get the feed-in price
    if supply == 0:
        return lb, ls                 # nobody sells: importers pay the retail price
    if mechanism == "sdr":
        # supply-demand ratio pricing (Liu et al. 2017)
        r = Fraction(supply, demand)
        if r >= 1:
            return ls, ls
        p_sell = lb * ls / ((lb - ls) * r + ls) if ls > 0 else Fraction(0)
        p_buy = p_sell * r + lb * (1 - r)
        return p_buy, p_sell
    # mid-market rate (Long et al. 2017)
    mid = (lb + ls) / 2
    if supply == demand:
        return mid, mid
    if supply < demand:
        return (mid * supply + lb * (demand - supply)) / demand, mid
    return mid, (mid * demand + ls * (supply - demand)) / supply


def amounts(flows: list[tuple[int, int, int]], retail: int, feed_in: int, fund_margin_ppm: int,
            mechanism: str) -> tuple[list[int], int, int, Fraction, Fraction]:
    """The money only, for (member, imp, exp) sorted by member: (amounts in
    that order, grid, fund, p_buy, p_sell). What the ledger verifier re-runs."""
    demand = 0
    supply = 0
    for _, i, e in flows:
        demand += i
        supply += e
    p_buy, p_sell = prices(mechanism, supply, demand, retail, feed_in)
    den = math.lcm(p_buy.denominator, p_sell.denominator)
    unit = den * 1_000_000
    q = unit * 1000
    kb = p_buy.numerator * (unit // p_buy.denominator)
    ks = p_sell.numerator * (unit // p_sell.denominator)
    gb = retail * unit
    gs = feed_in * unit
    nums = []
    fund = 0
    for _, i, e in flows:
        pay = kb * i - ks * e
        if fund_margin_ppm:
            saving = gb * i - gs * e - pay
            if saving > 0:
                take = saving * fund_margin_ppm // 1_000_000
                pay += take
                fund -= take
        nums.append(pay)
    grid = gs * max(supply - demand, 0) - gb * max(demand - supply, 0)
    nums.append(grid)
    nums.append(fund)
    out = _round_nums(nums, q)
    return out[:-2], out[-2], out[-1], p_buy, p_sell


def _round_nums(nums: list[int], q: int) -> list[int]:
    """Numerators over q rounded to integers that still sum to zero: round
    down, then one more unit each to the largest remainders (ties: earlier
    position, i.e. members by id, then grid, then fund)."""
    out = [v // q for v in nums]
    missing = -sum(out)
    if missing:
        order = sorted([(-(v % q), k) for k, v in enumerate(nums)])
        for _, k in order[:missing]:
            out[k] += 1
    return out


def auction(flows: list[tuple[int, int, int, int, int]]) -> tuple[Fraction | None, dict[int, int], dict[int, int]]:
    """Uniform-price double auction over (member, imp, exp, bid, ask): bids
    from the highest, asks from the lowest (ties by member id), matched Wh by
    Wh while the bid is at least the ask. The price is the midpoint of the
    last matched bid and ask, so no matched buyer pays more than its bid and
    no matched seller gets less than its ask. Returns (price or None when
    nothing matched, Wh bought locally per member, Wh sold locally)."""
    bids = sorted(((-b, m, i) for m, i, _, b, _ in flows if i > 0))
    asks = sorted(((a, m, e) for m, _, e, _, a in flows if e > 0))
    bought: dict[int, int] = {}
    sold: dict[int, int] = {}
    bi = ai = 0
    rb = bids[0][2] if bids else 0
    ra = asks[0][2] if asks else 0
    last = None
    while bi < len(bids) and ai < len(asks) and -bids[bi][0] >= asks[ai][0]:
        q = min(rb, ra)
        mb, ma = bids[bi][1], asks[ai][1]
        bought[mb] = bought.get(mb, 0) + q
        sold[ma] = sold.get(ma, 0) + q
        last = (-bids[bi][0], asks[ai][0])
        rb -= q
        ra -= q
        if rb == 0:
            bi += 1
            rb = bids[bi][2] if bi < len(bids) else 0
        if ra == 0:
            ai += 1
            ra = asks[ai][2] if ai < len(asks) else 0
    price = None if last is None else Fraction(last[0] + last[1], 2)
    return price, bought, sold


def _limits(f: Flow, t: "Tariff") -> tuple[int, int, int, int, int]:
    bid = t.retail if f.bid is None else f.bid
    ask = t.feed_in if f.ask is None else f.ask
    if not (t.feed_in <= ask and bid <= t.retail and bid >= 0):
        raise ValueError(f"member {f.member}: bid must be at most retail, ask at least feed-in")
    return f.member, f.imp, f.exp, bid, ask


def auction_amounts(flows: list[tuple[int, int, int, int, int]], retail: int, feed_in: int,
                    fund_margin_ppm: int) -> tuple[list[int], int, int, Fraction | None, dict[int, int],
                                                   dict[int, int]]:
    """Money of an auction interval for (member, imp, exp, bid, ask) in member
    order: (amounts, grid, fund, price, bought locally, sold locally)."""
    price, bought, sold = auction(flows)
    den = price.denominator if price is not None else 1
    unit = den * 1_000_000
    q = unit * 1000
    kp = price.numerator * (unit // den) if price is not None else 0
    gb = retail * unit
    gs = feed_in * unit
    nums = []
    fund = 0
    grid = 0
    for m, i, e, _, _ in flows:
        lb = bought.get(m, 0)
        ls = sold.get(m, 0)
        pay = kp * (lb - ls) + gb * (i - lb) - gs * (e - ls)
        grid += gs * (e - ls) - gb * (i - lb)
        if fund_margin_ppm:
            saving = gb * i - gs * e - pay
            if saving > 0:
                take = saving * fund_margin_ppm // 1_000_000
                pay += take
                fund -= take
        nums.append(pay)
    nums.append(grid)
    nums.append(fund)
    out = _round_nums(nums, q)
    return out[:-2], out[-2], out[-1], price, bought, sold


def _settle_auction(flows: list[Flow], tariff: "Tariff") -> Settlement:
    lim = [_limits(f, tariff) for f in flows]
    amts, grid, fund, price, bought, sold = auction_amounts(lim, tariff.retail, tariff.feed_in,
                                                            tariff.fund_margin_ppm)
    demand = sum(f.imp for f in flows)
    supply = sum(f.exp for f in flows)
    p = price if price is not None else Fraction(0)
    s = Settlement("auction", p, p, demand, supply, sum(bought.values()), {}, grid, fund)
    for f, a in zip(flows, amts):
        s.members[f.member] = {"imp_wh": f.imp, "exp_wh": f.exp, "bought_local_wh": str(bought.get(f.member, 0)),
                               "sold_local_wh": str(sold.get(f.member, 0)),
                               "grid_only": _num(Fraction(tariff.retail * f.imp - tariff.feed_in * f.exp, 1000)),
                               "bid": _limits(f, tariff)[3], "ask": _limits(f, tariff)[4], "amount": a}
    return s


def settle(flows: list[Flow], tariff: Tariff) -> Settlement:
    tariff.check()
    ids = [f.member for f in flows]
    if len(set(ids)) != len(ids):
        raise ValueError("a member appears twice in one interval")
    for f in flows:
        if f.imp < 0 or f.exp < 0:
            raise ValueError(f"member {f.member}: negative energy")
    flows = sorted(flows, key=lambda f: f.member)
    if tariff.mechanism == "auction":
        return _settle_auction(flows, tariff)
    demand = sum(f.imp for f in flows)
    supply = sum(f.exp for f in flows)
    p_buy, p_sell = prices(tariff.mechanism, supply, demand, tariff.retail, tariff.feed_in)
    local = min(supply, demand)
    # Exact arithmetic in integers over one common denominator Q: every
    # amount is N / Q minor units (prices per kWh, energies in Wh, the
    # margin in ppm). Much faster than a Fraction per member.
    den = math.lcm(p_buy.denominator, p_sell.denominator)
    unit = den * 1_000_000                  # Q / 1000: per Wh
    q = unit * 1000
    kb = p_buy.numerator * (unit // p_buy.denominator)
    ks = p_sell.numerator * (unit // p_sell.denominator)
    gb = tariff.retail * unit
    gs = tariff.feed_in * unit
    mppm = tariff.fund_margin_ppm
    exact: list[tuple[tuple[int, int], int]] = []
    members: dict[int, dict[str, Any]] = {}
    fund = 0
    for f in flows:
        pay = kb * f.imp - ks * f.exp
        grid_only = gb * f.imp - gs * f.exp
        saving = grid_only - pay
        if saving > 0 and mppm:
            take = saving * mppm // 1_000_000           # exact: saving is a multiple of 10^6
            pay += take
            fund -= take
        exact.append(((0, f.member), pay))
        if supply == 0:
            bought_local: Fraction | int = 0
        elif supply < demand:
            bought_local = Fraction(f.imp * supply, demand)
        else:
            bought_local = f.imp
        if demand == 0:
            sold_local: Fraction | int = 0
        elif demand < supply:
            sold_local = Fraction(f.exp * demand, supply)
        else:
            sold_local = f.exp
        members[f.member] = {"imp_wh": f.imp, "exp_wh": f.exp, "bought_local_wh": _num(bought_local),
                             "sold_local_wh": _num(sold_local), "grid_only": _num(Fraction(grid_only, q))}
    grid = (gs * max(supply - demand, 0) - gb * max(demand - supply, 0))
    exact.append(((1, 0), grid))
    exact.append(((2, 0), fund))
    rounded = _round_zero_sum(exact, q)
    for (kind, mid), v in rounded.items():
        if kind == 0:
            members[mid]["amount"] = v
    return Settlement(tariff.mechanism, p_buy, p_sell, demand, supply, local, members,
                      rounded[(1, 0)], rounded[(2, 0)])


def _num(v: Fraction | int) -> str:
    return _frac(v) if isinstance(v, Fraction) else str(v)


def _round_zero_sum(exact: list[tuple[tuple[int, int], int]], q: int) -> dict[tuple[int, int], int]:
    """Amounts given as numerators over q: round down, then hand the missing
    units to the largest remainders (ties by key)."""
    total = sum(v for _, v in exact)
    if total != 0:
        raise AssertionError(f"settlement does not balance before rounding: {total}/{q}")
    floors = {k: v // q for k, v in exact}
    missing = -sum(floors.values())            # units to hand out, 0 <= missing < len(exact)
    if missing:
        order = sorted(exact, key=lambda kv: (-(kv[1] % q), kv[0]))
        for k, _ in order[:missing]:
            floors[k] += 1
    return floors
