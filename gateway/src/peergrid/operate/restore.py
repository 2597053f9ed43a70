"""`peergrid restore`: put a backup (peergrid.operate.backup) back.

    peergrid -c /srv/peergrid/peergrid.toml restore BACKUP_DIR [--force]

The backup's config is written to the `-c` path and every other file goes
where that config names it (relative paths are taken from the new place, so
a backup can be restored into a fresh directory; absolute ones stay).

In this order, and nothing is written before the checks pass:
1. the backup: `SHA256SUMS` and the manifest agree, every file listed is
   there with its size and SHA-256 (a damaged file is named), the format and
   the database's schema version are ones this gateway knows;
2. the target: a database there is replaced only with --force, and never
   while a program has it open (a running gateway); other files that exist
   and differ from the backup's also need --force. A replaced database is
   kept beside it as `<db>.replaced-<UTC time>`;
3. the files are written under temporary names beside their targets; the
   database's ledger must be byte for byte the backup's `ledger.cbor`, verify
   (peergrid.market.ledger.verify: signatures, chain, settlements re-run) and
   be signed by the restored ledger key;
4. then each file is renamed into place with the mode it had.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sqlite3
import sys
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from peergrid import schema
from peergrid.config import Config
from peergrid.market import ledger
from peergrid.operate.backup import (DB_NAME, FORMAT, FORMAT_VERSION, LEDGER_NAME, MANIFEST, NAMES, SUMS,
                                     _fsync_dir, ledger_head, ledger_raws, secret_files, sha256_file, uri)


class RestoreError(Exception):
    pass


def _sums(bdir: Path) -> dict[str, str]:
    out = {}
    p = bdir / SUMS
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RestoreError(f"{p}: cannot be read ({e}): not a complete backup") from None
    for k, line in enumerate(lines, 1):
        m = re.fullmatch(r"([0-9a-f]{64})  ([A-Za-z0-9._-]+)", line)
        if m is None:
            raise RestoreError(f"{p}: line {k} is not '<SHA-256>  <name>': the file is damaged")
        out[m.group(2)] = m.group(1)
    return out


def check(bdir: Path) -> dict:
    """The backup's manifest, once every file in it checks out; raises
    RestoreError naming what does not."""
    if not (bdir / MANIFEST).is_file():
        raise RestoreError(f"{bdir}: no {MANIFEST}: not a (complete) peergrid backup")
    sums = _sums(bdir)
    mp = bdir / MANIFEST
    if sums.get(MANIFEST) != sha256_file(mp):
        raise RestoreError(f"{mp}: its SHA-256 does not match {SUMS}: the file is damaged or was altered")
    try:
        m = json.loads(mp.read_text())
        files = m["files"]
        if m["format"] != FORMAT:
            raise ValueError(f"format {m['format']!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise RestoreError(f"{mp}: not a peergrid backup manifest ({e})") from None
    if not isinstance(m.get("format_version"), int) or m["format_version"] > FORMAT_VERSION:
        raise RestoreError(f"{mp}: backup format {m.get('format_version')!r}, this gateway reads up to "
                           f"{FORMAT_VERSION}: restore it with the PeerGrid that made it")
    seen = set()
    for f in files:
        if not isinstance(f, dict):
            raise RestoreError(f"{mp}: unexpected entry {f!r}")
        name, role = f.get("name"), f.get("role")
        if role not in NAMES or NAMES[role] != name or name in seen:
            raise RestoreError(f"{mp}: unexpected entry {name!r} ({role!r})")
        seen.add(name)
        p = bdir / name
        if not p.is_file():
            raise RestoreError(f"{p}: missing from the backup")
        if sums.get(name) != f["sha256"]:
            raise RestoreError(f"{p}: {MANIFEST} and {SUMS} disagree on its SHA-256: the backup is damaged")
        if not re.fullmatch(r"0[0-7]{3}", str(f.get("mode"))):
            raise RestoreError(f"{mp}: the mode of {name} is not an octal file mode")
        if p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
            raise RestoreError(f"{p}: its SHA-256 does not match the manifest: the file is damaged or was altered")
    extra = set(sums) - seen - {MANIFEST}
    if extra:
        raise RestoreError(f"{bdir / SUMS}: lists {', '.join(sorted(extra))}, which the manifest does not")
    for role in ("config", "database"):
        if NAMES[role] not in seen:
            raise RestoreError(f"{mp}: the backup has no {role}")
    if bool(m.get("ledger")) != (LEDGER_NAME in seen):
        raise RestoreError(f"{mp}: the ledger's head and {LEDGER_NAME} do not go together")
    if not isinstance(m.get("schema_version"), int) or m["schema_version"] > schema.CURRENT:
        raise RestoreError(f"the backup's database has schema version {m.get('schema_version')}, newer than this "
                           f"gateway knows ({schema.CURRENT}): restore it with that PeerGrid or a newer one")
    return m


def in_use(db: Path) -> bool:
    """Whether another connection has the database open (a running gateway):
    leaving WAL mode needs the only connection. When nobody has it, it is
    left a single file (its WAL checkpointed into it)."""
    try:
        c = sqlite3.connect(uri(db, "rw"), uri=True, timeout=0, isolation_level=None)
    except sqlite3.Error:
        return False
    try:
        c.execute("PRAGMA journal_mode=DELETE").fetchone()
        return False
    except sqlite3.OperationalError as e:
        return "locked" in str(e) or "busy" in str(e)
    except sqlite3.DatabaseError:
        return False                           # not a database: nothing runs on it
    finally:
        c.close()


def _stage(src: Path, final: Path) -> Path:
    """A copy of src beside final, under a temporary name, 0600, on disk."""
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = final.with_name(f".{final.name}.restore-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return tmp


def verify_database(db: Path, m: dict, export: bytes, key: Path | None) -> dict | None:
    """The staged database holds what the manifest says: its schema version
    and a ledger equal to the export that verifies and whose genesis names
    the ledger key that comes with it. Returns the ledger's head."""
    c = sqlite3.connect(uri(db, "ro"), uri=True)
    try:
        if schema.version(c) != m.get("user_version"):
            raise RestoreError(f"the restored database has schema version {schema.version(c)}, the manifest "
                               f"says {m.get('user_version')}")
        raws = ledger_raws(c)
    finally:
        c.close()
    if b"".join(raws) != export:
        raise RestoreError(f"the ledger in the restored database is not the backup's {LEDGER_NAME}")
    if not raws:
        return None
    head = ledger_head(raws)
    assert head is not None
    try:
        entries = ledger.verify(export, bytes.fromhex(head["public_key"]), workers=min(4, os.cpu_count() or 1))
    except ledger.LedgerError as e:
        raise RestoreError(f"the ledger in the restored database does NOT verify: {e}") from None
    if head != m["ledger"] or len(entries) != head["entries"]:
        raise RestoreError(f"the ledger's head {head} is not the one in the manifest {m['ledger']}")
    if key is not None:
        try:
            pub = ledger.public_bytes(Ed25519PrivateKey.from_private_bytes(key.read_bytes()))
        except ValueError:
            raise RestoreError("the ledger key in the backup is not an Ed25519 key") from None
        if pub.hex() != head["public_key"]:
            raise RestoreError("the ledger key in the backup is not the key the ledger was signed with: the "
                               "restored gateway could not continue it")
    return head


