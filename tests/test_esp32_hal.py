"""The ESP32 backend (firmware/hal_esp32.py), the network set-up
(firmware/net.py) and the front-end factory (firmware/frontend.py) against
fake `machine`, `esp32`, `network` and `time` modules (tests/esp32_fake):
what a real board build of MicroPython would be asked to do, on a PC."""
from __future__ import annotations

import calendar
import json
import math
import random
import socket
import sys
import types

import pytest

from esp32_fake import clock, esp32 as fesp32, machine as fmachine, network as fnetwork
from harness import ROOT, run_micropython

from firmware import hal_esp32
from firmware.adc_esp32 import AdcEsp32Hal
from firmware.atm90e32 import REG_IGAIN_A, REG_MMODE0, REG_CFG_REG_ACC_EN, CFG_LOCK
from boardsim.atm90e32_sim import SimATM90E32
from firmware.energy import Registers
from firmware.atm90e32 import AtmFrontEnd
from firmware.frontend import open_frontend
from firmware.metering import AdcFrontEnd
from firmware.boot import lan_args, open_net
from firmware.net import LanNet, WifiNet, _ntp

WRAP = 1 << 30          # ticks_us period on the ESP32 port


def board_def(name):
    with open(ROOT / "boards" / name / "board.json") as f:
        return json.load(f)


@pytest.fixture
def esp(monkeypatch):
    """The fake port: hal_esp32 and anything importing machine/esp32/network
    sees the fakes; hal_esp32's `time` is the fake clock."""
    fmachine.reset()
    fesp32.reset()
    fnetwork.reset()
    clock.reset()
    monkeypatch.setitem(sys.modules, "machine", fmachine)
    monkeypatch.setitem(sys.modules, "esp32", fesp32)
    monkeypatch.setitem(sys.modules, "network", fnetwork)
    monkeypatch.setattr(hal_esp32, "machine", fmachine)
    monkeypatch.setattr(hal_esp32, "time", clock)
    return types.SimpleNamespace(machine=fmachine, esp32=fesp32, network=fnetwork, clock=clock)


def mains(board, freq_hz):
    """50 Hz-ish signals on the board's ADC pins: the voltage reference and
    one current per CT, each with its own phase."""
    w = 2 * math.pi * freq_hz * 1e-6
    fmachine.signals[board["vref"]["pin"]] = lambda t: 1.3 + 0.9 * math.sin(w * t)
    for i, c in enumerate(board["channels"]):
        fmachine.signals[c["pin"]] = (lambda ph: lambda t: 1.3 + 0.4 * math.sin(w * t - ph))(0.4 + 0.3 * i)


def vref_adc(board):
    return [a for a in fmachine.adcs if a.pin == board["vref"]["pin"]][0]


# -- ADC sampling ----------------------------------------------------------

@pytest.mark.parametrize("name,seed", [("devkitc-3ct", 1), ("olimex-esp32-poe-iso", 2), ("devkitc-3ct", 3)])
def test_adc_block_returns_the_frame_period_exactly(esp, name, seed):
    # every read takes 11-13 us at random, now and then an interrupt steals
    # 5-15 us, a ticks_us() call costs 3 us, and the block crosses the wrap
    # of ticks_us: the period returned is the real mean frame period
    board = board_def(name)
    rng = random.Random(seed)
    clock.reset(start_us=WRAP - rng.randrange(1000, 40000), cost_us=3)

    def read_us():
        d = rng.uniform(11.0, 13.0)
        return d + rng.uniform(5, 15) if rng.random() < 0.002 else d

    fmachine.read_us = read_us
    mains(board, 50.0)
    hal = AdcEsp32Hal(board, wdt_ms=0)
    fe = open_frontend(hal, board, frames=1000)
    assert isinstance(fe, AdcFrontEnd)
    meter = fe.meter
    adc = vref_adc(board)
    crossed = False
    for _ in range(4):
        adc.times = []
        t_start = clock.now_us
        period = meter.sample()
        crossed |= (int(t_start) & (WRAP - 1)) > (int(clock.now_us) & (WRAP - 1))
        t = adc.times
        true = (t[-1] - t[0]) / (len(t) - 1)
        assert len(t) == meter.frames
        # 1 us of timer resolution over a 50-60 ms block: ~2e-5
        assert abs(period - true) / true < 5e-5, (period, true)
        now = hal.ticks_us()
        assert hal.ticks_diff(hal.ticks_add(now, 1000), now) == 1000
        clock.advance(rng.uniform(100, 3000))
    assert crossed, "the test was meant to cross the ticks_us wrap"
    assert hal.ticks_add(WRAP - 10, 20) == 10 and hal.ticks_diff(10, WRAP - 10) == 20


