"""A small Prometheus exposition of the driver's own metrics.

The dependency set is fixed (no prometheus_client), and what we need is
small: labelled counters, gauges and histograms, rendered in the text format
and served with ``/healthz`` on ``--metrics-address``.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer

from fusefs.metrics_http import start_metrics_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

_REGISTRY: list["_Metric"] = []


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = threading.Lock()
        _REGISTRY.append(self)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in items]


class Gauge(_Metric):
    """A gauge whose value is read from a callback at scrape time."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float] | None = None) -> None:
        super().__init__(name, help_text)
        self._read = read
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = value

    def bind(self, read: Callable[[], float]) -> None:
        self._read = read

    def render(self) -> list[str]:
        value = self._value
        if self._read is not None:
            try:
                value = float(self._read())
            except Exception:  # noqa: BLE001 - a scrape never fails on one gauge
                return self.header()
        return self.header() + [f"{self.name} {value:g}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = (),
                 buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = buckets
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, value: float, *labels: str) -> None:
        index = bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.get(labels)
            if series is None:
                series = self._series[labels] = [0.0] * (len(self.buckets) + 2)  # buckets, +Inf, sum
            series[index] += 1
            series[-1] += value

    def count(self, *labels: str) -> int:
        with self._lock:
            series = self._series.get(labels)
            return int(sum(series[:-1])) if series else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            cumulative = 0.0
            for bound, n in zip((*self.buckets, float("inf")), series[:-1]):
                cumulative += n
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                le_label = 'le="' + le + '"'
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le_label)} {cumulative:g}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {series[-1]:g}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {cumulative:g}")
        return lines


def render() -> str:
    return "\n".join(line for metric in _REGISTRY for line in metric.render()) + "\n"


RPC_SECONDS = Histogram("fusepath_rpc_duration_seconds", "CSI RPC latency by method and gRPC code", ("method", "code"))
FREEZE_SECONDS = Histogram("fusepath_freeze_window_seconds", "how long writes were frozen for a snapshot cut")
SNAPSHOT_BYTES = Counter("fusepath_snapshot_bytes_total", "bytes archived or restored", ("direction",))
SNAPSHOT_PROGRESS = Gauge("fusepath_snapshot_in_progress_bytes", "bytes done by the running snapshot or restore")
CLEANUP_FAILURES = Counter("fusepath_cleanup_failures_total",
                           "trees in tmp/ or trash/ that could not be removed yet (retried in the background)")
LOST_FOUND = Counter("fusepath_lost_found_total", "stray volume directories moved to lost+found at start-up")
COMMITTED_BYTES = Gauge("fusepath_committed_bytes", "capacity promised to volumes")
VOLUMES_ABNORMAL = Counter("fusepath_volume_abnormal_total", "abnormal volume conditions reported", ("volume_id",))
#: Probe's answer at scrape time, so an alert can say "not ready" without kube-state-metrics.
READY = Gauge("fusepath_ready", "1 when the driver is ready (what Probe and /healthz answer), else 0")


def serve(address: str, healthy: Callable[[], bool]) -> ThreadingHTTPServer | None:
    """Serve ``/metrics`` and ``/healthz`` (503 until Probe is ready) on ``host:port``."""
    if not address:
        return None
    READY.bind(lambda: 1.0 if healthy() else 0.0)
    return start_metrics_server(address, render, healthy)
