# Per-channel cumulative energy registers and their wear-bounded persistence,
# and Result: what one channel measured, whichever front end measured it.
#
# Registers: for every channel an import and an export register in whole Wh
# plus the part of a Wh not yet counted, all integers. Energy is kept in
# W*ms (1 Wh = 3 600 000 W*ms), so both `add(ch, power_w, dt_ms)` and
# `add_mwh(ch, mwh)` are exact. Positive energy goes to import, negative to
# export; neither register ever goes down. The arrays are made once, so
# add() allocates nothing on MicroPython. A register holds up to 2**32 - 1 Wh
# (4.29 GWh, 21 years of 23 kW without a pause); past 2**30 Wh a 32-bit board
# makes a long int whenever a whole Wh is carried. Records store u64, so the
# format does not need to change if the arrays are ever widened.
#
# RegisterStore: the registers in a flash region cut into N equal slots.
# A record is
#     header  <IIHH  magic, sequence, nch, flags (bit 0: clean shutdown)
#     nch x   <QQII  import Wh, export Wh, import rest, export rest (W*ms)
#     crc     <I     CRC-32 of everything before it
# and saves go round-robin to the slot after the newest one. load() reads
# every slot and keeps the valid record (magic, nch and CRC right) with the
# highest sequence number. A save never touches the slot holding the newest
# valid record, so a write torn by a power cut costs at most what was not yet
# saved; the torn slot fails its CRC and is ignored.
#
# Flash: real NOR flash must be erased before it is programmed again. Each
# slot is meant to be one erase block (slot_size 4096 on the ESP32) and save()
# calls `flash.erase(off, slot_size)` before writing, if the flash object has
# an `erase` method. SimFlash has none and allows overwriting, so there the
# hook is a no-op. Sequence numbers are u32: at a few hundred saves a day they
# do not wrap within the life of the board.
#
# Save policy (maybe_save, called once per reading, at least every period_ms):
#   * nothing changed since the last save: never write;
#   * some channel moved by save_wh or more and min_interval_ms passed: write;
#   * anything changed and max_interval_ms passed: write;
#   * the last record says "clean shutdown" and something changed: write at
#     once, so that a later crash is not taken for a clean stop.
# Worst case that is 86 400 000 / min_interval_ms saves a day (288 with the
# defaults), whatever the load. Defaults: save_wh 250, min_interval 5 min,
# max_interval 1 h. A house with solar whose busiest channel moves ~25 kWh a
# day saves about 100 times; 10 Wh / 60 s / 15 min would write over 1000
# times a day for the same house. Each slot sees saves_per_day / nslots
# erase cycles a day: with 16 slots of 4 KB, 100 saves a day is ~6 cycles a
# day per block, ~44 years to a 100 000-cycle flash; the worst case ~15.
#
# Energy an unclean reset can lose (lost_wh_bound, per register, Wh): while
# any channel changes, maybe_save writes within max(min_interval, the time
# the channel needs to move save_wh) plus one reading period. With every
# channel at most max_w watts, a register can be short by no more than
#     min(max_w * (max_interval + period),
#         max(save_wh + 2, max_w * min_interval) + max_w * period)
# (the 2 Wh cover the whole-Wh comparison of import and export). A record
# written by save(clean=True) means nothing was unsaved: the bound is 0.
import struct
from array import array

import binascii

from firmware.hal import ticks_diff as _ticks_diff

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

_WMS_PER_WH = const(3600000)    # W*ms in one Wh
_WMS_PER_MWH = const(3600)
_MAGIC = const(0x31454750)      # b"PGE1" read as little-endian u32
_HDR = "<IIHH"
_HDR_LEN = const(12)
_CH = "<QQII"
_CH_LEN = const(24)
_CRC_LEN = const(4)
FLAG_CLEAN = const(1)


def record_len(nch):
    """Bytes one record of nch channels takes in a slot."""
    return _HDR_LEN + _CH_LEN * nch + _CRC_LEN


class Result:
    """Measured values of one channel in protocol units (integers), whichever
    front end measured them (metering.py's ADC path or the ATM90E32); the
    energy they add goes into the registers below."""

    def __init__(self):
        self.vrms_dv = 0
        self.irms_ma = 0
        self.p_w = 0
        self.s_va = 0
        self.pf_permille = 0
        self.freq_chz = 0
        self.fault = 0              # metering.FAULT_* bits seen in the period
        self.p_exact = 0.0          # real power before rounding, W


