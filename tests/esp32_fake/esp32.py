# The fake `esp32` module: data partitions in RAM with NOR-flash rules
# (programming only clears bits, an erase sets a 4 KB block back to 0xFF),
# reached through the block-device protocol firmware/hal_esp32.py uses.
parts = {}
BLOCK = 4096


def reset(sizes=None):
    """sizes: label -> bytes of each data partition."""
    parts.clear()
    for label, size in (sizes or {"energy": 16 * 4096, "spool": 1536 * 1024}).items():
        parts[label] = Partition(label, size)


class Partition:
    TYPE_APP = 0
    TYPE_DATA = 1

    def __init__(self, label, size):
        self.label = label
        self.data = bytearray(b"\xff" * size)
        self.erases = 0

    @staticmethod
    def find(type=1, subtype=255, label=None):
        if type != Partition.TYPE_DATA:
            return []
        p = parts.get(label)
        return [p] if p is not None else []

    def ioctl(self, op, arg):
        if op == 4:                     # block count
            return len(self.data) // BLOCK
        if op == 5:                     # block size
            return BLOCK
        if op == 6:                     # erase one block
            self.data[arg * BLOCK:(arg + 1) * BLOCK] = b"\xff" * BLOCK
            self.erases += 1
            return 0
        return None

    def readblocks(self, block, buf, off=0):
        a = block * BLOCK + off
        buf[:] = self.data[a:a + len(buf)]

    def writeblocks(self, block, buf, off=0):
        a = block * BLOCK + off
        if a + len(buf) > len(self.data):
            raise OSError(22)
        d = self.data
        for i in range(len(buf)):
            d[a + i] &= buf[i]
