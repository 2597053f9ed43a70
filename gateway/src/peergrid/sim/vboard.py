"""The virtual board: the real firmware on the MicroPython unix port with
simulated hardware, started with one command (`peergrid vboard`).

`VirtualBoard` prepares the board's folder (board definition, commissioning
config; the folder is the board's flash), starts the SunSpec inverter and
battery on a pseudo-terminal when the config names them, runs
`micropython -m boardsim.vboard <folder> <speed> <pty>` and turns its event
lines into Python objects. Tests drive it through `send` / `state` /
`wait_for`; relay states, counters and registers come back in `state()`.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[4]


def micropython() -> str:
    p = Path(sys.executable).parent / "micropython"
    if p.exists():
        return str(p)
    found = shutil.which("micropython")
    if not found:
        raise RuntimeError("micropython not found: run `make setup`")
    return found


def firmware_path(mpy_dir: Path | None = None) -> str:
    """MICROPYPATH for the firmware: compiled .mpy files if given, else the
    sources; then the interpreter's frozen modules (`ssl` is one, as on an
    ESP32 image; MICROPYPATH replaces the default path, which has them);
    umqtt from build/lib (make umqtt)."""
    lib = ROOT / "build" / "lib"
    if not (lib / "umqtt_pinned" / "simple.py").exists():
        raise RuntimeError("umqtt missing in build/lib: run `make umqtt`")
    first = str(mpy_dir) if mpy_dir else str(ROOT)
    return ":".join([first, ".frozen", str(lib)])


def board_tls(ca_file: Path, name: str) -> dict[str, str]:
    """A board config's broker.tls: the community CA (a PEM file) as base64
    of its DER, and the name the broker's certificate must carry."""
    import base64

    from cryptography.hazmat.primitives.serialization import Encoding

    from peergrid.community import pki

    return {"ca": base64.b64encode(pki.load_cert(ca_file).public_bytes(Encoding.DER)).decode(), "name": name}


def default_config(community: str, device: str, secret: bytes, host: str, port: int,
                   user: str | None, password: str | None, tls: dict[str, str] | None = None,
                   **over: Any) -> dict[str, Any]:
    """tls: the broker.tls entry ({"ca", "name"}, see board_tls): the board
    then speaks TLS to host:port and checks the broker's certificate."""
    cfg: dict[str, Any] = {
        "community": community, "device": device, "secret": secret.hex(),
        "broker": {"host": host, "port": port, "user": user, "password": password,
                   **({"tls": tls} if tls is not None else {})},
        "period_s": 10, "status_s": 600, "replay_per_s": 20,
        "backoff_s": [1, 4], "ack_timeout_s": 3, "sock_timeout_s": 2, "keepalive_s": 10,
        "frames": 400, "spool_kb": 1536,
        "relays": [{"failsafe": 0, "load": "water heater"}, {"failsafe": 1, "load": "heat pump"}],
        "channels": {"ct1": {"role": "grid", "gain": 1.0}, "ct2": {"role": "pv", "gain": 1.0},
                     "ct3": {"role": "load", "gain": 1.0}, "ct4": {"role": "ev", "gain": 1.0}},
        "sim": {"start": 1795000000, "pv_peak_w": 4000, "base_w": 400,
                "relay_w": [2000, 1500], "relay_ch": [2, 3], "grid": 0, "pv": 1},
    }
    cfg.update(over)
    return cfg


