# The commissioning config: a JSON file on the board's filesystem, written by
# the commissioning tool, never constants in the firmware. `load` checks it and
# fills in defaults; a config that is missing something essential raises
# ConfigError with a message an electrician can act on. The digest (first 8
# bytes of SHA-256 over the file) goes into every status message so the
# gateway can tell which config a board runs. The device secret never leaves
# this module's caller in printable form: `public()` is what may be shown.
import binascii
import hashlib
import json

from protocol import topics

DEFAULTS = {
    "period_s": 10,             # one reading every 10 s
    "status_s": 600,            # birth/status refreshed every 10 min
    "cmd_timeout_s": 0,         # 0: only leases return outputs to fail-safe
    "replay_per_s": 5,          # buffered readings sent per second at most
    "ack_timeout_s": 10,        # PUBACK wait before the connection is dropped
    "backoff_s": [1, 60],       # reconnect back-off, first and longest
    "sock_timeout_s": 5,
    "keepalive_s": 30,
    "spool_kb": 1536,           # flash ring buffer for readings
    "frames": 1000,             # ADC frames per measurement window
    "inverter": None,           # {"unit": 1, "latency_ms": 500}
    "battery": None,            # {"unit": 1, "max_w": 5000, "latency_ms": 500}
    "relays": [],               # [{"failsafe": 0, "load": "water heater"}]
    "channels": {},             # name -> {"role", "gain", "phase_deg"}
}


MAX_LATENCY_MS = 5000           # a device's answer latency (board.json rs485 too)


class ConfigError(ValueError):
    pass


def _need(cfg, key, what):
    if key not in cfg:
        raise ConfigError("config: %s missing (%s)" % (key, what))
    return cfg[key]


def parse(text):
    """Check a config given as JSON text; return (dict, digest)."""
    try:
        cfg = json.loads(text)
    except ValueError:
        raise ConfigError("config: not valid JSON")
    if not isinstance(cfg, dict):
        raise ConfigError("config: must be a JSON object")
    for k in DEFAULTS:
        if k not in cfg:
            cfg[k] = DEFAULTS[k]
    c = _need(cfg, "community", "the neighbourhood id")
    d = _need(cfg, "device", "this board's id")
    if not topics.valid_id(c) or not topics.valid_id(d):
        raise ConfigError("config: community and device are 1-16 of a-z, 0-9, '-'")
    s = _need(cfg, "secret", "64 hex digits made at commissioning")
    try:
        secret = binascii.unhexlify(s)
    except (ValueError, TypeError):
        raise ConfigError("config: secret is not hex")
    if len(secret) != 32:
        raise ConfigError("config: secret must be 32 bytes")
    b = _need(cfg, "broker", "host, port, user, password")
    if not isinstance(b, dict) or "host" not in b:
        raise ConfigError("config: broker.host missing")
    t = b.get("tls")
    if t is not None:
        # {"ca": the community CA certificate, base64 of its DER (at most
        # 2 KB), "name": the name the broker's certificate must carry}
        n = t.get("name") if isinstance(t, dict) else None
        ca = t.get("ca") if isinstance(t, dict) else None
        der = b""
        if isinstance(ca, str) and len(ca) <= 2732:
            try:
                der = binascii.a2b_base64(ca)
            except ValueError:
                pass
        if not isinstance(n, str) or not 0 < len(n) <= 253 or " " in n or len(der) < 100 or der[0] != 0x30:
            raise ConfigError("config: broker.tls needs ca (base64 DER, at most 2 KB) and name")
    b.setdefault("port", 8883 if t else 1883)
    ntp = cfg.get("ntp")
    if ntp is not None and (not isinstance(ntp, str) or not 0 < len(ntp) <= 253 or " " in ntp):
        # the router's NTP server: a board checks certificates' dates, so its
        # clock must come from somewhere even without the Internet
        raise ConfigError("config: ntp must be a host name or address")
    if not isinstance(cfg["period_s"], int) or not 1 <= cfg["period_s"] <= 3600:
        raise ConfigError("config: period_s must be 1..3600")
    # timers on the board's tick clock must stay below 2^29 ms (6.2 days):
    # a day at most
    for k, lo in (("status_s", 1), ("cmd_timeout_s", 0), ("keepalive_s", 0)):
        if not isinstance(cfg[k], int) or not lo <= cfg[k] <= 86400:
            raise ConfigError("config: %s must be %d..86400" % (k, lo))
    bo = cfg["backoff_s"]
    if not isinstance(bo, list) or len(bo) != 2 or not all(isinstance(x, int) and 1 <= x <= 86400 for x in bo):
        raise ConfigError("config: backoff_s must be [first, longest], 1..86400 s each")
    for k in ("inverter", "battery"):
        d = cfg[k]
        if d is None:
            continue
        if not isinstance(d, dict):
            raise ConfigError("config: %s must be an object" % k)
        u = d.get("unit", 1)
        if not isinstance(u, int) or not 1 <= u <= 247:
            raise ConfigError("config: %s.unit must be a Modbus address 1..247" % k)
        lat = d.get("latency_ms")
        if lat is not None and (not isinstance(lat, int) or not 0 <= lat <= MAX_LATENCY_MS):
            raise ConfigError("config: %s.latency_ms (how long the device takes to answer) must be 0..%d"
                              % (k, MAX_LATENCY_MS))
    for r in cfg["relays"]:
        if r.get("failsafe", 0) not in (0, 1):
            raise ConfigError("config: a relay's failsafe is 0 (open) or 1 (closed)")
    digest = hashlib.sha256(text if isinstance(text, bytes) else text.encode()).digest()[:8]
    return cfg, digest


def load(path):
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError:
        raise ConfigError("config: %s not found; commission the board first" % path)
    return parse(text)


def secret(cfg):
    return binascii.unhexlify(cfg["secret"])


def public(cfg):
    """The config without its secrets, for diagnostics."""
    out = {}  # type: dict
    for k in cfg:
        if k == "secret":
            out[k] = "<hidden>"
        elif k == "broker":
            b = dict(cfg[k])
            if "password" in b:
                b["password"] = "<hidden>"
            out[k] = b
        elif k == "net":
            n = dict(cfg[k])
            if "password" in n:
                n["password"] = "<hidden>"
            out[k] = n
        else:
            out[k] = cfg[k]
    return out
