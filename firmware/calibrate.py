# Calibration of the CT channels against a known resistive load, for the
# commissioning (console op "cal_measure", `peergrid commission`).
#
# The real power a channel measures depends on the phase correction it is
# computed with (Channel.phase_deg, see Meter.compute): with a correction of
# t degrees, P(t) = A cos t + B sin t, where (A, B) is the power of the
# channel as a phasor against the voltage. A purely resistive load has its
# phasor at the true phase error of the CT, so the correction that makes
# the measured power largest is atan2(B, A) and the gain is the load's true
# power over hypot(A, B).
#
# In a house other loads of unknown power factor keep running, so the
# commissioning measures (A, B) with the test load off and on: powers add,
# so the difference of the two phasors is the test load's alone.
#
# (A, B) comes from three evaluations of the same window at corrections
# t0 - d, t0, t0 + d around the configured t0 (a closed-form least-squares
# fit; Meter.compute interpolates the voltage, which shifts its phase
# linearly to well under 0.01 degree), so nothing here searches.
import math

DEG = math.pi / 180


def _powers(meter, period_us, shift, gain1, out):
    """Real power of every channel with its phase correction moved by
    `shift` degrees from the configured one (gain 1 when gain1)."""
    chs = meter.channels
    keep = [(c.gain, c.phase_deg) for c in chs]
    try:
        for c in chs:
            if gain1:
                c.gain = 1.0
            c.phase_deg += shift
        rs = meter.compute(period_us)
        for i in range(len(chs)):
            out[i] = rs[i].p_exact
    finally:
        for i in range(len(chs)):
            chs[i].gain, chs[i].phase_deg = keep[i]
    return out


def components(meter, period_us, span_deg=5.0, out=None):
    """(A, B) in W of every channel from the window in the meter's buffer,
    at gain 1, such that the channel would measure A cos t + B sin t with a
    phase correction of t degrees. Returns a list of [A, B]."""
    n = len(meter.channels)
    pm = _powers(meter, period_us, -span_deg, True, [0.0] * n)
    p0 = _powers(meter, period_us, 0.0, True, [0.0] * n)
    pp = _powers(meter, period_us, span_deg, True, [0.0] * n)
    c = math.cos(span_deg * DEG)
    s = math.sin(span_deg * DEG)
    out = out if out is not None else [[0.0, 0.0] for _ in range(n)]
    for i in range(n):
        # about the configured correction t0: P(t0 + u) = a cos u + b sin u
        a = (p0[i] + c * (pp[i] + pm[i])) / (1 + 2 * c * c)
        b = (pp[i] - pm[i]) / (2 * s)
        t0 = meter.channels[i].phase_deg * DEG
        ct = math.cos(t0)
        st = math.sin(t0)
        out[i][0] = a * ct - b * st
        out[i][1] = a * st + b * ct
    return out


def measure(meter, windows=8, span_deg=5.0, between=None):
    """Average (A, B) of every channel over `windows` new windows. Returns
    a list of (A, B, spread) per channel, spread the standard deviation of
    one window's (A, B) about the mean, in W. `between()` runs after each
    window (the board feeds its watchdog). The channels keep their gain
    and phase; the meter's results are left those of the configuration."""
    n = len(meter.channels)
    sa = [0.0] * n
    sb = [0.0] * n
    sq = [0.0] * n
    one = [[0.0, 0.0] for _ in range(n)]
    period_us = 0
    for _ in range(windows):
        period_us = meter.sample()
        components(meter, period_us, span_deg, one)
        for i in range(n):
            a, b = one[i]
            sa[i] += a
            sb[i] += b
            sq[i] += a * a + b * b
        if between is not None:
            between()
    meter.compute(period_us)        # results as the board's own measurement would leave them
    out = []
    for i in range(n):
        a = sa[i] / windows
        b = sb[i] / windows
        var = sq[i] / windows - a * a - b * b
        out.append((a, b, math.sqrt(var) if var > 0 else 0.0))
    return out


def solve(a, b, true_w):
    """Phase correction (degrees) and gain that make a channel whose load
    phasor is (a, b) at gain 1 read true_w for a resistive load. A gain of
    the opposite sign to what is expected means the CT sees the current the
    other way round; the phase is then that of the reversed phasor. Raises
    ValueError when there is no power at all."""
    mag = math.sqrt(a * a + b * b)
    if mag == 0 or true_w == 0:
        raise ValueError("no power on this channel")
    if (a < 0) != (true_w < 0):
        a, b = -a, -b
        sign = -1
    else:
        sign = 1
    if a < 0:
        a, b = -a, -b       # export: the phasor points backwards
    return math.atan2(b, a) / DEG, sign * abs(true_w) / mag


def calibrate(meter, ci, true_w, period_us=None, span_deg=5.0):
    """Phase (degrees) and gain for channel ci when a resistive load of
    true_w is the only thing on it (no other load: otherwise use measure()
    with the load off and on, and solve() on the difference). Uses the
    window in the meter's buffer when period_us is given, else takes one.
    Returns (phase_deg, gain); the channel is left set to them."""
    if period_us is None:
        period_us = meter.sample()
    a, b = components(meter, period_us, span_deg)[ci]
    phase, gain = solve(a, b, true_w)
    if gain < 0:
        raise ValueError("no power of the expected sign on this channel: check the CT and its direction")
    ch = meter.channels[ci]
    ch.phase_deg = phase
    ch.gain = gain
    return phase, gain
