"""`peergrid init` (issue 19): a community directory from nothing, as the
README's "Run a community" does it. The files and their modes, a rerun
that keeps every secret, the refusals, and the generated directory running
for real: mosquitto started with exactly the generated configuration, the
gateway with its config, a house registered through the installer API and
its board's broker account working over TLS with the community CA (and
refused without it)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from harness import free_port, stop_process, wait_port
from peergrid.community import pki
from peergrid.config import Config
from peergrid.operate import init

C = "oak"
SECRETS = ("peergrid.toml", "ca.key", "broker.key", "ledger.key", "gateway.key", "passwd", "acl", "gateway.db",
           "mosquitto.conf")
KEPT = ("peergrid.toml", "ca.key", "ca.pem", "ledger.key", "gateway.key", "broker.key", "broker.pem")


def _init(d: Path, *extra: str, ports: tuple[int, int, int] | None = None,
          names: tuple[str, str] = ("127.0.0.1", "localhost")) -> tuple[int, str, str]:
    p, t, h = ports or (free_port(), free_port(), free_port())
    args = [str(d), "--community", C, "--address", names[0], "--name", names[1], "--retail", "3187",
            "--feed-in", "812", "--interval-min", "1", "--port", str(p), "--tls-port", str(t),
            "--http-port", str(h), "--user", _me(), "-y", *extra]
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "init", *args], capture_output=True, text=True,
                       timeout=60)
    return r.returncode, r.stdout, r.stderr


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _digests(d: Path) -> dict[str, str]:
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in KEPT}


def test_init_makes_a_private_community_and_a_rerun_keeps_every_secret(tmp_path) -> None:
    d = tmp_path / "community"
    rc, out, err = _init(d)
    assert rc == 0, err
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for name in SECRETS:
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE((d / "ca.pem").stat().st_mode) == 0o644
    cfg = Config.load(d / "peergrid.toml")
    assert cfg.community == C and cfg.broker_tls_port and cfg.broker_names == ["127.0.0.1", "localhost"]
    assert cfg.broker_password and cfg.broker_password not in out + err         # never shown
    ca, srv = pki.info(d / "ca.pem"), pki.info(d / "broker.pem")
    assert ca.is_ca and not srv.is_ca and pki.signed_by(d / "broker.pem", d / "ca.pem")
    assert set(srv.names) == {"127.0.0.1", "localhost"} and srv.days_left() > 800
    conf = (d / "mosquitto.conf").read_text()
    assert conf.count("use_username_as_clientid true") == 2          # on both listeners
    assert f"listener {cfg.broker_port} 127.0.0.1" in conf and f"listener {cfg.broker_tls_port}\n" in conf
    assert "persistence true" in conf and "allow_anonymous false" in conf and "tls_version tlsv1.2" in conf
    units = {p.name: p.read_text() for p in (d / "systemd").glob("*.service")}
    assert set(units) == set(init.UNITS)
    assert f"-c {d / 'peergrid.toml'} run" in units["peergrid-gateway.service"]
    assert f"-c {d / 'mosquitto.conf'}" in units["peergrid-broker.service"]
    before = _digests(d)

    rc, out, err = _init(d)                     # again, with other ports asked for: the config wins
    assert rc == 0, err
    assert _digests(d) == before, "a rerun replaced a secret or the config"
    assert "kept    the community CA" in out and "kept    the broker's certificate" in out

    rc, out, err = _init(d, "--renew-cert")
    after = _digests(d)
    assert rc == 0 and after["broker.key"] != before["broker.key"]
    assert all(after[n] == before[n] for n in KEPT if not n.startswith("broker."))


def test_a_rerun_renews_a_certificate_that_is_about_to_expire(tmp_path) -> None:
    d = tmp_path / "c"
    assert _init(d)[0] == 0
    ca_before = (d / "ca.key").read_bytes()
    pki.make_server_cert(d / "broker.pem", d / "broker.key", d / "ca.pem", d / "ca.key", ["127.0.0.1"], days=10)
    rc, out, err = _init(d)
    assert rc == 0, err
    assert "expires in 9 days" in out or "expires in 10 days" in out
    assert pki.info(d / "broker.pem").days_left() > 800 and (d / "ca.key").read_bytes() == ca_before
    # a certificate from some other CA is replaced too
    other = tmp_path / "other"
    other.mkdir()
    pki.make_ca(other / "ca.pem", other / "ca.key", "elm")
    pki.make_server_cert(d / "broker.pem", d / "broker.key", other / "ca.pem", other / "ca.key",
                         ["127.0.0.1", "localhost"])
    rc, out, _ = _init(d)
    assert "not signed by the community CA" in out and pki.signed_by(d / "broker.pem", d / "ca.pem")


@pytest.mark.parametrize("args, says", [
    (["--community", "Oak!"], "community id 'Oak!'"),
    (["--address", "not a host"], "neither an IP address nor a host name"),
    (["--feed-in", "4000"], "feed-in <= retail"),
    (["--tls-port", "70000"], "--tls-port 70000 is not a TCP port"),
])
def test_init_refuses_bad_values_and_writes_nothing(tmp_path, args, says) -> None:
    d = tmp_path / "c"
    base = {"--community": C, "--address": "127.0.0.1", "--retail": "3187", "--feed-in": "812",
            "--user": _me()}
    base.update(dict(zip(args[::2], args[1::2])))
    argv = [str(d), "-y"] + [x for kv in base.items() for x in kv]
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "init", *argv], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and says in r.stderr, r.stderr
    assert not (d / "peergrid.toml").exists() and not (d / "ca.key").exists()


def test_init_refuses_another_communitys_directory_and_a_missing_value(tmp_path) -> None:
    d = tmp_path / "c"
    assert _init(d)[0] == 0
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "init", str(d), "--community", "elm", "-y"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is community 'oak', not 'elm'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "peergrid.cli", "init", str(tmp_path / "new"), "--community", C,
                        "-y", "--user", _me()], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--address is missing" in r.stderr
    (d / "ca.key").unlink()          # half a CA: never silently replaced (every board trusts the old one)
    rc, _, err = _init(d)
    assert rc == 2 and "only one of" in err


# -- the generated directory, running ---------------------------------------------------------


class Community:
    def __init__(self, d: Path) -> None:
        self.d = d
        self.cfg = Config.load(d / "peergrid.toml")
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        # exactly the generated configuration
        b = subprocess.Popen(["mosquitto", "-c", str(self.d / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                             stderr=open(self.d / "mosquitto.log", "w"))
        self.procs.append(b)
        wait_port(self.cfg.broker_port, b)
        wait_port(self.cfg.broker_tls_port, b)
        g = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.d / "peergrid.toml"), "run"],
                             stdout=subprocess.DEVNULL, stderr=open(self.d / "gateway.log", "w"), cwd=self.d)
        self.procs.append(g)
        wait_port(self.cfg.http_port, g, "the gateway")

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.d / "peergrid.toml"), *args],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def https(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.d / "ca.pem"))

    def register(self, token: str, device: str) -> dict[str, Any]:
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.cfg.http_port}/installer/register", method="POST",
            data=json.dumps({"member": device, "device": device, "board": "sim",
                             "channels": [{"role": "grid", "rating_a": 100}]}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10, context=self.https()) as r:
            return json.loads(r.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(f"https://127.0.0.1:{self.cfg.http_port}/metrics", timeout=10,
                                    context=self.https()) as r:
            return r.read().decode()

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)


@pytest.fixture
def community(tmp_path):
    d = tmp_path / "community"
    rc, _, err = _init(d)
    assert rc == 0, err
    c = Community(d)
    c.start()
    yield c
    c.stop()


def _tls_connect(c: Community, creds: dict[str, Any], ca: Path | None, port: int | None = None,
                 name: str = "127.0.0.1") -> int | str:
    """A board's MQTT CONNECT to the TLS listener: the CONNACK code, or the
    TLS error's reason."""
    cl = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=creds["broker_user"])
    cl.username_pw_set(creds["broker_user"], creds["broker_password"])
    if ca is not None:
        ctx = ssl.create_default_context(cafile=str(ca))
        cl.tls_set_context(ctx)
    got: list[Any] = []
    cl.on_connect = lambda *a: got.append(a[3])
    try:
        cl.connect("127.0.0.1" if name == "127.0.0.1" else name, port or c.cfg.broker_tls_port, 10)
    except (ssl.SSLError, OSError) as e:
        return getattr(e, "reason", None) or type(e).__name__
    cl.loop_start()
    t = time.monotonic()
    while not got and time.monotonic() - t < 5:
        time.sleep(0.02)
    cl.loop_stop()
    cl.disconnect()
    return int(got[0].value) if got else "no CONNACK"


