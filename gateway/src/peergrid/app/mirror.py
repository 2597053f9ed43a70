"""`peergrid mirror`: a member's own verified copy of the community ledger
(issue 22), run on any computer of the member's.

    peergrid mirror --url https://gateway:8443 --ca ca.pem --member 4 --key-file member.key \\
        --dir ~/peergrid-mirror [--broker gateway:8883 --user elm.member_4 --password-file pw] [--once]

Each round it signs in to the gateway's member API with the member's key,
asks for the head, fetches the entries it does not hold
(/app/api/ledger/since, from its own last entry, so that entry is compared
too), checks them as `ledger verify` would (peergrid.market.follow), adds
them to its copy (<dir>/ledger.cbor, written whole or not at all) and signs
a witness of the new head with the member's key: sent to the gateway, which
puts it into the ledger, and, with --broker, published retained on
pgl/<community>/witness/<member>, where every other mirror compares it
with its own copy.

It raises the alarm (exit code 3, a line on stderr, <dir>/alarm.json, and
retained on pgl/<community>/alarm/<member> with --broker) when the gateway:
  truncated   shows fewer entries than this copy holds;
  rewritten   shows a different entry at a height this copy holds;
  key         signs with another key than the ledger's, with no entry that rotates it;
  fork        showed another member a different entry at a height this copy holds
              (their mirror's signed witness disagrees with this copy);
  invalid     sends an entry that does not verify.
An alarm stays (alarm.json) until the member removes it; the copy is never
changed by what caused it.
"""
from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from peergrid.market import governance as gv
from peergrid.market.follow import Divergence, Follower, check_head, witness_conflict
from peergrid.market.ledger import LedgerError, iter_export

EXIT_ALARM = 3


class Alarm(Exception):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(msg)
        self.kind = kind
        self.msg = msg


