"""The board's MQTT object (firmware/mqtt.py, a subclass of umqtt.simple)
under the real MicroPython, from source and from .mpy: exact bytes on the
wire and no way for a half-sent packet to hang it. Every check is its own
pytest item."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import ROOT, run_micropython

_cache: dict[str, dict[str, str]] = {}
CHECKS = re.findall(r'\("(\w+)", \w+\)', (ROOT / "tests" / "mpy_board_mqtt.py").read_text())


def _run(variant: str, mpy_dir: Path) -> dict[str, str]:
    if variant not in _cache:
        base = mpy_dir if variant == "mpy" else ROOT
        proc = run_micropython(["tests/mpy_board_mqtt.py"], [base, ROOT / "build" / "lib"], heap="512K")
        res = {}
        for line in proc.stdout.splitlines():
            m = re.match(r"(PASS|FAIL) (\w+)(.*)", line)
            if m:
                res[m.group(2)] = m.group(1) + m.group(3)
        if not res:
            res["<run>"] = f"rc={proc.returncode} {proc.stdout[-1500:]} {proc.stderr[-1500:]}"
        _cache[variant] = res
    return _cache[variant]


def test_checks_found() -> None:
    assert len(CHECKS) >= 10


@pytest.mark.parametrize("variant", ["source", "mpy"])
@pytest.mark.parametrize("name", CHECKS)
def test_board_mqtt(name: str, variant: str, mpy_dir: Path) -> None:
    res = _run(variant, mpy_dir)
    assert "<run>" not in res, res.get("<run>")
    assert res.get(name) == "PASS", res.get(name, "not reported")
