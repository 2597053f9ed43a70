# Modbus RTU master for the board's RS485 port (inverters, batteries, meters).
#
# One request at a time. Before a request the line must have been silent for
# 3.5 character times (1.75 ms above 19200 Bd): whatever is still arriving
# (the late answer to an earlier request, noise) is read and dropped. The
# frame is written with the transceiver switched to transmit (DE high), then
# DE drops and the answer is read until its expected length or its deadline.
#
# The deadlines are computed per request from the baud rate (11 bits per
# character on RTU: start, 8 data, parity or a second stop, stop), the
# lengths of the request and of the answer, and the device's latency (the
# time it takes to start answering; settable per unit, default 500 ms):
#   first byte by   send + request time + latency + slack
#   last byte by    first byte + answer time + slack
# A request that times out leaves a guard on the line as long as its own
# timeout: an answer that comes late is read and dropped before the next
# request goes out, never taken as the answer to it. An answer must also
# come from the unit asked, with the function asked and the byte count (or
# echo) of the question, or it is refused ("frame") and the request retried.
#
# Every wait is bounded by the clock, so an unplugged device costs at most
# (retries + 2) x timeout, and after that the unit is left alone for a
# back-off that doubles from backoff_ms[0] to backoff_ms[1] while it keeps
# failing: a dead inverter cannot slow the board's loop down for long.
#
# Function codes 3 and 4 (read holding / input registers), 6 (write one) and
# 16 (write several). A Modbus exception answer is final (not retried);
# timeouts, CRC errors and answers that do not fit the question are retried.
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


LATENCY_MS = const(500)     # a device's answer starts within this unless configured otherwise
SLACK_MS = const(50)        # UART FIFO thresholds, the OS, a busy loop: added to every deadline
_GUARD_MAX = const(10000)   # a guard further ahead than this is one left from long ago
_LEARN_MAX_MS = const(3000)  # a unit's latency grows from late answers up to this


