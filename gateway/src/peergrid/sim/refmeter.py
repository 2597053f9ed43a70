"""The bench's reference energy meter: an Eastron SDM120/SDM630-style Modbus
RTU meter, read with minimalmodbus (input registers, function 04, IEEE 754
float32, high word first), and a pymodbus stand-in for the virtual rig that
integrates the power it is told the house draws.

Register map (SDM120 and SDM630 phase 1; addresses are register offsets):

    0x0000  voltage, V          0x0006  current, A
    0x000C  active power, W     0x0046  frequency, Hz
    0x0048  import active energy, kWh
    0x004A  export active energy, kWh

A bench config may give another map (`[reference.registers]`)."""
from __future__ import annotations

import struct
import threading
import time
from typing import Any

SDM = {"voltage_v": 0x0000, "current_a": 0x0006, "power_w": 0x000C, "frequency_hz": 0x0046,
       "import_kwh": 0x0048, "export_kwh": 0x004A}


class RefMeter:
    """Reads the reference meter (minimalmodbus on a serial port)."""

    def __init__(self, port: str, unit: int = 1, baud: int = 9600, registers: dict[str, int] | None = None) -> None:
        import minimalmodbus

        self.inst = minimalmodbus.Instrument(port, unit, close_port_after_each_call=False)
        self.inst.serial.baudrate = baud
        self.inst.serial.timeout = 0.5
        self.regs = dict(SDM, **(registers or {}))

    def read(self, what: str) -> float:
        last: Exception | None = None
        for _ in range(3):
            try:
                return float(self.inst.read_float(self.regs[what], functioncode=4, number_of_registers=2))
            except (OSError, ValueError) as e:       # minimalmodbus raises IOError subclasses
                last = e
                time.sleep(0.1)
        raise OSError(f"reference meter does not answer ({last})")

    def energy_wh(self) -> tuple[float, float]:
        return self.read("import_kwh") * 1000, self.read("export_kwh") * 1000

    def close(self) -> None:
        try:
            self.inst.serial.close()
        except Exception:  # noqa: BLE001
            pass


class RefMeterSim:
    """A Modbus RTU server on a serial path that answers like an SDM120 for
    a house whose power (W, import positive) the caller sets; energy is
    integrated over time (times `speed` for a faster simulation)."""

    def __init__(self, path: str, unit: int = 1, baud: int = 9600, speed: float = 1.0, voltage: float = 230.0) -> None:
        self.path = path
        self.unit = unit
        self.baud = baud
        self.speed = speed
        self.v = voltage
        self.power = 0.0
        self.imp_wh = 0.0
        self.exp_wh = 0.0
        self.t = time.monotonic()
        self.lock = threading.Lock()
        self._rtu: Any = None
        self.requests = 0

    def set_power(self, w: float) -> None:
        with self.lock:
            self._advance()
            self.power = float(w)

    def _advance(self) -> None:
        now = time.monotonic()
        dt_h = (now - self.t) * self.speed / 3600
        self.t = now
        if self.power >= 0:
            self.imp_wh += self.power * dt_h
        else:
            self.exp_wh += -self.power * dt_h

    def _values(self) -> dict[int, int]:
        with self.lock:
            self._advance()
            vals = {SDM["voltage_v"]: self.v, SDM["current_a"]: abs(self.power) / self.v, SDM["power_w"]: self.power,
                    SDM["frequency_hz"]: 50.0, SDM["import_kwh"]: self.imp_wh / 1000,
                    SDM["export_kwh"]: self.exp_wh / 1000}
        regs = {}
        for addr, v in vals.items():
            hi, lo = struct.unpack(">HH", struct.pack(">f", v))
            regs[addr] = hi
            regs[addr + 1] = lo
        return regs

    def start(self) -> None:
        from peergrid.sim.rtuserver import RtuServer

        def action(start_address: int, address: int, current: list[int], set_values: list[int] | None) -> None:
            regs = self._values()
            self.requests += 1
            for i in range(len(current)):
                current[i] = regs.get(start_address + i, 0)

        self._rtu = RtuServer(self.unit, 0, [0] * 0x60, action, self.path, self.baud)
        self._rtu.start()

    def stop(self) -> None:
        if self._rtu is not None:
            self._rtu.stop()
