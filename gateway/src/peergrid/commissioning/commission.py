"""`peergrid commission`: commissioning a house, step by step, on the
electrician's laptop.

    peergrid commission --sheet house.toml --gateway http://gw:8080 --token pgi_... [--port /dev/ttyUSB0]
    peergrid commission --resume commission-<device>.json [--port ...]

Steps (each recorded in a state file as it completes, so a pulled cable or a
closed laptop resumes where it stopped; the device secret is never written to
that file):

  1. find the board on USB and open its console (firmware/console.py)
  2. identify it: firmware version and board type
  3. the site sheet: house and member, network, broker, CT roles and ratings,
     inverter address, relays and what they switch, the test load
  4. register the member and the board with the gateway (installer API,
     peergrid.commissioning.installer): the gateway makes the device secret and the broker
     account and ACL
  5. write the commissioning config to the board (atomic on the board)
  6. reboot it and see it come back with that config
  7. checks: first authenticated reading at the gateway; each CT's gain and
     phase found with the test load (off, on: other loads drop out of the
     difference), a reversed CT flipped, written to the board and measured
     again for the residual error (boards that cannot measure the phase: the
     load's power checked, gain fixed when asked); voltage
     and frequency; the inverter found and its serial number read; each relay
     clicked and its load seen
  8. the report: everything configured and measured, pass/fail per check,
     firmware and config digests, signed by the gateway; HTML and JSON.
"""
from __future__ import annotations

import argparse
import html
import json
import math
import os
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from peergrid.commissioning.console import BoardConsole, BoardRefused, ConsoleError

REQUIRED_FW = "0.4.0"            # the firmware this tool was built with (firmware/board.py FW_VERSION)
BOARDS = Path(__file__).resolve().parents[4] / "boards"
USB_VIDS = {0x10C4: "CP210x", 0x1A86: "CH340", 0x303A: "Espressif", 0x0403: "FTDI"}
PF05_LIMIT_PCT = 1.0            # the CT check passes when the residual error at PF 0.5 is within this
STEPS = ("identify", "sheet", "register", "write", "reboot", "first_reading", "ct", "voltage", "inverter", "relays",
         "report")


class Stop(Exception):
    """The commissioning cannot go on; the message says what to do."""

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code


class Operator:
    """How the tool talks to the electrician: a terminal by default."""

    board: "BoardConsole | None" = None

    def say(self, text: str) -> None:
        print(text, flush=True)

    def ask(self, question: str, default: str = "") -> str:
        a = input(f"{question}{f' [{default}]' if default else ''}: ").strip()
        return a or default

    def confirm(self, question: str, default: bool = True) -> bool:
        a = input(f"{question} [{'Y/n' if default else 'y/N'}]: ").strip().lower()
        return default if not a else a.startswith("y")

    def act(self, instruction: str) -> None:
        input(f"{instruction} -- then press Enter ")


def _vers(v: str) -> tuple[int, ...]:
    out = []
    for p in v.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        out.append(int(digits or 0))
    return tuple(out)


def find_port() -> str:
    from serial.tools import list_ports

    found = [p for p in list_ports.comports() if p.vid in USB_VIDS]
    if not found:
        raise Stop("No board found on USB. Plug the board in with a data cable (not a charge-only one); "
                   "on Linux your user needs to be in the 'dialout' group. Or give the port with --port.")
    if len(found) > 1:
        raise Stop("More than one USB serial device: " + ", ".join(p.device for p in found) + ". Say which with --port.")
    return found[0].device


class Gateway:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", str(e))
            except ValueError:
                msg = str(e)
            raise Stop(f"The gateway refused: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            raise Stop(f"Cannot reach the gateway at {self.url} ({e}). Check the laptop's network; the "
                       "commissioning resumes where it stopped.") from None


