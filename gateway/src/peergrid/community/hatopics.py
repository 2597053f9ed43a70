"""The topics the gateway publishes for the members' own programs (Home
Assistant above all): plain JSON, readable with a member's broker account.

    pgha/<community>/house-<member>/state      JSON, retained: the house now
    pgha/<community>/house-<member>/avail      "online" | "offline", retained
    pgha/<community>/community/state           JSON, retained: the aggregate
    pgha/<community>/community/avail           "online" | "offline" (the gateway's will)
    homeassistant/<component>/<node>/<object>/config   discovery, retained
        node: pg_<community>_m<member> or pg_<community>_community
    homeassistant/status                       Home Assistant's announcement

A member's account (registry.member_user) may read its own house's topics,
the community's, and the discovery configs of both; it may write only
homeassistant/status (Home Assistant announces itself there). The same
account runs the member's ledger mirror: it reads pgl/<community>/# and
writes its own witness and alarm (peergrid.app.ledgerfeed).
"""
from __future__ import annotations

HA_ROOT = "pgha"
LEDGER_ROOT = "pgl"
DISCOVERY = "homeassistant"
HA_STATUS = DISCOVERY + "/status"


def house_base(community: str, member: int) -> str:
    return f"{HA_ROOT}/{community}/house-{int(member)}"


def community_base(community: str) -> str:
    return f"{HA_ROOT}/{community}/community"


def house_node(community: str, member: int) -> str:
    return f"pg_{community}_m{int(member)}"


def community_node(community: str) -> str:
    return f"pg_{community}_community"


def member_acl(community: str, member: int) -> list[tuple[str, str]]:
    """(pattern, access) pairs of a member's broker account."""
    return [(house_base(community, member) + "/#", "read"),
            (community_base(community) + "/#", "read"),
            (f"{DISCOVERY}/+/{house_node(community, member)}/#", "read"),
            (f"{DISCOVERY}/+/{community_node(community)}/#", "read"),
            (HA_STATUS, "readwrite"),
            # the ledger's head and the members' mirrors (peergrid.app.ledgerfeed): every mirror
            # reads all witnesses and alarms, and writes only its own
            (f"{LEDGER_ROOT}/{community}/#", "read"),
            (f"{LEDGER_ROOT}/{community}/witness/{int(member)}", "readwrite"),
            (f"{LEDGER_ROOT}/{community}/alarm/{int(member)}", "readwrite")]
