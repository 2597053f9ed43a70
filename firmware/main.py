# Entry point on an ESP32 (copied to the board as main.py by `make flash`):
# the board definition and the commissioning config come from the board's
# filesystem, everything else from the firmware modules.
import json

from firmware import config as fconfig
from firmware.board import Board
from firmware.hal import IoClock, open_hal
from firmware.net import open_net


def _rs485(hal, board):
    rs = board.get("rs485")
    if not rs:
        return None
    from firmware.modbus import Master

    uart = hal.uart(rs)
    de = hal.pin_out(rs["de"], 0) if "de" in rs else None
    return Master(uart, IoClock(hal), de=de, baud=rs.get("baud", 9600))


def main(root=""):
    with open(root + "/board.json") as f:
        board = json.load(f)
    cfg, digest = fconfig.load(root + "/config.json")
    hal = open_hal(board, wdt_ms=max(30000, 3 * cfg["period_s"] * 1000))
    net = open_net(board, cfg)
    master = _rs485(hal, board) if (cfg.get("inverter") or cfg.get("battery")) else None
    Board(hal, board, cfg, digest, net, root or "/", rs485=master).run()


if __name__ == "__main__":
    main()
