"""Interval energy of one member from the cumulative registers of its grid
channel (issue 6, item 1): a pure function of the stored readings.

1. The registers are made one continuous series across reboots: a board
   restores them from flash after a reset, so the first value of a new boot
   can be below the last one seen before it (the energy since the board's
   last save was counted and reported, then forgotten). The new boot's
   values are shifted up to continue from where the old boot stopped; the
   energy across a reboot is taken as zero, never negative.
2. The value at each interval boundary is interpolated linearly between the
   readings just before and just after it, and rounded to whole Wh (half
   down) once. An interval's energy is the difference of its two boundary
   values, so the energies of consecutive intervals add up exactly to the
   registers' own difference: nothing is lost or counted twice.
3. A boundary with a gap around it (readings further apart than `max_gap_s`)
   is still interpolated, which spreads the energy of the gap evenly over
   it, and the intervals touching it are flagged estimated. A boundary after
   the newest reading takes the newest value (estimated): what comes later
   shows up when the board's readings arrive, as an adjustment.
4. A reading is never taken as measured before one that precedes it in the
   board's own order (boot, then seq): where the times say otherwise (a
   board whose clock restarted behind after a reboot while claiming to be
   synced, a reading filed under the receive time next to others filed under
   the board's clock, PROTOCOL.md appendix B) it is moved to that reading's
   time and the intervals are flagged estimated. The series then rises in
   time as in the board's order: no interval gets negative energy, and no
   energy is put before the time the board had counted it.
"""
from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Reading:
    t: float          # the time the reading is filed under (store.readings.t)
    boot: int
    seq: int
    imp_wh: int       # grid channel import register
    exp_wh: int       # grid channel export register


@dataclass(frozen=True)
class IntervalEnergy:
    start: int        # Unix seconds
    end: int
    imp_wh: int
    exp_wh: int
    estimated: bool


def continuous(readings: list[Reading], moved: list[bool] | None = None) -> list[tuple[float, int, int]]:
    """(t, import, export) in time order with reboots stitched together;
    a reading filed earlier than one before it in the board's order is
    taken at that one's time (then moved[0] is set)."""
    rs = sorted(readings, key=lambda r: (r.boot, r.seq))
    out: list[tuple[float, int, int]] = []
    off_i = off_e = 0
    t_min = -math.inf
    last: Reading | None = None
    for r in rs:
        if last is not None and r.boot != last.boot:
            # continue from where the previous boot stopped
            off_i = max(off_i + last.imp_wh - r.imp_wh, off_i)
            off_e = max(off_e + last.exp_wh - r.exp_wh, off_e)
        elif last is not None and (r.imp_wh < last.imp_wh or r.exp_wh < last.exp_wh):
            raise ValueError(f"register went backwards within boot {r.boot} at seq {r.seq}")
        t = r.t
        if t < t_min:
            t = t_min
            if moved is not None:
                moved[0] = True
        t_min = t
        out.append((t, r.imp_wh + off_i, r.exp_wh + off_e))
        last = r
    return out


def _round(v: Fraction) -> int:
    # half down, so the same boundary always rounds the same way
    return -((-v * 2 + 1) // 2) if v >= 0 else int(v)


def boundary(series: list[tuple[float, int, int]], times: list[float], t: float,
             max_gap_s: float) -> tuple[int, int, bool] | None:
    """Register values at time t, and whether they are estimated. None
    before the first reading."""
    i = bisect_right(times, t)
    if i == 0:
        return None
    ta, ia, ea = series[i - 1]
    if ta == t or i == len(series):
        return ia, ea, i == len(series) and ta != t
    tb, ib, eb = series[i]
    w = Fraction(t - ta).limit_denominator(10**6) / Fraction(tb - ta).limit_denominator(10**6)
    return _round(ia + (ib - ia) * w), _round(ea + (eb - ea) * w), tb - ta > max_gap_s


def intervals(readings: list[Reading], start: int, end: int, length_s: int = 900,
              max_gap_s: float = 60) -> list[IntervalEnergy]:
    """Energy in every interval of length_s between start and end (both on
    interval boundaries). Intervals before the member's first reading are
    left out."""
    if length_s <= 0 or start % length_s or end % length_s:
        raise ValueError("start and end must lie on interval boundaries")
    moved = [False]
    series = continuous(readings, moved)
    disorder = moved[0]
    times = [s[0] for s in series]
    out: list[IntervalEnergy] = []
    prev = boundary(series, times, start, max_gap_s) if series else None
    for t0 in range(start, end, length_s):
        cur = boundary(series, times, t0 + length_s, max_gap_s) if series else None
        if prev is not None and cur is not None:
            out.append(IntervalEnergy(t0, t0 + length_s, cur[0] - prev[0], cur[1] - prev[1],
                                      prev[2] or cur[2] or disorder))
        prev = cur
    return out
