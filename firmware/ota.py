# Firmware updates on the board (docs/OTA.md 3): fetch a release piece by
# piece from the gateway into the slot that is not running, check its signed
# manifest before any file and every file against it, switch with one
# rename of /ota.json and reset into a trial; on trial, wait for the
# gateway's confirmation and give the release up when it does not come.
#
# Loaded only when an update command arrives or a trial runs (the board at
# work keeps none of this in its heap); the Ed25519 verifier is loaded for
# the one signature check and dropped after it. The Board calls:
#   command(cmd, now)  OP_UPDATE / OP_CONFIRM (after the command checks)
#   tick(now)          every loop: ask for the next piece, deadlines
#   inbox              the last fw message received (set by the Board)
#   report()           what the status says about the update
import json
import os
import sys

from protocol import cbor, messages
from protocol.fw import decode_chunk
from protocol.errors import ProtocolError, OK, E_RANGE, E_TARGET
from firmware import loader
from firmware.loader import running, status_fields
from firmware.release import (MAX_MANIFEST, MAX_FILES, sha as _sha, size as _size, rmtree, makedirs,
                              good_path, open_sign1, trusted_keys)

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

_IDLE = const(0)
_FETCH = const(1)
_TRIAL = const(2)
PIECE_WAIT_MS = const(3000)     # a piece not here by then is asked for again
PIECE_GAP_MS = const(50)        # at most 20 requests a second
FILE_TRIES = const(3)           # fetches of one file whose hash is wrong


class Refused(Exception):
    pass


