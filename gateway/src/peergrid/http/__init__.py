"""The gateway's HTTP server, built to stay up when whoever reaches its port
is hostile: bounded connections, sizes and times.

Owns: server. Imports no other peergrid package; the routes come from the
service (metrics, status) and commissioning (the installer API)."""
