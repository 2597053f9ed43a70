"""Shared fixtures: the MicroPython interpreter, compiled firmware, a real broker."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "shared"))
sys.path.insert(0, str(ROOT / "tests"))

from harness import Broker, micropython_cmd, mpy_build  # noqa: E402


# The files that take longest (most of it waiting on real time: settlement
# intervals, board clocks, broker outages), longest first, as measured in
# CI on 2026-11-30 (pytest --durations). `make test` hands whole files to
# two workers in collection order (--dist loadfile), so these go first and
# the short files fill in at the end, instead of one long file running alone
# while the other worker has nothing left to do.
LONGEST_FIRST = ("tests/test_vboard.py", "tests/test_hil_bench.py", "tests/test_residents.py",
                 "hil-tests/test_scenarios.py", "tests/test_commission.py", "tests/test_energy_gateway.py",
                 "tests/test_init.py", "tests/test_micropython.py", "tests/test_ota.py", "tests/test_board32.py",
                 "tests/test_control.py", "tests/test_mirror.py", "tests/test_backup.py", "tests/test_ota_board.py",
                 "tests/test_broker_identity.py", "tests/test_modbus_line.py", "tests/test_doctor.py")


def pytest_collection_modifyitems(session, config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(pair: tuple[int, pytest.Item]) -> tuple[int, int]:
        rel = Path(str(pair[1].path)).resolve().relative_to(ROOT).as_posix()
        return rank.get(rel, len(LONGEST_FIRST)), pair[0]
    items[:] = [it for _, it in sorted(enumerate(items), key=key)]


@pytest.fixture(scope="session")
def micropython() -> list[str]:
    return micropython_cmd()


@pytest.fixture(scope="session")
def mpy_dir(tmp_path_factory) -> Path:
    """protocol/ (and firmware/) compiled with mpy-cross into a fresh folder."""
    return mpy_build(tmp_path_factory.mktemp("mpy"))


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A real mosquitto on a free loopback port, with per-user passwords and ACLs."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many tests ran under each interpreter."""
    stats = terminalreporter.stats
    mpy = mp32 = cpy = 0
    for rep in stats.get("passed", []):
        if "test_under_micropython" in rep.nodeid and "mpy32" in rep.nodeid:
            mp32 += 1
        elif "test_under_micropython" in rep.nodeid:
            mpy += 1
        else:
            cpy += 1
    failed = len(stats.get("failed", []))
    terminalreporter.write_line(
        f"interpreters: {cpy} passed under CPython, {mpy} under the 64-bit MicroPython unix port "
        f"(shared tests from .mpy), {mp32} under the 32-bit MicroPython (from .mpy), "
        f"{failed} failed")
