"""Each house's values for Home Assistant (issue 21, part 2): plain JSON
state topics and MQTT discovery configs, published by the gateway with its
own broker session (peergrid.community.hatopics names them).

One Home Assistant device per house (member), one for the community. A
house's entities: grid power (W), grid import and export energy (kWh,
device_class energy, state_class total_increasing, for the Energy
dashboard), PV power and energy where a board has a PV channel or an
inverter, battery power and state of charge where it has a battery, the
local price of the last settled interval, and a binary sensor for each
controlled load's relay. Availability follows the boards' presence (birth
and last will): a house is online while one of its boards is.

Late readings: a board replays its flash buffer after an outage, oldest
first. Home Assistant takes whatever state arrives as the present, and a
total_increasing sensor that goes down reads as a meter reset (its
statistics would count the energy twice). So the state of a device moves
only forward in board time: a reading older than the newest one seen is
stored and settled as usual but not published; the newest reading's
registers already contain the energy of the late ones, so the totals in
Home Assistant are right, only the curve between is flatter than it was.

Limits: every message stays within the broker's message limit (the
protocol's frame size, community.broker.MESSAGE_LIMIT), so configs use
Home Assistant's abbreviated keys. A house's state is published at most
once per `every_s`; discovery is sent again when Home Assistant announces
itself on homeassistant/status, at most once per `announce_s` (any member
may write that topic: the rest are counted, not sent).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from peergrid.community import hatopics as hat

log = logging.getLogger("peergrid.homeassistant")


@dataclass
class Dev:
    """What the last newest reading of one board said."""
    t: int = -1
    grid_w: int = 0
    imp_wh: int = 0
    exp_wh: int = 0
    pv_w: int | None = None
    pv_wh: int | None = None
    bat_w: int | None = None
    bat_soc: float | None = None


@dataclass
class House:
    member: int
    name: str
    devices: dict[str, Dev] = field(default_factory=dict)
    has_pv: bool = False
    has_bat: bool = False
    loads: list[tuple[str, str, int]] = field(default_factory=list)     # (load id, device, relay)
    sent_at: float = -1e9
    announced: bool = False
    avail: str | None = None


def _slug(text: str) -> str:
    """A load's id as a topic level, object id and JSON key: a-z, 0-9, '_'."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch == "_") else "_" for ch in text.lower())[:24]


def _num(v: float) -> float:
    return round(v, 3)


