# SunSpec discovery and reading (firmware/sunspec.py) through the Modbus
# master and the scripted slave. The register images are built here by hand
# with offsets from the SunSpec model definitions (tests/test_sunspec_models.py
# checks the firmware's table against pysunspec2's copy of them).
import struct

from firmware import sunspec
from firmware.modbus import Master, ModbusError
from modbus_slave import FakeClock, Slave

LEN = {1: 66, 103: 50, 113: 60, 120: 26, 124: 24, 802: 62}


def _image(base=40000, models=(1, 103, 120, 802, 124), values=None, lengths=None):
    """{addr: value}: SunS, then each model [ID, L, data...], then the end."""
    regs = {base: 0x5375, base + 1: 0x6E53}
    starts = {}
    a = base + 2
    for mid in models:
        n = (lengths or {}).get(mid, LEN[mid])
        regs[a] = mid
        regs[a + 1] = n
        starts[mid] = a + 2
        for i in range(n):
            regs[a + 2 + i] = 0xFFFF if mid not in (1,) else 0
        a += 2 + n
    regs[a] = 0xFFFF
    regs[a + 1] = 0
    for (mid, off), v in (values or {}).items():
        regs[starts[mid] + off] = v & 0xFFFF
    return regs, starts


def _s(v):
    return v & 0xFFFF


INV103 = {(103, 12): 2890, (103, 13): 0, (103, 22): 0x005B, (103, 23): 0xBDB9, (103, 24): 0,
          (103, 36): 4, (103, 14): 5001, (103, 15): _s(-2)}


def _master(regs):
    clock = FakeClock()
    slave = Slave(clock, regs=regs)
    return Master(slave.master_end, clock, timeout_ms=50, retries=0), slave


def _sn(starts, regs, text):
    b = text.encode()
    b = b + b"\x00" * (32 - len(b))
    for i in range(16):
        regs[starts[1] + 48 + i] = b[2 * i] << 8 | b[2 * i + 1]


def test_discovery_at_each_base():
    for base in (40000, 0, 50000):
        regs, starts = _image(base=base, values=INV103)
        m, slave = _master(regs)
        assert sunspec.find_base(m, 1) == base
        chain = sunspec.scan(m, 1, base)
        assert [c[0] for c in chain] == [1, 103, 120, 802, 124]
        assert chain[1] == (103, starts[103], 50)


def test_inverter_values_with_scale_factors():
    regs, starts = _image(values=INV103)
    _sn(starts, regs, "INV-77")
    m, slave = _master(regs)
    inv = sunspec.Inverter(m, 1)
    assert inv.discover() and inv.model == 103 and inv.serial == "INV-77"
    assert inv.read() == (4, 2890, 6012345)
    # scale factors: W_SF 1 -> x10, WH_SF -1 -> /10 (rounded)
    regs[starts[103] + 13] = 1
    regs[starts[103] + 24] = _s(-1)
    assert inv.read() == (4, 28900, 601235)
    p = inv.read(103)
    assert p["Hz"] == 5001 and p["Hz_SF"] == -2


def test_not_implemented_reads_as_none():
    regs, starts = _image(values={(103, 36): 4})
    m, slave = _master(regs)
    inv = sunspec.Inverter(m, 1)
    inv.discover()
    regs[starts[103] + 12] = 0x8000        # int16 W not implemented
    regs[starts[103] + 22] = 0             # acc32 WH not implemented
    regs[starts[103] + 23] = 0
    st, w, wh = inv.read()
    assert (st, w, wh) == (4, None, None)
    assert sunspec.scaled(5, None) is None and sunspec.scaled(None, 0) is None


def test_float_inverter_model():
    vals = {}
    for off, f in ((20, 1234.6), (30, 987654.0)):
        hi, lo = struct.unpack(">HH", struct.pack(">f", f))
        vals[(113, off)] = hi
        vals[(113, off + 1)] = lo
    vals[(113, 46)] = 5
    regs, starts = _image(models=(1, 113), values=vals)
    nan_hi, nan_lo = struct.unpack(">HH", struct.pack(">I", 0x7FC00000))
    m, slave = _master(regs)
    inv = sunspec.Inverter(m, 1)
    assert inv.discover() and inv.model == 113
    assert inv.read() == (5, 1235, 987654)
    regs[starts[113] + 20] = nan_hi
    regs[starts[113] + 21] = nan_lo
    assert inv.read()[1] is None


def test_battery_read_and_setpoint_with_revert_timer():
    vals = {(802, 2): 5000, (802, 3): 5000, (802, 52): 0, (802, 9): 734, (802, 54): _s(-1),
            (802, 14): 4, (802, 45): 1500, (802, 61): 0,
            (124, 0): 5000, (124, 16): 0, (124, 23): _s(-2), (124, 3): 0, (124, 10): 0, (124, 11): 0,
            (124, 13): 0}
    regs, starts = _image(values=vals)
    m, slave = _master(regs)
    bat = sunspec.Battery(m, 1)
    assert bat.discover() and bat.max_w == 5000
    assert bat.read() == (4, 1500, 734)
    regs[starts[802] + 14] = 3                # discharging: the power turns negative
    assert bat.read() == (3, -1500, 734)
    bat.set_power(2500, 60)
    s = starts[124]
    assert regs[s + 3] == 1                   # charge mode
    assert regs[s + 11] == 5000               # 50.00 % of WChaMax (sf -2)
    assert regs[s + 10] == 0 and regs[s + 13] == 60
    bat.set_power(-1000, 30)
    assert regs[s + 3] == 2 and regs[s + 10] == 2000 and regs[s + 11] == 0 and regs[s + 13] == 30
    bat.set_power(0, 30)
    assert regs[s + 3] == 0
    try:
        bat.set_power(6000, 30)
    except ValueError:
        pass
    else:
        raise AssertionError("setpoint beyond the battery's rate accepted")


