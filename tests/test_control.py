"""Control (issue 7): the decision step on its own (dwell, hysteresis,
deadlines, compensation, batteries, the feeder limit with stale data), then
the gateway's control loop with virtual boards running the real firmware
through a real mosquitto: a surplus switches a relay, a lease that is not
renewed returns the relay to its fail-safe state, an oscillating surplus
does not make it flap, and the feeder limit holds when a board goes quiet."""
from __future__ import annotations

import math
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import free_port, registry_broker, stop_process
from peergrid.community import registry as reg
from peergrid.control.controller import Battery, Controller, Feeder, Load

T0 = 1_795_046_400          # a midnight (UTC)
BIG = Feeder(10**9, 10**9)


def run(ctl: Controller, seconds: int, power, t0: float = T0 + 10 * 3600, every: int = 1):
    """Step once a second for `seconds`; power(t, ctl) -> {house: W}.
    Returns the decisions."""
    out = []
    readings = ctl.__dict__.setdefault("_test_readings", {})     # what the boards said last, across calls
    for k in range(seconds):
        t = t0 + k
        if k % every == 0:
            for h, w in power(t, ctl).items():
                readings[h] = (w, t)
        out += ctl.step(t, readings)
    return out


def house_w(ctl: Controller, base: dict[str, float]) -> dict[str, float]:
    """What each house's meter shows: its base plus our loads and batteries."""
    out = dict(base)
    for ld in ctl.loads:
        if ctl.ls[ld.id].on:
            out[ld.device] = out.get(ld.device, 0) + ld.rated_w
    for b in ctl.batteries:
        out[b.device] = out.get(b.device, 0) + ctl.bs[b.id].w
    return out


def test_surplus_switches_loads_on_in_priority_order() -> None:
    loads = [Load("low", "a", 0, 2000, priority=5), Load("high", "b", 0, 2000, priority=1)]
    ctl = Controller(loads, [], BIG, ["a", "b"])
    d = run(ctl, 2, lambda t, c: house_w(c, {"a": -1000, "b": -1500}))
    assert [(x.id, x.value) for x in d] == [("high", 1)]           # 2.5 kW covers one 2 kW load
    assert "surplus" in d[0].reason


def test_own_switched_load_is_compensated() -> None:
    # the house exports 500 W less than the load it runs: still a surplus, the load stays on
    ctl = Controller([Load("wh", "a", 0, 2000, min_on_s=0, min_off_s=0)], [], BIG, ["a"], off_delay_s=5)
    run(ctl, 2, lambda t, c: house_w(c, {"a": -2500}))
    assert ctl.ls["wh"].on
    d = run(ctl, 60, lambda t, c: house_w(c, {"a": -2500}), t0=T0 + 10 * 3600 + 2)
    assert d == [] and ctl.ls["wh"].on


