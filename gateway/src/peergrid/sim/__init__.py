"""Everything that only simulates hardware or neighbours, for tests, the
bench and `make demo`: the virtual board (the real firmware on MicroPython
with simulated hardware), simulated CPython boards, the SunSpec inverter and
battery and the reference meter on pseudo-terminals, household profiles,
and the demo.

Owns: vboard, simboard, sunspec_sim, refmeter, rtuserver, ptycable,
profiles, demo. May import any peergrid package; nothing outside peergrid.sim
imports it."""
