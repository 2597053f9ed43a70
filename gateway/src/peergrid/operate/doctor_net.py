"""The network side of `peergrid doctor` (peergrid.operate.doctor): the
broker (reachable, accepting the gateway's credentials), mosquitto's config,
the TLS listener and its certificate, and the gateway's HTTP port. Each
check returns findings (level, what, advice).

The broker check never disturbs a running gateway: when the gateway's state
file says it is connected, that is the answer. Otherwise it connects as the
gateway would (its client id, clean_session false, nothing acknowledged)
and leaves at once, so the gateway's session and whatever the broker queues
for it stay as they were. No password or key is ever printed."""
from __future__ import annotations

import datetime as dt
import errno
import shlex
import socket
import ssl
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peergrid.community import pki
from peergrid.community.broker import MESSAGE_LIMIT, mosquitto_conf, tls_listener
from peergrid.config import Config
from peergrid.ingest.brokerlink import classify, classify_connack, read_state

MOSQUITTO_DEFAULT_QUEUE = 1000
BROKER_ADVICE = {
    "refused": "start mosquitto (systemctl start mosquitto; `journalctl -u mosquitto -n 50` says why it "
               "stopped), or correct [broker] host and port in the config",
    "dns": "correct [broker] host in the config, or make the name resolvable (/etc/hosts or the router's DNS)",
    "timeout": "check that the broker's host is up and that no firewall drops the port",
    "unreachable": "check the network route to the broker's host, or correct [broker] host",
    "auth": "the broker's password file must hold the gateway's account: run `peergrid -c {cfg} broker-files` "
            "(it writes the account from [broker] user and password, and reloads mosquitto); if mosquitto "
            "reads another password_file, point [broker] passwd_file at it",
}


@dataclass
class Finding:
    level: str          # "ok", "warning" or "error"
    check: str          # one of CHECKS
    what: str
    advice: str = ""


def ok(check: str, what: str) -> Finding:
    return Finding("ok", check, what)


def warning(check: str, what: str, advice: str) -> Finding:
    return Finding("warning", check, what, advice)


def error(check: str, what: str, advice: str) -> Finding:
    return Finding("error", check, what, advice)


def quote(p: Path | str) -> str:
    return shlex.quote(str(p))


# -- the broker ------------------------------------------------------------------------------------

def _mqtt_connect(cfg: Config, timeout: float) -> Any:
    """CONNECT as the gateway (its client id, its persistent session, no
    acknowledgement sent) and DISCONNECT: the CONNACK's reason code, or None
    when none came. Raises OSError when the connection itself fails."""
    import paho.mqtt.client as mqtt

    got: list[Any] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cfg.client_id or f"peergrid-gw-{cfg.community}",
                    clean_session=False, manual_ack=True)
    c.username_pw_set(cfg.broker_user, cfg.broker_password)
    c.connect_timeout = timeout
    c.on_connect = lambda client, userdata, flags, rc, props: got.append(rc)
    c.connect(cfg.broker_host, cfg.broker_port, keepalive=max(10, int(timeout) * 2))
    deadline = time.monotonic() + timeout
    try:
        while not got and time.monotonic() < deadline and c.loop(0.1) == mqtt.MQTT_ERR_SUCCESS:
            pass
        if got and got[0] == 0:
            c.disconnect()
            c.loop(0.1)
    finally:
        sock = c.socket()
        if sock is not None:
            sock.close()
    return got[0] if got else None


