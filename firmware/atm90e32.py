# Driver for the ATM90E32AS poly-phase metering IC (Microchip, formerly Atmel)
# on SPI: the second measurement front end next to the ESP32's own ADC.
#
# Wire format (SPI mode 3, MSB first, one chip-select window per access):
#   2 bytes address word: bit 15 = 1 to read, 0 to write; bits 9..0 = register
#   2 bytes data word:    clocked out by the chip on a read, by us on a write
# The chip copies the data word of every access into LastSPIData (0x78), which
# is how a write is confirmed and how a dead bus (MISO stuck at 1 or at 0) is
# told from a live chip.
#
# Units the chip reports (as public drivers interpret the registers):
#   Urms 0.01 V, Irms 0.001 A, PFmean signed 0.001, Freq 0.01 Hz,
#   active power = signed 32-bit (Pmean << 16 | PmeanLSB) x 0.00032 W,
#   energy registers 16-bit, cleared when read, 0.01 CF per count.
# With the pulse constant written here (PLconst 140625000, meter constant
# 3200 pulses/kWh) one energy count is 1/100 of 1/3200 kWh = 1/320 Wh
# = 3.125 mWh exactly, i.e. 25/8 mWh. The driver keeps whole counts and
# converts the running total, so no rounding error builds up.
#
# A 16-bit energy register holds at most 65535 counts = 204.8 Wh, so
# energy_read() must run before a phase can move that much energy: every
# 30 s at 23 kW (100 A at 230 V) on one phase is safe.
#
# Everything the functions return is an integer in PeerGrid protocol units.
import time

from firmware.energy import Result

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

# --- register map (addresses are 10 bits) ---------------------------------
REG_METER_EN = const(0x00)
REG_PL_CONST_H = const(0x31)
REG_PL_CONST_L = const(0x32)
REG_MMODE0 = const(0x33)
REG_UGAIN_A = const(0x61)       # per phase: Ugain, Igain, Uoffset, Ioffset,
REG_IGAIN_A = const(0x62)       # then the same four for B at +4, C at +8
REG_SOFT_RESET = const(0x70)
_REG_EMM_STATE0 = const(0x71)
REG_EMM_STATE1 = const(0x72)
_REG_EMM_INT_STATE0 = const(0x73)
_REG_EMM_INT_STATE1 = const(0x74)
REG_LAST_SPI_DATA = const(0x78)
REG_CFG_REG_ACC_EN = const(0x7F)
REG_AP_ENERGY_A = const(0x81)   # forward (import) active energy, A/B/C at +0..2
REG_AN_ENERGY_A = const(0x85)   # reverse (export) active energy, A/B/C at +0..2
REG_PMEAN_A = const(0xB1)       # active power, high word, A/B/C at +0..2
REG_QMEAN_A = const(0xB5)
REG_SMEAN_A = const(0xB9)
REG_PFMEAN_A = const(0xBD)
REG_PMEAN_A_LSB = const(0xC1)   # active power, low word
REG_QMEAN_A_LSB = const(0xC5)
REG_SMEAN_A_LSB = const(0xC9)
REG_URMS_A = const(0xD9)
REG_IRMS_A = const(0xDD)
REG_FREQ = const(0xF8)

# --- magic values ---------------------------------------------------------
SOFT_RESET_KEY = const(0x789A)
CFG_UNLOCK = const(0x55AA)
CFG_LOCK = const(0x0000)
_METER_ON = const(0x0001)

PL_CONST = 140625000            # gives a meter constant of 3200 pulses/kWh
_METER_CONSTANT = const(3200)
# one energy count in mWh is _ENERGY_NUM / _ENERGY_DEN (= 3.125)
_ENERGY_NUM = const(25)
_ENERGY_DEN = const(8)
# active power: W = raw32 * 0.00032 = raw32 / 3125
_POWER_DIV = const(3125)


PHASES = "ABC"


class ATM90E32Error(OSError):
    """The chip did not answer, or did not take what was written."""


def _signed16(v):
    return v - 0x10000 if v & 0x8000 else v


