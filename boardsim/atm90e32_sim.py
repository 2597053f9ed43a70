# A simulated ATM90E32 at register level, for tests and the virtual board.
# It sits where the SPI bus is: write_readinto(wbuf, rbuf) clocks bytes in
# and out exactly as the chip would, decoding 16-bit address and data words.
# The electrical world is a scenario the test sets per phase (set_phase) and
# time the test moves on (advance); the chip turns that into the same
# registers, units and clear-on-read energy counts the driver reads from a
# real chip. The register map is the one of firmware/atm90e32.py.
#
# Modelled: soft reset (0x789A to SoftReset), configuration lock (writes to
# registers below 0x70 are dropped unless CfgRegAccEn holds 0x55AA), the
# LastSPIData echo, metering only while MeterEn = 1, 16-bit energy registers
# that clear when read and wrap past 0xffff, chip select (nothing happens
# while CS is high), an unplugged chip (MISO pulled up or down) and bit errors
# on a write. Not modelled: gain/offset calibration changing the readings
# (readings are the scenario values), reactive/apparent energy, interrupts.
import math

from firmware import atm90e32 as A

_DEFAULTS = {
    A.REG_PL_CONST_H: A.PL_CONST >> 16,     # the reset value is the 3200 imp/kWh constant
    A.REG_PL_CONST_L: A.PL_CONST & 0xFFFF,
}
# energy counts per (W * ms): W*ms/3600000 Wh * 320 counts/Wh
_E_DEN = 11250                              # 3600000 / 320


