"""Household load and PV profiles for a neighbourhood day (bench_control and
make demo): the BDEW H0 standard load profile from demandlib, scaled per
house, with appliance switching and noise; PV from pvlib's clear-sky model
for Walenstadt, Switzerland (the Quartierstrom town), transposed per roof and
passed through PVWatts, with passing clouds. Needs the `bench` extra
(demandlib, pvlib; installed by `make bench` and `make demo`)."""
from __future__ import annotations

import numpy as np

LAT, LON, TZ = 47.12, 9.31, "Europe/Zurich"
DAY = "2026-04-22"
START_H = 7


def profiles(rng: np.random.Generator, dt: int, n_houses: int = 100, n_pv: int = 60, day: str = DAY,
             start_h: int = START_H, hours: float = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(household W [house, step], pv W [house, step], step times as Unix
    seconds, local UTC offset) from start_h on `day`, at dt-second steps."""
    import pandas as pd
    import pvlib
    from demandlib import bdew

    n = int(hours * 3600) // dt
    t0 = pd.Timestamp(f"{day} {start_h:02d}:00", tz=TZ)
    times = pd.date_range(t0, periods=n, freq=f"{dt}s")
    offset = int(t0.utcoffset().total_seconds())
    # household: the H0 profile (kW per 15 min for 1 kWh/a scaled below)
    slp = bdew.ElecSlp(2026).get_scaled_power_profiles({"h0": 1000})["h0"]
    slp.index = slp.index.tz_localize(TZ, ambiguous="NaT", nonexistent="NaT")
    slp = slp[slp.index.notna()]
    window = slp[(slp.index >= t0 - pd.Timedelta("1h")) & (slp.index <= t0 + pd.Timedelta(hours=hours + 1))]
    xs = (window.index.view("int64") // 10**9).astype(float) + 450     # mid-interval
    tsec = (times.view("int64") // 10**9).astype(float)
    h0 = np.interp(tsec, xs, window.values) * 1000                     # W for 1,000 kWh/a
    annual = rng.uniform(2.5, 5.5, n_houses)
    load = np.outer(annual, h0) * rng.uniform(0.85, 1.15, (n_houses, 1))
    # appliances: blocks of 1-3 kW for 2-30 minutes, more in the evening
    for h in range(n_houses):
        k = rng.poisson(10)
        for _ in range(k):
            hour = rng.choice(np.arange(24), p=_appliance_hours())
            start = int(((hour - start_h) % 24) * 3600 / dt + rng.integers(0, 3600 // dt))
            dur = int(rng.uniform(120, 1800) / dt)
            load[h, start:start + dur] += rng.uniform(1000, 3000)
    load += rng.normal(0, 30, load.shape)
    load = np.maximum(load, 50)
    # PV: clear sky, transposed per roof, PVWatts, clouds
    loc = pvlib.location.Location(LAT, LON, tz=TZ, altitude=430)
    cs = loc.get_clearsky(times)
    sp = loc.get_solarposition(times)
    cloud = _clouds(rng, n, dt)
    pv = np.zeros((n_houses, n))
    for h in range(n_pv):
        tilt, az = rng.uniform(20, 40), rng.uniform(135, 225)
        poa = pvlib.irradiance.get_total_irradiance(tilt, az, sp["apparent_zenith"], sp["azimuth"],
                                                    cs["dni"] * cloud, cs["ghi"] * cloud,
                                                    cs["dhi"] * (0.6 + 0.4 * cloud))["poa_global"].fillna(0).values
        cell = poa / 800 * 25 + 12
        kwp = rng.uniform(4, 12)
        dc = pvlib.pvsystem.pvwatts_dc(poa, cell, kwp * 1000, -0.004)
        pv[h] = np.clip(np.asarray(dc) * 0.96 * (1 + rng.normal(0, 0.01, n)), 0, None)
    return load, pv, tsec, offset


def _appliance_hours() -> np.ndarray:
    w = np.array([1, 1, 1, 1, 1, 1, 3, 5, 4, 3, 3, 4, 6, 4, 3, 3, 4, 6, 8, 8, 6, 4, 2, 1], float)
    return w / w.sum()


def _clouds(rng: np.random.Generator, n: int, dt: int) -> np.ndarray:
    """Transmission factor: clear spells and cloud episodes of random length
    and depth, edges smoothed over about a minute."""
    c = np.ones(n)
    i = 0
    while i < n:
        clear = int(rng.exponential(2400) / dt)
        i += clear
        dur = int(rng.uniform(60, 1500) / dt)
        c[i:i + dur] = rng.uniform(0.2, 0.75)
        i += dur
    k = max(1, 60 // dt)
    return np.convolve(c, np.ones(k) / k, mode="same")
