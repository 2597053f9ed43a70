# Measurement front ends behind one interface. A front end measures every
# channel of the board and adds the energy since the last call to the
# channel registers (firmware/energy.py):
#
#   fe.update(regs) -> list of energy.Result (vrms_dv, irms_ma, p_w, s_va,
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
from firmware.energy import Result


def open_frontend(hal, board, cal=None, frames=1000, lut=None):
    """The front end of a board definition, ready to measure: "adc" (the
    default) or "atm90e32" (chips on one SPI bus, frontend.spi, one chip
    select per entry of frontend.chips; they are reset and configured here,
    so a missing or miswired chip raises ATM90E32Error at start)."""
    fe = board.get("frontend") or {}
    kind = fe.get("type", "adc")
    if kind == "adc":
        return AdcFrontEnd(hal, board, cal=cal, frames=frames, lut=lut)
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
    """The ESP32's ADC through metering.Meter, measuring continuously: the
    board calls window() whenever its loop has nothing else to do, so
    windows follow each other back to back; each window's power stands for
    the time since the end of the one before (its own length plus the
    compute and loop time around it), so every millisecond of board time is
    booked once. update() closes the period when a reading is due."""
    # open_frontend() under the name board.py imports: any board's front end
    open_frontend = staticmethod(open_frontend)
    continuous = True

    def __init__(self, hal, board, cal=None, frames=1000, lut=None):
        """cal: per channel name {"gain": g, "phase_deg": d} from the
        commissioning config (absent: 1 and 0). lut: the per-chip
        linearisation table (metering.lut_from_points)."""
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


class AtmFrontEnd:
    """ATM90E32 chips on one SPI bus; channel i is (chip, phase) from the
    board. The chips' energy accumulators integrate continuously, so the
    board has nothing to measure between readings."""
    continuous = False

    def __init__(self, chips, board):
        self.chips = chips
        self.map = []
        for c in board["channels"]:
            self.map.append((c["chip"], "ABC".index(c["phase"])))
        self.results = [Result() for _ in self.map]
        self.last = [[0, 0] for _ in self.map]
        self.has_vref = True
        self.meas_permille = 1000       # the chips integrate all the time
        self.fault = 0

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

    def take_fraction(self):
        return 1000