@pytest.mark.broker
def test_the_generated_community_runs_and_boards_need_the_community_ca(community, tmp_path) -> None:
    c = community
    token = c.cli("installer-token", "electrician", "--days", "1").split("(shown only now):")[1].split()[0]
    creds = c.register(token, "house-1")
    assert creds["community"] == C and creds["broker_port"] == c.cfg.broker_tls_port
    assert creds["broker_user"] == f"{C}.house-1"
    # the board's account over TLS, trusting the community CA: accepted
    assert _tls_connect(c, creds, c.d / "ca.pem") == 0
    # trusting some other CA: the broker's certificate is refused
    other = tmp_path / "other"
    other.mkdir()
    pki.make_ca(other / "ca.pem", other / "ca.key", "elm")
    assert _tls_connect(c, creds, other / "ca.pem") == "CERTIFICATE_VERIFY_FAILED"
    # plain text on the boards' port: no MQTT session
    with socket.create_connection(("127.0.0.1", c.cfg.broker_tls_port), 5) as s:
        s.settimeout(5)
        s.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 0]))
        try:
            answer = s.recv(4)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"\x20"), "a CONNACK in plain text on the TLS listener"
    # the gateway's own listener is loopback only and nobody but the gateway gets in
    assert f"listener {c.cfg.broker_port} 127.0.0.1" in (c.d / "mosquitto.conf").read_text()
    assert c.cli("status").startswith(f"community {C}: 1 devices, 0 online")


