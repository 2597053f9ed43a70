"""`peergrid doctor`: what is wrong with a gateway's installation, and what
to do about it. Each check is a small function that returns findings
(level, what, advice); the command runs them all and prints one line of
finding and one of advice per problem; its exit status is 1 when any
finding is an error (warnings do not fail it), `--json` prints them as
JSON.

Checks: the broker (reachable, accepting the gateway's user name and
password), mosquitto's config (what the gateway's session needs), the TLS
listener (certificate chain, names, expiry, what the listener presents),
all in peergrid.operate.doctor_net, with the HTTP port (free, or a running
gateway's); here the database (opens, integrity, schema version, free disk,
writable), the clock (synchronised) and secret files (private). No password
or key is ever printed."""
from __future__ import annotations

import argparse
import datetime as dt
import grp
import json
import os
import sqlite3
import stat
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from peergrid import schema
from peergrid.config import Config
from peergrid.operate.doctor_net import (Finding, check_broker, check_broker_conf, check_http, check_tls, error,
                                         ok, quote, warning)

__all__ = ["Finding", "check_broker", "check_broker_conf", "check_tls", "check_http", "check_disk",
           "check_database", "check_clock", "check_permissions", "run_checks", "main"]

CHECKS = ("broker", "broker-conf", "tls", "database", "clock", "permissions", "http")
CLOCK_FLOOR = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc).timestamp()   # a clock before this is wrong


# -- the database and its disk --------------------------------------------------------------------

def _connect(path: str) -> sqlite3.Connection:
    return sqlite3.connect(Path(path).absolute().as_uri() + "?mode=rw", uri=True, timeout=5)


def check_disk(path: Path, min_free_mb: float = 50,
               statvfs: Callable[[str], Any] = os.statvfs) -> list[Finding]:
    """Free space (and inodes) on the filesystem of the database's folder."""
    folder = path.parent
    room = (f"free space on it (`df -h {quote(folder)}`, `du -sh {quote(folder)}/*`: old backups and logs go first); "
            "until then the gateway stores and acknowledges nothing, the broker holds the readings")
    try:
        v = statvfs(str(folder))
    except OSError as e:
        return [error("database", f"cannot look at the disk of {folder}: {e.strerror}", "check [gateway] db")]
    free = v.f_bavail * v.f_frsize
    if v.f_bavail == 0:
        return [error("database", f"the disk holding {folder} is full (0 bytes free)", room)]
    if v.f_files and v.f_favail == 0:
        return [error("database", f"the disk holding {folder} has no free inodes", room)]
    mb = free / 1e6
    if mb < min_free_mb:
        return [error("database", f"only {mb:.1f} MB free on the disk holding {folder} (the least is "
                                  f"{min_free_mb:g} MB, --min-free-mb)", room)]
    if mb < 4 * min_free_mb:
        return [warning("database", f"{mb:.0f} MB free on the disk holding {folder}: it is filling", room)]
    return [ok("database", f"{mb:.0f} MB free on the disk holding {folder}")]


