"""What the residents see (issue 21): the member app in a real headless
Chromium (Debian's chromium, driven by Selenium through chromium-driver)
and the houses in Home Assistant over MQTT, both against the real gateway
(`peergrid run`), a real mosquitto and virtual boards running the firmware.

One neighbourhood for the module: two houses with boards, a third member
without one; the gateway keeps a ledger (1-minute intervals) and publishes
for Home Assistant. Screenshots of the app's pages go to
build/screenshots/ (the test run writes them; nothing compares pixels).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from harness import free_port, gateway_toml, registry_broker, stop_process, wait_until
from peergrid.community import registry as reg
from peergrid.market import governance as gv

pytestmark = pytest.mark.broker

C = "elm"
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "screenshots"
CH = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}, {"role": "load", "rating_a": 20},
      {"role": "ev", "rating_a": 32}]


class Site:
    def __init__(self, tmp: Path) -> None:
        from peergrid.sim.vboard import VirtualBoard, default_config

        self.tmp = tmp
        self.port = free_port()
        self.http = free_port()
        self.cfg = tmp / "gw.toml"
        self.cfg.write_text(gateway_toml(C, self.port, self.http, "[ingest]\nmax_skew_s = 300\n",
                                         "[settlement]\nretail = 30\nfeed_in = 8\ninterval_min = 1\ngrace_s = 5\n",
                                         "[homeassistant]\nevery_s = 1\nannounce_s = 2\n",
                                         "[app]\nsignin_failures_per_min = 5\n"))
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        r.add_community(C)
        r.db.close()
        self.keys: dict[int, object] = {}
        for name in ("ash", "birch", "cedar"):
            k, pub = gv.new_key()
            out = self.cli("member", "add", name, "--key", pub.hex())
            mid = int(out.split()[1])
            self.keys[mid] = k
            (tmp / f"m{mid}.key").write_text(gv.key_string(k) + "\n")
        r = reg.Registry(reg.connect(tmp / "gw.db"))
        self.creds = {d: r.add_device(C, d, "sim", CH, m) for d, m in (("ash-1", 1), ("birch-1", 2))}
        r.db.close()
        self.cli("broker-files")
        self.broker = registry_broker(tmp, self.port)
        self.gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), "run"],
                                   stdout=subprocess.DEVNULL, stderr=open(tmp / "gw.log", "a"), text=True)
        wait_until(lambda: "connected to" in (tmp / "gw.log").read_text(), 20, "gateway connected", tmp / "gw.log")
        self.boards = {}
        for d, (secret, pw) in self.creds.items():
            cfg = default_config(C, d, secret, "127.0.0.1", self.port, reg.broker_user(C, d), pw, period_s=1,
                                 keepalive_s=5)
            cfg["sim"]["start"] = int(time.time())
            self.boards[d] = VirtualBoard(tmp / d, cfg, speed=1)
            self.boards[d].start()

    def cli(self, *args: str, ok: bool = True) -> str:
        r = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(self.cfg), *args],
                           capture_output=True, text=True, timeout=60, cwd=self.tmp)
        if ok:
            assert r.returncode == 0, r.stderr
        return r.stdout + r.stderr

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http}{path}"

    def close(self) -> None:
        for b in self.boards.values():
            b.close()
        stop_process(self.gw)
        stop_process(self.broker, 5)


def http(site: Site, method: str, path: str, body: object = None, token: str | None = None) -> tuple[int, object]:
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(site.url(path), data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", "Bearer " + token)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if r.headers.get("Content-Type") == "application/json" else raw
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def signin(site: Site, member: int, key=None) -> str:
    from peergrid.app.signin import signin_msg

    st, ch = http(site, "POST", "/app/api/challenge", {"member": member})
    assert st == 200, ch
    sig = (key or site.keys[member]).sign(signin_msg(C, member, bytes.fromhex(ch["nonce"])))
    st, s = http(site, "POST", "/app/api/signin", {"member": member, "nonce": ch["nonce"], "sig": sig.hex()})
    assert st == 200, s
    return s["token"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("residents"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def browser(site):
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        pytest.fail("Debian's chromium and chromium-driver are missing: bash tools/setup.sh installs them")
    os.environ.setdefault("SE_OFFLINE", "true")      # no Selenium Manager downloads: the system driver only
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-quic", "--window-size=1100,1300", f"--user-data-dir={site.tmp / 'chromium'}"):
        opts.add_argument(a)
    d = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    d.set_script_timeout(20)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield d
    finally:
        d.quit()


def _text(d, id_: str) -> str:
    return d.find_element("id", id_).text


def _wait(d, pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except Exception:  # noqa: BLE001 - the page is changing under us; try again
            pass
        if time.monotonic() > deadline:
            err = d.find_element("id", "error").text
            raise AssertionError(f"timed out: {what}; page error: {err!r}")
        time.sleep(0.1)


def _page_api(d, path: str, body: object = None) -> dict:
    """Call the gateway from the page, with the page's session."""
    return d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "PG.api(arguments[0], arguments[1] === null ? undefined : arguments[1])"
        ".then(r => done({ok: r}), e => done({status: e.status, error: e.message}));", path, body)


