"""Faults on the board's measurement path arrive flagged, never silently
wrong and never refused: the real firmware (Board on the simulated
converter) under MicroPython makes the readings; the gateway's validator
accepts them and sees the flag and which channel."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from harness import ROOT, micropython_cmd, mpy_env
from peergrid.community.registry import Device
from peergrid.ingest.validate import Validator, fault_warnings
from protocol import messages, topics

SIM_CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 100},
                {"role": "load", "rating_a": 50}, {"role": "ev", "rating_a": 50}]
SECRET = bytes.fromhex("ab" * 32)


def readings(tmp_path: Path, scenario: str) -> tuple[list[dict], dict]:
    out = subprocess.run(micropython_cmd() + ["tests/mpy_fault_board.py", str(tmp_path), scenario], cwd=ROOT,
                         env=mpy_env(ROOT / "build" / "mpy", ROOT), capture_output=True, text=True, timeout=120)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout + out.stderr
    r = json.loads(lines[0][7:])
    v = Validator("oak", lambda c, d: Device(c, d, None, SECRET, "sim", SIM_CHANNELS, None, 1, None),
                  max_skew_s=10 ** 10)
    msgs = [v.check(topics.topic("oak", "meter-9", topics.READING), bytes.fromhex(f), time.time()).msg
            for f in r["frames"]]
    assert len(msgs) >= 2, r
    return msgs, r


@pytest.mark.parametrize("scenario", ["ok", "clip", "ctf", "vref"])
def test_a_fault_arrives_flagged_and_accepted(tmp_path: Path, scenario: str) -> None:
    msgs, r = readings(tmp_path, scenario)
    m = msgs[-1]
    flags = m.get("flags", 0)
    fault_bits = messages.F_CLIPPED | messages.F_CT_FAULT | messages.F_VREF_FAULT | messages.F_FREQ_RANGE
    assert r["adc_cal"] == "efuse" and not flags & messages.F_UNCALIBRATED
    # the board measured back to back: every period holds several windows;
    # without a live voltage nothing counts as measured (powers are guesses)
    assert r["windows"] >= 2 * 2000 // 200, r
    assert m["meas"] == 0 if scenario == "vref" else m["meas"] >= 900, m
    w = [c[0] for c in m["ch"]]
    # counted per device by the gateway (metrics warnings)
    assert fault_warnings(m) == {"ok": [], "clip": ["clipped"], "ctf": ["ct_fault"], "vref": ["vref_fault"]}[scenario]
    if scenario == "ok":
        assert not flags & fault_bits and "clip" not in m and "ctf" not in m
        assert abs(w[0] - 4600) < 25 and abs(w[1] + 1150) < 10 and m["freq_chz"] == 5000, m
    elif scenario == "clip":
        assert flags & fault_bits == messages.F_CLIPPED and m["clip"] == 1, m
        # beyond the board's declared linear range (where a real ESP32's
        # converter bends and saturates), whatever the value reads
        assert w[0] > 230 * 120, m
    elif scenario == "ctf":
        assert flags & fault_bits == messages.F_CT_FAULT and m["ctf"] == 8, m
    else:
        assert flags & fault_bits == messages.F_VREF_FAULT, m
        assert "vrms_dv" not in m and "freq_chz" not in m, m
        # apparent power at the nominal voltage, booked as import even for
        # the exporting channel: a dead reference never pays its owner
        assert abs(w[0] - 4600) < 50 and abs(w[1] - 1150) < 15 and m["ch"][1][1] >= 0, m


def test_the_adc_calibration_is_cached_in_flash_and_a_damaged_cache_is_measured_again(tmp_path: Path) -> None:
    _, r = readings(tmp_path, "ok")
    assert r["adc_cal"] == "efuse" and (tmp_path / "adc_cal.bin").stat().st_size >= 16
    cached = (tmp_path / "adc_cal.bin").read_bytes()
    _, r = readings(tmp_path, "ok")          # the next boot: from flash, the same points
    assert r["adc_cal"] == "flash" and (tmp_path / "adc_cal.bin").read_bytes() == cached
    (tmp_path / "adc_cal.bin").write_bytes(cached[:13])     # torn write: not whole points
    _, r = readings(tmp_path, "ok")
    assert r["adc_cal"] == "efuse" and (tmp_path / "adc_cal.bin").read_bytes() == cached


def test_a_cache_with_falling_points_is_not_trusted(tmp_path: Path) -> None:
    import struct
    (tmp_path / "adc_cal.bin").write_bytes(struct.pack("<6i", 0, 0, 4000, 3000000, 2000, 100))
    _, r = readings(tmp_path, "ok")
    assert r["adc_cal"] == "efuse"
