"""The market: interval energies from stored registers, the settlement of an
interval (pure), the settler that appends each settled interval to the
signed ledger exactly once, statements, and governance (keys, votes).

Owns: intervals, settle, settler, ledger, statements, governance. settle,
intervals and the verification half of ledger are pure (no sockets, no
threads, no database). May import: protocol, peergrid.community,
peergrid.sqltx. Never imports peergrid.ingest, peergrid.control or
peergrid.sim."""
