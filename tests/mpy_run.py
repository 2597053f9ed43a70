# Test runner for MicroPython: runs every test_* function of the modules named
# on the command line and prints one line per test, then "N passed, N failed".
# Used by tests/test_micropython.py; runs under CPython too.
import sys

try:
    from util import Skip
except ImportError:
    Skip = None


def main(names):
    passed = failed = skipped = 0
    for modname in names:
        mod = __import__(modname)
        for name in sorted(dir(mod)):
            if not name.startswith("test_"):
                continue
            fn = getattr(mod, name)
            if not callable(fn):
                continue
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - report and go on
                if Skip is not None and isinstance(e, Skip):
                    skipped += 1
                    print("SKIP %s::%s %s" % (modname, name, e))
                    continue
                failed += 1
                print("FAIL %s::%s %s: %s" % (modname, name, type(e).__name__, e))
                if hasattr(sys, "print_exception"):
                    sys.print_exception(e)
                continue
            passed += 1
            print("PASS %s::%s" % (modname, name))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))
    return failed


if __name__ == "__main__":
    sys.exit(1 if main(sys.argv[1:]) else 0)
