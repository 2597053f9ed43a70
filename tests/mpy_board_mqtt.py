# Runs under MicroPython with umqtt from build/lib: the board's MQTT object
# (firmware/mqtt.py) against a scripted socket. Checks the exact bytes of
# CONNECT (will, credentials, keepalive), SUBSCRIBE and PUBLISH, the parsing
# of PUBACK / SUBACK / PINGRESP / an incoming command, and that a peer that
# stops in the middle of a packet raises instead of hanging.
# Prints one line per check, "PASS name" or "FAIL name: why", then a summary.
import binascii

from firmware import mqtt as fm


class ScriptSock:
    """A socket double: `rx` is what the broker 'sends', `tx` collects what
    the board writes. Once rx is exhausted, a blocking read raises like a
    timed-out socket; a non-blocking one returns None."""

    def __init__(self, rx=b""):
        self.rx = bytearray(rx)
        self.tx = bytearray()
        self.timeout = None
        self.closed = False

    def settimeout(self, t):
        self.timeout = t

    def connect(self, addr):
        pass

    def read(self, n):
        if not self.rx:
            if self.timeout == 0:
                return None
            raise OSError(110, "timed out")
        d = bytes(self.rx[:n])
        self.rx = self.rx[n:]
        return d

    def write(self, b):
        self.tx.extend(b)
        return len(b)

    def close(self):
        self.closed = True


def client(rx=b"", will=True):
    c = fm.BoardMQTT("d3f9a2", ("127.0.0.1", 1883), user="d3f9a2", password="pw", keepalive=30,
                     timeout_s=2)
    if will:
        c.set_last_will("pg/oak/d3f9a2/status", b"WILL", retain=True, qos=1)
    s = ScriptSock(rx)
    c.sock = fm.TimedSocket(s, 2)
    return c, s


_results = []


