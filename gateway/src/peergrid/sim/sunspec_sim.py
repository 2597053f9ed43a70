"""A SunSpec inverter and battery on a pseudo-terminal: the RS485 peer of the
virtual board and of bench tests.

The register map is built from the SunSpec model definitions that pysunspec2
ships (point order, sizes and types come from its JSON files); points the
simulation does not set hold their "not implemented" pattern. A real Modbus
RTU server (pymodbus) answers on one end of a virtual cable
(peergrid.sim.ptycable), the board opens the other end; the cable can be
unplugged and plugged back. On a bench it serves on the USB-RS485 adapter's
port instead (`serve_on`).

The battery obeys model 124 (basic storage controls): StorCtl_Mod bit 0
charges at InWRte % of WChaMax, bit 1 discharges at OutWRte %; when
InOutWRte_RvrtTms seconds pass without a new write it drops back to idle by
itself, like a real storage system's revert timer.

Command line (used by the virtual board launcher and by hand on a bench):
``python -m peergrid.sim.sunspec_sim`` prints ``{"pty": PATH}`` and then reads
JSON lines: {"op": "unplug"}, {"op": "plug"}, {"op": "inverter", "w", "wh",
"state"}, {"op": "battery", "soc", "w"}, {"op": "state"}; EOF stops it.
"""
from __future__ import annotations

import json
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sunspec2

MODELS = Path(sunspec2.__file__).parent / "models" / "json"
SUNS = (0x5375, 0x6E53)
# "not implemented" pattern of each SunSpec point type, in registers
_NI: dict[str, int] = {"int16": 0x8000, "uint16": 0xFFFF, "enum16": 0xFFFF, "bitfield16": 0xFFFF,
                       "sunssf": 0x8000, "acc16": 0, "count": 0, "pad": 0x8000,
                       "int32": 0x80000000, "uint32": 0xFFFFFFFF, "enum32": 0xFFFFFFFF,
                       "bitfield32": 0xFFFFFFFF, "acc32": 0, "float32": 0x7FC00000,
                       "int64": 0x8000000000000000, "uint64": 0xFFFFFFFFFFFFFFFF, "acc64": 0}


def model_points(mid: int) -> list[tuple[str, int, str, int]]:
    """(name, offset from the model's first data register, type, size) of a
    model's top-level points, from pysunspec2's definition."""
    d = json.loads((MODELS / f"model_{mid}.json").read_text())
    out = []
    off = -2                      # ID and L come first
    for p in d["group"]["points"]:
        out.append((p["name"], off, p["type"], int(p["size"])))
        off += int(p["size"])
    return out


def model_length(mid: int) -> int:
    pts = model_points(mid)
    name, off, typ, size = pts[-1]
    return off + size


