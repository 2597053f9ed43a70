# Calibration of one CT channel against a known load, for the commissioning
# workflow: the electrician switches on a resistive load of known power (a
# kettle, a heater) on the circuit the CT clamps, and the board finds the
# channel's phase correction and gain from one window of samples.
import math


def _power(meter, ci, period_us):
    return meter.compute(period_us)[ci].p_exact


def calibrate(meter, ci, true_w, period_us=None, span_deg=8.0):
    """Phase (degrees) and gain for channel ci, given the true real power of
    a resistive load (PF 1) now flowing. Uses the samples already in the
    meter's buffer when period_us is given, else takes a new window.

    The phase is the one that makes the measured real power largest (with a
    resistive load, voltage and current are in phase, so any residual phase
    error only lowers P); the gain then scales P to the true power.
    Returns (phase_deg, gain); the channel is left set to them."""
    if period_us is None:
        period_us = meter.sample()
    ch = meter.channels[ci]
    ch.gain = 1.0
    lo = ch.phase_deg - span_deg
    hi = ch.phase_deg + span_deg
    sign = 1 if true_w >= 0 else -1
    g = (math.sqrt(5) - 1) / 2
    a = hi - g * (hi - lo)
    b = lo + g * (hi - lo)
    ch.phase_deg = a
    fa = sign * _power(meter, ci, period_us)
    ch.phase_deg = b
    fb = sign * _power(meter, ci, period_us)
    for _ in range(40):
        if fa > fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            ch.phase_deg = a
            fa = sign * _power(meter, ci, period_us)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            ch.phase_deg = b
            fb = sign * _power(meter, ci, period_us)
        if hi - lo < 0.001:
            break
    ch.phase_deg = (lo + hi) / 2
    p = _power(meter, ci, period_us)
    if p == 0 or (p > 0) != (true_w > 0):
        raise ValueError("no power of the expected sign on this channel: check the CT and its direction")
    ch.gain = true_w / p
    return ch.phase_deg, ch.gain
