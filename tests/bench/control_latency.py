"""Reading-to-relay latency through a real mosquitto (bench_control's second
phase): the gateway service with its control loop in this process, simulated
boards as paho clients that seal readings and acks with protocol/ and open
the commands sent to them. A round: one board publishes a reading that shows
a surplus; the time until the board with the load holds the verified relay
command is the latency. Then the surplus goes and the load goes off again
before the next round."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from harness import free_port
from peergrid.community import registry as reg
from protocol import messages, topics
from protocol.link import DeviceLink

C = "lat"
CH = [{"role": "grid", "rating_a": 100}]


class SimBoard:
    def __init__(self, device: str, secret: bytes, user: str, password: str, port: int) -> None:
        self.link = DeviceLink(C, device, secret)
        self.seq = 0
        self.ctr_seen = 0
        self.cmds: list[tuple[float, dict[str, Any]]] = []
        self.relay = 0
        self.load_w = 0                    # what the load behind relay 0 draws when on
        self.got = threading.Condition()
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"b-{device}")
        c.username_pw_set(user, password)
        ready = threading.Event()
        c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe(self.link.t_cmd, 1)
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_cmd
        c.connect("127.0.0.1", port, 30)
        c.loop_start()
        if not ready.wait(10):
            raise RuntimeError(f"{device}: no subscription")
        self.c = c

    def _on_cmd(self, client: Any, userdata: Any, msg: Any) -> None:
        t = time.perf_counter()
        cmd = self.link.open_command(msg.topic, bytes(msg.payload))
        ok = cmd["ctr"] > self.ctr_seen
        self.ctr_seen = max(self.ctr_seen, cmd["ctr"])
        if ok and cmd["op"] == messages.OP_RELAY:
            self.relay = cmd["value"]
        with self.got:
            self.cmds.append((t, cmd))
            self.got.notify_all()
        self.seq += 1
        ack = {"boot": 1, "seq": self.seq, "t": int(time.time()), "ctr": cmd["ctr"],
               "result": 0 if ok else 43, "value": cmd["value"], "lease": cmd["lease"]}
        client.publish(self.link.t_ack, bytes(self.link.ack(ack)), qos=1)

    def reading(self, w: int) -> float:
        """Publish a reading: w of its own plus its load when the relay is on."""
        w += self.load_w if self.relay else 0
        self.seq += 1
        f = bytes(self.link.reading(1, self.seq, int(time.time()), 0, 2300, 5000, [w, 0, 0, abs(w) * 4], 1))
        t = time.perf_counter()
        self.c.publish(self.link.t_reading, f, qos=1)
        return t

    def wait_cmd(self, pred: Any, after: float, timeout: float = 10) -> float:
        deadline = time.monotonic() + timeout
        with self.got:
            while True:
                for t, cmd in self.cmds:
                    if t >= after and pred(cmd):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no command")
                self.got.wait(left)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def measure(boards: int = 20, rounds: int = 100) -> dict[str, Any]:
    from peergrid.control.controller import Feeder, Load
    from peergrid.config import Config
    from peergrid.ingest.service import Gateway

    tmp = Path(tempfile.mkdtemp(prefix="pg-lat-"))
    port = free_port()
    r = reg.Registry(reg.connect(tmp / "gw.db"))
    r.add_community(C)
    creds = {}
    for k in range(boards):
        d = f"b{k}"
        creds[d] = r.add_device(C, d, "sim", CH, r.add_member(C, d))
    # one load, on the first board; the surplus turns up at a different board each round
    r.add_load(C, Load("heater", "b0", 0, 2000, min_on_s=0, min_off_s=0, max_switches_day=10**6))
    r.set_feeder(C, 10**7, 10**7)
    r.broker_files(tmp / "passwd", tmp / "acl", "gateway", reg.mosquitto_hash("gw-pass"))
    (tmp / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {tmp / 'passwd'}\n"
        f"acl_file {tmp / 'acl'}\npersistence false\nmax_queued_messages 1000000\nlog_dest none\n"
        + ("user root\n" if os.geteuid() == 0 else ""))
    broker = subprocess.Popen(["mosquitto", "-c", str(tmp / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    cfgp = tmp / "gw.toml"
    cfgp.write_text(f'[gateway]\ncommunity = "{C}"\ndb = "gw.db"\nhttp_port = -1\n'
                    f'[broker]\nport = {port}\nuser = "gateway"\npassword = "gw-pass"\n'
                    '[control]\nperiod_s = 1\nlease_s = 60\noff_delay_s = 0\nstale_s = 3600\n')
    time.sleep(0.3)
    gw = Gateway(Config.load(cfgp))
    sims: list[SimBoard] = []
    lat: list[float] = []
    try:
        gw.start()
        if not gw.connected.wait(10):
            raise RuntimeError("gateway did not connect")
        sims = [SimBoard(d, creds[d][0], reg.broker_user(C, d), creds[d][1], port) for d in sorted(creds)]
        for s in sims:                         # everyone balanced: all loads off
            s.reading(0)
        time.sleep(1.5)
        relay = sims[0]
        rng = random.Random(5)
        relay.load_w = 2000
        for k in range(rounds):
            s = sims[k % boards]
            t_pub = s.reading(-3000)
            t_cmd = relay.wait_cmd(lambda c: c["op"] == messages.OP_RELAY and c["value"] == 1, t_pub)
            lat.append((t_cmd - t_pub) * 1000)
            t_off = s.reading(0)               # the surplus is gone: the load goes off
            relay.wait_cmd(lambda c: c["op"] == messages.OP_RELAY and c["value"] == 0, t_off)
            time.sleep(rng.uniform(0.05, 0.5))       # readings come at any phase of the loop
        cycle = gw.control.p99_ms() if gw.control is not None else None
    finally:
        for s in sims:
            s.close()
        gw.stop()
        if gw.client is not None:
            gw.client.loop_stop()
        broker.terminate()
        broker.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
    lat.sort()
    return {"n": len(lat), "p50_ms": round(lat[len(lat) // 2], 1),
            "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1), "max_ms": round(lat[-1], 1),
            "loop_cycle_p99_ms": None if cycle is None else round(cycle, 3)}
