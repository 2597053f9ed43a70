# Entry point on an ESP32 (copied to the board as main.py by `make flash`):
# the board definition and the commissioning config come from the board's
# filesystem, everything else from the firmware modules. The commissioning
# console (firmware/console.py) shares the USB serial port with the REPL:
# its frames are plain ASCII and start with STX, which the REPL never sees
# while main.py runs; Ctrl-C still stops main.py for `make deploy`.
#
# What only the start needs (reading board.json and config.json, building
# the HAL, the network and the Board) is firmware/boot.py, which drops
# itself from the heap once the board runs.
import select
import sys

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


def _reset():
    import machine
    machine.reset()


def main(root=""):
    port = StdioPort()
    from firmware import boot
    hal, b = boot.start(root, port)
    boot.settle(b)          # drops the start's modules, firmware.boot among them
    del boot

    def console():
        from firmware import boot as fboot      # back while the console is open
        return fboot.console(hal, b, root, port)

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
