# The inverter and the battery on the RS485 bus (SunSpec over Modbus RTU:
# firmware/sunspec.py, firmware/modbus.py), read by the board once a
# measurement period. firmware/board.py imports this module only when it
# has an RS485 master (firmware/boot.py builds one only when the config
# names an inverter or a battery), so a board without either never has this
# code, nor sunspec's, in its heap. The devices' state stays on the Board
# (inv, inv_ok, bat, bat_ok, next_discover, stats), where the console and
# the virtual board read it.
from protocol import messages
from firmware import sunspec


def attach(b, master, cfg):
    """The configured devices, found (discovered) by the first poll()."""
    b.next_discover = b.hal.ticks_ms()
    if cfg.get("inverter"):
        b.inv = sunspec.Inverter(master, cfg["inverter"].get("unit", 1))
    if cfg.get("battery"):
        b.bat = sunspec.Battery(master, cfg["battery"].get("unit", 1))


def poll(b, now):
    """Read inverter and battery; rediscover a missing one now and then.
    (inverter, battery, flags): the readings as the wire carries them
    (None for a device not read), F_INV_MISSING / F_BAT_MISSING."""
    hal = b.hal
    inv = None
    bat = None
    flags = 0
    if b.inv is not None:
        if not b.inv_ok and hal.ticks_diff(now, b.next_discover) >= 0:
            b.inv_ok = _try(b.inv.discover)
        if b.inv_ok:
            try:
                inv = b.inv.read()
            except Exception:  # noqa: BLE001 - unplugged, timeout, garbage
                b.stats["inv_errors"] += 1
                inv = None
                if b.master.is_down(b.inv.unit):
                    b.inv_ok = False
        if inv is None:
            flags |= messages.F_INV_MISSING
    if b.bat is not None:
        if not b.bat_ok and hal.ticks_diff(now, b.next_discover) >= 0:
            b.bat_ok = _try(b.bat.discover)
        if b.bat_ok:
            try:
                bat = b.bat.read()
            except Exception:  # noqa: BLE001
                b.stats["bat_errors"] += 1
                bat = None
                if b.master.is_down(b.bat.unit):
                    b.bat_ok = False
        if bat is None:
            flags |= messages.F_BAT_MISSING
    if (b.inv is not None and not b.inv_ok) or (b.bat is not None and not b.bat_ok):
        if hal.ticks_diff(now, b.next_discover) >= 0:
            b.next_discover = hal.ticks_add(now, 6 * b.period_ms)
    else:
        # kept current while every device answers, so one that goes
        # missing after days is looked for at once (a deadline left
        # behind for 2^29 ms would read as far in the future)
        b.next_discover = now
    return _clean3(inv), _clean3(bat), flags


def _try(fn):
    try:
        return bool(fn())
    except Exception:  # noqa: BLE001
        return False


def _clean3(v):
    # an item the device does not say (SunSpec "not implemented") stays
    # None: null on the wire, unknown, never 0
    if v is None:
        return None
    return [None if x is None else int(x) for x in v]
