# A board's day on a MicroPython interpreter, driven step by step: the real
# firmware (firmware/board.py, built as firmware/main.py builds it) with the
# simulated hardware of the virtual board on a simulated clock that starts
# where the scenario says (just before the 2^30 wrap, say), and the network
# of the runtime: on the 32-bit runtime (tools/mp32) the loopback broker of
# tools/mp32/broker.mjs through tools/mp32/shim/usocket.py.
#
#   run.mjs --heap N --step --js loop=tools/mp32/broker.mjs ... tests/board_soak.py /soak
#
# /soak holds board.json, config.json and scenario.json:
#   {"ticks0": N, "hours": H, "unix0": T, "step_ms": 1000, "powers": [W, ...]}
# Prints one JSON object a line: {"ev": "relay"|"battery"|"cmd", "ms": board
# ms since start, ...} as they happen, {"ev": "heap", ...} once the firmware
# is loaded, and {"ev": "end", ...} with the board's counters and the heap
# figures at the end. Heap: gc.mem_alloc() right after each collection (what
# is live) and at the end of each step before it (live plus one step's
# garbage: the least free heap the board saw).
#
# The board's heap is scenario.json's "heap": the runner's cap is larger
# (footprint.SIM_ROOM) and holds this script and the simulated hardware
# too; once those are built, what they leave of the extra room is taken
# (step(), phase 2), so that the firmware's code and data have exactly the
# board's heap. This runtime collects only between steps, so the board's
# start and every step must fit in what the last collection left free:
# loop iterations stop early when the heap runs low (_run).
import gc
import json
import sys

import loop

_DIR = sys.argv[1] if len(sys.argv) > 1 else "/soak"


def _load(name):
    with open(_DIR + "/" + name) as f:
        return json.load(f)


S = {"phase": 0, "base": 0, "code": 0, "sim": 0, "live": 0, "peak": 0, "steps": 0, "iter": 0, "hours_live": [],
     "hours_floor": []}


def _emit(obj):
    sys.stdout.write(json.dumps(obj))
    sys.stdout.write("\n")


def _modules():
    """What firmware/main.py loads on a board: main and boot (board,
    config, hal, net; the console only when a frame arrives), the ESP32
    HAL, the MQTT client, and the front end and RS485 modules this board
    and config use (the firmware imports those lazily); boot.settle drops
    boot, config, adccal, frontend and atm90e32_setup again once the Board
    is built.
    One a step: on a board the collector runs whenever the heap fills, here
    only between steps, so the garbage of loading one module is all a step
    may leave."""
    board = _load("board.json")
    cfg = _load("config.json")
    mods = ["protocol.errors", "protocol.cbor", "protocol.cose", "protocol.topics", "protocol.messages",
            "protocol.link", "firmware.hal", "firmware.state", "firmware.config", "firmware.energy",
            "firmware.spool", "firmware.outputs", "firmware.frontend"]
    atm = (board.get("frontend") or {}).get("type") == "atm90e32"
    if atm:
        mods += ["firmware.atm90e32", "firmware.atm90e32_setup"]
    else:
        mods += ["firmware.dsp", "firmware.metering", "firmware.adccal"]
    mods += ["umqtt_pinned.simple", "firmware.mqtt", "firmware.uplink", "firmware.net", "firmware.commands",
             "firmware.board", "firmware.main", "firmware.boot", "firmware.hal_esp32"]
    if not atm:
        mods.append("firmware.adc_esp32")       # the ESP32 HAL's ADC part (boot.open_hal)
    if cfg.get("inverter") or cfg.get("battery"):
        mods += ["firmware.modbus", "firmware.sunspec", "firmware.inverters"]
    return mods