class Registers:
    """Cumulative import/export energy of nch channels, integers only."""

    def __init__(self, nch):
        self.nch = nch
        # "I" (u32), not "q": MicroPython reads a "q" item as a long int
        # object, i.e. allocates, even for a small value.
        self.imp = array("I", [0] * nch)        # whole Wh imported
        self.exp = array("I", [0] * nch)        # whole Wh exported
        self.imp_rest = array("I", [0] * nch)   # W*ms not yet a whole Wh
        self.exp_rest = array("I", [0] * nch)

    def add(self, ch, power_w, dt_ms):
        """Account power_w (signed, W) held for dt_ms milliseconds."""
        self.add_wms(ch, power_w * dt_ms)

    def add_mwh(self, ch, mwh):
        """Account mwh milli-Wh: positive is import, negative export."""
        self.add_wms(ch, mwh * _WMS_PER_MWH)

    def add_wms(self, ch, wms):
        """Account wms W*ms (signed). The hot path: no allocation."""
        if wms >= 0:
            r = self.imp_rest[ch] + wms
            if r >= _WMS_PER_WH:
                wh = r // _WMS_PER_WH
                self.imp[ch] += wh
                r -= wh * _WMS_PER_WH
            self.imp_rest[ch] = r
        else:
            r = self.exp_rest[ch] - wms
            if r >= _WMS_PER_WH:
                wh = r // _WMS_PER_WH
                self.exp[ch] += wh
                r -= wh * _WMS_PER_WH
            self.exp_rest[ch] = r

    def rest_mwh(self, ch):
        """(import, export) parts below one Wh, in whole mWh (rounded down)."""
        return self.imp_rest[ch] // _WMS_PER_MWH, self.exp_rest[ch] // _WMS_PER_MWH

    def get(self, ch):
        """(import Wh, export Wh, import rest W*ms, export rest W*ms)."""
        return self.imp[ch], self.exp[ch], self.imp_rest[ch], self.exp_rest[ch]

    def set(self, ch, imp, exp, imp_rest, exp_rest):
        self.imp[ch] = imp
        self.exp[ch] = exp
        self.imp_rest[ch] = imp_rest
        self.exp_rest[ch] = exp_rest

    def state(self):
        """Every channel's get(), as a list (for tests and status)."""
        return [self.get(ch) for ch in range(self.nch)]


