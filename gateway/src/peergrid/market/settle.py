"""Settlement of one interval as a local market: a pure function of the
interval's energies, the members' price limits and preferred partners, and
the tariff (formulas and worked examples in docs/SETTLEMENT.md).

Energies are whole Wh per member: `imp` bought from the connection point,
`exp` fed into it. Prices are minor currency units per kWh (integers in the
tariff; the market prices derived from them are exact fractions). Amounts
are integers in minor units, positive = paid into the community's pool:
members pay (or are paid, negative), the grid is paid for the residual
import and the network fee on local trades (negative) or pays for the
residual export (positive), the fund receives its margin and its share of
the export proceeds (negative). Every interval sums to exactly zero.

Order of a settlement: preferred partners are matched first, then the
rest goes through the community's mechanism (sdr, mmr or auction), then
the fund takes its share of the proceeds of residual export and its margin
on each member's saving against grid-only.

Rounding (deterministic): every party's exact amount is rounded down, and
the units missing to reach zero go, one each, to the parties with the
largest fractional parts (ties: members by id, then grid, then fund). No
member then pays more than the grid-only bill rounded up (with no export
share; a share of export proceeds is a levy the community chose).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Sequence

MECHANISMS = ("sdr", "mmr", "auction")
PPM = 1_000_000


@dataclass(frozen=True)
class Tariff:
    retail: int                 # grid import price, minor units per kWh
    feed_in: int                # grid export price, minor units per kWh
    fund_margin_ppm: int = 0    # the fund's share of each member's saving against grid-only
    mechanism: str = "sdr"
    grid_fee: int = 0           # network fee per kWh traded locally, paid by the buyer to the grid
    fund_export_ppm: int = 0    # the fund's share of the proceeds of residual export to the grid

    def check(self) -> None:
        for v in (self.retail, self.feed_in, self.fund_margin_ppm, self.grid_fee, self.fund_export_ppm):
            if type(v) is not int:
                raise ValueError("tariff: prices, fees and shares are integers")
        if not 0 <= self.feed_in < self.retail:
            raise ValueError("tariff: need 0 <= feed-in < retail")
        if not 0 <= self.fund_margin_ppm <= PPM or not 0 <= self.fund_export_ppm <= PPM:
            raise ValueError("tariff: fund shares are 0..1,000,000 ppm")
        if not 0 <= self.grid_fee <= self.retail - self.feed_in:
            raise ValueError("tariff: the local grid fee is 0..(retail - feed-in) per kWh")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"tariff: mechanism is one of {MECHANISMS}")

    def as_list(self) -> list[Any]:
        """The form in ledger entries."""
        return [self.retail, self.feed_in, self.fund_margin_ppm, self.mechanism, self.grid_fee,
                self.fund_export_ppm]

    @classmethod
    def from_list(cls, v: Sequence[Any]) -> "Tariff":
        if not isinstance(v, (list, tuple)) or len(v) not in (4, 6):
            raise ValueError("tariff: a list of 4 or 6 items")
        t = cls(*v)
        t.check()
        return t


@dataclass(frozen=True)
class Flow:
    member: int
    imp: int                    # Wh bought at the connection point this interval
    exp: int                    # Wh fed in
    bid: int | None = None      # auction: most this member pays per kWh (default: retail)
    ask: int | None = None      # auction: least it sells for per kWh (default: feed-in)


@dataclass(frozen=True)
class Partner:
    """A producer sells to a named neighbour first, at retail minus a
    discount per kWh (the buyer saves the discount; the seller gets the
    rest after the grid fee, never less than feed-in)."""
    seller: int
    buyer: int
    discount: int


def max_discount(t: Tariff) -> int:
    return t.retail - t.grid_fee - t.feed_in


@dataclass
class Result:
    """The money of one interval, in the members' order, and (with detail)
    what each bought and sold locally."""
    amounts: list[int]
    grid: int
    fund: int
    p_buy: Fraction             # what a member pays per kWh bought in the market (fee included)
    p_sell: Fraction            # what a member gets per kWh sold in the market
    local: int                  # Wh traded between members (preferred trades included)
    preferred: int              # Wh of it traded between preferred partners
    bought: list[Fraction | int] | None = None
    sold: list[Fraction | int] | None = None
    pref_bought: list[int] | None = None
    pref_sold: list[int] | None = None


@dataclass
class Settlement:
    mechanism: str
    p_buy: Fraction
    p_sell: Fraction
    demand: int                 # Wh, all members' imports
    supply: int                 # Wh, all members' exports
    local: int                  # Wh traded between members
    members: dict[int, dict[str, Any]] = field(default_factory=dict)
    grid: int = 0
    fund: int = 0
    preferred: int = 0          # Wh of `local` traded between preferred partners
    partners: list[Partner] = field(default_factory=list)

    def total(self) -> int:
        return sum(m["amount"] for m in self.members.values()) + self.grid + self.fund

    def to_dict(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "p_buy": _frac(self.p_buy), "p_sell": _frac(self.p_sell),
                "demand_wh": self.demand, "supply_wh": self.supply, "local_wh": self.local,
                "preferred_wh": self.preferred,
                "members": {str(k): v for k, v in sorted(self.members.items())},
                "grid": self.grid, "fund": self.fund}

    def canonical(self) -> bytes:
        """The same inputs give the same bytes (for hashing into a ledger)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()


