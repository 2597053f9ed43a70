"""Interval energy from cumulative registers (peergrid.market.intervals):
interpolation at boundaries, conservation, gaps spread and flagged,
reboots stitched without negative energy."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peergrid.market.intervals import Reading, intervals

T0 = 1_795_000_500 - (1_795_000_500 % 900)      # an interval boundary


def test_boundary_is_interpolated() -> None:
    rs = [Reading(T0 - 10, 1, 1, 100, 0), Reading(T0 + 10, 1, 2, 120, 0),
          Reading(T0 + 890, 1, 3, 300, 0), Reading(T0 + 910, 1, 4, 320, 6)]
    (iv,) = intervals(rs, T0, T0 + 900, max_gap_s=60)
    # 110 at T0, 310 at T0 + 900 (export: 0 .. 3)
    assert (iv.imp_wh, iv.exp_wh, iv.estimated) == (200, 3, False)


def test_gap_is_spread_and_flagged() -> None:
    rs = [Reading(T0, 1, 1, 1000, 50), Reading(T0 + 3600, 1, 2, 5000, 50), Reading(T0 + 3610, 1, 3, 5010, 50)]
    ivs = intervals(rs, T0, T0 + 3600 + 900, max_gap_s=60)
    assert [i.imp_wh for i in ivs] == [1000, 1000, 1000, 1000, 10]
    assert [i.estimated for i in ivs] == [True, True, True, True, True]
    assert sum(i.imp_wh for i in ivs) == 5010 - 1000


def test_after_the_newest_reading_is_estimated_and_zero() -> None:
    rs = [Reading(T0 - 5, 1, 1, 10, 0), Reading(T0 + 100, 1, 2, 30, 0)]
    ivs = intervals(rs, T0, T0 + 1800)
    assert ivs[0].estimated and ivs[1].imp_wh == 0 and ivs[1].estimated


def test_reboot_with_registers_restored_lower() -> None:
    # boot 1 counted to 500, the board rebooted and restored 480 from flash
    rs = [Reading(T0, 1, 1, 400, 0), Reading(T0 + 300, 1, 2, 500, 0),
          Reading(T0 + 600, 2, 0, 480, 0), Reading(T0 + 900, 2, 1, 580, 0)]
    (iv,) = intervals(rs, T0, T0 + 900)
    assert iv.imp_wh == 200       # 100 before the reboot, 0 across it, 100 after


def test_backwards_within_a_boot_refused() -> None:
    with pytest.raises(ValueError):
        intervals([Reading(T0, 1, 1, 400, 0), Reading(T0 + 10, 1, 2, 300, 0)], T0, T0 + 900)


def test_bad_boundaries_and_no_data() -> None:
    with pytest.raises(ValueError):
        intervals([], T0 + 1, T0 + 900)
    assert intervals([], T0, T0 + 900) == []
    # intervals before the first reading are left out
    assert intervals([Reading(T0 + 950, 1, 1, 5, 0)], T0, T0 + 1800) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 1200), st.integers(0, 400), st.integers(0, 400),
                          st.integers(0, 20)), min_size=2, max_size=60))
def test_energy_is_conserved(steps) -> None:
    t, imp, exp, boot, seq = T0 - 30, 0, 0, 1, 0
    rs = []
    for dt, di, de, reboot in steps:
        t += dt
        if reboot == 0:                    # a reboot: registers restored a little lower
            boot += 1
            seq = 0
            imp = max(0, imp - di // 4)
            exp = max(0, exp - de // 4)
        else:
            imp += di
            exp += de
            seq += 1
        rs.append(Reading(t, boot, seq, imp, exp))
    end = T0 + 900 * ((t - T0) // 900 + 2)
    ivs = intervals(rs, T0, end)
    assert all(i.imp_wh >= 0 and i.exp_wh >= 0 for i in ivs)
    # the intervals telescope: their sum is the stitched registers' rise
    # from the first boundary to the last one
    if ivs:
        total_i = sum(i.imp_wh for i in ivs)
        again = intervals(rs, ivs[0].start, ivs[-1].end)
        assert sum(i.imp_wh for i in again) == total_i
        # splitting the range anywhere changes nothing
        mid = ivs[len(ivs) // 2].start
        a = intervals(rs, ivs[0].start, mid) + intervals(rs, mid, ivs[-1].end)
        assert [(i.imp_wh, i.exp_wh) for i in a] == [(i.imp_wh, i.exp_wh) for i in ivs]
