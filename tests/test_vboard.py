"""The virtual board (real firmware on the MicroPython unix port, simulated
hardware) against a real mosquitto: readings arrive signed, outages are
buffered on flash and replayed exactly once, a lost PUBACK does not stall the
board, commands are authenticated and leased, a killed board keeps its
buffer."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from harness import free_port
from netfault import MqttFaultProxy
from peergrid.community.registry import Device
from peergrid.ingest.validate import Duplicate, Validator
from peergrid.sim.vboard import VirtualBoard, default_config
from protocol import cbor, cose, gateway_end, messages, topics
from protocol.errors import E_EXPIRED, E_REPLAY, ProtocolError
from protocol.gateway_end import CommandSealer, open_uplink

pytestmark = pytest.mark.broker
COMMUNITY = "oak"
SIM_CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 100},
                {"role": "load", "rating_a": 50}, {"role": "ev", "rating_a": 50}]


class Gateway:
    """The gateway's side for these tests: subscribes to the community's
    uplink topics with its own broker account, verifies every frame with the
    reference code, and seals commands."""

    def __init__(self, broker: Any, secrets: dict[str, bytes]) -> None:
        self.broker = broker
        self.secrets = secrets
        self.frames: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.ctr: dict[str, int] = {}
        self._connect()

    def _connect(self) -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"gw-{os.getpid()}-{time.monotonic_ns()}")
        c.username_pw_set("admin", "admin-pass")
        c.reconnect_delay_set(min_delay=1, max_delay=1)

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe([(t, 1) for t in gateway_end.subscriptions(COMMUNITY)])

        def on_subscribe(client, userdata, mid, rcs, props=None):
            self.subscribed.set()

        def on_message(client, userdata, msg):
            with self.lock:
                self.frames.append((msg.topic, bytes(msg.payload)))

        c.on_connect = on_connect
        c.on_subscribe = on_subscribe
        c.on_message = on_message
        self.subscribed.clear()
        c.connect(self.broker.host, self.broker.port)
        c.loop_start()
        assert self.subscribed.wait(10), "gateway subscription not acknowledged"
        self.client = c

    def reconnect(self) -> None:
        self.close()
        self._connect()

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def messages(self, kind: str | None = None) -> list[tuple[str, dict[str, Any], bytes]]:
        """Every frame received so far, verified: (device, message, frame)."""
        out = []
        with self.lock:
            frames = list(self.frames)
        for topic, frame in frames:
            _, device, k, msg = open_uplink(topic, frame, lambda c, d: self.secrets.get(d))
            if kind is None or k == kind:
                out.append((device, msg, frame))
        return out

    def readings(self, device: str) -> list[dict[str, Any]]:
        return [m for d, m, _ in self.messages(topics.READING) if d == device]

    def wait(self, pred, timeout: float = 20, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def command(self, device: str, op: int, target: int, value: int, lease: int = 60, t: int | None = None,
                secret: bytes | None = None, ctr: int | None = None) -> bytes:
        if ctr is None:
            ctr = self.ctr.get(device, 0) + 1
            self.ctr[device] = ctr
        s = CommandSealer(COMMUNITY, device, secret or self.secrets[device])
        frame = s.seal({"ctr": ctr, "t": t if t is not None else int(time.time()), "lease": lease,
                        "op": op, "target": target, "value": value})
        self.publish_raw(device, frame)
        return frame

    def publish_raw(self, device: str, frame: bytes) -> None:
        info = self.client.publish(topics.topic(COMMUNITY, device, topics.CMD), frame, qos=1)
        info.wait_for_publish(5)


def _board(broker, tmp_path: Path, device: str, speed: float, port: int | None = None,
           **over: Any) -> tuple[VirtualBoard, bytes]:
    secret = os.urandom(32)
    pw = f"pw-{device}-{random.randrange(1 << 30)}"
    broker.add_user(device, pw, gateway_end.device_acl(COMMUNITY, device))
    broker.apply()
    cfg = default_config(COMMUNITY, device, secret, broker.host, port or broker.port, device, pw, **over)
    return VirtualBoard(tmp_path / device, cfg, speed=speed), secret


@pytest.fixture
def board_factory(broker, tmp_path):
    made: list[VirtualBoard] = []

    def make(device: str, speed: float = 20, port: int | None = None, **over: Any):
        vb, secret = _board(broker, tmp_path, device, speed, port, **over)
        made.append(vb)
        return vb, secret

    yield make
    for vb in made:
        vb.close()


def _seqs(readings: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(r["boot"], r["seq"]) for r in readings]


def test_signed_readings_arrive_and_verify(broker, board_factory):
    vb, secret = board_factory("vb-live", speed=20)
    gw = Gateway(broker, {"vb-live": secret})
    try:
        vb.start()
        gw.wait(lambda: len(gw.readings("vb-live")) >= 4, 20, "four readings")
        rs = gw.readings("vb-live")
        seqs = _seqs(rs)
        assert len(set(seqs)) == len(seqs)
        assert all(r["boot"] == 1 for r in rs)
        assert [s for _, s in seqs] == sorted(s for _, s in seqs)
        for r in rs:
            assert len(r["ch"]) == 4
            assert not r["flags"] & messages.F_BUFFERED
            assert 2000 <= r["vrms_dv"] <= 2500 and 4900 <= r["freq_chz"] <= 5100
        # registers never go down from one reading to the next
        for a, b in zip(rs, rs[1:]):
            for ca, cb in zip(a["ch"], b["ch"]):
                assert cb[1] >= ca[1] and cb[2] >= ca[2]
        # the watchdog is fed on progress: once per reading built (no commands here)
        st = vb.state()
        assert st["fed"] == st["stats"]["readings"] >= 4
        # birth message: retained, online, with the config digest and board name
        st = [m for d, m, _ in gw.messages(topics.STATUS) if d == "vb-live"]
        assert st and st[0]["online"] == 1 and st[0]["board"] == "sim" and len(st[0]["cfg"]) == 8
        # a forged frame on the same topic would not verify: flip one byte
        _, _, frame = gw.messages(topics.READING)[0]
        bad = bytearray(frame)
        bad[-1] ^= 1
        with pytest.raises(ProtocolError):
            open_uplink(topics.topic(COMMUNITY, "vb-live", topics.READING), bytes(bad), lambda c, d: secret)
    finally:
        gw.close()


def test_fixed_power_is_measured(broker, board_factory):
    vb, secret = board_factory("vb-power", speed=20)
    gw = Gateway(broker, {"vb-power": secret})
    try:
        vb.start()
        vb.send(op="power", w=[1500, -3000, 800, 0])
        gw.wait(lambda: any(abs(r["ch"][1][0] + 3000) < 60 for r in gw.readings("vb-power")), 20,
                "a reading with the PV power")
        r = [r for r in gw.readings("vb-power") if abs(r["ch"][1][0] + 3000) < 60][-1]
        assert abs(r["ch"][0][0] - 1500) < 30
        assert abs(r["ch"][2][0] - 800) < 20
        assert abs(r["ch"][3][0]) < 10
    finally:
        gw.close()


def test_broker_outage_of_an_hour_is_replayed_exactly_once_in_order(broker, board_factory):
    # 360x: the 10 s reading period passes in 28 ms, a simulated hour in 10 s
    vb, secret = board_factory("vb-outage", speed=360, replay_per_s=200)
    gw = Gateway(broker, {"vb-outage": secret})
    try:
        vb.start()
        gw.wait(lambda: len(gw.readings("vb-outage")) >= 3, 20, "live readings")
        broker.stop()
        st = vb.poll_state(lambda s: not s["connected"], 20)
        t_off = st["board_ms"]
        st = vb.poll_state(lambda s: s["board_ms"] - t_off >= 3600 * 1000, 60, every=0.5)
        assert st["buffered"] >= 340, st
        # restart the broker and the gateway's session while the board is
        # paused, so the gateway is listening before the board comes back
        os.kill(vb.proc.pid, signal.SIGSTOP)
        try:
            broker.start()
            gw.reconnect()
        finally:
            os.kill(vb.proc.pid, signal.SIGCONT)
        st = vb.poll_state(lambda s: s["connected"] and s["buffered"] == 0, 90, every=0.5)
        made = st["stats"]["readings"]
        gw.wait(lambda: len(gw.readings("vb-outage")) >= made - 2, 20, "every reading")
        # what the board has made by now; at 360x it goes on making readings
        # (one every 28 ms), so take its count before the messages are read
        st_made = vb.state()
        time.sleep(1)
        # through the gateway's validator, in arrival order: each reading is
        # accepted exactly once; a repeat (a live reading whose PUBACK was
        # lost when the broker went down is sent again from flash) is an
        # exact copy and is dropped as a duplicate, never a rejection
        v = Validator(COMMUNITY, lambda c, d: Device(c, d, None, secret, "sim", SIM_CHANNELS, None, 1, None))
        accepted, dups = [], 0
        for d, m, f in gw.messages(topics.READING):
            r = v.check(topics.topic(COMMUNITY, d, topics.READING), f, time.time())
            if isinstance(r, Duplicate):
                dups += 1
            else:
                accepted.append(r.msg)
        rs = accepted
        seqs = _seqs(rs)
        assert len(seqs) == len(set(seqs))
        assert dups <= 3, dups
        buffered = [s for r, s in zip(rs, seqs) if r["flags"] & messages.F_BUFFERED]
        assert len(buffered) >= 340
        assert buffered == sorted(buffered), "buffered readings out of order"
        # nothing the board made is missing (the last one or two may still be in flight)
        st = st_made
        assert len(rs) >= st["stats"]["readings"] - 2
        assert st["dropped"] == 0 and st["stats"]["spool_errors"] == 0
        # the buffered readings cover the outage without a hole in their seqs
        # other than those taken by status messages (will, births)
        status_seqs = {(m["boot"], m["seq"]) for d, m, _ in gw.messages(topics.STATUS) if d == "vb-outage"}
        all_seqs = sorted(set(seqs) | status_seqs)
        lo, hi = buffered[0][1], buffered[-1][1]
        inside = [s for b, s in all_seqs if lo <= s <= hi]
        missing = (hi - lo + 1) - len(inside)
        assert missing <= st["uplink"]["failures"] + 2, (missing, st["uplink"])
    finally:
        gw.close()


def test_lost_puback_does_not_stall_the_board(broker, board_factory):
    proxy = MqttFaultProxy(broker.port)
    vb, secret = board_factory("vb-puback", speed=10, port=proxy.port, ack_timeout_s=2)
    gw = Gateway(broker, {"vb-puback": secret})
    try:
        vb.start()
        gw.wait(lambda: len(gw.readings("vb-puback")) >= 2, 20, "live readings")
        proxy.drop_puback = True
        st = vb.poll_state(lambda s: s["stats"]["ack_timeouts"] >= 1 and s["uplink"]["connects"] >= 2, 30)
        assert proxy.pubacks_dropped >= 1
        proxy.drop_puback = False
        n_before = len(gw.readings("vb-puback"))
        made_before = st["stats"]["readings"]
        st = vb.poll_state(lambda s: s["stats"]["readings"] >= made_before + 4 and s["buffered"] == 0
                           and s["connected"], 40)
        gw.wait(lambda: len(gw.readings("vb-puback")) >= n_before + 4, 20, "readings after recovery")
        # every reading the board made arrived at least once; repeats are
        # byte-identical (the gateway drops those quietly)
        rs = gw.messages(topics.READING)
        by_seq: dict[tuple[int, int], set[bytes]] = {}
        for d, m, f in rs:
            by_seq.setdefault((m["boot"], m["seq"]), set()).add(f)
        assert all(len(v) == 1 for v in by_seq.values()), "same (boot, seq) with different bytes"
        assert len(by_seq) >= st["stats"]["readings"] - 2
    finally:
        gw.close()
        proxy.close()


def test_dead_link_is_detected_by_keepalive(broker, board_factory):
    proxy = MqttFaultProxy(broker.port)
    vb, secret = board_factory("vb-silent", speed=5, port=proxy.port, keepalive_s=2, ack_timeout_s=30)
    try:
        vb.start()
        vb.poll_state(lambda s: s["connected"], 20)
        proxy.silent = True
        t0 = time.monotonic()
        st = vb.poll_state(lambda s: s["uplink"]["drops"] >= 1, 20)
        assert time.monotonic() - t0 < 8
        assert st["stats"]["readings"] >= 1
        proxy.silent = False
        vb.poll_state(lambda s: s["connected"] and s["uplink"]["connects"] >= 2, 20)
    finally:
        proxy.close()


def test_commands_forged_replayed_expired_change_nothing(broker, board_factory):
    vb, secret = board_factory("vb-cmd", speed=5)
    gw = Gateway(broker, {"vb-cmd": secret})
    try:
        vb.start()
        st = vb.poll_state(lambda s: s["listening"] and s["synced"], 20)
        assert st["relays"] == [0, 1]          # fail-safe states from the config
        unix = st["unix"]

        def acks():
            return [m for d, m, _ in gw.messages(topics.ACK) if d == "vb-cmd"]

        good = gw.command("vb-cmd", messages.OP_RELAY, 0, 1, lease=600, t=unix)
        vb.wait_for(lambda e: e.get("ev") == "relay" and e["v"] == 1, 10)
        gw.wait(lambda: len(acks()) == 1, 10, "ack")
        a = acks()[0]
        assert a["result"] == 0 and a["value"] == 1 and 590 <= a["lease"] <= 600

        # forged: sealed with another secret; never acknowledged, nothing moves
        gw.command("vb-cmd", messages.OP_RELAY, 0, 0, lease=600, t=unix, secret=os.urandom(32))
        # malformed: garbage on the command topic
        gw.publish_raw("vb-cmd", b"\xd1\x84\x00garbage")
        # replayed: the good frame again
        gw.publish_raw("vb-cmd", good)
        # expired: issued long ago, lease over
        gw.command("vb-cmd", messages.OP_RELAY, 0, 0, lease=60, t=unix - 3600)
        # a relay the board does not have
        gw.command("vb-cmd", messages.OP_RELAY, 7, 1, lease=60, t=unix)
        # authentic but malformed: an operation that does not exist
        down = cose.derive_keys(secret)[1]
        sealer = cose.Sealer(down, b"vb-cmd", cose.ALG_HMAC256)
        odd = bytes(sealer.seal(cbor.dumps({1: 90, 2: unix, 3: 60, 4: 3, 5: 0, 6: 0}, 448),
                                topics.topic(COMMUNITY, "vb-cmd", topics.CMD).encode()))
        gw.publish_raw("vb-cmd", odd)
        gw.wait(lambda: len(acks()) == 5, 10, "acks for replay, expiry, target and schema")
        results = sorted(a["result"] for a in acks()[1:])
        assert results == sorted([E_REPLAY, E_EXPIRED, 46, 45]), results
        assert [a for a in acks() if a["result"] == 45][0]["ctr"] == 90
        st = vb.state()
        assert st["relays"] == [1, 1]
        assert st["stats"]["cmd_ignored"] == 2      # forged and malformed: counted, not answered
        assert st["rejects"].get("24") == 1          # E_TAG
    finally:
        gw.close()


def test_lease_runs_out_to_failsafe(broker, board_factory):
    vb, secret = board_factory("vb-lease", speed=20)
    gw = Gateway(broker, {"vb-lease": secret})
    try:
        vb.start()
        st = vb.poll_state(lambda s: s["listening"] and s["synced"], 20)
        gw.command("vb-lease", messages.OP_RELAY, 0, 1, lease=60, t=st["unix"])
        gw.command("vb-lease", messages.OP_RELAY, 1, 0, lease=120, t=st["unix"])
        vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 1 and e["v"] == 0, 10)
        t_on = vb.state()["board_ms"]
        ev = vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 0, 20)
        assert ev["why"] == "lease ended"
        st = vb.state()
        assert 55_000 <= st["board_ms"] - t_on <= 75_000
        ev = vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 1 and e["v"] == 1, 20)
        assert ev["why"] == "lease ended"
    finally:
        gw.close()


def test_gateway_silence_returns_outputs_to_failsafe(broker, board_factory):
    vb, secret = board_factory("vb-quiet", speed=20, cmd_timeout_s=120)
    gw = Gateway(broker, {"vb-quiet": secret})
    try:
        vb.start()
        st = vb.poll_state(lambda s: s["listening"] and s["synced"], 20)
        gw.command("vb-quiet", messages.OP_RELAY, 0, 1, lease=86400, t=st["unix"])
        vb.wait_for(lambda e: e.get("ev") == "relay" and e["v"] == 1, 10)
        ev = vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 0, 20)
        assert ev["why"] == "gateway quiet"
    finally:
        gw.close()


def test_killed_during_buffer_writes_keeps_the_buffer(broker, board_factory):
    # offline (nothing listens on the port), fast clock: the board writes to
    # the spool all the time; kill it at random moments, then let it deliver
    dead_port = free_port()              # a port with nobody behind it
    vb, secret = board_factory("vb-kill", speed=2000, port=dead_port, backoff_s=[1, 1])
    rng = random.Random(7)
    total = 0
    for _ in range(6):
        vb.start()
        time.sleep(rng.uniform(0.3, 1.2))
        vb.kill()
    st_cfg = dict(vb.config)
    st_cfg["broker"] = dict(st_cfg["broker"], port=broker.port)
    vb.write_config(st_cfg)
    vb.speed = 5
    gw = Gateway(broker, {"vb-kill": secret})
    try:
        ready = vb.start()
        total = ready["buffered"]
        assert total > 50
        st = vb.poll_state(lambda s: s["connected"] and s["buffered"] == 0, 60, every=0.5)
        # everything the killed boots (1-6) stored arrives: buffered readings,
        # and any live one whose PUBACK was cut off by a kill
        gw.wait(lambda: len([m for m in gw.readings("vb-kill") if m["boot"] < 7]) >= total,
                20, "every stored reading")
        rs = [m for m in gw.readings("vb-kill") if m["boot"] < 7]
        assert all(m["flags"] & messages.F_BUFFERED for m in rs)    # nobody was listening then
        seqs = _seqs(rs)
        assert len(seqs) == len(set(seqs))
        assert seqs == sorted(seqs), "replay out of (boot, seq) order"
        assert {b for b, _ in seqs} == set(range(1, 7))
        assert st["boot"] == 7
    finally:
        gw.close()


def test_inverter_unplugged_is_flagged_and_found_again(broker, board_factory):
    vb, secret = board_factory("vb-inv", speed=20, inverter={"unit": 1}, battery={"unit": 1, "max_w": 5000})
    gw = Gateway(broker, {"vb-inv": secret})
    try:
        vb.start()
        vb.sim.device.set_inverter(2890, 6012345, 4)
        vb.sim.device.set_battery(734)
        gw.wait(lambda: any(r.get("inv") == [4, 2890, 6012345] for r in gw.readings("vb-inv")), 20,
                "a reading with the inverter")
        r = [r for r in gw.readings("vb-inv") if r.get("inv")][-1]
        assert r["bat"] == [6, 0, 734]
        assert not r["flags"] & (messages.F_INV_MISSING | messages.F_BAT_MISSING)
        vb.sim.unplug()
        n0 = len(gw.readings("vb-inv"))
        gw.wait(lambda: any(r["flags"] & messages.F_INV_MISSING and "inv" not in r
                            for r in gw.readings("vb-inv")[n0:]), 30, "a reading flagged inverter missing")
        after = gw.readings("vb-inv")[n0:]
        missing = [r for r in after if r["flags"] & messages.F_INV_MISSING]
        assert all(r["flags"] & messages.F_BAT_MISSING and "bat" not in r for r in missing)
        # marked missing within three readings of the device going silent
        # (the first may have been measured before the cable was pulled)
        first = min(i for i, r in enumerate(after) if r["flags"] & messages.F_INV_MISSING)
        assert first < 3, [r["flags"] for r in after]
        assert all(r["flags"] & messages.F_INV_MISSING for r in after[first:]), [r["flags"] for r in after]
        st = vb.state()
        assert st["modbus"]["timeouts"] >= 1 and st["stats"]["readings"] > 0
        vb.sim.device.set_inverter(3000, 6012400, 4)
        vb.sim.plug()
        n1 = len(gw.readings("vb-inv"))
        gw.wait(lambda: any(r.get("inv") == [4, 3000, 6012400] for r in gw.readings("vb-inv")[n1:]), 60,
                "the inverter found again")
    finally:
        gw.close()


def test_battery_command_sets_the_device_with_its_revert_timer(broker, board_factory):
    vb, secret = board_factory("vb-bat", speed=10, inverter={"unit": 1}, battery={"unit": 1, "max_w": 5000})
    gw = Gateway(broker, {"vb-bat": secret})
    try:
        vb.start()
        st = vb.poll_state(lambda s: s["listening"] and s["synced"] and s["bat_ok"], 30)
        gw.command("vb-bat", messages.OP_BATTERY, 0, -2000, lease=120, t=st["unix"])
        ev = vb.wait_for(lambda e: e.get("ev") == "battery", 10)
        assert ev["v"] == -2000
        cmd = vb.sim.device.battery_command()
        assert cmd["w"] == -2000 and cmd["revert_s"] == 120
        gw.wait(lambda: any(r.get("bat", [0, 0])[1] == -2000 for r in gw.readings("vb-bat")), 20,
                "a reading showing the discharge")
        # beyond the battery's rating: refused, nothing changes
        gw.command("vb-bat", messages.OP_BATTERY, 0, 9000, lease=60, t=st["unix"])
        gw.wait(lambda: len([m for d, m, _ in gw.messages(topics.ACK) if d == "vb-bat"]) == 2, 10, "acks")
        acks = [m for d, m, _ in gw.messages(topics.ACK) if d == "vb-bat"]
        assert acks[0]["result"] == 0 and acks[1]["result"] == 45 and acks[1]["value"] == -2000
        # the lease ends after 120 s of board time (12 s here): back to idle
        ev = vb.wait_for(lambda e: e.get("ev") == "battery" and e["v"] == 0, 20)
        assert ev["why"] == "lease ended"
        assert vb.sim.device.battery_command()["w"] == 0
    finally:
        gw.close()


def test_hours_within_an_esp32_heap(broker, board_factory, mpy_dir):
    # the firmware as it goes onto a board (.mpy), 110 KB of heap for its
    # data on top of its code, 8 simulated hours at 1200x with a 2-hour
    # outage of the real broker (the 32-bit day with code and data in one
    # heap is tests/test_board32.py). (At 2400x a period is 4 ms of wall
    # time: with the other worker busy, the board missed 351 of 2880.)
    vb, secret = board_factory("vb-day", speed=1200, replay_per_s=500, backoff_s=[1, 1])
    vb.mpy_dir = mpy_dir
    vb.data_heap = 110 * 1024
    vb.start(timeout=60)
    vb.poll_state(lambda s: s["board_ms"] >= 3 * 3600_000, 60, every=0.5)
    broker.stop()
    try:
        vb.poll_state(lambda s: s["board_ms"] >= 5 * 3600_000, 60, every=0.5)
    finally:
        broker.start()
    st = vb.poll_state(lambda s: s["board_ms"] >= 8 * 3600_000, 90, every=0.5)
    st = vb.poll_state(lambda s: s["connected"] and s["buffered"] == 0, 60, every=0.5)
    assert not any("MemoryError" in line for line in vb.stderr), vb.tail()
    assert vb.proc.poll() is None
    assert st["stats"]["readings"] >= 2700, st["stats"]
    assert st["stats"]["replayed"] >= 600
    assert st["min_free"] > 20_000
    assert st["dropped"] == 0 and st["stats"]["spool_errors"] == 0


# -- the board clock across the tick wrap ----------------------------------
# On a 32-bit MicroPython (the ESP32) ticks_ms() wraps at 2^30 ms (12.4 days)
# and ticks_diff() changes sign against values 2^29 ms (6.2 days) away. The
# virtual board's clocks have that period too and start where the test says
# (sim ticks0 / io0), so both edges come within seconds.

_WRAP = 1 << 30
_HALF = 1 << 29


def _tdiff(a: int, b: int) -> int:
    """a - b for two board tick values (MicroPython's ticks_diff, period 2^30)."""
    d = (a - b) & (_WRAP - 1)
    return d - _WRAP if d >= _HALF else d


@pytest.mark.parametrize("edge", [_HALF, _WRAP], ids=["2^29", "2^30"])
def test_board_keeps_time_across_the_tick_wrap(broker, board_factory, edge):
    dev = "vb-wrap%d" % (edge.bit_length() - 1)
    at = edge & (_WRAP - 1)             # the edge as a tick value (2^30 is 0)
    speed = 20                          # a 10 s period is 0.5 s of wall time
    sim = dict(default_config(COMMUNITY, dev, b"", "", 0, None, None)["sim"],
               ticks0=(edge - 60_000) & (_WRAP - 1),     # board clock: edge 3 s (wall) after the start
               io0=(edge - 9_000) & (_WRAP - 1))         # I/O clock: edge 9 s after, in the outage
    vb, secret = board_factory(dev, speed=speed, status_s=30, backoff_s=[1, 2], sim=sim)
    gw = Gateway(broker, {dev: secret})
    try:
        vb.start()
        st = vb.poll_state(lambda s: s["listening"] and s["synced"], 20)
        assert _tdiff(at, st["board_ms"]) > 15_000, "board too slow to connect: the lease would not span the edge"

        # a 60 s lease started before the edge lasts 60 s of board time
        gw.command(dev, messages.OP_RELAY, 0, 1, lease=60, t=st["unix"])
        on = vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 1, 10)
        off = vb.wait_for(lambda e: e.get("ev") == "relay" and e["i"] == 0 and e["v"] == 0, 20)
        assert off["why"] == "lease ended"
        assert _tdiff(at, on["ms"]) > 0 and _tdiff(off["ms"], at) > 0, (on, off)   # it spans the edge
        assert 59_500 <= _tdiff(off["ms"], on["ms"]) <= 63_000, (on, off)

        # a broker outage while the I/O clock passes its edge: the back-off
        # keeps its schedule (1 s, then 2 s), neither a storm nor silence
        st = vb.state()
        assert st["connected"] and _tdiff(at, st["io_ms"]) > 1000, "the outage must begin before the I/O edge"
        broker.stop()
        try:
            st = vb.poll_state(lambda s: not s["connected"], 20)
            f0 = st["uplink"]["failures"]
            t0 = time.monotonic()
            waits = []
            while time.monotonic() - t0 < 6 or _tdiff(st["io_ms"], at) < 1500:
                time.sleep(0.1)
                st = vb.state()
                waits.append(st["next_try_in"])
            span = time.monotonic() - t0
            fails = st["uplink"]["failures"] - f0
            assert _tdiff(st["io_ms"], at) > 0          # the I/O clock passed the edge meanwhile
            assert all(-500 <= w <= 2000 for w in waits), waits
            assert 2 <= fails <= span / 2 + 2, (fails, span)
            # restart right after a failed attempt: the next one is 2 s away,
            # time for the gateway to subscribe again first
            n = st["uplink"]["failures"]
            vb.poll_state(lambda s: s["uplink"]["failures"] > n, 5, every=0.02)
        finally:
            broker.start()
        t_up = time.monotonic()
        gw.reconnect()
        st = vb.poll_state(lambda s: s["connected"], 10, every=0.05)
        assert time.monotonic() - t_up < 3.5
        st = vb.poll_state(lambda s: s["connected"] and s["buffered"] == 0 and s["inflight"] is None, 20)

        # readings: exactly one per period through both edges, none missed,
        # none doubled, the outage's from flash
        assert st["stats"]["missed_periods"] == 0, st["stats"]
        made = st["stats"]["readings"]
        assert abs(made - st["elapsed_ms"] // 10_000) <= 1, (made, st["elapsed_ms"])
        gw.wait(lambda: len({m["seq"] for m in gw.readings(dev)}) >= made - 1, 10, "every reading")
        rs = sorted({m["seq"]: m for m in gw.readings(dev)}.values(), key=lambda m: m["seq"])
        assert any(m["flags"] & messages.F_BUFFERED for m in rs)
        ts = [m["t"] for m in rs if not m["flags"] & messages.F_CLOCK_UNSYNCED]
        gaps = [b - a for a, b in zip(ts, ts[1:])]
        assert len(gaps) >= 20 and all(9 <= g <= 11 for g in gaps), gaps

        # status: valid (open_uplink checks the schema), uptime never negative
        # and never going back, close to the board time elapsed
        assert abs(st["uptime_s"] - st["elapsed_ms"] // 1000) <= 2, st

        def statuses():
            return sorted({m["seq"]: m for d, m, _ in gw.messages(topics.STATUS) if d == dev}.values(),
                          key=lambda m: m["seq"])

        ups = [m["uptime"] for m in statuses()]
        assert len(ups) >= 4 and ups == sorted(ups) and ups[0] >= 0 and ups[-1] > ups[0], ups

        # more than 2^29 ms of uptime (one tick difference since boot would be
        # negative by now): the board clock jumps two days at a time
        for _ in range(4):
            vb.send(op="advance", s=2 * 86400)
            vb.state()
        gw.wait(lambda: statuses()[-1]["uptime"] >= 8 * 86400, 10, "a status after 8 days")
        st = vb.state()
        assert st["connected"] and vb.proc.poll() is None
        assert 8 * 86400 <= st["uptime_s"] and abs(st["uptime_s"] - st["elapsed_ms"] // 1000) <= 2, st
        ups = [m["uptime"] for m in statuses()]
        assert ups == sorted(ups) and ups[-1] <= st["uptime_s"], ups
    finally:
        gw.close()
