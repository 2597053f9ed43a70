# The virtual board: the real firmware (firmware/board.py) on the MicroPython
# unix port with simulated hardware (boardsim/hal_virtual.py). Started by
# `peergrid vboard` (gateway/src/peergrid/sim/vboard.py), which prepares the
# folder and the RS485 peer:
#
#   micropython -m boardsim.vboard <folder> [speed] [rs485 pty] [console pty]
#
# <folder> holds board.json, config.json (the commissioning config, absent
# on a board that was never commissioned) and sim.json (the simulated
# house: profile, relay loads; else the config's "sim") and becomes the
# board's flash: energy.bin, spool.bin, boot and cmd_ctr files. The board
# clock runs `speed` times faster than the wall clock. With a console pty
# the commissioning console (firmware/console.py) answers on it; without a
# valid config the board then waits for one (exit code 3: reboot asked).
# sim "ticks0" / "io0": where the board clock and the I/O clock start (ms,
# taken modulo 2^30; default 0, io0 defaults to ticks0): a test puts the
# ticks wrap a few seconds ahead. sim "ct_lead_deg": per channel, how far
# the CT's output leads the current (a CT's phase error, for commissioning).
#
# Control, one JSON object per line on stdin; events, one per line on stdout:
#   {"op": "state"}                 -> {"ev": "state", ...} everything a test checks
#   {"op": "power", "w": [..], "pf": [..]}   fixed channel powers (W, import +)
#   {"op": "base", "w": [..], "q": [..]}   fixed powers without our relays' loads,
#                                   which are added when their relay is on;
#                                   q: the reactive power (var, + inductive) of
#                                   those fixed loads (sim "base_var"), the
#                                   relays' loads being resistive
#   {"op": "profile"}               back to the day profile of config "sim"
#   {"op": "advance", "s": N}       board clock jumps N seconds (less than 2^29 ms)
#   {"op": "speed", "x": N}         clock speed factor
#   {"op": "sync"}                  NTP answers now (the simulated date)
#   {"op": "quit"}                  clean shutdown
# Events: {"ev": "ready"}, {"ev": "relay"|"battery", "i", "v", "why", "ms"},
# {"ev": "cmd", "ctr", "result", "ms"}, {"ev": "error", "msg"}; "ms" is the
# board clock (ticks_ms) when the board reported it.
import gc
import json
import math
import sys

import select

from firmware import board as fboard
from firmware import config as fconfig
from firmware.board import Board
from firmware.console import Console, Ops
from firmware.hal import IoClock
from boardsim.hal_virtual import VirtualHal
from firmware.net import HostNet


def emit(obj):
    sys.stdout.write(json.dumps(obj))
    sys.stdout.write("\n")
    try:
        sys.stdout.flush()
    except AttributeError:
        pass


class Scenario:
    """Channel powers over the simulated day: a household base load, PV on
    a sine from 06:00 to 18:00, the loads behind the relays when they are on.
    The grid channel sees load minus PV (import positive)."""

    def __init__(self, sim, nch):
        self.sim = sim
        self.nch = nch
        self.fixed = None
        self.base = sim.get("base")         # a fixed house load from the start (sim.json)
        self.q = sim.get("base_var")        # its reactive power per channel, var
        self.pf = None
        self.pf_now = None                  # power factors of the last powers()

    def powers(self, unix, relays):
        w = self._powers(unix, relays)
        self.pf_now = self._pf(w)
        sign = self.sim.get("ct_sign")      # a clamp fitted the wrong way round: -1
        if sign:
            w = [w[i] * (sign[i] if i < len(sign) else 1) for i in range(len(w))]
        return w

    def _pf(self, w):
        # per channel: the fixed loads' vars with everything else resistive
        if self.fixed is not None:
            return self.pf
        q = self.q
        if not q or self.base is None:
            return None
        out = []
        for i in range(len(w)):
            qi = float(q[i]) if i < len(q) else 0.0
            s = math.sqrt(w[i] * w[i] + qi * qi)
            if qi == 0 or s == 0:
                out.append(1.0)
            else:
                apf = abs(w[i]) / s
                out.append(apf if (qi > 0) == (w[i] >= 0) else -apf)
        return out

    def _powers(self, unix, relays):
        if self.fixed is not None:
            return self.fixed
        s = self.sim
        if self.base is not None:
            w = list(self.base)
            rw = s.get("relay_w", [])
            rch = s.get("relay_ch", [])
            dead = s.get("dead_relays", [])
            g = s.get("grid", 0)
            for i in range(len(relays)):
                if relays[i].value and i < len(rw) and i not in dead:
                    if g < self.nch:
                        w[g] += rw[i]
                    if i < len(rch) and rch[i] is not None and rch[i] < self.nch and rch[i] != g:
                        w[rch[i]] += rw[i]
            return w
        hod = (unix % 86400) / 3600.0
        pv = 0.0
        if 6 <= hod <= 18:
            pv = s.get("pv_peak_w", 4000) * math.sin(math.pi * (hod - 6) / 12)
        load = s.get("base_w", 400) + (s.get("evening_w", 800) if 17 <= hod <= 22 else 0)
        w = [0.0] * self.nch
        rw = s.get("relay_w", [])
        rch = s.get("relay_ch", [])
        for i in range(len(relays)):
            if relays[i].value and i < len(rw):
                load += rw[i]
                if i < len(rch) and rch[i] is not None and rch[i] < self.nch:
                    w[rch[i]] += rw[i]
        g = s.get("grid", 0)
        p = s.get("pv", 1)
        if g < self.nch:
            w[g] = load - pv
        if p < self.nch and p != g:
            w[p] = -pv
        return w


