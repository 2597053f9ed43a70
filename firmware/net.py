# Network interfaces of a board, chosen by the board definition's
# network.type: "wifi" (station), "ethernet" (RMII PHY, e.g. LAN8720) or
# "host" (the unix port: the host's network is already up). Each one is
# started without waiting; `up()` says whether it has an address. Time comes
# from NTP once the interface is up; until then the board's clock is a guess
# and every message carries F_CLOCK_UNSYNCED.


class Net:
    def start(self):
        pass

    def up(self):
        return True

    def sync_time(self, hal):
        """Set the board clock; True when it is now synced."""
        return False

    def resolve(self, host, port):
        import socket
        return socket.getaddrinfo(host, port)[0][-1]


class HostNet(Net):
    """The unix port: the host is online; "NTP" is the simulation's own
    clock (the virtual board's start time), given by the caller."""

    def __init__(self, unix_now=None):
        self.unix_now = unix_now

    def sync_time(self, hal):
        if self.unix_now is None:
            return False
        hal.set_time(self.unix_now())
        return True


class WifiNet(Net):  # pragma: no cover - needs an ESP32
    def __init__(self, ssid, password):
        import network
        self.wlan = network.WLAN(network.STA_IF)
        self.ssid = ssid
        self.password = password

    def start(self):
        self.wlan.active(True)
        if not self.wlan.isconnected():
            self.wlan.connect(self.ssid, self.password)

    def up(self):
        return self.wlan.isconnected()

    def sync_time(self, hal):
        return _ntp(hal)


class LanNet(Net):  # pragma: no cover - needs an ESP32
    def __init__(self, netdef):
        import machine
        import network
        phy = getattr(network, "PHY_" + netdef.get("phy", "LAN8720"))
        kw = {"mdc": machine.Pin(netdef["mdc"]), "mdio": machine.Pin(netdef["mdio"]),
              "phy_type": phy, "phy_addr": netdef.get("phy_addr", 0)}
        if "power" in netdef:
            kw["power"] = machine.Pin(netdef["power"])
        self.lan = network.LAN(**kw)

    def start(self):
        self.lan.active(True)

    def up(self):
        return self.lan.isconnected()

    def sync_time(self, hal):
        return _ntp(hal)


def _ntp(hal):  # pragma: no cover - needs an ESP32
    try:
        import ntptime
        ntptime.timeout = 2
        ntptime.settime()
    except Exception:   # noqa: BLE001 - no answer: stay unsynced, try later
        return False
    unix, _ = hal.time()
    hal.set_time(unix)
    return True


def open_net(board, cfg, unix_now=None):
    kind = board.get("network", {}).get("type", "host")
    if kind == "wifi":
        n = cfg.get("net", {})
        return WifiNet(n.get("ssid", ""), n.get("password", ""))
    if kind == "ethernet":
        return LanNet(board["network"])
    return HostNet(unix_now)
