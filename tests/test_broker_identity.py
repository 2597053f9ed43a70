"""Broker identities bound to accounts, and registry changes in the running
gateway (issue 17, parts 3 and 4), with a real mosquitto started from the
configuration `peergrid broker-files` writes:

* every account's client id is its user name: a device account cannot take
  over the gateway's session or knock a board off by using their client ids,
  a wrong password touches no session, and no reading the broker
  acknowledged is lost, not even across a gateway crash and a broker restart;
* messages and packets beyond what the protocol makes are refused;
* a rotation or revocation made by the CLI (another process) or the
  installer API takes effect in the running gateway within a second.
"""
from __future__ import annotations

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

from harness import free_port, stop_process, wait_port
from peergrid.community import broker
from peergrid.community import registry as reg
from protocol import cose, gateway_end, messages, topics
from protocol.errnames import NAMES
from protocol.link import DeviceLink

C = "elm"
CH2 = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]
SIM_CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 100},
          {"role": "load", "rating_a": 50}, {"role": "ev", "rating_a": 50}]
GW_ID = f"peergrid-gw-{C}"           # the gateway's own client id (service.Gateway.start)


class Site:
    """A gateway's folder: config, registry, the broker files it generates,
    mosquitto started from the generated mosquitto.conf, the gateway as a
    process. reload=False: no pid_file, so commands cannot reload the broker
    (connections made before a rotation or revocation stay up, which shows
    what the gateway itself refuses)."""

    def __init__(self, tmp: Path, reload: bool = True) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.http_port = free_port()
        self.gw_password = "gw-secret-pass"
        extra = [f"log_dest file {tmp / 'mosquitto.log'}", "log_type error", "log_type warning",
                 "log_type notice", "log_type information", "connection_messages true"]
        if os.geteuid() == 0:
            # as root mosquitto would become user "mosquitto", who cannot read the test's folder
            extra.append("user root")
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {self.http_port}\nstatus_every_s = 1\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\nuser = "gateway"\npassword = "{self.gw_password}"\n'
            'passwd_file = "passwd"\nacl_file = "acl"\nconf_file = "mosquitto.conf"\nlisten = "127.0.0.1"\n'
            'persistence_dir = "."\n' + ('pid_file = "mosquitto.pid"\n' if reload else "")
            + f"conf_extra = {json.dumps(extra)}\n"
            '[ingest]\nmax_skew_s = 300\nbatch = 200\nbatch_ms = 5\n')
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        self.creds: dict[str, tuple[bytes, str]] = {}
        for d, ch in (("house-a", CH2), ("house-b", SIM_CH), ("house-c", CH2)):
            m = r.add_member(C, d)
            self.creds[d] = r.add_device(C, d, "sim", ch, m)
        r.db.close()
        out = self.cli("broker-files")
        assert "3 device accounts" in out and "restart mosquitto" in out, out
        self.broker: subprocess.Popen | None = None
        self.gw: subprocess.Popen | None = None
        self.start_broker()

    # -- processes ----------------------------------------------------------------------

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def start_broker(self) -> None:
        self.broker = subprocess.Popen(["mosquitto", "-c", str(self.tmp / "mosquitto.conf")],
                                       stdout=subprocess.DEVNULL, stderr=open(self.tmp / "mosquitto.err", "a"))
        wait_port(self.port, self.broker)

    def restart_broker(self) -> None:
        """SIGTERM (mosquitto saves its persistence file), then start again."""
        stop_process(self.broker)
        self.start_broker()

    def log(self) -> str:
        return (self.tmp / "gw.log").read_text() if (self.tmp / "gw.log").exists() else ""

    def start_gateway(self) -> None:
        n = self.log().count("connected to")
        self.gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                   stdout=subprocess.DEVNULL, stderr=open(self.tmp / "gw.log", "a"), text=True)
        deadline = time.monotonic() + 15
        while self.log().count("connected to") <= n:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)
        time.sleep(0.3)                                  # the subscription acknowledged

    def kill_gateway(self) -> None:
        assert self.gw is not None
        self.gw.send_signal(signal.SIGKILL)
        self.gw.wait()

    def close(self) -> None:
        stop_process(self.gw, 15)
        stop_process(self.broker, 5)

    # -- the database ------------------------------------------------------------------------

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(str(self.tmp / "gw.db"), timeout=30)

    def stored(self, device: str) -> set[tuple[int, int]]:
        try:
            with self.db() as db:
                return set(db.execute("SELECT boot, seq FROM readings WHERE device=?", (device,)))
        except sqlite3.OperationalError:
            return set()

    def refused(self, frame: bytes) -> str | None:
        """The reason the gateway quarantined this exact frame for, if it did."""
        try:
            with self.db() as db:
                row = db.execute("SELECT code FROM quarantine WHERE frame=?", (frame,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return NAMES[row[0]] if row else None

    def wait(self, pred, timeout: float = 20, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out: {what}; gateway log: {self.log()[-1500:]}")
            time.sleep(0.02)


class Client:
    """An MQTT connection under one account, recording what it was told."""

    def __init__(self, site: Site, user: str, password: str, client_id: str, clean: bool = True,
                 reconnect: bool = False) -> None:
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean,
                             protocol=mqtt.MQTTv311)
        self.c.username_pw_set(user, password)
        self.connacks: list[Any] = []
        self.drops = 0
        self.got: list[tuple[str, bytes]] = []
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.up = threading.Event()
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = lambda cl, ud, msg: self.got.append((msg.topic, bytes(msg.payload)))
        self.c.on_publish = self._on_publish
        self.reconnect = reconnect
        self.c.reconnect_delay_set(0.2, 1)
        self.c.connect("127.0.0.1", site.port, keepalive=10)
        self.c.loop_start()
        deadline = time.monotonic() + 10
        while not self.connacks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.connacks, "no CONNACK"

    def _on_connect(self, cl, ud, flags, rc, props=None) -> None:
        self.connacks.append(rc)
        if not rc.is_failure:
            self.up.set()
        elif not self.reconnect:
            cl.disconnect()

    def _on_disconnect(self, cl, ud, flags, rc, props=None) -> None:
        if self.up.is_set():
            self.drops += 1
        self.up.clear()

    def _on_publish(self, cl, ud, mid, rc, props=None) -> None:
        with self.lock:
            self.acked.add(mid)

    @property
    def refused(self) -> bool:
        return bool(self.connacks) and self.connacks[-1].is_failure

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Board(Client):
    """A board in CPython: its own account and client id, frames sealed with
    protocol/ as the firmware seals them, each kept with its packet id."""

    def __init__(self, site: Site, device: str, secret: bytes | None = None, password: str | None = None,
                 boot: int = 1) -> None:
        super().__init__(site, reg.broker_user(C, device), password or site.creds[device][1],
                         reg.broker_user(C, device), reconnect=True)
        self.device = device
        self.link = DeviceLink(C, device, secret or site.creds[device][0])
        self.boot = boot
        self.seq = 0
        self.imp = 1000
        self.sent: dict[int, tuple[int, int]] = {}     # packet id -> (boot, seq)
        self.frames: dict[tuple[int, int], bytes] = {}

    def frame(self, link: DeviceLink | None = None, boot: int | None = None) -> tuple[tuple[int, int], bytes]:
        self.seq += 1
        self.imp += 1
        b = boot or self.boot
        f = (link or self.link).reading(b, self.seq, int(time.time()), 0, 2300, 5000,
                                         [500, self.imp, 10, 2100, -300, 0, 40, 1300], 2)
        return (b, self.seq), bytes(f)

    def send(self, link: DeviceLink | None = None, boot: int | None = None, wait: bool = True) -> tuple[int, int]:
        key, f = self.frame(link, boot)
        info = self.c.publish(self.link.t_reading, f, qos=1)
        with self.lock:
            self.sent[info.mid] = key
            self.frames[key] = f
        if wait:
            info.wait_for_publish(5)
        return key

    def acked_readings(self) -> set[tuple[int, int]]:
        with self.lock:
            return {self.sent[m] for m in self.acked if m in self.sent}


@pytest.fixture
def site_factory(tmp_path):
    made: list[Site] = []

    def make(reload: bool = True) -> Site:
        d = tmp_path / f"site{len(made)}"
        d.mkdir()
        s = Site(d, reload)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


# -- the generated configuration -----------------------------------------------------------------


def test_generated_config_binds_client_ids_and_limits_sizes(tmp_path) -> None:
    conf = broker.mosquitto_conf(1883, tmp_path / "passwd", tmp_path / "acl", "10.0.0.2", tmp_path / "pid",
                              tmp_path, ["log_dest syslog"])
    lines = [x for x in conf.splitlines() if x and not x.startswith("#")]
    # the option belongs to the listener (mosquitto.conf(5): a listener setting), so after it
    i = lines.index("listener 1883 10.0.0.2")
    assert "use_username_as_clientid true" in lines[i + 1:]
    for want in ("allow_anonymous false", "persistence true", f"message_size_limit {cose.MAX_FRAME}",
                 f"max_packet_size {broker.PACKET_LIMIT}", f"persistence_location {tmp_path}/",
                 f"password_file {tmp_path / 'passwd'}", f"pid_file {tmp_path / 'pid'}"):
        assert want in lines, want
    assert lines[-1] == "log_dest syslog"
    # the protocol's largest message and packets fit, nothing much larger does
    assert broker.MESSAGE_LIMIT == cose.MAX_FRAME >= messages.MAX_PAYLOAD
    publish = 1 + 2 + 2 + topics.MAX_TOPIC + 2 + cose.MAX_FRAME
    assert publish < broker.max_connect_packet() <= broker.PACKET_LIMIT < 2 * broker.max_connect_packet()


def test_changed_conf_is_reported_and_written_once(tmp_path) -> None:
    s = tmp_path / "gw.toml"
    s.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n[broker]\npasswd_file = "p"\nacl_file = "a"\n'
                 'conf_file = "m.conf"\npersistence_dir = "/var/lib/x"\n')

    def cli(*a: str) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(s), *a], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "restart mosquitto" in cli("broker-files")
    assert "restart mosquitto" not in cli("broker-files")          # the same text: not rewritten
    assert "persistence_location /var/lib/x/" in (tmp_path / "m.conf").read_text()
    # adding a device writes its account at once (no separate broker-files needed)
    out = cli("device", "add", "d1", "--channel", "grid:63")
    assert "broker accounts written (1 devices)" in out
    assert f"user {C}.d1" in (tmp_path / "a").read_text() and f"{C}.d1:$7$" in (tmp_path / "p").read_text()
    cli("device", "revoke", "d1")
    assert f"{C}.d1" not in (tmp_path / "a").read_text() + (tmp_path / "p").read_text()


