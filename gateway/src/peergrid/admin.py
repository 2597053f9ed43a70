"""The operator's commands: run, status, members, devices, broker files."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

from peergrid.community import registry as reg
from peergrid.community.broker import write_broker_files
from peergrid.config import Config
from peergrid.ingest.service import Gateway, JsonLog


def _registry(cfg: Config) -> reg.Registry:
    r = reg.Registry(reg.connect(cfg.db))
    r.add_community(cfg.community)
    return r


def admin(args: argparse.Namespace) -> int:
    # whatever the gateway creates (database, its WAL and SHM, keys, broker
    # files) is its user's alone
    os.umask(0o077)
    cfg = Config.load(Path(args.config))
    if args.cmd == "run":
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(JsonLog())
        logging.basicConfig(level=logging.INFO, handlers=[h])
        return Gateway(cfg).run()
    r = _registry(cfg)
    try:
        if args.cmd == "member":
            if args.mcmd == "add":
                key = bytes.fromhex(args.key) if args.key else None
                mid = r.add_member(cfg.community, args.name, key)
                _record(cfg, "member_joined", {"member": mid, "name": args.name, **({"key": key} if key else {})})
                print(f"member {mid} added")
            elif args.mcmd == "key":
                from peergrid.market import governance as gv

                k, pub = gv.new_key()
                out = Path(args.out)
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(gv.key_string(k) + "\n")
                r.set_member_key(cfg.community, args.member, pub)
                _record(cfg, "member_key", {"member": args.member, "key": pub})
                print(f"member {args.member}: key pair made; private key in {out} (give it to the member), "
                      f"public key {pub.hex()} in the registry and the ledger")
            elif args.mcmd == "account":
                user, password = r.set_member_account(cfg.community, args.member)
                print(f"member {args.member}: broker account for Home Assistant (shown only now)")
                if cfg.broker_tls_port and cfg.broker_names:
                    # what the houses reach: the boards' TLS listener, checked against the community CA
                    print(f"  host {cfg.broker_names[0]}  port {cfg.broker_tls_port} (TLS, trust {cfg.ca_file})  "
                          f"user {user}  password {password}")
                else:
                    print(f"  host {cfg.broker_host}  port {cfg.broker_port}  user {user}  password {password}")
                print("  it reads only this house's values and the community's aggregate (docs: README, "
                      "Home Assistant)")
                _accounts_changed(cfg, r)
            elif args.mcmd == "leave":
                st = _settler(cfg)
                if st is None:
                    r.leave(cfg.community, args.member)
                    print(f"member {args.member} has left")
                else:
                    # from the next interval boundary; its balance so far is stated in the entry
                    from peergrid.market.settler import gov_state

                    now = int(time.time())
                    at = now - now % st.length + st.length
                    r.leave(cfg.community, args.member, at)
                    bal = gov_state(st).balances.get(args.member, 0)
                    st.record("member_left", now, {"member": args.member, "from": at, "balance": bal})
                    print(f"member {args.member} leaves at {at}; balance so far {bal / 100:.2f} (intervals up to "
                          "then are still settled and appear in its statement)")
            elif args.mcmd == "limits":
                r.set_limits(cfg.community, args.member, args.bid, args.ask)
                print(f"member {args.member}: bid {args.bid if args.bid is not None else 'retail'}, "
                      f"ask {args.ask if args.ask is not None else 'feed-in'} (used by the auction)")
            elif args.mcmd == "partner":
                if args.pcmd == "add":
                    r.add_partner(cfg.community, args.seller, args.buyer, args.discount)
                    print(f"member {args.seller} offers its export to member {args.buyer} first, "
                          f"{args.discount} per kWh below retail")
                elif args.pcmd == "remove":
                    r.remove_partner(cfg.community, args.seller, args.buyer)
                    print(f"member {args.seller} no longer prefers member {args.buyer}")
                else:
                    for seller, buyer, disc in r.partners(cfg.community):
                        print(f"{seller:5d} -> {buyer:5d}  discount {disc} per kWh")
            else:
                lim = r.limits(cfg.community)
                for mid, name, left in r.members(cfg.community):
                    bid, ask = lim.get(mid, (None, None))
                    extra = "" if bid is None and ask is None else (
                        f"  bid {'retail' if bid is None else bid} ask {'feed-in' if ask is None else ask}")
                    print(f"{mid:5d}  {name}{'  (left)' if left else ''}{extra}")
            return 0
        if args.cmd == "device":
            return _device(args, cfg, r)
        if args.cmd == "tariff":
            from peergrid.market.settle import Tariff

            st = _settler(cfg)
            if st is None:
                raise reg.RegistryError("no [settlement] in the config, so no ledger")
            try:
                n = st.set_tariff(Tariff(args.retail, args.feed_in, args.fund_margin_ppm, args.mechanism,
                                         args.grid_fee, args.fund_export_ppm),
                                  args.t_from, int(time.time()))
            except ValueError as e:
                raise reg.RegistryError(str(e)) from None
            print(f"tariff change recorded as ledger entry {n}, in force from {args.t_from}")
            return 0
        if args.cmd == "resource":
            return _resource(args, cfg, r)
        if args.cmd in ("propose", "vote", "tally", "split"):
            return _governance(args, cfg, r)
        if args.cmd == "installer-token":
            from peergrid.commissioning import installer

            if args.revoke:
                installer.revoke_token(r.db, args.name)
                print(f"installer token {args.name} revoked")
            else:
                tok = installer.make_token(r.db, args.name, args.days)
                print(f"installer token for {args.name}, valid {args.days:g} days (shown only now):")
                print(f"  {tok}")
            return 0
        if args.cmd == "broker-files":
            return _broker_files(cfg, r)
        if args.cmd == "status":
            return status(cfg, r)
    except reg.RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 2


def _settler(cfg: Config):  # type: ignore[no-untyped-def]
    from peergrid.ingest.service import Gateway

    return Gateway(cfg)._settler()


def _record(cfg: Config, kind: str, body: dict) -> None:
    """Membership changes go into the ledger when the gateway keeps one."""
    s = _settler(cfg)
    if s is not None:
        s.record(kind, int(time.time()), body)


def ledger_export(args: argparse.Namespace) -> int:
    cfg = Config.load(Path(args.config))
    s = _settler(cfg)
    if s is None:
        print("error: no [settlement] in the config, so no ledger", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(s.export())
    return 0


def _device(args: argparse.Namespace, cfg: Config, r: reg.Registry) -> int:
    if args.dcmd == "add":
        chans = []
        for c in args.channel:
            role, _, rating = c.partition(":")
            try:
                amps = float(rating or 100)
            except ValueError:
                amps = math.nan
            if not reg.valid_rating(amps):
                raise reg.RegistryError(f"channel {c!r}: write ROLE:RATING_A with a rating above 0 and at most "
                                        f"{reg.MAX_RATING_A} A, e.g. grid:100") from None
            chans.append({"role": role, "rating_a": amps})
        if not chans:
            raise reg.RegistryError("give the board's channels: --channel grid:100 --channel pv:50 ...")
        secret, password = r.add_device(cfg.community, args.device, args.board, chans, args.member)
        _show_credentials(cfg, args.device, secret, password)
        _accounts_changed(cfg, r)
        return 0
    if args.dcmd == "list":
        for d in r.devices(cfg.community):
            roles = ",".join(c["role"] for c in d.channels)
            state = "revoked" if d.revoked else "active"
            print(f"{d.id:16s} {state:8s} board {d.board:12s} member {d.member or '-':>4} fw {d.fw or '-':8s} "
                  f"key #{d.generation} channels {roles}")
        return 0
    if args.dcmd == "rotate":
        secret, password = r.rotate(cfg.community, args.device)
        _show_credentials(cfg, args.device, secret, password)
        _accounts_changed(cfg, r)
        return 0
    r.revoke(cfg.community, args.device)
    print(f"{args.device} revoked")
    _accounts_changed(cfg, r)
    return 0


def _governance(args: argparse.Namespace, cfg: Config, r: reg.Registry) -> int:
    from peergrid.market import governance as gv
    from peergrid.market import settler as stl

    st = _settler(cfg)
    if st is None:
        raise reg.RegistryError("no [settlement] in the config, so no ledger")
    now = int(time.time())
    try:
        if args.cmd == "propose":
            k = gv.load_member_key(Path(args.key_file).read_text())
            ch: dict = {"kind": args.kind}
            if args.kind == "tariff":
                if not args.tariff:
                    raise gv.GovernanceError("--tariff retail,feed_in,margin_ppm,mechanism,grid_fee,export_ppm")
                p = args.tariff.split(",")
                ch["tariff"] = [int(p[0]), int(p[1]), int(p[2]) if len(p) > 2 else 0, p[3] if len(p) > 3 else "sdr",
                                int(p[4]) if len(p) > 4 else 0, int(p[5]) if len(p) > 5 else 0]
            elif args.kind == "rules":
                ch.update({"quorum_ppm": args.quorum_ppm, "majority_ppm": args.majority_ppm, "vote_s": args.vote_s})
            elif args.kind == "interval":
                ch["minutes"] = args.minutes
            elif args.kind == "feeder":
                ch.update({"import_w": int((args.import_kw or 0) * 1000), "export_w": int((args.export_kw or 0) * 1000)})
            elif args.kind == "spend":
                ch.update({"amount": args.amount, "payee": args.payee or "", "purpose": args.purpose or ""})
            else:
                ch.update({"name": args.name or "", "key": bytes.fromhex(args.pubkey or "")})
            n = stl.propose(st, gv.sign_proposal(k, cfg.community, args.member, ch, args.t_from, args.deadline), now)
            print(f"proposal {n} recorded; voting until {args.deadline}, in force from {args.t_from} if accepted")
        elif args.cmd == "vote":
            k = gv.load_member_key(Path(args.key_file).read_text())
            n = stl.ballot(st, gv.sign_ballot(k, cfg.community, args.proposal, args.member, args.choice), now)
            print(f"ballot of member {args.member} on proposal {args.proposal} recorded (entry {n})")
        elif args.cmd == "tally":
            n, res = stl.tally(st, args.proposal, now)
            print(f"proposal {args.proposal}: {res['yes']} yes, {res['no']} no of {res['eligible']} members; "
                  f"quorum {'reached' if res['quorum'] else 'missed'}; {'ACCEPTED' if res['accepted'] else 'rejected'}"
                  f" (entry {n})")
        else:
            from peergrid.market.settler import load_key

            members = [int(x) for x in args.members.split(",") if x.strip()]
            res = stl.split(st, members, args.community, Path(args.db), load_key(Path(args.key_file)), now)
            print(f"{len(members)} members leave at {res['at']} into {args.community} ({args.db}); closing entry "
                  f"{res['entry']}; their boards ({len(res['devices'])}) need their config written for the new "
                  "community (peergrid commission)")
    except gv.GovernanceError as e:
        raise reg.RegistryError(str(e)) from None
    except OSError as e:
        raise reg.RegistryError(f"key file: {e}") from None
    return 0


def _hhmm(v: str | None) -> int | None:
    if v is None:
        return None
    try:
        h, m = v.split(":")
        out = int(h) * 3600 + int(m) * 60
    except ValueError:
        raise reg.RegistryError(f"{v!r}: write a time of day as HH:MM") from None
    if not 0 <= out < 86400:
        raise reg.RegistryError(f"{v!r}: write a time of day as HH:MM")
    return out


def _resource(args: argparse.Namespace, cfg: Config, r: reg.Registry) -> int:
    from peergrid.control.controller import Battery, Load

    c = cfg.community
    if args.rcmd == "load":
        r.add_load(c, Load(args.id, args.device, args.relay, args.rated_w, args.priority, args.min_on_s,
                           args.min_off_s, args.need_wh, _hhmm(args.deadline), _hhmm(args.available),
                           args.max_switches))
        print(f"load {args.id} on {args.device} relay {args.relay} registered")
    elif args.rcmd == "battery":
        r.add_battery(c, Battery(args.id, args.device, args.target, args.capacity_wh, args.max_charge_w,
                                 args.max_discharge_w, args.soc_min, args.soc_max, args.efficiency))
        print(f"battery {args.id} on {args.device} registered")
    elif args.rcmd == "feeder":
        r.set_feeder(c, int(args.import_kw * 1000), int(args.export_kw * 1000))
        print(f"feeder limits: import {args.import_kw} kW, export {args.export_kw} kW")
    elif args.rcmd == "remove":
        r.remove_resource(c, args.id)
        print(f"{args.id} removed")
    elif args.rcmd == "decisions":
        from peergrid.control.loop import SCHEMA

        r.db.executescript(SCHEMA)
        rows = list(r.db.execute("SELECT t, kind, id, device, target, value, reason FROM decisions WHERE community=?"
                                 " ORDER BY t DESC LIMIT ?", (c, args.last)))
        for t, kind, rid, dev, tgt, val, why in reversed(rows):
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))}  {kind:7s} {rid:10s} {dev}[{tgt}] -> "
                  f"{val}: {why}")
    else:
        from peergrid.control.controller import resources

        loads, bats, feeder = resources(r.resource_rows(c))
        fmt = lambda v: "-" if v is None else f"{v // 3600:02d}:{v % 3600 // 60:02d}"  # noqa: E731
        for x in loads:
            print(f"load    {x.id:10s} {x.device}[{x.relay}] {x.rated_w} W prio {x.priority} on/off "
                  f"{x.min_on_s}/{x.min_off_s} s need {x.need_wh} Wh by {fmt(x.deadline_s)} from {fmt(x.available_s)}")
        for b in bats:
            print(f"battery {b.id:10s} {b.device}[{b.target}] {b.capacity_wh} Wh +{b.max_charge_w}/-{b.max_discharge_w} W"
                  f" soc {b.soc_min:.2f}..{b.soc_max:.2f}")
        print("feeder  " + ("not set" if feeder is None else f"import {feeder.import_w} W, export {feeder.export_w} W"))
    return 0


def _show_credentials(cfg: Config, device: str, secret: bytes, password: str) -> None:
    # shown once, for the commissioning tool; never logged
    print(f"device {device}: write these into the board's commissioning config (shown only now)")
    print(f"  secret          {secret.hex()}")
    print(f"  broker user     {reg.broker_user(cfg.community, device)}")
    print(f"  broker password {password}")


def _broker_files(cfg: Config, r: reg.Registry) -> int:
    b = write_broker_files(cfg, r)
    print(f"{b.accounts} device accounts written to {cfg.passwd_file} and {cfg.acl_file}; "
          f"broker {'reloaded' if b.reloaded else 'NOT reloaded (no pid_file or not running): send it SIGHUP'}")
    if b.conf_changed:
        print(f"mosquitto's config written to {cfg.broker_conf_file}: restart mosquitto for it to take effect "
              "(a reload does not reread listener settings)")
    return 0


def _accounts_changed(cfg: Config, r: reg.Registry) -> None:
    """After a device was added, rotated or revoked: the broker's accounts
    follow at once when the config names its files (the running gateway
    follows by itself within registry_poll_s)."""
    if cfg.passwd_file is None or cfg.acl_file is None:
        print("then run `peergrid broker-files` so the broker knows the accounts")
        return
    b = write_broker_files(cfg, r)
    print(f"broker accounts written ({b.accounts} devices); broker "
          f"{'reloaded' if b.reloaded else 'NOT reloaded (no pid_file or not running): send it SIGHUP'}")


def status(cfg: Config, r: reg.Registry) -> int:
    db = r.db
    from peergrid.ingest.store import init

    init(db)
    now = time.time()
    devs = r.devices(cfg.community)
    pres = {d: (o, s) for d, o, s in db.execute("SELECT device, online, last_seen FROM presence WHERE community=?",
                                                (cfg.community,))}
    online = sum(1 for d in devs if pres.get(d.id, (0, None))[0])
    stale = [d.id for d in devs if not d.revoked and (pres.get(d.id, (0, None))[1] is None
                                                      or now - pres[d.id][1] > cfg.stale_after_s)]
    n60 = db.execute("SELECT COUNT(*) FROM frames WHERE community=? AND t_recv > ?", (cfg.community, now - 60)
                     ).fetchone()[0]
    print(f"community {cfg.community}: {len(devs)} devices, {online} online, {len(stale)} stale")
    if stale:
        print("  stale: " + ", ".join(stale[:20]) + (" ..." if len(stale) > 20 else ""))
    # the running gateway's own state: its process and the broker link (ingest/brokerlink.py)
    from peergrid.ingest.brokerlink import describe, read_state

    for line in describe(read_state(cfg.db)):
        print(line)
    print(f"ingest: {n60 / 60:.1f} messages/s over the last minute")
    rows = list(db.execute("SELECT what, SUM(n) FROM counters WHERE community=? GROUP BY what ORDER BY 2 DESC",
                           (cfg.community,)))
    if rows:
        print("rejections and warnings:")
        for what, n in rows:
            print(f"  {what:24s} {n}")
    else:
        print("no rejections")
    return 0
