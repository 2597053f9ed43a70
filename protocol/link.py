# A board's end of its link, built from topics, messages and the COSE
# profile: `DeviceLink` is what a board holds. The gateway's end (sealing
# commands, opening uplink frames, the topics it subscribes and the ACL it
# writes) is protocol/gateway_end.py, which a board never loads.
from protocol import cbor, cose, messages, topics
from protocol.errors import ProtocolError, E_TOPIC


class DeviceLink:
    """Seals a board's uplink messages and opens the commands sent to it."""

    def __init__(self, community, device, secret):
        up, down = cose.derive_keys(secret)
        kid = device.encode()
        self.community = community
        self.device = device
        self.kid = kid
        self.t_reading = topics.topic(community, device, topics.READING)
        self.t_status = topics.topic(community, device, topics.STATUS)
        self.t_ack = topics.topic(community, device, topics.ACK)
        self.t_cmd = topics.topic(community, device, topics.CMD)
        self.t_fwget = topics.topic(community, device, topics.FWGET)
        self.t_fw = topics.topic(community, device, topics.FW)
        self._aad_reading = self.t_reading.encode()
        self._aad_status = self.t_status.encode()
        self._aad_ack = self.t_ack.encode()
        self._aad_cmd = self.t_cmd.encode()
        # one frame buffer for both: a frame (a memoryview into it) is
        # valid until this link seals the next one; the board copies or
        # sends each before it seals another
        self._reading = cose.Sealer(up, kid, messages.ALGS[topics.READING][0])
        self._other = cose.Sealer(up, kid, cose.ALG_HMAC256, out=self._reading.out)
        self._down = cose.HmacKey(down, cose.ALG_HMAC256)
        self._w = cbor.Writer(messages.MAX_PAYLOAD)
        self.cmd_guard = None

    def reading(self, boot, seq, t, flags, vrms_dv, freq_chz, ch, nch, inv=None, bat=None, meas=None, clip=0,
                ctf=0):
        """Frame for a reading (memoryview into a reused buffer)."""
        w = self._w
        w.reset()
        messages.encode_reading(w, boot, seq, t, flags, vrms_dv, freq_chz, ch, nch, inv, bat, meas, clip, ctf)
        return self._reading.seal(w.mv[:w.pos], self._aad_reading)

    def _seal_fields(self, kind, fields, aad):
        w = self._w
        w.reset()
        messages.encode(w, kind, fields)
        return self._other.seal(w.mv[:w.pos], aad)

    def status(self, fields):
        return self._seal_fields(topics.STATUS, fields, self._aad_status)

    def ack(self, fields):
        return self._seal_fields(topics.ACK, fields, self._aad_ack)

    def fwget(self, fields):
        """A request for a piece of a release (docs/OTA.md 2)."""
        return self._seal_fields(topics.FWGET, fields, self.t_fwget.encode())

    def verify_command(self, topic, frame):
        """Steps 1-2 of PROTOCOL.md 7.5: the topic is this board's command
        topic and the envelope verifies under the downlink key. Returns the
        authentic payload (bytes); anything failing here gets no ack."""
        if isinstance(topic, (bytes, bytearray)):
            ok = topic == self._aad_cmd
        else:
            ok = topic == self.t_cmd
        if not ok:
            raise ProtocolError(E_TOPIC, "not this board's command topic")
        down = self._down
        return cose.open_frame(frame, self._aad_cmd, self.kid,
                               lambda kid, alg: down, messages.ALGS[topics.CMD])

    def open_command(self, topic, frame):
        """Verify and decode a command received on `topic`. Counter and lease
        are the caller's to enforce (replay.CounterGuard, its clock)."""
        return messages.decode(topics.CMD, self.verify_command(topic, frame))


def command_counter(payload):
    """The counter (key 1) of an authentic command payload that failed its
    schema check, so the refusal can still be acknowledged; None when there
    is no usable counter (then no ack can be sent)."""
    try:
        m = cbor.loads(payload, max_depth=2, max_items=messages.MAX_ITEMS,
                       max_container=4 * messages.MAX_CHANNELS, max_size=messages.MAX_PAYLOAD)
    except ProtocolError:
        return None
    if not isinstance(m, dict):
        return None
    c = m.get(1)
    if isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 0xFFFFFFFF:
        return c
    return None
