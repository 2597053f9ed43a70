"""`peergrid backup`: a consistent copy of a gateway, taken while it runs.

    peergrid -c peergrid.toml backup [--out DIR]

DIR (default: backups/<community>-<UTC time> next to the config) is a new
directory, 0700, with files 0600:

- `gateway.db`: the database, copied with SQLite's online backup API in one
  step. The copy is one read transaction of the source: every transaction
  committed before it began and nothing of any later one, while the gateway
  goes on writing (WAL: a reader never blocks the writer). The copy is made
  self-contained (rollback journal, no -wal file) and quick-checked.
- `ledger.cbor`: the ledger of that copy, the bytes `peergrid ledger export`
  writes, verified (signatures, chain, every settlement re-run).
- the config and the secrets a gateway needs to go on as itself: the ledger's
  signing key, the commissioning reports' key, mosquitto's password and ACL
  files, the community CA's certificate and key and the broker's certificate
  and key, each when the config names it and it exists.
- `manifest.json`: each file's role, original path, mode, size and SHA-256,
  the database's schema version, the ledger's head (entries, the SHA-256 of
  the last one, the signing key) and the time; `SHA256SUMS` lists every file
  and the manifest (`sha256sum -c SHA256SUMS` checks a copy anywhere).

The directory is written under a temporary name and renamed when complete,
so a directory with the final name is a whole backup. `peergrid restore`
puts it back (peergrid.operate.restore); README "Backups, restore and
upgrades" says what a restore cannot bring back.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

from peergrid import __version__, schema
from peergrid.config import Config
from peergrid.market import ledger

FORMAT = "peergrid-backup"
FORMAT_VERSION = 1
DB_NAME = "gateway.db"
LEDGER_NAME = "ledger.cbor"
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
# role -> the file's name in a backup
NAMES = {"config": "peergrid.toml", "database": DB_NAME, "ledger": LEDGER_NAME, "ledger_key": "ledger.key",
         "report_key": "gateway.key", "passwd": "passwd", "acl": "acl", "ca_cert": "ca.pem", "ca_key": "ca.key",
         "broker_cert": "broker.pem", "broker_key": "broker.key"}


class BackupError(Exception):
    pass


def _beside_db(cfg: Config, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else cfg.db.parent / p


def secret_files(cfg: Config) -> dict[str, Path]:
    """role -> where the config puts that file (whether or not it exists).
    The signing keys are found as the gateway finds them: relative to the
    database's folder."""
    out: dict[str, Path] = {}
    if cfg.extra.get("settlement"):
        out["ledger_key"] = _beside_db(cfg, str(cfg.extra["settlement"].get("key_file", "ledger.key")))
    out["report_key"] = _beside_db(cfg, str(cfg.extra.get("installer", {}).get("key_file", "gateway.key")))
    for role, p in (("passwd", cfg.passwd_file), ("acl", cfg.acl_file), ("ca_cert", cfg.ca_file),
                    ("ca_key", cfg.ca_key_file), ("broker_cert", cfg.cert_file), ("broker_key", cfg.key_file)):
        if p is not None:
            out[role] = p
    return out


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ledger_head(raws: list[bytes]) -> dict | None:
    """What the manifest says of a ledger: entries, the SHA-256 of the last
    (the `prev` the next entry will carry) and the genesis' public key."""
    if not raws:
        return None
    genesis = ledger.verify(raws[0])[0]
    return {"entries": len(raws), "head": len(raws) - 1, "head_sha256": hashlib.sha256(raws[-1]).hexdigest(),
            "public_key": bytes(genesis.body["key"]).hex()}


def ledger_raws(db: sqlite3.Connection) -> list[bytes]:
    """The ledger's entries in order, as the settler exports them."""
    if not schema.table_exists(db, "ledger"):
        return []
    return [bytes(r[0]) for r in db.execute("SELECT raw FROM ledger ORDER BY n")]


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def uri(p: Path, mode: str) -> str:
    """An SQLite URI for a file (any characters in its name) and a mode."""
    return f"{p.absolute().as_uri()}?mode={mode}"