def _rdiv(n, d):
    if n >= 0:
        return (n + d // 2) // d
    return -((-n + d // 2) // d)


class SimATM90E32:
    """One simulated chip. `cs`: pin-like object (value() -> 0/1) or None for
    always selected. `unplugged`: no chip on the bus; every bit read is
    `miso_idle` (0xff: pulled up, 0x00: stuck low) and writes go nowhere."""

    def __init__(self, cs=None, unplugged=False, miso_idle=0xFF):
        self.cs = cs
        self.unplugged = unplugged
        self.miso_idle = miso_idle
        # scenario: per phase centivolts, milliamps, PF permille; line in 0.01 Hz
        self.cv = [0, 0, 0]
        self.ma = [0, 0, 0]
        self.pf = [0, 0, 0]
        self.freq_chz = 5000
        self.frames = 0
        self.resets = 0
        self.overflows = 0
        self._corrupt = 0
        self._pos = 0
        self._hi = self._dhi = self._addr = self._val = 0
        self._read = False
        self._reset_state()

    # --- scenario ---------------------------------------------------------------
    def set_phase(self, phase, vrms_v, irms_a, pf=1.0, freq_hz=None):
        """What the phase carries: RMS volts, RMS amps, power factor
        (-1..1, negative = power flowing back to the grid)."""
        i = A._phase(phase)
        if not -1.0 <= pf <= 1.0:
            raise ValueError("pf out of -1..1")
        self.cv[i] = int(round(vrms_v * 100))
        self.ma[i] = int(round(irms_a * 1000))
        self.pf[i] = int(round(pf * 1000))
        if freq_hz is not None:
            self.freq_chz = int(round(freq_hz * 100))

    def p_raw(self, i):
        """Active power in the chip's 32-bit unit (0.00032 W)."""
        # W = cv/100 * ma/1000 * pf/1000; raw = W * 3125
        return _rdiv(self.cv[i] * self.ma[i] * self.pf[i], 32000)

    def advance(self, seconds):
        """Let time pass: each phase moves V*I*PF*t into its forward or
        reverse energy register."""
        ms = int(round(seconds * 1000))
        if ms <= 0 or not self._metering():
            return
        for i in range(3):
            # power in units of 1e-8 W, energy numerator in 1e-8 W * ms
            p = self.cv[i] * self.ma[i] * self.pf[i]
            if p >= 0:
                self._acc_imp[i] += p * ms
                n = self._acc_imp[i] // (_E_DEN * 100000000)
                self._acc_imp[i] -= n * _E_DEN * 100000000
                self._add_energy(A.REG_AP_ENERGY_A + i, n)
            else:
                self._acc_exp[i] += -p * ms
                n = self._acc_exp[i] // (_E_DEN * 100000000)
                self._acc_exp[i] -= n * _E_DEN * 100000000
                self._add_energy(A.REG_AN_ENERGY_A + i, n)

    def _add_energy(self, reg, n):
        v = self.regs.get(reg, 0) + n
        if v > 0xFFFF:
            self.overflows += 1
            v &= 0xFFFF
        self.regs[reg] = v

    def power_cycle(self):
        """A brown-out: the chip comes back with reset values."""
        self.resets += 1
        self._reset_state()

    # --- registers ----------------------------------------------------------------
    def _reset_state(self):
        self.regs = dict(_DEFAULTS)
        self.last = 0
        self._acc_imp = [0, 0, 0]
        self._acc_exp = [0, 0, 0]

    def _metering(self):
        return self.regs.get(A.REG_METER_EN, 0) == 1

    def peek(self, addr):
        """A register as the chip holds it, without the side effects of a read."""
        return self._value(addr, False)

    def _value(self, addr, clear):
        if addr == A.REG_LAST_SPI_DATA:
            return self.last
        if 0x80 <= addr <= 0x87:
            v = self.regs.get(addr, 0)
            if clear:
                self.regs[addr] = 0
            return v
        m = self._metering()
        for i in range(3):
            if addr == A.REG_URMS_A + i:
                return self.cv[i] & 0xFFFF if m else 0
            if addr == A.REG_IRMS_A + i:
                return self.ma[i] & 0xFFFF if m else 0
            if addr == A.REG_PFMEAN_A + i:
                return self.pf[i] & 0xFFFF if m else 0
            if addr == A.REG_PMEAN_A + i or addr == A.REG_PMEAN_A_LSB + i:
                return self._word(self.p_raw(i) if m else 0, addr == A.REG_PMEAN_A + i)
            if addr == A.REG_SMEAN_A + i or addr == A.REG_SMEAN_A_LSB + i:
                s = _rdiv(self.cv[i] * self.ma[i] * 1000, 32000) if m else 0
                return self._word(s, addr == A.REG_SMEAN_A + i)
            if addr == A.REG_QMEAN_A + i or addr == A.REG_QMEAN_A_LSB + i:
                q = 0
                if m:
                    q = int(round(self.cv[i] * self.ma[i] * math.sqrt(1000000 - self.pf[i] ** 2) / 32000))
                return self._word(q, addr == A.REG_QMEAN_A + i)
        if addr == A.REG_FREQ:
            return self.freq_chz if m else 0
        if addr == A.REG_EMM_STATE1:
            # bits 2, 1, 0: active energy of phase A, B, C flows forward
            v = 0
            for i in range(3):
                if self.pf[i] >= 0:
                    v |= 1 << (2 - i)
            return v
        return self.regs.get(addr, 0)

    @staticmethod
    def _word(v32, high):
        v32 &= 0xFFFFFFFF
        return v32 >> 16 if high else v32 & 0xFFFF

    def _write(self, addr, val):
        if addr == A.REG_SOFT_RESET:
            if val == A.SOFT_RESET_KEY:
                self.resets += 1
                self._reset_state()
            return
        if addr == A.REG_CFG_REG_ACC_EN:
            self.regs[addr] = val
            return
        if addr < 0x70:
            if self.regs.get(A.REG_CFG_REG_ACC_EN, 0) == A.CFG_UNLOCK:
                self.regs[addr] = val
            return
        # status and measurement registers are read-only here

    def corrupt_next_write(self, mask):
        """The next write frame arrives with its data word XORed by `mask`
        (a bit error on MOSI): the chip stores and echoes the wrong word."""
        self._corrupt = mask

    # --- SPI ------------------------------------------------------------------------
    def selected(self):
        return self.cs is None or not self.cs.value()

    def write_readinto(self, wbuf, rbuf):
        for k in range(len(rbuf)):
            rbuf[k] = self.miso_idle if self.unplugged else 0xFF
        self.clock(wbuf, rbuf)

    def clock(self, wbuf, rbuf):
        """Clock bytes through the chip; drives rbuf only while selected.
        A frame may span several calls inside one chip-select window."""
        if not self.selected():
            self._pos = 0               # CS high ends any partial frame
            return
        if self.unplugged:
            return
        for k in range(len(wbuf)):
            b = wbuf[k]
            pos = self._pos
            out = 0
            if pos == 0:
                self._hi = b
            elif pos == 1:
                self._addr = ((self._hi & 0x03) << 8) | b
                self._read = bool(self._hi & 0x80)
                if self._read:
                    self._val = self._value(self._addr, True)
            elif pos == 2:
                if self._read:
                    out = self._val >> 8
                else:
                    self._dhi = b
            else:
                if self._read:
                    out = self._val & 0xFF
                    self.last = self._val
                else:
                    val = ((self._dhi << 8) | b) ^ self._corrupt
                    self._corrupt = 0
                    self._write(self._addr, val)
                    self.last = val
                self.frames += 1
            rbuf[k] = out
            self._pos = (pos + 1) & 3


class SimBus:
    """Several simulated chips on one SPI bus, each with its own chip select.
    Unselected chips leave MISO alone, so it reads 0xff."""

    def __init__(self, chips):
        self.chips = chips

    def write_readinto(self, wbuf, rbuf):
        for k in range(len(rbuf)):
            rbuf[k] = 0xFF
        for c in self.chips:
            c.clock(wbuf, rbuf)