def _write_probe(db: sqlite3.Connection, path: Path) -> Finding | None:
    """Write into the database inside a transaction that is rolled back."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            page = db.execute("PRAGMA page_size").fetchone()[0]
            db.execute("CREATE TABLE peergrid_doctor_probe (x BLOB)")
            db.execute("INSERT INTO peergrid_doctor_probe VALUES (zeroblob(?))", (4 * page,))
        finally:
            db.rollback()
    except sqlite3.Error as e:
        text = str(e)
        if "full" in text:
            return error("database", f"a write to {path} fails: {text}",
                         f"free space on its disk (`df -h {quote(path.parent)}`); if there is room, a quota or "
                         "a size limit stops it")
        if "readonly" in text or "read-only" in text:
            return error("database", f"{path} is read-only for this user: {text}",
                         f"the gateway's user must own it and its folder (chown; ls -l {quote(path.parent)})")
        if "locked" in text or "busy" in text:
            return warning("database", f"{path} stayed locked for 5 s: {text}",
                           f"another process holds it (`fuser {quote(path)}`); a backup, or a stuck command")
        return error("database", f"a write to {path} fails: {text}", "see the gateway's log; restore a backup if "
                                                                        "the database is damaged")
    return None


def check_database(cfg: Config, min_free_mb: float = 50, statvfs: Callable[[str], Any] = os.statvfs,
                   connect: Callable[[str], sqlite3.Connection] = _connect, quick: bool = False) -> list[Finding]:
    """Opens, passes SQLite's integrity check, has the schema version the
    code expects, has room on its disk, and takes a write."""
    path = cfg.db
    out = check_disk(path, min_free_mb, statvfs)
    try:
        probe = path.parent / f".peergrid-doctor-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, bytes(65536))
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as e:
        out.append(error("database", f"cannot write a file in {path.parent}: {e.strerror}",
                         "the folder of the database must be writable by the gateway's user on a disk with "
                         "room (SQLite writes its -wal and -shm files there)"))
    if not path.exists():
        return out + [warning("database", f"{path} does not exist yet",
                              "`peergrid run` makes it; if the gateway has run, [gateway] db points elsewhere")]
    restore = (f"stop the gateway and restore the last backup (peergrid restore), or salvage it: "
               f"sqlite3 {quote(path)} .recover")
    try:
        db = connect(str(path))
    except sqlite3.Error as e:
        return out + [error("database", f"{path} does not open: {e}", restore)]
    try:
        db.isolation_level = None
        rows = [r[0] for r in db.execute("PRAGMA quick_check" if quick else "PRAGMA integrity_check")]
        if rows != ["ok"]:
            out.append(error("database", f"{path} is damaged: " + "; ".join(map(str, rows[:3])).replace("\n", " "),
                             restore))
        version = db.execute("PRAGMA user_version").fetchone()[0]
        want = schema.CURRENT
        if version == want and rows == ["ok"]:
            out.append(ok("database", f"{path}: opens, {'quick' if quick else 'integrity'} check ok, schema "
                                      f"version {version}"))
        elif version > want:
            out.append(error("database", f"{path} has schema version {version}, newer than this gateway knows "
                                         f"({want}): a newer PeerGrid wrote it",
                             "run that version (or newer), or restore a backup made before the upgrade"))
        else:
            out.append(warning("database", f"{path} has schema version {version}; this gateway's is {want}",
                               "the gateway upgrades it when it starts (`peergrid run`); take a backup first "
                               "(peergrid backup)"))
        bad = _write_probe(db, path)
        if bad is not None:
            out.append(bad)
    except sqlite3.DatabaseError as e:
        out.append(error("database", f"{path} cannot be read: {e}", restore))
    finally:
        db.close()
    return out


# -- the clock -----------------------------------------------------------------------------------

def ntp_synchronized() -> bool | None:
    """systemd's view (timedatectl), or None when it cannot tell."""
    try:
        r = subprocess.run(["timedatectl", "show", "-p", "NTPSynchronized", "--value"], capture_output=True,
                           text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    v = r.stdout.strip()
    return {"yes": True, "no": False}.get(v) if r.returncode == 0 else None


def check_clock(synced: Callable[[], bool | None] = ntp_synchronized,
                now: Callable[[], float] = time.time) -> list[Finding]:
    t = now()
    if t < CLOCK_FLOOR:
        return [error("clock", f"the clock says {time.strftime('%Y-%m-%d', time.gmtime(t))}: it is wrong",
                      "set it (timedatectl set-ntp true, or date -s); readings are checked against it and "
                      "intervals settle by it")]
    s = synced()
    if s is True:
        return [ok("clock", "synchronised (NTP)")]
    if s is False:
        return [warning("clock", "the clock is not synchronised (NTP): readings are checked against it "
                                 "(max_skew_s) and intervals settle by it",
                        "timedatectl set-ntp true (systemd-timesyncd), or install chrony; UDP port 123 must "
                        "reach a time server")]
    return [warning("clock", "cannot tell whether the clock is synchronised (no timedatectl answer)",
                    "check by hand: `chronyc tracking` or `ntpq -p`, or compare `date -u` with a trusted clock")]


# -- secret files ----------------------------------------------------------------------------------

def secret_files(cfg: Config, config_path: Path) -> list[tuple[Path, str, bool]]:
    """(path, what it holds, whether mosquitto's group may read it)."""
    out = [(config_path, "the config: the broker password", False),
           (cfg.db, "the database: device secrets", False),
           (cfg.db.with_name(cfg.db.name + "-wal"), "the database's WAL", False)]
    if cfg.passwd_file is not None:
        out.append((cfg.passwd_file, "mosquitto's password hashes", True))
    if cfg.ca_key_file is not None:
        out.append((cfg.ca_key_file, "the community CA's key", False))
    if cfg.key_file is not None:
        out.append((cfg.key_file, "the broker's TLS key", True))
    st = cfg.extra.get("settlement")
    if st:
        key = Path(st.get("key_file", "ledger.key"))       # as Gateway._settler finds it
        out.append((key if key.is_absolute() else cfg.db.parent / key, "the ledger's signing key", False))
    return out


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def check_permissions(cfg: Config, config_path: Path) -> list[Finding]:
    """Every secret file is its owner's alone (mosquitto's password file
    and the broker's key may also be read by the group mosquitto)."""
    out = []
    n = 0
    for path, what, broker_may in secret_files(cfg, config_path):
        try:
            s = path.stat()
        except OSError:
            continue
        n += 1
        mode = stat.S_IMODE(s.st_mode)
        group_ok = broker_may and _group(s.st_gid) == "mosquitto" and not mode & 0o037
        if mode & 0o077 and not group_ok:
            who = " and ".join(w for w, bits in (("its group", 0o070), ("everyone", 0o007)) if mode & bits)
            fix = f"chmod 600 {quote(path)}"
            if broker_may:
                fix += (f" (or, for a mosquitto running as its own user: chgrp mosquitto {quote(path)}; "
                        f"chmod 640 {quote(path)})")
            out.append(error("permissions", f"{path} ({what}) is open to {who}: mode {mode:04o}", fix))
    return out or [ok("permissions", f"{n} secret files are private")]


# -- the command -------------------------------------------------------------------------------------

def run_checks(cfg: Config, config_path: Path, skip: tuple[str, ...] = (), timeout: float = 3.0,
               min_free_mb: float = 50, quick: bool = False) -> list[Finding]:
    runs: dict[str, Callable[[], list[Finding]]] = {
        "broker": lambda: check_broker(cfg, config_path, timeout),
        "broker-conf": lambda: check_broker_conf(cfg, config_path),
        "tls": lambda: check_tls(cfg, config_path, timeout=timeout),
        "database": lambda: check_database(cfg, min_free_mb, quick=quick),
        "clock": lambda: check_clock(),
        "permissions": lambda: check_permissions(cfg, config_path),
        "http": lambda: check_http(cfg, timeout),
    }
    out: list[Finding] = []
    for name, fn in runs.items():
        if name in skip:
            continue
        try:
            out += fn()
        except Exception as e:  # noqa: BLE001 - one broken check must not hide the others
            out.append(error(name, f"the check itself failed: {type(e).__name__}: {e}",
                             "report this; the other checks ran"))
    return out


def render(findings: list[Finding]) -> str:
    label = {"ok": "ok", "warning": "WARN", "error": "ERROR"}
    lines = []
    for f in findings:
        lines.append(f"{label[f.level]:6s} {f.check:12s} {f.what}")
        if f.advice:
            lines.append(f"{'':19s}-> {f.advice}")
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    lines.append("all well" if not errors and not warnings else
                 f"{errors} error(s), {warnings} warning(s): see the advice above")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="peergrid doctor", description="check the broker, TLS, database, clock, "
                                "secret files and HTTP port of a gateway, and say what to do")
    p.add_argument("--config", "-c", default="peergrid.toml", help="gateway config (TOML)")
    p.add_argument("--json", action="store_true", help="findings as JSON")
    p.add_argument("--skip", action="append", default=[], choices=CHECKS, help="leave a check out (repeatable)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds per network check (default 3)")
    p.add_argument("--min-free-mb", type=float, default=50, help="less free disk is an error (default 50)")
    p.add_argument("--quick", action="store_true", help="PRAGMA quick_check instead of integrity_check (large "
                                                        "databases)")
    args = p.parse_args(argv)
    path = Path(args.config)
    try:
        cfg = Config.load(path)
    except SystemExit as e:
        findings = [error("config", str(e), "fix the config; `peergrid init` writes a complete one")]
    else:
        findings = run_checks(cfg, path, tuple(args.skip), args.timeout, args.min_free_mb, args.quick)
    errors = sum(f.level == "error" for f in findings)
    if args.json:
        print(json.dumps({"ok": not errors, "errors": errors,
                          "warnings": sum(f.level == "warning" for f in findings),
                          "findings": [asdict(f) for f in findings]}, indent=1))
    else:
        print(render(findings))
    return 1 if errors else 0
