# The meter board's application: measure, seal, publish or buffer, obey
# commands. One cooperative loop (`step`), no threads:
#
#   every loop   uplink.step() (connect / keepalive / read commands),
#                handle queued commands, expire leases, send what is due
#   every period measure all channels, read the inverter and battery, add
#                the energy to the registers (saved to flash by policy),
#                seal a reading: publish it live when connected, otherwise
#                append it to the flash spool with F_BUFFERED
#   while a spool backlog exists and the broker is up: replay the oldest,
#                at most replay_per_s a second, live readings first
#
# At most one reading is in flight (published, PUBACK not yet seen). A
# buffered reading leaves the spool only after its PUBACK; a live reading
# whose PUBACK does not come within ack_timeout_s drops the session and goes
# into the spool with its exact bytes (the gateway drops an exact duplicate
# quietly, PROTOCOL.md 7.4). The watchdog is fed when a reading was built and
# stored or sent, and when a command was handled: progress, not a timer.
import gc

from protocol import link as plink
from protocol import messages
from firmware import commands
from firmware.energy import RegisterStore
from firmware.outputs import Outputs, Relay, BatteryOut
from firmware.spool import Spool
from firmware.state import Counter
from firmware.uplink import Uplink

FW_VERSION = "0.4.0"

_LIVE = 1
_SPOOLED = 2


