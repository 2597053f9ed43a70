# ESP32 backend of the hardware layer (MicroPython `machine`). Only this file
# touches `machine`; it cannot run on the unix port and is compiled by
# mpy-cross in every test run.
import time

from firmware.hal import Hal, Flash

try:
    import machine
except ImportError:  # unix port or CPython: importable, unusable
    machine = None

_ATTEN = {0: 0, 2: 1, 6: 2, 11: 3}


_EPOCH_2000 = 946684800     # 2000-01-01T00:00:00Z in Unix seconds


def _tick_cost():
    """Microseconds between the timer reads of two back-to-back ticks_us()
    calls, the least of a few tries (an interrupt can stretch one)."""
    tick = time.ticks_us
    best = None
    for _ in range(8):
        a = tick()
        d = time.ticks_diff(tick(), a)
        if best is None or d < best:
            best = d
    return best


class PartitionFlash(Flash):
    """A data partition used as raw flash (esp32.Partition)."""

    def __init__(self, label, size):
        import esp32
        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label=label)
        if not found:
            raise OSError("no data partition '%s'" % label)
        self.part = found[0]
        self.block = self.part.ioctl(5, 0)          # block size
        self.size = min(size, self.part.ioctl(4, 0) * self.block)

    def read(self, off, n):
        out = bytearray(n)
        self.part.readblocks(off // self.block, out, off % self.block)
        return bytes(out)

    def readinto(self, off, buf):
        self.part.readblocks(off // self.block, buf, off % self.block)

    def write(self, off, data):
        # ext readblocks/writeblocks with offset: program without erase;
        # callers only write to erased (0xFF) bytes or erase whole blocks
        self.part.writeblocks(off // self.block, data, off % self.block)

    def erase(self, off, n):
        """Erase the blocks covering [off, off+n); off and n block-aligned."""
        if off % self.block or n % self.block:
            raise ValueError("erase must cover whole %d-byte blocks" % self.block)
        for b in range(off // self.block, (off + n) // self.block):
            self.part.ioctl(6, b)       # MP_BLOCKDEV_IOCTL_BLOCK_ERASE


class Esp32Hal(Hal):
    name = "esp32"

    def __init__(self, board, wdt_ms=30000):
        if machine is None:
            raise OSError("machine module missing: not on a board")
        fe = board.get("frontend", {})
        atten = _ATTEN[fe.get("attenuation_db", 11)]
        self._adc = {}
        pins = [c["pin"] for c in board.get("channels", []) if "pin" in c]
        vref = board.get("vref", {})
        self.vref_pin = vref.get("pin")     # the ADC's calibration input (the board's dict is not kept)
        if "pin" in vref:
            pins.append(vref["pin"])
        for p in pins:
            a = machine.ADC(machine.Pin(p), atten=atten)
            self._adc[p] = a
        # fed on progress by the application (a reading built, a command
        # handled), so the timeout must exceed the reading period
        # (0: no watchdog, while the board waits for its commissioning config)
        self._wdt = machine.WDT(timeout=wdt_ms) if wdt_ms else None
        self._pins = None
        self._reads = None
        self._tick_cost = _tick_cost()
        # time.time() counts from the port's epoch: 2000-01-01 on the ESP32
        # port, 1970-01-01 elsewhere. Asked once, never guessed from the value.
        self._epoch = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0
        self._synced = False

    def adc_block(self, pins, buf, n):
        """Returns the frame period in microseconds as a float: the block's
        length over n, not rounded. A frame of 4-5 inputs lasts ~50-60 us
        and one read ~12 us, so a whole-us period (or a per-read period
        rounded down) would be off by percent, i.e. by ~1 Hz at 50 Hz.
        The cost of one ticks_us() call, measured at start-up, is taken off:
        it lies between the two timestamps but not between samples."""
        reads = self._reads
        if pins is not self._pins:
            # the bound read methods, once per pin list (Meter passes the
            # same list every window): the loop below allocates nothing
            reads = [self._adc[p].read_u16 for p in pins]
            self._reads = reads
            self._pins = pins
        m = len(reads)
        if not n or not m:
            return 0
        tick = time.ticks_us
        t0 = tick()
        i = 0
        for _ in range(n):
            for j in range(m):
                buf[i] = reads[j]() >> 4
                i += 1
        dt = time.ticks_diff(tick(), t0) - self._tick_cost
        return dt / n

    def adc_calibration(self, n=800):
        """(code, microvolts) points of this chip's ADC from its eFuse
        calibration: read_uv() (calibrated) against read_u16() (raw) on the
        voltage reference while the mains wave sweeps it; averaged per bin
        (metering.points_from_pairs). Each raw read sits between two
        calibrated ones, so the wave's movement between reads cancels."""
        from firmware.metering import points_from_pairs
        pin = self.vref_pin
        if pin is None:
            return None
        a = self._adc[pin]
        pairs = []
        for _ in range(n):
            u1 = a.read_uv()
            c = a.read_u16() >> 4
            u2 = a.read_uv()
            pairs.append((c, (u1 + u2) // 2))
        return points_from_pairs(pairs)

    def pin_out(self, n, value=0):
        return machine.Pin(n, machine.Pin.OUT, value=value)

    def spi(self, cfg):
        return machine.SPI(cfg["bus"], baudrate=cfg.get("baud", 200000), sck=machine.Pin(cfg["sck"]),
                           mosi=machine.Pin(cfg["mosi"]), miso=machine.Pin(cfg["miso"]), polarity=1, phase=1)

    def uart(self, cfg):
        return machine.UART(cfg["uart"], baudrate=cfg.get("baud", 9600), tx=cfg["tx"], rx=cfg["rx"],
                            timeout=0)

    def flash(self, name, size):
        return PartitionFlash(name, size)

    def ticks_ms(self):
        return time.ticks_ms()

    def ticks_us(self):
        return time.ticks_us()

    def ticks_add(self, t, delta):
        return time.ticks_add(t, delta)

    def ticks_diff(self, a, b):
        return time.ticks_diff(a, b)

    def io_add(self, t, delta):
        return time.ticks_add(t, delta)

    def sleep_ms(self, ms):
        time.sleep_ms(ms)

    def set_time(self, unix):
        """The clock is right from now on (NTP answered). ntptime.settime()
        has normally set the RTC already; a time more than a second away
        from the RTC's is written to it."""
        now = time.time() + self._epoch
        if unix - now > 1 or now - unix > 1:
            tm = time.gmtime(unix - self._epoch)
            machine.RTC().datetime((tm[0], tm[1], tm[2], tm[6] + 1, tm[3], tm[4], tm[5], 0))
        self._synced = True

    def time(self):
        """(unix seconds, synced): synced once set_time() was called, which
        the network does after NTP answered; until then the RTC counts from
        whatever it held at boot (2000-01-01 after power-up)."""
        return time.time() + self._epoch, self._synced

    def wdt_feed(self):
        if self._wdt is not None:
            self._wdt.feed()

    def reset_cause(self):
        return machine.reset_cause()
