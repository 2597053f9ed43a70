"""Control benchmark (issue 7): a day of 100 houses under three regimes.

Profiles: household load from the BDEW H0 standard load profile
(demandlib), scaled per house to 2,500-5,500 kWh a year, interpolated to
1 s with appliance switching added (kettles, ovens, washing machines as
random 1-3 kW blocks); PV from pvlib's clear-sky model for Walenstadt,
Switzerland (47.12 N, 9.31 E, the Quartierstrom town) on 22 April 2026,
transposed to each roof (tilt 20-40 deg, azimuth 135-225 deg) and passed
through PVWatts, with passing clouds (a random sequence of cloud episodes)
and per-house noise. The day runs from 07:00 to 07:00.

Flexible devices: 30 water heaters (2-3 kW, 3-5 kWh between 07:00 and 18:00), 10 EVs
(7.4 or 11 kW, 8-12 kWh by 07:00; five at home all day, five plugged in
from 17:30), 10 batteries (10 kWh, 5 kW, 10-95 %). Feeder limits: import
= the base load's peak + 40 kW, export = the base export's peak + 10 kW
(so only flexible load can breach them).

Regimes:
  none     water heaters and EVs run from when they may until their need is
           met (thermostat and plug-in charging); each battery keeps its
           own house at zero (what a home battery does on its own);
  ours     peergrid.control.controller.Controller every second on readings that each
           board sends every 10 s, decisions applied 1 s later, three
           boards silent for 20 minutes each (their readings go stale);
  optimum  perfect foresight: a linear program (HiGHS) over the same
           devices at 1-min resolution (5 min with --quick) minimising the
           day's grid import within the feeder limits. Loads are continuous
           in it (an LP relaxation of on/off relays), so it bounds the
           best possible schedule from above.

A second phase measures reading-to-relay latency through a real mosquitto:
peergrid's control loop in the gateway service, 20 simulated boards
(sealing with protocol/), a reading that shows a surplus and the time until
the board holds the relay command.

Prints one JSON line (the last) with the figures.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from peergrid.sim import profiles as prof  # noqa: E402
from peergrid.control.controller import Battery, Controller, Feeder, Load  # noqa: E402

N_HOUSES = 100
N_PV = 60


def devices(rng: np.random.Generator, offset: int) -> tuple[list[Load], list[Battery]]:
    houses = rng.permutation(N_HOUSES)
    loads = []
    for k in range(30):
        rated = int(rng.choice([2000, 2500, 3000]))
        loads.append(Load(f"wh{k}", f"h{houses[k]}", 0, rated, priority=2, min_on_s=600, min_off_s=600,
                          need_wh=int(rng.uniform(3000, 5000)), deadline_s=18 * 3600, available_s=7 * 3600))
    for k in range(10):
        rated = int(rng.choice([7400, 11000]))
        loads.append(Load(f"ev{k}", f"h{houses[30 + k]}", 1, rated, priority=3, min_on_s=900, min_off_s=900,
                          need_wh=int(rng.uniform(8000, 12000)), deadline_s=7 * 3600,
                          available_s=None if k < 5 else int(17.5 * 3600)))
    pv_houses = [h for h in houses if h < N_PV]
    bats = [Battery(f"bat{k}", f"h{pv_houses[k]}", 0, 10000, 5000, 5000, 0.10, 0.95, 0.92, soc0=0.10)
            for k in range(10)]
    return loads, bats


def avail_mask(ld: Load, tsec: np.ndarray, offset: int) -> np.ndarray:
    tod = (tsec + offset) % 86400
    if ld.available_s is None:
        return np.ones(len(tsec), bool)
    a, d = ld.available_s, ld.deadline_s
    return (tod >= a) | (tod < d) if a > d else (tod >= a) & (tod < d)


def deadline_index(ld: Load, tsec: np.ndarray, offset: int) -> int:
    """The step by which the need must be met, within the simulated day."""
    tod = (tsec + offset) % 86400
    idx = np.nonzero(np.isclose(tod, ld.deadline_s % 86400))[0]
    idx = idx[idx > 0]
    return int(idx[0]) if len(idx) else len(tsec)


# -- the three regimes --------------------------------------------------------------


class Physics:
    """What the devices really do: a relay on draws the rated power until
    the need is met (thermostat, full car); a battery follows its setpoint
    within its state of charge."""

    def __init__(self, loads: list[Load], bats: list[Battery], dt: int) -> None:
        self.loads, self.bats, self.dt = loads, bats, dt
        self.on = {x.id: False for x in loads}
        self.done = {x.id: 0.0 for x in loads}
        self.set = {b.id: 0 for b in bats}
        self.soc = {b.id: b.soc0 * b.capacity_wh for b in bats}
        self.switches = {x.id: 0 for x in loads}

    def switch(self, lid: str, on: bool) -> None:
        if self.on[lid] != on:
            self.on[lid] = on
            self.switches[lid] += 1

    def power(self, house_index: dict[str, int], n_houses: int, avail: dict[str, bool]) -> tuple[np.ndarray, float]:
        """Per house the flexible devices' power this step, and the loads'
        total (consumption)."""
        w = np.zeros(n_houses)
        flex = 0.0
        for x in self.loads:
            if self.on[x.id] and avail[x.id] and self.done[x.id] < x.need_wh:
                p = x.rated_w
                self.done[x.id] += p * self.dt / 3600
                w[house_index[x.device]] += p
                flex += p
        for b in self.bats:
            p = self.set[b.id]
            e = p * self.dt / 3600
            if p > 0:
                e = min(e * b.efficiency, b.soc_max * b.capacity_wh - self.soc[b.id])
                p = int(e / b.efficiency * 3600 / self.dt) if e > 0 else 0
                self.soc[b.id] += max(e, 0)
            elif p < 0:
                e = max(e, b.soc_min * b.capacity_wh - self.soc[b.id])
                p = int(e * 3600 / self.dt) if e < 0 else 0
                self.soc[b.id] += min(e, 0)
            w[house_index[b.device]] += p
        return w, flex


def figures(net: np.ndarray, consumption: np.ndarray, pv: np.ndarray, dt: int, feeder: Feeder) -> dict:
    imp = np.clip(net, 0, None).sum() * dt / 3600
    exp = np.clip(-net, 0, None).sum() * dt / 3600
    cons = consumption.sum() * dt / 3600
    prod = pv.sum() * dt / 3600
    return {"self_sufficiency": 1 - imp / cons, "self_consumption": 1 - exp / prod if prod else 0.0,
            "import_kwh": imp / 1000, "export_kwh": exp / 1000,
            "peak_import_kw": float(max(net.max(), 0) / 1000), "peak_export_kw": float(max(-net.min(), 0) / 1000),
            "feeder_violation_s": int(((net > feeder.import_w) | (net < -feeder.export_w)).sum() * dt)}


def run_none(load, pv, tsec, offset, loads, bats, dt, feeder):
    hi = {f"h{h}": h for h in range(N_HOUSES)}
    ph = Physics(loads, bats, dt)
    masks = {x.id: avail_mask(x, tsec, offset) for x in loads}
    bat_house = {b.id: hi[b.device] for b in bats}
    net = np.zeros(len(tsec))
    cons = np.zeros(len(tsec))
    for k in range(len(tsec)):
        av = {x.id: bool(masks[x.id][k]) for x in loads}
        for x in loads:
            ph.switch(x.id, av[x.id] and ph.done[x.id] < x.need_wh)
        house = load[:, k] - pv[:, k]
        # each battery holds its own house at zero, with what it saw last step
        for b in bats:
            h = bat_house[b.id]
            flex_h = sum(x.rated_w for x in loads if hi[x.device] == h and ph.on[x.id] and av[x.id]
                         and ph.done[x.id] < x.need_wh)
            need = house[h] + flex_h
            ph.set[b.id] = int(np.clip(-need, -b.max_discharge_w, b.max_charge_w))
        w, flex = ph.power(hi, N_HOUSES, av)
        net[k] = (house + w).sum()
        cons[k] = load[:, k].sum() + flex
    return net, cons, ph


def run_ours(load, pv, tsec, offset, loads, bats, dt, feeder, rng, cycle_ms: list[float]):
    hi = {f"h{h}": h for h in range(N_HOUSES)}
    houses = [f"h{h}" for h in range(N_HOUSES)]
    ctl = Controller([Load(**vars(x)) for x in loads], [Battery(**vars(b)) for b in bats], feeder, houses,
                     stale_s=35, stale_margin_w=3000, tz_offset_s=offset, headroom_w=8000)
    ph = Physics(loads, bats, dt)
    masks = {x.id: avail_mask(x, tsec, offset) for x in loads}
    phase = rng.integers(0, 10, N_HOUSES)
    silent = {int(h): (int(rng.integers(0, len(tsec) - 1200 // dt)),) for h in rng.choice(N_HOUSES, 3, False)}
    readings: dict[str, tuple[float, float]] = {}
    pending: list = []
    net = np.zeros(len(tsec))
    cons = np.zeros(len(tsec))
    house_w = np.zeros(N_HOUSES)
    for k in range(len(tsec)):
        now = float(tsec[k])
        av = {x.id: bool(masks[x.id][k]) for x in loads}
        for d in pending:                                   # decided one step ago, applied now
            if d.kind == "relay":
                ph.switch(d.id, bool(d.value))
            else:
                ph.set[d.id] = d.value
        pending = []
        w, flex = ph.power(hi, N_HOUSES, av)
        house_w = load[:, k] - pv[:, k] + w
        net[k] = house_w.sum()
        cons[k] = load[:, k].sum() + flex
        # boards report every 10 s (staggered); three go silent for 20 min
        for h in range(N_HOUSES):
            if (k * dt + phase[h]) % 10 < dt:
                s = silent.get(h)
                if s is not None and s[0] <= k < s[0] + 1200 // dt:
                    continue
                readings[f"h{h}"] = (float(house_w[h]), now)
        c0 = time.perf_counter()
        pending = ctl.step(now, readings)
        cycle_ms.append((time.perf_counter() - c0) * 1000)
    return net, cons, ph, ctl


def run_optimum(load, pv, tsec, offset, loads, bats, dt_sim, feeder, step_s):
    """The LP: per step of step_s, p_j (load power), c_b, d_b (battery),
    soc_b, imp (community import); minimise the day's import."""
    import highspy

    m = step_s // dt_sim
    n = len(tsec) // m
    base = (load - pv).sum(axis=0)[: n * m].reshape(n, m).mean(axis=1)
    tcoarse = tsec[: n * m: m]
    h = step_s / 3600
    L, B = len(loads), len(bats)
    # variable layout: p[j, t], c[b, t], d[b, t], soc[b, t] (end of step), imp[t]
    nP, nB = L * n, B * n
    oc, od, os_, oi = nP, nP + nB, nP + 2 * nB, nP + 3 * nB
    nv = oi + n
    lo = np.zeros(nv)
    up = np.full(nv, highspy.kHighsInf)
    for j, x in enumerate(loads):
        mask = avail_mask(x, tcoarse, offset)
        dl = deadline_index(x, tcoarse, offset)
        up[j * n:(j + 1) * n] = np.where(mask, x.rated_w, 0)
        up[j * n + dl:(j + 1) * n] = 0          # nothing after the deadline (the day's need is met by then)
    for b, bt in enumerate(bats):
        up[oc + b * n: oc + (b + 1) * n] = bt.max_charge_w
        up[od + b * n: od + (b + 1) * n] = bt.max_discharge_w
        lo[os_ + b * n: os_ + (b + 1) * n] = bt.soc_min * bt.capacity_wh
        up[os_ + b * n: os_ + (b + 1) * n] = bt.soc_max * bt.capacity_wh
    cost = np.zeros(nv)
    cost[oi:] = h
    hs = highspy.Highs()
    hs.setOptionValue("output_flag", False)
    hs.addVars(nv, lo, up)
    hs.changeColsCost(nv, np.arange(nv, dtype=np.int32), cost)
    rows_lo, rows_up, starts, idx, val = [], [], [], [], []

    def row(cols, coefs, rlo, rup):
        starts.append(len(idx))
        idx.extend(cols)
        val.extend(coefs)
        rows_lo.append(rlo)
        rows_up.append(rup)

    inf = highspy.kHighsInf
    for t in range(n):
        cols = [j * n + t for j in range(L)] + [oc + b * n + t for b in range(B)] + [od + b * n + t for b in range(B)]
        coefs = [1.0] * L + [1.0] * B + [-1.0] * B
        # imp >= base + flex  ->  flex - imp <= -base
        row(cols + [oi + t], coefs + [-1.0], -inf, -base[t])
        # feeder: -export <= base + flex <= import
        row(cols, coefs, -feeder.export_w - base[t], feeder.import_w - base[t])
    for j, x in enumerate(loads):
        dl = deadline_index(x, tcoarse, offset)
        row([j * n + t for t in range(min(dl, n))], [h] * min(dl, n), float(x.need_wh), float(x.need_wh))
    for b, bt in enumerate(bats):
        for t in range(n):
            # soc[t] - soc[t-1] - eff*h*c[t] + h*d[t] = 0 (soc[-1] = soc0)
            cols = [os_ + b * n + t, oc + b * n + t, od + b * n + t]
            coefs = [1.0, -bt.efficiency * h, h]
            rhs = 0.0
            if t:
                cols.append(os_ + b * n + t - 1)
                coefs.append(-1.0)
            else:
                rhs = bt.soc0 * bt.capacity_wh
            row(cols, coefs, rhs, rhs)
        row([os_ + b * n + n - 1], [1.0], bt.soc0 * bt.capacity_wh, inf)
    starts_a = np.array(starts, dtype=np.int32)
    hs.addRows(len(rows_lo), np.array(rows_lo), np.array(rows_up), len(idx), starts_a,
               np.array(idx, dtype=np.int32), np.array(val))
    t0 = time.perf_counter()
    hs.run()
    solve_s = time.perf_counter() - t0
    status = hs.modelStatusToString(hs.getModelStatus())
    x = np.array(hs.getSolution().col_value)
    flex = np.zeros(n)
    for j in range(L):
        flex += x[j * n:(j + 1) * n]
    for b in range(B):
        flex += x[oc + b * n: oc + (b + 1) * n] - x[od + b * n: od + (b + 1) * n]
    net = base + flex
    cons = load.sum(axis=0)[: n * m].reshape(n, m).mean(axis=1) + sum(x[j * n:(j + 1) * n] for j in range(L))
    pvc = pv.sum(axis=0)[: n * m].reshape(n, m).mean(axis=1)
    return net, cons, pvc, status, solve_s