def _make_hal():
    board = _load("board.json")
    scen = _load("scenario.json")
    atm = (board.get("frontend") or {}).get("type") == "atm90e32"
    from boardsim.hal_sim import RamNorFlash
    if atm:
        from boardsim.hal_sim import SimHal as Base
    else:
        from boardsim.hal_virtual import VirtualHal as Base

    class SoakHal(Base):
        """The simulated hardware on a clock that moves only when the board
        waits: I/O time is board time, nothing sleeps for real. Its flash
        has the NOR rules of the ESP32's partitions (PartitionFlash in
        firmware/hal_esp32.py: a write only clears bits, erase() sets whole
        blocks back), so the firmware erases as it does on a board instead
        of writing a block of 0xFF from the heap; it is kept in memory
        outside the board's heap (see step()), so that a read costs the
        firmware what it costs on a board."""
        flash_class = RamNorFlash

        def elapsed_ms(self):
            return Base.elapsed_ms(self) if not atm else self.now_us // 1000

        def advance(self, ms):
            Base.advance(self, ms)
            for chip in getattr(self, "spi_devices", ()):
                chip.advance(ms / 1000)

        def io_ms(self):
            return self.ticks_ms()

        def io_diff(self, a, b):
            return self.ticks_diff(a, b)

        def io_add(self, t, d):
            return self.ticks_add(t, d)

        def io_sleep_ms(self, ms):
            self.advance(ms)

        def sleep_ms(self, ms):
            self.advance(ms)

        def idle(self, ms):
            if ms > 0:
                self.advance(ms)

        def set_time(self, unix):
            self.unix = unix - self.elapsed_ms() // 1000
            self.unix0 = self.unix
            self.synced = True

        def time(self):
            return (self.unix0 if not atm else self.unix) + self.elapsed_ms() // 1000, self.synced

    powers = scen.get("powers") or [0.0] * len(board["channels"])
    if atm:
        from boardsim.atm90e32_sim import SimATM90E32

        hal = SoakHal(board, root="/flash", ticks0=scen["ticks0"])
        hal.unix = scen["unix0"]

        class Cs:
            def __init__(self, n):
                self.n = n

            def value(self):
                return hal.outputs.get(self.n, 1)

        hal.spi_devices = [SimATM90E32(cs=Cs(c["cs"])) for c in board["frontend"]["chips"]]
        for i in range(len(powers)):
            chip = hal.spi_devices[i // 3] if i // 3 < len(hal.spi_devices) else None
            if chip is not None:
                chip.set_phase(i % 3, 230.0, abs(powers[i]) / 230.0, 1.0)
    else:
        hal = SoakHal(board, root="/flash", speed=0, unix0=scen["unix0"], ticks0=scen["ticks0"])
        for i in range(len(powers)):
            hal.source.set(i, powers[i])
        # tabulate the simulated waveforms now, so that their one-off
        # garbage is gone before the board starts
        hal.source._build(len(board["channels"]) + (1 if "pin" in (board.get("vref") or {}) else 0))
    fail = scen.get("spool_fail")
    if fail:
        # the spool's flash refuses writes for a while (a worn or full chip)
        flash = hal.flash

        def failing(name, size):
            f = flash(name, size)
            if name == "spool":
                write = f.write

                def w(off, data):
                    if fail[0] <= hal.elapsed_ms() < fail[1]:
                        raise OSError(5)        # EIO
                    return write(off, data)

                f.write = w
            return f

        hal.flash = failing
    # the partitions the firmware opens, made now: the simulated flash is
    # hardware, not part of the board's heap
    hal.flash("energy", 16 * 4096)
    hal.flash("spool", _load("config.json")["spool_kb"] * 1024)
    S["hal"] = hal
    S["scen"] = scen
    S["step_ms"] = scen.get("step_ms", 1000)
    S["end_ms"] = int(scen["hours"] * 3600000)


def _start():
    from firmware import config as fconfig
    from firmware.board import Board
    from firmware.net import HostNet

    hal = S["hal"]
    scen = S["scen"]
    cfg, digest = fconfig.load(_DIR + "/config.json")
    net = HostNet(lambda: scen["unix0"] + hal.elapsed_ms() // 1000)

    def on_event(ev):
        ev["ms"] = hal.elapsed_ms()
        _emit(ev)

    S["board"] = Board(hal, _load("board.json"), cfg, digest, net, "/flash", on_event=on_event)
    # as firmware/main.py does once the board is built
    from firmware.boot import settle
    settle(S["board"])


def _free():
    """The heap's free bytes; the WebAssembly port adds to gc.mem_free() the
    128 MiB it could grow by, which the runner's cap does not allow."""
    f = gc.mem_free()
    return f - (1 << 27) if f >= 1 << 27 else f


def _take(n):
    """n bytes of the heap taken, in the largest pieces the free space
    still holds (the simulated hardware may have split it)."""
    got = []
    piece = n
    while n > 0:
        try:
            got.append(bytearray(min(piece, n)))
            n -= min(piece, n)
        except MemoryError:
            if piece <= 1024:
                raise
            piece //= 2
    return got


def _run():
    """Board loop iterations until one reading was made, a minute passed,
    100 iterations ran or the heap left free is less than an iteration may
    need (a replay after an outage runs many short ones): on a board the
    collector runs inside an iteration when the heap fills, here only
    between steps."""
    b = S["board"]
    hal = S["hal"]
    n0 = b.stats["readings"]
    t0 = hal.elapsed_ms()
    n = 0
    while b.stats["readings"] == n0 and hal.elapsed_ms() - t0 < 60000 and n < 100 and (
            n == 0 or _free() > max(12288, S["iter"] * 5 // 4 + 2048)):
        n += 1
        loop.clock(hal.elapsed_ms())
        a = gc.mem_alloc()
        b.step()
        a = gc.mem_alloc() - a
        if a > S["iter"]:
            S["iter"] = a
        if b.live_len or b.cmdq or (b.spool.count and b.uplink.connected):
            hal.advance(5)      # something queued: the board's idle() returns at once
        else:
            # what the board's idle() waits for, in one jump: the next
            # reading, or a lease ending first (so leases end on time)
            now = hal.ticks_ms()
            wait = hal.ticks_diff(b.next_due, now)
            for out in b.outputs.relays + b.outputs.batteries:
                if out.until is not None:
                    w = hal.ticks_diff(out.until, now)
                    if 0 < w < wait:
                        wait = w        # the firmware ends a lease when its time is reached
            hal.advance(wait if 0 < wait < S["step_ms"] else (S["step_ms"] if wait > 0 else 1))
    return hal.elapsed_ms() < S["end_ms"]


def step():
    live = gc.mem_alloc()       # the collector ran when the last step returned
    phase = S["phase"]
    if phase == 0:
        if "mods" not in S:
            S["base"] = live
            S["mods"] = _modules()
            S["loaded"] = 0
        mods = S["mods"]
        if S["loaded"] < len(mods):
            __import__(mods[S["loaded"]])
            S["loaded"] += 1
            gc.collect()
            return True
    elif phase == 1:
        S["code"] = live - S["base"]
        _make_hal()
        S["heap"] = S["scen"]["heap"]
    elif phase == 2:
        S["sim"] = live - S["base"] - S["code"]
        # the runner's heap is the board's plus room for itself and the
        # simulated hardware; what of that room they do not use is taken
        # now, so the firmware has exactly the board's heap for its code
        # and data
        total = live + _free()
        ballast = total - S["heap"] - S["base"] - S["sim"]
        if ballast < 0:
            raise MemoryError("the runner and the simulated hardware need %d B more room" % -ballast)
        S["ballast"] = _take(ballast)
        S["out"] = total - S["heap"]
        _emit({"ev": "heap", "code": S["code"], "sim": S["sim"], "heap": S["heap"], "room": ballast})
        _start()
    else:
        if live > S["live"]:
            S["live"] = live
        # the live heap by hour of board time, its most and its least: a
        # leak raises both; the most alone also shows a step whose garbage
        # survived the collection (this runtime's collector is conservative)
        h = S["hal"].elapsed_ms() // 3600000
        hours = S["hours_live"]
        floor = S["hours_floor"]
        while len(hours) <= h:
            hours.append(0)
            floor.append(0)
        if live > hours[h]:
            hours[h] = live
        if live < floor[h] or not floor[h]:
            floor[h] = live
        more = _run()
        S["steps"] += 1
        if not more:
            b = S["board"]
            _emit({"ev": "end", "ms": S["hal"].elapsed_ms(), "seq": b.seq, "stats": b.stats,
                   "uplink": b.uplink.stats, "outputs": b.outputs.stats, "buffered": b.spool.count,
                   "dropped": b.spool.dropped, "uptime": b.uptime_s(), "steps": S["steps"],
                   "base": S["base"], "code": S["code"], "sim": S["sim"], "heap": S["heap"],
                   "live": S["live"] - S["out"], "peak": S["peak"] - S["out"],
                   "iteration": S["iter"], "broker": loop.counts(),
                   "live_by_hour": [x - S["out"] if x else 0 for x in S["hours_live"]],
                   "floor_by_hour": [x - S["out"] if x else 0 for x in S["hours_floor"]]})
            return False
    if phase < 3:
        S["phase"] = phase + 1
    end = gc.mem_alloc()
    if phase >= 2 and end > S["peak"]:
        S["peak"] = end
    gc.collect()                # on this runtime: collects when step() returns
    return True
