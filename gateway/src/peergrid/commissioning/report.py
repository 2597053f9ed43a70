"""The pure arithmetic and paperwork of commissioning: a CT's gain and
phase fitted from the test load's power phasor and the error left after
that fit, the printable HTML report and the check of the gateway's
signature on the JSON one. No board, no gateway, no files."""
from __future__ import annotations

import html
import math
import time
from typing import Any


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
