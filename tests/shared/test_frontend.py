# Both measurement front ends behind one interface, feeding the registers.
from firmware.energy import Registers
from firmware.metering import AdcFrontEnd
from firmware.atm90e32 import AtmFrontEnd
from boardsim.hal_sim import SimHal
from firmware.metering import lut_from_points
from boardsim.sim_waveforms import AdcModel, MainsSource
from firmware.atm90e32 import ATM90E32, config_from_board
from boardsim.atm90e32_sim import SimATM90E32
from util import ROOT, load_json


def test_adc_front_end_from_the_sim_board_definition():
    board = load_json(ROOT + "/boards/sim/board.json")
    hal = SimHal(board, period_us=200)
    adc = AdcModel()
    apv = [c["ct_turns"] / c["burden_ohm"] for c in board["channels"]]
    vpv = board["vref"]["transformer_ratio"] * board["vref"]["divider_ratio"]
    hal.source = MainsSource(adc, [
        {"irms": 20.0, "pf": 1.0, "amps_per_volt": apv[0]},       # grid import 4.6 kW
        {"irms": 10.0, "pf": -1.0, "amps_per_volt": apv[1]},      # PV export 2.3 kW
        {"irms": 0.0, "pf": 1.0, "amps_per_volt": apv[2]},
        {"irms": 5.0, "pf": 0.8, "amps_per_volt": apv[3]},
    ], volts_per_volt=vpv)
    fe = AdcFrontEnd(hal, board, lut=lut_from_points(adc.calibration_points()))
    regs = Registers(4)
    while hal.now_us < 3600 * 1000000 // 200:     # 1/200 h of windows, back to back
        fe.window(regs)
    rs = fe.update(regs)
    hours = hal.now_us / 3.6e9
    assert fe.meas_permille == 1000         # the simulated converter costs no compute time
    imp0 = regs.imp[0] * 1000 + regs.rest_mwh(0)[0]
    exp1 = regs.exp[1] * 1000 + regs.rest_mwh(1)[1]
    assert abs(imp0 - 4600 * hours * 1000) < 4600 * hours * 1000 * 0.003, (imp0, hours)
    assert abs(exp1 - 2300 * hours * 1000) < 2300 * hours * 1000 * 0.003, exp1
    assert regs.imp[1] == 0 and regs.exp[0] == 0 and regs.imp[2] == 0
    assert fe.has_vref and rs[0].p_w > 0 > rs[1].p_w


def test_atm_front_end_from_the_circuitsetup_definition():
    board = load_json(ROOT + "/boards/circuitsetup-6ch/board.json")
    hal = SimHal({"mcu": "sim"})
    spi = hal.spi(board["frontend"]["spi"])
    chips = []
    for i, c in enumerate(board["frontend"]["chips"]):
        cs = hal.pin_out(c["cs"], 1)

        class Cs:
            def __init__(self, pin):
                self.pin = pin

            def value(self):
                return self.pin.value()

        sim = SimATM90E32(cs=Cs(cs))
        hal.spi_devices.append(sim)
        chips.append((ATM90E32(spi, cs, delay_ms=lambda ms: None, **config_from_board(board, i)), sim))
    fe = AtmFrontEnd([c for c, s in chips], board)
    fe.begin()
    chips[0][1].set_phase(0, 230.0, 10.0, 1.0)
    chips[1][1].set_phase(2, 230.0, 4.0, -1.0)
    regs = Registers(6)
    for _ in range(60):
        for c, s in chips:
            s.advance(60)
        rs = fe.update(regs)
    assert rs[0].p_w == 2300 and rs[5].p_w == -920
    assert abs(regs.imp[0] - 2300) <= 1 and abs(regs.exp[5] - 920) <= 1, (regs.imp[0], regs.exp[5])
    assert regs.exp[0] == 0 and regs.imp[5] == 0 and regs.imp[1] == 0
