# The loader (docs/OTA.md 3.1): `main.py` on a board, the first code that
# runs. It picks the application slot to start from /ota.json, counts the
# starts of a release on trial and gives a trial up after MAX_TRIES starts
# that never confirmed it, puts the slot's lib/ first on sys.path and starts
# the application. An update never replaces it: it imports nothing of ours,
# so it keeps working whatever a slot holds.
#
# Slots: "" is the flash root (what `make deploy` writes), "a" and "b" are
# /app/a and /app/b (what updates write). The application uses its own copy
# of this module at start (boot: which release runs, is it on trial) and its
# OTA agent (firmware/ota.py) the same state functions.
#
# Elsewhere (the virtual board on the unix port) it is run as
#   micropython firmware/loader.py <entry module> <folder> [arguments]
# with <folder> as the flash root, and calls <entry>.main([folder, arguments]).
import json
import os
import sys

MAX_TRIES = 3
STATE = "/ota.json"


def slot_root(root, slot):
    return root + "/app/" + slot if slot else (root or "/")


def read_state(root):
    try:
        with open(root + STATE) as f:
            st = json.load(f)
        if isinstance(st, dict) and st.get("active", "") in ("", "a", "b"):
            return st
    except (OSError, ValueError):
        pass
    return {"active": "", "trial": None, "tries": 0}


def write_state(root, st):
    """Replace /ota.json whole: written beside it, then renamed over it,
    so a power cut leaves the old state or the new one."""
    tmp = root + "/ota.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(st))
    os.rename(tmp, root + STATE)


def choose(root):
    """The slot to start, after counting a trial start (state written
    before anything of the trial runs)."""
    st = read_state(root)
    trial = st.get("trial")
    if trial in ("a", "b"):
        tries = st.get("tries", 0) + 1
        if tries > MAX_TRIES:
            st["last"] = {"ota": 5, "rel": st.get("trial_rel", 0), "why": "resets"}
            st["trial"] = None
            st["tries"] = 0
            write_state(root, st)
            return st.get("active", "")
        st["tries"] = tries
        write_state(root, st)
        return trial
    return st.get("active", "")


def running(root):
    """(slot, rel, first 8 bytes of its digest, trial_s, state): the
    release this start runs, for the application (the loader has chosen
    the slot already). Reads the slot's manifest without checking it: it
    was checked when it was installed."""
    st = read_state(root)
    slot = st.get("trial") or st.get("active", "")
    rel, dig, trial_s = 0, b"", 600
    try:
        import hashlib
        from protocol import cbor       # the application's, loaded by then
        with open(slot_root(root, slot).rstrip("/") + "/manifest.cose", "rb") as f:
            cose = cbor.loads(f.read(), max_depth=2, max_items=16, max_container=8, allow_tag=True,
                              max_size=8192)
        payload = cose.value[2]
        m = cbor.loads(payload, max_depth=3, max_items=416, max_container=112, max_size=8192)
        rel = m["seq"]
        trial_s = m.get("trial_s", 600)
        dig = hashlib.sha256(payload).digest()[:8]
    except Exception:  # noqa: BLE001 - no release (make deploy), or not one we can read
        pass
    return slot, rel, dig, trial_s, st


def status_fields(rel, dig, o):
    """Status keys 20-25 (PROTOCOL.md 6.4) from the release running and
    the update's report (or the last outcome kept in /ota.json)."""
    f = {}
    if rel:
        f["rel"] = rel
        f["rel_dig"] = dig
    if o:
        f["ota"] = o.get("ota", 0)
        for k, n in (("rel", "ota_rel"), ("why", "ota_why"), ("got", "ota_got")):
            if o.get(k):
                f[n] = o[k][:24] if k == "why" else o[k]
    return f


def boot(b):
    """At the application's start: what the Board reports (b.rel,
    b.rel_dig, b.ota_fields). True when this start runs a release on trial
    (then the Board loads the update agent to wait for its confirmation; a
    board at work keeps neither the agent's code nor its names in the heap)."""
    slot, b.rel, b.rel_dig, trial_s, st = running(b.fsroot)
    b.ota_last = st.get("last")
    b.ota_fields = status_fields(b.rel, b.rel_dig, b.ota_last)
    return bool(st.get("trial")) and st.get("trial") == slot


def use_slot(root, slot):
    lib = slot_root(root, slot).rstrip("/") + "/lib"
    if slot:
        # an updated slot must not see the factory application's modules
        for p in ("/lib", (root or "") + "/lib"):
            while p in sys.path:
                sys.path.remove(p)
    sys.path.insert(0, lib)


def main():
    if sys.platform == "esp32":
        entry, root, args = "firmware.main", "", None
    else:
        entry, root = sys.argv[1], sys.argv[2]
        args = sys.argv[2:]
    use_slot(root, choose(root))
    __import__(entry)               # by name: the slot's copy, never this file's neighbours
    app = sys.modules[entry]
    return app.main() if args is None else app.main(args)


if __name__ == "__main__":
    sys.exit(main())
