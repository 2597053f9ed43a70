# Runs under MicroPython (called by bench_metering.py --production): the
# board's own measurement path, firmware.board.Board with the front end it
# builds itself (ADC calibration from the simulated eFuse, CT gain and phase
# from the commissioning config), its own loop (step() and idle()), against
# loads that change while it measures. The converter is the benchmark's
# nonlinear, noisy 12-bit model. Truth: the energy of the simulated load
# over exactly the board time the registers cover.
#
# Time: the simulated converter takes its block's length of board time; the
# board's compute and loop time between blocks is charged at this host's
# speed (the interpreter's own ticks_us), so the measured share of time is
# what this interpreter on this machine achieves, not an ESP32.
#
#   micropython mpy_production_bench.py <fsroot> <run index|-1 for all> <interval s> [quick]
import gc
import json
import math
import sys
import time

from firmware import config as fconfig
from firmware.board import Board
from boardsim.hal_sim import SimHal
from firmware.net import Net
from boardsim.sim_waveforms import AdcModel

SQRT2 = 1.4142135623730951
VRMS = 230.0
FREQ = 50.0
NOISE_TABLES = 4


class Schedule:
    """A load's real power in W over time: piecewise constant segments
    (start s, W); cyclic ones repeat every `period` s. at(t) -> (W, s until
    the next change)."""

    def __init__(self, segs, period=None, pf=1.0):
        self.segs = segs
        self.period = period
        self.pf = pf

    def at(self, t):
        base = 0.0
        tt = t
        if self.period:
            base = t - (t % self.period)
            tt = t - base
        segs = self.segs
        i = len(segs) - 1
        while i > 0 and segs[i][0] > tt:
            i -= 1
        if i + 1 < len(segs):
            nxt = base + segs[i + 1][0]
        elif self.period:
            nxt = base + self.period
        else:
            nxt = 1e18
        return segs[i][1], nxt - t

    def energy_wh(self, t0, t1):
        """Exact energy between board times t0 and t1 (s)."""
        e = 0.0
        t = t0
        while t < t1:
            w, left = self.at(t)
            d = left if t + left < t1 else t1 - t
            if d <= 0:
                d = 1e-9
            e += w * d
            t += d
        return e / 3600.0


