"""The layout says what the system is (docs/ARCHITECTURE.md), and this keeps
it so: no import cycle anywhere in the gateway, the firmware, the protocol
or the board simulation (imports inside functions count: they close a cycle
at run time just the same); each package imports only what its docstring
allows; the pure cores do no I/O; the board's folders are closed (what a
bundle holds imports nothing outside it but MicroPython's own modules);
no module is over 500 lines; every package says what it owns."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = {"peergrid": ROOT / "gateway" / "src" / "peergrid", "firmware": ROOT / "firmware",
       "protocol": ROOT / "protocol", "boardsim": ROOT / "boardsim"}
MAX_LINES = 500
# modules a board's MicroPython (the ESP32 port, v1.28) has built in or frozen
MICROPYTHON = {"array", "binascii", "collections", "errno", "esp", "esp32", "gc", "hashlib", "io", "json",
               "machine", "math", "micropython", "network", "ntptime", "os", "random", "select", "socket",
               "ssl", "struct", "sys", "time", "ubinascii", "uerrno", "uhashlib", "uos", "uselect",
               "usocket", "ustruct", "utime", "vfs", "cryptolib", "umqtt_pinned", "framebuf", "deflate"}
# what each package may import from the others (its __init__ docstring says why)
ALLOWED = {
    "protocol": {"protocol"},
    "firmware": {"firmware", "protocol"},
    "boardsim": {"boardsim", "firmware", "protocol"},
    "peergrid.community": {"peergrid.community", "peergrid.schema", "peergrid.config", "protocol"},
    "peergrid.http": {"peergrid.http"},
    "peergrid.operate": {"peergrid.operate", "peergrid.community", "peergrid.config", "peergrid.ingest",
                         "peergrid.market", "peergrid.control", "peergrid.commissioning", "peergrid.http",
                         "peergrid.schema", "peergrid.sqltx", "protocol"},
    "peergrid.market": {"peergrid.market", "peergrid.schema", "peergrid.community", "peergrid.sqltx", "protocol"},
    "peergrid.control": {"peergrid.control", "peergrid.schema", "peergrid.community", "protocol"},
    "peergrid.ingest": {"peergrid.ingest", "peergrid.schema", "peergrid.community", "peergrid.config", "peergrid.http",
                        "peergrid.market", "peergrid.control", "peergrid.commissioning", "peergrid.sqltx",
                        "peergrid.fleet", "peergrid.app", "protocol"},
    "peergrid.app": {"peergrid.app", "peergrid.community", "peergrid.market", "peergrid.schema", "protocol"},
    "peergrid.fleet": {"peergrid.fleet", "peergrid.schema", "peergrid.community", "peergrid.config", "peergrid.sqltx",
                       "protocol"},
    "peergrid.commissioning": {"peergrid.commissioning", "peergrid.schema", "peergrid.community", "peergrid.config",
                               "peergrid.http", "peergrid.market", "protocol"},
}
# pure decisions: no sockets, processes, files or databases (validate keeps a
# lock: the MQTT thread and the registry watcher share its tables)
PURE = ("peergrid.market.settle", "peergrid.market.intervals", "peergrid.control.controller",
        "peergrid.ingest.energycheck", "peergrid.ingest.validate")
IO = {"socket", "sqlite3", "subprocess", "paho", "http", "urllib", "asyncio", "select",
      "serial", "shutil", "os", "pathlib", "multiprocessing"}


def _modules() -> dict[str, Path]:
    mods = {}
    for top, base in SRC.items():
        for f in sorted(base.rglob("*.py")):
            rel = f.relative_to(base).with_suffix("")
            parts = [top, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


MODS = _modules()


def _imports(name: str) -> list[tuple[str, int]]:
    """Every module `name` imports, anywhere in its code but annotations-only
    blocks (`if TYPE_CHECKING:`), as (module, line): `from pkg import sub`
    counts as importing pkg.sub when that is a module."""
    tree = ast.parse(MODS[name].read_text())
    typing_only = set()         # `if TYPE_CHECKING:` blocks never run
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for s in node.body for n in ast.walk(s)}
    out = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if MODS[name].name == "__init__.py" else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}".strip(".")
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in MODS else base, node.lineno))
    return out


def _internal(name: str) -> set[str]:
    deps = set()
    for m, _ in _imports(name):
        while m and m not in MODS:
            m = m.rpartition(".")[0]
        if m and m != name:
            deps.add(m)
    return deps


def _package(mod: str) -> str:
    parts = mod.split(".")
    if parts[0] != "peergrid":
        return parts[0]
    if len(parts) > 2 or (len(parts) == 2 and (SRC["peergrid"] / parts[1]).is_dir()):
        return ".".join(parts[:2])
    return mod         # a top-level gateway module: peergrid.cli, peergrid.config ...


def test_no_import_cycle() -> None:
    graph = {m: _internal(m) for m in MODS}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch) -> None:
    # the check above must be able to fail: two modules that import each other
    (tmp_path / "a.py").write_text("def f():\n    from cyc import b\n")
    (tmp_path / "b.py").write_text("from cyc import a\n")
    monkeypatch.setitem(SRC, "cyc", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODS", _modules())
    with pytest.raises(AssertionError, match="cyc.a -> cyc.b -> cyc.a"):
        test_no_import_cycle()


@pytest.mark.parametrize("pkg", sorted(ALLOWED))
def test_packages_import_only_what_they_may(pkg: str) -> None:
    bad = []
    for m in MODS:
        if _package(m) != pkg:
            continue
        for d in sorted(_internal(m)):
            if d != "peergrid" and _package(d) not in ALLOWED[pkg]:     # (the root: __version__)
                bad.append(f"{m} imports {d}")
    assert not bad, "\n".join(bad)


def test_nothing_outside_sim_imports_the_simulation() -> None:
    bad = [f"{m} imports {d}" for m in MODS if _package(m) != "peergrid.sim" and m != "peergrid.cli"
           for d in _internal(m) if _package(d) == "peergrid.sim"]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod", PURE)
def test_pure_cores_do_no_io(mod: str) -> None:
    bad = [f"{mod}:{line} imports {m}" for m, line in _imports(mod) if m.split(".")[0] in IO]
    assert not bad, "\n".join(bad)


def test_the_board_folders_are_closed() -> None:
    # a bundle is firmware/ and protocol/ whole: what they import is in them
    # or in MicroPython's own modules, never a simulation or the gateway
    bad = []
    for m in MODS:
        if _package(m) not in ("firmware", "protocol"):
            continue
        for d, line in _imports(m):
            top = d.split(".")[0]
            if top in ("firmware", "protocol"):
                if d not in MODS and d.rpartition(".")[0] not in MODS:
                    bad.append(f"{m}:{line} imports {d}, which is not in the folder")
            elif top not in MICROPYTHON and d != "__future__":
                bad.append(f"{m}:{line} imports {d}")
    assert not bad, "\n".join(bad)


def test_no_module_over_500_lines() -> None:
    long = {m: n for m, f in MODS.items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_package_says_what_it_owns() -> None:
    quiet = [m for m, f in MODS.items() if f.name == "__init__.py" and not ast.get_docstring(ast.parse(f.read_text()))]
    assert not quiet, quiet
