# A Modbus RTU slave in plain Python for the shared tests (both interpreters):
# it sits on the far end of a simulated UART pair and answers when the test
# clock lets time pass, so a master waiting for an answer gets it. Faults can
# be switched on: no answer, a bad CRC, the wrong unit, a short frame,
# garbage first. (The CPython tests talk to a real pymodbus server instead;
# MicroPython cannot run that.)
import struct

from firmware.hal import ticks_add, ticks_diff
from boardsim.hal_sim import uart_pair
from firmware.modbus import crc16


class FakeClock:
    """Milliseconds that pass only when someone sleeps; sleepers let the
    devices on the line act. A board's tick arithmetic (period 2^30 ms),
    starting at `start`."""

    def __init__(self, start=0):
        self.now = start
        self.devices = []

    def ticks_ms(self):
        return self.now

    def ticks_add(self, t, delta):
        return ticks_add(t, delta)

    def ticks_diff(self, a, b):
        return ticks_diff(a, b)

    def sleep_ms(self, ms):
        self.now = ticks_add(self.now, ms)
        for d in self.devices:
            d.service()


class Pin:
    def __init__(self):
        self.v = 0
        self.history = []

    def value(self, v=None):
        if v is None:
            return self.v
        self.v = v
        self.history.append(v)


class Slave:
    def __init__(self, clock, unit=1, regs=None, delay_ms=2):
        self.master_end, self.end = uart_pair()
        self.master_end.size = 1024
        self.end.size = 1024
        self.clock = clock
        clock.devices.append(self)
        self.unit = unit
        self.regs = regs if regs is not None else {}
        self.delay_ms = delay_ms
        self.fault = None          # None, "silent", "crc", "unit", "short", "garbage"
        self.requests = 0
        self.writes = []
        self._buf = bytearray()
        self._t = None

    def service(self):
        n = self.end.any()
        if n:
            b = bytearray(n)
            self.end.readinto(b)
            self._buf.extend(b)
            self._t = self.clock.now
        if not self._buf or ticks_diff(self.clock.now, self._t) < self.delay_ms:
            return
        req = bytes(self._buf)
        self._buf = bytearray()
        self._answer(req)

    def _answer(self, req):
        if len(req) < 4 or crc16(req, len(req) - 2) != req[-2] | req[-1] << 8:
            return                              # a real slave stays silent
        if req[0] != self.unit:
            return
        self.requests += 1
        if self.fault == "silent":
            return
        fc = req[1]
        if fc in (3, 4):
            addr, count = struct.unpack(">HH", req[2:6])
            vals = []
            for a in range(addr, addr + count):
                if a not in self.regs:
                    return self._send(bytes((self.unit, fc | 0x80, 2)))
                vals.append(self.regs[a])
            body = bytes((self.unit, fc, 2 * count)) + b"".join(struct.pack(">H", v) for v in vals)
            return self._send(body)
        if fc == 6:
            addr, v = struct.unpack(">HH", req[2:6])
            if addr not in self.regs:
                return self._send(bytes((self.unit, 0x86, 2)))
            self.regs[addr] = v
            self.writes.append((addr, [v]))
            return self._send(req[:6])
        if fc == 16:
            addr, count, nb = struct.unpack(">HHB", req[2:7])
            vals = [struct.unpack(">H", req[7 + 2 * i:9 + 2 * i])[0] for i in range(count)]
            for a in range(addr, addr + count):
                if a not in self.regs:
                    return self._send(bytes((self.unit, 0x90, 2)))
            for i in range(count):
                self.regs[addr + i] = vals[i]
            self.writes.append((addr, vals))
            return self._send(req[:6])
        return self._send(bytes((self.unit, fc | 0x80, 1)))

    def _send(self, body):
        unit = self.unit
        if self.fault == "unit":
            body = bytes((unit + 1,)) + body[1:]
        crc = crc16(body, len(body))
        frame = body + bytes((crc & 0xFF, crc >> 8))
        if self.fault == "crc":
            frame = frame[:-1] + bytes(((frame[-1] + 1) & 0xFF,))
        if self.fault == "short":
            frame = frame[:-3]
        if self.fault == "garbage":
            frame = b"\x00\xff\x13" + frame
        self.end.write(frame)
