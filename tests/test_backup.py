"""Backups and restore (peergrid/operate/backup.py, restore.py) with a real
gateway, a real mosquitto and three boards publishing all the while.

One run, in the order an operator meets it: a gateway settles its past
intervals (1-minute intervals; the boards' buffered readings of the last
minutes); `peergrid backup` is taken while the boards publish and the
gateway writes; the gateway goes on, settles one more interval and is
killed (SIGKILL) with the boards still publishing; `peergrid restore` puts
the backup into a fresh directory and the restored gateway starts on the
same broker session. Then: the restored ledger verifies, continues from the
backup's head and settles the interval the lost entry had settled, once and
with the same figures; the boards' new readings are accepted with no replay
refused; and what the restore lost is exactly the readings the old gateway
stored after the backup (README, "Backups, restore and upgrades"). Around
it: a restore onto an existing or running gateway's database, every damaged
file, and the file modes.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import board_client, free_port, stop_process, wait_port, wait_until
from peergrid import schema
from peergrid.community import registry as reg
from peergrid.community.broker import write_broker_files
from peergrid.config import Config
from peergrid.market import ledger
from peergrid.operate import restore
from protocol import messages
from protocol.link import DeviceLink

pytestmark = pytest.mark.broker
C = "elm"
CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]
DUE_IN = 20         # s from the start until the interval after the backup's head is due


class Board:
    """A board's uplink: its own account, frames sealed as the firmware seals
    them, registers that grow with `watts`; every (seq) the broker took."""

    def __init__(self, port: int, device: str, secret: bytes, password: str, watts: int) -> None:
        self.device, self.watts = device, watts
        self.link = DeviceLink(C, device, secret)
        self.seq, self.wh, self.t = 0, 10_000.0, None
        self.sent: list[int] = []
        self.c = board_client(reg.broker_user(C, device), password, port)

    def send(self, t: float, flags: int = 0) -> None:
        if self.t is not None:
            self.wh += self.watts * (t - self.t) / 3600
        self.t = t
        self.seq += 1
        f = self.link.reading(1, self.seq, int(t), flags, 2300, 5000,
                              [self.watts, int(self.wh), 0, 4000, 0, 0, 0, 0], 2)
        self.c.publish(self.link.t_reading, bytes(f), qos=1).wait_for_publish(5)
        self.sent.append(self.seq)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cli(cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfg), *args], capture_output=True,
                          timeout=60)


def _q(db: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(str(db), timeout=30) as c:
        return list(c.execute(sql, args))


def _seqs(db: Path) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for d, s in _q(db, "SELECT device, seq FROM readings"):
        out.setdefault(d, set()).add(s)
    return out


def _wait(pred, timeout: float, what: str, log: Path) -> None:
    wait_until(pred, timeout, what, log, every=0.1)


def _start(cfg: Path, log: Path) -> subprocess.Popen:
    n0 = log.read_text().count("connected to") if log.exists() else 0
    p = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(cfg), "run"], stdout=subprocess.DEVNULL,
                         stderr=open(log, "a"))
    _wait(lambda: log.read_text().count("connected to") > n0, 15, "gateway connected", log)
    time.sleep(0.3)                               # subscription acknowledged
    return p


def _settlements(export: bytes) -> list[ledger.Entry]:
    return [e for e in ledger.verify(export) if e.type == "settlement"]


def test_backup_under_load_restores_and_the_gateway_goes_on(tmp_path) -> None:
    t_start = time.time()
    end = int(t_start) // 60 * 60                 # [end - 60, end) is due DUE_IN s after the start
    a, c = tmp_path / "a", tmp_path / "c"
    a.mkdir(mode=0o700)
    port, http = free_port(), free_port()
    cfg_a = a / "gw.toml"
    cfg_a.write_text(
        f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {http}\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\nuser = "gateway"\npassword = "gw-pass"\n'
        'passwd_file = "passwd"\nacl_file = "acl"\n[ingest]\nmax_skew_s = 300\nbatch_ms = 5\n'
        f'[settlement]\nretail = 30\nfeed_in = 8\ninterval_min = 1\ngrace_s = {int(t_start) + DUE_IN - end}\n')
    cfg_a.chmod(0o600)
    r = reg.Registry(reg.connect(a / "gw.db"))
    r.add_community(C)
    creds = {d: r.add_device(C, d, "sim", CHANNELS, r.add_member(C, d)) for d in ("house-a", "house-b", "house-c")}
    write_broker_files(Config.load(cfg_a), r)
    r.db.close()
    (a / "acl").chmod(0o640)                      # a mode other than 0600, to see it restored
    fd = os.open(a / "gateway.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, os.urandom(32))
    os.close(fd)
    (tmp_path / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {a / 'passwd'}\nacl_file {a / 'acl'}\n"
        "persistence false\nmax_queued_messages 100000\nlog_dest none\n"
        + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp_path / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    gw_a = gw_c = None
    boards: list[Board] = []
    stop = threading.Event()
    th = None
    try:
        wait_port(port, broker)
        log_a, log_c = a / "gw.log", tmp_path / "gw-c.log"
        gw_a = _start(cfg_a, log_a)
        boards = [Board(port, d, s, p, w) for (d, (s, p)), w in zip(creds.items(), (2400, 900, 300))]
        # the boards' buffered readings of the last minutes: every interval
        # before [end - 60, end) is due at once
        t = end - 200
        while t <= time.time():
            for b in boards:
                b.send(t, messages.F_BUFFERED)
            t += 10
        first = [end - 240, end - 180, end - 120]
        _wait(lambda: [s for (s,) in _q(a / "gw.db", "SELECT start FROM settled ORDER BY start")] == first, 15,
              "the past intervals settled", log_a)

        def load() -> None:
            while not stop.is_set():
                for b in boards:
                    b.send(time.time())
                time.sleep(0.05)

        th = threading.Thread(target=load, daemon=True)
        th.start()
        time.sleep(1)

        # -- a restore onto the running gateway's directory is refused --------------------------------
        bk = tmp_path / "bk"
        n0 = _q(a / "gw.db", "SELECT COUNT(*) FROM readings")[0][0]
        out = _cli(cfg_a, "backup", "--out", str(bk))
        assert out.returncode == 0, out.stderr.decode()
        time.sleep(0.3)
        n1 = _q(a / "gw.db", "SELECT COUNT(*) FROM readings")[0][0]
        nb = _q(bk / "gateway.db", "SELECT COUNT(*) FROM readings")[0][0]
        assert n0 < nb < n1, (n0, nb, n1)         # taken while readings were being written
        m = json.loads((bk / "manifest.json").read_text())
        assert {f["role"] for f in m["files"]} == {"database", "ledger", "config", "ledger_key", "report_key",
                                                   "passwd", "acl"}
        assert [s for (s,) in _q(bk / "gateway.db", "SELECT start FROM settled ORDER BY start")] == first, \
            "the backup came too late for this test: the next interval was settled already"
        assert m["schema_version"] == schema.CURRENT and m["ledger"]["entries"] == 4      # genesis and three settlements
        # a secret-holding backup: the directory 0700, every file 0600
        assert _mode(bk) == 0o700 and all(_mode(f) == 0o600 for f in bk.iterdir()), \
            {f.name: oct(_mode(f)) for f in bk.iterdir()}
        for args in ((), ("--force",)):
            rr = _cli(cfg_a, "restore", str(bk), *args)
            assert rr.returncode == 1 and str(a / "gw.db") in rr.stderr.decode(), rr.stderr.decode()
            assert ("open in another program" if args else "only with --force") in rr.stderr.decode()
        assert gw_a.poll() is None

        # -- the old gateway settles one more interval, then dies --------------------------------------
        _wait(lambda: len(_q(a / "gw.db", "SELECT 1 FROM settled")) == 4, DUE_IN + 10,
              "the old gateway settles the interval after the backup", log_a)
        gw_a.send_signal(signal.SIGKILL)
        gw_a.wait()
        lost_entry = _settlements(b"".join(bytes(x[0]) for x in _q(a / "gw.db", "SELECT raw FROM ledger ORDER BY n")))[-1]
        assert lost_entry.body["start"] == end - 60

        # -- restored into a fresh directory, on the same broker session -------------------------------
        rr = _cli(c / "gw.toml", "restore", str(bk))
        assert rr.returncode == 0, rr.stderr.decode()
        for name in ("gw.toml", "gw.db", "ledger.key", "gateway.key", "passwd"):
            assert _mode(c / name) == 0o600, name
        assert _mode(c / "acl") == 0o640
        assert _cli(c / "gw.toml", "ledger", "export").stdout == (bk / "ledger.cbor").read_bytes()
        gw_c = _start(c / "gw.toml", log_c)
        after = max(b.seq for b in boards)
        _wait(lambda: all(max(s) > after + 20 for s in _seqs(c / "gw.db").values()), 15,
              "new readings accepted by the restored gateway", log_c)
        _wait(lambda: len(_q(c / "gw.db", "SELECT 1 FROM settled")) == 4, 10,
              "the restored gateway settles the next interval", log_c)
        stop.set()
        th.join(10)
        seqs_a, seqs_bk = _seqs(a / "gw.db"), _seqs(bk / "gateway.db")
        _wait(lambda: all(set(b.sent) - seqs_a[b.device] <= _seqs(c / "gw.db")[b.device] for b in boards), 10,
              "everything the old gateway never stored reaches the restored one", log_c)
        time.sleep(5.5)                           # one more settlement loop: adjustments, if any
        gw_c.send_signal(signal.SIGTERM)
        assert gw_c.wait(20) == 0

        export = _cli(c / "gw.toml", "ledger", "export").stdout
        assert export.startswith((bk / "ledger.cbor").read_bytes())
        sett = _settlements(export)
        assert [e.body["start"] for e in sett] == first + [end - 60]           # from the head, once each
        assert sett[-1].n == m["ledger"]["entries"] and sett[-1].prev.hex() == m["ledger"]["head_sha256"]
        assert sett[-1].body["flows"] == lost_entry.body["flows"]              # the lost entry's figures
        assert sett[-1].body["amounts"] == lost_entry.body["amounts"]
        # no reading refused (no replay from the restored replay state)
        assert _q(c / "gw.db", "SELECT what, n FROM counters WHERE what LIKE 'reject:%'") == []
        # what the restore lost: exactly readings the old gateway stored after the backup
        seqs_c = _seqs(c / "gw.db")
        lost = 0
        for b in boards:
            assert seqs_bk[b.device] <= seqs_c[b.device]
            missing = set(b.sent) - seqs_c[b.device]
            assert missing <= seqs_a[b.device] - seqs_bk[b.device], b.device
            lost += len(missing)
        assert lost > 0
        print(f"\nbackup under load: {nb} readings in the backup ({n0} before, {n1} after it); restored gateway "
              f"missing {lost} readings the old one stored after the backup; {time.time() - t_start:.1f} s")
    finally:
        stop.set()
        if th is not None:
            th.join(10)
        for b in boards:
            b.close()
        for p in (gw_a, gw_c):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        stop_process(broker)


@pytest.fixture
def backup_dir(tmp_path) -> Path:
    """A backup of a small gateway (the version-1 fixture) made in-process."""
    from peergrid.operate import backup

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(Path(__file__).parent / "data" / "gateway-v1.sqlite", src / "gw.db")
    shutil.copyfile(Path(__file__).parent / "data" / "gateway-v1.ledger.key", src / "ledger.key")
    cfg = src / "gw.toml"
    cfg.write_text('[gateway]\ncommunity = "oak"\ndb = "gw.db"\n[broker]\npasswd_file = "passwd"\n'
                   'acl_file = "acl"\n[settlement]\nretail = 30\nfeed_in = 8\n')
    r = reg.Registry(reg.connect(src / "gw.db"))
    write_broker_files(Config.load(cfg), r)
    out, _ = backup.backup(cfg, tmp_path / "bk")
    return out


@pytest.mark.parametrize("name", ["gateway.db", "ledger.cbor", "ledger.key", "peergrid.toml", "passwd", "acl",
                                  "manifest.json"])
def test_a_damaged_backup_is_refused_naming_the_file(backup_dir, tmp_path, capsys, name) -> None:
    p = backup_dir / name
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x10
    p.write_bytes(bytes(data))
    target = tmp_path / "new"
    assert restore.main(["-c", str(target / "gw.toml"), str(backup_dir)]) == 1
    err = capsys.readouterr().err
    assert f"restore refused: {p}:" in err and "SHA-256" in err, err
    assert not target.exists() or not any(target.iterdir())                # nothing written


def test_restore_onto_an_existing_database_needs_force_and_keeps_the_old_one(backup_dir, tmp_path, capsys) -> None:
    target = tmp_path / "new"
    assert restore.main(["-c", str(target / "gw.toml"), str(backup_dir)]) == 0
    db = reg.connect(target / "gw.db")
    db.execute("INSERT INTO communities VALUES ('other', 'other', 0)")
    db.close()
    before = (target / "gw.db").read_bytes()
    capsys.readouterr()
    assert restore.main(["-c", str(target / "gw.toml"), str(backup_dir)]) == 1
    assert "exists: a restore replaces a database only with --force" in capsys.readouterr().err
    assert (target / "gw.db").read_bytes() == before
    assert restore.main(["-c", str(target / "gw.toml"), str(backup_dir), "--force"]) == 0
    kept = list(target.glob("gw.db.replaced-*"))
    assert len(kept) == 1 and _mode(kept[0]) == 0o600
    assert _q(kept[0], "SELECT COUNT(*) FROM communities WHERE id='other'") == [(1,)]    # the old one, whole
    assert _q(target / "gw.db", "SELECT COUNT(*) FROM communities WHERE id='other'") == [(0,)]
