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

Here: the command line, the operator, the gateway client and the step
runner with steps 1-6 and 8. The checks of step 7 are in checks.py, the
site sheet in sheet.py, the CT fit and the report's HTML and signature
check in report.py, and Stop in errors.py.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from peergrid.commissioning.checks import CheckSteps
from peergrid.commissioning.console import BoardConsole, BoardRefused, ConsoleError
from peergrid.commissioning.errors import Stop
from peergrid.commissioning.report import report_html
from peergrid.commissioning.sheet import load_sheet, sheet_problems

REQUIRED_FW = "0.4.0"            # the firmware this tool was built with (firmware/board.py FW_VERSION)
BOARDS = Path(__file__).resolve().parents[4] / "boards"
USB_VIDS = {0x10C4: "CP210x", 0x1A86: "CH340", 0x303A: "Espressif", 0x0403: "FTDI"}
STEPS = ("identify", "sheet", "register", "write", "reboot", "first_reading", "ct", "voltage", "inverter", "relays",
         "report")


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
    def __init__(self, url: str, token: str, ca: Path | None = None) -> None:
        """ca: the community CA (ca.pem from the operator) that an https
        gateway's certificate must chain to; without it, the system's."""
        self.url = url.rstrip("/")
        self.token = token
        self.ctx: ssl.SSLContext | None = None
        if self.url.startswith("https://"):
            self.ctx = ssl.create_default_context(cafile=str(ca) if ca else None)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=15, context=self.ctx) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                msg = json.loads(e.read()).get("error", str(e))
            except ValueError:
                msg = str(e)
            raise Stop(f"The gateway refused: {msg}") from None
        except (urllib.error.URLError, OSError) as e:
            if isinstance(getattr(e, "reason", e), ssl.SSLCertVerificationError):
                raise Stop(f"The gateway at {self.url} is not the community's: its certificate does not check "
                           "out against the CA given (--ca ca.pem, from the operator). Stop here and ask the "
                           "operator; never send the token to it.") from None
            raise Stop(f"Cannot reach the gateway at {self.url} ({e}). Check the laptop's network; the "
                       "commissioning resumes where it stopped.") from None


class Commissioning(CheckSteps):
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
        """The state file, whole or not at all, and private (0600): the site
        sheet in it holds the house's Wi-Fi password."""
        tmp = self.state_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.st, indent=1))
        os.chmod(tmp, 0o600)            # (a .tmp left by an older version kept its mode)
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
        tls = self.creds.get("broker_tls")
        self.op.say(f"  the board talks to the broker over TLS (port {tls['port']}, certificate checked for "
                    f"{tls['name']})" if tls else
                    "  the board talks to the broker in plain text: the gateway has no TLS listener for boards")

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
        tls = c.get("broker_tls")
        if tls:
            # the gateway's TLS listener: the board checks the broker's
            # certificate against the community CA, for this name
            cfg["broker"]["port"] = tls["port"]
            cfg["broker"]["tls"] = {"ca": tls["ca"], "name": tls["name"]}
        if c.get("ntp"):
            cfg["ntp"] = c["ntp"]       # the router's NTP server: the board's clock without the Internet
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


TITLES = {"identify": "Identify the board", "sheet": "Site sheet", "register": "Register with the gateway",
          "write": "Write the config to the board", "reboot": "Restart the board", "first_reading":
          "First reading at the gateway", "ct": "CT check with a known load", "voltage": "Voltage and frequency",
          "inverter": "Inverter", "relays": "Relays", "report": "Report"}


def main(argv: list[str] | None = None, operator: Operator | None = None) -> int:
    p = argparse.ArgumentParser(prog="peergrid commission", description="commission a house, step by step")
    p.add_argument("--sheet", type=Path, help="the site sheet (TOML or JSON); asked for when missing")
    p.add_argument("--port", help="the board's serial port (found on USB when not given)")
    p.add_argument("--gateway", default=os.environ.get("PEERGRID_GATEWAY"), help="the gateway's URL")
    p.add_argument("--token", default=os.environ.get("PEERGRID_INSTALLER_TOKEN"), help="installer token")
    p.add_argument("--ca", type=Path, default=os.environ.get("PEERGRID_CA"),
                   help="the community CA (ca.pem from the operator) for an https gateway")
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
        c = Commissioning(state, op, Gateway(a.gateway, a.token, a.ca), a.port, sheet)
    except Stop as e:
        op.say("STOP: " + e.msg)
        return 2
    return c.run()


if __name__ == "__main__":
    sys.exit(main())

