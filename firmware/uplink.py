# Keeps the board connected: network interface, broker address (resolved
# once), MQTT session with its last will and birth message, command
# subscription, keepalive, and reconnection with exponential back-off
# (1 s doubling to backoff_s[1], reset once a session is up). The MQTT
# protocol object (firmware/mqtt.py) speaks MQTT; this object decides when to
# (re)connect. `_drop()` is safe to call at any time, twice included.
#
# All timing here is real time (hal.io_ms): the broker and the network do
# not care how fast the board's simulated clock runs.
#
# TLS (config broker.tls = {"ca": base64 of the community CA's DER, "name"}):
# one ssl.SSLContext for the board's life, CERT_REQUIRED against that CA
# only, the broker's certificate checked for `name`. A refused handshake
# (wrong CA, out of its dates, wrong name, a peer that does not speak TLS,
# a timeout) is never retried in plain text: it is counted in stats
# tls_err with a short reason in tls_why (both go into the next status the
# board gets through) and retried with the usual back-off.
from firmware.mqtt import BoardMQTT

_IDLE, _UP = 0, 1


class Uplink:
    def __init__(self, hal, net, cfg, link, on_cmd, will, birth):
        """will() / birth(): sealed status frames (offline / online);
        on_cmd(topic, frame) gets every message on the command topic."""
        self.hal = hal
        self.net = net
        self.link = link
        self.on_cmd = on_cmd
        self.will = will
        self.birth = birth
        b = cfg["broker"]
        self.host = b["host"]
        self.port = b["port"]
        self.user = b.get("user")
        self.password = b.get("password")
        self.tls = b.get("tls")     # None: plain text (the status says so)
        self.ctx = None
        self.keepalive_ms = cfg["keepalive_s"] * 1000
        self.sock_timeout_s = cfg["sock_timeout_s"]
        self.backoff_min = cfg["backoff_s"][0] * 1000
        self.backoff_max = cfg["backoff_s"][1] * 1000
        self.backoff = self.backoff_min
        self.next_try = hal.io_ms()
        self.addr = None
        self.resolve_failures = 0
        self.client = None
        self.state = _IDLE
        self.t_tx = 0
        self.t_rx = 0
        self.rx_seen = 0
        self.ping_out = False
        self.net_started = False
        self.stats = {"connects": 0, "failures": 0, "drops": 0, "pings": 0, "last_error": "",
                      "tls_err": 0, "tls_why": ""}  # type: dict

    @property
    def connected(self):
        return self.state == _UP

    @property
    def listening(self):
        """Connected and the command subscription acknowledged."""
        return self.state == _UP and self.client.subscribed

    def _due(self, t):
        return self.hal.io_diff(self.hal.io_ms(), t) >= 0

    def step(self):
        """Connect when due, keep the session alive, read what arrived."""
        if self.state == _UP:
            try:
                self.client.poll()
                self._keepalive()
            except Exception as e:  # noqa: BLE001 - any failure: reconnect
                self._drop("session: %r" % (e,))
            return
        if not self._due(self.next_try):
            return
        if not self.net_started:
            self.net.start()
            self.net_started = True
        if not self.net.up():
            self._fail("network down")
            return
        try:
            self._connect()
        except Exception as e:  # noqa: BLE001
            c = self.client
            if self.tls and (self.ctx is None or c is not None and c.hs):
                w = _why(e)
                self.stats["tls_err"] += 1
                self.stats["tls_why"] = w
                self._fail("tls: " + w)
            else:
                self._fail("connect: %r" % (e,))

    def poll(self):
        """Read what arrived (acks, commands) without the connect logic."""
        if self.state == _UP:
            try:
                self.client.poll()
            except Exception as e:  # noqa: BLE001
                self._drop("session: %r" % (e,))

    def _connect(self):
        t = self.tls
        if t and self.ctx is None:
            import ssl
            from binascii import a2b_base64
            x = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            x.verify_mode = ssl.CERT_REQUIRED  # type: ignore[attr-defined]  # missing in the 1.28 stubs
            x.load_verify_locations(cadata=a2b_base64(t["ca"]))
            self.ctx = x
        if self.addr is None:
            try:
                self.addr = self.net.resolve(self.host, self.port)
            except Exception:
                self.resolve_failures += 1
                raise
        # the client id is the broker account's name: what a PeerGrid broker
        # (use_username_as_clientid) makes of any id, and unique across
        # communities on a broker that does not (boards without an account
        # keep their device id)
        c = BoardMQTT(self.user or self.link.device, self.addr, self.user, self.password,
                      keepalive=self.keepalive_ms // 1000, timeout_s=self.sock_timeout_s,
                      tls=self.ctx, name=t and t["name"])
        c.set_callback(self._on_msg)
        c.set_last_will(self.link.t_status, bytes(self.will()), retain=True, qos=1)
        self.client = c
        c.connect()
        c.subscribe(self.link.t_cmd, qos=1)
        c.subscribe(self.link.t_fw, qos=0)          # pieces of a firmware update
        c.publish(self.link.t_status, self.birth(), retain=True, qos=1)
        now = self.hal.io_ms()
        self.t_tx = now
        self.t_rx = now
        self.rx_seen = c.rx
        self.ping_out = False
        self.state = _UP
        self.backoff = self.backoff_min
        self.stats["connects"] += 1

    def _on_msg(self, topic, msg):
        self.on_cmd(topic, msg)

    def _keepalive(self):
        c = self.client
        now = self.hal.io_ms()
        if c.rx != self.rx_seen:
            self.rx_seen = c.rx
            self.t_rx = now
            self.ping_out = False
        if not self.keepalive_ms:
            return
        if self.hal.io_diff(now, self.t_rx) > self.keepalive_ms * 3 // 2:
            raise OSError(110, "broker silent for 1.5 keepalive periods")
        if not self.ping_out and self.hal.io_diff(now, self.t_tx) >= self.keepalive_ms // 2 \
                and self.hal.io_diff(now, self.t_rx) >= self.keepalive_ms // 2:
            c.ping()
            self.ping_out = True
            self.t_tx = now
            self.stats["pings"] += 1

    def publish(self, topic, frame, retain=False, qos=1):
        """Publish; returns the packet id (1 for QoS 0), or 0 if the session
        failed (then it is dropped and will reconnect)."""
        if self.state != _UP:
            return 0
        try:
            pid = self.client.publish(topic, frame, retain=retain, qos=qos) or 1     # QoS 0 has no id
        except Exception as e:  # noqa: BLE001
            self._drop("publish: %r" % (e,))
            return 0
        self.t_tx = self.hal.io_ms()
        return pid

    def take_acks(self):
        """Packet ids acknowledged since the last call."""
        if self.client is None or not self.client.acked:
            return ()
        a = self.client.acked
        self.client.acked = []
        return a

    def _fail(self, why):
        self.stats["failures"] += 1
        self.stats["last_error"] = why
        self._close()
        if self.resolve_failures >= 5:
            # the broker may have moved: look its name up again
            self.addr = None
            self.resolve_failures = 0
        self.next_try = self.hal.io_add(self.hal.io_ms(), self.backoff)
        self.backoff = min(self.backoff * 2, self.backoff_max)

    def _drop(self, why):
        """The session broke: close it and reconnect after the back-off."""
        if self.state == _UP:
            self.stats["drops"] += 1
        self.state = _IDLE
        self._fail(why)

    def _close(self):
        c = self.client
        self.client = None
        self.state = _IDLE
        if c is not None and c.sock is not None:
            try:
                c.sock.close()
            except Exception:  # noqa: BLE001
                pass

    def close(self, farewell=None):
        """Clean stop: publish the offline status first if given."""
        if self.state == _UP and farewell is not None:
            try:
                self.client.publish(self.link.t_status, farewell, retain=True, qos=0)
                self.client.disconnect()
            except Exception:  # noqa: BLE001
                pass
        self._close()


# A refused handshake's reason, short enough for the status, from words in
# the exception's text (mbedTLS's verification result as MicroPython words
# it, or the socket's or mbedTLS's error, named or described); else the
# text's end, where the error's name is. One string, split only when a
# handshake failed: a table of tuples would cost the board's heap 0.4 KB.
_WHY = ("expired:cert expired,future:cert not yet valid,CN:wrong name,CA:wrong CA,"
        "TIMEDOUT:timeout,RESET:closed (not TLS?),EOF:closed (not TLS?),ECORD:not TLS,ecord:not TLS")


def _why(e):
    m = str(e)
    for p in _WHY.split(","):
        k, r = p.split(":")
        if k in m:
            return r
    if m.endswith("')"):
        m = m[:-2]      # OSError(code, 'text'): the text
    return m[-24:]