class RegisterStore:
    """Registers kept in rotating slots of a Flash region (see the top)."""

    def __init__(self, flash, nch, regs=None, slot_size=4096, save_wh=250,
                 min_interval_ms=300000, max_interval_ms=3600000,
                 max_w=23000, period_ms=10000, diff=None):
        self.flash = flash
        self.nch = nch
        self.regs = regs if regs is not None else Registers(nch)
        self.rec_len = record_len(nch)
        self.slot_size = slot_size
        self.nslots = flash.size // slot_size
        if self.nslots < 2 or self.rec_len > slot_size:
            raise ValueError("flash region too small for two slots")
        self.save_wh = save_wh
        self.min_interval_ms = min_interval_ms
        self.max_interval_ms = max_interval_ms
        self.max_w = max_w
        self.period_ms = period_ms
        # tick arithmetic of the caller's clock (hal.ticks_diff); the default
        # is a board's (period 2^30 ms)
        self.diff = diff or _ticks_diff
        self._buf = bytearray(self.rec_len)
        self._last = Registers(nch)         # what the newest record holds
        self.seq = 0
        self.slot = self.nslots - 1         # so the first save goes to slot 0
        self.clean = False                  # newest record is a clean stop
        # ms since the last save, accumulated from the tick differences
        # between calls and held at its cap, so it stays right however long
        # nothing changes (one difference of tick values would turn
        # negative after 2^29 ms)
        self._t_prev = None
        self._since = 0
        self.found = False
        self.bad_slots = 0
        self.lost_wh_bound = 0
        self.saves = 0

    # -- flash -------------------------------------------------------------

    def erase(self, off, n):
        """Erase hook: real flash must be erased before it is written again."""
        e = getattr(self.flash, "erase", None)
        if e is not None:
            e(off, n)

    def _parse(self, data):
        """(seq, flags) if data is a valid record for our nch, else None."""
        n = self.rec_len
        if len(data) < n:
            return None
        magic, seq, nch, flags = struct.unpack_from(_HDR, data, 0)
        if magic != _MAGIC or nch != self.nch:
            return None
        (crc,) = struct.unpack_from("<I", data, n - _CRC_LEN)
        if binascii.crc32(memoryview(data)[:n - _CRC_LEN]) & 0xFFFFFFFF != crc:
            return None
        return seq, flags

    def load(self):
        """Restore the newest valid record into regs. True if one was found.
        Sets lost_wh_bound: 0 after a clean stop or on a blank region, else
        loss_bound_wh()."""
        best = None
        bad = 0
        data = self._buf        # each slot read into the save buffer: no garbage
        for i in range(self.nslots):
            self.flash.readinto(i * self.slot_size, data)
            got = self._parse(data)
            if got is None:
                for x in data:
                    if x != 0xFF:
                        bad += 1        # neither a record nor erased
                        break
                continue
            if best is None or got[0] > best[1]:
                best = (i, got[0], got[1])
        self.bad_slots = bad
        self.found = best is not None
        if best is None:
            # blank (a new board) or nothing readable: start from zero
            self.seq = 0
            self.slot = self.nslots - 1
            self.clean = False
            self.lost_wh_bound = 0
            self._snapshot()
            return False
        i, seq, flags = best
        self.flash.readinto(i * self.slot_size, data)
        for ch in range(self.nch):
            imp, exp, ir, er = struct.unpack_from(_CH, data, _HDR_LEN + _CH_LEN * ch)
            self.regs.set(ch, imp, exp, ir, er)
        self.slot = i
        self.seq = seq
        self.clean = bool(flags & FLAG_CLEAN)
        self.lost_wh_bound = 0 if self.clean else self.loss_bound_wh()
        self._snapshot()
        return True

    def save(self, now_ms=None, clean=False):
        """Write the registers to the next slot now. clean=True marks a clean
        shutdown (nothing may be added afterwards). Raises what the flash
        raises; then nothing here changes and the next save retries."""
        regs = self.regs
        buf = self._buf
        seq = self.seq + 1
        slot = (self.slot + 1) % self.nslots
        struct.pack_into(_HDR, buf, 0, _MAGIC, seq, self.nch,
                         FLAG_CLEAN if clean else 0)
        for ch in range(self.nch):
            struct.pack_into(_CH, buf, _HDR_LEN + _CH_LEN * ch, regs.imp[ch],
                             regs.exp[ch], regs.imp_rest[ch], regs.exp_rest[ch])
        n = self.rec_len - _CRC_LEN
        struct.pack_into("<I", buf, n, binascii.crc32(memoryview(buf)[:n]) & 0xFFFFFFFF)
        off = slot * self.slot_size
        self.erase(off, self.slot_size)
        self.flash.write(off, buf)
        self.seq = seq
        self.slot = slot
        self.clean = clean
        self.saves += 1
        if now_ms is not None:
            self._t_prev = now_ms
            self._since = 0
        self._snapshot()

    def _snapshot(self):
        last = self._last
        regs = self.regs
        for ch in range(self.nch):
            last.set(ch, regs.imp[ch], regs.exp[ch], regs.imp_rest[ch], regs.exp_rest[ch])

    # -- policy ------------------------------------------------------------

    def maybe_save(self, now_ms):
        """Save if the policy (see the top) says so. True if it saved.
        now_ms is a tick value; calls must come less than 2^29 ms apart."""
        if self._t_prev is None:
            self._t_prev = now_ms           # the clock starts at the first call
        d = self.diff(now_ms, self._t_prev)
        self._t_prev = now_ms
        if d > 0:
            cap = self.max_interval_ms if self.max_interval_ms > self.min_interval_ms \
                else self.min_interval_ms
            el = self._since + d
            self._since = el if el < cap else cap
        regs = self.regs
        last = self._last
        changed = False
        big = False
        for ch in range(self.nch):
            d = regs.imp[ch] - last.imp[ch] + regs.exp[ch] - last.exp[ch]
            if d >= self.save_wh:
                big = True
            if d or regs.imp_rest[ch] != last.imp_rest[ch] or regs.exp_rest[ch] != last.exp_rest[ch]:
                changed = True
        if not changed:
            return False
        el = self._since
        if self.clean or el >= self.max_interval_ms or (big and el >= self.min_interval_ms):
            self.save(now_ms)
            return True
        return False

    def loss_bound_wh(self):
        """Most Wh one register can be short after an unclean reset."""
        w = self.max_w
        by_time = w * (self.max_interval_ms + self.period_ms)
        by_size = max((self.save_wh + 2) * _WMS_PER_WH, w * self.min_interval_ms) \
            + w * self.period_ms
        wms = min(by_time, by_size)
        return (wms + _WMS_PER_WH - 1) // _WMS_PER_WH

    def wear_per_day(self, elapsed_ms):
        """(saves per day, erase/write cycles per slot per day), rounded up,
        from the saves counted over elapsed_ms."""
        day = 86400000
        elapsed_ms = max(elapsed_ms, 1)
        per_day = (self.saves * day + elapsed_ms - 1) // elapsed_ms
        return per_day, (per_day + self.nslots - 1) // self.nslots
