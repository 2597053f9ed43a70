# The MQTT topic tree: pg/<community>/<device>/<kind>
from protocol.errors import ProtocolError, E_TOPIC

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

ROOT = "pg"
READING = "reading"   # board -> gateway, QoS 1, not retained
STATUS = "status"     # board -> gateway, QoS 1, retained (birth and last will)
ACK = "ack"           # board -> gateway, QoS 1, not retained
CMD = "cmd"           # gateway -> board, QoS 1, not retained
FWGET = "fwget"       # board -> gateway, QoS 0: a piece of a release asked for (sealed)
FW = "fw"             # gateway -> board, QoS 0: that piece (not sealed: the release is signed)
UPLINK = (READING, STATUS, ACK, FWGET)
DOWNLINK = (CMD, FW)
KINDS = (READING, STATUS, ACK, CMD, FWGET, FW)

MAX_ID = const(16)
MAX_TOPIC = const(64)


def valid_id(s):
    """Community and device ids: 1-16 of a-z, 0-9 and '-', not starting with '-'."""
    if not isinstance(s, str) or not 0 < len(s) <= MAX_ID or s[0] == "-":
        return False
    for c in s:
        if not ("a" <= c <= "z" or "0" <= c <= "9" or c == "-"):
            return False
    return True


def topic(community, device, kind):
    if not valid_id(community) or not valid_id(device) or kind not in KINDS:
        raise ProtocolError(E_TOPIC, "bad community, device or kind")
    return ROOT + "/" + community + "/" + device + "/" + kind


def parse(t):
    """Split a topic into (community, device, kind) or raise E_TOPIC."""
    if isinstance(t, (bytes, bytearray, memoryview)):
        if len(t) > MAX_TOPIC:
            raise ProtocolError(E_TOPIC, "topic too long")
        try:
            t = str(bytes(t), "utf-8")
        except UnicodeError:
            raise ProtocolError(E_TOPIC, "topic is not UTF-8")
    if len(t) > MAX_TOPIC:
        raise ProtocolError(E_TOPIC, "topic too long")
    parts = t.split("/")
    if len(parts) != 4 or parts[0] != ROOT or parts[3] not in KINDS \
            or not valid_id(parts[1]) or not valid_id(parts[2]):
        raise ProtocolError(E_TOPIC, "not pg/<community>/<device>/<kind>")
    return parts[1], parts[2], parts[3]
