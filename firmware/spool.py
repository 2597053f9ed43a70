# Store and forward: signed reading frames kept in a ring of flash blocks
# while the broker is unreachable, handed back oldest first, and removed only
# once the broker acknowledged them.
#
# Layout. The region is cut into erase blocks (4096 bytes on the ESP32). A
# block in use starts with a header
#     <IIII  magic "PGS1", block number (u32, +1 for every block opened),
#            dropped so far (records lost to a full ring), CRC-32 of the 12
#            bytes before it
# and then holds records back to back:
#     <HBBI  data length, state (0xFF waiting, 0x00 delivered), 0xA5,
#            CRC-32 of the data
#     data
# A record never spans two blocks. Blocks are opened in physical ring order,
# so reading them by block number is reading them in append order.
#
# NOR flash only turns 1-bits into 0-bits without an erase; the layout uses
# that: a record is programmed once into erased space, and "delivered" is
# one byte programmed from 0xFF to 0x00 in place. A block is erased only when
# the ring wraps onto it. When that block still holds waiting records (the
# ring is full), they are dropped and counted; the count travels in the next
# block header, so it survives reboots.
#
# Power loss. mount() trusts only what checks out: a block whose header
# fails is free; inside a block, records are read up to the first one whose
# length, marker byte or CRC is wrong (a torn write is always the last thing
# in its block, because after a failed write the next record opens a new
# block). A torn "delivered" byte is one byte: either it was written or the
# record is sent again, and the gateway drops an exact duplicate quietly
# (PROTOCOL.md 7.4). An interrupted erase leaves a block whose header or
# records fail their checks; it is erased again before it is reused.
#
# Figures (120-byte frames): 31 records per 4 KB block (16 + 31 x 128 =
# 3984 bytes); a 1.5 MB region has 384 blocks, 11 904 records: 33 h at one
# reading per 10 s. Each block is erased once per trip round the ring, i.e.
# with every reading spooled (a board that is always offline), 8640 / 11 904
# = 0.73 erases per block a day: a 100 000-cycle flash lasts centuries.
import struct
import binascii

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

_MAGIC = const(0x31534750)      # b"PGS1" read as little-endian u32
_BHDR = "<IIII"
_BHDR_LEN = const(16)
_RHDR = "<HBBI"
_RHDR_LEN = const(8)
_WAITING = const(0xFF)
_DONE = const(0x00)
_MARK = const(0xA5)
_BLANK_LEN = const(0xFFFF)


def _crc(data):
    return binascii.crc32(data) & 0xFFFFFFFF


