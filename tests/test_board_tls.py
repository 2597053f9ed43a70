"""TLS from board to broker (issue 19): the real firmware on the MicroPython
unix port against mosquitto's TLS listener, with the community CA and the
broker's certificate from peergrid.community.pki and the broker's files
(passwords, ACL, mosquitto.conf with its TLS listener) written by the
gateway's own code from its config.

A board commissioned through the installer API gets the CA and the name,
checks the broker's certificate and publishes; a board without a CA says
in its status that it talks plain text. A wrong CA, an expired certificate,
one not valid yet (what a board whose clock is not set sees), a certificate
for another name, a plain-text MQTT listener, a listener that answers with
something other than TLS and one that says nothing are each
refused, counted and named (never a fall-back to plain text, never a hang),
while the board keeps measuring; once the broker's certificate is renewed,
the board gets through and its status reports the refusals."""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from harness import free_port, mp32_tree, run_mp32, stop_process, wait_port
from peergrid.commissioning.commission import Commissioning, Operator
from peergrid.commissioning.installer import ApiError, InstallerApi, check_register
from peergrid.community import pki
from peergrid.community import registry as reg
from peergrid.community.broker import write_broker_files
from peergrid.config import Config
from peergrid.sim.vboard import VirtualBoard, board_tls, default_config
from protocol import gateway_end, topics
from protocol.gateway_end import open_uplink

pytestmark = pytest.mark.broker
C = "oak"
NAME = "broker.oak"                  # what the boards check in the broker's certificate
GW_PW = "gw-pass-tls-123"
CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 32},
            {"role": "load", "rating_a": 50}, {"role": "ev", "rating_a": 50}]
SHEET = """electrician = "A. Sparks"
[house]
member = "Miller, Oak Lane 3"
device = "{device}"
board = "sim"
[board_settings]
period_s = 5
[[ct]]
name = "ct1"
role = "grid"
rating_a = 100
[[ct]]
name = "ct2"
role = "pv"
rating_a = 32
"""


def _tls_listener(port: int, d: Path, cert: str) -> list[str]:
    """mosquitto.conf lines of one more TLS listener (a test's bad certificate)."""
    return [f"listener {port} 127.0.0.1", "use_username_as_clientid true", f"cafile {d / 'ca.pem'}",
            f"certfile {d / (cert + '.pem')}", f"keyfile {d / (cert + '.key')}", "tls_version tlsv1.2"]


