# A release on the board's flash (docs/OTA.md 3.1): the signed manifest's
# envelope, the release keys a slot trusts, and the file-system helpers the
# OTA agent (firmware/ota.py) writes a slot with. Loaded with the agent only.
import hashlib
import json
import os

from protocol import cbor
from firmware import loader

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]  # CPython's stand-in for micropython.const
        return x

MAX_MANIFEST = const(8192)
MAX_FILES = const(96)
_SIGN1 = const(18)
_PROT = b"\xa1\x01\x27"         # {1: -8}: EdDSA


def sha(data=b""):
    h = hashlib.sha256()
    if data:
        h.update(data)
    return h


def isdir(p):
    try:
        return os.stat(p)[0] & 0x4000 != 0
    except OSError:
        return False


def size(p):
    try:
        return os.stat(p)[6]
    except OSError:
        return -1


def rmtree(p):
    if not isdir(p):
        try:
            os.remove(p)
        except OSError:
            pass
        return
    for name in os.listdir(p):
        rmtree(p + "/" + name)
    os.rmdir(p)


def makedirs(p):
    cur = ""
    for part in p.split("/"):
        cur = cur + "/" + part if cur or p.startswith("/") else part
        if part and not isdir(cur):
            try:
                os.mkdir(cur)
            except OSError:
                pass


def good_path(p):
    if not isinstance(p, str) or not 0 < len(p) <= 64 or p[0] == "/" or ".." in p:
        return False
    for c in p:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_./-"):
            return False
    return True


def open_sign1(raw):
    """(kid, protected, payload, signature) of a COSE_Sign1 with EdDSA."""
    t = cbor.loads(raw, max_depth=2, max_items=16, max_container=8, allow_tag=True, max_size=MAX_MANIFEST)
    if not isinstance(t, cbor.Tag) or t.tag != _SIGN1 or not isinstance(t.value, list) or len(t.value) != 4:
        raise ValueError("not a COSE_Sign1")
    prot, unprot, payload, sig = t.value
    if prot != _PROT or not isinstance(unprot, dict) or not isinstance(payload, bytes) \
            or not isinstance(sig, bytes) or len(sig) != 64:
        raise ValueError("COSE_Sign1 headers")
    kid = unprot.get(4)
    if not isinstance(kid, bytes):
        raise ValueError("no kid")
    return kid, prot, payload, sig


def trusted_keys(root, slot):
    try:
        with open(loader.slot_root(root, slot).rstrip("/") + "/release_keys.json") as f:
            keys = json.load(f)
        out = []
        for k in keys[:4]:
            b = bytes.fromhex(k)
            if len(b) == 32:
                out.append(b)
        return out
    except (OSError, ValueError, TypeError):
        return []
