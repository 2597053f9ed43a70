"""The gateway's HTTP server (metrics and the installer API), built to stay
up and small when whoever reaches its port is hostile.

- HTTPS when given a TLS context (`server_context`: the router's
  certificate, TLS 1.2 or later): the handshake runs in the connection's
  own thread within `request_s`, so a client that stalls it holds only its
  slot; a failed handshake is counted (`http_tls_refused`) and closed.
- A bounded number of connections (`max_connections`, a quarter of them per
  client address); one more is answered 503 at once, without a thread.
- One request per connection (HTTP/1.0), and the whole of it (request line,
  headers, body) must arrive within `request_s`: every read waits only for
  what is left of that time, so a client that sends a byte now and then
  holds its slot no longer than one that sends nothing.
- Request line and headers together at most 32 KiB (431 beyond).
- A body only when the handler asks for it, after it authenticated the
  request: `Content-Length` must be there, once, plain digits, within the
  handler's limit (411, 400, 413); `Transfer-Encoding` is refused (501).
- JSON bodies are parsed strictly: UTF-8, no NaN or infinities (nor numbers
  that overflow to them), no lone surrogates, no integers beyond 64 bits,
  nested at most 16 deep; anything else is a 400 naming what is wrong,
  never the text of a Python exception.
"""
from __future__ import annotations

import io
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("peergrid.http")

MAX_HEAD = 32 * 1024
_DIGITS = re.compile(r"[0-9]{1,12}")
_DRAIN = 64 * 1024                   # unread body bytes swallowed after an early answer (no RST for small ones)
_BUSY_BODY = b'{"error": "too many connections; try again"}'
_BUSY = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 5\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


