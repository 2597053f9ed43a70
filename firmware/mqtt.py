# The board's MQTT protocol object: umqtt.simple from micropython-lib (fetched
# at build time into build/lib/umqtt_pinned: a name the stock image's frozen
# umqtt cannot shadow, see tools/fetch_umqtt.py), extended by subclass so that nothing the
# network does can block the main loop:
#
#   * the socket is wrapped so that "blocking" means "blocking for at most
#     `timeout_s`": a peer that stops half-way through a packet raises
#     OSError instead of hanging in umqtt's read loops;
#   * connect() takes an address resolved once by the caller (no DNS per
#     reconnect) and times out; given an ssl.SSLContext (`tls`) it speaks
#     TLS, the broker's certificate checked for `name` (umqtt's own ssl
#     option goes through ussl.wrap_socket, which checks nothing unless
#     told to); the handshake runs under the same socket timeout, and `hs`
#     is 1 while it runs, so the caller can tell a refused handshake from a
#     refused connection;
#   * publish() at QoS 1 returns the packet id at once instead of waiting for
#     the PUBACK (umqtt.simple waits for it forever); poll() reads whatever
#     arrived (PUBACK, SUBACK, PINGRESP, commands) without waiting and
#     records acknowledged ids in `acked`.
#
# Any exception out of this object means the connection is unusable: the
# caller (firmware/uplink.py) closes it and reconnects with back-off.
import struct

from umqtt_pinned.simple import MQTTClient, MQTTException

try:
    import usocket as socket
except ImportError:  # pragma: no cover - CPython never runs this module
    import socket  # type: ignore[no-redef]  # CPython's name for usocket

try:
    from micropython import const
except ImportError:
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

_PUBLISH = const(0x30)
_PUBACK = const(0x40)
_SUBACK = const(0x90)
_CONNACK = const(0x20)


class TimedSocket:
    """A socket whose blocking mode has a deadline. umqtt switches between
    setblocking(False) (poll) and setblocking(True) (read the rest of a
    packet); here True means settimeout(timeout_s). `raw`: the TCP socket
    under a TLS socket, which has no settimeout of its own (and whose
    setblocking(True) would mean "forever" on the ESP32 port)."""

    def __init__(self, sock, timeout_s, raw=None):
        self.s = sock
        self.r = raw or sock
        self.t = timeout_s
        self.nread = 0
        self.q = None               # a bytearray: writes are held there until flush()
        self.r.settimeout(timeout_s)

    def setblocking(self, flag):
        self.r.settimeout(self.t if flag else 0)

    def read(self, n):
        d = self.s.read(n)
        if d:
            self.nread += len(d)
            if len(d) < n:
                # the peer stopped inside a packet: never hand umqtt half of one
                raise OSError(116, "short read")
        return d

    def write(self, buf, n=None):
        if n is None:
            n = len(buf)
        mv = memoryview(buf)
        if self.q is not None:
            self.q += mv[:n]
            return n
        done = 0
        while done < n:
            w = self.s.write(mv[done:n])
            if not w:
                raise OSError(116, "write stalled")
            done += w
        return n

    def flush(self):
        """Send what was held in one write: umqtt writes CONNECT and
        SUBSCRIBE field by field, and each small write would be a TLS record
        of its own and wait on Nagle's algorithm (about 40 ms each)."""
        q = self.q
        self.q = None
        self.write(q)

    def close(self):
        self.s.close()


