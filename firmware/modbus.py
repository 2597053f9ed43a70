# Modbus RTU master for the board's RS485 port (inverters, batteries, meters).
#
# One request at a time: the frame is written with the transceiver switched
# to transmit (DE high), then DE drops and the answer is read until its
# expected length, a silence deadline, or the timeout. Every wait is bounded
# by the clock, so an unplugged device costs at most
# (retries + 1) x timeout_ms, and after that the unit is left alone for a
# back-off that doubles from backoff_ms[0] to backoff_ms[1] while it keeps
# failing: a dead inverter cannot slow the board's loop down for long.
#
# Function codes 3 and 4 (read holding / input registers), 6 (write one) and
# 16 (write several). A Modbus exception answer is final (not retried);
# timeouts and CRC errors are retried.
import struct

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

_MAX_READ = const(125)
_MAX_WRITE = const(123)


def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xA001 if c & 1 else c >> 1
        t.append(c)
    return tuple(t)


_CRC = _table()


def crc16(buf, n):
    """Modbus CRC-16 of buf[:n] (polynomial 0xA001 reflected, start 0xFFFF);
    sent low byte first."""
    c = 0xFFFF
    t = _CRC
    for i in range(n):
        c = (c >> 8) ^ t[(c ^ buf[i]) & 0xFF]
    return c


class ModbusError(Exception):
    """kind: "timeout", "crc", "exception" (code = Modbus exception code),
    "frame" (an answer that does not fit the question)."""

    def __init__(self, kind, code=0, msg=""):
        super().__init__(kind, code, msg)
        self.kind = kind
        self.code = code
        self.msg = msg

    def __str__(self):
        if self.kind == "exception":
            return "modbus exception %d" % self.code
        return "modbus %s%s" % (self.kind, (": " + self.msg) if self.msg else "")


