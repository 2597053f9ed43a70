"""Statements from the ledger (issue 6, item 5): per member and period, the
energy bought locally and from the grid, sold locally and to the grid, the
money, and the saving against buying and selling everything at the grid's
prices; community totals (self-sufficiency, self-consumption, the fund).

Everything is computed from the settlement entries alone, so a member can
produce the same statement from the ledger export as the gateway does.
The energy each member bought and sold locally comes from re-running the
interval's settlement from the inputs recorded in its entry (preferred
partners first, then the mechanism; see docs/SETTLEMENT.md).
Money is in minor units; the grid-only comparison is rounded up per
interval, as the settlement rounds.
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
    grid_only: int = 0              # what grid-only trading would have cost

    @property
    def saving(self) -> int:
        return self.grid_only - self.paid


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
        s.grid_only += sign * math.ceil(Fraction(t.retail * imp - t.feed_in * exp, 1000))


def _kwh(wh: Fraction | int) -> str:
    return f"{float(wh) / 1000:.3f}"


def _money(v: int) -> str:
    sign = "-" if v < 0 else ""
    return f"{sign}{abs(v) // 100}.{abs(v) % 100:02d}"


COLUMNS = ["member", "intervals", "bought_local_kwh", "bought_grid_kwh", "sold_local_kwh", "sold_grid_kwh",
           "paid", "grid_only", "saving"]


def rows(c: Community) -> list[list[Any]]:
    out = []
    for m in sorted(c.members):
        s = c.members[m]
        out.append([m, s.intervals, _kwh(s.bought_local_wh), _kwh(s.bought_grid_wh), _kwh(s.sold_local_wh),
                    _kwh(s.sold_grid_wh), _money(s.paid), _money(s.grid_only), _money(s.saving)])
    return out


def to_csv(c: Community) -> str:
    f = io.StringIO()
    w = csv.writer(f)
    w.writerow(COLUMNS)
    w.writerows(rows(c))
    return f.getvalue()


def to_table(c: Community) -> str:
    head = ["member", "intervals", "bought local", "bought grid", "sold local", "sold grid",
            "paid", "grid only", "saving"]
    body = [[str(x) for x in r] for r in rows(c)]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(r, widths)) for r in body]
    lines.append("")
    lines.append(f"energy in kWh, money in currency units; community: demand {_kwh(c.demand_wh)} kWh, "
                 f"supply {_kwh(c.supply_wh)} kWh, traded locally {_kwh(c.local_wh)} kWh, self-sufficiency "
                 f"{100 * c.self_sufficiency:.1f} %, self-consumption {100 * c.self_consumption:.1f} %, "
                 f"fund {_money(c.fund)}")
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
