"""The broker's files from the registry: mosquitto's password and ACL files
(each device its own account and topics), its configuration (client ids
bound to accounts, message and packet limits from the protocol, the
persistence the gateway's session needs) and the reload that makes
mosquitto reread them. Every command that changes accounts ends here."""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peergrid.community import registry as reg
from protocol import cose, topics

if TYPE_CHECKING:
    from peergrid.config import Config


# What the broker lets through (issue 17). The protocol's largest message is
# one COSE frame (cose.MAX_FRAME: a payload of at most messages.MAX_PAYLOAD
# bytes in its envelope); the broker drops a larger one without passing it on.
MESSAGE_LIMIT = cose.MAX_FRAME
# Its largest packets: a PUBLISH is 1 + 2 (remaining length) + 2 + MAX_TOPIC
# + 2 (packet id) + MAX_FRAME = 583 bytes; a board's CONNECT, whose will is
# a status frame, at most 3 + 10 + 2 * (2 + 33) (client id, user name) + 2 +
# MAX_TOPIC + 2 + MAX_FRAME + 2 + 64 (password) = 729 bytes. A packet beyond
# PACKET_LIMIT disconnects its sender before the broker holds it in memory.
PACKET_LIMIT = 1024


def max_connect_packet(password_len: int = 64) -> int:
    """The largest CONNECT a board sends (see PACKET_LIMIT)."""
    user = 2 * topics.MAX_ID + 1
    return 3 + 10 + 2 * (2 + user) + 2 + topics.MAX_TOPIC + 2 + cose.MAX_FRAME + 2 + password_len


def mosquitto_conf(port: int, passwd: Path, acl: Path, listen: str = "", pid_file: Path | None = None,
                   persistence_dir: Path | None = None, extra: list[str] | tuple[str, ...] = (),
                   tls: TlsListener | None = None) -> str:
    """mosquitto's configuration for a PeerGrid broker (peergrid broker-files
    writes it when [broker] conf_file is set).

    * every account's client id is its user name (use_username_as_clientid,
      a listener setting of mosquitto 2.x): no account can take over the
      gateway's session or knock a board off by connecting with its id, and a
      wrong password never touches the session it names;
    * the gateway's session (clean_session false) and what is queued for it
      outlive a restart of the broker (persistence);
    * messages and packets beyond what the protocol makes are refused.
    * with `tls`, a second listener for the boards that speaks only TLS
      (1.2 or later) with the broker's certificate from the community CA;
      the same accounts, ACL and client-id binding apply on both.
    `extra`: lines appended as they are (log settings, `user` ...);
    another listener needs its own `use_username_as_clientid true`."""
    persistence_dir = persistence_dir or Path("/var/lib/mosquitto")
    lines = [
        "# written by `peergrid broker-files` from the gateway's config; changes here are overwritten.",
        "# A reload (SIGHUP) rereads the password and ACL files; restart mosquitto when this file changes.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
    ]
    if pid_file is not None:
        lines.append(f"pid_file {pid_file}")
    lines += [
        "# the gateway's session keeps what it has not acknowledged, across a restart of the broker too",
        "persistence true",
        f"persistence_location {str(persistence_dir).rstrip('/')}/",
        "autosave_interval 60",
        "# far above mosquitto's default of 1000, which would drop readings queued for a gateway that is away",
        "max_queued_messages 1000000",
        "max_inflight_messages 1000",
        f"# the protocol's largest message is a {MESSAGE_LIMIT}-byte frame (cose.MAX_FRAME)",
        f"message_size_limit {MESSAGE_LIMIT}",
        f"max_packet_size {PACKET_LIMIT}",
        f"listener {int(port)}" + (f" {listen}" if listen else ""),
        "# each account's client id is its user name: no account can take another's session",
        "use_username_as_clientid true",
    ]
    if tls is not None:
        lines += [
            "# the boards' listener: TLS only, the broker's certificate from the community CA",
            f"listener {int(tls.port)}" + (f" {tls.listen}" if tls.listen else ""),
            "use_username_as_clientid true",
            f"cafile {tls.ca_file}",
            f"certfile {tls.cert_file}",
            f"keyfile {tls.key_file}",
            "tls_version tlsv1.2",
            "require_certificate false",
        ]
    lines += list(extra)
    return "\n".join(lines) + "\n"


def write_if_changed(path: Path, text: str) -> bool:
    """Write atomically unless the file holds `text` already; True if written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    reg.atomic_write(path, text)
    return True


@dataclass
class TlsListener:
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    listen: str = ""


def tls_listener(cfg: Config) -> TlsListener | None:
    """The boards' TLS listener of a config, if it has one."""
    if not cfg.broker_tls_port or cfg.ca_file is None or cfg.cert_file is None or cfg.key_file is None:
        return None
    return TlsListener(cfg.broker_tls_port, cfg.ca_file.absolute(), cfg.cert_file.absolute(),
                       cfg.key_file.absolute(), cfg.broker_tls_listen)


@dataclass
class BrokerFiles:
    accounts: int           # device accounts written
    reloaded: bool          # mosquitto was sent SIGHUP
    conf_changed: bool      # mosquitto.conf was (re)written: restart mosquitto


def write_broker_files(cfg: Config, r: reg.Registry) -> BrokerFiles:
    """mosquitto's password and ACL files from the registry, its config
    ([broker] conf_file, if set: mosquitto_conf) and a reload.
    Every command that changes accounts calls this."""
    if cfg.passwd_file is None or cfg.acl_file is None:
        raise reg.RegistryError("[broker] passwd_file and acl_file are not set in the config")
    n = r.broker_files(cfg.passwd_file, cfg.acl_file, cfg.broker_user, reg.mosquitto_hash(cfg.broker_password))
    changed = False
    if cfg.broker_conf_file is not None:
        changed = write_if_changed(cfg.broker_conf_file, mosquitto_conf(
            cfg.broker_port, cfg.passwd_file.absolute(), cfg.acl_file.absolute(), cfg.broker_listen,
            cfg.broker_pid_file.absolute() if cfg.broker_pid_file else None,
            cfg.broker_persistence_dir.absolute() if cfg.broker_persistence_dir else None, cfg.broker_conf_extra,
            tls_listener(cfg)))
    return BrokerFiles(n, reload_broker(cfg.broker_pid_file), changed)


def reload_broker(pid_file: Path | None) -> bool:
    """Ask mosquitto to reread its password and ACL files (SIGHUP)."""
    if pid_file is None or not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().strip()), signal.SIGHUP)
        return True
    except (ValueError, ProcessLookupError, PermissionError):
        return False
