"""A dishonest member (issue 17, part 8), all at once: one running gateway,
a real mosquitto started from the configuration `peergrid broker-files`
writes, two honest boards publishing all the while, and one member who owns
a valid board (its key and its broker password) and uses them against the
community: readings that mint energy or run registers backwards out of
order, the gateway's and the neighbours' client ids, a neighbour's topic, a
message far beyond the protocol, a flood of forged tags, and the HTTP side
(huge and lying lengths, half-sent requests, junk). Then the operator
rotates the member's key. Every outcome is counted and printed.

The rest of the hostile-member suite, each with the real gateway:
test_energy_gateway.py (settlement on time and 0 minted Wh paid while a
board lies, across a gateway SIGKILL), test_broker_identity.py (no reading
the broker acknowledged is lost to a client-id takeover), the HTTP attacks
with memory and threads measured (test_gateway_http_hostile.py) and a disk
that fills up while settling (test_gateway_bounds.py).
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import pytest

from peergrid.community import registry as reg
from protocol import messages
from protocol.link import DeviceLink
from test_broker_identity import C, GW_ID, Board, Client, Site

pytestmark = pytest.mark.broker


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _http(port: int, raw: bytes, send_all: bool = True, timeout: float = 15) -> int | None:
    """Status code the gateway answers to raw request bytes (None: no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw if send_all else raw[:len(raw) // 2])
            data = s.recv(64)
        except OSError:
            return None
    if not data.startswith(b"HTTP/1."):
        return None
    return int(data.split()[1])


def test_a_dishonest_member_gains_nothing_and_stops_nobody(tmp_path) -> None:
    # reload=False: the broker keeps the member's connection through the
    # rotation, so what the gateway itself refuses shows (with a pid file the
    # broker would close it too: test_broker_identity.py)
    site = Site(tmp_path, reload=False)
    out: dict[str, object] = {}
    try:
        site.start_gateway()
        gw_pid = site.gw.pid
        honest = [Board(site, "house-a"), Board(site, "house-c")]
        stop = threading.Event()

        def publish() -> None:
            while not stop.is_set():
                for b in honest:
                    b.send(wait=False)
                time.sleep(0.5)

        th = threading.Thread(target=publish, daemon=True)
        th.start()

        # -- the member's own board: authentic frames that lie ----------------------------------
        secret, password = site.creds["house-b"]
        me = Client(site, reg.broker_user(C, "house-b"), password, reg.broker_user(C, "house-b"), reconnect=True)
        link = DeviceLink(C, "house-b", secret)
        sent: dict[str, list[bytes]] = {"honest": [], "mint": [], "backwards": []}

        def reading(seq: int, imp: int, exp: int = 0) -> bytes:
            ch = [400, imp, exp, 1800, -100, 0, 0, 500, 0, 0, 0, 0, 0, 0, 0, 0]
            return bytes(link.reading(1, seq, int(time.time()), 0, 2300, 5000, ch, 4))

        def put(kind: str, frame: bytes, topic: str | None = None) -> None:
            me.c.publish(topic or link.t_reading, frame, qos=1).wait_for_publish(5)
            sent[kind].append(frame)

        for seq in (1, 2, 3):
            put("honest", reading(seq, 5000 + seq))
            time.sleep(0.4)
        put("mint", reading(4, 5003 + 10 ** 9))                    # import from nowhere
        put("mint", reading(5, 5003, 10 ** 9))                     # export to be paid for
        put("honest", reading(10, 5004))
        put("backwards", reading(7, 5050))                         # out of order, above a later one
        put("backwards", reading(11, 4000))                        # below the one before
        # a neighbour's topic with its own key and account: the broker's ACL
        neighbour = reading(12, 5005)
        me.c.publish(f"pg/{C}/house-a/reading", neighbour, qos=1).wait_for_publish(5)
        # -- a flood of forged tags under its own device --------------------------------------------
        forged = bytearray(reading(20, 5006))
        forged[-1] ^= 1
        flood = 3000
        for _ in range(flood):
            me.c.publish(link.t_reading, bytes(forged), qos=0)

        # -- the HTTP side --------------------------------------------------------------------------
        codes: list[int | None] = []
        hp = site.http_port
        for raw in (b"POST /installer/register HTTP/1.1\r\nHost: x\r\nContent-Length: 268435456\r\n\r\n" + b"x" * 65536,
                    b"POST /installer/register HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
                    b"POST /installer/register HTTP/1.1\r\nHost: x\r\nContent-Length: lots\r\n\r\n",
                    b"POST /installer/register HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer pgi_guess\r\n"
                    b"Content-Length: 4\r\n\r\nnull",
                    b"GET /installer/device/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"\x16\x03\x01\x02\x00" + b"\x00" * 200):
            codes.append(_http(hp, raw))
        held = []
        for _ in range(40):                     # half-sent requests held open
            s = socket.create_connection(("127.0.0.1", hp), timeout=5)
            s.sendall(b"POST /installer/register HTTP/1.1\r\nContent-Length: 100\r\n")
            held.append(s)
        busy = _http(hp, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        rss_attack = _rss_mb(gw_pid)
        for s in held:
            s.close()
        time.sleep(0.3)
        after = _http(hp, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")

        # a message far beyond the protocol: the broker drops its sender (a
        # connection of its own: paho would send a QoS 1 one again on every
        # reconnect)
        big = Client(site, reg.broker_user(C, "house-b"), password, "big")
        big.c.publish(link.t_reading, b"\xa1" * 4096, qos=0)
        # counted from the broker's own log: the account's two sessions (this
        # one and the member's board) also take each other's place, which drops
        # "big" too, so its drop count alone cannot tell why it was dropped
        site.wait(lambda: "disconnected due to oversize packet" in (site.tmp / "mosquitto.log").read_text(),
                  5, "the broker dropped the oversize sender")
        oversize_dropped = (site.tmp / "mosquitto.log").read_text().count("disconnected due to oversize packet")
        big.close()

        # -- its account against the others' client ids: every session it opens
        # is its own account's (the broker names it so), so it can only knock
        # itself off ------------------------------------------------------------------------------
        takers = [Client(site, reg.broker_user(C, "house-b"), password, cid)
                  for cid in (GW_ID, reg.broker_user(C, "house-a"), reg.broker_user(C, "house-c"))]
        time.sleep(0.5)
        takers_kicked = sum(1 for t in takers if t.drops)
        for t in takers:
            t.close()
        time.sleep(1.0)                          # paho reconnects by itself: let the last one settle
        assert me.up.wait(10), "the member's own board did not come back"

        # -- the operator rotates the member's key (it was misused) -----------------------------------
        time.sleep(1.5)                          # the flood's throttle window is over
        new_secret = bytes.fromhex(site.cli("device", "rotate", "house-b").split("secret")[1].split()[0])
        # the promise: within a second of the command the old key is refused
        time.sleep(1.0)
        t0 = time.monotonic()
        old_frame = reading(30, 5007)
        new_link = DeviceLink(C, "house-b", new_secret)
        new_frame = bytes(new_link.reading(2, 1, int(time.time()), 0, 2300, 5000,
                                           [400, 5008, 0, 1800, -100, 0, 0, 500, 0, 0, 0, 0, 0, 0, 0, 0], 4))
        for f in (old_frame, new_frame):
            assert me.up.wait(10)
            me.c.publish(link.t_reading, f, qos=1).wait_for_publish(5)
        site.wait(lambda: (2, 1) in site.stored("house-b") and site.refused(old_frame) is not None, 5,
                  "the rotation decided")
        rotate_s = time.monotonic() - t0

        stop.set()
        th.join(5)
        time.sleep(1.0)
        for b in honest:
            site.wait(lambda b=b: b.acked_readings() <= site.stored(b.device), 10, f"{b.device} stored")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{hp}/metrics", timeout=5).read().decode()
        rss_end = _rss_mb(gw_pid)
        with site.db() as db:
            stored_b = {(b, s): (i, e) for b, s, i, e in db.execute(
                "SELECT boot, seq, grid_imp_wh, grid_exp_wh FROM readings WHERE device='house-b'")}
            q_bytes = db.execute("SELECT COALESCE(SUM(LENGTH(frame)), 0) FROM quarantine").fetchone()[0]
            refused = {f: site.refused(f) for k in ("mint", "backwards") for f in sent[k]}
        # -- outcomes -------------------------------------------------------------------------------
        acked = sum(len(b.acked_readings()) for b in honest)
        out = {
            "honest_acked": acked,
            "honest_acked_lost": sum(len(b.acked_readings() - site.stored(b.device)) for b in honest),
            "honest_drops": sum(b.drops for b in honest),
            "gateway_sessions": site.log().count("connected to"),
            "minted_wh_stored": max([i for i, _ in stored_b.values()] + [e for _, e in stored_b.values()]),
            "lies_sent": len(sent["mint"]) + len(sent["backwards"]),
            "lies_refused_plausibility": sum(1 for r in refused.values() if r == "plausibility"),
            "neighbour_topic_reached_gateway": site.refused(neighbour) is not None,
            "forged_sent": flood,
            "http_codes": codes,
            "http_while_held": busy,
            "http_after": after,
            "gw_rss_mb": round(max(rss_attack, rss_end), 1),
            "quarantine_bytes": q_bytes,
            "rotation_decided_s": round(rotate_s, 3),
            "member_sessions_replaced": takers_kicked,
            "oversize_sender_dropped": oversize_dropped,
        }
        print("hostile member:", json.dumps(out))
        # nothing lost, nobody knocked off, the gateway never lost its session
        assert acked >= 20 and out["honest_acked_lost"] == 0 and out["honest_drops"] == 0, out
        assert out["gateway_sessions"] == 1, site.log()[-2000:]
        # each new session of the member's account replaced only its own
        # account's previous one (above: no honest board or gateway dropped)
        assert takers_kicked >= 1, takers_kicked
        # the honest-looking readings stored, every lie refused for its reason, nothing minted
        assert {(1, 1), (1, 2), (1, 3), (1, 10)} <= set(stored_b), stored_b
        assert out["lies_refused_plausibility"] == out["lies_sent"] == 4, refused
        assert out["minted_wh_stored"] < 10 ** 6 and not out["neighbour_topic_reached_gateway"]
        assert 'reason="plausibility",device="house-b"' in metrics
        # the forgeries were throttled (counted), the gateway stayed small and answered no 500
        assert 'tag_throttled' in metrics, metrics[-2000:]
        assert all(c is not None and 400 <= c < 500 for c in codes[:5]) and codes[5] in (None, 400), codes
        assert busy in (None, 503) and after == 200, (busy, after)
        assert out["gw_rss_mb"] < 200 and q_bytes <= 8 << 20 and oversize_dropped == 1
        # a second after the rotation the old key is refused, the new one taken
        assert site.refused(old_frame) == "tag" and (2, 1) in site.stored("house-b"), out
        assert site.gw.poll() is None
    finally:
        site.close()