class VirtualBoard:
    def __init__(self, folder: Path, config: dict[str, Any] | None, speed: float = 1.0,
                 board: str = "sim", heap: str | None = None, mpy_dir: Path | None = None,
                 rs485: bool | None = None, data_heap: int | None = None, console: bool = False,
                 sim: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 sunspec_unit: int = 1, rs485_path: str | None = None) -> None:
        """rs485_path: the board's RS485 port is this existing serial path
        (the far end is someone else's, e.g. a rig's inverter simulator)
        instead of a SunSpec simulator of its own."""
        """heap: MicroPython's -X heapsize for the whole process. data_heap:
        bytes left for the firmware's data once its code is loaded; the
        heap is then the code's measured footprint plus data_heap. This is
        the 64-bit unix port's view, for tests of behaviour: on an ESP32 the
        code shares the heap with the data (nothing of ours is frozen), which
        tools/footprint.py measures on the 32-bit MicroPython."""
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.speed = speed
        self.heap = heap
        self.data_heap = data_heap
        self.code_bytes = 0
        self.mpy_dir = mpy_dir
        shutil.copy(ROOT / "boards" / board / "board.json", self.dir / "board.json")
        if config is not None:
            self.write_config(config)
        if sim is not None:
            (self.dir / "sim.json").write_text(json.dumps(sim))
        self.want_rs485 = rs485 if rs485 is not None else bool(config and (config.get("inverter")
                                                                           or config.get("battery")))
        self.sunspec_unit = sunspec_unit
        self.rs485_path = rs485_path
        self.extra_env = env or {}
        self.cable: Any = None
        self.console_path: str | None = None
        if console:
            from peergrid.sim.ptycable import PtyCable

            self.cable = PtyCable()
            self.console_path = self.cable.b_path     # what the commissioning laptop opens
        self.auto_restart = True                      # a reboot asked on the console restarts the process
        self.house: dict[str, Any] | None = None      # the last power/base/profile control sent
        self.sim: Any = None
        self.proc: subprocess.Popen[str] | None = None
        self.rebooted = False                         # restarted by a reboot, house not yet re-sent
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.log: list[dict[str, Any]] = []
        self.stderr: list[str] = []

    def write_config(self, config: dict[str, Any]) -> None:
        self.config = config
        tmp = self.dir / "config.json.new"
        tmp.write_text(json.dumps(config, indent=1))
        tmp.replace(self.dir / "config.json")

    # -- process -----------------------------------------------------------

    def start(self, timeout: float = 30, fresh: bool = True, wait: bool = True) -> dict[str, Any] | None:
        """Start the board's process; with `wait`, until it is ready (or
        uncommissioned). A reboot starts it without waiting: the events
        then belong to whoever waits on the board, "ready" included."""
        pty = ""
        self.auto_restart = True
        if self.rs485_path:
            pty = self.rs485_path
        elif self.want_rs485:
            if self.sim is None:
                from peergrid.sim.sunspec_sim import SunSpecDevice, SunSpecSim

                self.sim = SunSpecSim(SunSpecDevice(unit=self.sunspec_unit))
                self.sim_pty = self.sim.start()
            pty = self.sim_pty
        cmd = [micropython()]
        if self.data_heap:
            self.code_bytes = self.code_footprint()
            self.heap = str(self.code_bytes + self.data_heap)
        if self.heap:
            cmd += ["-X", f"heapsize={self.heap}"]
        args = [str(self.dir), repr(float(self.speed)), pty, self.cable.a_path if self.cable is not None else ""]
        env = dict(os.environ)
        env.update(self.extra_env)
        if self.installed():
            # the board's own flash holds its application (docs/OTA.md 3.1):
            # the loader picks the slot, nothing comes from the source tree
            cmd += [str(ROOT / "firmware" / "loader.py"), "boardsim.vboard"] + args
            env["MICROPYPATH"] = ".frozen"
        else:
            cmd += ["-m", "boardsim.vboard"] + args
            env["MICROPYPATH"] = firmware_path(self.mpy_dir)
        if fresh:
            self.events = queue.Queue()
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
        threading.Thread(target=self._reader, args=(self.proc, self.events), daemon=True).start()
        threading.Thread(target=self._err_reader, args=(self.proc,), daemon=True).start()
        if not wait:
            return None
        return self.wait_for(lambda e: e.get("ev") in ("ready", "uncommissioned"), timeout)

    def installed(self) -> bool:
        """An application was installed on this board's flash (install())."""
        return (self.dir / "lib").is_dir() or (self.dir / "ota.json").exists()

    def install(self, release: Path) -> None:
        """What `make deploy` does with a release: its application into the
        flash root (slot ""), no update slots, no update state."""
        release = Path(release)
        for p in ("lib", "app"):
            shutil.rmtree(self.dir / p, ignore_errors=True)
        for p in ("ota.json", "ota.tmp"):
            (self.dir / p).unlink(missing_ok=True)
        shutil.copytree(release / "lib", self.dir / "lib")
        for p in ("release_keys.json", "manifest.cose"):
            shutil.copy(release / p, self.dir / p)

    def code_footprint(self) -> int:
        """Heap bytes the firmware's modules take once imported."""
        env = dict(os.environ)
        env["MICROPYPATH"] = firmware_path(self.mpy_dir)
        r = subprocess.run([micropython(), "-X", "heapsize=4M", "-c",
                            "import gc\ngc.collect()\na=gc.mem_alloc()\nimport boardsim.vboard\n"
                            # loaded lazily once the board runs: code too, not data
                            "import firmware.metering, firmware.mqtt\n"
                            + ("import firmware.modbus, firmware.sunspec, boardsim.uart_posix\n"
                               if self.want_rs485 else "")
                            + "gc.collect()\nprint(gc.mem_alloc()-a)"],
                           cwd=self.dir, env=env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"footprint probe failed: {r.stderr[-500:]}")
        return int(r.stdout.strip().splitlines()[-1])

    def _reader(self, proc: subprocess.Popen[str], q: "queue.Queue[dict[str, Any]]") -> None:
        # events go to the queue of the start that made this process (a
        # killed process's exit must not land in the next start's queue)
        assert proc.stdout
        try:
            for line in proc.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    ev = {"ev": "text", "text": line}
                self.log.append(ev)
                q.put(ev)
                if ev.get("ev") == "ready" and self.rebooted and proc is self.proc and self.house is not None:
                    self.rebooted = False
                    try:
                        self.send(**self.house)  # the house's loads do not stop when its board restarts
                    except (RuntimeError, OSError):
                        pass
        except (OSError, ValueError):
            pass                                 # the pipe was closed after the process ended
        rc = proc.wait()
        if rc == 3 and self.auto_restart and proc is self.proc:
            # the firmware asked for a reboot (console): start it again, as the board would
            ev = {"ev": "rebooting"}
            self.log.append(ev)
            q.put(ev)
            # Not waiting here for "ready": this thread would take events
            # (that one, or a test's state reply) from whoever waits on them.
            self.rebooted = True
            try:
                self.start(fresh=False, wait=False)
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:   # (the heap probe's failure too)
                q.put({"ev": "exit", "rc": rc, "msg": str(e)})
            return
        q.put({"ev": "exit", "rc": rc})

    def _err_reader(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr
        try:
            for line in proc.stderr:
                self.stderr.append(line.rstrip())
        except (OSError, ValueError):
            pass

    def send(self, **req: Any) -> None:
        if not self.proc or not self.proc.stdin or self.proc.poll() is not None:
            raise RuntimeError(f"virtual board not running: {self.tail()}")
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        if req.get("op") in ("power", "base", "profile"):
            self.house = req

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"virtual board: no matching event in {timeout} s; {self.tail()}")
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                continue
            if ev.get("ev") == "exit" and not pred(ev):
                raise RuntimeError(f"virtual board exited rc={ev.get('rc')}; {self.tail()}")
            if ev.get("ev") == "error" and not pred(ev):
                raise RuntimeError(f"virtual board error: {ev}")
            if pred(ev):
                return ev

    def state(self, timeout: float = 10) -> dict[str, Any]:
        self.send(op="state")
        return self.wait_for(lambda e: e.get("ev") == "state", timeout)

    def poll_state(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 30,
                   every: float = 0.1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            st = self.state()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"virtual board: condition not reached in {timeout} s; last state {st}")
            time.sleep(every)

    def tail(self) -> str:
        return "stderr: " + " | ".join(self.stderr[-15:])

    def stop(self, timeout: float = 10) -> int | None:
        """Clean shutdown (quit), then make sure the process is gone."""
        rc = None
        if self.proc and self.proc.poll() is None:
            try:
                self.send(op="quit")
                rc = self.proc.wait(timeout)
            except (RuntimeError, subprocess.TimeoutExpired, BrokenPipeError):
                self.proc.kill()
                rc = self.proc.wait()
        self._close_pipes()
        return rc

    def _close_pipes(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        time.sleep(0.05)                       # let the readers see the end of their streams
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if f is not None:
                    f.close()
            except (OSError, ValueError):
                pass

    def kill(self) -> None:
        """Power cut: SIGKILL, nothing saved."""
        self.auto_restart = False
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self._close_pipes()

    def close(self) -> None:
        self.auto_restart = False
        self.stop()
        if self.sim is not None:
            self.sim.stop()
            self.sim = None
        if self.cable is not None:
            self.cable.close()
            self.cable = None


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="peergrid vboard", description="run the firmware as a virtual board")
    p.add_argument("--dir", required=True, help="the board's folder (its flash)")
    p.add_argument("--broker", default="127.0.0.1:1883", help="host:port")
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--community", default="oak")
    p.add_argument("--device", default="vboard1")
    p.add_argument("--secret-hex", help="device secret; a new random one if omitted (kept in the folder)")
    p.add_argument("--speed", type=float, default=1.0, help="board clock speed factor")
    p.add_argument("--heap", help="MicroPython heap size, e.g. 110K")
    p.add_argument("--inverter", action="store_true", help="a SunSpec inverter and battery on RS485")
    p.add_argument("--ca", type=Path, help="TLS: the community CA (PEM) the broker's certificate must chain to")
    p.add_argument("--name", help="TLS: the name the broker's certificate must carry (default: the broker's host)")
    a = p.parse_args(argv)
    host, _, port = a.broker.partition(":")
    folder = Path(a.dir)
    cfg_path = folder / "config.json"
    if cfg_path.exists() and not a.secret_hex:
        cfg = json.loads(cfg_path.read_text())
    else:
        secret = bytes.fromhex(a.secret_hex) if a.secret_hex else os.urandom(32)
        extra: dict[str, Any] = {}
        if a.inverter:
            extra = {"inverter": {"unit": 1}, "battery": {"unit": 1, "max_w": 5000}}
        tls = board_tls(a.ca, a.name or host) if a.ca else None
        cfg = default_config(a.community, a.device, secret, host, int(port or (8883 if tls else 1883)), a.user,
                             a.password, tls=tls, **extra)
    vb = VirtualBoard(folder, cfg, speed=a.speed, heap=a.heap)
    vb.start()
    print(f"virtual board {cfg['community']}/{cfg['device']} running in {folder} (Ctrl-C stops it)")
    next_summary = time.monotonic()
    try:
        while vb.proc and vb.proc.poll() is None:
            if time.monotonic() >= next_summary:
                next_summary = time.monotonic() + 5
                vb.send(op="state")
            try:
                ev = vb.events.get(timeout=1)
            except queue.Empty:
                continue
            if ev.get("ev") == "state":
                h, rem = divmod(ev["board_ms"] // 1000, 3600)
                print(f"board time {h:02d}:{rem // 60:02d}  readings {ev['stats']['readings']}  "
                      f"sent {ev['stats']['live'] + ev['stats']['replayed']}  buffered {ev['buffered']}  "
                      f"{'online' if ev['connected'] else 'OFFLINE (' + ev['uplink']['last_error'] + ')'}  "
                      f"relays {ev['relays']}  inverter {'ok' if ev['inv_ok'] else 'missing'}", flush=True)
            else:
                print(json.dumps(ev), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        vb.close()
    return 0