def _signed_in(site: Site, d) -> None:
    """The page signed in as member 1 (each test can run on its own)."""
    d.get(site.url("/app/"))
    _wait(d, lambda: d.execute_script("return !!(window.PG && (PG.session || document.getElementById('page-signin')"
                                      ".offsetParent))"), 10, "the page loaded")
    if d.execute_script("return !!PG.session"):
        return
    d.find_element("id", "in-member").send_keys("1")
    d.find_element("id", "in-key").send_keys(gv.key_string(site.keys[1]))
    d.find_element("id", "import-signin").click()
    _wait(d, lambda: d.execute_script("return !!(PG.session && PG.me)"), 15, "signed in")


def _grid_w(d) -> int:
    return int(_text(d, "house-grid-w").replace(",", ""))


# -- the member app in the browser -----------------------------------------------------------

def test_a_member_signs_in_with_their_key_and_sees_their_house_live(site, browser) -> None:
    d = browser
    d.get(site.url("/app/"))
    assert "PeerGrid" in d.title
    d.save_screenshot(str(SHOTS / "member-app-signin.png"))
    d.find_element("id", "in-member").send_keys("1")
    d.find_element("id", "in-key").send_keys(gv.key_string(site.keys[1]))
    d.find_element("id", "import-signin").click()
    _wait(d, lambda: "member 1" in _text(d, "who") and d.find_element("id", "page-now").is_displayed(), 15,
          "signed in, the house page shown")
    # the private key is not extractable from the browser's store, and is not in page storage
    ext = d.execute_async_script(
        "const done = arguments[0]; indexedDB.open('peergrid', 1).onsuccess = (ev) => {"
        " const r = ev.target.result.transaction('keys').objectStore('keys').getAll();"
        " r.onsuccess = () => done(r.result.map(k => [k.member, k.key.extractable, k.key.type]));};")
    assert ext == [[1, False, "private"]], ext
    storage = d.execute_script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    assert site.keys[1].private_bytes_raw().hex() not in storage

    # live: the board's grid power as the page shows it follows the house's load
    vb = site.boards["ash-1"]
    vb.send(op="power", w=[1500, 0, 0, 0])
    _wait(d, lambda: 1300 <= _grid_w(d) <= 1700, 20, "the page shows about 1500 W bought")
    d.save_screenshot(str(SHOTS / "member-app-now.png"))
    vb.send(op="power", w=[-2200, -2400, 0, 0])
    _wait(d, lambda: -2400 <= _grid_w(d) <= -2000, 20, "the page shows about 2200 W sold")
    assert _text(d, "house-flow") == "selling"
    assert int(_text(d, "house-pv-w").replace(",", "")) > 2000
    # the community in aggregate: both houses' boards
    assert "2 of 2 boards online" in _text(d, "com-online")


def test_another_members_house_is_refused(site, browser) -> None:
    d = browser
    _signed_in(site, d)
    mine = _page_api(d, "m/1/now")
    assert "ok" in mine and mine["ok"]["house"][0]["board"] == "ash-1"
    for path in ("m/2/now", "m/2/series?span=day", "m/2/statement.csv", "m/2/limits", "m/3/now"):
        r = _page_api(d, path)
        assert r.get("status") == 403 and "another member" in r["error"], (path, r)
    # and a write to another house
    r = _page_api(d, "m/2/limits", {"bid": 1, "ask": 1})
    assert r.get("status") == 403, r
    # without a session nothing but the sign-in answers
    assert http(site, "GET", "/app/api/m/1/now")[0] == 401
    assert http(site, "GET", "/app/api/ledger/head", token="made-up")[0] == 401