@pytest.mark.broker
def test_the_installer_api_is_https_with_the_routers_certificate(community, tmp_path) -> None:
    # the token and a board's secrets cross the LAN: only over TLS, and the
    # electrician's laptop checks it reaches the community's gateway
    from peergrid.commissioning.commission import Gateway
    from peergrid.commissioning.errors import Stop

    c = community
    token = c.cli("installer-token", "electrician", "--days", "1").split("(shown only now):")[1].split()[0]
    with socket.create_connection(("127.0.0.1", c.cfg.http_port), 5) as s:      # plain HTTP: no answer
        s.settimeout(5)
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        try:
            answer = s.recv(64)
        except (ConnectionResetError, socket.timeout):
            answer = b""
    assert not answer.startswith(b"HTTP/"), answer
    other = tmp_path / "other"
    other.mkdir()
    pki.make_ca(other / "ca.pem", other / "ca.key", "elm")
    with pytest.raises(Stop, match="not the community's"):
        Gateway(f"https://127.0.0.1:{c.cfg.http_port}", token, other / "ca.pem").call("GET", "/installer/device/x")
    gw = Gateway(f"https://localhost:{c.cfg.http_port}", token, c.d / "ca.pem")
    with pytest.raises(Stop, match="refused"):             # through TLS to the API itself: no such device
        gw.call("GET", "/installer/device/nobody")
    refused = [ln for ln in c.metrics().splitlines() if "http_tls_refused" in ln and not ln.startswith("#")]
    assert refused and float(refused[0].split()[-1]) >= 2, refused       # the plain request and the wrong CA


