"""Test harness: real MicroPython, mpy-cross and mosquitto, started on demand."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    p = BIN / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: run `make setup` (it installs the pinned tools)")
    return found


def micropython_cmd() -> list[str]:
    return [_tool("micropython")]


def mpy_env(*paths: Path | str) -> dict[str, str]:
    env = dict(os.environ)
    env["MICROPYPATH"] = ":".join(str(p) for p in paths)
    return env


def run_micropython(args: list[str], paths: list[Path | str], heap: str = "", timeout: float = 120,
                    stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = micropython_cmd()
    if heap:
        cmd += ["-X", f"heapsize={heap}"]
    return subprocess.run(cmd + args, cwd=ROOT, env=mpy_env(*paths), capture_output=True, text=True,
                          timeout=timeout, input=stdin)


MP32 = ROOT / "tools" / "mp32"
ESP32_HEAP = 111_936        # GC heap of an ESP32 without PSRAM once Wi-Fi runs (README)
sys.path.insert(0, str(ROOT / "tools"))
from footprint import build_mpy, mp32_cmd  # noqa: E402  (one way to build .mpy files and start the 32-bit runtime)


def run_mp32(args: list[str], opts: list[str], heap: int = 0, timeout: float = 300,
             step: bool = False) -> subprocess.CompletedProcess:
    """Run a script on the 32-bit MicroPython. `heap`: the GC heap in bytes,
    code and data together, capped (0: 2 MB that may grow, for tests of
    logic rather than of memory). `opts`: the runner's --path/--copy/--sys/--js."""
    cmd = mp32_cmd() + (["--heap", str(heap)] if heap else ["--grow"]) + (["--step"] if step else [])
    return subprocess.run(cmd + opts + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def mp32_tree(mpy_dir: Path | None) -> list[str]:
    """Runner options that lay out the repository as the shared tests expect
    it (/repo/tests/shared/util.py finds /repo/protocol/vectors) with the
    firmware from source, or from mpy-cross's .mpy files first on sys.path."""
    opts = []
    for sub in ("protocol", "firmware", "boardsim", "boards", "tests"):
        opts += ["--copy", f"{ROOT / sub}:/repo/{sub}"]
    opts += ["--copy", f"{ROOT / 'build' / 'lib'}:/repo/lib"]
    if mpy_dir is not None:
        opts += ["--copy", f"{mpy_dir}:/mpy", "--sys", "/mpy"]
    return opts + ["--sys", "/repo", "--sys", "/repo/tests/shared", "--sys", "/repo/tests", "--sys", "/repo/lib"]


def mpy_build(out: Path) -> Path:
    """Compile protocol/, firmware/ and umqtt_pinned (build/lib, from `make
    umqtt`) with mpy-cross, as they go onto a board; raise on any error."""
    return build_mpy(out)


def gateway_toml(community: str, port: int, http_port: int, *sections: str) -> str:
    """A gateway config for a test site: the database beside it, the
    broker on loopback with the registry's password and ACL files (and
    mosquitto's pid file, so account changes reload it), then `sections`."""
    return (f'[gateway]\ncommunity = "{community}"\ndb = "gw.db"\nhttp_port = {http_port}\nstatus_every_s = 1\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {port}\nuser = "gateway"\npassword = "gw-pass-123"\n'
            f'passwd_file = "passwd"\nacl_file = "acl"\npid_file = "mosquitto.pid"\n' + "".join(sections))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, what: str = "mosquitto") -> None:
    """Until something accepts connections on the loopback port (at most
    10 s; raises at once if `proc` ends first)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"{what} did not start on port {port}")
            time.sleep(0.05)


def registry_broker(work: Path, port: int, listen: str = "127.0.0.1", persistence: bool = False,
                    wait: bool = True) -> subprocess.Popen:
    """mosquitto with the password and ACL files the gateway's registry wrote
    into `work` (peergrid broker-files), on `port`; returns the process."""
    conf = work / "mosquitto.conf"
    conf.write_text(
        f"listener {port} {listen}\nallow_anonymous false\npassword_file {work / 'passwd'}\n"
        f"acl_file {work / 'acl'}\npid_file {work / 'mosquitto.pid'}\n"
        + (f"persistence true\npersistence_location {work}/\n" if persistence else "persistence false\n")
        + "max_queued_messages 1000000\nmax_inflight_messages 1000\nlog_dest none\n"
        + ("user root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if wait:
        wait_port(port, proc)
    return proc


def stop_process(p: subprocess.Popen | None, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it does not go in time."""
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class Broker:
    """A mosquitto on 127.0.0.1:<free port> with a generated config.

    Users and ACL rules are added with `add_user`; `apply()` rewrites the
    password and ACL files and restarts the broker on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.host = "127.0.0.1"
        self.users: dict[str, str] = {}
        self.acl: dict[str, list[tuple[str, str]]] = {}
        self.proc: subprocess.Popen | None = None
        self.mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.passwd_tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        if not Path(self.mosquitto).exists():
            raise RuntimeError("mosquitto not installed: run `make setup` (apt-get install mosquitto)")
        self.add_user("admin", "admin-pass", [("#", "readwrite")])
        self.apply()

    def add_user(self, name: str, password: str, rules: list[tuple[str, str]]) -> None:
        self.users[name] = password
        self.acl[name] = rules

    def apply(self) -> None:
        pw = self.dir / "passwd"
        pw.write_text("")
        for u, p in self.users.items():
            subprocess.run([self.passwd_tool, "-b", str(pw), u, p], check=True, capture_output=True)
        pw.chmod(0o600)
        acl = self.dir / "acl"
        lines = []
        for u, rules in self.acl.items():
            lines.append(f"user {u}")
            lines += [f"topic {access} {pattern}" for pattern, access in rules]
            lines.append("")
        acl.write_text("\n".join(lines))
        acl.chmod(0o600)
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {pw}\n"
            f"acl_file {acl}\n"
            "persistence false\n"
            # the gateway's persistent session must not lose queued QoS 1
            # messages (mosquitto's default keeps 1000 and drops the rest;
            # 0, documented as "no limit", made 2.0.11 drop clients here)
            "max_queued_messages 1000000\n"
            "max_inflight_messages 1000\n"
            "log_dest stderr\n"
            "log_type error\nlog_type warning\n"
            # as root, mosquitto would switch to user "mosquitto", which cannot
            # read files in the test's private temp folder
            + (f"user {pwd.getpwuid(os.geteuid()).pw_name}\n" if os.geteuid() == 0 else "")
        )
        self.stop()
        self.start()

    def start(self) -> None:
        self.log = open(self.dir / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.mosquitto, "-c", str(self.dir / "mosquitto.conf")],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.dir / 'mosquitto.log').read_text()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class MpyPeer:
    """A long-lived MicroPython process answering JSON requests line by line
    (tests/mpy_peer.py), so property tests can send many cases cheaply."""

    def __init__(self, paths: list[Path | str]) -> None:
        self.proc = subprocess.Popen(micropython_cmd() + ["tests/mpy_peer.py"], cwd=ROOT, env=mpy_env(*paths),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     encoding="utf-8")

    def call(self, **req):
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req, ensure_ascii=False) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("MicroPython peer died")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(5)


def wait_until(pred, timeout: float, what, log: Path | None = None, every: float = 0.05) -> None:
    """Until pred() is true (a database still locked or being made counts as
    not yet); on timeout an AssertionError naming `what` with the end of `log`.
    `what` may be a callable: diagnostics that ask a board or the gateway are
    then gathered only on timeout, never while the thing waited for is busy."""
    import sqlite3

    deadline = time.monotonic() + timeout
    while True:
        try:
            if pred():
                return
        except sqlite3.OperationalError:
            pass
        if time.monotonic() > deadline:
            tail = log.read_text()[-1500:] if log is not None and log.exists() else ""
            raise AssertionError(f"timed out: {what() if callable(what) else what}; log: {tail}")
        time.sleep(every)


def run_interleaved(*targets) -> None:
    """Run each function on a thread of its own, all at once, with the
    interpreter switching threads as often as it can: races on shared
    buffers show in seconds instead of once in a demo day."""
    import threading

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=t) for t in targets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)


def board_client(user: str, password: str, port: int, client_id: str | None = None):
    """A connected paho client with a board's broker account (loop running)."""
    import threading

    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or user)
    c.username_pw_set(user, password)
    up = threading.Event()
    c.on_connect = lambda *a: up.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert up.wait(10), "board could not connect"
    return c


