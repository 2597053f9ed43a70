"""A virtual serial cable: two pseudo-terminals whose far ends are joined
by a thread, so each side opens an ordinary device path (a MicroPython
board on one end, pyserial on the other). It can be unplugged (bytes are
dropped, as on a pulled cable) and plugged in again.

With `baud` set the cable is a real-speed line: each direction carries one
character per 11 bit times (start, 8 data, parity, stop: Modbus RTU), queued
behind the characters before it, so a frame takes on the cable as long as it
takes on the wire. `tamper_b` (bytes -> bytes), when set, rewrites what the
laptop's end sends before it goes on the line (tests of a hostile line)."""
from __future__ import annotations

import os
import select
import threading
import time
import tty
from collections import deque
from typing import Callable


class PtyCable:
    def __init__(self, baud: int | None = None) -> None:
        self._ma, self._sa = os.openpty()
        self._mb, self._sb = os.openpty()
        for fd in (self._ma, self._sa, self._mb, self._sb):
            tty.setraw(fd)
        self.a_path = os.ttyname(self._sa)        # the board's end
        self.b_path = os.ttyname(self._sb)        # the laptop's end
        self.plugged = True
        self.dropped = 0
        self.baud = baud
        self.char_s = 11.0 / baud if baud else 0.0
        self.tamper_b: Callable[[bytes], bytes] | None = None
        # per direction (keyed by the fd it is read from): characters on
        # the line as (time it has arrived at the far end, byte), and when
        # the line is free again
        self._q: dict[int, deque[tuple[float, int]]] = {self._ma: deque(), self._mb: deque()}
        self._free = {self._ma: 0.0, self._mb: 0.0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        a, b = self._ma, self._mb
        while not self._stop.is_set():
            wait = 0.05
            now = time.monotonic()
            for q in self._q.values():
                if q:
                    wait = min(wait, max(0.0, q[0][0] - now))
            try:
                r, _, _ = select.select([a, b], [], [], wait)
            except (OSError, ValueError):
                return
            for fd in r:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                if not self.plugged:
                    self.dropped += len(data)
                    continue
                if fd == b and self.tamper_b is not None:
                    data = self.tamper_b(data)
                if not self.char_s:
                    self._write(b if fd == a else a, data)
                    continue
                now = time.monotonic()
                t = max(now, self._free[fd])
                q = self._q[fd]
                for byte in data:
                    t += self.char_s
                    q.append((t, byte))
                self._free[fd] = t
            if self.char_s:
                now = time.monotonic()
                for fd, q in self._q.items():
                    if not self.plugged:
                        self.dropped += len(q)
                        q.clear()
                        continue
                    out = bytearray()
                    while q and q[0][0] <= now:
                        out.append(q.popleft()[1])
                    if out:
                        self._write(b if fd == a else a, bytes(out))

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        try:
            os.write(fd, data)
        except OSError:
            pass

    def unplug(self) -> None:
        self.plugged = False            # and what is still on the line is lost

    def plug(self) -> None:
        self.plugged = True

    def close(self) -> None:
        self._stop.set()
        self._t.join(2)
        for fd in (self._ma, self._sa, self._mb, self._sb):
            try:
                os.close(fd)
            except OSError:
                pass