def _gateway(tmp_path: Path):
    from peergrid.config import Config
    from peergrid.ingest.service import Gateway

    cfgp = tmp_path / "gw.toml"
    cfgp.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = -1\n')
    return Gateway(Config.load(cfgp))


def test_the_gateway_follows_registry_changes_made_elsewhere(tmp_path) -> None:
    """Another connection (the CLI's process) adds, rotates, revokes and
    deletes; the gateway's check_registry (its watcher polls it every
    registry_poll_s) brings the validator up to date, and a board's firmware
    version is no change of identity."""
    from peergrid.ingest.validate import Accepted, Rejected
    from protocol.errors import E_TAG, E_UNKNOWN_DEVICE

    other = reg.Registry(reg.connect(tmp_path / "gw.db"))
    other.add_community(C)
    s1, _ = other.add_device(C, "a", "sim", CH2)
    gw = _gateway(tmp_path)
    seq = iter(range(1, 1000))

    def check(device: str, secret: bytes):
        link = DeviceLink(C, device, secret)
        f = bytes(link.reading(1, next(seq), int(time.time()), 0, 2300, 5000, [5, 10 + next(seq), 0, 1, 0, 0, 0, 0], 2))
        try:
            return gw.validator.check(link.t_reading, f, time.time())
        except Rejected as e:
            return e.code

    assert isinstance(check("a", s1), Accepted)
    s_b = os.urandom(32)
    assert check("b", s_b) == E_UNKNOWN_DEVICE          # cached as unknown
    assert gw.check_registry() == 0
    other.add_device(C, "b", "sim", CH2, secret=s_b)
    assert gw.check_registry() == 1 and isinstance(check("b", s_b), Accepted)
    s2, _ = other.rotate(C, "a")
    assert gw.check_registry() == 1
    assert check("a", s1) == E_TAG and isinstance(check("a", s2), Accepted)
    v = other.version()
    other.set_fw(C, "a", "1.2.3")                        # reported by the board: not counted
    assert other.version() == v and gw.check_registry() == 0
    other.db.execute("UPDATE devices SET channels=? WHERE id='a'", (json.dumps([dict(CH2[0], rating_a=63), CH2[1]]),))
    assert gw.check_registry() == 0 and isinstance(check("a", s2), Accepted)    # same key: nothing dropped
    assert gw.validator._device("a").channels[0]["rating_a"] == 63              # but the record is new
    other.revoke(C, "a")
    assert gw.check_registry() == 1 and check("a", s2) == E_UNKNOWN_DEVICE
    other.db.execute("DELETE FROM devices WHERE id='b'")
    assert gw.check_registry() == 1 and check("b", s_b) == E_UNKNOWN_DEVICE
    # another community's change counts but changes nothing here
    other.add_community("ash")
    other.add_device("ash", "a", "sim", CH2)
    assert gw.check_registry() == 0 and check("a", s2) == E_UNKNOWN_DEVICE


