# The OTA agent's heap on the 32-bit MicroPython (tools/mp32), step by step:
# firmware/ota.py (compiled by mpy-cross, as on a board) fetches a whole
# release from a scripted gateway inside this script, checks its signed
# manifest and every file, and switches to it; the Board around it is a
# stand-in holding only what the agent uses (hal, uplink, link, boot, seq,
# board definition, flash root, next_status, reset_pending).
#
#   node tools/mp32/run.mjs --heap 2097152 --step --copy MPY:/mpy --copy WORK:/w --sys /mpy \
#       tests/bench/mp32_ota_heap.py /w [TICKS0]
#
# WORK (written by tests/bench/bench_ota.py) holds setup.json
#   {"cose1": hex, "cose2": hex, "keys1": text of release 1's release_keys.json,
#    "files": [path, ...] (release 2's manifest order), "board": {"name", "heap_bytes"}}
# and rel2/: release 2's files. The runner copies only .py/.mpy/.json files,
# so the signed manifests travel as hex and are written out here first.
#
# The runtime collects garbage only between top-level calls, so everything
# happens in step(): one module imported a step, then one piece a step (the
# answer to the outstanding fwget handed to the agent, the clock moved on by
# the agent's request gap, the agent's tick). gc.mem_alloc() at the start of
# a step is what is live; at the end of a step, before the collection, it is
# live plus that step's garbage (the step that checks the signature holds
# the Ed25519 verifier and all its garbage). Prints one JSON line.
import gc
import json
import os
import sys

W = sys.argv[1] if len(sys.argv) > 1 else "/w"
ROOT = "/flash"
GAP_MS = 50                     # firmware/ota.py PIECE_GAP_MS: one piece a step
MAX_STEPS = 20000
# the board's tick clock 3 s before it wraps (2^30 on a 32-bit port), or argv[2]
TICKS0 = int(sys.argv[2]) if len(sys.argv) > 2 else (1 << 30) - 3000


def _setup():
    with open(W + "/setup.json") as f:
        s = json.load(f)
    for d in (ROOT, ROOT + "/lib"):
        try:
            os.mkdir(d)
        except OSError:
            pass
    # the flash as `make deploy` leaves it: release 1 in slot ""
    with open(ROOT + "/manifest.cose", "wb") as f:
        f.write(bytes.fromhex(s["cose1"]))
    with open(ROOT + "/release_keys.json", "w") as f:
        f.write(s["keys1"])
    # the gateway's copy of release 2
    with open(W + "/rel2/manifest.cose", "wb") as f:
        f.write(bytes.fromhex(s["cose2"]))
    return ["manifest.cose"] + s["files"], s["board"]


PATHS, BOARD = _setup()
BOARD_MODS = ["protocol.errors", "protocol.cbor", "protocol.cose", "protocol.topics", "protocol.messages",
              "protocol.link", "firmware.hal"]            # a board at work has these already
AGENT_MODS = ["protocol.fw", "firmware.loader", "firmware.release", "firmware.ota"]   # loaded for an update
S = {"phase": "base", "i": 0, "base": 0, "mark": 0, "code_board": 0, "code_agent": 0, "stub": 0,
     "peak_live": 0, "peak_in_use": 0, "peak_in_use_step": -1, "steps": 0, "now": TICKS0,
     "req": None, "fwget_msgs": 0, "fwget_bytes": 0, "fw_msgs": 0, "fw_bytes": 0, "b": None, "ota": None,
     "live_after": 0, "live_dropped": 0, "ed_ref": False, "first_req": -1,
     "failed_in": None, "error": None}


def _stub():
    """The Board as far as firmware/ota.py sees it."""
    from firmware import hal as H
    from protocol.link import DeviceLink

    class Hal:
        def ticks_ms(self):
            return S["now"]

        def ticks_add(self, t, d):
            return H.ticks_add(t, d)

        def ticks_diff(self, a, b):
            return H.ticks_diff(a, b)

        def time(self):
            return 1796000000 + S["steps"] * GAP_MS // 1000, True

        def wdt_feed(self):
            pass

    class Uplink:
        connected = True

        def publish(self, topic, frame, qos=0):
            S["fwget_msgs"] += 1
            S["fwget_bytes"] += len(frame)
            return 1

    class Link(DeviceLink):
        def fwget(self, fields):
            S["req"] = (fields["rel"], fields["file"], fields["off"], fields["len"])
            return DeviceLink.fwget(self, fields)

    class Board:
        def __init__(self):
            self.hal = Hal()
            self.uplink = Uplink()
            self.link = Link("oak", "heap1", bytes(range(32)))
            self.boot = 2
            self.seq = 0
            self.name = BOARD["name"]          # what the Board keeps of board.json
            self.heap_bytes = BOARD.get("heap_bytes", 111936)
            self.fsroot = ROOT
            self.next_status = 0
            self.reset_pending = None

        def _next_seq(self):
            self.seq += 1
            return self.seq

    return Board()


