"""The gateway's link to its broker, as the operator sees it.

paho keeps reconnecting by itself (connect_async, reconnect_delay_set), but
says nothing about why an attempt failed. `LinkClient` catches the reason of
every failed attempt (refused, DNS, timeout, TLS) and the service reports a
refused CONNACK (wrong user name or password); `BrokerLink` keeps the state
(connected or not, since when, the last error, failed attempts), logs it
without flooding the log, and shows it two ways: as Prometheus lines on
/metrics, and in a small JSON file next to the database
(`<db>.run.json`, written atomically on every change and as a heartbeat),
which `peergrid status` and `peergrid doctor` read from another process.
The file holds no secret: host, port, times, counts and error texts."""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from peergrid.ingest.mqttsock import Client as BufferedClient

log = logging.getLogger("peergrid.gateway")

AUTH_CODES = (4, 5, 134, 135)       # MQTT 3.1.1 CONNACK 4/5, MQTT 5 reason codes 134/135
LOG_EVERY_S = 60                    # the same failure is logged again at most this often


def state_path(db: Path) -> Path:
    """Where the running gateway says how it is (next to its database)."""
    return db.with_name(db.name + ".run.json")


def reconnect_max(raw: dict[str, Any]) -> float:
    """[broker] reconnect_max_s: the longest wait between two attempts."""
    v = raw.get("broker", {}).get("reconnect_max_s", 30)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1 <= v <= 3600:
        raise SystemExit("config: [broker] reconnect_max_s must be a number of seconds from 1 to 3600")
    return float(v)


def classify(e: BaseException, host: str, port: int) -> tuple[str, str]:
    """Why a connection attempt to host:port failed: (kind, one line for
    the operator, to be read after the broker's address)."""
    if isinstance(e, socket.gaierror):
        return "dns", f"cannot resolve the host name {host!r} (DNS: {e.strerror or e})"
    if isinstance(e, ConnectionRefusedError):
        return "refused", f"connection refused: nothing listens on port {port} (is mosquitto running?)"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "timeout", "no answer (the host is down or a firewall drops the port)"
    if isinstance(e, ssl.SSLError):
        return "tls", f"TLS failed: {e}"
    if isinstance(e, OSError) and e.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL):
        return "unreachable", f"unreachable ({e.strerror})"
    return "other", f"{type(e).__name__}: {e}"


def classify_connack(rc: Any) -> tuple[str, str]:
    """A CONNACK that refused the connection: (kind, one line)."""
    value = getattr(rc, "value", rc)
    if value in AUTH_CODES:
        return "auth", f"not authorised: the broker refused the gateway's user name or password ({rc})"
    return "connack", f"the broker refused the connection ({rc})"


