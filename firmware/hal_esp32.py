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
        self._buf = bytearray(self.block)

    def read(self, off, n):
        out = bytearray(n)
        self.part.readblocks(off // self.block, out, off % self.block)
        return bytes(out)

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
        self.board = board
        fe = board.get("frontend", {})
        atten = _ATTEN[fe.get("attenuation_db", 11)]
        self._adc = {}
        pins = [c["pin"] for c in board.get("channels", []) if "pin" in c]
        vref = board.get("vref", {})
        if "pin" in vref:
            pins.append(vref["pin"])
        for p in pins:
            a = machine.ADC(machine.Pin(p), atten=atten)
            self._adc[p] = a
        # fed on progress by the application (a reading built, a command
        # handled), so the timeout must exceed the reading period
        # (0: no watchdog, while the board waits for its commissioning config)
        self._wdt = machine.WDT(timeout=wdt_ms) if wdt_ms else None

    def adc_block(self, pins, buf, n):
        adcs = [self._adc[p] for p in pins]
        m = len(adcs)
        t0 = time.ticks_us()
        i = 0
        for _ in range(n):
            for j in range(m):
                buf[i] = adcs[j].read_u16() >> 4
                i += 1
        dt = time.ticks_diff(time.ticks_us(), t0)
        return dt // (n * m) * m if n else 0

    def adc_calibration(self, n=800):
        """(code, microvolts) points of this chip's ADC from its eFuse
        calibration: read_uv() (calibrated) against read_u16() (raw) on the
        voltage reference while the mains wave sweeps it; averaged per bin
        (metering.points_from_pairs). Each raw read sits between two
        calibrated ones, so the wave's movement between reads cancels."""
        from firmware.metering import points_from_pairs
        pin = self.board.get("vref", {}).get("pin")
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
        # ntptime.settime() already set the RTC; nothing to keep here
        pass

    def time(self):
        t = time.time()
        return t + 946684800 if t < 946684800 else t, t > 1700000000 - 946684800

    def wdt_feed(self):
        if self._wdt is not None:
            self._wdt.feed()

    def reset_cause(self):
        return machine.reset_cause()
