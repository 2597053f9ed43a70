#!/usr/bin/env python3
"""`make flash` and `make deploy`: put a bundle (tools/bundle.py) on a board.

  flash   erase the ESP32, write the MicroPython image with esptool, copy the
          bundle with mpremote (a board that was commissioned loses its config:
          commission it again)
  deploy  copy the bundle only (the application update; the commissioning
          config, energy registers and buffered readings stay)

Every failure says what to do. esptool and mpremote are found on PATH
(`make flash` installs the pinned ones into .venv).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fail(msg: str, code: int = 2) -> None:
    print(f"make flash: {msg}", file=sys.stderr)
    sys.exit(code)


def check_port(port: str) -> None:
    if not port:
        cands = sorted(str(p) for pat in ("ttyUSB*", "ttyACM*", "cu.usb*") for p in Path("/dev").glob(pat))
        fail("PORT is missing: make flash BOARD=<name> PORT=/dev/ttyUSB0"
             + (f" (found: {', '.join(cands)})" if cands else " (no USB serial port found: plug the board in)"))
    if not os.path.exists(port):
        fail(f"no such port {port}: is the board plugged in (data cable), and is the name right?")
    try:
        import serial

        s = serial.Serial(port, 115200, timeout=0.1, exclusive=True)
        s.close()
    except ImportError:
        pass
    except Exception as e:  # noqa: BLE001 - pyserial's errors vary by platform
        text = str(e)
        if "busy" in text.lower() or "lock" in text.lower() or "in use" in text.lower():
            fail(f"{port} is in use by another program (a serial monitor, another make?): close it first")
        if "ermission" in text:
            fail(f"no permission for {port}: add yourself to the 'dialout' group (then log in again)")
        fail(f"cannot open {port}: {text}")


def tool(name: str) -> str:
    p = shutil.which(name)
    if p is None:
        fail(f"{name} not found on PATH: `make flash` installs it into .venv (pip install '.[flash]')")
    return p


def run(cmd: list[str], what: str, hint: str, cwd: Path | None = None) -> None:
    print("  " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, cwd=cwd)
    if r.returncode != 0:
        fail(f"{what} failed (exit {r.returncode}). {hint}", 3)


def copy_bundle(port: str, bundle: Path) -> None:
    mp = tool("mpremote")
    run([mp, "connect", port, "fs", "cp", "-r", "lib", ":", "+", "fs", "cp", "board.json", ":board.json",
         "+", "fs", "cp", "manifest.json", ":manifest.json", "+", "fs", "cp", "main.py", ":main.py", "+", "reset"],
        "copying the firmware with mpremote",
        "The board does not answer on its REPL: press its reset button and try again; if it still fails, "
        "run `make flash` to write MicroPython first.", cwd=bundle)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["flash", "deploy"])
    ap.add_argument("--board", default="")
    ap.add_argument("--port", default="")
    ap.add_argument("--image", default="")
    ap.add_argument("--baud", default="460800")
    a = ap.parse_args()
    if not a.board:
        fail("BOARD is missing: make flash BOARD=<name> PORT=<port>")
    bundle = ROOT / "build" / "firmware" / a.board
    if not (bundle / "manifest.json").exists():
        fail(f"no bundle for {a.board!r}: run make firmware BOARD={a.board}")
    check_port(a.port)
    if a.what == "flash":
        if not (bundle / "partitions.bin").exists():
            fail(f"{a.board} is not an ESP32 board (no partition table in its bundle): nothing to flash")
        # the board's module decides the image: ESP32_GENERIC without PSRAM,
        # ESP32_GENERIC-SPIRAM for a WROVER (the heap the firmware needs)
        want = json.loads((bundle / "board.json").read_text()).get("image") or "ESP32_GENERIC"
        img = Path(a.image) if a.image else ROOT / "build" / "micropython" / f"{want}.bin"
        if not img.exists():
            fail(f"the MicroPython image {img} is missing: download the {want} image of MicroPython 1.28 "
                 f"({want}-<date>-v1.28.<n>.bin from micropython.org/download/ESP32_GENERIC) and give its "
                 "path: make flash ... IMAGE=path/to/image.bin")
        rest = img.name[len(want):] if img.name.startswith(want) else None
        if rest is None or re.match(r"-(SPIRAM|D2WD|OTA|UNICORE)", rest):
            fail(f"{a.board} needs the {want} image of MicroPython (its module's heap), not {img.name}")
        et = tool("esptool")
        hint = ("The board does not answer: check the cable, then hold its BOOT button while pressing EN/RESET "
                "to put it into download mode and try again.")
        run([et, "--chip", "esp32", "--port", a.port, "erase-flash"], "erasing the flash", hint)
        run([et, "--chip", "esp32", "--port", a.port, "--baud", a.baud, "write-flash", "-z", "0x1000", str(img)],
            "writing MicroPython", hint)
        # then our partition table over the image's own (it has the energy and spool partitions); a
        # separate write, since the image itself covers 0x8000 and esptool refuses overlapping files
        run([et, "--chip", "esp32", "--port", a.port, "write-flash", "0x8000", str(bundle / "partitions.bin")],
            "writing the partition table", hint)
    copy_bundle(a.port, bundle)
    print(f"{a.what}: {a.board} on {a.port} done" + (" (commission it now: peergrid commission)"
                                                        if a.what == "flash" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
