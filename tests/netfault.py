"""A TCP relay on loopback between a board and the broker that can misbehave
on command: swallow the broker's PUBACKs, or go silent both ways while
keeping the connections open (a dead link that TCP does not notice)."""
from __future__ import annotations

import socket
import threading


class MqttFaultProxy:
    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind((host, 0))
        self.srv.listen(8)
        self.port = self.srv.getsockname()[1]
        self.drop_puback = False
        self.silent = False
        self.pubacks_dropped = 0
        self.connections = 0
        self._socks: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            try:
                b = socket.create_connection(self.target, timeout=5)
            except OSError:
                c.close()
                continue
            b.settimeout(None)
            self.connections += 1
            self._socks += [c, b]
            threading.Thread(target=self._pump, args=(c, b, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, c, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_broker: bool) -> None:
        buf = b""
        try:
            while True:
                data = src.recv(4096)
                if not data:
                    break
                if self.silent:
                    continue
                if not from_broker:
                    dst.sendall(data)
                    continue
                # cut the broker's stream into MQTT packets to drop PUBACKs
                buf += data
                out = b""
                while True:
                    n = _packet_len(buf)
                    if n is None or len(buf) < n:
                        break
                    pkt, buf = buf[:n], buf[n:]
                    if self.drop_puback and pkt[0] & 0xF0 == 0x40:
                        self.pubacks_dropped += 1
                        continue
                    out += pkt
                if out:
                    dst.sendall(out)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        try:
            # wakes the accept() in the other thread; close() alone would
            # leave the port listening until that call returns
            self.srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.srv.close()
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass


def _packet_len(buf: bytes) -> int | None:
    """Length of the first complete-or-not MQTT packet in buf, None if the
    fixed header itself is incomplete."""
    if len(buf) < 2:
        return None
    n = 0
    shift = 0
    i = 1
    while True:
        if i >= len(buf):
            return None
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return i + n
        shift += 7
        if shift > 21:
            raise ValueError("bad remaining length")
