# Entry point on an ESP32 (copied to the board as main.py by `make flash`):
# the board definition and the commissioning config come from the board's
# filesystem, everything else from the firmware modules. The commissioning
# console (firmware/console.py) shares the USB serial port with the REPL:
# its frames are plain ASCII and start with STX, which the REPL never sees
# while main.py runs; Ctrl-C still stops main.py for `make deploy`.
import json
import select
import sys

from firmware import board as fboard
from firmware.board import Board
from firmware.hal import IoClock
from firmware.net import open_net

_STX = 2


class StdioPort:
    """sys.stdin/stdout as a port that never blocks on reading."""

    def __init__(self):
        self.inp = sys.stdin.buffer
        self.out = sys.stdout.buffer
        self.p = select.poll()
        self.p.register(sys.stdin, select.POLLIN)
        self.back = -1              # one byte given back (the STX that woke the console)

    def readinto(self, buf):
        n = 0
        if self.back >= 0 and len(buf):
            buf[0] = self.back
            self.back = -1
            n = 1
        while n < len(buf) and self.p.poll(0):
            b = self.inp.read(1)
            if not b:
                break
            buf[n] = b[0]
            n += 1
        return n if n else None

    def write(self, data):
        return self.out.write(data)


class LazyConsole:
    """The commissioning console, loaded only when a frame starts on the
    serial port: a board at work never needs its code in the heap (about
    5 KB of the ~110 KB an ESP32 without PSRAM has). Bytes before the first
    STX are not frames and are dropped, as the console would drop them."""

    def __init__(self, port, make):
        self.port = port
        self.make = make            # () -> Console
        self.con = None
        self.one = bytearray(1)

    def poll(self):
        if self.con is not None:
            return self.con.poll()
        while self.port.readinto(self.one):
            if self.one[0] == _STX:
                self.port.back = _STX
                self.con = self.make()
                return self.con.poll()
        return None


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


def _reset():
    import machine
    machine.reset()


def unload(name):
    """Drop a module needed at boot only (its code and tables leave the
    heap once nothing refers to them; an import loads it again)."""
    sys.modules.pop(name, None)
    pkg, _, attr = name.rpartition(".")
    mod = sys.modules.get(pkg)
    if mod is not None and hasattr(mod, attr):
        delattr(mod, attr)


def settle(b):
    """Drop the modules only the start needed, once the Board is built."""
    unload("firmware.config")      # 3.2 KB of code the board at work never calls
    unload("firmware.adccal")      # the ADC's linearisation, read once at boot
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
    from firmware.hal_esp32 import Esp32Hal
    return Esp32Hal(board, **kw)


def _load_board(root):
    with open(root + "/board.json") as f:
        return json.load(f)


def _start(root, port):
    """Build the Board from board.json and config.json; never returns
    without a config (the console waits for one). The two dicts die with
    this frame: the board keeps only what it needs of them."""
    board = _load_board(root)
    from firmware import config as fconfig
    try:
        cfg, digest = fconfig.load(root + "/config.json")
    except fconfig.ConfigError as e:
        # never commissioned (or a broken config): wait for one on the console
        from firmware.console import Console, Ops
        hal = open_hal(board, wdt_ms=0)
        ops = Ops(hal, board, root or "", None, fboard.FW_VERSION, _fw_digest(root), str(e))
        ops.reboot = _reset
        con = Console(port, ops, IoClock(hal))
        while True:
            con.poll()
            hal.idle(20)
    hal = open_hal(board, wdt_ms=max(30000, 3 * cfg["period_s"] * 1000))
    net = open_net(board, cfg)
    master = _rs485(hal, board, cfg) if (cfg.get("inverter") or cfg.get("battery")) else None
    return hal, Board(hal, board, cfg, digest, net, root or "/", rs485=master)


def main(root=""):
    port = StdioPort()
    hal, b = _start(root, port)
    settle(b)

    def console():
        from firmware.console import Console, Ops
        ops = Ops(hal, _load_board(root), root or "", b, fboard.FW_VERSION, _fw_digest(root))
        ops.reboot = _reset
        return Console(port, ops, IoClock(hal))

    con = LazyConsole(port, console)
    while True:
        b.step()
        if b.reset_pending:
            # an update switched slots or a trial gave up: saved, then reset
            b.shutdown()
            _reset()
        con.poll()
        b.idle()


if __name__ == "__main__":
    main()
