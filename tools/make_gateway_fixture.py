"""Build a small, populated gateway database for the schema-migration tests.

    .venv/bin/python tools/make_gateway_fixture.py tests/data/gateway-v1

writes gateway-v1.sqlite (the database), gateway-v1.ledger.key (the ledger's
Ed25519 signing key, a test key made from a fixed seed) and gateway-v1.json
(what the database holds: row counts, the ledger head, the times used).

tests/data/gateway-v1.* were made by this script at commit 4d62b6b, the last
commit before the database carried a schema version (peergrid/schema.py):
so the file is a database of schema version 1 with `PRAGMA user_version` 0,
as every gateway installed before then has. Run with a later gateway, the
script makes a database of that gateway's schema instead: keep the committed
file as it is and add a new fixture (gateway-vN) when a test needs one.

What is in it: community "oak" with three members (one with a member key)
and three boards (grid and PV channels, deterministic secrets), a load and
feeder limits, an installer token, a command counter and a decision of the
control loop; 76 minutes of signed readings from each board and a status
message each, taken through the gateway's own validator and store; a
ledger with the genesis, the members joining, a tariff change from the
fifth interval and the first two 15-minute intervals settled. Intervals
three to five have their readings but are not settled yet.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from peergrid.community import registry as reg
from peergrid.commissioning import installer
from peergrid.control import loop
from peergrid.control.controller import Load
from peergrid.ingest.store import Store
from peergrid.ingest.validate import Validator
from peergrid.market import ledger
from peergrid.market.settle import Tariff
from peergrid.market.settler import Settler
from protocol.link import DeviceLink

C = "oak"
T0 = 1_767_225_600                 # 2026-01-01 00:00 UTC, an interval boundary
LENGTH = 900
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]
TARIFF = Tariff(30, 8)
HOUSES = (("house-1", 1800, 0), ("house-2", 400, 2500), ("house-3", 900, 600))   # (device, load W, PV W)


def seed(text: str) -> bytes:
    return hashlib.sha256(f"peergrid fixture {text}".encode()).digest()


def build(out: Path) -> dict:
    dbp = out.with_suffix(".sqlite")
    for p in (dbp, dbp.with_name(dbp.name + "-wal"), dbp.with_name(dbp.name + "-shm")):
        p.unlink(missing_ok=True)
    db = reg.connect(dbp)
    r = reg.Registry(db)
    r.add_community(C, "Oak Street")
    key = Ed25519PrivateKey.from_private_bytes(seed("ledger key"))
    keyp = out.with_suffix(".ledger.key")
    keyp.write_bytes(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()))
    keyp.chmod(0o600)
    store = Store(reg.connect(dbp), lambda c, d: 0, read_db=reg.connect(dbp))
    st = Settler(reg.connect(dbp), C, key, TARIFF, LENGTH, 120)
    links = {}
    for i, (dev, _, _) in enumerate(HOUSES):
        pub = ledger.public_bytes(Ed25519PrivateKey.from_private_bytes(seed(f"member {i}"))) if i == 0 else None
        mid = r.add_member(C, f"house {i + 1}", pub)
        st.record("member_joined", T0 - 3600, {"member": mid, "name": f"house {i + 1}", **({"key": pub} if pub else {})})
        secret = seed(f"device {dev}")
        r.add_device(C, dev, "sim", CH, mid, secret=secret)
        links[dev] = DeviceLink(C, dev, secret)
    r.add_load(C, Load("boiler", "house-1", 0, 2000, need_wh=3000, deadline_s=7 * 3600))
    r.set_feeder(C, 40_000, 30_000)
    st.set_tariff(Tariff(32, 9), T0 + 4 * LENGTH, T0 - 1800)
    installer.make_token(db, "electrician", 30)
    db.executescript(loop.SCHEMA)
    db.execute("INSERT INTO cmd_ctr VALUES (?, 'house-1', 1000)", (C,))
    db.execute("INSERT INTO decisions VALUES (?, ?, 'load', 'boiler', 'house-1', 0, 1, 'surplus')", (C, T0 + 600.0))

    val = Validator(C, r.device, 300, 3600, history=store.history, readings=store.energy_history)
    regs = {dev: [10_000 + 1000 * k, 500 * k, 0, 20_000 * k] for k, (dev, _, _) in enumerate(HOUSES)}
    for dev, link in links.items():
        f = bytes(link.status({"boot": 1, "seq": 0, "t": T0 - 5, "fw": "0.9.0", "cfg": b"\x01" * 8, "reset": 1,
                               "heap": 90_000, "uptime": 10, "buffered": 0, "online": 1, "board": "sim"}))
        store.write([val.check(link.t_status, f, T0 - 5)], [], {})
    for k in range(0, 76):
        t = T0 + 60 * k
        batch = []
        for dev, load_w, pv_w in HOUSES:
            pv = pv_w * (0.5 + 0.5 * (k % 20) / 20)
            net = load_w - pv
            g = regs[dev]
            if k:
                g[0 if net >= 0 else 1] += round(abs(net) / 60)
                g[3] += round(pv / 60)
            ch = [int(net), g[0], g[1], int(abs(net) / 0.23), -int(pv), g[2], g[3], int(pv / 0.23)]
            f = bytes(links[dev].reading(1, k + 1, t, 0, 2300, 5000, ch, 2))
            batch.append(val.check(links[dev].t_reading, f, t + 0.5))
        store.write(batch, [], {})
    assert st.settle_due(T0 + 2 * LENGTH + 120) == 2
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for (t,) in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")}
    raws = [bytes(x[0]) for x in db.execute("SELECT raw FROM ledger ORDER BY n")]
    entries = ledger.verify(b"".join(raws))
    info = {"community": C, "t0": T0, "interval_s": LENGTH, "grace_s": 120, "tariff": [30, 8],
            "user_version": db.execute("PRAGMA user_version").fetchone()[0], "counts": counts,
            "ledger_entries": len(raws), "ledger_head_sha256": hashlib.sha256(raws[-1]).hexdigest(),
            "settled": [e.body["start"] for e in entries if e.type == "settlement"],
            "last_reading_t": T0 + 75 * 60, "devices": [h[0] for h in HOUSES],
            "device_secrets": "sha256('peergrid fixture device <id>')"}
    for c in (st.db, store.db, store.read_db, db):
        c.close()
    # one file: no WAL or SHM next to it, the journal mode of a gateway's database kept
    assert not dbp.with_name(dbp.name + "-wal").exists()
    out.with_suffix(".json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: make_gateway_fixture.py OUT_STEM   (e.g. tests/data/gateway-v1)")
    i = build(Path(sys.argv[1]))
    print(json.dumps(i["counts"]), i["ledger_entries"], "ledger entries")
