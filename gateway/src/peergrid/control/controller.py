"""Real-time control (issue 7): switch loads and set batteries so the
neighbourhood uses its own production, never breaches the feeder limit and
never flaps. A pure, deterministic decision step over a snapshot of the
latest readings; the gateway's control loop (peergrid.control.loop) and the
day simulation of tests/bench/bench_control.py both drive it.

Powers are W at the connection point, import positive. Per house the
controller knows the latest reading of its `grid` channel and when it was
taken. From it and the switching history it derives the house's *base*
power, what the house would draw with every controlled load off and every
battery idle (the switched loads' own power compensated, as OpenEMS does,
so a house whose export shrinks because our water heater came on is not
mistaken for a house with less surplus).

Each step, in this order:

1. **Deadlines.** A load with a daily energy need (a water heater needs
   3 kWh by 18:00) must run once the time left, less a safety margin, is
   what it needs at its rated power; it then stays on until the need is met.
2. **Surplus.** The community's surplus (minus base) is given to the loads in
   priority order: a load comes on when the surplus covers its rated power
   plus a margin; a load that is on stays on while the surplus covers at
   least `keep_share` of it, and goes off only after a deficit that lasted
   `off_delay_s`, never before its minimum on time, and comes on again only
   after its minimum off time. A load with plenty of slack before its
   deadline lets the batteries charge first (they absorb any amount, a
   relay only its rated power).
3. **Batteries** take what is left: charge from surplus, discharge into
   deficit, within power limits and the state-of-charge window.
4. **Feeder guard.** Houses whose reading is older than `stale_s` count as
   the worst case (their base at its worst plus every load of theirs on).
   If the worst-case community import exceeds the feeder's import limit,
   batteries discharge more, then optional loads are shed (lowest priority
   first, dwell times overridden: the limit wins), then loads under deadline
   pressure. If the worst-case export exceeds the export limit, batteries
   charge and loads with energy still to take come on.

Every change carries its reason; a load also has a daily switch budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DAY = 86400


@dataclass
class Load:
    id: str
    device: str
    relay: int
    rated_w: int
    priority: int = 5                 # lower comes on first
    min_on_s: int = 600
    min_off_s: int = 600
    need_wh: int = 0                  # per day; 0: an optional load without a need
    deadline_s: int | None = None     # seconds after local midnight the need must be met by
    available_s: int | None = None    # from this time of day (e.g. the EV is plugged in); None: always
    max_switches_day: int = 20


@dataclass
class Battery:
    id: str
    device: str
    target: int
    capacity_wh: int
    max_charge_w: int
    max_discharge_w: int
    soc_min: float = 0.1
    soc_max: float = 0.95
    efficiency: float = 0.92          # round trip, charged side
    soc0: float = 0.5


@dataclass
class Feeder:
    import_w: int
    export_w: int


def resources(rows: tuple[list[tuple], list[tuple], tuple | None]) -> tuple[list[Load], list[Battery], Feeder | None]:
    """Loads, batteries and the feeder (or None) from the registry's rows
    (peergrid.community.registry.Registry.resource_rows)."""
    loads, bats, feeder = rows
    return [Load(*r) for r in loads], [Battery(*r) for r in bats], (Feeder(*feeder) if feeder else None)


@dataclass
class LoadState:
    on: bool = False
    since: float = -1e12              # when it last switched
    done_wh: float = 0.0              # energy delivered towards the current need
    must: bool = False                # latched deadline pressure
    deficit_since: float | None = None
    switches: int = 0                 # in the current day
    day: int = -1
    history: list[tuple[float, bool]] = field(default_factory=list)   # (t, on) changes, recent


@dataclass
class BatteryState:
    soc_wh: float
    w: int = 0
    history: list[tuple[float, int, int]] = field(default_factory=list)   # (t, new, before)


def _trim(history: list, cut: float) -> None:
    """Forget switching older than any reading still in use (a reading
    older than stale_s is not used), but keep the last change before `cut`:
    it tells the state at that time."""
    i = 0
    while i + 1 < len(history) and history[i + 1][0] < cut:
        i += 1
    if i:
        del history[:i]


@dataclass
class Decision:
    t: float
    kind: str                         # "relay" | "battery"
    id: str
    device: str
    target: int
    value: int
    reason: str


class Controller:
    def __init__(self, loads: list[Load], batteries: list[Battery], feeder: Feeder, houses: list[str],
                 stale_s: float = 35.0, stale_margin_w: int = 3000, on_margin_w: int = 100,
                 keep_share: float = 0.5, off_delay_s: float = 120.0, deadline_margin: float = 1.15,
                 tz_offset_s: int = 0, battery_step_w: int = 200, headroom_w: int = 0,
                 battery_first_slack_s: float | None = 3 * 3600) -> None:
        self.loads = sorted(loads, key=lambda x: (x.priority, x.id))
        self.batteries = sorted(batteries, key=lambda x: x.id)
        self.feeder = feeder
        self.houses = list(houses)
        self.stale_s = stale_s
        self.stale_margin_w = stale_margin_w
        self.on_margin_w = on_margin_w
        self.keep_share = keep_share
        self.off_delay_s = off_delay_s
        self.deadline_margin = deadline_margin
        self.tz = tz_offset_s
        self.battery_step_w = battery_step_w
        self.headroom_w = headroom_w
        self.battery_first_slack_s = battery_first_slack_s
        self.ls = {x.id: LoadState() for x in loads}
        self.bs = {b.id: BatteryState(b.soc0 * b.capacity_wh) for b in batteries}
        self.by_house: dict[str, list[Load]] = {}
        for x in self.loads:
            self.by_house.setdefault(x.device, []).append(x)
        self.bat_by_house: dict[str, list[Battery]] = {}
        for b in self.batteries:
            self.bat_by_house.setdefault(b.device, []).append(b)
        self.last_t: float | None = None
        self.last_base: dict[str, float] = {}
        self.stats: dict[str, Any] = {"steps": 0, "stale_houses": 0, "feeder_actions": 0}

    # -- bookkeeping ---------------------------------------------------------

    def _on_at(self, ld: Load, t: float) -> bool:
        """Whether a load was on at time t (from its recent switching)."""
        st = self.ls[ld.id]
        for when, v in reversed(st.history):
            if when <= t:
                return v
        return (not st.history[0][1]) if st.history else st.on

    def _bat_at(self, b: Battery, t: float) -> int:
        st = self.bs[b.id]
        for when, w, _ in reversed(st.history):
            if when <= t:
                return w
        return st.history[0][2] if st.history else st.w

    def _advance(self, now: float) -> None:
        """Energy delivered and state of charge since the last step, at the
        commanded values (the gateway's estimate; a battery's own SoC
        reading replaces it when the board reports one)."""
        if self.last_t is None:
            self.last_t = now
        dt = max(0.0, now - self.last_t)
        self.last_t = now
        for ld in self.loads:
            st = self.ls[ld.id]
            day = self._day_of(ld, now)
            if day != st.day:
                st.day = day
                st.done_wh = 0.0
                st.must = False
                st.switches = 0
            if st.on and dt:
                st.done_wh += ld.rated_w * dt / 3600
            _trim(st.history, now - self.stale_s - 60)
        for b in self.batteries:
            st = self.bs[b.id]
            if dt and st.w:
                e = st.w * dt / 3600
                st.soc_wh += e * b.efficiency if e > 0 else e
                st.soc_wh = min(max(st.soc_wh, 0.0), float(b.capacity_wh))
            _trim(st.history, now - self.stale_s - 60)

    def _day_of(self, ld: Load, now: float) -> int:
        """Which need-window `now` falls in: windows end at the deadline."""
        local = now + self.tz
        if ld.deadline_s is None:
            return int(local // DAY)
        return int((local - ld.deadline_s) // DAY)

    def _seconds_to_deadline(self, ld: Load, now: float) -> float | None:
        if ld.deadline_s is None:
            return None
        left = (ld.deadline_s - (now + self.tz)) % DAY
        return left if left > 0 else float(DAY)      # at the deadline the next window starts

    def _available(self, ld: Load, now: float) -> bool:
        if ld.available_s is None or ld.deadline_s is None:
            return True
        tod = (now + self.tz) % DAY
        a, d = ld.available_s, ld.deadline_s
        return a <= tod < d if a < d else (tod >= a or tod < d)

    def set_soc(self, battery_id: str, soc_wh: float) -> None:
        self.bs[battery_id].soc_wh = soc_wh

    # -- the step ------------------------------------------------------------------

    def step(self, now: float, readings: dict[str, tuple[float, float]]) -> list[Decision]:
        """readings: device -> (grid W, time of the reading). Returns the
        changes to make, each with its reason."""
        self._advance(now)
        self.stats["steps"] += 1
        fresh: dict[str, float] = {}
        stale: list[str] = []
        for h in self.houses:
            r = readings.get(h)
            if r is None or now - r[1] > self.stale_s:
                stale.append(h)
                continue
            w, t = r
            base = w - sum(x.rated_w for x in self.by_house.get(h, ()) if self._on_at(x, t)) \
                - sum(self._bat_at(b, t) for b in self.bat_by_house.get(h, ()))
            fresh[h] = base
            self.last_base[h] = base
        self.stats["stale_houses"] = len(stale)
        base_est = sum(fresh.values()) + sum(self.last_base.get(h, 0.0) for h in stale)
        out: list[Decision] = []
        want: dict[str, tuple[bool, str]] = {}
        # 1. deadlines and availability
        for ld in self.loads:
            st = self.ls[ld.id]
            left = ld.need_wh - st.done_wh
            if ld.need_wh and left <= 0:
                st.must = False
                want[ld.id] = (False, "daily need met")
                continue
            if not self._available(ld, now):
                want[ld.id] = (False, "not available (unplugged)")
                continue
            if ld.need_wh:
                tl = self._seconds_to_deadline(ld, now)
                need_s = left / ld.rated_w * 3600
                if st.must or (tl is not None and tl <= need_s * self.deadline_margin + ld.min_off_s / 4 + 60):
                    st.must = True
                    want[ld.id] = (True, f"deadline: {left:.0f} Wh still needed")
        # 2. surplus, by priority, with hysteresis and dwell. A load with
        # plenty of time left (slack) lets the batteries charge first: they
        # take any amount of surplus, a relay only its rated power, so
        # marginal surplus is not turned into import by a load that could
        # as well run later.
        surplus = -base_est - sum(x.rated_w for x in self.loads if want.get(x.id, (False, ""))[0])
        bat_room = 0
        for b in self.batteries:
            if self.bs[b.id].soc_wh < b.soc_max * b.capacity_wh - b.max_charge_w / 60:
                bat_room += b.max_charge_w
        for ld in self.loads:
            if ld.id in want:
                continue
            st = self.ls[ld.id]
            avail = surplus
            if ld.need_wh and self.battery_first_slack_s is not None:
                tl = self._seconds_to_deadline(ld, now)
                need_s = (ld.need_wh - st.done_wh) / ld.rated_w * 3600
                if tl is not None and tl - need_s > self.battery_first_slack_s:
                    avail = surplus - bat_room
            if st.on:
                if avail >= ld.rated_w * self.keep_share:
                    st.deficit_since = None
                    want[ld.id] = (True, "surplus")
                    surplus -= ld.rated_w
                else:
                    if st.deficit_since is None:
                        st.deficit_since = now
                    if now - st.deficit_since >= self.off_delay_s:
                        want[ld.id] = (False, f"deficit for {now - st.deficit_since:.0f} s")
                    else:
                        want[ld.id] = (True, "riding out a short deficit")
                        surplus -= ld.rated_w
            else:
                if avail >= ld.rated_w + self.on_margin_w:
                    want[ld.id] = (True, f"surplus {surplus:.0f} W covers {ld.rated_w} W")
                    surplus -= ld.rated_w
                else:
                    want[ld.id] = (False, "no surplus")
        # dwell times and the switch budget (the feeder guard may override)
        for ld in self.loads:
            st = self.ls[ld.id]
            on, why = want[ld.id]
            if on == st.on:
                continue
            held = now - st.since
            if on and held < ld.min_off_s and not st.must:
                want[ld.id] = (False, "minimum off time")
            elif not on and held < ld.min_on_s and ld.need_wh and st.done_wh < ld.need_wh \
                    and self._available(ld, now):
                want[ld.id] = (True, "minimum on time")
            elif st.switches >= ld.max_switches_day and not st.must and self._available(ld, now):
                want[ld.id] = (st.on, "daily switch budget used")
        load_w = sum(x.rated_w for x in self.loads if want[x.id][0])
        # 3. batteries take the rest
        residual = base_est + load_w              # what the community would import without batteries
        bat: dict[str, tuple[int, str]] = {}
        for b in self.batteries:
            st = self.bs[b.id]
            room_c = (b.soc_max * b.capacity_wh - st.soc_wh)
            room_d = (st.soc_wh - b.soc_min * b.capacity_wh)
            if residual < 0 and room_c > 0:
                w = int(min(-residual, b.max_charge_w))
                bat[b.id] = (w, "charging from surplus")
                residual += w
            elif residual > 0 and room_d > 0:
                w = int(min(residual, b.max_discharge_w))
                bat[b.id] = (-w, "discharging into deficit")
                residual -= w
            else:
                bat[b.id] = (0, "idle")
        # 4. the feeder guard, on the worst case
        def worst(sign: int) -> float:
            tot = 0.0
            for h in self.houses:
                loads_on = sum(x.rated_w for x in self.by_house.get(h, ()) if want[x.id][0])
                bats = sum(bat[b.id][0] for b in self.bat_by_house.get(h, ()))
                if h in fresh:
                    tot += fresh[h] + loads_on + bats
                else:
                    lb = self.last_base.get(h, 0.0)
                    if sign > 0:
                        tot += max(lb, 0.0) + self.stale_margin_w + \
                            sum(x.rated_w for x in self.by_house.get(h, ())) + \
                            sum(max(bat[b.id][0], 0) for b in self.bat_by_house.get(h, ()))
                    else:
                        tot += min(lb, 0.0) - self.stale_margin_w + \
                            sum(min(bat[b.id][0], 0) for b in self.bat_by_house.get(h, ()))
            return tot

        hi = worst(1)
        lim_i = self.feeder.import_w - self.headroom_w
        lim_e = self.feeder.export_w - self.headroom_w
        if hi > lim_i:
            self.stats["feeder_actions"] += 1
            over = hi - lim_i
            for b in self.batteries:                          # discharge harder
                st = self.bs[b.id]
                if over <= 0:
                    break
                if st.soc_wh > b.soc_min * b.capacity_wh:
                    cur = bat[b.id][0]
                    new = max(-b.max_discharge_w, int(cur - over))
                    if new < cur:
                        over -= cur - new
                        bat[b.id] = (new, "feeder import limit")
            # shed: optional loads first, lowest priority first; then deadline loads
            for must in (False, True):
                for ld in reversed(self.loads):
                    if over <= 0:
                        break
                    if want[ld.id][0] and self.ls[ld.id].must == must:
                        want[ld.id] = (False, "feeder import limit")
                        over -= ld.rated_w
        lo = worst(-1)
        if lo < -lim_e:
            self.stats["feeder_actions"] += 1
            over = -lim_e - lo
            for b in self.batteries:
                st = self.bs[b.id]
                if over <= 0:
                    break
                if st.soc_wh < b.soc_max * b.capacity_wh:
                    cur = bat[b.id][0]
                    new = min(b.max_charge_w, int(cur + over))
                    if new > cur:
                        over -= new - cur
                        bat[b.id] = (new, "feeder export limit")
            for ld in self.loads:
                if over <= 0:
                    break
                st = self.ls[ld.id]
                if not want[ld.id][0] and self._available(ld, now) and (not ld.need_wh or st.done_wh < ld.need_wh) \
                        and ld.device in fresh:
                    want[ld.id] = (True, "feeder export limit")
                    over -= ld.rated_w
        # apply
        for ld in self.loads:
            st = self.ls[ld.id]
            on, why = want[ld.id]
            if on != st.on:
                st.on = on
                st.since = now
                st.switches += 1
                st.deficit_since = None
                st.history.append((now, on))
                out.append(Decision(now, "relay", ld.id, ld.device, ld.relay, int(on), why))
        for b in self.batteries:
            st = self.bs[b.id]
            w, why = bat[b.id]
            if abs(w - st.w) >= self.battery_step_w or (w == 0) != (st.w == 0):
                st.history.append((now, w, st.w))
                st.w = w
                out.append(Decision(now, "battery", b.id, b.device, b.target, w, why))
        return out

    def state(self) -> dict[str, Any]:
        return {"loads": {k: {"on": v.on, "done_wh": round(v.done_wh, 1), "must": v.must, "switches": v.switches}
                          for k, v in self.ls.items()},
                "batteries": {k: {"w": v.w, "soc_wh": round(v.soc_wh, 1)} for k, v in self.bs.items()},
                **self.stats}
