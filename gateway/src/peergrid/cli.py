"""Command line of the gateway. Sub-commands arrive with their issues."""
from __future__ import annotations

import argparse
import sys

from peergrid import __version__


def _footprint(paths: list[str]) -> int:
    """tools/footprint.py of this source tree (the measurement needs the
    firmware, mpy-cross and the 32-bit MicroPython of a checkout)."""
    import importlib.util
    from pathlib import Path

    tool = Path(__file__).resolve().parents[3] / "tools" / "footprint.py"
    if not tool.exists():
        print(f"check-board --footprint: {tool} missing: run it from a PeerGrid checkout", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("peergrid_footprint", tool)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return int(mod.main(list(paths)))


def _finite(text: str) -> float:
    """A float argument that is a number: NaN and infinities are refused."""
    import math

    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return v


# the operator's own tools (peergrid/operate): each parses its arguments;
# a --config given before the command is handed on
OPERATE = {"init": ("peergrid.operate.init", "make or update a community directory: config, CA, broker, units"),
           "doctor": ("peergrid.operate.doctor", "check the broker, database, clock, files and ports; say what to do"),
           "backup": ("peergrid.operate.backup", "a consistent backup of the database, ledger and keys, while running"),
           "restore": ("peergrid.operate.restore", "restore a backup into a gateway's directory"),
           "rebuild": ("peergrid.operate.rebuild", "a new gateway from a member's mirror of the ledger (and the ledger "
                                                   "key)"),
           "mirror": ("peergrid.app.mirror", "a member's verified copy of the ledger; witnesses its head, "
                                             "alarms on tampering")}


def _operate(argv: list[str]) -> int | None:
    pre: list[str] = []
    i = 0
    while i < len(argv) and (argv[i] in ("-c", "--config") or argv[i].startswith("--config=")):
        n = 1 if "=" in argv[i] else 2
        pre += argv[i:i + n]
        i += n
    if i >= len(argv) or argv[i] not in OPERATE:
        return None
    import importlib

    return int(importlib.import_module(OPERATE[argv[i]][0]).main(pre + argv[i + 1:]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="peergrid", description="PeerGrid gateway")
    p.add_argument("--version", action="version", version=f"peergrid {__version__}")
    sub = p.add_subparsers(dest="cmd")
    v = sub.add_parser("verify-frame", help="verify one uplink frame (hex) against a device secret")
    v.add_argument("topic")
    v.add_argument("frame_hex")
    v.add_argument("--secret-hex", required=True)
    cb = sub.add_parser("check-board", help="check board definitions (boards/<name>)")
    cb.add_argument("paths", nargs="+")
    cb.add_argument("--footprint", action="store_true",
                    help="also run the firmware for each board on the 32-bit MicroPython in the board's heap "
                         "(tools/footprint.py) and refuse a board that leaves less than 25 %% of it free")
    sub.add_parser("vboard", help="run the firmware as a virtual board (peergrid vboard --help)",
                   add_help=False)
    for name, (_, text) in OPERATE.items():
        sub.add_parser(name, help=f"{text} (peergrid {name} --help)", add_help=False)
    p.add_argument("--config", "-c", default="peergrid.toml", help="gateway config (TOML)")
    sub.add_parser("run", help="run the gateway: ingest, validate, store")
    sub.add_parser("status", help="devices online and stale, rejections by reason, ingest rate")
    m = sub.add_parser("member", help="members (houses)")
    msub = m.add_subparsers(dest="mcmd", required=True)
    ma = msub.add_parser("add")
    ma.add_argument("name")
    ma.add_argument("--key", help="the member's Ed25519 public key (64 hex digits)")
    mk = msub.add_parser("key", help="make a member key pair: the public key goes into the registry and ledger")
    mk.add_argument("member", type=int)
    mk.add_argument("--out", required=True, help="file for the private key (the member keeps it)")
    msub.add_parser("list")
    mac = msub.add_parser("account", help="a broker account for the member's Home Assistant: reads only its house "
                                          "and the community aggregate (the password is shown once)")
    mac.add_argument("member", type=int)
    ml = msub.add_parser("leave")
    ml.add_argument("member", type=int)
    mlim = msub.add_parser("limits", help="a member's auction price limits (minor units per kWh)")
    mlim.add_argument("member", type=int)
    mlim.add_argument("--bid", type=int, help="the most it pays per kWh (default: retail)")
    mlim.add_argument("--ask", type=int, help="the least it sells for per kWh (default: feed-in)")
    mp = msub.add_parser("partner", help="preferred partners: a seller offers its export to a buyer first")
    mpsub = mp.add_subparsers(dest="pcmd", required=True)
    mpa = mpsub.add_parser("add")
    mpa.add_argument("seller", type=int)
    mpa.add_argument("buyer", type=int)
    mpa.add_argument("--discount", type=int, required=True, help="off the retail price, minor units per kWh")
    mpr = mpsub.add_parser("remove")
    mpr.add_argument("seller", type=int)
    mpr.add_argument("buyer", type=int)
    mpsub.add_parser("list")
    d = sub.add_parser("device", help="devices (boards): add, list, rotate, revoke")
    dsub = d.add_subparsers(dest="dcmd", required=True)
    da = dsub.add_parser("add")
    da.add_argument("device")
    da.add_argument("--member", type=int)
    da.add_argument("--board", default="sim")
    da.add_argument("--channel", action="append", default=[], metavar="ROLE:RATING_A",
                    help="one per CT in board order, e.g. grid:100")
    dsub.add_parser("list")
    for name in ("rotate", "revoke"):
        x = dsub.add_parser(name)
        x.add_argument("device")
    rs = sub.add_parser("resource", help="controllable loads, batteries and the feeder limits")
    rsub = rs.add_subparsers(dest="rcmd", required=True)
    rl = rsub.add_parser("load", help="add a switchable load behind a board's relay")
    rl.add_argument("id")
    rl.add_argument("--device", required=True)
    rl.add_argument("--relay", type=int, required=True, help="relay index on the board")
    rl.add_argument("--rated-w", type=int, required=True)
    rl.add_argument("--priority", type=int, default=5, help="lower comes on first (default 5)")
    rl.add_argument("--min-on-s", type=int, default=600)
    rl.add_argument("--min-off-s", type=int, default=600)
    rl.add_argument("--need-wh", type=int, default=0, help="daily energy it must get (water heater, EV)")
    rl.add_argument("--deadline", help="HH:MM by which the need is met")
    rl.add_argument("--available", help="HH:MM from which it may run (e.g. the EV is home)")
    rl.add_argument("--max-switches", type=int, default=20, help="per day")
    rb = rsub.add_parser("battery", help="add a battery on a board's Modbus link")
    rb.add_argument("id")
    rb.add_argument("--device", required=True)
    rb.add_argument("--target", type=int, default=0, help="battery index on the board")
    rb.add_argument("--capacity-wh", type=int, required=True)
    rb.add_argument("--max-charge-w", type=int, required=True)
    rb.add_argument("--max-discharge-w", type=int, required=True)
    rb.add_argument("--soc-min", type=_finite, default=0.1)
    rb.add_argument("--soc-max", type=_finite, default=0.95)
    rb.add_argument("--efficiency", type=_finite, default=0.92)
    rf = rsub.add_parser("feeder", help="the community's feeder limits")
    rf.add_argument("--import-kw", type=_finite, required=True)
    rf.add_argument("--export-kw", type=_finite, required=True)
    rr = rsub.add_parser("remove")
    rr.add_argument("id")
    rsub.add_parser("list")
    rd = rsub.add_parser("decisions", help="the control loop's latest decisions with their reasons")
    rd.add_argument("--last", type=int, default=20)
    it = sub.add_parser("installer-token", help="a token for an electrician's commissioning tool (shown once)")
    it.add_argument("name", help="who gets it, e.g. the electrician's firm")
    it.add_argument("--days", type=_finite, default=7)
    it.add_argument("--revoke", action="store_true")
    cm = sub.add_parser("commission", help="commission a house: the board on USB, checks, signed report",
                        add_help=False)
    del cm
    pr = sub.add_parser("propose", help="propose a change of the community's rules (signed with a member key)")
    pr.add_argument("--member", type=int, required=True)
    pr.add_argument("--key-file", required=True)
    pr.add_argument("--kind", required=True, choices=["tariff", "rules", "feeder", "admit", "interval", "spend"])
    pr.add_argument("--amount", type=int, help="spend: minor units from the fund")
    pr.add_argument("--payee", help="spend: who is paid")
    pr.add_argument("--purpose", help="spend: what for")
    pr.add_argument("--minutes", type=int, help="interval: the new interval length")
    pr.add_argument("--tariff", help="retail,feed_in,fund_margin_ppm,mechanism,grid_fee,fund_export_ppm")
    pr.add_argument("--quorum-ppm", type=int)
    pr.add_argument("--majority-ppm", type=int)
    pr.add_argument("--vote-s", type=int, default=0)
    pr.add_argument("--import-kw", type=_finite)
    pr.add_argument("--export-kw", type=_finite)
    pr.add_argument("--name", help="admit: the new member's name")
    pr.add_argument("--pubkey", help="admit: the new member's public key (hex)")
    pr.add_argument("--from", dest="t_from", type=int, required=True, help="interval boundary it takes effect at")
    pr.add_argument("--deadline", type=int, required=True, help="Unix time voting closes")
    vo = sub.add_parser("vote", help="vote on a proposal (signed with a member key)")
    vo.add_argument("proposal", type=int)
    vo.add_argument("choice", choices=["yes", "no"])
    vo.add_argument("--member", type=int, required=True)
    vo.add_argument("--key-file", required=True)
    ta = sub.add_parser("tally", help="count a proposal whose voting has closed")
    ta.add_argument("proposal", type=int)
    sp = sub.add_parser("split", help="a group of houses breaks away into a new community")
    sp.add_argument("--members", required=True, help="member ids, comma separated")
    sp.add_argument("--community", required=True, help="the new community's id")
    sp.add_argument("--db", required=True, help="the new community's database")
    sp.add_argument("--key-file", required=True, help="the new community gateway's ledger key (made if missing)")
    sub.add_parser("broker-files", help="write mosquitto's password and ACL files and reload the broker")
    tf = sub.add_parser("tariff", help="record a tariff change in the ledger")
    tf.add_argument("--retail", type=int, required=True, help="minor units per kWh")
    tf.add_argument("--feed-in", type=int, required=True)
    tf.add_argument("--fund-margin-ppm", type=int, default=0)
    tf.add_argument("--mechanism", default="sdr", choices=["sdr", "mmr", "auction"])
    tf.add_argument("--grid-fee", type=int, default=0, help="network fee per kWh traded locally")
    tf.add_argument("--fund-export-ppm", type=int, default=0, help="the fund's share of export proceeds")
    tf.add_argument("--from", dest="t_from", type=int, required=True, help="Unix time of an interval boundary")
    lg = sub.add_parser("ledger", help="the community ledger")
    lsub = lg.add_subparsers(dest="lcmd", required=True)
    lsub.add_parser("export", help="write the gateway's ledger (a CBOR sequence) to standard output")
    lv = lsub.add_parser("verify", help="check an exported ledger: signatures, chain, settlements re-run")
    lv.add_argument("file")
    lv.add_argument("--key", help="the gateway's public key (hex) to insist on")
    lf = lsub.add_parser("fund", help="the fund's own statement from an exported ledger: collected, paid out by vote")
    lf.add_argument("file")
    ls_ = lsub.add_parser("statement", help="statements per member from an exported ledger")
    ls_.add_argument("file")
    ls_.add_argument("--from", dest="t_from", type=int, default=0, help="Unix time, interval starts from")
    ls_.add_argument("--to", dest="t_to", type=int, default=2**32, help="Unix time, intervals end by")
    ls_.add_argument("--csv", action="store_true")
    ls_.add_argument("--key", help="the gateway's public key (hex) to insist on")
    from peergrid.fleet.cli import add_parser as fleet_parser

    fleet_parser(sub)
    if argv is None:
        argv = sys.argv[1:]
    rc = _operate(argv)
    if rc is not None:
        return rc
    if argv and argv[0] == "vboard":
        from peergrid.sim.vboard import main as vboard_main

        return vboard_main(argv[1:])
    if argv and argv[0] == "commission":
        from peergrid.commissioning.commission import main as commission_main

        return commission_main(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "fleet":
        import os
        from pathlib import Path

        from peergrid.config import Config
        from peergrid.fleet.cli import fleet

        os.umask(0o077)
        return fleet(args, Config.load(Path(args.config)))
    if args.cmd == "ledger" and args.lcmd == "export":
        from peergrid.admin import ledger_export

        return ledger_export(args)
    if args.cmd == "ledger":
        from peergrid.market import ledger

        try:
            entries = ledger.verify(open(args.file, "rb").read(),
                                    bytes.fromhex(args.key) if getattr(args, "key", None) else None)
        except ledger.LedgerError as e:
            print(f"ledger does NOT verify: {e}", file=sys.stderr)
            return 1
        if args.lcmd == "fund":
            from peergrid.market import statements as stm

            print(stm.fund_statement(entries))
            return 0
        if args.lcmd == "statement":
            from peergrid.market import statements as stm

            c = stm.statements(entries, args.t_from, args.t_to)
            print(stm.to_csv(c) if args.csv else stm.to_table(c), end="" if args.csv else "\n")
            return 0
        kinds: dict[str, int] = {}
        for e in entries:
            kinds[e.type] = kinds.get(e.type, 0) + 1
        print(f"ledger verifies: {len(entries)} entries ("
              + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + "); every settlement re-run")
        from peergrid.market.governance import replay

        st = replay(entries)
        print(f"head: height {len(entries)}, entry {len(entries) - 1}, sha256 {entries[-1].digest.hex()}")
        print(f"signed by key {bytes(entries[0].body.get('key', b'')).hex()} (the genesis entry's)")
        for h in sorted(st.witnessed):
            print(f"witnessed: height {h} by {len(st.witnessed[h])} member(s): "
                  + ",".join(str(m) for m in sorted(st.witnessed[h])))
        if not st.witnessed:
            print("witnessed: no member's mirror has witnessed this ledger yet (peergrid mirror)")
        if st.payouts or st.fund:
            print(f"fund: {st.fund / 100:.2f} after {len(st.payouts)} payout(s) by vote")
        return 0
    if args.cmd in ("run", "status", "member", "device", "broker-files", "tariff", "resource", "installer-token",
                    "propose", "vote", "tally", "split"):
        from peergrid.admin import admin

        return admin(args)
    if args.cmd == "check-board":
        from pathlib import Path

        from peergrid.commissioning.boards import check_paths

        findings = check_paths([Path(x) for x in args.paths])
        for f in findings:
            print(f, file=sys.stderr if f.level == "error" else sys.stdout)
        errors = sum(f.level == "error" for f in findings)
        print(f"{len(args.paths)} boards checked: {errors} errors, {len(findings) - errors} warnings")
        if errors:
            return 1
        if args.footprint:
            return _footprint(args.paths)
        return 0
    if args.cmd == "verify-frame":
        from peergrid.ingest.wire import UplinkVerifier
        from protocol.errors import ProtocolError

        secret = bytes.fromhex(args.secret_hex)
        ver = UplinkVerifier(lambda c, d: secret)
        try:
            msg = ver.open(args.topic, bytes.fromhex(args.frame_hex))
        except ProtocolError as e:
            print(f"rejected: {e}", file=sys.stderr)
            return 1
        print(msg)
        return 0
    p.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
