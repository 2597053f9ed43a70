"""Step 7 of a commissioning, the checks, as a mixin of
commission.Commissioning: the first authenticated reading at the gateway,
the CT calibration with the test load (phase and gain, or the gain only on
boards that cannot measure the phase), voltage and frequency, the inverter
and the relays. Each ends in a PASS or FAIL recorded with its figures."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from peergrid.commissioning.console import BoardRefused, ConsoleError
from peergrid.commissioning.errors import Stop
from peergrid.commissioning.report import fit_ct, residual

if TYPE_CHECKING:
    from peergrid.commissioning.commission import Gateway, Operator

PF05_LIMIT_PCT = 1.0            # the CT check passes when the residual error at PF 0.5 is within this


def _delta(on: dict[str, dict[str, Any]], off: dict[str, dict[str, Any]], name: str) -> tuple[float, float]:
    """The test load's own power phasor on a channel: on minus off."""
    return on[name]["a_w"] - off[name]["a_w"], on[name]["b_w"] - off[name]["b_w"]


class CheckSteps:
    """The check steps and their helpers; Commissioning provides the state
    and the board and bookkeeping methods declared here."""

    st: dict[str, Any]
    op: Operator
    gw: Gateway | None
    settle_s: float
    reading_wait_s: float
    cal_windows: int
    no_phase: str

    if TYPE_CHECKING:
        def _c(self, op: str, **args: Any) -> dict[str, Any]: ...
        def check(self, name: str, ok: bool, msg: str, **figures: Any) -> None: ...
        def save(self) -> None: ...
        def step_write(self) -> None: ...
        def step_reboot(self) -> None: ...

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