def _frac(f: Fraction) -> str:
    return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else str(f.numerator)


def _num(v: Fraction | int) -> str:
    return _frac(v) if isinstance(v, Fraction) else str(v)


def prices(mechanism: str, supply: int, demand: int, retail: int, feed_in: int,
           fee: int = 0) -> tuple[Fraction, Fraction]:
    """(p_buy, p_sell) per kWh for the local market (sdr or mmr). A buyer's
    import is local in the share min(1, supply/demand) and pays the seller's
    price plus the grid fee on that share, retail on the rest."""
    if demand == 0 or supply == 0:
        return Fraction(retail), Fraction(feed_in)     # nobody buys or nobody sells: grid prices
    cap = retail - fee                # the most a seller can get: the buyer pays the fee on top
    S, D, ls, lb = supply, demand, feed_in, retail
    # the published formulas, written over one denominator each (one
    # Fraction per price: this runs for every entry a verifier re-checks)
    if mechanism == "sdr":
        # supply-demand ratio pricing (Liu et al. 2017), SDR = S / D
        if S >= D:
            return Fraction(ls + fee), Fraction(ls)
        # p_sell = cap·ls / ((cap − ls)·S/D + ls);  p_buy = (p_sell + fee)·S/D + lb·(1 − S/D)
        num, den = cap * ls * D, (cap - ls) * S + ls * D
        if ls == 0:
            num, den = 0, 1
        return Fraction(num * S + den * (fee * S + lb * (D - S)), den * D), Fraction(num, den)
    # mid-market rate (Long et al. 2017), mid = (cap + ls) / 2
    if S <= D:
        return Fraction((cap + ls + 2 * fee) * S + 2 * lb * (D - S), 2 * D), Fraction(cap + ls, 2)
    return Fraction(cap + ls + 2 * fee, 2), Fraction((cap + ls) * D + 2 * ls * (S - D), 2 * S)


def auction(flows: Sequence[tuple[int, int, int, int, int]],
            fee: int = 0) -> tuple[Fraction | None, dict[int, int], dict[int, int]]:
    """Uniform-price double auction over (member, imp, exp, bid, ask): bids
    from the highest, asks from the lowest (ties by member id), matched Wh by
    Wh while the bid covers the ask plus the grid fee. The seller's price is
    the midpoint of the last matched bid less the fee and the last matched
    ask, so no matched buyer pays more than its bid (price + fee) and no
    matched seller gets less than its ask. Returns (seller's price or None
    when nothing matched, Wh bought locally per member, Wh sold locally)."""
    bids = sorted(((-b, m, i) for m, i, _, b, _ in flows if i > 0))
    asks = sorted(((a, m, e) for m, _, e, _, a in flows if e > 0))
    bought: dict[int, int] = {}
    sold: dict[int, int] = {}
    bi = ai = 0
    rb = bids[0][2] if bids else 0
    ra = asks[0][2] if asks else 0
    last = None
    while bi < len(bids) and ai < len(asks) and -bids[bi][0] - fee >= asks[ai][0]:
        q = min(rb, ra)
        mb, ma = bids[bi][1], asks[ai][1]
        bought[mb] = bought.get(mb, 0) + q
        sold[ma] = sold.get(ma, 0) + q
        last = (-bids[bi][0] - fee, asks[ai][0])
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


