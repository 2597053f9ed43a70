# The gateway's end of a device's link: commands sealed with the device's
# downlink key, uplink frames opened and checked (the reference: the CPython
# gateway has a faster cbor2 path that must agree with these byte for
# byte), the topics the gateway subscribes to and the broker ACL of a board's
# account. Runs on MicroPython as on CPython (the shared tests use it on
# both), but a board never loads it: its code stays out of the board's heap.
from protocol import cbor, cose, messages, topics
from protocol.errors import ProtocolError, E_TOPIC, E_KID
from protocol.topics import ROOT, UPLINK, READING, STATUS, ACK, CMD, FWGET, FW


class CommandSealer:
    """Gateway side: seals commands for one device with its downlink key."""

    def __init__(self, community, device, secret):
        down = cose.derive_keys(secret)[1]
        self.topic = topics.topic(community, device, topics.CMD)
        self._aad = self.topic.encode()
        self._s = cose.Sealer(down, device.encode(), messages.ALGS[topics.CMD][0])
        self._w = cbor.Writer(messages.MAX_PAYLOAD)

    def seal(self, fields):
        w = self._w
        w.reset()
        messages.encode(w, topics.CMD, fields)
        return bytes(self._s.seal(w.mv[:w.pos], self._aad))


def open_uplink(topic, frame, secret_for):
    """Reference verification of an uplink frame.

    secret_for(community, device) -> the device's 32-byte secret or None.
    Returns (community, device, kind, message dict)."""
    community, device, kind = topics.parse(topic)
    if kind not in topics.UPLINK:
        raise ProtocolError(E_TOPIC, "not an uplink topic")
    aad = topic.encode() if isinstance(topic, str) else bytes(topic)

    def key_for(kid, alg):
        s = secret_for(community, device)
        return None if s is None else cose.derive_keys(s)[0]

    kid = device.encode()
    if not kid:
        raise ProtocolError(E_KID, "empty device id")
    payload = cose.open_frame(frame, aad, kid, key_for, messages.ALGS[kind])
    return community, device, kind, messages.decode(kind, payload)


def subscriptions(community):
    """What the gateway subscribes to for one community."""
    return [ROOT + "/" + community + "/+/" + k for k in UPLINK]


def device_acl(community, device):
    """(pattern, access) pairs a board's broker account gets."""
    base = ROOT + "/" + community + "/" + device + "/"
    return [(base + READING, "write"), (base + STATUS, "write"),
            (base + ACK, "write"), (base + CMD, "read"),
            (base + FWGET, "write"), (base + FW, "read")]