@pytest.mark.parametrize("name,freq,read_us", [
    ("devkitc-3ct", 50.0, 12.37), ("olimex-esp32-poe-iso", 50.0, 11.21), ("devkitc-3ct", 50.0, 12.93),
    ("olimex-esp32-poe-iso", 49.87, 12.61), ("devkitc-3ct", 50.21, 11.58),
])
def test_frequency_through_the_esp32_hal_and_metering(esp, name, freq, read_us):
    # reads of a steady length in 11-13 us with a little jitter (a busy loop
    # on a 240 MHz core): the firmware's own metering code must find the
    # mains frequency within 0.01 Hz. (Large per-read jitter is a limit of
    # metering's equal-spacing model, not of the HAL: see the test above.)
    board = board_def(name)
    rng = random.Random(int(read_us * 100))
    clock.reset(start_us=WRAP - 25000, cost_us=2.5)
    fmachine.read_us = lambda: read_us + rng.uniform(-0.05, 0.05)
    mains(board, freq)
    hal = AdcEsp32Hal(board, wdt_ms=0)
    fe = open_frontend(hal, board, frames=1000)
    regs = Registers(len(board["channels"]))
    want = int(freq * 100 + 0.5)
    got = []
    for _ in range(5):
        rs = fe.update(regs)
        got.append(rs[0].freq_chz)
        assert all(r.freq_chz == rs[0].freq_chz for r in rs)
        clock.advance(rng.uniform(1000, 9000))
    assert all(abs(g - want) <= 1 for g in got), (got, want)
    assert abs(sum(got) / len(got) - want) <= 0.6, (got, want)
    assert fe.meter.cycles >= 1


def test_adc_block_allocates_nothing_per_sample():
    # under the MicroPython unix port, with the fakes in place of machine and
    # time: heap used by a 10-frame and a 2000-frame block must be the same
    # (the float period only); the first call builds the bound-method list
    code = r"""
import gc
from esp32_fake import clock, machine
from firmware import hal_esp32
from array import array
hal_esp32.machine = machine
hal_esp32.time = clock
from firmware.adc_esp32 import AdcEsp32Hal
clock.reset(start_us=(1 << 30) - 5000)
board = {"mcu": "esp32", "channels": [{"pin": 39}, {"pin": 34}, {"pin": 35}], "vref": {"pin": 36}}
hal = AdcEsp32Hal(board, wdt_ms=0)
pins = [36, 39, 34, 35]
buf = array("H", bytes(2 * 4 * 3000))
hal.adc_block(pins, buf, 2)
used = []
periods = []
gc.collect()
gc.disable()
for n in (10, 3000, 1, 2000):
    a0 = gc.mem_alloc()
    p = hal.adc_block(pins, buf, n)
    used.append(gc.mem_alloc() - a0)
    periods.append(p)
gc.enable()
print("ALLOC", " ".join(str(u) for u in used), " ".join(str(p) for p in periods), buf[0], buf[11999])
"""
    proc = run_micropython(["-c", code], [ROOT, ROOT / "tests"])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ALLOC")]
    assert line, proc.stdout + proc.stderr
    f = line[0].split()[1:]
    used = [int(x) for x in f[:4]]
    periods = [float(x) for x in f[4:8]]
    # the same few bytes (the float period) whatever the number of samples
    assert len(set(used)) == 1 and used[0] <= 96, line[0]
    # 4 reads of 12 us per frame, and the samples landed in the buffer
    assert periods == [pytest.approx(48.0)] * 4, line[0]
    b0, b1 = int(f[8]), int(f[9])
    assert int(b0) == int(b1) == (1.3 / 3.3 * 4095 + 0.5) // 1


