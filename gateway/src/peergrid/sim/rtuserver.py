"""A pymodbus Modbus RTU server for one simulated device, in a thread with
its own event loop: the SunSpec inverter and battery (peergrid.sim.sunspec_sim)
and the reference meter (peergrid.sim.refmeter) both answer through it.

`action(start_address, address, current, set_values)` is called for every
request, as pymodbus's simulator calls it: `current` holds the registers
about to be returned (change them in place), `set_values` what a write
brings (None for reads). `delay_s()`, when given, is how long the device
takes to answer this request (s): the answer really leaves that much later,
as a slow inverter's does."""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

log = logging.getLogger("peergrid.sim.rtuserver")


class RtuServer:
    def __init__(self, unit: int, first: int, values: list[int], action: Callable[..., None], path: str,
                 baud: int = 9600, delay_s: Callable[[], float] | None = None) -> None:
        self.unit = unit
        self.first = first
        self.values = values
        self.action = action
        self.path = path
        self.baud = baud
        self.delay_s = delay_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"Modbus RTU server did not start on {self.path}")

    def _run(self, ready: threading.Event) -> None:
        from pymodbus import FramerType
        from pymodbus.server import ModbusSerialServer
        from pymodbus.simulator import SimData, SimDevice
        from pymodbus.simulator.simdata import DataType

        act = self.action
        delay = self.delay_s

        async def action(function_code, start_address, address, n, current, set_values):
            if delay is not None:
                d = delay()
                if d > 0:
                    await asyncio.sleep(d)
            act(start_address, address, current, set_values)
            return None

        dev = SimDevice(id=self.unit, simdata=[SimData(self.first, count=len(self.values), values=self.values,
                                                       datatype=DataType.REGISTERS)], action=action)
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

        def connected(up: bool) -> None:
            if up:
                ready.set()          # the port is open: requests are heard from now on

        async def main() -> None:
            self._server = ModbusSerialServer(dev, framer=FramerType.RTU, port=self.path, baudrate=self.baud,
                                              timeout=0.05, trace_connect=connected)
            await self._server.serve_forever()

        try:
            loop.run_until_complete(main())
        except Exception as e:  # noqa: BLE001 - reported; the thread ends and requests go unanswered
            log.error("Modbus RTU server on %s stopped: %r", self.path, e, exc_info=True)
            ready.set()

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            fut = asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
            try:
                fut.result(5)
            except Exception:  # noqa: BLE001
                pass
        if self._thread is not None:
            self._thread.join(2)
