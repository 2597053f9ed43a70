# Simulated hardware for the MicroPython unix port (and CPython): an ADC fed
# by a waveform source, flash in a file that can be made to die mid-write,
# a clock the test controls, pins whose states tests can read.
import struct

from firmware.hal import Hal, Flash, TICKS_MASK

try:
    import os
except ImportError:  # pragma: no cover
    os = None


class FlashDied(OSError):
    """The simulated flash lost power in the middle of a write."""


class SimFlash(Flash):
    """A file of fixed size. `die_after` bytes into a later write, the write
    stops (what was written so far stays, like a real torn page program)."""

    def __init__(self, path, size):
        self.path = path
        self.size = size
        self.die_after = -1
        self.writes = 0
        try:
            have = os.stat(path)[6]
        except OSError:
            have = -1
        if have != size:
            # a new (or resized) region starts erased; written in pages so
            # a large region needs no large buffer
            if have > size or have < 0:
                have = 0
                open(path, "wb").close()
            with open(path, "ab") as f:
                page = b"\xff" * 4096
                left = size - have
                while left > 0:
                    f.write(page if left >= 4096 else page[:left])
                    left -= 4096

    def read(self, off, n):
        with open(self.path, "rb") as f:
            f.seek(off)
            return f.read(n)

    def readinto(self, off, buf):
        with open(self.path, "rb") as f:
            f.seek(off)
            if f.readinto(buf) != len(buf):
                raise OSError(5)        # past the end: a board's readblocks refuses too

    def write(self, off, data):
        if off < 0 or off + len(data) > self.size:
            raise ValueError("flash write out of range")
        self.writes += 1
        n = len(data)
        torn = 0 <= self.die_after < n
        if torn:
            n = self.die_after
        with open(self.path, "r+b") as f:
            f.seek(off)
            f.write(bytes(data[:n]) if n < len(data) else data)
        if torn:
            self.die_after = -1
            raise FlashDied("power lost during flash write")
        if self.die_after >= 0:
            self.die_after -= len(data)


