# Entry point on an ESP32 (copied to the board as main.py by `make flash`):
# the board definition and the commissioning config come from the board's
# filesystem, everything else from the firmware modules.
import json

from firmware import config as fconfig
from firmware.board import Board
from firmware.hal import open_hal
from firmware.net import open_net


def _rs485(hal, board):
    rs = board.get("rs485")
    if not rs:
        return None
    from firmware.modbus import Master

    class _Clock:
        def ticks_ms(self):
            return hal.io_ms()

        def ticks_diff(self, a, b):
            return hal.io_diff(a, b)

        def sleep_ms(self, ms):
            hal.sleep_ms(ms)

    uart = hal.uart(rs)
    de = hal.pin_out(rs["de"], 0) if "de" in rs else None
    return Master(uart, _Clock(), de=de)


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
