# Helpers for tests that run under both CPython (pytest) and MicroPython
# (tests/mpy_run.py). Only what both interpreters have.
import binascii
import json
import sys

from protocol.errnames import NAMES
from protocol.errors import ProtocolError

IS_MICROPYTHON = sys.implementation.name == "micropython"


def _root():
    f = __file__.replace("\\", "/")
    parts = f.split("/")
    # <root>/tests/shared/util.py
    return "/".join(parts[:-3]) or "."


ROOT = _root()
VECTORS = ROOT + "/protocol/vectors"


try:  # under pytest a Skip is pytest's own skip; tests/mpy_run.py reports SKIP
    import pytest

    Skip = pytest.skip.Exception
except ImportError:
    class Skip(Exception):
        """Raised by a test that cannot run on this interpreter."""


def unhex(s):
    return binascii.unhexlify(s)


def load_json(path):
    with open(path) as f:
        return json.load(f)


def frames():
    return load_json(VECTORS + "/frames.json")["vectors"]


def b64url(s):
    s = s.replace("-", "+").replace("_", "/")
    return binascii.a2b_base64(s + "=" * (-len(s) % 4))


def raises_code(code, fn, *args):
    """Call fn(*args); it must raise ProtocolError with `code`. Returns the error."""
    try:
        fn(*args)
    except ProtocolError as e:
        assert e.code == code, "expected %s, got %s" % (NAMES.get(code), e)
        return e
    raise AssertionError("expected %s, nothing raised" % NAMES.get(code))
