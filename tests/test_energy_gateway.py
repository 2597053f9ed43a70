"""One board cannot stall the community (issue 17), end to end: a real
mosquitto with the registry's accounts and ACL, `peergrid run` with its
settlement loop (1-minute intervals) through one full interval, three honest
boards sending a reading every two seconds, and one member's authentic board that tries to mint
10^9 Wh every few seconds (live, flagged buffered from a month ago, with an
unsynced clock, across a reboot) and sends registers that go backwards out of
order and across a gateway killed with SIGKILL and restarted. A fifth
device's stored readings (from before the gateway checked them) cannot be
settled.

Done when: every interval is settled on time (by its end + grace + one
settlement loop), every honest Wh is paid and 0 minted Wh; the dishonest
board's readings are refused with their reason, counted, logged (JSON with
the reason) and the device is flagged in the metrics; the unsettleable
device is held in each ledger entry with its reason, logged, and counted.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from harness import board_client, free_port, wait_port, wait_until
from peergrid.market import ledger
from peergrid.community import registry as reg
from protocol import messages
from protocol.link import DeviceLink

pytestmark = pytest.mark.broker
C = "elm"
CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]
GRACE = 3
LOOP = 5            # the gateway's settlement loop runs every 5 s


class Board:
    """An authentic board: its own broker account and key; registers that
    count `watts` of import since `t0`."""

    def __init__(self, port: int, device: str, secret: bytes, password: str, watts: float) -> None:
        self.device = device
        self.link = DeviceLink(C, device, secret)
        self.boot, self.seq = 1, 0
        self.watts = watts
        self.t0 = time.time()
        self.truth: list[tuple[float, float]] = []       # (t, import) of the accepted honest readings
        self.c = board_client(reg.broker_user(C, device), password, port, client_id=f"{C}.{device}")

    def imp(self, t: float) -> int:
        return 10_000 + int(self.watts * (t - self.t0) / 3600)

    def send(self, t: int | None = None, imp: int | None = None, flags: int = 0, seq: int | None = None,
             boot: int | None = None, record: bool = True) -> None:
        now = int(time.time()) if t is None else t
        i = self.imp(now) if imp is None else imp
        if seq is None:
            seq = self.seq
            self.seq += 3          # holes: room for readings that arrive later
        f = self.link.reading(boot or self.boot, seq, now, flags, 2300, 5000, [int(self.watts), i, 0, 9000,
                                                                             0, 0, 0, 0], 2)
        self.c.publish(self.link.t_reading, bytes(f), qos=1).wait_for_publish(5)
        if record:
            self.truth.append((now, i))

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.http_port = free_port()
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {self.http_port}\nstatus_every_s = 1\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\nuser = "gateway"\npassword = "gw-pass"\n'
            f'passwd_file = "passwd"\nacl_file = "acl"\n'
            f'[ingest]\nmax_skew_s = 300\nbatch_ms = 5\n'
            f'[settlement]\nretail = 30\nfeed_in = 8\ninterval_min = 1\ngrace_s = {GRACE}\n')
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        self.creds: dict[str, tuple[bytes, str]] = {}
        self.member: dict[str, int] = {}
        for d in ("house-a", "house-b", "house-c", "liar", "legacy"):
            m = r.add_member(C, d)
            self.member[d] = m
            self.creds[d] = r.add_device(C, d, "sim", CHANNELS, m)
        r.db.close()
        out = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "broker-files"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        (tmp / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp / 'passwd'}\n"
            f"acl_file {tmp / 'acl'}\npersistence false\nmax_queued_messages 100000\n"
            "log_dest stderr\nlog_type error\n" + ("user root\n" if os.geteuid() == 0 else ""))
        self.broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        self.gw: subprocess.Popen | None = None

    def start_gateway(self) -> None:
        log = self.tmp / "gw.log"
        n0 = log.read_text().count("connected to") if log.exists() else 0
        self.gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                   stdout=subprocess.DEVNULL, stderr=open(log, "a"))
        deadline = time.monotonic() + 15
        while log.read_text().count("connected to") <= n0:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        time.sleep(0.3)

    def kill_gateway(self) -> None:
        assert self.gw is not None
        self.gw.send_signal(signal.SIGKILL)
        self.gw.wait()

    def stop(self) -> None:
        if self.gw and self.gw.poll() is None:
            self.gw.send_signal(signal.SIGTERM)
            try:
                self.gw.wait(20)
            except subprocess.TimeoutExpired:
                self.gw.kill()
        self.broker.terminate()
        self.broker.wait(5)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(str(self.tmp / "gw.db"), timeout=30)

    def board(self, device: str, watts: float) -> Board:
        return Board(self.port, device, self.creds[device][0], self.creds[device][1], watts)

    def log_lines(self) -> list[dict]:
        return [json.loads(x) for x in (self.tmp / "gw.log").read_text().splitlines() if x.startswith("{")]


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.stop()


def _interp(truth: list[tuple[float, float]], t: float) -> float:
    for (ta, a), (tb, b) in zip(truth, truth[1:]):
        if ta <= t <= tb:
            return a + (b - a) * (t - ta) / (tb - ta) if tb > ta else b
    raise AssertionError(f"no reading around {t}")


def test_dishonest_board_cannot_stall_or_mint(rig) -> None:
    start = int(time.time())
    # readings stored before the gateway checked registers: the legacy
    # device's register goes backwards once within boot 1
    with rig.db() as db:
        db.execute("PRAGMA foreign_keys=OFF")
        from peergrid.ingest.store import init
        init(db)
        for k in range(0, 400, 10):
            imp = 500 + k if k != 100 else 3
            db.execute("INSERT INTO readings (frame_id, community, device, boot, seq, t, t_board, t_recv, flags,"
                       " grid_w, grid_imp_wh, grid_exp_wh, ch) VALUES (?, ?, 'legacy', 1, ?, ?, ?, ?, 0, 0, ?, 0,"
                       " '[]')", (1_000_000 + k, C, k // 10, start + k, start + k, start + k, imp))
    rig.start_gateway()
    honest = [rig.board("house-a", 2400), rig.board("house-b", 900), rig.board("house-c", 5000)]
    liar = rig.board("liar", 1500)
    boards = honest + [liar]
    big = 10 ** 9
    attempts = 0
    try:
        # the first full interval starts at the next minute at least 2 s
        # after every board has sent its first reading (so every board has a
        # reading before it); run through it
        first = until = 0
        restarted = False
        i = 0
        while not first or time.time() < until + 1:
            for b in boards:
                b.send()
            if not first:
                first = (int(time.time()) + 2 + 59) // 60 * 60
                until = first + 60
            i += 1
            now = int(time.time())
            if i % 3 == 0:
                # the liar, every six seconds, one way or another
                kind = (i // 3) % 5
                if kind == 0:
                    liar.send(imp=liar.imp(now) + big, record=False)
                elif kind == 1:
                    liar.send(t=now - 30 * 86400, imp=liar.imp(now) + big, flags=messages.F_BUFFERED, record=False)
                elif kind == 2:
                    liar.send(imp=liar.imp(now) + big, flags=messages.F_CLOCK_UNSYNCED, record=False)
                elif kind == 3:
                    liar.send(imp=liar.imp(now) + big, boot=2, seq=0, record=False)
                else:
                    # out of order into the hole after its second-newest
                    # reading: above the newest one's register
                    liar.send(imp=liar.imp(now) + 50, seq=liar.seq - 5, record=False)
                attempts += 1
            if not restarted and time.time() > first + 10:
                # SIGKILL the gateway and restart it from the store: the
                # boards keep sending (the broker queues), then the liar
                # sends registers lower than the newest stored ones
                rig.kill_gateway()
                for b in boards:
                    b.send()
                time.sleep(1)
                rig.start_gateway()
                liar.send(imp=liar.truth[-1][1] - 100, record=False)
                attempts += 1
                restarted = True
            time.sleep(max(0.0, 2 - (time.time() - now)))
        # wait for the last interval to be settled (the boards keep sending);
        # it is due by until + GRACE + LOOP + 3: the check of its ledger
        # entry's time below says whether it came on time
        next_send = [time.time()]

        def settled() -> bool:
            if time.time() >= next_send[0]:
                for b in boards:
                    b.send()
                next_send[0] += 2
            db = rig.db()
            try:
                return db.execute("SELECT 1 FROM settled WHERE community=? AND start=?", (C, first)).fetchone() \
                    is not None
            finally:
                db.close()

        due = until + GRACE + LOOP + 3
        wait_until(settled, due + 30 - time.time(), f"the interval from {first} settled", rig.tmp / "gw.log",
                   every=0.2)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{rig.http_port}/metrics", timeout=5).read().decode()
    finally:
        for b in boards:
            b.close()
    rig.stop()

    # 1. every refused attempt is in the quarantine with its reason, nothing
    # of it stored
    with rig.db() as db:
        q = list(db.execute("SELECT device, code, reason FROM quarantine"))
        stored_max = db.execute("SELECT MAX(grid_imp_wh) FROM readings WHERE device='liar'").fetchone()[0]
        counters = {(d, w): n for d, w, n in db.execute("SELECT device, what, n FROM counters")}
        rows = list(db.execute("SELECT start, ledger_n, settled_at FROM settled ORDER BY start"))
        entries = ledger.verify(b"".join(bytes(r[0]) for r in db.execute("SELECT raw FROM ledger ORDER BY n")))
    assert len(q) == attempts and {d for d, _, _ in q} == {"liar"} and {c for _, c, _ in q} == {48}, q
    assert stored_max < 10 ** 6
    assert any("across a reboot" in r for _, _, r in q)
    assert any("went backwards" in r and "before" in r for _, _, r in q)        # out of order
    assert any("went backwards" in r and "after" in r for _, _, r in q)         # across the restart
    assert counters[("liar", "reject:plausibility")] == attempts
    # 2. flagged for the operator
    assert f'peergrid_rejected_total{{reason="plausibility",device="liar"}}' in metrics
    assert 'peergrid_warnings_total{what="energy",device="liar"}' in metrics
    assert 'peergrid_devices{state="flagged"} 1' in metrics
    assert 'peergrid_warnings_total{what="held",device="legacy"}' in metrics
    logs = rig.log_lines()
    assert any(x["level"] == "warning" and "rejected plausibility" in x["msg"] and "liar" in x["msg"]
               and "register" in x["msg"] for x in logs), logs[-20:]
    assert any("device legacy" in x["msg"] and "held, not settled: register went backwards within boot 1 at seq 10"
               in x["msg"] for x in logs)
    # 3. every interval from the first full one to the last due one settled
    # on time, everyone but the legacy device in it, 0 minted Wh
    by_start = {s: (n, at) for s, n, at in rows}
    settled = [e for e in entries if e.type == "settlement"]
    assert all(e.body["start"] in by_start for e in settled)
    checked = 0
    for e in settled:
        s, end = e.body["start"], e.body["end"]
        if s < first or end > until:
            continue
        checked += 1
        assert e.t <= end + GRACE + LOOP + 2, (s, e.t - end)          # on time, whatever the liar did
        assert e.body["estimated"] is True
        assert [h[1] for h in e.body["held"]] == ["legacy"]
        flows = {m: (i, x) for m, i, x in zip(e.body["flows"][0::3], e.body["flows"][1::3], e.body["flows"][2::3])}
        for b in honest + [liar]:
            m = rig.member[b.device]
            want = _interp(b.truth, end) - _interp(b.truth, s)
            assert abs(flows[m][0] - want) <= 1.5, (b.device, s, flows[m], want)
            assert flows[m][1] == 0
        assert rig.member["legacy"] not in flows
    assert checked == 1
