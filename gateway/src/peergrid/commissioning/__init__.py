"""Commissioning a house: board definitions and their checks, the
electrician's `peergrid commission` on a laptop (serial console to the
board, CT fitting, the signed report), and the installer API it talks to
on the gateway.

Owns: boards, commission (the CLI and its steps), checks (the live checks),
report, sheet, errors, console, installer. May import: protocol,
peergrid.community, peergrid.http, peergrid.market (for the gateway's
public key and the ledger). Never imports peergrid.ingest or peergrid.sim."""
