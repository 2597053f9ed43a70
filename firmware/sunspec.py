# SunSpec over Modbus: find a device's register map, read an inverter and a
# battery, and give the battery charge/discharge setpoints.
#
# Discovery: the marker "SunS" (0x5375 0x6E53) at 40000, 0 or 50000, then a
# chain of models, each [ID, L] followed by L registers, ended by ID 0xFFFF.
# The offsets below are those of the SunSpec model definitions (as shipped in
# pysunspec2's JSON; tests/test_sunspec_models.py checks every one against
# them), counted from the first register after ID and L.
#
# Values: integer models carry a scale factor (value x 10^sf); every type
# has a "not implemented" pattern that reads as None. Float models (111-113)
# carry IEEE 754 single floats, NaN for not implemented.
#
# Battery control uses model 124 (basic storage controls): StorCtl_Mod bit 0
# enables the charge limit, bit 1 the discharge limit; InWRte / OutWRte are
# the rates in percent of WChaMax (scaled by InOutWRte_SF); and
# InOutWRte_RvrtTms is the device's own revert timer: when it runs out the
# battery drops the setpoint by itself, so a board that dies does not leave
# it charging. The board sets it to the command's lease.
import struct

from firmware.modbus import ModbusError

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

BASES = (40000, 0, 50000)
_END = const(0xFFFF)
_MAX_MODELS = const(64)

# point types
U16 = const(0)
I16 = const(1)
ACC32 = const(2)
U32 = const(3)
SF = const(4)
ENUM = const(5)
F32 = const(6)
STR = const(7)
BITS = const(8)

# model -> ((name, offset, type, size), ...): the points the board uses
POINTS = {
    1: (("Mn", 0, STR, 16), ("Md", 16, STR, 16), ("SN", 48, STR, 16), ("DA", 64, U16, 1)),
    101: (("A", 0, U16, 1), ("A_SF", 4, SF, 1), ("PhVphA", 8, U16, 1), ("V_SF", 11, SF, 1),
          ("W", 12, I16, 1), ("W_SF", 13, SF, 1), ("Hz", 14, U16, 1), ("Hz_SF", 15, SF, 1),
          ("WH", 22, ACC32, 2), ("WH_SF", 24, SF, 1), ("St", 36, ENUM, 1)),
    111: (("A", 0, F32, 2), ("PhVphA", 14, F32, 2), ("W", 20, F32, 2), ("Hz", 22, F32, 2),
          ("WH", 30, F32, 2), ("St", 46, ENUM, 1)),
    120: (("WRtg", 1, U16, 1), ("WRtg_SF", 2, SF, 1), ("WHRtg", 17, U16, 1), ("WHRtg_SF", 18, SF, 1)),
    124: (("WChaMax", 0, U16, 1), ("StorCtl_Mod", 3, BITS, 1), ("ChaState", 6, U16, 1),
          ("ChaSt", 9, ENUM, 1), ("OutWRte", 10, I16, 1), ("InWRte", 11, I16, 1),
          ("InOutWRte_RvrtTms", 13, U16, 1), ("WChaMax_SF", 16, SF, 1),
          ("ChaState_SF", 20, SF, 1), ("InOutWRte_SF", 23, SF, 1)),
    201: (("W", 16, I16, 1), ("W_SF", 20, SF, 1), ("TotWhExp", 36, ACC32, 2),
          ("TotWhImp", 44, ACC32, 2), ("TotWh_SF", 52, SF, 1)),
    802: (("WChaRteMax", 2, U16, 1), ("WDisChaRteMax", 3, U16, 1), ("SoC", 9, U16, 1),
          ("ChaSt", 14, ENUM, 1), ("W", 45, I16, 1), ("WChaDisChaMax_SF", 52, SF, 1),
          ("SoC_SF", 54, SF, 1), ("W_SF", 61, SF, 1)),
}
# models sharing a layout
SAME = {102: 101, 103: 101, 112: 111, 113: 111, 202: 201, 203: 201, 204: 201}
# the length (L) each model has in the definitions; a device announcing
# another length for a model the board reads is refused
LENGTHS = {1: 66, 101: 50, 102: 50, 103: 50, 111: 60, 112: 60, 113: 60, 120: 26, 124: 24,
           201: 105, 202: 105, 203: 105, 204: 105, 802: 62}

INVERTERS = (101, 102, 103, 111, 112, 113)
# exception codes that say "no such register here" (2, illegal data address;
# some devices answer 3, illegal data value, for a count that runs past)
_REFUSED = (2, 3)
CHA_CHARGING = const(4)
CHA_DISCHARGING = const(3)


def layout(model):
    return POINTS.get(SAME.get(model, model))


def _s16(v):
    return v - 0x10000 if v & 0x8000 else v


