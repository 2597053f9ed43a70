# Network interfaces of a board, chosen by the board definition's
# network.type: "wifi" (station), "ethernet" (RMII PHY, e.g. LAN8720) or
# "host" (the unix port: the host's network is already up). Each one is
# started without waiting; `up()` says whether it has an address. Time comes
# from NTP once the interface is up; until then the board's clock is a guess
# and every message carries F_CLOCK_UNSYNCED.


class Net:
    ntp = None      # the NTP server (config "ntp", the router); None: ntptime's default

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
        return _ntp(hal, self.ntp)


class LanNet(Net):
    """Ethernet through the ESP32's RMII MAC and an external PHY. The keys of
    board.json's network entry become network.LAN's keywords (boot.lan_args,
    at the start): mdc, mdio
    (GPIOs), phy ("LAN8720" -> network.PHY_LAN8720), phy_addr, power (the
    PHY's enable GPIO) and the 50 MHz reference clock, either as ref_clk (a
    GPIO) with ref_clk_mode ("out": the ESP32 drives the clock, "in": the
    PHY does) or as clock "gpio<N>_out" / "gpio<N>_in". Without a clock entry
    the firmware image's default applies (GPIO0 in)."""

    def __init__(self, lan):
        self.lan = lan              # network.LAN, built by firmware/boot.py's open_net

    def start(self):
        self.lan.active(True)

    def up(self):
        return self.lan.isconnected()

    def sync_time(self, hal):
        return _ntp(hal, self.ntp)


def _ntp(hal, host=None):
    try:
        import ntptime
        ntptime.timeout = 2
        if host:
            ntptime.host = host
        ntptime.settime()
    except Exception:   # noqa: BLE001 - no answer: stay unsynced, try later
        return False
    unix, _ = hal.time()
    hal.set_time(unix)
    return True
