# ATM90E32 driver against the register-level simulated chip.
from firmware import atm90e32 as A
from firmware.atm90e32 import ATM90E32, ATM90E32Error, config_from_board
from boardsim.atm90e32_sim import SimATM90E32, SimBus
from util import ROOT, Skip, load_json

IGAIN = (39473, 25498, 12345)
UGAIN = 7305


class Pin:
    """Chip-select pin like hal.pin_out() returns; remembers the levels."""

    def __init__(self, v=1):
        self.v = v
        self.lows = 0

    def value(self, v=None):
        if v is None:
            return self.v
        v = 1 if v else 0
        if v == 0 and self.v == 1:
            self.lows += 1
        self.v = v


class Recorder:
    """SPI wrapper that records every frame sent."""

    def __init__(self, spi):
        self.spi = spi
        self.sent = []

    def write_readinto(self, w, r):
        self.sent.append(bytes(w))
        self.spi.write_readinto(w, r)


def _no_wait(ms):
    pass


def make(line_freq_hz=50, **kw):
    cs = Pin()
    chip = SimATM90E32(cs, **kw)
    drv = ATM90E32(chip, cs, line_freq_hz=line_freq_hz, ugain=UGAIN, igain=IGAIN, delay_ms=_no_wait)
    return chip, drv


def raises(fn, *args):
    try:
        fn(*args)
    except ATM90E32Error as e:
        assert isinstance(e, OSError)
        return str(e)
    raise AssertionError("expected ATM90E32Error")


def test_frames_are_msb_first_with_read_bit():
    chip, drv = make()
    rec = Recorder(chip)
    drv.spi = rec
    drv.read_reg(A.REG_URMS_A)
    drv.write_reg(A.REG_CFG_REG_ACC_EN, 0x55AA, check=False)
    drv.read_reg(0x2F3)                 # 10-bit address
    assert rec.sent == [b"\x80\xd9\x00\x00", b"\x00\x7f\x55\xaa", b"\x82\xf3\x00\x00"]
    assert drv.cs.lows == 3 and drv.cs.value() == 1


def test_begin_writes_calibration_and_locks():
    chip, drv = make()
    drv.begin()
    assert drv.started and chip.resets == 1
    for i in range(3):
        assert chip.peek(A.REG_UGAIN_A + 4 * i) == UGAIN
        assert chip.peek(A.REG_IGAIN_A + 4 * i) == IGAIN[i]
        assert drv.read_reg(A.REG_IGAIN_A + 4 * i) == IGAIN[i]
    assert chip.peek(A.REG_METER_EN) == 1
    assert chip.peek(A.REG_MMODE0) & 0x1000 == 0            # 50 Hz
    assert chip.peek(A.REG_MMODE0) & 0x7 == 0x7             # all three phases
    assert (chip.peek(A.REG_PL_CONST_H) << 16) | chip.peek(A.REG_PL_CONST_L) == 140625000
    assert chip.peek(A.REG_CFG_REG_ACC_EN) == A.CFG_LOCK
    st = drv.status()
    assert st["meter_en"] == 1 and st["cfg_locked"]
    # locked: the word reaches the chip (LastSPIData echoes it) but is dropped
    drv.write_reg(A.REG_IGAIN_A, 1111)
    assert chip.peek(A.REG_IGAIN_A) == IGAIN[0] and drv.read_reg(A.REG_IGAIN_A) == IGAIN[0]
    # the run-time path unlocks, writes, locks again
    drv.write_config(A.REG_IGAIN_A, 1111)
    assert chip.peek(A.REG_IGAIN_A) == 1111 and chip.peek(A.REG_CFG_REG_ACC_EN) == A.CFG_LOCK


def test_begin_sixty_hz_and_board_config():
    chip, drv = make(line_freq_hz=60)
    drv.begin()
    assert chip.peek(A.REG_MMODE0) & 0x1000
    board = load_json(ROOT + "/boards/circuitsetup-6ch/board.json")
    kw = config_from_board(board, 1)
    assert kw == {"line_freq_hz": 50, "pga_gain": 0, "ugain": 7305, "igain": (25498, 25498, 25498)}
    cs = Pin()
    chip = SimATM90E32(cs)
    ATM90E32(chip, cs, delay_ms=_no_wait, **kw).begin()
    assert chip.peek(A.REG_IGAIN_A + 8) == 25498