def _listed_proposal(site: Site, d, member: int, import_kw: float) -> int:
    """A proposal made by `member` with the CLI, listed on the page's Votes."""
    p = _proposal(site, member, import_kw)
    d.get(site.url("/app/#votes"))
    _wait(d, lambda: d.find_element("id", f"proposal-{p}").is_displayed(), 15, "the proposal is listed")
    return p


def _proposal(site: Site, member: int, import_kw: float) -> int:
    deadline = int(time.time()) + 600
    t_from = deadline - deadline % 60 + 120
    out = site.cli("propose", "--member", str(member), "--key-file", str(site.tmp / f"m{member}.key"),
                   "--kind", "feeder", "--import-kw", str(import_kw), "--export-kw", "40", "--from", str(t_from),
                   "--deadline", str(deadline))
    return int(out.split()[1])


def test_a_vote_cast_in_the_page_is_in_the_ledger_and_verifies(site, browser) -> None:
    d = browser
    _signed_in(site, d)
    p = _listed_proposal(site, d, 2, 45)
    box = d.find_element("id", f"proposal-{p}")
    assert "feeder limits: import 45000 W" in box.text
    d.save_screenshot(str(SHOTS / "member-app-votes.png"))
    box.find_element("class name", "vote-yes").click()
    _wait(d, lambda: "You voted yes" in d.find_element("id", f"proposal-{p}").text, 15, "the ballot is recorded")

    export = site.tmp / "ledger.cbor"
    export.write_bytes(subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(site.cfg), "ledger", "export"],
                                      capture_output=True, timeout=60, check=True).stdout)
    out = site.cli("ledger", "verify", str(export))
    assert out.startswith("ledger verifies") and "1 ballot" in out, out
    from peergrid.market.ledger import verify

    ballots = [e.body for e in verify(export.read_bytes()) if e.type == "ballot"]
    assert [(b["proposal"], b["member"], b["vote"]) for b in ballots] == [(p, 1, "yes")]
    # the signature is the member's own, made in the browser: it checks against the member's key
    assert gv._verify(gv.public(site.keys[1]), bytes(ballots[0]["sig"]), gv.ballot_msg(C, p, 1, "yes"))

    # the page's ledger view shows the head the export ends with
    d.get(site.url("/app/#ledger"))
    _wait(d, lambda: _text(d, "ledger-height") not in ("", "–"), 10, "the ledger head")
    import hashlib

    from peergrid.market.ledger import iter_export

    raws = list(iter_export(export.read_bytes()))
    height = int(_text(d, "ledger-height"))
    assert height >= len(raws)
    if height == len(raws):
        assert _text(d, "ledger-hash") == hashlib.sha256(raws[-1]).hexdigest()
    d.save_screenshot(str(SHOTS / "member-app-ledger.png"))


def test_a_tampered_ballot_is_refused(site, browser) -> None:
    d = browser
    _signed_in(site, d)
    p = _listed_proposal(site, d, 3, 47)
    # signed "yes" in the browser, sent as "no"
    r = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "PG.sign(['peergrid ballot', PG.me.community, arguments[0], PG.me.member, 'yes'])"
        ".then(sig => PG.api('ballot', {proposal: arguments[0], vote: 'no', sig}))"
        ".then(r => done({ok: r}), e => done({status: e.status, error: e.message}));", p)
    assert r.get("status") == 422 and "bad signature" in r["error"], r
    # a ballot for another member, signed by this one
    r = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "PG.sign(['peergrid ballot', PG.me.community, arguments[0], 2, 'yes'])"
        ".then(sig => PG.api('ballot', {proposal: arguments[0], member: 2, vote: 'yes', sig}))"
        ".then(r => done({ok: r}), e => done({status: e.status, error: e.message}));", p)
    assert r.get("status") == 403, r
    # a signature with one bit flipped
    r = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "PG.sign(['peergrid ballot', PG.me.community, arguments[0], PG.me.member, 'yes'])"
        ".then(sig => PG.api('ballot', {proposal: arguments[0], vote: 'yes',"
        " sig: (parseInt(sig[0], 16) ^ 1).toString(16) + sig.slice(1)}))"
        ".then(r => done({ok: r}), e => done({status: e.status, error: e.message}));", p)
    assert r.get("status") == 422 and "bad signature" in r["error"], r
    from peergrid.market.ledger import verify

    export = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(site.cfg), "ledger", "export"],
                            capture_output=True, timeout=60, check=True).stdout
    assert not [e for e in verify(export) if e.type == "ballot" and e.body["proposal"] == p]
    # the honest ballot still goes through afterwards
    d.find_element("id", f"proposal-{p}").find_element("class name", "vote-no").click()
    _wait(d, lambda: "You voted no" in d.find_element("id", f"proposal-{p}").text, 15, "the honest ballot")


