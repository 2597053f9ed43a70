# The loader (docs/OTA.md 3.1): `main.py` on a board, the first code that
# runs. It picks the application slot to start from /ota.json, counts the
# starts of a release on trial and gives a trial up after MAX_TRIES starts
# that never confirmed it, puts the slot's lib/ first on sys.path and starts
# the application. An update never replaces it: it imports nothing of ours,
# so it keeps working whatever a slot holds.
#
# Slots: "" is the flash root (what `make deploy` writes), "a" and "b" are
# /app/a and /app/b (what updates write). The firmware's OTA agent
# (firmware/ota.py) uses the same state functions from its own copy.
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
