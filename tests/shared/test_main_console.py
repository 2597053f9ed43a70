# firmware/main.py loads the commissioning console only when a frame starts
# on the serial port: a board at work keeps its code out of the heap.
# Runs under MicroPython (tests/mpy_run.py; the unix port and the 32-bit one).
import sys

from util import IS_MICROPYTHON, ROOT

if not IS_MICROPYTHON:          # main.py and umqtt exist for MicroPython only
    import pytest

    pytest.skip("firmware/main.py runs on MicroPython", allow_module_level=True)

sys.path.append(ROOT + "/build/lib")    # umqtt_pinned (make umqtt), which main's board imports
try:
    import usocket  # noqa: F401  (umqtt's socket module, on a board)
except ImportError:
    class _NoSockets:
        """Enough of usocket for umqtt's import: these tests never connect."""
        socket = None

    sys.modules["usocket"] = _NoSockets

from firmware import main as fmain  # noqa: E402

_CONSOLE_WITH_MAIN = "firmware.console" in sys.modules     # (mpy_run imports one test module a process)

from firmware import console as fconsole  # noqa: E402
from firmware import boot as fboot  # noqa: E402


class Port:
    """The serial port: `rx` what the installer's laptop sends, `tx` what the
    board writes back; reads never block."""

    def __init__(self, rx):
        self.rx = bytearray(rx)
        self.tx = bytearray()
        self.back = -1

    def readinto(self, buf):
        n = 0
        if self.back >= 0 and len(buf):
            buf[0] = self.back
            self.back = -1
            n = 1
        while n < len(buf) and self.rx:
            buf[n] = self.rx[0]
            self.rx = self.rx[1:]
            n += 1
        return n if n else None

    def write(self, b):
        self.tx.extend(b)
        return len(b)


class Ops:
    def __init__(self):
        self.calls = []

    def call(self, req):
        self.calls.append(req)
        return {"ok": True, "op": req.get("op")}


class Clock:
    def ticks_ms(self):
        return 0

    def ticks_add(self, t, d):
        return t + d

    def ticks_diff(self, a, b):
        return a - b


def _lazy(rx):
    port = Port(rx)
    ops = Ops()
    made = []

    def make():
        made.append(1)
        return fconsole.Console(port, ops, Clock())

    return port, ops, made, fmain.LazyConsole(port, make)


def test_main_does_not_import_the_console():
    # importing main (and through it the board, the MQTT client, the HAL)
    # left the console unloaded
    assert not _CONSOLE_WITH_MAIN


def test_no_frame_no_console():
    port, ops, made, lazy = _lazy(b"\r\n>>> noise\x03 more")
    for _ in range(3):
        lazy.poll()
    assert made == [] and ops.calls == [] and port.tx == bytearray()


def test_first_frame_loads_the_console_and_is_answered():
    req = fconsole.frame({"seq": 7, "op": "hello"})
    port, ops, made, lazy = _lazy(b"line noise " + bytes(req))
    lazy.poll()
    assert made == [1]
    assert ops.calls == [{"seq": 7, "op": "hello"}], ops.calls
    out = bytes(port.tx)
    assert out.startswith(b"\x02") and (b'"seq": 7' in out or b'"seq":7' in out), out
    # later frames go to the same console
    port.rx.extend(fconsole.frame({"seq": 8, "op": "status"}))
    lazy.poll()
    assert made == [1] and [c["seq"] for c in ops.calls] == [7, 8]



def test_unload_drops_a_boot_only_module_and_it_comes_back():
    import firmware
    from firmware import config   # noqa: F401  (what boot.settle unloads after the start)
    assert "firmware.config" in sys.modules
    fboot.unload("firmware.config")
    assert "firmware.config" not in sys.modules and not hasattr(firmware, "config")
    from firmware import config as again     # the console loads it again when it needs it
    assert hasattr(again, "load") and "firmware.config" in sys.modules


def test_open_hal_builds_only_the_esp32_backend():
    # the firmware knows one backend; a simulated board's HAL comes from
    # boardsim/, so a sim board definition on a board's main.py is refused
    # at once with its mcu named
    try:
        fboot.open_hal({"mcu": "sim"})
    except ValueError as e:
        assert "sim" in str(e)
    else:
        assert False, "a sim board definition was accepted"
