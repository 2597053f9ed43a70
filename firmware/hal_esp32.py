# ESP32 backend of the hardware layer (MicroPython `machine`). Only this file
# and firmware/adc_esp32.py (the ADC, for the boards that sample CTs
# themselves) touch `machine`; they cannot run on the unix port and are
# compiled by mpy-cross in every test run.
import time

from firmware.hal import Hal, Flash

try:
    import machine
except ImportError:  # unix port or CPython: importable, unusable
    machine = None

_EPOCH_2000 = 946684800     # 2000-01-01T00:00:00Z in Unix seconds


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
        # fed on progress by the application (a reading built, a command
        # handled), so the timeout must exceed the reading period
        # (0: no watchdog, while the board waits for its commissioning config)
        self._wdt = machine.WDT(timeout=wdt_ms) if wdt_ms else None
        # time.time() counts from the port's epoch: 2000-01-01 on the ESP32
        # port, 1970-01-01 elsewhere. Asked once, never guessed from the value.
        self._epoch = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0
        self._synced = False

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