def state(b, hal):
    regs = [list(b.regs.get(i)[:2]) for i in range(b.nch)]
    return {"ev": "state", "boot": b.boot, "seq": b.seq, "connected": b.uplink.connected,
            "listening": b.uplink.listening,
            "relays": [r.value for r in b.outputs.relays],
            "batteries": [x.value for x in b.outputs.batteries],
            "buffered": b.spool.count, "dropped": b.spool.dropped, "stats": b.stats,
            "spool_failure": repr(b.spool_failure) if b.spool_failure is not None else None,
            "uplink": b.uplink.stats, "outputs": b.outputs.stats,
            "rejects": dict((str(k), v) for k, v in b.rejects.items()),
            "regs": regs, "synced": hal.time()[1], "unix": hal.time()[0],
            "board_ms": hal.ticks_ms(), "elapsed_ms": hal.elapsed_ms(), "uptime_s": b.uptime_s(),
            "io_ms": hal.io_ms(), "next_try_in": hal.io_diff(b.uplink.next_try, hal.io_ms()),
            "heap_free": hal.mem_free(), "min_free": b.min_free,
            "heap_peak": b.heap_peak, "heap_live": b.heap_live, "heap_cycle": b.heap_cycle,
            "fed": hal.fed, "frame_len": b.frame_len, "inflight": b.inflight, "live_len": b.live_len,
            "next_replay_in": hal.io_diff(b.next_replay, hal.io_ms()),
            "spool_capacity_records": b.spool.capacity_records(b.frame_len or 120), "inv_ok": b.inv_ok, "bat_ok": b.bat_ok,
            "modbus": getattr(b.master, "stats", None) if b.master is not None else None,
            "rel": b.rel, "ota": b.ota.report() if b.ota is not None else b.ota_last,
            "ota_stats": b.ota.stats if b.ota is not None else None}


class Reboot(Exception):
    pass


def _reboot():
    raise Reboot()


def _fw_digest():
    # a bundle built by `make firmware` carries its manifest's digest
    for p in sys.path:
        try:
            with open(p + "/manifest.json") as f:
                return json.load(f).get("digest", "")
        except (OSError, ValueError):
            pass
    return "source"


def uncommissioned(hal, board, root, port, why, fw):
    """No valid config: only the console runs, waiting for one."""
    ops = Ops(hal, board, root, None, fw, _fw_digest(), why)
    ops.reboot = _reboot
    con = Console(port, ops, IoClock(hal))
    poll = select.poll()
    poll.register(sys.stdin, select.POLLIN)
    emit({"ev": "uncommissioned", "why": why})
    while True:
        try:
            con.poll()
        except Reboot:
            emit({"ev": "reboot"})
            return 3
        if poll.poll(0):
            line = sys.stdin.readline()
            if not line or '"quit"' in line:
                return 0
        hal.idle(10)


