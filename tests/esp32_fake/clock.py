# The fake `time` module of the ESP32 port: ticks_us/ticks_ms that wrap at
# 2**30 (the port's small-int range) with ticks_diff/ticks_add as MicroPython
# defines them, time()/gmtime() counting from the port's epoch, 2000-01-01.
# Simulated time only moves when something takes time: an ADC read, a
# ticks_us() call (COST_US), sleep_ms(), advance().

import time as _host

PERIOD = 1 << 30
_HALF = PERIOD >> 1
_MASK = PERIOD - 1
EPOCH_YEAR = 2000           # what gmtime(0) says on this port

now_us = 0                  # simulated microseconds since power-up (int or float)
rtc_s = 0                   # the RTC's seconds since the epoch at now_us == 0
COST_US = 0                 # time one ticks_us() call takes; the timer is read halfway
calls = 0


def reset(start_us=0, rtc=0, cost_us=0, epoch_year=2000):
    """rtc: what time() says at start_us; epoch_year 2000 (ESP32) or 1970."""
    global now_us, rtc_s, COST_US, calls, EPOCH_YEAR
    now_us = start_us
    rtc_s = rtc - int(start_us // 1000000)
    COST_US = cost_us
    calls = 0
    EPOCH_YEAR = epoch_year


def advance(us):
    global now_us
    now_us += us


def ticks_us():
    global now_us, calls
    calls += 1
    if COST_US:
        half = COST_US / 2
        now_us += half
        t = int(now_us) & _MASK
        now_us += half
        return t
    return int(now_us) & _MASK


def ticks_ms():
    return int(now_us // 1000) & _MASK


def ticks_diff(a, b):
    return ((a - b + _HALF) & _MASK) - _HALF


def ticks_add(t, d):
    return (t + d) & _MASK


def sleep_ms(ms):
    advance(ms * 1000)


def sleep_us(us):
    advance(us)


def time():
    return rtc_s + int(now_us // 1000000)


def set_rtc(secs):
    """The RTC now reads `secs` (seconds since the port's epoch)."""
    global rtc_s
    rtc_s = secs - int(now_us // 1000000)


def _offset():
    # Unix seconds of the port's epoch (2000-01-01 or 1970-01-01)
    return 946684800 if EPOCH_YEAR == 2000 else 0


def gmtime(secs=None):
    """(year, month, mday, hour, minute, second, weekday 0=Monday, yearday)."""
    if secs is None:
        secs = time()
    return tuple(_host.gmtime(secs + _offset()))[:8]


localtime = gmtime


def _days(y, m, d):
    # days from 1970-01-01 to y-m-d (y >= 1970)
    n = (y - 1970) * 365 + (y - 1969) // 4 - (y - 1901) // 100 + (y - 1601) // 400
    n += (0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334)[m - 1] + d - 1
    if m > 2 and y % 4 == 0 and (y % 100 != 0 or y % 400 == 0):
        n += 1
    return n


def mktime(tm):
    """Seconds since the port's epoch of (year, month, mday, hour, min, sec, ...), UTC."""
    return _days(tm[0], tm[1], tm[2]) * 86400 + tm[3] * 3600 + tm[4] * 60 + tm[5] - _offset()