def check_broker(cfg: Config, config_path: Path, timeout: float = 3.0,
                 state: dict[str, Any] | None = None) -> list[Finding]:
    """Reachable at [broker] host and port, and accepting the gateway's
    credentials. `state`: the running gateway's (default: its state file)."""
    where = f"{cfg.broker_host}:{cfg.broker_port}"
    st = read_state(cfg.db) if state is None else state
    if st and st.get("alive") and st["broker"].get("connected") and st["broker"].get("port") == cfg.broker_port:
        return [ok("broker", f"{where}: the running gateway (pid {st.get('pid')}) is connected to it")]
    try:
        socket.create_connection((cfg.broker_host, cfg.broker_port), timeout).close()
        rc = _mqtt_connect(cfg, timeout)
    except OSError as e:
        kind, text = classify(e, cfg.broker_host, cfg.broker_port)
        return [error("broker", f"broker {where} is down or out of reach: {text}",
                      BROKER_ADVICE.get(kind, BROKER_ADVICE["timeout"]))]
    if rc is None:
        return [error("broker", f"{where} accepts TCP connections but sends no MQTT answer within {timeout:g} s",
                      "check [broker] port: is it mosquitto's plain listener (not its TLS port, not another "
                      "service)?")]
    if rc != 0:
        kind, text = classify_connack(rc)
        return [error("broker", f"broker {where}: {text}",
                      BROKER_ADVICE.get(kind, "see mosquitto's log (journalctl -u mosquitto)").format(
                          cfg=quote(config_path)))]
    return [ok("broker", f"{where} is up and accepts the gateway's user name and password "
                         f"(user {cfg.broker_user})")]


