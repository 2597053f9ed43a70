# The ESP32's ADC, for the boards that sample their CTs and voltage
# reference themselves (board.json frontend "adc"): the ESP32 HAL with
# adc_block and adc_calibration. firmware/boot.py's open_hal builds it for
# those boards only, so an ATM90E32 board never loads this code (on a stock
# image it would share the heap with the data). `machine` and `time` are
# the ones firmware/hal_esp32.py imported.
from firmware import hal_esp32
from firmware.hal_esp32 import Esp32Hal

_ATTEN = {0: 0, 2: 1, 6: 2, 11: 3}


def _tick_cost():
    """Microseconds between the timer reads of two back-to-back ticks_us()
    calls, the least of a few tries (an interrupt can stretch one)."""
    time = hal_esp32.time
    tick = time.ticks_us
    best = None
    for _ in range(8):
        a = tick()
        d = time.ticks_diff(tick(), a)
        if best is None or d < best:
            best = d
    return best


class AdcEsp32Hal(Esp32Hal):
    def __init__(self, board, wdt_ms=30000):
        Esp32Hal.__init__(self, board, wdt_ms)
        machine = hal_esp32.machine
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
        self._pins = None
        self._reads = None
        self._tick_cost = _tick_cost()

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
        time = hal_esp32.time
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
