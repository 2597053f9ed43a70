"""Options and the rig fixture of the hardware-in-the-loop suite:

    pytest hil-tests                                   # the virtual rig (make test)
    pytest hil-tests --rig bench --rig-config bench.toml
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rig import load_rig  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("hil", "hardware in the loop")
    g.addoption("--rig", default="virtual", choices=["virtual", "bench"], help="which rig the scenarios run on")
    g.addoption("--rig-config", default=None, help="the bench rig's TOML (see hil-tests/bench.example.toml)")


@pytest.fixture(scope="session")
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    r = load_rig(request.config.getoption("--rig"), request.config.getoption("--rig-config"),
                 tmp_path_factory.mktemp("rig"))
    try:
        r.start()
        yield r
    finally:
        r.close()

