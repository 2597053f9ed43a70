# A serial port of the host (a tty or pseudo-terminal) with the interface the
# board's code expects of machine.UART: write(), readinto() that never blocks
# (None when nothing is waiting), any(). The virtual board reaches its RS485
# devices through one of these.
#
# On the MicroPython unix port there is no termios and no non-blocking file
# mode, but select.poll works on file objects: a byte is read only when poll
# says one is waiting, one at a time (a blocking read of more would wait for
# all of them). The far end puts the line in raw mode, so no byte is changed.
# At RS485 speeds (9600 baud is ~1 byte per ms) that is plenty fast.
import select


class PosixUart:
    def __init__(self, path, baud=9600):
        self.path = path
        self.baud = baud
        try:
            self.f = open(path, "r+b", buffering=0)   # CPython: no read-ahead
        except TypeError:
            self.f = open(path, "r+b")                # MicroPython: unbuffered anyway
        self.poll = select.poll()
        self.poll.register(self.f, select.POLLIN)
        self._one = bytearray(1)

    def _waiting(self):
        for _, ev in self.poll.poll(0):
            if ev & select.POLLIN:
                return True
        return False

    def any(self):
        return 1 if self._waiting() else 0

    def readinto(self, buf):
        n = 0
        one = self._one
        while n < len(buf) and self._waiting():
            if not self.f.readinto(one):
                break
            buf[n] = one[0]
            n += 1
        return n if n else None

    def write(self, data):
        n = self.f.write(data)
        try:
            self.f.flush()
        except (AttributeError, OSError):
            pass
        return n

    def close(self):
        try:
            self.poll.unregister(self.f)
        except (OSError, ValueError):
            pass
        self.f.close()
