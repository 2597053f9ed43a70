"""The validation pipeline for uplink frames: pure decisions, no I/O.

Order (issue 5, PROTOCOL.md 4.4, 6.7, 7, 8):
size limit -> topic (this gateway's community) -> known, active device ->
decode and COSE verify over the exact bytes and the topic, then schema
(peergrid.ingest.wire, cbor2 with the reference's limits) -> replay and ordering
per device and message kind (an exact copy of an accepted frame is a
duplicate, dropped quietly) -> clock -> plausibility.

Clock policy: a synced message more than `max_future_s` ahead of the
gateway's clock is refused (E_CLOCK); a live synced message whose time is off
by more than `max_skew_s` is kept with the gateway's receive time and counted
as a clock warning (E_CLOCK in the warnings, not a rejection); unsynced
messages are kept with the receive time. Buffered readings are judged only by
the replay window.

Plausibility: the channel count, each channel's power against its CT rating,
and the energy registers against physics (peergrid.ingest.energycheck: a register
may grow no faster than its CT can carry energy, in time the gateway can
vouch for, checked against the readings on both sides in the board's order
and across reboots; rebuilt from the store after a restart).
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from peergrid.ingest.energycheck import DEFAULT_MAX_LATE_S, EnergyError, EnergyState
from peergrid.community.registry import Device, valid_rating
from peergrid.ingest.wire import UplinkVerifier
from protocol import cose, messages, topics
from protocol.errnames import NAMES
from protocol.errors import (E_CLOCK, E_PLAUSIBILITY, E_REPLAY, E_TAG, E_TOO_BIG, E_TOPIC, E_UNKNOWN_DEVICE,
                             ProtocolError)
from protocol.replay import ReplayWindow

DeviceLookup = Callable[[str, str], "Device | None"]
# most power a channel can plausibly carry per ampere of CT rating: 253 V
# (230 V + 10 %) with 20 % head-room for a CT driven past its rating
_W_PER_A = 253 * 1.2


@dataclass
class Accepted:
    community: str
    device: str
    kind: str
    msg: dict[str, Any]
    frame: bytes
    t_recv: float
    t_eff: float                     # time the message is filed under
    warnings: list[int] = field(default_factory=list)
    digest: bytes = b""              # SHA-256 of the frame


@dataclass
class Duplicate:
    community: str
    device: str
    kind: str


class Rejected(Exception):
    def __init__(self, code: int, reason: str, device: str | None = None, flag: str | None = None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.device = device
        self.flag = flag            # "energy": the device is flagged for the operator

    @property
    def name(self) -> str:
        return NAMES.get(self.code, f"e{self.code}")


class Throttled(Exception):
    """Too many forged tags for this device within the current second: the
    frame was dropped without being verified (PROTOCOL.md 4.3)."""

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.device = device


class _DeviceState:
    __slots__ = ("windows", "digests", "energy")

    def __init__(self) -> None:
        self.windows: dict[str, ReplayWindow] = {}
        # accepted recently: (kind, boot << 32 | seq) -> first 8 bytes of the
        # frame's SHA-256 as an int (enough to tell an exact redelivery from
        # another frame; small, as there are many devices)
        self.digests: dict[tuple[str, int], int] = {}
        self.energy: EnergyState | None = None


class Validator:
    def __init__(self, community: str, devices: DeviceLookup, max_skew_s: float = 300,
                 max_future_s: float = 3600, history: Callable[[str, str, str], list[tuple[int, int, bytes]]]
                 | None = None, digests_kept: int = 4096, tag_failures_per_s: int = 20,
                 readings: Callable[[str, str], list[tuple[Any, ...]]] | None = None,
                 max_late_s: float = DEFAULT_MAX_LATE_S) -> None:
        """history(community, device, kind) -> [(boot, seq, sha256 of frame)]
        of accepted frames, to rebuild a device's replay state after a
        restart (newest boots first is fine; order does not matter).
        readings(community, device) -> [(boot, seq, t, t_board, t_recv,
        flags, vrms_dv, ch)] of stored readings (each boot's first and its
        newest ones are enough), to rebuild its energy state likewise.
        max_late_s: the longest a reading may wait in a board's flash
        (peergrid.ingest.energycheck).

        tag_failures_per_s (0: no limit): once a device had that many E_TAG
        failures within one second of `now`, its further frames in that
        second are dropped before verification (Throttled). The drop window
        ends with the second, so a flood forged under an honest board's id
        costs that board at most the rest of each second in which the flood
        passed the limit, and nothing once it stops; every dropped frame is
        counted by the caller."""
        self.community = community
        self.devices = devices
        self.max_skew_s = max_skew_s
        self.max_future_s = max_future_s
        self.history = history
        self.digests_kept = digests_kept
        self.readings = readings
        self.max_late_s = max_late_s
        self._state: dict[str, _DeviceState] = {}
        self._dev_cache: dict[str, Device | None] = {}
        self.verifier = UplinkVerifier(self._secret)
        self.tag_failures_per_s = tag_failures_per_s
        self._tag_fails: dict[str, list[int]] = {}     # device -> [second, E_TAG failures in it]
        # check() runs on the MQTT thread; refresh(), forget() and preload()
        # come from the registry watcher and the installer API
        self._lock = threading.Lock()

    def preload(self, devices: list[Device]) -> None:
        """Know every device at once (one query at start instead of one per
        device on its first message)."""
        with self._lock:
            for d in devices:
                self._dev_cache[d.id] = d

    def _device(self, device: str) -> Device | None:
        if device not in self._dev_cache:
            self._dev_cache[device] = self.devices(self.community, device)
        return self._dev_cache[device]

    def forget(self, device: str) -> None:
        """After a rotation or revocation: reload the device, fresh replay state."""
        with self._lock:
            self._forget(device)

    def _forget(self, device: str) -> None:
        self._dev_cache.pop(device, None)
        self._state.pop(device, None)
        self.verifier.forget(self.community, device)

    def refresh(self, devices: list[Device], complete: bool = False) -> list[str]:
        """Devices as the registry has them now (added, rotated, revoked,
        channels changed). A device whose secret or revocation changed loses
        its cached key and replay state (rebuilt from the store's history on
        its next frame); other changes only replace the cached record.
        `complete`: `devices` is the whole community, so a known device not
        in it was removed. Returns the ids whose key or revocation changed."""
        changed = []
        with self._lock:
            seen = set()
            for d in devices:
                if d.community != self.community:
                    continue
                seen.add(d.id)
                old = self._dev_cache.get(d.id)
                if old is not None and old.secret == d.secret and old.revoked == d.revoked:
                    self._dev_cache[d.id] = d
                    continue
                self._forget(d.id)
                self._dev_cache[d.id] = d
                changed.append(d.id)
            if complete:
                for dev in [k for k, v in self._dev_cache.items() if v is not None and k not in seen]:
                    self._forget(dev)
                    changed.append(dev)
        return changed

    def _secret(self, community: str, device: str) -> bytes | None:
        d = self._device(device)
        return None if d is None or d.revoked else d.secret

    def _st(self, device: str, kind: str) -> tuple[_DeviceState, ReplayWindow]:
        st = self._state.get(device)
        if st is None:
            st = _DeviceState()
            self._state[device] = st
        w = st.windows.get(kind)
        if w is None:
            w = ReplayWindow()
            st.windows[kind] = w
            if self.history is not None:
                for boot, seq, digest in sorted(self.history(self.community, device, kind)):
                    try:
                        w.accept(boot, seq)
                    except ProtocolError:
                        continue
                    st.digests[(kind, boot << 32 | seq)] = int.from_bytes(digest[:8], "big")
        return st, w

    def check(self, topic: str, frame: bytes, now: float) -> Accepted | Duplicate:
        """Accept (and record in the replay window), drop a duplicate, or
        raise Rejected."""
        with self._lock:
            return self._check(topic, frame, now)

    def _check(self, topic: str, frame: bytes, now: float) -> Accepted | Duplicate:
        if len(frame) > cose.MAX_FRAME:
            raise Rejected(E_TOO_BIG, f"frame of {len(frame)} bytes", _device_of(topic))
        try:
            community, device, kind = topics.parse(topic)
        except ProtocolError as e:
            raise Rejected(e.code, e.detail or "bad topic") from None
        if community != self.community or kind not in topics.UPLINK:
            raise Rejected(E_TOPIC, "not an uplink topic of this community", device)
        dev = self._device(device)
        if dev is None or dev.revoked:
            raise Rejected(E_UNKNOWN_DEVICE, "unknown or revoked device", device)
        # (known devices only: the table is as big as the registry at most)
        fails = self._tag_fails.get(device)
        second = int(now)
        if fails is not None and fails[0] == second and fails[1] >= self.tag_failures_per_s > 0:
            raise Throttled(device)
        try:
            up = self.verifier.open(topic, frame)
        except ProtocolError as e:
            if e.code == E_TAG:
                if fails is None or fails[0] != second:
                    self._tag_fails[device] = [second, 1]
                else:
                    fails[1] += 1
            raise Rejected(e.code, e.detail or e.name(), device) from None
        msg = up.fields
        boot, seq = msg["boot"], msg["seq"]
        st, window = self._st(device, kind)
        digest = hashlib.sha256(frame).digest()
        try:
            window.check(boot, seq)
        except ProtocolError as e:
            if st.digests.get((kind, boot << 32 | seq)) == int.from_bytes(digest[:8], "big"):
                return Duplicate(community, device, kind)
            raise Rejected(E_REPLAY, e.detail, device) from None
        warnings: list[int] = []
        t_eff = now
        flags = msg.get("flags", 0)
        if not flags & messages.F_CLOCK_UNSYNCED:
            skew = msg["t"] - now
            if skew > self.max_future_s:
                raise Rejected(E_CLOCK, f"time {int(skew)} s ahead of the gateway", device)
            if flags & messages.F_BUFFERED and skew <= self.max_skew_s:
                t_eff = float(msg["t"])
            elif abs(skew) <= self.max_skew_s:
                t_eff = float(msg["t"])
            else:
                warnings.append(E_CLOCK)
        if kind == topics.READING:
            # the board's clock is trusted where the reading is filed under it
            self._plausible(dev, st, msg, now, not flags & messages.F_CLOCK_UNSYNCED and not warnings)
        window.accept(boot, seq)
        st.digests[(kind, boot << 32 | seq)] = int.from_bytes(digest[:8], "big")
        if len(st.digests) > self.digests_kept + 256:
            # forget the oldest in one go (dicts keep insertion order)
            for k in list(st.digests)[:256]:
                del st.digests[k]
        return Accepted(community, device, kind, msg, frame, now, t_eff, warnings, digest)

    def _plausible(self, dev: Device, st: _DeviceState, msg: dict[str, Any], now: float, trusted: bool) -> None:
        ch = msg["ch"]
        if len(ch) != len(dev.channels):
            raise Rejected(E_PLAUSIBILITY, f"{len(ch)} channels, the registry has {len(dev.channels)}", dev.id)
        for i, (w, imp, exp, ma) in enumerate(ch):
            rating = dev.channels[i].get("rating_a", 100)
            if not valid_rating(rating):
                # a registry written before ratings were checked: fail closed
                raise Rejected(E_PLAUSIBILITY, f"channel {i}: the registry's CT rating {rating!r} is not a number "
                                               "of amperes; fix the device's channels", dev.id)
            limit = rating * _W_PER_A
            if abs(w) > limit:
                raise Rejected(E_PLAUSIBILITY, f"channel {i}: {w} W beyond a {dev.channels[i].get('rating_a')} A CT",
                               dev.id)
        es = st.energy
        if es is None or es.src is not dev.channels:
            ratings = tuple(c.get("rating_a", 100) for c in dev.channels)
            if es is None or es.ratings != ratings:
                es = st.energy = self._energy_state(dev.id, ratings)
            es.src = dev.channels
        try:
            es.check(msg["boot"], msg["seq"], [v for c in ch for v in (c[1], c[2])], now, msg["t"],
                     bool(msg["flags"] & messages.F_CLOCK_UNSYNCED), trusted, msg.get("vrms_dv"))
        except EnergyError as e:
            raise Rejected(E_PLAUSIBILITY, e.reason, dev.id, "energy") from None

    def _energy_state(self, device: str, ratings: tuple[Any, ...]) -> EnergyState:
        """A device's energy state, rebuilt from its stored readings."""
        es = EnergyState(ratings, self.max_late_s, self.max_skew_s)
        if self.readings is not None:
            rows = []
            for boot, seq, t, t_board, t_recv, flags, vrms, ch in self.readings(self.community, device):
                regs = [v for c in ch for v in (c[1], c[2])]
                if len(regs) != 2 * len(ratings):
                    continue                    # channels changed since: not comparable
                uns = bool(flags & messages.F_CLOCK_UNSYNCED)
                rows.append((boot, seq, regs, t_recv, t_board, uns, not uns and t == t_board, vrms))
            es.load(rows)
        return es


# reading flags that say a measurement is not to be trusted as it stands;
# each accepted reading carrying one is counted per device (metrics warnings)
FAULT_FLAGS = ((messages.F_CLIPPED, "clipped"), (messages.F_VREF_FAULT, "vref_fault"),
               (messages.F_CT_FAULT, "ct_fault"), (messages.F_FREQ_RANGE, "freq_range"),
               (messages.F_UNCALIBRATED, "uncalibrated"))


def fault_warnings(msg: dict[str, Any]) -> list[str]:
    """The measurement faults a reading reports (empty for other kinds)."""
    flags = msg.get("flags", 0) if "ch" in msg else 0
    return [name for bit, name in FAULT_FLAGS if flags & bit]


def _device_of(topic: str | bytes) -> str | None:
    try:
        return topics.parse(topic)[1]
    except ProtocolError:
        return None
