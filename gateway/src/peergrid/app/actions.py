"""The member app's actions (see peergrid.app.members for the API):
proposals and ballots signed in the browser and checked exactly as the
CLI's, and a member's own auction limits and preferred partners, within the
community's rules."""
from __future__ import annotations

from typing import Any

from peergrid.app.signin import AppError, _hex, _int
from peergrid.community import registry as reg


def _describe(change: dict[str, Any]) -> str:
    """A proposal's effect in words, for the page."""
    k = change.get("kind")
    if k == "tariff":
        t = change["tariff"]
        return (f"tariff: retail {t[0]}, feed-in {t[1]} per kWh (minor units), fund margin {t[2] / 10000:g} %, "
                f"mechanism {t[3]}, grid fee {t[4]}, fund share of export {t[5] / 10000:g} %")
    if k == "rules":
        return (f"voting rules: quorum {change['quorum_ppm'] / 10000:g} %, majority {change['majority_ppm'] / 10000:g} %,"
                f" at least {change.get('vote_s', 0)} s to vote")
    if k == "feeder":
        return f"feeder limits: import {change['import_w']} W, export {change['export_w']} W"
    if k == "interval":
        return f"settlement interval: {change['minutes']} minutes"
    if k == "spend":
        return (f"spend {change['amount'] / 100:.2f} from the fund: to {change['payee']}, for {change['purpose']}")
    if k == "admit":
        return f"admit {change['name']!r} as a member (key {bytes(change['key']).hex()[:16]}...)"
    return str(k)


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v



