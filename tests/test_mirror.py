"""The ledger held by every house (issue 22): members' mirrors (`peergrid
mirror`, run as its own process) follow the real gateway over its member
API and the real broker, verify every entry, witness the head, and raise
the alarm when the gateway drops its last entries, rewrites one, re-signs
the chain with another key, or shows two members different entries at the
same height. A dishonest gateway here is the real one, stopped, its
database changed with its own ledger key (what its operator could do), and
started again."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import cbor2
import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from harness import free_port, gateway_toml, registry_broker, stop_process, wait_until
from peergrid.community import registry as reg
from peergrid.market import governance as gv
from peergrid.market import ledger

pytestmark = pytest.mark.broker

C = "oak"


class Site:
    def __init__(self, tmp: Path, members: int = 3) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.http = free_port()
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(gateway_toml(C, self.port, self.http,
                                         "[settlement]\nretail = 30\nfeed_in = 8\ninterval_min = 1\ngrace_s = 5\n",
                                         "[app]\nwitness_every_s = 1\n"))
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        r.db.close()
        self.accounts: dict[int, tuple[str, str]] = {}
        for i in range(members):
            k, pub = gv.new_key()
            mid = int(self.cli("member", "add", f"house-{i + 1}", "--key", pub.hex()).split()[1])
            (tmp / f"m{mid}.key").write_text(gv.key_string(k) + "\n")
        for mid in range(1, members + 1):
            out = self.cli("member", "account", str(mid))
            user, pw = out.split("user ")[1].split()[0], out.split("password ")[1].split()[0]
            (tmp / f"m{mid}.pw").write_text(pw + "\n")
            self.accounts[mid] = (user, pw)
        self.broker = registry_broker(tmp, self.port)
        self.gw: subprocess.Popen | None = None
        self.start()

    def cli(self, *args: str) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=60, cwd=self.tmp)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def start(self) -> None:
        log = self.tmp / "gw.log"
        mark = log.read_text().count("connected to") if log.exists() else 0
        self.gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                   stdout=subprocess.DEVNULL, stderr=open(log, "a"), text=True)
        wait_until(lambda: log.read_text().count("connected to") > mark, 20, "gateway connected", log)
        wait_until(lambda: _port_open(self.http), 10, "gateway HTTP")

    def stop(self) -> None:
        stop_process(self.gw)

    def mirror(self, member: int, broker: bool = True) -> subprocess.CompletedProcess:
        args = [sys.executable, "-m", "peergrid.cli", "mirror", "--url", f"http://127.0.0.1:{self.http}",
                "--member", str(member), "--key-file", str(self.tmp / f"m{member}.key"),
                "--dir", str(self.tmp / f"mirror-{member}"), "--once", "--timeout", "10"]
        if broker:
            args += ["--broker", f"127.0.0.1:{self.port}", "--user", self.accounts[member][0],
                     "--password-file", str(self.tmp / f"m{member}.pw")]
        return subprocess.run(args, capture_output=True, text=True, timeout=90)

    def raws(self) -> list[bytes]:
        with sqlite3.connect(str(self.tmp / "gw.db"), timeout=30) as db:
            return [bytes(r[0]) for r in db.execute("SELECT raw FROM ledger ORDER BY n")]

    def put_raws(self, raws: list[bytes]) -> None:
        """The operator's hand on the stopped gateway's database."""
        with sqlite3.connect(str(self.tmp / "gw.db"), timeout=30) as db:
            db.execute("DELETE FROM ledger")
            db.executemany("INSERT INTO ledger VALUES (?, ?)", list(enumerate(raws)))

    def close(self) -> None:
        stop_process(self.gw)
        stop_process(self.broker, 5)


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def resign(raws: list[bytes], key: Ed25519PrivateKey, start: int = 0, change=None) -> list[bytes]:
    """The chain from `start` on, signed again with `key` (after `change`
    edits a payload): what a gateway's operator holding a key can make."""
    out = list(raws[:start])
    prev = ledger.ZERO if start == 0 else ledger.hashlib.sha256(out[-1]).digest()
    for n in range(start, len(raws)):
        m = ledger.decode_entry(raws[n])
        m["prev"] = prev
        if n == 0:
            m["body"]["key"] = ledger.public_bytes(key)
        if change is not None:
            change(n, m)
        raw = ledger.sign1(key, b"gateway", cbor2.dumps(m, canonical=True))
        out.append(raw)
        prev = ledger.hashlib.sha256(raw).digest()
    return out


