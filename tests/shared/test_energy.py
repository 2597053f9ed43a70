# Energy registers (firmware/energy.py): integer accounting, restore after a
# reboot, torn flash writes, the save policy and flash wear.
import os

from firmware import energy
from firmware.energy import Registers, RegisterStore, record_len
from boardsim.hal_sim import SimFlash, FlashDied

try:
    import time
    _STAMP = time.ticks_us() if hasattr(time, "ticks_us") else int(time.time() * 1000000)
except ImportError:  # pragma: no cover
    _STAMP = 0

_count = [0]


def _path():
    # no tempfile on MicroPython: a unique name under /tmp
    _count[0] += 1
    p = "/tmp/pg-test-energy-%d-%d.bin" % (_STAMP & 0xFFFFFF, _count[0])
    _remove(p)
    return p


def _remove(p):
    try:
        os.remove(p)
    except OSError:
        pass


NCH = 3
SLOT = 128          # record_len(3) = 88: fits


def _store(path, nslots=4, **kw):
    """A store on a SimFlash file; a new call on the same path is a reboot."""
    flash = SimFlash(path, nslots * SLOT)
    return flash, RegisterStore(flash, NCH, slot_size=SLOT, **kw)


def _fill(regs, k):
    # some energy on every channel, both directions, with sub-Wh rests
    for ch in range(regs.nch):
        regs.add_mwh(ch, 12345 * k + 7 * ch)
        regs.add_mwh(ch, -(2345 * k + 11 * ch))
        regs.add(ch, 2300 + ch, 1234 * k)


def test_import_export_never_decrease():
    r = Registers(2)
    r.add_mwh(0, 5000)
    assert r.get(0) == (5, 0, 0, 0)
    r.add_mwh(0, -3000)                 # export: import stays
    assert r.get(0) == (5, 3, 0, 0)
    r.add(0, -3600, 2000)               # -3600 W for 2 s = 2 Wh exported
    assert r.get(0) == (5, 5, 0, 0)
    r.add(0, 0, 1000)
    assert r.get(0) == (5, 5, 0, 0)
    prev = r.get(0)
    for i in range(200):
        r.add_mwh(0, (i * 7919) % 3001 - 1500)
        cur = r.get(0)
        assert cur[0] >= prev[0] and cur[1] >= prev[1]
        assert 0 <= cur[2] < 3600000 and 0 <= cur[3] < 3600000
        prev = cur
    assert r.get(1) == (0, 0, 0, 0)     # other channel untouched


def test_rest_carried():
    r = Registers(1)
    for _ in range(3):
        r.add_mwh(0, 400)               # 0.4 Wh
    assert r.imp[0] == 1 and r.rest_mwh(0) == (200, 0)
    for _ in range(3):
        r.add_mwh(0, -400)
    assert r.exp[0] == 1 and r.rest_mwh(0) == (200, 200)
    # 1 W for 1 ms, 3.6 million times, is exactly 1 Wh
    r2 = Registers(1)
    for _ in range(1000):
        r2.add(0, 1, 3600)
    assert r2.get(0) == (1, 0, 0, 0)
    # a big step carries many Wh at once
    r2.add(0, 11000, 3600000)           # 11 kW for an hour
    assert r2.get(0) == (11001, 0, 0, 0)
    # sum of exact energy is preserved in W*ms
    r3 = Registers(1)
    total = 0
    for i in range(500):
        p, dt = (i * 37) % 4000, 10000 + i
        r3.add(0, p, dt)
        total += p * dt
    assert r3.imp[0] * 3600000 + r3.imp_rest[0] == total


