"""Energy plausibility from physics (issue 17 parts 1 and 2), hostile tests at
unit level: the gateway's validator with its real store (SQLite) and frames
sealed as a board seals them, the settler on what was stored.

- A member's authentic board tries to mint 10^9 Wh every way it can (live,
  with its clock claiming years passed, flagged buffered from long ago,
  claiming an unsynced clock, across a reboot, after a reboot that
  "restored" its registers low, with a 1000 V reading, compounding a clock
  that jumps back and forth): every such reading is refused (E_PLAUSIBILITY,
  flagged "energy"), and settlement pays its member exactly what the board
  honestly measured, 0 minted Wh.
- Honest boards are never refused: readings every 10 s, outages replayed
  from flash at 5 and 400 a second between live readings, reboots with
  registers restored lower and the clock unsynced until NTP, a gateway that
  was down while the broker queued, and gateway restarts in the middle of
  all that (state rebuilt from the store).
- Registers going backwards are refused against the readings on both sides
  in sequence order, out of order and across a gateway restart.
- A device whose stored data cannot be settled is held, with its reason in
  the ledger entry, and everyone else is settled on time.

The same against a real mosquitto and `peergrid run`: tests/test_energy_gateway.py.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from peergrid.market import ledger
from peergrid.community import registry as reg
from peergrid.ingest.energycheck import ALLOWANCE_WH, MARGIN, V_HIGH, EnergyError, EnergyState
from peergrid.market.settle import Tariff
from peergrid.market.settler import Settler, load_key
from peergrid.ingest.store import Store
from peergrid.ingest.validate import Accepted, Duplicate, Rejected, Validator
from protocol import messages, topics
from protocol.errors import E_PLAUSIBILITY
from protocol.link import DeviceLink

C = "elm"
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]
T0 = 1_795_000_000 - 1_795_000_000 % 900 + 900
UNSYNCED_T0 = 946_684_800          # an ESP32 clock after a power cycle
P_GRID = 100 * V_HIGH * MARGIN / 3600     # Wh per second a 100 A CT may carry at most


class Gateway:
    """The validator and the store as `peergrid run` wires them; restart()
    throws away everything in memory and rebuilds from the database."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / "gw.db"
        self.registry = reg.Registry(reg.connect(self.path))
        self.registry.add_community(C)
        self.rejected: list[Rejected] = []
        self.restart()

    def restart(self) -> None:
        self.store = Store(reg.connect(self.path), lambda c, d: 0, read_db=reg.connect(self.path))
        self.validator = Validator(C, self.registry.device, 300, 3600, history=self.store.history,
                                   readings=self.store.energy_history)

    def receive(self, topic: str, frame: bytes, now: float) -> Accepted | Rejected:
        try:
            r = self.validator.check(topic, frame, now)
        except Rejected as e:
            self.rejected.append(e)
            self.store.write([], [(now, topic, e.device, e.code, e.reason, frame)], {})
            return e
        assert not isinstance(r, Duplicate)
        self.store.write([r], [], {})
        return r


class Board:
    """A board's metering and uplink: registers that count what flows
    through the CT, a clock that is unsynced after boot until NTP, frames
    sealed with the device's own key."""

    def __init__(self, gw: Gateway, name: str, member: int | None = None) -> None:
        m = member if member is not None else gw.registry.add_member(C, name)
        secret, _ = gw.registry.add_device(C, name, "sim", CH, m)
        self.member = m
        self.link = DeviceLink(C, name, secret)
        self.boot, self.seq = 1, 0
        self.e = [0.0, 0.0, 0.0, 0.0]         # grid import, export, pv import, export (Wh, exact)
        self.saved = list(self.e)
        self.synced_at: float | None = None   # the board's uptime clock origin while unsynced
        self.up0 = 0.0

    def run(self, dt: float, grid_w: float, pv_w: float = 0.0) -> None:
        """dt seconds at these powers (grid: + import, - export)."""
        self.e[0 if grid_w >= 0 else 1] += abs(grid_w) * dt / 3600
        self.e[3] += pv_w * dt / 3600

    def reboot(self, t: float, lose_wh: float = 0.0) -> None:
        self.boot += 1
        self.seq = 0
        self.e = [max(0.0, v - lose_wh) for v in self.saved]
        self.synced_at = None
        self.up0 = t

    def regs(self) -> list[int]:
        return [int(v) for v in self.e]

    def frame(self, t: float, flags: int = 0, synced: bool = True, regs: list[int] | None = None,
              tb: int | None = None, vrms: int = 2300, boot: int | None = None, seq: int | None = None,
              w: int = 500) -> tuple[str, bytes]:
        r = regs if regs is not None else self.regs()
        if tb is None:
            tb = int(t) if synced else int(UNSYNCED_T0 + t - self.up0)
        if not synced:
            flags |= messages.F_CLOCK_UNSYNCED
        if seq is None:
            seq = self.seq
            self.seq += 1
        ch = [w, r[0], r[1], 2000, -100, r[2], r[3], 600]
        f = self.link.reading(self.boot if boot is None else boot, seq, tb, flags, vrms, 5000, ch, 2)
        return self.link.t_reading, bytes(f)