def peergrid_cli(cfg: Path, *args: str) -> tuple[int, str, str]:
    """`peergrid -c cfg args...` in this process: (exit code, stdout, stderr)."""
    import contextlib
    import io

    from peergrid import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["-c", str(cfg), *args])
    return rc, out.getvalue(), err.getvalue()


def peergrid_json(cfg: Path, *args: str):
    """The JSON document of `peergrid -c cfg args... --json` (which must succeed)."""
    rc, out, err = peergrid_cli(cfg, *args, "--json")
    if rc != 0:
        raise AssertionError(f"peergrid {' '.join(args)}: {err.strip()}")
    return json.loads(out)


def broken_firmware_tree(dst: Path) -> Path:
    """A copy of the board's source tree (firmware, protocol, boardsim) whose
    firmware measures but drops every reading, live and buffered: a release
    built from it runs but can never prove itself (tools/release.py --src)."""
    for pkg in ("firmware", "protocol", "boardsim"):
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    p = dst / "firmware" / "board.py"
    s = p.read_text()
    broken = s.replace("            self.live_len = n\n", "            self.live_len = 0    # broken: dropped\n") \
        .replace("            self._spool(frame)\n", "            pass    # broken: dropped\n")
    assert broken.count("broken: dropped") == 2, "firmware/board.py changed: the breakage no longer applies"
    p.write_text(broken)
    return dst
