"""`make firmware`, `make flash`, `make deploy` (issue 8): every board's
bundle builds and loads on the real MicroPython; flashing runs esptool and
mpremote as it should (fakes on PATH record every call) and each mistake an
electrician makes gets its own message."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import micropython_cmd

ROOT = Path(__file__).resolve().parents[1]
BOARDS = sorted(p.parent.name for p in (ROOT / "boards").glob("*/board.json"))
FAKE = r'''#!{py}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({{"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\n")
if os.environ.get("FAKE_FAIL") == os.path.basename(sys.argv[0]):
    print("A fatal error occurred: Failed to connect to ESP32: No serial data received.", file=sys.stderr)
    sys.exit(2)
'''


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          env=e, timeout=300)


@pytest.mark.parametrize("board", BOARDS)
def test_firmware_bundle_builds_and_loads_on_micropython(board) -> None:
    r = make("firmware", f"BOARD={board}")
    assert r.returncode == 0, r.stderr
    out = ROOT / "build" / "firmware" / board
    man = json.loads((out / "manifest.json").read_text())
    assert man["board"] == board and man["fw"]
    for rel, sha in man["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha, rel
    assert not (out / "config.json").exists()
    bdef = json.loads((ROOT / "boards" / board / "board.json").read_text())
    # the bundle is the board folders whole (firmware/, protocol/) and umqtt;
    # the simulated hardware (boardsim/) goes only into the sim board's
    pkgs = ["firmware", "protocol"] + (["boardsim"] if bdef.get("mcu") == "sim" else [])
    want = {f"lib/{pkg}/{f.stem}.mpy" for pkg in pkgs for f in (ROOT / pkg).glob("*.py")}
    got = {str(f.relative_to(out)) for f in (out / "lib").rglob("*") if f.is_file()}
    assert {g for g in got if not g.startswith("lib/umqtt_pinned/")} == want
    if bdef.get("mcu") != "sim":
        sim = {f.stem for f in (ROOT / "boardsim").glob("*.py")} - {"__init__"}
        assert not [f for f in out.rglob("*.mpy") if f.stem in sim], "a simulation module in a board's bundle"
    assert list((out / "lib" / "umqtt_pinned").glob("simple.mpy"))
    mods = "firmware.board firmware.console firmware.main protocol.link umqtt_pinned.simple".split()
    code = "import " + ", ".join(mods) + "\nprint('ok', firmware.board.FW_VERSION)"
    env = dict(os.environ, MICROPYPATH=str(out / "lib"))
    p = subprocess.run(micropython_cmd() + ["-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout.strip() == f"ok {man['fw']}", p.stderr


@pytest.fixture
def fakes(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("esptool", "mpremote"):
        f = bin_ / name
        f.write_text(FAKE.format(py=sys.executable))
        f.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "FAKE_LOG": str(log), "PEERGRID_FLASH_TOOLS": "fake"}

    def calls() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    return env, calls


@pytest.fixture
def port():
    from peergrid.sim.ptycable import PtyCable

    c = PtyCable()
    yield c.b_path
    c.close()


def test_flash_erases_writes_micropython_and_copies_the_bundle(fakes, port, tmp_path) -> None:
    env, calls = fakes
    img = tmp_path / "ESP32_GENERIC-SPIRAM-v1.28.0.bin"       # devkitc-3ct is a WROVER board
    img.write_bytes(b"\xe9" + bytes(1000))
    r = make("flash", "BOARD=devkitc-3ct", f"PORT={port}", f"IMAGE={img}", env=env)
    assert r.returncode == 0, r.stderr
    c = calls()
    assert [x["tool"] for x in c] == ["esptool", "esptool", "esptool", "mpremote"]
    assert c[0]["argv"] == ["--chip", "esp32", "--port", port, "erase-flash"]
    bundle = ROOT / "build" / "firmware" / "devkitc-3ct"
    assert c[1]["argv"][-4:] == ["write-flash", "-z", "0x1000", str(img)]
    assert c[2]["argv"][-3:] == ["write-flash", "0x8000", str(bundle / "partitions.bin")]
    mp = c[3]["argv"]
    assert mp[:2] == ["connect", port] and mp[2:6] == ["fs", "cp", "-r", "lib"] and mp[-1] == "reset"
    assert ":main.py" in mp and ":board.json" in mp and ":manifest.json" in mp and ":config.json" not in mp
    assert c[3]["cwd"] == str(bundle)
    assert "commission it now" in r.stdout


def test_deploy_copies_the_application_only(fakes, port) -> None:
    env, calls = fakes
    r = make("deploy", "BOARD=olimex-esp32-poe-iso", f"PORT={port}", env=env)
    assert r.returncode == 0, r.stderr
    assert [x["tool"] for x in calls()] == ["mpremote"]


def test_flash_mistakes_each_get_their_message(fakes, port, tmp_path) -> None:
    import serial

    env, calls = fakes
    img = tmp_path / "ESP32_GENERIC-SPIRAM-v1.28.0.bin"
    img.write_bytes(b"\xe9")
    r = make("flash", "BOARD=esp8266", f"PORT={port}", f"IMAGE={img}", env=env)
    assert r.returncode != 0 and "no board 'esp8266'; the boards are: circuitsetup-6ch" in r.stderr
    r = make("flash", "BOARD=devkitc-3ct", f"IMAGE={img}", env=env)
    assert r.returncode != 0 and "PORT is missing" in r.stderr
    r = make("flash", "BOARD=devkitc-3ct", "PORT=/dev/ttyUSB97", f"IMAGE={img}", env=env)
    assert r.returncode != 0 and "no such port /dev/ttyUSB97" in r.stderr
    r = make("flash", "BOARD=devkitc-3ct", f"PORT={port}", f"IMAGE={tmp_path / 'none.bin'}", env=env)
    assert r.returncode != 0 and "MicroPython image" in r.stderr and "IMAGE=" in r.stderr
    plain = tmp_path / "ESP32_GENERIC-v1.28.0.bin"            # no PSRAM: too small a heap for this board
    plain.write_bytes(b"\xe9")
    r = make("flash", "BOARD=devkitc-3ct", f"PORT={port}", f"IMAGE={plain}", env=env)
    assert r.returncode != 0 and "needs the ESP32_GENERIC-SPIRAM image" in r.stderr
    held = serial.Serial(port, 115200, exclusive=True)
    try:
        r = make("flash", "BOARD=devkitc-3ct", f"PORT={port}", f"IMAGE={img}", env=env)
        assert r.returncode != 0 and "in use by another program" in r.stderr
    finally:
        held.close()
    assert calls() == []                                    # none of these reached the board
    r = make("flash", "BOARD=devkitc-3ct", f"PORT={port}", f"IMAGE={img}", env={**env, "FAKE_FAIL": "esptool"})
    assert r.returncode != 0 and "erasing the flash failed" in r.stderr and "BOOT" in r.stderr
    r = make("deploy", "BOARD=devkitc-3ct", f"PORT={port}", env={**env, "FAKE_FAIL": "mpremote"})
    assert r.returncode != 0 and "does not answer on its REPL" in r.stderr


def test_partition_table_holds_the_firmware_partitions() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import partitions

    r = make("firmware", "BOARD=devkitc-3ct")
    assert r.returncode == 0, r.stderr
    data = (ROOT / "build" / "firmware" / "devkitc-3ct" / "partitions.bin").read_bytes()
    assert len(data) == 0xC00
    parts = {p[0]: p for p in partitions.parse(data)}
    assert set(parts) == {"nvs", "phy_init", "factory", "vfs", "energy", "spool"}
    assert parts["energy"][4] >= 16 * 4096 and parts["spool"][4] >= 1536 * 1024     # what the firmware asks for
    spans = sorted((p[3], p[3] + p[4]) for p in parts.values())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= 4 * 0x100000
    assert all(p[3] % 0x1000 == 0 for p in parts.values()) and parts["factory"][3] % 0x10000 == 0
    bad = bytearray(data)
    bad[40] ^= 1
    with pytest.raises(ValueError, match="MD5"):
        partitions.parse(bytes(bad))
