"""Board definitions: the shipped ones pass, and each rule catches what it should."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest

from harness import ROOT
from peergrid.commissioning.boards import check, check_paths, load

BOARDS = sorted(p for p in (ROOT / "boards").iterdir() if (p / "board.json").exists())
REQUIRED = {"devkitc-3ct", "olimex-esp32-poe-iso", "circuitsetup-6ch", "sim"}


def test_required_boards_exist() -> None:
    assert REQUIRED <= {p.name for p in BOARDS}


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.name)
def test_shipped_board_has_no_errors(path) -> None:
    errors = [f for f in check_paths([path]) if f.level == "error"]
    assert errors == []


def _devkit():
    return copy.deepcopy(load(ROOT / "boards" / "devkitc-3ct"))


def _errors(board) -> list[str]:
    return [f.message for f in check(board) if f.level == "error"]


def test_flash_pin_rejected() -> None:
    b = _devkit()
    b["relays"][0]["pin"] = 7
    assert any("SPI flash" in m for m in _errors(b))


def test_output_on_input_only_pin_rejected() -> None:
    b = _devkit()
    b["rs485"]["de"] = 35
    errs = _errors(b)
    assert any("input-only" in m for m in errs)


def test_rs485_baud_and_latency_checked() -> None:
    b = _devkit()
    assert b["rs485"]["latency_ms"] == 500 and not _errors(b)
    for key, bad in (("latency_ms", -1), ("latency_ms", 5001), ("latency_ms", "300"), ("baud", 600),
                     ("baud", 9600.0)):
        b = _devkit()
        b["rs485"][key] = bad
        assert any(f"rs485: {key}" in m for m in _errors(b)), (key, bad)


def test_adc2_with_wifi_rejected_but_fine_on_ethernet() -> None:
    b = _devkit()
    b["channels"][0]["pin"] = 25
    assert any("ADC2" in m for m in _errors(b))
    b["network"] = {"type": "ethernet", "mdc": 23, "mdio": 18}
    assert not any("ADC2" in m for m in _errors(b))


def test_duplicate_pin_rejected() -> None:
    b = _devkit()
    b["relays"][1]["pin"] = b["relays"][0]["pin"]
    assert any("used twice" in m for m in _errors(b))


def test_strapping_pin_warns_only() -> None:
    b = _devkit()
    b["relays"][0]["pin"] = 15
    findings = [f for f in check(b) if "GPIO15" in f.message]
    assert findings and all(f.level == "warning" for f in findings)


def test_console_pins_and_missing_adc_rejected() -> None:
    b = _devkit()
    b["relays"][0]["pin"] = 1
    b["channels"][1]["pin"] = 23
    errs = _errors(b)
    assert any("UART0" in m for m in errs) and any("has no ADC" in m for m in errs)


def test_ct_that_would_clip_rejected() -> None:
    b = _devkit()
    b["channels"][0]["burden_ohm"] = 47     # 100 A through 2000 turns into 47 ohm: 3.3 V peak
    assert any("clip" in m for m in _errors(b))


def test_metering_ic_inputs_checked() -> None:
    b = copy.deepcopy(load(ROOT / "boards" / "circuitsetup-6ch"))
    b["channels"][1]["phase"] = "A"
    assert any("used twice" in m for m in _errors(b))
    b["channels"][1]["chip"] = 5
    assert any("needs chip" in m for m in _errors(b))


def test_cli_exit_code(tmp_path) -> None:
    bad = _devkit()
    bad["relays"][0]["pin"] = 8
    d = tmp_path / "devkitc-3ct"
    d.mkdir()
    import json

    (d / "board.json").write_text(json.dumps(bad))
    cmd = [sys.executable, "-m", "peergrid.cli", "check-board"]
    ok = subprocess.run(cmd + [str(p) for p in BOARDS], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run(cmd + [str(d)], capture_output=True, text=True)
    assert fail.returncode == 1 and "SPI flash" in fail.stderr


def test_voltage_reference_that_would_clip_rejected() -> None:
    b = _devkit()
    b["vref"]["transformer_ratio"] = 9.2     # a 25 V transformer on an 11:1 divider
    assert any("voltage reference" in m and "clip" in m for m in _errors(b))


def test_bias_outside_the_linear_range_rejected() -> None:
    b = _devkit()
    b["frontend"]["bias_mv"] = 2600
    assert any("outside the linear range" in m for m in _errors(b))


def test_module_and_heap_must_be_stated_and_fit_the_module() -> None:
    b = _devkit()
    del b["module"]
    assert any("module must be one of" in m for m in _errors(b))
    b = _devkit()
    b["heap_bytes"] = 4_000_000             # more than a WROVER board plans with
    assert any("heap_bytes" in m for m in _errors(b))
    b = _devkit()
    b["module"], b["heap_bytes"], b["image"] = "ESP32-WROOM-32E", 111_936, "ESP32_GENERIC"
    assert _errors(b) == []                  # GPIO16/17 are free on a WROOM module
    b["image"] = "ESP32_GENERIC-SPIRAM"
    assert any("image must be ESP32_GENERIC " in m for m in _errors(b))


def test_psram_pins_rejected_on_a_wrover_module() -> None:
    b = _devkit()
    assert b["module"] == "ESP32-WROVER-E"
    b["rs485"]["tx"], b["rs485"]["rx"] = 17, 16
    errs = _errors(b)
    assert any("GPIO17 drives the PSRAM" in m for m in errs) and any("GPIO16 drives the PSRAM" in m for m in errs)
    olimex = copy.deepcopy(load(ROOT / "boards" / "olimex-esp32-poe-iso"))
    assert _errors(olimex) == []
    olimex["network"]["clock"] = "gpio17_out"       # the WROOM variant's clock pin
    assert any("Ethernet clock: GPIO17 drives the PSRAM" in m for m in _errors(olimex))
