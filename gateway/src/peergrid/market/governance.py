"""Community governance in the ledger (issue 10): member keys, proposals,
signed ballots, tallies, and the break-away of a group of houses.

Member keys. Every member (house) has an Ed25519 key pair; the public key
is in the registry and in the ledger (`member_joined` or `member_key`
entries), the private key stays with the member (a file, or the string
`pgmk1:<64 hex digits>` printed in the commissioning report).

Entries (bodies; the gateway signs every entry as usual):
  proposal  {id, by, change, from, deadline, sig}
            change is one of
              {"kind": "tariff", "tariff": [retail, feed_in, margin_ppm, mechanism, grid_fee, export_ppm]}
              {"kind": "rules", "quorum_ppm": q, "majority_ppm": m, "vote_s": s}
              {"kind": "feeder", "import_w": i, "export_w": e}
              {"kind": "admit", "name": text, "key": public key}
              {"kind": "interval", "minutes": m}        (m divides 60; from a full hour)
            `from` is the interval boundary it takes effect at, `deadline` the
            end of voting; `sig` is the proposer's signature.
  ballot    {proposal, member, vote ("yes" | "no"), sig}
  tally     {proposal, eligible, yes, no, quorum, accepted}
  split     (the old ledger's closing entry for a group that breaks away)
            {at, community, members, balances, fund}

Signatures are Ed25519 over the deterministic CBOR of
  ["peergrid proposal", community, proposer, change, from, deadline]  or
  ["peergrid ballot", community, proposal id, member, vote].

Rules (quorum: votes cast / eligible members; majority: yes / votes cast;
both in ppm, the majority must be exceeded) come from the latest accepted
`rules` change before the proposal, default quorum 50 %, majority 50 %.
A proposal is accepted when quorum is reached and yes > majority; only
members who had joined (and not left) when it was made may vote, once each,
before its deadline. `ledger verify` checks every ballot's signature against
the member's key in the ledger, one ballot per member, the deadline, and
recounts every tally; a tariff or interval change made by vote must match its tally.
"""
from __future__ import annotations

from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

GOV = ("member_joined", "member_left", "member_key", "proposal", "ballot", "tally", "tariff", "interval", "split",
       "genesis", "witness", "payout")
DEFAULT_RULES = {"quorum_ppm": 500_000, "majority_ppm": 500_000, "vote_s": 0}
KINDS = ("tariff", "rules", "feeder", "admit", "interval", "spend")


class GovernanceError(ValueError):
    pass


# -- keys ----------------------------------------------------------------------------

def new_key() -> tuple[Ed25519PrivateKey, bytes]:
    k = Ed25519PrivateKey.generate()
    return k, k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_string(k: Ed25519PrivateKey) -> str:
    """The member's private key as one line (a QR code holds it easily)."""
    return "pgmk1:" + k.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()).hex()


def load_member_key(text: str) -> Ed25519PrivateKey:
    t = text.strip()
    if not t.startswith("pgmk1:") or len(t) != 6 + 64:
        raise GovernanceError("not a member key (expected pgmk1: and 64 hex digits)")
    try:
        return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(t[6:]))
    except ValueError:
        raise GovernanceError("not a member key (bad hex)") from None