@pytest.fixture
def site(tmp_path):
    s = Site(tmp_path)
    try:
        yield s
    finally:
        s.close()


def _alarm(site: Site, member: int) -> dict:
    return json.loads((site.tmp / f"mirror-{member}" / "alarm.json").read_text())


def _ledger_key(site: Site) -> Ed25519PrivateKey:
    return ledger.Ed25519PrivateKey.from_private_bytes((site.tmp / "ledger.key").read_bytes())


def _retained(site: Site, member: int, topic: str, wait: float = 3) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    up = threading.Event()
    user, pw = site.accounts[member]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, pw)
    c.on_connect = lambda cl, ud, fl, rc, pr=None: (cl.subscribe(topic, 1), up.set())
    c.on_message = lambda cl, ud, msg: got.__setitem__(msg.topic, bytes(msg.payload))
    c.connect("127.0.0.1", site.port)
    c.loop_start()
    try:
        assert up.wait(10)
        time.sleep(wait)
    finally:
        c.loop_stop()
        c.disconnect()
    return got


def _witnessed(out: str) -> set[int]:
    return {int(m) for line in out.splitlines() if line.startswith("witnessed: height")
            for m in line.split(": ")[-1].split(",")}


def test_every_mirror_verifies_and_witnesses_and_the_ledger_records_it(site) -> None:
    for m in (1, 2, 3):
        r = site.mirror(m)
        assert r.returncode == 0, r.stderr
        copy = (site.tmp / f"mirror-{m}" / "ledger.cbor").read_bytes()
        assert copy and b"".join(site.raws()).startswith(copy)
    # the gateway puts the witnesses into its next entries (witness_every_s = 1; its loop runs every 5 s)
    export = site.tmp / "export.cbor"

    def verified() -> str:
        export.write_bytes(b"".join(site.raws()))
        return site.cli("ledger", "verify", str(export))
    wait_until(lambda: _witnessed(verified()) == {1, 2, 3}, 30, "all three witnesses in the ledger",
               site.tmp / "gw.log")
    out = verified()
    assert f"head: height {len(site.raws())}, entry {len(site.raws()) - 1}" in out, out
    # the mirrors follow the witness entries too, and witness the new head
    for m in (1, 2, 3):
        assert site.mirror(m).returncode == 0
        assert b"".join(site.raws()).startswith((site.tmp / f"mirror-{m}" / "ledger.cbor").read_bytes())
        assert len((site.tmp / f"mirror-{m}" / "ledger.cbor").read_bytes()) >= len(export.read_bytes())
    # each mirror's signed witness is on the broker for the others
    ws = _retained(site, 1, f"pgl/{C}/witness/+", 1)
    assert sorted(ws) == [f"pgl/{C}/witness/{m}" for m in (1, 2, 3)]
    # a member's account cannot publish another member's witness
    user, pw = site.accounts[1]
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, pw)
    c.connect("127.0.0.1", site.port)
    c.loop_start()
    c.publish(f"pgl/{C}/witness/2", b'{"height": 1}', qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    assert json.loads(_retained(site, 3, f"pgl/{C}/witness/2", 1)[f"pgl/{C}/witness/2"])["height"] > 1


def test_a_gateway_that_drops_its_last_entries_is_caught(site) -> None:
    assert site.mirror(1).returncode == 0
    site.stop()
    site.put_raws(site.raws()[:-2])                      # at an entry boundary: still a valid chain
    site.start()
    r = site.mirror(1)
    assert r.returncode == 3 and "ALARM (truncated)" in r.stderr, r.stderr
    assert _alarm(site, 1)["kind"] == "truncated"
    alarm = _retained(site, 2, f"pgl/{C}/alarm/+", 1)
    assert json.loads(alarm[f"pgl/{C}/alarm/1"])["kind"] == "truncated"
    # the copy is not touched, and the mirror keeps alarming until the member clears it
    assert len(list(ledger.iter_export((site.tmp / "mirror-1" / "ledger.cbor").read_bytes()))) == 4
    assert site.mirror(1).returncode == 3


def test_a_gateway_that_rewrites_an_entry_is_caught(site) -> None:
    assert site.mirror(2).returncode == 0
    site.stop()

    def rename(n, m):
        if n == 2:
            m["body"]["name"] = "someone else"
    site.put_raws(resign(site.raws(), _ledger_key(site), start=2, change=rename))
    site.start()
    r = site.mirror(2)
    assert r.returncode == 3 and "ALARM (rewritten)" in r.stderr, r.stderr
    assert "first differing entry: 2" in _alarm(site, 2)["msg"] or _alarm(site, 2)["kind"] == "rewritten"


def test_a_chain_resigned_with_another_key_is_caught(site) -> None:
    assert site.mirror(3).returncode == 0
    site.stop()
    new = Ed25519PrivateKey.generate()
    site.put_raws(resign(site.raws(), new))
    (site.tmp / "ledger.key").write_bytes(new.private_bytes_raw())
    site.start()
    # the re-signed chain verifies on its own: only a member who kept the head can tell
    assert ledger.verify(b"".join(site.raws()))
    r = site.mirror(3)
    assert r.returncode == 3 and "ALARM (key)" in r.stderr, r.stderr


def test_two_members_shown_different_entries_at_the_same_height_is_caught(site) -> None:
    assert site.mirror(1).returncode == 0                 # member 1 holds the honest ledger
    h1 = json.loads((site.tmp / "mirror-1" / "head.json").read_text())["height"]
    honest = site.raws()
    site.stop()

    def other(n, m):
        if n == h1 - 1:
            m["body"]["name"] = "forked"
    # the branch shown to member 2 from then on: entry h1 - 1 another one (and nothing after it
    # that would give the fork away, such as member 1's witness)
    site.put_raws(resign(honest[:h1], _ledger_key(site), start=h1 - 1, change=other))
    site.start()
    # member 2's mirror, new, sees the other branch, which verifies on its own; member 1's
    # witness on the broker (signed by member 1) tells it that it is a fork
    r = site.mirror(2)
    assert r.returncode == 3 and "ALARM (fork)" in r.stderr, r.stdout + r.stderr
    a = _alarm(site, 2)
    assert a["kind"] == "fork" and "member 1" in a["msg"] and a["height"] == h1
    mine = list(ledger.iter_export((site.tmp / "mirror-2" / "ledger.cbor").read_bytes()))
    assert mine[:h1 - 1] == honest[:h1 - 1] and mine[h1 - 1] != honest[h1 - 1]
    # and member 1's mirror, shown this branch now, sees its own entry changed
    r = site.mirror(1)
    assert r.returncode == 3 and ("ALARM (rewritten)" in r.stderr or "ALARM (fork)" in r.stderr), r.stderr


def test_a_forged_witness_is_not_evidence(site) -> None:
    """A member's account publishing a witness signed by someone else's key
    (or nonsense) makes no mirror alarm, and the gateway refuses it."""
    assert site.mirror(1).returncode == 0
    user, pw = site.accounts[3]
    wrong, _ = gv.new_key()
    fake = {"height": 2, "hash": "ab" * 32, "sig": wrong.sign(gv.witness_msg(C, 3, 2, bytes.fromhex("ab" * 32))).hex()}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, pw)
    c.connect("127.0.0.1", site.port)
    c.loop_start()
    c.publish(f"pgl/{C}/witness/3", json.dumps(fake), qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    c.disconnect()
    r = site.mirror(1)
    assert r.returncode == 0, r.stderr
    # sent to the gateway as member 1 (signed by another key): refused
    import urllib.request

    from peergrid.app.signin import signin_msg

    def post(path, body, token=None):
        req = urllib.request.Request(f"http://127.0.0.1:{site.http}{path}", json.dumps(body).encode(), method="POST")
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    k1 = gv.load_member_key((site.tmp / "m1.key").read_text())
    ch = post("/app/api/challenge", {"member": 1})[1]
    tok = post("/app/api/signin", {"member": 1, "nonce": ch["nonce"],
                                   "sig": k1.sign(signin_msg(C, 1, bytes.fromhex(ch["nonce"]))).hex()})[1]["token"]
    assert post("/app/api/witness", fake, tok)[0] == 422
    # a true signature over a hash the gateway does not have: 409, counted
    bad = {"height": 2, "hash": "ab" * 32, "sig": k1.sign(gv.witness_msg(C, 1, 2, bytes.fromhex("ab" * 32))).hex()}
    assert post("/app/api/witness", bad, tok)[0] == 409
