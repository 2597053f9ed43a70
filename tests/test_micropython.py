"""Runs the shared test modules (tests/shared/test_*.py) under the real
MicroPython unix port and under the 32-bit MicroPython (tools/mp32: 31-bit
small ints, ticks wrapping at 2^30), both from the .mpy files that mpy-cross
made (what goes onto a board; a run from source compiled the same code with
the same compiler and was dropped to keep make test within its budget);
reports every MicroPython test as its own pytest item."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import ROOT, mp32_tree, run_micropython, run_mp32

SHARED = sorted(p.stem for p in (ROOT / "tests" / "shared").glob("test_*.py"))
_cache: dict[tuple[str, str], dict[str, str]] = {}


def _results(module: str, variant: str, mpy_dir: Path | None) -> dict[str, str]:
    key = (module, variant)
    if key not in _cache:
        if variant == "mpy32":
            proc = run_mp32(["tests/mpy_run.py", module], mp32_tree(mpy_dir))
        else:
            base = [mpy_dir] if variant == "mpy" else [ROOT]
            proc = run_micropython(["tests/mpy_run.py", module], base + [ROOT / "tests" / "shared", ROOT / "tests"],
                                   heap="2M")
        res: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            m = re.match(r"(PASS|FAIL|SKIP) (\S+)::(\S+)(.*)", line)
            if m:
                res[m.group(3)] = m.group(1) + m.group(4)
        if not res:
            res["<module>"] = f"FAIL rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        _cache[key] = res
    return _cache[key]


def _cases():
    import ast

    for mod in SHARED:
        tree = ast.parse((ROOT / "tests" / "shared" / f"{mod}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                yield mod, node.name


@pytest.mark.parametrize("variant", ["mpy", "mpy32"])
@pytest.mark.parametrize("module,name", list(_cases()))
def test_under_micropython(module: str, name: str, variant: str, mpy_dir: Path) -> None:
    res = _results(module, variant, None if variant == "source" else mpy_dir)
    if "<module>" in res:
        pytest.fail(res["<module>"])
    got = res.get(name, "MISSING (runner did not report it)")
    if got.startswith("SKIP"):
        pytest.skip(got)
    assert got == "PASS", got


def test_mpy_cross_compiles_everything(mpy_dir: Path) -> None:
    srcs = sorted((ROOT / "protocol").rglob("*.py"))
    assert srcs
    for src in srcs:
        assert (mpy_dir / src.relative_to(ROOT)).with_suffix(".mpy").stat().st_size > 0


def test_runner_reports_failures(tmp_path: Path) -> None:
    # The runner must be able to fail: a module with a failing test.
    (tmp_path / "test_canary.py").write_text("def test_no():\n    assert 1 == 2\n\ndef test_yes():\n    pass\n")
    proc = run_micropython(["tests/mpy_run.py", "test_canary"], [tmp_path, ROOT / "tests" / "shared", ROOT])
    assert "1 passed, 1 failed" in proc.stdout and proc.returncode == 1
