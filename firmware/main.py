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
from firmware import config as fconfig
from firmware.board import Board
from firmware.console import Console, Ops
from firmware.hal import IoClock, open_hal
from firmware.net import open_net


class StdioPort:
    """sys.stdin/stdout as a port that never blocks on reading."""

    def __init__(self):
        self.inp = sys.stdin.buffer
        self.out = sys.stdout.buffer
        self.p = select.poll()
        self.p.register(sys.stdin, select.POLLIN)

    def readinto(self, buf):
        n = 0
        while n < len(buf) and self.p.poll(0):
            b = self.inp.read(1)
            if not b:
                break
            buf[n] = b[0]
            n += 1
        return n if n else None

    def write(self, data):
        return self.out.write(data)


def _fw_digest(root):
    try:
        with open(root + "/manifest.json") as f:
            return json.load(f).get("digest", "")
    except (OSError, ValueError):
        return ""


def _rs485(hal, board):
    rs = board.get("rs485")
    if not rs:
        return None
    from firmware.modbus import Master

    uart = hal.uart(rs)
    de = hal.pin_out(rs["de"], 0) if "de" in rs else None
    return Master(uart, IoClock(hal), de=de, baud=rs.get("baud", 9600))


def _reset():
    import machine
    machine.reset()


def main(root=""):
    with open(root + "/board.json") as f:
        board = json.load(f)
    port = StdioPort()
    try:
        cfg, digest = fconfig.load(root + "/config.json")
    except fconfig.ConfigError as e:
        # never commissioned (or a broken config): wait for one on the console
        hal = open_hal(board, wdt_ms=0)
        ops = Ops(hal, board, root or "", None, fboard.FW_VERSION, _fw_digest(root), str(e))
        ops.reboot = _reset
        con = Console(port, ops, IoClock(hal))
        while True:
            con.poll()
            hal.idle(20)
    hal = open_hal(board, wdt_ms=max(30000, 3 * cfg["period_s"] * 1000))
    net = open_net(board, cfg)
    master = _rs485(hal, board) if (cfg.get("inverter") or cfg.get("battery")) else None
    b = Board(hal, board, cfg, digest, net, root or "/", rs485=master)
    ops = Ops(hal, board, root or "", b, fboard.FW_VERSION, _fw_digest(root))
    ops.reboot = _reset
    con = Console(port, ops, IoClock(hal))
    while True:
        b.step()
        con.poll()
        b.idle()


if __name__ == "__main__":
    main()