# -- network ---------------------------------------------------------------

def test_olimex_poe_iso_lan_gets_its_reference_clock(esp):
    board = board_def("olimex-esp32-poe-iso")
    net = open_net(board, {})
    assert isinstance(net, LanNet)
    lan = fnetwork.made[-1]
    assert isinstance(lan, fnetwork.LAN)
    kw = lan.kw
    # the WROVER variant: GPIO16/17 drive the PSRAM, the PHY clock comes out on GPIO0
    assert isinstance(kw["ref_clk"], fmachine.Pin) and kw["ref_clk"].id == 0
    assert kw["ref_clk_mode"] == fmachine.Pin.OUT
    assert kw["mdc"].id == 23 and kw["mdio"].id == 18 and kw["power"].id == 12
    assert kw["phy_type"] == fnetwork.PHY_LAN8720 and kw["phy_addr"] == 0
    assert sorted(kw) == ["mdc", "mdio", "phy_addr", "phy_type", "power", "ref_clk", "ref_clk_mode"]
    net.start()
    assert lan.active() and not net.up()


def test_lan_clock_spellings():
    base = {"type": "ethernet", "phy": "IP101", "phy_addr": 1, "mdc": 23, "mdio": 18}
    kw = lan_args(dict(base, ref_clk=0, ref_clk_mode="in"), fmachine, fnetwork)
    assert kw["ref_clk"].id == 0 and kw["ref_clk_mode"] == fmachine.Pin.IN
    assert kw["phy_type"] == fnetwork.PHY_IP101 and kw["phy_addr"] == 1 and "power" not in kw
    kw = lan_args(dict(base, clock="GPIO16_OUT"), fmachine, fnetwork)
    assert kw["ref_clk"].id == 16 and kw["ref_clk_mode"] == fmachine.Pin.OUT
    # the explicit keys win over the short form
    kw = lan_args(dict(base, clock="gpio0_in", ref_clk=17, ref_clk_mode="out"), fmachine, fnetwork)
    assert kw["ref_clk"].id == 17 and kw["ref_clk_mode"] == fmachine.Pin.OUT
    # no clock named: the image's default, nothing passed
    kw = lan_args(base, fmachine, fnetwork)
    assert "ref_clk" not in kw and "ref_clk_mode" not in kw
    for bad in (dict(base, clock="gpio17"), dict(base, clock="pin17_out"), dict(base, clock="gpio_out"),
                dict(base, ref_clk=17), dict(base, ref_clk=17, ref_clk_mode="sideways")):
        with pytest.raises(ValueError):
            lan_args(bad, fmachine, fnetwork)


# -- ATM90E32 board ----------------------------------------------------------

def atm_chips(board):
    """Simulated chips behind the fake SPI, each on its chip-select GPIO."""
    chips = [SimATM90E32(cs=fmachine.CsLine(c["cs"])) for c in board["frontend"]["chips"]]
    fmachine.spi_devices.extend(chips)
    return chips


