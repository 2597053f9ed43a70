"""`make demo`: a neighbourhood day on one machine.

A real mosquitto with per-device accounts, the gateway (validation, storage,
settlement into the signed ledger, control of water heaters and batteries),
a few virtual boards running the real firmware on MicroPython and simulated
boards (peergrid.sim.simboard, sealing with protocol/) for the other houses. The
houses follow the H0 load profile and pvlib PV (peergrid.sim.profiles). The day
runs `--speed` times faster than the wall clock on one simulated clock that
the gateway, the boards and the firmware share.

While it runs, one status line a second: simulated time, progress, the
community's load, PV and grid power, the local share so far, devices seen,
rejections, decisions. At the end: every interval settled, the ledger
exported and verified, statements per house, and a report (HTML with the
day's power flows drawn in it) whose path is printed.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[4]
C = "demo"


def _free_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _mosquitto() -> str:
    for p in ("mosquitto", "/usr/sbin/mosquitto"):
        if shutil.which(p):
            return shutil.which(p) or p
    raise SystemExit("mosquitto is not installed: run `make setup` (or apt-get install mosquitto)")


class Demo:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.dir = Path(a.out) / f"run-{stamp}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Any] = []
        self.boards: list[Any] = []
        self.vboards: list[Any] = []
        self.log: list[dict[str, Any]] = []

    # -- set-up --------------------------------------------------------------------

    def setup(self) -> None:
        import numpy as np

        from peergrid.sim import profiles as prof
        from peergrid.community import broker
        from peergrid.community import registry as reg
        from peergrid.control.controller import Battery, Load

        a = self.a
        rng = np.random.default_rng(a.seed)
        n = a.houses
        self.step = 60                                      # the houses' reading period, simulated seconds
        self.load, self.pv, self.tsec, self.offset = prof.profiles(rng, self.step, n, int(n * 0.6), hours=a.hours + 1)
        self.t0 = int(self.tsec[0])
        self.t_end = self.t0 + int(a.hours * 3600)
        self.nv = min(a.vboards, n)
        r = reg.Registry(reg.connect(self.dir / "gw.db"))
        r.add_community(C, "Demo neighbourhood")
        self.creds: dict[str, tuple[bytes, str]] = {}
        self.ids = [f"h{i + 1:03d}" for i in range(n)]
        self.relay_w: dict[str, list[int]] = {}
        self.bats: dict[str, dict[str, Any]] = {}
        heaters = set(rng.choice(n, size=max(1, n // 4), replace=False).tolist()) | set(range(self.nv))
        bat_houses = set(rng.choice(range(self.nv, n), size=min(max(1, n // 12), n - self.nv), replace=False).tolist()) \
            if n > self.nv else set()
        from peergrid.market import governance as gv

        self.member_keys: dict[int, tuple[str, bytes]] = {}
        for i, dev in enumerate(self.ids):
            k, pub = gv.new_key()
            m = r.add_member(C, f"house {i + 1}", pub)
            self.member_keys[m] = (f"house {i + 1}", pub)
            if i < 3:
                # the resident of house 1 signs in to the member app with this; the first three
                # houses run mirrors of the ledger at the end of the day
                reg.atomic_write(self.dir / f"member-{m}.key", gv.key_string(k) + "\n")
            chans = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]
            if i < self.nv:                                 # the real firmware's sim board has four CTs
                chans += [{"role": "load", "rating_a": 20}, {"role": "ev", "rating_a": 32}]
            self.creds[dev] = r.add_device(C, dev, "sim", chans, m)
            if i in heaters:
                w = 2000 if i < self.nv else int(rng.choice([2000, 2500, 3000]))
                self.relay_w[dev] = [w]
                r.add_load(C, Load(f"wh-{dev}", dev, 0, w, priority=2, min_on_s=900, min_off_s=900,
                                   need_wh=int(rng.uniform(3000, 5000)), deadline_s=18 * 3600, available_s=7 * 3600))
            if i in bat_houses:
                self.bats[dev] = {"capacity_wh": 10000, "max_w": 5000, "soc_wh": 1000}
                r.add_battery(C, Battery(f"bat-{dev}", dev, 0, 10000, 5000, 5000, 0.1, 0.95, 0.92))
        base = (self.load - self.pv).sum(axis=0)
        r.set_feeder(C, int(max(base.max(), 0) + 60000), int(max(-base.min(), 0) + 20000))
        self.gw_pass = "gw-" + os.urandom(6).hex()
        self.port = _free_port()
        self.http_port = _free_port()
        r.broker_files(self.dir / "passwd", self.dir / "acl", "gateway", reg.mosquitto_hash(self.gw_pass))
        r.db.close()
        # the production config (peergrid broker-files): client ids bound to
        # accounts, size limits, a persistent queue for the gateway
        (self.dir / "mosquitto.conf").write_text(broker.mosquitto_conf(
            self.port, self.dir / "passwd", self.dir / "acl", "127.0.0.1", self.dir / "mosquitto.pid", self.dir,
            ["log_dest none"] + (["user root"] if os.geteuid() == 0 else [])))
        self.procs.append(subprocess.Popen([_mosquitto(), "-c", str(self.dir / "mosquitto.conf")],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        (self.dir / "gw.toml").write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {self.http_port}\n'
            '[homeassistant]\nevery_s = 10\n[app]\ncurrency = "CHF"\n'
            f'[broker]\nport = {self.port}\nuser = "gateway"\npassword = "{self.gw_pass}"\n'
            '[ingest]\nmax_skew_s = 600\nstale_after_s = 180\n'
            '[settlement]\nretail = 3187\nfeed_in = 812\nfund_margin_ppm = 20000\nmechanism = "sdr"\n'
            'interval_min = 15\ngrace_s = 300\n'
            '[control]\nperiod_s = 30\nlease_s = 3600\nrefresh_s = 900\nack_timeout_s = 120\nretries = 3\n'
            'stale_s = 300\nstale_margin_w = 2000\ntimezone = "Europe/Zurich"\n')

    def start(self) -> None:
        from peergrid.config import Config
        from peergrid.ingest.service import Gateway
        from peergrid.sim.simboard import SimClock, SimHouse
        from peergrid.sim.vboard import VirtualBoard, default_config
        from peergrid.community import registry as reg

        a = self.a
        time.sleep(0.3)
        # the simulated clock starts a few seconds from now, when everything runs
        self.clock = SimClock(self.t0, a.speed)
        self.clock.w0 = time.time() + 4 + self.nv * 1.5
        self.gw = Gateway(Config.load(self.dir / "gw.toml"), clock=self.clock, speed=a.speed)
        self.gw.start()
        if not self.gw.connected.wait(10):
            raise SystemExit("the gateway could not connect to mosquitto")
        self.settler = self.gw._settler()
        if self.settler is not None:
            # every member's key in the ledger: votes signed in the member app check against it
            for m, (name, pub) in self.member_keys.items():
                self.settler.record("member_joined", self.t0, {"member": m, "name": name, "key": pub})
        print(f"member app: http://127.0.0.1:{self.gw.http_port}/app/ (sign in as member 1 with the key in "
              f"{self.dir / 'member-1.key'})", flush=True)
        for i, dev in enumerate(self.ids):
            secret, pw = self.creds[dev]
            if i < self.nv:
                cfg = default_config(C, dev, secret, "127.0.0.1", self.port, reg.broker_user(C, dev), pw,
                                     period_s=60, status_s=3600, frames=200, keepalive_s=30,
                                     relays=[{"failsafe": 0, "load": "water heater"}, {"failsafe": 0, "load": ""}])
                cfg.pop("sim")
                sim = {"clock": {"t0": self.t0, "w0": self.clock.w0, "speed": a.speed}, "relay_w": [2000, 0],
                       "relay_ch": [2, None], "grid": 0, "pv": 1,
                       "base": [float(self.load[i, 0] - self.pv[i, 0]), float(-self.pv[i, 0]), 0.0, 0.0]}
                vb = VirtualBoard(self.dir / "boards" / dev, cfg, speed=a.speed, sim=sim, rs485=False)
                vb.start()
                self.vboards.append((i, vb))
            else:
                h = SimHouse(C, dev, secret, reg.broker_user(C, dev), pw, "127.0.0.1", self.port, self.clock,
                             relay_w=self.relay_w.get(dev), battery=self.bats.get(dev))
                h.start()
                self.boards.append((i, h))
        wait = self.clock.w0 - time.time()
        if wait > 0:
            time.sleep(wait)

    # -- the day ---------------------------------------------------------------------

    def run(self) -> None:
        a = self.a
        last_k = -1
        next_view = 0.0
        next_settle = self.t0
        n = a.houses
        self.flows: list[tuple[float, float, float, float]] = []       # t, load, pv, grid (W)
        tty = sys.stdout.isatty()
        end = self.t_end + 1200                          # a little past the end: the last interval's boundary data
        while True:
            t = self.clock()
            if t >= end:
                break
            k = int((t - self.t0) // self.step)
            if k != last_k and k < len(self.tsec):
                last_k = k
                grid_sum = 0.0
                for i, h in self.boards:
                    grid_sum += h.tick(t, float(self.load[i, k]), float(self.pv[i, k]))
                    h.publish(t)
                for i, vb in self.vboards:
                    w = float(self.load[i, k] - self.pv[i, k])
                    vb.send(op="base", w=[w, float(-self.pv[i, k]), 0.0, 0.0])
                    grid_sum += w
                if t <= self.t_end:
                    flex = sum(h.flex_w() for _, h in self.boards)
                    self.flows.append((t, float(self.load[:, k].sum()) + max(flex, 0),
                                       float(self.pv[:, k].sum()), grid_sum))
            if t >= next_settle and self.settler is not None:
                next_settle = t + 900
                self.settler.settle_due(t)
            if time.time() >= next_view:
                next_view = time.time() + 1
                self.view(t, tty)
            time.sleep(min(0.05, self.step / a.speed / 4))
        if tty:
            print()

    def view(self, t: float, tty: bool) -> None:
        snap = self.gw.metrics.snapshot()
        pres = self.gw.presence(t)
        seen = sum(1 for v in pres.values() if not v["stale"])
        load = pv = grid = 0.0
        if self.flows:
            _, load, pv, grid = self.flows[-1]
        imp = sum(max(g, 0) for _, _, _, g in self.flows)
        cons = sum(ld for _, ld, _, _ in self.flows)
        local = 1 - imp / cons if cons else 0.0
        settled = len(self.settler.ledger.entries) if self.settler else 0
        rej = sum(snap["rejected"].values())
        dec = snap["counts"].get("control_decisions", 0)
        prog = min(1.0, (t - self.t0) / (self.t_end - self.t0))
        local_t = time.strftime("%H:%M", time.gmtime(t + self.offset))
        line = (f"{local_t} {prog:4.0%} | load {load / 1000:6.1f} kW  pv {pv / 1000:6.1f} kW  grid {grid / 1000:+7.1f} kW"
                f" | local {local:4.0%} | online {seen}/{self.a.houses} | ledger {settled} | rejected {rej}"
                f" | decisions {dec}")
        print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)

    # -- the end --------------------------------------------------------------------

    def finish(self) -> Path:
        from peergrid.market import ledger
        from peergrid.market import statements as stm

        if self.gw.control is not None:
            self.gw.control.stop()          # the boards go away now: no more commands
        for _, vb in self.vboards:
            vb.close()
        for _, h in self.boards:
            h.close()
        time.sleep(1)
        if self.settler is None:
            raise SystemExit("no settlement configured")
        # settle everything up to the end of the day (the grace period is over by now)
        self.settler.settle_due(self.t_end + 900 + 600)
        self.witnesses = self.mirrors()
        data = self.settler.export()
        (self.dir / "ledger.cbor").write_bytes(data)
        self.gw.stop()
        t0 = time.perf_counter()
        entries = ledger.verify(data)
        verify_s = time.perf_counter() - t0
        c = stm.statements(entries, self.t0, self.t_end)
        (self.dir / "statements.csv").write_text(stm.to_csv(c))
        checks = self.checks(entries, c)
        path = self.dir / "report.html"
        path.write_text(self.report(entries, c, checks, verify_s))
        (self.dir / "summary.json").write_text(json.dumps({
            "houses": self.a.houses, "hours": self.a.hours, "speed": self.a.speed,
            "self_sufficiency": round(c.self_sufficiency, 4), "self_consumption": round(c.self_consumption, 4),
            "baselines": {k: v for k, v in stm.baselines(c).__dict__.items()},
            "ledger_entries": len(entries), "checks": checks}, indent=1))
        return path

    def mirrors(self) -> str:
        """Three houses' mirrors follow the ledger (`peergrid mirror`, in
        this process), verify it and witness its head; the gateway records
        their witnesses in the ledger. Returns what went wrong, or ''."""
        import argparse

        from peergrid.app.mirror import Alarm, Mirror
        from peergrid.market import settler as stl

        try:
            for m in sorted(self.member_keys)[:3]:
                mi = Mirror(argparse.Namespace(url=f"http://127.0.0.1:{self.gw.http_port}", ca=None, member=m,
                                               key_file=str(self.dir / f"member-{m}.key"), broker=None, timeout=60,
                                               dir=str(self.dir / "mirrors" / f"member-{m}")))
                mi.sync()
            stl.witness(self.settler, self.gw.app.take_witnesses(), int(self.clock()))
        except (Alarm, OSError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return ""

    def checks(self, entries: list[Any], c: Any) -> list[tuple[str, bool, str]]:
        out = []
        sett = [e for e in entries if e.type == "settlement"]
        want = int((self.t_end - self.t0) // 900)
        day = {e.body["start"] for e in sett if self.t0 <= e.body["start"] < self.t_end}
        out.append(("every interval settled once", len({e.body["start"] for e in sett}) == len(sett)
                    and len(day) == want, f"{len(day)} of the day's {want} intervals, each once ({len(sett)} "
                                          "settlements in all, with the edges of the day)"))
        money = sum(s.paid for s in c.members.values())
        grid_fund = -sum(e.body["grid"] + e.body["fund"] for e in sett if self.t0 <= e.body["start"]
                         and e.body["end"] <= self.t_end)
        out.append(("statements balance against the ledger", money == grid_fund,
                    f"members paid {money / 100:.2f}, grid and fund received {grid_fund / 100:.2f}"))
        st_imp = sum(float(s.bought_local_wh + s.bought_grid_wh) for s in c.members.values())
        out.append(("statement energy equals settled energy", abs(st_imp - c.demand_wh) < 1,
                    f"{st_imp / 1000:.1f} kWh in statements, {c.demand_wh / 1000:.1f} kWh settled"))
        out.append(("ledger verifies", True, f"{len(entries)} entries, signatures, chain and every settlement re-run"))
        from peergrid.market.governance import replay

        w = replay(entries).witnessed
        h = max(w, default=0)
        out.append(("members' mirrors witnessed the settled ledger", not self.witnesses and len(w.get(h, ())) == 3,
                    self.witnesses or f"height {h} (entry {h - 1}, sha256 {entries[h - 1].digest.hex()[:16]}...) "
                    f"witnessed by members {', '.join(map(str, sorted(w.get(h, ()))))}, recorded in entry {h}"))
        return out

    def report(self, entries: list[Any], c: Any, checks: list[tuple[str, bool, str]], verify_s: float) -> str:
        from peergrid.market import statements as stm

        e = html.escape
        rows = stm.rows(c)
        head = ["member", "intervals", "bought local kWh", "bought grid kWh", "sold local kWh", "sold grid kWh",
                "paid", "grid only", "feed-in only", "net metering", "saving"]
        base = "".join(f"<li>{e(x.strip())}</li>" for x in stm.baselines(c).lines())
        table = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in rows)
        chk = "".join(f"<li class={'ok' if ok else 'bad'}>{'&#10003;' if ok else '&#10007;'} {e(name)}: {e(msg)}</li>"
                      for name, ok, msg in checks)
        snap = self.gw.metrics.snapshot()
        ctl = self.gw.control.stats if self.gw.control is not None else {}
        genesis = entries[0].body.get("key", b"")
        key = genesis.hex() if isinstance(genesis, (bytes, bytearray)) else ""
        return f"""<!doctype html><html><head><meta charset="utf-8"><title>PeerGrid demo day</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222}} table{{border-collapse:collapse;font-size:.85em}}