def test_add_allocates_nothing():
    import gc
    r = Registers(4)
    r.add(1, 1000, 10000)
    r.add(1, -1000, 10000)              # warm up both branches
    r.add_mwh(2, 3)
    r.add_mwh(2, -3)
    n = 0
    if hasattr(gc, "mem_alloc"):        # MicroPython only
        gc.collect()
        gc.disable()
        before = gc.mem_alloc()
        while n < 1000:
            r.add(n & 3, 2500 - (n & 7) * 700, 10000)
            r.add_mwh(n & 3, 1234 - (n & 1) * 2468)
            n += 1
        after = gc.mem_alloc()
        gc.enable()
        assert after == before, "add() allocated %d bytes" % (after - before)
    else:
        while n < 1000:
            r.add(n & 3, 2500 - (n & 7) * 700, 10000)
            r.add_mwh(n & 3, 1234 - (n & 1) * 2468)
            n += 1
    assert r.imp[0] > 0 and r.exp[0] > 0


def test_restore_exact_after_reboot():
    p = _path()
    try:
        flash, st = _store(p)
        assert not st.load() and st.regs.state() == [(0, 0, 0, 0)] * NCH
        assert st.lost_wh_bound == 0 and st.bad_slots == 0
        for k in range(1, 7):           # more saves than slots: wraps around
            _fill(st.regs, k)
            st.save()
        want = st.regs.state()
        assert want[0][0] > 0 and want[0][1] > 0 and want[0][2] > 0
        flash2, st2 = _store(p)         # reboot
        assert st2.load()
        assert st2.regs.state() == want
        assert st2.seq == 6 and st2.slot == 1
        assert st2.lost_wh_bound == st2.loss_bound_wh() > 0
        # and it goes on from there
        _fill(st2.regs, 9)
        st2.save()
        want = st2.regs.state()
        flash3, st3 = _store(p)
        assert st3.load() and st3.regs.state() == want and st3.seq == 7
    finally:
        _remove(p)


def test_other_nch_or_garbage_is_ignored():
    p = _path()
    try:
        flash = SimFlash(p, 4 * SLOT)
        other = RegisterStore(flash, 2, slot_size=SLOT)
        other.regs.add_mwh(0, 99000)
        other.save()
        st = RegisterStore(flash, NCH, slot_size=SLOT)
        assert not st.load() and st.bad_slots == 1
        flash.write(SLOT, b"\x00" * SLOT)
        assert not st.load() and st.bad_slots == 2
        assert st.regs.state() == [(0, 0, 0, 0)] * NCH
        # too small a region, or a record bigger than a slot
        for size, slot in ((SLOT, SLOT), (4 * 64, 64)):
            try:
                RegisterStore(SimFlash(p, size), NCH, slot_size=slot)
            except ValueError:
                continue
            raise AssertionError("accepted %d/%d" % (size, slot))
    finally:
        _remove(p)


def test_torn_write_keeps_previous():
    p = _path()
    try:
        flash, st = _store(p)
        for k in range(1, 4):
            _fill(st.regs, k)
            st.save()
        want = st.regs.state()
        _fill(st.regs, 5)
        flash.die_after = record_len(NCH) // 2
        try:
            st.save()
        except FlashDied:
            pass
        else:
            raise AssertionError("save survived a power cut")
        flash2, st2 = _store(p)          # reboot
        assert st2.load()
        assert st2.regs.state() == want and st2.seq == 3
        assert st2.bad_slots == 1        # the torn slot
        # the next save overwrites the torn slot and is read back
        st2.regs.add_mwh(0, 1500)
        st2.save()
        want = st2.regs.state()
        flash3, st3 = _store(p)
        assert st3.load() and st3.regs.state() == want and st3.bad_slots == 0
    finally:
        _remove(p)


def test_torn_write_at_every_offset():
    n = record_len(NCH)
    p = _path()
    try:
        for cut in range(n + 1):
            _remove(p)
            flash, st = _store(p, nslots=3)
            # the slot being overwritten already holds an older record
            for k in range(1, 3 + cut % 3):
                _fill(st.regs, k)
                st.save()
            old = st.regs.state()
            _fill(st.regs, 7)
            new = st.regs.state()
            flash.die_after = cut
            died = False
            try:
                st.save()
            except FlashDied:
                died = True
            assert died == (cut < n), cut
            flash2, st2 = _store(p, nslots=3)
            assert st2.load(), cut
            got = st2.regs.state()
            if cut < n:
                assert got == old, "cut at %d: %r" % (cut, got)
            else:
                assert got == new
    finally:
        _remove(p)


