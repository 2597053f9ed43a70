"""Operating a community's gateway: `peergrid init` (the community
directory: config, CA and broker certificate, mosquitto's files, systemd
units), `peergrid doctor` (what is wrong and what to do), `peergrid backup`
and `restore`. (The database's schema versions and migrations are
peergrid/schema.py, which every store uses when it opens.)

Owns: init, doctor (and doctor_net, its network checks), backup, restore.
May import any gateway package but sim; nothing imports it but the CLI."""
