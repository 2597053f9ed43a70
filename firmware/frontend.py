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
# open_frontend() builds the one board.json's frontend.type names and imports
# only the modules that one needs (firmware.metering and firmware.dsp for
# the ADC, firmware.atm90e32 for the chips): code and data share ~110 KB of
# heap on an ESP32.


def open_frontend(hal, board, cal=None, frames=1000):
    """The front end of a board definition, ready to measure: "adc" (the
    default) or "atm90e32" (chips on one SPI bus, frontend.spi, one chip
    select per entry of frontend.chips; they are reset and configured here,
    so a missing or miswired chip raises ATM90E32Error at start)."""
    fe = board.get("frontend") or {}
    kind = fe.get("type", "adc")
    if kind == "adc":
        return AdcFrontEnd(hal, board, cal=cal, frames=frames)
    if kind == "atm90e32":
        from firmware.atm90e32 import ATM90E32, config_from_board
        spi = hal.spi(fe["spi"])
        chips = []
        for i in range(len(fe["chips"])):
            cs = hal.pin_out(fe["chips"][i]["cs"], 1)
            chips.append(ATM90E32(spi, cs, delay_ms=hal.sleep_ms, **config_from_board(board, i)))
        atm = AtmFrontEnd(chips, board)
        atm.begin()
        return atm
    raise ValueError("board frontend.type %r: not adc or atm90e32" % (kind,))


class AdcFrontEnd:
    # open_frontend() under the name board.py imports: any board's front end
    open_frontend = staticmethod(open_frontend)

    def __init__(self, hal, board, cal=None, frames=1000, lut=None):
        """cal: per channel name {"gain": g, "phase_deg": d} from the
        commissioning config (absent: 1 and 0)."""
        from firmware.metering import Meter, Channel
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


class Result:
    """Measured values of one channel in protocol units (integers), whichever
    front end measured them (metering.py's ADC path or the ATM90E32)."""

    def __init__(self):
        self.vrms_dv = 0
        self.irms_ma = 0
        self.p_w = 0
        self.s_va = 0
        self.pf_permille = 0
        self.freq_chz = 0
        self.energy_mwh = 0         # signed: positive import, negative export
        self.p_exact = 0.0          # real power before rounding, W


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
