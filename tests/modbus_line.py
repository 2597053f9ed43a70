"""The board's Modbus master on a real-speed line, for the tests and
tests/bench/bench_modbus.py: a pymodbus SunSpec device (peergrid.sim.sunspec_sim)
on a throttled pseudo-terminal cable (the bytes at the line's baud rate,
11 bits a character) that starts each answer `latency_ms` after the request,
and the firmware's master and SunSpec client on the real MicroPython
(tests/mpy_modbus_cycles.py) reading it as the board does each period.

Every cycle the device gets new values first (power, energy, state of charge,
the battery's direction), so an answer that belongs to an earlier request
reads wrong and is counted as such."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

from harness import ROOT, micropython_cmd, mpy_env
from peergrid.sim.sunspec_sim import SunSpecDevice, SunSpecSim

PROBE = Path(__file__).resolve().parent / "mpy_modbus_cycles.py"


def values(i: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """What the device holds in cycle i, and what the board must read:
    (inverter w, wh, state), (battery soc permille, w, ChaSt)."""
    bw = (300 + 11 * i) * (1 if i % 2 else -1)
    return (1000 + 7 * i, 6_000_000 + 13 * i, 4), (100 + 5 * i, bw, 4 if bw > 0 else 3)


class Line:
    """A SunSpec device on a throttled cable and the firmware reading it."""

    def __init__(self, latency_ms: float, rs485: dict[str, Any] | None = None,
                 cfg: dict[str, Any] | None = None, baud: int = 9600,
                 device: SunSpecDevice | None = None, paths: list[Path | str] | None = None) -> None:
        self.dev = device or SunSpecDevice(unit=1)
        self.sim = SunSpecSim(self.dev, baud=baud, throttle=True, latency_ms=latency_ms)
        self.path = self.sim.start()
        rs = dict(rs485 or {}, baud=baud)
        self.cfg = cfg if cfg is not None else {"inverter": {"unit": 1}, "battery": {"unit": 1, "max_w": 5000}}
        self.set_cycle(0)
        self.proc = subprocess.Popen(micropython_cmd() + [str(PROBE), self.path, json.dumps(rs), json.dumps(self.cfg)],
                                     cwd=ROOT, env=mpy_env(*(paths or [ROOT])), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def set_cycle(self, i: int) -> None:
        (w, wh, st), (soc, bw, _) = values(i)
        self.dev.set_inverter(w, wh, st)
        self.dev.set_battery(soc, bw)

    def _line(self) -> dict[str, Any]:
        out = self.proc.stdout.readline()        # type: ignore[union-attr]
        if not out:
            raise RuntimeError("the MicroPython side ended: " + self.proc.stderr.read())   # type: ignore[union-attr]
        return json.loads(out)

    def discovery(self) -> dict[str, Any]:
        return self._line()

    def cycle(self, i: int, before: Callable[[], None] | None = None) -> dict[str, Any]:
        """Cycle i: new values on the device, then the board's reads."""
        self.set_cycle(i)
        if before is not None:
            before()
        self.proc.stdin.write("go\n")            # type: ignore[union-attr]
        self.proc.stdin.flush()                  # type: ignore[union-attr]
        r = self._line()
        (w, wh, st), (soc, bw, cha) = values(i)
        r["inv_right"] = r["inv"] == [st, w, wh]
        r["bat_right"] = r["bat"] == [cha, bw, soc]
        return r

    def stats(self) -> dict[str, Any]:
        self.proc.stdin.write("stats\n")         # type: ignore[union-attr]
        self.proc.stdin.flush()                  # type: ignore[union-attr]
        return self._line()

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")      # type: ignore[union-attr]
            self.proc.stdin.close()              # type: ignore[union-attr]
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.sim.stop()
