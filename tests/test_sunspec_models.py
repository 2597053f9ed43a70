"""The firmware's compact SunSpec point table (firmware/sunspec.py) against
the SunSpec model definitions that pysunspec2 ships: every offset, type,
size and model length must agree, so the table cannot drift from the spec."""
from __future__ import annotations

import pytest

from firmware import sunspec
from peergrid.sim.sunspec_sim import model_length, model_points

TYPES = {sunspec.U16: {"uint16"}, sunspec.I16: {"int16"}, sunspec.ACC32: {"acc32"}, sunspec.U32: {"uint32"},
         sunspec.SF: {"sunssf"}, sunspec.ENUM: {"enum16"}, sunspec.F32: {"float32"},
         sunspec.STR: {"string"}, sunspec.BITS: {"bitfield16"}}
MODELS = sorted(set(sunspec.POINTS) | set(sunspec.SAME))


@pytest.mark.parametrize("mid", MODELS)
def test_points_match_the_definition(mid: int) -> None:
    defs = {name: (off, typ, size) for name, off, typ, size in model_points(mid)}
    table = sunspec.layout(mid)
    assert table, f"no layout for model {mid}"
    for name, off, typ, size in table:
        assert name in defs, f"model {mid} has no point {name}"
        d_off, d_typ, d_size = defs[name]
        assert (off, size) == (d_off, d_size), f"model {mid} {name}: table {off}/{size}, spec {d_off}/{d_size}"
        assert d_typ in TYPES[typ], f"model {mid} {name}: table type {typ}, spec {d_typ}"


@pytest.mark.parametrize("mid", sorted(sunspec.LENGTHS))
def test_model_lengths(mid: int) -> None:
    assert sunspec.LENGTHS[mid] == model_length(mid)


def test_required_models_covered() -> None:
    for mid in (1, 101, 102, 103, 111, 112, 113, 120, 124, 201, 202, 203, 204, 802):
        assert sunspec.layout(mid), mid
        assert mid in sunspec.LENGTHS


def test_a_wrong_table_would_be_caught() -> None:
    # the check above is not vacuous: a shifted offset differs from the spec
    defs = {name: off for name, off, _, _ in model_points(103)}
    assert defs["W"] == 12 and defs["WH"] == 22 and defs["St"] == 36
    assert defs["W"] + 1 != dict((n, o) for n, o, _, _ in sunspec.layout(103))["W"]