def _conf(text: str) -> dict[str, list[str]]:
    """mosquitto's config as key -> values, in order."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            out.setdefault(key, []).append(value.strip())
    return out


def _int(v: str) -> int | None:
    try:
        return int(v)
    except ValueError:
        return None


def expected_conf(cfg: Config) -> str | None:
    """The mosquitto.conf `peergrid broker-files` would write, or None."""
    if cfg.passwd_file is None or cfg.acl_file is None:
        return None
    return mosquitto_conf(cfg.broker_port, cfg.passwd_file.absolute(), cfg.acl_file.absolute(), cfg.broker_listen,
                          cfg.broker_pid_file.absolute() if cfg.broker_pid_file else None,
                          cfg.broker_persistence_dir.absolute() if cfg.broker_persistence_dir else None,
                          cfg.broker_conf_extra, tls_listener(cfg))


def check_broker_conf(cfg: Config, config_path: Path) -> list[Finding]:
    """[broker] conf_file holds what the gateway needs of mosquitto."""
    path = cfg.broker_conf_file
    fix = f"run `peergrid -c {quote(config_path)} broker-files` (it writes mosquitto's config), then restart mosquitto"
    if path is None:
        return [ok("broker-conf", "[broker] conf_file is not set: mosquitto's config is not checked")]
    try:
        text = path.read_text()
    except OSError as e:
        return [error("broker-conf", f"mosquitto's config {path} cannot be read ({e.strerror})", fix)]
    have = _conf(text)
    want_text = expected_conf(cfg)
    want = _conf(want_text or mosquitto_conf(cfg.broker_port, Path("passwd"), Path("acl")))
    out = []
    if "true" not in have.get("persistence", []):
        out.append(error("broker-conf", f"{path}: persistence is not on: the gateway's session and what is queued "
                                        "for it are lost when mosquitto restarts", fix))
    need = max(_int(v) or 0 for v in want["max_queued_messages"])
    queued = [_int(v) for v in have.get("max_queued_messages", [])]
    n = queued[-1] if queued and queued[-1] is not None else MOSQUITTO_DEFAULT_QUEUE
    if n < need:
        out.append(error("broker-conf", f"{path}: max_queued_messages is {n}, below the {need} the gateway needs: "
                                        "readings queued while the gateway is away are dropped beyond that", fix))
    listeners = have.get("listener", [])
    if have.get("use_username_as_clientid", []).count("true") < max(1, len(listeners)):
        out.append(error("broker-conf", f"{path}: not every listener has use_username_as_clientid true: an account "
                                        "could take over the gateway's session or a board's", fix))
    limit = [_int(v) for v in have.get("message_size_limit", [])]
    if not limit or not limit[-1]:
        out.append(warning("broker-conf", f"{path}: no message_size_limit: the broker passes messages beyond the "
                                          f"protocol's largest frame ({MESSAGE_LIMIT} bytes)", fix))
    elif limit[-1] < MESSAGE_LIMIT:
        out.append(error("broker-conf", f"{path}: message_size_limit {limit[-1]} drops valid frames (up to "
                                        f"{MESSAGE_LIMIT} bytes)", fix))
    if listeners and not any(v.split()[0] == str(cfg.broker_port) for v in listeners if v):
        out.append(error("broker-conf", f"{path}: no listener on [broker] port {cfg.broker_port} (listeners: "
                                        f"{', '.join(listeners)})", fix))
    pw = have.get("password_file", [])
    if cfg.passwd_file is not None and pw and Path(pw[-1]) != cfg.passwd_file.absolute():
        out.append(error("broker-conf", f"{path}: mosquitto reads passwords from {pw[-1]}, the gateway writes "
                                        f"{cfg.passwd_file.absolute()}: accounts it adds never reach the broker", fix))
    if not out and want_text is not None and text != want_text:
        out.append(warning("broker-conf", f"{path} differs from what `peergrid broker-files` writes (edited by "
                                          "hand? the next broker-files overwrites it)",
                           f"{fix}; lines of your own belong in [broker] conf_extra"))
    return out or [ok("broker-conf", f"{path}: persistence, queue, client ids and message limit as the gateway "
                                     "needs them")]


# -- TLS -------------------------------------------------------------------------------------------

def _date(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%d")


def _expiry(label: str, path: Path, i: pki.CertInfo, now: dt.datetime | None, renew: str) -> Finding | None:
    days = i.days_left(now)
    if days < 0:
        return error("tls", f"{label} {path} expired on {_date(i.not_after)}: boards refuse the broker", renew)
    if days < pki.RENEW_DAYS:
        return warning("tls", f"{label} {path} expires in {days:.0f} days ({_date(i.not_after)})", renew)
    return None


def check_tls(cfg: Config, config_path: Path, now: dt.datetime | None = None, timeout: float = 3.0) -> list[Finding]:
    """The broker's certificate chains to the community CA, names every
    [broker] names entry and is not (nearly) expired, and the TLS listener
    presents exactly that certificate."""
    if not cfg.broker_tls_port:
        return [ok("tls", "no [broker] tls_port: no TLS listener to check")]
    init = (f"rerun `peergrid init {quote(config_path.absolute().parent)}` (it makes the broker's certificate again "
            "from the community CA when it is missing, not signed, lacks a name or expires within 30 days; "
            "--renew-cert forces it), then restart mosquitto")
    files = {"ca_file": cfg.ca_file, "cert_file": cfg.cert_file, "key_file": cfg.key_file}
    missing = [f"{k} ({v})" for k, v in files.items() if v is None or not v.exists()]
    if missing or cfg.ca_file is None or cfg.cert_file is None:
        return [error("tls", "missing: " + ", ".join(missing), f"`peergrid init {quote(config_path.absolute().parent)}`"
                                                              " makes the community CA and the broker's certificate")]
    try:
        ci, ca = pki.info(cfg.cert_file), pki.info(cfg.ca_file)
    except pki.PkiError as e:
        return [error("tls", str(e), init)]
    out = []
    if not pki.signed_by(cfg.cert_file, cfg.ca_file):
        out.append(error("tls", f"{cfg.cert_file} is not signed by the community CA ({cfg.ca_file}): boards refuse "
                                "the broker", init))
    absent = [n for n in cfg.broker_names if n not in ci.names]
    if absent:
        out.append(error("tls", f"{cfg.cert_file} does not name {', '.join(absent)} (it names "
                                f"{', '.join(ci.names) or 'nothing'}): boards dialling that refuse the broker", init))
    for f in (_expiry("the broker's certificate", cfg.cert_file, ci, now, init),
              _expiry("the community CA", cfg.ca_file, ca, now, "a new CA must reach every board (commission them "
                                                                "again with it); plan that before it expires")):
        if f is not None:
            out.append(f)
    out += _tls_listener(cfg, timeout)
    if not out:
        out.append(ok("tls", f"the broker's certificate chains to the CA, names {', '.join(cfg.broker_names) or '-'}"
                             f", {ci.days_left(now):.0f} days left"))
    return out


def _tls_listener(cfg: Config, timeout: float) -> list[Finding]:
    from cryptography.hazmat.primitives.serialization import Encoding

    assert cfg.ca_file is not None and cfg.cert_file is not None
    host = cfg.broker_tls_listen if cfg.broker_tls_listen not in ("", "0.0.0.0", "::") else cfg.broker_host
    where = f"{host}:{cfg.broker_tls_port}"
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file))
    ctx.check_hostname = bool(cfg.broker_names)
    restart = "restart mosquitto (systemctl restart mosquitto) so it loads the certificate; its log says more"
    try:
        with socket.create_connection((host, cfg.broker_tls_port), timeout) as s:
            with ctx.wrap_socket(s, server_hostname=cfg.broker_names[0] if cfg.broker_names else host) as t:
                der = t.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        return [error("tls", f"the TLS listener {where} presents a certificate that does not verify against the CA: "
                             f"{e.verify_message}", restart)]
    except ssl.SSLError as e:
        return [error("tls", f"TLS handshake with {where} failed: {e.reason or e}", restart)]
    except OSError as e:
        return [error("tls", f"the TLS listener {where}: {classify(e, host, cfg.broker_tls_port)[1]}",
                      "mosquitto's config needs the TLS listener (`peergrid broker-files` writes it when [broker] "
                      "tls_port is set); then restart mosquitto")]
    if der != pki.load_cert(cfg.cert_file).public_bytes(Encoding.DER):
        return [error("tls", f"the TLS listener {where} presents another certificate than {cfg.cert_file} "
                             "(mosquitto not restarted since it was renewed?)", restart)]
    return []


# -- the HTTP port ---------------------------------------------------------------------------------

def check_http(cfg: Config, timeout: float = 2.0) -> list[Finding]:
    """[gateway] http_port is free to bind, or a running gateway serves it
    (and then what its /metrics say about its broker and its writes)."""
    port, host = cfg.http_port, cfg.http_host
    if port <= 0 or not cfg.extra.get("gateway", {}).get("http", True):
        return [ok("http", "no fixed [gateway] http_port: nothing to check")]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # as the gateway's server binds
        try:
            s.bind((host, port))
            return [ok("http", f"{host}:{port} is free: the gateway can serve /metrics there (none serves it now)")]
        except OSError as e:
            err = e
    if err.errno == errno.EACCES:
        return [error("http", f"{host}:{port} needs privileges to bind", "choose a [gateway] http_port above 1023")]
    if err.errno != errno.EADDRINUSE:
        return [error("http", f"{host}:{port} cannot be bound: {err.strerror}",
                      "[gateway] http_host must be an address of this machine")]
    dial = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    ctx = None
    if cfg.http_tls:            # HTTPS with the router's certificate: is it the gateway on our own port?
        ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file and cfg.ca_file.exists() else None)
        ctx.check_hostname = False
        if not (cfg.ca_file and cfg.ca_file.exists()):
            ctx.verify_mode = ssl.CERT_NONE
    url = f"{'https' if cfg.http_tls else 'http'}://{dial if ':' not in dial else f'[{dial}]'}:{port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
            text = r.read(1 << 20).decode("utf-8", "replace")
    except (OSError, ValueError):
        text = ""
    if "peergrid_" not in text:
        return [error("http", f"{host}:{port} is taken by another program (it does not answer /metrics as a gateway)",
                      f"`ss -ltnp 'sport = :{port}'` shows which; stop it or choose another [gateway] http_port")]
    out = [ok("http", f"{host}:{port} is served by a running gateway (/metrics answers)")]
    values = {}
    for line in text.splitlines():
        name, _, v = line.rpartition(" ")
        if name and not line.startswith("#"):
            values[name] = v
    if values.get("peergrid_broker_connected") == "0":
        last = next((n.split('error="', 1)[1][:-2] for n in values if n.startswith("peergrid_broker_last_error_info")),
                    "no error recorded yet")
        out.append(error("http", f"the running gateway has no broker connection ({last})",
                         "see the broker findings; `peergrid status` says since when"))
    stored = values.get('peergrid_messages_total{what="store_errors"}')
    if stored and stored != "0":
        out.append(warning("http", f"the running gateway failed {stored} database writes since it started (it "
                                   "retries and acknowledges nothing meanwhile)",
                           "see the database findings and the gateway's log"))
    return out