def _settled_with(site: Site, member: int) -> bool:
    import sqlite3

    from peergrid.market.ledger import decode_entry

    with sqlite3.connect(str(site.tmp / "gw.db"), timeout=30) as db:
        try:
            raws = [bytes(r[0]) for r in db.execute("SELECT raw FROM ledger ORDER BY n")]
        except sqlite3.OperationalError:
            return False
    return any(e["type"] == "settlement" and member in e["body"]["flows"][0::3] for e in map(decode_entry, raws))


def _entries(site: Site) -> list:
    from peergrid.market.ledger import verify

    export = subprocess.run([sys.executable, "-m", "peergrid.cli", "-c", str(site.cfg), "ledger", "export"],
                            capture_output=True, timeout=60, check=True).stdout
    return verify(export) if export else []


# -- the sign-in against a hostile client ----------------------------------------------------

def test_the_app_answers_hostile_requests_with_reasons(site) -> None:
    import socket

    def raw(req: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", site.http), timeout=10) as s:
            s.sendall(req)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out

    # only the app's own files: no path from the URL reaches the file system
    for path in ("/app/../gw.toml", "/app/%2e%2e/gw.db", "/app/www/app.js", "/app/static.py", "/app//etc/passwd"):
        assert raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()).startswith(b"HTTP/1.0 404"), path
    page = raw(b"GET /app/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert page.startswith(b"HTTP/1.0 200") and b"Content-Security-Policy: default-src 'self'" in page
    # a body is read only after the session is checked: a huge one is answered 401 at once
    t0 = time.monotonic()
    out = raw(b"POST /app/api/ballot HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000)
    assert out.startswith(b"HTTP/1.0 401") and time.monotonic() - t0 < 5
    # beyond the app's body limit, and not JSON
    assert raw(b"POST /app/api/challenge HTTP/1.1\r\nHost: x\r\nContent-Length: 9000\r\n\r\n" + b"{" * 9000
               ).startswith(b"HTTP/1.0 413")
    assert raw(b"POST /app/api/challenge HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{x}").startswith(
        b"HTTP/1.0 400")
    token = signin(site, 3)
    for path, want in (("/app/api/m/3/series?span=year", 400), ("/app/api/m/3/statement.csv?from=0&to=99999999999",
                                                                   400), ("/app/api/nothing", 404),
                       ("/app/api/m/99999/now", 403)):
        assert http(site, "GET", path, token=token)[0] == want, path
    for body in ({"proposal": "1", "vote": "yes", "sig": "00" * 64}, {"proposal": 1, "vote": "maybe", "sig": "00" * 64},
                 {"proposal": 10 ** 30, "vote": "yes", "sig": "00" * 64}, {"change": {"kind": "admit", "key": "zz"}}):
        code, obj = http(site, "POST", "/app/api/ballot" if "vote" in body else "/app/api/propose", body, token)
        assert 400 <= code < 500 and obj.get("error") and "Traceback" not in obj["error"], (body, code, obj)


# -- Home Assistant -------------------------------------------------------------------------

def test_home_assistant_finds_the_house_with_a_members_account_and_nothing_else(site) -> None:
    out = site.cli("member", "account", "1")
    user = out.split("user ")[1].split()[0]
    password = out.split("password ")[1].split()[0]
    assert user == f"{C}.member_1"
    got: dict[str, bytes] = {}
    lock = threading.Lock()
    up = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ha", protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)

    def on_connect(cl, ud, flags, rc, props=None):
        if not rc.is_failure:
            # what Home Assistant subscribes to: all discovery; and what a curious member tries
            cl.subscribe([("homeassistant/#", 1), ("pgha/#", 1), (f"pgha/{C}/house-2/#", 1), ("pg/#", 1)])
            up.set()

    def on_message(cl, ud, msg):
        with lock:
            got[msg.topic] = bytes(msg.payload)

    c.on_connect, c.on_message = on_connect, on_message
    # the broker rereads its accounts on SIGHUP: retry until the new one is known
    c.connect("127.0.0.1", site.port, keepalive=10)
    c.loop_start()
    try:
        assert up.wait(15), "the member's account was not accepted"
        c.publish("homeassistant/status", "online", qos=1).wait_for_publish(5)     # Home Assistant starts
        node = f"pg_{C}_m1"
        cfg_t = f"homeassistant/sensor/{node}/grid_import/config"
        wait_until(lambda: cfg_t in got and f"pgha/{C}/house-1/state" in got, 20, "discovery and state")
        imp = json.loads(got[cfg_t])
        assert (imp["dev_cla"], imp["stat_cla"], imp["unit_of_meas"]) == ("energy", "total_increasing", "kWh")
        assert imp["~"] == f"pgha/{C}/house-1" and imp["stat_t"] == "~/state" and imp["avty_t"] == "~/avail"
        assert imp["dev"]["ids"] == [node]
        exp = json.loads(got[f"homeassistant/sensor/{node}/grid_export/config"])
        assert (exp["dev_cla"], exp["stat_cla"], exp["unit_of_meas"]) == ("energy", "total_increasing", "kWh")
        pw = json.loads(got[f"homeassistant/sensor/{node}/grid_power/config"])
        assert (pw["dev_cla"], pw["unit_of_meas"], pw["stat_cla"]) == ("power", "W", "measurement")
        assert json.loads(got[f"homeassistant/sensor/{node}/pv_energy/config"])["dev_cla"] == "energy"
        assert f"homeassistant/sensor/{node}/local_price/config" in got
        # the state the templates read, with the keys they name
        wait_until(lambda: got.get(f"pgha/{C}/house-1/avail") == b"online", 15, "house 1 available")
        state = json.loads(got[f"pgha/{C}/house-1/state"])
        for cfg_topic, payload in list(got.items()):
            if cfg_topic.startswith(f"homeassistant/sensor/{node}/"):
                key = json.loads(payload)["val_tpl"].split("value_json.")[1].split()[0]
                assert key in state, (cfg_topic, state)
        assert state["import_kwh"] >= 0 and isinstance(state["grid_w"], int)
        # the registers only go up as Home Assistant sees them
        first = state["import_kwh"]
        site.boards["ash-1"].send(op="power", w=[3000, 0, 0, 0])
        wait_until(lambda: json.loads(got[f"pgha/{C}/house-1/state"])["import_kwh"] > first, 30,
                   "import energy grows")
        # the community's aggregate is readable too
        wait_until(lambda: f"pgha/{C}/community/state" in got, 10, "community state")
        assert json.loads(got[f"pgha/{C}/community/state"])["houses"] == 3
        time.sleep(2)
        with lock:
            topics = list(got)
        # nothing of house 2: not its configs, not its state, and no board's raw frames
        assert not [t for t in topics if "house-2" in t or f"{C}_m2" in t or t.startswith("pg/")], topics
        assert any(t.startswith(f"homeassistant/sensor/pg_{C}_community/") for t in topics)
        # the member's account cannot write a house's state or a discovery config
        c.publish(f"pgha/{C}/house-1/state", '{"import_kwh": 0}', qos=1).wait_for_publish(5)
        c.publish(f"homeassistant/sensor/{node}/grid_import/config", "{}", qos=1).wait_for_publish(5)
        time.sleep(1.5)
        assert json.loads(got[cfg_t])["dev_cla"] == "energy"
        assert json.loads(got[f"pgha/{C}/house-1/state"])["import_kwh"] > 0
    finally:
        c.loop_stop()
        c.disconnect()


def test_history_statements_limits_pages(site, browser) -> None:
    d = browser
    _signed_in(site, d)
    # at least one settled interval with both houses in it
    wait_until(lambda: _settled_with(site, 1), 150, "an interval settled with house 1 in it", site.tmp / "gw.log",
               every=0.5)
    d.get(site.url("/app/#history"))
    _wait(d, lambda: "intervals" in _text(d, "history-total"), 15, "the day's series")
    assert d.find_elements("css selector", "#chart svg rect"), ("the chart has bars", _page_api(d, "m/1/series?span=day"),
                                                                [(e.type, e.body) for e in _entries(site)][-3:])
    rows = d.find_elements("css selector", "#history-table tbody tr")
    assert rows, "a row per interval"
    d.save_screenshot(str(SHOTS / "member-app-history.png"))

    d.get(site.url("/app/#statements"))
    _wait(d, lambda: d.find_element("id", "st-from").get_attribute("value") != "", 10, "the statement form")
    d.find_element("id", "st-print").click()
    _wait(d, lambda: "Statement of member 1" in _text(d, "printable"), 10, "the printable statement")
    d.save_screenshot(str(SHOTS / "member-app-statement.png"))
    csv_text = d.execute_async_script(
        "const done = arguments[0];"
        "fetch('/app/api/m/1/statement.csv', {headers: {Authorization: 'Bearer ' + PG.session.token}})"
        ".then(r => r.text()).then(done);")
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("member,interval_start_utc") and len(lines) >= 2
    assert all(line.split(",")[0] == "1" for line in lines[1:]), "only this member's lines"

    d.get(site.url("/app/#limits"))
    _wait(d, lambda: "retail 30" in _text(d, "tariff-line"), 10, "the limits page")
    d.find_element("id", "lim-bid").send_keys("25")
    d.find_element("id", "lim-save").click()
    _wait(d, lambda: reg.Registry(reg.connect(site.tmp / "gw.db")).limits(C)[1] == (25, None), 10,
          "the bid is in the registry")
    # beyond the community's rules: refused with the reason
    r = _page_api(d, "m/1/limits", {"bid": 10 ** 9})
    assert r.get("status") == 400, r
    r = _page_api(d, "m/1/partner", {"buyer": 2, "discount": 30 - 8 + 1})
    assert r.get("status") == 400, r
    r = _page_api(d, "m/1/partner", {"buyer": 2, "discount": 5})
    assert r["ok"]["partners"] == [{"buyer": 2, "discount": 5}]
    d.refresh()
    _wait(d, lambda: "member 2" in _text(d, "partners"), 10, "the partner listed")
    d.save_screenshot(str(SHOTS / "member-app-limits.png"))


def test_sign_in_refuses_wrong_keys_replays_and_floods(site) -> None:
    # (late in the module: its flood leaves this address throttled for a minute)
    from peergrid.app.signin import signin_msg

    st, ch = http(site, "POST", "/app/api/challenge", {"member": 1})
    wrong, _ = gv.new_key()
    bad = wrong.sign(signin_msg(C, 1, bytes.fromhex(ch["nonce"])))
    assert http(site, "POST", "/app/api/signin", {"member": 1, "nonce": ch["nonce"], "sig": bad.hex()})[0] == 401
    # the nonce was used up by the failure too: the right signature now comes too late
    good = site.keys[1].sign(signin_msg(C, 1, bytes.fromhex(ch["nonce"])))
    assert http(site, "POST", "/app/api/signin", {"member": 1, "nonce": ch["nonce"], "sig": good.hex()})[0] == 401
    # a challenge for member 1 signed by member 2's key, sent as member 2
    st, ch = http(site, "POST", "/app/api/challenge", {"member": 1})
    sig2 = site.keys[2].sign(signin_msg(C, 2, bytes.fromhex(ch["nonce"])))
    assert http(site, "POST", "/app/api/signin", {"member": 2, "nonce": ch["nonce"], "sig": sig2.hex()})[0] == 401
    # malformed: each a 400 with a reason, never a 500
    for body in ({"member": "1"}, {"member": -1}, {"member": 1, "nonce": "zz", "sig": "00"}, [1, 2], {}):
        path = "/app/api/signin" if isinstance(body, dict) and "nonce" in body else "/app/api/challenge"
        code, obj = http(site, "POST", path, body)
        assert code == 400 and obj.get("error"), (body, code, obj)
    # beyond signin_failures_per_min (5) from one address: 429 for the rest of the minute
    codes = []
    for _ in range(4):
        st, ch = http(site, "POST", "/app/api/challenge", {"member": 1})
        codes.append(st)
        if st == 200:
            codes.append(http(site, "POST", "/app/api/signin", {"member": 1, "nonce": ch["nonce"],
                                                                 "sig": "00" * 64})[0])
    assert 429 in codes, codes
    metrics = urllib.request.urlopen(site.url("/metrics"), timeout=5).read().decode()
    assert "app_signin_refused" in metrics and "app_signin_throttled" in metrics


def test_screenshots_were_written(site, browser) -> None:
    shots = sorted(p.name for p in SHOTS.glob("member-app-*.png"))
    for name in ("signin", "now", "votes", "ledger", "history", "statement", "limits"):
        assert f"member-app-{name}.png" in shots, shots
        assert (SHOTS / f"member-app-{name}.png").stat().st_size > 5000