def test_save_policy():
    p = _path()
    try:
        flash, st = _store(p, save_wh=10, min_interval_ms=60000, max_interval_ms=900000)
        st.load()
        t = 0
        assert not st.maybe_save(t)          # nothing changed
        st.regs.add_mwh(0, 500)              # tiny change
        for t in range(10000, 890001, 10000):
            assert not st.maybe_save(t), t
        assert st.maybe_save(900000)         # max interval with a change
        assert st.saves == 1
        # a big change waits for the minimum interval
        st.regs.add_mwh(1, -10000)           # 10 Wh exported on channel 1
        assert not st.maybe_save(910000) and not st.maybe_save(959999)
        assert st.maybe_save(960000)         # 60 s after the last save
        assert st.saves == 2
        st.regs.add_mwh(2, 9000)             # 9 Wh: below the threshold
        assert not st.maybe_save(1080000)
        st.regs.add_mwh(2, 1000)             # now 10 Wh
        assert st.maybe_save(1090000)
        assert st.saves == 3
        assert not st.maybe_save(5000000)    # no change: never writes
        # never every reading: 1 kW for an hour of 10 s readings saves about
        # once a minute (at 40 s, then every 60 s)
        t0 = 5000000
        for i in range(1, 361):
            st.regs.add(0, 1000, 10000)
            st.maybe_save(t0 + i * 10000)
        assert st.saves - 3 == 60, st.saves
    finally:
        _remove(p)


def test_save_policy_across_the_tick_wrap():
    # the board's clock (ticks_ms, period 2^30 ms) passes 2^29 and 2^30
    # while nothing changes for 8 days; the first change afterwards is
    # saved at once (the max interval passed long ago), and the intervals
    # after that are measured right across the wrap
    from firmware.hal import ticks_add
    p = _path()
    try:
        flash, st = _store(p, save_wh=10, min_interval_ms=60000, max_interval_ms=900000)
        st.load()
        t = (1 << 29) - 7200000
        assert not st.maybe_save(t)
        for _ in range(8 * 24):
            t = ticks_add(t, 3600000)
            assert not st.maybe_save(t)     # no change: never writes
        st.regs.add_mwh(0, 500)
        t = ticks_add(t, 10000)
        assert st.maybe_save(t) and st.saves == 1
        # now 10 s readings with the clock starting 100 s before the wrap:
        # a small change waits for the max interval (900 s), a big one for
        # the min interval (60 s), both counted across the wrap
        t = (1 << 30) - 100000
        st.maybe_save(t)
        st.save(t)
        saves = st.saves
        for i in range(1, 90):
            st.regs.add_mwh(0, 1)
            t = ticks_add(t, 10000)
            assert not st.maybe_save(t), i
        st.regs.add_mwh(0, 1)
        t = ticks_add(t, 10000)
        assert st.maybe_save(t) and st.saves == saves + 1       # at 900 s
        st.regs.add_mwh(1, -20000)
        for i in range(1, 6):
            t = ticks_add(t, 10000)
            assert not st.maybe_save(t), i
        t = ticks_add(t, 10000)
        assert st.maybe_save(t) and st.saves == saves + 2       # at 60 s
    finally:
        _remove(p)


def test_clean_shutdown_and_lost_bound():
    p = _path()
    try:
        flash, st = _store(p)
        st.load()
        _fill(st.regs, 1)
        st.save(0, clean=True)
        want = st.regs.state()
        flash2, st2 = _store(p)
        assert st2.load() and st2.regs.state() == want
        assert st2.clean and st2.lost_wh_bound == 0
        # the first change after a clean stop is saved at once
        st2.maybe_save(0)
        st2.regs.add_mwh(0, 1)
        assert st2.maybe_save(1000) and not st2.clean
        flash3, st3 = _store(p)
        assert st3.load() and not st3.clean and st3.lost_wh_bound == st3.loss_bound_wh()
        # the bound, defaults: 23 kW may flow for 5 min + one 10 s reading
        assert st3.loss_bound_wh() == (23000 * 310 + 3599) // 3600
        # brief's defaults: 60 s minimum interval
        b = RegisterStore(flash3, NCH, slot_size=SLOT, save_wh=10, min_interval_ms=60000,
                          max_interval_ms=900000, max_w=23000)
        assert b.loss_bound_wh() == (23000 * 70 + 3599) // 3600
        # small power limit
        b = RegisterStore(flash3, NCH, slot_size=SLOT, save_wh=100, max_w=100)
        # 100 W: the hour of max_interval (plus a reading) bounds it
        assert b.loss_bound_wh() == (100 * 3610 + 3599) // 3600 == 101
    finally:
        _remove(p)


