# Hardware layer of the meter board: the one interface application code uses.
# Backends: hal_esp32 (machine module, on a board) and hal_sim (unix port,
# tests, virtual board). Application code never imports `machine`.
#
# The interface, by object:
#   Hal.adc_block(pins, buf, n)   sample len(pins) inputs n times, interleaved,
#                                 into buf (array 'H' of raw codes); returns the
#                                 sample period in us. No allocation per sample.
#   Hal.adc_uv(code)              calibrated microvolts for a raw code
#   Hal.spi(cfg) -> Spi           write_readinto(wbuf, rbuf), select(cs, on)
#   Hal.uart(cfg) -> Uart         write(b), readinto(buf) -> n or None, any()
#   Hal.pin_out(n, value) -> Pin  value(v=None)
#   Hal.flash(name, size) -> Flash  read(off, n) -> bytes, write(off, data), size
#   Hal.ticks_ms(), ticks_us(), ticks_diff(a, b), time() -> (unix s, synced)
#   Hal.io_ms()                   real milliseconds for I/O timeouts (network,
#                                 Modbus); on a board the same clock as
#                                 ticks_ms, on the virtual board wall time
#                                 while ticks_ms runs faster
#   Hal.io_diff(a, b)             difference of two io_ms() values
#   Hal.sleep_ms(ms)              wait ms of board time
#   Hal.idle(ms)                  nothing to do for up to ms of board time
#   Hal.set_time(unix)            the clock was set (NTP): time() is synced
#   Hal.wdt_feed()
#   Hal.reset_cause() -> int
#   Hal.mem_free() -> int         free heap, bytes


class Flash:
    """A fixed-size region of persistent storage, addressed by offset."""

    size = 0

    def read(self, off, n):
        raise NotImplementedError

    def write(self, off, data):
        raise NotImplementedError


class Hal:
    name = "abstract"

    def adc_block(self, pins, buf, n):
        raise NotImplementedError

    def adc_uv(self, code):
        raise NotImplementedError

    def spi(self, cfg):
        raise NotImplementedError

    def uart(self, cfg):
        raise NotImplementedError

    def pin_out(self, n, value=0):
        raise NotImplementedError

    def flash(self, name, size):
        raise NotImplementedError

    def ticks_ms(self):
        raise NotImplementedError

    def ticks_us(self):
        raise NotImplementedError

    def ticks_diff(self, a, b):
        return a - b

    def time(self):
        raise NotImplementedError

    def io_ms(self):
        return self.ticks_ms()

    def io_diff(self, a, b):
        return self.ticks_diff(a, b)

    def sleep_ms(self, ms):
        pass

    def io_sleep_ms(self, ms):
        """Wait ms of wall time (I/O pacing)."""
        self.sleep_ms(ms)

    def idle(self, ms):
        """Nothing to do for up to ms of board time."""
        if ms > 0:
            self.sleep_ms(ms)

    def set_time(self, unix):
        raise NotImplementedError

    def wdt_feed(self):
        pass

    def mem_free(self):
        try:
            import gc
            return gc.mem_free()
        except (ImportError, AttributeError):   # CPython has no mem_free
            return 0

    def reset_cause(self):
        return 0


class IoClock:
    """A HAL's real-time clock in the shape the Modbus master wants
    (ticks_ms, ticks_diff, sleep_ms): I/O timeouts are wall time even when
    the board clock runs fast (the virtual board)."""

    def __init__(self, hal):
        self.hal = hal

    def ticks_ms(self):
        return self.hal.io_ms()

    def ticks_diff(self, a, b):
        return self.hal.io_diff(a, b)

    def sleep_ms(self, ms):
        self.hal.io_sleep_ms(ms)


def open_hal(board, **kw):
    """The backend for a board definition (dict loaded from board.json)."""
    if board.get("mcu") == "sim":
        from firmware.hal_sim import SimHal
        return SimHal(board, **kw)
    from firmware.hal_esp32 import Esp32Hal
    return Esp32Hal(board, **kw)
