# Outputs, commands and leases (firmware/outputs.py), the commissioning
# config (firmware/config.py) and persistent counters (firmware/state.py),
# on the simulated hardware.
import json
import os

from firmware import config as fconfig
from boardsim.hal_sim import SimHal
from firmware.outputs import Outputs, Relay, BatteryOut
from firmware.state import Counter
from protocol import messages
from protocol.errors import OK, E_REPLAY, E_EXPIRED, E_TARGET, E_RANGE

_n = [0]


def _root():
    _n[0] += 1
    p = "/tmp/pg-test-out-%d-%d" % (os.getpid() if hasattr(os, "getpid") else 0, _n[0])
    try:
        os.mkdir(p)
    except OSError:
        pass
    for f in ("ctr", "ctr.new"):
        try:
            os.remove(p + "/" + f)
        except OSError:
            pass
    return p


class FakeBattery:
    """Stands in for the SunSpec battery: records setpoints, can refuse."""

    def __init__(self):
        self.calls = []
        self.fail = False

    def set_power(self, w, revert_s=0):
        if self.fail:
            raise OSError("modbus timeout")
        self.calls.append((w, revert_s))


def _outputs(cmd_timeout_s=0, ticks0=0):
    hal = SimHal({"name": "t"}, ticks0=ticks0)
    hal.unix = 1795000000
    hal.synced = True
    root = _root()
    relays = [Relay(hal.pin_out(25), True, 0), Relay(hal.pin_out(26), False, 1)]
    bat = FakeBattery()
    events = []
    o = Outputs(hal, relays, [BatteryOut(bat, 5000)], Counter(root, "ctr"), cmd_timeout_s,
                on_change=lambda k, i, v, why: events.append((k, i, v, why)))
    return hal, o, bat, events, root


def _cmd(ctr, op=1, target=0, value=1, lease=60, t=1795000000):
    return {"ctr": ctr, "t": t, "lease": lease, "op": op, "target": target, "value": value}


def test_relays_start_in_failsafe_and_follow_polarity():
    hal, o, _, _, _ = _outputs()
    assert [r.value for r in o.relays] == [0, 1]
    assert hal.outputs[25] == 0
    assert hal.outputs[26] == 0          # active low: closed relay = pin low


def test_applied_command_and_ack_fields():
    hal, o, _, events, _ = _outputs()
    now = hal.ticks_ms()
    res, value, left = o.handle(_cmd(1, value=1, lease=60), now)
    assert (res, value, left) == (OK, 1, 60)
    assert hal.outputs[25] == 1
    assert events == [("relay", 0, 1, "command 1")]


def test_replayed_and_old_counters_rejected():
    hal, o, _, _, _ = _outputs()
    now = hal.ticks_ms()
    assert o.handle(_cmd(5), now)[0] == OK
    assert o.handle(_cmd(5, value=0), now)[0] == E_REPLAY
    assert o.handle(_cmd(3, value=0), now)[0] == E_REPLAY
    assert o.relays[0].value == 1


def test_counter_survives_reboot():
    hal, o, _, _, root = _outputs()
    assert o.handle(_cmd(9), hal.ticks_ms())[0] == OK
    c = Counter(root, "ctr")
    assert c.value == 9
    o2 = Outputs(hal, [Relay(hal.pin_out(25), True, 0)], [], c)
    assert o2.handle(_cmd(9), hal.ticks_ms())[0] == E_REPLAY
    assert o2.relays[0].value == 0


def test_expired_command_consumes_counter_changes_nothing():
    hal, o, _, _, _ = _outputs()
    now = hal.ticks_ms()
    res, value, _ = o.handle(_cmd(1, t=1795000000 - 120, lease=60), now)
    assert res == E_EXPIRED and value == 0 and o.relays[0].value == 0
    assert o.handle(_cmd(1, t=1795000000), now)[0] == E_REPLAY


def test_unsynced_board_cannot_judge_expiry():
    hal, o, _, _, _ = _outputs()
    hal.synced = False
    assert o.handle(_cmd(1, t=10, lease=60), hal.ticks_ms())[0] == OK