def test_begin_resets_a_configured_chip():
    chip, drv = make()
    drv.begin()
    chip.set_phase("A", 230.0, 5.0, 1.0)
    chip.advance(10)
    drv.begin()                          # again: clean reset, energy counted from here
    assert chip.resets == 2
    assert drv.energy_read() == ((0, 0), (0, 0), (0, 0))


def test_measure_import_and_export():
    chip, drv = make()
    drv.begin()
    chip.set_phase(0, 230.0, 5.0, 1.0, freq_hz=50.0)
    chip.set_phase(1, 231.5, 2.5, -0.8)
    chip.set_phase(2, 229.94, 0.0, 1.0)
    assert drv.measure(0) == (2300, 5000, 1150, 1000, 5000)
    assert drv.measure("B") == (2315, 2500, -463, -800, 5000)
    assert drv.measure("c") == (2299, 0, 0, 1000, 5000)
    chip.set_phase(0, 240.0, 12.345, 0.95, freq_hz=49.87)
    v, i, p, pf, f = drv.measure(0)
    assert (v, i, pf, f) == (2400, 12345, 950, 4987)
    assert p == 2815                     # 240 * 12.345 * 0.95 = 2814.66
    assert drv.read_power_raw(0) == 8795813     # raw unit 0.00032 W, rounded
    try:
        drv.measure(3)
    except ValueError:
        pass
    else:
        raise AssertionError("phase 3 accepted")


def test_energy_over_an_hour_clears_and_accumulates():
    chip, drv = make()
    drv.begin()
    chip.set_phase(0, 230.0, 5.0, 0.9)       # import 1035 W
    chip.set_phase(1, 231.5, 2.5, -0.8)      # export 463 W
    chip.set_phase(2, 230.0, 0.0, 1.0)
    assert drv.energy_read() == ((0, 0), (0, 0), (0, 0))
    for _ in range(60):                      # one hour, polled every minute
        chip.advance(60)
        drv.energy_read()
        for r in range(A.REG_AP_ENERGY_A, A.REG_AN_ENERGY_A + 3):
            assert chip.peek(r) == 0         # cleared by the read
    (ai, ae), (bi, be), (ci, ce) = drv.energy_totals()
    assert abs(ai - 1035000) <= 4 and ae == 0, (ai, ae)
    assert bi == 0 and abs(be - 463000) <= 4, (bi, be)
    assert ci == 0 and ce == 0
    # nothing new on the chip: the totals stay, they never go down
    assert drv.energy_read() == ((ai, ae), (bi, be), (ci, ce))
    chip.set_phase(0, 230.0, 5.0, -1.0)     # phase A turns to export
    chip.advance(36)                        # 11.5 Wh
    (ai2, ae2), _, _ = drv.energy_read()
    assert ai2 == ai and abs(ae2 - 11500) <= 4, (ai2, ae2)


def test_energy_unit_is_exact_count_multiple():
    chip, drv = make()
    drv.begin()
    chip.set_phase(0, 200.0, 1.0, 1.0)     # 200 W
    chip.advance(1.8)                      # 0.1 Wh = 32 counts
    assert chip.peek(A.REG_AP_ENERGY_A) == 32
    assert drv.energy_read()[0] == (100, 0)


def test_metering_stops_after_brownout():
    chip, drv = make()
    drv.begin()
    chip.set_phase(0, 230.0, 5.0, 1.0)
    chip.advance(60)
    chip.power_cycle()
    msg = raises(drv.energy_read)
    assert "begin()" in msg
    raises(drv.measure, 0)
    drv.begin()
    assert drv.measure(0)[2] == 1150


def test_unplugged_chip_is_a_clear_error():
    for idle in (0xFF, 0x00):
        chip, drv = make(unplugged=True, miso_idle=idle)
        msg = raises(drv.begin)
        assert "no answer" in msg and "unplugged" in msg, msg
        assert not drv.started
    # a chip that dies after begin(): energy is not credited with 0xffff counts
    chip, drv = make()
    drv.begin()
    chip.unplugged = True
    assert "no answer" in raises(drv.energy_read)
    assert drv.energy_totals() == ((0, 0), (0, 0), (0, 0))


