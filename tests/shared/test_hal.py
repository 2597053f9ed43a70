# The simulated hardware layer: pins, serial line, flash, clock.
from firmware.hal import open_hal
from firmware.hal_sim import SimHal, FlashDied
from util import ROOT, load_json


def _hal():
    return open_hal(load_json(ROOT + "/boards/sim/board.json"), root="/tmp/pg-test-hal")


def test_open_hal_picks_the_sim_backend():
    assert isinstance(_hal(), SimHal)


def test_relay_pins_are_visible():
    hal = _hal()
    p = hal.pin_out(25, 0)
    p.value(1)
    assert hal.outputs[25] == 1 and p.value() == 1


def test_serial_line_both_ways_and_unplugged():
    hal = _hal()
    u = hal.uart({"uart": 1, "tx": 17, "rx": 16, "baud": 9600})
    far = hal.uart_far[1]
    u.write(b"\x01\x03\x00\x00")
    buf = bytearray(8)
    assert far.readinto(buf) == 4 and bytes(buf[:4]) == b"\x01\x03\x00\x00"
    far.write(b"ok")
    assert u.any() == 2
    far.connected = False
    far.write(b"lost")
    assert u.readinto(buf) == 2 and u.readinto(buf) is None


def test_flash_survives_reopen_and_tears():
    import os
    try:
        os.remove("/tmp/pg-test-hal/halt.bin")
    except OSError:
        pass
    hal = _hal()
    f = hal.flash("halt", 64)
    f.write(0, b"abcd")
    f.die_after = 2
    try:
        f.write(8, b"wxyz")
    except FlashDied:
        pass
    else:
        raise AssertionError("flash did not die")
    again = SimHal({"mcu": "sim"}, root="/tmp/pg-test-hal").flash("halt", 64)
    assert again.read(0, 4) == b"abcd" and again.read(8, 4) == b"wx\xff\xff"


def test_clock_is_controlled_and_unsynced():
    hal = _hal()
    t0 = hal.ticks_ms()
    hal.advance(1500)
    assert hal.ticks_diff(hal.ticks_ms(), t0) == 1500
    unix, synced = hal.time()
    assert not synced and unix < 1000000000
