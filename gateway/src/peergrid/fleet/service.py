"""The fleet inside the running gateway (docs/OTA.md 2, 3.2 step 5 and 4).

The ingest service (peergrid.ingest.service) calls in from its MQTT thread
with what it accepted: `on_fwget`, `on_status`, `on_reading`; acks of the
fleet's commands come back through the Commands object's on_ack. Those
calls only note things and return: the work happens on two threads.

- fw-serve answers fwget requests. A board's requests pass a token bucket
  (`[fleet] serve_per_s`, one second of burst) and a bounded queue before
  any file is touched; what is throttled or dropped is counted
  (fw_throttled), every answer too (fw_served, fw_bytes, fw_refused). The
  piece comes from the release store (peergrid.fleet.release) for the
  board type the device's newest status names, so a board gets nothing of
  a release for another type (E_TARGET) and nothing outside the store.
- fleet keeps the records (peergrid.fleet.records) from every status,
  confirms trials and drives rollouts:
  * a status with ota=2 (trial) for release R at boot B, then a live
    reading from boot B: OP_CONFIRM (value R, lease CONFIRM_LEASE_S), sent
    again every RESEND_S until acked, at most CONFIRM_TRIES times;
  * rollouts written by `peergrid fleet update|rollout` are picked up
    within ROLLOUT_POLL_S: wave 1 (the first N boards of the type not
    running the release, by id), then, with fewer than K failures, wave 2
    (all the others, at most `[fleet] updates_at_once` updating at a time:
    the next starts when one ends, so failures among the first of wave 2
    still halt the rest). OP_UPDATE (value seq, lease
    `[fleet] update_lease_s`) is sent again with back-off until the board
    acks or reports fetching. Outcome per board: confirmed (or running the
    release) is ok; refused, rolled back, or nothing within
    `[fleet] rollout_timeout_s` is a failure. K failures halt the rollout:
    no further board is sent the release.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from peergrid.community import registry as reg
from peergrid.config import Config
from peergrid.fleet.records import OPEN, Records, View, derive
from peergrid.fleet.release import ReleaseStore, valid_board
from protocol import cbor, fw, messages, topics
from protocol.errors import E_RANGE, E_TARGET

log = logging.getLogger("peergrid.fleet")

RESEND_S = 3.0
CONFIRM_TRIES = 4
CONFIRM_LEASE_S = 300
ROLLOUT_POLL_S = 0.5
SERVE_QUEUE = 256          # fwget requests waiting to be served, all boards together
INBOX = 10000              # statuses and acks waiting for the fleet thread


@dataclass
class Trial:
    rel: int
    boot: int
    live: bool = False         # a live reading of this boot was accepted after the status
    ctr: int | None = None
    sent_at: float = 0.0
    tries: int = 0
    done: bool = False


class Fleet:
    def __init__(self, cfg: Config, commands: Any, publish_fw: Callable[[str, bytes], None], metrics: Any = None,
                 clock: Callable[[], float] | None = None, resend_s: float = RESEND_S) -> None:
        """commands: .send(device, op, target, value, lease, on_ack) -> counter
        or None, and .forget(device, counter) (peergrid.control.loop.Commands);
        publish_fw(topic, payload): QoS 0, not retained."""
        self.community = cfg.community
        self.store = ReleaseStore(cfg.releases)
        self.commands = commands
        self.publish_fw = publish_fw
        self.metrics = metrics
        self.clock = clock or time.time
        self.serve_per_s = cfg.serve_per_s
        self.update_lease = cfg.update_lease_s
        self.timeout = cfg.rollout_timeout_s
        self.at_once = cfg.updates_at_once
        self.resend_s = resend_s
        self.db = reg.connect(cfg.db)
        self.registry = reg.Registry(self.db)
        self.rec = Records(self.db, cfg.community)
        self.lock = threading.Lock()
        self.damaged_seen: set[tuple[Any, int, int]] = set()
        self.views: dict[str, View] = self.rec.views()      # the fleet thread's
        self.board_of: dict[str, str] = {d: str(v.board) for d, v in self.views.items() if valid_board(v.board)}
        self.trials: dict[str, Trial] = {d: Trial(v.rel, v.boot) for d, v in self.views.items()
                                         if v.ota == messages.OTA_TRIAL and v.rel and v.boot is not None}
        self.buckets: dict[str, list[float]] = {}
        self.serveq: queue.Queue[tuple[str, int, int, int, int]] = queue.Queue(SERVE_QUEUE)
        self.inbox: collections.deque[tuple[Any, ...]] = collections.deque()
        self.sent: dict[tuple[str, int], tuple[str, int]] = {}   # (device, ctr) -> ("update", rollout) | ("confirm", rel)
        self.stats = {"served": 0, "bytes": 0, "throttled": 0, "refused": 0, "updates_sent": 0, "confirms_sent": 0}
        self.wake = threading.Event()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self._w = cbor.Writer(fw.FW_MAX + 32)

    def _count(self, what: str, n: int = 1) -> None:
        self.stats[what] += n
        if self.metrics is not None:
            self.metrics.inc("fw_" + what, n)

    # -- from the MQTT thread ---------------------------------------------------------

    def on_fwget(self, device: str, msg: dict[str, Any]) -> None:
        now = time.monotonic()
        with self.lock:
            b = self.buckets.get(device)
            if b is None:
                b = self.buckets[device] = [self.serve_per_s, now]
            b[0] = min(self.serve_per_s, b[0] + (now - b[1]) * self.serve_per_s)
            b[1] = now
            ok = b[0] >= 1
            if ok:
                b[0] -= 1
            else:
                self._count("throttled")
        if not ok:
            return
        try:
            self.serveq.put_nowait((device, msg["rel"], msg["file"], msg["off"], msg["len"]))
        except queue.Full:
            with self.lock:
                self._count("throttled")

    def on_status(self, device: str, msg: dict[str, Any], t_recv: float) -> None:
        with self.lock:
            if valid_board(msg.get("board")):
                self.board_of[device] = msg["board"]
            tr = self.trials.get(device)
            if msg.get("ota") == messages.OTA_TRIAL and msg.get("rel"):
                if tr is None or (tr.rel, tr.boot) != (msg["rel"], msg["boot"]):
                    self.trials[device] = Trial(msg["rel"], msg["boot"])
            elif tr is not None:
                del self.trials[device]          # confirmed, rolled back, or another release runs
            if len(self.inbox) < INBOX:
                self.inbox.append(("status", device, msg, t_recv))
        self.wake.set()

    def on_reading(self, device: str, msg: dict[str, Any]) -> None:
        tr = self.trials.get(device)
        if tr is None or tr.live or msg.get("flags", 0) & messages.F_BUFFERED:
            return
        with self.lock:
            if tr.boot == msg["boot"]:
                tr.live = True
        self.wake.set()

    def _on_ack(self, device: str, msg: dict[str, Any]) -> None:
        with self.lock:
            if len(self.inbox) < INBOX:
                self.inbox.append(("ack", device, msg, 0.0))
        self.wake.set()

    # -- serving (fw-serve thread) --------------------------------------------------------

    def serve(self, device: str, rel: int, file: int, off: int, n: int) -> None:
        board = self.board_of.get(device)
        damaged = self.store.damaged
        r = self.store.piece(board, rel, file, off, n) if board else E_TARGET
        if self.store.damaged != damaged and (board, rel, file) not in self.damaged_seen:
            self.damaged_seen.add((board, rel, file))          # logged once, counted every time
            log.error("fleet: release %s/%d file %d in the store does not match its manifest (changed on disk?): "
                      "the boards will refuse it; add the release again from its build", board, rel, file)
        w = self._w
        w.reset()
        if isinstance(r, int):
            fw.encode_chunk_error(w, rel, file, off, r)
            self._count("refused")
        else:
            size, data = r
            fw.encode_chunk(w, rel, file, off, size, data, hashlib.sha256(data).digest()[:8])
            self._count("served")
            self._count("bytes", len(data))
        self.publish_fw(topics.topic(self.community, device, topics.FW), w.getvalue())

    def _serve_loop(self) -> None:
        while not self.stop_event.is_set():
            try:
                item = self.serveq.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.serve(*item)
            except Exception:  # noqa: BLE001 - a request must not stop the serving
                log.exception("fleet: serving %s failed", item[:4])

    # -- the fleet thread ---------------------------------------------------------------

    def _loop(self) -> None:
        next_poll = 0.0
        while not self.stop_event.is_set():
            self.wake.wait(0.2)
            self.wake.clear()
            try:
                self.step(time.monotonic() >= next_poll)
            except sqlite3.Error:
                log.exception("fleet: database unavailable; trying again")
            except Exception:  # noqa: BLE001 - the gateway goes on; logged
                log.exception("fleet step failed")
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + ROLLOUT_POLL_S

    def step(self, rollouts: bool = True) -> None:
        """Records from the statuses and acks that arrived, confirmations due,
        and (with `rollouts`) the rollouts under way."""
        while True:
            with self.lock:
                if not self.inbox:
                    break
                kind, device, msg, t = self.inbox.popleft()
            if kind == "status":
                self._status(device, msg, t)
            else:
                self._ack(device, msg)
        self._confirm()
        if rollouts:
            for r in self.rec.rollouts(active_only=True):
                self._drive(r)

    def _digest(self, board: str | None, rel: int | None, v: View) -> tuple[str | None, str]:
        m = self.store.manifest(board, rel) if board and rel else None
        if m is None:
            return (v.rel_dig if rel is not None and rel == v.rel else None), ""
        if rel == v.rel and v.rel_dig and not m.digest.hex().startswith(v.rel_dig):
            return m.digest.hex(), f"; the board reports digest {v.rel_dig}, the store's release differs"
        return m.digest.hex(), ""

    def _status(self, device: str, msg: dict[str, Any], t: float) -> None:
        new = View.of_status(device, msg, t)
        prev = self.views.get(device)
        for ev, rel, detail in derive(prev, new):
            dig, note = self._digest(new.board, rel, new)
            self.rec.event(device, ev, rel, new.boot, dig, detail + note, t)
            log.info("fleet: %s %s release %s (%s)", device, ev, rel, detail + note)
        self.views[device] = new
        self.rec.save(new)

    def _ack(self, device: str, msg: dict[str, Any]) -> None:
        what = self.sent.pop((device, msg["ctr"]), None)
        if what is None:
            return
        res = msg["result"]
        if what[0] == "confirm":
            with self.lock:
                tr = self.trials.get(device)
                if tr is not None and tr.ctr == msg["ctr"] and res == 0:
                    tr.done = True
            if res == 0:
                # the gateway's own evidence that the release works: it took a
                # live reading of the trial and the board accepted its command
                self.rec.event(device, "confirm_acked", what[1], None, None, f"command {msg['ctr']}", self.clock())
            else:
                self.rec.event(device, "command_refused", None, None, None, f"OP_CONFIRM refused: code {res}",
                               self.clock())
            return
        rid, seq = what[1], what[2]
        b = {x["device"]: x for x in self.rec.boards(rid)}.get(device)
        if b is None or b["state"] != "sent":
            return
        runs = msg.get("value")
        if res == 0:
            self.rec.update_board(rid, device, state="started", detail="acked")
        elif res == E_RANGE and runs == seq and self.rec.has_event(device, "confirm_acked", seq, 0):
            self.rec.update_board(rid, device, state="ok", done_t=self.clock(),
                                  detail="runs this release already, confirmed here before")
        elif res == E_RANGE and runs == seq:
            # the board's word only: a release counts as installed on the
            # gateway's own evidence (a confirmed trial), never on a claim
            why = f"says it runs release {seq} already; never confirmed here"
            self.rec.update_board(rid, device, state="failed", done_t=self.clock(), detail=why)
            self.rec.event(device, "claim_unproven", seq, None, None, f"rollout {rid}: {why}", self.clock())
        else:
            # refused for now (e.g. on trial of another release): sent again
            # with back-off until the rollout's timeout
            self.rec.update_board(rid, device, detail=f"OP_UPDATE refused: code {res}"
                                  + (f", runs {runs}" if runs is not None else ""))

    # -- confirmation ---------------------------------------------------------------

    def _confirm(self) -> None:
        now = time.monotonic()
        due = []
        with self.lock:
            for device, tr in self.trials.items():
                if tr.live and not tr.done and (tr.ctr is None or now - tr.sent_at >= self.resend_s):
                    due.append((device, tr))
        for device, tr in due:
            if tr.tries >= CONFIRM_TRIES:
                tr.done = True
                self.rec.event(device, "confirm_unanswered", tr.rel, tr.boot, None,
                               f"{tr.tries} OP_CONFIRM without an ack", self.clock())
                log.warning("fleet: %s does not acknowledge OP_CONFIRM for release %d; it will roll back by "
                            "itself", device, tr.rel)
                continue
            if tr.ctr is not None:
                self.commands.forget(device, tr.ctr)
                self.sent.pop((device, tr.ctr), None)
            ctr = self.commands.send(device, messages.OP_CONFIRM, 0, tr.rel, CONFIRM_LEASE_S, self._on_ack)
            if ctr is None:
                tr.done = True
                continue
            self.sent[(device, ctr)] = ("confirm", tr.rel)
            tr.ctr, tr.sent_at, tr.tries = ctr, now, tr.tries + 1
            self._count("confirms_sent")
            dig, _ = self._digest(self.board_of.get(device), tr.rel, self.views.get(device) or View(device))
            self.rec.event(device, "confirm_sent", tr.rel, tr.boot, dig, f"command {ctr}, try {tr.tries}",
                           self.clock())
            log.info("fleet: %s proved release %d at boot %d (a live reading): OP_CONFIRM sent (command %d)",
                     device, tr.rel, tr.boot, ctr)

    # -- rollouts -------------------------------------------------------------------

    def _board_type(self, device: str, registered: dict[str, Any]) -> str | None:
        v = self.views.get(device)
        if v is not None and v.board:
            return v.board
        d = registered.get(device)
        return d.board if d is not None else None

    def _start(self, r: dict[str, Any]) -> None:
        devs = {d.id: d for d in self.registry.devices(self.community) if d.revoked is None}
        if r["device"]:
            wave1, wave2 = [r["device"]], []
        else:
            cands = sorted(d for d in devs if self._board_type(d, devs) == r["board"]
                           and (self.views.get(d) or View(d)).rel != r["seq"])
            wave1, wave2 = cands[:r["first_n"]], cands[r["first_n"]:]
        if not wave1:
            self.rec.set_state(r["id"], "done", "every board of that type runs the release already",
                               only_from=("new",))
            return
        for d in wave1:
            self.rec.put_board(r["id"], d, 1, "waiting")
        for d in wave2:
            self.rec.put_board(r["id"], d, 2, "waiting")
        if self.rec.set_state(r["id"], "wave1", only_from=("new",)):
            log.info("fleet: rollout %d of release %d to %s: wave 1 %s, then %d more", r["id"], r["seq"],
                     r["board"], wave1, len(wave2))

    def _outcome(self, b: dict[str, Any], seq: int) -> tuple[str, str] | None:
        v = self.views.get(b["device"])
        if v is None or v.last_status is None or b["first_sent"] is None or v.last_status < b["first_sent"]:
            return None
        if v.rel == seq and v.ota == messages.OTA_TRIAL:
            return ("started", "on trial") if b["state"] == "sent" else None
        if v.rel == seq:
            # a status is the board's word: a board is counted as updated only
            # once the gateway confirmed the release on it itself (an account
            # that claims a release it never proved stays without outcome)
            if self.rec.has_event(b["device"], "confirm_acked", seq, b["first_sent"]):
                return "ok", "confirmed"
            return None
        if v.ota_rel == seq and v.ota == messages.OTA_REFUSED:
            return "failed", f"refused: {v.ota_why or '?'}"
        if v.ota_rel == seq and v.ota == messages.OTA_ROLLED_BACK:
            return "failed", f"rolled back: {v.ota_why or '?'}"
        if v.ota_rel == seq and v.ota == messages.OTA_FETCH and b["state"] == "sent":
            return "started", "fetching"
        return None

    def _send_update(self, r: dict[str, Any], b: dict[str, Any], now: float) -> None:
        device = b["device"]
        ctr = self.commands.send(device, messages.OP_UPDATE, 0, r["seq"], self.update_lease, self._on_ack)
        if ctr is None:
            self.rec.update_board(r["id"], device, state="failed", done_t=now, detail="no key (unknown or revoked)")
            return
        self.sent[(device, ctr)] = ("update", r["id"], r["seq"])
        if len(self.sent) > 4096:                  # acks that never came: forget the oldest
            for k in list(self.sent)[:256]:
                del self.sent[k]
        tries = b["tries"] + 1
        self.rec.update_board(r["id"], device, state="sent" if b["state"] == "waiting" else b["state"],
                              first_sent=b["first_sent"] or now, sent_at=now, tries=tries)
        self._count("updates_sent")
        dig, _ = self._digest(r["board"], r["seq"], View(device))
        self.rec.event(device, "update_sent", r["seq"], None, dig,
                       f"rollout {r['id']} wave {b['wave']}, command {ctr}, try {tries}", now)
        log.info("fleet: OP_UPDATE %d to %s (rollout %d, command %d, try %d)", r["seq"], device, r["id"], ctr, tries)

    def _drive(self, r: dict[str, Any]) -> None:
        if r["state"] == "new":
            self._start(r)
            return
        now = self.clock()
        wave = 1 if r["state"] == "wave1" else 2
        boards = self.rec.boards(r["id"])
        for b in boards:
            if b["state"] not in ("sent", "started"):
                continue
            out = self._outcome(b, r["seq"])
            if out is not None:
                state, why = out
                if state == "started":
                    self.rec.update_board(r["id"], b["device"], state="started", detail=why)
                else:
                    self.rec.update_board(r["id"], b["device"], state=state, done_t=now, detail=why)
                b["state"], b["detail"] = state, why
            elif now - b["first_sent"] > self.timeout:
                why = f"no outcome within {self.timeout:g} s"
                self.rec.update_board(r["id"], b["device"], state="failed", done_t=now, detail=why)
                self.rec.event(b["device"], "update_timeout", r["seq"], None, None, f"rollout {r['id']}: {why}", now)
                b["state"], b["detail"] = "failed", why
        failed = [b for b in boards if b["state"] == "failed"]
        if len(failed) >= r["max_fail"]:
            why = f"{len(failed)} failure(s): " + "; ".join(
                f"{b['device']} {b['detail']}" for b in failed)
            self.rec.halt(r["id"], why)
            log.warning("fleet: rollout %d of release %d halted: %s", r["id"], r["seq"], why)
            return
        busy = sum(1 for b in boards if b["state"] in ("sent", "started"))
        for b in boards:
            if b["state"] == "waiting" and b["wave"] <= wave:
                if b["wave"] == 2 and busy >= self.at_once:
                    continue                       # its turn comes when one of those ends
                self._send_update(r, b, now)
                busy += 1
            elif b["state"] == "sent" and now - (b["sent_at"] or 0) >= self.resend_s * min(2 ** (b["tries"] - 1), 8):
                self._send_update(r, b, now)
        if any(b["state"] in OPEN for b in boards if b["wave"] <= wave):
            return
        if wave == 1 and any(b["wave"] == 2 for b in boards):
            if self.rec.set_state(r["id"], "wave2", only_from=("wave1",)):
                log.info("fleet: rollout %d: wave 1 through (%d failure(s)); wave 2 starts", r["id"], len(failed))
        else:
            self.rec.set_state(r["id"], "done", f"{len(boards) - len(failed)} ok, {len(failed)} failed",
                               only_from=("wave1", "wave2"))
            log.info("fleet: rollout %d of release %d done", r["id"], r["seq"])

    # -- run ------------------------------------------------------------------------

    def start(self) -> None:
        for name, fn in (("fw-serve", self._serve_loop), ("fleet", self._loop)):
            th = threading.Thread(target=fn, name=name, daemon=True)
            th.start()
            self.threads.append(th)

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()
        for th in self.threads:
            th.join(5)
        self.threads = []

