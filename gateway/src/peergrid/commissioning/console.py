"""The laptop's end of the board's commissioning console (firmware/console.py
has the frame format): pyserial, one request at a time, answers matched by
sequence number, a damaged frame sent again."""
from __future__ import annotations

import binascii
import json
import time
from typing import Any

import serial

STX = 2


class ConsoleError(Exception):
    """The board did not answer, or the port is gone."""


class BoardRefused(Exception):
    def __init__(self, err: str, msg: str) -> None:
        super().__init__(msg)
        self.err = err
        self.msg = msg


def encode(obj: dict[str, Any]) -> bytes:
    """STX, 4 hex digits of length, JSON, 8 hex digits of CRC-32, LF."""
    p = json.dumps(obj, separators=(",", ":")).encode()
    return b"\x02" + b"%04x" % len(p) + p + b"%08x\n" % (binascii.crc32(p) & 0xFFFFFFFF)


class BoardConsole:
    def __init__(self, port: str, baud: int = 115200, timeout: float = 3.0) -> None:
        self.path = port
        try:
            self.ser = serial.Serial(port, baud, timeout=0.05, exclusive=True)
        except serial.SerialException as e:
            text = str(e)
            if "busy" in text.lower() or "lock" in text.lower():
                raise ConsoleError(f"{port} is in use by another program (a serial monitor? close it)") from None
            raise ConsoleError(f"cannot open {port}: {text}") from None
        self.timeout = timeout
        self.seq = 0
        self.buf = bytearray()

    def close(self) -> None:
        try:
            self.ser.close()
        except (OSError, serial.SerialException):
            pass

    def call(self, op: str, timeout: float | None = None, tries: int = 2, **args: Any) -> dict[str, Any]:
        """Send one request; its answer (raises BoardRefused when the board
        says no, ConsoleError when it does not answer)."""
        last = None
        for _ in range(tries):
            self.seq += 1
            req = {"seq": self.seq, "op": op, **args}
            try:
                self.ser.reset_input_buffer()
                self.ser.write(encode(req))
                self.ser.flush()
            except (OSError, serial.SerialException) as e:
                raise ConsoleError(f"lost the board on {self.path}: {e}") from None
            try:
                res = self._read(self.seq, timeout or self.timeout)
            except TimeoutError as e:
                last = e
                continue
            if res.get("ok"):
                return res
            if res.get("err") == "crc":
                continue
            raise BoardRefused(str(res.get("err")), str(res.get("msg")))
        raise ConsoleError(f"the board on {self.path} does not answer ({last})")

    def _read(self, seq: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = self.ser.read(4096)
            except (OSError, serial.SerialException) as e:
                raise ConsoleError(f"lost the board on {self.path}: {e}") from None
            self.buf += chunk
            while True:
                i = self.buf.find(bytes((STX,)))
                if i < 0:
                    self.buf.clear()
                    break
                del self.buf[:i]
                if len(self.buf) < 5:
                    break
                try:
                    n = int(self.buf[1:5], 16)
                except ValueError:
                    del self.buf[:1]
                    continue
                if len(self.buf) < 5 + n + 9:
                    break
                payload = bytes(self.buf[5:5 + n])
                try:
                    crc = int(self.buf[5 + n:13 + n], 16)
                except ValueError:
                    crc = -1
                del self.buf[:14 + n]
                if binascii.crc32(payload) & 0xFFFFFFFF != crc:
                    continue
                try:
                    res = json.loads(payload)
                except ValueError:
                    continue
                if res.get("seq") == seq:
                    return res
        raise TimeoutError(f"no answer in {timeout} s")
