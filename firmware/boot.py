# The start of a board (firmware/main.py runs it once): board.json and
# config.json read, the HAL, the network and the Board built, the modules
# only the start needed dropped again (settle). Nothing here runs while the
# board works, so settle() unloads this module too; the commissioning
# console imports it again when it opens.
import json
import sys

from firmware.hal import IoClock
from firmware.net import HostNet, LanNet, WifiNet


def _reset_board():
    import machine
    machine.reset()


def _fw_digest(root):
    try:
        with open(root + "/manifest.json") as f:
            return json.load(f).get("digest", "")
    except (OSError, ValueError):
        return ""


def _rs485(hal, board, cfg):
    """The Modbus master: timeouts from board.json's rs485 (baud, the
    devices' latency_ms) and each device's latency_ms in the config."""
    rs = board.get("rs485")
    if not rs:
        return None
    from firmware.modbus import master_for

    uart = hal.uart(rs)
    de = hal.pin_out(rs["de"], 0) if "de" in rs else None
    return master_for(uart, IoClock(hal), rs, cfg, de=de)


def unload(name):
    """Drop a module needed at boot only (its code and tables leave the
    heap once nothing refers to them; an import loads it again)."""
    sys.modules.pop(name, None)
    pkg, _, attr = name.rpartition(".")
    mod = sys.modules.get(pkg)
    if mod is not None and hasattr(mod, attr):
        delattr(mod, attr)


def settle(b):
    """Drop the modules only the start needed, once the Board is built
    (this one too: the console imports it again when it opens)."""
    unload("firmware.boot")
    unload("firmware.config")      # 3.2 KB of code the board at work never calls
    unload("firmware.adccal")      # the ADC's linearisation, read once at boot
    unload("firmware.frontend")    # open_frontend: the front end is built
    unload("firmware.atm90e32_setup")   # the chips' set-up: they are running
    if b.ota is None:
        # the update agent and what it brought: back when an update command arrives
        for m in ("firmware.ota", "firmware.release", "firmware.loader", "protocol.fw"):
            unload(m)


def open_hal(board, **kw):
    """The HAL backend for a board definition (board.json), by its "mcu".
    The firmware's one backend is the ESP32's; simulated boards build theirs
    from boardsim/ (the virtual board, the tests), never through here."""
    mcu = board.get("mcu")
    if mcu != "esp32":
        raise ValueError("this firmware runs on an esp32, not %r" % (mcu,))
    if (board.get("frontend") or {}).get("type", "adc") == "adc":
        from firmware.adc_esp32 import AdcEsp32Hal      # only a board that samples CTs loads the ADC code
        return AdcEsp32Hal(board, **kw)
    from firmware.hal_esp32 import Esp32Hal
    return Esp32Hal(board, **kw)


def load_board(root):
    with open(root + "/board.json") as f:
        return json.load(f)


def start(root, port):
    """Build the Board from board.json and config.json; never returns
    without a config (the console waits for one). The two dicts die with
    this frame: the board keeps only what it needs of them."""
    board = load_board(root)
    from firmware import config as fconfig
    from firmware.board import Board, FW_VERSION
    try:
        cfg, digest = fconfig.load(root + "/config.json")
    except fconfig.ConfigError as e:
        # never commissioned (or a broken config): wait for one on the console
        from firmware.console import Console, Ops
        hal = open_hal(board, wdt_ms=0)
        ops = Ops(hal, board, root or "", None, FW_VERSION, _fw_digest(root), str(e))
        ops.reboot = _reset_board
        con = Console(port, ops, IoClock(hal))
        while True:
            con.poll()
            hal.idle(20)
    hal = open_hal(board, wdt_ms=max(30000, 3 * cfg["period_s"] * 1000))
    net = open_net(board, cfg)
    master = _rs485(hal, board, cfg) if (cfg.get("inverter") or cfg.get("battery")) else None
    return hal, Board(hal, board, cfg, digest, net, root or "/", rs485=master)


def console(hal, b, root, port):
    """The commissioning console for the running board `b`."""
    from firmware.board import FW_VERSION
    from firmware.console import Console, Ops
    ops = Ops(hal, load_board(root), root or "", b, FW_VERSION, _fw_digest(root))
    ops.reboot = _reset_board
    return Console(port, ops, IoClock(hal))


def open_net(board, cfg, unix_now=None):
    kind = board.get("network", {}).get("type", "host")
    if kind == "wifi":
        n = cfg.get("net", {})
        net = WifiNet(n.get("ssid", ""), n.get("password", ""))
    elif kind == "ethernet":
        import machine
        import network
        net = LanNet(network.LAN(**lan_args(board["network"], machine, network)))
    else:
        return HostNet(unix_now)
    net.ntp = cfg.get("ntp")
    return net


def lan_args(netdef, machine, network):
    """network.LAN's keyword arguments for a board's network definition."""
    kw = {"mdc": machine.Pin(netdef["mdc"]), "mdio": machine.Pin(netdef["mdio"]),
          "phy_type": getattr(network, "PHY_" + netdef.get("phy", "LAN8720")),
          "phy_addr": netdef.get("phy_addr", 0)}
    if netdef.get("power") is not None:
        kw["power"] = machine.Pin(netdef["power"])
    pin = netdef.get("ref_clk")
    mode = netdef.get("ref_clk_mode")
    clock = netdef.get("clock")
    if pin is None and clock is not None:
        # "gpio17_out": GPIO17 carries the clock, driven by the ESP32
        c = clock.lower()
        cut = c.find("_")
        if not c.startswith("gpio") or cut < 5 or c[cut + 1:] not in ("in", "out"):
            raise ValueError("network clock must be gpio<N>_in or gpio<N>_out, got %r" % (clock,))
        pin = int(c[4:cut])
        mode = c[cut + 1:]
    if pin is not None:
        mode = mode.lower() if isinstance(mode, str) else mode
        if mode not in ("in", "out"):
            raise ValueError("network ref_clk_mode must be 'in' or 'out', got %r" % (mode,))
        kw["ref_clk"] = machine.Pin(pin)
        kw["ref_clk_mode"] = machine.Pin.OUT if mode == "out" else machine.Pin.IN
    return kw
