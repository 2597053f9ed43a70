"""A simulated house board in CPython for neighbourhood simulations (make
demo): the same wire as the firmware (protocol/ seals its readings and acks
and opens its commands), its own broker account, energy registers that
integrate the house's power, relays whose loads add to it and a battery that
follows its setpoint. Not a stand-in for the firmware in tests: those run
the real firmware on MicroPython (peergrid.sim.vboard); this is for the many
houses of a demo that a laptop cannot run as MicroPython processes."""
from __future__ import annotations

import threading
import time
from typing import Any, Callable

import paho.mqtt.client as mqtt

from protocol import messages
from protocol.link import DeviceLink


class SimHouse:
    def __init__(self, community: str, device: str, secret: bytes, user: str, password: str, host: str,
                 port: int, clock: Callable[[], float], relay_w: list[int] | None = None,
                 battery: dict[str, Any] | None = None, channels: int = 2) -> None:
        self.link = DeviceLink(community, device, secret)
        self.device = device
        self.clock = clock
        self.boot = 1
        self.seq = 0
        self.nch = channels
        self.imp = [0.0] * channels
        self.exp = [0.0] * channels
        self.relay_w = relay_w or []
        self.relays = [0] * len(self.relay_w)
        self.bat = dict(battery) if battery else None          # capacity_wh, max_w, soc_wh
        self.bat_w = 0
        self.ctr = 0
        self.last_t: float | None = None
        self.lock = threading.Lock()
        self.stats = {"readings": 0, "cmds": 0, "refused": 0}
        self.online = False
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sim-{community}-{device}")
        c.username_pw_set(user, password)
        c.on_connect = self._on_connect
        c.on_message = self._on_cmd
        c.connect_async(host, port, 30)
        self.c = c

    def start(self) -> None:
        self.c.loop_start()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        client.subscribe(self.link.t_cmd, 1)
        self.online = True

    def _on_cmd(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            cmd = self.link.open_command(msg.topic, bytes(msg.payload))
        except Exception:  # noqa: BLE001 - not authentic: no answer, as the firmware does
            return
        with self.lock:
            result = 0
            if cmd["ctr"] <= self.ctr:
                result = 43                                      # E_REPLAY
            elif cmd["op"] == messages.OP_RELAY:
                if cmd["target"] >= len(self.relays):
                    result = 46                                  # E_TARGET
                else:
                    self.relays[cmd["target"]] = 1 if cmd["value"] else 0
            elif cmd["op"] == messages.OP_BATTERY:
                if self.bat is None:
                    result = 46
                else:
                    self.bat_w = max(-self.bat["max_w"], min(self.bat["max_w"], int(cmd["value"])))
            if result == 0:
                self.ctr = cmd["ctr"]
                self.stats["cmds"] += 1
            else:
                self.stats["refused"] += 1
            self.seq += 1
            ack = {"boot": self.boot, "seq": self.seq, "t": int(self.clock()), "ctr": cmd["ctr"], "result": result,
                   "value": int(cmd["value"]), "lease": cmd["lease"]}
            frame = bytes(self.link.ack(ack))
        client.publish(self.link.t_ack, frame, qos=1)

    def flex_w(self) -> float:
        """Our loads' and battery's power now (what the controller moves)."""
        w = sum(r * p for r, p in zip(self.relays, self.relay_w))
        if self.bat is not None:
            b = self.bat
            if self.bat_w > 0 and b["soc_wh"] >= b["capacity_wh"] * 0.95:
                self.bat_w = 0
            if self.bat_w < 0 and b["soc_wh"] <= b["capacity_wh"] * 0.1:
                self.bat_w = 0
            w += self.bat_w
        return w

    def tick(self, t: float, load_w: float, pv_w: float) -> float:
        """Integrate the house over the time since the last tick; returns
        the grid power (import +)."""
        with self.lock:
            grid = load_w - pv_w + self.flex_w()
            if self.last_t is not None:
                dt_h = max(0.0, t - self.last_t) / 3600
                if grid >= 0:
                    self.imp[0] += grid * dt_h
                else:
                    self.exp[0] += -grid * dt_h
                if self.nch > 1:
                    self.exp[1] += pv_w * dt_h
                if self.bat is not None:
                    e = self.bat_w * dt_h
                    self.bat["soc_wh"] += e * 0.92 if e > 0 else e
            self.last_t = t
            self.grid_w = grid
            self.pv_w = pv_w
            return grid

    def publish(self, t: float) -> None:
        with self.lock:
            self.seq += 1
            ch = [int(round(self.grid_w)), int(self.imp[0]), int(self.exp[0]), int(abs(self.grid_w) * 1000 / 230)]
            if self.nch > 1:
                ch += [-int(round(self.pv_w)), int(self.imp[1]), int(self.exp[1]), int(self.pv_w * 1000 / 230)]
            bat = None
            if self.bat is not None:
                b = self.bat
                bat = [1, int(self.bat_w), max(0, min(1000, int(b["soc_wh"] / b["capacity_wh"] * 1000)))]
            frame = bytes(self.link.reading(self.boot, self.seq, int(t), 0, 2300, 5000, ch, self.nch, None, bat))
            self.stats["readings"] += 1
        self.c.publish(self.link.t_reading, frame, qos=1)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


class SimClock:
    """Unix time of the simulation: t0 at wall time w0, `speed` times faster."""

    def __init__(self, t0: float, speed: float) -> None:
        self.t0 = t0
        self.speed = speed
        self.w0 = time.time()

    def __call__(self) -> float:
        return self.t0 + (time.time() - self.w0) * self.speed

    def wall_until(self, t: float) -> float:
        return max(0.0, (t - self()) / self.speed)
