"""Energy plausibility from physics (issue 17): a board's energy registers
may grow no faster than its channels can carry energy, in time the gateway
can vouch for. Pure bookkeeping per device, no I/O (peergrid.ingest.validate calls
it for every reading that passed the MAC, schema, replay and clock checks).

What a register may gain between two readings A and B of a device (B after
A in the board's own order: boot, then seq), per channel, for import and
export alike:

    rise(A -> B) <= P * elapsed(A, B) + ALLOWANCE_WH

with P the most power the channel can carry, P = rating_a x V x MARGIN
(MARGIN 1.2: a CT driven past its rating, calibration and timing error).

Elapsed time. Two clocks say how much time passed, and neither can be taken
alone:

- The board's clock `t` is exact for the difference of two readings of the
  same boot and the same clock state (both synced or both unsynced: the
  clock runs on, whatever its offset), and it is the only clock that sees
  the time between readings that were buffered in flash and arrive in a
  burst (receive times compressed to milliseconds). But a dishonest board
  writes whatever `t` it likes.
- The gateway's receive time cannot be forged, but it only bounds when a
  reading was measured from above (never after it arrived); a reading may
  have waited in a board's flash for hours, or in the broker while the
  gateway was down, and be received with thousands of others at once.

Hence two rules, both must hold:

1. Neighbours (the readings just before and just after B in the same boot,
   whatever order they arrived in): elapsed = the larger of the board-clock
   difference and the receive-time difference, plus TICK_S (t is whole
   seconds) when both readings have the same clock state; across a clock
   state change (NTP set the clock) the board's clock is no measure, and
   elapsed is taken from the windows of rule 2. V is the voltage B
   measured (vrms_dv, held to 207..253 V) or 230 V without one. This is the
   tight rule for an honest board; alone it could be gamed (a board that
   alternately claims its clock jumped ahead and back would be granted the
   jump on every other reading).
2. Every pair, cumulatively (so a tolerance is granted once per run of
   readings, never once per reading): each reading gets a window [L, U] of
   gateway time in which it must have been measured: U = its receive time;
   L = its receive time less `max_late_s` (the longest a reading may wait in
   a board's flash; 4 days by default, more than the 32768-reading replay
   window at one reading per 10 s), or, when the board's clock is synced and
   agrees with the gateway's (the reading is filed under its own `t`), its
   `t` less `max_skew_s`, whichever is later. Then for every A before B:
   rise(A -> B) <= P * (U_B - L_A) + ALLOWANCE_WH with V = 253 V (the
   highest a 230 V grid may carry, EN 50160), the registers stitched across
   reboots exactly as settlement stitches them (a new boot continues from
   where the last one stopped; a register restored lower is no energy, one
   restored higher is). The sum over any stretch of readings is then bounded
   by the gateway's own clock: a board can claim at most its channels'
   rated energy for the time that really passed, plus once max_skew_s of it
   (max_late_s of it, once, for a board whose clock is never synced: what a
   real board could have measured offline before the gateway heard from
   it; the whole check can do no better without a clock it trusts). A
   reboot starts nothing afresh: the new boot is held to the readings of
   the boots before it (after a gateway restart, to the first and newest
   readings of the five newest boots, Store.energy_history).

Check 2 for all pairs costs O(1) per reading: rise(A -> B) <= P(U_B - L_A) + C
is x_B' <= x_A + C with x = s - P*L, y = s - P*U (s the stitched register),
so a reading needs only the least x before it and the largest y after it.
Readings are kept as runs of consecutive ones (per run: the registers and
times at both ends, the least x and largest y); a reading that arrives in
order extends the last run, one that fills a hole (a replay from flash, a
redelivery) is checked against the runs on both sides and joins them. A
device has a few runs, so memory stays small with many devices.

A reading that breaks a rule is refused (E_PLAUSIBILITY) and changes
nothing here, so it never reaches the store and settlement never pays it.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

V_NOMINAL = 230.0          # without a voltage measurement
V_LOW, V_HIGH = 207.0, 253.0   # a measured voltage is held to 230 V +- 10 % (EN 50160)
MARGIN = 1.2               # head-room over the CT rating
ALLOWANCE_WH = 2.0         # registers are whole Wh: rounding at both ends
TICK_S = 2.0               # board clock: whole seconds at both ends
RUN_GAP = 4                # readings at most this many seqs apart join one run
MAX_RUNS = 12              # runs kept per device before the closest ones merge
MAX_BOOTS = 5              # boots kept per device (the replay window accepts 4)
DEFAULT_MAX_LATE_S = 4 * 86400

_INF = math.inf
_DIRS = ("import", "export")
# what many devices share (read only): per set of ratings the powers, per
# register count the empty floor
_RATES: dict[tuple[Any, ...], tuple[tuple[float, ...], tuple[float, ...]]] = {}
_FLOORS: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {}


class EnergyError(Exception):
    """The reading would make a register implausible; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Run:
    """Consecutive readings of one boot: registers and times at both ends,
    least x and largest y over all of them (raw registers, without the
    boot's stitching offset)."""
    __slots__ = ("boot", "lo", "hi", "first", "last", "f_info", "l_info", "xmin", "ymax")

    def __init__(self, boot: int, seq: int, raw: list[int], info: tuple, x: list[float], y: list[float]) -> None:
        self.boot = boot
        self.lo = self.hi = seq
        self.first = self.last = raw
        self.f_info = self.l_info = info          # (t_recv, t_board, unsynced, L, V)
        self.xmin = x
        self.ymax = y