class Master:
    def __init__(self, uart, clock, de=None, timeout_ms=200, retries=2, baud=9600,
                 backoff_ms=(1000, 60000)):
        """clock: ticks_ms(), ticks_add(t, ms), ticks_diff(a, b), sleep_ms(ms)
        with a board's tick arithmetic (hal.IoClock)."""
        self.uart = uart
        self.clock = clock
        self.de = de
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.baud = baud
        self.backoff_ms = backoff_ms
        self._tx = bytearray(8 + 2 * _MAX_WRITE + 1)
        self._rx = bytearray(5 + 2 * _MAX_READ + 2)
        self._down = {}        # unit -> [until ms, next back-off ms]
        self.stats = {"requests": 0, "ok": 0, "timeouts": 0, "crc_errors": 0,
                      "exceptions": 0, "frame_errors": 0, "skipped": 0}
        if de is not None:
            de.value(0)

    # -- back-off ----------------------------------------------------------

    def is_down(self, unit):
        # a back-off ends at most backoff_ms[1] ahead: an end further ahead is
        # one left from long ago (unit not asked for 2^29 ms), i.e. over
        d = self._down.get(unit)
        if d is None:
            return False
        left = self.clock.ticks_diff(d[0], self.clock.ticks_ms())
        return 0 < left <= self.backoff_ms[1]

    def _failed(self, unit):
        d = self._down.get(unit)
        wait = self.backoff_ms[0] if d is None else d[1]
        self._down[unit] = [self.clock.ticks_add(self.clock.ticks_ms(), wait),
                            min(wait * 2, self.backoff_ms[1])]

    # -- one transaction ---------------------------------------------------

    def _send(self, n):
        u = self.uart
        buf = self._rx
        while u.any():                      # drop whatever is stale
            if not u.readinto(buf):
                break
        if self.de is not None:
            self.de.value(1)
        u.write(memoryview(self._tx)[:n])
        if self.de is not None:
            f = getattr(u, "flush", None)
            if f is not None:
                f()
            # bytes still in the shift register: ~11 bits each
            self.clock.sleep_ms(1 + (n * 11000) // (self.baud * 1000) // 1)
            self.de.value(0)

    def _receive(self, unit, fc, want):
        """Read an answer of `want` bytes (or a 5-byte exception); return
        its length. Raises ModbusError."""
        rx = self._rx
        got = 0
        c = self.clock
        t0 = c.ticks_ms()
        mv = memoryview(rx)
        while got < want:
            if got >= 5 and rx[1] == (fc | 0x80):
                want = 5
                break
            n = self.uart.readinto(mv[got:want])
            if n:
                got += n
                continue
            if c.ticks_diff(c.ticks_ms(), t0) >= self.timeout_ms:
                raise ModbusError("timeout", 0, "%d of %d bytes" % (got, want))
            c.sleep_ms(1)
        if rx[1] == (fc | 0x80) and got >= 5:
            want = 5
        if crc16(rx, want - 2) != rx[want - 2] | rx[want - 1] << 8:
            raise ModbusError("crc")
        if rx[0] != unit:
            raise ModbusError("frame", 0, "answer from unit %d" % rx[0])
        if rx[1] == (fc | 0x80):
            raise ModbusError("exception", rx[2])
        if rx[1] != fc:
            raise ModbusError("frame", 0, "function %d" % rx[1])
        return want

    def _transact(self, unit, fc, n, want):
        if self.is_down(unit):
            self.stats["skipped"] += 1
            raise ModbusError("timeout", 0, "unit %d backing off" % unit)
        tx = self._tx
        crc = crc16(tx, n)
        tx[n] = crc & 0xFF
        tx[n + 1] = crc >> 8
        n += 2
        err = None
        for _ in range(self.retries + 1):
            self.stats["requests"] += 1
            self._send(n)
            try:
                got = self._receive(unit, fc, want)
            except ModbusError as e:
                err = e
                if e.kind == "exception":
                    self.stats["exceptions"] += 1
                    self._down.pop(unit, None)     # it answered: it is alive
                    raise
                if e.kind == "crc":
                    self.stats["crc_errors"] += 1
                elif e.kind == "timeout":
                    self.stats["timeouts"] += 1
                else:
                    self.stats["frame_errors"] += 1
                continue
            self._down.pop(unit, None)
            self.stats["ok"] += 1
            return got
        if err.kind == "timeout":  # type: ignore[union-attr]  # set: the loop runs at least once
            self._failed(unit)
        raise err  # type: ignore[misc]  # a ModbusError, as above

    # -- function codes ------------------------------------------------------

    def _read(self, unit, fc, addr, count, out):
        if not 1 <= count <= _MAX_READ:
            raise ValueError("read 1-125 registers")
        struct.pack_into(">BBHH", self._tx, 0, unit, fc, addr, count)
        want = 5 + 2 * count
        self._transact(unit, fc, 6, want)
        rx = self._rx
        if rx[2] != 2 * count:
            raise ModbusError("frame", 0, "byte count %d" % rx[2])
        for i in range(count):
            out[i] = rx[3 + 2 * i] << 8 | rx[4 + 2 * i]
        return out

    def read_holding_into(self, unit, addr, count, out):
        """Function 3 into out (array 'H' or list of >= count items)."""
        return self._read(unit, 3, addr, count, out)

    def read_input_into(self, unit, addr, count, out):
        """Function 4 into out."""
        return self._read(unit, 4, addr, count, out)

    def read_holding(self, unit, addr, count):
        return self._read(unit, 3, addr, count, [0] * count)

    def read_input(self, unit, addr, count):
        return self._read(unit, 4, addr, count, [0] * count)

    def write_single(self, unit, addr, value):
        """Function 6; the device echoes the request."""
        struct.pack_into(">BBHH", self._tx, 0, unit, 6, addr, value & 0xFFFF)
        self._transact(unit, 6, 6, 8)
        if self._rx[2:6] != self._tx[2:6]:
            raise ModbusError("frame", 0, "echo differs")

    def write_multiple(self, unit, addr, values):
        """Function 16; the device answers with address and count."""
        n = len(values)
        if not 1 <= n <= _MAX_WRITE:
            raise ValueError("write 1-123 registers")
        tx = self._tx
        struct.pack_into(">BBHHB", tx, 0, unit, 16, addr, n, 2 * n)
        for i in range(n):
            v = values[i] & 0xFFFF
            tx[7 + 2 * i] = v >> 8
            tx[8 + 2 * i] = v & 0xFF
        self._transact(unit, 16, 7 + 2 * n, 8)
        if self._rx[2:6] != tx[2:6]:
            raise ModbusError("frame", 0, "answer differs")
