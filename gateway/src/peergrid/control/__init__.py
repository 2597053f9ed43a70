"""Control: switching loads and setting batteries to match the
neighbourhood's demand to its production.

Owns: controller (a pure, deterministic decision over a snapshot of
readings) and loop (turns decisions into leased, signed commands).
controller imports nothing with I/O. May import: protocol,
peergrid.community. Never imports peergrid.ingest or peergrid.sim."""
