# Message payloads of the PeerGrid wire contract (PROTOCOL.md, "Messages").
#
# Every payload is a deterministic CBOR map with small integer keys. Keys 1-4
# are the same in every uplink message (boot, seq, t, flags). A field equal to
# its default (flags 0, version 1) is left out, so each message has exactly one
# encoding. Integers carry units stated in the schema below; there are no
# floats on the wire.
from protocol import cbor
from protocol.errors import ProtocolError, E_SCHEMA, E_VERSION, E_NONCANONICAL, E_RANGE
from protocol.topics import READING, STATUS, ACK, CMD, FWGET

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

VERSION = const(1)

# flags (key 4) of uplink messages
F_CLOCK_UNSYNCED = const(1)   # t is the board's guess, not NTP time
F_NO_VREF = const(2)          # no voltage reference: powers are apparent (VA) at an assumed voltage
F_BUFFERED = const(4)         # replayed from the flash buffer, not live
F_INV_MISSING = const(8)      # inverter configured but not answering
F_BAT_MISSING = const(16)     # battery configured but not answering
F_ENERGY_LOSS = const(32)     # registers restored after an unclean reset (see status lost_wh)
F_UNCALIBRATED = const(64)    # a channel runs on default calibration (CT gain, or the ADC's own)
F_CLIPPED = const(128)        # a signal reached the end of the converter's range (key 11 says which)
F_VREF_FAULT = const(256)     # the voltage input is dead: powers are apparent at the nominal voltage
F_CT_FAULT = const(512)       # a CT input sits far from its bias: open, shorted, unplugged (key 12)
F_FREQ_RANGE = const(1024)    # mains frequency outside 40-70 Hz: freq_chz is absent
CLIP_VREF = const(0x1000)     # key 11: the voltage reference clipped (bits 0-11: channels)

# command operations
OP_RELAY = const(1)           # value 0 = open (off), 1 = closed (on)
OP_BATTERY = const(2)         # value W, positive charges, negative discharges
OP_UPDATE = const(3)          # value: the release sequence number to fetch and install (target 0)
OP_CONFIRM = const(4)         # value: the release on trial that proved itself (target 0)

# firmware updates (docs/OTA.md): status key 22 "ota"
OTA_IDLE = const(0)           # no update under way
OTA_FETCH = const(1)          # downloading release "ota_rel" ("ota_got" bytes so far)
OTA_TRIAL = const(2)          # running release "rel" on trial, waiting for OP_CONFIRM
OTA_CONFIRMED = const(3)      # release "rel" confirmed
OTA_REFUSED = const(4)        # release "ota_rel" refused ("ota_why"), the old one runs on
OTA_ROLLED_BACK = const(5)    # release "ota_rel" failed its trial ("ota_why"), back on "rel"
FW_CHUNK = const(1024)        # most bytes of a release file in one fw message

# payload limits
MAX_PAYLOAD = const(448)
MAX_CHANNELS = const(12)
MAX_ITEMS = const(96)         # CBOR items in one payload, containers included
_U32 = 0xFFFFFFFF
_E_MAX = 1 << 48              # Wh registers: 2^48 Wh is far beyond any house
_P_MAX = 10000000             # 10 MW: beyond anything a board measures

# field types
_U = const(0)     # unsigned integer within [lo, hi]
_I = const(1)     # signed integer within [lo, hi]
_T = const(2)     # text, at most hi bytes
_B = const(3)     # byte string, at most hi bytes
_CH = const(4)    # flat array: W, import Wh, export Wh, mA for each channel
_INV = const(5)   # [SunSpec inverter St state, AC W (positive produces), lifetime Wh]
_BAT = const(6)   # [SunSpec 802 ChaSt state, W (positive charges), state of charge in permille]