def test_write_not_confirmed_is_an_error():
    chip, drv = make()
    drv.begin()
    chip.corrupt_next_write(0x0100)
    msg = raises(drv.write_reg, A.REG_CFG_REG_ACC_EN, A.CFG_UNLOCK)
    assert "not confirmed" in msg, msg
    # the same during set-up: begin() fails instead of metering with bad
    # values (frame 6 is the SagPeakDetCfg write)
    chip2, drv2 = make()
    drv2.spi = _CorruptNth(chip2, 6)
    msg = raises(drv2.begin)
    assert "not confirmed" in msg and "0x05" in msg, msg
    assert not drv2.started


class _CorruptNth:
    """Arms the chip's bit error on the n-th frame sent."""

    def __init__(self, chip, n):
        self.chip = chip
        self.n = n

    def write_readinto(self, w, r):
        self.n -= 1
        if self.n == 0:
            self.chip.corrupt_next_write(0x0040)
        self.chip.write_readinto(w, r)


def test_chip_select_high_is_ignored():
    cs = Pin(1)
    chip = SimATM90E32(cs)
    r = bytearray(4)
    chip.write_readinto(b"\x00\x7f\x55\xaa", r)       # CS high: nothing happens
    assert chip.peek(A.REG_CFG_REG_ACC_EN) == 0 and chip.frames == 0 and r == b"\xff\xff\xff\xff"
    cs.value(0)
    chip.write_readinto(b"\x00\x7f", r[:2])           # one frame in two pieces
    chip.write_readinto(b"\x55\xaa", r[:2])
    assert chip.peek(A.REG_CFG_REG_ACC_EN) == 0x55AA and chip.frames == 1
    chip.write_readinto(b"\x00\x7f", r[:2])           # half a frame, then CS goes high
    cs.value(1)
    chip.write_readinto(b"\x00\x00", r[:2])
    cs.value(0)
    chip.write_readinto(b"\x80\x7f\x00\x00", r)       # a fresh frame parses from the start
    assert r[2:] == b"\x55\xaa"


def test_two_chips_on_one_bus():
    cs0, cs1 = Pin(), Pin()
    c0, c1 = SimATM90E32(cs0), SimATM90E32(cs1)
    bus = SimBus([c0, c1])
    d0 = ATM90E32(bus, cs0, igain=(1, 2, 3), delay_ms=_no_wait)
    d1 = ATM90E32(bus, cs1, igain=(4, 5, 6), delay_ms=_no_wait)
    d0.begin()
    d1.begin()
    assert c0.peek(A.REG_IGAIN_A) == 1 and c1.peek(A.REG_IGAIN_A) == 4
    c0.set_phase(0, 230.0, 1.0)
    c1.set_phase(0, 230.0, 2.0)
    assert d0.measure(0)[1] == 1000 and d1.measure(0)[1] == 2000
    d1.cs = Pin(1)                       # d1's chip select never asserted: nobody answers
    assert d1.read_reg(A.REG_METER_EN) == 0xFFFF


def test_the_set_up_names_the_registers_as_the_driver_does():
    # atm90e32_setup.py repeats the registers and values it writes as private
    # constants (it may not import the driver, which imports it); on
    # MicroPython those are folded away, under CPython they can be compared
    import sys
    if sys.implementation.name != "cpython":
        raise Skip("private constants are folded away on MicroPython")
    from firmware import atm90e32, atm90e32_setup
    pairs = [(n, getattr(atm90e32_setup, "_" + n)) for n in dir(atm90e32)
             if (n.startswith("REG_") or n in ("SOFT_RESET_KEY", "CFG_UNLOCK", "CFG_LOCK", "PL_CONST"))
             and hasattr(atm90e32_setup, "_" + n)]
    assert len(pairs) >= 15, pairs
    for name, value in pairs:
        assert getattr(atm90e32, name) == value, name
    assert atm90e32_setup._METER_ON == atm90e32._METER_ON
