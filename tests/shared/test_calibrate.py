# CT phase and gain from a known resistive load with other loads running
# (firmware/calibrate.py, the commissioning's delta method), on the simulated
# converter, under CPython and MicroPython.
import math

from firmware.calibrate import calibrate, components, measure, solve
from boardsim.hal_sim import SimHal
from firmware.metering import Meter, Channel, lut_from_points
from boardsim.sim_waveforms import AdcModel, MainsSource

APV = 117.6
VPV = 300.0
V = 230.0


def _load(p_w, q_var, lead_deg, apv):
    """One channel of MainsSource carrying real power p_w and reactive
    power q_var (+ inductive) at 230 V."""
    s = math.sqrt(p_w * p_w + q_var * q_var)
    return {"irms": s / V, "pf": p_w / s, "lead": q_var < 0, "amps_per_volt": apv, "ct_lead_deg": lead_deg}


def _meter(chans):
    hal = SimHal({"mcu": "sim"}, period_us=200)
    adc = AdcModel(nl=0.04, noise_lsb=1.0)
    hal.source = MainsSource(adc, chans, volts_per_volt=VPV)
    cal = [Channel("ct%d" % i, APV) for i in range(len(chans))]
    m = Meter(hal, 36, [39, 34][:len(chans)], cal, volts_per_volt=VPV, frames=1000,
              lut=lut_from_points(adc.calibration_points()))
    return hal, m


def test_components_follow_the_phase_correction():
    # the phasor describes what the channel measures at any correction
    hal, m = _meter([_load(1500.0, 900.0, 1.0, APV)])
    per = m.sample()
    a, b = components(m, per)[0]
    for t in (-7.0, 0.0, 3.0, 9.0):
        m.channels[0].phase_deg = t
        p = m.compute(per)[0].p_exact
        want = a * math.cos(t * math.pi / 180) + b * math.sin(t * math.pi / 180)
        assert abs(p - want) < 0.5, (t, p, want)
    assert m.channels[0].gain == 1.0


def test_delta_with_a_reactive_base_load_finds_phase_and_gain():
    # a CT leading by 2 degrees, reading 4 % high; a fridge and a pump
    # (600 W at PF 0.7 lagging) run all the time; the kettle is 2000 W
    lead, apv = 2.0, APV / 1.04
    q = 600.0 * math.tan(math.acos(0.7))
    hal, m = _meter([_load(600.0, q, lead, apv)])
    off = measure(m, 3)[0]
    hal.source.channels[0] = _load(2600.0, q, lead, apv)
    on = measure(m, 3)[0]
    assert m.channels[0].gain == 1.0 and m.channels[0].phase_deg == 0.0     # left as configured
    assert off[2] < 5 and on[2] < 5, (off, on)      # window to window spread, W
    phase, gain = solve(on[0] - off[0], on[1] - off[1], 2000.0)
    assert abs(phase - lead) < 0.1, phase
    assert abs(gain * 1.04 - 1) < 0.003, gain
    # the maximum of the total power alone would be far off: the base is reactive
    naive, _ = calibrate(m, 0, 2600.0)
    assert abs(naive - lead) > 5, naive
    # with the delta's figures, a PF 0.5 load on that CT measures right
    m.channels[0].phase_deg = phase
    m.channels[0].gain = gain
    hal.source.channels[0] = _load(2300.0, 2300.0 * math.tan(math.acos(0.5)), lead, apv)
    p = m.measure()[0].p_exact
    assert abs(p / 2300.0 - 1) < 0.005, p
    # without the phase it would not
    m.channels[0].phase_deg = 0.0
    p0 = m.measure()[0].p_exact
    assert abs(p0 / 2300.0 - 1) > 0.04, p0


def test_solve_signs():
    c, s = math.cos(math.radians(3)), math.sin(math.radians(3))
    ph, g = solve(1000 * c, 1000 * s, 2000.0)
    assert abs(ph - 3) < 1e-4 and abs(g - 2) < 1e-4
    ph, g = solve(-1000 * c, -1000 * s, 2000.0)           # CT the wrong way round
    assert abs(ph - 3) < 1e-4 and abs(g + 2) < 1e-4
    ph, g = solve(-1000 * c, -1000 * s, -2000.0)          # an export, seen right
    assert abs(ph - 3) < 1e-4 and abs(g - 2) < 1e-4
    try:
        solve(0.0, 0.0, 2000.0)
    except ValueError:
        pass
    else:
        raise AssertionError("no power was solved")


class _Running:
    """What the console's cal_measure needs of a running board: its front
    end and each channel's role (firmware.board.Board has both)."""

    def __init__(self, fe, roles):
        self.fe = fe
        self.roles = roles


def test_console_op_on_the_adc_and_the_atm90e32_front_ends():
    from firmware.console import Ops
    from firmware.metering import AdcFrontEnd
    from firmware.atm90e32 import AtmFrontEnd
    from util import ROOT, load_json

    board = load_json(ROOT + "/boards/sim/board.json")
    hal = SimHal(board, period_us=200)
    adc = AdcModel(nl=0.04, noise_lsb=1.0)
    apv = [c["ct_turns"] / c["burden_ohm"] for c in board["channels"]]
    vpv = board["vref"]["transformer_ratio"] * board["vref"]["divider_ratio"]
    hal.source = MainsSource(adc, [_load(2000.0, 0.0, 2.0, a) for a in apv], volts_per_volt=vpv)
    fe = AdcFrontEnd(hal, board, cal={"ct1": {"gain": 1.1, "phase_deg": 0.5}},
                     lut=lut_from_points(adc.calibration_points()))
    roles = {"ct1": "grid"}
    r = Ops(hal, board, "/tmp", _Running(fe, roles)).call({"op": "cal_measure", "windows": 2})
    assert r["ok"] and r["windows"] == 2 and len(r["ch"]) == 4, r
    c = r["ch"][0]
    assert c["name"] == "ct1" and c["role"] == "grid" and c["gain"] == 1.1 and c["phase_deg"] == 0.5
    ph, g = solve(c["a_w"], c["b_w"], 2000.0)
    assert abs(ph - 2.0) < 0.15 and abs(g - 1) < 0.01, (ph, g)
    assert fe.meter.channels[0].gain == 1.1 and fe.meter.channels[0].phase_deg == 0.5
    bad = Ops(hal, board, "/tmp", _Running(fe, roles)).call({"op": "cal_measure", "windows": 40})
    assert not bad["ok"] and bad["err"] == "arg"
    atm = load_json(ROOT + "/boards/circuitsetup-6ch/board.json")
    r = Ops(hal, atm, "/tmp", _Running(AtmFrontEnd([], atm), {})).call({"op": "cal_measure"})
    assert not r["ok"] and r["err"] == "unsupported" and "ATM90E32" in r["msg"]
