# Hardware layer of the meter board: the one interface application code uses.
# Backends: hal_esp32 (machine module, on a board; firmware/boot.py's open_hal
# picks it) and boardsim/hal_sim.py (unix port, tests, virtual board). This
# module imports neither. Application code never imports `machine`.
#
# The interface, by object:
#   Hal.adc_block(pins, buf, n)   sample len(pins) inputs n times, interleaved,
#                                 into buf (array 'H' of raw codes); returns the
#                                 frame period in us (int or float). No allocation per sample.
#   Hal.adc_calibration()         (code, microvolts) points of the ADC's transfer
#                                 curve, or None (firmware/adccal.py)
#   Hal.spi(cfg) -> Spi           write_readinto(wbuf, rbuf), select(cs, on)
#   Hal.uart(cfg) -> Uart         write(b), readinto(buf) -> n or None, any()
#   Hal.pin_out(n, value) -> Pin  value(v=None)
#   Hal.flash(name, size) -> Flash  read(off, n) -> bytes, readinto(off, buf), write(off, data), size
#   Hal.ticks_ms(), ticks_us(), time() -> (unix s, synced)
#   Hal.ticks_add(t, delta)       the tick value delta ms after (before) t
#   Hal.ticks_diff(a, b)          a - b in ms, for two tick values
#   Hal.io_ms()                   real milliseconds for I/O timeouts (network,
#                                 Modbus); on a board the same clock as
#                                 ticks_ms, on the virtual board wall time
#                                 while ticks_ms runs faster
#   Hal.io_add(t, delta), io_diff(a, b)   the same for io_ms() values
#
# Tick values wrap. On a 32-bit MicroPython port (the ESP32) ticks_ms() counts
# modulo 2^30 (12.4 days) and a value past that would be a long int, which
# time.ticks_diff() turns into garbage. So every deadline is made with
# ticks_add (never `+`), every interval is measured with ticks_diff (never
# `-`, `<`, `>` on raw tick values), and ticks_diff is only meaningful for
# values less than 2^29 ms (6.2 days) apart: a deadline is at most that far
# ahead, and a long-running count (uptime) is accumulated from short diffs.
# ticks_add / ticks_diff below have exactly the semantics of MicroPython's
# time.ticks_add / time.ticks_diff for a period of 2^30, on any interpreter
# (the 64-bit unix port's own period is 2^62, which never wraps in a test),
# with every intermediate below 2^30 (small ints on a 32-bit port). The
# simulated backends use them; hal_esp32 uses the time module's own.
#   Hal.sleep_ms(ms)              wait ms of board time
#   Hal.idle(ms)                  nothing to do for up to ms of board time
#   Hal.set_time(unix)            the clock was set (NTP): time() is synced
#   Hal.wdt_feed()
#   Hal.reset_cause() -> int
#   Hal.mem_free() -> int         free heap, bytes

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

TICKS_MASK = const(0x3FFFFFFF)     # tick period 2^30: values are 0..TICKS_MASK
TICKS_HALF = const(0x20000000)     # 2^29: the largest distance ticks_diff can tell


def ticks_add(t, delta):
    """time.ticks_add for a period of 2^30: (t + delta) mod 2^30. delta must
    lie strictly between -2^29 and 2^29 (OverflowError otherwise), so that
    ticks_diff(ticks_add(t, d), t) == d; t must be a tick value (see
    ticks_diff)."""
    if delta >= TICKS_HALF or delta <= -TICKS_HALF:
        raise OverflowError("ticks interval overflow")
    if t < 0 or t > TICKS_MASK:
        raise ValueError("not a tick value: %r" % (t,))
    if delta >= 0:
        r = t - (TICKS_MASK - delta) - 1    # t + delta - 2^30, never above 2^30
    else:
        r = t + delta
    if r < 0:
        r = r + TICKS_MASK + 1
    return r


def ticks_diff(a, b):
    """time.ticks_diff for a period of 2^30: a - b as a signed distance in
    [-2^29, 2^29). Both must be tick values (0..2^30-1, from ticks_ms or
    ticks_add): a larger one would be a long int on the ESP32, where
    time.ticks_diff silently returns garbage for it, so here it raises."""
    if a < 0 or a > TICKS_MASK or b < 0 or b > TICKS_MASK:
        raise ValueError("not a tick value: %r, %r" % (a, b))
    d = (a - b) & TICKS_MASK
    if d >= TICKS_HALF:
        d = d - TICKS_MASK - 1
    return d


class Flash:
    """A fixed-size region of persistent storage, addressed by offset."""

    size = 0

    def read(self, off, n):
        raise NotImplementedError

    def readinto(self, off, buf):
        """Fill buf (a bytearray or a memoryview of one) from off: what
        reads in a loop use, so that they leave no garbage on a board."""
        buf[:] = self.read(off, len(buf))

    def write(self, off, data):
        raise NotImplementedError


class Hal:
    """What backends share. The methods every backend must have (adc_block,
    adc_calibration, spi, uart, pin_out, flash, ticks_ms, ticks_us, time,
    set_time: the list at the top) have no stand-ins here that raise
    NotImplementedError: on a board this module's code shares the heap with
    the data, and ten such stand-ins cost about 0.5 KB of it."""
    name = "abstract"

    # the board may measure in every idle moment (a virtual board whose
    # clock runs faster than real time cannot: its CPU does not speed up)
    continuous = True

    def ticks_add(self, t, delta):
        return ticks_add(t, delta)

    def ticks_diff(self, a, b):
        return ticks_diff(a, b)

    def io_ms(self):
        return self.ticks_ms()  # type: ignore[attr-defined]  # every backend has it: the list at the top

    def io_add(self, t, delta):
        return self.ticks_add(t, delta)

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
    """A HAL's real-time clock in the shape the Modbus master and the
    commissioning console want (ticks_ms, ticks_add, ticks_diff, sleep_ms):
    I/O timeouts are wall time even when the board clock runs fast (the
    virtual board)."""

    def __init__(self, hal):
        self.hal = hal

    def ticks_ms(self):
        return self.hal.io_ms()

    def ticks_add(self, t, delta):
        return self.hal.io_add(t, delta)

    def ticks_diff(self, a, b):
        return self.hal.io_diff(a, b)

    def sleep_ms(self, ms):
        self.hal.io_sleep_ms(ms)