# (key, name, type, required, lo, hi)
_COMMON = (
    (1, "boot", _U, True, 0, _U32),        # boot counter
    (2, "seq", _U, True, 0, _U32),         # message counter within the boot
    (3, "t", _U, True, 0, _U32),           # Unix time, s (board clock)
    (4, "flags", _U, False, 1, 0xFFFF),    # F_* bits; absent = 0
)
SCHEMAS = {
    READING: _COMMON + (
        (5, "vrms_dv", _U, False, 0, 10000),     # voltage, 0.1 V
        (6, "freq_chz", _U, False, 0, 10000),    # frequency, 0.01 Hz
        (7, "ch", _CH, True, 1, MAX_CHANNELS),  # per channel
        (8, "inv", _INV, False, 0, 0),
        (9, "bat", _BAT, False, 0, 0),
        (10, "meas", _U, False, 0, 1000),        # share of the period measured, permille
        (11, "clip", _U, False, 1, 0x1FFF),      # clipped: bit i channel i, CLIP_VREF the reference
        (12, "ctf", _U, False, 1, 0xFFF),        # CT input faults: bit i channel i
    ),
    STATUS: _COMMON + (
        (5, "fw", _T, True, 0, 24),              # firmware version
        (6, "cfg", _B, True, 0, 16),             # commissioning config digest
        (7, "reset", _U, True, 0, 255),          # reset cause (machine.reset_cause)
        (8, "heap", _U, True, 0, _U32),          # free heap, bytes
        (9, "uptime", _U, True, 0, _U32),        # s
        (10, "buffered", _U, True, 0, _U32),     # readings waiting in flash
        (11, "online", _U, True, 0, 1),          # 0 in the last will
        (12, "board", _T, True, 0, 24),          # board definition name
        (13, "dropped", _U, False, 0, _U32),     # readings lost to a full buffer
        (14, "lost_wh", _U, False, 0, _U32),     # energy at risk after unclean reset, Wh
        (15, "spool_err", _U, False, 0, _U32),   # readings lost to a failed flash write
        (16, "meas", _U, False, 0, 1000),        # share of the time measured since the last status, permille
        (17, "tls", _U, False, 0, 1),            # 1: TLS, the broker's certificate checked; 0: plain text
        (18, "tls_err", _U, False, 0, _U32),     # TLS handshakes refused since boot
        (19, "tls_why", _T, False, 0, 24),       # the last refusal's reason
        (20, "rel", _U, False, 1, _U32),         # sequence number of the release running (absent: none)
        (21, "rel_dig", _B, False, 0, 8),        # first 8 bytes of its digest (SHA-256 of its manifest)
        (22, "ota", _U, False, 0, 5),            # OTA_*: where the last update stands
        (23, "ota_rel", _U, False, 1, _U32),     # the release that update is about
        (24, "ota_why", _T, False, 0, 24),       # why it was refused or rolled back
        (25, "ota_got", _U, False, 0, _U32),     # bytes of it downloaded so far
    ),
    ACK: _COMMON + (
        (5, "ctr", _U, True, 1, _U32),           # counter of the command acknowledged
        (6, "result", _U, True, 0, 255),         # 0 applied, else an E_* code
        (7, "value", _I, False, -_P_MAX, _P_MAX),  # value now in force
        (8, "lease", _U, False, 0, 86400),       # s left on the lease
    ),
    CMD: (
        (1, "ctr", _U, True, 1, _U32),           # strictly increasing per device
        (2, "t", _U, True, 0, _U32),             # issue time, Unix s (gateway clock)
        (3, "lease", _U, True, 1, 86400),        # s the command holds after receipt
        (4, "op", _U, True, 1, 4),               # OP_*
        (5, "target", _U, True, 0, 15),          # relay or battery index
        (6, "value", _I, True, -_P_MAX, _P_MAX),
    ),
    FWGET: _COMMON + (
        (5, "rel", _U, True, 1, _U32),           # release sequence number
        (6, "file", _U, True, 0, 255),           # 0: the signed manifest, i: its i-th file
        (7, "off", _U, True, 0, 1 << 24),        # byte offset in that file
        (8, "len", _U, True, 1, FW_CHUNK),       # bytes asked for
    ),
}
# Which profile algorithm each message kind uses (cose.ALG_*): readings carry
# a 64-bit tag to stay within the byte budget; everything else the full tag.
ALGS = {READING: (4,), STATUS: (5,), ACK: (5,), CMD: (5,), FWGET: (5,)}


