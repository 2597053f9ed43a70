# The flash ring buffer for readings (firmware/spool.py) on simulated NOR
# flash: order across blocks and reboots, a full ring, torn writes, torn
# erases, garbage, capacity.
import os

from boardsim.hal_sim import NorFlash, FlashDied
from firmware.spool import Spool
from util import Skip

try:
    import time
    _STAMP = time.ticks_us() if hasattr(time, "ticks_us") else int(time.time() * 1000000)
except ImportError:  # pragma: no cover
    _STAMP = 0

_count = [0]
BS = 512            # small blocks keep the tests quick; the code is size-agnostic


def _path():
    _count[0] += 1
    p = "/tmp/pg-test-spool-%d-%d.bin" % (_STAMP & 0xFFFFFF, _count[0])
    try:
        os.remove(p)
    except OSError:
        pass
    return p


def _frame(i, n=40):
    # distinct, recognisable frames of n bytes
    b = bytearray(n)
    for k in range(n):
        b[k] = (i * 7 + k) & 0xFF
    b[0] = i & 0xFF
    b[1] = (i >> 8) & 0xFF
    return bytes(b)


def _spool(path, blocks=8, bs=BS, max_record=200):
    f = NorFlash(path, blocks * bs, block=bs)
    s = Spool(f, block_size=bs, max_record=max_record)
    s.mount()
    return f, s


def _drain(s, limit=100000):
    out = []
    buf = bytearray(s.max_record)
    while limit:
        n = s.peek(buf)
        if not n:
            break
        out.append(bytes(buf[:n]))
        assert s.pop()
        limit -= 1
    return out


def test_order_within_and_across_blocks():
    p = _path()
    f, s = _spool(p)
    for i in range(30):
        s.append(_frame(i))
    assert s.count == 30
    got = _drain(s)
    assert got == [_frame(i) for i in range(30)]
    assert s.count == 0 and s.peek(bytearray(200)) == 0


def test_remount_keeps_order_and_count():
    p = _path()
    f, s = _spool(p)
    for i in range(25):
        s.append(_frame(i, 30 + i))
    buf = bytearray(200)
    for i in range(9):
        n = s.peek(buf)
        assert bytes(buf[:n]) == _frame(i, 30 + i)
        s.pop()
    f2, s2 = _spool(p)
    assert s2.count == 16
    for i in range(25, 31):
        s2.append(_frame(i, 30 + i))
    got = _drain(s2)
    assert got == [_frame(i, 30 + i) for i in range(9, 31)]
    f3, s3 = _spool(p)
    assert s3.count == 0 and s3.peek(buf) == 0


def test_full_ring_drops_oldest_and_counts():
    p = _path()
    f, s = _spool(p, blocks=4)
    per = (BS - 16) // (8 + 40)             # records per block
    total = per * 4 + 25
    for i in range(total):
        s.append(_frame(i))
    assert s.dropped > 0
    assert s.count + s.dropped == total
    got = _drain(s)
    assert got == [_frame(i) for i in range(s.dropped, total)]
    f2, s2 = _spool(p, blocks=4)
    assert s2.dropped == s.dropped           # kept in the block headers


def test_wear_one_erase_per_block_per_pass():
    p = _path()
    f, s = _spool(p, blocks=4)
    per = (BS - 16) // (8 + 40)
    for i in range(per * 4 * 3):
        s.append(_frame(i))
        assert s.pop() or True
        _drain(s)
    # three passes over four blocks: about 12 erases, never one per record
    assert 10 <= f.erases <= 14, f.erases


def test_torn_record_write_at_every_byte():
    n = 40
    for cut in range(0, 8 + n):
        p = _path()
        f, s = _spool(p)
        for i in range(5):
            s.append(_frame(i, n))
        f.die_after = cut
        try:
            s.append(_frame(99, n))
        except FlashDied:
            pass
        else:
            raise AssertionError("write was not torn")
        # the board keeps going after the failure, and after a reboot
        s.append(_frame(100, n))
        assert _drain(s) == [_frame(i, n) for i in range(5)] + [_frame(100, n)]
        f2, s2 = _spool(p)
        assert s2.count == 0, (cut, s2.count)
        s2.append(_frame(101, n))
        assert _drain(s2) == [_frame(101, n)]
        os.remove(p)


