"""Firmware updates over the air, the gateway's side (docs/OTA.md 2 and 4):
the release store (`peergrid fleet add`: every file checked against the
signed manifest), serving release pieces to the boards that ask (fwget ->
fw, bounded per board), the record of what each board runs and every step
of its updates (firmware_events), confirming a trial that proved itself,
and staged rollouts that halt on failures.

May import: peergrid.fleet, peergrid.schema, peergrid.community (the
registry: devices and the database), peergrid.config, peergrid.sqltx,
protocol. Commands
go out through the object the gateway hands in (peergrid.control.loop's
Commands, the one counter allocator), so nothing here imports the control
loop or the ingest service; the service calls in (peergrid.ingest.service).
"""