class DynamicSource:
    """Interleaved frames [voltage, ct1..ctn] for SimHal, one cycle tabulated
    per input and load level (NOISE_TABLES realisations of the converter's
    noise each), the level looked up at the frame where it changes."""

    def __init__(self, adc, apv, vpv, schedules, leads, bias_v=1.3, period_us=200):
        self.adc = adc
        self.apv = apv
        self.vpv = vpv
        self.sch = schedules
        self.leads = leads
        self.bias = bias_v
        self.period_us = period_us
        self.cycle = int(1000000 / FREQ / period_us + 0.5)
        self.cache = {}
        self.cyc_n = 0

    def _table(self, j, m, w, pf):
        key = (j, m, w, pf)
        t = self.cache.get(key)
        if t is not None:
            return t
        om = 2 * math.pi * FREQ
        tabs = []
        for r in range(NOISE_TABLES):
            tab = bytearray(2 * self.cycle)
            for k in range(self.cycle):
                ts = (k * self.period_us + j * self.period_us / m) * 1e-6
                if j == 0:
                    v = self.bias + VRMS * SQRT2 * math.sin(om * ts) / self.vpv
                else:
                    ci = j - 1
                    apf = pf if pf > 0.01 else 0.01
                    irms = abs(w) / (VRMS * apf)
                    sign = -1 if w < 0 else 1
                    phi = math.acos(apf if apf < 1 else 1.0)
                    cur = sign * irms * SQRT2 * math.sin(om * ts - phi + self.leads[ci] * math.pi / 180)
                    v = self.bias + cur / self.apv[ci]
                c = self.adc.code(v)
                tab[2 * k] = c & 0xFF
                tab[2 * k + 1] = c >> 8
            tabs.append(tab)
        self.cache[key] = tabs
        return tabs

    def fill(self, pins, buf, n, t0_us, period_us):
        m = len(pins)
        cyc = self.cycle
        t = t0_us * 1e-6
        # the level of each load now, and how many frames it holds
        tabs = [self._table(0, m, 0, 1.0)]
        hold = n
        for s in self.sch:
            w, left = s.at(t)
            tabs.append(self._table(len(tabs), m, w, s.pf))
            f = int(left * 1e6 / period_us) + 1
            if f < hold:
                hold = f
        k = (t0_us // period_us) % cyc
        r = self.cyc_n
        i = 0
        done = 0
        while done < n:
            upto = n if hold >= n - done else done + hold
            while done < upto:
                for j in range(m):
                    tab = tabs[j][r]
                    buf[i] = tab[2 * k] | (tab[2 * k + 1] << 8)
                    i += 1
                k += 1
                if k == cyc:
                    k = 0
                    r = (r + 1) % NOISE_TABLES
                done += 1
            if done < n:
                # a load changed inside the block: tables for the new levels
                t = (t0_us + done * period_us) * 1e-6
                hold = n - done
                for ci in range(len(self.sch)):
                    w, left = self.sch[ci].at(t)
                    tabs[ci + 1] = self._table(ci + 1, m, w, self.sch[ci].pf)
                    f = int(left * 1e6 / period_us) + 1
                    if f < hold:
                        hold = f
        self.cyc_n = r


class BenchHal(SimHal):
    """SimHal whose converter has this benchmark's model and whose clock
    also runs while the interpreter computes between blocks."""

    def __init__(self, board, root, cpu=1.0):
        SimHal.__init__(self, board, root=root, period_us=200)
        self.cpu = cpu
        self.host_last = None
        self.blocks = 0

    def adc_block(self, pins, buf, n):
        now = time.ticks_us()
        if self.host_last is not None:
            self.now_us += int(time.ticks_diff(now, self.host_last) * self.cpu)
        self.source.fill(pins, buf, n, self.now_us, self.period_us)
        self.now_us += n * self.period_us
        self.blocks += 1
        self.host_last = time.ticks_us()
        return self.period_us

    def idle(self, ms):
        if ms > 0:
            self.now_us += ms * 1000


class Offline(Net):
    def up(self):
        return False


def kettle(w, t_on, t_off):
    return Schedule([(0, 0.02 * w), (t_on, w), (t_off, 0.02 * w)])


def cases(rating_w, interval):
    """name -> Schedule; the W given is the case's level in % of the
    channel's rating (rating_w: W at 100 %)."""
    out = []
    for pct in (5, 30, 120):
        w = rating_w * pct / 100
        out.append(("kettle %d%%" % pct, kettle(w, 0.371 * interval, 0.637 * interval)))
        out.append(("heater 4s/10s %d%%" % pct, Schedule([(0, w), (4.0, 0.0)], period=10.0)))
        out.append(("heater 1s/3s %d%%" % pct, Schedule([(0, w), (1.0, 0.0)], period=3.0)))
        steps = [(7.0 * i, w * f) for i, f in enumerate((1.0, 0.35, 0.8, 0.1, 0.6, 0.25))]
        out.append(("step 7s %d%%" % pct, Schedule(steps, period=42.0)))
        pv = []
        n = 60
        for i in range(n):
            # a ramp up to the level, a cloud (a fifth of the power) now and then
            lvl = -w * (i + 1) / n
            if i % 7 in (3, 4):
                lvl *= 0.2
            pv.append((interval * i / n, lvl))
        out.append(("pv ramp clouds %d%%" % pct, Schedule(pv)))
    for pct in (10, 50, 120):
        w = rating_w * pct / 100
        out.append(("steady %d%%" % pct, Schedule([(0, w)])))
    out.append(("steady pf 0.5 lag 20%", Schedule([(0, rating_w * 0.2 * 0.5)], pf=0.5)))
    return out


def run_group(root, board, group, interval, leads):
    adc = AdcModel(nl=0.04, noise_lsb=1.0)
    hal = BenchHal(board, root)
    apv = [c["ct_turns"] / c["burden_ohm"] for c in board["channels"]]
    vpv = board["vref"]["transformer_ratio"] * board["vref"]["divider_ratio"]
    hal.source = DynamicSource(adc, apv, vpv, [s for _, s in group], leads,
                               bias_v=board["frontend"]["bias_mv"] / 1000)
    chans = {}
    for i in range(len(board["channels"])):
        chans[board["channels"][i]["name"]] = {"gain": 1.0, "phase_deg": leads[i]}
    text = json.dumps({"community": "bench", "device": "meter-1", "secret": "ab" * 32,
                       "broker": {"host": "127.0.0.1"}, "channels": chans, "period_s": 10})
    cfg, digest = fconfig.parse(text)
    b = Board(hal, board, cfg, digest, Offline(), root)
    assert b.board is board and b.adc_cal in ("efuse", "flash"), b.adc_cal
    regs = b.regs

    def snap():
        out = []
        for i in range(len(group)):
            imp, exp, _, _ = regs.get(i)
            ri, re = regs.rest_mwh(i)
            out.append((imp * 1000 + ri) - (exp * 1000 + re))
        return out

    # start: one window so the front end has a time base, then intervals
    b.idle()
    t0 = b.fe.t_last
    e0 = snap()
    tstart = hal.now_us
    # the registers cover board time up to the end of the last window (t_last)
    res = []
    host0 = time.ticks_ms()
    hal.blocks = 0
    end_ms = interval * 1000
    readings0 = b.stats["readings"]
    cover = 0
    while True:
        b.step()
        b.idle()
        cover = b.hal.ticks_diff(b.fe.t_last, t0)
        if cover >= end_ms:
            break
    e1 = snap()
    host_ms = time.ticks_diff(time.ticks_ms(), host0)
    t_a = tstart / 1e6 - 0.0
    # covered board time: from the end of the first window to the end of the last
    t_end_s = t_a + cover / 1000.0
    for i in range(len(group)):
        name, s = group[i]
        truth = s.energy_wh(t_a, t_end_s) * 1000      # mWh
        got = e1[i] - e0[i]
        err = abs(got - truth) / abs(truth) * 100 if truth else 0.0
        res.append({"case": name, "err_pct": err, "truth_mwh": truth, "got_mwh": got})
    frac = b.fe.take_fraction()
    return res, {"windows": hal.blocks, "host_ms": host_ms, "meas_permille": frac,
                 "readings": b.stats["readings"] - readings0, "adc_cal": b.adc_cal}


def main():
    root = sys.argv[1]
    which = int(sys.argv[2])
    interval = int(sys.argv[3])
    with open("boards/sim/board.json") as f:
        board = json.load(f)
    rating = [VRMS * c["rating_a"] for c in board["channels"]]
    # every case on a 100 A channel (ct1, ct2), four channels at once
    allc = cases(rating[0], interval)
    groups = []
    for g in range(0, len(allc), 2):
        groups.append(allc[g:g + 2])
    leads = [1.5, 2.0, 0.0, 0.0]
    out = []
    info = []
    for gi in range(len(groups)):
        if which >= 0 and gi != which:
            continue
        group = groups[gi]
        # the other channels (ct3/ct4, 50 A) carry a steady 10 % load each:
        # sampled in the same frames, as on a board
        full = list(group)
        while len(full) < len(board["channels"]):
            full.append(("aux", Schedule([(0, rating[len(full)] * 0.1)])))
        d = root + "/g%d" % gi
        try:
            import os
            os.mkdir(d)
        except OSError:
            pass
        r, inf = run_group(d, board, full, interval, leads)
        out.extend(r[:len(group)])
        info.append(inf)
        gc.collect()
    print("RESULT " + json.dumps({"results": out, "runs": info, "groups": len(groups)}))


main()