class BrokerLink:
    """Connected or not, since when, why not; thread-safe (paho's thread
    reports, the HTTP and run threads read)."""

    def __init__(self, host: str, port: int, min_delay: float = 1, max_delay: float = 30) -> None:
        self.host, self.port = host, port
        self.min_delay, self.max_delay = min_delay, max_delay
        self.lock = threading.Lock()
        self.file: Path | None = None       # set by attach(): a Gateway made only to read config writes nothing
        self.started = time.time()
        self.connected = False
        self.since = self.started
        self.kind: str | None = None
        self.last_error: str | None = None
        self.error_at: float | None = None
        self.attempts = 0                   # failed attempts since the last connection
        self.failures = 0                   # failed attempts in all
        self.connects = 0
        self._logged: tuple[str, float] = ("", -1e9)

    def attach(self, state_file: Path) -> None:
        self.file = state_file
        self.save()

    def next_delay(self) -> float:
        """paho's wait before the next attempt (it doubles from min to max)."""
        return float(min(self.max_delay, self.min_delay * 2 ** max(0, self.attempts - 1)))

    def failed(self, kind: str, text: str) -> None:
        now = time.time()
        with self.lock:
            if self.connected:
                self.connected, self.since = False, now
            self.kind, self.last_error, self.error_at = kind, text, now
            self.attempts += 1
            self.failures += 1
            n, delay = self.attempts, self.next_delay()
            again = self._logged[0] == text and now - self._logged[1] < LOG_EVERY_S
            if not again:
                self._logged = (text, now)
        if again:
            log.debug("broker: %s (attempt %d)", text, n)
        else:
            log.error("cannot connect to the broker at %s:%d: %s; attempt %d, retrying in %g s (back-off up to "
                      "%g s; the same error is logged at most once a minute; `peergrid doctor` tells more)",
                      self.host, self.port, text, n, delay, self.max_delay)
        self.save()

    def up(self) -> None:
        now = time.time()
        with self.lock:
            before, away = self.attempts, now - self.since
            self.connected, self.since, self.attempts = True, now, 0
            self.connects += 1
            self._logged = ("", -1e9)
        if before:
            log.info("broker reached after %d failed attempt(s) and %.0f s without it", before, away)
        self.save()

    def down(self, why: str) -> None:
        """An established connection was lost."""
        now = time.time()
        with self.lock:
            if not self.connected:
                return
            self.connected, self.since = False, now
            self.kind, self.last_error, self.error_at = "lost", f"connection lost: {why}", now
        self.save()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"host": self.host, "port": self.port, "connected": self.connected, "since": self.since,
                    "kind": self.kind, "last_error": self.last_error, "error_at": self.error_at,
                    "attempts": self.attempts, "failures": self.failures, "connects": self.connects,
                    "next_delay_s": self.next_delay() if self.attempts else None}

    def save(self, running: bool = True) -> None:
        """The state file, atomically; a failure to write it (a full disk)
        is only logged at debug: the gateway's own work goes on."""
        if self.file is None:
            return
        body = {"pid": os.getpid(), "running": running, "started": self.started, "updated": time.time(),
                "broker": self.snapshot()}
        tmp = self.file.with_name(self.file.name + ".new")
        try:
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.file)
        except OSError as e:
            log.debug("state file %s not written: %s", self.file, e)

    def prometheus(self) -> str:
        s = self.snapshot()
        lines = ["# TYPE peergrid_broker_connected gauge", f"peergrid_broker_connected {int(s['connected'])}",
                 "# TYPE peergrid_broker_state_since_seconds gauge",
                 f"peergrid_broker_state_since_seconds {s['since']:.3f}",
                 "# TYPE peergrid_broker_failed_attempts gauge",
                 f"peergrid_broker_failed_attempts {s['attempts']}",
                 "# TYPE peergrid_broker_connect_failures_total counter",
                 f"peergrid_broker_connect_failures_total {s['failures']}",
                 "# TYPE peergrid_broker_connects_total counter",
                 f"peergrid_broker_connects_total {s['connects']}"]
        if s["last_error"]:
            text = s["last_error"].replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")
            lines += ["# TYPE peergrid_broker_last_error_info gauge",
                      f'peergrid_broker_last_error_info{{kind="{s["kind"]}",error="{text}"}} {s["error_at"]:.3f}']
        return "\n".join(lines) + "\n"


class LinkClient(BufferedClient):
    """paho's client (read-buffered) that tells its BrokerLink why each
    connection attempt failed, then lets paho retry as it would."""

    link: BrokerLink | None = None

    def reconnect(self) -> Any:
        try:
            return super().reconnect()
        except OSError as e:
            if self.link is not None:
                self.link.failed(*classify(e, self.link.host, self.link.port))
            raise


def read_state(db: Path) -> dict[str, Any] | None:
    """The state file of the gateway on `db`, or None; "alive" added (its
    process exists and it did not stop cleanly)."""
    try:
        st = json.loads(state_path(db).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(st, dict) or not isinstance(st.get("broker"), dict):
        return None
    alive = bool(st.get("running"))
    if alive:
        try:
            os.kill(int(st.get("pid", 0)) or -1, 0)
        except ProcessLookupError:
            alive = False
        except PermissionError:
            pass                            # another user's process: it exists
        except (OSError, ValueError, OverflowError):
            alive = False
    st["alive"] = alive
    return st


def _ago(t: float, now: float) -> str:
    s = max(0, now - t)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
    return f"{when} ({s:.0f} s ago)" if s < 120 else f"{when} ({s / 60:.0f} min ago)"


def describe(st: dict[str, Any] | None, now: float | None = None) -> list[str]:
    """`peergrid status`'s lines about the gateway process and its broker."""
    now = time.time() if now is None else now
    if st is None:
        return ["gateway: no state file (it has not run here yet): start it with `peergrid run`"]
    b = st["broker"]
    where = f"{b.get('host')}:{b.get('port')}"
    if not st["alive"]:
        how = "stopped cleanly" if not st.get("running") else "ended without stopping (killed or crashed)"
        return [f"gateway: NOT running (pid {st.get('pid')} {how}; last state {_ago(st.get('updated', 0), now)})"]
    out = [f"gateway: running, pid {st.get('pid')}, since {_ago(st.get('started', 0), now)}"]
    if b.get("connected"):
        out.append(f"broker {where}: connected since {_ago(b['since'], now)}"
                   + (f", {b['connects'] - 1} reconnection(s)" if b.get("connects", 0) > 1 else ""))
    else:
        out.append(f"broker {where}: DISCONNECTED since {_ago(b['since'], now)}, {b.get('attempts', 0)} failed "
                   f"attempt(s), retrying" + (f" (next within {b['next_delay_s']:g} s)" if b.get("next_delay_s")
                                               else ""))
    if b.get("last_error"):
        out.append(f"  last error ({_ago(b.get('error_at') or 0, now)}): {b['last_error']}")
    return out