def test_status_summary_fits_the_brokers_limit(tmp_path) -> None:
    gw = _gateway(tmp_path)
    sent: list[tuple[str, bytes]] = []

    class Fake:
        def publish(self, topic, payload, qos=0, retain=False):
            sent.append((topic, payload.encode() if isinstance(payload, str) else payload))

    gw.client = Fake()  # type: ignore[assignment]
    gw.connected.set()
    gw._publish_status()
    small = json.loads(sent[-1][1])
    assert "counts" in small["metrics"]                  # all of it while it fits
    for i, name in enumerate(NAMES.values()):
        gw.metrics.reject(name, f"dev{i}")
        gw.metrics.inc(f"accepted_kind{i}", i)
    gw._publish_status()
    body = sent[-1][1]
    assert len(body) <= broker.MESSAGE_LIMIT, len(body)
    m = json.loads(body)["metrics"]
    assert m["rejected"] == len(NAMES) and m["accepted"] == sum(range(len(NAMES)))


# -- client ids bound to accounts -----------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("generated", [True, False], ids=["generated-config", "without-username-as-clientid"])
def test_an_account_cannot_take_another_ones_client_id(site_factory, generated) -> None:
    """Under the generated config a device account using the gateway's or a
    board's client id gets a session of its own; without
    use_username_as_clientid (the config before issue 17) it knocks both off,
    which is what this test would catch."""
    site = site_factory()
    if not generated:
        conf = site.tmp / "mosquitto.conf"
        conf.write_text(conf.read_text().replace("use_username_as_clientid true", ""))
        site.restart_broker()
    gw = Client(site, "gateway", site.gw_password, GW_ID, clean=False)
    board = Client(site, reg.broker_user(C, "house-b"), site.creds["house-b"][1], reg.broker_user(C, "house-b"))
    old_board = Client(site, reg.broker_user(C, "house-a"), site.creds["house-a"][1], "house-a")  # device id
    attackers = []
    try:
        assert gw.up.is_set() and board.up.is_set() and old_board.up.is_set()
        for cid in (GW_ID, reg.broker_user(C, "house-b"), "house-a"):
            attackers.append(Client(site, reg.broker_user(C, "house-c"), site.creds["house-c"][1], cid))
            time.sleep(0.3)
        # a wrong password naming the gateway's account and id is refused and touches nothing
        bad = Client(site, "gateway", "guess", GW_ID)
        assert bad.refused
        bad.close()
        time.sleep(0.3)
        if generated:
            assert (gw.drops, board.drops, old_board.drops) == (0, 0, 0)
            assert gw.up.is_set() and board.up.is_set() and old_board.up.is_set()
            log = (site.tmp / "mosquitto.log").read_text()
            # the broker knows each connection by its account, whatever id it sent
            assert f"as {reg.broker_user(C, 'house-a')} (" in log and f"as {GW_ID}" not in log
        else:
            assert gw.drops and board.drops and old_board.drops
    finally:
        for c in attackers + [gw, board, old_board]:
            c.close()