def _answer():
    """The gateway's answer to the outstanding request: a piece of release 2."""
    from protocol import cbor
    from protocol.fw import FW_MAX, encode_chunk
    from firmware.release import sha

    rel, fi, off, n = S["req"]
    S["req"] = None
    with open(W + "/rel2/" + PATHS[fi], "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(off)
        data = f.read(n)
    w = cbor.Writer(FW_MAX + 32)
    encode_chunk(w, rel, fi, off, size, data, sha(data).digest()[:8])
    msg = bytes(w.mv[:w.pos])
    S["fw_msgs"] += 1
    S["fw_bytes"] += len(msg)
    return msg


def _emit(done):
    b, ota = S["b"], S["ota"]
    try:
        with open(ROOT + "/ota.json") as f:
            st = json.load(f)
    except (OSError, ValueError):
        st = None
    base = S["base"]
    e = S["error"]
    if isinstance(e, BaseException):
        S["error"] = "step %d (%s): %s: %s" % (S["steps"], S["failed_in"], type(e).__name__, e)
    print(json.dumps({
        "completed": done, "error": S["error"], "reset_pending": b.reset_pending if b else None,
        "ota_json": st, "last": ota.last if ota else None, "agent_stats": ota.stats if ota else None,
        "steps": S["steps"], "base_bytes": base,
        "code_board_bytes": S["code_board"], "code_agent_bytes": S["code_agent"], "stub_bytes": S["stub"],
        "peak_live_bytes": S["peak_live"] - base if S["peak_live"] else None,
        "peak_in_use_bytes": S["peak_in_use"] - base if S["peak_in_use"] else None,
        "peak_in_use_step": S["peak_in_use_step"],
        "live_after_bytes": S["live_after"] - base if S["live_after"] else None,
        "ed25519_in_sys_modules": "firmware.ed25519" in sys.modules,
        "ed25519_kept_by_package": S["ed_ref"],
        "freed_by_dropping_it_bytes": S["live_after"] - S["live_dropped"] if S["live_dropped"] else None,
        "first_request_step": S["first_req"], "ticks0": TICKS0, "gap_ms": GAP_MS,
        "fwget_msgs": S["fwget_msgs"], "fwget_bytes": S["fwget_bytes"],
        "fw_msgs": S["fw_msgs"], "fw_bytes": S["fw_bytes"]}))


def step():
    live = gc.mem_alloc()       # the collector ran when the last step returned
    phase = S["phase"]
    more = True
    try:
        if phase == "base":
            S["base"] = S["mark"] = live
            S["phase"] = "board_mods"
        elif phase in ("board_mods", "agent_mods"):
            mods = BOARD_MODS if phase == "board_mods" else AGENT_MODS
            if S["i"] < len(mods):
                __import__(mods[S["i"]])
                S["i"] += 1
            else:
                S["code_board" if phase == "board_mods" else "code_agent"] = live - S["mark"]
                S["mark"] = live
                S["i"] = 0
                S["phase"] = "agent_mods" if phase == "board_mods" else "stub"
        elif phase == "stub":
            S["b"] = _stub()
            S["phase"] = "stub_done"
        elif phase == "stub_done":
            S["stub"] = live - S["mark"]
            from firmware.ota import Ota
            from protocol import messages
            S["ota"] = Ota(S["b"], ROOT)
            res = S["ota"].command({"op": messages.OP_UPDATE, "target": 0, "value": 2, "lease": 3600, "ctr": 1,
                                    "t": 1796000000}, S["now"])
            if res[0] != 0:
                S["error"] = "OP_UPDATE refused: %r" % (res,)
                _emit(False)
                return False
            S["ota"].tick(S["now"])
            S["phase"] = "fetch"
        elif phase == "fetch":
            if live > S["peak_live"]:
                S["peak_live"] = live
            ota, b = S["ota"], S["b"]
            if S["req"] is not None:
                if S["first_req"] < 0:
                    S["first_req"] = S["steps"]
                ota.inbox = _answer()
            S["now"] = b.hal.ticks_add(S["now"], GAP_MS)
            ota.tick(S["now"])
            S["steps"] += 1
            if b.reset_pending == "update":
                S["phase"] = "after"
            elif ota.phase == 0 or S["steps"] > MAX_STEPS:
                S["error"] = "the agent stopped: %r" % (ota.last,)
                _emit(False)
                more = False
        elif phase == "after":
            # firmware/ota.py drops sys.modules["firmware.ed25519"] after the
            # check; what the verifier still holds is measured by dropping the
            # package's reference to it too (next step)
            S["live_after"] = live
            fw = sys.modules.get("firmware")
            S["ed_ref"] = fw is not None and hasattr(fw, "ed25519")
            if S["ed_ref"]:
                del fw.ed25519
            S["phase"] = "dropped"
        elif phase == "dropped":
            S["live_dropped"] = live
            _emit(True)
            more = False
        elif phase == "failed":
            _emit(False)        # a step later: the failed step's garbage is collected by now
            more = False
    except BaseException as e:  # noqa: B036 - report what stopped the update, a step later
        S["error"] = e          # formatted a step later: the heap may be full now
        S["failed_in"] = phase
        S["phase"] = "failed"
    end = gc.mem_alloc()
    if phase == "fetch" and end > S["peak_in_use"]:
        S["peak_in_use"] = end
        S["peak_in_use_step"] = S["steps"]
    gc.collect()                # on this runtime: collects when step() returns
    return more