class BoardMQTT(MQTTClient):
    """umqtt.simple with deadlines and non-blocking QoS 1 publishing."""

    def __init__(self, client_id, addr, user=None, password=None, keepalive=30, timeout_s=5,
                 tls=None, name=None):
        MQTTClient.__init__(self, client_id, "", port=1, user=user, password=password,
                            keepalive=keepalive)
        self.addr = addr
        self.tls = tls              # ssl.SSLContext (CERT_REQUIRED, the community CA) or None
        self.name = name            # the name the broker's certificate must carry
        self.hs = 0                 # 1 while the TLS handshake runs
        self.timeout_s = timeout_s
        self.acked = []             # packet ids PUBACKed since the caller last looked
        self.rx = 0                 # packets received (for keepalive accounting)
        self.subscribed = False     # SUBACK seen
        self._hdr = bytearray(5)
        self._pkt = bytearray(640)  # one PUBLISH: header, topic, id, frame
        self._topics = {}           # topic text -> its bytes, encoded once

    def connect(self, clean_session=True):
        s = socket.socket()
        w = s
        try:
            s.settimeout(self.timeout_s)
            s.connect(self.addr)
            if self.tls is not None:
                self.hs = 1
                w = self.tls.wrap_socket(s, server_hostname=self.name)
                self.hs = 0
        except Exception:
            s.close()
            raise
        self.sock = TimedSocket(w, self.timeout_s, s)
        self.sock.q = bytearray()
        # CONNECT: variable header "MQTT" level 4, flags, keepalive; payload
        # client id, will topic and message, user name, password
        flags = 2 if clean_session else 0
        size = 10 + 2 + len(self.client_id)
        if self.lw_topic:
            flags |= 4 | (self.lw_qos & 3) << 3 | (1 << 5 if self.lw_retain else 0)
            size += 4 + len(self.lw_topic) + len(self.lw_msg)
        if self.user is not None:
            flags |= 0xC0
            size += 4 + len(self.user) + len(self.pswd)
        self._fixed(0x10, size)
        self.sock.write(b"\x00\x04MQTT\x04")
        self.sock.write(struct.pack("!BH", flags, self.keepalive))
        self._send_str(self.client_id)
        if self.lw_topic:
            self._send_str(self.lw_topic)
            self._send_str(self.lw_msg)
        if self.user is not None:
            self._send_str(self.user)
            self._send_str(self.pswd)
        self.sock.flush()
        resp = self.sock.read(4)
        if not resp or resp[0] != _CONNACK or resp[1] != 2:
            raise MQTTException("bad CONNACK")
        if resp[3] != 0:
            raise MQTTException(resp[3])
        self.rx += 1
        return resp[2] & 1

    def _fixed(self, first, size):
        h = self._hdr
        h[0] = first
        i = 1
        while size > 0x7F:
            h[i] = (size & 0x7F) | 0x80
            size >>= 7
            i += 1
        h[i] = size
        self.sock.write(h, i + 1)

    def publish(self, topic, msg, retain=False, qos=0):
        """Send one PUBLISH; for QoS 1 return its packet id (watch `acked`).
        The packet is assembled in one buffer and written at once: several
        small writes would meet Nagle's algorithm and the peer's delayed ACK
        and wait ~40 ms each."""
        tl = len(topic)
        size = 2 + tl + len(msg) + (2 if qos else 0)
        p = self._pkt
        if size + 5 > len(p):
            p = bytearray(size + 5)
        p[0] = 0x30 | qos << 1 | (1 if retain else 0)
        i = 1
        n = size
        while n > 0x7F:
            p[i] = (n & 0x7F) | 0x80
            n >>= 7
            i += 1
        p[i] = n
        i += 1
        p[i] = tl >> 8
        p[i + 1] = tl & 0xFF
        i += 2
        if isinstance(topic, str):
            tb = self._topics.get(topic)
            if tb is None:
                tb = topic.encode()
                self._topics[topic] = tb
            topic = tb
        p[i:i + tl] = topic
        i += tl
        pid = 0
        if qos:
            self.pid = self.pid % 65535 + 1
            pid = self.pid
            p[i] = pid >> 8
            p[i + 1] = pid & 0xFF
            i += 2
        p[i:i + len(msg)] = msg
        i += len(msg)
        self.sock.write(p, i)
        return pid

    def subscribe(self, topic, qos=0):
        """Send SUBSCRIBE without waiting; poll() checks the SUBACK."""
        self.pid = self.pid % 65535 + 1
        self.sock.q = bytearray()
        self._fixed(0x82, 2 + 2 + len(topic) + 1)
        self.sock.write(struct.pack("!H", self.pid))
        self._send_str(topic)
        self.sock.write(bytes((qos,)))
        self.sock.flush()
        return self.pid

    def poll(self, limit=6):
        """Handle up to `limit` waiting packets without blocking. Returns the
        number handled."""
        n = 0
        sock = self.sock
        while n < limit:
            before = sock.nread
            sock.setblocking(False)
            op = self.wait_msg()
            if op is None:
                # nothing waiting, or a PINGRESP / PUBLISH umqtt handled itself
                if sock.nread == before:
                    break
                n += 1
                self.rx += 1
                continue
            n += 1
            self.rx += 1
            if op & 0xF0 == _PUBLISH:
                # a command, already handed to the callback: umqtt.simple
                # 1.3.x returns None here, later versions the packet type
                continue
            if op == _PUBACK:
                self.sock.setblocking(True)
                b = self.sock.read(3)
                if b[0] != 2:
                    raise MQTTException("bad PUBACK")
                self.acked.append(b[1] << 8 | b[2])
            elif op == _SUBACK:
                self.sock.setblocking(True)
                b = self.sock.read(4)
                if b[3] == 0x80:
                    raise MQTTException("subscription refused")
                self.subscribed = True
            else:
                raise MQTTException("unexpected packet %02x" % op)
        return n
