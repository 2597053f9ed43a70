"""The gateway's control loop (issue 7): runs peergrid.control.controller.Controller on
the latest accepted readings and turns its decisions into signed commands
(protocol/, PROTOCOL.md 6.6 and 7.5) with a lease the loop keeps renewing.

- A step runs every `period_s` (1 s) and also as soon as a new live reading
  arrives (at most every 0.1 s), so a surplus reaches the relay without
  waiting for the next period.
- Every output the controller manages is commanded with a lease of `lease_s`
  and renewed every `lease_s / 3`; a board that hears nothing returns the
  output to its fail-safe state when the lease ends.
- A command not acknowledged within `ack_timeout_s` is sent again (with a
  new counter); after `retries` misses the device is marked degraded (log,
  metrics) until it acknowledges again.
- Command counters are reserved in blocks in the database, so a restarted
  gateway never reuses one. `Commands` holds them: the control loop and the
  firmware updates (peergrid.fleet) share one, so a board never sees a
  counter twice or a lower one, whoever sends (`ControlLoop.send_command`).
- Every decision is logged with its reason and kept in the `decisions`
  table.
"""
from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable
from zoneinfo import ZoneInfo

from peergrid.community import registry as reg
from peergrid.control.controller import Controller, Decision, resources
from protocol import messages, topics
from protocol.errors import E_REPLAY
from protocol.gateway_end import CommandSealer

log = logging.getLogger("peergrid.control.controller")

SCHEMA = """
CREATE TABLE IF NOT EXISTS cmd_ctr (community TEXT NOT NULL, device TEXT NOT NULL, reserved INTEGER NOT NULL,
    PRIMARY KEY (community, device));
CREATE TABLE IF NOT EXISTS decisions (community TEXT NOT NULL, t REAL NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL,
    device TEXT NOT NULL, target INTEGER NOT NULL, value INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS decisions_t ON decisions (community, t);
"""
BLOCK = 1000


@dataclass
class Output:
    device: str
    op: int
    target: int
    value: int
    sent_at: float = -1e12        # monotonic
    ctr: int | None = None        # the command waiting for its ack
    tries: int = 0
    acked: int | None = None      # value the board last confirmed
    acked_at: float | None = None


AckHandler = Callable[[str, dict[str, Any]], None]


class Commands:
    """Sealed commands to a community's boards with counters from one
    allocator: per device, strictly increasing, reserved in blocks of BLOCK
    in the cmd_ctr table (a restarted gateway starts above every counter it
    may have used). Thread-safe; whoever sends may ask for its acks back
    (`send(..., on_ack=)`, routed by `on_ack`)."""

    MAX_WAITING = 4096          # acks waited for by callers, at most (oldest forgotten)

    def __init__(self, db: sqlite3.Connection, community: str, publish: Callable[[str, bytes], None],
                 clock: Any = None) -> None:
        self.db = db
        self.db.executescript(SCHEMA)
        self.registry = reg.Registry(db)
        self.community = community
        self.publish = publish
        self.clock = clock or time.time
        self.lock = threading.RLock()
        self.ctr: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.sealers: dict[str, tuple[bytes, CommandSealer]] = {}
        self.waiting: dict[tuple[str, int], AckHandler] = {}

    def next_ctr(self, device: str) -> int:
        with self.lock:
            c = self.ctr.get(device)
            if c is None:
                r = self.db.execute("SELECT reserved FROM cmd_ctr WHERE community=? AND device=?",
                                    (self.community, device)).fetchone()
                c = r[0] if r else 0
                self.reserved[device] = c
            c += 1
            if c > self.reserved.get(device, 0):
                self.reserved[device] = c + BLOCK
                self.db.execute("INSERT INTO cmd_ctr VALUES (?, ?, ?) ON CONFLICT(community, device) DO UPDATE SET"
                                " reserved=excluded.reserved", (self.community, device, self.reserved[device]))
            self.ctr[device] = c
            return c

    def skip_ahead(self, device: str) -> None:
        """The board has seen higher counters (a restored database?)."""
        with self.lock:
            self.ctr[device] = self.ctr.get(device, 0) + BLOCK

    def sealer(self, device: str) -> CommandSealer | None:
        with self.lock:
            secret = self.registry.secret_for(self.community, device)
            if secret is None:
                return None
            cached = self.sealers.get(device)
            if cached is None or cached[0] != secret:
                cached = (secret, CommandSealer(self.community, device, secret))
                self.sealers[device] = cached
            return cached[1]

    def send(self, device: str, op: int, target: int, value: int, lease: int,
             on_ack: AckHandler | None = None) -> int | None:
        """Seal and publish one command; its counter, or None for a device
        without a key (unknown or revoked). on_ack(device, ack message) is
        called (on the MQTT thread) when the board acknowledges it."""
        with self.lock:
            s = self.sealer(device)
            if s is None:
                return None
            ctr = self.next_ctr(device)
            frame = s.seal({"ctr": ctr, "t": int(self.clock()), "lease": lease, "op": op, "target": target,
                            "value": value})
            if on_ack is not None:
                self.waiting[(device, ctr)] = on_ack
                if len(self.waiting) > self.MAX_WAITING:
                    for k in list(self.waiting)[:256]:
                        del self.waiting[k]
        self.publish(topics.topic(self.community, device, topics.CMD), frame)
        return ctr

    def forget(self, device: str, ctr: int) -> None:
        """No longer wait for the ack of this command (superseded)."""
        with self.lock:
            self.waiting.pop((device, ctr), None)

    def on_ack(self, device: str, msg: dict[str, Any]) -> bool:
        """Hand an ack to whoever sent its command with on_ack; False when
        nobody waits for it (then it is the control loop's)."""
        with self.lock:
            h = self.waiting.pop((device, msg["ctr"]), None)
        if h is None:
            return False
        if msg["result"] == E_REPLAY:
            self.skip_ahead(device)
        h(device, msg)
        return True