class Mirror:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.dir = Path(a.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = gv.load_member_key(Path(a.key_file).read_text())
        self.member = a.member
        self.ctx = ssl.create_default_context(cafile=a.ca) if a.ca else None
        self.url = a.url.rstrip("/")
        self.token: str | None = None
        self.community = ""
        self.f = Follower()
        data = (self.dir / "ledger.cbor").read_bytes() if (self.dir / "ledger.cbor").exists() else b""
        if data:
            self.f.load(data)          # its own copy is checked too
            self.community = self.f.state.community
        self.mqtt: Any = None
        self.others: dict[int, tuple[int, bytes, bytes]] = {}
        self.lock = threading.Lock()

    # -- the gateway -----------------------------------------------------------------

    def _req(self, method: str, path: str, body: Any = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", "Bearer " + self.token)
        with urllib.request.urlopen(req, timeout=self.a.timeout, context=self.ctx) as r:
            return r.read()

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._req(method, path, body))

    def signin(self) -> None:
        from peergrid.app.signin import signin_msg

        self.token = None
        ch = self._json("POST", "/app/api/challenge", {"member": self.member})
        self.community = ch["community"]
        sig = self.key.sign(signin_msg(ch["community"], self.member, bytes.fromhex(ch["nonce"])))
        self.token = self._json("POST", "/app/api/signin", {"member": self.member, "nonce": ch["nonce"],
                                                            "sig": sig.hex()})["token"]

    # -- one round ---------------------------------------------------------------------

    def sync(self) -> int:
        """Catch up and witness; returns entries added. Raises Alarm."""
        if self.token is None:
            self.signin()
        head = self._json("GET", "/app/api/ledger/head")
        if not head.get("height"):
            return 0
        try:
            check_head(self.f, head["height"], bytes.fromhex(head["hash"]), bytes.fromhex(head["key"]))
        except Divergence as e:
            raise Alarm(e.kind, str(e)) from None
        added = 0
        while self.f.height < head["height"]:
            start = max(0, self.f.height - 1)
            raws = list(iter_export(self._req("GET", f"/app/api/ledger/since?n={start}&max=2000")))
            if not raws:
                break
            if self.f.height:
                if raws[0] != self.f.raws[start]:
                    raise Alarm("rewritten", f"the gateway's entry {start} differs from the one this mirror holds "
                                             f"(first differing entry: {self._first_difference()})")
                raws = raws[1:]
            try:
                added += self.f.extend(raws)
            except Divergence as e:
                raise Alarm(e.kind, str(e)) from None
            except LedgerError as e:
                raise Alarm("invalid", f"the gateway sent an entry that does not verify: {e}") from None
            self._save()
        if added:
            self.witness()
        self.compare()
        return added

    def _first_difference(self) -> int | None:
        try:
            theirs = list(iter_export(self._req("GET", f"/app/api/ledger/since?n=0&max={self.f.height}")))
        except (OSError, LedgerError):
            return None
        for i, (a, b) in enumerate(zip(self.f.raws, theirs)):
            if a != b:
                return i
        return None

    def _save(self) -> None:
        tmp = self.dir / "ledger.cbor.new"
        with open(tmp, "wb") as fh:
            fh.write(self.f.export())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.dir / "ledger.cbor")
        (self.dir / "head.json").write_text(json.dumps({"height": self.f.height, "hash": self.f.head.hex(),
                                                        "key": (self.f.key or b"").hex()}) + "\n")

    def witness(self) -> None:
        h, d = self.f.height, self.f.head
        sig = self.key.sign(gv.witness_msg(self.community, self.member, h, d))
        body = {"height": h, "hash": d.hex(), "sig": sig.hex()}
        try:
            self._json("POST", "/app/api/witness", body)
        except urllib.error.HTTPError as e:
            if e.code == 409:
                raise Alarm("fork", f"the gateway says it has no entry {h - 1} with the hash this mirror verified: "
                                    "it no longer shows this member's ledger") from None
            raise
        if self.mqtt is not None:
            from peergrid.app.ledgerfeed import witness_topic

            self.mqtt.publish(witness_topic(self.community, self.member), json.dumps(body), qos=1,
                              retain=True).wait_for_publish(5)

    # -- the other mirrors ---------------------------------------------------------------

    def connect_broker(self) -> None:
        import paho.mqtt.client as mqtt

        from peergrid.app.ledgerfeed import witness_topic

        host, _, port = self.a.broker.rpartition(":")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.a.user, protocol=mqtt.MQTTv311)
        c.username_pw_set(self.a.user, Path(self.a.password_file).read_text().strip())
        if self.ctx is not None:
            c.tls_set_context(self.ctx)
        up = threading.Event()

        def on_connect(cl: Any, ud: Any, flags: Any, rc: Any, props: Any = None) -> None:
            if not rc.is_failure:
                cl.subscribe(witness_topic(self.community or "+", "+"), 1)
                up.set()

        def on_message(cl: Any, ud: Any, msg: Any) -> None:
            try:
                m = int(msg.topic.rsplit("/", 1)[1])
                w = json.loads(msg.payload)
                item = (int(w["height"]), bytes.fromhex(w["hash"]), bytes.fromhex(w["sig"]))
            except (ValueError, KeyError, TypeError):
                return                          # not a witness: ignored
            with self.lock:
                self.others[m] = item

        c.on_connect, c.on_message = on_connect, on_message
        c.connect(host, int(port), keepalive=30)
        c.loop_start()
        if not up.wait(self.a.timeout):
            raise OSError(f"the broker at {self.a.broker} did not accept {self.a.user}")
        self.mqtt = c
        time.sleep(0.5)                         # the retained witnesses arrive

    def compare(self) -> None:
        with self.lock:
            others = dict(self.others)
        for m, (h, d, sig) in sorted(others.items()):
            if m == self.member:
                continue
            key = self.f.state.keys.get(m)
            if key is None or not gv._verify(key, sig, gv.witness_msg(self.community, m, h, d)):
                continue                        # not that member's signature: proves nothing
            msg = witness_conflict(self.f, m, h, d)
            if msg:
                raise Alarm("fork", msg)

    def alarm(self, a: Alarm) -> None:
        rec = {"kind": a.kind, "msg": a.msg, "member": self.member, "height": self.f.height,
               "hash": self.f.head.hex(), "t": int(time.time())}
        (self.dir / "alarm.json").write_text(json.dumps(rec) + "\n")
        print(f"ALARM ({a.kind}): {a.msg}", file=sys.stderr, flush=True)
        if self.mqtt is not None:
            from peergrid.app.ledgerfeed import alarm_topic

            self.mqtt.publish(alarm_topic(self.community, self.member), json.dumps(rec), qos=1,
                              retain=True).wait_for_publish(5)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peergrid mirror", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="the gateway's address, e.g. https://gateway:8443")
    ap.add_argument("--ca", help="the community CA (ca.pem) to check the gateway's certificate")
    ap.add_argument("--member", type=int, required=True)
    ap.add_argument("--key-file", required=True, help="the member's key (pgmk1:...)")
    ap.add_argument("--dir", required=True, help="where the copy is kept")
    ap.add_argument("--broker", help="host:port of the community broker, to compare witnesses with other mirrors")
    ap.add_argument("--user", help="the member's broker account (peergrid member account N)")
    ap.add_argument("--password-file")
    ap.add_argument("--once", action="store_true", help="one round, then exit (0: in step, 3: alarm)")
    ap.add_argument("--every", type=float, default=30, help="seconds between rounds")
    ap.add_argument("--timeout", type=float, default=20)
    a = ap.parse_args(argv)
    if (a.dir and (Path(a.dir) / "alarm.json").exists()):
        print(f"ALARM raised before: {(Path(a.dir) / 'alarm.json').read_text().strip()} "
              "(remove alarm.json once it is resolved)", file=sys.stderr)
        return EXIT_ALARM
    try:
        m = Mirror(a)
    except (LedgerError, gv.GovernanceError, OSError) as e:
        print(f"mirror: cannot start: {e}", file=sys.stderr)
        return 1
    try:
        if a.broker:
            if m.community == "":
                m.signin()
            m.connect_broker()
        while True:
            try:
                n = m.sync()
                print(f"mirror: {m.f.height} entries verified (+{n}), head {m.f.head.hex()}, "
                      f"witnessed as member {m.member}", flush=True)
            except Alarm as e:
                m.alarm(e)
                return EXIT_ALARM
            except (OSError, urllib.error.URLError, ValueError) as e:
                # the gateway unreachable or answering nonsense: no alarm, try again
                print(f"mirror: round failed ({e}); trying again", file=sys.stderr, flush=True)
                m.token = None
                if a.once:
                    return 1
            if a.once:
                return 0
            time.sleep(a.every)
    finally:
        if m.mqtt is not None:
            m.mqtt.loop_stop()
            m.mqtt.disconnect()
