"""Restore from any house (issue 22, part 3): a gateway rebuilt from one
member's mirror (`peergrid rebuild`) settles the next interval, and its
ledger continues the same chain: the member's mirror follows it without an
alarm, and `ledger verify` agrees on both."""
from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys

from test_governance import _community
from test_settler import DAY0

from peergrid.community import registry as reg
from peergrid.market import ledger
from peergrid.market.follow import Follower
from peergrid.market.settle import Tariff
from peergrid.market.settler import Settler, load_key


def _cli(cfg, *args):
    return subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(cfg), *args], capture_output=True,
                          text=True, timeout=60)


def test_a_gateway_rebuilt_from_a_mirror_settles_on_in_the_same_chain(tmp_path) -> None:
    old_dir = tmp_path / "old"
    old_dir.mkdir()
    st, keys = _community(old_dir)
    st.registry.add_partner("oak", 2, 1, 100)
    assert st.settle_due(DAY0 + 40 * 900 + 120) == 40
    # a member's mirror: followed entry by entry, verified
    mirror = Follower()
    mirror.extend(list(ledger.iter_export(st.export())))
    (tmp_path / "mirror.cbor").write_bytes(mirror.export())
    head = mirror.height

    # the old gateway is gone; the operator has the ledger key from the backup
    new = tmp_path / "new"
    new.mkdir()
    shutil.copy(old_dir / "k", new / "ledger.key")
    cfg = new / "gw.toml"
    cfg.write_text('[gateway]\ncommunity = "oak"\ndb = "gw.db"\n'
                   '[settlement]\nretail = 3187\nfeed_in = 812\nfund_margin_ppm = 20000\ninterval_min = 15\n')
    r = _cli(cfg, "rebuild", str(tmp_path / "mirror.cbor"))
    assert r.returncode == 0, r.stderr
    assert f"{head} entries" in r.stdout and "5 members" in r.stdout and "40 settled intervals" in r.stdout
    assert "boards' secrets" in r.stdout
    # a second rebuild into the same database is refused
    r2 = _cli(cfg, "rebuild", str(tmp_path / "mirror.cbor"))
    assert r2.returncode != 0 and "already holds a ledger" in r2.stderr

    db = reg.connect(new / "gw.db")
    rg = reg.Registry(db)
    assert [(m, n) for m, n, _ in rg.members("oak")] == [(m, f"house {m}") for m in range(1, 6)]
    assert all(rg.member_key("oak", m) == keys[m].public_key().public_bytes_raw() for m in range(1, 6))
    assert rg.partners("oak") == [(2, 1, 100)]
    # the boards are commissioned again (new secrets) and send their readings
    with sqlite3.connect(str(old_dir / "gw.db")) as old:
        devs = list(old.execute("SELECT id, member, board, channels FROM devices"))
        rows = list(old.execute("SELECT * FROM readings WHERE t >= ?", (DAY0 + 40 * 900 - 600,)))
    import json

    for d, m, board, chans in devs:
        rg.add_device("oak", d, board, json.loads(chans), m)
    from peergrid.ingest import store

    store.init(db)
    db.execute("PRAGMA foreign_keys=OFF")
    db.executemany(f"INSERT INTO readings VALUES ({','.join('?' * len(rows[0]))})", rows)
    new_st = Settler(db, "oak", load_key(new / "ledger.key"), Tariff(3187, 812, 20000))
    assert new_st.settle_due(DAY0 + 44 * 900 + 120) == 4          # the next intervals, not the settled ones again
    new_export = new_st.export()
    assert new_export.startswith(mirror.export())
    # the old gateway, had it lived, would have written the same entries
    assert st.settle_due(DAY0 + 44 * 900 + 120) == 4
    old_bodies = [e.body for e in ledger.verify(st.export())[head:]]
    assert [e.body for e in ledger.verify(new_export)[head:]] == old_bodies
    # the member's mirror follows the rebuilt gateway: same key, same chain
    assert mirror.extend(list(ledger.iter_export(new_export))[head:]) == 4
    f_new = tmp_path / "new.cbor"
    f_new.write_bytes(new_export)
    f_mirror = tmp_path / "mirror-now.cbor"
    f_mirror.write_bytes(mirror.export())
    a, b = _cli(cfg, "ledger", "verify", str(f_new)), _cli(cfg, "ledger", "verify", str(f_mirror))
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and "head: height" in a.stdout


def test_rebuild_refuses_without_the_key_or_with_another(tmp_path) -> None:
    st, _ = _community(tmp_path)
    st.settle_due(DAY0 + 4 * 900 + 120)
    (tmp_path / "mirror.cbor").write_bytes(st.export())
    new = tmp_path / "new"
    new.mkdir()
    cfg = new / "gw.toml"
    cfg.write_text('[gateway]\ncommunity = "oak"\ndb = "gw.db"\n[settlement]\nretail = 3187\nfeed_in = 812\n')
    r = _cli(cfg, "rebuild", str(tmp_path / "mirror.cbor"))
    assert r.returncode != 0 and "missing" in r.stderr and "backup" in r.stderr
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    (new / "ledger.key").write_bytes(Ed25519PrivateKey.generate().private_bytes_raw())
    r = _cli(cfg, "rebuild", str(tmp_path / "mirror.cbor"))
    assert r.returncode != 0 and "does not verify with this ledger key" in r.stderr
    # a damaged mirror is refused too
    shutil.copy(tmp_path / "k", new / "ledger.key")
    data = bytearray(st.export())
    data[len(data) // 2] ^= 1
    (tmp_path / "bad.cbor").write_bytes(bytes(data))
    r = _cli(cfg, "rebuild", str(tmp_path / "bad.cbor"))
    assert r.returncode != 0 and "does not verify" in r.stderr