def check_inputs(t: Tariff, flows: Sequence[tuple[int, int, int]], limits: Sequence[tuple[int, int]] | None,
                 partners: Sequence[Partner], flat: list[int] | None = None) -> None:
    """What a settlement's inputs must satisfy (raised as ValueError);
    `flat` is the flows as one list when the caller has it."""
    t.check()
    if flat is None:
        for f in flows:
            if len(f) != 3:
                raise ValueError("flows are (member, imp, exp)")
        flat = [v for f in flows for v in f]
    if not set(map(type, flat)) <= {int}:
        raise ValueError("flows are integers")
    if flat and min(flat[1::3] + flat[2::3] or [0]) < 0:
        raise ValueError("negative energy")
    ms = flat[0::3]
    if ms != sorted(set(ms)):
        raise ValueError("flows must be in member order, each member once")
    if t.mechanism == "auction":
        if limits is None or len(limits) != len(flows):
            raise ValueError("an auction needs a bid and an ask per member")
        for (m, _, _), (b, a) in zip(flows, limits):
            if type(b) is not int or type(a) is not int:
                raise ValueError("limits are integers")
            if not (0 <= b <= t.retail and t.feed_in <= a):
                raise ValueError(f"member {m}: bid must be at most retail, ask at least feed-in")
    hi = max_discount(t)
    for p in partners:
        if type(p.discount) is not int or not 0 <= p.discount <= hi:
            raise ValueError(f"partners {p.seller}->{p.buyer}: discount is 0..{hi} (retail - fee - feed-in)")
        if p.seller == p.buyer:
            raise ValueError("a member cannot be its own preferred partner")


