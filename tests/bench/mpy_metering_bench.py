# Runs under MicroPython (called by bench_metering.py): the firmware's
# measurement code on synthetic waveforms with known truth.
import sys
import gc
import json
from boardsim.hal_sim import SimHal
from boardsim.sim_waveforms import AdcModel, MainsSource
from firmware.metering import Meter, Channel, lut_from_points, zeros
from firmware import dsp

quick = "--quick" in sys.argv
windows = 2 if quick else 6
APV = 117.6            # 2000 turns on 17 ohm: 120 % of 100 A peaks at 1.44 V on the burden
VPV = 300.0            # divider: 230 V rms peaks at 1.08 V at the pin
RATING = 100.0
LEVELS = [1, 2, 5, 10, 20, 50, 100, 120]
PFS = [(1.0, False), (0.5, False), (0.8, True)]
HARM = [(), ((3, 0.2), (5, 0.1)), ((3, 0.25), (5, 0.166))]
LEADS = [0.0, 1.5, 3.0]
worst = {"10_120": 0.0, "2_10": 0.0, "1": 0.0}
worst_case = {}
cases = 0
# the big buffers first, as the firmware does at boot, before the heap fragments
gc.collect()
before = gc.mem_alloc()
lut = zeros("H", 4096, 2)
hal = SimHal({"mcu": "sim"}, period_us=200)
cal = [Channel("ct%d" % n, APV, rating_a=RATING) for n in range(4)]
meter = Meter(hal, 36, [39, 34, 35, 32], cal, volts_per_volt=VPV, frames=1000, lut=lut)
gc.collect()
resident = gc.mem_alloc() - before
adc = AdcModel(nl=0.04, noise_lsb=1.0)
lut_from_points(adc.calibration_points(), out=lut)
gc.collect()
base = gc.mem_alloc()
peak = 0
alloc_per_1000 = None
for freq in (50.0, 60.0):
    for pf, lead in PFS:
        for h in HARM:
            for g in range(0, len(LEVELS), 4):
                lv = LEVELS[g:g + 4]
                chans = []
                for n, pct in enumerate(lv):
                    ct_lead = LEADS[(cases + n) % 3]
                    chans.append({"irms": RATING * pct / 100, "pf": pf, "lead": lead, "harmonics": h,
                                  "ct_lead_deg": ct_lead, "amps_per_volt": APV})
                    cal[n].phase_deg = ct_lead
                hal.source = MainsSource(adc, chans, freq=freq, volts_per_volt=VPV, bias_v=1.62)
                meter.mains_hz = int(freq)
                e = [0.0] * len(lv)
                t = 0
                for _ in range(windows):
                    period = meter.sample()
                    gc.collect()
                    gc.disable()
                    a0 = gc.mem_alloc()
                    rs = meter.compute(period)
                    a1 = gc.mem_alloc()
                    gc.enable()
                    peak = max(peak, a1)
                    for i, r in enumerate(rs):
                        e[i] += r.p_exact * meter.window_us
                    t += meter.window_us
                    if alloc_per_1000 is None:
                        # the sampling-loop kernels alone, one window, warm
                        dsp.clear(meter.acc)
                        gc.collect()
                        gc.disable()
                        k0 = gc.mem_alloc()
                        dsp.sum_sq(meter.buf, lut, meter.m, 0, 0, meter.frames, meter.vacc)
                        dsp.cross(meter.buf, lut, meter.m, 0, 1, 0, 1, meter.frames - 1, meter.acc)
                        k1 = gc.mem_alloc()
                        gc.enable()
                        alloc_per_1000 = (k1 - k0) * 1000 // (2 * meter.frames)
                for i, pct in enumerate(lv):
                    truth = hal.source.true_power(i) * t
                    err = abs(e[i] - truth) / abs(truth) * 100
                    band = "10_120" if pct >= 10 else ("2_10" if pct >= 2 else "1")
                    if err > worst[band]:
                        worst[band] = err
                        worst_case[band] = "%g Hz pf %g%s %d%% harm %d lead %g" % (
                            freq, pf, " leading" if lead else "", pct, len(h), chans[i]["ct_lead_deg"])
                    cases += 1
print("RESULT " + json.dumps({"worst": worst, "cases": cases, "alloc_per_1000": alloc_per_1000,
                              "peak": peak, "base": base, "resident": resident, "worst_case": worst_case, "windows": windows}))
