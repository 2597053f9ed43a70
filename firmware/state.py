# Small values a board keeps across reboots (boot counter, last accepted
# command counter) as files in the board's filesystem. A value is written to
# a temporary file and renamed over the old one, so a power cut leaves either
# the old or the new value, never half of one. Reads tolerate a missing or
# damaged file (value 0 and `damaged` set): a board must always boot.
import os


class Counter:
    def __init__(self, root, name):
        self.path = root + "/" + name
        self.damaged = False
        self.value = self._read()

    def _read(self):
        try:
            with open(self.path) as f:
                text = f.read()
        except OSError:
            return 0
        try:
            v = int(text.strip())
        except ValueError:
            self.damaged = True
            return 0
        if v < 0:
            self.damaged = True
            return 0
        return v

    def set(self, v):
        tmp = self.path + ".new"
        with open(tmp, "w") as f:
            f.write("%d\n" % v)
        os.rename(tmp, self.path)
        self.value = v

    def bump(self):
        self.set(self.value + 1)
        return self.value