def test_not_sunspec_and_bad_chains():
    m, slave = _master(dict((a, 0) for a in range(0, 10)))
    assert sunspec.find_base(m, 1) is None
    inv = sunspec.Inverter(m, 1)
    try:
        inv.discover()
    except ValueError as e:
        assert "not a SunSpec" in str(e)
    else:
        raise AssertionError("non-SunSpec device discovered")
    # a chain that never ends (every model points on to another)
    regs = {40000: 0x5375, 40001: 0x6E53}
    for a in range(40002, 40002 + 400, 2):
        regs[a] = 7
        regs[a + 1] = 0
    m, slave = _master(regs)
    try:
        sunspec.scan(m, 1, 40000)
    except (ValueError, ModbusError):
        pass
    else:
        raise AssertionError("endless chain accepted")
    # a model twice, and a model with the wrong length
    for models, lengths in (((1, 103, 103), None), ((1, 103), {103: 40})):
        regs, starts = _image(models=models, lengths=lengths)
        m, slave = _master(regs)
        try:
            sunspec.Inverter(m, 1).discover()
        except ValueError:
            continue
        raise AssertionError("bad chain %r accepted" % (models,))


def test_unplugged_inverter_raises_timeout():
    regs, starts = _image(values=INV103)
    m, slave = _master(regs)
    inv = sunspec.Inverter(m, 1)
    inv.discover()
    slave.fault = "silent"
    try:
        inv.read()
    except ModbusError as e:
        assert e.kind == "timeout"
    else:
        raise AssertionError("silent device read")
    assert m.is_down(1)


BAT = {(802, 2): 5000, (802, 3): 5000, (802, 52): 0, (802, 9): 734, (802, 54): _s(-1),
       (802, 14): 4, (802, 45): 1500, (802, 61): 0,
       (124, 0): 5000, (124, 16): 0, (124, 6): 700, (124, 20): _s(-1), (124, 9): 6,
       (124, 23): _s(-2), (124, 3): 0, (124, 10): 0, (124, 11): 0, (124, 13): 0}


def test_a_refused_register_inside_the_block_loses_only_itself():
    regs, starts = _image(values=INV103)
    m, slave = _master(regs)
    inv = sunspec.Inverter(m, 1)
    inv.discover()
    s = starts[103]
    del regs[s + 30]                 # not a point the board uses: every value still read
    assert inv.read() == (4, 2890, 6012345)
    n = slave.requests
    assert inv.read() == (4, 2890, 6012345)
    # the refused block is not asked again: runs of adjacent points only
    runs = slave.requests - n
    assert 1 < runs <= len(sunspec.layout(103))
    assert m.stats["exceptions"] == 1
    del regs[s + 12]                 # W itself: unknown, the rest still read
    assert inv.read() == (4, None, 6012345)
    p = inv.read(103)
    assert p["Hz"] == 5001 and p["W"] is None and p["W_SF"] == 0
    # nothing of the model there at all: the refusal is raised
    for k in list(regs):
        if s <= k < s + 50:
            del regs[k]
    try:
        inv.read()
    except ModbusError as e:
        assert e.kind == "exception" and e.code == 2
    else:
        raise AssertionError("a model with no register read")


def test_battery_falls_back_to_124_when_802_is_refused():
    regs, starts = _image(values=BAT)
    m, slave = _master(regs)
    bat = sunspec.Battery(m, 1)
    assert bat.discover() and bat.max_w == 5000
    assert bat.read() == (4, 1500, 734)
    for k in range(starts[802], starts[802] + 62):
        del regs[k]
    # 124 has no measured power: unknown, not 0
    assert bat.read() == (6, None, 700)
    assert bat.no802
    n = slave.requests
    assert bat.read() == (6, None, 700) and slave.requests == n + 1     # 802 not asked again
    # found from scratch: 802 refused at discovery already
    regs2, starts2 = _image(models=(1, 802, 124), values=BAT)
    for k in range(starts2[802], starts2[802] + 62):
        del regs2[k]
    m2, slave2 = _master(regs2)
    bat2 = sunspec.Battery(m2, 1)
    assert bat2.discover() and bat2.max_w == 5000 and bat2.read() == (6, None, 700)


def test_battery_sign_from_measured_power_without_a_charge_status():
    vals = dict(BAT)
    vals[(802, 14)] = 0xFFFF         # ChaSt not implemented
    vals[(802, 45)] = _s(-1500)      # the battery's own sign: discharging
    regs, starts = _image(values=vals)
    m, slave = _master(regs)
    bat = sunspec.Battery(m, 1)
    bat.discover()
    assert bat.read() == (None, -1500, 734)
    regs[starts[802] + 45] = 1200
    assert bat.read() == (None, 1200, 734)
    # a status that says which way wins over the sign of W
    regs[starts[802] + 14] = 3
    assert bat.read() == (3, -1200, 734)
    regs[starts[802] + 14] = 4
    regs[starts[802] + 45] = _s(-900)
    assert bat.read() == (4, 900, 734)
    # a status that does not say (holding): the measured sign
    regs[starts[802] + 14] = 6
    assert bat.read() == (6, -900, 734)
    # SoC and W not implemented: unknown, never 0
    regs[starts[802] + 9] = 0xFFFF
    regs[starts[802] + 45] = 0x8000
    assert bat.read() == (6, None, None)
