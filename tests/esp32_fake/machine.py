# The fake `machine` module (see __init__.py). Signals and devices are set by
# the test through the module's state:
#   signals[gpio] = fn(t_us) -> volts at the pin at simulated time t_us
#   read_us()     = how long one ADC read takes (default 12 us)
#   spi_devices   = objects with clock(wbuf, rbuf) (boardsim/atm90e32_sim.py's
#                   SimATM90E32 with cs=CsLine(gpio)) on every SPI bus
#   lines[gpio]   = the level an output pin drives
from esp32_fake import clock

signals = {}
lines = {}
adcs = []
spis = []
wdts = []
rtc_sets = []
spi_devices = []
read_us = None
reset_code = 1              # PWRON_RESET
IDLE_CODE = 1613            # an input at its 1.3 V bias
PWRON_RESET = 1
WDT_RESET = 3


def reset():
    global read_us
    signals.clear()
    lines.clear()
    del adcs[:]
    del spis[:]
    del wdts[:]
    del rtc_sets[:]
    del spi_devices[:]
    read_us = None


def reset_cause():
    return reset_code


class Pin:
    IN = 1
    OUT = 3
    OPEN_DRAIN = 7
    PULL_UP = 2
    PULL_DOWN = 1

    def __init__(self, id, mode=-1, pull=-1, value=None):
        self.id = id
        self.mode = mode
        if value is not None:
            self.value(value)

    def value(self, v=None):
        if v is None:
            return lines.get(self.id, 0)
        lines[self.id] = 1 if v else 0

    def __repr__(self):
        return "Pin(%d)" % self.id


class CsLine:
    """What a simulated chip sees of its chip-select line."""

    def __init__(self, gpio):
        self.gpio = gpio

    def value(self):
        return lines.get(self.gpio, 1)


class ADC:
    ATTN_0DB = 0
    ATTN_2_5DB = 1
    ATTN_6DB = 2
    ATTN_11DB = 3

    def __init__(self, pin, atten=None):
        self.pin = pin.id
        self.atten = atten
        self.times = None           # a list: record the instant of every conversion
        adcs.append(self)

    def read_u16(self):
        # the conversion happens halfway through the read; with whole-us
        # read times and no signal nothing here allocates (so a test can
        # count the heap the HAL itself uses)
        d = read_us() if read_us is not None else 12
        h = d // 2 if isinstance(d, int) else d / 2
        clock.advance(h)
        t = clock.now_us
        clock.advance(d - h)
        if self.times is not None:
            self.times.append(t)
        fn = signals.get(self.pin)
        if fn is None:
            code = IDLE_CODE
        else:
            code = int(fn(t) / 3.3 * 4095 + 0.5)
            if code < 0:
                code = 0
            elif code > 4095:
                code = 4095
        return (code << 4) | (code >> 8)

    def read_uv(self):
        return self.read_u16() * 3300000 // 65535


class SPI:
    def __init__(self, id, baudrate=1000000, polarity=0, phase=0, bits=8, firstbit=0, sck=None, mosi=None,
                 miso=None):
        self.id = id
        self.baudrate = baudrate
        self.polarity = polarity
        self.phase = phase
        self.pins = (sck, mosi, miso)
        spis.append(self)

    def write_readinto(self, wbuf, rbuf):
        for k in range(len(rbuf)):
            rbuf[k] = 0xFF              # MISO pulled up when nobody drives it
        for d in spi_devices:
            d.clock(wbuf, rbuf)
        clock.advance(len(wbuf) * 8 * 1000000 // self.baudrate)


class UART:
    def __init__(self, id, baudrate=9600, tx=None, rx=None, timeout=0):
        self.id = id
        self.baudrate = baudrate

    def write(self, b):
        return len(b)

    def readinto(self, buf):
        return None

    def any(self):
        return 0


class WDT:
    def __init__(self, id=0, timeout=5000):
        self.timeout = timeout
        self.fed = 0
        wdts.append(self)

    def feed(self):
        self.fed += 1


class RTC:
    def datetime(self, dt=None):
        if dt is None:
            tm = clock.gmtime()
            return (tm[0], tm[1], tm[2], tm[6], tm[3], tm[4], tm[5], 0)
        rtc_sets.append(tuple(dt))
        clock.set_rtc(clock.mktime((dt[0], dt[1], dt[2], dt[4], dt[5], dt[6], 0, 0)))
