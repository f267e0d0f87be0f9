"""Prometheus text exposition for the daemon, without a client library.

The daemon's own metrics are few (RPC latency by method and code, remounts
and takeovers per volume, volume counts), so a small registry is simpler than a dependency.
The per-volume filesystem metrics come from each session's ``metrics()``
text; ``merge`` joins those texts into one valid exposition, in which every
metric family appears exactly once (concatenating them would repeat the
``# HELP``/``# TYPE`` lines, which scrapers reject).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable

#: Latency buckets for daemon RPCs, in seconds (a Mount takes ~1 s: a process start).
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(\s+\S+)?$")
_SUFFIXES = ("_bucket", "_sum", "_count", "_created", "_total", "_info")


def escape(value: str) -> str:
    """A label value escaped for the text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels_text(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Counter:
    """A labelled counter."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]) -> None:
        self.name, self.help, self.label_names = name, help_text, label_names
        self._values: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def set_floor(self, *labels: str, value: float) -> None:
        """Start a series at a persisted value (remounts survive a daemon restart)."""
        with self._lock:
            self._values[labels] = max(self._values.get(labels, 0.0), value)

    def remove(self, *labels: str) -> None:
        with self._lock:
            self._values.pop(labels, None)

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for labels, value in sorted(self._values.items()):
                lines.append(f"{self.name}{labels_text(dict(zip(self.label_names, labels)))} {number(value)}")
        return lines


class Histogram:
    """A labelled histogram with fixed buckets."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...], buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help_text, label_names, buckets
        self._series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., sum, count
        self._lock = threading.Lock()

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            series = self._series.setdefault(labels, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += value
            series[-1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            for labels, series in sorted(self._series.items()):
                base = dict(zip(self.label_names, labels))
                for bound, count in zip(self.buckets, series):
                    lines.append(f"{self.name}_bucket{labels_text({**base, 'le': number(bound)})} {number(count)}")
                lines.append(f"{self.name}_bucket{labels_text({**base, 'le': '+Inf'})} {number(series[-1])}")
                lines.append(f"{self.name}_sum{labels_text(base)} {number(series[-2])}")
                lines.append(f"{self.name}_count{labels_text(base)} {number(series[-1])}")
        return lines


class Gauge:
    """A labelled gauge whose values are set by a collector at scrape time."""

    def __init__(self, name: str, help_text: str, label_names: tuple[str, ...]) -> None:
        self.name, self.help, self.label_names = name, help_text, label_names

    def render(self, values: Iterable[tuple[tuple[str, ...], float]]) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        for labels, value in values:
            lines.append(f"{self.name}{labels_text(dict(zip(self.label_names, labels)))} {number(value)}")
        return lines


class DaemonMetrics:
    """The daemon's own series."""

    def __init__(self) -> None:
        self.rpc_seconds = Histogram(
            "fusefs_daemon_rpc_duration_seconds", "fusefs daemon gRPC latency by method and code.",
            ("method", "code"), RPC_BUCKETS)
        self.remounts = Counter(
            "fusefs_remounts_total", "FUSE sessions restarted by the daemon on a fresh mount (child exit or "
            "daemon restart; containers lose their open files, and without mount propagation the volume).",
            ("volume_id",))
        self.takeovers = Counter(
            "fusefs_takeovers_total", "FUSE sessions restarted by taking over the live connection (kernel "
            "engine; containers see a pause only). Counted since this daemon started.", ("volume_id",))


def _family_of(sample_name: str, declared: dict[str, str]) -> str:
    """The metric family a sample line belongs to (``x_bucket`` -> ``x``)."""
    if sample_name in declared:
        return sample_name
    for suffix in _SUFFIXES:
        base = sample_name.removesuffix(suffix)
        if base != sample_name and base in declared:
            return base
    return sample_name


def _with_label(labels: str | None, key: str, value: str) -> str:
    """Add ``key="value"`` to a sample's label set unless it is already there."""
    inner = (labels or "{}")[1:-1]
    if re.search(rf'(^|,)\s*{re.escape(key)}="', inner):
        return "{" + inner + "}"
    pair = f'{key}="{escape(value)}"'
    return "{" + (pair + ("," + inner if inner else "")) + "}"


def merge(sources: Iterable[tuple[str, str]], extra_label: str = "volume_id") -> str:
    """Merge ``(volume_id, exposition text)`` pairs into one exposition.

    Samples are grouped under one ``# HELP``/``# TYPE`` header per family, and
    each sample gets ``volume_id`` unless the session already labelled it.
    """
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples: dict[str, list[str]] = {}
    for volume_id, text in sources:
        declared: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] == "HELP":
                    helps.setdefault(parts[2], parts[3] if len(parts) > 3 else "")
                elif len(parts) >= 4 and parts[1] == "TYPE":
                    declared[parts[2]] = parts[3]
                    types.setdefault(parts[2], parts[3])
                continue
            match = _SAMPLE_RE.match(line)
            if not match:
                continue
            name, labels, value, ts = match.groups()
            family = _family_of(name, declared)
            samples.setdefault(family, []).append(f"{name}{_with_label(labels, extra_label, volume_id)} {value}{ts or ''}")
    out: list[str] = []
    for family in sorted(samples):
        if family in helps:
            out.append(f"# HELP {family} {helps[family]}")
        if family in types:
            out.append(f"# TYPE {family} {types[family]}")
        out.extend(samples[family])
    return "\n".join(out) + ("\n" if out else "")
