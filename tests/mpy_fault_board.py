# Runs under MicroPython (tests/test_metering_faults.py): the board's own
# Board on the simulated converter, one scenario per run, through one
# reading period; prints the readings it made (from its flash spool, as the
# gateway would get them) and the front end's view, as JSON.
#   micropython mpy_fault_board.py <fsroot> <scenario>
import json
import sys

from firmware import config as fconfig
from firmware.board import Board
from boardsim.hal_sim import SimHal
from firmware.net import Net
from boardsim.sim_waveforms import AdcModel, MainsSource


class Offline(Net):
    def up(self):
        return False


root, scenario = sys.argv[1], sys.argv[2]
with open("boards/sim/board.json") as f:
    board = json.load(f)
# the CT inputs biased at mid-supply, as many boards are (the voltage input
# at 1.3 V): 130 % of a 100 A CT then reaches beyond the converter's linear
# range (2.45 V)
board["frontend"]["bias_mv"] = 1650
apv = [c["ct_turns"] / c["burden_ohm"] for c in board["channels"]]
vpv = board["vref"]["transformer_ratio"] * board["vref"]["divider_ratio"]
chans = [{"irms": 20.0, "pf": 1.0, "amps_per_volt": apv[0]},
         {"irms": 5.0, "pf": -1.0, "amps_per_volt": apv[1]},
         {"irms": 2.0, "pf": 0.9, "amps_per_volt": apv[2]},
         {"irms": 0.0, "pf": 1.0, "amps_per_volt": apv[3]}]
for c in chans:
    c["bias_v"] = 1.65
vrms = 230.0
if scenario == "clip":
    chans[0]["irms"] = 130.0
elif scenario == "ctf":
    chans[3]["bias_v"] = 0.0        # unplugged: the input's pull-down holds it at 0 V
elif scenario == "vref":
    vrms = 0.0                      # the voltage adapter unplugged
hal = SimHal(board, root=root, period_us=200)
hal.source = MainsSource(AdcModel(nl=0.04, noise_lsb=1.0), chans, vrms=vrms, volts_per_volt=vpv, bias_v=1.3)
cal = {}
for c in board["channels"]:
    cal[c["name"]] = {"gain": 1.0, "phase_deg": 0.0}
cfg, digest = fconfig.parse(json.dumps({"community": "oak", "device": "meter-9", "secret": "ab" * 32,
                                        "broker": {"host": "127.0.0.1"}, "channels": cal, "period_s": 2}))
b = Board(hal, board, cfg, digest, Offline(), root)
while b.stats["readings"] < 2:
    b.step()
    b.idle()
frames = []
buf = bytearray(512)
while b.spool.count:
    n = b.spool.peek(buf)
    frames.append("".join("%02x" % x for x in buf[:n]))
    b.spool.pop()
print("RESULT " + json.dumps({"frames": frames, "windows": b.fe.windows, "adc_cal": b.adc_cal,
                              "meas": b.fe.meas_permille}))
