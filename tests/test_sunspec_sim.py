"""The SunSpec inverter/battery simulation (a real pymodbus RTU server on a
pseudo-terminal): read with minimalmodbus as a bench would, and by the
firmware's own Modbus master and SunSpec client under the real MicroPython."""
from __future__ import annotations

import json
import time

import minimalmodbus
import pytest

from harness import ROOT, run_micropython
from peergrid.sim.sunspec_sim import SunSpecDevice, SunSpecSim, model_length


@pytest.fixture
def sim():
    dev = SunSpecDevice(unit=1)
    s = SunSpecSim(dev)
    s.path = s.start()
    yield s
    s.stop()


def _inst(path: str) -> minimalmodbus.Instrument:
    inst = minimalmodbus.Instrument(path, 1)
    inst.serial.baudrate = 9600
    inst.serial.timeout = 0.3
    inst.close_port_after_each_call = False
    return inst


def test_image_is_a_sunspec_chain_from_the_definitions(sim) -> None:
    regs = sim.device.registers()
    assert (regs[40000], regs[40001]) == (0x5375, 0x6E53)
    a = 40002
    seen = []
    while regs[a] != 0xFFFF:
        mid, n = regs[a], regs[a + 1]
        assert n == model_length(mid)
        seen.append(mid)
        a += 2 + n
    assert seen == [1, 103, 120, 802, 124] and regs[a + 1] == 0


def test_minimalmodbus_reads_marker_serial_and_power(sim) -> None:
    sim.device.set_inverter(2890, 6012345, 4)
    inst = _inst(sim.path)
    assert inst.read_registers(40000, 2) == [0x5375, 0x6E53]
    sn = inst.read_string(sim.device.starts[1] + 48, 16)
    assert sn.rstrip("\x00 ") == "SIM0001"
    s = sim.device.starts[103]
    assert inst.read_register(s + 12, signed=True) == 2890
    assert inst.read_long(s + 22) == 6012345
    # a register outside the map is an exception answer, not silence
    with pytest.raises(minimalmodbus.IllegalRequestError):
        inst.read_register(30000)


def test_battery_setpoint_and_revert_timer(sim) -> None:
    inst = _inst(sim.path)
    s = sim.device.starts[124]
    inst.write_registers(s + 10, [0, 4000, 0, 1])          # InWRte 40.00 %, revert after 1 s
    inst.write_register(s + 3, 1)                          # charge
    cmd = sim.device.battery_command()
    assert cmd["w"] == 2000 and cmd["revert_s"] == 1
    assert inst.read_register(sim.device.starts[802] + 14) == 4    # ChaSt charging
    time.sleep(1.2)
    assert sim.device.battery_command()["w"] == 0
    assert inst.read_register(sim.device.starts[802] + 14) == 6    # holding


def test_unplug_and_plug(sim) -> None:
    inst = _inst(sim.path)
    assert inst.read_registers(40000, 2)[0] == 0x5375
    sim.unplug()
    with pytest.raises(minimalmodbus.NoResponseError):
        inst.read_registers(40000, 2)
    sim.plug()
    time.sleep(0.05)
    inst.serial.reset_input_buffer()
    assert inst.read_registers(40000, 2)[0] == 0x5375


PROBE = r"""
import sys, time, json
from boardsim.uart_posix import PosixUart
from firmware.modbus import Master
from firmware import sunspec
class Clock:
    def ticks_ms(self): return time.ticks_ms()
    def ticks_add(self, t, d): return time.ticks_add(t, d)
    def ticks_diff(self, a, b): return time.ticks_diff(a, b)
    def sleep_ms(self, ms): time.sleep_ms(ms)
m = Master(PosixUart(sys.argv[1]), Clock(), timeout_ms=300)
inv = sunspec.Inverter(m, 1)
bat = sunspec.Battery(m, 1)
out = {"inv": inv.discover(), "model": inv.model, "serial": inv.serial, "read": inv.read(),
       "bat": bat.discover(), "max_w": bat.max_w, "bat_read": bat.read()}
bat.set_power(-1500, 30)
out["after"] = bat.read()
out["stats"] = m.stats
print(json.dumps(out))
"""


def test_firmware_master_under_micropython(sim, tmp_path) -> None:
    sim.device.set_inverter(3100, 7000000, 4)
    sim.device.set_battery(615)
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = run_micropython([str(script), sim.path], [ROOT], timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["inv"] and out["model"] == 103 and out["serial"] == "SIM0001"
    assert out["read"] == [4, 3100, 7000000]
    assert out["bat"] and out["max_w"] == 5000
    assert out["bat_read"] == [6, 0, 615]
    assert out["after"] == [3, -1500, 615]
    assert sim.device.battery_command()["w"] == -1500
    assert out["stats"]["timeouts"] == 0 and out["stats"]["crc_errors"] == 0
