"""Command line of the gateway. Sub-commands arrive with their issues."""
from __future__ import annotations

import argparse
import sys

from peergrid import __version__


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
    sub.add_parser("vboard", help="run the firmware as a virtual board (peergrid vboard --help)",
                   add_help=False)
    p.add_argument("--config", "-c", default="peergrid.toml", help="gateway config (TOML)")
    sub.add_parser("run", help="run the gateway: ingest, validate, store")
    sub.add_parser("status", help="devices online and stale, rejections by reason, ingest rate")
    m = sub.add_parser("member", help="members (houses)")
    msub = m.add_subparsers(dest="mcmd", required=True)
    ma = msub.add_parser("add")
    ma.add_argument("name")
    msub.add_parser("list")
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
    rb.add_argument("--soc-min", type=float, default=0.1)
    rb.add_argument("--soc-max", type=float, default=0.95)
    rb.add_argument("--efficiency", type=float, default=0.92)
    rf = rsub.add_parser("feeder", help="the community's feeder limits")
    rf.add_argument("--import-kw", type=float, required=True)
    rf.add_argument("--export-kw", type=float, required=True)
    rr = rsub.add_parser("remove")
    rr.add_argument("id")
    rsub.add_parser("list")
    rd = rsub.add_parser("decisions", help="the control loop's latest decisions with their reasons")
    rd.add_argument("--last", type=int, default=20)
    it = sub.add_parser("installer-token", help="a token for an electrician's commissioning tool (shown once)")
    it.add_argument("name", help="who gets it, e.g. the electrician's firm")
    it.add_argument("--days", type=float, default=7)
    it.add_argument("--revoke", action="store_true")
    cm = sub.add_parser("commission", help="commission a house: the board on USB, checks, signed report",
                        add_help=False)
    del cm
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
    ls_ = lsub.add_parser("statement", help="statements per member from an exported ledger")
    ls_.add_argument("file")
    ls_.add_argument("--from", dest="t_from", type=int, default=0, help="Unix time, interval starts from")
    ls_.add_argument("--to", dest="t_to", type=int, default=2**32, help="Unix time, intervals end by")
    ls_.add_argument("--csv", action="store_true")
    ls_.add_argument("--key", help="the gateway's public key (hex) to insist on")
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "vboard":
        from peergrid.vboard import main as vboard_main

        return vboard_main(argv[1:])
    if argv and argv[0] == "commission":
        from peergrid.commission import main as commission_main

        return commission_main(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "ledger" and args.lcmd == "export":
        from peergrid.admin import ledger_export

        return ledger_export(args)
    if args.cmd == "ledger":
        from peergrid import ledger

        try:
            entries = ledger.verify(open(args.file, "rb").read(),
                                    bytes.fromhex(args.key) if args.key else None)
        except ledger.LedgerError as e:
            print(f"ledger does NOT verify: {e}", file=sys.stderr)
            return 1
        if args.lcmd == "statement":
            from peergrid import statements as stm

            c = stm.statements(entries, args.t_from, args.t_to)
            print(stm.to_csv(c) if args.csv else stm.to_table(c), end="" if args.csv else "\n")
            return 0
        kinds: dict[str, int] = {}
        for e in entries:
            kinds[e.type] = kinds.get(e.type, 0) + 1
        print(f"ledger verifies: {len(entries)} entries ("
              + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + "); every settlement re-run")
        return 0
    if args.cmd in ("run", "status", "member", "device", "broker-files", "tariff", "resource", "installer-token"):
        from peergrid.admin import admin

        return admin(args)
    if args.cmd == "check-board":
        from pathlib import Path

        from peergrid.boards import check_paths

        findings = check_paths([Path(x) for x in args.paths])
        for f in findings:
            print(f, file=sys.stderr if f.level == "error" else sys.stdout)
        errors = sum(f.level == "error" for f in findings)
        print(f"{len(args.paths)} boards checked: {errors} errors, {len(findings) - errors} warnings")
        return 1 if errors else 0
    if args.cmd == "verify-frame":
        from peergrid.wire import UplinkVerifier
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