def test_circuitsetup_front_end_on_the_esp32_hal(esp, monkeypatch):
    board = board_def("circuitsetup-6ch")
    # only what the board uses is loaded: not the ADC metering code
    for mod in ("firmware.metering", "firmware.dsp"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    chips = atm_chips(board)
    hal = hal_esp32.Esp32Hal(board, wdt_ms=30000)
    fe = open_frontend(hal, board, frames=1000)
    assert isinstance(fe, AtmFrontEnd) and fe.has_vref
    assert "firmware.metering" not in sys.modules and "firmware.dsp" not in sys.modules
    spi = fmachine.spis[0]
    assert len(fmachine.spis) == 1 and (spi.polarity, spi.phase) == (1, 1) and spi.baudrate == 200000
    assert [p.id for p in spi.pins] == [18, 23, 19]
    assert fmachine.lines[5] == 1 and fmachine.lines[4] == 1      # both deselected between accesses
    # begin() configured and locked each chip with its own gains
    for chip, igain in zip(chips, (39473, 25498)):
        assert chip.resets == 1 and chip.peek(REG_CFG_REG_ACC_EN) == CFG_LOCK
        assert chip.peek(REG_IGAIN_A) == igain and chip.peek(REG_MMODE0) & 0x1000 == 0
    chips[0].set_phase("A", 230.0, 10.0, 1.0, freq_hz=50.0)
    chips[1].set_phase("C", 229.0, 4.0, -1.0)
    regs = Registers(6)
    for _ in range(10):
        for c in chips:
            c.advance(36)
        rs = fe.update(regs)
    assert rs[0].p_w == 2300 and rs[0].vrms_dv == 2300 and rs[0].irms_ma == 10000 and rs[0].freq_chz == 5000
    assert rs[5].p_w == -916 and rs[5].pf_permille == -1000
    assert regs.imp[0] == 230 and regs.exp[5] == 91, (regs.imp[0], regs.exp[5])


def test_circuitsetup_without_chips_fails_clearly(esp):
    from firmware.atm90e32 import ATM90E32Error
    board = board_def("circuitsetup-6ch")
    hal = hal_esp32.Esp32Hal(board, wdt_ms=0)
    with pytest.raises(ATM90E32Error, match="no answer"):
        open_frontend(hal, board)


def test_unknown_front_end_type_is_refused(esp):
    board = dict(board_def("devkitc-3ct"), frontend={"type": "hall"})
    with pytest.raises(ValueError, match="hall"):
        open_frontend(hal_esp32.Esp32Hal(board, wdt_ms=0), board)


HOUSE_7 = json.dumps({"community": "street-1", "device": "house-7", "secret": "ab" * 32,
                      "broker": {"host": "192.0.2.1"}, "net": {"ssid": "home", "password": "pw"},
                      "channels": {"ct1": {"role": "grid", "gain": 1.0}}})


def _board_class(monkeypatch):
    """firmware.board.Board, importable under CPython: umqtt from build/lib
    under the names MicroPython gives its modules."""
    monkeypatch.syspath_prepend(str(ROOT / "build" / "lib"))
    import binascii
    import struct
    for alias, mod in (("usocket", socket), ("ustruct", struct), ("ubinascii", binascii)):
        monkeypatch.setitem(sys.modules, alias, mod)       # umqtt's MicroPython names
    try:
        from firmware.board import Board
    except ImportError as e:      # umqtt is fetched by `make umqtt`
        pytest.skip("firmware.board not importable: %s" % e)
    return Board


def test_the_start_builds_the_board_and_drops_itself(esp, monkeypatch, tmp_path):
    # what firmware/main.py runs on a board: boot.start reads board.json and
    # config.json from the flash root and builds the HAL, the network and the
    # Board; the Board keeps what it needs of the two dicts, not the dicts;
    # boot.settle drops the start's modules (boot, config and the front-end
    # factory among them);
    # the console brings boot back and answers for the running board
    _board_class(monkeypatch)
    from firmware import boot
    board = board_def("circuitsetup-6ch")
    atm_chips(board)
    (tmp_path / "board.json").write_text(json.dumps(board))
    (tmp_path / "config.json").write_text(HOUSE_7)
    hal, b = boot.start(str(tmp_path), None)
    assert isinstance(hal, hal_esp32.Esp32Hal) and isinstance(b.fe, AtmFrontEnd) and b.nch == 6
    assert not isinstance(hal, AdcEsp32Hal)         # an ATM90E32 board has no ADC code to load
    assert b.name == "circuitsetup-6ch" and b.heap_bytes == board["heap_bytes"] and b.ack_timeout_ms == 10000
    assert b.roles == {"ct1": "grid"} and b.uplink.sock_timeout_s == 5
    assert not hasattr(b, "board") and not hasattr(b, "cfg") and not hasattr(b.uplink, "cfg")
    for name in ("firmware.boot", "firmware.config", "firmware.adccal", "firmware.frontend",
                 "firmware.atm90e32_setup", "firmware.ota", "firmware.release", "firmware.loader", "protocol.fw"):
        # what settle unloads comes back for the tests after this one
        if name in sys.modules:
            monkeypatch.setitem(sys.modules, name, sys.modules[name])
            pkg, _, attr = name.rpartition(".")
            monkeypatch.setattr(sys.modules[pkg], attr, sys.modules[name])
    boot.settle(b)
    assert "firmware.boot" not in sys.modules and "firmware.config" not in sys.modules
    assert "firmware.frontend" not in sys.modules and "firmware.atm90e32_setup" not in sys.modules
    import firmware
    assert not hasattr(firmware, "boot")
    from firmware import boot as again
    con = again.console(hal, b, str(tmp_path), None)
    hello = con.ops.call({"op": "hello"})
    assert hello["board"] == "circuitsetup-6ch" and hello["device"] == "house-7" and hello["commissioned"]
    assert con.ops.call({"op": "measure"})["ch"][0]["role"] == "grid"


def test_circuitsetup_board_starts(esp, monkeypatch, tmp_path):
    # the whole Board on the ESP32 HAL: Wi-Fi from the fake network module,
    # energy and spool partitions from the fake esp32 module, the chips
    # behind the fake SPI
    Board = _board_class(monkeypatch)
    from firmware import config as fconfig
    from protocol import messages
    board = board_def("circuitsetup-6ch")
    chips = atm_chips(board)
    cfg, digest = fconfig.parse(HOUSE_7)
    clock.reset(start_us=123456, rtc=0)                 # power-up: the RTC says 2000-01-01
    hal = hal_esp32.Esp32Hal(board, wdt_ms=30000)
    net = open_net(board, cfg)
    assert isinstance(net, WifiNet)
    b = Board(hal, board, cfg, digest, net, str(tmp_path))
    assert isinstance(b.fe, AtmFrontEnd) and b.nch == 6
    assert fmachine.wdts and fmachine.wdts[0].timeout == 30000
    assert all(c.resets == 1 for c in chips)
    chips[0].set_phase("B", 231.0, 5.0, 1.0)
    chips[0].advance(60)
    rs = b.fe.update(b.regs, 60000)
    assert rs[1].p_w == 1155 and rs[1].vrms_dv == 2310
    assert b.regs.imp[1] * 1000 + b.regs.rest_mwh(1)[0] == pytest.approx(19250, abs=4)
    assert b._flags() & messages.F_CLOCK_UNSYNCED
    net.start()
    assert fnetwork.made[-1].joined == ("home", "pw")


# -- time ------------------------------------------------------------------

def unix(*ymdhms):
    return calendar.timegm(ymdhms + (0, 0, 0))


@pytest.mark.parametrize("when", [(2026, 5, 17, 9, 30, 0), (2029, 12, 31, 23, 59, 59), (2030, 1, 1, 0, 0, 1),
                                  (2031, 3, 4, 5, 6, 7), (2034, 1, 19, 3, 14, 8), (2099, 12, 31, 23, 59, 59)])
def test_time_follows_the_port_epoch(esp, when):
    u = unix(*when)
    hal = hal_esp32.Esp32Hal(board_def("devkitc-3ct"), wdt_ms=0)
    clock.reset(start_us=5000000, rtc=u - 946684800)     # the ESP32 port counts from 2000
    assert hal.time() == (u, False)
    clock.advance(61000000)
    assert hal.time()[0] == u + 61


def test_time_on_a_port_counting_from_1970(esp):
    clock.reset(epoch_year=1970, rtc=unix(2031, 1, 1, 0, 0, 0))
    hal = hal_esp32.Esp32Hal(board_def("devkitc-3ct"), wdt_ms=0)
    assert hal.time() == (unix(2031, 1, 1, 0, 0, 0), False)


def test_synced_means_set_by_ntp_not_a_plausible_year(esp, monkeypatch):
    hal = hal_esp32.Esp32Hal(board_def("devkitc-3ct"), wdt_ms=0)
    # an RTC that kept a 2031 time over a soft reset is still not synced
    clock.reset(rtc=unix(2031, 6, 1, 12, 0, 0) - 946684800)
    assert hal.time() == (unix(2031, 6, 1, 12, 0, 0), False)
    # NTP answers (ntptime.settime() writes the RTC), net tells the HAL
    ntp_now = unix(2032, 2, 29, 1, 2, 3)
    fake_ntptime = types.SimpleNamespace(timeout=1, settime=lambda: fmachine.RTC().datetime(
        tuple(clock.gmtime(ntp_now - 946684800)[i] for i in (0, 1, 2, 6, 3, 4, 5)) + (0,)))
    monkeypatch.setitem(sys.modules, "ntptime", fake_ntptime)
    writes = len(fmachine.rtc_sets)
    assert _ntp(hal) is True
    assert len(fmachine.rtc_sets) == writes + 1           # only ntptime wrote the RTC
    assert hal.time() == (ntp_now, True)
    # set_time() with another time puts it into the RTC
    hal.set_time(unix(2040, 7, 1, 0, 0, 0))
    assert fmachine.rtc_sets[-1][:3] == (2040, 7, 1)
    assert hal.time() == (unix(2040, 7, 1, 0, 0, 0), True)


def test_no_ntp_answer_stays_unsynced(esp, monkeypatch):
    hal = hal_esp32.Esp32Hal(board_def("devkitc-3ct"), wdt_ms=0)

    def no_answer():
        raise OSError(110)

    monkeypatch.setitem(sys.modules, "ntptime", types.SimpleNamespace(timeout=1, settime=no_answer))
    assert _ntp(hal) is False and hal.time()[1] is False


def test_the_board_asks_the_routers_ntp_server_it_was_given(esp, monkeypatch):
    # a community without the Internet: the board's clock (and so its TLS
    # date checks) comes from the router named at commissioning
    from firmware import config as fconfig

    hal = hal_esp32.Esp32Hal(board_def("devkitc-3ct"), wdt_ms=0)
    asked = []
    fake = types.SimpleNamespace(timeout=1, host="pool.ntp.org",
                                 settime=lambda: asked.append(fake.host) or fmachine.RTC().datetime(
                                     (2031, 1, 2, 3, 4, 5, 6, 0)))
    monkeypatch.setitem(sys.modules, "ntptime", fake)
    net = open_net(board_def("devkitc-3ct"), {"net": {"ssid": "x", "password": "y"}, "ntp": "192.168.1.2"})
    assert net.ntp == "192.168.1.2" and net.sync_time(hal) is True and asked == ["192.168.1.2"]
    fake.host = "pool.ntp.org"          # (a fresh boot)
    net = open_net(board_def("devkitc-3ct"), {"net": {"ssid": "x", "password": "y"}})
    assert net.ntp is None and net.sync_time(hal) is True and asked[-1] == "pool.ntp.org"   # ntptime's own
    for bad in ("", "a b", 7, "x" * 254):
        with pytest.raises(fconfig.ConfigError, match="ntp"):
            fconfig.parse(json.dumps(_good_config(ntp=bad)))
    assert fconfig.parse(json.dumps(_good_config(ntp="gw.oak.lan")))[0]["ntp"] == "gw.oak.lan"


def _good_config(**over):
    cfg = {"community": "oak", "device": "d1", "secret": "11" * 32,
           "broker": {"host": "192.168.1.2", "user": "oak.d1", "password": "pw"}}
    cfg.update(over)
    return cfg


# -- UTF-8 on both interpreters ----------------------------------------------

BAD_TEXT = ["c0af", "e080af", "f08080af", "eda080", "edbfbf", "f4908080", "f5808080", "c3", "e282",
            "f09f98", "80", "ff", "41c0af42"]


def test_invalid_utf8_is_e_utf8_on_both_interpreters():
    from protocol import cbor
    from protocol.errors import E_UTF8, ProtocolError

    def codes_cpython():
        out = []
        for h in BAD_TEXT + ["c3bc", "f48fbfbf"]:
            raw = bytes.fromhex(h)
            try:
                cbor.loads(bytes([0x60 + len(raw)]) + raw)
                out.append("ok")
            except ProtocolError as e:
                out.append(str(e.code))
        return out

    code = r"""
import binascii
from protocol import cbor
from protocol.errors import ProtocolError
out = []
for h in %r:
    raw = binascii.unhexlify(h)
    try:
        cbor.loads(bytes([0x60 + len(raw)]) + raw)
        out.append("ok")
    except ProtocolError as e:
        out.append(str(e.code))
print("CODES", " ".join(out))
""" % (BAD_TEXT + ["c3bc", "f48fbfbf"],)
    proc = run_micropython(["-c", code], [ROOT])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("CODES")]
    assert line, proc.stdout + proc.stderr
    want = [str(E_UTF8)] * len(BAD_TEXT) + ["ok", "ok"]
    assert line[0].split()[1:] == want
    assert codes_cpython() == want