def public(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _verify(pub: bytes, sig: bytes, msg: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(pub).verify(sig, msg)
        return True
    except (InvalidSignature, ValueError):
        return False


def proposal_msg(community: str, by: int, change: dict[str, Any], from_t: int, deadline: int) -> bytes:
    return cbor2.dumps(["peergrid proposal", community, by, change, from_t, deadline], canonical=True)


def witness_msg(community: str, member: int, height: int, digest: bytes) -> bytes:
    """What a member's mirror signs: it holds `height` entries, the last
    with this SHA-256, all verified."""
    return cbor2.dumps(["peergrid witness", community, member, height, digest], canonical=True)


def ballot_msg(community: str, proposal: int, member: int, vote: str) -> bytes:
    return cbor2.dumps(["peergrid ballot", community, proposal, member, vote], canonical=True)


def sign_proposal(k: Ed25519PrivateKey, community: str, by: int, change: dict[str, Any], from_t: int,
                  deadline: int) -> dict[str, Any]:
    check_change(change)
    return {"by": by, "change": change, "from": from_t, "deadline": deadline,
            "sig": k.sign(proposal_msg(community, by, change, from_t, deadline))}


def sign_ballot(k: Ed25519PrivateKey, community: str, proposal: int, member: int, vote: str) -> dict[str, Any]:
    if vote not in ("yes", "no"):
        raise GovernanceError("a vote is yes or no")
    return {"proposal": proposal, "member": member, "vote": vote,
            "sig": k.sign(ballot_msg(community, proposal, member, vote))}


def check_change(change: dict[str, Any]) -> None:
    kind = change.get("kind")
    if kind not in KINDS:
        raise GovernanceError(f"a proposal changes one of {', '.join(KINDS)}")
    if kind == "tariff":
        from peergrid.market.settle import Tariff

        try:
            Tariff.from_list(change["tariff"])
        except (KeyError, TypeError, ValueError) as e:
            raise GovernanceError(f"proposed tariff: {e}") from None
    elif kind == "rules":
        for k in ("quorum_ppm", "majority_ppm"):
            if not isinstance(change.get(k), int) or not 0 <= change[k] <= 1_000_000:
                raise GovernanceError(f"{k} is 0..1,000,000")
        if not isinstance(change.get("vote_s", 0), int) or change.get("vote_s", 0) < 0:
            raise GovernanceError("vote_s is a number of seconds")
    elif kind == "feeder":
        if not all(isinstance(change.get(k), int) and change[k] > 0 for k in ("import_w", "export_w")):
            raise GovernanceError("feeder limits are positive watts")
    elif kind == "interval":
        m = change.get("minutes")
        if not isinstance(m, int) or not 1 <= m <= 60 or 60 % m:
            raise GovernanceError("an interval is 1..60 minutes and divides the hour")
    elif kind == "spend":
        if type(change.get("amount")) is not int or change["amount"] <= 0:
            raise GovernanceError("a spend is a positive amount in minor units")
        if type(change.get("payee")) is not str or not 0 < len(change["payee"]) <= 80:
            raise GovernanceError("a spend names its payee (1-80 characters)")
        if type(change.get("purpose")) is not str or not 0 < len(change["purpose"]) <= 200:
            raise GovernanceError("a spend states its purpose (1-200 characters)")
    elif kind == "admit":
        if not isinstance(change.get("name"), str) or not isinstance(change.get("key"), bytes) \
                or len(change["key"]) != 32:
            raise GovernanceError("admitting a member needs a name and a 32-byte public key")


# -- the state the ledger implies ------------------------------------------------------------

class State:
    """Replays the governance entries of one ledger in order: who is a
    member with which key, the rules, open proposals, ballots, tallies and
    balances. `apply` raises GovernanceError on anything a ledger must not
    contain (used by the gateway before it appends, and by ledger verify)."""

    def __init__(self, community: str) -> None:
        self.community = community
        self.keys: dict[int, bytes] = {}
        self.joined: dict[int, int] = {}             # member -> entry n it joined at
        self.left: dict[int, int] = {}
        self.rules = dict(DEFAULT_RULES)
        self.proposals: dict[int, dict[str, Any]] = {}
        self.ballots: dict[int, dict[int, str]] = {}
        self.tallies: dict[int, dict[str, Any]] = {}
        self.balances: dict[int, int] = {}
        self.fund = 0
        self.grid = 0
        self.digests: list[bytes] = []               # SHA-256 of every entry so far (replay fills it)
        self.witnessed: dict[int, set[int]] = {}      # height -> members whose mirrors signed it
        self.payouts: list[dict[str, Any]] = []

    def members(self, at: int | None = None) -> list[int]:
        return sorted(m for m, n in self.joined.items() if (at is None or n < at) and m not in self.left)

    def apply(self, n: int, kind: str, t: int, body: dict[str, Any]) -> None:
        if kind == "genesis":
            self.community = body.get("community", self.community)
            for m, k in (body.get("members") or {}).items():      # a community born from a split
                self.joined[int(m)] = n
                if k:
                    self.keys[int(m)] = bytes(k)
            return
        if kind == "member_joined":
            m = body["member"]
            self.joined[m] = n
            self.left.pop(m, None)
            if body.get("key"):
                self.keys[m] = bytes(body["key"])
            return
        if kind == "member_key":
            self.keys[body["member"]] = bytes(body["key"])
            return
        if kind == "member_left":
            self.left[body["member"]] = n
            return
        if kind in ("settlement", "adjustment"):
            b = body["new"] if kind == "adjustment" else body
            old = body["old"] if kind == "adjustment" else None
            for sign, bb in ((1, b), (-1, old)):
                if bb is None:
                    continue
                for m, a in zip(bb["flows"][0::3], bb["amounts"]):
                    self.balances[m] = self.balances.get(m, 0) + sign * a
                self.fund -= sign * bb["fund"]
                self.grid += sign * bb["grid"]
            return
        if kind == "proposal":
            by = body["by"]
            if by not in self.members():
                raise GovernanceError(f"proposer {by} is not a member")
            key = self.keys.get(by)
            if key is None or not _verify(key, bytes(body["sig"]), proposal_msg(
                    self.community, by, body["change"], body["from"], body["deadline"])):
                raise GovernanceError(f"proposal by member {by}: bad signature")
            check_change(body["change"])
            if body["change"]["kind"] == "spend" and body["change"]["amount"] > self.fund:
                raise GovernanceError(f"a spend of {body['change']['amount']} would overdraw the fund ({self.fund})")
            if body["deadline"] < t + self.rules.get("vote_s", 0):
                raise GovernanceError("the voting period is shorter than the rules allow")
            if body["from"] < body["deadline"]:
                raise GovernanceError("a change takes effect after voting ends")
            self.proposals[n] = {**body, "n": n, "t": t, "rules": dict(self.rules), "eligible": self.members(at=n)}
            self.ballots[n] = {}
            return
        if kind == "ballot":
            p = self.proposals.get(body["proposal"])
            if p is None:
                raise GovernanceError(f"no proposal {body['proposal']}")
            m = body["member"]
            if m not in p["eligible"]:
                raise GovernanceError(f"member {m} may not vote on proposal {body['proposal']} (not a member then)")
            if body["proposal"] in self.tallies:
                raise GovernanceError(f"proposal {body['proposal']} was tallied already")
            if t > p["deadline"]:
                raise GovernanceError(f"proposal {body['proposal']}: voting closed at {p['deadline']}")
            if m in self.ballots[body["proposal"]]:
                raise GovernanceError(f"member {m} has voted on proposal {body['proposal']} already")
            if body["vote"] not in ("yes", "no"):
                raise GovernanceError("a vote is yes or no")
            key = self.keys.get(m)
            if key is None or not _verify(key, bytes(body["sig"]), ballot_msg(self.community, body["proposal"], m,
                                                                               body["vote"])):
                raise GovernanceError(f"ballot of member {m}: bad signature")
            self.ballots[body["proposal"]][m] = body["vote"]
            return
        if kind == "tally":
            want = self.count(body["proposal"], t)
            if {k: body.get(k) for k in want} != want:
                raise GovernanceError(f"tally of proposal {body['proposal']} does not match its ballots")
            self.tallies[body["proposal"]] = want
            if want["accepted"]:
                ch = self.proposals[body["proposal"]]["change"]
                if ch["kind"] == "rules":
                    self.rules = {k: ch[k] for k in DEFAULT_RULES if k in ch} | \
                        {k: v for k, v in self.rules.items() if k not in ch}
            return
        if kind == "tariff" and "by_vote" in body:
            tl = self.tallies.get(body["by_vote"])
            p = self.proposals.get(body["by_vote"])
            if tl is None or not tl["accepted"] or p is None or p["change"].get("kind") != "tariff" \
                    or p["change"]["tariff"] != body["tariff"] or p["from"] != body["from"]:
                raise GovernanceError("a tariff change by vote must follow its accepted proposal")
            return
        if kind == "interval":
            tl = self.tallies.get(body.get("by_vote", -1))
            p = self.proposals.get(body.get("by_vote", -1))
            if tl is None or not tl["accepted"] or p is None or p["change"].get("kind") != "interval" \
                    or p["change"]["minutes"] != body["minutes"] or p["from"] != body["from"]:
                raise GovernanceError("an interval length change must follow its accepted proposal")
            return
        if kind == "witness":
            for m, height, digest, sig in body["w"]:
                key = self.keys.get(m)
                if m not in self.joined or key is None:
                    raise GovernanceError(f"witness of {m}, who is not a member with a key")
                if not 1 <= height <= min(n, len(self.digests)) or self.digests[height - 1] != bytes(digest):
                    raise GovernanceError(f"member {m} witnessed height {height} with a hash this ledger does not have")
                if not _verify(key, bytes(sig), witness_msg(self.community, m, height, bytes(digest))):
                    raise GovernanceError(f"witness of member {m}: bad signature")
                self.witnessed.setdefault(height, set()).add(m)
            return
        if kind == "payout":
            p = self.proposals.get(body.get("by_vote", -1))
            tl = self.tallies.get(body.get("by_vote", -1))
            if p is None or tl is None or not tl["accepted"] or p["change"].get("kind") != "spend" \
                    or any(p["change"][k] != body.get(k) for k in ("amount", "payee", "purpose")):
                raise GovernanceError("a payout must follow its accepted spend proposal")
            if any(x["by_vote"] == body["by_vote"] for x in self.payouts):
                raise GovernanceError(f"proposal {body['by_vote']} was paid out already")
            if body["amount"] > self.fund:
                raise GovernanceError(f"payout of {body['amount']} would overdraw the fund ({self.fund})")
            self.fund -= body["amount"]
            self.payouts.append({**body, "n": n, "t": t})
            return
        if kind == "split":
            for m in body["members"]:
                if m not in self.members():
                    raise GovernanceError(f"member {m} of the split is not a member")
                if self.balances.get(m, 0) != body["balances"][str(m)]:
                    raise GovernanceError(f"split: member {m}'s balance is not the one the ledger gives")
                self.left[m] = n
            return

    def count(self, proposal: int, t: int) -> dict[str, Any]:
        p = self.proposals.get(proposal)
        if p is None:
            raise GovernanceError(f"no proposal {proposal}")
        if t <= p["deadline"]:
            raise GovernanceError(f"proposal {proposal} is open until {p['deadline']}")
        votes = self.ballots[proposal]
        yes = sum(1 for v in votes.values() if v == "yes")
        no = len(votes) - yes
        eligible = len(p["eligible"])
        r = p["rules"]
        quorum = eligible > 0 and len(votes) * 1_000_000 >= r["quorum_ppm"] * eligible
        accepted = bool(quorum and yes * 1_000_000 > r["majority_ppm"] * len(votes))
        return {"proposal": proposal, "eligible": eligible, "yes": yes, "no": no, "quorum": quorum,
                "accepted": accepted}


def replay(entries: list[Any], community: str | None = None) -> State:
    """The governance state after the given entries (ledger.Entry objects with
    bodies); raises GovernanceError naming the entry that breaks a rule."""
    st = State(community or "")
    for e in entries:
        st.digests.append(e.digest)
        if e.type in GOV or e.type in ("settlement", "adjustment"):
            try:
                st.apply(e.n, e.type, e.t, e.body)
            except (GovernanceError, KeyError, TypeError) as err:
                raise GovernanceError(f"entry {e.n}: {err}") from None
    return st
