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
