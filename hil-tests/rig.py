"""Rigs for the hardware-in-the-loop scenarios.

A rig is a board under test plus what the bench engineer has around it. The
scenarios (test_scenarios.py) talk only to this interface, so each runs
unchanged on

- the **virtual rig** (`--rig virtual`, used by `make test`): the real
  firmware on the MicroPython unix port (peergrid.sim.vboard) with its console
  on a pseudo-terminal, pymodbus playing the SunSpec inverter on its RS485
  pseudo-terminal, a pymodbus SDM120 as the reference meter (read with
  minimalmodbus, like the real one) that sees the same house power as the
  board, and the board's first relay switching a known 2 kW load;
- the **bench rig** (`--rig bench --rig-config bench.toml`): a real board on a
  USB serial port, a USB-RS485 adapter on the bench PC where pymodbus plays
  the inverter, a reference meter (Eastron SDM120/SDM630 or a map in the
  config) read over Modbus with minimalmodbus, a known resistive load on one
  of the board's relays, and the gateway on the bench PC. Wiring per board
  type: hil-tests/wiring/.

Both rigs run a real mosquitto and the gateway (`peergrid run`, with the
installer API and settlement in 1-minute intervals) on this machine.

Capabilities a scenario may need (`rig.caps`): flash, console, inverter_sim,
reference_meter, load, broker_control, power_cut. A rig without one makes
the scenario SKIP with the reason (`rig.lacks[cap]`).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness import free_port, stop_process  # noqa: E402
from peergrid.community import registry as reg  # noqa: E402
from peergrid.commissioning.commission import Operator, main as commission_main  # noqa: E402
from peergrid.commissioning.console import BoardConsole  # noqa: E402
from protocol import topics  # noqa: E402
from protocol.gateway_end import CommandSealer, open_uplink  # noqa: E402

C = "hil"


class GatewayHarness:
    """mosquitto and the gateway on this machine, and a second client with
    the gateway's account that sends commands and collects acks."""

    def __init__(self, work: Path, broker_host_for_boards: str = "127.0.0.1", listen: str = "127.0.0.1") -> None:
        self.work = work
        self.port = free_port()
        self.http = free_port()
        self.listen = listen
        self.cfg = work / "gw.toml"
        self.cfg.write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {self.http}\nhttp_host = "{listen}"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\nuser = "gateway"\npassword = "gw-hil-pass"\n'
            'passwd_file = "passwd"\nacl_file = "acl"\npid_file = "mosquitto.pid"\n'
            f'[ingest]\nstale_after_s = 30\n'
            f'[installer]\nbroker_host = "{broker_host_for_boards}"\nbroker_port = {self.port}\n'
            '[settlement]\nretail = 3187\nfeed_in = 812\ninterval_min = 1\ngrace_s = 5\n')
        r = reg.Registry(reg.connect(work / "gw.db"))
        r.add_community(C)
        r.db.close()
        self.cli("broker-files")
        self.token = self.cli("installer-token", "hil-rig", "--days", "1").split()[-1]
        self.broker: subprocess.Popen | None = None
        self.gw: subprocess.Popen | None = None
        self.acks: list[dict[str, Any]] = []
        self.ctr: dict[str, int] = {}
        self.client: mqtt.Client | None = None

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"peergrid {' '.join(args)}: {r.stderr}")
        return r.stdout

    def start(self) -> None:
        self.broker_start()
        self.gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                   stdout=subprocess.DEVNULL, stderr=open(self.work / "gw.log", "a"), text=True)
        deadline = time.monotonic() + 20
        while "connected to" not in (self.work / "gw.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not connect: " + (self.work / "gw.log").read_text()[-2000:])
            time.sleep(0.05)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hil-harness-{os.getpid()}")
        c.username_pw_set("gateway", "gw-hil-pass")
        c.reconnect_delay_set(1, 1)
        c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe(f"{topics.ROOT}/{C}/+/{topics.ACK}", 1)
        c.on_message = self._on_ack
        c.connect("127.0.0.1", self.port, 30)
        c.loop_start()
        self.client = c

    def broker_start(self) -> None:
        from harness import registry_broker

        # persistent: the gateway's queued messages survive a broker restart (the outage scenario)
        self.broker = registry_broker(self.work, self.port, self.listen, persistence=True)

    def broker_stop(self) -> None:
        if self.broker is not None:
            self.broker.send_signal(signal.SIGTERM)
            self.broker.wait(10)
            self.broker = None

    def _secret(self, device: str) -> bytes:
        db = sqlite3.connect(str(self.work / "gw.db"), timeout=30)
        try:
            row = db.execute("SELECT secret FROM devices WHERE community=? AND id=?", (C, device)).fetchone()
        finally:
            db.close()
        if row is None:
            raise RuntimeError(f"{device} is not registered")
        return bytes(row[0])

    def _on_ack(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            _, dev, _, m = open_uplink(msg.topic, bytes(msg.payload), lambda c, d: self._secret(d))
        except Exception:  # noqa: BLE001 - only authentic acks count
            return
        m["device"] = dev
        m["t_wall"] = time.time()
        self.acks.append(m)

    def command(self, device: str, op: int, target: int, value: int, lease: int) -> int:
        ctr = self.ctr.get(device, 10**6) + 1          # above anything the gateway's own loop used
        self.ctr[device] = ctr
        s = CommandSealer(C, device, self._secret(device))
        frame = s.seal({"ctr": ctr, "t": int(time.time()), "lease": lease, "op": op, "target": target,
                        "value": value})
        assert self.client is not None
        self.client.publish(topics.topic(C, device, topics.CMD), frame, qos=1).wait_for_publish(5)
        return ctr

    def device(self, device: str) -> dict[str, Any]:
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.http}/installer/device/{device}",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def readings(self, device: str) -> list[tuple[int, int, int, int]]:
        db = sqlite3.connect(str(self.work / "gw.db"), timeout=30)
        try:
            return list(db.execute("SELECT boot, seq, grid_imp_wh, flags FROM readings WHERE community=? AND device=?"
                                   " ORDER BY boot, seq", (C, device)))
        finally:
            db.close()

    def ledger(self) -> bytes:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "ledger", "export"],
                           capture_output=True, timeout=60)
        return r.stdout

    def close(self) -> None:
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
        stop_process(self.gw, 15)
        self.broker_stop()


