"""The gateway service: MQTT ingest (paho-mqtt 2.x), validation, batched
storage, presence, metrics.

One paho session per community with a fixed client id and a persistent
session (clean_session False) and manual acknowledgement: a message is
PUBACKed only after the batch holding it was committed (peergrid.ingest.store), so
the broker keeps and redelivers whatever was not stored when the gateway
stopped, crashed or lost power. The MQTT thread validates; a writer thread
commits batches (up to `batch` messages or `batch_ms`) and then acks them.
"""
from __future__ import annotations

import json
import logging
import queue
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from peergrid.community import broker
from peergrid.community import registry as reg
from peergrid.config import Config
from peergrid.control.loop import Commands, ControlLoop
from peergrid.fleet.service import Fleet
from peergrid.ingest.brokerlink import BrokerLink, LinkClient, classify_connack, reconnect_max, state_path
from peergrid.ingest.metrics import Metrics
from peergrid.ingest.store import Store, quarantined
from peergrid.ingest.validate import Accepted, Duplicate, Rejected, Throttled, Validator, fault_warnings
from protocol import gateway_end, topics

log = logging.getLogger("peergrid.gateway")


class Gateway:
    def __init__(self, cfg: Config, clock: Any = None, speed: float = 1.0) -> None:
        """clock: Unix time now (default time.time); a simulation (make demo)
        passes a faster clock and its speed."""
        self.cfg = cfg
        self.clock = clock or time.time
        self.db = reg.connect(cfg.db)
        self.registry = reg.Registry(self.db)
        self.registry.add_community(cfg.community)
        self.lookup_lock = threading.Lock()
        self.presence_lock = threading.Lock()     # self.db is read by the main, HTTP and app threads
        self.store = Store(reg.connect(cfg.db), self._grid_index, cfg.quarantine_max, read_db=self.db,
                           quarantine_bytes=cfg.quarantine_bytes, frame_bytes=cfg.quarantine_frame_bytes)
        self.store.keep_batches = bool(cfg.extra.get("ingest", {}).get("record_batches", False))
        self.validator = Validator(cfg.community, self.registry.device, cfg.max_skew_s, cfg.max_future_s,
                                   history=self.store.history, tag_failures_per_s=cfg.tag_failures_per_s,
                                   readings=self.store.energy_history, max_late_s=cfg.max_late_s)
        # the counter first: a change made while the devices load is seen again
        self.registry_version = self.registry.version()
        self.validator.preload(self.registry.devices(cfg.community))
        self.metrics = Metrics()
        # bounded: when the writer falls behind, paho stops reading and the
        # broker holds the messages (memory stays flat under a burst)
        self.q: queue.Queue[Any] = queue.Queue(maxsize=4000)
        self.done = 0                  # queue items the writer has committed (the drain at stop counts them)
        self.stop_event = threading.Event()
        self._last_reject_log: dict[str, float] = {}
        self._rejects_unlogged: dict[str, int] = {}     # rejections since the last one logged, per device and code
        # devices whose energy registers were implausible: device -> (when, why), for the operator
        self.flagged: dict[str, tuple[float, str]] = {}
        self.client: mqtt.Client | None = None
        self.http: Any = None
        self.connected = threading.Event()
        # the broker's state for the operator (status, doctor, /metrics); paho retries with this back-off
        self.link = BrokerLink(cfg.broker_host, cfg.broker_port, 1, reconnect_max(cfg.extra))
        self._next_retain = time.monotonic() + 60
        # one command counter allocator for all the gateway commands (control
        # loop, firmware updates): a board never sees a counter twice
        self.commands = Commands(reg.connect(cfg.db), cfg.community, self._publish_cmd, clock)
        self.control = None
        if cfg.extra.get("control"):
            self.control = ControlLoop(cfg.db, cfg.community, cfg.extra["control"], self._publish_cmd, self.metrics,
                                       clock=clock, speed=speed, commands=self.commands)
        # firmware updates (docs/OTA.md): serves fwget, records statuses, confirms trials, drives rollouts
        self.fleet = Fleet(cfg, self.commands, lambda t, p: self._publish_cmd(t, p, 0), self.metrics, clock=clock)
        # each house's values for Home Assistant (peergrid.app.homeassistant), when [homeassistant] is there
        self.ha: Any = None
        ha_opts = cfg.extra.get("homeassistant")
        if isinstance(ha_opts, dict) and ha_opts.get("enabled", True):
            from peergrid.app.homeassistant import HomeAssistant

            self.ha = HomeAssistant(cfg.community, reg.connect(cfg.db), self._publish_ha, self.metrics, ha_opts,
                                    self.presence_safe)

    def _grid_index(self, community: str, device: str) -> int | None:
        d = self.validator._device(device)
        return d.grid_index() if d is not None else None

    # -- MQTT ------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if rc != 0:
            self.link.failed(*classify_connack(rc))     # logged there; paho retries
            return
        client.subscribe([(t, 1) for t in gateway_end.subscriptions(self.cfg.community)])
        if self.ha is not None:
            from peergrid.community.hatopics import HA_STATUS

            client.subscribe(HA_STATUS, 1)
        self.connected.set()
        if self.ha is not None:
            threading.Thread(target=self.ha.announce_safe, name="ha-announce", daemon=True).start()
        self.link.up()
        log.info("connected to %s:%d", self.cfg.broker_host, self.cfg.broker_port)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connected.clear()
        if not self.stop_event.is_set() and self.link.connected:     # not after a refused CONNACK
            log.warning("broker connection lost (%s); reconnecting", rc)
            self.link.down(str(rc))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        t0 = time.monotonic()
        now = self.clock()
        topic = msg.topic
        frame = bytes(msg.payload)
        if self.ha is not None and topic == "homeassistant/status":
            if msg.qos > 0:                    # Home Assistant announced itself: not a board's frame
                client.ack(msg.mid, msg.qos)
            self.ha.on_ha_status(frame[:64])   # (counted; never raises)
            return
        try:
            r = self.validator.check(topic, frame, now)
        except Throttled as e:
            # dropped before verification: counted, not kept
            self.metrics.reject("tag_throttled", e.device)
            self._log_throttled(e)
            self.q.put(("thr", msg.mid, msg.qos, e.device, None, t0))
            return
        except Rejected as e:
            self.metrics.reject(e.name, e.device)
            if e.flag and e.device:
                self.metrics.warn(e.flag, e.device)
                self.flagged[e.device] = (now, e.reason)
            self._log_reject(e, topic)
            # the quarantine keeps a bounded prefix of the frame (with its
            # length and digest), so the queue holds no more than that either
            self.q.put(("rej", msg.mid, msg.qos, (now, topic, e.device, e.code, e.reason,
                                                  *quarantined(frame, self.cfg.quarantine_frame_bytes)), e.name, t0))
            return
        except Exception as e:  # noqa: BLE001 - nothing a board sends may stop the gateway
            log.exception("validator failed on a frame from %s", topic)
            self.metrics.reject("internal", None)
            self.q.put(("rej", msg.mid, msg.qos, (now, topic, None, 0, f"internal: {type(e).__name__}",
                                                  *quarantined(frame, self.cfg.quarantine_frame_bytes)),
                        "internal", t0))
            return
        if isinstance(r, Duplicate):
            self.metrics.inc("duplicates")
            self.q.put(("dup", msg.mid, msg.qos, None, None, t0))
            return
        self.metrics.accept(r.kind)
        if r.kind == topics.FWGET:     # served (rate-limited), never stored: a replay costs one piece
            self.fleet.on_fwget(r.device, r.msg)
            self.q.put(("fwget", msg.mid, msg.qos, None, None, t0))
            return
        for w in r.warnings:
            self.metrics.warn("clock", r.device)
        for name in fault_warnings(r.msg):
            self.metrics.warn(name, r.device)
        if r.kind == topics.READING:
            self.fleet.on_reading(r.device, r.msg)
            if self.control is not None:
                self.control.on_reading(r.device, r.msg, self._grid_index(r.community, r.device), r.t_recv)
            if self.ha is not None:
                d = self.validator._device(r.device)
                try:
                    self.ha.on_reading(r.device, r.msg, d.grid_index() if d else None, d.channels if d else [])
                except Exception:  # noqa: BLE001 - the reading is stored whatever Home Assistant gets
                    self.metrics.inc("ha_errors")
                    log.exception("home assistant state of %s failed", r.device)
        elif r.kind == topics.STATUS:
            self.fleet.on_status(r.device, r.msg, r.t_recv)
        elif r.kind == topics.ACK:
            if not self.commands.on_ack(r.device, r.msg) and self.control is not None:
                self.control.on_ack(r.device, r.msg)
        self.q.put(("ok", msg.mid, msg.qos, r, None, t0))

    def _publish_cmd(self, topic: str, frame: bytes, qos: int = 1) -> None:
        if self.client is not None:
            self.client.publish(topic, frame, qos=qos)     # QoS 0: release pieces (fw)

    def _log_throttled(self, e: Throttled) -> None:
        key = f"{e.device}:throttled"
        now = time.monotonic()
        if now - self._last_reject_log.get(key, -1e9) >= 60:
            self._last_reject_log[key] = now
            log.warning("device %s: %d or more forged tags (E_TAG) within a second; its frames are dropped "
                        "unverified for the rest of that second and counted as drop:tag_throttled (logged at "
                        "most once a minute)", e.device, self.cfg.tag_failures_per_s)

    def _log_reject(self, e: Rejected, topic: str) -> None:
        """Every rejection is counted; its reason is logged once a minute per
        device and code, with how many more there were since."""
        key = f"{e.device}:{e.code}"
        now = time.monotonic()
        if now - self._last_reject_log.get(key, -1e9) >= 60:
            self._last_reject_log[key] = now
            more = self._rejects_unlogged.pop(key, 0)
            log.warning("rejected %s on %s: %s (%sfurther ones logged at most once a minute)", e.name, topic[:64],
                        e.reason, f"{more} more since the last one logged; " if more else "")
        else:
            self._rejects_unlogged[key] = self._rejects_unlogged.get(key, 0) + 1

    # -- writer ------------------------------------------------------------------

    def _writer(self) -> None:
        cfg = self.cfg
        while not (self.stop_event.is_set() and self.q.empty()):
            try:
                first = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + cfg.batch_ms / 1000
            while len(batch) < cfg.batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    batch.append(self.q.get(timeout=left))
                except queue.Empty:
                    break
            accepted = [b[3] for b in batch if b[0] == "ok"]
            rejected = [b[3] for b in batch if b[0] == "rej"]
            counts: dict[tuple[str, str, str], int] = {}
            for b in batch:
                if b[0] == "rej":
                    k = (cfg.community, b[3][2] or "-", "reject:" + b[4])
                    counts[k] = counts.get(k, 0) + 1
                elif b[0] == "thr":
                    k = (cfg.community, b[3], "drop:tag_throttled")
                    counts[k] = counts.get(k, 0) + 1
                elif b[0] == "ok":
                    for w in b[3].warnings:
                        k = (cfg.community, b[3].device, "warn:clock")
                        counts[k] = counts.get(k, 0) + 1
            while True:
                try:
                    self.store.write(accepted, rejected, counts)
                    break
                except sqlite3.OperationalError as e:
                    # a full disk or a locked database: nothing is acked, keep trying
                    self.metrics.inc("store_errors")
                    log.error("store failed (%s); retrying, nothing acknowledged meanwhile", e, exc_info=True)
                    if self.stop_event.wait(1):
                        return
            self.done += len(batch)
            done = time.monotonic()
            for b in batch:
                self.metrics.latency(done - b[5])
                if self.client is not None and b[2] > 0:
                    self.client.ack(b[1], b[2])
            self.metrics.inc("stored", len(accepted))
            if time.monotonic() >= self._next_retain:
                self._next_retain = time.monotonic() + 3600
                try:
                    f, r = self.store.retain(time.time(), cfg.raw_days, cfg.full_days)
                    if f or r:
                        log.info("retention: %d raw frames and %d readings thinned", f, r)
                except sqlite3.Error as e:
                    log.error("retention failed: %s", e, exc_info=True)
            for a in accepted:
                if a.kind == topics.STATUS and a.msg.get("fw"):
                    try:
                        self.registry.set_fw(a.community, a.device, a.msg["fw"])
                    except sqlite3.Error as e:
                        log.warning("firmware version of %s not recorded: %s", a.device, e, exc_info=True)

    # -- registry changes -------------------------------------------------------------

    def _watch_registry(self) -> None:
        """Rotations, revocations and new devices take effect here within
        registry_poll_s, whichever process made them (`peergrid device
        rotate|revoke|add`, the installer API, a split): the registry counts
        every change of a device (registry.WATCH) and this thread hands the
        changed devices to the validator, which drops their cached keys."""
        db = reg.connect(self.cfg.db)
        r = reg.Registry(db)
        try:
            while not self.stop_event.wait(self.cfg.registry_poll_s):
                try:
                    self.check_registry(r)
                except sqlite3.Error as e:
                    log.error("registry poll failed (%s); retrying", e, exc_info=True)
        finally:
            db.close()

    def check_registry(self, r: reg.Registry | None = None) -> int:
        """Apply the registry's changes since the last look; returns how many
        devices were refreshed."""
        r = r or self.registry
        n, devs, gone = r.changes(self.cfg.community, self.registry_version)
        if n == self.registry_version:
            return 0
        if gone:
            # a deletion (or a device changed twice meanwhile): compare everything
            devs = r.devices(self.cfg.community)
        changed = self.validator.refresh(devs, complete=gone)
        self.registry_version = n
        for d in changed:
            log.info("registry: device %s %s (key #%d); the validator has its new state", d,
                     next(("revoked" if x.revoked else "active" for x in devs if x.id == d), "removed"),
                     next((x.generation for x in devs if x.id == d), 0))
        return len(changed)

    # -- presence and status --------------------------------------------------------

    def presence(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per device: online (birth/will), last seen, stale (silent longer
        than stale_after_s, the control loop treats it as the worst case)."""
        now = self.clock() if now is None else now
        out = {}
        for d, online, seen in self.db.execute("SELECT device, online, last_seen FROM presence WHERE community=?",
                                               (self.cfg.community,)):
            out[d] = {"online": bool(online), "last_seen": seen,
                      "stale": seen is None or now - seen > self.cfg.stale_after_s}
        for d, (at, why) in list(self.flagged.items()):
            # implausible energy: refused readings, flagged until the gateway restarts
            out.setdefault(d, {"online": False, "last_seen": None, "stale": True})["flagged"] = {"t": at, "reason": why}
        return out

    def presence_safe(self) -> dict[str, dict[str, Any]]:
        with self.presence_lock:
            return self.presence()

    def _publish_ha(self, topic: str, text: str, retain: bool) -> None:
        if self.client is not None and self.connected.is_set():
            self.client.publish(topic, text, qos=1, retain=retain)

    def _publish_status(self) -> None:
        if self.client is None or not self.connected.is_set():
            return
        p = self.presence()
        body = {"t": int(self.clock()), "devices": len(p), "online": sum(v["online"] for v in p.values()),
                "stale": sum(v["stale"] for v in p.values()), "metrics": self.metrics.snapshot()}
        text = json.dumps(body, separators=(",", ":"))
        if len(text) > broker.MESSAGE_LIMIT:
            # the broker passes no message beyond the protocol's largest
            # frame: totals here, every counter on /metrics
            m = body["metrics"]
            body["metrics"] = {"accepted": sum(v for k, v in m["counts"].items() if k.startswith("accepted")),
                               "rejected": sum(m["rejected"].values()), "latency_mean_ms": m["latency_mean_ms"]}
            text = json.dumps(body, separators=(",", ":"))
        self.client.publish(f"pgw/{self.cfg.community}/status", text, qos=1, retain=True)

    # -- HTTP: metrics, the installer API, the member app (peergrid.ingest.web) ---------------

    def _serve_http(self) -> None:
        from peergrid.ingest.web import serve_http

        serve_http(self)

    # -- run ---------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        cid = cfg.client_id or f"peergrid-gw-{cfg.community}"
        c = LinkClient(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False, manual_ack=True)
        c.link = self.link
        c.username_pw_set(cfg.broker_user, cfg.broker_password)
        c.reconnect_delay_set(min_delay=self.link.min_delay, max_delay=self.link.max_delay)
        c.max_inflight_messages_set(1000)
        c.max_queued_messages_set(0)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self.client = c
        threading.Thread(target=self._writer, name="writer", daemon=True).start()
        threading.Thread(target=self._watch_registry, name="registry", daemon=True).start()
        if cfg.http_port >= 0 and cfg.extra.get("gateway", {}).get("http", True):
            self._serve_http()
        self.link.attach(state_path(cfg.db))
        c.connect_async(cfg.broker_host, cfg.broker_port, keepalive=30)
        c.loop_start()
        if self.control is not None:
            self.control.start()
        self.fleet.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.fleet.stop()
        if self.control is not None:
            self.control.stop()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()

    def _settler(self) -> Any:
        """The settlement loop, when the config has a [settlement] table."""
        st = self.cfg.extra.get("settlement")
        if not st:
            return None
        from peergrid.market.settle import Tariff
        from peergrid.market.settler import Settler, load_key

        try:
            tariff = Tariff(int(st["retail"]), int(st["feed_in"]), int(st.get("fund_margin_ppm", 0)),
                            st.get("mechanism", "sdr"), int(st.get("grid_fee", 0)),
                            int(st.get("fund_export_ppm", 0)))
            tariff.check()
        except KeyError as e:
            raise SystemExit(f"settlement: {e.args[0]} is missing from [settlement]") from None
        except (TypeError, ValueError) as e:
            raise SystemExit(f"settlement: {e}") from None
        length = int(st.get("interval_min", 15)) * 60
        if length <= 0 or 3600 % length:
            raise SystemExit("settlement: interval_min must divide the hour (1-60)")
        key = Path(st.get("key_file", "ledger.key"))
        if not key.is_absolute():
            key = self.cfg.db.parent / key
        return Settler(reg.connect(self.cfg.db), self.cfg.community, load_key(key), tariff, length,
                       int(st.get("grace_s", 120)))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, lambda *a: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *a: self.stop_event.set())
        settler = self._settler()      # a bad [settlement] table stops us before connecting
        if settler is not None:
            settler.on_held = lambda member, device, reason, start: self.metrics.warn("held", device)
        self.start()
        log.info("gateway for %s running (db %s); connecting to the broker at %s:%d as %s", self.cfg.community,
                 self.cfg.db, self.cfg.broker_host, self.cfg.broker_port, self.cfg.broker_user)
        next_status = 0.0
        next_settle = 0.0
        from peergrid.app.ledgerfeed import LedgerFeed

        feed = LedgerFeed(self, self.cfg.extra.get("app") or {})
        while not self.stop_event.wait(0.5):
            if settler is not None and time.monotonic() >= next_settle:
                next_settle = time.monotonic() + 5
                try:
                    n = settler.settle_due(self.clock())
                    a = settler.adjust_due(self.clock())
                    if n or a:
                        log.info("settled %d interval(s), %d adjustment(s)", n, a)
                    feed.tick(settler)          # the head for the mirrors, their witnesses into the ledger
                except Exception:  # noqa: BLE001 - retried; nothing half-written (one transaction)
                    log.exception("settlement failed; retrying")
            if time.monotonic() >= next_status:
                next_status = time.monotonic() + self.cfg.status_every_s
                self.link.save()                 # the heartbeat `peergrid status` reads
                try:
                    self._publish_status()
                except Exception:  # noqa: BLE001
                    log.exception("status publish failed")
                if self.ha is not None:
                    try:
                        self.ha.tick()
                    except Exception:  # noqa: BLE001
                        self.metrics.inc("ha_errors")
                        log.exception("home assistant update failed")
        self.fleet.stop()
        if self.control is not None:
            self.control.stop()
        # drain: let the writer commit and ack what was queued when asked to
        # stop (boards still sending meanwhile are not waited for: the broker
        # keeps those for the session, unacknowledged), then leave
        target = self.done + self.q.qsize()
        deadline = time.monotonic() + 10
        while self.done < target and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
        self.link.save(running=False)
        log.info("gateway stopped cleanly")
        return 0


class JsonLog(logging.Formatter):
    """One JSON object a line; a record logged with an exception (or
    log.exception) carries it: "exc" is its type and message, "trace" the
    whole traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"t": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info and record.exc_info[0] is not None:
            et, ev = record.exc_info[0], record.exc_info[1]
            out["exc"] = f"{et.__name__}: {ev}"
            out["trace"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["trace"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out)
