"""A read-buffered socket for paho-mqtt.

paho reads every packet with several small recv() calls (the first byte,
each remaining-length byte, then the rest): three or more system calls per
reading. This wrapper fills a 64 KB buffer with one recv() and serves the
small reads from it; `pending()` tells paho's loop that buffered bytes are
waiting, so it does not sit in select() while they are there (the hook paho
has for TLS sockets). Everything else is the socket's own."""
from __future__ import annotations

import socket
from typing import Any

import paho.mqtt.client as mqtt


class BufferedSocket:
    def __init__(self, sock: socket.socket, size: int = 65536) -> None:
        self._s = sock
        self._size = size
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            data = self._s.recv(max(n, self._size))     # raises BlockingIOError when empty
            if len(data) <= n:
                return data
            self._buf = data
            self._pos = 0
        end = self._pos + n
        out = self._buf[self._pos:end]
        self._pos = end
        if self._pos >= len(self._buf):
            self._buf = b""
            self._pos = 0
        return out

    def pending(self) -> int:
        return len(self._buf) - self._pos

    def __getattr__(self, name: str) -> Any:
        return getattr(self._s, name)


class Client(mqtt.Client):
    """paho's client with the read-buffered socket."""

    def _create_socket(self):  # type: ignore[no-untyped-def]
        sock = super()._create_socket()
        if isinstance(sock, socket.socket):
            return BufferedSocket(sock)
        return sock