def main(argv):
    root = argv[0]
    speed = float(argv[1]) if len(argv) > 1 else 1.0
    pty = argv[2] if len(argv) > 2 and argv[2] else None
    con_path = argv[3] if len(argv) > 3 and argv[3] else None
    with open(root + "/board.json") as f:
        board = json.load(f)
    sim = None
    try:
        with open(root + "/sim.json") as f:
            sim = json.load(f)
    except OSError:
        pass
    import os
    fw = os.getenv("PG_FW_VERSION") or fboard.FW_VERSION
    fboard.FW_VERSION = fw          # a test can make the board report an older firmware
    port = None
    if con_path:
        from boardsim.uart_posix import PosixUart
        port = PosixUart(con_path, 115200)
    hal = VirtualHal(board, root, speed=speed)
    if sim is not None:
        hal.start_clocks(sim.get("ticks0", 0), sim.get("io0"))
    try:
        cfg, digest = fconfig.load(root + "/config.json")
    except fconfig.ConfigError as e:
        if port is None:
            emit({"ev": "error", "msg": str(e)})
            return 2
        return uncommissioned(hal, board, root, port, str(e), fw)
    if sim is None:
        sim = cfg.get("sim") or {}
        hal.start_clocks(sim.get("ticks0", 0), sim.get("io0"))
    start = sim.get("start", 1795000000)
    net = HostNet(unix_now=lambda: start + hal.elapsed_ms() // 1000)
    ck = sim.get("clock")
    if ck:
        # a simulation with its own clock (make demo): Unix time = t0 + (wall - w0) * speed
        import time as _t
        net = HostNet(unix_now=lambda: int(ck["t0"] + (_t.time() - ck["w0"]) * ck["speed"]))
    if not sim.get("ntp", True):
        net = HostNet(None)
    master = None
    if pty:
        from firmware.modbus import master_for
        from boardsim.uart_posix import PosixUart
        rs = board.get("rs485") or {}
        uart = PosixUart(pty, rs.get("baud", 9600))
        de = hal.pin_out(rs["de"], 0) if "de" in rs else None
        # the timeouts the board computes (board.json rs485, the config's devices)
        master = master_for(uart, IoClock(hal), rs, cfg, de=de, retries=1)
    def event(e):
        e["ms"] = hal.ticks_ms()
        emit(e)

    b = Board(hal, board, cfg, digest, net, root, rs485=master, on_event=event)
    con = None
    if port is not None:
        ops = Ops(hal, board, root, b, fw, _fw_digest())
        ops.reboot = _reboot
        con = Console(port, ops, IoClock(hal))
    scen = Scenario(sim, b.nch)
    src = hal.source
    lead = sim.get("ct_lead_deg") or []
    for i in range(min(len(lead), b.nch)):
        src.set_lead(i, float(lead[i]))
    poll = select.poll()
    poll.register(sys.stdin, select.POLLIN)
    emit({"ev": "ready", "boot": b.boot, "buffered": b.spool.count, "lost_wh": b.store.lost_wh_bound})
    while True:
        if hal.ticks_diff(hal.ticks_ms(), b.next_due) >= 0:
            w = scen.powers(hal.time()[0], b.outputs.relays)
            pf = scen.pf_now
            for i in range(b.nch):
                src.set(i, w[i], pf[i] if pf else 1.0)
        b.step()
        if b.reset_pending:
            b.shutdown()
            emit({"ev": "reboot", "why": b.reset_pending})
            return 3
        if con is not None:
            try:
                con.poll()
            except Reboot:
                b.shutdown()
                emit({"ev": "reboot"})
                return 3
        if poll.poll(0):
            line = sys.stdin.readline()
            if not line:
                b.shutdown()
                return 0
            try:
                req = json.loads(line)
            except ValueError:
                emit({"ev": "error", "msg": "control: not JSON"})
                continue
            op = req.get("op")
            if op == "state":
                emit(state(b, hal))
            elif op == "power":
                scen.fixed = [float(x) for x in req["w"]]
                scen.pf = req.get("pf")
                b.next_due = hal.ticks_ms()
            elif op == "base":
                scen.fixed = None
                scen.base = [float(x) for x in req["w"]]
                if "q" in req:
                    scen.q = req["q"]
                b.next_due = hal.ticks_ms()
            elif op == "profile":
                scen.fixed = None
                scen.base = None
            elif op == "advance":
                hal.advance(int(req["s"] * 1000))
            elif op == "speed":
                hal.set_speed(float(req["x"]))
            elif op == "sync":
                hal.set_time(start + hal.elapsed_ms() // 1000)
            elif op == "gc":
                gc.collect()
                emit({"ev": "gc", "free": hal.mem_free()})
            elif op == "quit":
                b.shutdown()
                emit({"ev": "bye"})
                return 0
            else:
                emit({"ev": "error", "msg": "control: unknown op"})
        b.idle()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