def _mint_attempts(gw: Gateway, b: Board, t: float) -> float:
    """Every way this board tries to mint 10^9 Wh; none may pass. Returns
    the time after them."""
    big = 10 ** 9
    r = b.regs()
    attempts = [
        # live, honest clock
        dict(regs=[r[0] + big, r[1], r[2], r[3]]),
        # its clock claims an hour passed since the reading before (as far
        # ahead of the gateway's as it may be without E_CLOCK)
        dict(regs=[r[0] + big, r[1], r[2], r[3]], tb=int(t + 3590)),
        # flagged as replayed from flash, measured "a month ago"
        dict(regs=[r[0] + big, r[1], r[2], r[3]], flags=messages.F_BUFFERED, tb=int(t - 30 * 86400)),
        # an unsynced clock that counted years since boot
        dict(regs=[r[0] + big, r[1], r[2], r[3]], synced=False),
        # export and the pv channel
        dict(regs=[r[0], r[1] + big, r[2], r[3]]),
        dict(regs=[r[0], r[1], r[2], r[3] + big]),
        # 1500 Wh in the 72 s since its last reading: a 100 A CT carries
        # that on a 1000 V grid; the voltage counts as 253 V at most
        dict(regs=[r[0] + 1500, r[1], r[2], r[3]], vrms=10000),
    ]
    for a in attempts:
        t += 10
        got = gw.receive(*b.frame(t, **a), now=t + 0.1)
        assert isinstance(got, Rejected) and got.code == E_PLAUSIBILITY and got.flag == "energy", (a, got)
    # a reboot that "continues" 10^9 higher, unsynced, claiming years of uptime
    t += 10
    b.boot += 1
    b.seq = 0
    got = gw.receive(*b.frame(t, synced=False, regs=[r[0] + big, r[1], r[2], r[3]], tb=UNSYNCED_T0 + 10 ** 8),
                     now=t + 0.1)
    assert isinstance(got, Rejected) and got.flag == "energy", got
    # a reboot that restores its registers 10^9 low, then counts them up
    # again (settlement counts a register restored lower as no energy, so
    # the rise after it would be paid) with the clock of a fresh boot
    t += 10
    b.seq = 1
    low = [0, 0, 0, 0]
    got = gw.receive(*b.frame(t, synced=False, regs=low, tb=UNSYNCED_T0 + 5), now=t + 0.1)
    assert isinstance(got, Accepted), got          # a restore to 0 is honest enough: it pays nothing
    t += 10
    got = gw.receive(*b.frame(t, synced=False, regs=[big, r[1], r[2], r[3]], tb=UNSYNCED_T0 + 15 + 10 ** 8),
                     now=t + 0.1)
    assert isinstance(got, Rejected) and got.flag == "energy", got
    # and back to what the registers really are: the board carries on
    # honestly from here (its registers reset to what it restored)
    b.e = [0.0, 0.0, 0.0, 0.0]
    b.saved = list(b.e)
    b.up0 = t - 15
    return t


def _at(series: list[tuple[float, float, float]], t: float) -> tuple[float, float]:
    """A register series (t, import, export) read at t, linearly."""
    for (ta, ia, ea), (tb, ib, eb) in zip(series, series[1:]):
        if ta <= t <= tb:
            w = (t - ta) / (tb - ta)
            return ia + (ib - ia) * w, ea + (eb - ea) * w
    raise AssertionError(t)


