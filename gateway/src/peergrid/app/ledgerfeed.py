"""The ledger for the members' mirrors (issue 22), from the gateway's main
loop: the head of the ledger on MQTT as it grows, and the witnesses the
mirrors sent (peergrid.app.members: POST /app/api/witness) put into the
ledger as a `witness` entry, at most once per `witness_every_s`.

    pgl/<community>/head            {"height", "hash", "key"} retained, by the gateway
    pgl/<community>/witness/<m>     {"height", "hash", "sig"} retained, by member m's mirror
    pgl/<community>/alarm/<m>       {"kind", "msg", ...} retained, by member m's mirror

Entries themselves do not go over MQTT: one settlement of a hundred
members is larger than the broker passes (community.broker.MESSAGE_LIMIT);
a mirror fetches them from /app/api/ledger/since when the head moves.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

log = logging.getLogger("peergrid.ledgerfeed")


def head_topic(community: str) -> str:
    return f"pgl/{community}/head"


def witness_topic(community: str, member: int | str) -> str:
    return f"pgl/{community}/witness/{member}"


def alarm_topic(community: str, member: int | str) -> str:
    return f"pgl/{community}/alarm/{member}"


class LedgerFeed:
    def __init__(self, gw: Any, opts: dict[str, Any]) -> None:
        self.gw = gw
        self.every_s = float(opts.get("witness_every_s", 60))
        self._last_witness = -1e12
        self._head: tuple[int, str] | None = None

    def tick(self, settler: Any) -> None:
        gw = self.gw
        app = getattr(gw, "app", None)
        if app is None or settler is None:
            return
        if app.witnesses and time.monotonic() - self._last_witness >= self.every_s:
            self._last_witness = time.monotonic()
            from peergrid.market import settler as stl
            from peergrid.market.governance import GovernanceError

            signed = app.take_witnesses()
            try:
                n = stl.witness(settler, signed, int(gw.clock()))
                log.info("ledger: %d members' witnesses recorded in entry %d", len(signed), n)
            except GovernanceError as e:
                # a head that moved under a witness cannot happen (entries only grow); counted
                gw.metrics.inc("ledger_witness_dropped", len(signed))
                log.warning("ledger: witnesses not recorded: %s", e)
        head = app.head()
        key = (head["height"], head["hash"])
        if key != self._head and head["hash"] is not None and gw.client is not None and gw.connected.is_set():
            gw.client.publish(head_topic(gw.cfg.community), json.dumps(
                {"height": head["height"], "hash": head["hash"], "key": head["key"]}), qos=1, retain=True)
            self._head = key