class Commissioning:
    def __init__(self, state_path: Path, op: Operator, gateway: Gateway | None, port: str | None,
                 sheet_path: Path | None = None, settle_s: float = 1.0, reading_wait_s: float = 60,
                 cal_windows: int = 8) -> None:
        self.state_path = state_path
        self.op = op
        self.gw = gateway
        self.port = port
        self.settle_s = settle_s
        self.cal_windows = cal_windows      # windows the board averages for each CT measurement
        self.no_phase = ""                  # why this board cannot calibrate the CT phase
        self.reading_wait_s = reading_wait_s
        self.st: dict[str, Any] = {"done": [], "checks": {}, "started": time.time()}
        if state_path.exists():
            self.st = json.loads(state_path.read_text())
        if sheet_path is not None:
            self.st["sheet"] = load_sheet(sheet_path)
        self.con: BoardConsole | None = None
        self.creds: dict[str, Any] | None = None      # only in memory
        self.cfg: dict[str, Any] | None = None        # ditto (holds the secret)

    # -- bookkeeping ------------------------------------------------------------

    def save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.st, indent=1))
        tmp.replace(self.state_path)

    def done(self, step: str) -> None:
        if step not in self.st["done"]:
            self.st["done"].append(step)
        self.save()

    def check(self, name: str, ok: bool, msg: str, **figures: Any) -> None:
        self.st["checks"][name] = {"ok": ok, "msg": msg, **figures}
        self.save()
        self.op.say(("  PASS  " if ok else "  FAIL  ") + msg)

    # -- the run ----------------------------------------------------------------

    def run(self) -> int:
        try:
            self._connect()
            for step in STEPS:
                if step in self.st["done"] and step not in ("identify",):
                    continue
                self.op.say(f"[{STEPS.index(step) + 1}/{len(STEPS)}] {TITLES[step]}")
                getattr(self, "step_" + step)()
                self.done(step)
        except ConsoleError as e:
            self.save()
            self.op.say(f"Lost the board: {e}.\nCheck the USB cable and plug it in again, then run:\n"
                        f"  peergrid commission --resume {self.state_path}")
            return 3
        except Stop as e:
            self.save()
            self.op.say("STOP: " + e.msg)
            return e.code
        finally:
            if self.con is not None:
                self.con.close()
        ok = all(c["ok"] for c in self.st["checks"].values())
        self.op.say(f"Commissioning {'PASSED' if ok else 'FAILED'}; report: {self.st.get('report_html')}")
        return 0 if ok else 1

    def _connect(self) -> None:
        port = self.port or find_port()
        self.op.say(f"Board on {port}")
        self.con = BoardConsole(port)
        self.op.board = self.con      # a test rig's operator switches its known load through it

    def _c(self, op: str, **args: Any) -> dict[str, Any]:
        assert self.con is not None
        return self.con.call(op, **args)

    # -- steps ------------------------------------------------------------------

    def step_identify(self) -> None:
        try:
            h = self._c("hello")
        except ConsoleError:
            raise ConsoleError(f"no answer from a board on {self.con.path if self.con else '?'}: is it powered, "
                               "and is it a PeerGrid board with current firmware?") from None
        self.st["board"] = h["board"]
        self.st["fw"] = h["fw"]
        self.st["fw_digest"] = h.get("fw_digest")
        self.op.say(f"  board type {h['board']}, firmware {h['fw']}, "
                    f"{'commissioned as ' + h.get('device', '') if h.get('commissioned') else 'not commissioned yet'}")
        if _vers(h["fw"]) < _vers(REQUIRED_FW):
            raise Stop(f"The board runs firmware {h['fw']}; this tool needs {REQUIRED_FW} or newer. Update it first: "
                       f"make deploy BOARD={h['board']} PORT={self.con.path if self.con else '<port>'}")
        if not (BOARDS / h["board"] / "board.json").exists():
            raise Stop(f"Board type {h['board']!r} is unknown to this tool (boards/): wrong firmware on the board?")
        want = (self.st.get("sheet") or {}).get("house", {}).get("board")
        if want and want != h["board"]:
            raise Stop(f"The sheet says board type {want}, the board says {h['board']}: check the sheet or the board.")
        self.bdef = json.loads((BOARDS / h["board"] / "board.json").read_text())

    def step_sheet(self) -> None:
        sh = self.st.get("sheet")
        if sh is None:
            sh = self._ask_sheet()
            self.st["sheet"] = sh
        problems = sheet_problems(sh, json.loads((BOARDS / self.st["board"] / "board.json").read_text()))
        if problems:
            raise Stop("The site sheet needs fixing: " + "; ".join(problems))
        self.op.say(f"  house {sh['house']['member']!r}, board id {sh['house']['device']}, "
                    f"{len(sh['ct'])} CTs, {len(sh.get('relay', []))} relays"
                    + (f", inverter at Modbus address {sh['inverter']['unit']}" if sh.get("inverter") else ""))

    def _ask_sheet(self) -> dict[str, Any]:
        o = self.op
        bdef = json.loads((BOARDS / self.st["board"] / "board.json").read_text())
        sh: dict[str, Any] = {"house": {"member": o.ask("Member (name and address)"),
                                        "device": o.ask("Board id (a-z, 0-9, -)")},
                              "network": {"wifi_ssid": o.ask("Wi-Fi name (empty: Ethernet)")}, "ct": [], "relay": []}
        if sh["network"]["wifi_ssid"]:
            sh["network"]["wifi_password"] = o.ask("Wi-Fi password")
        for c in bdef["channels"]:
            role = o.ask(f"What does {c['name']} measure (grid, pv, battery, load, ev; empty: unused)")
            if role:
                sh["ct"].append({"name": c["name"], "role": role,
                                 "rating_a": float(o.ask(f"{c['name']} rating in A", str(c.get('rating_a', 100))))})
        for i, r in enumerate(bdef.get("relays") or []):
            what = o.ask(f"What does relay {i + 1} switch (empty: nothing)")
            if what:
                sh["relay"].append({"index": i, "load": what, "rated_w": int(o.ask("Its power in W")),
                                    "failsafe": int(o.ask("State when the gateway is silent (0 off, 1 on)", "0"))})
        unit = o.ask("Inverter Modbus address (empty: no inverter)")
        if unit:
            sh["inverter"] = {"unit": int(unit)}
        sh["test_load"] = {"w": int(o.ask("Test load for the CT check, W", "2000")), "what": "kettle"}
        return sh

    def step_register(self) -> None:
        if self.gw is None:
            raise Stop("No gateway given (--gateway URL --token TOKEN)")
        sh = self.st["sheet"]
        # every channel of the board, in its order (the readings carry them all)
        bdef = json.loads((BOARDS / self.st["board"] / "board.json").read_text())
        by_name = {c["name"]: c for c in sh["ct"]}
        chans = [{"role": by_name[c["name"]]["role"], "rating_a": by_name[c["name"]]["rating_a"]}
                 if c["name"] in by_name else {"role": "unused", "rating_a": c.get("rating_a", 100)}
                 for c in bdef["channels"]]
        body = {"member": sh["house"]["member"], "device": sh["house"]["device"], "board": self.st["board"],
                "channels": chans, "rotate": bool(self.st.get("registered"))}
        # the member's own key pair for votes: made here, the private half only goes to the member
        mkey = None
        if not self.st.get("member_key_file"):
            from peergrid.market import governance as gv

            mkey, pub = gv.new_key()
            body["member_key"] = pub.hex()
        self.creds = self.gw.call("POST", "/installer/register", body)
        if mkey is not None and self.creds.get("member_has_key"):
            from peergrid.market import governance as gv

            kf = self.state_path.with_name(f"member-{sh['house']['device']}.key")
            fd = os.open(kf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(gv.key_string(mkey) + "\n")
            self.st["member_key_file"] = str(kf)
            self.st["member_key_public"] = gv.public(mkey).hex()
            self.member_key_string = gv.key_string(mkey)
            self.op.say(f"  the member's voting key is in {kf}: give it to the member (it is not kept anywhere else)")
        self.st["registered"] = True
        self.st["member_id"] = self.creds["member"]
        self.st["community"] = self.creds["community"]
        self.op.say(f"  registered with the gateway: member {self.creds['member']}, broker account "
                    f"{self.creds['broker_user']}")

    def _config(self) -> dict[str, Any]:
        sh = self.st["sheet"]
        c = self.creds
        assert c is not None
        cfg: dict[str, Any] = {
            "community": c["community"], "device": c["device"], "secret": c["secret"],
            "broker": {"host": c["broker_host"], "port": c["broker_port"], "user": c["broker_user"],
                       "password": c["broker_password"]},
            "channels": {x["name"]: {"role": x["role"], "gain": float(self.st.get("gain", {}).get(x["name"], 1.0)),
                                     "rating_a": x["rating_a"], **({"phase": x["phase"]} if "phase" in x else {}),
                                     **({"phase_deg": float(self.st["phase_deg"][x["name"]])}
                                        if x["name"] in self.st.get("phase_deg", {}) else {})}
                         for x in sh["ct"]},
            "relays": [{"failsafe": 0, "load": ""} for _ in range(max([r["index"] for r in sh.get("relay", [])] or [-1]) + 1)],
        }
        for r in sh.get("relay", []):
            cfg["relays"][r["index"]] = {"failsafe": int(r.get("failsafe", 0)), "load": r["load"]}
        if sh.get("inverter"):
            cfg["inverter"] = {"unit": int(sh["inverter"]["unit"])}
        net = sh.get("network") or {}
        if net.get("wifi_ssid"):
            cfg["net"] = {"ssid": net["wifi_ssid"], "password": net.get("wifi_password", "")}
        for k in ("period_s",):
            if k in sh.get("board_settings", {}):
                cfg[k] = sh["board_settings"][k]
        return cfg

    def step_write(self) -> None:
        if self.creds is None:
            # resumed after the registration: the secret was not kept, so get new ones
            self.step_register()
        self.cfg = self._config()
        try:
            r = self._c("write_config", config=self.cfg, timeout=10)
        except BoardRefused as e:
            raise Stop(f"The board refused the config: {e.msg}") from None
        self.st["cfg_digest"] = r["cfg"]
        self.op.say(f"  config written (digest {r['cfg']})")

    def step_reboot(self) -> None:
        self._c("reboot")
        deadline = time.monotonic() + 40
        while True:
            time.sleep(0.5)
            try:
                h = self._c("hello", tries=1, timeout=2)
                if h.get("commissioned") and h.get("cfg") == self.st["cfg_digest"]:
                    break
            except ConsoleError:
                pass
            if time.monotonic() > deadline:
                raise ConsoleError("the board did not come back after the reboot")
        self.op.say("  the board restarted with the new config")

    def step_first_reading(self) -> None:
        assert self.gw is not None
        dev = self.st["sheet"]["house"]["device"]
        deadline = time.monotonic() + self.reading_wait_s
        while True:
            r = self.gw.call("GET", f"/installer/device/{dev}")
            if r["readings"]:
                self.check("first_reading", True, f"the gateway received and verified readings from {dev} "
                                                  f"({r['readings']} so far)", readings=r["readings"])
                return
            if time.monotonic() > deadline:
                try:
                    s = self._c("status")
                    why = "the board is connected to the broker" if s["connected"] else \
                        "the board is not connected to the broker: check Wi-Fi name and password, and the broker address"
                except (ConsoleError, BoardRefused):
                    why = "the board does not say why"
                rej = r.get("rejected") or {}
                self.check("first_reading", False, f"no reading from {dev} reached the gateway in "
                                                   f"{self.reading_wait_s:.0f} s; {why}"
                           + (f"; the gateway rejected: {rej}" if rej else ""))
                return
            time.sleep(1)

    def _fresh(self, n: int = 2) -> dict[str, Any]:
        """A measurement at least n readings newer than now."""
        first = self._c("measure")["readings"]
        deadline = time.monotonic() + 30 + n * self.settle_s
        while True:
            time.sleep(self.settle_s / 2)
            m = self._c("measure")
            if m["readings"] >= first + n:
                return m
            if time.monotonic() > deadline:
                raise Stop("The board stopped measuring (no new readings): restart it and resume.")

    def _grid(self, m: dict[str, Any]) -> tuple[str, int]:
        for c in m["ch"]:
            if c["role"] == "grid":
                return c["name"], int(c["w"])
        raise Stop("No CT has the role 'grid' in the sheet")

    def step_ct(self) -> None:
        """Gain and phase of the CTs from the test load (a resistive one of
        known power, on the sheet): the board measures every channel's power
        phasor (console op cal_measure, firmware/calibrate.py) with the load
        off and on; what the house's other loads draw, whatever their power
        factor, is the same in both and drops out of the difference. Written
        to the config, then checked again with the board running it."""
        tl = self.st["sheet"].get("test_load") or {"w": 2000, "what": "kettle"}
        for attempt in range(2):
            if not self._ct_round(tl) or attempt == 1:
                return
            if not self.op.confirm("Measure the CTs again (with the other loads as steady as they can be)?"):
                return

    def _ct_round(self, tl: dict[str, Any]) -> bool:
        """One calibration of the CTs with the test load; True when it was
        written but the check afterwards did not agree (worth another go)."""
        expect = int(tl["w"])
        what = tl.get("what", "test load")
        self.op.act(f"Make sure the {what} is OFF (other loads may stay as they are)")
        off1 = self._phasors()
        if off1 is None:
            self.op.say(f"  CT phase not calibrated: {self.no_phase}")
            self._ct_gain_only(tl, expect)
            return False
        self.op.act(f"Switch ON the {what} ({expect} W) in this house")
        on1 = self._phasors()
        assert on1 is not None
        grid = self._grid_name()
        fits = {}
        for name in on1:
            da, db = _delta(on1, off1, name)
            fits[name] = fit_ct(da, db, expect)
        g = fits[grid]
        if g["problem"]:
            self.op.act(f"Switch OFF the {what}")
            self.check("ct", False, f"grid CT {grid}: {g['problem'].format(what=what)} The board's config was not "
                                    "changed.", expected_w=expect, measured_w=round(g["seen_w"]),
                       phase_deg=g["phase_deg"], gain=g["gain"])
            return False
        if g["gain"] < 0 and self.st.get("gain", {}).get(grid, 1.0) > 0:
            self.op.say(f"  The grid CT {grid} reads -{round(g['seen_w'])} W for the {expect} W load: it is the wrong "
                        "way round (or its two wires are swapped).")
            if not self.op.confirm("Flip its direction in the board's config (no need to turn the clamp)?"):
                self.op.act(f"Switch OFF the {what}")
                self.check("ct", False, f"grid CT {grid} reversed (-{round(g['seen_w'])} W for {expect} W); turn the "
                                        "clamp round", expected_w=expect, measured_w=-round(g["seen_w"]))
                return False
        cal = {grid: g}
        for name, f in fits.items():
            # another CT the test load also flows through (a load circuit) is calibrated alike
            if name != grid and not f["problem"] and f["gain"] > 0 and name in self._sheet_cts():
                cal[name] = f
        for name, f in cal.items():
            self.st.setdefault("gain", {})[name] = round(f["gain"], 4)
            self.st.setdefault("phase_deg", {})[name] = round(f["phase_deg"], 3)
            self.op.say(f"  CT {name}: gain {f['gain']:.4f}, phase {f['phase_deg']:+.2f} deg")
        for name in self._sheet_cts():
            if name not in cal:
                self.op.say(f"  CT {name}: the {what} does not flow through it; its gain and phase stay as they are")
        self.op.say(f"  Leave the {what} ON: the board restarts with its calibration and measures it again")
        self._rewrite_config()
        on2 = self._phasors()
        assert on2 is not None
        if abs(_delta(on2, off1, grid)[0]) < 0.5 * abs(_delta(on1, off1, grid)[0]):
            self.op.act(f"Switch ON the {what} again ({expect} W): it went off during the restart")
            on2 = self._phasors()
            assert on2 is not None
        self.op.act(f"Switch OFF the {what}")
        off2 = self._phasors()
        assert off2 is not None
        res = {}
        for name in cal:
            da, db = _delta(on2, off2, name)
            c = on2[name]                    # the gain and phase the board now runs with
            res[name] = residual(da, db, c["gain"], c["phase_deg"], expect)
            d1 = _delta(on1, off1, name)
            res[name]["repeat_pct"] = round(100 * ((da - d1[0]) ** 2 + (db - d1[1]) ** 2) ** 0.5 / expect, 2)
        r = res[grid]
        ok = abs(r["pf05_error_pct"]) <= PF05_LIMIT_PCT and abs(r["error_pct"]) <= PF05_LIMIT_PCT
        msg = (f"grid CT {grid}: +{r['measured_w']} W for the {expect} W {what} ({r['error_pct']:+.2f} %), gain "
               f"{self.st['gain'][grid]}, phase {self.st['phase_deg'][grid]:+.2f} deg; residual phase "
               f"{r['phase_residual_deg']:+.2f} deg, error at PF 0.5 {r['pf05_error_pct']:.2f} %")
        if not ok:
            msg += (f" (more than {PF05_LIMIT_PCT} %: did a load change while measuring? The two measurements "
                    f"differ by {r['repeat_pct']} % of the {what})")
        for name in cal:
            if name != grid:
                x = res[name]
                msg += (f"; CT {name}: gain {self.st['gain'][name]}, phase {self.st['phase_deg'][name]:+.2f} deg, "
                        f"error at PF 0.5 {x['pf05_error_pct']:.2f} %")
        self.check("ct", ok, msg, expected_w=expect, measured_w=r["measured_w"], gain=self.st["gain"][grid],
                   phase_deg=self.st["phase_deg"][grid], residual=res)
        return not ok

    def _sheet_cts(self) -> list[str]:
        return [c["name"] for c in self.st["sheet"]["ct"]]

    def _grid_name(self) -> str:
        for c in self.st["sheet"]["ct"]:
            if c.get("role") == "grid":
                return str(c["name"])
        raise Stop("No CT has the role 'grid' in the sheet")

    def _phasors(self) -> dict[str, dict[str, Any]] | None:
        """Every channel's power phasor now, by name (console op cal_measure);
        None when this board cannot measure it (the reason in no_phase)."""
        time.sleep(self.settle_s / 2)
        self._c("hello")        # is the board there at all (a short timeout), before the long wait
        try:
            # an ESP32 takes up to about a second a window (its sampling and four passes over it)
            r = self._c("cal_measure", windows=self.cal_windows, timeout=5 + 1.5 * self.cal_windows)
        except BoardRefused as e:
            if e.err == "op":
                self.no_phase = "the board's firmware cannot measure it (update it to calibrate the CT phase)"
                return None
            if e.err in ("unsupported", "novref"):
                self.no_phase = e.msg
                return None
            raise Stop(f"The board could not measure the CTs: {e.msg}") from None
        return {c["name"]: c for c in r["ch"]}

    def _ct_gain_only(self, tl: dict[str, Any], expect: int) -> None:
        """The CT check of a board that cannot calibrate the phase: the test
        load's power from two readings, right way round and within 15 %."""
        note = f"; phase not calibrated: {self.no_phase}"
        for attempt in range(3):
            base = self._fresh()
            name, w0 = self._grid(base)
            self.op.act(f"Switch ON the {tl.get('what', 'test load')} ({expect} W) in this house")
            m = self._fresh()
            _, w1 = self._grid(m)
            self.op.act(f"Switch OFF the {tl.get('what', 'test load')}")
            delta = w1 - w0
            ratio = delta / expect if expect else 0
            if 0.85 <= ratio <= 1.15:
                self.check("ct", True, f"grid CT {name}: +{delta} W for the {expect} W test load, right way round"
                           + note, expected_w=expect, measured_w=delta, gain=self.st.get("gain", {}).get(name, 1.0),
                           phase_deg=None)
                return
            if -1.15 <= ratio <= -0.85:
                self.op.say(f"  The grid CT {name} reads {delta} W for the {expect} W load: it is the wrong way round "
                            "(or its two wires are swapped).")
                if self.op.confirm("Flip its direction in the board's config (no need to turn the clamp)?"):
                    self._set_gain(name, -self.st.get("gain", {}).get(name, 1.0))
                    continue
                self.check("ct", False, f"grid CT {name} reversed ({delta} W for {expect} W); turn the clamp round",
                           expected_w=expect, measured_w=delta)
                return
            if abs(ratio) >= 0.3:
                self.op.say(f"  The grid CT {name} reads {delta} W for the {expect} W load ({ratio:.0%}).")
                if self.op.confirm("Recalibrate its gain to match?"):
                    self._set_gain(name, self.st.get("gain", {}).get(name, 1.0) / abs(ratio) * (1 if ratio > 0 else -1))
                    continue
            self.check("ct", False, f"grid CT {name}: saw {delta} W for the {expect} W test load. Is the clamp on "
                                    "the incoming line (all of the house's current), and was the load really on?",
                       expected_w=expect, measured_w=delta)
            return
        self.check("ct", False, f"grid CT {name}: still wrong after changing it; check the clamp and the sheet's rating")

    def _set_gain(self, name: str, gain: float) -> None:
        self.st.setdefault("gain", {})[name] = round(gain, 4)
        self._rewrite_config()

    def _rewrite_config(self) -> None:
        """Write the config again after a fix (a CT gain, the inverter
        address) and restart the board with it (resumed: step_write gets
        new credentials first, as the secret was not kept)."""
        self.step_write()
        self.save()
        self.step_reboot()

    def step_voltage(self) -> None:
        m = self._fresh(1)
        v, f = m.get("vrms_v"), m.get("freq_hz")
        if v is None:
            self.check("voltage", True, "this board has no voltage input (powers use the nominal voltage)")
            return
        ok_v = 207 <= v <= 253
        ok_f = f is not None and 49.5 <= f <= 50.5
        self.check("voltage", ok_v and ok_f, f"voltage {v:.1f} V{' (expected 207-253 V)' if not ok_v else ''}, "
                                             f"frequency {f} Hz{' (expected 49.5-50.5 Hz)' if not ok_f else ''}",
                   vrms_v=v, freq_hz=f)

    def step_inverter(self) -> None:
        inv = self.st["sheet"].get("inverter")
        if not inv:
            self.op.say("  no inverter on the sheet")
            return
        unit = int(inv["unit"])
        while True:
            try:
                r = self._c("probe_inverter", unit=unit, timeout=8)
            except BoardRefused as e:
                self.op.say(f"  No inverter answers at Modbus address {unit} ({e.msg}).")
                other = self.op.ask("Check the address set in the inverter's menu and the RS485 wiring (A/B, "
                                    "termination). Try another address? (empty: skip)")
                if other:
                    unit = int(other)
                    continue
                self.check("inverter", False, f"no inverter answers at Modbus address {unit}: check the address set "
                                              "in the inverter's menu and the RS485 wiring (A/B swapped? termination?)",
                           unit=unit)
                return
            if unit != int(inv["unit"]):
                self.st["sheet"]["inverter"]["unit"] = unit
                self._rewrite_config()
            self.check("inverter", True, f"inverter {r.get('manufacturer')} {r.get('model')} serial {r.get('serial')}"
                                         f" at Modbus address {unit} (SunSpec model {r.get('sunspec_model')})",
                       unit=unit, serial=r.get("serial"), manufacturer=r.get("manufacturer"), model=r.get("model"))
            return

    def step_relays(self) -> None:
        for rl in self.st["sheet"].get("relay", []):
            i, what, rated = rl["index"], rl["load"], int(rl["rated_w"])
            key = f"relay{i + 1}"
            self._c("relay", i=i, v=0, hold_s=60)
            base = self._fresh()
            _, w0 = self._grid(base)
            self._c("relay", i=i, v=1, hold_s=60)
            m = self._fresh()
            _, w1 = self._grid(m)
            self._c("relay", i=i, v=int(rl.get("failsafe", 0)), hold_s=1)
            delta = w1 - w0
            if abs(delta - rated) <= 0.25 * rated:
                self.check(key, True, f"relay {i + 1} ({what}): clicked, +{delta} W (rated {rated} W)",
                           expected_w=rated, measured_w=delta)
            else:
                self.check(key, False, f"relay {i + 1} ({what}) switched, but the power changed by {delta} W, not about "
                                       f"{rated} W: check the contactor, the load's breaker and that the load is "
                                       "on the metered circuit", expected_w=rated, measured_w=delta)

    def step_report(self) -> None:
        assert self.gw is not None
        sh = self.st["sheet"]
        checks = self.st["checks"]
        rep = {"kind": "peergrid commissioning report", "version": 1, "community": self.st.get("community"),
               "device": sh["house"]["device"], "member": sh["house"]["member"], "member_id": self.st.get("member_id"),
               "board": self.st["board"], "fw": self.st["fw"], "fw_digest": self.st.get("fw_digest"),
               "cfg_digest": self.st.get("cfg_digest"), "electrician": sh.get("electrician", ""),
               "started": self.st["started"], "finished": time.time(),
               "configured": {"ct": sh["ct"], "relay": sh.get("relay", []), "inverter": sh.get("inverter"),
                              "gain": self.st.get("gain", {}), "phase_deg": self.st.get("phase_deg", {}),
                              "network": {k: v for k, v in (sh.get("network") or {}).items() if "password" not in k}},
               "member_key": self.st.get("member_key_public"),
               "checks": checks, "passed": all(c["ok"] for c in checks.values())}
        sig = self.gw.call("POST", "/installer/report", rep)
        signed = {"report": rep, "signature": sig["signature"], "key": sig["key"], "id": sig["id"]}
        base = self.state_path.with_name(f"report-{sh['house']['device']}")
        base.with_suffix(".json").write_text(json.dumps(signed, indent=1, sort_keys=True))
        base.with_suffix(".html").write_text(report_html(signed, getattr(self, "member_key_string", None)))
        self.st["report_json"] = str(base.with_suffix(".json"))
        self.st["report_html"] = str(base.with_suffix(".html"))
        self.op.say(f"  report signed by the gateway (#{sig['id']}): {self.st['report_html']}")


def _delta(on: dict[str, dict[str, Any]], off: dict[str, dict[str, Any]], name: str) -> tuple[float, float]:
    """The test load's own power phasor on a channel: on minus off."""
    return on[name]["a_w"] - off[name]["a_w"], on[name]["b_w"] - off[name]["b_w"]


def fit_ct(da: float, db: float, expect_w: float) -> dict[str, Any]:
    """Gain and phase correction of a CT from the phasor (da, db) of a
    resistive load of expect_w W, measured at gain 1 (the channel would read
    da cos t + db sin t with a correction of t degrees; firmware/calibrate.py
    solve() is the board's side of the same). A negative gain: the CT is the
    wrong way round. `problem`: why these figures must not be written (a
    format string with {what}), else None."""
    seen = math.hypot(da, db)
    out: dict[str, Any] = {"seen_w": seen, "gain": None, "phase_deg": None, "problem": None}
    if seen < 0.3 * expect_w:
        out["problem"] = (f"the {{what}} did not show up: {seen:.0f} W seen for {expect_w:.0f} W. Was it really "
                          "switched on, and is it in this house, on the circuit behind this clamp (the incoming line "
                          "for the grid CT)?")
        return out
    sign = 1.0 if da >= 0 else -1.0
    phase = math.degrees(math.atan2(sign * db, sign * da))
    gain = sign * expect_w / seen
    out["gain"] = round(gain, 4)
    out["phase_deg"] = round(phase, 3)
    if not 0.5 <= abs(gain) <= 2.0:
        out["problem"] = (f"{seen:.0f} W seen for the {expect_w:.0f} W {{what}}, a gain of {abs(gain):.2f}, outside "
                          "0.5 to 2. Is the clamp fully closed, is its rating on the sheet right, is the load's power "
                          "right, and is the load on the circuit behind this clamp?")
    elif abs(phase) > 10:
        out["problem"] = (f"its phase would be corrected by {phase:+.1f} degrees; a CT is never that far off (at "
                          "most a few degrees). Is the clamp fully closed and on the same phase as the board's voltage "
                          "input (a three-phase house?), and is the {what} purely resistive (a kettle or a heater, not "
                          "a heat pump, a microwave or anything with a motor or a power supply)?")
    return out


def residual(da: float, db: float, gain: float, phase_deg: float, expect_w: float) -> dict[str, Any]:
    """What is left of a CT's error with the gain and phase the board runs
    with, from the phasor (da, db) of the resistive test load at gain 1: its
    power as measured, the error on it, the phase error left, and the worst
    error on a load of power factor 0.5 (lagging or leading)."""
    mag = math.hypot(da, db)
    t = math.radians(phase_deg)
    measured = gain * (da * math.cos(t) + db * math.sin(t))
    sign = 1.0 if gain >= 0 else -1.0
    left = math.atan2(sign * db, sign * da) - t          # the phase error not corrected
    k = abs(gain) * mag / expect_w
    pf05 = max(abs(k * math.cos(left - phi) / math.cos(phi) - 1) for phi in (math.pi / 3, -math.pi / 3))
    return {"measured_w": round(measured, 1), "error_pct": round(100 * (measured / expect_w - 1), 3),
            "phase_residual_deg": round(math.degrees(left), 3), "pf05_error_pct": round(100 * pf05, 3)}


TITLES = {"identify": "Identify the board", "sheet": "Site sheet", "register": "Register with the gateway",
          "write": "Write the config to the board", "reboot": "Restart the board", "first_reading":
          "First reading at the gateway", "ct": "CT check with a known load", "voltage": "Voltage and frequency",
          "inverter": "Inverter", "relays": "Relays", "report": "Report"}


def load_sheet(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        return tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, ValueError) as e:
        raise Stop(f"Cannot read the site sheet {path}: {e}") from None


def sheet_problems(sh: dict[str, Any], bdef: dict[str, Any]) -> list[str]:
    from protocol import topics

    out = []
    h = sh.get("house") or {}
    if not h.get("member"):
        out.append("house.member (the member's name) is missing")
    if not topics.valid_id(h.get("device", "")):
        out.append("house.device must be 1-16 of a-z, 0-9 and '-'")
    names = [c["name"] for c in bdef["channels"]]
    cts = sh.get("ct") or []
    if sum(1 for c in cts if c.get("role") == "grid") != 1:
        out.append("exactly one CT must have the role 'grid'")
    for c in cts:
        if c.get("name") not in names:
            out.append(f"CT {c.get('name')!r} is not on this board (it has {', '.join(names)})")
        if c.get("role") not in ("grid", "pv", "battery", "load", "ev"):
            out.append(f"CT {c.get('name')}: role {c.get('role')!r} is not grid, pv, battery, load or ev")
        if not isinstance(c.get("rating_a"), (int, float)) or c["rating_a"] <= 0:
            out.append(f"CT {c.get('name')}: rating_a must be a positive number")
    nrel = len(bdef.get("relays") or [])
    for r in sh.get("relay") or []:
        if not isinstance(r.get("index"), int) or not 0 <= r["index"] < nrel:
            out.append(f"relay index {r.get('index')} is not on this board (0..{nrel - 1})")
        if r.get("failsafe", 0) not in (0, 1):
            out.append("a relay's failsafe is 0 (off) or 1 (on)")
    inv = sh.get("inverter")
    if inv is not None and not (isinstance(inv.get("unit"), int) and 1 <= inv["unit"] <= 247):
        out.append("inverter.unit is a Modbus address 1..247")
    return out


def report_html(signed: dict[str, Any], member_key: str | None = None) -> str:
    """The printable report. `member_key`: the member's private voting key,
    printed for the member only (it is not in the signed JSON the gateway keeps)."""
    r = signed["report"]
    e = html.escape
    rows = "".join(f"<tr class={'pass' if c['ok'] else 'fail'}><td>{e(k)}</td><td>{'PASS' if c['ok'] else 'FAIL'}</td>"
                   f"<td>{e(c['msg'])}</td></tr>" for k, c in r["checks"].items())
    ph = r["configured"].get("phase_deg") or {}
    left = (r["checks"].get("ct") or {}).get("residual") or {}

    def _left(name: str) -> str:
        x = left.get(name)
        if not x:
            return "not measured"
        return (f"{x['error_pct']:+.2f} % on the test load, {x['pf05_error_pct']:.2f} % at PF 0.5 "
                f"(phase {x['phase_residual_deg']:+.2f}&deg; left)")

    cts = "".join(f"<tr><td>{e(c['name'])}</td><td>{e(c['role'])}</td><td>{c['rating_a']} A</td>"
                  f"<td>{r['configured']['gain'].get(c['name'], 1.0)}</td>"
                  f"<td>{(format(ph[c['name']], '+.3f') + '&deg;') if c['name'] in ph else 'not calibrated'}</td>"
                  f"<td>{_left(c['name'])}</td></tr>" for c in r["configured"]["ct"])
    rel = "".join(f"<tr><td>{x['index'] + 1}</td><td>{e(x['load'])}</td><td>{x['rated_w']} W</td>"
                  f"<td>{'on' if x.get('failsafe') else 'off'}</td></tr>" for x in r["configured"]["relay"])
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["finished"]))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Commissioning {e(r['device'])}</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto}} table{{border-collapse:collapse;width:100%;margin:1em 0}}
td,th{{border:1px solid #999;padding:.3em .5em;text-align:left}} .pass td:nth-child(2){{color:#060;font-weight:bold}}
.fail td:nth-child(2){{color:#b00;font-weight:bold}} .sig{{font-family:monospace;font-size:.8em;word-break:break-all}}
@media print{{body{{margin:0}}}}</style></head><body>
<h1>Commissioning report: {e(r['device'])}</h1>
<p><b>{'PASSED' if r['passed'] else 'FAILED'}</b> &middot; {e(when)} &middot; member {e(str(r['member']))}
 (#{r.get('member_id')}) &middot; community {e(str(r['community']))}</p>
<table><tr><th>board</th><td>{e(r['board'])}</td></tr><tr><th>firmware</th><td>{e(r['fw'])} (digest {e(str(r['fw_digest']))})</td></tr>
<tr><th>config digest</th><td>{e(str(r['cfg_digest']))}</td></tr><tr><th>electrician</th><td>{e(str(r['electrician']))}</td></tr></table>
<h2>Checks</h2><table><tr><th>check</th><th>result</th><th>details</th></tr>{rows}</table>
<h2>Current transformers</h2><table><tr><th>CT</th><th>role</th><th>rating</th><th>gain</th><th>phase correction</th>
<th>residual error</th></tr>{cts}</table>
<h2>Relays</h2><table><tr><th>relay</th><th>switches</th><th>power</th><th>when the gateway is silent</th></tr>{rel}</table>
{f"<h2>The member's voting key (keep it private)</h2><p class=sig>{e(member_key)}</p><p>Public key "
  f"<span class=sig>{e(str(r.get('member_key')))}</span>. Proposals and ballots are signed with it "
  "(peergrid propose / vote).</p>" if member_key else ""}
<p>Signed by the gateway (report #{signed['id']}, Ed25519). Key <span class=sig>{e(signed['key'])}</span><br>
Signature <span class=sig>{e(signed['signature'])}</span></p></body></html>
"""


def verify_report(signed: dict[str, Any]) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from peergrid.commissioning.installer import canonical

    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(signed["key"])).verify(
            bytes.fromhex(signed["signature"]), canonical(signed["report"]))
        return True
    except (InvalidSignature, ValueError, KeyError):
        return False


def main(argv: list[str] | None = None, operator: Operator | None = None) -> int:
    p = argparse.ArgumentParser(prog="peergrid commission", description="commission a house, step by step")
    p.add_argument("--sheet", type=Path, help="the site sheet (TOML or JSON); asked for when missing")
    p.add_argument("--port", help="the board's serial port (found on USB when not given)")
    p.add_argument("--gateway", default=os.environ.get("PEERGRID_GATEWAY"), help="the gateway's URL")
    p.add_argument("--token", default=os.environ.get("PEERGRID_INSTALLER_TOKEN"), help="installer token")
    p.add_argument("--resume", type=Path, help="continue a commissioning from its state file")
    p.add_argument("--state", type=Path, help="state file (default commission-<device>.json)")
    a = p.parse_args(argv)
    op = operator or Operator()
    if a.resume is not None:
        if not a.resume.exists():
            op.say(f"No such state file: {a.resume}")
            return 2
        state = a.resume
        sheet = a.sheet
    else:
        if a.sheet is None and a.state is None:
            op.say("Give the site sheet with --sheet (or a state file with --state to be asked for it)")
            return 2
        try:
            dev = load_sheet(a.sheet)["house"]["device"] if a.sheet else "board"
        except (Stop, KeyError) as e:
            op.say(f"STOP: {getattr(e, 'msg', e)}")
            return 2
        state = a.state or Path(f"commission-{dev}.json")
        if state.exists():
            op.say(f"{state} exists: resume with --resume {state}, or remove it to start again")
            return 2
        sheet = a.sheet
    if not a.gateway or not a.token:
        op.say("Give the gateway's URL and your installer token (--gateway, --token or PEERGRID_GATEWAY, "
               "PEERGRID_INSTALLER_TOKEN)")
        return 2
    try:
        c = Commissioning(state, op, Gateway(a.gateway, a.token), a.port, sheet)
    except Stop as e:
        op.say("STOP: " + e.msg)
        return 2
    return c.run()


if __name__ == "__main__":
    sys.exit(main())