def market(t: Tariff, flows: Sequence[tuple[int, int, int]], limits: Sequence[tuple[int, int]] | None = None,
           partners: Sequence[Partner] = (), detail: bool = False) -> Result:
    """The money of one interval for (member, imp, exp) in member order
    (inputs as check_inputs accepts them). What `settle` computes and what
    the ledger verifier and the statements re-run.

    Exact arithmetic in integers over one common denominator: every amount
    is N / q minor units, with q = unit * 1000 (prices per kWh, energies in
    Wh) and unit a multiple of 10^6 (so ppm shares stay exact)."""
    n = len(flows)
    retail, feed_in, fee = t.retail, t.feed_in, t.grid_fee
    imp = [f[1] for f in flows]
    exp = [f[2] for f in flows]
    # 1. preferred partners, in the order given
    pref_pay: list[int] | None = None
    pref_b = pref_s = None
    preferred = 0
    if partners:
        idx = {f[0]: k for k, f in enumerate(flows)}
        pref_pay = [0] * n                      # minor units per kWh times Wh
        pref_b = [0] * n
        pref_s = [0] * n
        for p in partners:
            ks, kb = idx.get(p.seller), idx.get(p.buyer)
            if ks is None or kb is None:
                continue
            qwh = min(exp[ks], imp[kb])
            if qwh <= 0:
                continue
            price = retail - p.discount
            exp[ks] -= qwh
            imp[kb] -= qwh
            pref_pay[kb] += price * qwh
            pref_pay[ks] -= (price - fee) * qwh
            pref_b[kb] += qwh
            pref_s[ks] += qwh
            preferred += qwh
    demand = sum(imp)
    supply = sum(exp)
    # 2. the mechanism over what is left
    if t.mechanism == "auction":
        assert limits is not None
        price, abought, asold = auction([(flows[k][0], imp[k], exp[k], limits[k][0], limits[k][1])
                                         for k in range(n)], fee)
        p_sell = price if price is not None else Fraction(0)
        p_buy = p_sell + fee if price is not None else Fraction(0)
        lb_ = [abought.get(f[0], 0) for f in flows]
        ls_ = [asold.get(f[0], 0) for f in flows]
        market_local = sum(lb_)
        to_grid = [exp[k] - ls_[k] for k in range(n)]
        residual_exp = sum(to_grid)
        residual_imp = demand - market_local
    else:
        p_buy, p_sell = prices(t.mechanism, supply, demand, retail, feed_in, fee)
        market_local = min(supply, demand) if supply and demand else 0
        residual_exp = supply - market_local
        residual_imp = demand - market_local
    # 3. the fund's share of the export proceeds, as a lower selling price
    levy = Fraction(0)
    if t.fund_export_ppm and residual_exp and t.mechanism != "auction":
        levy = Fraction(feed_in * residual_exp * t.fund_export_ppm, supply * PPM)
    den = math.lcm(p_buy.denominator, p_sell.denominator, levy.denominator)
    unit = den * PPM
    q = unit * 1000
    kb = p_buy.numerator * (unit // p_buy.denominator)
    ks = p_sell.numerator * (unit // p_sell.denominator)
    gb = retail * unit
    gs = feed_in * unit
    nums = []
    fund = 0
    mppm = t.fund_margin_ppm
    if t.mechanism == "auction":
        xppm = t.fund_export_ppm
        for k in range(n):
            pay = kb * lb_[k] - ks * ls_[k] + gb * (imp[k] - lb_[k]) - gs * to_grid[k]
            if xppm and to_grid[k]:
                take = gs * to_grid[k] * xppm // PPM
                pay += take
                fund -= take
            nums.append(pay)
    else:
        kl = levy.numerator * (unit // levy.denominator)
        ks -= kl
        fund -= kl * supply
        if pref_pay is None:
            # the common case in one pass: market amounts and the margin
            for _, i, e in flows:
                pay = kb * i - ks * e
                if mppm:
                    saving = gb * i - gs * e - pay
                    if saving > 0:
                        take = saving * mppm // PPM
                        pay += take
                        fund -= take
                nums.append(pay)
            mppm = 0
        else:
            for k in range(n):
                nums.append(kb * imp[k] - ks * exp[k])
    if pref_pay is not None:
        for k in range(n):
            nums[k] += pref_pay[k] * unit
    # 4. the fund's margin on each member's saving against grid-only
    if mppm:
        for k in range(n):
            saving = gb * flows[k][1] - gs * flows[k][2] - nums[k]
            if saving > 0:
                take = saving * mppm // PPM     # exact: saving is a multiple of 10^6
                nums[k] += take
                fund -= take
    grid = gs * residual_exp - gb * residual_imp - fee * unit * (market_local + preferred)
    nums.append(grid)
    nums.append(fund)
    if sum(nums) != 0:
        raise AssertionError(f"settlement does not balance before rounding: {sum(nums)}/{q}")
    out = _round_nums(nums, q)
    res = Result(out[:-2], out[-2], out[-1], p_buy, p_sell - levy, market_local + preferred, preferred)
    if detail:
        if t.mechanism == "auction":
            b: list[Fraction | int] = list(lb_)
            s: list[Fraction | int] = list(ls_)
        else:
            b = [Fraction(imp[k] * market_local, demand) if demand else 0 for k in range(n)]
            s = [Fraction(exp[k] * market_local, supply) if supply else 0 for k in range(n)]
        if pref_b is not None:
            b = [b[k] + pref_b[k] for k in range(n)]
            s = [s[k] + pref_s[k] for k in range(n)]
        res.bought = [_int(v) for v in b]
        res.sold = [_int(v) for v in s]
        res.pref_bought = pref_b or [0] * n
        res.pref_sold = pref_s or [0] * n
    return res


def _int(v: Fraction | int) -> Fraction | int:
    return int(v) if isinstance(v, Fraction) and v.denominator == 1 else v


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


def settle(flows: list[Flow], tariff: Tariff, partners: Sequence[Partner] = ()) -> Settlement:
    """Settle one interval. Flows in any order; limits default to retail
    (bid) and feed-in (ask); partners are matched in the order given."""
    flows = sorted(flows, key=lambda f: f.member)
    ids = [f.member for f in flows]
    if len(set(ids)) != len(ids):
        raise ValueError("a member appears twice in one interval")
    fl = [(f.member, f.imp, f.exp) for f in flows]
    lim = None
    if tariff.mechanism == "auction":
        lim = [(tariff.retail if f.bid is None else f.bid, tariff.feed_in if f.ask is None else f.ask)
               for f in flows]
    partners = list(partners)
    check_inputs(tariff, fl, lim, partners)
    r = market(tariff, fl, lim, partners, detail=True)
    assert r.bought is not None and r.sold is not None and r.pref_bought is not None and r.pref_sold is not None
    members: dict[int, dict[str, Any]] = {}
    for k, f in enumerate(flows):
        m = {"imp_wh": f.imp, "exp_wh": f.exp, "bought_local_wh": _num(r.bought[k]),
             "sold_local_wh": _num(r.sold[k]),
             "grid_only": _num(Fraction(tariff.retail * f.imp - tariff.feed_in * f.exp, 1000)),
             "amount": r.amounts[k]}
        if lim is not None:
            m["bid"], m["ask"] = lim[k]
        if partners:
            m["pref_bought_wh"] = r.pref_bought[k]
            m["pref_sold_wh"] = r.pref_sold[k]
        members[f.member] = m
    return Settlement(tariff.mechanism, r.p_buy, r.p_sell, sum(f.imp for f in flows), sum(f.exp for f in flows),
                      r.local, members, r.grid, r.fund, r.preferred, partners)
