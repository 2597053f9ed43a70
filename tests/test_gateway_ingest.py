"""The gateway service against a real mosquitto whose password and ACL files
come from the gateway's registry: two boards with their own credentials,
every kind of bad frame rejected with its reason and counted, a gateway
killed with SIGKILL that loses no acknowledged reading and accepts no
replay afterwards."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from harness import free_port, wait_port, wait_until
from peergrid.community import registry as reg
from protocol import cbor, cose, topics
from protocol.link import DeviceLink

pytestmark = pytest.mark.broker
C = "elm"
CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.http_port = free_port()
        self.gw_password = "gw-secret-pass"
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {self.http_port}\nstatus_every_s = 1\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\nuser = "gateway"\n'
            f'password = "{self.gw_password}"\npasswd_file = "passwd"\nacl_file = "acl"\npid_file = "mosquitto.pid"\n'
            f'[ingest]\nmax_skew_s = 300\nmax_future_s = 3600\nbatch = 200\nbatch_ms = 20\n')
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        self.creds: dict[str, tuple[bytes, str]] = {}
        for d in ("house-a", "house-b"):
            m = r.add_member(C, d)
            self.creds[d] = r.add_device(C, d, "sim", CHANNELS, m)
        r.db.close()
        out = self.cli("broker-files")
        assert "2 device accounts" in out
        (tmp / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp / 'passwd'}\n"
            f"acl_file {tmp / 'acl'}\npid_file {tmp / 'mosquitto.pid'}\npersistence false\n"
            "max_queued_messages 1000000\nmax_inflight_messages 1000\n"
            "log_dest stderr\nlog_type error\n" + ("user root\n" if os.geteuid() == 0 else ""))
        self.broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        self.gw: subprocess.Popen[str] | None = None

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start_gateway(self) -> None:
        self.gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                   stdout=subprocess.DEVNULL, stderr=open(self.tmp / "gw.log", "a"), text=True)
        wait_port(self.http_port, what="the gateway's HTTP")
        deadline = time.monotonic() + 10
        while "connected to" not in (self.tmp / "gw.log").read_text():
            assert time.monotonic() < deadline, (self.tmp / "gw.log").read_text()
            time.sleep(0.05)
        time.sleep(0.3)          # subscription acknowledged

    def kill_gateway(self) -> None:
        assert self.gw is not None
        self.gw.send_signal(signal.SIGKILL)
        self.gw.wait()

    def stop(self) -> None:
        if self.gw and self.gw.poll() is None:
            self.gw.send_signal(signal.SIGTERM)
            try:
                self.gw.wait(15)
            except subprocess.TimeoutExpired:
                self.gw.kill()
        self.broker.terminate()
        self.broker.wait(5)

    def board(self, device: str, as_user: str | None = None) -> "Board":
        user = as_user or device
        return Board(self, device, self.creds[device][0], reg.broker_user(C, user), self.creds[user][1])

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(str(self.tmp / "gw.db"), timeout=30)

    def stored(self, device: str) -> list[tuple[int, int]]:
        with self.db() as db:
            return list(db.execute("SELECT boot, seq FROM readings WHERE device=? ORDER BY boot, seq", (device,)))

    def rejects(self) -> dict[str, int]:
        with self.db() as db:
            return {w: n for w, n in db.execute("SELECT what, SUM(n) FROM counters GROUP BY what")}

    def wait(self, pred, timeout: float = 15, what: str = "") -> None:
        wait_until(pred, timeout, what, self.tmp / "gw.log")


class Board:
    """A board's network side in CPython: its own broker account, frames
    sealed with protocol/ exactly as the firmware seals them."""

    def __init__(self, rig: Rig, device: str, secret: bytes, user: str, password: str) -> None:
        self.link = DeviceLink(C, device, secret)
        self.device = device
        self.seq = 0
        self.boot = 1
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{time.monotonic_ns()}")
        self.c.username_pw_set(user, password)
        up = threading.Event()
        self.c.on_connect = lambda *a: up.set()
        self.c.connect("127.0.0.1", rig.port)
        self.c.loop_start()
        assert up.wait(10), "board could not connect"

    def reading(self, w: int = 500, imp: int = 1000, flags: int = 0, t: int | None = None,
                seq: int | None = None, boot: int | None = None) -> tuple[str, bytes]:
        if seq is None:
            seq = self.seq
            self.seq += 1
        f = self.link.reading(boot or self.boot, seq, t if t is not None else int(time.time()), flags,
                              2300, 5000, [w, imp, 10, 2100, -300, 0, 40, 1300], 2)
        return self.link.t_reading, bytes(f)

    def send(self, topic: str, frame: bytes) -> None:
        self.c.publish(topic, frame, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.stop()


def _reseal(secret: bytes, device: str, payload: bytes, kind: str = topics.READING) -> bytes:
    up = cose.derive_keys(secret)[0]
    alg = 4 if kind == topics.READING else 5
    s = cose.Sealer(up, device.encode(), alg)
    return bytes(s.seal(payload, topics.topic(C, device, kind).encode()))


def test_two_boards_acl_and_every_rejection(rig):
    rig.start_gateway()
    a = rig.board("house-a")
    b = rig.board("house-b")
    try:
        for _ in range(3):
            a.send(*a.reading())
            b.send(*b.reading())
        rig.wait(lambda: len(rig.stored("house-a")) == 3 and len(rig.stored("house-b")) == 3, what="six readings")

        # board A publishing on B's topic: the broker refuses (nothing arrives)
        topic_b = topics.topic(C, "house-b", topics.READING)
        _, fa = a.reading()
        a.send(topic_b, fa)
        # a frame that claims to be B but is MACed with A's key, sent on B's
        # own account: the gateway refuses it (E_TAG)
        msg = b.link.reading(1, 50, int(time.time()), 0, 2300, 5000, [1, 1000, 10, 5, 0, 0, 0, 0], 2)
        payload = cose.open_frame(bytes(msg), topic_b.encode(), b"house-b",
                                  lambda k, al: cose.derive_keys(rig.creds["house-b"][0])[0], (4,))
        b.send(topic_b, _reseal(rig.creds["house-a"][0], "house-b", payload))
        # forged tag, truncated, oversized, deeply nested, trailing garbage
        t, good = a.reading()
        forged = bytearray(good)
        forged[-1] ^= 0x55
        a.send(t, bytes(forged))
        a.send(t, good[:-5])
        a.send(t, good + bytes(600))
        a.send(t, b"\xd1\x84" + b"\x81" * 40 + b"\x00")
        # the good frame, then an exact redelivery of it: dropped quietly
        a.send(t, good)
        a.send(t, good)
        # future-dated by two days with a synced clock
        a.send(*a.reading(t=int(time.time()) + 2 * 86400))
        # replays: the same (boot, seq) with other bytes, and a boot older
        # than the four the gateway tracks
        a.send(*a.reading(seq=0, w=777))
        for boot in (2, 3, 4, 5):
            a.send(*a.reading(boot=boot, seq=0, imp=2000))
        a.send(*a.reading(boot=1, seq=99, imp=3000))
        # power far beyond a 100 A CT
        a.send(*a.reading(boot=5, seq=1, w=60000, imp=4000))
        # registers going backwards within a boot
        a.send(*a.reading(boot=5, seq=5, imp=10))

        want = {"reject:tag": 2, "reject:truncated": 1, "reject:too_big": 1, "reject:depth": 1,
                "reject:clock": 1, "reject:replay": 2, "reject:plausibility": 2}
        rig.wait(lambda: all(rig.rejects().get(k, 0) >= n for k, n in want.items()), 20,
                 f"rejections {want}")
        got = rig.rejects()
        assert {k: got.get(k, 0) for k in want} == want, got
        # only the good frames were stored: three each, the boot 2-5 ones and the good one
        assert len(rig.stored("house-b")) == 3
        sa = rig.stored("house-a")
        assert len(sa) == len(set(sa)) == 3 + 4 + 1
        assert (1, 0) in sa and (1, 99) not in sa
        with rig.db() as db:
            q = list(db.execute("SELECT code, device, length FROM quarantine"))
            assert len(q) == sum(want.values())
            assert (1, "house-a", len(good) + 600) in q
            # the oversized frame is kept as its first 512 bytes and its SHA-256
            big = good + bytes(600)
            assert db.execute("SELECT frame, digest FROM quarantine WHERE code=1").fetchone() == (
                big[:512], hashlib.sha256(big).digest())
            # nothing from A's attempt on B's topic reached the gateway
            assert db.execute("SELECT COUNT(*) FROM frames WHERE device='house-b' AND seq=50").fetchone()[0] == 0
        # metrics and the status command say the same
        text = urllib.request.urlopen(f"http://127.0.0.1:{rig.http_port}/metrics", timeout=5).read().decode()
        assert 'peergrid_rejected_total{reason="tag",device="house-b"} 1' in text
        assert 'peergrid_messages_total{what="duplicates"} 1' in text
        out = rig.cli("status")
        assert "2 devices" in out and "reject:replay" in out
    finally:
        a.close()
        b.close()


def test_sigkill_loses_nothing_acknowledged_and_accepts_no_replay(rig):
    rig.start_gateway()
    a = rig.board("house-a")
    sent: list[tuple[str, bytes]] = []
    stop = threading.Event()

    def pump() -> None:
        imp = 1000
        while not stop.is_set() and len(sent) < 600:
            imp += 1
            m = a.reading(imp=imp)
            sent.append(m)
            a.c.publish(*m, qos=1)
            time.sleep(0.002)

    th = threading.Thread(target=pump)
    th.start()
    try:
        time.sleep(0.4)
        rig.kill_gateway()
        before = len(rig.stored("house-a"))
        time.sleep(0.3)
        rig.start_gateway()
        th.join(30)
        rig.wait(lambda: len(rig.stored("house-a")) == len(sent), 30, f"all {len(sent)} readings")
        stored = rig.stored("house-a")
        assert len(stored) == len(set(stored)) == len(sent)
        assert before > 0
        # after the restart the replay state came back from the database
        rig.kill_gateway()
        rig.start_gateway()
        a.send(*a.reading(seq=3, imp=1))             # old (boot, seq), other bytes
        a.send(*sent[10])                            # exact copy: a duplicate
        rig.wait(lambda: rig.rejects().get("reject:replay", 0) == 1, 15, "the replay refused")
        time.sleep(0.5)
        assert len(rig.stored("house-a")) == len(sent)
        # SIGTERM: a clean stop
        rig.gw.send_signal(signal.SIGTERM)
        assert rig.gw.wait(15) == 0
        assert "stopped cleanly" in (rig.tmp / "gw.log").read_text()
    finally:
        stop.set()
        a.close()


def test_registry_commands_and_revocation(rig):
    out = rig.cli("device", "list")
    assert "house-a" in out and "active" in out
    out = rig.cli("device", "add", "house-c", "--channel", "grid:63", "--channel", "pv:32")
    secret_hex = out.split("secret")[1].split()[0]
    assert len(bytes.fromhex(secret_hex)) == 32
    assert "house-c" in (rig.tmp / "acl").read_text() or "broker-files" in out
    rig.cli("broker-files")
    acl = (rig.tmp / "acl").read_text()
    assert f"user {C}.house-c" in acl and f"topic read pg/{C}/house-c/cmd" in acl
    rig.cli("device", "revoke", "house-c")
    rig.cli("broker-files")
    assert f"user {C}.house-c" not in (rig.tmp / "acl").read_text()
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(rig.cfg), "device", "add", "Bad_Id",
                        "--channel", "grid:10"], capture_output=True, text=True)
    assert r.returncode == 1 and "device id" in r.stderr


def test_retention_thins_old_readings_and_frames(tmp_path):
    from peergrid.ingest.store import Store
    from peergrid.ingest.validate import Accepted

    db = reg.connect(tmp_path / "r.db")
    st = Store(db, lambda c, d: 0)
    day = 86400.0
    now = 1_800_000_000.0
    acc = []
    for i in range(48):                       # one reading every 5 min, 100 days ago
        t = now - 100 * day + i * 300
        m = {"boot": 1, "seq": i, "t": int(t), "flags": 0, "ch": [[10, 100 + i, 0, 5]]}
        acc.append(Accepted(C, "d1", topics.READING, m, b"frame%d" % i, t, t))
    for i in range(5):                        # recent ones stay whole
        t = now - 3600 + i * 300
        m = {"boot": 1, "seq": 100 + i, "t": int(t), "flags": 0, "ch": [[10, 200 + i, 0, 5]]}
        acc.append(Accepted(C, "d1", topics.READING, m, b"new%d" % i, t, t))
    st.write(acc, [], {})
    frames, readings = st.retain(now, raw_days=30, full_days=90)
    assert frames == 48 and readings == 48 - 16     # 4 h of 5-min readings -> 16 slots of 15 min
    left = [r[0] for r in db.execute("SELECT seq FROM readings ORDER BY seq")]
    assert left[:4] == [0, 3, 6, 9] and left[-5:] == [100, 101, 102, 103, 104]
    assert db.execute("SELECT COUNT(*) FROM frames WHERE length(frame) = 0").fetchone()[0] == 48


def test_run_loop_settles_into_the_ledger(tmp_path):
    from peergrid.market import ledger
    from peergrid.config import Config
    from peergrid.ingest.service import Gateway

    cfgp = tmp_path / "gw.toml"
    cfgp.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = -1\n'
                    '[settlement]\nretail = 30\nfeed_in = 8\ninterval_min = 15\ngrace_s = 0\n')
    gw = Gateway(Config.load(cfgp))
    s = gw._settler()
    assert s is not None and s.length == 900
    # no readings yet: nothing to settle; the key file was made private
    assert s.settle_due(1_795_000_000) == 0
    assert (tmp_path / "ledger.key").stat().st_mode & 0o777 == 0o600
    cfgp.write_text(cfgp.read_text().replace("interval_min = 15", "interval_min = 7"))
    with pytest.raises(SystemExit):
        Gateway(Config.load(cfgp))._settler()
    cfgp.write_text(cfgp.read_text().replace("interval_min = 7", "interval_min = 15\ngrid_fee = 23"))
    with pytest.raises(SystemExit, match="grid fee"):
        Gateway(Config.load(cfgp))._settler()


def test_membership_goes_into_the_ledger(tmp_path):
    from peergrid.market import ledger

    cfgp = tmp_path / "gw.toml"
    cfgp.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n'
                    '[settlement]\nretail = 30\nfeed_in = 8\n')

    def cli(*a):
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfgp), *a], capture_output=True)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cli("member", "add", "house one")
    cli("member", "add", "house two")
    cli("member", "add", "house three")
    cli("member", "limits", "2", "--bid", "0", "--ask", "20")
    cli("member", "partner", "add", "3", "2", "--discount", "5")
    assert b"bid 0 ask 20" in cli("member", "list")
    assert b"3 ->     2  discount 5" in cli("member", "partner", "list")
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfgp), "member", "partner", "add", "3", "3",
                        "--discount", "5"], capture_output=True, text=True)
    assert r.returncode == 1 and "own preferred partner" in r.stderr
    cli("member", "leave", "1")
    cli("tariff", "--retail", "35", "--feed-in", "7", "--grid-fee", "3", "--fund-export-ppm", "1000",
        "--from", str(4_000_000_000 - 4_000_000_000 % 900))
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfgp), "tariff", "--retail", "35",
                        "--feed-in", "7", "--from", "1001"], capture_output=True, text=True)
    assert r.returncode == 1 and "boundary" in r.stderr
    data = cli("ledger", "export")
    entries = ledger.verify(data)
    assert [e.type for e in entries] == ["genesis"] + ["member_joined"] * 3 + ["member_left", "tariff"]
    assert entries[4].body["member"] == 1 and entries[4].body["balance"] == 0 and entries[4].body["from"] % 900 == 0
    assert entries[5].body["tariff"] == [35, 7, 0, "sdr", 3, 1000]