def test_every_backend_has_the_whole_hal_interface():
    # firmware/hal.py's Hal keeps no NotImplementedError stand-ins (they
    # would cost a board heap): a backend missing a method would fail only
    # when a board calls it, so each backend is checked against the list at
    # the top of firmware/hal.py here
    from boardsim.hal_sim import NorFlash, RamNorFlash, SimFlash, SimHal
    from boardsim.hal_virtual import VirtualHal
    from firmware.hal import Hal

    head = (ROOT / "firmware" / "hal.py").read_text().split("\ntry:")[0]
    names = set()
    for line in head.splitlines():
        if line.startswith("#   Hal."):
            spec = line[len("#   Hal."):].split("  ")[0].split(" -> ")[0]
            names |= {n.strip().split("(")[0] for n in spec.split(", ") if "(" in n}
    assert {"adc_block", "adc_calibration", "flash", "ticks_ms", "ticks_us", "time", "set_time", "io_add", "io_diff",
            "mem_free"} <= names, names
    adc = {"adc_block", "adc_calibration"}
    for backend, need in ((AdcEsp32Hal, names), (hal_esp32.Esp32Hal, names - adc), (SimHal, names),
                          (VirtualHal, names)):
        missing = sorted(n for n in need if not callable(getattr(backend, n, None)))
        assert not missing, (backend.__name__, missing)
    assert not callable(getattr(Hal, "adc_block", None))      # the check above can fail
    for flash in (hal_esp32.PartitionFlash, SimFlash, NorFlash, RamNorFlash):
        assert all(callable(getattr(flash, n, None)) for n in ("read", "readinto", "write")), flash


def test_only_a_board_that_samples_cts_gets_the_adc_hal(esp, monkeypatch):
    from firmware.boot import open_hal
    monkeypatch.delitem(sys.modules, "firmware.adc_esp32")
    atm = open_hal(board_def("circuitsetup-6ch"), wdt_ms=0)
    assert type(atm) is hal_esp32.Esp32Hal and "firmware.adc_esp32" not in sys.modules
    for name in ("devkitc-3ct", "olimex-esp32-poe-iso"):
        hal = open_hal(board_def(name), wdt_ms=0)
        assert type(hal).__name__ == "AdcEsp32Hal" and hal.vref_pin == board_def(name)["vref"]["pin"]
    with pytest.raises(ValueError, match="esp32"):
        open_hal(dict(board_def("devkitc-3ct"), mcu="rp2040"))
