"""A virtual serial cable: two pseudo-terminals whose far ends are joined
by a thread, so each side opens an ordinary device path (a MicroPython
board on one end, pyserial on the other). It can be unplugged (bytes are
dropped, as on a pulled cable) and plugged in again."""
from __future__ import annotations

import os
import select
import threading
import tty


class PtyCable:
    def __init__(self) -> None:
        self._ma, self._sa = os.openpty()
        self._mb, self._sb = os.openpty()
        for fd in (self._ma, self._sa, self._mb, self._sb):
            tty.setraw(fd)
        self.a_path = os.ttyname(self._sa)        # the board's end
        self.b_path = os.ttyname(self._sb)        # the laptop's end
        self.plugged = True
        self.dropped = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        a, b = self._ma, self._mb
        while not self._stop.is_set():
            try:
                r, _, _ = select.select([a, b], [], [], 0.05)
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
                try:
                    os.write(b if fd == a else a, data)
                except OSError:
                    pass

    def unplug(self) -> None:
        self.plugged = False

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
