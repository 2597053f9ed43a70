# Replay and duplicate detection for uplink messages (PROTOCOL.md, "Replay").
#
# A board numbers its uplink messages with (boot, seq): boot counts reboots and
# is kept in flash, seq counts messages within a boot. Readings buffered in
# flash are replayed after live ones, so arrival order is not seq order; the
# receiver accepts each (boot, seq) once and refuses anything too old to be
# tracked. Per device: the newest BOOTS boots, each with a high-water mark and
# a bitmap over the last WINDOW sequence numbers.
from protocol.errors import ProtocolError, E_REPLAY

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):
        return x

WINDOW = const(32768)   # > 3 days of readings at one per 10 s
BOOTS = const(4)


class ReplayWindow:
    def __init__(self, window=WINDOW, boots=BOOTS):
        self.window = window
        self.boots = boots
        self._b = {}   # boot -> [hwm, bitmap]

    def check(self, boot, seq):
        """Raise E_REPLAY if (boot, seq) was seen or is too old; do not record."""
        st = self._b.get(boot)
        if st is None:
            if len(self._b) >= self.boots and boot < min(self._b):
                raise ProtocolError(E_REPLAY, "boot %d older than any tracked" % boot)
            return
        hwm = st[0]
        if seq > hwm:
            return
        if seq <= hwm - self.window:
            raise ProtocolError(E_REPLAY, "seq %d too old (newest %d)" % (seq, hwm))
        i = seq % self.window
        if st[1][i >> 3] & (1 << (i & 7)):
            raise ProtocolError(E_REPLAY, "(%d, %d) seen before" % (boot, seq))

    def accept(self, boot, seq):
        """Check, then record (boot, seq) as seen."""
        self.check(boot, seq)
        st = self._b.get(boot)
        if st is None:
            st = [-1, bytearray(self.window >> 3)]
            self._b[boot] = st
            if len(self._b) > self.boots:
                del self._b[min(self._b)]
        w = self.window
        bm = st[1]
        hwm = st[0]
        if seq > hwm:
            if seq - hwm >= w:
                for j in range(len(bm)):
                    bm[j] = 0
            else:
                s = hwm + 1
                while s < seq:
                    i = s % w
                    bm[i >> 3] &= ~(1 << (i & 7)) & 0xFF
                    s += 1
            st[0] = seq
        i = seq % w
        bm[i >> 3] |= 1 << (i & 7)

    def seen(self):
        """[(boot, high-water seq)] for persistence and status pages."""
        return sorted((b, st[0]) for b, st in self._b.items())


class CounterGuard:
    """Command counters on a board: strictly increasing, kept across reboots
    by the caller (it stores `last`)."""

    def __init__(self, last=0):
        self.last = last

    def accept(self, ctr):
        if ctr <= self.last:
            raise ProtocolError(E_REPLAY, "command counter %d not above %d" % (ctr, self.last))
        self.last = ctr
