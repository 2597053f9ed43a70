"""Signed frames through a real mosquitto with per-device credentials and ACLs."""
from __future__ import annotations

import queue
import sys
import time

import paho.mqtt.client as mqtt
import pytest

from harness import ROOT, MpyPeer
from peergrid.ingest.wire import UplinkVerifier, seal_command
from protocol import gateway_end
from protocol.errors import ProtocolError

SECRET_A = bytes(range(32))
SECRET_B = bytes(range(1, 33))


def _client(broker, user: str, password: str) -> tuple[mqtt.Client, queue.Queue]:
    q: queue.Queue = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}-{time.monotonic_ns()}",
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    c.on_message = lambda cl, ud, msg: q.put((msg.topic, bytes(msg.payload)))
    c.user_data_set({"subacks": queue.Queue()})
    c.on_subscribe = lambda cl, ud, mid, codes, props: ud["subacks"].put(mid)
    c.connect(broker.host, broker.port, keepalive=10)
    c.loop_start()
    return c, q


@pytest.fixture(scope="module")
def community(broker):
    for dev in ("dev-a", "dev-b"):
        broker.add_user(dev, f"{dev}-pw", gateway_end.device_acl("oak", dev))
    broker.add_user("gateway", "gw-pw", [("pg/oak/#", "readwrite")])
    broker.apply()
    return broker


def _sub(c: mqtt.Client, topic: str) -> None:
    """Subscribe and wait for the broker's SUBACK (granted or refused)."""
    res, mid = c.subscribe(topic, qos=1)
    assert res == mqtt.MQTT_ERR_SUCCESS
    acks = c.user_data_get()["subacks"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if acks.get(timeout=0.1) == mid:
                return
        except queue.Empty:
            pass
    raise AssertionError(f"no SUBACK for {topic}")


def test_board_frame_through_broker_verifies_on_gateway(community, mpy_dir) -> None:
    gw, gq = _client(community, "gateway", "gw-pw")
    for t in gateway_end.subscriptions("oak"):
        _sub(gw, t)
    peer = MpyPeer([mpy_dir, ROOT / "tests" / "shared", ROOT / "tests"])
    try:
        out = peer.call(op="reading", device="dev-a", secret=SECRET_A.hex(),
                        r=dict(boot=1, seq=1, t=1795000000, flags=0, vrms_dv=2300, freq_chz=5000,
                               ch=[100, 1, 2, 500], nch=1))
    finally:
        peer.close()
    dev, _ = _client(community, "dev-a", "dev-a-pw")
    try:
        dev.publish(out["topic"], bytes.fromhex(out["frame"]), qos=1).wait_for_publish(5)
        topic, payload = gq.get(timeout=5)
        ver = UplinkVerifier(lambda c, d: {"dev-a": SECRET_A, "dev-b": SECRET_B}.get(d))
        up = ver.open(topic, payload)
        assert (up.device, up.kind, up.fields["ch"]) == ("dev-a", "reading", [[100, 1, 2, 500]])
    finally:
        dev.loop_stop()
        dev.disconnect()
        gw.loop_stop()
        gw.disconnect()


def test_acl_stops_a_board_publishing_as_another(community) -> None:
    gw, gq = _client(community, "gateway", "gw-pw")
    _sub(gw, "pg/oak/+/reading")
    b, _ = _client(community, "dev-b", "dev-b-pw")
    try:
        b.publish("pg/oak/dev-a/reading", b"spoof", qos=1).wait_for_publish(5)
        b.publish("pg/oak/dev-b/reading", b"own", qos=1).wait_for_publish(5)
        got = gq.get(timeout=5)
        assert got == ("pg/oak/dev-b/reading", b"own")
        with pytest.raises(queue.Empty):
            gq.get(timeout=0.5)
    finally:
        b.loop_stop()
        b.disconnect()
        gw.loop_stop()
        gw.disconnect()


def test_only_the_addressed_board_reads_its_commands(community) -> None:
    a, aq = _client(community, "dev-a", "dev-a-pw")
    b, bq = _client(community, "dev-b", "dev-b-pw")
    gw, _ = _client(community, "gateway", "gw-pw")
    try:
        _sub(a, "pg/oak/dev-a/cmd")
        _sub(b, "pg/oak/dev-a/cmd")     # not in dev-b's ACL
        topic, frame = seal_command("oak", "dev-a", SECRET_A, dict(ctr=1, t=1795000000, lease=60, op=1,
                                                                    target=0, value=1))
        gw.publish(topic, frame, qos=1).wait_for_publish(5)
        assert aq.get(timeout=5) == (topic, frame)
        with pytest.raises(queue.Empty):
            bq.get(timeout=0.5)
    finally:
        for c in (a, b, gw):
            c.loop_stop()
            c.disconnect()


def test_wrong_password_is_refused(community) -> None:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv311)
    c.username_pw_set("dev-a", "guess")
    codes: list = []
    c.on_connect = lambda cl, ud, flags, rc, props: codes.append(rc)
    c.connect(community.host, community.port)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)
    c.loop_stop()
    assert codes and codes[0].is_failure


def test_frame_moved_to_another_device_topic_is_rejected(community) -> None:
    # Even with a broker account that may write anywhere, the MAC binds the topic.
    ver = UplinkVerifier(lambda c, d: {"dev-a": SECRET_A, "dev-b": SECRET_B}.get(d))
    topic, frame = seal_command("oak", "dev-a", SECRET_A, dict(ctr=1, t=1, lease=1, op=1, target=0, value=1))
    with pytest.raises(ProtocolError):
        ver.open("pg/oak/dev-b/reading", frame)


def test_micropython_umqtt_board_publishes_through_broker(community) -> None:
    """The real umqtt (fetched at build time) under the real MicroPython
    publishes signed frames with the board's own broker account."""
    import subprocess

    from harness import run_micropython

    subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_umqtt.py")], check=True, capture_output=True)
    gw, gq = _client(community, "gateway", "gw-pw")
    for t in gateway_end.subscriptions("oak"):
        _sub(gw, t)
    try:
        proc = run_micropython(["tests/mpy_umqtt_publish.py", community.host, str(community.port), "dev-a",
                                "dev-a-pw", "oak", "dev-a", SECRET_A.hex()],
                               [ROOT / "build" / "lib", ROOT], timeout=30)
        assert "PUBLISHED" in proc.stdout, proc.stdout + proc.stderr
        ver = UplinkVerifier(lambda c, d: {"dev-a": SECRET_A}.get(d))
        got = {}
        for _ in range(2):
            topic, payload = gq.get(timeout=5)
            up = ver.open(topic, payload)
            got[up.kind] = up.fields
        assert got["reading"]["ch"] == [[250, 10, 0, 1100]] and got["status"]["online"] == 1
    finally:
        # clear the retained birth so later tests start from an empty broker
        gw.publish("pg/oak/dev-a/status", b"", qos=1, retain=True).wait_for_publish(5)
        gw.loop_stop()
        gw.disconnect()
