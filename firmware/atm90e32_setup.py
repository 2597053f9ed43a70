# Setting ATM90E32 chips up (firmware/atm90e32.py): the configuration words
# a chip gets, and begin(), which resets a chip, writes them and reads them
# back. This runs when the board starts; boot.settle unloads this module
# with the other start-up code, so its code and its messages leave the
# board's heap. ATM90E32.begin() imports it again should a chip be set up
# anew. It imports nothing of the driver (which imports it): the registers
# it writes are named here again, as private constants that cost no heap.
from array import array

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

# registers and values (the whole register map: firmware/atm90e32.py)
_REG_METER_EN = const(0x00)
_REG_SAG_PEAK_DET_CFG = const(0x05)
_REG_ZX_CONFIG = const(0x07)
_REG_FREQ_LO_TH = const(0x0C)
_REG_FREQ_HI_TH = const(0x0D)
_REG_MMODE1 = const(0x34)
_REG_P_START_TH = const(0x35)
_REG_Q_START_TH = const(0x36)
_REG_S_START_TH = const(0x37)
_REG_P_PHASE_TH = const(0x38)
_REG_Q_PHASE_TH = const(0x39)
_REG_S_PHASE_TH = const(0x3A)
_REG_UOFFSET_A = const(0x63)
_REG_IOFFSET_A = const(0x64)
_REG_PL_CONST_H = const(0x31)
_REG_PL_CONST_L = const(0x32)
_REG_MMODE0 = const(0x33)
_REG_UGAIN_A = const(0x61)
_REG_IGAIN_A = const(0x62)
_REG_SOFT_RESET = const(0x70)
_REG_LAST_SPI_DATA = const(0x78)
_REG_CFG_REG_ACC_EN = const(0x7F)
_REG_AP_ENERGY_A = const(0x81)
_REG_AN_ENERGY_A = const(0x85)
_SOFT_RESET_KEY = const(0x789A)
_CFG_UNLOCK = const(0x55AA)
_CFG_LOCK = const(0x0000)
_METER_ON = const(0x0001)
_PL_CONST = const(140625000)     # a meter constant of 3200 pulses/kWh
# MMode0: bits 0..2 let phases C, B, A count into the sums; bit 7 is set the
# way the public drivers for 3-phase-4-wire boards set it; bit 12 selects a
# 60 Hz line (clear = 50 Hz).
_MMODE0_3P4W = const(0x0087)
_MMODE0_60HZ = const(0x1000)
# SagPeakDetCfg: peak detector window 20 ms (high byte), sag window 63 ms
_SAG_PEAK_CFG = const(0x143F)
# ZXConfig: zero-crossing pins follow the current channels, both edges
_ZX_CFG = const(0xD654)
# start-up (no-load) power thresholds, values as used on CT boards by the
# public drivers; they keep noise from creeping into the energy registers
_START_TH = const(0x1D4C)
_PHASE_TH = const(0x02EE)


def _triple(v):
    if isinstance(v, int):
        return (v, v, v)
    if len(v) != 3:
        raise ValueError("need one value or three (A, B, C)")
    return tuple(v)


def config_words(line_freq_hz, pga_gain, ugain, igain, uoffset, ioffset):
    """What begin() writes while the configuration is unlocked, in order,
    and reads back once it is locked again: (register, value) pairs, kept
    flat in 16-bit words (a tuple a pair would hold about 450 bytes more of
    a board's heap, per chip)."""
    ug = _triple(ugain)
    ig = _triple(igain)
    uo = _triple(uoffset)
    io = _triple(ioffset)
    mm0 = _MMODE0_3P4W | (_MMODE0_60HZ if line_freq_hz == 60 else 0)
    f = line_freq_hz * 100
    cfg = [
        (_REG_METER_EN, _METER_ON),
        (_REG_SAG_PEAK_DET_CFG, _SAG_PEAK_CFG),
        (_REG_ZX_CONFIG, _ZX_CFG),
        (_REG_FREQ_HI_TH, f + 200),      # flag the line outside +-2 Hz
        (_REG_FREQ_LO_TH, f - 200),
        (_REG_PL_CONST_H, _PL_CONST >> 16),
        (_REG_PL_CONST_L, _PL_CONST & 0xFFFF),
        (_REG_MMODE0, mm0),
        (_REG_MMODE1, pga_gain & 0xFFFF),
        (_REG_P_START_TH, _START_TH),
        (_REG_Q_START_TH, _START_TH),
        (_REG_S_START_TH, _START_TH),
        (_REG_P_PHASE_TH, _PHASE_TH),
        (_REG_Q_PHASE_TH, _PHASE_TH),
        (_REG_S_PHASE_TH, _PHASE_TH),
    ]
    for i in range(3):
        base = 4 * i
        cfg.append((_REG_UGAIN_A + base, ug[i] & 0xFFFF))
        cfg.append((_REG_IGAIN_A + base, ig[i] & 0xFFFF))
        cfg.append((_REG_UOFFSET_A + base, uo[i] & 0xFFFF))
        cfg.append((_REG_IOFFSET_A + base, io[i] & 0xFFFF))
    flat = array("H", bytes(4 * len(cfg)))
    for i in range(len(cfg)):
        flat[2 * i] = cfg[i][0]
        flat[2 * i + 1] = cfg[i][1]
    return flat


def begin(self):
    """ATM90E32.begin() (`self` is the chip): None once the chip is set up,
    else why not (the driver raises ATM90E32Error with it)."""
    self.started = False
    self.write_reg(_REG_SOFT_RESET, _SOFT_RESET_KEY, check=False)
    self._delay_ms(6)                       # the reset takes ~5 ms
    self.write_reg(_REG_CFG_REG_ACC_EN, _CFG_UNLOCK, check=False)
    echo = self.read_reg(_REG_LAST_SPI_DATA)
    if echo != _CFG_UNLOCK:
        if self._dead(echo):
            return ("atm90e32: no answer on SPI (reads 0x%04x): chip unplugged, unpowered or "
                    "wrong chip select?" % echo)
        return ("atm90e32: garbled SPI (LastSPIData 0x%04x, expected 0x%04x): check SPI mode 3 "
                "and clock rate" % (echo, _CFG_UNLOCK))
    c = self.config
    for k in range(0, len(c), 2):
        self.write_reg(c[k], c[k + 1])
    self.write_reg(_REG_CFG_REG_ACC_EN, _CFG_LOCK)
    for k in range(0, len(c), 2):
        addr = c[k]
        val = c[k + 1]
        got = self.read_reg(addr)
        if got != val:
            return ("atm90e32: config reg 0x%02x reads 0x%04x after locking, wrote 0x%04x"
                    % (addr, got, val))
    for i in range(3):
        self._imp[i] = 0
        self._exp[i] = 0
    # the energy registers are zero after the reset; read them anyway so
    # whatever accumulated during set-up is not counted
    for i in range(3):
        self.read_reg(_REG_AP_ENERGY_A + i)
        self.read_reg(_REG_AN_ENERGY_A + i)
    self.started = True
    return None