def test_authentic_board_cannot_mint_and_nothing_minted_is_paid(tmp_path) -> None:
    gw = Gateway(tmp_path)
    honest = Board(gw, "house-a")
    liar = Board(gw, "house-b")
    t = float(T0 - 600)
    # what each board really measured, continued across the liar's reboot
    truth: dict[int, list[tuple[float, float, float]]] = {honest.member: [], liar.member: []}
    base = [0.0, 0.0]
    for step in range(3 * 90):                    # 45 minutes, a reading every 10 s
        t += 10
        for b, w in ((honest, 2500), (liar, 1800 if step % 30 < 20 else -900)):
            b.run(10, w, 400)
            got = gw.receive(*b.frame(t), now=t + 0.05)
            assert isinstance(got, Accepted), got
            off = base if b is liar else [0.0, 0.0]
            truth[b.member].append((t, int(b.e[0]) + off[0], int(b.e[1]) + off[1]))
        if step == 100:
            base = [int(liar.e[0]), int(liar.e[1])]
            t = _mint_attempts(gw, liar, t)
    assert len(gw.rejected) == 9 and {e.flag for e in gw.rejected} == {"energy"}
    # nothing refused is stored: the store has no register anywhere near 10^9
    db = reg.connect(gw.path)
    assert db.execute("SELECT MAX(grid_imp_wh), MAX(grid_exp_wh) FROM readings").fetchone()[0] < 10 ** 6
    assert db.execute("SELECT COUNT(*) FROM quarantine WHERE code=?", (E_PLAUSIBILITY,)).fetchone()[0] == 9
    # settlement of every interval in the span: 0 minted Wh paid, every
    # honestly measured Wh paid (to the rounding of each interval's ends)
    s = Settler(db, C, load_key(tmp_path / "k"), Tariff(30, 8), 900, 0, first_start=T0)
    n = s.settle_due(t)
    assert n >= 2
    for e in ledger.verify(s.export()):
        if e.type != "settlement":
            continue
        assert "held" not in e.body
        fl = e.body["flows"]
        for m, i, x in zip(fl[0::3], fl[1::3], fl[2::3]):
            a, b_ = _at(truth[m], e.body["start"]), _at(truth[m], e.body["end"])
            assert abs(i - (b_[0] - a[0])) <= 1 and abs(x - (b_[1] - a[1])) <= 1, (m, e.body, a, b_)


