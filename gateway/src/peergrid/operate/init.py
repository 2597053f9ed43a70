"""`peergrid init DIR`: a community's directory on its router, from nothing,
in one command.

    peergrid init /srv/peergrid --community oak --address 192.168.1.2 \\
        --name gw.oak.lan --retail 3187 --feed-in 812

Writes (or, when rerun, checks and keeps) everything a running community
needs in DIR:

  peergrid.toml          the gateway's config (0600: it holds the broker password)
  gateway.db             the registry with the community in it
  ledger.key gateway.key the gateway's ledger and report signing keys (0600)
  ca.pem ca.key          the community CA (the key 0600; boards get ca.pem)
  broker.pem broker.key  the broker's certificate for the router's names
  mosquitto.conf         a loopback listener for the gateway and a TLS-only
  passwd acl             listener for the boards; accounts and ACL from the
  mosquitto/             registry; persistence and limits the gateway needs
  systemd/*.service      units for the broker and the gateway

Rerunning it is safe: the CA, keys, passwords, database and ledger are
never replaced; the broker's certificate is made again only when it is
missing, expires within 30 days, no longer chains to the CA or lacks one of
the names (or with --renew-cert); mosquitto's files and the units are
written again from the config and the registry. A config from another
community is refused."""
from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

from peergrid.community import broker, pki
from peergrid.community import registry as reg
from peergrid.config import Config
from protocol import topics

UNITS = ("peergrid-broker.service", "peergrid-gateway.service")


class InitError(Exception):
    pass


def _ask(prompt: str, given: Any, interactive: bool, flag: str) -> str:
    if given not in (None, ""):
        return str(given)
    if not interactive:
        raise InitError(f"{flag} is missing (or run on a terminal to be asked)")
    v = input(f"{prompt}: ").strip()
    if not v:
        raise InitError(f"{flag} is needed")
    return v


