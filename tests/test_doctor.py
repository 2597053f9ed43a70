"""`peergrid doctor` (issue 19 part 3) and a gateway that says what is wrong
with its broker: each problem an operator meets is made for real (a broker
that is down, a wrong password against a real mosquitto, certificates close
to or past expiry and one the listener does not present, a full disk and a
database that refuses a write, secret files others can read, a taken HTTP
port) and the doctor must name it and give the advice that fixes it. Then
`peergrid run` started before its broker: it logs why it cannot connect,
keeps retrying, shows the state on /metrics and in `peergrid status`, and
ingests once the broker is there and accepts it."""
from __future__ import annotations

import datetime as dt
import grp
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as mqtt
import pytest

from harness import Broker, free_port, registry_broker, stop_process, wait_port
from peergrid import schema
from peergrid.community import pki
from peergrid.community import registry as reg
from peergrid.config import Config
from peergrid.ingest import brokerlink
from peergrid.operate import doctor, init
from protocol.link import DeviceLink

pytestmark = pytest.mark.broker
C = "oak"
NOW = dt.datetime.now(dt.timezone.utc)


def _me() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _only(findings: list[doctor.Finding], level: str) -> list[doctor.Finding]:
    return [f for f in findings if f.level == level]


def _one_error(findings: list[doctor.Finding], *words: str) -> doctor.Finding:
    errors = _only(findings, "error")
    assert len(errors) == 1, findings
    assert all(w in errors[0].what for w in words), errors[0]
    return errors[0]