def copy_database(src: Path, dst: Path) -> None:
    """The online backup of `src` into the new file `dst`, in one step (a
    backup in several steps starts again whenever the gateway writes, and
    would never end under load), then made one self-contained file."""
    if not src.exists():
        raise BackupError(f"database {src} not found")
    s = sqlite3.connect(uri(src, "rw"), uri=True, timeout=30)      # never creates; never writes
    d = sqlite3.connect(str(dst))
    try:
        s.backup(d)
        d.execute("PRAGMA journal_mode=DELETE")
        ok = d.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise BackupError(f"the copy of {src} fails SQLite's quick check: {ok}")
    finally:
        d.close()
        s.close()
    os.chmod(dst, 0o600)


def backup(cfg_path: Path, out: Path | None = None, now: float | None = None) -> tuple[Path, dict]:
    """Write a backup of the gateway whose config is `cfg_path`; returns its
    directory and manifest."""
    cfg = Config.load(cfg_path)
    now = time.time() if now is None else now
    stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    if out is None:
        out = cfg_path.resolve().parent / "backups" / f"{cfg.community}-{stamp:%Y%m%dT%H%M%SZ}"
    if out.exists():
        raise BackupError(f"{out} exists: a backup goes into a new directory")
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    tmp.mkdir(mode=0o700)
    os.chmod(tmp, 0o700)
    files: list[dict] = []

    def add(role: str, origin: Path | None, data: bytes | None = None) -> None:
        name = NAMES[role]
        if data is not None:
            _write(tmp / name, data)
        mode = 0o600 if origin is None else os.stat(origin).st_mode & 0o777
        files.append({"name": name, "role": role, "path": None if origin is None else str(origin.resolve()),
                      "mode": f"{mode:04o}", "size": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)})

    try:
        copy_database(cfg.db, tmp / DB_NAME)
        add("database", cfg.db)
        with sqlite3.connect(uri(tmp / DB_NAME, "ro"), uri=True) as db:
            user_version = schema.version(db)
            raws = ledger_raws(db)
        db.close()
        export = b"".join(raws)
        head = None
        if raws:
            try:
                entries = ledger.verify(export, workers=min(4, os.cpu_count() or 1))
            except ledger.LedgerError as e:
                raise BackupError(f"the ledger in {cfg.db} does NOT verify: {e}") from None
            head = ledger_head(raws)
            assert head is not None and len(entries) == head["entries"]
            add("ledger", None, export)
        add("config", cfg_path, cfg_path.read_bytes())
        for role, p in secret_files(cfg).items():
            if p.exists():
                add(role, p, p.read_bytes())
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "peergrid": __version__,
                    "community": cfg.community, "created": stamp.isoformat(timespec="seconds"),
                    "created_unix": round(now, 3), "config": str(cfg_path.resolve()),
                    "schema_version": max(1, user_version), "user_version": user_version,
                    "ledger": head, "files": files}
        text = json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n"
        _write(tmp / MANIFEST, text)
        sums = "".join(f"{f['sha256']}  {f['name']}\n" for f in files)
        _write(tmp / SUMS, (sums + f"{hashlib.sha256(text).hexdigest()}  {MANIFEST}\n").encode())
        _fsync_dir(tmp)
        os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        for f in tmp.iterdir() if tmp.exists() else ():
            f.unlink()
        if tmp.exists():
            tmp.rmdir()
        raise
    return out, manifest


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peergrid backup", description="a consistent backup of the gateway's "
                                "database, ledger, config and keys, taken while it runs")
    p.add_argument("--config", "-c", default="peergrid.toml", help="the gateway's config (TOML)")
    p.add_argument("--out", help="the backup's directory, which must not exist "
                                 "(default: backups/<community>-<UTC time> next to the config)")
    a = p.parse_args(argv)
    os.umask(0o077)
    try:
        out, m = backup(Path(a.config), Path(a.out) if a.out else None)
    except (BackupError, OSError, sqlite3.Error) as e:
        print(f"backup failed: {e}", file=sys.stderr)
        return 1
    led = m["ledger"]
    print(f"backup of {m['community']} in {out} ({len(m['files'])} files, 0600 in a 0700 directory: it holds "
          "secrets; keep a copy off this machine)")
    size = next(f["size"] for f in m["files"] if f["role"] == "database")
    print(f"  database: schema version {m['schema_version']}, {size} bytes")
    print("  ledger: " + (f"{led['entries']} entries, verified; head {led['head']} sha256 {led['head_sha256']}"
                          if led else "none (no [settlement] or nothing recorded yet)"))
    print("  files: " + ", ".join(f["name"] for f in m["files"]))
    return 0