class _EraseFlash(SimFlash):
    """SimFlash that, like real NOR flash, only clears bits on write."""

    def __init__(self, path, size):
        SimFlash.__init__(self, path, size)
        self.erased = []

    def erase(self, off, n):
        self.erased.append((off, n))
        SimFlash.write(self, off, b"\xff" * n)

    def write(self, off, data):
        cur = self.read(off, len(data))
        SimFlash.write(self, off, bytes(a & b for a, b in zip(cur, data)))


def test_erase_hook_before_each_slot_write():
    p = _path()
    try:
        flash = _EraseFlash(p, 4 * SLOT)
        st = RegisterStore(flash, NCH, slot_size=SLOT)
        st.load()
        for k in range(1, 10):
            _fill(st.regs, k)
            st.save()
        assert flash.erased == [((i % 4) * SLOT, SLOT) for i in range(9)]
        want = st.regs.state()
        st2 = RegisterStore(_EraseFlash(p, 4 * SLOT), NCH, slot_size=SLOT)
        assert st2.load() and st2.regs.state() == want and st2.seq == 9
    finally:
        _remove(p)


def _house(step, lcg):
    """Power (W) of 4 channels at 10 s reading `step` of a day: grid (import
    positive, export negative), solar (negative: production), kitchen, fridge."""
    h = step // 360                      # hour of day
    if h < 6:
        base = 150
    elif h < 8:
        base = 800
    elif h < 17:
        base = 300
    elif h < 22:
        base = 1200
    else:
        base = 400
    m = step % 360
    kitchen = 2000 if h in (7, 12, 18) and m < 18 else 20   # 3 min kettle
    fridge = 90 if (step // 60) % 3 == 0 else 2
    solar = 0
    if 9 <= h < 17:
        x = step - 9 * 360                # 0 .. 2880
        solar = -(2500 * x * (2880 - x) // (1440 * 1440))
    noise = (lcg % 101) - 50
    house = base + kitchen + fridge + noise
    return house + solar, solar, kitchen, fridge


def test_wear_one_day_of_house():
    p = _path()
    try:
        flash = SimFlash(p, 16 * 256)
        st = RegisterStore(flash, 4, slot_size=256)
        st.load()
        lcg = 12345
        for step in range(1, 8641):       # 24 h of 10 s readings
            lcg = (lcg * 1103515245 + 12345) & 0x7FFFFFFF
            pw = _house(step, lcg >> 8)
            for ch in range(4):
                st.regs.add(ch, pw[ch], 10000)
            st.maybe_save(step * 10000)
        day = 8640 * 10000
        per_day, per_slot = st.wear_per_day(day)
        imp = st.regs.imp[0]
        assert 8000 < imp < 16000, imp   # a plausible house day
        assert st.regs.exp[1] > 8000     # and a plausible solar day
        assert per_day == st.saves and 50 <= st.saves <= 110, st.saves
        assert per_slot == (st.saves + 15) // 16
        # worst case: every channel at full power all day
        worst = RegisterStore(flash, 4, slot_size=256)
        worst.load()
        for step in range(1, 8641):
            worst.regs.add(0, 23000, 10000)
            worst.maybe_save(step * 10000)
        assert worst.saves <= 86400000 // worst.min_interval_ms
    finally:
        _remove(p)


def test_module_constants():
    assert record_len(0) == 16 and record_len(16) == 16 + 24 * 16
    assert energy.FLAG_CLEAN == 1