class NorFlash(SimFlash):
    """SimFlash with NOR rules: a write can only clear bits (the new bytes
    are ANDed into what is there), erase() sets whole blocks back to 0xFF
    and counts the wear. `die_after` tears a write; `die_in_erase` stops an
    erase after that many bytes."""

    def __init__(self, path, size, block=4096):
        SimFlash.__init__(self, path, size)
        self.block = block
        self.erases = 0
        self.die_in_erase = -1

    def write(self, off, data):
        if off < 0 or off + len(data) > self.size:
            raise ValueError("flash write out of range")
        old = self.read(off, len(data))
        merged = bytearray(len(data))
        for i in range(len(data)):
            merged[i] = old[i] & data[i]
        SimFlash.write(self, off, merged)

    def erase(self, off, n):
        if off % self.block or n % self.block:
            raise ValueError("erase must cover whole blocks")
        self.erases += n // self.block
        cut = self.die_in_erase
        self.die_in_erase = -1
        page = b"\xff" * self.block
        with open(self.path, "r+b") as f:
            f.seek(off)
            if 0 <= cut < n:
                f.write(page[:cut] if cut <= self.block else page)
                raise FlashDied("power lost during erase")
            for _ in range(n // self.block):
                f.write(page)


class RamNorFlash(Flash):
    """NOR flash kept in memory, for measurements of the board's heap: a
    read costs what PartitionFlash.read costs on a board (a buffer and its
    bytes), not the file object a SimFlash opens for every read. Same NOR
    rules as NorFlash; nothing survives the process."""

    def __init__(self, path, size, block=4096):
        self.path = path
        self.size = size
        self.block = block
        self.erases = 0
        self.writes = 0
        self.mem = bytearray(size)
        self.mv = memoryview(self.mem)
        self.page = b"\xff" * block
        self._fill(0, size)

    def _fill(self, off, n):
        m = self.mv
        end = off + n
        while off < end:
            k = min(self.block, end - off)
            m[off:off + k] = self.page if k == self.block else self.page[:k]
            off += k

    def read(self, off, n):
        return bytes(self.mv[off:off + n])

    def readinto(self, off, buf):
        buf[:] = self.mv[off:off + len(buf)]

    def write(self, off, data):
        if off < 0 or off + len(data) > self.size:
            raise ValueError("flash write out of range")
        self.writes += 1
        m = self.mem
        for i in range(len(data)):
            m[off + i] &= data[i]

    def erase(self, off, n):
        if off % self.block or n % self.block:
            raise ValueError("erase must cover whole blocks")
        self.erases += n // self.block
        self._fill(off, n)


class SimUart:
    """One end of a simulated serial line. Bytes written here are read at
    `peer`; `connected = False` models an unplugged cable (writes vanish,
    nothing arrives). The virtual board replaces this with a pseudo-terminal."""

    def __init__(self, size=512):
        self.rx = bytearray()
        self.size = size
        self.peer = None
        self.connected = True
        self.written = 0

    def write(self, data):
        self.written += len(data)
        p = self.peer
        if self.connected and p is not None:
            room = p.size - len(p.rx)
            p.rx.extend(data[:room] if room < len(data) else data)
        return len(data)

    def any(self):
        return len(self.rx)

    def readinto(self, buf):
        n = min(len(buf), len(self.rx))
        if not n:
            return None
        buf[:n] = self.rx[:n]
        self.rx = self.rx[n:]
        return n


def uart_pair():
    a = SimUart()
    b = SimUart()
    a.peer = b
    b.peer = a
    return a, b


class Waveforms:
    """Default waveform source: every input at its bias, i.e. silence.
    Tests and the virtual board install their own with `SimHal.source`."""

    def fill(self, pins, buf, n, t0_us, period_us):
        mid = 2048
        for i in range(n * len(pins)):
            buf[i] = mid


class SimHal(Hal):
    name = "sim"
    flash_class = SimFlash      # NorFlash: the erase-before-write rules of a board's partitions

    def __init__(self, board, root="/tmp/peergrid-sim", period_us=250, ticks0=0):
        """ticks0: what ticks_ms() says at the start (tests start the clock
        just before a wrap). The clock has a board's period of 2^30 ms on
        every interpreter; now_us is the simulated time since the start."""
        self.board = board
        self.root = root
        self.source = Waveforms()
        self.period_us = period_us
        self.ticks0 = ticks0 & TICKS_MASK
        self.now_us = 0
        self.unix = 946684800       # 2000-01-01: what an unsynced board believes
        self.synced = False
        self.outputs = {}
        self.fed = 0
        self._flashes = {}
        try:
            os.mkdir(root)
        except OSError:
            pass

    # ADC: the source writes raw 12-bit codes; adc_uv is the per-chip calibration
    def adc_block(self, pins, buf, n):
        self.source.fill(pins, buf, n, self.now_us, self.period_us)
        self.now_us += n * self.period_us
        return self.period_us

    def adc_uv(self, code):
        # ideal 12-bit converter over 0-3.3 V after calibration
        return code * 3300000 // 4095

    def adc_calibration(self):
        """(code, microvolts) points of this ADC's transfer curve (the
        per-chip calibration a board reads with read_uv): the source's model
        if it has one, else the ideal converter."""
        adc = getattr(self.source, "adc", None)
        if adc is not None:
            return adc.calibration_points()
        return [(0, 0), (4095, 3300000)]     # the ideal converter of adc_uv()

    def spi(self, cfg):
        """The simulated SPI bus: tests attach devices (e.g. SimATM90E32) to
        `spi_devices` before the driver talks to them."""
        from boardsim.atm90e32_sim import SimBus
        if not hasattr(self, "spi_devices"):
            self.spi_devices = []
        return SimBus(self.spi_devices)

    def uart(self, cfg):
        """The board's end of a simulated serial line; the far end is in
        `uart_far[cfg["uart"]]` for tests to play the device."""
        a, b = uart_pair()
        if not hasattr(self, "uart_far"):
            self.uart_far = {}
        self.uart_far[cfg.get("uart", 1)] = b
        return a

    def pin_out(self, n, value=0):
        hal = self

        class Pin:
            def value(self, v=None):
                if v is None:
                    return hal.outputs.get(n, 0)
                hal.outputs[n] = 1 if v else 0

        p = Pin()
        p.value(value)
        return p

    def flash(self, name, size):
        f = self._flashes.get(name)
        if f is None:
            f = self.flash_class(self.root + "/" + name + ".bin", size)
            self._flashes[name] = f
        return f

    def advance(self, ms):
        self.now_us += ms * 1000

    def ticks_ms(self):
        return (self.ticks0 + self.now_us // 1000) & TICKS_MASK

    def ticks_us(self):
        # a board's ticks_us has the same 2^30 period (17.9 minutes)
        return (self.ticks0 * 1000 + self.now_us) & TICKS_MASK

    def time(self):
        return self.unix + self.now_us // 1000000, self.synced

    def set_time(self, unix):
        self.unix = unix - self.now_us // 1000000
        self.synced = True

    def wdt_feed(self):
        self.fed += 1