class ControlLoop:
    def __init__(self, db_path: Any, community: str, conf: dict[str, Any],
                 publish: Callable[[str, bytes], None], metrics: Any = None, clock: Any = None,
                 speed: float = 1.0, commands: Commands | None = None) -> None:
        """clock: Unix time (default time.time), also used for durations when
        given (a simulation); speed: how much faster than the wall clock it
        runs, so the loop's waits shrink with it."""
        self.community = community
        self.clock = clock or time.time
        self.mono = clock or time.monotonic
        self.speed = speed
        self.db = reg.connect(db_path)
        self.db.executescript(SCHEMA)
        self.registry = reg.Registry(self.db)
        self.publish = publish
        self.metrics = metrics
        self.period = float(conf.get("period_s", 1.0))
        self.lease = int(conf.get("lease_s", 60))
        self.refresh = float(conf.get("refresh_s", self.lease / 3))
        self.ack_timeout = float(conf.get("ack_timeout_s", 3.0))
        self.retries = int(conf.get("retries", 3))
        self.tz = ZoneInfo(conf.get("timezone", "UTC"))
        self.params = {k: conf[k] for k in ("stale_s", "stale_margin_w", "on_margin_w", "keep_share", "off_delay_s",
                                            "headroom_w", "battery_first_slack_s") if k in conf}
        if self.lease < 5 or self.refresh >= self.lease:
            raise SystemExit("control: lease_s must be at least 5 and refresh_s below it")
        self.lock = threading.Lock()
        self.readings: dict[str, tuple[float, float]] = {}
        self.soc: dict[str, int] = {}                  # device -> battery soc permille
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.outputs: dict[tuple[str, int, int], Output] = {}
        self.by_ctr: dict[tuple[str, int], tuple[str, int, int]] = {}
        # counters and sealers: shared with the firmware updates when the gateway passes its own
        self.commands = commands or Commands(self.db, community, publish, self.clock)
        self.degraded: set[str] = set()
        self.cycle_ms: list[float] = []
        self.stats = {"steps": 0, "decisions": 0, "commands": 0, "acks": 0, "retries": 0, "refused": 0}
        self.thread: threading.Thread | None = None
        self._fingerprint: Any = None
        self.ctl: Controller | None = None
        self._load()

    # -- resources -----------------------------------------------------------------

    def _load(self) -> None:
        loads, bats, feeder = resources(self.registry.resource_rows(self.community))
        houses = [d.id for d in self.registry.devices(self.community) if not d.revoked and d.grid_index() is not None]
        fp = (repr(loads), repr(bats), repr(feeder), tuple(houses))
        if fp == self._fingerprint:
            return
        self._fingerprint = fp
        if feeder is None:
            from peergrid.control.controller import Feeder

            feeder = Feeder(10**9, 10**9)
            if loads or bats:
                log.warning("no feeder limits registered (peergrid resource feeder): controlling without them")
        old = self.ctl
        self.ctl = Controller(loads, bats, feeder, houses, **self.params)
        if old is not None:                            # keep what is known about unchanged resources
            for k, v in old.ls.items():
                if k in self.ctl.ls:
                    self.ctl.ls[k] = v
            for k, b in old.bs.items():
                if k in self.ctl.bs:
                    self.ctl.bs[k] = b
        keep = {(x.device, messages.OP_RELAY, x.relay) for x in loads} | \
            {(b.device, messages.OP_BATTERY, b.target) for b in bats}
        for key in list(self.outputs):
            if key not in keep:
                del self.outputs[key]
        for x in loads:
            key = (x.device, messages.OP_RELAY, x.relay)
            if key not in self.outputs:
                self.outputs[key] = Output(x.device, messages.OP_RELAY, x.relay, 0)
        for b in bats:
            key = (b.device, messages.OP_BATTERY, b.target)
            if key not in self.outputs:
                self.outputs[key] = Output(b.device, messages.OP_BATTERY, b.target, 0)
        log.info("control: %d loads, %d batteries, %d houses, feeder %s/%s W", len(loads), len(bats), len(houses),
                 feeder.import_w, feeder.export_w)

    # -- inputs (MQTT thread) ------------------------------------------------------------

    def on_reading(self, device: str, msg: dict[str, Any], grid_index: int | None, t_recv: float) -> None:
        if msg.get("flags", 0) & messages.F_BUFFERED or grid_index is None:
            return                                     # replayed from flash: history, not the present
        ch = msg.get("ch")
        if not ch or grid_index >= len(ch):
            return
        with self.lock:
            self.readings[device] = (float(ch[grid_index][0]), t_recv)
            bat = msg.get("bat")
            if bat and bat[2] is not None:          # null: the battery does not say
                self.soc[device] = int(bat[2])
        self.wake.set()

    def on_ack(self, device: str, msg: dict[str, Any]) -> None:
        if self.commands.on_ack(device, msg):
            return                                     # a command sent through send_command with on_ack
        with self.lock:
            key = self.by_ctr.pop((device, msg["ctr"]), None)
            if key is None or key not in self.outputs:
                return
            out = self.outputs[key]
            if out.ctr != msg["ctr"]:
                return                                 # an ack for a command already superseded
            out.ctr = None
            self.stats["acks"] += 1
            if msg["result"] == 0:
                out.acked = msg.get("value", out.value)
                out.acked_at = self.mono()
                out.tries = 0
                if device in self.degraded:
                    self.degraded.discard(device)
                    log.info("control: %s answers again", device)
                return
            self.stats["refused"] += 1
            log.warning("control: %s refused command %d on output %d: code %d", device, msg["ctr"], out.target,
                        msg["result"])
            if msg["result"] == E_REPLAY:
                # the board has seen higher counters (a restored database?): skip ahead
                self.commands.skip_ahead(device)
            out.sent_at = -1e12                        # send again at the next step

    # -- commands ------------------------------------------------------------------

    def _next_ctr(self, device: str) -> int:
        return self.commands.next_ctr(device)

    def _sealer(self, device: str) -> CommandSealer | None:
        return self.commands.sealer(device)

    def send_command(self, device: str, op: int, target: int, value: int, lease: int,
                     on_ack: Any = None) -> int | None:
        """One command outside the loop's outputs (a firmware update, its
        confirmation), with a counter from the same allocator; returns the
        counter (None: no key for the device). on_ack(device, ack) gets its
        acknowledgement."""
        return self.commands.send(device, op, target, value, lease, on_ack)

    def _send(self, out: Output, now_m: float) -> None:
        # under the allocator's lock: the fleet seals with the same
        # per-device sealer (one buffer) on its own thread
        with self.commands.lock:
            s = self._sealer(out.device)
            if s is None:
                return
            ctr = self._next_ctr(out.device)
            frame = s.seal({"ctr": ctr, "t": int(self.clock()), "lease": self.lease, "op": out.op,
                            "target": out.target, "value": out.value})
        if out.ctr is not None:
            self.by_ctr.pop((out.device, out.ctr), None)
        out.ctr = ctr
        out.sent_at = now_m
        self.by_ctr[(out.device, ctr)] = (out.device, out.op, out.target)
        self.stats["commands"] += 1
        self.publish(topics.topic(self.community, out.device, topics.CMD), frame)

    # -- the loop ------------------------------------------------------------------

    def step(self) -> list[Decision]:
        assert self.ctl is not None
        now = self.clock()
        off = datetime.fromtimestamp(now, self.tz).utcoffset()
        self.ctl.tz = int(off.total_seconds()) if off is not None else 0
        with self.lock:
            snap = dict(self.readings)
            soc = dict(self.soc)
        for b in self.ctl.batteries:
            if b.device in soc:
                self.ctl.set_soc(b.id, soc[b.device] / 1000 * b.capacity_wh)
        t0 = time.perf_counter()
        decisions = self.ctl.step(now, snap)
        ms = (time.perf_counter() - t0) * 1000
        self.cycle_ms.append(ms)
        if len(self.cycle_ms) > 10000:
            del self.cycle_ms[:5000]
        self.stats["steps"] += 1
        now_m = self.mono()
        with self.lock:
            for d in decisions:
                op = messages.OP_RELAY if d.kind == "relay" else messages.OP_BATTERY
                out = self.outputs.get((d.device, op, d.target))
                if out is None:
                    continue
                out.value = d.value
                out.tries = 0
                self._send(out, now_m)
            for out in self.outputs.values():
                if out.ctr is not None and now_m - out.sent_at > self.ack_timeout:
                    out.tries += 1
                    self.stats["retries"] += 1
                    if out.tries > self.retries and out.device not in self.degraded:
                        self.degraded.add(out.device)
                        log.warning("control: %s does not acknowledge commands (%d tries): degraded",
                                    out.device, out.tries)
                    if out.tries <= self.retries or now_m - out.sent_at >= self.refresh:
                        self._send(out, now_m)
                elif now_m - out.sent_at >= self.refresh:
                    self._send(out, now_m)                # renew the lease
        if decisions:
            self.stats["decisions"] += len(decisions)
            for d in decisions:
                log.info("decision: %s %s on %s[%d] -> %d: %s", d.kind, d.id, d.device, d.target, d.value, d.reason)
            try:
                self.db.executemany("INSERT INTO decisions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    [(self.community, d.t, d.kind, d.id, d.device, d.target, d.value, d.reason)
                                     for d in decisions])
            except sqlite3.Error as e:
                log.error("control: decision log not written: %s", e, exc_info=True)
        if self.metrics is not None:
            self.metrics.control(ms, len(decisions), len(self.degraded))
        return decisions

    def _run(self) -> None:
        last = 0.0
        next_reload = time.monotonic() + 60
        period = self.period / self.speed
        min_gap = 0.1 / self.speed
        while not self.stop_event.is_set():
            self.wake.wait(period)
            self.wake.clear()
            gap = time.monotonic() - last
            if gap < min_gap:
                if self.stop_event.wait(min_gap - gap):
                    break
            last = time.monotonic()
            try:
                if last >= next_reload:
                    next_reload = last + 60
                    self._load()
                self.step()
            except Exception:  # noqa: BLE001 - the loop must keep going; the boards fall back on their own
                log.exception("control step failed")

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="control", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        if self.thread is not None:
            self.thread.join(5)

    def p99_ms(self) -> float:
        if not self.cycle_ms:
            return 0.0
        xs = sorted(self.cycle_ms)
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))]
