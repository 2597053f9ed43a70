# The virtual board's hardware: the simulated backend (hal_sim) with a clock
# that runs `speed` times faster than the wall clock, so a simulated day
# passes in minutes, and an ADC fed by a power scenario instead of a fixed
# waveform. Network and Modbus timeouts keep using real milliseconds
# (io_ms), because the broker and the RS485 peer live in real time.
import math
import time

from firmware.hal import TICKS_MASK
from boardsim.hal_sim import SimHal

_SQRT2 = 1.4142135623730951


def _now_ms():
    if hasattr(time, "ticks_ms"):
        return time.ticks_ms()
    return int(time.monotonic() * 1000)


def _diff(a, b):
    if hasattr(time, "ticks_diff"):
        return time.ticks_diff(a, b)
    return a - b


def _sleep_ms(ms):
    if hasattr(time, "sleep_ms"):
        time.sleep_ms(ms)
    else:
        time.sleep(ms / 1000)


class ScenarioSource:
    """Fills the ADC buffer from per-channel powers (W, import positive) and
    power factors, through an ideal 12-bit converter. One mains cycle is
    tabulated per input whenever the powers change, so a window costs one
    table look-up per sample. lead_deg[i]: how far CT i's output runs ahead
    of the current in its wire (a real CT's phase error; set_lead)."""

    def __init__(self, board, vrms=230.0, freq=50.0, period_us=250):
        fe = board.get("frontend", {})
        vref = board.get("vref") or {}
        self.bias_v = fe.get("bias_mv", 1300) / 1000
        self.vpv = vref.get("transformer_ratio", 1.0) * vref.get("divider_ratio", 1.0)
        self.has_vref = "pin" in vref
        self.apv = [c["ct_turns"] / c["burden_ohm"] for c in board["channels"]]
        self.vrms = vrms
        self.freq = freq
        self.period_us = period_us
        n = len(self.apv)
        self.w = [0.0] * n
        self.pf = [1.0] * n
        self.lead_deg = [0.0] * n
        self.cycle = int(1000000 / freq / period_us + 0.5)
        self.tables = None

    def set(self, i, w, pf=1.0):
        if self.w[i] != w or self.pf[i] != pf:
            self.w[i] = w
            self.pf[i] = pf
            self.tables = None

    def set_lead(self, i, deg):
        if self.lead_deg[i] != deg:
            self.lead_deg[i] = deg
            self.tables = None

    def _code(self, volts):
        c = int(volts / 3.3 * 4095 + 0.5)
        return 0 if c < 0 else (4095 if c > 4095 else c)

    def _build(self, m):
        # m inputs sampled one after another within each frame period
        cyc = self.cycle
        wt = 2 * math.pi * self.freq
        tabs = []
        off = 1 if self.has_vref else 0
        for j in range(m):
            tab = bytearray(2 * cyc)
            for k in range(cyc):
                t = (k * self.period_us + j * self.period_us / m) * 1e-6
                if off and j == 0:
                    v = self.bias_v + self.vrms * _SQRT2 * math.sin(wt * t) / self.vpv
                else:
                    ci = j - off
                    pf = self.pf[ci]
                    w = self.w[ci]
                    apf = pf if pf >= 0 else -pf
                    apf = apf if apf > 0.01 else 0.01
                    irms = abs(w) / (self.vrms * apf)
                    sign = -1 if w < 0 else 1
                    phi = math.acos(apf if apf <= 1 else 1.0)
                    if pf < 0:
                        phi = -phi      # negative pf: current leads
                    phi -= self.lead_deg[ci] * math.pi / 180
                    cur = sign * irms * _SQRT2 * math.sin(wt * t - phi)
                    v = self.bias_v + cur / self.apv[ci]
                c = self._code(v)
                tab[2 * k] = c & 0xFF
                tab[2 * k + 1] = c >> 8
            tabs.append(tab)
        self.tables = tabs

    def fill(self, pins, buf, n, t0_us, period_us):
        m = len(pins)
        if self.tables is None or len(self.tables) != m:
            self._build(m)
        cyc = self.cycle
        k = (t0_us // period_us) % cyc
        i = 0
        tabs = self.tables
        for _ in range(n):
            for j in range(m):
                tab = tabs[j]
                buf[i] = tab[2 * k] | (tab[2 * k + 1] << 8)
                i += 1
            k += 1
            if k == cyc:
                k = 0


class VirtualHal(SimHal):
    """SimHal with a fast-running clock: ticks_ms() is board time,
    io_ms() wall time. `advance(ms)` jumps board time forward.

    Both clocks have a board's period of 2^30 ms (ticks_add / ticks_diff
    of firmware/hal.py), whatever the host's own ticks period, and start at
    ticks0 and io0 (default: ticks0), so a test can put the wrap (2^30) or
    the sign change of ticks_diff against 0 (2^29) a few seconds ahead.
    elapsed_ms() is board time since the start, never wrapped: the
    simulated date and the ADC phase follow it."""

    name = "virtual"

    def __init__(self, board, root, speed=1.0, unix0=946684800, ticks0=0, io0=None):
        SimHal.__init__(self, board, root=root)
        self.source = ScenarioSource(board, period_us=self.period_us)
        self.speed = speed
        self._r0 = _now_ms()
        self._v0 = 0
        self.unix0 = unix0          # Unix time at board time 0
        self.sleeps = 0
        self._io_r0 = self._r0
        self.start_clocks(ticks0, io0)

    def start_clocks(self, ticks0, io0=None):
        """Where the board clock and the I/O clock stand at the start."""
        self.ticks0 = ticks0 & TICKS_MASK
        self.io0 = (ticks0 if io0 is None else io0) & TICKS_MASK

    def _rebase(self):
        v = self.elapsed_ms()
        self._r0 = _now_ms()
        self._v0 = v

    def set_speed(self, speed):
        self._rebase()
        self.speed = speed

    def advance(self, ms):
        self._v0 += ms

    def elapsed_ms(self):
        """Board milliseconds since the start (never wraps)."""
        return self._v0 + int(_diff(_now_ms(), self._r0) * self.speed)

    def ticks_ms(self):
        return (self.ticks0 + self.elapsed_ms()) & TICKS_MASK

    def ticks_us(self):
        return (self.ticks0 * 1000 + self.elapsed_ms() * 1000) & TICKS_MASK

    def io_ms(self):
        return (self.io0 + _diff(_now_ms(), self._io_r0)) & TICKS_MASK

    def io_sleep_ms(self, ms):
        _sleep_ms(ms)

    def sleep_ms(self, ms):
        self.sleeps += 1
        real = int(ms / self.speed) if self.speed > 0 else ms
        if real > 0:
            _sleep_ms(real)

    def idle(self, ms):
        # at most 5 ms of wall time, so the loop stays responsive at any speed
        real = int(ms / self.speed) if self.speed > 0 else ms
        _sleep_ms(real if real < 5 else 5)

    @property
    def continuous(self):
        """At more than real time the host's CPU would spend all its time on
        windows and still cover a sliver of the board's time: the board then
        measures one window per reading (its readings' meas says so)."""
        return self.speed <= 1

    def adc_block(self, pins, buf, n):
        t0 = self.elapsed_ms()
        self.source.fill(pins, buf, n, t0 * 1000, self.period_us)
        # a converter takes its block's length of board time
        left = t0 + n * self.period_us // 1000 - self.elapsed_ms()
        if left > 0 and self.speed > 0 and left / self.speed >= 1:
            _sleep_ms(int(left / self.speed))
        return self.period_us

    def time(self):
        return self.unix0 + self.elapsed_ms() // 1000, self.synced

    def set_time(self, unix):
        self.unix0 = unix - self.elapsed_ms() // 1000
        self.synced = True