def latency_phase(quick: bool) -> dict:
    """Reading-to-relay latency through mosquitto with the gateway's loop."""
    from control_latency import measure

    return measure(boards=20, rounds=40 if quick else 200)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="5 s steps and a 5-min optimum (under a minute)")
    ap.add_argument("--no-latency", action="store_true")
    a = ap.parse_args()
    dt = 5 if a.quick else 1
    rng = np.random.default_rng(20260422)
    t_start = time.perf_counter()
    load, pv, tsec, offset = prof.profiles(rng, dt, N_HOUSES, N_PV)
    loads, bats = devices(rng, offset)
    base = (load - pv).sum(axis=0)
    feeder = Feeder(int(base.max() + 40000), int(-base.min() + 10000))
    res: dict = {}
    net, cons, ph = run_none(load, pv, tsec, offset, loads, bats, dt, feeder)
    res["none"] = figures(net, cons, pv, dt, feeder)
    res["none"]["max_switches"] = max(ph.switches.values())
    cycle: list[float] = []
    net, cons, ph, ctl = run_ours(load, pv, tsec, offset, loads, bats, dt, feeder, rng, cycle)
    res["ours"] = figures(net, cons, pv, dt, feeder)
    res["ours"]["max_switches"] = max(ph.switches.values())
    missed = [x.id for x in loads if ph.done[x.id] < x.need_wh - 1]
    step = 300 if a.quick else 60
    onet, ocons, opv, status, solve_s = run_optimum(load, pv, tsec, offset, loads, bats, dt, feeder, step)
    res["optimum"] = figures(onet, ocons, opv, step, feeder)
    ss = {k: round(v["self_sufficiency"], 4) for k, v in res.items()}
    sc = {k: round(v["self_consumption"], 4) for k, v in res.items()}
    uplift = (ss["ours"] - ss["none"]) / (ss["optimum"] - ss["none"]) if ss["optimum"] > ss["none"] else None
    lat = {} if a.no_latency else latency_phase(a.quick)
    out = {
        "bench": "control", "quick": a.quick, "houses": N_HOUSES, "step_s": dt, "optimum_step_s": step,
        "optimum_status": status, "optimum_solve_s": round(solve_s, 2),
        "self_sufficiency": ss, "self_consumption": sc,
        "uplift_ratio": None if uplift is None else round(uplift, 3),
        "peak_import_kw": {k: round(v["peak_import_kw"], 1) for k, v in res.items()},
        "peak_export_kw": {k: round(v["peak_export_kw"], 1) for k, v in res.items()},
        "feeder_kw": [round(feeder.import_w / 1000, 1), round(feeder.export_w / 1000, 1)],
        "feeder_violation_s": res["ours"]["feeder_violation_s"],
        "feeder_violation_s_none": res["none"]["feeder_violation_s"],
        "max_switches_per_device_day": res["ours"]["max_switches"],
        "deadlines_missed": len(missed),
        "cycle_p50_ms": round(float(np.percentile(cycle, 50)), 3),
        "cycle_p99_ms": round(float(np.percentile(cycle, 99)), 3),
        "reading_to_relay_p50_ms": lat.get("p50_ms"), "reading_to_relay_p99_ms": lat.get("p99_ms"),
        "latency_samples": lat.get("n"),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
