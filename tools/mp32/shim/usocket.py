# The board's socket on the 32-bit test runtime, which has none: the bytes go
# to the loopback broker of tools/mp32/broker.mjs (the JS module `loop`) and
# its answers come back. The broker answers synchronously, so whatever is
# not there when the board reads will not come during this read: a blocking
# read then times out as a real socket would, a non-blocking one returns None.
import binascii

import loop


class socket:
    def __init__(self, *args):
        self.fd = -1
        self.t = None

    def settimeout(self, t):
        self.t = t

    def setblocking(self, flag):
        self.t = None if flag else 0

    def connect(self, addr):
        fd = loop.connect()
        if fd < 0:
            raise OSError(111)      # ECONNREFUSED
        self.fd = fd

    def write(self, buf, n=None):
        if n is None:
            n = len(buf)
        if loop.send(self.fd, binascii.hexlify(memoryview(buf)[:n]).decode()) < 0:
            raise OSError(32)       # EPIPE: the broker cut the connection
        return n

    def read(self, n):
        h = loop.recv(self.fd, n)
        if h is None:
            if self.t == 0:
                return None
            raise OSError(110)      # ETIMEDOUT
        return binascii.unhexlify(h)

    def close(self):
        loop.close(self.fd)


def getaddrinfo(host, port, *args):
    return [(2, 1, 0, "", (host, port))]
