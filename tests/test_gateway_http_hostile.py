"""The gateway's HTTP side (metrics and the installer API) against hostile
clients, on a running `peergrid run`: bodies that never end, lengths that
lie, requests sent halfway and held, slow drips, header bombs, hundreds of
connections from a hundred addresses, and authenticated JSON of every wrong
shape. Throughout, the gateway's RSS is sampled: it stays under 200 MB; no
answer is a 500 and none carries Python exception text; the API still
works afterwards."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import free_port

TIMEOUT_S = 2.0             # [gateway] http_timeout_s in this test
MAX_CONN = 16               # [gateway] http_max_connections (4 per client address)
RSS_LIMIT = 200 << 20


class Gw:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(
            f'[gateway]\ncommunity = "elm"\ndb = "gw.db"\nhttp_port = {self.port}\nhttp_timeout_s = {TIMEOUT_S}\n'
            f'http_max_connections = {MAX_CONN}\nstatus_every_s = 60\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {free_port()}\npassword = "x"\n'
            f'[installer]\nkey_file = "gateway.key"\n')
        out = self.cli("installer-token", "sparks", "--days", "1")
        self.token = next(x.strip() for x in out.splitlines() if x.strip().startswith("pgi_"))
        self.log = open(tmp / "gw.log", "w")
        self.p = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                  stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp / "gw.log").read_text()
                time.sleep(0.05)
        self.rss_max = 0
        self.threads_max = 0
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def cli(self, *args: str, ok: bool = True) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode == 0) == ok, r.stderr
        return r.stdout + r.stderr

    def proc(self) -> dict[str, int]:
        out = {}
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "Threads"):
                out[k] = int(v.split()[0]) * (1024 if k == "VmRSS" else 1)
        return out

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            try:
                s = self.proc()
            except (OSError, ValueError):
                return
            self.rss_max = max(self.rss_max, s["VmRSS"])
            self.threads_max = max(self.threads_max, s["Threads"])

    def stop(self) -> None:
        self._stop.set()
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()

    # -- clients ------------------------------------------------------------------

    def connect(self, src: str = "127.0.0.1", timeout: float = 10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout, source_address=(src, 0))

    def exchange(self, raw: bytes, src: str = "127.0.0.1", timeout: float = 10) -> tuple[int | None, bytes, float]:
        """Send raw bytes, read until the server closes: (status, body, seconds)."""
        s = self.connect(src, timeout)
        t0 = time.monotonic()
        data = b""
        try:
            s.sendall(raw)
            while True:
                c = s.recv(65536)
                if not c:
                    break
                data += c
        except (ConnectionResetError, BrokenPipeError):
            pass
        finally:
            s.close()
        return self._parse(data, time.monotonic() - t0)

    def _parse(self, data: bytes, dt: float) -> tuple[int | None, bytes, float]:
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else None
        if status is not None:
            self.statuses.append(status)
        return status, data.partition(b"\r\n\r\n")[2], dt

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = "",
                extra: str = "") -> tuple[int | None, bytes, float]:
        tok = self.token if token == "" else token
        head = f"{method} {path} HTTP/1.1\r\nHost: gw\r\n"
        if tok is not None:
            head += f"Authorization: Bearer {tok}\r\n"
        if body is not None:
            head += f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n"
        return self.exchange((head + extra + "\r\n").encode() + (body or b""))

    def stream(self, head: bytes, total: int, src: str = "127.0.0.1") -> tuple[int, int | None, float]:
        """Send headers, then up to `total` body bytes while reading the
        answer: (bytes the server let us send, status, seconds)."""
        s = self.connect(src)
        t0 = time.monotonic()
        got = bytearray()
        sent = 0

        def reader() -> None:
            try:
                while True:
                    c = s.recv(65536)
                    if not c:
                        return
                    got.extend(c)
            except OSError:
                return

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        chunk = bytes(1 << 20)
        try:
            s.sendall(head)
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        th.join(10)
        s.close()
        status, _, dt = self._parse(bytes(got), time.monotonic() - t0)
        return sent, status, dt


@pytest.fixture
def gw(tmp_path):
    g = Gw(tmp_path)
    yield g
    g.stop()


GOOD = {"member": "house 1", "device": "oak-1", "board": "sim",
        "channels": [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]}


def _with(**kw: object) -> bytes:
    d = dict(GOOD)
    d.update(kw)
    return json.dumps(d).encode()


def _chan(**kw: object) -> bytes:
    c = {"role": "grid", "rating_a": 100}
    c.update(kw)
    return _with(channels=[c])


# bodies an installer token holder may send: every one is a 4xx naming the fault
BAD_REGISTER = [
    b"null", b'"a string"', b"42", b"[]", b"{}", b"true", b"{", b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000,
    b'{"member": "' + b"x" * 10 + b'", "device": 1e400}', b"NaN", b"Infinity",
    json.dumps({**GOOD, "member": "\ud800"}).encode(),
    b'{"member": "a", "device": "d", "board": "sim", "channels": [{"role": "grid", "rating_a": NaN}]}',
    b'{"member": "a", "device": "d", "board": "sim", "channels": [{"role": "grid", "rating_a": Infinity}]}',
    b'{"member": "a", "device": "d", "board": "sim", "channels": [{"role": "grid", "rating_a": -Infinity}]}',
    b'{"member": "a", "device": "d", "board": "sim", "channels": [{"role": "grid", "rating_a": 1e999}]}',
    b'{"member": "a", "device": "d", "board": "sim", "channels": [{"role": "grid", "rating_a": ' + b"9" * 5000
    + b"}]}",
    _with(member=None), _with(member=5), _with(member=""), _with(member="x" * 300), _with(member="a\x00b"),
    _with(device=None), _with(device=7), _with(device="UPPER"), _with(device="-x"), _with(device="a" * 17),
    _with(board=None), _with(board=["sim"]), _with(channels=None), _with(channels="grid:100"), _with(channels=[]),
    _with(channels=[GOOD["channels"][0]] * 13), _with(channels=[None]), _with(channels=[[1, 2]]),
    _chan(role=None), _chan(role="heater"), _chan(rating_a="100"), _chan(rating_a=True), _chan(rating_a=None),
    _chan(rating_a=0), _chan(rating_a=-5), _chan(rating_a=1e6), _chan(extra=1), _with(rotate="yes"),
    _with(rotate=1), _with(member_key=5), _with(member_key="zz"), _with(member_key="ab" * 31),
    _with(member_key=["ab" * 32]), _with(surprise=True), _with(channels=[{"role": "grid"}]),
]
BAD_REPORT = [b"null", b"[]", b'"x"', b"3", b"{}", b'{"device": 5}', b'{"device": null}', b'{"device": "Bad Id"}',
              b'{"device": "oak-1", "w": NaN}', b'{"device": "oak-1", "w": -Infinity}',
              json.dumps({"device": "oak-1", "s": "\udfff"}).encode(), b'{"device": "oak-1", "n": 1e309}',
              b'{"device": "oak-1", "n": ' + b"1" * 5000 + b"}", b'{"device": "oak-1", "n": 18446744073709551616}',
              b'{"device": "oak-1", "deep": ' + b"[" * 40 + b"]" * 40 + b"}"]


def _no_exception_text(body: bytes) -> None:
    text = body.decode("utf-8", "replace")
    for bad in ("Traceback", "Error(", "Exception", "NoneType", "object has no attribute", "internal:"):
        assert bad not in text, text


def test_bodies_lengths_and_schemas(gw: Gw) -> None:
    auth = f"Authorization: Bearer {gw.token}\r\n"
    head = "POST /installer/register HTTP/1.1\r\nHost: gw\r\n"

    # a body that never ends, with a valid token: no Content-Length (411),
    # one of 256 MiB (413), chunked (501); the gateway reads none of it
    for extra, want in (("", 411), ("Content-Length: 268435456\r\n", 413), ("Transfer-Encoding: chunked\r\n", 501)):
        sent, status, dt = gw.stream((head + auth + extra + "\r\n").encode(), 256 << 20)
        assert sent < 64 << 20 and dt < 5, (extra, sent, dt)
        assert status in (want, None), (extra, status)     # (None: our send was reset before we read it)
        s, body, _ = gw.request("POST", "/installer/register", None, extra=extra)
        assert s == want, (extra, s, body)
        _no_exception_text(body)

    # lengths that are not lengths: answered at once, without waiting for a body
    for cl in ("-1", "abc", "1e3", "0x10", "+5", "12 34", "", "1" * 40, "\u0661\u0662"):
        s, body, dt = gw.exchange(f"{head}{auth}Content-Length: {cl}\r\n\r\n".encode("utf-8"))
        assert s == 400 and dt < 1, (cl, s, dt, body)
    s, body, dt = gw.exchange(f"{head}{auth}Content-Length: 5\r\nContent-Length: 5\r\n\r\n{{}}   ".encode())
    assert s == 400, body

    # authentication comes before the body: a bad token with a 100 MB body
    # is refused after the headers (the gateway does not wait for the body)
    for tok in ("", "Bearer pgi_wrong", "Basic Zm9vOmJhcg=="):
        a = f"Authorization: {tok}\r\n" if tok else ""
        s, body, dt = gw.exchange(f"{head}{a}Content-Length: 100000000\r\n\r\n".encode())
        assert s == 401 and dt < 1, (tok, s, dt)
        sent, status, dt = gw.stream(f"{head}{a}Content-Length: 100000000\r\n\r\n".encode(), 100_000_000)
        assert sent < 64 << 20 and status in (401, None), (sent, status)

    # the commissioning tool with a wrong token reads the 401, not a reset
    # (its small body is swallowed after the answer)
    from peergrid.commissioning.commission import Gateway as Client
    from peergrid.commissioning.errors import Stop

    for _ in range(20):
        with pytest.raises(Stop, match="refused: unknown installer token"):
            Client(f"http://127.0.0.1:{gw.port}", "pgi_wrong").call("POST", "/installer/register", GOOD)

    # a body announced and then not sent: 408 once the request's time is up
    s, body, dt = gw.exchange(f"{head}{auth}Content-Length: 1000\r\n\r\n{{\"member\"".encode(), timeout=10)
    assert s == 408 and TIMEOUT_S - 0.2 < dt < TIMEOUT_S + 2, (s, dt)
    # more bytes than announced: the first ones are the body, and not JSON
    s, body, _ = gw.exchange(f"{head}{auth}Content-Length: 3\r\n\r\n".encode() + _with())
    assert s == 400 and b"not JSON" in body

    # malformed but authenticated JSON of every shape: 4xx naming the fault
    for b in BAD_REGISTER:
        s, body, _ = gw.request("POST", "/installer/register", b)
        assert s == 400, (b[:120], s, body)
        assert json.loads(body)["error"]
        _no_exception_text(body)
    for b in BAD_REPORT:
        s, body, _ = gw.request("POST", "/installer/report", b)
        assert s == 400, (b[:120], s, body)
        _no_exception_text(body)
    for path in ("/installer/device/", "/installer/device/..%2Fetc", "/installer/device/A", "/installer/nope",
                 "/installer/device/a/b"):
        s, body, _ = gw.request("GET", path)
        assert s in (400, 404), (path, s)
        _no_exception_text(body)
    s, body, _ = gw.request("GET", "/metrics", b"x" * 10, token=None)
    assert s == 413
    s, _, _ = gw.request("PUT", "/installer/register", b"{}")
    assert s == 501
    # a request line and headers beyond 32 KiB: 431, whatever the per-line limit
    s, body, _ = gw.exchange((head + "".join(f"X-{i}: {'a' * 4000}\r\n" for i in range(40)) + "\r\n").encode())
    assert s == 431, s

    # the API works: register, NaN refused, a report signed
    s, body, _ = gw.request("POST", "/installer/register", _with())
    assert s == 200, body
    assert json.loads(body)["device"] == "oak-1"
    s, body, _ = gw.request("GET", "/installer/device/oak-1")
    assert s == 200 and json.loads(body)["readings"] == 0
    s, body, _ = gw.request("POST", "/installer/report", json.dumps({"device": "oak-1", "gain": 1.01}).encode())
    assert s == 200 and len(json.loads(body)["signature"]) == 128

    assert 500 not in gw.statuses, gw.statuses
    assert gw.rss_max < RSS_LIMIT, gw.rss_max
    log = (gw.tmp / "gw.log").read_text()
    assert "installer API failed" not in log and "Traceback" not in log, log[-3000:]


def _hold(gw: Gw, src: str, n: int, first: bytes) -> list[tuple[socket.socket, float]]:
    """n connections from src, each sending `first` and then nothing: (socket, when connected)."""
    out = []
    for _ in range(n):
        s = gw.connect(src)
        out.append((s, time.monotonic()))
        s.sendall(first)
    return out


def _closed_in_time(socks: list[tuple[socket.socket, float]], seconds: float) -> tuple[int, list[int]]:
    """How many of the sockets the server closed within `seconds` of their
    connecting, and the statuses it answered them with."""
    closed = 0
    statuses = []
    for s, t in socks:
        data = b""
        s.settimeout(max(0.01, t + seconds - time.monotonic()))
        try:
            while True:
                c = s.recv(4096)
                if not c:
                    closed += 1
                    break
                data += c
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed += 1
        if data.startswith(b"HTTP/"):
            statuses.append(int(data.split(b" ", 2)[1]))
        s.close()
    return closed, statuses


def test_connections_held_dripped_and_flooded(gw: Gw) -> None:
    base = gw.proc()["Threads"]
    half = b"POST /installer/register HTTP/1.1\r\nHost: gw\r\nAuthorization: Bear"

    # 400 half-sent requests from one address: it gets 4 slots, the rest a
    # 503 at once; a client elsewhere is served meanwhile
    held = _hold(gw, "127.0.0.2", 4, half)
    assert gw.proc()["Threads"] <= base + 4 + 2
    held += _hold(gw, "127.0.0.2", 396, half)
    s, body, dt = gw.request("GET", "/metrics", token=None)
    assert s == 200 and dt < 1, (s, dt)
    s, body, _ = gw.request("POST", "/installer/register", _with(device="oak-2"))
    assert s == 200, body
    assert gw.proc()["Threads"] <= base + 4 + 2
    closed, statuses = _closed_in_time(held, TIMEOUT_S + 1.5)
    assert closed == 400, closed                     # every one closed by the server, none held past the time
    # (slots free up as held ones time out while the rest still connect)
    assert statuses.count(503) >= 400 - 4 * 5, statuses.count(503)

    # 400 from a hundred addresses: at most MAX_CONN threads, the rest 503 at
    # once, a newcomer too (refused, not queued)
    held = []
    for a in range(MAX_CONN // 4):
        held += _hold(gw, f"127.0.1.{a + 1}", 4, half)
    s, _, dt = gw.request("GET", "/metrics", token=None)
    assert s == 503 and dt < 1, (s, dt)
    for a in range(MAX_CONN // 4, 100):
        held += _hold(gw, f"127.0.1.{a + 1}", 4, half)
        assert gw.proc()["Threads"] <= base + MAX_CONN + 2
    closed, statuses = _closed_in_time(held, TIMEOUT_S + 1.5)
    assert closed == 400 and statuses.count(503) >= 400 - 5 * MAX_CONN, (closed, statuses.count(503))
    s, _, _ = gw.request("GET", "/metrics", token=None)
    assert s == 200                                  # all slots free again

    # a slow drip (one byte every 0.3 s) does not extend the request's time
    drip = [gw.connect("127.0.0.3") for _ in range(4)]
    t0 = time.monotonic()
    line = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100
    done = [False] * 4
    k = 0
    while not all(done) and time.monotonic() - t0 < TIMEOUT_S + 3:
        for i, s in enumerate(drip):
            if done[i]:
                continue
            try:
                s.sendall(line[k:k + 1] or b"a")
            except OSError:
                done[i] = True
        k += 1
        time.sleep(0.3)
        for i, s in enumerate(drip):
            s.setblocking(False)
            try:
                if s.recv(4096) == b"":
                    done[i] = True
            except BlockingIOError:
                pass
            except OSError:
                done[i] = True
            s.setblocking(True)
    assert all(done) and time.monotonic() - t0 < TIMEOUT_S + 1.5, time.monotonic() - t0
    for s in drip:
        s.close()

    # header bombs from many connections at once: 431 each, memory flat
    bomb = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 60000) for i in range(100)) + b"\r\n"
    results: list[int | None] = []
    ths = [threading.Thread(target=lambda a=a: results.append(gw.exchange(bomb, f"127.0.2.{a + 1}")[0]))
           for a in range(MAX_CONN)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(20)
    assert all(r in (431, None) for r in results), results

    text = gw.request("GET", "/metrics", token=None)[1].decode()
    assert 'what="http_busy"' in text and 'what="http_timeouts"' in text
    assert 500 not in gw.statuses
    assert gw.rss_max < RSS_LIMIT, gw.rss_max
    assert gw.threads_max <= base + MAX_CONN + 3, (gw.threads_max, base)
