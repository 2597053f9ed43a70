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

MECHANISMS = ("sdr", "mmr")


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
    out = [v // q for v in nums]
    missing = -sum(out)
    if missing:
        order = sorted([(-(v % q), k) for k, v in enumerate(nums)])
        for _, k in order[:missing]:
            out[k] += 1
    return out[:-2], out[-2], out[-1], p_buy, p_sell


def settle(flows: list[Flow], tariff: Tariff) -> Settlement:
    tariff.check()
    ids = [f.member for f in flows]
    if len(set(ids)) != len(ids):
        raise ValueError("a member appears twice in one interval")
    for f in flows:
        if f.imp < 0 or f.exp < 0:
            raise ValueError(f"member {f.member}: negative energy")
    flows = sorted(flows, key=lambda f: f.member)
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