def test_target_and_range():
    hal, o, bat, _, _ = _outputs()
    now = hal.ticks_ms()
    assert o.handle(_cmd(1, target=2), now)[0] == E_TARGET
    assert o.handle(_cmd(2, value=2), now)[0] == E_RANGE
    assert o.handle(_cmd(3, op=messages.OP_BATTERY, target=1, value=100), now)[0] == E_TARGET
    assert o.handle(_cmd(4, op=messages.OP_BATTERY, value=6000), now)[0] == E_RANGE
    assert bat.calls == []
    assert [r.value for r in o.relays] == [0, 1]


def test_battery_setpoint_with_revert_timer_and_failure():
    hal, o, bat, _, _ = _outputs()
    now = hal.ticks_ms()
    assert o.handle(_cmd(1, op=messages.OP_BATTERY, value=-2500, lease=90), now) == (OK, -2500, 90)
    assert bat.calls == [(-2500, 90)]
    bat.fail = True
    res, value, _ = o.handle(_cmd(2, op=messages.OP_BATTERY, value=1000), now)
    assert res == E_TARGET and value == -2500


def test_lease_expiry_returns_failsafe():
    hal, o, bat, events, _ = _outputs()
    now = hal.ticks_ms()
    o.handle(_cmd(1, target=0, value=1, lease=30), now)
    o.handle(_cmd(2, target=1, value=0, lease=60), now)
    o.handle(_cmd(3, op=messages.OP_BATTERY, value=2000, lease=45), now)
    hal.advance(29999)
    o.tick(hal.ticks_ms())
    assert [r.value for r in o.relays] == [1, 0]
    hal.advance(1)
    o.tick(hal.ticks_ms())
    assert [r.value for r in o.relays] == [0, 0]
    hal.advance(15000)
    o.tick(hal.ticks_ms())
    assert bat.calls[-1] == (0, 0) and o.batteries[0].value == 0
    hal.advance(15000)
    o.tick(hal.ticks_ms())
    assert [r.value for r in o.relays] == [0, 1]
    assert o.stats["failsafe"] == 3
    assert events[-1] == ("relay", 1, 1, "lease ended")


def test_lease_refresh_extends():
    hal, o, _, _, _ = _outputs()
    o.handle(_cmd(1, lease=30), hal.ticks_ms())
    hal.advance(20000)
    o.handle(_cmd(2, lease=30), hal.ticks_ms())
    hal.advance(20000)
    o.tick(hal.ticks_ms())
    assert o.relays[0].value == 1
    hal.advance(10000)
    o.tick(hal.ticks_ms())
    assert o.relays[0].value == 0


def test_gateway_silence_timeout():
    hal, o, _, events, _ = _outputs(cmd_timeout_s=120)
    o.handle(_cmd(1, lease=86400), hal.ticks_ms())
    hal.advance(119000)
    o.tick(hal.ticks_ms())
    assert o.relays[0].value == 1
    hal.advance(1000)
    o.tick(hal.ticks_ms())
    assert o.relays[0].value == 0 and events[-1][3] == "gateway quiet"


# -- leases and gateway silence across the tick wrap ---------------------------
# A board's ticks_ms wraps at 2^30 ms (12.4 days) and ticks_diff changes sign
# against old values past 2^29 ms: a lease must last its length wherever the
# clock stands.

_WRAP = 1 << 30
_HALF = 1 << 29


def _lease_lasts(start, lease_s):
    """Apply a relay lease with the clock at `start`; return the board ms
    after which it ended (stepping 100 ms), and the lease left reported
    half-way."""
    hal, o, _, events, _ = _outputs(ticks0=start)
    t0 = hal.ticks_ms()
    assert t0 == start
    assert o.handle(_cmd(1, value=1, lease=lease_s), t0) == (OK, 1, lease_s)
    left_half = None
    for step in range(1, (lease_s + 10) * 10 + 1):
        hal.advance(100)
        now = hal.ticks_ms()
        if step == lease_s * 5:
            # a replayed command is answered with the lease left
            left_half = o.handle(_cmd(1, value=0), now)[2]
        o.tick(now)
        if o.relays[0].value == 0:
            assert events[-1] == ("relay", 0, 0, "lease ended")
            return step * 100, left_half
    return None, left_half