def _int_in(v, lo, hi, name):
    if not isinstance(v, int) or v is True or v is False:
        raise ProtocolError(E_SCHEMA, "%s must be an integer" % name)
    if v < lo or v > hi:
        raise ProtocolError(E_RANGE, "%s=%d outside [%d, %d]" % (name, v, lo, hi))
    return v


def _or_null(v, lo, hi, name):
    return None if v is None else _int_in(v, lo, hi, name)


def _check(typ, v, lo, hi, name):
    if typ == _U:
        return _int_in(v, max(lo, 0), hi, name)
    if typ == _I:
        return _int_in(v, lo, hi, name)
    if typ == _T:
        if not isinstance(v, str) or len(v.encode()) > hi:
            raise ProtocolError(E_SCHEMA, "%s must be text of at most %d bytes" % (name, hi))
        return v
    if typ == _B:
        if not isinstance(v, (bytes, bytearray)) or len(v) > hi:
            raise ProtocolError(E_SCHEMA, "%s must be at most %d bytes" % (name, hi))
        return bytes(v)
    if typ == _CH:
        # On the wire one flat array, 4 integers per channel; decoded grouped.
        if not isinstance(v, list) or not v:
            raise ProtocolError(E_SCHEMA, "ch must be a non-empty array")
        if isinstance(v[0], list):
            flat = []
            for c in v:
                if not isinstance(c, list) or len(c) != 4:
                    raise ProtocolError(E_SCHEMA, "a channel is [W, import Wh, export Wh, mA]")
                flat.extend(c)
            v = flat
        if len(v) % 4 or len(v) > 4 * hi:
            raise ProtocolError(E_SCHEMA, "ch must hold 4 integers for each of 1-%d channels" % hi)
        out = []
        for i in range(0, len(v), 4):
            out.append([_int_in(v[i], -_P_MAX, _P_MAX, "ch W"),
                        _int_in(v[i + 1], 0, _E_MAX, "ch import Wh"),
                        _int_in(v[i + 2], 0, _E_MAX, "ch export Wh"),
                        _int_in(v[i + 3], 0, 10000000, "ch mA")])
        return out
    if typ == _INV or typ == _BAT:
        if not isinstance(v, list) or len(v) != 3:
            raise ProtocolError(E_SCHEMA, "%s must be [state, W, %s]"
                                % (name, "Wh" if typ == _INV else "permille"))
        # null: the device does not say (SunSpec "not implemented"), never 0
        third = _or_null(v[2], 0, _E_MAX if typ == _INV else 1000, name)
        return [_or_null(v[0], 0, 0xFFFF, name + " state"),
                _or_null(v[1], -_P_MAX, _P_MAX, name + " W"), third]
    raise ProtocolError(E_SCHEMA, "unknown field type")


def decode(kind, payload):
    """Decode and check a payload of the given kind; return a dict by field name.

    Unknown integer keys are newer optional fields: they are ignored and their
    count is returned as "_ext". Version (key 0) absent means 1."""
    if kind not in SCHEMAS:
        raise ProtocolError(E_SCHEMA, "unknown message kind")
    return check(kind, cbor.loads(payload, max_depth=2, max_items=MAX_ITEMS,
                                  max_container=4 * MAX_CHANNELS, max_size=MAX_PAYLOAD))


