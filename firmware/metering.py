# Measurement from the ADC front end: Vrms, Irms, real and apparent power,
# power factor and frequency per channel over whole mains cycles, and the
# energy of each window for the registers.
#
# One window: the hardware layer fills a preallocated buffer with interleaved
# raw codes of [voltage reference, ct1, ct2, ...]. Raw codes are linearised
# through the per-chip table (firmware/dsp.py works in 200 uV units), the
# window is cut to whole cycles between the first and last rising zero
# crossing of the voltage, DC offsets are removed through the sums, and the
# phase error (CT phase lead plus the skew of sampling the inputs one after
# another) is corrected by interpolating the voltage between neighbouring
# frames, which is linear and so can be done on the sums.
import gc
import math
from array import array

from firmware import dsp
from firmware.energy import Result

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

def zeros(typecode, n, size):
    """A zero-filled array of n items of `size` bytes, made with as little
    transient heap as MicroPython allows (collect first: the table is big)."""
    gc.collect()
    return array(typecode, bytes(size * n))


UNIT_UV = const(200)          # linear unit of the table, microvolts
LUT_MAX = const(16500)        # 3.3 V
SQRT2 = 1.4142135623730951


def linear_lut(bits=12, full_scale_uv=3300000):
    """Table for an ideal converter (codes spread evenly over full scale)."""
    n = 1 << bits
    lut = zeros("H", n, 2)
    # c * full_scale_uv passes 2^30 (a long int on a 32-bit port: ~90 bytes
    # of heap per code); in table units the product stays a small int and,
    # with full scale a whole number of units, the result is the same
    fs = full_scale_uv // UNIT_UV
    if fs * UNIT_UV == full_scale_uv:
        for c in range(n):
            lut[c] = c * fs // (n - 1)
    else:
        for c in range(n):
            lut[c] = (c * full_scale_uv // (n - 1)) // UNIT_UV
    return lut


def lut_from_points(points, bits=12, out=None):
    """Per-chip linearisation from (code, microvolts) calibration points,
    sorted by code: piecewise linear between them, clamped at the ends. On a
    board the points come from ADC.read_uv() against the raw code; the
    simulated ADC supplies its own. Pass `out` (allocated early, at boot) to
    fill a table in place."""
    n = 1 << bits
    lut = out if out is not None else zeros("H", n, 2)
    p = 0
    for c in range(n):
        while p + 2 < len(points) and points[p + 1][0] <= c:
            p += 1
        c0, u0 = points[p]
        c1, u1 = points[p + 1]
        uv = u0 + (u1 - u0) * (c - c0) // (c1 - c0) if c1 != c0 else u0
        if uv < 0:
            uv = 0
        lut[c] = min(LUT_MAX, uv // UNIT_UV)
    return lut


def points_from_pairs(pairs, bin_codes=64):
    """Calibration points from (raw code, microvolts) pairs measured on a
    board (read_u16 against read_uv while the voltage reference sweeps its
    range): averaged per bin of codes, extended linearly to both ends of the
    scale from the outermost bins, which is where the converter is least
    trustworthy anyway; the front end keeps its signals inside the measured
    span."""
    sums = {}
    for code, uv in pairs:
        b = code // bin_codes
        s = sums.get(b)
        if s is None:
            sums[b] = [code, uv, 1]
        else:
            s[0] += code
            s[1] += uv
            s[2] += 1
    pts = [(s[0] // s[2], s[1] // s[2]) for b, s in sorted(sums.items()) if s[2] >= 2]
    if len(pts) < 2:
        raise ValueError("calibration needs the signal to sweep at least two code bins")
    (c0, u0), (c1, u1) = pts[0], pts[1]
    if c0 > 0:
        pts.insert(0, (0, u0 - (u1 - u0) * c0 // (c1 - c0)))
    (c0, u0), (c1, u1) = pts[-2], pts[-1]
    if c1 < 4095:
        pts.append((4095, u1 + (u1 - u0) * (4095 - c1) // (c1 - c0)))
    return pts


class Channel:
    """Per-channel scale and calibration (from the board and the commissioning config)."""

    def __init__(self, name, amps_per_volt, gain=1.0, phase_deg=0.0, rating_a=100):
        self.name = name
        self.amps_per_volt = amps_per_volt
        self.gain = gain
        self.phase_deg = phase_deg     # positive: the CT's output leads the current
        self.rating_a = rating_a


# Result.fault bits (per channel, per window)
FAULT_CLIP = const(1)       # a sample at or beyond the end of the converter's linear range
FAULT_CT = const(2)         # the input sits far from its bias: CT open, shorted or not plugged
# a voltage reference below this share of the nominal voltage is dead
# (adapter unplugged): its "crossings" are noise
VREF_DEAD_RATIO = 0.3
FREQ_MIN = 40.0
FREQ_MAX = 70.0
BIAS_TOL_UNITS = const(2000)    # 400 mV: a CT's output has no DC of its own


class Meter:
    """Measures one window at a time; every buffer is allocated here, once.

    linear_mv: the converter's linear range at the pin (board.json
    frontend.linear_mv); a sample outside it flags the channel as clipped.
    bias_mv: where a CT input rests with no current (frontend.bias_mv)."""

    def __init__(self, hal, vref_pin, ct_pins, channels, volts_per_volt=None, nominal_v=230,
                 frames=1000, lut=None, mains_hz=50, linear_mv=None, bias_mv=None):
        self.hal = hal
        self.has_vref = vref_pin is not None
        self.pins = ([vref_pin] if self.has_vref else []) + list(ct_pins)
        self.m = len(self.pins)
        self.jv = 0 if self.has_vref else -1
        self.channels = channels
        self.vpv = volts_per_volt      # mains volts per volt at the ADC pin
        self.nominal_v = nominal_v
        self.frames = frames
        self.mains_hz = mains_hz
        self.buf = zeros("H", frames * self.m, 2)
        self.lut = lut if lut is not None else linear_lut()
        self.acc = array("i", bytes(4 * 2 * dsp.N_SLOTS))
        self.vacc = array("i", bytes(4 * 4))
        self.zc = array("i", bytes(4 * 64))
        self.ext = array("i", bytes(4 * 2))
        lin = linear_mv or (0, 3300)
        self.lin_lo = lin[0] * 1000 // UNIT_UV
        self.lin_hi = lin[1] * 1000 // UNIT_UV
        self.bias = bias_mv * 1000 // UNIT_UV if bias_mv is not None else -1
        self.results = [Result() for _ in channels]
        self.window_us = 0
        self.block_us = 0
        self.cycles = 0
        self.vref_dead = False          # the last window: reference present but dead
        self.vclip = False              # the last window: the reference clipped
        self.freq_ok = False            # the last window: a frequency within range

    def sample(self):
        """Fill the buffer; returns the frame period in microseconds."""
        return self.hal.adc_block(self.pins, self.buf, self.frames)

    def measure(self):
        """Sample one window and compute every channel; returns the results."""
        period_us = self.sample()
        return self.compute(period_us)

    def _cut(self, mean_v):
        """Whole cycles. Among the numbers of cycles the window holds after
        its first rising zero crossing, take the one whose length in frames
        is closest to an integer (at 60 Hz and 5 kHz a cycle is 83.33
        frames, so 3 cycles fit exactly); a cut is never clamped at the end
        of the buffer (that would no longer be whole cycles)."""
        n = dsp.rising_crossings(self.buf, self.lut, self.m, self.jv, self.frames, int(mean_v), self.zc)
        if n < 2:
            return 1, self.frames - 1, 0, 0
        span = self.zc[n - 1] - self.zc[0]
        per = span / (256 * (n - 1))          # frames per cycle
        k0 = (self.zc[0] + 128) // 256 + 1
        if k0 < 1:
            k0 = 1
        room = self.frames - 1 - k0
        best = 0
        best_res = 1.0
        c = n - 1
        while c >= 1 and c * 2 >= n - 1:
            x = c * per
            if int(x + 0.5) <= room:
                res = abs(x - int(x + 0.5))
                if best == 0 or res < best_res - 0.02:
                    best, best_res = c, res
            c -= 1
        if best == 0:
            return 1, self.frames - 1, 0, 0
        k1 = k0 + int(best * per + 0.5)
        return k0, k1, best, int(best * per * 256)

    def _clipped(self, j, k0, k1):
        dsp.extremes(self.buf, self.m, j, k0, k1, self.ext)
        lut = self.lut
        return lut[self.ext[0]] <= self.lin_lo or lut[self.ext[1]] >= self.lin_hi

    def compute(self, period_us):
        m = self.m
        frames = self.frames
        lut = self.lut
        buf = self.buf
        vref = self.has_vref
        mv = 0.0
        vrms = 0.0
        cycles = 0
        span256 = 0
        k0, k1 = 1, frames - 1
        scale_v = UNIT_UV * 1e-6        # volts at the pin per unit
        if vref:
            dsp.clear(self.vacc)
            dsp.sum_sq(buf, lut, m, self.jv, 0, frames, self.vacc)
            mv = dsp.value(self.vacc, 0) / frames
            var = dsp.value(self.vacc, 1) / frames - mv * mv
            vrms = math.sqrt(var if var > 0 else 0) * scale_v * self.vpv
            # a dead reference (adapter unplugged) is noise: no crossings
            # to trust, no phase to measure against; powers fall back to
            # apparent at the nominal voltage and the reading says so
            self.vref_dead = vrms < VREF_DEAD_RATIO * self.nominal_v
            if self.vref_dead:
                vref = False
            else:
                k0, k1, cycles, span256 = self._cut(mv)
                if k1 - k0 < frames // 4:
                    k0, k1, cycles, span256 = 1, frames - 1, 0, 0
        else:
            self.vref_dead = False
        n = k1 - k0
        self.cycles = cycles
        self.window_us = n * period_us      # the whole cycles the values come from
        self.block_us = frames * period_us  # the time the converter sampled
        freq = 0.0
        if span256 and cycles:
            freq = cycles * 256 * 1e6 / (span256 * period_us)
        self.freq_ok = FREQ_MIN <= freq <= FREQ_MAX
        fcalc = freq if self.freq_ok else float(self.mains_hz)
        self.vclip = self.has_vref and self._clipped(0, k0, k1)
        if vref:
            dsp.clear(self.vacc)
            dsp.sum_sq(buf, lut, m, self.jv, k0, k1, self.vacc)
            mv = dsp.value(self.vacc, 0) / n
            var = dsp.value(self.vacc, 1) / n - mv * mv
            vrms = math.sqrt(var if var > 0 else 0) * scale_v * self.vpv
        else:
            vrms = self.nominal_v
        bias = self.bias
        if bias < 0:
            bias = int(mv) if self.has_vref else LUT_MAX // 2
        omega_per_frame = 2 * math.pi * fcalc * period_us * 1e-6
        off = 1 if self.has_vref else 0
        for ci in range(len(self.channels)):
            ch = self.channels[ci]
            r = self.results[ci]
            ji = ci + off
            acc = self.acc
            dsp.clear(acc)
            ia = ch.amps_per_volt * ch.gain * scale_v
            if vref:
                # The voltage is wanted at the instant the current sample
                # stands for: the current input was sampled ji/m of a frame
                # after the voltage, and the CT's output runs phase_deg ahead
                # of the real current. Shift v by lag = q + f frames, the
                # fraction by linear interpolation between v[k+q] and v[k+q+1].
                lag = ji / m + (ch.phase_deg * math.pi / 180) / omega_per_frame
                q = int(math.floor(lag))
                f = lag - q
                a = k0 if k0 + q >= 0 else -q
                b = k1 if k1 + q + 1 <= frames else frames - q - 1
                dsp.cross(buf, lut, m, self.jv, ji, q, a, b, acc)
                nn = b - a
            else:
                a, b = k0, k1
                dsp.sum_sq(buf, lut, m, ji, k0, k1, acc)
                nn = n
            mi = dsp.value(acc, dsp.S_I) / nn
            var_i = dsp.value(acc, dsp.S_II) / nn - mi * mi
            irms = math.sqrt(var_i if var_i > 0 else 0) * ia
            if vref:
                svi = dsp.value(acc, dsp.S_VI) / nn
                svn = dsp.value(acc, dsp.S_VNI) / nn
                cross_sum = svi + f * (svn - svi)
                # mean of the shifted voltage over exactly these frames
                mvs = (dsp.value(acc, dsp.S_V) * (1 - f) + dsp.value(acc, dsp.S_VN) * f) / nn
                p = (cross_sum - mvs * mi) * scale_v * self.vpv * ia
                s = vrms * irms
                # linear interpolation shrinks the voltage's amplitude a little:
                # undo that for the fundamental
                shrink = math.sqrt(1 - 2 * f * (1 - f) * (1 - math.cos(omega_per_frame)))
                if shrink > 0:
                    p /= shrink
            else:
                # apparent power at the nominal voltage, booked as import:
                # without a voltage the direction is unknown, and a fault
                # must never pay its owner (the reading is flagged)
                s = self.nominal_v * irms
                p = s
            # an input resting far from its bias is a CT fault (it may sit
            # at a rail, which is then not a clipped current)
            if mi - bias > BIAS_TOL_UNITS or bias - mi > BIAS_TOL_UNITS:
                fault = FAULT_CT
            else:
                fault = FAULT_CLIP if self._clipped(ji, a, b) else 0
            r.fault = fault
            r.vrms_dv = int(vrms * 10 + 0.5)
            r.irms_ma = int(irms * 1000 + 0.5)
            r.p_exact = p
            r.p_w = int(p + 0.5) if p >= 0 else -int(-p + 0.5)
            r.s_va = int(s + 0.5)
            pf = 1000 * p / s if s > 0 else 0.0
            pf = int(pf + 0.5) if pf >= 0 else -int(-pf + 0.5)
            r.pf_permille = 1000 if pf > 1000 else (-1000 if pf < -1000 else pf)
            r.freq_chz = int(freq * 100 + 0.5) if self.freq_ok else 0
        return self.results


class AdcFrontEnd:
    """The ESP32's ADC through metering.Meter, measuring continuously: the
    board calls window() whenever its loop has nothing else to do, so
    windows follow each other back to back; each window's power stands for
    the time since the end of the one before (its own length plus the
    compute and loop time around it), so every millisecond of board time is
    booked once. update() closes the period when a reading is due."""
    continuous = True

    def __init__(self, hal, board, cal=None, frames=1000, lut=None):
        """cal: per channel name {"gain": g, "phase_deg": d} from the
        commissioning config (absent: 1 and 0). lut: the per-chip
        linearisation table (metering.lut_from_points)."""
        cal = cal or {}
        chans = []
        pins = []
        for c in board["channels"]:
            apv = c["ct_turns"] / c["burden_ohm"]
            k = cal.get(c["name"], {})
            chans.append(Channel(c["name"], apv, k.get("gain", 1.0), k.get("phase_deg", 0.0), c["rating_a"]))
            pins.append(c["pin"])
        vref = board.get("vref") or {}
        fe = board.get("frontend") or {}
        vpin = vref.get("pin")
        vpv = vref.get("transformer_ratio", 1.0) * vref.get("divider_ratio", 1.0) if vpin is not None else None
        self.hal = hal
        self.meter = Meter(hal, vpin, pins, chans, volts_per_volt=vpv, nominal_v=vref.get("nominal_v", 230),
                           frames=frames, lut=lut, linear_mv=fe.get("linear_mv"), bias_mv=fe.get("bias_mv"))
        self.has_vref = vpin is not None
        n = len(chans)
        self.e_wms = [0.0] * n          # this period's energy per channel, W*ms
        self.p_chf = [0] * n            # this period's faults per channel
        self.results = [Result() for _ in chans]
        self.t_last = None              # ticks_ms at the end of the last window
        self.p_windows = 0              # windows in this period
        self.p_meas_us = 0              # measured time in this period, us
        self.p_cover_ms = 0             # time booked in this period, ms
        self.p_fault = 0                # board-level faults seen in this period (below)
        self.meas_permille = 0          # the last closed period's measured share
        self.fault = 0                  # the last closed period's board-level faults
        self.s_meas_ms = 0              # since take_fraction(): measured and booked ms
        self.s_cover_ms = 0
        self.windows = 0                # since boot

    # board-level faults of a period (frontend flags, see Board._flags)
    VREF_DEAD = 1
    VREF_CLIP = 2
    FREQ_RANGE = 4

    def window(self, regs):
        """Measure one window now and book its energy."""
        meter = self.meter
        rs = meter.measure()
        now = self.hal.ticks_ms()
        w_us = meter.block_us
        if self.t_last is None:
            cover = int(w_us // 1000)
        else:
            cover = self.hal.ticks_diff(now, self.t_last)
            if cover < 0:
                cover = 0
        self.t_last = now
        res = self.results
        for i in range(len(rs)):
            # the energy in W*ms, rounded to the nearest
            e = rs[i].p_exact * cover
            regs.add_wms(i, int(e + 0.5) if e >= 0 else -int(-e + 0.5))
            self.e_wms[i] += e
            self.p_chf[i] |= rs[i].fault
        # measured: the time the converter sampled, and only with a live
        # reference when the board has one (otherwise the power is a guess)
        if not meter.vref_dead:
            m_ms = int(w_us // 1000)
            self.p_meas_us += int(w_us)
            self.s_meas_ms += m_ms if m_ms < cover else cover
        self.p_cover_ms += cover
        self.s_cover_ms += cover
        if self.s_cover_ms > 0x8000000:
            # no status for 1.5 days: keep the share, stay a small int
            self.s_cover_ms >>= 1
            self.s_meas_ms >>= 1
        f = 0
        if meter.vref_dead:
            f |= self.VREF_DEAD
        if meter.vclip:
            f |= self.VREF_CLIP
        if self.has_vref and not meter.vref_dead and not meter.freq_ok:
            f |= self.FREQ_RANGE
        self.p_fault |= f
        self.p_windows += 1
        self.windows += 1
        return rs

    def update(self, regs, dt_ms=None):
        """Close the period: measure a window if the loop found no time for
        one, and return the results for the reading: the last window's
        voltage, current, power factor and frequency, the period's mean
        real power (its energy over its time), every fault seen in it.
        dt_ms is not needed (the windows carry their own time)."""
        if not self.p_windows:
            self.window(regs)
        last = self.meter.results
        res = self.results
        cov = self.p_cover_ms
        for i in range(len(res)):
            r = res[i]
            l = last[i]
            p = self.e_wms[i] / cov if cov > 0 else l.p_exact
            r.vrms_dv = l.vrms_dv
            r.irms_ma = l.irms_ma
            r.p_exact = p
            r.p_w = int(p + 0.5) if p >= 0 else -int(-p + 0.5)
            r.s_va = l.s_va
            r.pf_permille = l.pf_permille
            r.freq_chz = l.freq_chz
            r.fault = self.p_chf[i]
            self.p_chf[i] = 0
            self.e_wms[i] = 0.0
        m = self.p_meas_us // 1000
        self.meas_permille = 1000 if m >= cov else (m * 1000 // cov if cov > 0 else 0)
        self.fault = self.p_fault
        self.p_windows = 0
        self.p_meas_us = 0
        self.p_cover_ms = 0
        self.p_fault = 0
        return res

    def take_fraction(self):
        """Measured share of board time since the last call, permille
        (the status reports it), and start counting again."""
        c = self.s_cover_ms
        m = self.s_meas_ms
        self.s_cover_ms = 0
        self.s_meas_ms = 0
        return m * 1000 // c if c > 0 else None