class Master:
    def __init__(self, uart, clock, de=None, timeout_ms=None, retries=2, baud=9600,
                 backoff_ms=(1000, 60000), latency_ms=LATENCY_MS, slack_ms=SLACK_MS):
        """clock: ticks_ms(), ticks_add(t, ms), ticks_diff(a, b), sleep_ms(ms)
        with a board's tick arithmetic (hal.IoClock).
        latency_ms: the devices' answer latency (set_latency for one unit);
        timeout_ms: a fixed first-byte timeout instead of the computed one."""
        self.uart = uart
        self.clock = clock
        self.de = de
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.baud = baud
        self.backoff_ms = backoff_ms
        self.latency_ms = latency_ms
        self.slack_ms = slack_ms
        self.latency = {}           # unit -> its own latency, ms
        self.char_us = 11000000 // baud
        # inter-frame silence, whole ms rounded up
        self.t35_ms = (3500 * self.char_us + 999999) // 1000000 if baud <= 19200 else 2
        self._tx = bytearray(8 + 2 * _MAX_WRITE + 1)
        self._rx = bytearray(5 + 2 * _MAX_READ + 2)
        self._down = {}        # unit -> [until ms, next back-off ms]
        now = clock.ticks_ms()
        self._busy = now       # the line was last busy (a byte sent or seen)
        self._guard = now      # no new request before this (a late answer may come)
        self._gsent = now      # the guard's request went out then,
        self._gunit = None     # to this unit (None: its late answer was seen)
        self._gspan = 0        # the guard's length, renewed by each late answer
        self.stats = {"requests": 0, "ok": 0, "timeouts": 0, "crc_errors": 0,
                      "exceptions": 0, "frame_errors": 0, "skipped": 0, "drained": 0, "late": 0}
        if de is not None:
            de.value(0)

    # -- timing --------------------------------------------------------------

    def set_latency(self, unit, ms):
        """The answer latency of one unit (a slow inverter), ms."""
        self.latency[unit] = int(ms)

    def chars_ms(self, n):
        """Time n characters take on the line, whole ms rounded up."""
        return (n * self.char_us + 999) // 1000

    def timeouts(self, unit, n_tx, n_rx):
        """(first byte, last byte after the first) deadlines in ms for a
        request of n_tx bytes answered by n_rx bytes."""
        if self.timeout_ms is not None:
            first = self.timeout_ms
        else:
            first = self.chars_ms(n_tx) + self.latency.get(unit, self.latency_ms) + self.slack_ms
        return first, self.chars_ms(n_rx) + self.slack_ms

    def read_timeout_ms(self, unit, count):
        """The whole time a read of count registers may take (the figure
        the benchmark reports)."""
        first, rest = self.timeouts(unit, 8, 5 + 2 * count)
        return first + rest

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

    def _settle(self):
        """Wait for the inter-frame silence (and the end of a guard),
        reading and dropping whatever arrives meanwhile. Bytes that arrive
        under a guard are a late answer: the unit's latency grows to what
        was seen (up to _LEARN_MAX_MS). Bounded: a line that never falls
        silent is given up on after twice the longest frame, and the
        answer's checks deal with what follows."""
        c = self.clock
        u = self.uart
        buf = self._rx
        t0 = c.ticks_ms()
        g = c.ticks_diff(self._guard, t0)
        limit = ((g if 0 < g <= _GUARD_MAX else 0) + (self.retries + 1) * self._gspan
                 + 2 * self.chars_ms(len(buf)) + self.t35_ms)
        while True:
            now = c.ticks_ms()
            if u.any():
                n = u.readinto(buf)
                if n:
                    self.stats["drained"] += n
                    # a frame that starts after a silence, not the tail of
                    # one refused a moment ago
                    if self._gunit is not None and c.ticks_diff(now, self._busy) >= self.t35_ms:
                        self._late(now)
                    self._busy = now
                    g = c.ticks_diff(self._guard, now)
                    if 0 < g <= _GUARD_MAX:
                        # one late answer: the other tries' may follow
                        self._guard = c.ticks_add(now, self._gspan)
            else:
                quiet = c.ticks_diff(now, self._busy)
                g = c.ticks_diff(self._guard, now)
                if (quiet >= self.t35_ms or quiet < 0) and not 0 < g <= _GUARD_MAX:
                    return
            if c.ticks_diff(now, t0) > limit:
                return
            c.sleep_ms(1)

    def _late(self, now):
        # bytes after a request that failed: its answer came late. Under
        # the guard the time since the request is known; after it, only
        # that it was longer than the guard: twice the latency, then.
        c = self.clock
        unit = self._gunit
        self._gunit = None
        self.stats["late"] += 1
        lat = self.latency.get(unit, self.latency_ms)
        g = c.ticks_diff(self._guard, now)
        seen = c.ticks_diff(now, self._gsent) if 0 < g <= _GUARD_MAX else 2 * lat
        if seen > lat:
            self.latency[unit] = seen if seen < _LEARN_MAX_MS else _LEARN_MAX_MS

    def _send(self, n):
        u = self.uart
        self._settle()
        if self.de is not None:
            self.de.value(1)
        u.write(memoryview(self._tx)[:n])
        if self.de is not None:
            f = getattr(u, "flush", None)
            if f is not None:
                f()             # returns when the FIFO is empty: one character left
                self.clock.sleep_ms(1 + self.char_us // 1000)
            else:
                self.clock.sleep_ms(1 + self.chars_ms(n))
            self.de.value(0)

    def _receive(self, unit, fc, want, t0, first_ms, rest_ms):
        """Read an answer of `want` bytes (or a 5-byte exception) and check
        that it answers the request in _tx; return its length. Raises
        ModbusError."""
        rx = self._rx
        got = 0
        c = self.clock
        deadline = c.ticks_add(t0, first_ms)
        mv = memoryview(rx)
        while got < want:
            n = self.uart.readinto(mv[got:want])
            if n:
                now = c.ticks_ms()
                if not got:
                    deadline = c.ticks_add(now, rest_ms)
                got += n
                self._busy = now
                if got >= 2 and rx[1] == (fc | 0x80):
                    want = 5
                continue
            if c.ticks_diff(c.ticks_ms(), deadline) >= 0:
                raise ModbusError("timeout", 0, "%d of %d bytes" % (got, want))
            c.sleep_ms(1)
        if got > want:
            raise ModbusError("frame", 0, "%d bytes, not %d" % (got, want))
        if crc16(rx, want - 2) != rx[want - 2] | rx[want - 1] << 8:
            raise ModbusError("crc")
        if rx[0] != unit:
            raise ModbusError("frame", 0, "answer from unit %d" % rx[0])
        if rx[1] == (fc | 0x80):
            raise ModbusError("exception", rx[2])
        if rx[1] != fc:
            raise ModbusError("frame", 0, "function %d" % rx[1])
        if fc == 3 or fc == 4:
            if rx[2] != want - 5:
                raise ModbusError("frame", 0, "byte count %d" % rx[2])
        elif rx[2:6] != self._tx[2:6]:
            raise ModbusError("frame", 0, "echo differs")
        return want

    def _guard_after(self, unit, sent, ms, timed_out):
        # a retry asks the same question, so a late answer to one try is a
        # right answer to the next; but once a request that had to be
        # retried is over, no other may go out until an answer still on its
        # way would have ended
        c = self.clock
        ms = ms if ms < _GUARD_MAX else _GUARD_MAX - 1
        self._guard = c.ticks_add(c.ticks_ms(), ms)
        self._gspan = ms
        self._gsent = sent
        self._gunit = unit if timed_out else None    # only a timeout has a late answer

    def _transact(self, unit, fc, n, want):
        if self.is_down(unit):
            self.stats["skipped"] += 1
            raise ModbusError("timeout", 0, "unit %d backing off" % unit)
        tx = self._tx
        crc = crc16(tx, n)
        tx[n] = crc & 0xFF
        tx[n + 1] = crc >> 8
        n += 2
        first_ms, rest_ms = self.timeouts(unit, n, want)
        c = self.clock
        err = None
        troubled = False
        timed_out = False
        for _ in range(self.retries + 1):
            self.stats["requests"] += 1
            self._send(n)
            t0 = c.ticks_ms()
            self._busy = t0
            try:
                got = self._receive(unit, fc, want, t0, first_ms, rest_ms)
            except ModbusError as e:
                err = e
                if e.kind == "exception":
                    self.stats["exceptions"] += 1
                    self._down.pop(unit, None)     # it answered: it is alive
                    if troubled:
                        self._guard_after(unit, t0, first_ms + rest_ms, timed_out)
                    raise
                troubled = True
                if e.kind == "crc":
                    self.stats["crc_errors"] += 1
                elif e.kind == "timeout":
                    self.stats["timeouts"] += 1
                    timed_out = True
                else:
                    self.stats["frame_errors"] += 1
                continue
            self._down.pop(unit, None)
            self.stats["ok"] += 1
            if troubled:
                self._guard_after(unit, t0, first_ms + rest_ms, timed_out)
            return got
        self._guard_after(unit, t0, first_ms + rest_ms, timed_out)
        if err.kind == "timeout":  # type: ignore[union-attr]  # set: the loop runs at least once
            # the unit is left alone now: wait its guard out here, where a
            # late answer shows how slow the device really is
            self._settle()
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


def master_for(uart, clock, rs, cfg, de=None, retries=2):
    """The board's master: the line of board.json's "rs485" (baud, the
    devices' latency_ms), each device's own latency_ms from the
    commissioning config's "inverter" / "battery" entries."""
    m = Master(uart, clock, de=de, baud=rs.get("baud", 9600), retries=retries,
               latency_ms=rs.get("latency_ms", LATENCY_MS))
    for k in ("inverter", "battery"):
        d = cfg.get(k)
        if d and d.get("latency_ms") is not None:
            m.set_latency(d.get("unit", 1), d["latency_ms"])
    return m