class Community:
    """A directory made by `peergrid init` (config, CA, broker certificate,
    mosquitto.conf with a TLS listener, passwd, keys), its mosquitto started
    from exactly that config on demand."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "oak"
        rc = init.main([str(self.dir), "--community", C, "--address", "127.0.0.1", "--name", "localhost",
                        "--retail", "3187", "--feed-in", "812", "--port", str(free_port()), "--tls-port",
                        str(free_port()), "--http-port", str(free_port()), "--user", _me(), "-y"])
        assert rc == 0
        self.path = self.dir / "peergrid.toml"
        self.cfg = Config.load(self.path)
        self.broker: subprocess.Popen | None = None

    def start_broker(self) -> None:
        self.broker = subprocess.Popen(["mosquitto", "-c", str(self.dir / "mosquitto.conf")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.cfg.broker_port, self.broker)
        wait_port(self.cfg.broker_tls_port, self.broker)

    def stop_broker(self) -> None:
        stop_process(self.broker)


@pytest.fixture
def community(tmp_path):
    c = Community(tmp_path)
    yield c
    c.stop_broker()


def test_a_healthy_community_is_all_well(community, capsys) -> None:
    community.start_broker()
    rc = doctor.main(["-c", str(community.path), "--skip", "clock", "--json"])
    out = capsys.readouterr().out
    body = json.loads(out)
    assert rc == 0 and body["ok"] and body["errors"] == 0 and body["warnings"] == 0, out
    assert {f["check"] for f in body["findings"]} == set(doctor.CHECKS) - {"clock"}
    assert any("accepts the gateway's user name and password" in f["what"] for f in body["findings"])
    assert doctor.main(["-c", str(community.path), "--skip", "clock"]) == 0
    text = capsys.readouterr().out
    assert text.rstrip().endswith("all well"), text
    assert community.cfg.broker_password not in out + text            # never shown
    # with its gateway running (HTTPS, as init sets it up): the doctor asks it rather than connecting again
    gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(community.path), "run"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(community.cfg.http_port, gw, "the gateway's HTTPS")
        deadline = time.monotonic() + 15
        while not (brokerlink.read_state(community.cfg.db) or {}).get("broker", {}).get("connected"):
            assert time.monotonic() < deadline and gw.poll() is None, "the gateway did not connect"
            time.sleep(0.1)
        assert doctor.main(["-c", str(community.path), "--skip", "clock", "--json"]) == 0
        found = {f["check"]: f["what"] for f in json.loads(capsys.readouterr().out)["findings"]}
        assert "is served by a running gateway" in found["http"], found
        assert f"the running gateway (pid {gw.pid}) is connected" in found["broker"], found
    finally:
        stop_process(gw, 15)


def test_broker_down_and_wrong_password_are_told_apart(tmp_path) -> None:
    port = free_port()
    p = tmp_path / "gw.toml"
    p.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n[broker]\nport = {port}\nuser = "admin"\n'
                 'password = "wrong-pass"\n')
    p.chmod(0o600)
    cfg = Config.load(p)
    down = _one_error(doctor.check_broker(cfg, p, timeout=2), "down", "connection refused", str(port))
    assert "start mosquitto" in down.advice and "journalctl -u mosquitto" in down.advice
    # a running gateway that says it is connected is believed: the doctor does not connect a second time
    st = {"alive": True, "pid": 1, "broker": {"connected": True, "port": port}}
    assert _only(doctor.check_broker(cfg, p, state=st), "ok")
    assert doctor.main(["-c", str(p), "--skip", "clock"]) == 1

    (tmp_path / "mq").mkdir()
    b = Broker(tmp_path / "mq")                # a real mosquitto with a password file (admin / admin-pass)
    try:
        cfg.broker_port = b.port
        auth = _one_error(doctor.check_broker(cfg, p, timeout=3), "not authorised", "user name or password")
        assert "broker-files" in auth.advice and str(p) in auth.advice and "wrong-pass" not in auth.what
        cfg.broker_password = "admin-pass"
        good = doctor.check_broker(cfg, p, timeout=3)
        assert [f.level for f in good] == ["ok"] and "accepts" in good[0].what
    finally:
        b.stop()


def test_certificates_close_to_or_past_expiry_or_not_presented(community) -> None:
    c, d = community, community.dir
    community.start_broker()
    assert _only(doctor.check_tls(c.cfg, c.path), "ok")
    # a certificate renewed with 10 days left: a warning, and mosquitto still presents the old one
    pki.make_server_cert(d / "broker.pem", d / "broker.key", d / "ca.pem", d / "ca.key", ["127.0.0.1", "localhost"],
                         days=10)
    found = doctor.check_tls(c.cfg, c.path)
    warn = _only(found, "warning")
    assert len(warn) == 1 and "expires in" in warn[0].what and "days" in warn[0].what, found
    assert f"peergrid init {d}" in warn[0].advice
    old = _one_error(found, "presents another certificate")
    assert "restart mosquitto" in old.advice
    community.stop_broker()
    community.start_broker()                  # restarted: the listener presents the new one
    found = doctor.check_tls(c.cfg, c.path)
    assert [f.level for f in found] == ["warning"], found
    # expired: boards refuse it, and so does the handshake
    pki.make_server_cert(d / "broker.pem", d / "broker.key", d / "ca.pem", d / "ca.key", ["127.0.0.1", "localhost"],
                         days=10, now=NOW - dt.timedelta(days=20))
    community.stop_broker()
    community.start_broker()
    found = doctor.check_tls(c.cfg, c.path)
    expired = [f for f in found if "expired on" in f.what]
    assert len(expired) == 1 and expired[0].level == "error" and "peergrid init" in expired[0].advice, found
    assert any("does not verify" in f.what and "expired" in f.what for f in found), found
    # a certificate that does not name what the boards dial
    pki.make_server_cert(d / "broker.pem", d / "broker.key", d / "ca.pem", d / "ca.key", ["127.0.0.1"])
    assert any("does not name localhost" in f.what for f in doctor.check_tls(c.cfg, c.path))


def _statvfs(free_bytes: int, inodes: int = 1000):
    return lambda path: SimpleNamespace(f_bavail=free_bytes // 4096, f_frsize=4096, f_files=10_000,
                                        f_favail=inodes)


def test_a_full_disk_and_a_database_that_refuses_writes(tmp_path) -> None:
    p = tmp_path / "gw.toml"
    p.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n')
    cfg = Config.load(p)
    r = reg.Registry(reg.connect(cfg.db))
    r.add_community(C)
    r.add_device(C, "house-a", "sim", [{"role": "grid", "rating_a": 100}], r.add_member(C, "a"))
    r.db.close()
    found = doctor.check_database(cfg, statvfs=_statvfs(10 << 30))
    assert not _only(found, "error") and not _only(found, "warning"), found
    assert any(f"schema version {schema.CURRENT}" in f.what for f in found)
    full = _one_error(doctor.check_database(cfg, statvfs=_statvfs(0)), "is full")
    assert "df -h" in full.advice and "acknowledges nothing" in full.advice
    low = _one_error(doctor.check_database(cfg, min_free_mb=50, statvfs=_statvfs(10 << 20)), "MB free")
    assert "--min-free-mb" in low.what and "df -h" in low.advice
    assert _one_error(doctor.check_database(cfg, statvfs=_statvfs(10 << 30, inodes=0)), "no free inodes")
    assert _only(doctor.check_database(cfg, min_free_mb=5, statvfs=_statvfs(10 << 20)), "warning")

    # a real SQLite write that fails with SQLITE_FULL: a copy limited to the pages it has
    copy = tmp_path / "copy.db"
    shutil.copy(cfg.db, copy)
    cfg.db = copy

    def limited(path: str) -> sqlite3.Connection:
        db = sqlite3.connect(path)
        n = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {n}")
        return db

    big = _statvfs(10 << 30)
    assert not _only(doctor.check_database(cfg, statvfs=big), "error")          # the same copy, no limit
    full = _one_error(doctor.check_database(cfg, statvfs=big, connect=limited), "database or disk is full")
    assert "free space" in full.advice
    assert sqlite3.connect(copy).execute("SELECT name FROM sqlite_master WHERE name LIKE '%doctor%'").fetchall() == []
    # a newer gateway's database, and a damaged one
    with sqlite3.connect(copy) as db:
        db.execute(f"PRAGMA user_version = {schema.CURRENT + 1}")
    newer = _one_error(doctor.check_database(cfg, statvfs=big), "newer than this gateway knows")
    assert "restore a backup" in newer.advice
    with sqlite3.connect(copy) as db:
        db.execute(f"PRAGMA user_version = {schema.CURRENT}")
    data = bytearray(copy.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page + 8: 2 * page] = b"\xa5" * (page - 8)              # the second page (a table's b-tree) is garbage
    copy.write_bytes(bytes(data))
    found = doctor.check_database(cfg, statvfs=big)
    bad = _one_error(found, "is damaged")
    assert "peergrid restore" in bad.advice and ".recover" in bad.advice, bad
    assert not any("check ok" in f.what for f in found), found


def test_secret_files_open_to_others(community) -> None:
    c, d = community, community.dir
    assert [f.level for f in doctor.check_permissions(c.cfg, c.path)] == ["ok"]
    (d / "passwd").chmod(0o644)
    (d / "ledger.key").chmod(0o604)
    c.path.chmod(0o640)
    found = doctor.check_permissions(c.cfg, c.path)
    by = {Path(f.what.split(" ")[0]).name: f for f in _only(found, "error")}
    assert set(by) == {"passwd", "ledger.key", "peergrid.toml"}, found
    assert "its group and everyone: mode 0644" in by["passwd"].what
    assert by["passwd"].advice.startswith(f"chmod 600 {d / 'passwd'}") and "chgrp mosquitto" in by["passwd"].advice
    assert "open to everyone: mode 0604" in by["ledger.key"].what and "ledger" in by["ledger.key"].what
    assert "broker password" in by["peergrid.toml"].what and by["peergrid.toml"].advice == f"chmod 600 {c.path}"
    for name in ("passwd", "ledger.key"):
        (d / name).chmod(0o600)
    c.path.chmod(0o600)
    # the broker's key: group-readable only by the group mosquitto
    (d / "broker.key").chmod(0o640)
    assert "broker's TLS key" in _one_error(doctor.check_permissions(c.cfg, c.path), "broker.key").what
    try:
        gid = grp.getgrnam("mosquitto").gr_gid
    except KeyError:
        return
    os.chown(d / "broker.key", -1, gid)
    assert [f.level for f in doctor.check_permissions(c.cfg, c.path)] == ["ok"]


def test_clock_synchronised_or_not_or_cannot_tell() -> None:
    assert [f.level for f in doctor.check_clock(lambda: True)] == ["ok"]
    no = doctor.check_clock(lambda: False)
    assert no[0].level == "warning" and "not synchronised" in no[0].what and "set-ntp true" in no[0].advice
    unknown = doctor.check_clock(lambda: None)
    assert unknown[0].level == "warning" and "cannot tell" in unknown[0].what
    wrong = doctor.check_clock(lambda: True, now=lambda: 86400.0)
    assert wrong[0].level == "error" and "1970-01-02" in wrong[0].what


def test_http_port_free_or_taken_by_another_program(tmp_path) -> None:
    port = free_port()
    p = tmp_path / "gw.toml"
    p.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {port}\n')
    cfg = Config.load(p)
    assert [f.level for f in doctor.check_http(cfg)] == ["ok"] and "is free" in doctor.check_http(cfg)[0].what
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        threading.Thread(target=lambda: s.accept()[0].close(), daemon=True).start()
        taken = _one_error(doctor.check_http(cfg, timeout=1), "another program")
    assert f"sport = :{port}" in taken.advice


def test_why_a_connection_failed_is_told_in_words() -> None:
    # what the gateway logs and the doctor prints, per kind of failure
    assert brokerlink.classify(socket.gaierror(-2, "Name or service not known"), "gw.oak.lan", 1883) == (
        "dns", "cannot resolve the host name 'gw.oak.lan' (DNS: Name or service not known)")
    assert brokerlink.classify(ConnectionRefusedError(111, "refused"), "h", 1883)[0] == "refused"
    assert brokerlink.classify(TimeoutError(), "h", 1883)[0] == "timeout"
    assert brokerlink.classify(OSError(113, "No route to host"), "h", 1883)[0] == "unreachable"
    assert brokerlink.classify_connack(5)[0] == "auth" and brokerlink.classify_connack(3)[0] == "connack"
    for bad in (0, "30", True, 7200):
        with pytest.raises(SystemExit, match="reconnect_max_s"):
            brokerlink.reconnect_max({"broker": {"reconnect_max_s": bad}})
    assert brokerlink.reconnect_max({}) == 30


# -- the gateway without its broker --------------------------------------------------------------------

CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]


def _metrics(port: int) -> dict[str, str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("peergrid_broker_"):
            name, _, v = line.rpartition(" ")
            out[name.split("{")[0]] = name if "{" in name else v
    return out


def _wait(pred, what: str, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out: {what}; log: {log.read_text()[-2000:]}"
        time.sleep(0.1)


def test_run_before_its_broker_retries_says_why_and_ingests_once_it_can(tmp_path) -> None:
    port, http = free_port(), free_port()
    p = tmp_path / "gw.toml"
    p.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {http}\nstatus_every_s = 1\n'
                 f'[broker]\nport = {port}\nuser = "gateway"\npassword = "gw-pass"\npasswd_file = "passwd"\n'
                 'acl_file = "acl"\npid_file = "mosquitto.pid"\nreconnect_max_s = 2\n')
    r = reg.Registry(reg.connect(tmp_path / "gw.db"))
    r.add_community(C)
    secret, password = r.add_device(C, "house-a", "sim", CH, r.add_member(C, "a"))
    r.db.close()

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(p), *args], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    cli("broker-files")
    log = tmp_path / "gw.log"
    gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(p), "run"], stdout=subprocess.DEVNULL,
                          stderr=open(log, "w"))
    mq = None
    try:
        wait_port(http, gw, "the gateway's HTTP")
        # down: logged with the reason, retried, visible on /metrics and in status
        _wait(lambda: "connection refused" in log.read_text(), "the error logged", log)
        _wait(lambda: int(_metrics(http)["peergrid_broker_failed_attempts"]) >= 2, "a second attempt", log)
        m = _metrics(http)
        assert m["peergrid_broker_connected"] == "0" and 'kind="refused"' in m["peergrid_broker_last_error_info"]
        entry = next(json.loads(x) for x in log.read_text().splitlines() if "connection refused" in x)
        assert entry["level"] == "error" and f"127.0.0.1:{port}" in entry["msg"] and "retrying" in entry["msg"]
        out = cli("status")
        assert f"broker 127.0.0.1:{port}: DISCONNECTED since" in out and "connection refused" in out, out
        assert "gateway: running" in out
        cfg = Config.load(p)
        assert any("no broker connection" in f.what for f in doctor.check_http(cfg))
        # up, but the gateway's password is not the one in its password file: not authorised
        lines = (tmp_path / "passwd").read_text().splitlines()
        (tmp_path / "passwd").write_text("\n".join([f"gateway:{reg.mosquitto_hash('another')}", *lines[1:]]) + "\n")
        mq = registry_broker(tmp_path, port)
        _wait(lambda: "not authorised" in log.read_text(), "not authorised logged", log)
        _wait(lambda: "not authorised" in cli("status"), "not authorised in status", log)
        assert "gw-pass" not in log.read_text()
        # what the doctor advises fixes it: broker-files writes the account and reloads mosquitto
        assert "broker-files" in _one_error(doctor.check_broker(cfg, p), "not authorised").advice
        cli("broker-files")
        _wait(lambda: "connected to" in log.read_text(), "connected", log)
        _wait(lambda: _metrics(http)["peergrid_broker_connected"] == "1", "connected on /metrics", log)
        assert _metrics(http)["peergrid_broker_failed_attempts"] == "0"
        _wait(lambda: "connected since" in cli("status"), "connected in status", log)
        assert [f.level for f in doctor.check_broker(cfg, p)] == ["ok"]
        assert "running gateway" in doctor.check_broker(cfg, p)[0].what        # not a second connection
        # and it ingests
        link = DeviceLink(C, "house-a", secret)
        board = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=reg.broker_user(C, "house-a"))
        board.username_pw_set(reg.broker_user(C, "house-a"), password)
        board.connect("127.0.0.1", port)
        board.loop_start()
        frame = link.reading(1, 0, int(time.time()), 0, 2300, 5000, [500, 1000, 10, 2100, -300, 0, 40, 1300], 2)
        board.publish(link.t_reading, bytes(frame), qos=1).wait_for_publish(5)
        board.loop_stop()
        board.disconnect()

        def stored() -> int:
            with sqlite3.connect(tmp_path / "gw.db", timeout=30) as db:
                return db.execute("SELECT COUNT(*) FROM readings WHERE device='house-a'").fetchone()[0]

        _wait(lambda: stored() == 1, "the reading stored", log)
        gw.send_signal(signal.SIGTERM)
        gw.wait(15)
        assert "NOT running (pid" in cli("status") and "stopped cleanly" in cli("status")
        st = brokerlink.read_state(tmp_path / "gw.db")
        assert st is not None and not st["alive"] and st["broker"]["connects"] == 1
    finally:
        stop_process(gw, 15)
        stop_process(mq)
