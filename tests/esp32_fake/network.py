# The fake `network` module: LAN and WLAN record how they were built and
# what was asked of them; nothing ever connects.
STA_IF = 0
AP_IF = 1
PHY_LAN8720 = 1
PHY_IP101 = 2
PHY_RTL8201 = 3
PHY_DP83848 = 4
PHY_KSZ8041 = 5

made = []                   # every interface built, in order


def reset():
    del made[:]


class LAN:
    def __init__(self, id=0, **kw):
        self.id = id
        self.kw = kw
        self.on = False
        made.append(self)

    def active(self, on=None):
        if on is None:
            return self.on
        self.on = bool(on)

    def isconnected(self):
        return False


class WLAN:
    def __init__(self, interface=STA_IF):
        self.interface = interface
        self.on = False
        self.joined = None
        made.append(self)

    def active(self, on=None):
        if on is None:
            return self.on
        self.on = bool(on)

    def connect(self, ssid, password):
        self.joined = (ssid, password)

    def isconnected(self):
        return False
