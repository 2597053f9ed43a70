"""Ingest: the gateway service that takes a board's frame from the broker,
checks it (size, topic, device, MAC, schema, replay, clock, physics), stores
what it accepted and counts what it refused.

Owns: service (the MQTT session and the writer), brokerlink (the broker
connection's state, reasons and back-off), validate and energycheck
(pure decisions), wire (the wire contract at C speed), store (SQLite),
mqttsock, metrics. May import: protocol, peergrid.community, peergrid.http,
and, where the service starts them, peergrid.market and peergrid.control.
Never imports peergrid.sim or peergrid.commissioning's laptop side."""