def test_torn_write_then_reboot_keeps_earlier_records():
    n = 40
    for cut in (0, 1, 3, 8, 20, 47):
        p = _path()
        f, s = _spool(p)
        for i in range(7):
            s.append(_frame(i, n))
        f.die_after = cut
        try:
            s.append(_frame(99, n))
        except FlashDied:
            pass
        f2, s2 = _spool(p)          # power came back
        assert s2.count == 7, (cut, s2.count)
        s2.append(_frame(7, n))
        assert _drain(s2) == [_frame(i, n) for i in range(8)]
        os.remove(p)


def test_torn_delivered_marker():
    p = _path()
    f, s = _spool(p)
    for i in range(4):
        s.append(_frame(i))
    buf = bytearray(200)
    s.peek(buf)
    f.die_after = 0                 # the one-byte marker write does not happen
    try:
        s.pop()
    except FlashDied:
        pass
    f2, s2 = _spool(p)
    # the record is sent again (an exact duplicate), nothing is lost
    assert _drain(s2) == [_frame(i) for i in range(4)]


def test_torn_block_header_and_torn_erase():
    p = _path()
    f, s = _spool(p, blocks=4)
    per = (BS - 16) // (8 + 40)
    for i in range(per):
        s.append(_frame(i))
    # the next append opens a block: tear its header write
    f.die_after = 5
    try:
        s.append(_frame(per))
    except FlashDied:
        pass
    f2, s2 = _spool(p, blocks=4)
    assert s2.count == per
    s2.append(_frame(per + 1))
    assert _drain(s2) == [_frame(i) for i in range(per)] + [_frame(per + 1)]
    # fill the ring so it wraps, and cut power in the middle of an erase
    for i in range(per * 3 + 2):
        s2.append(_frame(1000 + i))
    f2.die_in_erase = BS // 2
    try:
        for i in range(per * 2):
            s2.append(_frame(2000 + i))
    except FlashDied:
        pass
    f3, s3 = _spool(p, blocks=4)
    got = _drain(s3)
    # what survived is in order, and every frame is one we wrote
    idx = [g[0] | g[1] << 8 for g in got]
    assert idx == sorted(idx), idx
    assert all(g == _frame(g[0] | g[1] << 8) for g in got)


def test_garbage_region_mounts_and_works():
    p = _path()
    f = NorFlash(p, 6 * BS, block=BS)
    junk = bytearray(6 * BS)
    x = 12345
    for i in range(len(junk)):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
        junk[i] = (x >> 16) & 0xFF
    with open(p, "wb") as fh:
        fh.write(junk)
    s = Spool(f, block_size=BS, max_record=200)
    assert s.mount() == 0
    for i in range(20):
        s.append(_frame(i))
    f2, s2 = _spool(p, blocks=6)
    assert _drain(s2) == [_frame(i) for i in range(20)]


def test_bad_sizes_rejected():
    p = _path()
    f, s = _spool(p)
    for bad in (b"", bytes(201)):
        try:
            s.append(bad)
        except ValueError:
            continue
        raise AssertionError("accepted %d bytes" % len(bad))
    assert s.count == 0


def test_capacity_24h_in_1_5_mb():
    # the board's default: 1536 KB of 4 KB blocks; a 4-CT reading with an
    # inverter is at most ~132 bytes (PROTOCOL.md section 9)
    class Size:
        size = 1536 * 1024

    s = Spool(Size(), block_size=4096, max_record=512)
    assert s.capacity_records(120) >= 8640
    assert s.capacity_records(132) >= 8640
    assert s.capacity_records(120) * 10 / 3600 >= 24


def test_capacity_matches_filling():
    p = _path()
    f, s = _spool(p, blocks=5)
    i = 0
    while s.dropped == 0:
        s.append(_frame(i))
        i += 1
    # just before the first drop the ring held at least the promised count
    assert i - 1 >= s.capacity_records(40)


def test_mount_reads_into_its_own_buffers():
    # a board mounts its whole region at every boot (384 blocks of a 1.5 MB
    # partition): the headers are read into the spool's buffer, so the
    # garbage left does not grow with the region (it was ~200 B a block)
    import gc
    if not hasattr(gc, "mem_alloc"):
        raise Skip("heap accounting exists on MicroPython only")
    from boardsim.hal_sim import RamNorFlash

    def mount_alloc(blocks):
        s = Spool(RamNorFlash("ram", blocks * BS, block=BS), block_size=BS, max_record=200)
        gc.collect()
        gc.disable()
        a = gc.mem_alloc()
        s.mount()
        b = gc.mem_alloc()
        gc.enable()
        return b - a

    few, many = mount_alloc(8), mount_alloc(72)
    # the simulated flash's readinto takes one memoryview slice a read
    assert many - few <= 64 * 48, (few, many)