class Actions:
    """Mixed into MemberApp: uses its gw, c, db, dblock, registry, metrics."""

    def _st(self, fresh: bool = False) -> Any:
        """A settler on the app's own connection. Governance entries are
        checked against the ledger as the database holds it now (the
        gateway's settler appends meanwhile), so those get a fresh one, as
        the CLI does."""
        if self._settler is None or fresh:
            st = self.gw._settler()
            if st is None:
                raise AppError(409, "this gateway keeps no ledger ([settlement] is not configured)")
            if fresh:
                return st
            self._settler = st
        return self._settler

    def proposals(self, who: int) -> dict[str, Any]:
        from peergrid.market.governance import replay

        st = replay(self.entries(), self.c)
        now = int(self.gw.clock())
        out = []
        for n, p in sorted(st.proposals.items(), reverse=True):
            votes = st.ballots.get(n, {})
            out.append({"id": n, "by": p["by"], "change": _jsonable(p["change"]), "text": _describe(p["change"]),
                        "from": p["from"], "deadline": p["deadline"], "open": now <= p["deadline"] and n not in
                        st.tallies, "eligible": who in p["eligible"], "my_vote": votes.get(who),
                        "votes": len(votes), "of": len(p["eligible"]), "tally": st.tallies.get(n)})
        return {"community": self.c, "proposals": out[:100], "rules": st.rules, "now": now,
                "fund": st.fund, "members": st.members(),
                "payouts": [{k: p[k] for k in ("by_vote", "amount", "payee", "purpose", "t")} for p in st.payouts]}

    def ballot(self, who: int, body: Any) -> dict[str, Any]:
        from peergrid.market import governance as gv
        from peergrid.market import settler as stl

        if not isinstance(body, dict):
            raise AppError(400, "a ballot is a JSON object")
        if body.get("member", who) != who:
            self.metrics.inc("app_ballot_refused")
            raise AppError(403, "a ballot is cast only by the member signed in")
        signed = {"proposal": _int(body.get("proposal"), "proposal"), "member": who,
                  "vote": body.get("vote"), "sig": _hex(body.get("sig"), "sig", 64)}
        if signed["vote"] not in ("yes", "no"):
            raise AppError(400, "a vote is yes or no")
        try:
            with self.dblock:
                st = self._st(fresh=True)
                try:
                    n = stl.ballot(st, signed, int(self.gw.clock()))
                finally:
                    st.db.close()
        except gv.GovernanceError as e:
            self.metrics.inc("app_ballot_refused")
            raise AppError(422, str(e)) from None
        self.metrics.inc("app_ballots")
        return {"entry": n, "proposal": signed["proposal"], "vote": signed["vote"]}

    def propose(self, who: int, body: Any) -> dict[str, Any]:
        from peergrid.market import governance as gv
        from peergrid.market import settler as stl

        if not isinstance(body, dict) or not isinstance(body.get("change"), dict):
            raise AppError(400, "a proposal is {change, from, deadline, sig}")
        change = dict(body["change"])
        if change.get("kind") == "admit":
            change["key"] = _hex(change.get("key"), "key", 32)
        signed = {"by": who, "change": change, "from": _int(body.get("from"), "from", 0, 2 ** 40),
                  "deadline": _int(body.get("deadline"), "deadline", 0, 2 ** 40), "sig": _hex(body.get("sig"), "sig", 64)}
        try:
            gv.check_change(change)
            with self.dblock:
                st = self._st(fresh=True)
                try:
                    n = stl.propose(st, signed, int(self.gw.clock()))
                finally:
                    st.db.close()
        except gv.GovernanceError as e:
            self.metrics.inc("app_proposal_refused")
            raise AppError(422, str(e)) from None
        return {"proposal": n}

    # -- limits and partners ---------------------------------------------------------------

    def limits(self, who: int) -> dict[str, Any]:
        with self.dblock:
            bid, ask = self.registry.limits(self.c).get(who, (None, None))
            partners = [{"buyer": b, "discount": d} for s, b, d in self.registry.partners(self.c) if s == who]
            members = [{"member": m, "name": n} for m, n, left in self.registry.members(self.c)
                       if left is None and m != who]
        t = self._tariff()
        return {"bid": bid, "ask": ask, "partners": partners, "members": members,
                "tariff": {"retail": t.retail, "feed_in": t.feed_in, "grid_fee": t.grid_fee,
                           "mechanism": t.mechanism} if t else None,
                "max_discount": (t.retail - t.grid_fee - t.feed_in) if t else None}

    def _tariff(self) -> Any:
        try:
            st = self._st()
        except AppError:
            return None
        return st.tariff_for(int(self.gw.clock()))

    def set_limits(self, who: int, body: Any) -> None:
        if not isinstance(body, dict):
            raise AppError(400, "limits are {bid, ask}")
        t = self._tariff()
        vals = []
        for k in ("bid", "ask"):
            v = body.get(k)
            if v is not None:
                # within the community's rules: whole minor units, from 0 to ten times retail
                v = _int(v, k, 0, 10 * t.retail if t else 10 ** 6)
            vals.append(v)
        try:
            with self.dblock:
                self.registry.set_limits(self.c, who, vals[0], vals[1])
        except reg.RegistryError as e:
            raise AppError(422, str(e)) from None
        self.metrics.inc("app_limits_set")

    def partner(self, who: int, body: Any) -> None:
        if not isinstance(body, dict):
            raise AppError(400, "a partner is {buyer, discount} or {buyer, remove: true}")
        buyer = _int(body.get("buyer"), "buyer", 1, 2 ** 31)
        try:
            with self.dblock:
                if body.get("remove") is True:
                    self.registry.remove_partner(self.c, who, buyer)
                    return
                t = self._tariff()
                hi = (t.retail - t.grid_fee - t.feed_in) if t else 10 ** 6
                self.registry.add_partner(self.c, who, buyer, _int(body.get("discount"), "discount", 0, max(0, hi)))
        except reg.RegistryError as e:
            raise AppError(422, str(e)) from None

    # -- witnesses ---------------------------------------------------------------------------

    def witness(self, who: int, body: Any) -> dict[str, Any]:
        """A member's mirror signed the head it verified. Kept (the newest
        per member) if the signature is the member's and the hash is this
        gateway's own entry at that height; a hash the gateway does not
        have is refused with 409 and counted: that member saw another
        ledger than this one."""
        from peergrid.market import governance as gv

        if not isinstance(body, dict):
            raise AppError(400, "a witness is {height, hash, sig}")
        height = _int(body.get("height"), "height", 1, 2 ** 40)
        digest = _hex(body.get("hash"), "hash", 32)
        sig = _hex(body.get("sig"), "sig", 64)
        with self.dblock:
            key = self.registry.member_key(self.c, who)
        if key is None or not gv._verify(key, sig, gv.witness_msg(self.c, who, height, digest)):
            self.metrics.inc("app_witness_refused")
            raise AppError(422, "the witness is not signed with this member's key")
        es = self.entries()
        if height > len(es) or es[height - 1].digest != digest:
            self.metrics.inc("ledger_witness_conflict")
            import logging

            logging.getLogger("peergrid.app").warning(
                "member %d witnessed height %d with a hash this gateway's ledger does not have", who, height)
            raise AppError(409, f"this gateway's ledger has no entry {height - 1} with that hash")
        with self.lock:
            old = self.witnesses.get(who)
            if old is None or old[1] < height:
                self.witnesses[who] = [who, height, digest, sig]
        self.metrics.inc("app_witnesses")
        return {"height": height, "pending": True}

    def take_witnesses(self) -> list[list[Any]]:
        with self.lock:
            out = [self.witnesses[m] for m in sorted(self.witnesses)]
            self.witnesses.clear()
        return out