class Board:
    def __init__(self, hal, board, cfg, digest, net, fsroot, rs485=None, on_event=None):
        self.hal = hal
        # what the board at work needs of its definition and config: the
        # two dicts themselves are not kept (about 3 KB of heap)
        self.name = board["name"]
        self.heap_bytes = board.get("heap_bytes", 111936)
        self.ack_timeout_ms = cfg["ack_timeout_s"] * 1000
        self.digest = digest
        self.on_event = on_event
        # uptime: whole seconds and the ms not yet a second, accumulated
        # every loop from the tick difference since the last update (one
        # difference since boot would turn negative after 2^29 ms, 6.2 days)
        self.up_s = 0
        self.up_ms = 0
        self.up_last = hal.ticks_ms()
        self.boot = Counter(fsroot, "boot").bump()      # before anything is sent
        self.fsroot = fsroot
        self.reset_pending = None       # why the entry loop must save and reset (an update)
        self.seq = 0
        from firmware.config import secret     # config.py is needed at boot only (boot.settle unloads it)
        self.link = plink.DeviceLink(cfg["community"], cfg["device"], secret(cfg))
        nch = len(board["channels"])
        self.nch = nch
        cal = cfg.get("channels") or {}
        # each channel's role for the commissioning console
        self.roles = {}
        for name in cal:
            r = cal[name].get("role") if isinstance(cal[name], dict) else None
            if r:
                self.roles[name] = r
        self.uncalibrated = False
        for c in board["channels"]:
            k = cal.get(c["name"]) or {}
            if "gain" not in k:
                self.uncalibrated = True
        self.adc_cal = None             # where the ADC's linearisation came from
        lut = None
        if (board.get("frontend") or {}).get("type", "adc") == "adc":
            from firmware import adccal     # boot only: firmware/boot.py unloads it
            lut, self.adc_cal = adccal.lut(hal, fsroot)
            if lut is None:
                self.uncalibrated = True
        from firmware.frontend import open_frontend     # the start only: boot.settle unloads it
        self.fe = open_frontend(hal, board, cal=cal, frames=cfg["frames"], lut=lut)
        lut = None
        self.store = RegisterStore(hal.flash("energy", 16 * 4096), nch, max_w=23000,
                                   period_ms=cfg["period_s"] * 1000, diff=hal.ticks_diff)
        self.store.load()
        self.regs = self.store.regs
        self.energy_loss = self.store.lost_wh_bound > 0
        self.spool = Spool(hal.flash("spool", cfg["spool_kb"] * 1024))
        self.spool.mount()
        self.ch = [0] * (4 * nch)
        self.live = bytearray(512)      # a live reading not yet published
        self.live_len = 0
        self.fly = bytearray(512)       # the live reading in flight; a replayed one is read into it too
        self.fly_len = 0                # (only when nothing is in flight and nothing live waits)
        self.inflight = None            # [pid, source, io ms sent]
        self.period_ms = cfg["period_s"] * 1000
        self.next_due = hal.ticks_add(hal.ticks_ms(), self.period_ms)
        self.last_meas = hal.ticks_ms()
        self.status_ms = cfg["status_s"] * 1000
        self.next_status = None
        self.replay_gap = 1000 // max(1, cfg["replay_per_s"])
        self.next_replay = hal.io_ms()
        self.synced = False
        self.next_sync = hal.io_ms()
        self.cmdq = []
        self.net = net
        # RS485: inverter and battery (firmware/inverters.py, imported only
        # with an RS485 master: a board without one never loads it)
        self.master = rs485
        self.inv = None
        self.inv_ok = False
        self.bat = None
        self.bat_ok = False
        self.bat_vals = None
        self.inverters = None
        if rs485 is not None:
            from firmware import inverters
            inverters.attach(self, rs485, cfg)
            self.inverters = inverters
        relays = []
        rdefs = board.get("relays") or []
        rcfg = cfg["relays"]
        for i in range(len(rdefs)):
            r = rdefs[i]
            fs = rcfg[i].get("failsafe", 0) if i < len(rcfg) else 0
            relays.append(Relay(hal.pin_out(r["pin"], 0 if r.get("active_high", True) else 1),
                                r.get("active_high", True), fs, r.get("name", "")))
        bats = []
        if self.bat is not None:
            bats.append(BatteryOut(self.bat, cfg["battery"].get("max_w", 5000)))
        self.outputs = Outputs(hal, relays, bats, Counter(fsroot, "cmd_ctr"),
                               cfg["cmd_timeout_s"], on_change=self._out_changed)
        self.uplink = Uplink(hal, net, cfg, self.link, self._on_cmd, self._will, self._birth)
        self._t_fw = self.link.t_fw.encode()
        self.outputs.on_fw = self._fw_cmd
        self.ota = None                 # the update agent, while an update or a trial runs
        self.rel = 0                    # the release running and its digest (status 20, 21)
        self.rel_dig = b""
        self.ota_fields = {}
        from firmware import loader     # what runs, whether it is on trial (boot.settle unloads it)
        if loader.boot(self):           # on trial: the agent waits for the confirmation
            from firmware import ota
            self.ota = ota.Ota(self, fsroot)
            self.ota.start_trial()
        self.stats = {"readings": 0, "live": 0, "buffered": 0, "replayed": 0, "acked": 0,
                      "spool_errors": 0, "cmd_ok": 0, "cmd_rejected": 0, "cmd_ignored": 0,
                      "ack_timeouts": 0, "missed_periods": 0, "inv_errors": 0, "bat_errors": 0}
        self.rejects = {}               # error code -> count, commands refused
        self.min_free = hal.mem_free()  # lowest free heap right after a collection
        self.heap_peak = 0              # most heap in use at once (see _heap)
        self._alloc0 = -1
        self.heap_live = 0              # most heap still in use after a collection
        self.heap_cycle = 0             # most allocated between two collections
        self.frame_len = 0
        self.last_rs = None             # the last measurement's results (console)
        self.spool_failure = None       # the last exception a spool write raised
        self.clip = 0                   # the last reading's clipped and faulty CTs (bit masks)
        self.ctf = 0

    # -- messages ---------------------------------------------------------

    def _next_seq(self):
        s = self.seq
        self.seq = s + 1
        return s

    def _flags(self):
        f = 0
        if not self.hal.time()[1]:
            f |= messages.F_CLOCK_UNSYNCED
        if not self.fe.has_vref:
            f |= messages.F_NO_VREF
        if self.energy_loss:
            f |= messages.F_ENERGY_LOSS
        if self.uncalibrated:
            f |= messages.F_UNCALIBRATED
        return f

    def _status(self, online):
        unix, synced = self.hal.time()
        fields = {"boot": self.boot, "seq": self._next_seq(), "t": unix,
                  "flags": 0 if synced else messages.F_CLOCK_UNSYNCED,
                  "fw": FW_VERSION, "cfg": self.digest, "reset": self.hal.reset_cause(),
                  "heap": self.hal.mem_free(), "uptime": self.uptime_s(),
                  "buffered": self.spool.count, "online": online,
                  "board": self.name}
        if self.spool.dropped:
            fields["dropped"] = self.spool.dropped
        if self.store.lost_wh_bound:
            fields["lost_wh"] = self.store.lost_wh_bound
        if self.stats["spool_errors"]:
            fields["spool_err"] = self.stats["spool_errors"]
        u = self.uplink
        fields["tls"] = 1 if u.tls else 0       # 0: the link to the broker is plain text
        if u.stats["tls_err"]:
            fields["tls_err"] = u.stats["tls_err"]
            fields["tls_why"] = u.stats["tls_why"]
        meas = self.fe.take_fraction()
        if meas is not None:
            fields["meas"] = meas
        fields.update(self.ota.fields() if self.ota is not None else self.ota_fields)
        return self.link.status(fields)

    def _will(self):
        return self._status(0)

    def _birth(self):
        self.next_status = self.hal.ticks_add(self.hal.ticks_ms(), self.status_ms)
        return self._status(1)

    def _uptime(self, now):
        """Add the board time since the last call (called every loop, so
        far less than 2^29 ms apart); no allocation below 2^30 s."""
        d = self.hal.ticks_diff(now, self.up_last)
        self.up_last = now
        if d > 0:
            ms = self.up_ms + d
            if ms >= 1000:
                s = ms // 1000
                self.up_s += s
                ms -= s * 1000
            self.up_ms = ms

    def uptime_s(self):
        self._uptime(self.hal.ticks_ms())
        return self.up_s

    def _out_changed(self, kind, i, v, why):
        if self.on_event is not None:
            self.on_event({"ev": kind, "i": i, "v": v, "why": why})

    # -- commands (handled in firmware/commands.py) -------------------------

    def _fw_cmd(self, cmd, now):
        if self.ota is None:
            from firmware import ota
            self.ota = ota.Ota(self, self.fsroot)
        return self.ota.command(cmd, now)

    def _on_cmd(self, topic, msg):
        if topic == self._t_fw:
            if self.ota is not None:
                self.ota.inbox = bytes(msg)     # one piece is asked for at a time
            return
        if len(self.cmdq) < 8:
            self.cmdq.append((bytes(topic), bytes(msg)))
        else:
            self.stats["cmd_ignored"] += 1

    # -- readings ----------------------------------------------------------

    def measure(self, now, dt_ms):
        rs = self.fe.update(self.regs, dt_ms)
        self.last_rs = rs
        ch = self.ch
        for i in range(self.nch):
            r = rs[i]
            imp, exp, _, _ = self.regs.get(i)
            ch[4 * i] = r.p_w
            ch[4 * i + 1] = imp
            ch[4 * i + 2] = exp
            ch[4 * i + 3] = r.irms_ma
        inv = bat = None
        flags = 0
        if self.inverters is not None:
            inv, bat, flags = self.inverters.poll(self, now)
        self.store_save(now)
        fe = self.fe
        clip = 0
        ctf = 0
        for i in range(self.nch):
            f = rs[i].fault
            if f & 1:
                clip |= 1 << i
            if f & 2:
                ctf |= 1 << i
        ff = fe.fault
        if ff & 2:
            clip |= messages.CLIP_VREF
        if clip:
            flags |= messages.F_CLIPPED
        if ctf:
            flags |= messages.F_CT_FAULT
        if ff & 1:
            flags |= messages.F_VREF_FAULT
        if ff & 4:
            flags |= messages.F_FREQ_RANGE
        self.clip = clip
        self.ctf = ctf
        r0 = rs[0]
        # a dead reference in the last window: no voltage, no frequency
        live = fe.has_vref and not ff & 1
        vrms = r0.vrms_dv if live else None
        freq = r0.freq_chz if live and r0.freq_chz else None
        return vrms, freq, inv, bat, flags

    def store_save(self, now):
        try:
            self.store.maybe_save(now)
        except OSError:
            pass    # the flash failed this time; the policy retries next period

    def reading(self, now, dt_ms):
        vrms, freq, inv, bat, flags = self.measure(now, dt_ms)
        flags |= self._flags()
        online = self.uplink.connected
        if not online:
            flags |= messages.F_BUFFERED
        unix = self.hal.time()[0]
        frame = self.link.reading(self.boot, self._next_seq(), unix, flags, vrms, freq,
                                  self.ch, self.nch, inv, bat, self.fe.meas_permille, self.clip, self.ctf)
        self.stats["readings"] += 1
        self.frame_len = len(frame)
        if online:
            if self.live_len:
                # the previous live reading is still waiting: it goes to flash
                self._spool(memoryview(self.live)[:self.live_len])
                self.stats["buffered"] += 1
            n = len(frame)
            self.live[:n] = frame
            self.live_len = n
        else:
            self._spool(frame)
            self.stats["buffered"] += 1
        self.hal.wdt_feed()

    def _spool(self, frame):
        try:
            self.spool.append(frame)
        except Exception as e:  # noqa: BLE001 - flash failed (or no memory): counted, loop goes on
            # the reading is lost: counted here and reported in every status
            # (spool_err), so the gateway knows why its sequence has a gap;
            # the kind of the last failure for the console and the logs
            self.stats["spool_errors"] += 1
            self.spool_failure = e

    # -- sending -----------------------------------------------------------

    def _send(self):
        up = self.uplink
        for pid in up.take_acks():
            f = self.inflight
            if f is not None and f[0] == pid:
                if f[1] == _SPOOLED:
                    self.spool.pop()
                    self.stats["replayed"] += 1
                else:
                    self.fly_len = 0
                    self.stats["live"] += 1
                self.stats["acked"] += 1
                self.inflight = None
        if not up.connected:
            self._lost()
            return
        f = self.inflight
        if f is not None:
            if self.hal.io_diff(self.hal.io_ms(), f[2]) > self.ack_timeout_ms:
                self.stats["ack_timeouts"] += 1
                up._drop("no PUBACK within %d s" % (self.ack_timeout_ms // 1000))
                self._lost()
            return
        if self.live_len:
            # the live buffer becomes the in-flight one (no copy)
            self.live, self.fly = self.fly, self.live
            self.fly_len = self.live_len
            self.live_len = 0
            pid = up.publish(self.link.t_reading, memoryview(self.fly)[:self.fly_len])
            if pid:
                self.inflight = [pid, _LIVE, self.hal.io_ms()]
            else:
                self.inflight = [0, _LIVE, 0]
                self._lost()
            return
        if self.spool.count and self._replay_due():
            # nothing in flight, no live reading waiting: fly is free, and
            # fly_len stays 0, so a lost session spools nothing from it
            n = self.spool.peek(self.fly)
            if n:
                pid = up.publish(self.link.t_reading, memoryview(self.fly)[:n])
                if pid:
                    self.inflight = [pid, _SPOOLED, self.hal.io_ms()]
                    self.next_replay = self.hal.io_add(self.hal.io_ms(), self.replay_gap)

    def _replay_due(self):
        """The replay pacing allows the next one: next_replay is at most
        replay_gap ahead, so a value further ahead is one left from long ago
        (no backlog for 2^29 ms) and counts as due."""
        ahead = self.hal.io_diff(self.next_replay, self.hal.io_ms())
        return ahead <= 0 or ahead > self.replay_gap

    def _lost(self):
        """The session is gone: what was live goes to flash, exact bytes."""
        f = self.inflight
        self.inflight = None
        if f is not None and f[1] == _LIVE and self.fly_len:
            self._spool(memoryview(self.fly)[:self.fly_len])
            self.stats["buffered"] += 1
        self.fly_len = 0
        if self.live_len:
            self._spool(memoryview(self.live)[:self.live_len])
            self.stats["buffered"] += 1
            self.live_len = 0

    # -- loop --------------------------------------------------------------

    def step(self):
        hal = self.hal
        if not self.synced and hal.io_diff(hal.io_ms(), self.next_sync) >= 0:
            self.synced = self.net.up() and self.net.sync_time(hal)
            self.next_sync = hal.io_add(hal.io_ms(), 60000)
        self.uplink.step()
        now = hal.ticks_ms()
        self._uptime(now)
        if self.cmdq:
            commands.handle(self, now)
        if self.ota is not None:
            self.ota.tick(now)
        self.outputs.tick(now)
        if hal.ticks_diff(now, self.next_due) >= 0:
            dt = hal.ticks_diff(now, self.last_meas)
            self.last_meas = now
            late = hal.ticks_diff(now, self.next_due)
            if late >= self.period_ms:
                # the loop fell behind (or the clock jumped): one reading
                # covers the whole time, none is made up
                self.stats["missed_periods"] += late // self.period_ms
                self.next_due = hal.ticks_add(now, self.period_ms)
            else:
                self.next_due = hal.ticks_add(self.next_due, self.period_ms)
            self.reading(now, dt)
            self._heap()
        self.uplink.poll()
        self._send()
        if self.uplink.connected and self.next_status is not None \
                and hal.ticks_diff(now, self.next_status) >= 0:
            self.next_status = hal.ticks_add(now, self.status_ms)
            self.uplink.publish(self.link.t_status, self._status(1), retain=True)

    def _heap(self):
        """Collect after every reading (short pauses, no fragmentation
        build-up) and keep the figures: the heap in use just before the
        collection is everything one reading cycle needed at once, unless
        the collector already ran by itself in between."""
        mem_alloc = getattr(gc, "mem_alloc", None)
        if mem_alloc is None:       # CPython
            return
        a1 = mem_alloc()
        gc.collect()
        a0 = mem_alloc()
        if 0 <= self._alloc0 <= a1:
            if a1 > self.heap_peak:
                self.heap_peak = a1
            if a1 - self._alloc0 > self.heap_cycle:
                self.heap_cycle = a1 - self._alloc0
        if a0 > self.heap_live:
            self.heap_live = a0
        self._alloc0 = a0
        f = gc.mem_free()
        if f < self.min_free:
            self.min_free = f

    def idle(self):
        """Nothing urgent to do: measure one more window (a front end that
        samples, so the windows follow each other back to back), or wait a
        little, until the next reading, at most 50 ms of board time."""
        if self.live_len or self.cmdq:
            return
        if self.fe.continuous and self.hal.continuous:
            self.fe.window(self.regs)
            return
        if self.spool.count and self.uplink.connected:
            return
        wait = self.hal.ticks_diff(self.next_due, self.hal.ticks_ms())
        self.hal.idle(wait if wait < 50 else 50)

    def run(self):
        while True:
            self.step()
            self.idle()

    def shutdown(self):
        """Clean stop: registers saved as clean, offline status published."""
        try:
            self.store.save(self.hal.ticks_ms(), clean=True)
        except OSError:
            pass
        self.uplink.close(bytes(self._status(0)))