def _merge(a: _Run, b: _Run) -> _Run:
    """b follows a in the same boot."""
    a.hi, a.last, a.l_info = b.hi, b.last, b.l_info
    a.xmin = [min(p, q) for p, q in zip(a.xmin, b.xmin)]
    a.ymax = [max(p, q) for p, q in zip(a.ymax, b.ymax)]
    return a


def volts(vrms_dv: Any) -> float:
    if type(vrms_dv) is not int or vrms_dv <= 0:
        return V_NOMINAL
    v = vrms_dv / 10
    return V_LOW if v < V_LOW else V_HIGH if v > V_HIGH else v


class EnergyState:
    """One device's registers as far as plausibility needs them."""
    __slots__ = ("ratings", "k", "pcap", "pnom", "runs", "off", "gmin", "floor_x", "floor_off", "floor_slast",
                 "floor_boot", "max_late_s", "max_skew_s", "src")

    def __init__(self, ratings: Sequence[float], max_late_s: float = DEFAULT_MAX_LATE_S,
                 max_skew_s: float = 300) -> None:
        self.ratings = tuple(ratings)
        self.k = 2 * len(ratings)
        rates = _RATES.get(self.ratings)
        if rates is None:
            # Wh per second, per register (import and export of each channel)
            rates = _RATES[self.ratings] = (tuple(r * V_HIGH * MARGIN / 3600 for r in ratings for _ in _DIRS),
                                            tuple(r * MARGIN / 3600 for r in ratings for _ in _DIRS))  # times V
        self.pcap, self.pnom = rates
        floors = _FLOORS.get(self.k)
        if floors is None:
            floors = _FLOORS[self.k] = ((_INF,) * self.k, (0.0,) * self.k)
        self.runs: list[_Run] = []
        self.off: dict[int, Sequence[float]] = {}
        self.gmin = [_INF] * self.k                 # least x + offset over everything kept
        self.floor_x: Sequence[float] = floors[0]   # the same over boots no longer kept (replaced, never changed)
        self.floor_off: Sequence[float] = floors[1]
        self.floor_slast: list[float] | None = None  # stitched last registers of those boots
        self.floor_boot = -1                        # the newest of them
        self.max_late_s = max_late_s
        self.max_skew_s = max_skew_s
        self.src: Any = None                        # the registry's channel list the ratings came from

    # -- entry point -----------------------------------------------------------

    def window_low(self, t_recv: float, t_board: float, trusted: bool) -> float:
        low = t_recv - self.max_late_s
        if trusted:
            b = t_board - self.max_skew_s
            if b > low:
                low = b
        return low

    def check(self, boot: int, seq: int, raw: list[int], t_recv: float, t_board: float, unsynced: bool,
              trusted: bool, vrms_dv: Any = None, commit: bool = True) -> None:
        """Raise EnergyError, or record the reading (commit)."""
        low = self.window_low(t_recv, t_board, trusted)
        info = (t_recv, t_board, unsynced, low, volts(vrms_dv))
        runs = self.runs
        if runs:
            r = runs[-1]
            if boot == r.boot and seq > r.hi:
                self._append(r, seq, raw, info, commit)
                return
            if boot > r.boot:
                self._new_boot(r, boot, seq, raw, info, commit)
                return
            self._insert(boot, seq, raw, info, commit)
            return
        if commit:                  # the first reading: nothing to hold it to
            x, y = self._xy(raw, info)
            runs.append(_Run(boot, seq, raw, info, x, y))
            self._recompute()

    def load(self, rows: Iterable[tuple[int, int, list[int], float, float, bool, bool, Any]]) -> None:
        """Rebuild from readings already accepted (after a restart): rows
        of (boot, seq, raw, t_recv, t_board, unsynced, trusted, vrms_dv), in
        any order; nothing is checked."""
        for boot, seq, raw, t_recv, t_board, unsynced, trusted, vrms in sorted(rows, key=lambda r: (r[0], r[1])):
            low = self.window_low(t_recv, t_board, trusted)
            info = (t_recv, t_board, unsynced, low, volts(vrms))
            self._place(boot, seq, raw, info)
        self._compact()
        self._recompute()

    # -- paths -----------------------------------------------------------------

    def _xy(self, raw: Sequence[int], info: tuple) -> tuple[list[float], list[float]]:
        """x = r - P*L and y = r - P*U of a reading's raw registers r."""
        t_recv, low = info[0], info[3]
        pc = self.pcap
        return [raw[k] - pc[k] * low for k in range(self.k)], [raw[k] - pc[k] * t_recv for k in range(self.k)]

    def _append(self, r: _Run, seq: int, raw: list[int], info: tuple, commit: bool) -> None:
        """The common case: the next reading of the newest boot (one pass
        over the registers for both rules)."""
        last = r.last
        a = r.l_info
        t_recv, t_board, uns, low, v = info
        if a[2] == uns:
            el = max(t_recv - a[0], t_board - a[1]) + TICK_S
        else:
            el = t_recv - a[3]
        if el < 0:
            el = 0.0
        if a[4] > v:
            v = a[4]
        off = self.off[r.boot]
        gmin = self.gmin
        pc = self.pcap
        pn = self.pnom
        for k in range(self.k):
            rk = raw[k]
            rise = rk - last[k]
            if rise < 0:
                raise EnergyError(self._backwards(k, rk, last[k], r.boot, r.hi, "after"))
            if rise > ALLOWANCE_WH and rise > pn[k] * v * el + ALLOWANCE_WH:
                self._neighbour(a, last, info, raw)             # raises with the reason
            # always, however small the rise: rule 2 is what keeps small
            # rises from adding up
            e = rk + off[k] - pc[k] * t_recv - gmin[k] - ALLOWANCE_WH
            if e > 0:
                raise EnergyError(self._cumulative(k, e))
        if not commit:
            return
        extend = seq - r.hi <= RUN_GAP
        if extend:
            r.hi, r.last, r.l_info = seq, raw, info
            xm, ym = r.xmin, r.ymax
        else:
            xm, ym = [_INF] * self.k, [-_INF] * self.k
        for k in range(self.k):
            rk = raw[k]
            x = rk - pc[k] * low
            y = rk - pc[k] * t_recv
            if x + off[k] < gmin[k]:
                gmin[k] = x + off[k]
            if x < xm[k]:
                xm[k] = x
            if y > ym[k]:
                ym[k] = y
        if not extend:
            n = _Run(r.boot, seq, raw, info, xm, ym)
            self.runs.append(n)
            if len(self.runs) > MAX_RUNS:
                self._compact()
                self._recompute()

    def _new_boot(self, r: _Run, boot: int, seq: int, raw: list[int], info: tuple, commit: bool) -> None:
        """The first reading of a boot newer than any kept: it continues
        from where the last boot stopped (as settlement stitches it)."""
        prev = self.off[r.boot]
        off = [max(o, o + la - f) for o, la, f in zip(prev, r.last, raw)]
        x, y = self._xy(raw, info)
        gmin = self.gmin
        for k in range(self.k):
            if y[k] + off[k] > gmin[k] + ALLOWANCE_WH:
                raise EnergyError(self._cumulative(k, y[k] + off[k] - gmin[k] - ALLOWANCE_WH, boot=True))
        if not commit:
            return
        self.runs.append(_Run(boot, seq, raw, info, x, y))
        self.off[boot] = off
        for k in range(self.k):
            v = x[k] + off[k]
            if v < gmin[k]:
                gmin[k] = v
        if len({q.boot for q in self.runs}) > MAX_BOOTS or len(self.runs) > MAX_RUNS:
            self._compact()
            self._recompute()

    def _insert(self, boot: int, seq: int, raw: list[int], info: tuple, commit: bool) -> None:
        """A reading that fills a hole (or comes from an older boot, or
        before the first one kept): checked against the runs on both sides
        with the stitching as it will be once it is in."""
        runs = self.runs
        i = 0
        while i < len(runs) and (runs[i].boot, runs[i].hi) < (boot, seq):
            i += 1
        if i < len(runs) and runs[i].boot == boot and runs[i].lo <= seq:
            self._inside(i, seq, raw, info, commit)
            return
        if i == 0 and self.floor_slast is not None and boot <= self.floor_boot:
            raise EnergyError(f"a reading of boot {boot} is older than the boots the gateway keeps for it")
        pred = runs[i - 1] if i > 0 and runs[i - 1].boot == boot else None
        succ = runs[i] if i < len(runs) and runs[i].boot == boot else None
        for k in range(self.k):
            if pred is not None and raw[k] < pred.last[k]:
                raise EnergyError(self._backwards(k, raw[k], pred.last[k], boot, pred.hi, "after"))
            if succ is not None and raw[k] > succ.first[k]:
                raise EnergyError(self._backwards(k, raw[k], succ.first[k], boot, succ.lo, "before"))
        if pred is not None:
            self._neighbour(pred.l_info, pred.last, info, raw)
        if succ is not None:
            self._neighbour(info, raw, succ.f_info, succ.first)
        x, y = self._xy(raw, info)
        new = _Run(boot, seq, raw, info, x, y)
        tentative = runs[:i] + [new] + runs[i:]
        old_bad = self._violations(runs, self.off)
        off = self._offsets(tentative)
        new_bad = self._violations(tentative, off)
        was = dict(zip(map(id, runs), old_bad))
        for run, bad in zip(tentative, new_bad):
            if bad is not None and not was.get(id(run)):
                k, excess = bad
                raise EnergyError(self._cumulative(k, excess))
        if not commit:
            return
        self.runs = tentative
        self.off = off
        self._compact()
        self._recompute()

    def _inside(self, i: int, seq: int, raw: list[int], info: tuple, commit: bool) -> None:
        """Within the span of a run (a small hole that run closed over):
        between the run's ends, and against the runs on both sides."""
        r = self.runs[i]
        for k in range(self.k):
            if raw[k] < r.first[k]:
                raise EnergyError(self._backwards(k, raw[k], r.first[k], r.boot, r.lo, "after"))
            if raw[k] > r.last[k]:
                raise EnergyError(self._backwards(k, raw[k], r.last[k], r.boot, r.hi, "before"))
        off = self.off[r.boot]
        x, y = self._xy(raw, info)
        # the run's two ends, each as a reading of its own
        pc = self.pcap
        for k in range(self.k):
            e = raw[k] - r.first[k] - pc[k] * max(0.0, info[0] - r.f_info[3]) - ALLOWANCE_WH
            if e > 0:
                raise EnergyError(self._cumulative(k, e))
            e = r.last[k] - raw[k] - pc[k] * max(0.0, r.l_info[0] - info[3]) - ALLOWANCE_WH
            if e > 0:
                raise EnergyError(self._cumulative(k, e, later=True))
        before = list(self.floor_x)
        for q in self.runs[:i]:
            o = self.off[q.boot]
            before = [min(b, v + p) for b, v, p in zip(before, q.xmin, o)]
        for k in range(self.k):
            if y[k] + off[k] > before[k] + ALLOWANCE_WH:
                raise EnergyError(self._cumulative(k, y[k] + off[k] - before[k] - ALLOWANCE_WH))
        for q in self.runs[i + 1:]:
            o = self.off[q.boot]
            for k in range(self.k):
                if q.ymax[k] + o[k] > x[k] + off[k] + ALLOWANCE_WH:
                    raise EnergyError(self._cumulative(k, q.ymax[k] + o[k] - x[k] - off[k] - ALLOWANCE_WH, later=True))
        if not commit:
            return
        r.xmin = [min(a, b) for a, b in zip(r.xmin, x)]
        r.ymax = [max(a, b) for a, b in zip(r.ymax, y)]
        self._recompute()

    # -- rules -------------------------------------------------------------------

    def _neighbour(self, a: tuple, a_raw: Sequence[int], b: tuple, b_raw: Sequence[int]) -> None:
        """Rule 1 for neighbours A before B in one boot."""
        if a[2] == b[2]:
            el = max(b[0] - a[0], b[1] - a[1]) + TICK_S
        else:
            el = b[0] - a[3]
        if el < 0:
            el = 0.0
        v = a[4] if a[4] > b[4] else b[4]
        pn = self.pnom
        for k in range(self.k):
            rise = b_raw[k] - a_raw[k]
            if rise > ALLOWANCE_WH:
                allowed = pn[k] * v * el + ALLOWANCE_WH
                if rise > allowed:
                    raise EnergyError(
                        f"channel {k // 2} {_DIRS[k % 2]} register rose {rise} Wh in {el:.0f} s; a "
                        f"{self.ratings[k // 2]:g} A CT at {v:.0f} V carries at most {allowed:.0f} Wh in that time")

    def _offsets(self, runs: list[_Run]) -> dict[int, Sequence[float]]:
        """Each boot's stitching offset (what settlement adds to its
        registers so they continue from the boot before)."""
        off: dict[int, list[float]] = {}
        prev_off, prev_slast = self.floor_off, self.floor_slast
        cur: _Run | None = None
        for r in runs:
            if cur is None or r.boot != cur.boot:
                if cur is not None:
                    prev_off = off[cur.boot]
                    prev_slast = [o + la for o, la in zip(prev_off, cur.last)]
                if prev_slast is None:
                    off[r.boot] = prev_off          # read only: shared
                else:
                    off[r.boot] = [max(o, s - f) for o, s, f in zip(prev_off, prev_slast, r.first)]
            cur = r
        return off

    def _violations(self, runs: list[_Run], off: dict[int, Sequence[float]]) -> list[tuple[int, float] | None]:
        """Per run: a register and its excess where some reading in it rose
        too much against a reading in an earlier run (rule 2), else None."""
        pref = list(self.floor_x)
        out: list[tuple[int, float] | None] = []
        for r in runs:
            o = off[r.boot]
            bad = None
            for k in range(self.k):
                e = r.ymax[k] + o[k] - pref[k] - ALLOWANCE_WH
                if e > 0:
                    bad = (k, e)
                    break
            out.append(bad)
            for k in range(self.k):
                v = r.xmin[k] + o[k]
                if v < pref[k]:
                    pref[k] = v
        return out

    # -- upkeep ------------------------------------------------------------------

    def _place(self, boot: int, seq: int, raw: list[int], info: tuple) -> None:
        """Append a known-good reading in (boot, seq) order."""
        x, y = self._xy(raw, info)
        runs = self.runs
        if runs and runs[-1].boot == boot and seq - runs[-1].hi <= RUN_GAP and seq > runs[-1].hi:
            _merge(runs[-1], _Run(boot, seq, raw, info, x, y))
        else:
            runs.append(_Run(boot, seq, raw, info, x, y))

    def _compact(self) -> None:
        """Join runs that touch; past MAX_RUNS join the closest pair of the
        same boot; past MAX_BOOTS fold the oldest boot into the floor."""
        runs = self.runs
        out: list[_Run] = []
        for r in runs:
            if out and out[-1].boot == r.boot and r.lo - out[-1].hi <= RUN_GAP:
                _merge(out[-1], r)
            else:
                out.append(r)
        runs = out
        while len({r.boot for r in runs}) > MAX_BOOTS or len(runs) > MAX_RUNS:
            best = None
            if len({r.boot for r in runs}) <= MAX_BOOTS:
                for j in range(len(runs) - 1):
                    a, b = runs[j], runs[j + 1]
                    if a.boot == b.boot and (best is None or b.lo - a.hi < best[0]):
                        best = (b.lo - a.hi, j)
            if best is not None:
                j = best[1]
                runs[j:j + 2] = [_merge(runs[j], runs[j + 1])]
                continue
            # fold the oldest boot into the floor
            off = self._offsets(runs)
            b0 = runs[0].boot
            o = off[b0]
            last = None
            while runs and runs[0].boot == b0:
                r = runs.pop(0)
                self.floor_x = [min(f, v + p) for f, v, p in zip(self.floor_x, r.xmin, o)]
                last = r.last
            assert last is not None
            self.floor_off = list(o)
            self.floor_slast = [p + la for p, la in zip(o, last)]
            self.floor_boot = b0
        self.runs = runs

    def _recompute(self) -> None:
        self.off = self._offsets(self.runs)
        g = list(self.floor_x)
        for r in self.runs:
            o = self.off[r.boot]
            g = [min(a, v + p) for a, v, p in zip(g, r.xmin, o)]
        self.gmin = g

    # -- messages ----------------------------------------------------------------

    def _backwards(self, k: int, v: int, other: int, boot: int, seq: int, where: str) -> str:
        return (f"channel {k // 2} {_DIRS[k % 2]} register went backwards within boot {boot}: {v} Wh "
                f"{where} {other} Wh at seq {seq}")

    def _cumulative(self, k: int, excess: float, boot: bool = False, later: bool = False) -> str:
        what = " across a reboot" if boot else " against a later reading" if later else ""
        return (f"channel {k // 2} {_DIRS[k % 2]} register rose{what} {excess:.0f} Wh more than a "
                f"{self.ratings[k // 2]:g} A CT can carry in the time the gateway can vouch for")