class Ota:
    def __init__(self, b, root):
        self.b = b
        self.root = root
        self.slot, self.rel_now, _, self.trial_s, st = running(root)
        self.phase = _IDLE
        self.last = st.get("last")          # the outcome the status reports
        self.rel = 0                        # the release being fetched
        self.got = 0
        self.deadline = 0
        self.stage = ""
        self.stage_slot = ""
        self.files = []                     # the manifest's [path, size, sha256]
        self.fi = 0                         # file being fetched (0: the manifest)
        self.off = 0
        self.size = -1
        self.h = _sha()
        self.f = None
        self.tries = 0
        self.asked = None                   # ticks of the outstanding request
        self.next_ask = 0
        self.inbox = None
        self.stats = {"pieces": 0, "bad_pieces": 0, "stale": 0, "waits": 0, "refetched": 0}

    # -- what the status says ---------------------------------------------

    def report(self):
        if self.phase == _FETCH:
            return {"ota": messages.OTA_FETCH, "rel": self.rel, "got": self.got}
        if self.phase == _TRIAL:
            return {"ota": messages.OTA_TRIAL, "rel": self.rel_now}
        return self.last

    def fields(self):
        return status_fields(self.b.rel, self.b.rel_dig, self.report())

    def _changed(self):
        b = self.b
        b.next_status = b.hal.ticks_ms()        # a status goes out now

    def _remember(self, last):
        self.last = last
        st = loader.read_state(self.root)
        st["last"] = last
        loader.write_state(self.root, st)

    # -- commands -----------------------------------------------------------

    def command(self, cmd, now):
        rel = cmd["value"]
        if cmd["op"] == messages.OP_CONFIRM:
            if self.phase != _TRIAL or rel != self.rel_now:
                return E_RANGE, self.rel_now or None, 0
            self._confirm()
            return OK, rel, 0
        if rel < 1 or rel == self.rel_now or self.phase == _TRIAL:
            return E_RANGE, self.rel_now or None, 0
        if self.phase == _FETCH and rel == self.rel:
            self.deadline = self.b.hal.ticks_add(now, cmd["lease"] * 1000)
            return OK, rel, cmd["lease"]
        self._close()
        try:
            self._start(rel)
        except OSError as e:
            self._refuse("flash: %r" % (e,))
            return E_TARGET, None, 0
        self.deadline = self.b.hal.ticks_add(now, cmd["lease"] * 1000)
        return OK, rel, cmd["lease"]

    def start_trial(self):
        self.phase = _TRIAL
        hal = self.b.hal
        self.deadline = hal.ticks_add(hal.ticks_ms(), min(self.trial_s, 86400) * 1000)
        self._changed()

    # -- fetching -----------------------------------------------------------

    def _start(self, rel):
        st = loader.read_state(self.root)
        s = "b" if self.slot == "a" or st.get("active") == "a" else "a"
        stage = loader.slot_root(self.root, s)
        mark = stage + "/stage.json"
        try:
            with open(mark) as f:
                same = json.load(f).get("rel") == rel
        except (OSError, ValueError, AttributeError):
            same = False
        if not same:
            rmtree(stage)
            makedirs(stage)
            with open(mark, "w") as f:
                f.write(json.dumps({"rel": rel}))
        self.stage_slot = s
        self.stage = stage
        self.rel = rel
        self.next_ask = self.b.hal.ticks_ms()   # (a fixed 0 would be "later" for half the tick period)
        self.got = 0
        self.files = []
        self.phase = _FETCH
        self._open(0)
        self._changed()

    def _path(self, i):
        return self.stage + "/" + ("manifest.cose" if i == 0 else self.files[i - 1][0])

    def _open(self, i):
        """Start or continue file i; files already complete are kept."""
        while True:
            self.fi = i
            self.tries = 0
            self.h = _sha()
            p = self._path(i)
            have = _size(p)
            if i == 0:
                if have >= 0:
                    os.remove(p)
                have = 0
            else:
                want = self.files[i - 1][1]
                if have > want:
                    os.remove(p)
                    have = 0
                if have > 0:
                    self._hash_file(p)
                if have == want:
                    self.got += have
                    if self.h.digest() == self.files[i - 1][2]:
                        if i == len(self.files):
                            self._switch()
                            return
                        i += 1
                        continue
                    os.remove(p)
                    self.got -= have
                    self.h = _sha()
                    have = 0
                else:
                    self.got += max(have, 0)
                makedirs(p[:p.rfind("/")])
            self.off = max(have, 0)
            self.size = -1 if i == 0 else self.files[i - 1][1]
            self.f = open(p, "ab")
            self.asked = None
            if self.size == self.off:
                self._done_file()
            return

    def _hash_file(self, p):
        buf = bytearray(512)
        with open(p, "rb") as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                self.h.update(buf if n == len(buf) else buf[:n])

    def _close(self):
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
            self.f = None

    def tick(self, now):
        hal = self.b.hal
        if self.phase == _TRIAL:
            if hal.ticks_diff(now, self.deadline) >= 0:
                self._rollback("no confirm")
            return
        if self.phase != _FETCH:
            return
        try:
            if self.inbox is not None:
                m = self.inbox
                self.inbox = None
                self._piece(m, now)
            if self.phase != _FETCH:
                return
            if hal.ticks_diff(now, self.deadline) >= 0:
                self._refuse("lease over")
                return
            if self.asked is not None and hal.ticks_diff(now, self.asked) >= PIECE_WAIT_MS:
                self.stats["waits"] += 1
                self.asked = None
            if self.asked is None and hal.ticks_diff(now, self.next_ask) >= 0 and self.b.uplink.connected:
                self._ask(now)
        except Refused as e:
            self._refuse(str(e))
        except OSError as e:
            self._refuse("flash: %r" % (e,))
        except Exception as e:  # noqa: BLE001 - an update must never stop the board
            self._refuse(repr(e))

    def _ask(self, now):
        b = self.b
        n = messages.FW_CHUNK
        if self.size >= 0 and self.size - self.off < n:
            n = self.size - self.off
        unix, synced = b.hal.time()
        fields = {"boot": b.boot, "seq": b._next_seq(), "t": unix,
                  "flags": 0 if synced else messages.F_CLOCK_UNSYNCED,
                  "rel": self.rel, "file": self.fi, "off": self.off, "len": max(n, 1)}
        if b.uplink.publish(b.link.t_fwget, b.link.fwget(fields), qos=0):
            self.asked = now
            self.next_ask = b.hal.ticks_add(now, PIECE_GAP_MS)

    def _piece(self, m, now):
        try:
            rel, fi, off, size, data, check, err = decode_chunk(m)
        except ProtocolError:
            self.stats["bad_pieces"] += 1
            return
        if self.asked is None or rel != self.rel or fi != self.fi or off != self.off:
            self.stats["stale"] += 1        # late, repeated or not asked for
            return
        self.asked = None
        if err:
            raise Refused("gateway: error %d" % err)
        if _sha(data).digest()[:8] != check or not data and size != off:
            self.stats["bad_pieces"] += 1   # damaged in transit: asked again
            return
        if fi == 0:
            if size > MAX_MANIFEST:
                raise Refused("manifest too big")
            self.size = size
        elif size != self.size:
            raise Refused("file size")
        f = self.f
        if f is None:
            raise Refused("no file open")
        f.write(data)
        self.h.update(data)
        self.off += len(data)
        self.got += len(data)
        self.stats["pieces"] += 1
        if self.off >= self.size:
            self._done_file()
        self.b.hal.wdt_feed()

    def _done_file(self):
        self._close()
        i = self.fi
        if i == 0:
            with open(self._path(0), "rb") as f:
                self.files = self._check_manifest(f.read())
            self._open(1)
            return
        if self.h.digest() != self.files[i - 1][2]:
            self.tries += 1
            self.stats["refetched"] += 1
            os.remove(self._path(i))
            self.got -= self.off
            if self.tries >= FILE_TRIES:
                raise Refused("file hash")
            tries = self.tries
            self._open(i)
            self.tries = tries
            return
        if i == len(self.files):
            self._switch()
        else:
            self._open(i + 1)

    def _check_manifest(self, raw):
        try:
            kid, prot, payload, sig = open_sign1(raw)
        except (ValueError, ProtocolError):
            raise Refused("not a signed manifest")
        key = None
        for k in trusted_keys(self.root, self.slot):
            if _sha(k).digest()[:8] == kid:
                key = k
        if key is None:
            raise Refused("unknown key")
        tbs = cbor.dumps(["Signature1", prot, b"", payload], len(payload) + 64)
        import firmware
        from firmware import ed25519
        ok = ed25519.verify(key, tbs, sig)
        tbs = None
        sys.modules.pop("firmware.ed25519", None)      # its code and tables leave the heap
        if hasattr(firmware, "ed25519"):
            delattr(firmware, "ed25519")
        if not ok:
            raise Refused("bad signature")
        try:
            m = cbor.loads(payload, max_depth=3, max_items=4 * MAX_FILES + 32, max_container=MAX_FILES + 16,
                           max_size=MAX_MANIFEST)
        except ProtocolError:
            raise Refused("manifest not CBOR")
        b = self.b
        if not isinstance(m, dict) or m.get("format") != 1:
            raise Refused("manifest format")
        if m.get("board") != b.name:
            raise Refused("wrong board")
        seq = m.get("seq")
        if seq != self.rel:
            raise Refused("not the release asked")
        if seq < self.rel_now and m.get("downgrade") is not True:
            raise Refused("downgrade")
        heap = m.get("heap")
        if not isinstance(heap, int) or heap > b.heap_bytes * 3 // 4:
            raise Refused("heap")
        t = m.get("trial_s")
        if not isinstance(t, int) or not 10 <= t <= 86400:
            raise Refused("trial_s")
        files = m.get("files")
        if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
            raise Refused("file list")
        keys = False
        for e in files:
            if not isinstance(e, list) or len(e) != 3 or not good_path(e[0]) or not isinstance(e[1], int) \
                    or not 0 <= e[1] <= 1 << 24 or not isinstance(e[2], bytes) or len(e[2]) != 32:
                raise Refused("file entry")
            keys = keys or e[0] == "release_keys.json"
        if not keys:
            raise Refused("no release keys")
        return files

    # -- switching ---------------------------------------------------------

    def _switch(self):
        st = loader.read_state(self.root)
        st["trial"] = self.stage_slot
        st["trial_rel"] = self.rel
        st["tries"] = 0
        st["last"] = {"ota": messages.OTA_TRIAL, "rel": self.rel}
        loader.write_state(self.root, st)
        self.phase = _IDLE
        # until the reset, the status still says fetching: the trial is the
        # next start's to report, with the new release running
        self.last = {"ota": messages.OTA_FETCH, "rel": self.rel, "got": self.got}
        self.b.reset_pending = "update"

    def _confirm(self):
        st = loader.read_state(self.root)
        if st.get("trial"):
            st["prev"] = st.get("active", "")
            st["active"] = st["trial"]
        st["trial"] = None
        st["tries"] = 0
        st["last"] = {"ota": messages.OTA_CONFIRMED, "rel": self.rel_now}
        loader.write_state(self.root, st)
        self.last = st["last"]
        self.phase = _IDLE
        self._changed()

    def _rollback(self, why):
        st = loader.read_state(self.root)
        st["trial"] = None
        st["tries"] = 0
        st["last"] = {"ota": messages.OTA_ROLLED_BACK, "rel": self.rel_now, "why": why}
        loader.write_state(self.root, st)
        self.phase = _IDLE
        self.last = st["last"]
        self.b.reset_pending = "rollback"

    def _refuse(self, why):
        self._close()
        self.phase = _IDLE
        try:
            self._remember({"ota": messages.OTA_REFUSED, "rel": self.rel, "why": why[:24]})
        except OSError:
            self.last = {"ota": messages.OTA_REFUSED, "rel": self.rel, "why": why[:24]}
        self._changed()
