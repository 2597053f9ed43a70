# Runs under MicroPython (called by bench_wire.py): time to encode and MAC one
# 4-channel reading with inverter data, and heap bytes allocated per reading.
import sys
import time
import gc
from protocol import gateway_end, link

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
d = link.DeviceLink("oak", "d3f9a2", bytes(range(32)))
ch = [-1520, 2412345, 1203456, 6800, 2890, 12, 3034567, 12600,
      -800, 1345678, 1298765, 3500, 1210, 4567890, 0, 5300]
inv = [4, 2890, 6012345]
for i in range(20):
    d.reading(12, i, 1795000000, 0, 2304, 5001, ch, 4, inv, None)
gc.collect()
a0 = gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0
gc.disable()
t0 = time.ticks_us()
for i in range(n):
    f = d.reading(12, 4711 + i, 1795000000 + 10 * i, 0, 2304, 5001, ch, 4, inv, None)
dt = time.ticks_diff(time.ticks_us(), t0)
a1 = gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0
gc.enable()
t0 = time.ticks_us()
for i in range(n):
    gateway_end.open_uplink(d.t_reading, f, lambda c, dv: bytes(range(32)))
dv = time.ticks_diff(time.ticks_us(), t0)
print("RESULT %d %d %d %d" % (n, dt, a1 - a0, dv))