class Listener(threading.Thread):
    """A TCP listener that is no TLS broker: `answer` is sent to every
    connection (None: it says nothing) and the connection is held open."""

    def __init__(self, answer: bytes | None) -> None:
        super().__init__(daemon=True)
        self.answer = answer
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.held: list[socket.socket] = []
        self.start()

    def run(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            if self.answer:
                c.sendall(self.answer)
            self.held.append(c)

    def close(self) -> None:
        self.srv.close()
        for c in self.held:
            c.close()


class Site:
    """The gateway's side: a config with a TLS listener for the boards, the
    community CA and the broker's certificate from pki, the broker's files
    written by write_broker_files, mosquitto started on them, the installer
    API (without its HTTP server) and a subscriber with the gateway's
    account that verifies every frame."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.port, self.tls_port, self.expired_port, self.other_port, self.future_port = (free_port() for _ in range(5))
        pki.make_ca(d / "ca.pem", d / "ca.key", C)
        pki.make_ca(d / "elm-ca.pem", d / "elm-ca.key", "elm")       # another community's CA
        pki.make_server_cert(d / "broker.pem", d / "broker.key", d / "ca.pem", d / "ca.key", [NAME, "127.0.0.1"])
        pki.make_server_cert(d / "expired.pem", d / "expired.key", d / "ca.pem", d / "ca.key", [NAME],
                             days=1, now=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30))
        pki.make_server_cert(d / "other.pem", d / "other.key", d / "ca.pem", d / "ca.key", ["other.example"])
        # valid from next week: what every certificate looks like to a board whose clock was never set
        pki.make_server_cert(d / "future.pem", d / "future.key", d / "ca.pem", d / "ca.key", [NAME],
                             now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=7))
        extra = ["log_dest stderr", "log_type error"] + (["user root"] if os.geteuid() == 0 else [])
        extra += _tls_listener(self.expired_port, d, "expired") + _tls_listener(self.other_port, d, "other")
        extra += _tls_listener(self.future_port, d, "future")
        (d / "gw.toml").write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\nlisten = "127.0.0.1"\nuser = "gateway"\n'
            f'password = "{GW_PW}"\npasswd_file = "passwd"\nacl_file = "acl"\npid_file = "mosquitto.pid"\n'
            f'conf_file = "mosquitto.conf"\npersistence_dir = "."\nconf_extra = {json.dumps(extra)}\n'
            f'tls_port = {self.tls_port}\ntls_listen = "127.0.0.1"\nnames = ["{NAME}", "127.0.0.1"]\n'
            'ca_file = "ca.pem"\nca_key_file = "ca.key"\ncert_file = "broker.pem"\nkey_file = "broker.key"\n'
            f'[installer]\nbroker_host = "127.0.0.1"\nbroker_port = {self.port}\n')
        self.cfg = Config.load(d / "gw.toml")
        r = reg.Registry(reg.connect(self.cfg.db))
        r.add_community(C)
        write_broker_files(self.cfg, r)
        r.db.close()
        self.api = self._api(self.cfg)
        self.secrets: dict[str, bytes] = {}
        self.frames: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.start_broker()
        self.silent = Listener(None)
        self.text = Listener(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        self._subscribe()

    def _api(self, cfg: Config) -> InstallerApi:
        gw = SimpleNamespace(cfg=cfg, validator=SimpleNamespace(forget=lambda d: None, preload=lambda ds: None))
        return InstallerApi(gw)

    def start_broker(self) -> None:
        self.log = open(self.d / "mosquitto.log", "ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.d / "mosquitto.conf")],
                                     stdout=self.log, stderr=self.log)
        for p in (self.port, self.tls_port, self.expired_port, self.other_port, self.future_port):
            wait_port(p, self.proc)

    def restart_broker(self) -> None:
        stop_process(self.proc, 5)
        self.start_broker()

    def _subscribe(self) -> None:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gateway")
        c.username_pw_set("gateway", GW_PW)
        c.reconnect_delay_set(min_delay=1, max_delay=1)
        ready = threading.Event()

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe([(t, 1) for t in gateway_end.subscriptions(C)])

        def on_message(client, userdata, msg):
            with self.lock:
                self.frames.append((msg.topic, bytes(msg.payload)))

        c.on_connect = on_connect
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = on_message
        c.connect("127.0.0.1", self.port)
        c.loop_start()
        assert ready.wait(10), "the gateway's subscription was not acknowledged"
        self.client = c

    def register(self, device: str, api: InstallerApi | None = None) -> dict[str, Any]:
        """The installer API's register, as `peergrid commission` calls it."""
        api = api or self.api
        db = api._db()
        try:
            creds = api.register(db, "sparks-ltd", check_register(
                {"member": f"member of {device}", "device": device, "board": "sim", "channels": CHANNELS}))
        finally:
            db.close()
        self.secrets[device] = bytes.fromhex(creds["secret"])
        return creds

    def messages(self, device: str, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            frames = list(self.frames)
        out = []
        for topic, frame in frames:
            _, dev, k, msg = open_uplink(topic, frame, lambda c, d: self.secrets.get(d))
            if dev == device and k == kind:
                out.append(msg)
        return out

    def wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.silent.close()
        self.text.close()
        stop_process(self.proc, 5)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("tls"))
    yield s
    s.close()


@pytest.fixture(scope="module")
def boards(site, mpy_dir):
    made: list[VirtualBoard] = []

    def make(device: str, cfg: dict[str, Any], speed: float = 5) -> VirtualBoard:
        vb = VirtualBoard(site.d / "boards" / device, cfg, speed=speed, mpy_dir=mpy_dir)
        made.append(vb)
        vb.start()
        return vb

    yield make
    for vb in made:
        vb.close()


def _commissioned_config(site: Site, creds: dict[str, Any]) -> dict[str, Any]:
    """The board config `peergrid commission` writes for these credentials."""
    device = creds["device"]
    sheet = site.d / f"{device}.toml"
    sheet.write_text(SHEET.format(device=device))
    cm = Commissioning(site.d / f"commission-{device}.json", Operator(), None, "unused", sheet_path=sheet)
    cm.creds = creds
    return cm._config()


def _ca_b64(path: Path) -> str:
    return base64.b64encode(pki.load_cert(path).public_bytes(Encoding.DER)).decode()


def test_a_commissioned_board_checks_the_broker_and_publishes_over_tls(site, boards) -> None:
    creds = site.register("tls1")
    # the installer hands over the TLS listener, the community CA and the name
    assert creds["broker_tls"] == {"port": site.tls_port, "ca": _ca_b64(site.d / "ca.pem"), "name": NAME}
    cfg = _commissioned_config(site, creds)
    assert cfg["broker"]["host"] == "127.0.0.1" and cfg["broker"]["port"] == site.tls_port
    assert cfg["broker"]["tls"] == {"ca": creds["broker_tls"]["ca"], "name": NAME}
    # the listener is TLS only: the same port refuses MQTT in plain text
    with socket.create_connection(("127.0.0.1", site.tls_port), 2) as s:
        s.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x1e\x00\x00")
        s.settimeout(3)
        try:
            got = s.recv(4)
        except ConnectionResetError:
            got = b""
        assert got == b"", got
    vb = boards("tls1", cfg)
    site.wait(lambda: len(site.messages("tls1", topics.READING)) >= 2, 30, "two readings over TLS")
    st = site.messages("tls1", topics.STATUS)
    assert st and st[0]["online"] == 1 and st[0]["tls"] == 1 and "tls_err" not in st[0], st
    s = vb.state()
    assert s["connected"] and s["uplink"]["tls_err"] == 0 and s["uplink"]["connects"] == 1, s["uplink"]
    # PUBACKs come back through TLS too: nothing waits in the spool
    site.wait(lambda: vb.state()["stats"]["acked"] >= 2, 15, "acknowledged readings")
    assert vb.state()["buffered"] == 0


def test_a_board_without_a_ca_says_it_talks_plain_text(site, boards) -> None:
    plain = site._api(dataclasses.replace(site.cfg, broker_tls_port=0))
    creds = site.register("plain1", plain)
    assert creds["broker_tls"] is None
    cfg = _commissioned_config(site, creds)
    assert cfg["broker"]["port"] == site.port and "tls" not in cfg["broker"]
    boards("plain1", cfg)
    site.wait(lambda: site.messages("plain1", topics.STATUS), 20, "the plain board's status")
    assert site.messages("plain1", topics.STATUS)[0]["tls"] == 0


def test_a_gateway_whose_ca_is_missing_registers_nobody(site, tmp_path) -> None:
    api = site._api(dataclasses.replace(site.cfg, ca_file=tmp_path / "gone.pem"))
    with pytest.raises(ApiError) as e:
        site.register("noca1", api)
    assert e.value.status == 503 and "peergrid init" in e.value.msg
    db = reg.connect(site.cfg.db)
    try:
        assert reg.Registry(db).device(C, "noca1") is None
    finally:
        db.close()


def test_bad_tls_configs_are_refused_by_the_firmware(site, boards) -> None:
    from firmware import config as fconfig

    ca = _ca_b64(site.d / "ca.pem")

    def cfg(tls: Any) -> str:
        return json.dumps(default_config(C, "cfg1", b"\x01" * 32, "127.0.0.1", 8883, "u", "p", tls=tls))

    good, _ = fconfig.parse(cfg({"ca": ca, "name": NAME}))
    assert good["broker"]["port"] == 8883
    no_port = json.loads(cfg({"ca": ca, "name": NAME}))
    del no_port["broker"]["port"]
    assert fconfig.parse(json.dumps(no_port))[0]["broker"]["port"] == 8883      # TLS's port by default
    for bad in ("yes", {"ca": ca}, {"name": NAME}, {"ca": ca, "name": ""}, {"ca": ca, "name": "a b"},
                {"ca": ca, "name": "x" * 254}, {"ca": "", "name": NAME}, {"ca": ca[:40], "name": NAME},
                {"ca": base64.b64encode(b"\x31" + b"\x00" * 300).decode(), "name": NAME},   # not a DER sequence
                {"ca": ca * 5, "name": NAME}, {"ca": 5, "name": NAME}):                   # beyond 2 KB
        with pytest.raises(fconfig.ConfigError, match="broker.tls"):
            fconfig.parse(cfg(bad))
    # and the board itself, on MicroPython, refuses a CA that is no base64 at all
    with pytest.raises(RuntimeError, match="broker.tls"):
        boards("cfg1", json.loads(cfg({"ca": "*" * 600, "name": NAME})))


def test_refused_brokers_are_counted_and_named_and_a_renewal_gets_through(site, boards) -> None:
    ca, elm = board_tls(site.d / "ca.pem", NAME), board_tls(site.d / "elm-ca.pem", NAME)
    cases = {   # device: (port, tls, the reason the board gives)
        "wrongca": (site.tls_port, elm, "wrong CA"),
        "expired": (site.expired_port, ca, "cert expired"),
        "wrongname": (site.other_port, ca, "wrong name"),
        "notyet": (site.future_port, ca, "cert not yet valid"),
        "plainmqtt": (site.port, ca, "closed (not TLS?)"),
        "textanswer": (site.text.port, ca, "not TLS"),
        "silent": (site.silent.port, ca, "timeout"),
    }
    vbs = {}
    for dev, (port, tls, _) in cases.items():
        creds = site.register(dev)
        cfg = default_config(C, dev, site.secrets[dev], "127.0.0.1", port, creds["broker_user"],
                             creds["broker_password"], tls=tls, backoff_s=[1, 2], sock_timeout_s=2)
        vbs[dev] = boards(dev, cfg)
    t0 = time.monotonic()
    states: dict[str, Any] = {}
    while len(states) < len(cases):
        assert time.monotonic() - t0 < 30, f"not every board refused its broker: {states}"
        for dev, vb in vbs.items():
            st = vb.state()
            if st["uplink"]["tls_err"] >= 2 and st["stats"]["readings"] >= 2:
                states[dev] = st
        time.sleep(0.2)
    for dev, st in states.items():
        up = st["uplink"]
        # refused, counted, named; never connected, never in plain text
        assert up["tls_why"] == cases[dev][2], (dev, up)
        assert up["last_error"] == "tls: " + cases[dev][2] and up["connects"] == 0, (dev, up)
        assert not st["connected"], dev
        # the board went on measuring and keeps its readings for later
        assert st["buffered"] == st["stats"]["readings"] >= 2, (dev, st)
        assert site.messages(dev, topics.READING) == [] and site.messages(dev, topics.STATUS) == []
    # the silent listener held each attempt for the socket timeout (2 s), no longer: that board
    # is alive and measuring (above); every refused board was retried with its back-off
    assert all(vb.proc.poll() is None for vb in vbs.values())
    # the broker's certificate is renewed (as `peergrid init` does near expiry) on the expired
    # listener: that board gets through, and its first status tells of the refusals
    pki.make_server_cert(site.d / "expired.pem", site.d / "expired.key", site.d / "ca.pem", site.d / "ca.key",
                         [NAME])
    site.restart_broker()
    site.wait(lambda: site.messages("expired", topics.STATUS), 20, "the renewed board's status")
    st = site.messages("expired", topics.STATUS)[0]
    assert st["tls"] == 1 and st["tls_err"] >= 2 and st["tls_why"] == "cert expired", st
    site.wait(lambda: vbs["expired"].state()["buffered"] == 0, 20, "the spool replayed over TLS")
    assert len(site.messages("expired", topics.READING)) >= 2
    # the others still cannot get through
    for dev in ("wrongca", "wrongname", "notyet", "plainmqtt"):
        assert site.messages(dev, topics.STATUS) == [] and not vbs[dev].state()["connected"]


def test_the_32_bit_runtime_has_no_ssl_and_a_tls_board_there_is_refused_not_crashed(mpy_dir, tmp_path) -> None:
    """tools/mp32 (the WebAssembly port) has neither sockets nor ssl, so the
    TLS tests run on the unix port only (README). The firmware's TLS path
    still runs there: the missing module is a counted refusal with its
    reason, and the uplink stays down."""
    cfg = default_config(C, "d32", b"\x02" * 32, "127.0.0.1", 8883, "u", "p",
                         tls={"ca": base64.b64encode(b"\x30" + b"\x00" * 200).decode(), "name": NAME})
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "usocket.py").write_text("def getaddrinfo(h, p):\n    return [(0, 0, 0, '', (h, p))]\n")
    (tmp_path / "fake" / "t.py").write_text(f"""
import json
try:
    import ssl
    print("ssl: yes")
except ImportError:
    print("ssl: no")
from firmware import config
from firmware.net import Net
from firmware.uplink import Uplink
cfg, _ = config.parse({json.dumps(json.dumps(cfg))})
class Hal:
    def io_ms(self): return 0
    def io_diff(self, a, b): return a - b
    def io_add(self, a, b): return a + b
link = type("L", (), {{"device": "d32", "t_status": "s", "t_cmd": "c"}})()
u = Uplink(Hal(), Net(), cfg, link, None, lambda: b"", lambda: b"")
u.step()
print(json.dumps([u.connected, u.stats["tls_err"], u.stats["tls_why"]]))
""")
    r = run_mp32([str(tmp_path / "fake" / "t.py")], ["--copy", f"{tmp_path / 'fake'}:/fake", "--sys", "/fake"] + mp32_tree(mpy_dir),
                 timeout=60)
    assert r.returncode == 0, r.stderr[-1500:]
    out = r.stdout.split()
    assert r.stdout.startswith("ssl: no"), r.stdout
    assert json.loads(r.stdout.splitlines()[-1]) == [False, 1, "no module named 'ssl'"], out