@pytest.mark.broker
def test_the_firmware_uses_its_account_as_client_id(site_factory, tmp_path) -> None:
    """The real firmware (MicroPython, firmware/uplink.py) connects with its
    account name as client id, so even a broker without
    use_username_as_clientid keeps two communities' boards of the same
    device id apart; under the generated config it is the same id."""
    from peergrid.sim.vboard import VirtualBoard, default_config

    site = site_factory()
    conf = site.tmp / "mosquitto.conf"
    conf.write_text(conf.read_text().replace("use_username_as_clientid true", ""))
    site.restart_broker()
    secret, pw = site.creds["house-b"]
    vb = VirtualBoard(tmp_path / "vb", default_config(C, "house-b", secret, "127.0.0.1", site.port,
                                                      reg.broker_user(C, "house-b"), pw, period_s=1), speed=1)
    try:
        vb.start()
        vb.poll_state(lambda s: s["uplink"]["connects"] >= 1, 20)
        assert f"as {reg.broker_user(C, 'house-b')} (" in (site.tmp / "mosquitto.log").read_text()
    finally:
        vb.close()


@pytest.mark.broker
def test_no_reading_the_broker_acknowledged_is_lost(site_factory, tmp_path) -> None:
    """Boards (one the real firmware under MicroPython) send readings while
    a device account connects with the gateway's and the boards' client ids;
    then the gateway is killed, the broker restarted while readings keep
    coming, the gateway started again: every reading the broker acknowledged
    to a board is stored, once."""
    from peergrid.sim.vboard import VirtualBoard, default_config

    site = site_factory()
    site.start_gateway()
    a = Board(site, "house-a")
    secret_b, pw_b = site.creds["house-b"]
    cfg = default_config(C, "house-b", secret_b, "127.0.0.1", site.port, reg.broker_user(C, "house-b"), pw_b,
                         period_s=1, keepalive_s=5, backoff_s=[1, 1])
    cfg["sim"]["start"] = int(time.time())
    vb = VirtualBoard(tmp_path / "vb", cfg, speed=1)
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            if a.up.is_set():
                a.send(wait=False)
            time.sleep(0.01)

    th = threading.Thread(target=pump)
    attackers: list[Client] = []
    try:
        vb.start()
        vb.poll_state(lambda s: s["uplink"]["connects"] >= 1, 20)
        th.start()
        time.sleep(0.5)
        for cid in (GW_ID, "gateway", reg.broker_user(C, "house-b"), "house-b", reg.broker_user(C, "house-a")):
            attackers.append(Client(site, reg.broker_user(C, "house-c"), site.creds["house-c"][1], cid))
            time.sleep(0.3)
        # and the gateway's own account with a wrong password
        bad = Client(site, "gateway", "not-the-password", GW_ID, clean=True)
        assert bad.refused
        bad.close()
        time.sleep(1.0)
        assert "connection lost" not in site.log(), site.log()
        st = vb.state()
        assert st["uplink"]["connects"] == 1 and st["uplink"]["drops"] == 0, st["uplink"]
        assert a.drops == 0
        # the gateway crashes; the broker keeps acknowledging and queues for its session
        site.kill_gateway()
        n_before = len(a.acked_readings())
        time.sleep(1.0)
        assert len(a.acked_readings()) > n_before + 20
        # the broker restarts (persistence keeps the queue), the boards reconnect
        site.restart_broker()
        a.up.wait(10)
        time.sleep(1.0)
        site.start_gateway()
        time.sleep(1.0)
        stop.set()
        th.join(10)
        time.sleep(0.5)
        acked = a.acked_readings()
        assert len(acked) > 100
        site.wait(lambda: acked <= site.stored("house-a"), 30,
                  f"{len(acked - site.stored('house-a'))} of {len(acked)} acknowledged readings missing")
        # the real board: every reading it had acknowledged is stored
        n_b = vb.state()["stats"]["acked"]
        assert n_b >= 5
        site.wait(lambda: len(site.stored("house-b")) >= n_b, 30, "the board's readings")
    finally:
        stop.set()
        for c in attackers + [a]:
            c.close()
        vb.close()


