#!/usr/bin/env python3
"""Benchmark: the gateway (`peergrid run`, one process) ingesting signed QoS 1
readings from 10,000 simulated boards through a real mosquitto on loopback.

Load generators are separate processes (paho clients sharing connections);
every device has its own identity and key in the registry and every frame is
sealed with protocol/ as a board seals it (sealed before the clock starts).
Measures:
  * sustained: all frames published as fast as the broker takes them;
    readings accepted and committed per second (first to last commit)
  * latency at 2,000 readings/s: publish to the commit of its batch, p50/p99
  * replay burst: 100 boards x 360 buffered readings, none rejected or lost
  * TLS: the same readings once through the broker's plain listener and
    once through a TLS listener like the boards' (certificates from
    peergrid.community.pki, each generator one TLS session), one after the
    other in the same run: both rates and their ratio
  * gateway CPU seconds per 1,000 readings, peak RSS (VmHWM)

    python tests/bench/bench_ingest.py            # 10,000 devices, 100,000 readings sustained
    python tests/bench/bench_ingest.py --quick    # 10,000 devices, 20,000 sustained, shorter runs
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from harness import Broker, free_port  # noqa: E402
from peergrid.community import registry as reg  # noqa: E402
from protocol import messages, topics  # noqa: E402
from protocol.link import DeviceLink  # noqa: E402

C = "bench"
CHANNELS = [{"role": "grid", "rating_a": 100}, {"role": "pv", "rating_a": 50}]


def seal(devs: list[tuple[str, bytes]], per_dev: int, seq0: int, buffered: bool = False) -> list[tuple[str, bytes, str, int]]:
    now = int(time.time())
    out = []
    for seq in range(seq0, seq0 + per_dev):
        for d, secret in devs:
            dl = _links.get(d)
            if dl is None:
                dl = _links[d] = DeviceLink(C, d, secret)
            flags = messages.F_BUFFERED if buffered else 0
            f = dl.reading(1, seq, now - (per_dev - seq) * 10 if buffered else now, flags, 2300, 5000,
                           [400 + seq % 50, 1000 + seq, 3, 1800, -100, 0, 500 + seq, 600], 2)
            out.append((dl.t_reading, bytes(f), d, seq))
    return out


_links: dict[str, DeviceLink] = {}


class TlsBroker(Broker):
    """harness.Broker with a TLS listener beside the plain one: the same
    accounts and ACL, the broker's certificate from the community CA, TLS 1.2
    or later (what peergrid.community.broker gives the boards)."""

    def __init__(self, workdir: Path, tls_port: int, ca: Path, cert: Path, key: Path) -> None:
        self.tls_lines = [f"listener {tls_port} 127.0.0.1", f"cafile {ca}", f"certfile {cert}", f"keyfile {key}",
                          "tls_version tlsv1.2"]
        super().__init__(workdir)

    def start(self) -> None:
        conf = self.dir / "mosquitto.conf"
        text = conf.read_text()
        if self.tls_lines[0] not in text:
            conf.write_text(text + "\n".join(self.tls_lines) + "\n")
        super().start()


def _connect_raw(port: int, client_id: str, user: str, password: str, tls: tuple[str, str] | None = None):
    """A minimal MQTT 3.1.1 publisher on a plain socket: CONNECT, then
    pre-encoded QoS 1 PUBLISH packets written in large chunks, PUBACKs
    read in bulk by a thread. Much cheaper per message than paho, so the
    load generator leaves the CPU to the gateway it measures. With `tls`
    (CA file, server name) the socket speaks TLS, the broker's certificate
    checked; its PUBACKs are then read between writes (_drain), since one
    TLS connection must not be read and written by two threads at once."""
    import socket
    import struct
    import threading

    def s16(b: bytes) -> bytes:
        return struct.pack("!H", len(b)) + b

    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is not None:
        import ssl

        ctx = ssl.create_default_context(cafile=tls[0])
        s = ctx.wrap_socket(s, server_hostname=tls[1])
    vh = s16(b"MQTT") + bytes((4, 0xC2)) + struct.pack("!H", 60)
    body = vh + s16(client_id.encode()) + s16(user.encode()) + s16(password.encode())
    s.sendall(bytes((0x10,)) + _varint(len(body)) + body)
    ack = s.recv(4)
    if len(ack) != 4 or ack[0] != 0x20 or ack[3] != 0:
        raise SystemExit(f"loadgen: CONNECT refused {ack!r}")
    acked = [0]
    if tls is not None:
        acked.append(0)                    # bytes of PUBACKs read so far
        return s, acked

    def reader() -> None:
        buf = b""
        while True:
            d = s.recv(65536)
            if not d:
                return
            buf += d
            n = len(buf) // 4
            acked[0] += n                  # only PUBACKs (4 bytes) come back
            buf = buf[4 * n:]

    threading.Thread(target=reader, daemon=True).start()
    return s, acked


def _drain(s, acked: list[int], wait: float) -> None:
    """Count the PUBACKs (4 bytes each) waiting on a TLS socket, waiting up
    to `wait` seconds for the first."""
    import ssl

    s.settimeout(wait)
    try:
        while True:
            d = s.recv(65536)
            if not d:
                return
            acked[1] += len(d)
            acked[0] = acked[1] // 4
            s.settimeout(0)
    except (ssl.SSLWantReadError, BlockingIOError, TimeoutError):
        pass
    finally:
        s.settimeout(None)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def _publish_packet(topic: str, frame: bytes, pid: int) -> bytes:
    import struct

    t = topic.encode()
    body = struct.pack("!H", len(t)) + t + struct.pack("!H", pid) + frame
    return b"\x32" + _varint(len(body)) + body


def generator(port: int, frames: list[tuple[str, bytes, str, int]], rate: float, out_file: str | None,
              start_at: float, tls: tuple[str, str] | None = None) -> None:
    s, acked = _connect_raw(port, f"loadgen-{os.getpid()}", "loadgen", "loadgen-pass", tls)
    packets = [_publish_packet(t, f, i % 65535 + 1) for i, (t, f, _, _) in enumerate(frames)]
    while time.time() < start_at:
        time.sleep(0.001)
    log = []
    if rate:
        t0 = time.perf_counter()
        for i, p in enumerate(packets):
            due = t0 + i / rate
            while time.perf_counter() < due:
                time.sleep(0.0002)
            log.append((frames[i][2], frames[i][3], time.time()))
            s.sendall(p)
    else:
        chunk = []
        size = 0
        sent = 0
        for p in packets:
            chunk.append(p)
            size += len(p)
            if size > 32768:
                s.sendall(b"".join(chunk))
                sent += len(chunk)
                chunk, size = [], 0
                if tls is not None:
                    _drain(s, acked, 0)
                while sent - acked[0] > 20000:     # keep at most 20,000 unacknowledged
                    if tls is not None:
                        _drain(s, acked, 0.01)
                    else:
                        time.sleep(0.001)
        if chunk:
            s.sendall(b"".join(chunk))
    deadline = time.time() + 120
    while acked[0] < len(packets) and time.time() < deadline:
        if tls is not None:
            _drain(s, acked, 0.01)
        else:
            time.sleep(0.01)
    s.sendall(b"\xe0\x00")
    s.close()
    if out_file:
        Path(out_file).write_text(json.dumps(log))


def run_load(port: int, chunks: list[list], rate_total: float, tmp: Path, tag: str,
             tls: tuple[str, str] | None = None) -> list[tuple[str, int, float]]:
    start_at = time.time() + 0.5
    procs = []
    files = []
    for i, ch in enumerate(chunks):
        f = str(tmp / f"{tag}-{i}.json")
        files.append(f)
        p = mp.Process(target=generator, args=(port, ch, rate_total / len(chunks) if rate_total else 0, f, start_at,
                                               tls))
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    log = []
    for f in files:
        log += [tuple(x) for x in json.loads(Path(f).read_text())]
    return log


def stored_count(db: Path) -> int:
    with sqlite3.connect(str(db), timeout=30) as c:
        return c.execute("SELECT COUNT(*) FROM readings").fetchone()[0]


def wait_stored(db: Path, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while stored_count(db) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_ingest: only {stored_count(db)} of {n} readings stored")
        time.sleep(0.1)


def proc_cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def latencies(db: Path, log: list[tuple[str, int, float]]) -> list[float]:
    pub = {(d, s): t for d, s, t in log}
    out = []
    with sqlite3.connect(str(db), timeout=30) as c:
        batches = list(c.execute("SELECT first_frame, last_frame, t_done FROM batches"))
        done = {}
        for a, b, t in batches:
            for fid in range(a, b + 1):
                done[fid] = t
        for fid, d, s in c.execute("SELECT id, device, seq FROM frames WHERE kind='reading'"):
            t = pub.get((d, s))
            if t is not None and fid in done:
                out.append(done[fid] - t)
    return sorted(out)


def pct(xs: list[float], p: float) -> float:
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000 if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    n_dev = 10_000
    per_dev = 2 if a.quick else 10
    lat_s = 5 if a.quick else 15
    burst_boards = 100
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "mq").mkdir()
        from peergrid.community import pki

        pki.make_ca(tmp / "ca.pem", tmp / "ca.key", C)
        pki.make_server_cert(tmp / "broker.pem", tmp / "broker.key", tmp / "ca.pem", tmp / "ca.key", ["broker.bench"])
        tls_port = free_port()
        tls = (str(tmp / "ca.pem"), "broker.bench")
        broker = TlsBroker(tmp / "mq", tls_port, tmp / "ca.pem", tmp / "broker.pem", tmp / "broker.key")
        broker.add_user("gateway", "gw-pass", [(f"pg/{C}/#", "readwrite"), (f"pgw/{C}/#", "readwrite")])
        broker.add_user("loadgen", "loadgen-pass", [(f"pg/{C}/+/reading", "write")])
        broker.apply()
        db = tmp / "gw.db"
        r = reg.Registry(reg.connect(db))
        r.add_community(C)
        devs = []
        r.db.execute("BEGIN")
        for i in range(n_dev):
            secret = os.urandom(32)
            r.add_device(C, f"b{i:05d}", "sim", CHANNELS, secret=secret)
            devs.append((f"b{i:05d}", secret))
        r.db.execute("COMMIT")
        r.db.close()
        cfg = tmp / "gw.toml"
        cfg.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = {free_port()}\n'
                       f'[broker]\nport = {broker.port}\nuser = "gateway"\npassword = "gw-pass"\n'
                       f'[ingest]\nbatch = 2000\nbatch_ms = 3\nrecord_batches = true\nmax_skew_s = 600\n')
        gw = subprocess.Popen([sys.executable, "-m", "peergrid.cli", "-c", str(cfg), "run"],
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "gw.log", "w"))
        try:
            deadline = time.monotonic() + 20
            while "connected to" not in (tmp / "gw.log").read_text():
                if time.monotonic() > deadline or gw.poll() is not None:
                    raise SystemExit("gateway did not start: " + (tmp / "gw.log").read_text()[-800:])
                time.sleep(0.05)
            time.sleep(0.5)
            n_gen = 2
            if os.environ.get("PG_PYSPY"):
                subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-d", "6", "-f", "raw",
                                  "-o", os.environ["PG_PYSPY"], "-p", str(gw.pid), "--threads"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            # 1. sustained
            frames = seal(devs, per_dev, 0)
            chunks = [frames[i::n_gen] for i in range(n_gen)]
            cpu0 = proc_cpu(gw.pid)
            t0 = time.time()
            run_load(broker.port, chunks, 0, tmp, "sustained")
            wait_stored(db, len(frames), 300)
            t1 = time.time()
            cpu1 = proc_cpu(gw.pid)
            with sqlite3.connect(str(db), timeout=30) as c:
                tmin, tmax = c.execute("SELECT MIN(t_done), MAX(t_done) FROM batches").fetchone()
            sustained = len(frames) / max(tmax - t0 - 0.5, 1e-6)
            cpu_per_1000 = (cpu1 - cpu0) / len(frames) * 1000
            # 2. latency at 2,000 readings/s (a fresh slice of devices/seqs)
            n_lat = 2000 * lat_s
            lat_frames = seal(devs[: n_lat // 2], 2, per_dev)
            with sqlite3.connect(str(db), timeout=30) as c:
                c.execute("DELETE FROM batches")
            base = stored_count(db)
            log = run_load(broker.port, [lat_frames[i::n_gen] for i in range(n_gen)], 2000, tmp, "lat")
            wait_stored(db, base + len(lat_frames), 120)
            lats = latencies(db, log)
            # 3. replay burst: 100 boards with 360 buffered readings each
            burst = seal(devs[:burst_boards], 360, per_dev + 2, buffered=True)
            base = stored_count(db)
            tb = time.time()
            run_load(broker.port, [burst[i::n_gen] for i in range(n_gen)], 0, tmp, "burst")
            wait_stored(db, base + len(burst), 300)
            burst_s = time.time() - tb
            # 4. the same load through the plain listener and through the TLS one, one after the other
            # (the boards of the burst sit hundreds of readings ahead: their registers would jump)
            n_pair = 1 if a.quick else 3
            seq0 = per_dev + 2
            pair: dict[str, float] = {}
            pair_total = 0
            for mode, s0 in (("plain", seq0), ("tls", seq0 + n_pair)):
                fr = seal(devs[burst_boards:], n_pair, s0)
                pair_total += len(fr)
                with sqlite3.connect(str(db), timeout=30) as c:
                    c.execute("DELETE FROM batches")
                base = stored_count(db)
                tp = time.time()
                run_load(tls_port if mode == "tls" else broker.port, [fr[i::n_gen] for i in range(n_gen)], 0, tmp,
                         "pair-" + mode, tls if mode == "tls" else None)
                wait_stored(db, base + len(fr), 300)
                with sqlite3.connect(str(db), timeout=30) as c:
                    tmax = c.execute("SELECT MAX(t_done) FROM batches").fetchone()[0]
                pair[mode] = len(fr) / max(tmax - tp - 0.5, 1e-6)
            with sqlite3.connect(str(db), timeout=30) as c:
                rejected = c.execute("SELECT COALESCE(SUM(n), 0) FROM counters WHERE what LIKE 'reject:%'").fetchone()[0]
                total = c.execute("SELECT COUNT(*) FROM readings").fetchone()[0]
            rss = proc_hwm_mb(gw.pid)
        finally:
            gw.terminate()
            try:
                gw.wait(20)
            except subprocess.TimeoutExpired:
                gw.kill()
            broker.stop()
        result = {
            "bench": "ingest", "quick": a.quick, "devices": n_dev, "readings_sustained": len(frames),
            "readings_per_s": round(sustained), "wall_s_sustained": round(t1 - t0, 1),
            "rate_for_latency": 2000, "latency_readings": len(lats),
            "p50_ms": round(pct(lats, 50), 1), "p99_ms": round(pct(lats, 99), 1),
            "burst_readings": len(burst), "burst_s": round(burst_s, 1), "rejected": rejected,
            "stored_total": total, "expected_total": len(frames) + len(lat_frames) + len(burst) + pair_total,
            "tls_readings": pair_total // 2, "plain_readings_per_s_paired": round(pair["plain"]),
            "tls_readings_per_s": round(pair["tls"]), "tls_ratio": round(pair["tls"] / pair["plain"], 3),
            "cpu_s_per_1000": round(cpu_per_1000, 3), "peak_rss_mb": round(rss, 1), "generators": n_gen,
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
