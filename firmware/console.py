# The commissioning console: a small framed request/response protocol on the
# board's USB serial port, spoken by `peergrid commission` (never the Python
# REPL, so an electrician's tool cannot run arbitrary code on the board).
#
# Frame, both directions, ASCII apart from the payload's UTF-8 text:
#   0x02 (STX) | length, 4 hex digits | payload | CRC-32 of payload, 8 hex digits | LF
# payload: a JSON object, at most MAX_PAYLOAD bytes. No byte of a frame is a
# control character the REPL reacts to (Ctrl-C stays available for mpremote
# when the board is updated). A request is
#   {"seq": n, "op": name, ...arguments}
# and its answer {"seq": n, "ok": true, ...results} or
#   {"seq": n, "ok": false, "err": code, "msg": text}.
# Bytes outside a frame are skipped (noise, a human typing); a frame whose CRC
# does not match is answered with err "crc" when its seq can be read, otherwise
# dropped; a frame that stays incomplete for 2 s is dropped.
#
# Operations (see Ops): hello, status, measure, cal_measure, read_config,
# write_config, relay, probe_inverter, reboot. Writing the config is atomic: the new file is
# written beside the old one, checked by reading it back, then renamed over it,
# so a board that loses power half-way still has the old config (or none).
import binascii
import json

STX = 2
MAX_PAYLOAD = 3072
PROTO = 1


HDR = 5         # STX and four hex digits
TAIL = 9        # eight hex digits and LF


def frame(obj):
    p = json.dumps(obj).encode()
    crc = binascii.crc32(p) & 0xFFFFFFFF
    return b"\x02" + ("%04x" % len(p)).encode() + p + ("%08x\n" % crc).encode()


def _hex(buf, start, n):
    v = 0
    for i in range(start, start + n):
        c = buf[i]
        if 48 <= c <= 57:
            d = c - 48
        elif 97 <= c <= 102:
            d = c - 87
        elif 65 <= c <= 70:
            d = c - 55
        else:
            return -1
        v = (v << 4) | d
    return v


class Console:
    """Reads frames from `port` (read-into without blocking, like machine.UART)
    and answers them with `ops.call(request)`. `clock` is the real-time
    clock of the serial line (hal.IoClock: ticks_ms, ticks_add, ticks_diff)."""

    def __init__(self, port, ops, clock):
        self.port = port
        self.ops = ops
        self.clock = clock
        self.ticks_ms = clock.ticks_ms
        self.diff = clock.ticks_diff
        self.buf = bytearray(MAX_PAYLOAD + HDR + TAIL)
        self.n = 0
        self.t_first = 0
        self.chunk = bytearray(64)
        self.stats = {"frames": 0, "crc": 0, "dropped": 0}

    def poll(self):
        """Take what has arrived; answer each complete frame. Returns True
        when a request was handled."""
        handled = False
        while True:
            got = self.port.readinto(self.chunk)
            if not got:
                break
            for i in range(got):
                if self._byte(self.chunk[i]):
                    handled = True
        if self.n and self.diff(self.ticks_ms(), self.t_first) > 2000:
            self.stats["dropped"] += 1
            self.n = 0
        return handled

    def _byte(self, b):
        buf = self.buf
        if self.n == 0:
            if b != STX:
                return False
            self.t_first = self.ticks_ms()
        buf[self.n] = b
        self.n += 1
        if self.n < HDR:
            return False
        length = _hex(buf, 1, 4)
        if length < 0 or length > MAX_PAYLOAD:
            self.stats["dropped"] += 1
            self.n = 0
            return False
        if self.n < HDR + length + TAIL:
            return False
        self.n = 0
        payload = bytes(buf[HDR:HDR + length])
        crc = _hex(buf, HDR + length, 8)
        req = None
        try:
            req = json.loads(payload)
        except ValueError:
            pass
        if (binascii.crc32(payload) & 0xFFFFFFFF) != crc:
            self.stats["crc"] += 1
            if isinstance(req, dict) and "seq" in req:
                self._send({"seq": req["seq"], "ok": False, "err": "crc", "msg": "frame damaged, send again"})
            return False
        if not isinstance(req, dict):
            self._send({"seq": None, "ok": False, "err": "json", "msg": "payload is not a JSON object"})
            return False
        self.stats["frames"] += 1
        try:
            res = self.ops.call(req)
        except Exception as e:  # noqa: BLE001 - the console must stay up
            res = {"ok": False, "err": "internal", "msg": str(e)}
        res["seq"] = req.get("seq")
        self._send(res)
        after = getattr(self.ops, "after", None)
        if after is not None:
            self.ops.after = None
            after()
        return True

    def _send(self, obj):
        f = frame(obj)
        n = 0
        while n < len(f):
            w = self.port.write(f[n:])
            n += w if w else 0


