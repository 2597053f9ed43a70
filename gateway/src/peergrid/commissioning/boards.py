"""Checks board definitions (boards/<name>/board.json) before anything is built.

ESP32 pin rules (from the ESP32 datasheet and technical reference manual):
GPIO 6-11 drive the SPI flash; GPIO 34-39 are inputs only; ADC2 cannot be read
while Wi-Fi is on; GPIO 0, 2, 5, 12 and 15 select boot modes (strapping); GPIO 1
and 3 are UART0, the serial console the commissioning protocol uses."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ESP32_GPIO = set(range(0, 20)) | {21, 22, 23, 25, 26, 27} | set(range(32, 40))
FLASH_PINS = set(range(6, 12))
INPUT_ONLY = set(range(34, 40))
ADC1 = set(range(32, 40))
ADC2 = {0, 2, 4, 12, 13, 14, 15, 25, 26, 27}
STRAPPING = {0, 2, 5, 12, 15}
CONSOLE = {1, 3}
FRONTENDS = {"adc", "atm90e32"}
# The module decides the heap: on a stock MicroPython image the GC heap holds
# the firmware's code (.mpy files loaded from the filesystem) and its data.
# Without PSRAM it is 111,936 bytes once Wi-Fi runs (ESP32_GENERIC); the
# -SPIRAM image puts the heap in the module's PSRAM, about 4 MB (MicroPython's
# ESP32 docs), of which boards plan with half. On a WROVER module GPIO16 and
# GPIO17 drive the PSRAM. tools/footprint.py measures what the firmware needs
# on the 32-bit MicroPython and refuses a board that leaves less than 25 %.
MODULES: dict[str, dict[str, Any]] = {
    "ESP32-WROOM-32": {"heap": 111_936, "image": "ESP32_GENERIC", "psram": False},
    "ESP32-WROOM-32E": {"heap": 111_936, "image": "ESP32_GENERIC", "psram": False},
    "ESP32-WROVER-B": {"heap": 2_097_152, "image": "ESP32_GENERIC-SPIRAM", "psram": True},
    "ESP32-WROVER-E": {"heap": 2_097_152, "image": "ESP32_GENERIC-SPIRAM", "psram": True},
    "virtual": {"heap": 2_097_152, "image": None, "psram": False},
}
PSRAM_PINS = {16, 17}
NETWORKS = {"wifi", "ethernet", "host"}
MAX_CHANNELS = 12


@dataclass(frozen=True)
class Finding:
    level: str  # "error" or "warning"
    board: str
    message: str

    def __str__(self) -> str:
        return f"{self.board}: {self.level}: {self.message}"


def load(path: Path) -> dict[str, Any]:
    f = path / "board.json" if path.is_dir() else path
    return json.loads(f.read_text())


def check(board: dict[str, Any]) -> list[Finding]:
    """All findings for one board definition; errors make the board unusable."""
    name = str(board.get("name", "?"))
    out: list[Finding] = []

    def err(msg: str) -> None:
        out.append(Finding("error", name, msg))

    def warn(msg: str) -> None:
        out.append(Finding("warning", name, msg))

    for key in ("name", "mcu", "network", "frontend", "channels"):
        if key not in board:
            err(f"missing '{key}'")
    if any(f.level == "error" for f in out):
        return out
    mcu = board["mcu"]
    if mcu not in ("esp32", "sim"):
        err(f"unknown mcu '{mcu}'")
    module = MODULES.get(board.get("module", ""))
    if module is None:
        err(f"module must be one of {', '.join(sorted(MODULES))}, got {board.get('module')!r}")
    else:
        if (board["module"] == "virtual") != (mcu == "sim"):
            err(f"module {board['module']} does not go with mcu {mcu}")
        heap = board.get("heap_bytes")
        if not isinstance(heap, int) or isinstance(heap, bool) or not 0 < heap <= module["heap"]:
            err(f"heap_bytes must be a whole number of bytes up to the {module['heap']} the "
                f"{board['module']} gives the firmware, got {heap!r}")
        if module["image"] and board.get("image") != module["image"]:
            err(f"image must be {module['image']} for a {board['module']} (got {board.get('image')!r})")
    net = board["network"].get("type")
    if net not in NETWORKS:
        err(f"unknown network type '{net}'")
    wifi = net == "wifi"
    fe = board["frontend"].get("type")
    if fe not in FRONTENDS:
        err(f"unknown front end '{fe}'")

    uses: list[tuple[int, str, str]] = []  # (pin, role, direction in|out|io)

    def use(pin: Any, role: str, direction: str) -> None:
        if not isinstance(pin, int):
            err(f"{role}: pin must be a GPIO number, got {pin!r}")
            return
        uses.append((pin, role, direction))

    chans = board["channels"]
    if not isinstance(chans, list) or not 1 <= len(chans) <= MAX_CHANNELS:
        err(f"channels: 1 to {MAX_CHANNELS} needed")
        chans = []
    names = [c.get("name") for c in chans]
    if len(set(names)) != len(names):
        err("channel names must be unique")
    # Signals must stay inside the converter's calibrated linear range (the
    # ESP32 ADC at 11 dB is linear from about 150 to 2450 mV): the swing
    # around the bias is the smaller distance to either end.
    bias_mv = board["frontend"].get("bias_mv", 1300)
    lin_lo, lin_hi = board["frontend"].get("linear_mv", [150, 2450])
    bias_v = min(bias_mv - lin_lo, lin_hi - bias_mv) / 1000
    if bias_v <= 0:
        err(f"frontend: bias {bias_mv} mV lies outside the linear range {lin_lo}-{lin_hi} mV")
    seen_inputs = set()
    for c in chans:
        role = f"channel {c.get('name')}"
        rating = c.get("rating_a", 0)
        turns = c.get("ct_turns", 0)
        if not (isinstance(rating, (int, float)) and rating > 0 and isinstance(turns, int) and turns > 0):
            err(f"{role}: rating_a and ct_turns must be positive")
            continue
        if fe == "adc":
            use(c.get("pin"), role, "analog")
            burden = c.get("burden_ohm", 0)
            if not burden or burden <= 0:
                err(f"{role}: burden_ohm must be positive")
                continue
            # up to 120 % of the rating must be measured, not clipped
            peak = 1.2 * rating * math.sqrt(2) / turns * burden
            if peak > bias_v:
                err(f"{role}: 120 % of {rating} A peaks at {peak:.2f} V on the burden, beyond the ±{bias_v:.2f} V "
                    "of the ADC's linear range around the bias: the wave would clip or bend")
        elif fe == "atm90e32":
            chips = board["frontend"].get("chips", [])
            key = (c.get("chip"), c.get("phase"))
            if not isinstance(key[0], int) or not 0 <= key[0] < len(chips) or key[1] not in ("A", "B", "C"):
                err(f"{role}: needs chip (0..{len(chips) - 1}) and phase A, B or C")
            elif key in seen_inputs:
                err(f"{role}: chip {key[0]} phase {key[1]} used twice")
            seen_inputs.add(key)
    vref = board.get("vref")
    if vref and fe == "adc":
        use(vref.get("pin"), "voltage reference", "analog")
        ratio = vref.get("transformer_ratio", 0) * vref.get("divider_ratio", 0)
        if ratio <= 0:
            err("voltage reference: transformer_ratio and divider_ratio must be positive")
        else:
            # +10 % on the nominal voltage (EN 50160) must not clip either
            peak = vref.get("nominal_v", 230) * 1.1 * math.sqrt(2) / ratio
            if peak > bias_v:
                err(f"voltage reference: {peak:.2f} V peak at the pin exceeds the ±{bias_v:.2f} V swing: "
                    "the wave would clip")
    if fe == "atm90e32":
        spi = board["frontend"].get("spi", {})
        use(spi.get("sck"), "SPI SCK", "out")
        use(spi.get("mosi"), "SPI MOSI", "out")
        use(spi.get("miso"), "SPI MISO", "in")
        for i, chip in enumerate(board["frontend"].get("chips", [])):
            use(chip.get("cs"), f"ATM90E32 #{i} CS", "out")
    for r in board.get("relays", []):
        use(r.get("pin"), f"relay {r.get('name')}", "out")
    rs = board.get("rs485")
    if rs:
        if rs.get("uart") not in (1, 2):
            err("rs485: uart must be 1 or 2 (UART0 is the console)")
        use(rs.get("tx"), "RS485 TX", "out")
        use(rs.get("rx"), "RS485 RX", "in")
        use(rs.get("de"), "RS485 DE/RE", "out")
        baud = rs.get("baud", 9600)
        if not isinstance(baud, int) or isinstance(baud, bool) or not 1200 <= baud <= 115200:
            err("rs485: baud must be 1200..115200")
        lat = rs.get("latency_ms")
        if lat is not None and (not isinstance(lat, int) or isinstance(lat, bool) or not 0 <= lat <= 5000):
            err("rs485: latency_ms (how long the devices take to start answering) must be 0..5000")
    if board.get("led"):
        use(board["led"].get("pin"), "LED", "out")
    if board.get("button"):
        use(board["button"].get("pin"), "button", "in")
    if net == "ethernet":
        n = board["network"]
        use(n.get("mdc"), "Ethernet MDC", "out")
        use(n.get("mdio"), "Ethernet MDIO", "io")
        if n.get("power") is not None:
            use(n.get("power"), "Ethernet PHY power", "out")
        for p in n.get("reserved", []):
            use(p, "Ethernet RMII", "io")

    by_pin: dict[int, list[str]] = {}
    for pin, role, _ in uses:
        by_pin.setdefault(pin, []).append(role)
    for pin, roles in sorted(by_pin.items()):
        if len(roles) > 1:
            err(f"GPIO{pin} used twice: {', '.join(roles)}")
    if mcu != "esp32":
        return out
    clock = str(board["network"].get("clock", "")) if net == "ethernet" else ""
    if module is not None and module["psram"] and clock.startswith("gpio"):
        num = clock[4:].split("_")[0]
        if num.isdigit() and int(num) in PSRAM_PINS:
            err(f"Ethernet clock: GPIO{num} drives the PSRAM of the {board['module']}")
    for pin, role, direction in uses:
        if module is not None and module["psram"] and pin in PSRAM_PINS:
            err(f"{role}: GPIO{pin} drives the PSRAM of the {board['module']}")
        if pin not in ESP32_GPIO:
            err(f"{role}: GPIO{pin} does not exist on the ESP32")
            continue
        if pin in FLASH_PINS:
            err(f"{role}: GPIO{pin} is wired to the SPI flash")
        if pin in CONSOLE:
            err(f"{role}: GPIO{pin} is UART0, the commissioning console")
        if direction in ("out", "io") and pin in INPUT_ONLY:
            err(f"{role}: GPIO{pin} is input-only and cannot drive an output")
        if direction == "analog":
            if pin not in ADC1 | ADC2:
                err(f"{role}: GPIO{pin} has no ADC")
            elif pin in ADC2 and wifi:
                err(f"{role}: GPIO{pin} is on ADC2, which cannot be read while Wi-Fi is on")
        if pin in STRAPPING:
            warn(f"{role}: GPIO{pin} is a strapping pin; keep its level right at reset")
    return out


def check_paths(paths: list[Path]) -> list[Finding]:
    out: list[Finding] = []
    for p in paths:
        try:
            board = load(p)
        except (OSError, json.JSONDecodeError) as e:
            out.append(Finding("error", p.name, f"cannot read board definition: {e}"))
            continue
        folder = p if p.is_dir() else p.parent
        if board.get("name") != folder.name:
            out.append(Finding("error", folder.name, f"name '{board.get('name')}' is not the folder's name"))
        out += check(board)
    return out