def check(kind, m):
    """Check a decoded payload map against the schema of `kind`."""
    schema = SCHEMAS.get(kind)
    if schema is None:
        raise ProtocolError(E_SCHEMA, "unknown message kind")
    if not isinstance(m, dict):
        raise ProtocolError(E_SCHEMA, "payload must be a map")
    v = m.get(0)
    if v is not None:
        if not isinstance(v, int) or v < 1:
            raise ProtocolError(E_SCHEMA, "bad version field")
        if v == VERSION:
            raise ProtocolError(E_NONCANONICAL, "version 1 must be left out")
        raise ProtocolError(E_VERSION, "payload version %d, this side speaks %d" % (v, VERSION))
    out = {}
    for key, name, typ, required, lo, hi in schema:
        if key in m:
            if key == 4 and m[key] == 0 and kind != CMD:
                raise ProtocolError(E_NONCANONICAL, "flags 0 must be left out")
            out[name] = _check(typ, m[key], lo, hi, name)
        elif required:
            raise ProtocolError(E_SCHEMA, "%s missing" % name)
    ext = 0
    for key in m:
        if not isinstance(key, int) or key < 0:
            raise ProtocolError(E_SCHEMA, "map keys must be unsigned integers")
        if key not in _keys(kind):
            ext += 1
    if "flags" not in out and kind != CMD:
        out["flags"] = 0
    if ext:
        out["_ext"] = ext
    return out


_KEYS = {}


def _keys(kind):
    ks = _KEYS.get(kind)
    if ks is None:
        ks = tuple(f[0] for f in SCHEMAS[kind])
        _KEYS[kind] = ks
    return ks


def encode(w, kind, fields):
    """Encode a message given as a dict by field name into Writer `w`.
    Not the hot path: readings on a board use `encode_reading`."""
    schema = SCHEMAS[kind]
    items = []
    for key, name, typ, required, lo, hi in schema:
        v = fields.get(name)
        if v is None or (name == "flags" and v == 0):
            if required:
                raise ProtocolError(E_SCHEMA, "%s missing" % name)
            continue
        items.append((key, _check(typ, v, lo, hi, name)))
    w.map(len(items))
    for key, v in items:      # schema order is ascending key order
        w.int(key)
        if key == 7 and kind == READING:
            w.array(4 * len(v))
            for c in v:
                for x in c:
                    w.int(x)
        else:
            w.value(v)


def _int_or_null(w, v):
    if v is None:
        w.simple(None)          # unknown (the device does not say)
    else:
        w.int(v)


def encode_reading(w, boot, seq, t, flags, vrms_dv, freq_chz, ch, nch, inv, bat, meas=None, clip=0, ctf=0):
    """Encode a reading into Writer `w` without allocating.

    ch: flat sequence of 4*nch integers (W, import Wh, export Wh, mA per channel);
    inv, bat: 3-item sequences or None; vrms_dv, freq_chz, meas: int or None;
    clip, ctf: channel bit masks (0: absent)."""
    n = 4
    if meas is not None:
        n += 1
    if clip:
        n += 1
    if ctf:
        n += 1
    if flags:
        n += 1
    if vrms_dv is not None:
        n += 1
    if freq_chz is not None:
        n += 1
    if inv is not None:
        n += 1
    if bat is not None:
        n += 1
    w.map(n)
    w.head(0, 1)
    w.int(boot)
    w.head(0, 2)
    w.int(seq)
    w.head(0, 3)
    w.int(t)
    if flags:
        w.head(0, 4)
        w.int(flags)
    if vrms_dv is not None:
        w.head(0, 5)
        w.int(vrms_dv)
    if freq_chz is not None:
        w.head(0, 6)
        w.int(freq_chz)
    w.head(0, 7)
    w.array(4 * nch)
    for i in range(4 * nch):
        w.int(ch[i])
    if inv is not None:
        w.head(0, 8)
        w.array(3)
        _int_or_null(w, inv[0])
        _int_or_null(w, inv[1])
        _int_or_null(w, inv[2])
    if bat is not None:
        w.head(0, 9)
        w.array(3)
        _int_or_null(w, bat[0])
        _int_or_null(w, bat[1])
        _int_or_null(w, bat[2])
    if meas is not None:
        w.head(0, 10)
        w.int(meas)
    if clip:
        w.head(0, 11)
        w.int(clip)
    if ctf:
        w.head(0, 12)
        w.int(ctf)

