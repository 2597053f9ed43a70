"""The board's Modbus master and SunSpec client on the real MicroPython
against a pymodbus SunSpec device on a throttled pty at 9600 Bd (each byte
11 bit times on the cable), the device starting each answer after a real
delay. Every cycle the device holds new values, so an answer taken for the
wrong request reads wrong. The 40-cycle run of each latency is
tests/bench/bench_modbus.py; here 10 cycles each, and every one must be
right (10 of 10 is the smallest count that keeps the bench's 39 of 40)."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

from modbus_line import Line
from firmware.modbus import crc16

LATENCIES = (0, 60, 150, 300)


def _parallel(jobs: dict[Any, Callable[[], Any]]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}

    def run(k: Any, fn: Callable[[], Any]) -> None:
        try:
            out[k] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out[k] = e

    ts = [threading.Thread(target=run, args=(k, fn)) for k, fn in jobs.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    for k, v in out.items():
        if isinstance(v, BaseException):
            raise AssertionError(f"{k}: {v!r}") from v
    return out


def _cycles(line: Line, n: int, pause: float = 0.0) -> list[dict[str, Any]]:
    d = line.discovery()
    rs = []
    for i in range(n):
        if pause:
            time.sleep(pause)
        rs.append(line.cycle(i))
    rs.insert(0, d)
    return rs


def _run(latency: float, n: int, **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any], Line]:
    line = Line(latency, **{k: v for k, v in kw.items() if k in ("rs485", "cfg")})
    try:
        if "tamper" in kw:
            line.sim.cable.tamper_b = kw["tamper"]
        rs = _cycles(line, n, kw.get("pause", 0.0))
        st = line.stats()
    finally:
        line.close()
    return rs, st, line


def test_every_value_right_at_each_latency_with_the_timeouts_the_board_computes() -> None:
    t0 = time.monotonic()
    res = _parallel({lat: (lambda lat=lat: _run(lat, 10)) for lat in LATENCIES})
    for lat in LATENCIES:
        rs, st, line = res[lat]
        d = rs[0]
        assert d["inv"] and d["bat"] and d["model"] == 103 and d["serial"] == "SIM0001" and d["max_w"] == 5000, d
        right = sum(1 for r in rs[1:] if r["inv_right"] and r["bat_right"])
        assert right == 10, (lat, [r for r in rs[1:] if not (r["inv_right"] and r["bat_right"])])
        # the board's own computed timeouts (board.json's latency, 500 ms): none ran out
        assert st["stats"]["timeouts"] == 0 and st["stats"]["crc_errors"] == 0, (lat, st)
        # the line is really paced at 9600 Bd: the two reads (8 + 79 and
        # 8 + 129 bytes) cannot take less than their 11-bit characters, plus
        # twice the device's delay
        least = (8 + 79 + 8 + 129) * 11 / 9600 * 1000 + 2 * lat
        assert min(r["ms"] for r in rs[1:]) >= least * 0.95, (lat, least, [r["ms"] for r in rs[1:]])
    assert time.monotonic() - t0 < 40


def _answers(fn: Callable[[bytes], bytes], every: int = 3) -> Callable[[bytes], bytes]:
    """Spoil every `every`-th chunk the device sends (a whole answer as a
    rule: pymodbus writes each answer at once)."""
    n = [0]

    def tamper(data: bytes) -> bytes:
        n[0] += 1
        return fn(data) if n[0] % every == 0 else data
    return tamper


def _other_unit(data: bytes) -> bytes:
    body = bytes((data[0] + 1,)) + data[1:-2]
    c = crc16(body, len(body))
    return body + bytes((c & 0xFF, c >> 8))


def test_hostile_answers_are_refused_and_retried_never_taken() -> None:
    cases = {"garbage": lambda d: b"\x00\xff\x13" + d,
             "wrong unit": _other_unit,
             "truncated": lambda d: d[:-3]}
    # a device known to answer within 100 ms, so each timeout is short
    res = _parallel({k: (lambda fn=fn: _run(0, 4, rs485={"latency_ms": 100}, tamper=_answers(fn)))
                     for k, fn in cases.items()})
    for k, (rs, st, line) in res.items():
        d = rs[0]
        assert d["inv"] and d["bat"] and d["model"] == 103, (k, d)
        for r in rs[1:]:
            # never a wrong value; and with a retry each spoilt answer is recovered
            assert r["inv_right"] and r["bat_right"], (k, r)
        s = st["stats"]
        assert s["crc_errors"] + s["frame_errors"] + s["timeouts"] >= 3, (k, s)
        # a spoilt answer is not a late one: the device's latency stays as configured
        assert st["latency"] == {}, (k, st)
        if k == "wrong unit":
            assert s["frame_errors"] >= 3 and s["crc_errors"] == 0, s
        if k == "truncated":
            assert s["timeouts"] >= 3, s


def _late_case() -> None:
    # the board believes the device answers within 10 ms; it takes 120: every
    # first answer comes after its timeout, while other requests with the
    # same shape (SunSpec's 2-register headers) follow
    rs, st, line = _run(120, 5, rs485={"latency_ms": 10}, pause=0.3)
    for r in rs[1:]:
        assert r["inv"] is None or r["inv_right"], r
        assert r["bat"] is None or r["bat_right"], r
    s = st["stats"]
    assert s["timeouts"] >= 1 and s["late"] >= 1 and s["drained"] > 0, s
    # the late answers taught the master the device's latency, and the
    # device is read right from then on
    assert st["latency"]["1"] >= 120, st
    assert rs[-1]["inv_right"] and rs[-1]["bat_right"], rs[-1]


def _silent_case() -> None:
    line = Line(60, rs485={"latency_ms": 100})
    try:
        assert line.discovery()["inv"]
        assert line.cycle(0)["inv_right"]
        line.sim.mute()
        r = line.cycle(1)
        # missing in the very cycle it went silent (the board flags it then)
        assert r["inv"] is None and r["bat"] is None and "timeout" in r["inv_err"], r
        line.sim.mute(False)
        found = None
        for i in range(2, 8):
            time.sleep(0.5)
            r = line.cycle(i)
            assert r["inv"] is None or r["inv_right"], r
            if r["inv_right"] and r["bat_right"]:
                found = i
                break
        assert found is not None
    finally:
        line.close()


def test_a_late_answer_is_never_taken_and_a_silent_device_is_missing_at_once() -> None:
    _parallel({"late": _late_case, "silent": _silent_case})
