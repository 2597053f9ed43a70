"""Statements from the ledger (issue 6, item 5): per member and period, the
energy bought locally and from the grid, sold locally and to the grid, the
money, and three baselines of what the member would have paid without the
community: grid only (every kWh imported at retail, exports unpaid),
feed-in only (imports at retail, exports at feed-in, interval by interval:
no local market; `saving` is against this one), and net metering (imports
and exports netted over the statement's period at retail, a surplus paid at
feed-in; both prices configurable); community totals (self-sufficiency,
self-consumption, peak import, the fund, CO2 with a configurable grid
intensity).

Everything is computed from the settlement entries alone, so a member can
produce the same statement from the ledger export as the gateway does.
The energy each member bought and sold locally comes from re-running the
interval's settlement from the inputs recorded in its entry (preferred
partners first, then the mechanism; see docs/SETTLEMENT.md).
Money is in minor units; the grid-only and feed-in-only comparisons are
rounded up per interval, as the settlement rounds.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable

from peergrid.market.ledger import Entry


@dataclass
class Statement:
    member: int
    start: int
    end: int
    intervals: int = 0
    bought_local_wh: Fraction = Fraction(0)
    bought_grid_wh: Fraction = Fraction(0)
    sold_local_wh: Fraction = Fraction(0)
    sold_grid_wh: Fraction = Fraction(0)
    paid: int = 0                   # net, minor units (negative: earned)
    feed_in_only: int = 0           # no local market: imports at retail, exports at feed-in, interval by interval
    grid_only: int = 0              # everything bought from the grid at retail, exports unpaid
    retail_wh: Fraction = Fraction(0)   # sum of retail x imported Wh (for net metering's default rate)

    @property
    def saving(self) -> int:
        """Against feed-in only (no local market)."""
        return self.feed_in_only - self.paid

    @property
    def imp_wh(self) -> Fraction:
        return self.bought_local_wh + self.bought_grid_wh

    @property
    def exp_wh(self) -> Fraction:
        return self.sold_local_wh + self.sold_grid_wh

    def net_metering(self, rate: int | None = None, surplus: int | None = None, feed_in: int = 0) -> int:
        """Net metering: imports and exports netted over the whole period
        at `rate` per kWh (default: the retail price, weighted by the
        energy imported); a surplus left at the end is paid at `surplus`
        (default the feed-in price). Minor units, rounded up for the member."""
        net = self.imp_wh - self.exp_wh
        if rate is None:
            rate_f = self.retail_wh / self.imp_wh if self.imp_wh else Fraction(0)
        else:
            rate_f = Fraction(rate)
        if net >= 0:
            return math.ceil(rate_f * net / 1000)
        return -math.floor(Fraction(feed_in if surplus is None else surplus) * -net / 1000)


@dataclass
class Community:
    start: int
    end: int
    demand_wh: int = 0
    supply_wh: int = 0
    local_wh: int = 0
    preferred_wh: int = 0           # of local_wh, traded between preferred partners
    fund: int = 0
    members: dict[int, Statement] = field(default_factory=dict)
    grid_import_wh: Fraction = Fraction(0)      # what the community bought from the grid
    grid_export_wh: Fraction = Fraction(0)
    peak_import_w: int = 0                     # the largest import from the grid, averaged over an interval
    feed_in: int = 0                           # the last interval's feed-in price (net metering's surplus price)

    @property
    def self_sufficiency(self) -> float:
        return self.local_wh / self.demand_wh if self.demand_wh else 0.0

    @property
    def self_consumption(self) -> float:
        return self.local_wh / self.supply_wh if self.supply_wh else 0.0


def statements(entries: Iterable[Entry], start: int, end: int) -> Community:
    c = Community(start, end)
    for e in entries:
        if e.type not in ("settlement", "adjustment") or not (start <= e.body["start"] and e.body["end"] <= end):
            continue
        if e.type == "adjustment":
            # take the old figures out and the new ones in
            _add(c, e.body["old"], -1, start, end)
            _add(c, e.body["new"], 1, start, end, count=False)
            continue
        _add(c, e.body, 1, start, end)
    return c


def _add(c: Community, b: dict, sign: int, start: int, end: int, count: bool = True) -> None:
    from peergrid.market.ledger import rerun

    flows, t, r = rerun(b, detail=True)
    count = count and sign > 0
    c.demand_wh += sign * sum(f[1] for f in flows)
    c.supply_wh += sign * sum(f[2] for f in flows)
    c.local_wh += sign * r.local
    c.preferred_wh += sign * r.preferred
    c.fund -= sign * b["fund"]
    if sign > 0:
        length = max(1, b["end"] - b["start"])
        c.peak_import_w = max(c.peak_import_w, int(max(0, sum(f[1] for f in flows) - r.local) * 3600 // length))
        c.feed_in = t.feed_in
    c.grid_import_wh += sign * (sum(f[1] for f in flows) - r.local)
    c.grid_export_wh += sign * (sum(f[2] for f in flows) - r.local)
    for k, ((m, imp, exp), amount) in enumerate(zip(flows, b["amounts"])):
        s = c.members.get(m)
        if s is None:
            s = c.members[m] = Statement(m, start, end)
        if count:
            s.intervals += 1
        lb, ls = r.bought[k], r.sold[k]
        s.bought_local_wh += sign * lb
        s.bought_grid_wh += sign * (imp - lb)
        s.sold_local_wh += sign * ls
        s.sold_grid_wh += sign * (exp - ls)
        s.paid += sign * amount
        s.feed_in_only += sign * math.ceil(Fraction(t.retail * imp - t.feed_in * exp, 1000))
        s.grid_only += sign * math.ceil(Fraction(t.retail * imp, 1000))
        s.retail_wh += sign * t.retail * imp


def _kwh(wh: Fraction | int) -> str:
    return f"{float(wh) / 1000:.3f}"


def _money(v: int) -> str:
    sign = "-" if v < 0 else ""
    return f"{sign}{abs(v) // 100}.{abs(v) % 100:02d}"


COLUMNS = ["member", "intervals", "bought_local_kwh", "bought_grid_kwh", "sold_local_kwh", "sold_grid_kwh",
           "paid", "grid_only", "feed_in_only", "net_metering", "saving"]


def rows(c: Community, net_rate: int | None = None, net_surplus: int | None = None) -> list[list[Any]]:
    """One row a member; `saving` is against feed-in only (no local market)."""
    out = []
    for m in sorted(c.members):
        s = c.members[m]
        out.append([m, s.intervals, _kwh(s.bought_local_wh), _kwh(s.bought_grid_wh), _kwh(s.sold_local_wh),
                    _kwh(s.sold_grid_wh), _money(s.paid), _money(s.grid_only), _money(s.feed_in_only),
                    _money(s.net_metering(net_rate, net_surplus, c.feed_in)), _money(s.saving)])
    return out


@dataclass
class Baselines:
    """The community's money against what its members would have had
    without it, and its key figures (issue 22, part 5)."""
    paid: int
    grid_only: int
    feed_in_only: int
    net_metering: int
    self_sufficiency: float
    self_consumption: float
    peak_import_w: int
    grid_import_kwh: float
    co2_kg: float
    co2_avoided_kg: float

    def lines(self) -> list[str]:
        return [f"members paid {_money(self.paid)} in all; without the community they would have paid",
                f"  grid only (all imports at retail, exports unpaid): {_money(self.grid_only)}, "
                f"saving {_money(self.grid_only - self.paid)}",
                f"  feed-in only (imports at retail, exports at feed-in, no local market): {_money(self.feed_in_only)}, "
                f"saving {_money(self.feed_in_only - self.paid)}",
                f"  net metering (netted over the period at retail): {_money(self.net_metering)}, "
                f"saving {_money(self.net_metering - self.paid)}",
                f"self-sufficiency {100 * self.self_sufficiency:.1f} %, self-consumption {100 * self.self_consumption:.1f} %,"
                f" peak import {self.peak_import_w / 1000:.1f} kW, bought from the grid {self.grid_import_kwh:.1f} kWh, "
                f"CO2 {self.co2_kg:.1f} kg ({self.co2_avoided_kg:.1f} kg avoided by local trade)"]


def baselines(c: Community, grid_g_per_kwh: float = 300.0, net_rate: int | None = None,
              net_surplus: int | None = None) -> Baselines:
    """grid_g_per_kwh: the grid's carbon intensity (configurable; 300 g/kWh
    is a round European figure, not a measurement)."""
    ms = c.members.values()
    return Baselines(sum(s.paid for s in ms), sum(s.grid_only for s in ms), sum(s.feed_in_only for s in ms),
                     sum(s.net_metering(net_rate, net_surplus, c.feed_in) for s in ms), c.self_sufficiency,
                     c.self_consumption, c.peak_import_w, float(c.grid_import_wh) / 1000,
                     float(c.grid_import_wh) * grid_g_per_kwh / 1e6, c.local_wh * grid_g_per_kwh / 1e6)


def to_csv(c: Community) -> str:
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(COLUMNS)
    w.writerows(rows(c))
    return f.getvalue()


def to_table(c: Community) -> str:
    head = ["member", "intervals", "bought local", "bought grid", "sold local", "sold grid",
            "paid", "grid only", "feed-in only", "net metering", "saving"]
    body = [[str(x) for x in r] for r in rows(c)]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in body]
    lines.append("")
    lines.append(f"energy in kWh, money in currency units; community: demand {_kwh(c.demand_wh)} kWh, "
                 f"supply {_kwh(c.supply_wh)} kWh, traded locally {_kwh(c.local_wh)} kWh, self-sufficiency "
                 f"{100 * c.self_sufficiency:.1f} %, self-consumption {100 * c.self_consumption:.1f} %, "
                 f"fund {_money(c.fund)}")
    lines += baselines(c).lines()
    return "\n".join(lines)


def fund_statement(entries: list[Entry]) -> str:
    """The fund's own account, from the ledger alone: what each day's
    settlements put in (the margin on savings and the share of export
    proceeds, net of adjustments) and every payout a vote decided."""
    import time as _time

    from peergrid.market.governance import replay

    days: dict[str, int] = {}
    for e in entries:
        if e.type == "settlement":
            delta = -e.body["fund"]
        elif e.type == "adjustment":
            delta = -(e.body["new"]["fund"] - e.body["old"]["fund"])
        else:
            continue
        day = _time.strftime("%Y-%m-%d", _time.gmtime(e.body["start"]))
        days[day] = days.get(day, 0) + delta
    st = replay(entries)
    lines = ["date        collected"]
    lines += [f"{d}  {_money(v):>10}" for d, v in sorted(days.items())]
    lines.append(f"collected in all: {_money(sum(days.values()))}")
    for p in st.payouts:
        lines.append(f"paid {_money(p['amount'])} to {p['payee']} for {p['purpose']!r} "
                     f"(proposal {p['by_vote']}, entry {p['n']}, {_time.strftime('%Y-%m-%d', _time.gmtime(p['t']))})")
    lines.append(f"balance: {_money(st.fund)} (never below zero: every payout is checked by `ledger verify`)")
    return "\n".join(lines)
