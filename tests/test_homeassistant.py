"""The Home Assistant publisher on its own (peergrid.app.homeassistant):
what it publishes from readings, and what it refuses to publish. The
end-to-end test with the real broker, gateway and a member's account is in
test_residents.py."""
from __future__ import annotations

import json

from peergrid.app.homeassistant import HomeAssistant
from peergrid.community import broker
from peergrid.community import registry as reg
from peergrid.control.controller import Battery, Load
from peergrid.ingest.metrics import Metrics

C = "a-very-long-name"          # 16 characters: the longest community id
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]


def _ha(tmp_path, presence=None):
    r = reg.Registry(reg.connect(tmp_path / "gw.db"))
    r.add_community(C)
    m1 = r.add_member(C, "x" * 200)                                       # a long name
    m2 = r.add_member(C, "two")
    r.add_device(C, "house-one-board1", "sim", CH, m1)
    r.add_device(C, "b2", "sim", [{"role": "grid", "rating_a": 100}], m2)
    r.add_load(C, Load("Water heater / #1 + more words", "house-one-board1", 0, 2000, priority=1, min_on_s=0,
                       min_off_s=0, need_wh=0))
    r.add_battery(C, Battery("bat-b2", "b2", 0, 10000, 5000, 5000, 0.1, 0.95, 0.92))
    sent: list[tuple[str, str, bool]] = []
    m = Metrics()
    ha = HomeAssistant(C, r.db, lambda t, p, retain: sent.append((t, p, retain)), m,
                       {"every_s": 0, "announce_s": 60, "announce_pace_s": 0}, presence or (lambda: {}))
    ha.run_async = False            # announcements in this thread, to count what they sent
    return ha, sent, m, (m1, m2)


def _reading(t: int, imp: int, exp: int = 0, w: int = 500, pv_w: int = 0, pv_wh: int = 0) -> dict:
    return {"boot": 1, "seq": t, "t": t, "ch": [[w, imp, exp, 1000], [pv_w, 0, pv_wh, 100]]}


def _last_state(sent, m) -> dict:
    return json.loads([p for t, p, _ in sent if t == f"pgha/{C}/house-{m}/state"][-1])


def test_every_config_fits_the_brokers_limit_and_names_valid_topics(tmp_path) -> None:
    ha, sent, metrics, (m1, m2) = _ha(tmp_path)
    ha.announce_all()
    configs = [(t, p) for t, p, retain in sent if t.endswith("/config")]
    assert configs and all(retain for t, p, retain in sent if t.endswith("/config"))
    for t, p in configs:
        assert len(p.encode()) <= broker.MESSAGE_LIMIT, (t, len(p))
        assert "#" not in t and "+" not in t and " " not in t, t
        cfg = json.loads(p)
        assert cfg["uniq_id"] == cfg["obj_id"] and cfg["stat_t"] == "~/state" and cfg["avty_t"] == "~/avail"
    assert metrics.snapshot()["counts"].get("ha_too_large", 0) == 0
    objs = {t.split("/")[2] + "/" + t.split("/")[3] for t, _ in configs}
    n1, n2 = f"pg_{C}_m{m1}", f"pg_{C}_m{m2}"
    # PV where the board has a PV channel, a battery where one is registered, a relay for the load
    assert f"{n1}/pv_energy" in objs and f"{n2}/pv_energy" not in objs
    assert f"{n2}/battery_soc" in objs and f"{n1}/battery_soc" not in objs
    assert f"{n1}/load_water_heater____1___more" in objs


def test_a_late_reading_never_moves_the_state_backwards(tmp_path) -> None:
    ha, sent, metrics, (m1, _) = _ha(tmp_path)
    dev = "house-one-board1"
    ha.on_reading(dev, _reading(1000, 5000, w=800), 0, CH)
    ha.on_reading(dev, _reading(1060, 5020, w=900), 0, CH)
    assert _last_state(sent, m1)["import_kwh"] == 5.02
    n = len(sent)
    # replayed from the board's flash after an outage: older, lower registers
    ha.on_reading(dev, _reading(1030, 5010, w=100), 0, CH)
    assert len(sent) == n, "a late reading publishes nothing"
    assert ha.house_state(m1)["import_kwh"] == 5.02 and ha.house_state(m1)["grid_w"] == 900
    assert metrics.snapshot()["counts"]["ha_late_not_published"] == 1
    # the next live one carries on from the newest
    ha.on_reading(dev, _reading(1120, 5040, w=700), 0, CH)
    assert _last_state(sent, m1)["import_kwh"] == 5.04


def test_pv_from_the_channel_and_energy_in_kwh(tmp_path) -> None:
    ha, sent, _, (m1, _) = _ha(tmp_path)
    ha.on_reading("house-one-board1", _reading(1000, 5000, 7000, w=-1500, pv_w=-2100, pv_wh=12345), 0, CH)
    st = _last_state(sent, m1)
    assert st["grid_w"] == -1500 and st["pv_w"] == 2100 and st["pv_kwh"] == 12.345 and st["export_kwh"] == 7.0
    assert st["load_water_heater____1___more"] == "OFF"


def test_an_unknown_board_and_a_flood_of_announcements_cost_nothing(tmp_path) -> None:
    ha, sent, metrics, _ = _ha(tmp_path)
    ha.on_reading("not-registered", _reading(1000, 1), 0, CH)
    assert sent == []
    ha.on_ha_status(b"online")
    first = len(sent)
    assert first > 0
    for _ in range(100):                  # any member may write homeassistant/status
        ha.on_ha_status(b"online")
    ha.on_ha_status(b"offline")
    assert len(sent) == first
    assert metrics.snapshot()["counts"]["ha_announce_throttled"] == 100


def test_availability_follows_the_boards_presence(tmp_path) -> None:
    pres = {"house-one-board1": {"online": True}}
    ha, sent, _, (m1, m2) = _ha(tmp_path, presence=lambda: pres)
    ha.tick()
    avail = {t: p for t, p, _ in sent if t.endswith("/avail")}
    assert avail[f"pgha/{C}/house-{m1}/avail"] == "online" and avail[f"pgha/{C}/house-{m2}/avail"] == "offline"
    n = len([1 for t, _, _ in sent if t.endswith(f"house-{m1}/avail")])
    ha.tick()                              # unchanged: not sent again
    assert len([1 for t, _, _ in sent if t.endswith(f"house-{m1}/avail")]) == n
    pres["house-one-board1"] = {"online": False}
    ha.tick()
    assert [p for t, p, _ in sent if t.endswith(f"house-{m1}/avail")][-1] == "offline"