def _rdiv(n, d):
    """n / d rounded half away from zero (d > 0)."""
    if n >= 0:
        return (n + d // 2) // d
    return -((-n + d // 2) // d)


def _phase(p):
    if isinstance(p, str):
        i = PHASES.find(p.upper())
    else:
        i = p
    if i < 0 or i > 2:
        raise ValueError("phase must be 0..2 or 'A'..'C', got %r" % (p,))
    return i


def _default_delay_ms(ms):
    sl = getattr(time, "sleep_ms", None)
    if sl is not None:
        sl(ms)
    else:
        time.sleep(ms / 1000)


def config_from_board(board, chip):
    """Constructor keyword arguments for chip `chip` of a board definition
    (board.json loaded as a dict): line frequency, PGA, voltage gain from
    `vref`, current gain per phase from the channels wired to this chip."""
    c = board["frontend"]["chips"][chip]
    ugain = board.get("vref", {}).get("ugain", 0)
    igain = [0, 0, 0]
    for ch in board.get("channels", []):
        if ch.get("chip") == chip:
            igain[_phase(ch["phase"])] = ch.get("igain", 0)
    return {"line_freq_hz": c.get("line_freq_hz", 50), "pga_gain": c.get("pga_gain", 0),
            "ugain": ugain, "igain": tuple(igain)}


class ATM90E32:
    """One chip. `spi` offers write_readinto(wbuf, rbuf) (mode 3, up to
    ~200 kHz); `cs_pin` offers value(v) and is driven low for each access.

    ugain: one value for all phases or (A, B, C); igain: (A, B, C);
    pga_gain: raw MMode1 value (0 = x1 on every current channel). The default
    gains are those of boards/circuitsetup-6ch (chip 0); use
    config_from_board() for the real ones."""

    def __init__(self, spi, cs_pin, line_freq_hz=50, pga_gain=0, ugain=7305, igain=(39473, 39473, 39473),
                 uoffset=0, ioffset=0, delay_ms=None):
        if line_freq_hz not in (50, 60):
            raise ValueError("line_freq_hz must be 50 or 60")
        self.spi = spi
        self.cs = cs_pin
        self.line_freq_hz = line_freq_hz
        self._delay_ms = delay_ms or _default_delay_ms
        self._w = bytearray(4)
        self._r = bytearray(4)
        self._imp = [0, 0, 0]       # energy counts since begin(), per phase
        self._exp = [0, 0, 0]
        self.started = False
        cs_pin.value(1)
        from firmware.atm90e32_setup import config_words     # the start only: boot.settle unloads it
        self.config = config_words(line_freq_hz, pga_gain, ugain, igain, uoffset, ioffset)

    # --- bus ----------------------------------------------------------------
    def _xfer(self):
        self.cs.value(0)
        try:
            self.spi.write_readinto(self._w, self._r)
        finally:
            self.cs.value(1)

    def read_reg(self, addr):
        """The 16-bit value of register `addr` (unsigned)."""
        w = self._w
        w[0] = 0x80 | ((addr >> 8) & 0x03)
        w[1] = addr & 0xFF
        w[2] = 0
        w[3] = 0
        self._xfer()
        r = self._r
        return (r[2] << 8) | r[3]

    def write_reg(self, addr, val, check=True):
        """Write a 16-bit value; with `check`, confirm through LastSPIData
        that the chip received exactly that word. Note that a locked
        configuration register still echoes the word but keeps its value."""
        w = self._w
        w[0] = (addr >> 8) & 0x03
        w[1] = addr & 0xFF
        w[2] = (val >> 8) & 0xFF
        w[3] = val & 0xFF
        self._xfer()
        if check:
            got = self.read_reg(REG_LAST_SPI_DATA)
            if got != val & 0xFFFF:
                raise ATM90E32Error("atm90e32: write 0x%04x to reg 0x%02x not confirmed (LastSPIData 0x%04x)"
                                    % (val & 0xFFFF, addr, got))

    def _dead(self, v):
        return v == 0xFFFF or v == 0x0000

    # --- set-up ---------------------------------------------------------------
    def begin(self):
        """Reset the chip, write configuration and calibration, lock, read
        it all back. Raises ATM90E32Error when the chip is not there or does
        not keep what was written."""
        from firmware.atm90e32_setup import begin
        why = begin(self)
        if why is not None:
            raise ATM90E32Error(why)

    def write_config(self, addr, val):
        """Change one configuration/calibration register at run time:
        unlock, write, lock, and read it back."""
        self.write_reg(REG_CFG_REG_ACC_EN, CFG_UNLOCK)
        try:
            self.write_reg(addr, val)
        finally:
            self.write_reg(REG_CFG_REG_ACC_EN, CFG_LOCK)
        got = self.read_reg(addr)
        if got != val & 0xFFFF:
            raise ATM90E32Error("atm90e32: config reg 0x%02x reads 0x%04x, wrote 0x%04x" % (addr, got, val))

    def _check_alive(self):
        # MeterEn is 1 after begin(); 0 means the chip reset itself (brown-out),
        # 0xFFFF or 0 also what a dead bus returns
        v = self.read_reg(REG_METER_EN)
        if v != _METER_ON:
            if v == 0xFFFF:
                raise ATM90E32Error("atm90e32: no answer on SPI (reads 0xffff): chip unplugged?")
            raise ATM90E32Error("atm90e32: metering off (MeterEn 0x%04x): chip reset (run begin()) or bus stuck "
                                "low" % v)

    # --- measurements ---------------------------------------------------------
    def read_power_raw(self, phase):
        """Active power of a phase as the signed 32-bit register pair."""
        i = _phase(phase)
        hi = self.read_reg(REG_PMEAN_A + i)
        lo = self.read_reg(REG_PMEAN_A_LSB + i)
        v = (hi << 16) | lo
        if hi & 0x8000:
            v -= 0x100000000
        return v

    def measure(self, phase):
        """(vrms_dv, irms_ma, p_w, pf_permille, freq_chz) of a phase (0..2 or
        'A'..'C'): volts in 0.1 V, amps in mA, active power in W (negative =
        export), power factor in 0.001 (signed like the power), line frequency
        in 0.01 Hz."""
        i = _phase(phase)
        u = self.read_reg(REG_URMS_A + i)
        ia = self.read_reg(REG_IRMS_A + i)
        p = self.read_power_raw(i)
        pf = self.read_reg(REG_PFMEAN_A + i)
        f = self.read_reg(REG_FREQ)
        self._check_alive()
        return ((u + 5) // 10, ia, _rdiv(p, _POWER_DIV), _signed16(pf), f)

    def energy_read(self):
        """Read (and so clear) the six active-energy registers, add them to
        the totals and return ((import_mwh, export_mwh) for A, B, C), the
        energy since begin() in mWh. Totals only ever grow."""
        imp = self._imp
        exp = self._exp
        a0 = self.read_reg(REG_AP_ENERGY_A)
        a1 = self.read_reg(REG_AP_ENERGY_A + 1)
        a2 = self.read_reg(REG_AP_ENERGY_A + 2)
        n0 = self.read_reg(REG_AN_ENERGY_A)
        n1 = self.read_reg(REG_AN_ENERGY_A + 1)
        n2 = self.read_reg(REG_AN_ENERGY_A + 2)
        # a pulled-up dead bus would read 0xffff = 204.8 Wh per register:
        # only count what a live, configured chip returned
        self._check_alive()
        imp[0] += a0
        imp[1] += a1
        imp[2] += a2
        exp[0] += n0
        exp[1] += n1
        exp[2] += n2
        return self.energy_totals()

    def energy_totals(self):
        """The totals of the last energy_read(), without touching the chip."""
        imp = self._imp
        exp = self._exp
        return ((imp[0] * _ENERGY_NUM // _ENERGY_DEN, exp[0] * _ENERGY_NUM // _ENERGY_DEN),
                (imp[1] * _ENERGY_NUM // _ENERGY_DEN, exp[1] * _ENERGY_NUM // _ENERGY_DEN),
                (imp[2] * _ENERGY_NUM // _ENERGY_DEN, exp[2] * _ENERGY_NUM // _ENERGY_DEN))

    def status(self):
        """Chip state as a dict of raw register values: meter_en, emm0/emm1
        (live event state), int0/int1 (latched events), cfg_locked."""
        return {
            "meter_en": self.read_reg(REG_METER_EN),
            "emm0": self.read_reg(_REG_EMM_STATE0),
            "emm1": self.read_reg(REG_EMM_STATE1),
            "int0": self.read_reg(_REG_EMM_INT_STATE0),
            "int1": self.read_reg(_REG_EMM_INT_STATE1),
            "cfg_locked": self.read_reg(REG_CFG_REG_ACC_EN) != CFG_UNLOCK,
        }


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