class HttpError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side with an overall deadline and a byte limit."""

    def __init__(self, sock: socket.socket, deadline: float, limit: int) -> None:
        self.sock = sock
        self.deadline = deadline
        self.limit = limit
        self.count = 0
        self.timed_out = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        room = self.limit - self.count
        if room <= 0:
            raise HttpError(431, "request line and headers too large")
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.timed_out = True
            raise TimeoutError("request not received in time")
        self.sock.settimeout(left)
        with memoryview(b) as m:
            try:
                n = self.sock.recv_into(m[:room] if len(m) > room else m)
            except TimeoutError:
                self.timed_out = True
                raise
        self.count += n
        return n


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], handler: type, max_connections: int = 32,
                 request_s: float = 10.0, metrics: Any = None, tls: ssl.SSLContext | None = None) -> None:
        self.tls = tls
        self.max_connections = max(1, max_connections)
        self.per_address = max(1, self.max_connections // 4)
        self.request_s = request_s
        self.metrics = metrics
        self._lock = threading.Lock()
        self._open = 0
        self._by_addr: dict[str, int] = {}
        super().__init__(addr, handler)

    def count(self, what: str) -> None:
        if self.metrics is not None:
            self.metrics.inc("http_" + what)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = client_address[0]
        with self._lock:
            ok = self._open < self.max_connections and self._by_addr.get(host, 0) < self.per_address
            if ok:
                self._open += 1
                self._by_addr[host] = self._by_addr.get(host, 0) + 1
        if not ok:
            self.count("busy")
            try:
                request.setblocking(False)
                request.send(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(host)
            raise

    def _release(self, host: str) -> None:
        with self._lock:
            self._open -= 1
            n = self._by_addr.get(host, 1) - 1
            if n:
                self._by_addr[host] = n
            else:
                self._by_addr.pop(host, None)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if self.tls is not None:
                try:
                    request.settimeout(self.request_s)
                    request = self.tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError):
                    self.count("tls_refused")
                    request.close()
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._release(client_address[0])

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.count("errors")
        log.warning("HTTP connection from %s failed", client_address[0], exc_info=True)


def server_context(cert_file: Any, key_file: Any) -> ssl.SSLContext:
    """TLS for the gateway's HTTP server with the router's certificate (the
    broker's, from the community CA: laptops verify it with ca.pem)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


class Handler(BaseHTTPRequestHandler):
    """Base of the gateway's handlers: deadline-bound reads, checked bodies."""

    server: Server
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()                  # (the socket's own reader: replaced by a bounded one)
        self._raw = _DeadlineReader(self.connection, time.monotonic() + self.server.request_s, MAX_HEAD)
        self.rfile = io.BufferedReader(self._raw, 8192)
        self._body_read = False
        self.request_version = "HTTP/1.0"      # until parse_request knows better (an early error answer)
        self.requestline = ""
        self.command = ""

    def handle(self) -> None:
        try:
            self.handle_one_request()      # http.server closes on a timeout (TimeoutError) by itself
        except HttpError as e:
            self.server.count("refused")
            self.close_connection = True
            try:
                self.send_json(e.status, {"error": e.msg})
            except OSError:
                pass
        except OSError as e:               # reset, broken pipe: the client went away
            self.server.count("dropped")
            log.debug("HTTP client %s went away: %r", self.client_address[0], e)
        if self._raw.timed_out:
            self.server.count("timeouts")

    def send_response(self, code: int, message: str | None = None) -> None:
        # the answer gets what is left of the request's time, at least a second
        self.connection.settimeout(max(1.0, self._raw.deadline - time.monotonic()))
        super().send_response(code, message)

    def finish(self) -> None:
        try:
            super().finish()
            if not self._body_read and not self._raw.timed_out:
                self._linger()
        except OSError:
            pass

    def _linger(self) -> None:
        """After an answer given without reading the body (401, 411, 413
        ...): send FIN, then swallow what the client still sends until it
        closes, for at most 64 KiB and one second, so that a client with a
        small body reads our answer instead of a reset."""
        self.connection.shutdown(socket.SHUT_WR)
        end = time.monotonic() + 1.0
        left = _DRAIN
        while left > 0:
            wait = end - time.monotonic()
            if wait <= 0:
                return
            self.connection.settimeout(wait)
            chunk = self.connection.recv(min(left, 8192))
            if not chunk:
                return
            left -= len(chunk)

    def send_json(self, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_text(self, status: int, text: str, ctype: str = "text/plain") -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body_length(self, limit: int) -> int:
        """The declared body length, checked."""
        if self.headers.get_all("Transfer-Encoding"):
            raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
        values = self.headers.get_all("Content-Length") or []
        if not values:
            if self.command in ("GET", "HEAD", "DELETE"):
                self._body_read = True          # (there is none)
                return 0
            raise HttpError(411, "Content-Length required")
        if len(values) > 1 or not _DIGITS.fullmatch(values[0].strip()):
            raise HttpError(400, "Content-Length must be given once, as a plain decimal number")
        n = int(values[0])
        self._body_read = n == 0
        if n > limit:
            raise HttpError(413, f"request body too large (at most {limit} bytes)")
        return n

    def read_body(self, limit: int) -> bytes:
        """The body, at most `limit` bytes: call only once the request is
        authenticated. A client that does not send what it declared before
        the request's deadline gets 408."""
        n = self.body_length(limit)
        if n == 0:
            self._body_read = True
            return b""
        self._raw.limit = MAX_HEAD + n      # the head (read ahead or not) and exactly this body
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            raise HttpError(408, "request body not received in time") from None
        self._body_read = True
        if len(body) != n:
            raise HttpError(400, f"request body ended after {len(body)} of {n} bytes")
        return body

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
        pass


# -- strict JSON -----------------------------------------------------------------

def _no_constant(name: str) -> Any:
    raise HttpError(400, f"{name} is not a number here (NaN and infinities are refused)")


def _finite(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise HttpError(400, f"number {s[:32]} is out of range")
    return v


def _walk(v: Any, depth: int) -> None:
    if depth > 16:
        raise HttpError(400, "JSON nested too deeply")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(400, "a string holds a lone surrogate") from None
    elif isinstance(v, bool) or v is None or isinstance(v, float):
        return
    elif isinstance(v, int):
        if not -(2**63) <= v < 2**64:
            raise HttpError(400, "an integer beyond 64 bits")
    elif isinstance(v, list):
        for x in v:
            _walk(x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            _walk(k, depth + 1)
            _walk(x, depth + 1)


def parse_json(body: bytes) -> Any:
    """A JSON document under the rules above; HttpError(400) otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HttpError(400, "body is not UTF-8") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except HttpError:
        raise
    except RecursionError:
        raise HttpError(400, "JSON nested too deeply") from None
    except ValueError as e:
        # json's own message names the position, not Python internals
        msg = e.msg if isinstance(e, json.JSONDecodeError) else "a number has too many digits"
        raise HttpError(400, f"body is not JSON: {msg}") from None
    _walk(obj, 0)
    return obj
