# The board's Modbus RTU master (firmware/modbus.py) against a scripted slave
# on a simulated UART: CRC, the four function codes, exceptions, timeouts,
# retries, corrupted answers, back-off for a silent device, RS485 direction.
from array import array

from firmware.modbus import Master, ModbusError, crc16
from modbus_slave import FakeClock, Pin, Slave


def _setup(regs=None, retries=2, timeout_ms=100, backoff_ms=(1000, 8000), start=0):
    clock = FakeClock(start)
    slave = Slave(clock, unit=1, regs=regs if regs is not None else dict((40000 + i, i * 3) for i in range(130)))
    de = Pin()
    m = Master(slave.master_end, clock, de=de, timeout_ms=timeout_ms, retries=retries, backoff_ms=backoff_ms)
    return clock, slave, m, de


def _raises(kind, fn, *args):
    try:
        fn(*args)
    except ModbusError as e:
        assert e.kind == kind, "expected %s, got %s" % (kind, e)
        return e
    raise AssertionError("expected ModbusError %s" % kind)


def test_crc_known_frames():
    # read 10 holding registers from 0 at unit 1: the CRC on the wire is C5 CD
    req = bytes((0x01, 0x03, 0x00, 0x00, 0x00, 0x0A))
    c = crc16(req, 6)
    assert (c & 0xFF, c >> 8) == (0xC5, 0xCD)
    # write single register 1 = 3 at unit 17: CRC bytes 9A 9B
    req = bytes((0x11, 0x06, 0x00, 0x01, 0x00, 0x03))
    c = crc16(req, 6)
    assert (c & 0xFF, c >> 8) == (0x9A, 0x9B)
    # a frame with its CRC appended checks to zero
    full = req + bytes((0x9A, 0x9B))
    assert crc16(full, len(full)) == 0


def test_read_holding_and_input():
    clock, slave, m, de = _setup()
    assert m.read_holding(1, 40000, 4) == [0, 3, 6, 9]
    out = array("H", [0] * 125)
    m.read_input_into(1, 40000, 125, out)
    assert out[124] == 372
    assert m.stats["ok"] == 2 and slave.requests == 2


def test_write_single_and_multiple():
    clock, slave, m, de = _setup()
    m.write_single(1, 40005, 0xBEEF)
    assert slave.regs[40005] == 0xBEEF
    m.write_multiple(1, 40010, [1, 0xFFFF, -1, 7])
    assert [slave.regs[40010 + i] for i in range(4)] == [1, 0xFFFF, 0xFFFF, 7]
    assert slave.writes[-1] == (40010, [1, 0xFFFF, 0xFFFF, 7])


def test_exception_answer_is_final():
    clock, slave, m, de = _setup()
    e = _raises("exception", m.read_holding, 1, 30000, 2)
    assert e.code == 2 and slave.requests == 1      # not retried
    assert not m.is_down(1)


def test_timeout_retries_then_backs_off():
    clock, slave, m, de = _setup(retries=2, timeout_ms=100)
    slave.fault = "silent"
    t0 = clock.now
    _raises("timeout", m.read_holding, 1, 40000, 2)
    assert slave.requests == 3                       # first try and two retries
    assert m.stats["timeouts"] == 3
    # bounded: three first-byte timeouts, each after the inter-frame
    # silence and with the DE pin held for the frame, then the guard for a
    # late answer (the request's whole timeout)
    first, rest = m.timeouts(1, 8, 9)
    assert first == 100 and rest == m.chars_ms(9) + m.slack_ms
    least = 4 * first + rest
    most = least + 3 * (m.t35_ms + 2 + 1 + m.chars_ms(8)) + 2
    assert least <= clock.ticks_diff(clock.now, t0) <= most, clock.now
    assert m.is_down(1)
    # while backing off, nothing goes on the bus and no time passes
    written = slave.master_end.written
    t1 = clock.now
    _raises("timeout", m.read_holding, 1, 40000, 2)
    assert slave.master_end.written == written and clock.now == t1
    assert m.stats["skipped"] == 1
    # the device comes back: after the back-off it is asked again
    slave.fault = None
    clock.sleep_ms(1000)
    assert m.read_holding(1, 40000, 1) == [0]
    assert not m.is_down(1)