class Spool:
    def __init__(self, flash, block_size=4096, max_record=512):
        self.flash = flash
        self.bs = block_size
        self.n = flash.size // block_size
        if self.n < 3:
            raise ValueError("spool needs at least 3 blocks")
        if max_record + _RHDR_LEN + _BHDR_LEN > block_size:
            raise ValueError("max_record does not fit a block")
        self.max_record = max_record
        self._rec = bytearray(_RHDR_LEN + max_record)
        self._hdr = bytearray(_BHDR_LEN)
        self._rh = bytearray(_RHDR_LEN)    # a record's header, read from flash
        self._blank = None
        self.bno = [-1] * self.n        # block number of each block, -1: free
        self.head = -1                  # block being filled
        self.hoff = 0                   # next free byte in it
        self.closed = True              # head takes no more records
        self.tb = -1                    # block of the oldest waiting record
        self.toff = 0
        self.tlen = 0                   # its length once peeked, else 0
        self.count = 0
        self.dropped = 0
        self.bad = 0                    # blocks or records refused at mount
        self.blocks_erased = 0

    # -- mount ---------------------------------------------------------------

    # Reads go into the spool's own buffers (Flash.readinto): mounting a
    # region of hundreds of blocks, or replaying a day of records, leaves
    # no garbage in the board's heap.

    def _header(self, b):
        d = self._hdr
        self.flash.readinto(b * self.bs, d)
        # the magic in two 16-bit halves: most headers of a mount are erased
        # ones, and unpacking 0xFFFFFFFF makes a long int on a 32-bit board
        if d[0] | d[1] << 8 != _MAGIC & 0xFFFF or d[2] | d[3] << 8 != _MAGIC >> 16:
            for i in range(_BHDR_LEN):
                if d[i] != 0xFF:
                    self.bad += 1       # not an erased header either
                    break
            return None
        magic, bno, dropped, crc = struct.unpack_from(_BHDR, d, 0)
        if _crc(memoryview(d)[:12]) != crc:
            self.bad += 1
            return None
        return bno, dropped

    def _record(self, addr):
        """The record header at addr: (length, state, mark, crc)."""
        self.flash.readinto(addr, self._rh)
        return struct.unpack_from(_RHDR, self._rh, 0)

    def _data_ok(self, addr, n, crc, buf):
        """Read n bytes of record data at addr into buf and check them."""
        v = memoryview(buf)[:n]
        self.flash.readinto(addr, v)
        return len(v) == n and _crc(v) == crc

    def _scan(self, b):
        """Walk the records of block b. Returns (end offset of valid
        records, waiting count, offset of the first waiting record or 0,
        whether a bad record ended the walk)."""
        off = _BHDR_LEN
        waiting = 0
        first = 0
        bs = self.bs
        base = b * bs
        while off + _RHDR_LEN <= bs:
            n, state, mark, crc = self._record(base + off)
            if n == _BLANK_LEN and state == 0xFF and mark == 0xFF:
                break
            if mark != _MARK or n == 0 or n > self.max_record or off + _RHDR_LEN + n > bs:
                self.bad += 1
                return off, waiting, first, True
            if state == _WAITING:
                if not self._data_ok(base + off + _RHDR_LEN, n, crc, self._rec):
                    self.bad += 1
                    return off, waiting, first, True
                if not first:
                    first = off
                waiting += 1
            off += _RHDR_LEN + n
        return off, waiting, first, False

    def mount(self):
        """Rebuild the state from flash. Returns the number of waiting records."""
        self.bad = 0
        order = []
        for b in range(self.n):
            h = self._header(b)
            if h is None:
                self.bno[b] = -1
            else:
                self.bno[b] = h[0]
                order.append((h[0], b, h[1]))
        order.sort()
        self.count = 0
        self.tb = -1
        self.toff = 0
        self.tlen = 0
        self.dropped = 0
        if not order:
            self.head = self.n - 1
            self.hoff = self.bs
            self.closed = True
            return 0
        # blocks of an older pass that lie after a gap are stale copies of
        # an earlier ring layout: only the run of consecutive numbers ending
        # at the newest block is the ring
        newest = order[-1][0]
        run = [x for x in order if x[0] > newest - self.n]
        for bno, b, dropped in run:
            end, waiting, first, torn = self._scan(b)
            if waiting and self.tb < 0:
                self.tb = b
                self.toff = first
            self.count += waiting
            self.dropped = dropped
            self.head = b
            self.hoff = end
            self.closed = torn
        return self.count

    # -- append ----------------------------------------------------------------

    def _erase(self, b):
        off = b * self.bs
        e = getattr(self.flash, "erase", None)
        if e is not None:
            e(off, self.bs)
        else:
            if self._blank is None:
                self._blank = b"\xff" * self.bs
            self.flash.write(off, self._blank)
        self.blocks_erased += 1

    def _open_block(self):
        nb = (self.head + 1) % self.n
        if self.bno[nb] >= 0 and self.count:
            # the ring is full: whatever still waits in nb is lost
            _, waiting, _, _ = self._scan(nb)
            if waiting:
                self.dropped += waiting
                self.count -= waiting
                if self.tb == nb:
                    self.tb = (nb + 1) % self.n
                    self.toff = _BHDR_LEN
                    self.tlen = 0
        newest = self.bno[self.head] if self.head >= 0 else -1
        bno = newest + 1 if newest >= 0 else 0
        for x in self.bno:
            if x >= bno:
                bno = x + 1
        self.bno[nb] = -1
        self.head = nb
        self.closed = True
        self._erase(nb)
        h = self._hdr
        struct.pack_into(_BHDR, h, 0, _MAGIC, bno, self.dropped & 0xFFFFFFFF, 0)
        struct.pack_into("<I", h, 12, _crc(memoryview(h)[:12]))
        self.flash.write(nb * self.bs, h)
        self.bno[nb] = bno
        self.hoff = _BHDR_LEN
        self.closed = False
        if self.count == 0:
            self.tb = -1

    def append(self, data):
        """Store one frame. Raises ValueError for an empty or oversized frame
        and whatever the flash raises; the spool stays consistent either way."""
        n = len(data)
        if n == 0 or n > self.max_record:
            raise ValueError("record of %d bytes" % n)
        need = _RHDR_LEN + n
        if self.closed or self.hoff + need > self.bs:
            self._open_block()
        rec = self._rec
        struct.pack_into(_RHDR, rec, 0, n, _WAITING, _MARK, _crc(data))
        rec[_RHDR_LEN:need] = data
        off = self.hoff
        self.closed = True              # until the write is known complete
        self.flash.write(self.head * self.bs + off, memoryview(rec)[:need])
        self.closed = False
        self.hoff = off + need
        if self.count == 0:
            self.tb = self.head
            self.toff = off
            self.tlen = 0
        self.count += 1

    # -- replay ------------------------------------------------------------------

    def _next_block(self):
        self.tb = (self.tb + 1) % self.n
        self.toff = _BHDR_LEN
        self.tlen = 0

    def peek(self, buf):
        """Read the oldest waiting record into buf (at least max_record
        bytes; its contents are undefined when 0 comes back); its length,
        or 0."""
        for _ in range(self.n * 64):
            if self.count == 0 or self.tb < 0:
                return 0
            if self.toff + _RHDR_LEN > self.bs or self.bno[self.tb] < 0:
                self._next_block()
                continue
            base = self.tb * self.bs + self.toff
            n, state, mark, crc = self._record(base)
            if mark != _MARK or n == 0 or n > self.max_record or self.toff + _RHDR_LEN + n > self.bs:
                self._next_block()          # end of this block's records
                continue
            if state != _WAITING:
                self.toff += _RHDR_LEN + n  # delivered before a reboot
                continue
            if not self._data_ok(base + _RHDR_LEN, n, crc, buf):
                self._next_block()
                continue
            self.tlen = n
            return n
        return 0

    def pop(self):
        """Mark the record last returned by peek() delivered."""
        if not self.tlen:
            if not self.peek(self._rec):
                return False
        self.flash.write(self.tb * self.bs + self.toff + 2, b"\x00")
        self.toff += _RHDR_LEN + self.tlen
        self.tlen = 0
        self.count -= 1
        return True

    # -- figures -------------------------------------------------------------------

    def capacity_bytes(self):
        return self.n * (self.bs - _BHDR_LEN)

    def capacity_records(self, record_len):
        """Frames of record_len bytes the ring holds when full (one block is
        always being reopened, so n - 1 blocks count)."""
        per = (self.bs - _BHDR_LEN) // (_RHDR_LEN + record_len)
        return per * (self.n - 1)