def test_lease_started_before_the_wrap_lasts_its_length():
    # 300 s started 100 s before 2^30: ends at 300 s, not at once, not never
    for start in (_WRAP - 100000, _HALF - 100000, _WRAP - 1, _HALF - 1):
        ended, left = _lease_lasts(start, 300)
        assert ended == 300000, (start, ended)
        assert left == 150, (start, left)


def test_gateway_silence_across_the_wrap():
    for start in (_WRAP - 60000, _HALF - 60000):
        hal, o, _, events, _ = _outputs(cmd_timeout_s=120, ticks0=start)
        o.handle(_cmd(1, lease=86400), hal.ticks_ms())
        hal.advance(119900)
        o.tick(hal.ticks_ms())
        assert o.relays[0].value == 1, start
        hal.advance(100)
        o.tick(hal.ticks_ms())
        assert o.relays[0].value == 0 and events[-1][3] == "gateway quiet", start


def test_gateway_silence_lasts_longer_than_half_a_tick_period():
    # quiet for 8 days (past 2^29 and 2^30 ms): still quiet, so an output
    # moved without a command (the commissioning console) goes back
    hal, o, _, events, _ = _outputs(cmd_timeout_s=120, ticks0=_HALF - 3600000)
    o.handle(_cmd(1, lease=600), hal.ticks_ms())
    for _ in range(8 * 24):
        hal.advance(3600000)
        o.tick(hal.ticks_ms())
    assert o.quiet and o.relays[0].value == 0
    o.relays[0].set(1)
    o.tick(hal.ticks_ms())
    assert o.relays[0].value == 0 and events[-1][3] == "gateway quiet"
    # a valid command ends the silence
    assert o.handle(_cmd(2, lease=60, t=hal.time()[0]), hal.ticks_ms())[0] == OK
    o.tick(hal.ticks_ms())
    assert not o.quiet and o.relays[0].value == 1


def test_counter_file_damaged_or_missing():
    root = _root()
    c = Counter(root, "ctr")
    assert c.value == 0 and not c.damaged
    with open(root + "/ctr", "w") as f:
        f.write("zz")
    c = Counter(root, "ctr")
    assert c.value == 0 and c.damaged
    c.set(41)
    assert Counter(root, "ctr").bump() == 42


_CFG = {"community": "oak", "device": "d3f9a2", "secret": "00" * 32,
        "broker": {"host": "127.0.0.1", "user": "u", "password": "p"}}


def _raises(text, word):
    try:
        fconfig.parse(text)
    except fconfig.ConfigError as e:
        assert word in str(e), str(e)
        return
    raise AssertionError("accepted a bad config")


def test_config_defaults_digest_and_hidden_secrets():
    text = json.dumps(_CFG)
    cfg, digest = fconfig.parse(text)
    assert cfg["period_s"] == 10 and cfg["broker"]["port"] == 1883 and len(digest) == 8
    assert fconfig.secret(cfg) == bytes(32)
    pub = json.dumps(fconfig.public(cfg))
    assert "00" * 32 not in pub and '"p"' not in pub
    cfg2, digest2 = fconfig.parse(text.replace("d3f9a2", "d3f9a3"))
    assert digest2 != digest


def test_config_errors_are_clear():
    _raises("{", "JSON")
    _raises("[]", "object")
    bad = dict(_CFG)
    del bad["secret"]
    _raises(json.dumps(bad), "secret")
    bad = dict(_CFG, secret="00" * 31)
    _raises(json.dumps(bad), "32 bytes")
    bad = dict(_CFG, device="Bad_Id")
    _raises(json.dumps(bad), "a-z")
    bad = dict(_CFG, period_s=0)
    _raises(json.dumps(bad), "period_s")
    bad = dict(_CFG, relays=[{"failsafe": 2}])
    _raises(json.dumps(bad), "failsafe")
    try:
        fconfig.load("/tmp/pg-no-such-config.json")
    except fconfig.ConfigError as e:
        assert "commission" in str(e)
    else:
        raise AssertionError("missing file accepted")
