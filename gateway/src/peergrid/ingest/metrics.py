"""Counters and a latency histogram, as Prometheus text and as a dict."""
from __future__ import annotations

import threading
from typing import Any

# receive-to-stored latency buckets, seconds
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _observe(hist: list[int], s: float) -> None:
    for i, b in enumerate(BUCKETS):
        if s <= b:
            hist[i] += 1
            return
    hist[-1] += 1


def _histogram(name: str, hist: list[int], n: int) -> list[str]:
    out = [f"# TYPE {name} histogram"]
    cum = 0
    for b, k in zip(BUCKETS, hist):
        cum += k
        out.append(f'{name}_bucket{{le="{b}"}} {cum}')
    out.append(f'{name}_bucket{{le="+Inf"}} {n}')
    return out


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.rejects: dict[tuple[str, str], int] = {}
        self.warnings: dict[tuple[str, str], int] = {}
        self.hist = [0] * (len(BUCKETS) + 1)
        self.lat_sum = 0.0
        self.lat_n = 0
        self.ctl_hist = [0] * (len(BUCKETS) + 1)
        self.ctl_n = 0
        self.ctl_degraded = 0

    def inc(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def accept(self, kind: str) -> None:
        self.inc("accepted_" + kind)

    def reject(self, reason: str, device: str | None) -> None:
        with self.lock:
            k = (reason, device or "-")
            self.rejects[k] = self.rejects.get(k, 0) + 1

    def warn(self, what: str, device: str) -> None:
        with self.lock:
            k = (what, device)
            self.warnings[k] = self.warnings.get(k, 0) + 1

    def latency(self, s: float) -> None:
        with self.lock:
            _observe(self.hist, s)
            self.lat_sum += s
            self.lat_n += 1

    def control(self, cycle_ms: float, decisions: int, degraded: int) -> None:
        with self.lock:
            _observe(self.ctl_hist, cycle_ms / 1000)
            self.ctl_n += 1
            self.ctl_degraded = degraded
            if decisions:
                self.counts["control_decisions"] = self.counts.get("control_decisions", 0) + decisions

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            by_reason: dict[str, int] = {}
            for (r, _), n in self.rejects.items():
                by_reason[r] = by_reason.get(r, 0) + n
            return {"counts": dict(self.counts), "rejected": by_reason,
                    "latency_mean_ms": round(1000 * self.lat_sum / self.lat_n, 2) if self.lat_n else None}

    def prometheus(self, presence: dict[str, dict[str, Any]] | None = None) -> str:
        out: list[str] = []
        with self.lock:
            out.append("# TYPE peergrid_messages_total counter")
            for k, v in sorted(self.counts.items()):
                out.append(f'peergrid_messages_total{{what="{k}"}} {v}')
            out.append("# TYPE peergrid_rejected_total counter")
            for (r, d), v in sorted(self.rejects.items()):
                out.append(f'peergrid_rejected_total{{reason="{r}",device="{d}"}} {v}')
            out.append("# TYPE peergrid_warnings_total counter")
            for (w, d), v in sorted(self.warnings.items()):
                out.append(f'peergrid_warnings_total{{what="{w}",device="{d}"}} {v}')
            out += _histogram("peergrid_store_latency_seconds", self.hist, sum(self.hist))
            out.append(f"peergrid_store_latency_seconds_sum {self.lat_sum:.6f}")
            out.append(f"peergrid_store_latency_seconds_count {self.lat_n}")
            if self.ctl_n:
                out += _histogram("peergrid_control_cycle_seconds", self.ctl_hist, self.ctl_n)
                out.append(f"peergrid_control_cycle_seconds_count {self.ctl_n}")
                out.append("# TYPE peergrid_control_degraded_devices gauge")
                out.append(f"peergrid_control_degraded_devices {self.ctl_degraded}")
        if presence is not None:
            out.append("# TYPE peergrid_devices gauge")
            out.append(f'peergrid_devices{{state="online"}} {sum(v["online"] for v in presence.values())}')
            out.append(f'peergrid_devices{{state="stale"}} {sum(v["stale"] for v in presence.values())}')
            out.append(f'peergrid_devices{{state="flagged"}} {sum("flagged" in v for v in presence.values())}')
        return "\n".join(out) + "\n"