class HomeAssistant:
    """publish(topic, payload, retain): the gateway's MQTT publish (QoS 1)."""

    def __init__(self, community: str, db: Any, publish: Callable[[str, str, bool], None], metrics: Any,
                 opts: dict[str, Any], presence: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.c = community
        self.db = db
        self.publish = publish
        self.metrics = metrics
        self.presence = presence
        self.every_s = float(opts.get("every_s", 10))
        self.announce_s = float(opts.get("announce_s", 30))
        self.currency = str(opts.get("currency", "EUR"))[:8]
        self.pace_s = float(opts.get("announce_pace_s", 0.02))
        self.run_async = True
        self.lock = threading.Lock()
        self.dblock = threading.Lock()          # the connection is used by the MQTT and main threads
        self._next_load = 0.0
        self.houses: dict[int, House] = {}
        self.by_device: dict[str, int] = {}
        self.price: float | None = None
        self.community: dict[str, Any] = {}
        self._last_announce = -1e9
        self._ledger_n = -1
        self.load()

    # -- the registry ---------------------------------------------------------------

    def load(self) -> None:
        """Houses, their boards, PV, batteries and loads from the registry."""
        from peergrid.community import registry as reg

        with self.dblock:
            r = reg.Registry(self.db)
            members = r.members(self.c)
            devices = r.devices(self.c)
            loads, bats, _ = r.resource_rows(self.c)
        houses: dict[int, House] = {}
        now = time.time()
        for mid, name, left in members:
            if left is None or left > now:
                houses[mid] = House(mid, name)
        by_device = {}
        for d in devices:
            if d.revoked is not None or d.member not in houses:
                continue
            by_device[d.id] = d.member
            h = houses[d.member]
            h.has_pv = h.has_pv or any(ch.get("role") == "pv" for ch in d.channels)
        for row in loads:
            m = by_device.get(row[1])
            if m is not None:
                houses[m].loads.append((row[0], row[1], row[2]))
        for row in bats:
            m = by_device.get(row[1])
            if m is not None:
                houses[m].has_bat = True
        with self.lock:
            for mid, h in houses.items():
                old = self.houses.get(mid)
                if old is not None:
                    h.devices, h.sent_at, h.avail = old.devices, old.sent_at, old.avail
                    h.announced = old.announced and (old.has_pv, old.has_bat, old.loads) == \
                        (h.has_pv, h.has_bat, h.loads)
            self.houses = houses
            self.by_device = by_device

    # -- readings -------------------------------------------------------------------

    def on_reading(self, device: str, msg: dict[str, Any], grid_index: int | None, channels: list[dict]) -> None:
        """An accepted reading (the MQTT thread). Only a reading newer than
        the device's newest moves its state (see the module's note)."""
        with self.lock:
            mid = self.by_device.get(device)
            if mid is None:
                return
            h = self.houses[mid]
            d = h.devices.setdefault(device, Dev())
            if msg["t"] <= d.t:
                self.metrics.inc("ha_late_not_published")
                return
            d.t = msg["t"]
            ch = msg.get("ch") or []
            if grid_index is not None and grid_index < len(ch):
                d.grid_w, d.imp_wh, d.exp_wh = int(ch[grid_index][0]), int(ch[grid_index][1]), int(ch[grid_index][2])
            pv = [i for i, c in enumerate(channels) if c.get("role") == "pv" and i < len(ch)]
            inv = msg.get("inv")
            if inv is not None and inv[1] is not None:
                d.pv_w, d.pv_wh = max(0, int(inv[1])), int(inv[2]) if inv[2] is not None else d.pv_wh
                h.has_pv = True
            elif pv:
                d.pv_w = max(0, -sum(int(ch[i][0]) for i in pv))
                d.pv_wh = sum(int(ch[i][2]) for i in pv)
            bat = msg.get("bat")
            if bat is not None:
                d.bat_w = int(bat[1]) if bat[1] is not None else None
                d.bat_soc = bat[2] / 10 if bat[2] is not None else None
                h.has_bat = True
            due = time.monotonic() - h.sent_at >= self.every_s
            if due:
                h.sent_at = time.monotonic()
            announce = not h.announced
        if announce:
            self.announce_house(mid)
        if due:
            self.publish_house(mid)

    def house_state(self, mid: int) -> dict[str, Any]:
        with self.lock:
            h = self.houses[mid]
            devs = list(h.devices.values())
            out: dict[str, Any] = {
                "t": max((d.t for d in devs), default=None),
                "grid_w": sum(d.grid_w for d in devs),
                "import_kwh": _num(sum(d.imp_wh for d in devs) / 1000),
                "export_kwh": _num(sum(d.exp_wh for d in devs) / 1000),
            }
            if h.has_pv:
                out["pv_w"] = sum(d.pv_w or 0 for d in devs)
                out["pv_kwh"] = _num(sum(d.pv_wh or 0 for d in devs) / 1000)
            if h.has_bat:
                out["battery_w"] = sum(d.bat_w or 0 for d in devs)
                socs = [d.bat_soc for d in devs if d.bat_soc is not None]
                out["battery_soc"] = round(sum(socs) / len(socs), 1) if socs else None
            out["price"] = self.price
            loads = list(h.loads)
        for lid, dev, relay in loads:
            with self.dblock:
                row = self.db.execute("SELECT value FROM decisions WHERE community=? AND device=? AND target=?"
                                      " ORDER BY t DESC LIMIT 1", (self.c, dev, relay)).fetchone() \
                    if _has_table(self.db, "decisions") else None
            out["load_" + _slug(lid)] = "ON" if row and row[0] else "OFF"
        return out

    def publish_house(self, mid: int) -> None:
        text = json.dumps(self.house_state(mid), separators=(",", ":"))
        self._send(hat.house_base(self.c, mid) + "/state", text, True)

    # -- periodic: availability, the community aggregate, the price --------------------------

    def tick(self) -> None:
        """From the gateway's main loop (every status period)."""
        if time.monotonic() >= self._next_load:
            self._next_load = time.monotonic() + 30      # members, boards and loads added since
            self.load()
        p = self.presence()
        with self.dblock:
            self._price()
        with self.lock:
            houses = list(self.houses.values())
            by_device = dict(self.by_device)
        online_by_house: dict[int, bool] = {}
        for dev, mid in by_device.items():
            online_by_house[mid] = online_by_house.get(mid, False) or bool(p.get(dev, {}).get("online"))
        for h in houses:
            a = "online" if online_by_house.get(h.member) else "offline"
            if a != h.avail:
                h.avail = a
                self._send(hat.house_base(self.c, h.member) + "/avail", a, True)
        with self.lock:
            devs = [d for h in houses for d in h.devices.values()]
            grid = sum(d.grid_w for d in devs)
            pv = sum(d.pv_w or 0 for d in devs)
            bat = sum(d.bat_w or 0 for d in devs)
        state = {"houses": len(houses), "online": sum(online_by_house.values()), "grid_w": grid, "pv_w": pv,
                 "load_w": grid + pv - bat, "local_share": self.community.get("local_share"), "price": self.price}
        self._send(hat.community_base(self.c) + "/state", json.dumps(state, separators=(",", ":")), True)
        self._send(hat.community_base(self.c) + "/avail", "online", True)

    def _price(self) -> None:
        """The local price and share of the newest settled interval."""
        if not _has_table(self.db, "ledger"):
            return
        row = self.db.execute("SELECT n, raw FROM ledger ORDER BY n DESC LIMIT 1").fetchone()
        if row is None or row[0] == self._ledger_n:
            return
        self._ledger_n = row[0]
        from peergrid.market.ledger import decode_entry

        for (raw,) in self.db.execute("SELECT raw FROM ledger ORDER BY n DESC LIMIT 50"):
            e = decode_entry(bytes(raw))
            if e["type"] == "settlement":
                b = e["body"]
                pr = b.get("price")
                if pr and pr[1]:
                    self.price = round(pr[0] / pr[1] / 100, 4)
                from peergrid.market.ledger import rerun

                demand = sum(b["flows"][1::3])
                local = rerun(b)[2].local
                self.community["local_share"] = round(100 * local / demand, 1) if demand else None
                return

    # -- discovery ---------------------------------------------------------------------

    def on_ha_status(self, payload: bytes) -> None:
        """Home Assistant announced itself: all configs again (rate-limited;
        from the MQTT thread, so nothing raises out of here)."""
        self.metrics.inc("ha_status")
        try:
            self._on_ha_status(payload)
        except Exception:  # noqa: BLE001 - never stops the ingest
            self.metrics.inc("ha_errors")
            log.exception("home assistant announcement failed")

    def _on_ha_status(self, payload: bytes) -> None:
        if payload.strip().lower() != b"online":
            return
        now = time.monotonic()
        if now - self._last_announce < self.announce_s:
            self.metrics.inc("ha_announce_throttled")
            return
        self._last_announce = now
        if self.run_async:              # (from the MQTT thread: the paced announcement runs in its own)
            threading.Thread(target=self.announce_safe, name="ha-announce", daemon=True).start()
        else:
            self.announce_all()

    def announce_safe(self) -> None:
        """announce_all for a thread of its own (after the gateway connects)."""
        try:
            self.announce_all()
        except Exception:  # noqa: BLE001 - the next announcement or reading tries again
            self.metrics.inc("ha_errors")
            log.exception("home assistant discovery failed")

    def announce_all(self) -> None:
        """Every config and state again, paced (`announce_pace_s` between
        houses): a hundred houses' configs at once would hold up the
        gateway's commands to the boards behind them on the same session."""
        self.announce_community()
        with self.lock:
            mids = list(self.houses)
        for mid in mids:
            self.announce_house(mid)
            self.publish_house(mid)
            if self.pace_s:
                time.sleep(self.pace_s)

    def _device(self, node: str, name: str, model: str) -> dict[str, Any]:
        return {"ids": [node], "name": name, "mf": "PeerGrid", "mdl": model}

    def _config(self, component: str, node: str, obj: str, base: str, name: str, key: str, dev: dict[str, Any],
                **extra: Any) -> None:
        cfg: dict[str, Any] = {"~": base, "name": name, "uniq_id": f"{node}_{obj}", "obj_id": f"{node}_{obj}",
                               "stat_t": "~/state", "val_tpl": "{{ value_json.%s }}" % key, "avty_t": "~/avail",
                               "dev": dev}
        cfg.update(extra)
        self._send(f"{hat.DISCOVERY}/{component}/{node}/{obj}/config", json.dumps(cfg, separators=(",", ":")), True)

    def announce_house(self, mid: int) -> None:
        with self.lock:
            h = self.houses.get(mid)
            if h is None:
                return
            h.announced = True
            has_pv, has_bat, loads, name = h.has_pv, h.has_bat, list(h.loads), h.name
        node = hat.house_node(self.c, mid)
        base = hat.house_base(self.c, mid)
        dev = self._device(node, f"PeerGrid house {mid}" + (f" ({name[:24]})" if name else ""), "house")
        power = {"dev_cla": "power", "unit_of_meas": "W", "stat_cla": "measurement"}
        energy = {"dev_cla": "energy", "unit_of_meas": "kWh", "stat_cla": "total_increasing"}
        self._config("sensor", node, "grid_power", base, "Grid power", "grid_w", dev, **power)
        self._config("sensor", node, "grid_import", base, "Grid import", "import_kwh", dev, **energy)
        self._config("sensor", node, "grid_export", base, "Grid export", "export_kwh", dev, **energy)
        if has_pv:
            self._config("sensor", node, "pv_power", base, "PV power", "pv_w", dev, **power)
            self._config("sensor", node, "pv_energy", base, "PV energy", "pv_kwh", dev, **energy)
        if has_bat:
            self._config("sensor", node, "battery_power", base, "Battery power", "battery_w", dev, **power)
            self._config("sensor", node, "battery_soc", base, "Battery charge", "battery_soc", dev,
                         dev_cla="battery", unit_of_meas="%", stat_cla="measurement")
        self._config("sensor", node, "local_price", base, "Local price", "price", dev,
                     unit_of_meas=f"{self.currency}/kWh")
        for lid, _dev, _relay in loads:
            self._config("binary_sensor", node, "load_" + _slug(lid), base, f"Load {lid[:24]}", "load_" + _slug(lid),
                         dev, dev_cla="power", pl_on="ON", pl_off="OFF")

    def announce_community(self) -> None:
        node = hat.community_node(self.c)
        base = hat.community_base(self.c)
        dev = self._device(node, f"PeerGrid community {self.c}", "community")
        power = {"dev_cla": "power", "unit_of_meas": "W", "stat_cla": "measurement"}
        self._config("sensor", node, "grid_power", base, "Community grid power", "grid_w", dev, **power)
        self._config("sensor", node, "pv_power", base, "Community PV power", "pv_w", dev, **power)
        self._config("sensor", node, "load_power", base, "Community load", "load_w", dev, **power)
        self._config("sensor", node, "local_share", base, "Local share", "local_share", dev,
                     unit_of_meas="%", stat_cla="measurement")

    def _send(self, topic: str, text: str, retain: bool) -> None:
        from peergrid.community.broker import MESSAGE_LIMIT

        if len(text.encode()) > MESSAGE_LIMIT:
            # never expected (the configs are abbreviated); counted, not sent
            self.metrics.inc("ha_too_large")
            log.warning("home assistant: %s would be %d bytes, beyond the broker's limit", topic, len(text))
            return
        self.publish(topic, text, retain)
        self.metrics.inc("ha_published")


def _has_table(db: Any, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