@pytest.mark.broker
def test_from_init_to_a_settled_reading_from_the_real_firmware_over_tls(tmp_path) -> None:
    # the README's "Run a community" end to end: init, the generated broker
    # and gateway, a house registered through the installer API, and the real
    # firmware on MicroPython publishing over TLS with the community CA it
    # was given; its readings are stored and its interval settled
    import sqlite3

    from peergrid.market import ledger
    from peergrid.sim.vboard import VirtualBoard, default_config

    d = tmp_path / "community"
    rc, _, err = _init(d, "--interval-min", "1", "--grace-s", "3", names=("localhost", "127.0.0.1"))
    assert rc == 0, err
    c = Community(d)
    c.start()
    vb = None
    try:
        token = c.cli("installer-token", "electrician", "--days", "1").split("(shown only now):")[1].split()[0]
        req = urllib.request.Request(
            f"https://localhost:{c.cfg.http_port}/installer/register", method="POST",
            data=json.dumps({"member": "Miller", "device": "house-1", "board": "sim",
                             "channels": [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 32},
                                          {"role": "load", "rating_a": 50}, {"role": "ev", "rating_a": 50}]}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10, context=c.https()) as r:
            creds = json.loads(r.read())
        tls = creds["broker_tls"]
        assert tls["port"] == c.cfg.broker_tls_port and tls["name"] == "localhost" and creds["ntp"] == "localhost"
        cfg = default_config(C, "house-1", bytes.fromhex(creds["secret"]), "127.0.0.1", tls["port"],
                             creds["broker_user"], creds["broker_password"],
                             tls={"ca": tls["ca"], "name": tls["name"]}, period_s=5)
        cfg["sim"]["start"] = int(time.time())           # the board's clock: now, as NTP would set it
        vb = VirtualBoard(tmp_path / "board", cfg, speed=1)
        vb.start()
        db = sqlite3.connect(str(d / "gateway.db"), timeout=10)
        deadline = time.monotonic() + 40
        first = None
        while first is None and time.monotonic() < deadline:
            first = db.execute("SELECT MIN(t) FROM readings WHERE device='house-1'").fetchone()[0]
            time.sleep(0.5)
        assert first is not None, "no reading from the board stored: " + (d / "mosquitto.log").read_text()[-800:]
        # the first whole minute after the first reading is the board's first
        # interval with both ends measured; it is settled once it ended, the
        # 3 s grace passed and the settler came round
        start = (int(first) // 60 + 1) * 60
        deadline = time.monotonic() + max(0, start + 60 - time.time()) + 40
        settled = None
        while settled is None and time.monotonic() < deadline:
            settled = db.execute("SELECT ledger_n FROM settled WHERE community=? AND start=?", (C, start)).fetchone()
            time.sleep(1)
        assert settled is not None, "the board's first whole interval was not settled"
        raw = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(d / "peergrid.toml"), "ledger",
                              "export"], capture_output=True, timeout=60).stdout
        entries = {e.n: e for e in ledger.verify(raw)}
        body = entries[settled[0]].body
        flows = dict(zip(body["flows"][0::3], zip(body["flows"][1::3], body["flows"][2::3])))
        assert body["start"] == start and creds["member"] in flows, body

        # the member's settled energy is what its board measured in that
        # minute: between the register steps of the readings inside it and
        # those of the readings around it (the boundaries are interpolated)
        def regs(where: str, order: str) -> tuple[int, int]:
            return db.execute(f"SELECT grid_imp_wh, grid_exp_wh FROM readings WHERE device='house-1' AND {where}"
                              f" ORDER BY t {order} LIMIT 1", (start, start + 60)).fetchone()
        inner = [regs("t >= ? AND t <= ?", o) for o in ("ASC", "DESC")]
        outer = [regs("t <= ? AND t >= ? - 120", "DESC"), regs("t >= ? + 60 AND t >= ?", "ASC")]
        for k in (0, 1):
            lo, hi = inner[1][k] - inner[0][k], outer[1][k] - outer[0][k]
            assert lo <= flows[creds["member"]][k] <= hi, (k, flows, inner, outer)
        assert sum(flows[creds["member"]]) > 0, "the board measured nothing"
    finally:
        if vb is not None:
            vb.stop()
        c.stop()
