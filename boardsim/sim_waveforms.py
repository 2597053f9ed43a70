# Waveform source for the simulated ADC: mains voltage and CT currents with
# harmonics, power factor and CT phase lead, seen through a 12-bit converter
# that is nonlinear, noisy and biased. Deterministic (own xorshift generator)
# so the same case gives the same codes under CPython and MicroPython.
import math


class AdcModel:
    """A nonlinear 12-bit converter over 0..full_v volts.

    code = 4095 * y(x), x = volts / full_v, y(x) = x + nl * x * (1 - x) * (1 - 2x)
    plus uniform noise of +-noise_lsb, rounded and clamped."""

    def __init__(self, nl=0.04, noise_lsb=1.0, full_v=3.3, seed=12345):
        self.nl = nl
        self.noise = noise_lsb
        self.full_v = full_v
        self.state = seed or 1

    def _rand(self):
        # xorshift32, uniform in [0, 1)
        x = self.state
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.state = x
        return x / 4294967296.0

    def curve(self, x):
        return x + self.nl * x * (1 - x) * (1 - 2 * x)

    def code(self, volts):
        x = volts / self.full_v
        if x < 0:
            x = 0.0
        elif x > 1:
            x = 1.0
        c = 4095 * self.curve(x) + self.noise * (self._rand() + self._rand() - 1)
        c = int(c + 0.5)
        return 0 if c < 0 else (4095 if c > 4095 else c)

    def calibration_points(self, step=64):
        """(code, microvolts) pairs: the converter's own calibration, what
        read_uv() gives on a real chip."""
        pts = []
        c = 0
        while True:
            lo, hi = 0.0, 1.0
            for _ in range(40):
                mid = (lo + hi) / 2
                if 4095 * self.curve(mid) < c:
                    lo = mid
                else:
                    hi = mid
            pts.append((c, int(lo * self.full_v * 1e6)))
            if c == 4095:
                break
            c = min(4095, c + step)
        return pts


class MainsSource:
    """Fills interleaved frames [voltage, ct1, ct2, ...] like SimHal expects.

    channels: list of dicts with irms (A, fundamental), pf (cos phi, signed:
    negative exports), lead (True: capacitive), harmonics [(order, ratio)],
    ct_lead_deg, amps_per_volt (A in the wire per V on the burden), bias_v
    (where the input rests, if not the common bias: 0 for a CT input that a
    pull-down holds when its CT is unplugged). vrms 0: the voltage input
    carries no mains (its adapter unplugged)."""

    def __init__(self, adc, channels, freq=50.0, vrms=230.0, volts_per_volt=None, bias_v=1.62,
                 v_harmonics=(), has_vref=True):
        self.adc = adc
        self.channels = channels
        self.freq = freq
        self.vrms = vrms
        self.vpv = volts_per_volt
        self.bias = bias_v
        self.vh = v_harmonics
        self.has_vref = has_vref

    def fill(self, pins, buf, n, t0_us, period_us):
        m = len(pins)
        w = 2 * math.pi * self.freq
        i = 0
        adc = self.adc
        off = 1 if self.has_vref else 0
        for k in range(n):
            for j in range(m):
                t = (t0_us + k * period_us + j * period_us / m) * 1e-6
                if self.has_vref and j == 0:
                    v = self.vrms * 1.4142135623730951 * math.sin(w * t)
                    for order, ratio in self.vh:
                        v += self.vrms * 1.4142135623730951 * ratio * math.sin(order * w * t)
                    buf[i] = adc.code(self.bias + v / self.vpv)
                else:
                    c = self.channels[j - off]
                    pf = c["pf"]
                    phi = math.acos(pf if pf >= 0 else -pf)
                    if c.get("lead"):
                        phi = -phi
                    a = c["irms"] * 1.4142135623730951 * (1 if pf >= 0 else -1)
                    tt = w * t + c.get("ct_lead_deg", 0.0) * math.pi / 180 - phi
                    cur = a * math.sin(tt)
                    for order, ratio in c.get("harmonics", ()):
                        cur += a * ratio * math.sin(order * tt)
                    buf[i] = adc.code(c.get("bias_v", self.bias) + cur / c["amps_per_volt"])
                i += 1

    def true_power(self, ci):
        c = self.channels[ci]
        return self.vrms * c["irms"] * c["pf"]