def restore(bdir: Path, cfg_path: Path, force: bool = False) -> dict:
    """Restore the backup in `bdir` with its config at `cfg_path`; returns
    what was done. Raises RestoreError before anything was replaced."""
    m = check(bdir)
    files = {f["role"]: f for f in m["files"]}
    cfg_path = cfg_path.absolute()
    staged: dict[str, Path] = {}
    try:
        staged["config"] = _stage(bdir / NAMES["config"], cfg_path)
        cfg = Config.load(staged["config"])    # its relative paths from the new place
        targets = {"config": cfg_path, "database": cfg.db, **secret_files(cfg)}
        for role in files:
            if role != "ledger" and role not in targets:
                raise RestoreError(f"the backup has {NAMES[role]} ({role}), but its config names no place for it")
        db = cfg.db
        aside = None
        side = [db.with_name(db.name + s) for s in ("-wal", "-shm")]
        if db.exists() or side[0].exists():
            if not force:
                raise RestoreError(f"{db} exists: a restore replaces a database only with --force (then the old "
                                   "one is kept beside it); stop its gateway first")
            if in_use(db):
                raise RestoreError(f"{db} is open in another program (a running gateway?): stop it first; a "
                                   "restore never replaces the database of a running gateway")
        differ = [str(targets[r]) for r, f in files.items() if r not in ("ledger", "database")
                  and targets[r].exists() and sha256_file(targets[r]) != f["sha256"]]
        if differ and not force:
            raise RestoreError("these files exist and differ from the backup's: " + ", ".join(differ)
                               + " (--force replaces them)")
        staged["database"] = _stage(bdir / DB_NAME, db)
        for role in files:
            if role not in staged and role != "ledger":
                staged[role] = _stage(bdir / NAMES[role], targets[role])
        export = (bdir / LEDGER_NAME).read_bytes() if "ledger" in files else b""
        head = verify_database(staged["database"], m, export, staged.get("ledger_key"))
        # everything checks out: into place, the database before the config
        if db.exists():
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            aside = db.with_name(f"{db.name}.replaced-{stamp}")
            os.replace(db, aside)
        for p in side:
            p.unlink(missing_ok=True)          # never a WAL of another database next to this one
        done = []
        for role in sorted(staged, key=lambda r: (r == "config", r != "database", r)):
            os.chmod(staged[role], int(files[role]["mode"], 8))
            os.replace(staged[role], targets[role])
            _fsync_dir(targets[role].parent)
            done.append((role, targets[role]))
        staged.clear()
    finally:
        for p in staged.values():
            p.unlink(missing_ok=True)
    return {"manifest": m, "files": done, "db": db, "aside": aside, "ledger": head, "config": cfg_path}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peergrid restore", description="restore a backup (peergrid backup) into a "
                                "gateway's directory; checks every file and verifies the ledger before it "
                                "replaces anything")
    p.add_argument("--config", "-c", default="peergrid.toml",
                   help="where the restored config goes; the other files go where it names them")
    p.add_argument("backup", help="the backup's directory")
    p.add_argument("--force", action="store_true",
                   help="replace an existing database (kept beside it) and files that differ; never the database "
                        "of a running gateway")
    a = p.parse_args(argv)
    os.umask(0o077)
    try:
        r = restore(Path(a.backup), Path(a.config), a.force)
    except (RestoreError, OSError, sqlite3.Error) as e:
        print(f"restore refused: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:                    # the backup's config does not load
        print(f"restore refused: {e}", file=sys.stderr)
        return 1
    m, head = r["manifest"], r["ledger"]
    print(f"restored the backup of {m['community']} taken {m['created']} into {r['config'].parent}:")
    for role, path in r["files"]:
        print(f"  {role:12s} {path}")
    if r["aside"]:
        print(f"  the database it replaced: {r['aside']}")
    print("ledger: " + (f"{head['entries']} entries, verified, signed by the restored key; head {head['head']} "
                        f"sha256 {head['head_sha256']}" if head else "none in the backup"))
    if m["schema_version"] < schema.CURRENT:
        print(f"schema version {m['schema_version']}: the gateway upgrades it to {schema.CURRENT} when it opens it")
    print("next: `peergrid broker-files` (the broker takes the restored accounts), then start the gateway. "
          f"Readings it stored and ledger entries it signed after {m['created']} are not in this backup "
          "(README, \"Backups, restore and upgrades\").")
    return 0