class SunSpecDevice:
    """The register image and the behaviour of one inverter with a battery."""

    def __init__(self, unit: int = 1, base: int = 40000, models: tuple[int, ...] = (1, 103, 120, 802, 124),
                 max_w: int = 5000) -> None:
        self.unit = unit
        self.base = base
        self.lock = threading.Lock()
        self.regs: dict[int, int] = {}
        self.starts: dict[int, int] = {}
        self.points: dict[int, dict[str, tuple[int, str, int]]] = {}
        addr = base
        self._put(addr, SUNS[0])
        self._put(addr + 1, SUNS[1])
        addr += 2
        for mid in models:
            pts = model_points(mid)
            length = model_length(mid)
            self._put(addr, mid)
            self._put(addr + 1, length)
            start = addr + 2
            self.starts[mid] = start
            self.points[mid] = {}
            for name, off, typ, size in pts[2:]:
                self.points[mid][name] = (start + off, typ, size)
                self._set_raw(start + off, typ, size, None)
            addr = start + length
        self._put(addr, 0xFFFF)
        self._put(addr + 1, 0)
        self.end = addr + 2
        self.max_w = max_w
        self.inv = {"w": 0, "wh": 0, "state": 4}
        self.bat = {"soc": 500, "w": 0}            # permille, W (+ charging)
        self.command: dict[str, Any] = {"w": 0, "revert_s": 0, "writes": 0}
        self._revert_at: float | None = None
        self._init_values()

    # -- registers -----------------------------------------------------------

    def _put(self, addr: int, v: int) -> None:
        self.regs[addr] = v & 0xFFFF

    def _set_raw(self, addr: int, typ: str, size: int, value: Any) -> None:
        if typ == "string":
            raw = (value or "").encode()[: 2 * size].ljust(2 * size, b"\0")
            for i in range(size):
                self._put(addr + i, raw[2 * i] << 8 | raw[2 * i + 1])
            return
        if value is None:
            v = _NI.get(typ, 0)
        elif typ == "float32":
            v = struct.unpack(">I", struct.pack(">f", float(value)))[0]
        else:
            v = int(value) & ((1 << (16 * size)) - 1)
        for i in range(size):
            self._put(addr + i, v >> (16 * (size - 1 - i)))

    def set_point(self, model: int, name: str, value: Any) -> None:
        if model not in self.points:
            return
        addr, typ, size = self.points[model][name]
        self._set_raw(addr, typ, size, value)

    def get_point(self, model: int, name: str) -> int | None:
        addr, typ, size = self.points[model][name]
        v = 0
        for i in range(size):
            v = v << 16 | self.regs[addr + i]
        if v == _NI.get(typ, -1):
            return None
        if typ in ("int16", "sunssf") and v & 0x8000:
            v -= 0x10000
        return v

    def _init_values(self) -> None:
        sp = self.set_point
        sp(1, "Mn", "PeerGrid")
        sp(1, "Md", "SIM-INV")
        sp(1, "SN", "SIM0001")
        sp(1, "Vr", "1.0")
        sp(1, "DA", self.unit)
        for mid in (101, 102, 103):
            sp(mid, "A_SF", -2)
            sp(mid, "V_SF", -1)
            sp(mid, "W_SF", 0)
            sp(mid, "Hz_SF", -2)
            sp(mid, "WH_SF", 0)
            sp(mid, "PhVphA", 2300)
            sp(mid, "Hz", 5000)
        sp(120, "WRtg", self.max_w)
        sp(120, "WRtg_SF", 0)
        sp(802, "WChaRteMax", self.max_w)
        sp(802, "WDisChaRteMax", self.max_w)
        sp(802, "WChaDisChaMax_SF", 0)
        sp(802, "SoC_SF", -1)
        sp(802, "W_SF", 0)
        sp(124, "WChaMax", self.max_w)
        sp(124, "WChaMax_SF", 0)
        sp(124, "StorCtl_Mod", 0)
        sp(124, "ChaState_SF", -1)
        sp(124, "InOutWRte_SF", -2)
        sp(124, "InWRte", 0)
        sp(124, "OutWRte", 0)
        sp(124, "InOutWRte_RvrtTms", 0)
        self.refresh()

    def refresh(self) -> None:
        """Live values into the registers (called before every answer)."""
        if self._revert_at is not None and time.monotonic() >= self._revert_at:
            self._revert_at = None
            self.set_point(124, "StorCtl_Mod", 0)
            self.set_point(124, "InWRte", 0)
            self.set_point(124, "OutWRte", 0)
            self.command["w"] = 0
            self.bat["w"] = 0
            self.command["reverted"] = self.command.get("reverted", 0) + 1
        inv = self.inv
        for mid in (101, 102, 103):
            if mid in self.points:
                self.set_point(mid, "W", inv["w"])
                self.set_point(mid, "WH", inv["wh"])
                self.set_point(mid, "St", inv["state"])
                self.set_point(mid, "A", int(abs(inv["w"]) / 230 * 100))
        w = self.bat["w"]
        cha = 4 if w > 0 else (3 if w < 0 else 6)
        self.set_point(802, "SoC", self.bat["soc"])
        self.set_point(802, "W", abs(w))
        self.set_point(802, "ChaSt", cha)
        self.set_point(124, "ChaState", self.bat["soc"])
        self.set_point(124, "ChaSt", cha)

    def wrote(self, addr: int, values: list[int]) -> None:
        """A master wrote registers: follow the storage controls."""
        for i, v in enumerate(values):
            self._put(addr + i, v)
        if 124 not in self.starts:
            return
        s = self.starts[124]
        if not (s <= addr + len(values) and addr <= s + 24):
            return
        mod = self.get_point(124, "StorCtl_Mod") or 0
        sf = self.get_point(124, "InOutWRte_SF") or 0
        wmax = self.get_point(124, "WChaMax") or 0
        inw = self.get_point(124, "InWRte") or 0
        outw = self.get_point(124, "OutWRte") or 0
        w = 0.0
        if mod & 1:
            w += inw * 10 ** sf / 100 * wmax
        if mod & 2:
            w -= outw * 10 ** sf / 100 * wmax
        rv = self.get_point(124, "InOutWRte_RvrtTms") or 0
        self.command.update(w=int(round(w)), revert_s=rv, writes=self.command["writes"] + 1)
        self.bat["w"] = int(round(w))
        self._revert_at = time.monotonic() + rv if rv and mod else None

    def battery_command(self) -> dict[str, Any]:
        with self.lock:
            self.refresh()
            return dict(self.command)

    def set_inverter(self, w: int, wh: int, state: int = 4) -> None:
        with self.lock:
            self.inv.update(w=w, wh=wh, state=state)

    def set_battery(self, soc_permille: int, w: int | None = None) -> None:
        with self.lock:
            self.bat["soc"] = soc_permille
            if w is not None:
                self.bat["w"] = w

    def registers(self) -> dict[int, int]:
        with self.lock:
            self.refresh()
            return dict(self.regs)