def _backoff_waits(start):
    clock, slave, m, de = _setup(retries=0, timeout_ms=10, backoff_ms=(1000, 4000), start=start)
    slave.fault = "silent"
    waits = []
    for _ in range(4):
        _raises("timeout", m.read_holding, 1, 40000, 1)
        t = clock.now
        while m.is_down(1):
            clock.sleep_ms(100)
            assert clock.ticks_diff(clock.now, t) <= 5000, "back-off never ends"
        waits.append(clock.ticks_diff(clock.now, t))
    return waits, clock


def test_backoff_doubles_to_the_limit():
    waits, _ = _backoff_waits(0)
    assert waits == [1000, 2000, 4000, 4000], waits


def test_backoff_keeps_its_schedule_across_the_tick_wrap():
    # the clock passes 2^29 (ticks_diff against 0 changes sign) and 2^30
    # (ticks wrap to 0) during the back-off
    for start in (2 ** 29 - 5000, 2 ** 30 - 5000):
        waits, clock = _backoff_waits(start)
        assert waits == [1000, 2000, 4000, 4000], (start, waits)
        assert clock.ticks_diff(clock.now, start) >= 11000      # it did cross


def test_back_off_left_from_days_ago_is_over():
    # a unit that failed once and was not asked again for more than 2^29 ms
    # (half the tick period): its old back-off end must not read as ahead
    clock, slave, m, de = _setup(retries=0, timeout_ms=10, backoff_ms=(1000, 4000))
    slave.fault = "silent"
    _raises("timeout", m.read_holding, 1, 40000, 1)
    assert m.is_down(1)
    slave.fault = None
    for _ in range(3):
        clock.sleep_ms(1 << 28)
    assert not m.is_down(1)
    assert m.read_holding(1, 40000, 1) == [0]


def test_bad_crc_retried_then_given_up():
    clock, slave, m, de = _setup(retries=1)
    slave.fault = "crc"
    _raises("crc", m.read_holding, 1, 40000, 2)
    assert m.stats["crc_errors"] == 2
    slave.fault = None
    assert m.read_holding(1, 40000, 2) == [0, 3]


def test_wrong_unit_short_and_garbage_answers():
    for fault, kinds in (("unit", ("frame", "crc")), ("short", ("timeout",)), ("garbage", ("crc", "frame"))):
        clock, slave, m, de = _setup(retries=0)
        slave.fault = fault
        try:
            m.read_holding(1, 40000, 3)
        except ModbusError as e:
            assert e.kind in kinds, (fault, e.kind)
        else:
            raise AssertionError("%s accepted" % fault)
        slave.fault = None
        clock.sleep_ms(2000)            # past any back-off
        assert m.read_holding(1, 40000, 3) == [0, 3, 6]


def test_stale_bytes_are_discarded():
    clock, slave, m, de = _setup()
    slave.end.write(b"\x01\x03\x02\x00")             # a late half answer
    assert m.read_holding(1, 40001, 1) == [3]


def test_direction_pin_around_each_frame():
    clock, slave, m, de = _setup()
    m.read_holding(1, 40000, 1)
    assert de.history[-2:] == [1, 0] and de.v == 0


def test_register_count_limits():
    clock, slave, m, de = _setup()
    for fn, args in ((m.read_holding, (1, 0, 0)), (m.read_holding, (1, 0, 126)),
                     (m.write_multiple, (1, 0, [0] * 124)), (m.write_multiple, (1, 0, []))):
        try:
            fn(*args)
        except ValueError:
            continue
        raise AssertionError("accepted %r" % (args,))
    assert slave.requests == 0
