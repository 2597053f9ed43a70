"""Firmware updates, the gateway's side (docs/OTA.md 2 and 4), against a
real mosquitto and the real gateway service, with CPython clients posing as
boards (frames sealed with protocol/ as the firmware seals them): the
release store refuses what does not match its signed manifest; fwget is
served from the store and bounded against a hostile board; statuses become
firmware events; a trial that publishes a live reading is confirmed; a
rollout goes on after its first wave confirms and halts on a failure."""
from __future__ import annotations

import hashlib
import json
import os
import queue
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from harness import board_client, free_port, peergrid_cli, peergrid_json, registry_broker, stop_process, wait_until
from peergrid.community import registry as reg
from peergrid.config import Config
from peergrid.ingest.service import Gateway
from protocol import cbor, cose, fw, messages, topics
from protocol.errors import E_RANGE, E_TARGET
from protocol.link import DeviceLink

pytestmark = pytest.mark.broker
C = "oak"
CH = [{"role": "grid", "rating_a": 100}]
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"test release key").digest())
PUB = KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def build_release(out: Path, board: str, seq: int, key: Ed25519PrivateKey = KEY, size: int = 3000) -> Path:
    """A release directory as docs/OTA.md 1 lays it out (test-local builder)."""
    d = out / f"{board}-{seq}"
    files = {"lib/firmware/main.mpy": hashlib.sha256(f"{board}{seq}".encode()).digest() * (size // 32 + 1),
             "lib/protocol/cbor.mpy": b"\x4d\x06" + bytes(range(256)) * 3,
             "release_keys.json": json.dumps([PUB.hex()]).encode()}
    files["lib/firmware/main.mpy"] = files["lib/firmware/main.mpy"][:size]
    for p, data in files.items():
        (d / p).parent.mkdir(parents=True, exist_ok=True)
        (d / p).write_bytes(data)
    manifest = {"format": 1, "version": f"1.{seq}", "seq": seq, "board": board, "heap": 40000, "downgrade": False,
                "trial_s": 600, "created": 1_760_000_000,
                "files": [[p, len(data), hashlib.sha256(data).digest()] for p, data in sorted(files.items())]}
    payload = cbor2.dumps(manifest, canonical=True)
    prot = cbor2.dumps({1: -8})
    pub = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    sig = key.sign(cbor2.dumps(["Signature1", prot, b"", payload]))
    kid = hashlib.sha256(pub).digest()[:8]
    (d / "manifest.cose").write_bytes(cbor2.dumps(cbor2.CBORTag(18, [prot, {4: kid}, payload, sig])))
    (d / "manifest.json").write_text(json.dumps({"seq": seq, "board": board}))
    return d


def write_config(tmp: Path, port: int = 1883, keys: bool = True, extra: str = "") -> Path:
    cfg = tmp / "gw.toml"
    cfg.write_text(
        f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = -1\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\nuser = "gateway"\npassword = "gw-pass"\n'
        f'passwd_file = "passwd"\nacl_file = "acl"\npid_file = "mosquitto.pid"\n'
        f'[ingest]\nbatch_ms = 5\n'
        f'[fleet]\n' + (f'release_keys = ["{PUB.hex()}"]\n' if keys else "") + extra)
    return cfg


class Board:
    """A board's network side: status, readings, fwget, acks sealed with its
    key; what the gateway sends it (cmd, fw) lands in queues."""

    def __init__(self, rig: "Rig", device: str, board: str) -> None:
        secret, password = rig.creds[device]
        self.device, self.board = device, board
        self.link = DeviceLink(C, device, secret)
        self.up = cose.Sealer(cose.derive_keys(secret)[0], device.encode(), cose.ALG_HMAC256)
        self.seq = 0
        self.boot = 1
        self.rel: int | None = 1
        self.cmds: queue.Queue[dict[str, Any]] = queue.Queue()
        self.fw: queue.Queue[tuple] = queue.Queue()
        self.c = board_client(reg.broker_user(C, device), password, rig.port, f"{device}-{time.monotonic_ns()}")

        def on_message(client: Any, userdata: Any, msg: Any) -> None:
            if msg.topic.endswith("/cmd"):
                self.cmds.put(self.link.open_command(msg.topic, bytes(msg.payload)))
            else:
                self.fw.put(fw.decode_chunk(bytes(msg.payload)))

        self.c.on_message = on_message
        self.c.subscribe([(topics.topic(C, device, topics.CMD), 1), (topics.topic(C, device, topics.FW), 1)])[1]
        time.sleep(0.1)

    def _n(self) -> int:
        self.seq += 1
        return self.seq

    def status(self, **kw: Any) -> None:
        f = {"boot": self.boot, "seq": self._n(), "t": int(time.time()), "fw": "1.0", "cfg": b"\x01" * 8, "reset": 1,
             "heap": 90000, "uptime": 5, "buffered": 0, "online": 1, "board": self.board, "rel": self.rel}
        f.update(kw)
        self.c.publish(self.link.t_status, bytes(self.link.status(f)), qos=1).wait_for_publish(5)

    def reading(self, flags: int = 0) -> None:
        fr = self.link.reading(self.boot, self._n(), int(time.time()), flags, 2300, 5000, [100, 1000, 0, 500], 1)
        self.c.publish(self.link.t_reading, bytes(fr), qos=1).wait_for_publish(5)

    def fwget(self, rel: int, file: int, off: int, n: int, wait: bool = True) -> None:
        w = cbor.Writer(messages.MAX_PAYLOAD)
        messages.encode(w, topics.FWGET, {"boot": self.boot, "seq": self._n(), "t": int(time.time()), "rel": rel,
                                          "file": file, "off": off, "len": n})
        frame = bytes(self.up.seal(w.mv[:w.pos], topics.topic(C, self.device, topics.FWGET).encode()))
        info = self.c.publish(topics.topic(C, self.device, topics.FWGET), frame, qos=0)
        if wait:
            info.wait_for_publish(5)

    def fwget_raw(self, fields: dict[int, Any]) -> None:
        """An fwget payload as given (past the schema's checks on this side)."""
        payload = cbor2.dumps(fields, canonical=True)
        frame = bytes(self.up.seal(payload, topics.topic(C, self.device, topics.FWGET).encode()))
        self.c.publish(topics.topic(C, self.device, topics.FWGET), frame, qos=0).wait_for_publish(5)

    def ack(self, ctr: int, result: int = 0, value: int | None = None) -> None:
        f = {"boot": self.boot, "seq": self._n(), "t": int(time.time()), "ctr": ctr, "result": result}
        if value is not None:
            f["value"] = value
        self.c.publish(self.link.t_ack, bytes(self.link.ack(f)), qos=1).wait_for_publish(5)

    def prove(self, rel: int) -> None:
        """Reset into a trial of `rel`, take a live reading and ack the
        gateway's OP_CONFIRM for it."""
        self.boot, self.rel = self.boot + 1, rel
        self.status(ota=2, ota_rel=rel)
        time.sleep(0.3)
        self.reading()
        c = self.next_cmd()
        assert (c["op"], c["value"]) == (messages.OP_CONFIRM, rel), c
        self.ack(c["ctr"], 0, rel)

    def next_fw(self, timeout: float = 5) -> tuple:
        return self.fw.get(timeout=timeout)

    def next_cmd(self, timeout: float = 5) -> dict[str, Any]:
        return self.cmds.get(timeout=timeout)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class Rig:
    def __init__(self, tmp: Path, devices: list[str], extra: str = "") -> None:
        self.tmp = tmp
        self.port = free_port()
        self.cfg = write_config(tmp, self.port, extra=extra)
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        self.creds = {d: r.add_device(C, d, "sim", CH, r.add_member(C, d)) for d in devices}
        r.db.close()
        assert peergrid_cli(self.cfg, "broker-files")[0] == 0
        self.broker = registry_broker(tmp, self.port)
        self.gw = Gateway(Config.load(self.cfg))
        self.gw.fleet.resend_s = 1.0          # (3 s in service) commands not answered are sent again sooner
        self.gw.start()
        assert self.gw.connected.wait(10)
        time.sleep(0.3)
        self.boards: list[Board] = []

    def board(self, device: str, board: str = "devkit") -> Board:
        b = Board(self, device, board)
        self.boards.append(b)
        return b

    def stop(self) -> None:
        for b in self.boards:
            b.close()
        self.gw.stop()
        stop_process(self.broker)

    def events(self, device: str | None = None) -> list[dict[str, Any]]:
        return peergrid_json(self.cfg, "fleet", "history", *([device] if device else []))

    def rollout(self, rid: int) -> dict[str, Any]:
        return next(r for r in peergrid_json(self.cfg, "fleet", "rollouts") if r["id"] == rid)


@pytest.fixture
def rig_factory(tmp_path):
    rigs = []

    def make(devices: list[str], extra: str = "") -> Rig:
        rigs.append(Rig(tmp_path, devices, extra))
        return rigs[-1]

    yield make
    for r in rigs:
        r.stop()


# -- the release store --------------------------------------------------------------------


def test_release_store_checks_files_manifest_and_signature(tmp_path) -> None:
    cfg = write_config(tmp_path)
    good = build_release(tmp_path / "src", "devkit", 2)
    rc, out, err = peergrid_cli(cfg, "fleet", "add", str(good))
    assert rc == 0 and "added to" in out and "signature verified" in out, err
    stored = tmp_path / "releases" / "devkit" / "2"
    assert (stored / "lib/firmware/main.mpy").read_bytes() == (good / "lib/firmware/main.mpy").read_bytes()
    assert peergrid_cli(cfg, "fleet", "add", str(good))[1].count("already in") == 1        # the same again: nothing to do
    rels = peergrid_json(cfg, "fleet", "releases")
    digest = hashlib.sha256(cbor2.loads((good / "manifest.cose").read_bytes()).value[2]).hexdigest()
    assert [(r["board"], r["seq"], r["digest"]) for r in rels] == [("devkit", 2, digest)]

    # a file changed after signing (same size): refused, nothing stored
    bad = build_release(tmp_path / "tampered", "devkit", 3)
    data = bytearray((bad / "lib/protocol/cbor.mpy").read_bytes())
    data[100] ^= 1
    (bad / "lib/protocol/cbor.mpy").write_bytes(bytes(data))
    rc, _, err = peergrid_cli(cfg, "fleet", "add", str(bad))
    assert rc == 1 and "SHA-256 differs" in err and not (tmp_path / "releases" / "devkit" / "3").exists()
    # a file missing, a file longer than the manifest says
    short = build_release(tmp_path / "short", "devkit", 4)
    (short / "release_keys.json").unlink()
    assert "missing" in peergrid_cli(cfg, "fleet", "add", str(short))[2]
    (short / "release_keys.json").write_text(json.dumps([PUB.hex()]) + " ")
    assert "bytes, the manifest says" in peergrid_cli(cfg, "fleet", "add", str(short))[2]
    # signed by a key the gateway does not trust; a signature that does not verify
    other = Ed25519PrivateKey.from_private_bytes(b"\x07" * 32)
    rc, _, err = peergrid_cli(cfg, "fleet", "add", str(build_release(tmp_path / "other", "devkit", 5, key=other)))
    assert rc == 1 and "none of the 1 configured release key" in err
    forged = build_release(tmp_path / "forged", "devkit", 6)
    env = cbor2.loads((forged / "manifest.cose").read_bytes())
    sig = bytearray(env.value[3])
    sig[0] ^= 1
    (forged / "manifest.cose").write_bytes(cbor2.dumps(cbor2.CBORTag(18, [*env.value[:3], bytes(sig)])))
    rc, _, err = peergrid_cli(cfg, "fleet", "add", str(forged))
    assert rc == 1 and "does not verify" in err
    # another release with a (board, seq) the store has: refused
    again = build_release(tmp_path / "again", "devkit", 2, size=5000)
    rc, _, err = peergrid_cli(cfg, "fleet", "add", str(again))
    assert rc == 1 and "already has another release 2" in err
    assert [r["seq"] for r in peergrid_json(cfg, "fleet", "releases")] == [2]

    # without release keys: added, with a warning that the signature was not checked
    (tmp_path / "nokeys").mkdir()
    cfg2 = write_config(tmp_path / "nokeys", keys=False)
    rc, out, err = peergrid_cli(cfg2, "fleet", "add", str(build_release(tmp_path / "other", "devkit", 7, key=other)))
    assert rc == 0 and "NOT checked" in err


def test_releases_of_tools_release_py_are_accepted_and_the_test_builder_agrees(tmp_path) -> None:
    """The gateway's checks and tools/release.py read the spec alike: a
    release it builds (the real application, compiled) is accepted with its
    digest, and the releases these tests build pass its verify_release."""
    import release as tool                         # tools/release.py (tests/harness.py puts tools/ on the path)

    tool.keygen(tmp_path / "k")
    pub = bytes.fromhex((tmp_path / "k.pub").read_text().strip())
    cfg = tmp_path / "gw.toml"
    cfg.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\n[fleet]\nrelease_keys = ["{pub.hex()}"]\n')
    out, digest = tool.build("sim", seq=4, key=tmp_path / "k", out=tmp_path / "sim-4", heap=50000)
    rc, text, err = peergrid_cli(cfg, "fleet", "add", str(out))
    assert rc == 0 and "signature verified" in text, err
    assert [(r["board"], r["seq"], r["digest"]) for r in peergrid_json(cfg, "fleet", "releases")] == [("sim", 4, digest)]
    tool.verify_release(build_release(tmp_path / "mine", "devkit", 2), [PUB])


# -- serving ---------------------------------------------------------------------------------


def test_fwget_is_served_from_the_store_and_bounded(rig_factory, tmp_path) -> None:
    rig = rig_factory(["ha", "hb"], extra="serve_per_s = 20\n")
    for board, seq in (("devkit", 2), ("other", 2)):
        assert peergrid_cli(rig.cfg, "fleet", "add", str(build_release(tmp_path / "src", board, seq)))[0] == 0
    rel = tmp_path / "src" / "devkit-2"
    a, b = rig.board("ha", "devkit"), rig.board("hb", "other")
    a.status()
    b.status()
    wait_until(lambda: set(rig.gw.fleet.board_of) == {"ha", "hb"}, 5, "boards known")

    # the manifest (file 0), then file 1 piece by piece: the bytes are the file's
    cose_bytes = (rel / "manifest.cose").read_bytes()
    a.fwget(2, 0, 0, 1024)
    r, f, off, size, data, check, err = a.next_fw()
    assert (r, f, off, err, size) == (2, 0, 0, 0, len(cose_bytes)) and data == cose_bytes[:1024]
    assert check == hashlib.sha256(data).digest()[:8]
    paths = sorted(p[0] for p in cbor2.loads(cbor2.loads(cose_bytes).value[2])["files"])
    want = (rel / paths[0]).read_bytes()
    got = b""
    while len(got) < len(want):
        a.fwget(2, 1, len(got), 1000)
        r, f, off, size, data, check, err = a.next_fw()
        assert (f, off, size, err) == (1, len(got), len(want), 0) and hashlib.sha256(data).digest()[:8] == check
        got += data
    assert got == want

    # hostile requests: each answered with an error code, nothing else
    for args, code in (((9, 0, 0, 100), E_TARGET),                 # no such release
                       ((2, len(paths) + 1, 0, 100), E_TARGET),    # no such file
                       ((2, 255, 0, 100), E_TARGET),
                       ((2, 1, len(want) + 1, 100), E_RANGE)):     # past the end
        time.sleep(0.06)
        a.fwget(*args)
        assert a.next_fw()[6] == code, args
    # a board asking for a release of another board type: no such release for it
    a.fwget(2, 0, 0, 100)
    assert a.next_fw()[6] == 0
    b.fwget(2, 1, 0, 100)
    piece = b.next_fw()
    assert piece[6] == 0 and piece[4] == (tmp_path / "src" / "other-2" / paths[0]).read_bytes()[:100]
    # a board type that names a path: no release, nothing read outside the store
    a.status(board="..")
    a.status(board="x/../../etc")
    time.sleep(0.3)
    a.fwget(2, 1, 0, 10)
    assert a.next_fw()[6] == 0                         # still devkit: those names are no board names
    # len 0 and beyond a piece, an offset beyond 2^24: refused by the schema, never served
    rejected_before = sum(rig.gw.metrics.snapshot()["rejected"].values())
    for fields in ({1: 1, 2: a._n(), 3: int(time.time()), 5: 2, 6: 1, 7: 0, 8: 0},
                   {1: 1, 2: a._n(), 3: int(time.time()), 5: 2, 6: 1, 7: 0, 8: 4096},
                   {1: 1, 2: a._n(), 3: int(time.time()), 5: 2, 6: 1, 7: 1 << 30, 8: 10}):
        a.fwget_raw(fields)
    wait_until(lambda: sum(rig.gw.metrics.snapshot()["rejected"].values()) >= rejected_before + 3, 5,
               "three fwget refused by the schema")
    with pytest.raises(queue.Empty):
        a.next_fw(timeout=0.5)
    time.sleep(1.1)                                     # the bucket refills

    # a flood beyond serve_per_s: throttled and counted, the other board still served
    st0 = dict(rig.gw.fleet.stats)
    for i in range(400):
        a.fwget(2, 1, 0, 1024, wait=False)
        if i % 100 == 50:
            b.fwget(2, 1, 0, 64)
    wait_until(lambda: rig.gw.fleet.stats["throttled"] - st0["throttled"] >= 300, 10, "the flood throttled")
    served_b = 0
    while True:
        try:
            x = b.next_fw(timeout=1)
        except queue.Empty:
            break
        served_b += x[6] == 0 and len(x[4]) == 64
    assert served_b == 4
    st = rig.gw.fleet.stats
    assert st["served"] - st0["served"] <= 20 + 4 + 10      # one second of burst (and what refilled meanwhile)
    snap = rig.gw.metrics.snapshot()["counts"]
    assert snap["fw_throttled"] == st["throttled"] and snap["fw_served"] == st["served"]
    assert snap["fw_refused"] >= 4 and snap["fw_bytes"] == st["bytes"]
    # fwget requests are not stored as frames
    with reg.connect(rig.tmp / "gw.db") as db:
        assert db.execute("SELECT COUNT(*) FROM frames WHERE kind='fwget'").fetchone()[0] == 0


# -- records and confirmation --------------------------------------------------------------


def test_statuses_become_events_and_a_proven_trial_is_confirmed(rig_factory, tmp_path) -> None:
    rig = rig_factory(["hx", "hy"])
    assert peergrid_cli(rig.cfg, "fleet", "add", str(build_release(tmp_path / "src", "devkit", 2)))[0] == 0
    digest2 = hashlib.sha256(cbor2.loads((tmp_path / "src/devkit-2/manifest.cose").read_bytes()).value[2]).hexdigest()
    x, y = rig.board("hx"), rig.board("hy")
    x.status(rel_dig=b"\x11" * 8)
    x.status(rel_dig=b"\x11" * 8, ota=1, ota_rel=2, ota_got=0)
    x.status(rel_dig=b"\x11" * 8, ota=1, ota_rel=2, ota_got=5000)      # progress only: no new event
    x.boot, x.rel = 2, 2
    x.status(rel_dig=bytes.fromhex(digest2[:16]), ota=2, ota_rel=2)
    wait_until(lambda: [e["event"] for e in rig.events("hx")] == ["running", "fetching", "running", "installed"], 5,
               "events of hx")
    ev = rig.events("hx")
    assert ev[0]["rel"] == 1 and ev[0]["digest"] == "11" * 8 and ev[0]["boot"] == 1
    assert ev[3]["rel"] == 2 and ev[3]["digest"] == digest2 and ev[3]["boot"] == 2
    # no live reading yet: nothing; a buffered one (replayed from flash) does not count
    x.reading(flags=messages.F_BUFFERED)
    with pytest.raises(queue.Empty):
        x.next_cmd(timeout=1)
    x.reading()
    c = x.next_cmd()
    assert (c["op"], c["target"], c["value"]) == (messages.OP_CONFIRM, 0, 2) and c["lease"] <= 600
    # not acknowledged: sent again with a higher counter; then acked: no more
    c2 = x.next_cmd(timeout=3)
    assert c2["op"] == messages.OP_CONFIRM and c2["ctr"] > c["ctr"]
    x.ack(c2["ctr"], 0, 2)
    x.reading()
    with pytest.raises(queue.Empty):
        x.next_cmd(timeout=2)
    x.status(rel_dig=bytes.fromhex(digest2[:16]), ota=3, ota_rel=2)
    wait_until(lambda: rig.events("hx")[-1]["event"] == "confirmed", 5, "confirmed")
    assert [e["event"] for e in rig.events("hx")].count("confirm_sent") == 2

    # refused and rolled back, each with the board's reason
    y.status()
    y.status(ota=4, ota_rel=2, ota_why="bad signature")
    y.boot = 2
    y.status(ota=5, ota_rel=2, ota_why="resets")
    wait_until(lambda: [e["event"] for e in rig.events("hy")] == ["running", "refused", "rolled_back"], 5, "hy")
    ev = rig.events("hy")
    assert ev[1]["detail"] == "bad signature" and "resets" in ev[2]["detail"] and ev[2]["rel"] == 2
    fl = {d["device"]: d for d in peergrid_json(rig.cfg, "fleet")}
    assert fl["hx"]["rel"] == 2 and fl["hx"]["digest"] == digest2 and fl["hx"]["ota_state"] == "confirmed"
    assert fl["hy"]["rel"] == 1 and fl["hy"]["ota_state"] == "rolled_back" and fl["hy"]["ota_why"] == "resets"
    rc, out, _ = peergrid_cli(rig.cfg, "fleet")
    assert rc == 0 and "hx" in out and digest2[:16] in out


# -- rollouts ----------------------------------------------------------------------------------


def _fleet_of_four(rig_factory, tmp_path) -> tuple[Rig, list[Board]]:
    rig = rig_factory(["b0", "b1", "b2", "b3", "z9"])
    assert peergrid_cli(rig.cfg, "fleet", "add", str(build_release(tmp_path / "src", "devkit", 2)))[0] == 0
    boards = [rig.board(f"b{i}") for i in range(4)]
    other = rig.board("z9", "other")              # another type: never part of the rollout
    for b in boards + [other]:
        b.status()
    wait_until(lambda: len(rig.gw.fleet.views) == 5, 5, "five boards known")
    return rig, boards + [other]


def test_a_rollout_halts_when_a_first_board_rolls_back(rig_factory, tmp_path) -> None:
    rig, (b0, b1, b2, b3, z9) = _fleet_of_four(rig_factory, tmp_path)
    rc, out, err = peergrid_cli(rig.cfg, "fleet", "rollout", "2", "--board", "devkit", "--first", "2", "--max-fail", "1")
    assert rc == 0, err
    rid = int(out.split()[1].rstrip(":"))
    c0, c1 = b0.next_cmd(), b1.next_cmd()
    for c in (c0, c1):
        assert (c["op"], c["target"], c["value"], c["lease"]) == (messages.OP_UPDATE, 0, 2, 3600)
    b0.ack(c0["ctr"])
    b0.status(ota=1, ota_rel=2, ota_got=100)
    b1.ack(c1["ctr"])
    b1.boot = 2
    b1.status(ota=5, ota_rel=2, ota_why="no reading")
    wait_until(lambda: rig.rollout(rid)["state"] == "halted", 5, "halted")
    ro = rig.rollout(rid)
    assert "b1 rolled back: no reading" in ro["reason"]
    states = {b["device"]: b["state"] for b in ro["boards"]}
    assert states == {"b0": "started", "b1": "failed", "b2": "skipped", "b3": "skipped"}
    time.sleep(2)
    for b in (b2, b3, z9):
        assert b.cmds.empty(), b.device
    # nothing more for the first two either (no resend after the halt)
    assert b1.cmds.empty()
    ev = rig.events()
    assert sorted(e["device"] for e in ev if e["event"] == "update_sent") == ["b0", "b1"]
    # a halted rollout can be followed by another one; one at a time per board type
    rc, out, _ = peergrid_cli(rig.cfg, "fleet", "rollout", "2", "--board", "devkit")
    assert rc == 0
    rc, _, err = peergrid_cli(rig.cfg, "fleet", "rollout", "2", "--board", "devkit")
    assert rc == 1 and "still under way" in err
    assert peergrid_cli(rig.cfg, "fleet", "halt")[0] == 0


def test_a_rollout_goes_on_to_the_rest_once_the_first_boards_confirm(rig_factory, tmp_path) -> None:
    rig, (b0, b1, b2, b3, z9) = _fleet_of_four(rig_factory, tmp_path)
    rc, out, err = peergrid_cli(rig.cfg, "fleet", "rollout", "2", "--board", "devkit", "--first", "2")
    assert rc == 0, err
    rid = int(out.split()[1].rstrip(":"))
    for b in (b0, b1):
        c = b.next_cmd()
        assert (c["op"], c["value"]) == (messages.OP_UPDATE, 2)
        b.ack(c["ctr"])
    time.sleep(1)
    assert b2.cmds.empty() and b3.cmds.empty()            # not before the first wave is through
    for b in (b0, b1):
        b.boot, b.rel = 2, 2
        b.status(ota=2, ota_rel=2)                         # on trial: not an outcome yet
    time.sleep(1)
    assert b2.cmds.empty() and rig.rollout(rid)["state"] == "wave1"
    for b in (b0, b1):
        b.reading()
        c = b.next_cmd()
        assert c["op"] == messages.OP_CONFIRM
        b.ack(c["ctr"])
        b.status(ota=3, ota_rel=2)
    for b in (b2, b3):
        c = b.next_cmd()
        assert (c["op"], c["value"]) == (messages.OP_UPDATE, 2)
        b.ack(c["ctr"])
    # a board's word is not enough: b2 claims release 2 confirmed without a
    # trial the gateway saw, and is not counted as updated
    b2.boot, b2.rel = 2, 2
    b2.status(ota=3, ota_rel=2)
    time.sleep(1.5)
    states = {b["device"]: b["state"] for b in rig.rollout(rid)["boards"]}
    assert states["b2"] != "ok" and rig.rollout(rid)["state"] == "wave2", states
    b2.boot = 3
    for b in (b2, b3):
        b.boot, b.rel = b.boot + 1, 2
        b.status(ota=2, ota_rel=2)
        time.sleep(0.3)
        b.reading()
        c = b.next_cmd()
        assert (c["op"], c["value"]) == (messages.OP_CONFIRM, 2)
        b.ack(c["ctr"])
        b.status(ota=3, ota_rel=2)
    wait_until(lambda: rig.rollout(rid)["state"] == "done", 5, "done")
    assert {b["device"]: b["state"] for b in rig.rollout(rid)["boards"]} == {f"b{i}": "ok" for i in range(4)}
    assert z9.cmds.empty()


def test_the_second_wave_updates_a_few_boards_at_a_time_and_its_first_failure_halts_the_rest(
        rig_factory, tmp_path) -> None:
    rig = rig_factory([f"b{i}" for i in range(5)], extra="updates_at_once = 2\n")
    assert peergrid_cli(rig.cfg, "fleet", "add", str(build_release(tmp_path / "src", "devkit", 2)))[0] == 0
    boards = [rig.board(f"b{i}") for i in range(5)]
    for b in boards:
        b.status()
    wait_until(lambda: len(rig.gw.fleet.views) == 5, 5, "five boards known")
    rc, out, err = peergrid_cli(rig.cfg, "fleet", "rollout", "2", "--board", "devkit", "--first", "1",
                                "--max-fail", "1")
    assert rc == 0, err
    rid = int(out.split()[1].rstrip(":"))
    b0 = boards[0]
    c = b0.next_cmd()
    b0.ack(c["ctr"])
    b0.prove(2)
    b0.status(ota=3, ota_rel=2)
    # wave 2: two of the four at once, by id; the other two wait their turn
    got = {}
    for b in boards[1:3]:
        got[b.device] = b.next_cmd()
        assert (got[b.device]["op"], got[b.device]["value"]) == (messages.OP_UPDATE, 2)
        b.ack(got[b.device]["ctr"])
    boards[2].status(ota=1, ota_rel=2, ota_got=100)
    time.sleep(2)
    assert boards[3].cmds.empty() and boards[4].cmds.empty()
    assert rig.rollout(rid)["state"] == "wave2"
    # the first of them rolls back: the two still waiting are never sent the release
    boards[1].boot = 2
    boards[1].status(ota=5, ota_rel=2, ota_why="no confirm")
    wait_until(lambda: rig.rollout(rid)["state"] == "halted", 5, "halted")
    states = {b["device"]: b["state"] for b in rig.rollout(rid)["boards"]}
    assert states == {"b0": "ok", "b1": "failed", "b2": "started", "b3": "skipped", "b4": "skipped"}, states
    time.sleep(1.5)
    assert boards[3].cmds.empty() and boards[4].cmds.empty()
    assert sorted(e["device"] for e in rig.events() if e["event"] == "update_sent") == ["b0", "b1", "b2"]
    (tmp_path / "bad").mkdir()
    with pytest.raises(SystemExit, match="updates_at_once"):          # none at a time would never end
        Config.load(write_config(tmp_path / "bad", extra="updates_at_once = 0\n"))


def test_runs_it_already_counts_only_where_the_gateway_confirmed_it(rig_factory, tmp_path) -> None:
    rig, (b0, b1, b2, b3, z9) = _fleet_of_four(rig_factory, tmp_path)
    # b0 really ran release 2: its trial was confirmed here (then a stale status says 1)
    b0.prove(2)
    wait_until(lambda: any(e["event"] == "confirm_acked" for e in rig.events("b0")), 5, "confirm_acked")
    b0.rel = 1
    b0.status()
    wait_until(lambda: rig.gw.fleet.views["b0"].rel == 1, 5, "b0 seen on release 1")
    rc, out, err = peergrid_cli(rig.cfg, "fleet", "rollout", "2", "--board", "devkit", "--first", "3",
                                "--max-fail", "1")
    assert rc == 0, err
    rid = int(out.split()[1].rstrip(":"))
    c0, c1, c2 = b0.next_cmd(), b1.next_cmd(), b2.next_cmd()
    b0.ack(c0["ctr"], E_RANGE, 2)
    wait_until(lambda: {b["device"]: b["state"] for b in rig.rollout(rid)["boards"]}["b0"] == "ok", 5, "b0 ok")
    # b2 is on trial of another release: refused for now, sent again
    b2.ack(c2["ctr"], E_RANGE, 7)
    again = b2.next_cmd(timeout=5)
    assert again["op"] == messages.OP_UPDATE and again["ctr"] > c2["ctr"]
    assert rig.rollout(rid)["state"] == "wave1"
    # b1 claims release 2 without ever having proved it: a failure, not an update
    b1.ack(c1["ctr"], E_RANGE, 2)
    wait_until(lambda: rig.rollout(rid)["state"] == "halted", 5, "halted")
    boards = {b["device"]: b for b in rig.rollout(rid)["boards"]}
    assert boards["b1"]["state"] == "failed" and "never confirmed here" in boards["b1"]["detail"]
    assert "runs 7" in boards["b2"]["detail"] and boards["b3"]["state"] == "skipped"
    assert any(e["event"] == "claim_unproven" and e["rel"] == 2 for e in rig.events("b1"))


def test_one_board_update_is_resent_until_answered_and_halts_by_hand(rig_factory, tmp_path) -> None:
    rig, (b0, b1, *_rest) = _fleet_of_four(rig_factory, tmp_path)
    rc, out, err = peergrid_cli(rig.cfg, "fleet", "update", "b1", "2")
    assert rc == 0, err
    c1 = b1.next_cmd()
    c2 = b1.next_cmd(timeout=3)                       # no ack, no fetching: sent again
    assert c1["op"] == c2["op"] == messages.OP_UPDATE and c2["ctr"] > c1["ctr"]
    assert b0.cmds.empty()
    assert "b1" in peergrid_cli(rig.cfg, "fleet")[1]
    rc, out, _ = peergrid_cli(rig.cfg, "fleet", "halt")
    assert rc == 0 and "halted" in out
    time.sleep(0.6)
    while not b1.cmds.empty():
        b1.cmds.get()
    with pytest.raises(queue.Empty):
        b1.next_cmd(timeout=3)                        # the next one was due 2 s after the second
    assert peergrid_cli(rig.cfg, "fleet", "update", "b1", "9")[0] == 1          # no such release
    assert peergrid_cli(rig.cfg, "fleet", "update", "nobody", "2")[0] == 1
