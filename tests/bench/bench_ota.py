#!/usr/bin/env python3
"""Benchmark: signed firmware updates over the air (docs/OTA.md), the product path.

1. update_one_s: one virtual board (the real firmware on the MicroPython
   unix port, installed with release 1 and started by its loader) against a
   real mosquitto and the real gateway service (peergrid.ingest.service
   Gateway, in this process): wall time from `peergrid fleet update <device>
   2` (cli.main, in this process) to the gateway recording `confirmed`
   (firmware_events, read with `peergrid fleet history --json`; the figure
   is the event's own time), with the times of the events in between.
2. update_ten_s: N boards (10; 3 with --quick; "boards" in the JSON) installed with release 1,
   `peergrid fleet rollout 2 --board sim --first 2 --max-fail 1`, until all
   N are confirmed.
3. Bytes on the wire for one board's update: an observer account (added to
   the registry's passwd and ACL files, read-only on pg/#) counts the MQTT
   payloads of fwget (board -> gateway) and fw (gateway -> board), next to
   the release's size and the gateway's own counters (fleet stats: pieces
   served, data bytes). "on_wire" adds MQTT 3.1.1's framing of a QoS 0
   PUBLISH: 1 byte of fixed header + the remaining length's varint (1-4
   bytes) + 2 bytes of topic length + the topic; per hop (board -> broker,
   broker -> gateway), without TCP/IP or TLS.
4. The board's check of the release's signature (tests/bench/mpy_ota_verify.py:
   open_sign1, Sig_structure with protocol.cbor, firmware.ed25519.verify) on
   the MicroPython unix port and on the 32-bit runtime (tools/mp32), both
   running the .mpy files mpy-cross makes.
5. The OTA agent's heap while it fetches, checks and switches to a whole
   release on the 32-bit runtime (tests/bench/mp32_ota_heap.py, --step),
   heap capped at the sim board's heap_bytes; when the capped run does not
   complete, the same run with a heap that may grow gives the figures.

    python tests/bench/bench_ota.py            # 10 boards in the rollout
    python tests/bench/bench_ota.py --quick    # 3 boards (< 60 s)

The virtual boards run at --speed 1 (board time = wall time) unless told:
the board paces its requests in board time (50 ms apart) and the gateway
serves at most 50 a second per board, so a faster board clock would meet
the gateway's throttle and time out pieces, which real boards never do.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tools"))

from harness import free_port, peergrid_cli, peergrid_json, registry_broker, stop_process, wait_until  # noqa: E402
import footprint  # noqa: E402
import release as rtool  # noqa: E402  (tools/release.py)
from peergrid.community import registry as reg  # noqa: E402
from peergrid.config import Config  # noqa: E402
from peergrid.ingest.service import Gateway  # noqa: E402
from peergrid.sim.vboard import VirtualBoard, default_config  # noqa: E402

C = "oak"
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 100}, {"role": "load", "rating_a": 50},
      {"role": "ev", "rating_a": 50}]
OBSERVER = ("observer", "observer-pass")
MICROPYTHON = str(ROOT / ".venv" / "bin" / "micropython")


def say(*a: Any) -> None:
    print(*a, flush=True)


def mqtt_frame(topic: str, payload_len: int) -> int:
    """Bytes of an MQTT 3.1.1 QoS 0 PUBLISH: fixed header byte, remaining
    length varint, topic length (2) and topic, payload."""
    rem = 2 + len(topic.encode()) + payload_len
    n = 1
    while rem >= 128 ** n:
        n += 1
    return 1 + n + rem


# -- releases -------------------------------------------------------------------------------------

def releases(tmp: Path) -> dict[str, Any]:
    t = time.monotonic()
    key = tmp / "release.key"
    rtool.keygen(key)
    out: dict[str, Any] = {"key": key, "pub": bytes.fromhex(Path(str(key) + ".pub").read_text().strip())}
    for seq in (1, 2):
        out[seq] = rtool.build("sim", seq=seq, key=key, out=tmp / f"sim-{seq}")[0]
    m = rtool.read_release(out[2])["manifest"]
    cose = (out[2] / "manifest.cose").read_bytes()
    sizes = [e[1] for e in m["files"]]
    out["files"] = [e[0] for e in m["files"]]
    out["size"] = {"files": len(sizes), "files_bytes": sum(sizes), "manifest_cose_bytes": len(cose),
                   "total_bytes": sum(sizes) + len(cose),
                   "pieces": sum(max(1, math.ceil(s / 1024)) for s in sizes) + math.ceil(len(cose) / 1024)}
    say(f"releases 1 and 2 of the sim board built and signed in {time.monotonic() - t:.1f} s; release 2: "
        f"{len(sizes)} files, {sum(sizes)} B, manifest.cose {len(cose)} B, {out['size']['pieces']} pieces of <= 1024 B")
    return out


# -- the board's side on MicroPython ------------------------------------------------------------------

def verify_figures(rels: dict[str, Any], mpy: Path, tmp: Path, n: int) -> dict[str, Any]:
    w = tmp / "verify"
    w.mkdir()
    (w / "v.json").write_text(json.dumps({"cose": (rels[2] / "manifest.cose").read_bytes().hex(),
                                          "keys": json.loads((rels[1] / "release_keys.json").read_text())}))
    script = str(ROOT / "tests" / "bench" / "mpy_ota_verify.py")
    out = {}
    r = subprocess.run([MICROPYTHON, script, str(w / "v.json"), str(n)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, MICROPYPATH=str(mpy)))
    out["unix"] = _last_json(r, "verify on the unix port")
    r = subprocess.run(footprint.mp32_cmd() + ["--grow", "--copy", f"{mpy}:/mpy", "--copy", f"{w}:/w", "--sys", "/mpy",
                                               script, "/w/v.json", str(n)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    out["mp32"] = _last_json(r, "verify on the 32-bit runtime")
    for k, v in out.items():
        say(f"signature check of release 2's manifest ({v['manifest_cose_bytes']} B) on MicroPython "
            f"{'unix port' if k == 'unix' else '32-bit runtime (tools/mp32)'}: {v['verify_ms']:.1f} ms "
            f"(ed25519.verify {v['ed25519_verify_ms']:.1f} ms; import of the verifier {v['import_ed25519_ms']:.1f} ms; "
            f"mean of {v['n']}); a flipped bit refused: {v['rejects_a_flipped_bit']}")
    return out


def _last_json(r: subprocess.CompletedProcess, what: str) -> dict[str, Any]:
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (rc {r.returncode}): {r.stderr[-800:]}")
    return json.loads(lines[-1])


def agent_work(rels: dict[str, Any], tmp: Path) -> Path:
    """The folder tests/bench/mp32_ota_heap.py works from (its setup.json and
    release 2's files)."""
    w = tmp / "heapwork"
    (w / "rel2").mkdir(parents=True)
    for p in rels["files"]:
        (w / "rel2" / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(rels[2] / p, w / "rel2" / p)
    bdef = json.loads((ROOT / "boards" / "sim" / "board.json").read_text())
    (w / "setup.json").write_text(json.dumps({
        "cose1": (rels[1] / "manifest.cose").read_bytes().hex(), "cose2": (rels[2] / "manifest.cose").read_bytes().hex(),
        "keys1": (rels[1] / "release_keys.json").read_text(), "files": rels["files"],
        "board": {"name": bdef["name"], "heap_bytes": bdef["heap_bytes"]}}))
    return w


def run_agent(mpy: Path, w: Path, opt: list[str], ticks0: int | None = None) -> dict[str, Any]:
    """One run of the OTA agent on the 32-bit runtime (its JSON line)."""
    script = str(ROOT / "tests" / "bench" / "mp32_ota_heap.py")
    r = subprocess.run(footprint.mp32_cmd() + opt + ["--step", "--copy", f"{mpy}:/mpy", "--copy", f"{w}:/w",
                                                     "--sys", "/mpy", script, "/w"]
                       + ([str(ticks0)] if ticks0 is not None else []),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    return _last_json(r, "the OTA agent on the 32-bit runtime")


def heap_figures(rels: dict[str, Any], mpy: Path, tmp: Path) -> dict[str, Any]:
    w = agent_work(rels, tmp)
    bdef = json.loads((ROOT / "boards" / "sim" / "board.json").read_text())
    runs = {}
    for label, opt in (("capped", ["--heap", str(bdef["heap_bytes"])]), ("grow", ["--grow"])):
        res = run_agent(mpy, w, opt)
        res["heap_cap_bytes"] = bdef["heap_bytes"] if label == "capped" else None
        runs[label] = res
        say(f"OTA agent on the 32-bit runtime, heap {'capped at ' + str(bdef['heap_bytes']) if label == 'capped' else 'growing'}"
            f": completed {res['completed']}" + (f" ({res['error']})" if res["error"] else "")
            + f"; code {res['code_board_bytes']} B (the board's protocol modules) + {res['code_agent_bytes']} B "
            f"(the agent), peak live {res['peak_live_bytes']} B, "
            f"most in use before a collection {res['peak_in_use_bytes']} B (step {res['peak_in_use_step']})")
        if res["completed"]:
            break
    return runs


# -- the gateway and the boards -------------------------------------------------------------------------

class Observer:
    """A read-only MQTT client on pg/#: payload bytes and counts per device and kind."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.lock = threading.Lock()
        self.count: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])   # msgs, payload, on wire
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-ota-observer-{os.getpid()}")
        self.c.username_pw_set(*OBSERVER)
        up = threading.Event()
        self.c.on_connect = lambda *a: self.c.subscribe(f"pg/{C}/#", qos=0)
        self.c.on_subscribe = lambda *a: up.set()
        self.c.on_message = self._msg
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        if not up.wait(10):
            raise RuntimeError("the observer could not subscribe")

    def _msg(self, client: Any, userdata: Any, msg: Any) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 4:
            return
        n = len(msg.payload)
        with self.lock:
            c = self.count[(parts[2], parts[3])]
            c[0] += 1
            c[1] += n
            c[2] += mqtt_frame(msg.topic, n)

    def of(self, device: str) -> dict[str, list[int]]:
        with self.lock:
            return {k: list(v) for (d, k), v in self.count.items() if d == device}

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Rig:
    """mosquitto with the registry's accounts (plus the observer), the
    gateway service, the release store holding releases 1 and 2."""

    def __init__(self, tmp: Path, devices: list[str], rels: dict[str, Any]) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.broker = None
        self.gw = None
        self.observer: Observer | None = None
        self.boards: list[VirtualBoard] = []
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(
            f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = -1\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {self.port}\nuser = "gateway"\npassword = "gw-pass"\n'
            f'passwd_file = "passwd"\nacl_file = "acl"\npid_file = "mosquitto.pid"\n'
            f'[ingest]\nbatch_ms = 5\n[fleet]\nrelease_keys = ["{rels["pub"].hex()}"]\n')
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        self.creds = {d: r.add_device(C, d, "sim", CH, r.add_member(C, d)) for d in devices}
        r.db.close()
        rc, _, err = peergrid_cli(self.cfg, "broker-files")
        if rc != 0:
            raise RuntimeError(f"broker-files: {err}")
        # the observer: an account that may read every topic of the community, nothing else
        subprocess.run(["mosquitto_passwd", "-b", str(tmp / "passwd"), *OBSERVER], check=True, capture_output=True)
        with open(tmp / "acl", "a") as f:
            f.write(f"\nuser {OBSERVER[0]}\ntopic read pg/{C}/#\n")
        for seq in (1, 2):
            rc, _, err = peergrid_cli(self.cfg, "fleet", "add", str(rels[seq]))
            if rc != 0:
                raise RuntimeError(f"fleet add: {err}")

    def start(self) -> None:
        self.broker = registry_broker(self.tmp, self.port)
        self.gw = Gateway(Config.load(self.cfg))
        self.gw.start()
        if not self.gw.connected.wait(10):
            raise RuntimeError("the gateway did not connect to the broker")
        self.observer = Observer(self.port)

    def board(self, device: str, release: Path, speed: float) -> VirtualBoard:
        secret, password = self.creds[device]
        cfg = default_config(C, device, secret, "127.0.0.1", self.port, reg.broker_user(C, device), password)
        vb = VirtualBoard(self.tmp / "boards" / device, cfg, speed=speed)
        self.boards.append(vb)
        vb.install(release)
        vb.start()
        return vb

    def events(self, device: str | None = None) -> list[dict[str, Any]]:
        return peergrid_json(self.cfg, "fleet", "history", *([device] if device else []))

    def stop(self) -> None:
        """Every process this rig started is gone when this returns, whatever fails on the way."""
        for vb in self.boards:
            try:
                vb.close()
            except BaseException as e:  # noqa: B036 - the other processes must still be stopped
                say(f"closing {vb.dir.name}: {e!r}")
            finally:
                _kill(vb)
        if self.boards:
            time.sleep(0.5)             # a board restarting after its update (VirtualBoard's reader thread)
            for vb in self.boards:
                _kill(vb)
        for what in (self.observer, self.gw):
            try:
                if what is not None:
                    what.close() if isinstance(what, Observer) else what.stop()
            except BaseException as e:  # noqa: B036
                say(f"stopping {type(what).__name__}: {e!r}")
        stop_process(self.broker)


def _kill(vb: VirtualBoard) -> None:
    p = vb.proc
    if p is not None and p.poll() is None:
        p.kill()
        p.wait()


def running(rig: Rig, devices: list[str], rel: int, timeout: float) -> None:
    wait_until(lambda: all((v := rig.gw.fleet.views.get(d)) is not None and v.rel == rel for d in devices),
               timeout, f"the gateway sees {devices} running release {rel}")


def update_one(rig: Rig, rels: dict[str, Any], speed: float, device: str = "solo") -> dict[str, Any]:
    vb = rig.board(device, rels[1], speed)
    running(rig, [device], 1, 30)
    st0 = dict(rig.gw.fleet.stats)
    before = rig.observer.of(device)
    t0 = time.time()
    rc, out, err = peergrid_cli(rig.cfg, "fleet", "update", device, "2")
    if rc != 0:
        raise RuntimeError(f"fleet update: {err}")
    wait_until(lambda: any(e["event"] == "confirmed" and e["rel"] == 2 for e in rig.events(device)), 120,
               "release 2 confirmed on one board", every=0.25)
    time.sleep(0.5)                             # the board's last status and the observer's last messages
    ev = [e for e in rig.events(device) if e["t"] >= t0 - 0.001]
    first = {}
    for e in ev:
        first.setdefault(e["event"], e["t"] - t0)
    t_conf = first["confirmed"]
    st = {k: rig.gw.fleet.stats[k] - st0.get(k, 0) for k in rig.gw.fleet.stats}
    after = rig.observer.of(device)
    wire = {k: [a - b for a, b in zip(v, before.get(k, [0, 0, 0]))] for k, v in after.items()}
    vstate = vb.state()
    vb.close()
    rig.boards.remove(vb)
    say(f"one board ({device}, speed {speed:g}): `fleet update {device} 2` to `confirmed` in {t_conf:.2f} s; "
        + ", ".join(f"{k} +{v:.2f}" for k, v in first.items()))
    return {"t": round(t_conf, 2), "events_s": {k: round(v, 2) for k, v in first.items()}, "wire": wire,
            "gw_stats": st, "board_state_rel": vstate.get("rel")}


def bytes_on_wire(one: dict[str, Any], rels: dict[str, Any]) -> dict[str, Any]:
    w = one["wire"]
    fwget = w.get("fwget", [0, 0, 0])
    fw = w.get("fw", [0, 0, 0])
    others = {k: {"msgs": v[0], "payload": v[1]} for k, v in w.items() if k not in ("fwget", "fw")}
    st = one["gw_stats"]
    out = {
        "counted_by": "observer subscription (read-only account on pg/oak/#, added to the registry's passwd and ACL "
                      "files): MQTT payload bytes of every message on the board's topics while it updated; "
                      "cross-checked with the gateway's fleet stats (served pieces, data bytes)",
        "fwget": {"msgs": fwget[0], "payload_bytes": fwget[1], "on_wire_bytes": fwget[2]},
        "fw": {"msgs": fw[0], "payload_bytes": fw[1], "on_wire_bytes": fw[2]},
        "payload_bytes": fwget[1] + fw[1], "on_wire_bytes": fwget[2] + fw[2],
        "on_wire_formula": "per QoS 0 PUBLISH and hop: 1 (fixed header) + len(varint(2 + len(topic) + payload)) "
                           "+ 2 + len(topic) + payload; no TCP/IP/TLS",
        "release_bytes": rels["size"]["total_bytes"], "release_files": rels["size"]["files"],
        "release_files_bytes": rels["size"]["files_bytes"], "manifest_cose_bytes": rels["size"]["manifest_cose_bytes"],
        "pieces_computed": rels["size"]["pieces"],
        "gateway_served": st.get("served"), "gateway_data_bytes": st.get("bytes"),
        "gateway_throttled": st.get("throttled"), "gateway_refused": st.get("refused"),
        "overhead_share": round((fwget[1] + fw[1]) / rels["size"]["total_bytes"] - 1, 3),
        "other_topics_during_update": others,
    }
    say(f"bytes for one board's update: fwget {fwget[0]} msgs {fwget[1]} B, fw {fw[0]} msgs {fw[1]} B (payloads; "
        f"{fwget[2] + fw[2]} B on the wire with MQTT framing); the release is {rels['size']['total_bytes']} B "
        f"({rels['size']['pieces']} pieces); gateway: {st.get('served')} pieces, {st.get('bytes')} data bytes served, "
        f"{st.get('throttled')} throttled")
    return out


def update_many(rig: Rig, rels: dict[str, Any], devices: list[str], speed: float) -> dict[str, Any]:
    t = time.monotonic()
    for d in devices:
        rig.board(d, rels[1], speed)
    running(rig, devices, 1, 60)
    say(f"{len(devices)} boards started with release 1 in {time.monotonic() - t:.1f} s")
    t0 = time.time()
    rc, out, err = peergrid_cli(rig.cfg, "fleet", "rollout", "2", "--board", "sim", "--first", "2", "--max-fail", "1")
    if rc != 0:
        raise RuntimeError(f"fleet rollout: {err}")
    rid = int(out.split()[1].rstrip(":"))

    def done() -> bool:
        conf = {e["device"] for e in rig.events() if e["event"] == "confirmed" and e["rel"] == 2 and e["t"] >= t0}
        return set(devices) <= conf

    wait_until(done, 300, f"release 2 confirmed on {len(devices)} boards", every=0.5)
    ev = [e for e in rig.events() if e["t"] >= t0 and e["device"] in devices]
    conf = sorted(e["t"] - t0 for e in ev if e["event"] == "confirmed" and e["rel"] == 2)
    firsts = {}
    for e in ev:
        if e["event"] in ("update_sent", "confirmed"):
            firsts.setdefault((e["device"], e["event"]), e["t"] - t0)
    wave1 = sorted(v for (d, k), v in firsts.items() if k == "confirmed")[:2]
    ro = next(r for r in peergrid_json(rig.cfg, "fleet", "rollouts") if r["id"] == rid)
    failed = [e for e in ev if e["event"] in ("refused", "rolled_back", "update_timeout")]
    say(f"{len(devices)} boards (speed {speed:g}): `fleet rollout 2 --board sim --first 2 --max-fail 1` to all "
        f"confirmed in {conf[-1]:.2f} s (first wave confirmed at {', '.join(f'{x:.2f}' for x in wave1)} s; "
        f"rollout {ro['state']}; failures {len(failed)})")
    return {"t": round(conf[-1], 2), "confirmed_s": [round(x, 2) for x in conf], "rollout_state": ro["state"],
            "failures": len(failed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 boards in the rollout, fewer verify runs (< 60 s)")
    ap.add_argument("--boards", type=int, help="boards in the rollout (default 10; 3 with --quick)")
    ap.add_argument("--speed", type=float, help="the virtual boards' clock speed (default 1; 2 with --quick)")
    a = ap.parse_args()
    # a SIGTERM (make interrupted) unwinds like Ctrl-C, once: every process started here is stopped
    def interrupted(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    n_boards = a.boards or (3 if a.quick else 10)
    if a.speed is None:
        a.speed = 2.0 if a.quick else 1.0
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-ota-") as td:
        tmp = Path(td)
        rels = releases(tmp)
        mpy = footprint.build_mpy(tmp / "mpy")
        verify = verify_figures(rels, mpy, tmp, 10 if a.quick else 50)
        heap = heap_figures(rels, mpy, tmp)
        devices = [f"m{i:02d}" for i in range(n_boards)]
        (tmp / "rig").mkdir()
        rig = Rig(tmp / "rig", devices + ["solo"], rels)
        try:
            rig.start()
            one = update_one(rig, rels, a.speed)
            wire = bytes_on_wire(one, rels)
            many = update_many(rig, rels, devices, a.speed)
        finally:
            rig.stop()
    capped = heap["capped"]
    final = heap.get("grow", capped)
    result = {
        "bench": "ota", "quick": a.quick,
        "update_one_s": one["t"], "update_one_events_s": one["events_s"],
        "update_ten_s": many["t"], "boards": n_boards, "speed": a.speed, "update_many_confirmed_s": many["confirmed_s"],
        "rollout_state": many["rollout_state"], "rollout_failures": many["failures"],
        "boards_runtime": f"virtual boards: MicroPython unix port (.venv/bin/micropython), speed {a.speed:g}, "
                          "real mosquitto and the real gateway service",
        "bytes_on_wire_per_board": wire,
        "verify_ms_unix": verify["unix"]["verify_ms"], "verify_ms_mp32": verify["mp32"]["verify_ms"],
        "verify": verify,
        "update_peak_heap_mp32": final["peak_live_bytes"],
        "update_heap_mp32": {
            "runtime": "tools/mp32 (32-bit MicroPython, WebAssembly), .mpy files from mpy-cross, --step",
            "peak_live_is": "max gc.mem_alloc() at the start of a step (after the collection) during the fetch, "
                            "less what was live before the first import: the protocol modules, the agent, "
                            "the stand-in Board and the agent's data",
            "peak_in_use_is": "max gc.mem_alloc() at the end of a step, before the collection: garbage of that "
                              "step included (the runtime collects only between steps)",
            "capped_at_bytes": capped["heap_cap_bytes"], "completed_capped": capped["completed"],
            "capped_error": capped["error"], "figures_from": "capped" if "grow" not in heap else "grow",
            **{k: final[k] for k in ("completed", "peak_live_bytes", "peak_in_use_bytes", "peak_in_use_step",
                                     "code_board_bytes", "code_agent_bytes", "stub_bytes", "live_after_bytes",
                                     "ed25519_in_sys_modules", "ed25519_kept_by_package",
                                     "freed_by_dropping_it_bytes", "first_request_step", "ticks0", "gap_ms",
                                     "steps", "agent_stats", "fwget_msgs", "fwget_bytes", "fw_msgs", "fw_bytes",
                                     "error")}},
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