def decode(regs, base, typ, size):
    """One point from a register list; None when not implemented."""
    v = regs[base]
    if typ == U16:
        return None if v == 0xFFFF else v
    if typ == I16 or typ == SF:
        return None if v == 0x8000 else _s16(v)
    if typ == ENUM or typ == BITS:
        return None if v == 0xFFFF else v
    if typ == ACC32 or typ == U32:
        w = v << 16 | regs[base + 1]
        if typ == ACC32:
            return None if w == 0 else w
        return None if w == 0xFFFFFFFF else w
    if typ == F32:
        f = struct.unpack(">f", struct.pack(">HH", v, regs[base + 1]))[0]
        return None if f != f else f
    if typ == STR:
        b = bytearray(2 * size)
        for i in range(size):
            r = regs[base + i]
            b[2 * i] = r >> 8
            b[2 * i + 1] = r & 0xFF
        s = bytes(b).split(b"\x00")[0]
        return s.decode() if s else None
    raise ValueError("point type")


def scaled(v, sf):
    """v x 10^sf as an integer (rounded), None if either is missing."""
    if v is None or sf is None:
        return None
    if sf >= 0:
        return v * 10 ** sf
    d = 10 ** -sf
    return (v + d // 2) // d if v >= 0 else -((-v + d // 2) // d)


def find_base(master, unit):
    """The register where "SunS" sits, trying 40000, 0 and 50000; None if
    the device does not speak SunSpec. A device that does not answer at all
    raises (ModbusError timeout)."""
    out = [0, 0]
    for base in BASES:
        try:
            master.read_holding_into(unit, base, 2, out)
        except ModbusError as e:
            if e.kind == "exception":
                continue        # illegal address: try the next base
            raise
        if out[0] == 0x5375 and out[1] == 0x6E53:
            return base
    return None


def scan(master, unit, base):
    """[(model id, first data register, L), ...] up to the end model."""
    models = []
    hdr = [0, 0]
    addr = base + 2
    for _ in range(_MAX_MODELS):
        if addr > 0xFFFF - 2:
            raise ValueError("SunSpec chain runs past the register space")
        master.read_holding_into(unit, addr, 2, hdr)
        mid, length = hdr[0], hdr[1]
        if mid == _END:
            return models
        models.append((mid, addr + 2, length))
        addr += 2 + length
    raise ValueError("SunSpec chain longer than %d models" % _MAX_MODELS)


class Device:
    """Common part: discovery and reading one model's points."""

    def __init__(self, master, unit):
        self.master = master
        self.unit = unit
        self.base = None
        self.models = {}        # model id -> (first register, L)
        self.serial = None
        self._regs = [0] * 125
        self._tmp = [0] * 125
        self._split = {}        # models read run by run (a block read was refused)

    def _discover(self):
        base = find_base(self.master, self.unit)
        if base is None:
            raise ValueError("unit %d is not a SunSpec device" % self.unit)
        found = {}
        for mid, start, length in scan(self.master, self.unit, base):
            if mid in found:
                raise ValueError("model %d appears twice" % mid)
            want = LENGTHS.get(mid)
            if want is not None and length != want:
                raise ValueError("model %d has length %d, not %d" % (mid, length, want))
            found[mid] = (start, length)
        self.base = base
        self.models = found
        self._split = {}
        if 1 in found:
            self.serial = self.read(1).get("SN")
        return found

    def read(self, model):
        """{point name: value} of the points the board uses in `model`;
        None for a point the device does not implement."""
        start, length = self.models[model]
        pts = layout(model)
        regs = self._regs
        if model not in self._split:
            last = 0
            for name, off, typ, size in pts:
                if off + size > last:
                    last = off + size
            try:
                self.master.read_holding_into(self.unit, start, last, regs)
            except ModbusError as e:
                if e.kind != "exception" or e.code not in _REFUSED:
                    raise
                # a register in the block is not there: from now on this
                # model is read in runs of adjacent points, point by point
                # where a run is refused
                self._split[model] = True
            else:
                out = {}
                for name, off, typ, size in pts:
                    out[name] = decode(regs, off, typ, size)
                return out
        return self._read_runs(start, pts)

    def _read_runs(self, start, pts):
        m = self.master
        regs = self._regs
        tmp = self._tmp
        out = {}
        refused = None
        i = 0
        n = len(pts)
        while i < n:
            # a run: points that follow each other without a gap
            j = i + 1
            while j < n and pts[j][1] == pts[j - 1][1] + pts[j - 1][3]:
                j += 1
            off0 = pts[i][1]
            try:
                m.read_holding_into(self.unit, start + off0, pts[j - 1][1] + pts[j - 1][3] - off0, tmp)
                for k in range(pts[j - 1][1] + pts[j - 1][3] - off0):
                    regs[off0 + k] = tmp[k]
                for k in range(i, j):
                    name, off, typ, size = pts[k]
                    out[name] = decode(regs, off, typ, size)
            except ModbusError as e:
                if e.kind != "exception" or e.code not in _REFUSED:
                    raise
                refused = e
                for k in range(i, j):
                    name, off, typ, size = pts[k]
                    if j - i == 1:
                        out[name] = None
                        continue
                    try:
                        m.read_holding_into(self.unit, start + off, size, tmp)
                    except ModbusError as e2:
                        if e2.kind != "exception" or e2.code not in _REFUSED:
                            raise
                        out[name] = None
                        continue
                    for q in range(size):
                        regs[off + q] = tmp[q]
                    out[name] = decode(regs, off, typ, size)
            i = j
        if refused is not None:
            for name in out:
                if out[name] is not None:
                    return out
            raise refused       # nothing of the model could be read
        return out


class Inverter(Device):
    def discover(self):
        found = self._discover()
        self.model = None
        for mid in INVERTERS:
            if mid in found:
                self.model = mid
                break
        if self.model is None:
            raise ValueError("no inverter model on unit %d" % self.unit)
        return True

    def read(self, model=None):
        if model is not None:
            return Device.read(self, model)
        p = Device.read(self, self.model)
        if self.model >= 111:  # type: ignore[operator]  # an int once discover() ran; None fails in Device.read
            w = p["W"]
            wh = p["WH"]
            w = None if w is None else int(round(w))
            wh = None if wh is None else int(round(wh))
        else:
            w = scaled(p["W"], p["W_SF"])
            wh = scaled(p["WH"], p["WH_SF"])
        return (p["St"], w, wh)


class Battery(Device):
    no802 = False               # 802 refused: the battery is read from 124

    def discover(self):
        found = self._discover()
        if 802 not in found and 124 not in found:
            raise ValueError("no battery model (802 or 124) on unit %d" % self.unit)
        self.no802 = False
        self.max_w = None
        if 124 in found:
            try:
                p = Device.read(self, 124)
            except ModbusError as e:
                if e.kind != "exception" or 802 not in found:
                    raise
            else:
                self.max_w = scaled(p["WChaMax"], p["WChaMax_SF"])
        if self.max_w is None and 802 in found:
            try:
                p = Device.read(self, 802)
            except ModbusError as e:
                if e.kind != "exception" or 124 not in found:
                    raise
                self.no802 = True
            else:
                self.max_w = scaled(p["WChaRteMax"], p["WChaDisChaMax_SF"])
        return True

    def read(self, model=None):
        """(charge status, W positive while charging, state of charge in
        permille); None for what the battery does not say. From model 802,
        or from 124 (basic storage: no power) when 802 is absent or its
        registers are refused."""
        if model is not None:
            return Device.read(self, model)
        p = None
        if 802 in self.models and not self.no802:
            try:
                p = Device.read(self, 802)
            except ModbusError as e:
                if e.kind != "exception" or 124 not in self.models:
                    raise
                self.no802 = True
        if p is not None:
            st = p["ChaSt"]
            w = scaled(p["W"], p["W_SF"])
            soc = p["SoC"]
            sf = p["SoC_SF"]
        else:
            p = Device.read(self, 124)
            st = p["ChaSt"]
            w = None
            soc = p["ChaState"]
            sf = p["ChaState_SF"]
        if w is not None:
            # the charge status, where the battery gives one, decides the
            # sign (SunSpec does not say which way 802's W counts); without
            # it, the sign is the battery's own, positive while charging
            if st == CHA_DISCHARGING:
                w = -abs(w)
            elif st == CHA_CHARGING:
                w = abs(w)
        permille = scaled(soc, (sf or 0) + 1) if soc is not None else None
        if permille is not None:
            permille = 0 if permille < 0 else (1000 if permille > 1000 else permille)
        return (st, w, permille)

    def set_power(self, w, revert_s=0):
        """Charge (w > 0) or discharge (w < 0) at w watts; 0 stops both.
        Needs model 124. The device reverts by itself after revert_s."""
        if 124 not in self.models:
            raise ValueError("battery has no storage control model (124)")
        if self.max_w is None or self.max_w <= 0:
            raise ValueError("battery does not state its maximum rate")
        if w > self.max_w or -w > self.max_w:
            raise ValueError("%d W beyond the battery's %d W" % (w, self.max_w))
        start = self.models[124][0]
        p = Device.read(self, 124)
        sf = p["InOutWRte_SF"] or 0
        # percent of WChaMax, in units of 10^sf percent
        pct = scaled(abs(w) * 100, -sf) if sf <= 0 else abs(w) * 100 // (10 ** sf)
        pct = (pct + self.max_w // 2) // self.max_w
        mod = 0
        inw = 0
        outw = 0
        if w > 0:
            mod = 1
            inw = pct
        elif w < 0:
            mod = 2
            outw = pct
        m = self.master
        # OutWRte (10), InWRte (11), WinTms (12), RvrtTms (13) in one write
        m.write_multiple(self.unit, start + 10, (outw, inw, 0, revert_s & 0xFFFF))
        m.write_single(self.unit, start + 3, mod)
        return True
