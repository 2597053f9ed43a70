# Measurement front ends behind one interface. A front end measures every
# channel of the board and adds the energy since the last call to the
# channel registers (firmware/energy.py):
#
#   fe.update(regs) -> list of metering.Result (vrms_dv, irms_ma, p_w, s_va,
#                      pf_permille, freq_chz), one per channel, in board order
#   fe.has_vref      False: powers are apparent at the nominal voltage (the
#                    reading carries F_NO_VREF)
#
# AdcFrontEnd samples the ESP32 ADC (or the simulated one) through Meter;
# AtmFrontEnd reads ATM90E32 metering ICs, which integrate energy themselves.
from firmware.metering import Meter, Channel, Result


class AdcFrontEnd:
    def __init__(self, hal, board, cal=None, frames=1000, lut=None):
        """cal: per channel name {"gain": g, "phase_deg": d} from the
        commissioning config (absent: 1 and 0)."""
        cal = cal or {}
        chans = []
        pins = []
        for c in board["channels"]:
            apv = c["ct_turns"] / c["burden_ohm"]
            k = cal.get(c["name"], {})
            chans.append(Channel(c["name"], apv, k.get("gain", 1.0), k.get("phase_deg", 0.0), c["rating_a"]))
            pins.append(c["pin"])
        vref = board.get("vref") or {}
        vpin = vref.get("pin")
        vpv = vref.get("transformer_ratio", 1.0) * vref.get("divider_ratio", 1.0) if vpin is not None else None
        self.meter = Meter(hal, vpin, pins, chans, volts_per_volt=vpv, nominal_v=vref.get("nominal_v", 230),
                           frames=frames, lut=lut)
        self.has_vref = vpin is not None

    def update(self, regs, dt_ms=None):
        """Measure one window. The energy added is the window's power times
        dt_ms, the time since the previous update (the board measures one
        window per period); without dt_ms, the window's own length."""
        rs = self.meter.measure()
        w_ms = self.meter.window_us if dt_ms is None else dt_ms * 1000
        for i in range(len(rs)):
            # the energy in W*ms, rounded to the nearest
            e = rs[i].p_exact * w_ms / 1000
            regs.add_wms(i, int(e + 0.5) if e >= 0 else -int(-e + 0.5))
        return rs


class AtmFrontEnd:
    """ATM90E32 chips on one SPI bus; channel i is (chip, phase) from the board."""

    def __init__(self, chips, board):
        self.chips = chips
        self.map = []
        for c in board["channels"]:
            self.map.append((c["chip"], "ABC".index(c["phase"])))
        self.results = [Result() for _ in self.map]
        self.last = [[0, 0] for _ in self.map]
        self.has_vref = True

    def begin(self):
        for chip in self.chips:
            chip.begin()

    def update(self, regs, dt_ms=None):
        # the chips integrate energy themselves; dt_ms is not needed
        totals = [chip.energy_read() for chip in self.chips]
        for i in range(len(self.map)):
            ci, ph = self.map[i]
            v, a, p, pf, f = self.chips[ci].measure(ph)
            r = self.results[i]
            r.vrms_dv = v
            r.irms_ma = a
            r.p_w = p
            r.p_exact = p
            r.pf_permille = pf
            r.freq_chz = f
            r.s_va = v * a // 10000
            imp, exp = totals[ci][ph]
            last = self.last[i]
            regs.add_mwh(i, imp - last[0])
            regs.add_mwh(i, -(exp - last[1]))
            last[0] = imp
            last[1] = exp
        return self.results