class RigOperator(Operator):
    """The commissioning's electrician on a rig: the test load is the rig's."""

    def __init__(self, rig: "Rig") -> None:
        self.rig = rig
        self.lines: list[str] = []

    def say(self, text: str) -> None:
        self.lines.append(text)

    def ask(self, question: str, default: str = "") -> str:
        self.lines.append("? " + question)
        return default

    def confirm(self, question: str, default: bool = True) -> bool:
        self.lines.append("? " + question)
        return False                       # a rig is wired right: nothing is flipped on a rig

    def act(self, instruction: str) -> None:
        self.lines.append("! " + instruction)
        if "Switch ON" in instruction:
            self.rig.test_load(True, self.board)
        elif "OFF" in instruction:
            self.rig.test_load(False, self.board)


class Rig:
    name = "rig"
    board_type = "sim"
    device = "hil1"
    load_w = 2000                          # the known load on relay `load_relay`
    load_relay = 0
    class_pct = 1.0                        # the reference meter's accuracy class

    def __init__(self, work: Path) -> None:
        self.work = work
        self.caps: set[str] = set()
        self.lacks: dict[str, str] = {}
        self.gw: GatewayHarness | None = None
        self.report: dict[str, Any] | None = None
        self._con: BoardConsole | None = None

    # what each rig supplies
    def console_path(self) -> str:
        raise NotImplementedError

    def flash(self) -> None:
        raise NotImplementedError

    def test_load(self, on: bool, console: Any = None) -> None:
        """Switch the rig's known load; `console`: the commissioning tool's
        open console when it holds the port."""
        raise NotImplementedError

    def reference(self) -> Any:
        raise NotImplementedError

    def inverter(self) -> Any:
        raise NotImplementedError

    def power_cut(self) -> None:
        raise NotImplementedError

    # common
    def console(self) -> BoardConsole:
        if self._con is None:
            self._con = BoardConsole(self.console_path(), timeout=4)
        return self._con

    def drop_console(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def sheet(self) -> Path:
        p = self.work / "sheet.toml"
        p.write_text(f'''electrician = "HIL rig"
[house]
member = "rig house"
device = "{self.device}"
board = "{self.board_type}"
[board_settings]
period_s = 1
[[ct]]
name = "ct1"
role = "grid"
rating_a = 100
[[relay]]
index = {self.load_relay}
load = "test heater"
rated_w = {self.load_w}
failsafe = 0
[inverter]
unit = 1
[test_load]
w = {self.load_w}
what = "test heater"
''')
        return p

    def commission(self) -> int:
        self.drop_console()
        assert self.gw is not None
        op = RigOperator(self)
        rc = commission_main(["--sheet", str(self.sheet()), "--port", self.console_path(), "--state",
                              str(self.work / "commission.json"), "--gateway", f"http://127.0.0.1:{self.gw.http}",
                              "--token", self.gw.token], operator=op)
        self.commission_log = "\n".join(op.lines)
        rp = self.work / f"report-{self.device}.json"
        if rp.exists():
            self.report = json.loads(rp.read_text())["report"]
        return rc

    def wait_reading(self, pred: Any = None, timeout: float = 30) -> dict[str, Any]:
        """The gateway's newest reading of the board once it satisfies pred
        (and is newer than when asked)."""
        assert self.gw is not None
        first = self.gw.device(self.device).get("last_reading")
        deadline = time.monotonic() + timeout
        while True:
            d = self.gw.device(self.device)
            if d.get("last_reading") != first and d.get("last_reading") is not None and (pred is None or pred(d)):
                return d
            if time.monotonic() > deadline:
                raise TimeoutError(f"no matching reading in {timeout} s (last: {d})")
            time.sleep(0.1)

    def close(self) -> None:
        self.drop_console()
        if self.gw is not None:
            self.gw.close()


class VirtualRig(Rig):
    name = "virtual"
    load_w = 9000                          # a big heater: 100 Wh in 40 s for the energy comparison
    energy_s = 40                          # (the board measures continuously: 40 s is plenty)

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.caps = {"flash", "console", "inverter_sim", "reference_meter", "load", "broker_control", "power_cut"}
        self.vb: Any = None
        self.ref_sim: Any = None
        self.ref: Any = None
        self.cable: Any = None
        self._stop = threading.Event()
        self.base_w = 300.0
        self._log_id, self._seen, self._on = 0, 0, False

    def start(self) -> None:
        from peergrid.sim.ptycable import PtyCable
        from peergrid.sim.refmeter import RefMeter, RefMeterSim

        self.gw = GatewayHarness(self.work)
        self.gw.start()
        self.cable = PtyCable()
        self.ref_sim = RefMeterSim(self.cable.a_path)
        self.ref_sim.start()
        self.ref = RefMeter(self.cable.b_path)
        self.flash()
        threading.Thread(target=self._physics, daemon=True).start()

    def flash(self) -> None:
        """Build the sim board's bundle (make firmware) and start a blank
        board from it: the virtual counterpart of erasing and writing."""
        from peergrid.sim.vboard import VirtualBoard

        r = subprocess.run(["make", "--no-print-directory", "-s", "firmware", "BOARD=sim"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError("make firmware BOARD=sim: " + r.stderr)
        self.drop_console()
        if self.vb is not None:
            self.vb.close()
        folder = self.work / "board"
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        self.vb = VirtualBoard(folder, None, console=True, rs485=True, mpy_dir=ROOT / "build" / "firmware" / "sim" / "lib",
                               sim={"start": int(time.time()), "relay_w": [self.load_w, 0], "relay_ch": [2, None],
                                    "grid": 0, "pv": 1, "base": [self.base_w, 0, 0, 0]})
        self.vb.start()

    def _physics(self) -> None:
        """The reference meter sees what the board's grid CT sees: the house
        and the load behind the relay when it is closed."""
        while not self._stop.is_set():
            try:
                on = self._relay_on()
                self.ref_sim.set_power(self.base_w + (self.load_w if on else 0))
            except Exception:  # noqa: BLE001 - the board is restarting
                pass
            time.sleep(0.05)

    def _relay_on(self) -> bool:
        log = self.vb.log
        if self._log_id != id(log):
            self._log_id, self._seen, self._on = id(log), 0, False
        while self._seen < len(log):
            ev = log[self._seen]
            self._seen += 1
            if ev.get("ev") == "relay" and ev.get("i") == self.load_relay:
                self._on = bool(ev["v"])
            if ev.get("ev") in ("ready", "uncommissioned"):
                self._on = False               # a fresh start: relays in their fail-safe state (off)
        return self._on

    def console_path(self) -> str:
        return self.vb.console_path

    def test_load(self, on: bool, console: Any = None) -> None:
        # the kettle of the commissioning is plugged in the house, not behind a relay
        self.vb.send(op="base", w=[self.base_w + (self.load_w if on else 0), 0, 0, 0])
        self.ref_sim.set_power(self.base_w + (self.load_w if on else 0))

    def reference(self) -> Any:
        return self.ref

    def inverter(self) -> Any:
        return self.vb.sim.device

    def power_cut(self) -> None:
        self.drop_console()
        self.vb.kill()
        time.sleep(0.5)
        self.vb.start()

    def close(self) -> None:
        self._stop.set()
        super().close()
        if self.vb is not None:
            self.vb.close()
        if self.ref is not None:
            self.ref.close()
        if self.ref_sim is not None:
            self.ref_sim.stop()
        if self.cable is not None:
            self.cable.close()


class BenchRig(Rig):
    """A real board on the bench (see bench.example.toml for the config)."""

    name = "bench"

    def __init__(self, work: Path, conf: dict[str, Any]) -> None:
        super().__init__(work)
        self.conf = conf
        b = conf.get("board") or {}
        self.board_type = b.get("type", "devkitc-3ct")
        self.device = b.get("device", "hil1")
        self.port = b.get("console")
        if not self.port:
            raise SystemExit("bench config: [board] console (the board's USB serial port) is required")
        self.caps = {"console", "broker_control"}
        fl = conf.get("flash") or {}
        if fl.get("enabled", True) and fl.get("image"):
            self.caps.add("flash")
        else:
            self.lacks["flash"] = "the bench config has no [flash] image (or enabled = false)"
        if (conf.get("rs485") or {}).get("port"):
            self.caps.add("inverter_sim")
        else:
            self.lacks["inverter_sim"] = "no [rs485] port: no USB-RS485 adapter for the inverter simulator"
        if (conf.get("reference") or {}).get("port"):
            self.caps.add("reference_meter")
        else:
            self.lacks["reference_meter"] = "no [reference] port: no reference meter on this bench"
        ld = conf.get("load") or {}
        if "watts" in ld:
            self.caps.add("load")
            self.load_w = int(ld["watts"])
            self.load_relay = int(ld.get("relay", 0))
        else:
            self.lacks["load"] = "no [load] watts: no known load on a relay"
        self.lacks["power_cut"] = "the bench has no switched power supply for the board"
        self.class_pct = float((conf.get("reference") or {}).get("class_pct", 1.0))
        self.energy_s = float((conf.get("reference") or {}).get("energy_s", 120))
        self.inv_sim: Any = None
        self.ref: Any = None

    def start(self) -> None:
        g = self.conf.get("gateway") or {}
        self.gw = GatewayHarness(self.work, g.get("broker_host", "127.0.0.1"), g.get("listen", "127.0.0.1"))
        self.gw.start()
        if "inverter_sim" in self.caps:
            from peergrid.sim.sunspec_sim import SunSpecDevice, SunSpecSim

            rs = self.conf["rs485"]
            self.inv_sim = SunSpecSim(SunSpecDevice(unit=int(rs.get("unit", 1))), baud=int(rs.get("baud", 9600)))
            self.inv_sim.serve_on(rs["port"])
        if "reference_meter" in self.caps:
            from peergrid.sim.refmeter import RefMeter

            rf = self.conf["reference"]
            self.ref = RefMeter(rf["port"], int(rf.get("unit", 1)), int(rf.get("baud", 9600)),
                                {k: int(v) for k, v in (rf.get("registers") or {}).items()})

    def console_path(self) -> str:
        return self.port

    def flash(self) -> None:
        fl = self.conf["flash"]
        r = subprocess.run(["make", "--no-print-directory", "flash", f"BOARD={self.board_type}", f"PORT={self.port}",
                            f"IMAGE={fl['image']}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"make flash: {r.stderr[-2000:]}")

    def test_load(self, on: bool, console: Any = None) -> None:
        # on the bench the known load hangs on a relay: the console switches it
        (console or self.console()).call("relay", i=self.load_relay, v=1 if on else 0, hold_s=300)

    def reference(self) -> Any:
        return self.ref

    def inverter(self) -> Any:
        return self.inv_sim.device

    def close(self) -> None:
        super().close()
        if self.ref is not None:
            self.ref.close()
        if self.inv_sim is not None:
            self.inv_sim.stop()


def need(rig: Rig, *caps: str) -> None:
    """Skip the calling scenario, with the reason, when the rig lacks a capability."""
    import pytest

    for c in caps:
        if c not in rig.caps:
            pytest.skip(f"the {rig.name} rig cannot: {rig.lacks.get(c, c)}")


def load_rig(kind: str, config: str | None, work: Path) -> Rig:
    if kind == "virtual":
        return VirtualRig(work)
    if not config:
        raise SystemExit("--rig bench needs --rig-config bench.toml (see hil-tests/bench.example.toml)")
    return BenchRig(work, tomllib.loads(Path(config).read_text()))