td,th{{border:1px solid #bbb;padding:.2em .5em;text-align:right}} th{{background:#eee}} .ok{{color:#060}} .bad{{color:#b00}}
.fig{{display:flex;gap:2em;flex-wrap:wrap}} .fig div{{background:#f4f4f4;padding:.6em 1em;border-radius:.4em}}
.fig b{{display:block;font-size:1.4em}} code{{word-break:break-all}}</style></head><body>
<h1>A neighbourhood day: {self.a.houses} houses, {self.a.hours:g} h</h1>
<p>Simulated {e(time.strftime('%Y-%m-%d %H:%M', time.gmtime(self.t0 + self.offset)))} to
{e(time.strftime('%Y-%m-%d %H:%M', time.gmtime(self.t_end + self.offset)))} (local time) at {self.a.speed:g}x;
{self.nv} houses ran the real firmware on MicroPython, {len(self.boards)} were simulated boards.</p>
<div class=fig><div>self-sufficiency<b>{100 * c.self_sufficiency:.1f} %</b></div>
<div>self-consumption<b>{100 * c.self_consumption:.1f} %</b></div>
<div>traded locally<b>{c.local_wh / 1000:.1f} kWh</b></div><div>demand<b>{c.demand_wh / 1000:.1f} kWh</b></div>
<div>supply<b>{c.supply_wh / 1000:.1f} kWh</b></div><div>community fund<b>{c.fund / 100:.2f}</b></div></div>
<h2>Against the baselines</h2><ul>{base}</ul>
<p>Grid intensity 300 g CO2/kWh (a round figure, configurable in <code>statements.baselines</code>); net metering
nets the day's imports and exports at retail. Each member's figures are in the table below.</p>
<h2>Power flows</h2>{self.svg()}
<h2>Checks</h2><ul>{chk}</ul>
<p>Ledger: {len(entries)} entries, verified in {verify_s:.2f} s without the gateway's database
(<code>peergrid ledger verify {e(str(self.dir / 'ledger.cbor'))}</code>); gateway key <code>{e(key)}</code>.
Readings accepted: {snap['counts'].get('accepted_reading', 0)}, rejected: {sum(snap['rejected'].values())};
control decisions: {ctl.get('decisions', 0)}, commands: {ctl.get('commands', 0)}, acknowledged: {ctl.get('acks', 0)}.</p>
<h2>Statements</h2><p>Money in currency units (tariff: retail 31.87, feed-in 8.12 per kWh; supply-demand ratio pricing,
2 % of savings to the fund; saving against feed-in only). Also as CSV: statements.csv.</p><table>{table}</table>
</body></html>
"""

    def svg(self) -> str:
        if not self.flows:
            return "<p>(no data)</p>"
        W, H, pad = 900, 300, 40
        ts = [f[0] for f in self.flows]
        series = {"load": [f[1] for f in self.flows], "pv": [f[2] for f in self.flows],
                  "grid": [f[3] for f in self.flows]}
        hi = max(max(series["load"]), max(series["pv"]), max(series["grid"]), 1.0)
        lo = min(min(series["grid"]), 0.0)
        span_t = (ts[-1] - ts[0]) or 1

        def xy(t: float, v: float) -> str:
            return f"{pad + (t - ts[0]) / span_t * (W - 2 * pad):.1f},{H - pad - (v - lo) / (hi - lo) * (H - 2 * pad):.1f}"

        colors = {"load": "#c0392b", "pv": "#f39c12", "grid": "#2c3e50"}
        lines = "".join(f'<polyline fill="none" stroke="{colors[k]}" stroke-width="1.5" points="'
                        + " ".join(xy(t, v) for t, v in zip(ts, vs)) + '"/>' for k, vs in series.items())
        zero = xy(ts[0], 0).split(",")[1]
        ticks = ""
        for h in range(0, int(span_t // 3600) + 1, 3):
            x = pad + h * 3600 / span_t * (W - 2 * pad)
            lab = time.strftime("%H:%M", time.gmtime(ts[0] + h * 3600 + self.offset))
            ticks += f'<text x="{x:.0f}" y="{H - pad + 15}" font-size="11" text-anchor="middle">{lab}</text>'
        legend = "".join(f'<text x="{pad + 10 + 120 * i}" y="15" font-size="12" fill="{colors[k]}">{name}</text>'
                         for i, (k, name) in enumerate((("load", "consumption"), ("pv", "PV"),
                                                        ("grid", "grid (import +)"))))
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
                f'<line x1="{pad}" x2="{W - pad}" y1="{zero}" y2="{zero}" stroke="#999"/>{lines}{ticks}{legend}'
                f'<text x="5" y="{pad}" font-size="11">{hi / 1000:.0f} kW</text>'
                f'<text x="5" y="{H - pad}" font-size="11">{lo / 1000:.0f} kW</text></svg>')

    def close(self) -> None:
        for _, vb in self.vboards:
            try:
                vb.close()
            except Exception:  # noqa: BLE001
                pass
        for _, h in self.boards:
            try:
                h.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            self.gw.stop()
        except Exception:  # noqa: BLE001
            pass
        for p in self.procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peergrid demo", description="a neighbourhood day on one machine")
    ap.add_argument("--houses", type=int, default=100)
    ap.add_argument("--hours", type=float, default=24)
    ap.add_argument("--speed", type=float, default=360, help="simulated seconds per wall second")
    ap.add_argument("--vboards", type=int, default=3, help="houses that run the real firmware")
    ap.add_argument("--out", default=str(ROOT / "build" / "demo"))
    ap.add_argument("--seed", type=int, default=2026)
    a = ap.parse_args(argv)
    if a.houses < 1 or a.hours <= 0 or a.speed <= 0:
        ap.error("houses, hours and speed must be positive")
    d = Demo(a)
    print(f"peergrid demo: {a.houses} houses, {a.hours:g} h at {a.speed:g}x (about "
          f"{a.hours * 3600 / a.speed / 60:.1f} min), working in {d.dir}", flush=True)
    try:
        d.setup()
        d.start()
        d.run()
        path = d.finish()
    except KeyboardInterrupt:
        print("\ninterrupted")
        return 130
    finally:
        d.close()
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