class SunSpecSim:
    """pymodbus RTU server for a SunSpecDevice on a virtual RS485 cable.

    throttle: the cable carries the bytes at `baud` (11 bits a character),
    as a real line does; latency_ms: the device starts its answer that long
    after the request (settable while it runs); mute(): it hears requests
    but no longer answers."""

    def __init__(self, device: SunSpecDevice, baud: int = 9600, throttle: bool = False,
                 latency_ms: float = 0) -> None:
        self.device = device
        self.baud = baud
        self.throttle = throttle
        self.latency_ms = latency_ms
        self.requests = 0
        self.cable: Any = None
        self.board_path: str | None = None
        self._rtu: Any = None

    @property
    def plugged(self) -> bool:
        return self.cable.plugged if self.cable is not None else True

    @property
    def bytes_dropped(self) -> int:
        return self.cable.dropped if self.cable is not None else 0

    def start(self) -> str:
        """Start the server on a virtual cable (peergrid.sim.ptycable); returns
        the board's end (a path)."""
        from peergrid.sim.ptycable import PtyCable

        self.cable = PtyCable(self.baud if self.throttle else None)
        self.serve_on(self.cable.b_path)
        self.board_path = self.cable.a_path
        return self.board_path

    def serve_on(self, path: str) -> None:
        """Serve on an existing serial port (a bench's USB-RS485 adapter, or
        one end of a virtual cable)."""
        from peergrid.sim.rtuserver import RtuServer

        self.server_path = path
        dev = self.device

        def action(start_address: int, address: int, current: list[int], set_values: list[int] | None) -> None:
            with dev.lock:
                self.requests += 1
                if set_values is not None:
                    dev.wrote(address, [int(v) for v in set_values])
                dev.refresh()
                for i in range(len(current)):
                    a = start_address + i
                    if a in dev.regs and (set_values is None or not address <= a < address + len(set_values)):
                        current[i] = dev.regs[a]

        self._rtu = RtuServer(dev.unit, dev.base, [dev.regs[a] for a in range(dev.base, dev.end)], action, path,
                              self.baud, delay_s=lambda: self.latency_ms / 1000.0)
        self._rtu.start()

    def unplug(self) -> None:
        if self.cable is not None:
            self.cable.unplug()

    def mute(self, on: bool = True) -> None:
        """The device goes on hearing requests but no longer answers."""
        if self.cable is not None:
            self.cable.tamper_b = (lambda data: b"") if on else None

    def plug(self) -> None:
        if self.cable is not None:
            self.cable.plug()

    def stop(self) -> None:
        if self._rtu is not None:
            self._rtu.stop()
        if self.cable is not None:
            self.cable.close()


def main() -> int:
    dev = SunSpecDevice()
    sim = SunSpecSim(dev)
    path = sim.start()
    print(json.dumps({"pty": path}), flush=True)
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            print(json.dumps({"error": "not JSON"}), flush=True)
            continue
        op = req.get("op")
        if op == "unplug":
            sim.unplug()
        elif op == "plug":
            sim.plug()
        elif op == "inverter":
            dev.set_inverter(int(req.get("w", 0)), int(req.get("wh", 0)), int(req.get("state", 4)))
        elif op == "battery":
            dev.set_battery(int(req.get("soc", 500)), req.get("w"))
        elif op == "state":
            print(json.dumps({"inverter": dev.inv, "battery": dev.bat, "command": dev.battery_command(),
                              "requests": sim.requests, "plugged": sim.plugged}), flush=True)
        else:
            print(json.dumps({"error": f"unknown op {op!r}"}), flush=True)
    sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