class Ops:
    """What the console can do. `board` is the running firmware.board.Board,
    or None while the board has no valid commissioning config (then only
    hello, read_config, write_config and reboot work)."""

    def __init__(self, hal, board_def, fsroot, board=None, fw="", fw_digest="", why=""):
        self.hal = hal
        self.bdef = board_def
        self.root = fsroot
        self.board = board
        self.fw = fw
        self.fw_digest = fw_digest
        self.why = why              # why the board is not commissioned
        self.after = None           # run once the answer is out (reboot)
        self.reboot = None          # set by the caller: how to restart

    def call(self, req):
        op = req.get("op")
        fn = getattr(self, "op_" + op, None) if isinstance(op, str) else None
        if fn is None:
            return {"ok": False, "err": "op", "msg": "unknown operation %r" % (op,)}
        if self.board is None and op not in ("hello", "read_config", "write_config", "reboot"):
            return {"ok": False, "err": "uncommissioned", "msg": "no commissioning config yet: " + self.why}
        return fn(req)

    def op_hello(self, req):
        b = self.board
        out = {"ok": True, "proto": PROTO, "fw": self.fw, "fw_digest": self.fw_digest,
               "board": self.bdef.get("name", ""), "channels": [c["name"] for c in self.bdef["channels"]],
               "relays": len(self.bdef.get("relays") or []), "rs485": bool(self.bdef.get("rs485")),
               "commissioned": b is not None}
        if b is not None:
            out["community"] = b.link.community
            out["device"] = b.link.device
            out["cfg"] = binascii.hexlify(b.digest).decode()
            out["boot"] = b.boot
        else:
            out["why"] = self.why
        return out

    def op_status(self, req):
        b = self.board
        return {"ok": True, "connected": b.uplink.connected, "buffered": b.spool.count, "boot": b.boot,
                "seq": b.seq, "readings": b.stats["readings"], "live": b.stats["live"],
                "relays": [r.value for r in b.outputs.relays], "inverter": b.inv_ok,
                "uptime_s": b.uptime_s(), "synced": self.hal.time()[1]}

    def op_measure(self, req):
        b = self.board
        ch = []
        roles = b.roles
        for i in range(b.nch):
            name = self.bdef["channels"][i]["name"]
            ch.append({"name": name, "role": roles.get(name, ""),
                       "w": b.ch[4 * i], "irms_ma": b.ch[4 * i + 3]})
        out = {"ok": True, "readings": b.stats["readings"], "ch": ch}
        r0 = b.last_rs[0] if b.last_rs else None
        if b.fe.has_vref and r0 is not None:
            out["vrms_v"] = r0.vrms_dv / 10
            out["freq_hz"] = r0.freq_chz / 100 if r0.freq_chz else None
        return out

    def op_cal_measure(self, req):
        """Every channel's power as a phasor against the voltage, at gain 1,
        averaged over `windows` new windows (firmware/calibrate.py): the
        commissioning takes it with the test load off and on and finds each
        CT's phase and gain from the difference. a_w, b_w: the channel
        measures a_w cos t + b_w sin t with a phase correction of t degrees;
        sd_w: the spread of one window; gain, phase_deg: what it runs with."""
        b = self.board
        meter = getattr(b.fe, "meter", None)
        if meter is None:
            return {"ok": False, "err": "unsupported",
                    "msg": "this board's metering chip (ATM90E32) keeps the CT phase in its own registers, "
                           "which the commissioning does not set"}
        if not meter.has_vref:
            return {"ok": False, "err": "novref",
                    "msg": "this board has no voltage input: without it neither real power nor a CT's phase "
                           "can be measured"}
        n = req.get("windows", 8)
        if not isinstance(n, int) or not 1 <= n <= 16:
            return {"ok": False, "err": "arg", "msg": "windows is 1..16"}
        from firmware import calibrate
        got = calibrate.measure(meter, n)
        roles = b.roles
        ch = []
        for i in range(len(got)):
            a, bb, sd = got[i]
            c = meter.channels[i]
            ch.append({"name": c.name, "role": roles.get(c.name, ""),
                       "a_w": round(a, 2), "b_w": round(bb, 2), "sd_w": round(sd, 2),
                       "gain": c.gain, "phase_deg": c.phase_deg})
        r0 = meter.results[0] if meter.results else None
        return {"ok": True, "windows": n, "ch": ch, "vrms_v": r0.vrms_dv / 10 if r0 is not None else None}

    def op_read_config(self, req):
        try:
            from firmware import config as fconfig
            cfg, digest = fconfig.load(self.root + "/config.json")
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "err": "noconfig", "msg": str(e)}
        return {"ok": True, "config": fconfig.public(cfg), "cfg": binascii.hexlify(digest).decode()}

    def op_write_config(self, req):
        from firmware import config as fconfig
        cfg = req.get("config")
        if not isinstance(cfg, dict):
            return {"ok": False, "err": "arg", "msg": "config must be an object"}
        text = json.dumps(cfg)
        try:
            fconfig.parse(text)
        except fconfig.ConfigError as e:
            return {"ok": False, "err": "config", "msg": str(e)}
        path = self.root + "/config.json"
        tmp = path + ".new"
        with open(tmp, "w") as f:
            f.write(text)
        with open(tmp) as f:
            back = f.read()
        if back != text:
            return {"ok": False, "err": "flash", "msg": "config did not read back the same: flash fault?"}
        import os
        os.rename(tmp, path)
        _, digest = fconfig.parse(text)
        return {"ok": True, "cfg": binascii.hexlify(digest).decode(), "reboot": True}

    def op_relay(self, req):
        b = self.board
        i = req.get("i")
        v = req.get("v")
        rel = b.outputs.relays
        if not isinstance(i, int) or not 0 <= i < len(rel):
            return {"ok": False, "err": "arg", "msg": "this board has relays 0..%d" % (len(rel) - 1)}
        if v not in (0, 1):
            return {"ok": False, "err": "arg", "msg": "a relay is 0 (open) or 1 (closed)"}
        hold = int(req.get("hold_s", 60))
        hold = 0 if hold < 0 else (86400 if hold > 86400 else hold)   # at most a day, like a lease
        now = self.hal.ticks_ms()
        r = rel[i]
        if r.set(v):
            b.outputs._changed("relay", i, r.value, "console")
        r.until = self.hal.ticks_add(now, hold * 1000)   # back to fail-safe afterwards, like a lease
        b.next_due = now                     # measure now
        return {"ok": True, "i": i, "v": r.value}

    def op_probe_inverter(self, req):
        b = self.board
        if b.master is None:
            return {"ok": False, "err": "rs485", "msg": "no RS485 link on this board or in its config"}
        unit = req.get("unit", 1)
        from firmware import sunspec
        inv = sunspec.Inverter(b.master, unit)
        try:
            inv.discover()
            common = inv.read(1)
        except Exception as e:  # noqa: BLE001
            return {"ok": False, "err": "noanswer", "msg": "no SunSpec inverter at Modbus address %d (%s)" % (unit, e)}
        return {"ok": True, "unit": unit, "manufacturer": common.get("Mn"), "model": common.get("Md"),
                "serial": common.get("SN"), "sunspec_model": inv.model}

    def op_reboot(self, req):
        self.after = self.reboot
        return {"ok": True}
