"""The site sheet (house.toml or .json): reading it, and checking it
against the board's definition before anything is written anywhere."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from peergrid.commissioning.boards import MODULES
from peergrid.commissioning.errors import Stop

NO_PSRAM_HEAP = MODULES["ESP32-WROOM-32E"]["heap"]     # an ESP32's heap without PSRAM


def load_sheet(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise Stop(f"Cannot read the site sheet {path}: {e}") from None


def sheet_problems(sh: dict[str, Any], bdef: dict[str, Any]) -> list[str]:
    from protocol import topics

    out = []
    h = sh.get("house") or {}
    if not h.get("member"):
        out.append("house.member (the member's name) is missing")
    if not topics.valid_id(h.get("device", "")):
        out.append("house.device must be 1-16 of a-z, 0-9 and '-'")
    names = [c["name"] for c in bdef["channels"]]
    cts = sh.get("ct") or []
    if sum(1 for c in cts if c.get("role") == "grid") != 1:
        out.append("exactly one CT must have the role 'grid'")
    for c in cts:
        if c.get("name") not in names:
            out.append(f"CT {c.get('name')!r} is not on this board (it has {', '.join(names)})")
        if c.get("role") not in ("grid", "pv", "battery", "load", "ev"):
            out.append(f"CT {c.get('name')}: role {c.get('role')!r} is not grid, pv, battery, load or ev")
        if not isinstance(c.get("rating_a"), (int, float)) or c["rating_a"] <= 0:
            out.append(f"CT {c.get('name')}: rating_a must be a positive number")
    nrel = len(bdef.get("relays") or [])
    for r in sh.get("relay") or []:
        if not isinstance(r.get("index"), int) or not 0 <= r["index"] < nrel:
            out.append(f"relay index {r.get('index')} is not on this board (0..{nrel - 1})")
        if r.get("failsafe", 0) not in (0, 1):
            out.append("a relay's failsafe is 0 (off) or 1 (on)")
    inv = sh.get("inverter")
    if inv is not None and not (isinstance(inv.get("unit"), int) and 1 <= inv["unit"] <= 247):
        out.append("inverter.unit is a Modbus address 1..247")
    if inv is not None and bdef.get("heap_bytes", 0) <= NO_PSRAM_HEAP:
        # the Modbus master, SunSpec and the inverter driver add about 15 KB
        # of code to the heap (README, "The board's heap"): the quarter a
        # board keeps free of 111,936 B is gone
        out.append(f"inverter: board {bdef.get('name')} ({bdef.get('module')}, no PSRAM) has "
                   f"{bdef.get('heap_bytes')} B of heap, too little for the inverter's Modbus and SunSpec code; "
                   "use a board with PSRAM (a WROVER module) in a house with an inverter or battery")
    return out
