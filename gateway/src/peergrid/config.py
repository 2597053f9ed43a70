"""The gateway's configuration (peergrid.toml): where its database, broker
and files are, and the limits of ingest, settlement and control. Read once
at start; every value checked (types, ranges, no NaN or infinity) so that a
wrong config stops the gateway with the key named, never midway."""
from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Config:
    community: str
    db: Path
    broker_host: str = "127.0.0.1"
    broker_port: int = 1883
    broker_user: str = "gateway"
    broker_password: str = ""
    client_id: str = ""
    passwd_file: Path | None = None
    acl_file: Path | None = None
    broker_pid_file: Path | None = None
    broker_conf_file: Path | None = None      # mosquitto's config, written by `peergrid broker-files`
    broker_listen: str = ""                   # its listener's address ("": every interface)
    broker_persistence_dir: Path | None = None
    broker_conf_extra: list[str] = field(default_factory=list)
    # TLS for the boards (peergrid init): a second listener with the broker's
    # certificate from the community CA; the gateway stays on the first
    broker_tls_port: int = 0                  # 0: no TLS listener
    broker_tls_listen: str = ""               # its address ("": every interface)
    broker_names: list[str] = field(default_factory=list)   # what boards dial: the certificate's names
    ca_file: Path | None = None               # the community CA's certificate (boards get it)
    ca_key_file: Path | None = None           # its key: signs the broker's certificate
    cert_file: Path | None = None             # the broker's certificate and key
    key_file: Path | None = None
    registry_poll_s: float = 0.25             # how often the running gateway looks for registry changes
    max_skew_s: float = 300
    max_future_s: float = 3600
    max_late_s: float = 4 * 86400     # the longest a reading may wait in a board's flash (energy plausibility)
    stale_after_s: float = 35
    batch: int = 500
    batch_ms: int = 3
    quarantine_max: int = 10000
    quarantine_bytes: int = 8 << 20           # frames, topics and reasons kept, at most
    quarantine_frame_bytes: int = 512         # a longer frame is kept as this prefix, its length and SHA-256
    tag_failures_per_s: int = 20              # E_TAG failures per device and second before it is throttled
    http_port: int = 0
    http_tls: bool = False                    # HTTPS with [broker] cert_file and key_file (peergrid init sets it)
    http_host: str = "127.0.0.1"
    http_max_connections: int = 32
    http_timeout_s: float = 10                # a request's line, headers and body must arrive within this
    status_every_s: float = 10
    raw_days: float = 400
    full_days: float = 90
    # [fleet]: firmware updates over the air (peergrid.fleet, docs/OTA.md 4)
    release_keys: list[bytes] = field(default_factory=list)   # Ed25519 public keys a release must be signed by
    release_store: Path | None = None         # where releases are kept (default: releases/ beside the database)
    update_lease_s: int = 3600                # what an OP_UPDATE gives a board to fetch the release
    rollout_timeout_s: float = 1800           # a board without an outcome within this has failed
    serve_per_s: float = 50                   # release pieces served per board and second, at most
    updates_at_once: int = 10                 # boards of a rollout's second wave updating at once, at most
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def releases(self) -> Path:
        """The release store: <store>/<board>/<seq>/."""
        return self.release_store or self.db.parent / "releases"

    @staticmethod
    def load(path: Path) -> "Config":
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise SystemExit(f"config {path} not found") from None
        except tomllib.TOMLDecodeError as e:
            raise SystemExit(f"config {path}: {e}") from None
        bad = _not_finite(raw)
        if bad:
            raise SystemExit(f"config {path}: {bad} is not a finite number (nan and inf are refused)")
        g = raw.get("gateway", {})
        b = raw.get("broker", {})
        i = raw.get("ingest", {})
        if "community" not in g or "db" not in g:
            raise SystemExit(f"config {path}: [gateway] needs community and db")
        base = Path(path).parent

        def p(v: Any) -> Path | None:
            return None if v is None else (base / v if not Path(v).is_absolute() else Path(v))

        cfg = Config(
            community=g["community"], db=p(g["db"]) or Path("gateway.db"),
            broker_host=b.get("host", "127.0.0.1"), broker_port=int(b.get("port", 1883)),
            broker_user=b.get("user", "gateway"), broker_password=b.get("password", ""),
            client_id=b.get("client_id", ""), passwd_file=p(b.get("passwd_file")), acl_file=p(b.get("acl_file")),
            broker_pid_file=p(b.get("pid_file")), broker_conf_file=p(b.get("conf_file")),
            broker_listen=str(b.get("listen", "")), broker_persistence_dir=p(b.get("persistence_dir")),
            broker_conf_extra=[str(x) for x in b.get("conf_extra", [])],
            broker_tls_port=int(b.get("tls_port", 0)), broker_tls_listen=str(b.get("tls_listen", "")),
            broker_names=[str(x) for x in b.get("names", [])],
            ca_file=p(b.get("ca_file")), ca_key_file=p(b.get("ca_key_file")),
            cert_file=p(b.get("cert_file")), key_file=p(b.get("key_file")),
            registry_poll_s=float(i.get("registry_poll_s", 0.25)),
            max_skew_s=float(i.get("max_skew_s", 300)), max_future_s=float(i.get("max_future_s", 3600)),
            max_late_s=float(i.get("max_late_s", 4 * 86400)),
            stale_after_s=float(i.get("stale_after_s", 35)), batch=int(i.get("batch", 500)),
            batch_ms=int(i.get("batch_ms", 3)), quarantine_max=int(i.get("quarantine_max", 10000)),
            quarantine_bytes=int(i.get("quarantine_bytes", 8 << 20)),
            quarantine_frame_bytes=int(i.get("quarantine_frame_bytes", 512)),
            tag_failures_per_s=int(i.get("tag_failures_per_s", 20)),
            http_max_connections=int(g.get("http_max_connections", 32)),
            http_timeout_s=float(g.get("http_timeout_s", 10)),
            http_port=int(g.get("http_port", 0)), http_tls=bool(g.get("http_tls", False)), http_host=g.get("http_host", "127.0.0.1"), status_every_s=float(g.get("status_every_s", 10)),
            raw_days=float(raw.get("store", {}).get("raw_days", 400)),
            full_days=float(raw.get("store", {}).get("full_days", 90)), extra=raw)
        fl = raw.get("fleet", {})
        keys = fl.get("release_keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, str) and _hex32(k) for k in keys):
            raise SystemExit(f"config {path}: [fleet] release_keys must be a list of Ed25519 public keys, "
                             "64 hex digits each")
        cfg.release_keys = [bytes.fromhex(k) for k in keys]
        cfg.release_store = p(fl.get("store"))
        cfg.update_lease_s = int(fl.get("update_lease_s", 3600))
        cfg.rollout_timeout_s = float(fl.get("rollout_timeout_s", 1800))
        cfg.serve_per_s = float(fl.get("serve_per_s", 50))
        cfg.updates_at_once = int(fl.get("updates_at_once", 10))
        for name, ok in (("[gateway] http_timeout_s", cfg.http_timeout_s > 0),
                         ("[gateway] http_max_connections", cfg.http_max_connections >= 1),
                         ("[ingest] quarantine_bytes", cfg.quarantine_bytes >= 4096),
                         ("[ingest] quarantine_frame_bytes", 0 <= cfg.quarantine_frame_bytes <= cfg.quarantine_bytes),
                         ("[ingest] tag_failures_per_s", cfg.tag_failures_per_s >= 0),
                         ("[broker] tls_port", 0 <= cfg.broker_tls_port < 65536),
                         ("[fleet] update_lease_s (60-86400)", 60 <= cfg.update_lease_s <= 86400),
                         ("[fleet] rollout_timeout_s", cfg.rollout_timeout_s > 0),
                         ("[fleet] serve_per_s (1-1000)", 1 <= cfg.serve_per_s <= 1000),
                         ("[fleet] updates_at_once (1-1000)", 1 <= cfg.updates_at_once <= 1000),
                         ("[gateway] http_tls needs [broker] cert_file and key_file",
                          not cfg.http_tls or None not in (cfg.cert_file, cfg.key_file)),
                         ("[broker] tls_port needs ca_file, cert_file and key_file",
                          not cfg.broker_tls_port or None not in (cfg.ca_file, cfg.cert_file, cfg.key_file))):
            if not ok:
                raise SystemExit(f"config {path}: {name} is out of range")
        return cfg


def _hex32(text: str) -> bool:
    try:
        return len(bytes.fromhex(text)) == 32
    except ValueError:
        return False


def _not_finite(v: Any, at: str = "") -> str | None:
    """The first float of a config that is NaN or infinite (TOML has both)."""
    if isinstance(v, float) and not math.isfinite(v):
        return at or "a value"
    if isinstance(v, dict):
        for k, x in v.items():
            bad = _not_finite(x, f"{at}.{k}" if at else str(k))
            if bad:
                return bad
    if isinstance(v, list):
        for k, x in enumerate(v):
            bad = _not_finite(x, f"{at}[{k}]")
            if bad:
                return bad
    return None
