# PeerGrid wire contract: error codes shared by the boards and the gateway.
# The numbers are part of the protocol (PROTOCOL.md, section "Error codes"):
# they appear in acknowledgements, in the gateway's rejection counters and in
# the golden vectors. Never renumber; only append.
try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

OK = const(0)
# framing and CBOR (1-19)
E_TOO_BIG = const(1)        # frame or payload longer than the limit (a long topic is E_TOPIC)
E_TRUNCATED = const(2)      # input ends inside an item
E_TRAILING = const(3)       # bytes left after the top-level item
E_DEPTH = const(4)          # nesting deeper than allowed
E_INDEFINITE = const(5)     # indefinite-length item
E_DUPKEY = const(6)         # the same map key twice
E_NONCANONICAL = const(7)   # not the deterministic encoding (length, order)
E_TYPE = const(8)           # a CBOR type the protocol does not use
E_COUNT = const(9)          # too many items in a container or frame
E_UTF8 = const(10)          # text string that is not UTF-8
# envelope (20-39)
E_NOT_COSE = const(20)      # not a tagged COSE_Mac0 array of four items
E_HEADER = const(21)        # malformed or forbidden header parameters
E_ALG = const(22)           # algorithm unknown, unsupported or not allowed here
E_KID = const(23)           # kid missing, malformed or not the topic's device
E_TAG = const(24)           # MAC tag does not verify (forged, wrong key or topic)
E_UNKNOWN_DEVICE = const(25)  # no key for this device
# message (40-59)
E_TOPIC = const(40)         # topic not in the topic tree
E_SCHEMA = const(41)        # payload does not match the message schema
E_VERSION = const(42)       # protocol major version this side does not speak
E_REPLAY = const(43)        # (boot, seq) or command counter seen before / too old
E_EXPIRED = const(44)       # command lease already over or issued too long ago
E_RANGE = const(45)         # value outside what the device allows
E_TARGET = const(46)        # command addresses an output the board does not have
E_CLOCK = const(47)         # timestamp implausible for the receiver's clock
E_PLAUSIBILITY = const(48)  # physically implausible reading


class ProtocolError(ValueError):
    """A frame or message was rejected; `code` is one of the E_* numbers."""

    def __init__(self, code, detail=""):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def name(self):
        from protocol.errnames import NAMES    # only when an error is put into words
        return NAMES.get(self.code, "e%d" % self.code)

    def __str__(self):
        if self.detail:
            return "%s (%d): %s" % (self.name(), self.code, self.detail)
        return "%s (%d)" % (self.name(), self.code)