def test_noisy_oscillating_surplus_does_not_flap() -> None:
    ld = Load("wh", "a", 0, 2000, min_on_s=300, min_off_s=300, max_switches_day=1000)
    ctl = Controller([ld], [], BIG, ["a"], off_delay_s=60)
    rng = random.Random(7)
    # surplus swinging between 3 kW and a 1 kW deficit every 20 s, with noise, for two hours
    d = run(ctl, 7200, lambda t, c: house_w(c, {"a": (-3000 if (t // 20) % 2 else 1000) + rng.gauss(0, 200)}))
    switches = len([x for x in d if x.kind == "relay"])
    assert 1 <= switches <= math.ceil(7200 / 600) + 1      # at most one on/off pair per dwell cycle
    times = [x.t for x in d]
    assert all(b - a >= 300 for a, b in zip(times, times[1:]))


def test_switch_budget_caps_a_day() -> None:
    ld = Load("wh", "a", 0, 2000, min_on_s=0, min_off_s=0, max_switches_day=6)
    ctl = Controller([ld], [], BIG, ["a"], off_delay_s=0)
    d = run(ctl, 3600, lambda t, c: house_w(c, {"a": -3000 if (t // 30) % 2 else 1000}))
    assert len(d) == 6


def test_deadline_is_met_without_surplus() -> None:
    ld = Load("wh", "a", 0, 3000, need_wh=3000, deadline_s=18 * 3600, min_on_s=600, min_off_s=600)
    ctl = Controller([ld], [], BIG, ["a"])
    # no sun at all from 12:00; the heater needs an hour at 3 kW before 18:00
    d = run(ctl, 6 * 3600, lambda t, c: house_w(c, {"a": 400}), t0=T0 + 12 * 3600, every=10)
    on = [x for x in d if x.value == 1]
    assert on and "deadline" in on[0].reason
    assert ctl.ls["wh"].done_wh >= 3000
    assert on[0].t <= T0 + 18 * 3600 - 3600                  # started early enough
    assert any(x.value == 0 and "need met" in x.reason for x in d)


def test_battery_charges_from_surplus_and_discharges_into_deficit() -> None:
    b = Battery("b", "a", 0, 10000, 3000, 3000, soc0=0.5)
    ctl = Controller([], [b], BIG, ["a"])
    d = run(ctl, 3, lambda t, c: house_w(c, {"a": -2000}))
    assert ctl.bs["b"].w == 2000 and "charging" in d[0].reason
    d = run(ctl, 3, lambda t, c: house_w(c, {"a": 5000}), t0=T0 + 10 * 3600 + 3)
    assert ctl.bs["b"].w == -3000 and "discharging" in d[0].reason
    # empty: stops
    ctl.set_soc("b", 900)
    run(ctl, 3, lambda t, c: house_w(c, {"a": 5000}), t0=T0 + 10 * 3600 + 6)
    assert ctl.bs["b"].w == 0


def test_feeder_limit_with_stale_readings_sheds_load() -> None:
    loads = [Load("ev", "a", 0, 7000, min_on_s=3600, min_off_s=600), Load("wh", "b", 0, 2000, min_on_s=3600)]
    ctl = Controller(loads, [], Feeder(12000, 50000), ["a", "b", "c"], stale_s=30, stale_margin_w=3000)
    base = {"a": 500, "b": 500, "c": -11000}
    run(ctl, 5, lambda t, c: house_w(c, base))
    assert ctl.ls["ev"].on and ctl.ls["wh"].on               # 11 kW from house c
    # house c goes quiet: after 30 s it counts as importing 3 kW, so 13 kW would be
    # too much for a 12 kW feeder: a load goes off although its minimum on time is not up
    quiet = {"a": 500, "b": 500}
    d = run(ctl, 40, lambda t, c: house_w(c, quiet), t0=T0 + 10 * 3600 + 5)
    assert [(x.id, x.value) for x in d] == [("wh", 0)] and "feeder import limit" in d[0].reason
    assert d[0].t >= T0 + 10 * 3600 + 4 + 30
    assert 500 + 7000 + 500 + 3000 <= 12000 and ctl.ls["ev"].on


def test_deadline_loads_respect_the_feeder_limit_and_wait() -> None:
    loads = [Load(f"ev{k}", f"h{k}", 0, 11000, need_wh=5000, deadline_s=7 * 3600, min_on_s=60, min_off_s=60)
             for k in range(3)]
    ctl = Controller(loads, [], Feeder(25000, 50000), [f"h{k}" for k in range(3)])
    peak = 0.0
    readings = {}
    for k in range(0, 4 * 3600):                              # 03:00 to 07:00
        t = T0 + 3 * 3600 + k
        hw = house_w(ctl, {f"h{j}": 300 for j in range(3)})
        peak = max(peak, sum(hw.values()))
        for h, w in hw.items():
            readings[h] = (w, t)
        ctl.step(t, readings)
    assert peak <= 25000
    assert sum(ctl.ls[x.id].done_wh >= 5000 for x in loads) >= 2


# -- the control loop with virtual boards and mosquitto ------------------------------------------

C = "ash"
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}, {"role": "load", "rating_a": 20},
      {"role": "ev", "rating_a": 32}]


class ControlRig:
    def __init__(self, tmp: Path, devices: list[str], control: str) -> None:
        from peergrid.sim.vboard import VirtualBoard, default_config

        self.tmp = tmp
        self.port = free_port()
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = -1\nstatus_every_s = 1\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\nuser = "gateway"\npassword = "gw-pass-123"\n'
            f'passwd_file = "passwd"\nacl_file = "acl"\npid_file = "mosquitto.pid"\n'
            f'[ingest]\nmax_skew_s = 300\n[control]\n{control}\n')
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        creds = {}
        for d in devices:
            m = r.add_member(C, d)
            creds[d] = r.add_device(C, d, "sim", CH, m)
        r.db.close()
        self.cli("broker-files")
        self.broker = registry_broker(tmp, self.port)
        self.gw: subprocess.Popen | None = None
        self.boards = {}
        for d in devices:
            secret, pw = creds[d]
            cfg = default_config(C, d, secret, "127.0.0.1", self.port, reg.broker_user(C, d), pw, period_s=1,
                                 keepalive_s=5)
            cfg["sim"]["start"] = int(time.time())
            self.boards[d] = VirtualBoard(tmp / d, cfg, speed=1)

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start(self) -> None:
        self.gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                   stdout=subprocess.DEVNULL, stderr=open(self.tmp / "gw.log", "a"), text=True)
        deadline = time.monotonic() + 15
        while "connected to" not in (self.tmp / "gw.log").read_text():
            assert time.monotonic() < deadline, (self.tmp / "gw.log").read_text()
            time.sleep(0.05)
        for b in self.boards.values():
            b.start()

    def decisions(self) -> list[tuple]:
        with sqlite3.connect(str(self.tmp / "gw.db"), timeout=30) as db:
            return list(db.execute("SELECT t, id, value, reason FROM decisions ORDER BY t"))

    def close(self) -> None:
        for b in self.boards.values():
            b.close()
        stop_process(self.gw)
        stop_process(self.broker, 5)


CONTROL = "period_s = 1\nlease_s = 6\nrefresh_s = 2\nack_timeout_s = 1\nstale_s = 4\nstale_margin_w = 3000\n" \
          "off_delay_s = 1\ntimezone = \"UTC\""


@pytest.fixture
def rig_factory(tmp_path):
    rigs = []

    def make(devices, control=CONTROL):
        r = ControlRig(tmp_path, devices, control)
        rigs.append(r)
        return r

    yield make
    for r in rigs:
        r.close()


def _relay_events(vb, i):
    return [e for e in vb.log if e.get("ev") == "relay" and e["i"] == i]


@pytest.mark.broker
def test_surplus_switches_the_relay_and_a_lost_gateway_means_failsafe(rig_factory) -> None:
    rig = rig_factory(["va"])
    rig.cli("resource", "load", "wh", "--device", "va", "--relay", "0", "--rated-w", "2000", "--min-on-s", "0",
            "--min-off-s", "0")
    rig.cli("resource", "feeder", "--import-kw", "50", "--export-kw", "50")
    rig.start()
    vb = rig.boards["va"]
    vb.send(op="power", w=[300, 0, 0, 0])                 # importing: nothing to do
    time.sleep(3)
    assert vb.state()["relays"][0] == 0
    t0 = time.monotonic()
    vb.send(op="power", w=[-3000, -3300, 0, 0])           # 3 kW exported
    vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 1, 10)
    latency = time.monotonic() - t0
    assert latency < 2.5, latency                         # one reading period (1 s) plus the loop
    dec = rig.decisions()
    assert dec[-1][1:3] == ("wh", 1) and "surplus" in dec[-1][3]
    # the loop renews the lease: still on after three leases' time
    time.sleep(8)
    assert vb.state()["relays"][0] == 1
    # the gateway dies: no renewal, the board returns to its fail-safe (off) when the lease runs out
    rig.gw.kill()
    rig.gw.wait()
    t_kill = time.monotonic()
    ev = vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 0, 15)
    assert "lease" in ev.get("why", "") or "fail" in ev.get("why", "")
    assert time.monotonic() - t_kill <= 6 + 1.5


@pytest.mark.broker
def test_oscillating_surplus_does_not_flap_on_the_board(rig_factory) -> None:
    rig = rig_factory(["vb"])
    rig.cli("resource", "load", "wh", "--device", "vb", "--relay", "0", "--rated-w", "2000", "--min-on-s", "5",
            "--min-off-s", "5")
    rig.start()
    vb = rig.boards["vb"]
    t_end = time.monotonic() + 20
    k = 0
    while time.monotonic() < t_end:
        vb.send(op="power", w=[-3000 if k % 2 else 800, 0, 0, 0])
        k += 1
        time.sleep(0.6)
    sw = _relay_events(vb, 0)
    assert sw, "the relay never came on"
    assert len(sw) <= math.ceil(20 / 10) * 2 + 1, sw          # min on + min off = 10 s per on/off pair
    dec = [d for d in rig.decisions() if d[1] == "wh"]
    assert all(b[0] - a[0] >= 4.9 for a, b in zip(dec, dec[1:]))


@pytest.mark.broker
def test_feeder_limit_holds_when_a_board_goes_quiet(rig_factory) -> None:
    rig = rig_factory(["vc", "vd"])
    rig.cli("resource", "load", "wh", "--device", "vc", "--relay", "0", "--rated-w", "2000", "--min-on-s", "600",
            "--min-off-s", "0")
    rig.cli("resource", "feeder", "--import-kw", "4", "--export-kw", "20")
    rig.start()
    vc, vd = rig.boards["vc"], rig.boards["vd"]
    vc.send(op="power", w=[500, 0, 0, 0])
    vd.send(op="power", w=[-4000, -4400, 0, 0])            # the neighbour's surplus
    vc.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 1, 10)
    vc.send(op="power", w=[2500, 0, 2000, 0])              # its meter now shows the heater too
    time.sleep(2)
    assert vc.state()["relays"][0] == 1
    # vd goes quiet (its process stops): after stale_s it counts as importing 3 kW,
    # 0.5 + 2 + 3 > 4 kW, so the load goes off though its minimum on time is 10 minutes
    vd.kill()
    ev = vc.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 0, 15)
    assert ev
    assert any(d[1] == "wh" and d[2] == 0 and "feeder" in d[3] for d in rig.decisions())


def _one_heater(tmp_path) -> bytes:
    """A registry with board vx and its 2 kW water heater; vx's secret."""
    r = reg.Registry(reg.connect(tmp_path / "gw.db"))
    r.add_community(C)
    secret, _ = r.add_device(C, "vx", "sim", CH, r.add_member(C, "x"))
    r.add_load(C, Load("wh", "vx", 0, 2000, min_on_s=0, min_off_s=0))
    r.set_feeder(C, 10**6, 10**6)
    return secret


def test_loop_retries_marks_degraded_and_recovers(tmp_path) -> None:
    """The loop's command path with the real protocol code on the board's
    side (DeviceLink opens what the loop publishes), no broker: commands that
    go unanswered are resent with new counters, the device is marked
    degraded, an ack brings it back; a refused counter makes it skip ahead."""
    from peergrid.control.loop import ControlLoop
    from protocol import messages
    from protocol.link import DeviceLink

    secret = _one_heater(tmp_path)
    sent = []
    loop = ControlLoop(tmp_path / "gw.db", C, {"lease_s": 30, "refresh_s": 10, "ack_timeout_s": 0.05,
                                               "retries": 2}, lambda topic, frame: sent.append((topic, frame)))
    board = DeviceLink(C, "vx", secret)
    loop.on_reading("vx", {"flags": 0, "ch": [(-3000, 0, 0, 0)]}, 0, time.time())
    loop.step()
    cmds = [board.open_command(t, f) for t, f in sent]
    assert cmds[-1]["op"] == messages.OP_RELAY and cmds[-1]["value"] == 1 and cmds[-1]["lease"] == 30
    for _ in range(3):                                   # nobody answers
        time.sleep(0.06)
        loop.step()
    cmds = [board.open_command(t, f) for t, f in sent]
    ctrs = [c["ctr"] for c in cmds]
    assert len(cmds) >= 3 and ctrs == sorted(set(ctrs))  # resent, each with a new counter
    assert "vx" in loop.degraded
    loop.on_ack("vx", {"ctr": ctrs[-1], "result": 0, "value": 1, "lease": 30})
    assert "vx" not in loop.degraded and loop.outputs[("vx", messages.OP_RELAY, 0)].acked == 1
    # the board says the counter was used already (a restored database): the loop skips ahead
    out = loop.outputs[("vx", messages.OP_RELAY, 0)]
    loop._send(out, time.monotonic())
    c_before = board.open_command(*sent[-1])["ctr"]
    loop.on_ack("vx", {"ctr": c_before, "result": 43})
    loop.step()
    assert board.open_command(*sent[-1])["ctr"] > c_before + 500
    # a restarted loop never reuses a counter
    loop2 = ControlLoop(tmp_path / "gw.db", C, {}, lambda topic, frame: sent.append((topic, frame)))
    loop2._send(loop2.outputs[("vx", messages.OP_RELAY, 0)], time.monotonic())
    assert board.open_command(*sent[-1])["ctr"] > max(board.open_command(t, f)["ctr"] for t, f in sent[:-1])
    rows = sqlite3.connect(str(tmp_path / "gw.db")).execute("SELECT id, value, reason FROM decisions").fetchall()
    assert rows[0][:2] == ("wh", 1) and "surplus" in rows[0][2]


def test_the_loop_and_the_fleet_sealing_for_one_board_at_once_send_only_good_commands(tmp_path) -> None:
    """The control loop seals relay commands on its thread while the fleet
    seals OP_UPDATE/OP_CONFIRM for the same board on another, with the same
    per-device sealer and its one buffer. Every frame must open on the
    board with its own counter."""
    from harness import run_interleaved
    from peergrid.control.loop import ControlLoop
    from protocol import messages
    from protocol.link import DeviceLink

    secret = _one_heater(tmp_path)
    sent: list[tuple[str, bytes]] = []
    loop = ControlLoop(tmp_path / "gw.db", C, {"lease_s": 30}, lambda topic, frame: sent.append((topic, frame)))
    loop.on_reading("vx", {"flags": 0, "ch": [(-3000, 0, 0, 0)]}, 0, time.time())
    loop.step()
    out = loop.outputs[("vx", messages.OP_RELAY, 0)]
    stop = time.monotonic() + 3
    errors: list[str] = []

    def control() -> None:
        while time.monotonic() < stop:
            loop._send(out, time.monotonic())

    def fleet() -> None:
        try:
            while time.monotonic() < stop:
                loop.send_command("vx", messages.OP_UPDATE, 0, 7, 3600)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    run_interleaved(control, fleet)
    assert not errors, errors
    board = DeviceLink(C, "vx", secret)
    bad, ops, ctrs = 0, set(), []
    for topic, frame in sent:
        try:
            c = board.open_command(topic, frame)
        except Exception:  # noqa: BLE001 - a frame the board would refuse
            bad += 1
            continue
        ops.add(c["op"])
        ctrs.append(c["ctr"])
    assert len(sent) > 500 and ops == {messages.OP_RELAY, messages.OP_UPDATE}
    assert bad == 0, f"{bad} of {len(sent)} commands would be refused by the board"
    assert len(set(ctrs)) == len(ctrs)                    # no counter twice
