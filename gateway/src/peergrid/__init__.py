"""PeerGrid gateway: the CPython side of the wire contract, on the
neighbourhood's router.

Packages, in the order a reading meets them (docs/ARCHITECTURE.md):
community (members, devices, the broker's files), ingest (the service: MQTT,
validation, storage), market (intervals, settlement, the ledger,
statements, governance), control (decisions and leased commands),
commissioning (boards, the electrician's laptop, the installer API), http
(the hardened server), operate (init, doctor, backup, restore), sim
(simulated boards and neighbours, the demo). Top level: cli and admin (the
operator's commands), config (peergrid.toml), schema (the database's
version and migrations), sqltx (one SQLite transaction). Nothing but sim
and the CLI imports sim."""
__version__ = "0.1.0"