@pytest.mark.broker
def test_messages_beyond_the_protocol_are_refused_by_the_broker(site_factory) -> None:
    site = site_factory()
    gw = Client(site, "gateway", site.gw_password, GW_ID, clean=False)
    gw.c.subscribe(gateway_end.subscriptions(C)[0], qos=1)
    a = Board(site, "house-a")
    try:
        time.sleep(0.3)
        t = a.link.t_reading
        a.c.publish(t, bytes(cose.MAX_FRAME), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not gw.got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [len(p) for _, p in gw.got] == [cose.MAX_FRAME]
        # one byte more: acknowledged (QoS flow completed) but not passed on
        a.c.publish(t, bytes(cose.MAX_FRAME + 1), qos=1).wait_for_publish(5)
        time.sleep(0.5)
        assert len(gw.got) == 1 and a.up.is_set() and a.drops == 0
        # a packet larger than any the protocol makes: the sender is disconnected
        a.c.publish(t, bytes(broker.PACKET_LIMIT), qos=1)
        deadline = time.monotonic() + 5
        while not a.drops and time.monotonic() < deadline:
            time.sleep(0.02)
        assert a.drops == 1
        assert len(gw.got) == 1 and gw.drops == 0
    finally:
        a.close()
        gw.close()


@pytest.mark.broker
def test_rotation_and_revocation_close_the_broker_account(site_factory) -> None:
    """With pid_file set, `device rotate` and `device revoke` rewrite the
    broker's accounts and reload it: the board's connection under the old
    password is closed at once and cannot come back."""
    site = site_factory(reload=True)
    a = Client(site, reg.broker_user(C, "house-a"), site.creds["house-a"][1], "x")
    try:
        out = site.cli("device", "rotate", "house-a")
        assert "reloaded" in out
        new_pw = out.split("broker password")[1].split()[0]
        deadline = time.monotonic() + 2
        while a.up.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not a.up.is_set()
        assert Client(site, reg.broker_user(C, "house-a"), site.creds["house-a"][1], "x").refused
        b = Client(site, reg.broker_user(C, "house-a"), new_pw, "x")
        assert b.up.is_set()
        site.cli("device", "revoke", "house-a")
        deadline = time.monotonic() + 2
        while b.up.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not b.up.is_set()
        assert Client(site, reg.broker_user(C, "house-a"), new_pw, "x").refused
    finally:
        a.close()


# -- registry changes in the running gateway ---------------------------------------------------


def _installer_register(site: Site, token: str, device: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{site.http_port}/installer/register", method="POST",
        data=json.dumps({"member": device, "device": device, "board": "sim", "channels": CH2,
                         "rotate": True}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.broker
def test_rotate_and_revoke_take_effect_in_the_running_gateway_within_a_second(site_factory) -> None:
    site = site_factory(reload=False)      # the broker keeps the connection: the gateway must refuse
    token = site.cli("installer-token", "tester").split("(shown only now):")[1].split()[0]
    site.start_gateway()
    pid = site.gw.pid
    a = Board(site, "house-a")
    old = a.link
    try:
        k = a.send()
        site.wait(lambda: k in site.stored("house-a"), 10, "a reading under the first secret")

        def flip(new_link: DeviceLink | None, boot: int, t0: float, want_reason: str | None) -> float:
            """Send under `new_link` every 50 ms from t0 until the gateway takes
            one (or, with want_reason, refuses one for that reason); then one
            under the previous secret, which must be refused. Returns the
            seconds from t0 until both were decided."""
            while True:
                key = a.send(new_link, boot)
                deadline = time.monotonic() + 0.05
                while time.monotonic() < deadline:
                    if want_reason is None and key in site.stored("house-a"):
                        break
                    if want_reason is not None and site.refused(a.frames[key]) == want_reason:
                        break
                    time.sleep(0.005)
                else:
                    assert time.monotonic() - t0 < 3, "no change within 3 s"
                    continue
                break
            key_old = a.send(old, boot)
            site.wait(lambda: site.refused(a.frames[key_old]) is not None, 5, "the old secret's frame decided")
            assert key_old not in site.stored("house-a")
            assert site.refused(a.frames[key_old]) == (want_reason or "tag")
            return time.monotonic() - t0

        # `peergrid device rotate` in another process
        out = site.cli("device", "rotate", "house-a")
        t0 = time.monotonic()
        new = DeviceLink(C, "house-a", bytes.fromhex(out.split("secret")[1].split()[0]))
        took = flip(new, 2, t0, None)
        assert took < 1.0, took
        old = new
        # any other process writing the registry (here this one, timed from
        # its commit: the CLI's own start-up hides how fast the gateway is)
        other = reg.Registry(reg.connect(site.tmp / "gw.db"))
        s, _ = other.rotate(C, "house-a")
        t0 = time.monotonic()
        other.db.close()
        new = DeviceLink(C, "house-a", s)
        took = flip(new, 3, t0, None)
        assert took < 1.0, took
        old = new
        # the installer API (resuming a commissioning) rotates again
        t0 = time.monotonic()
        res = _installer_register(site, token, "house-a")
        newer = DeviceLink(C, "house-a", bytes.fromhex(res["secret"]))
        took = flip(newer, 4, t0, None)
        assert took < 1.0, took
        old = newer
        # `peergrid device revoke`: nothing from the device is taken any more
        out = site.cli("device", "revoke", "house-a")
        t0 = time.monotonic()
        took = flip(newer, 5, t0, "unknown_device")
        assert took < 1.0, took
        time.sleep(0.3)
        late = a.send(newer, 5)
        site.wait(lambda: site.refused(a.frames[late]) == "unknown_device", 5, "a late frame refused")
        # the same gateway process all along, which logged what it noticed
        assert site.gw.poll() is None and site.gw.pid == pid
        assert "registry: device house-a revoked" in site.log()
    finally:
        a.close()