def check(name, fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        _results.append(False)
        print("FAIL %s: %s %s" % (name, type(e).__name__, e))
        return
    _results.append(True)
    print("PASS %s" % name)


def hexs(b):
    return binascii.hexlify(bytes(b)).decode()


def with_socket(s, fn):
    """Run fn() while firmware.mqtt's socket module hands out s: connect()
    makes its own socket."""
    class SockMod:
        @staticmethod
        def socket():
            return s

    orig = fm.socket
    fm.socket = SockMod
    try:
        return fn()
    finally:
        fm.socket = orig


def connect_bytes():
    s = ScriptSock(b"\x20\x02\x00\x00")
    c = fm.BoardMQTT("d3f9a2", ("127.0.0.1", 1883), user="u1", password="pw", keepalive=30, timeout_s=2)
    c.set_last_will("pg/oak/d3f9a2/status", b"W", retain=True, qos=1)
    assert with_socket(s, c.connect) == 0
    # fixed header 10 len; "MQTT" 4; flags: user, password, will retain,
    # will QoS 1, will, clean = 0xEE; keepalive 30; then the strings
    want = ("10" + "33" + "00044d51545404" + "ee" + "001e" + "0006643366396132"
            + "0014" + hexs(b"pg/oak/d3f9a2/status") + "000157" + "00027531" + "00027077")
    assert hexs(s.tx) == want, hexs(s.tx)
    assert s.timeout == 2


def connack_refused():
    s = ScriptSock(b"\x20\x02\x00\x05")
    c = fm.BoardMQTT("x", ("127.0.0.1", 1883), user="u", password="bad", timeout_s=2)
    try:
        with_socket(s, c.connect)
    except fm.MQTTException:
        return
    raise AssertionError("refused CONNACK accepted")


def publish_bytes():
    c, s = client()
    pid = c.publish("pg/oak/d3f9a2/reading", b"\x01\x02\x03", qos=1)
    assert pid == 1
    want = "32" + "1c" + "0015" + hexs(b"pg/oak/d3f9a2/reading") + "0001" + "010203"
    assert hexs(s.tx) == want, hexs(s.tx)
    s.tx = bytearray()
    assert c.publish("pg/oak/d3f9a2/status", memoryview(bytearray(b"AB")), retain=True, qos=1) == 2
    assert hexs(s.tx)[:4] == "331a"


def long_publish_length():
    c, s = client()
    c.publish("t", bytes(200), qos=1)
    # remaining length 2+1+2+200 = 205 = 0xcd 0x01 in MQTT's varint
    assert hexs(s.tx[:3]) == "32cd01", hexs(s.tx[:3])


def pid_wraps():
    c, s = client()
    c.pid = 65535
    assert c.publish("t", b"x", qos=1) == 1


def subscribe_bytes():
    c, s = client()
    c.subscribe("pg/oak/d3f9a2/cmd", 1)
    want = "82" + "16" + "0001" + "0011" + hexs(b"pg/oak/d3f9a2/cmd") + "01"
    assert hexs(s.tx) == want, hexs(s.tx)


def poll_acks():
    rx = b"\x90\x03\x00\x01\x01" + b"\x40\x02\x00\x07" + b"\xd0\x00" + b"\x40\x02\x01\x00"
    c, s = client(rx)
    n = c.poll()
    assert n == 4, n
    assert c.acked == [7, 256], c.acked
    assert c.subscribed
    assert c.poll() == 0


def poll_refused_subscription():
    c, s = client(b"\x90\x03\x00\x01\x80")
    try:
        c.poll()
    except fm.MQTTException:
        return
    raise AssertionError("refused subscription not reported")


def poll_command():
    got = []
    topic = b"pg/oak/d3f9a2/cmd"
    body = b"\x00" + bytes((len(topic),)) + topic + b"\x00\x09" + b"FRAME"
    rx = bytes((0x32, len(body))) + body
    c, s = client(rx)
    c.set_callback(lambda t, m: got.append((t, m)))
    assert c.poll() == 1
    assert got == [(topic, b"FRAME")], got
    # the board acknowledged the command with its packet id
    assert hexs(s.tx) == "40020009", hexs(s.tx)



def poll_command_newer_umqtt():
    """umqtt.simple 1.7.0 (frozen in the stock ESP32 image) returns the
    packet type after delivering a PUBLISH where 1.3.4 returns None: the
    board must take that as a command handled, keep the session and go on
    to the PUBACK behind it."""
    class Newer(fm.BoardMQTT):
        def wait_msg(self):
            before = len(got)
            op = fm.BoardMQTT.wait_msg(self)
            return 0x32 if len(got) > before else op

    got = []
    topic = b"pg/oak/d3f9a2/cmd"
    body = b"\x00" + bytes((len(topic),)) + topic + b"\x00\x09" + b"FRAME"
    rx = bytes((0x32, len(body))) + body + b"\x40\x02\x00\x07"
    c = Newer("d3f9a2", ("127.0.0.1", 1883), user="d3f9a2", password="pw", keepalive=30, timeout_s=2)
    s = ScriptSock(rx)
    c.sock = fm.TimedSocket(s, 2)
    c.set_callback(lambda t, m: got.append((t, m)))
    assert c.poll() == 2
    assert got == [(topic, b"FRAME")], got
    assert c.acked == [7], c.acked


def half_packet_raises():
    c, s = client(b"\x40\x02\x00")        # PUBACK cut after 3 of 4 bytes
    try:
        c.poll()
    except OSError:
        return
    raise AssertionError("half a packet did not raise")


def closed_connection_raises():
    class Closed(ScriptSock):
        def read(self, n):
            return b""

    c, s = client()
    c.sock = fm.TimedSocket(Closed(), 2)
    try:
        c.poll()
    except OSError:
        return
    raise AssertionError("EOF not reported")


def unexpected_packet_raises():
    c, s = client(b"\x20\x02\x00\x00")    # a second CONNACK
    try:
        c.poll()
    except fm.MQTTException:
        return
    raise AssertionError("unexpected packet accepted")


for name, fn in (("connect_bytes", connect_bytes), ("connack_refused", connack_refused),
                 ("publish_bytes", publish_bytes), ("long_publish_length", long_publish_length),
                 ("pid_wraps", pid_wraps), ("subscribe_bytes", subscribe_bytes),
                 ("poll_acks", poll_acks), ("poll_refused_subscription", poll_refused_subscription),
                 ("poll_command", poll_command),
                 ("poll_command_newer_umqtt", poll_command_newer_umqtt), ("half_packet_raises", half_packet_raises),
                 ("closed_connection_raises", closed_connection_raises),
                 ("unexpected_packet_raises", unexpected_packet_raises)):
    check(name, fn)
print("%d passed, %d failed" % (sum(_results), len(_results) - sum(_results)))