def test_clock_games_gain_no_more_than_the_ct_carries(tmp_path) -> None:
    """A board whose clock claims to jump 5 minutes ahead and back on every
    other reading, sending ten readings a second and as much as each pair
    seems to allow: over an hour it gets no more than its CT could carry in
    that hour plus the clock tolerance once (rule 2 holds every pair)."""
    es = EnergyState([100, 50], max_skew_s=300)
    now = float(T0)
    es.check(1, 0, [0, 0, 0, 0], now, int(now), False, True, 2300)
    reg_, tb_prev = 0, int(now)
    for seq in range(1, 36000):
        now += 0.1
        tb = int(now) + (299 if seq % 2 else -299)
        want = int(100 * 253 * MARGIN / 3600 * (max(0.1, tb - tb_prev) + 2)) + 2
        for g in (want, want // 8, 1):
            try:
                es.check(1, seq, [reg_ + g, 0, 0, 0], now, tb, False, True, 2530)
                reg_ += g
                tb_prev = tb
                break
            except EnergyError:
                pass
    assert reg_ <= P_GRID * (3600 + 300) + ALLOWANCE_WH
    assert reg_ >= 0.9 * P_GRID * 3600           # what the CT can carry is not refused


def _honest_day(gw: Gateway, seed: int, restarts: bool) -> int:
    """One board through outages, reboots, unsynced clocks and a gateway
    outage, as the firmware behaves; returns how many readings it sent."""
    rnd = random.Random(seed)
    b = Board(gw, f"h{seed}")
    t = float(T0)
    b.up0 = t
    synced = True
    sync_at = t
    online = True
    outage_end = 0.0
    spool: list[tuple[str, bytes]] = []
    arrivals: list[tuple[float, int, str, bytes]] = []
    n = 0
    for step in range(1500):
        t += 10
        w = rnd.choice([0, 300, 4000, 23000, -9000, -23000])      # up to 100 % of a 100 A CT at 230 V
        b.run(10, w, rnd.choice([0, 5000, 11000]))
        if step % 30 == 0:
            b.saved = list(b.e)                 # registers saved to flash every 5 minutes
        if not synced and t >= sync_at and online:
            synced = True
        if online:
            arrivals.append((t + rnd.uniform(0.02, 0.4), n, *b.frame(t, synced=synced, vrms=rnd.choice([2070, 2300, 2530]))))
        else:
            spool.append(b.frame(t, flags=messages.F_BUFFERED, synced=synced))
        n += 1
        ev = rnd.random()
        if online and ev < 0.01:
            online = False
            outage_end = t + rnd.choice([60, 900, 3600, 3 * 3600])
        elif not online and t >= outage_end:
            online = True
            rate = rnd.choice([5, 400])
            at = t + 0.5
            for f in spool:                         # after the first live reading, oldest first
                at += 1 / rate
                arrivals.append((at, n, *f))
                n += 1
            spool = []
        if 0.01 <= ev < 0.014:                      # a reboot: registers restored from flash, clock unsynced
            b.reboot(t, lose_wh=0)
            synced = False
            sync_at = t + rnd.choice([0, 30, 600, 10 ** 9]) if online else t + 10 ** 9
    at = t + 0.5
    for f in spool:                                 # back online at the end: the rest of the flash
        at += 1 / 400
        arrivals.append((at, n, *f))
        n += 1
    arrivals.sort()
    # the gateway was down for 20 minutes: the broker queued, then delivered at once
    down = T0 + 5000
    out = []
    k = 0
    for at, i, topic, frame in arrivals:
        if down <= at < down + 1200:
            k += 1
            at = down + 1200 + k * 0.001
        out.append((at, i, topic, frame))
    out.sort()
    for j, (at, _, topic, frame) in enumerate(out):
        if restarts and j % 211 == 0:
            gw.restart()
        got = gw.receive(topic, frame, at)
        assert isinstance(got, Accepted), (seed, j, got)
    return len(out)


@pytest.mark.parametrize("seed", range(6))
def test_honest_boards_are_never_refused(tmp_path, seed) -> None:
    gw = Gateway(tmp_path)
    n = _honest_day(gw, seed, restarts=seed % 2 == 1)
    assert n == 1500 and not gw.rejected
    assert reg.connect(gw.path).execute("SELECT COUNT(*) FROM readings").fetchone()[0] == 1500


def test_backwards_out_of_order_and_across_a_gateway_restart(tmp_path) -> None:
    gw = Gateway(tmp_path)
    b = Board(gw, "house-c")
    t = float(T0)

    def send(seq: int, imp: int, at: float, boot: int = 1) -> Accepted | Rejected:
        return gw.receive(*b.frame(at, regs=[imp, 0, 0, 0], seq=seq, boot=boot, tb=int(T0 + 10 * seq)), at)

    for seq, imp in ((0, 100), (1, 110), (2, 120), (20, 300)):
        assert isinstance(send(seq, imp, T0 + 10 * seq + 0.1), Accepted)
    t = T0 + 210.0
    # seq 10 arrives late (replayed from flash): it must lie between its
    # neighbours 2 (120 Wh) and 20 (300 Wh), not just above the newest
    above = send(10, 310, t)
    below = send(10, 90, t)
    assert isinstance(above, Rejected) and "backwards" in above.reason and "before 300 Wh at seq 20" in above.reason
    assert isinstance(below, Rejected) and "backwards" in below.reason and "after 120 Wh at seq 2" in below.reason
    assert isinstance(send(10, 200, t), Accepted)
    assert isinstance(send(11, 190, t + 1), Rejected)          # now its own neighbour holds it
    # the gateway restarts: everything in memory is gone, rebuilt from the store
    gw.restart()
    r = send(21, 250, t + 10)
    assert isinstance(r, Rejected) and "backwards" in r.reason and "after 300 Wh at seq 20" in r.reason
    r = send(12, 301, t + 11)
    assert isinstance(r, Rejected) and "before 300 Wh at seq 20" in r.reason
    assert isinstance(send(12, 210, t + 12), Accepted)
    assert isinstance(send(21, 310, t + 13), Accepted)
    # across a reboot the new boot continues from where the old one stopped:
    # restored lower is honest (nothing paid), 10^9 higher is not
    gw.restart()
    r = send(0, 10 ** 9, t + 20, boot=2)
    assert isinstance(r, Rejected) and "across a reboot" in r.reason
    assert isinstance(send(0, 305, t + 21, boot=2), Accepted)
    # the old boot's last readings, replayed from flash after the reboot:
    # still held to their neighbours on both sides
    r = send(22, 315, t + 22, boot=1)
    assert isinstance(r, Accepted), r
    r = send(23, 312, t + 23, boot=1)
    assert isinstance(r, Rejected) and "after 315 Wh at seq 22" in r.reason
    stored = list(reg.connect(gw.path).execute("SELECT boot, seq, grid_imp_wh FROM readings ORDER BY boot, seq"))
    assert stored == [(1, 0, 100), (1, 1, 110), (1, 2, 120), (1, 10, 200), (1, 12, 210), (1, 20, 300),
                      (1, 21, 310), (1, 22, 315), (2, 0, 305)]
    assert all(e.flag == "energy" for e in gw.rejected) and len(gw.rejected) == 7


def test_unsettleable_device_is_held_and_everyone_else_settled_on_time(tmp_path, caplog) -> None:
    """Readings stored before the gateway checked registers (or written by
    anything else): one device's register goes backwards within a boot.
    Its interval is held, the ledger entry says which device and why, the
    other members are settled on time and the ledger verifies."""
    db = reg.connect(tmp_path / "gw.db")
    r = reg.Registry(db)
    r.add_community(C)
    Store(db, lambda c, d: 0)
    db.execute("PRAGMA foreign_keys=OFF")
    members = {}
    for name in ("a", "b", "bad"):
        m = r.add_member(C, name)
        r.add_device(C, name, "sim", CH, m)
        members[name] = m
    fid = 0
    for name, rate in (("a", 2), ("b", 3), ("bad", 5)):
        for k in range(0, 1800 + 1, 10):
            fid += 1
            imp = rate * k // 10
            if name == "bad" and k == 600:
                imp = 1                         # went backwards within boot 1
            db.execute("INSERT INTO readings (frame_id, community, device, boot, seq, t, t_board, t_recv, flags,"
                       " grid_w, grid_imp_wh, grid_exp_wh, ch) VALUES (?, ?, ?, 1, ?, ?, ?, ?, 0, 0, ?, 0, '[]')",
                       (fid, C, name, k // 10, T0 + k, T0 + k, T0 + k, imp))
    s = Settler(db, C, load_key(tmp_path / "k"), Tariff(30, 8), 900, 60, first_start=T0)
    held = []
    s.on_held = lambda m, d, why, start: held.append((m, d, start))
    with caplog.at_level(logging.WARNING, logger="peergrid.market.settler"):
        assert s.settle_due(T0 + 900 + 60) == 1          # due at end + grace: settled then
    body = ledger.verify(s.export())[-1].body
    assert body["estimated"] is True
    assert body["held"] == [[members["bad"], "bad", "register went backwards within boot 1 at seq 60"]]
    flows = dict(zip(body["flows"][0::3], body["flows"][1::3]))
    assert flows == {members["a"]: 180, members["b"]: 270}
    assert held == [(members["bad"], "bad", T0)]
    assert "device bad (member 3) held, not settled: register went backwards" in caplog.text


def test_a_clock_that_restarts_behind_never_makes_negative_or_early_energy() -> None:
    """A board (the virtual one, say) whose clock restarts at the same time
    after every reboot while claiming to be synced: its boots overlap in
    time. Each reading is taken no earlier than the one before it in the
    board's order; the energy is positive, flagged estimated, and none of
    boot 3's lands before boot 2's last reading."""
    from peergrid.market.intervals import Reading, intervals

    rs = [Reading(T0 + 10 * k, 1, k, 10 * k, 0) for k in range(10)]               # 0..90 Wh, T0..T0+90
    rs += [Reading(T0 + 10 * k, 2, k, 95 + 10 * k, 0) for k in range(60)]         # 95..685 Wh, T0..T0+590
    rs += [Reading(T0 + 10 * k, 3, k, 685 + 10 * k, 0) for k in range(150)]       # 685..2175 Wh, T0..T0+1490
    ivs = intervals(rs, T0, T0 + 1800, 300, max_gap_s=60)
    assert all(i.estimated for i in ivs)
    # boot 2 continues at boot 1's last time (T0 + 90), boot 3 at boot 2's
    # (T0 + 590): what boot 3 claims to have counted before then is taken
    # at T0 + 590, in the second interval; then 10 Wh every 10 s again
    assert [i.imp_wh for i in ivs] == [395, 890, 300, 300, 290, 0]
    assert sum(i.imp_wh for i in ivs) == 2175                     # all of it, once


def test_json_log_carries_the_exception() -> None:
    from peergrid.ingest.service import JsonLog

    rec = None

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            nonlocal rec
            rec = record

    lg = logging.getLogger("peergrid.test.jsonlog")
    lg.addHandler(Grab())
    lg.propagate = False
    try:
        raise ValueError("register went backwards within boot 3 at seq 7")
    except ValueError:
        lg.exception("settlement failed; retrying")
    out = json.loads(JsonLog().format(rec))
    assert out["msg"] == "settlement failed; retrying" and out["level"] == "error"
    assert out["exc"] == "ValueError: register went backwards within boot 3 at seq 7"
    assert "Traceback" in out["trace"] and "test_json_log_carries_the_exception" in out["trace"]
    lg.warning("plain")
    assert "exc" not in json.loads(JsonLog().format(rec))