def _host(v: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        pass
    ok = 0 < len(v) <= 253 and all(0 < len(p) <= 63 and p.replace("-", "").isalnum() for p in v.split("."))
    if not ok:
        raise InitError(f"{v!r} is neither an IP address nor a host name")
    return v.lower()


def _port(v: int, what: str) -> int:
    if not 0 < v < 65536:
        raise InitError(f"{what} {v} is not a TCP port")
    return v


def _q(s: str) -> str:
    """A TOML basic string."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_text(a: argparse.Namespace, password: str, names: list[str], user_line: list[str]) -> str:
    extra = ["log_dest stderr", "log_type error", "log_type warning", "log_type notice"] + user_line
    return f"""# written by `peergrid init` for community {a.community}; edit freely, rerun init to apply
[gateway]
community = {_q(a.community)}
db = "gateway.db"
http_port = {a.http_port}          # metrics, the installer API and the member app (/app/), over HTTPS
http_host = {_q(a.http_host)}
http_tls = true                    # with the broker's certificate: laptops check it against ca.pem

[broker]                           # the gateway's own connection: loopback only
host = "127.0.0.1"
port = {a.port}
listen = "127.0.0.1"
user = "gateway"
password = {_q(password)}
passwd_file = "passwd"
acl_file = "acl"
pid_file = "mosquitto.pid"
conf_file = "mosquitto.conf"
persistence_dir = "mosquitto"
conf_extra = [{", ".join(_q(x) for x in extra)}]
# the boards' listener: TLS only, the broker's certificate from the community CA
tls_port = {a.tls_port}
tls_listen = {_q(a.tls_listen)}
names = [{", ".join(_q(n) for n in names)}]
ca_file = "ca.pem"
ca_key_file = "ca.key"
cert_file = "broker.pem"
key_file = "broker.key"

[settlement]
retail = {a.retail}                # minor units per kWh
feed_in = {a.feed_in}
interval_min = {a.interval_min}
grace_s = {a.grace_s}                      # late readings get this long after an interval ends
key_file = "ledger.key"

[homeassistant]                    # each house for Home Assistant (peergrid member account N)
every_s = 10

[installer]                        # what commissioning gives the boards
broker_host = {_q(names[0])}
broker_port = {a.tls_port}
ntp_host = {_q(names[0])}          # boards set their clocks here (run an NTP server on the router: chrony)
key_file = "gateway.key"
"""


def unit_texts(d: Path, user: str, peergrid_bin: str, mosquitto_bin: str) -> dict[str, str]:
    broker_unit = f"""# written by `peergrid init`
[Unit]
Description=PeerGrid broker (mosquitto) for {d}
After=network-online.target
Wants=network-online.target

[Service]
ExecStart={mosquitto_bin} -c {d / "mosquitto.conf"}
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target
"""
    gateway_unit = f"""# written by `peergrid init`
[Unit]
Description=PeerGrid gateway for {d}
Requires=peergrid-broker.service
After=peergrid-broker.service time-sync.target

[Service]
User={user}
WorkingDirectory={d}
ExecStart={peergrid_bin} -c {d / "peergrid.toml"} run
Restart=on-failure
RestartSec=2
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=strict
ProtectHome=true
ReadWritePaths={d}
UMask=0077

[Install]
WantedBy=multi-user.target
"""
    return {UNITS[0]: broker_unit, UNITS[1]: gateway_unit}


def _service_user(name: str | None, d: Path) -> str:
    """--user, else the owner of an existing directory (a rerun), else
    `peergrid` for root and the caller for anyone else."""
    me = pwd.getpwuid(os.geteuid()).pw_name
    if not name and d.exists():
        try:
            name = pwd.getpwuid(d.stat().st_uid).pw_name
        except KeyError:
            name = None
    name = name or ("peergrid" if os.geteuid() == 0 else me)
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise InitError(f"there is no user {name!r}: make one (useradd --system --shell /usr/sbin/nologin "
                        f"{name}) or give --user") from None
    if os.geteuid() != 0 and name != me:
        raise InitError(f"only root can set the community up for user {name!r}")
    return name


def run(a: argparse.Namespace, out: Any = sys.stdout) -> int:
    interactive = sys.stdin.isatty() and not a.yes
    d = Path(a.dir).absolute()
    cfg_path = d / "peergrid.toml"
    said: list[str] = []
    if cfg_path.exists():
        old = Config.load(cfg_path)
        if a.community and a.community != old.community:
            raise InitError(f"{d} is community {old.community!r}, not {a.community!r}")
        a.community = old.community
    a.community = _ask("community id (1-16 of a-z, 0-9, '-')", a.community, interactive, "--community")
    if not topics.valid_id(a.community):
        raise InitError(f"community id {a.community!r}: 1-16 of a-z, 0-9 and '-', not starting with '-'")
    user = _service_user(a.user, d)
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    if not cfg_path.exists():
        a.address = _host(_ask("the router's address on the LAN", a.address, interactive, "--address"))
        names = [a.address] + [_host(n) for n in a.name if _host(n) != a.address]
        a.retail = int(_ask("retail price, minor units per kWh", a.retail, interactive, "--retail"))
        a.feed_in = int(_ask("feed-in price, minor units per kWh", a.feed_in, interactive, "--feed-in"))
        if not 0 <= a.feed_in <= a.retail:
            raise InitError("prices: 0 <= feed-in <= retail")
        if not 0 <= a.grace_s <= 86400:
            raise InitError("--grace-s: 0 to 86400 seconds")
        for p, what in ((a.port, "--port"), (a.tls_port, "--tls-port"), (a.http_port, "--http-port")):
            _port(p, what)
        if a.http_host is None:
            a.http_host = a.address if ":" not in a.address else "::"
        user_line = [f"user {user}"] if os.geteuid() == 0 else []
        text = config_text(a, secrets.token_urlsafe(24), names, user_line)
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        said.append(f"wrote   {cfg_path}")
    else:
        said.append(f"kept    {cfg_path} (community {a.community})")
    cfg = Config.load(cfg_path)
    if not cfg.broker_tls_port or None in (cfg.ca_file, cfg.ca_key_file, cfg.cert_file, cfg.key_file):
        raise InitError(f"{cfg_path}: [broker] needs tls_port, ca_file, ca_key_file, cert_file and key_file")
    assert cfg.ca_file and cfg.ca_key_file and cfg.cert_file and cfg.key_file
    names = cfg.broker_names or [cfg.broker_host]
    # the community CA: made once, kept forever (every board trusts it)
    made = pki.make_ca(cfg.ca_file, cfg.ca_key_file, cfg.community)
    said.append(("made    " if made else "kept    ") + f"the community CA {cfg.ca_file}")
    why = "asked for" if a.renew_cert else pki.needs_renewal(cfg.cert_file, cfg.ca_file, names)
    if why:
        pki.make_server_cert(cfg.cert_file, cfg.key_file, cfg.ca_file, cfg.ca_key_file, names)
        said.append(f"made    the broker's certificate for {', '.join(names)} ({why})")
    else:
        left = pki.info(cfg.cert_file).days_left()
        said.append(f"kept    the broker's certificate for {', '.join(names)} ({left:.0f} days left)")
    # the gateway's signing keys: made now, so the first backup has them
    from peergrid.market.settler import load_key

    for name in ("ledger.key", "gateway.key"):
        existed = (d / name).exists()
        load_key(d / name)
        said.append(("kept    " if existed else "made    ") + f"{d / name}")
    # the registry, the broker's accounts, ACL and config
    db = reg.connect(cfg.db)
    r = reg.Registry(db)
    r.add_community(cfg.community)
    if cfg.broker_persistence_dir is not None:
        cfg.broker_persistence_dir.mkdir(mode=0o700, exist_ok=True)
    b = broker.write_broker_files(cfg, r)
    db.close()
    said.append(f"wrote   {cfg.broker_conf_file} ({'changed: restart the broker' if b.conf_changed else 'unchanged'}), "
                f"passwd and acl ({b.accounts} device accounts)")
    # systemd units
    peergrid_bin = shutil.which("peergrid") or str(Path(sys.executable).parent / "peergrid")
    mosquitto_bin = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    (d / "systemd").mkdir(mode=0o700, exist_ok=True)
    for name, text in unit_texts(d, user, peergrid_bin, mosquitto_bin).items():
        broker.write_if_changed(d / "systemd" / name, text)
        os.chmod(d / "systemd" / name, 0o644)
        if a.install_units:
            target = Path(a.install_units) / name
            broker.write_if_changed(target, text)
            os.chmod(target, 0o644)
    said.append(f"wrote   {d / 'systemd'}/{{{','.join(UNITS)}}}"
                + (f" and installed them in {a.install_units}" if a.install_units else ""))
    # everything belongs to the service user; secrets stay private
    if os.geteuid() == 0 and user != "root":
        pw = pwd.getpwnam(user)
        for p in [d, *d.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    for p in d.rglob("*"):
        if p.is_file() and p.suffix not in (".pem", ".service"):
            os.chmod(p, 0o600)
    for line in said:
        print(line, file=out)
    print(f"""
next steps:
  1. start the broker and the gateway{' (as root)' if os.geteuid() != 0 else ''}:
       cp {d / 'systemd'}/*.service /etc/systemd/system/ && systemctl daemon-reload
       systemctl enable --now {' '.join(UNITS)}
  2. check it:              peergrid -c {cfg_path} doctor
  3. give an electrician a token:  peergrid -c {cfg_path} installer-token NAME --days 7
  4. commission each house: peergrid commission --sheet house.toml --gateway https://{names[0]}:{cfg.http_port} \\
         --ca ca.pem --token ...   (give the electrician {cfg.ca_file} with the token)
  5. residents sign in at https://{names[0]}:{cfg.http_port}/app/ with their member key;
     Home Assistant: peergrid -c {cfg_path} member account N (a broker account that reads only house N)
  boards reach the broker at {names[0]}:{cfg.broker_tls_port} over TLS, trusting {cfg.ca_file}
  back up {d} (peergrid -c {cfg_path} backup): the CA key and the ledger key cannot be made again""", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="peergrid init", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="the community directory (made if missing)")
    ap.add_argument("--config", "-c", help=argparse.SUPPRESS)       # `peergrid -c X init` is handed this
    ap.add_argument("--community", help="the community id (1-16 of a-z, 0-9, '-')")
    ap.add_argument("--address", help="the router's address on the LAN (boards and laptops reach it there)")
    ap.add_argument("--name", action="append", default=[], help="another name or address for the router (repeat)")
    ap.add_argument("--retail", type=int, help="retail price, minor units per kWh")
    ap.add_argument("--feed-in", type=int, help="feed-in price, minor units per kWh")
    ap.add_argument("--interval-min", type=int, default=15, choices=[1, 2, 3, 4, 5, 6, 10, 12, 15, 20, 30, 60])
    ap.add_argument("--grace-s", type=int, default=120, help="seconds late readings get before an interval "
                    "is settled (default 120)")
    ap.add_argument("--port", type=int, default=1883, help="the gateway's loopback listener (default 1883)")
    ap.add_argument("--tls-port", type=int, default=8883, help="the boards' TLS listener (default 8883)")
    ap.add_argument("--tls-listen", default="", help="the TLS listener's address (default: every interface)")
    ap.add_argument("--http-port", type=int, default=9108, help="metrics and the installer API (default 9108)")
    ap.add_argument("--http-host", help="where the HTTP server listens (default: --address)")
    ap.add_argument("--user", help="the user the gateway and broker run as (default: peergrid as root, else you)")
    ap.add_argument("--install-units", metavar="DIR", help="also write the systemd units there (/etc/systemd/system)")
    ap.add_argument("--renew-cert", action="store_true", help="make the broker's certificate again now")
    ap.add_argument("--yes", "-y", action="store_true", help="never ask; missing values are errors")
    a = ap.parse_args(argv)
    try:
        return run(a)
    except (InitError, pki.PkiError, reg.RegistryError) as e:
        print(f"peergrid init: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:          # Config.load names the config and the key
        print(f"peergrid init: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"peergrid init: {e.filename}: permission denied (run as root or as the directory's owner)",
              file=sys.stderr)
        return 2

