"""The board's side of a firmware update (docs/OTA.md 3), deterministic: the
virtual board (installed from a signed release, started by its loader) on
a real mosquitto, with a scripted gateway that serves the release piece by
piece and can damage a piece in transit. The real gateway's side is in
tests/test_ota.py."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from harness import ROOT, broken_firmware_tree
from peergrid.sim.vboard import VirtualBoard, default_config
from protocol import cbor, gateway_end, messages, topics
from protocol.fw import encode_chunk, encode_chunk_error
from protocol.errors import E_TARGET
from protocol.gateway_end import CommandSealer, open_uplink

sys.path.insert(0, str(ROOT / "tools"))
import release as rtool  # noqa: E402

pytestmark = pytest.mark.broker
C = "oak"


@pytest.fixture(scope="module")
def rels(tmp_path_factory) -> dict[str, Any]:
    """Release key A (trusted by every release) and releases 1 and 2 of
    the sim board, plus a copy of the firmware whose release-2 cannot publish
    readings (its trial must fail)."""
    d = tmp_path_factory.mktemp("rel")
    rtool.keygen(d / "a.key")
    out: dict[str, Any] = {"dir": d, "key": d / "a.key"}
    for seq in (1, 2):
        out[seq] = rtool.build("sim", seq=seq, key=d / "a.key", trial_s=30, out=d / f"r{seq}")[0]
    return out


def build_broken(rels: dict[str, Any], seq: int) -> Path:
    """A release whose firmware measures but never publishes a reading."""
    src = rels["dir"] / f"src{seq}"
    if not src.exists():
        broken_firmware_tree(src)
    return rtool.build("sim", seq=seq, key=rels["key"], trial_s=30, src=src, out=rels["dir"] / f"broken{seq}")[0]


class Server:
    """The gateway's update side, scripted: serves fwget from release
    folders, seals commands, keeps every status and reading it sees."""

    def __init__(self, broker: Any, secret: bytes, device: str, releases: dict[int, Path]) -> None:
        self.secret = secret
        self.device = device
        self.releases = releases
        self.damage: set[tuple[int, int, int]] = set()    # (rel, file, off): once with a wrong check
        self.asked: list[tuple[int, int, int, int]] = []
        self.status: list[dict[str, Any]] = []
        self.readings: list[dict[str, Any]] = []
        self.acks: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ctr = 0
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"gw-ota-{os.getpid()}-{time.monotonic_ns()}")
        self.c.username_pw_set("admin", "admin-pass")
        up = threading.Event()
        self.c.on_connect = lambda *a: self.c.subscribe(f"pg/{C}/{device}/#", qos=1)
        self.c.on_subscribe = lambda *a: up.set()
        self.c.on_message = self._msg
        self.c.connect(broker.host, broker.port)
        self.c.loop_start()
        assert up.wait(10)

    def files(self, rel: int) -> list[Path]:
        r = self.releases[rel]
        m = rtool.read_release(r)["manifest"]
        return [r / "manifest.cose"] + [r / e[0] for e in m["files"]]

    def _msg(self, client: Any, userdata: Any, msg: Any) -> None:
        kind = msg.topic.rsplit("/", 1)[1]
        if kind in (topics.CMD, topics.FW):
            return
        _, _, kind, m = open_uplink(msg.topic, bytes(msg.payload), lambda c, d: self.secret)
        if kind == topics.STATUS:
            self.status.append(m)
        elif kind == topics.READING:
            self.readings.append(m)
        elif kind == topics.ACK:
            self.acks.put(m)
        elif kind == topics.FWGET:
            self._serve(m)

    def _serve(self, m: dict[str, Any]) -> None:
        rel, fi, off, n = m["rel"], m["file"], m["off"], m["len"]
        self.asked.append((rel, fi, off, n))
        w = cbor.Writer(2048)
        files = self.files(rel) if rel in self.releases else []
        if fi >= len(files):
            encode_chunk_error(w, rel, fi, off, E_TARGET)
        else:
            data = files[fi].read_bytes()
            piece = data[off:off + n]
            check = hashlib.sha256(piece).digest()[:8]
            if (rel, fi, off) in self.damage:
                self.damage.discard((rel, fi, off))
                check = bytes(8)
            encode_chunk(w, rel, fi, off, len(data), piece, check)
        self.c.publish(topics.topic(C, self.device, topics.FW), w.getvalue(), qos=0)

    def command(self, op: int, value: int, lease: int = 600) -> dict[str, Any]:
        self.ctr += 1
        frame = CommandSealer(C, self.device, self.secret).seal(
            {"ctr": self.ctr, "t": int(time.time()), "lease": lease, "op": op, "target": 0, "value": value})
        self.c.publish(topics.topic(C, self.device, topics.CMD), frame, qos=1)
        while True:
            a = self.acks.get(timeout=15)
            if a["ctr"] == self.ctr:
                return a

    def wait_status(self, pred: Any, timeout: float = 60) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for s in list(self.status):
                if pred(s):
                    return s
            time.sleep(0.1)
        raise AssertionError(f"no such status; last: {self.status[-3:]}")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def setup(broker, tmp_path, rels):
    made: list[Any] = []

    def make(device: str, installed: int = 1, speed: float = 4, **over: Any) -> tuple[VirtualBoard, Server]:
        secret = os.urandom(32)
        pw = f"pw-{random.randrange(1 << 30)}"
        broker.add_user(device, pw, gateway_end.device_acl(C, device))
        broker.apply()
        cfg = default_config(C, device, secret, broker.host, broker.port, device, pw, **over)
        vb = VirtualBoard(tmp_path / device, cfg, speed=speed)
        vb.install(rels[installed])
        srv = Server(broker, secret, device, {k: v for k, v in rels.items() if isinstance(k, int)})
        made.append(vb)
        made.append(srv)
        return vb, srv

    yield make
    for x in made:
        x.close()


def _regs(vb: VirtualBoard) -> list[list[int]]:
    return vb.state()["regs"]


def test_update_is_fetched_tried_and_confirmed_and_survives_a_restart(setup, rels) -> None:
    vb, srv = setup("ota1")
    st = vb.start()
    assert st["ev"] == "ready"
    first = srv.wait_status(lambda s: s.get("rel") == 1)
    assert first["rel_dig"] == bytes.fromhex(rtool.read_release(rels[1])["digest"])[:8]
    regs0 = _regs(vb)
    # a piece damaged in transit is asked for again, and only that piece
    srv.damage.add((2, 2, 0))
    a = srv.command(messages.OP_UPDATE, 2)
    assert a["result"] == 0 and a["value"] == 2
    trial = srv.wait_status(lambda s: s.get("ota") == messages.OTA_TRIAL and s.get("rel") == 2, 90)
    assert trial["rel_dig"] == bytes.fromhex(rtool.read_release(rels[2])["digest"])[:8]
    assert sum(1 for q in srv.asked if q[:3] == (2, 2, 0)) == 2
    assert json.loads((vb.dir / "ota.json").read_text())["trial"] == "a"
    # the gateway confirms once a reading of the trial's boot came through
    boot = trial["boot"]
    end = time.monotonic() + 30
    while not any(r["boot"] == boot for r in srv.readings) and time.monotonic() < end:
        time.sleep(0.2)
    assert any(r["boot"] == boot for r in srv.readings)
    a = srv.command(messages.OP_CONFIRM, 2)
    assert a["result"] == 0
    srv.wait_status(lambda s: s.get("ota") == messages.OTA_CONFIRMED and s.get("rel") == 2)
    state = json.loads((vb.dir / "ota.json").read_text())
    assert state["active"] == "a" and state["trial"] is None and state["prev"] == ""
    regs1 = _regs(vb)
    for r0, r1 in zip(regs0, regs1):
        assert r1[0] >= r0[0] and r1[1] >= r0[1]          # registers kept across the switch
    # the same release again is refused; it keeps running after a restart
    assert srv.command(messages.OP_UPDATE, 2)["result"] != 0
    vb.stop()
    vb.start()
    srv.wait_status(lambda s: s.get("rel") == 2 and s["boot"] > boot)
    assert vb.state()["rel"] == 2


def test_a_trial_that_cannot_publish_rolls_back_by_itself(setup, rels) -> None:
    vb, srv = setup("ota2")
    srv.releases[3] = build_broken(rels, 3)
    vb.start()
    srv.wait_status(lambda s: s.get("rel") == 1)
    assert srv.command(messages.OP_UPDATE, 3)["result"] == 0
    # the broken release starts on trial, never publishes a reading, is
    # never confirmed, and gives itself up after trial_s (30 s board time)
    back = srv.wait_status(lambda s: s.get("ota") == messages.OTA_ROLLED_BACK and s.get("rel") == 1, 120)
    assert back["rel"] == 1 and back["ota_rel"] == 3 and back["ota_why"] == "no confirm"
    assert json.loads((vb.dir / "ota.json").read_text())["active"] == ""
    assert vb.state()["rel"] == 1


def test_another_boards_release_and_a_gateway_without_it_are_refused(setup, rels) -> None:
    vb, srv = setup("ota3")
    # a release for the devkitc-3ct, signed with the trusted key: the board's
    # own check refuses it (a gateway keyed by board type would not even serve it)
    srv.releases[5] = rtool.build("devkitc-3ct", seq=5, key=rels["key"], heap=80000, out=rels["dir"] / "dev5")[0]
    vb.start()
    srv.wait_status(lambda s: s.get("rel") == 1)
    assert srv.command(messages.OP_UPDATE, 5)["result"] == 0
    st = srv.wait_status(lambda s: s.get("ota") == messages.OTA_REFUSED and s.get("ota_rel") == 5)
    assert st["ota_why"] == "wrong board" and st["rel"] == 1
    # a release the gateway does not have: refused on its error, nothing switched
    assert srv.command(messages.OP_UPDATE, 9)["result"] == 0
    st = srv.wait_status(lambda s: s.get("ota") == messages.OTA_REFUSED and s.get("ota_rel") == 9)
    assert st["ota_why"] == "gateway: error %d" % E_TARGET
    assert json.loads((vb.dir / "ota.json").read_text()).get("trial") is None
    assert vb.state()["rel"] == 1
