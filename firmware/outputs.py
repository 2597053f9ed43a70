# The board's controllable outputs (relays, battery setpoints) and the rules
# for commands addressed to them (PROTOCOL.md 6.6 and 7.5):
#
#   * a command is applied only after its envelope verified (the caller did
#     that with DeviceLink.open_command) and its counter is above the last
#     accepted one; the new counter is stored before the output moves, so a
#     reboot cannot reopen the door to a replay;
#   * with a synced clock, a command whose issue time plus lease is already
#     past is E_EXPIRED; an unsynced board cannot judge that and relies on
#     the counter;
#   * an applied command holds for `lease` seconds of the board's monotonic
#     clock; when the lease runs out, or no valid command arrived for
#     `cmd_timeout_s`, the output returns to its fail-safe state from the
#     commissioning config;
#   * every command that got past the envelope is answered with an ack:
#     result 0 or the error code, the value now in force, the lease left.
from protocol import messages
from protocol.errors import OK, E_REPLAY, E_EXPIRED, E_TARGET, E_RANGE


class Relay:
    def __init__(self, pin, active_high, failsafe, name=""):
        self.pin = pin
        self.active_high = active_high
        self.failsafe = failsafe
        self.name = name
        self.value = -1
        self.until = None           # board ms when the lease ends
        self.set(failsafe)

    def set(self, v):
        if v != self.value:
            self.value = v
            self.pin.value(v if self.active_high else 1 - v)
            return True
        return False


class BatteryOut:
    """A battery behind the board's Modbus link. `dev` has set_power(w,
    revert_s) and may raise; the device's own revert timer is set to the
    lease so it falls back even if the board dies."""

    def __init__(self, dev, max_w, failsafe_w=0):
        self.dev = dev
        self.max_w = max_w
        self.failsafe = failsafe_w
        self.value = failsafe_w
        self.until = None

    def set(self, w, revert_s=0):
        self.dev.set_power(w, revert_s)
        changed = w != self.value
        self.value = w
        return changed


class Outputs:
    def __init__(self, hal, relays, batteries, ctr_store, cmd_timeout_s=0, on_change=None):
        self.hal = hal
        self.relays = relays
        self.batteries = batteries
        self.ctr = ctr_store            # state.Counter: last accepted command counter
        self.cmd_timeout_ms = cmd_timeout_s * 1000
        self.on_change = on_change
        self.last_valid = hal.ticks_ms()
        self.quiet = False              # no valid command for cmd_timeout_s
        self.stats = {"applied": 0, "rejected": 0, "failsafe": 0}
        self.on_fw = None               # (cmd, now) -> ack fields: OP_UPDATE, OP_CONFIRM

    def _changed(self, kind, i, v, why):
        if self.on_change is not None:
            self.on_change(kind, i, v, why)

    def _left_s(self, out, now):
        if out.until is None:
            return 0
        left = self.hal.ticks_diff(out.until, now)
        return (left + 999) // 1000 if left > 0 else 0

    def handle(self, cmd, now):
        """Apply a verified command (dict from messages.decode). Returns the
        ack fields: (result, value in force or None, lease left s)."""
        op = cmd["op"]
        target = cmd["target"]
        value = cmd["value"]
        out = None
        if op == messages.OP_RELAY and target < len(self.relays):
            out = self.relays[target]
        elif op == messages.OP_BATTERY and target < len(self.batteries):
            out = self.batteries[target]
        cur = None if out is None else out.value
        left = 0 if out is None else self._left_s(out, now)
        if cmd["ctr"] <= self.ctr.value:
            self.stats["rejected"] += 1
            return E_REPLAY, cur, left
        unix, synced = self.hal.time()
        if synced and cmd["t"] + cmd["lease"] < unix:
            # still consume the counter: the same frame must not work later
            self.ctr.set(cmd["ctr"])
            self.stats["rejected"] += 1
            return E_EXPIRED, cur, left
        self.ctr.set(cmd["ctr"])
        if op >= messages.OP_UPDATE and self.on_fw is not None:
            return self.on_fw(cmd, now)
        if out is None:
            self.stats["rejected"] += 1
            return E_TARGET, None, 0
        lease_ms = cmd["lease"] * 1000
        if op == messages.OP_RELAY:
            if value not in (0, 1):
                self.stats["rejected"] += 1
                return E_RANGE, cur, left
            if out.set(value):
                self._changed("relay", target, value, "command %d" % cmd["ctr"])
        else:
            if value > out.max_w or value < -out.max_w:
                self.stats["rejected"] += 1
                return E_RANGE, cur, left
            try:
                if out.set(value, cmd["lease"]):
                    self._changed("battery", target, value, "command %d" % cmd["ctr"])
            except Exception:   # noqa: BLE001 - the battery did not take it
                self.stats["rejected"] += 1
                return E_TARGET, cur, left
        out.until = self.hal.ticks_add(now, lease_ms)     # lease <= 86400 s (schema)
        self.last_valid = now
        self.quiet = False
        self.stats["applied"] += 1
        return OK, out.value, cmd["lease"]

    def tick(self, now):
        """Expire leases; the gateway's silence also returns everything to
        fail-safe. Call every loop."""
        # latched: once the gateway has been quiet for cmd_timeout_s it stays
        # quiet until the next valid command, however long that takes (the
        # tick difference to last_valid would turn negative after 2^29 ms)
        if self.cmd_timeout_ms and not self.quiet \
                and self.hal.ticks_diff(now, self.last_valid) >= self.cmd_timeout_ms:
            self.quiet = True
        quiet = self.quiet
        for i in range(len(self.relays)):
            self._expire("relay", i, self.relays[i], now, quiet)
        for i in range(len(self.batteries)):
            self._expire("battery", i, self.batteries[i], now, quiet)

    def _expire(self, kind, i, out, now, quiet):
        due = out.until is not None and self.hal.ticks_diff(now, out.until) >= 0
        if not (due or (quiet and out.value != out.failsafe)):
            return
        out.until = None
        if out.value == out.failsafe:
            return
        try:
            out.set(out.failsafe)
        except Exception:   # noqa: BLE001 - retried at the next tick
            out.until = now
            return
        self.stats["failsafe"] += 1
        self._changed(kind, i, out.value, "lease ended" if due else "gateway quiet")

