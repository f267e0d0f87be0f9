"""Per-operation counters and latency histograms for one volume's FUSE session.

Every FUSE request passes through here, so recording must cost next to
nothing and must never make two worker threads wait for each other. Each
worker thread therefore writes into its own *shard* (plain Python lists,
reached through ``threading.local``); nothing on the hot path takes a lock.
Readers (the control socket, a metrics scrape) add the shards up. A shard is
only ever written by its own thread, so the sums are exact; a reader may see
one request's count before its latency sum, which is harmless for metrics.
"""

from __future__ import annotations

import bisect
import threading
from _thread import get_ident
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: Histogram upper bounds in seconds, Prometheus style. FUSE round trips start
#: around 20 µs, so the low end is finer than Prometheus' defaults.
BUCKETS: tuple[float, ...] = (
    0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
BOUNDS_NS: tuple[int, ...] = tuple(int(b * 1e9) for b in BUCKETS)
_BOUNDS_NS = BOUNDS_NS

#: The FUSE operations a session counts, in a fixed order (index = slot).
OPERATIONS: tuple[str, ...] = (
    "getattr", "readlink", "mknod", "mkdir", "unlink", "rmdir", "symlink", "rename", "link",
    "chmod", "chown", "truncate", "open", "read", "write", "statfs", "flush", "release", "fsync",
    "setxattr", "getxattr", "listxattr", "removexattr", "opendir", "readdir", "releasedir",
    "fsyncdir", "init", "destroy", "access", "create", "utimens", "fallocate", "lseek", "write_buf",
)
_INDEX: dict[str, int] = {name: i for i, name in enumerate(OPERATIONS)}


class _Shard:
    """One thread's private counters. Only its owner thread writes to it."""

    __slots__ = ("counts", "errors", "sum_ns", "buckets", "bytes_read", "bytes_written")

    def __init__(self, n_ops: int) -> None:
        self.counts = [0] * n_ops
        self.errors = [0] * n_ops
        self.sum_ns = [0] * n_ops
        # One row per operation; the last column is +Inf.
        self.buckets = [[0] * (len(_BOUNDS_NS) + 1) for _ in range(n_ops)]
        self.bytes_read = 0
        self.bytes_written = 0


class OpStats:
    """Lock-free (per-thread sharded) operation statistics for one volume."""

    def __init__(self, operations: Sequence[str] = OPERATIONS) -> None:
        self.operations = tuple(operations)
        self._index = {name: i for i, name in enumerate(self.operations)}
        self._by_thread: dict[int, _Shard] = {}
        self._shards: list[_Shard] = []
        self._register_lock = threading.Lock()

    def index(self, op: str) -> int:
        """The slot of ``op``; callers look it up once, not per request."""
        return self._index[op]

    def shard(self) -> _Shard:
        """The calling thread's shard, created on its first request.

        Keyed by the OS thread id, not ``threading.local``: libfuse's worker
        threads are not Python threads, and a thread-local can be lost
        between two callbacks on them.
        """
        shard = self._by_thread.get(get_ident())
        if shard is None:
            shard = _Shard(len(self.operations))
            with self._register_lock:  # only once per thread
                self._shards.append(shard)
                self._by_thread[get_ident()] = shard
        return shard

    def threads(self) -> int:
        """How many threads have served requests (one shard each)."""
        return len(self._shards)

    def record(self, op_index: int, elapsed_ns: int, failed: bool = False) -> None:
        """Count one request of ``op_index`` that took ``elapsed_ns``."""
        shard = self.shard()
        shard.counts[op_index] += 1
        shard.sum_ns[op_index] += elapsed_ns
        shard.buckets[op_index][bisect.bisect_left(_BOUNDS_NS, elapsed_ns)] += 1
        if failed:
            shard.errors[op_index] += 1

    def add_read(self, nbytes: int) -> None:
        self.shard().bytes_read += nbytes

    def add_written(self, nbytes: int) -> None:
        self.shard().bytes_written += nbytes

    # ------------------------------------------------------------------ export

    def snapshot(self) -> dict[str, Any]:
        """Everything summed over the shards, as plain JSON-able data.

        ``ops`` maps an operation to ``{count, errors, sum_seconds, buckets}``
        where ``buckets`` are *cumulative* counts per upper bound (the last one
        is ``+Inf`` and equals ``count``), as Prometheus wants them. Operations
        that never ran are left out.
        """
        with self._register_lock:
            shards = list(self._shards)
        n_ops, n_buckets = len(self.operations), len(_BOUNDS_NS) + 1
        counts, errors, sums = [0] * n_ops, [0] * n_ops, [0] * n_ops
        buckets = [[0] * n_buckets for _ in range(n_ops)]
        read = written = 0
        for shard in shards:
            read += shard.bytes_read
            written += shard.bytes_written
            for i in range(n_ops):
                if shard.counts[i]:
                    counts[i] += shard.counts[i]
                    errors[i] += shard.errors[i]
                    sums[i] += shard.sum_ns[i]
                    row = shard.buckets[i]
                    total = buckets[i]
                    for b in range(n_buckets):
                        total[b] += row[b]
        ops: dict[str, Any] = {}
        for i, name in enumerate(self.operations):
            if not counts[i]:
                continue
            cumulative, running = [], 0
            for b in range(n_buckets):
                running += buckets[i][b]
                cumulative.append(running)
            ops[name] = {
                "count": counts[i],
                "errors": errors[i],
                "sum_seconds": sums[i] / 1e9,
                "buckets": cumulative,
            }
        return {
            "bucket_bounds": list(BUCKETS),
            "ops": ops,
            "bytes_read": read,
            "bytes_written": written,
        }


# ---------------------------------------------------------------- Prometheus


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _le(bound: float) -> str:
    return repr(bound) if not float(bound).is_integer() else f"{bound:.1f}"


#: Gauges taken from a session's ``stats`` answer: (metric, help, stats key).
_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("fusefs_capacity_bytes", "Quota capacity of the volume (0: no quota).", "capacity"),
    ("fusefs_used_bytes", "Bytes charged to the volume's quota (apparent file sizes).", "used_bytes"),
    ("fusefs_used_inodes", "Inodes in use on the volume.", "used_inodes"),
    ("fusefs_total_inodes", "Inode limit of the volume.", "total_inodes"),
    ("fusefs_frozen", "1 while the volume is frozen for a snapshot.", "frozen"),
    ("fusefs_read_only", "1 when the session refuses every write with EROFS.", "read_only"),
    ("fusefs_open_files", "Files and directories the volume's users hold open.", "open_files"),
    ("fusefs_open_files_max", "The volume's cap on open files and directories.", "open_files_max"),
)
#: Counters taken from a session's ``stats`` answer: (metric, help, stats key).
_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("fusefs_open_files_refused_total", "Opens refused with EMFILE at the volume's cap.", "open_files_refused"),
    ("fusefs_cache_invalidations_total", "Kernel cache invalidations sent for hard-linked files.",
     "invalidations"),
)


def render_prometheus(volumes: Mapping[str, Mapping[str, Any]]) -> str:
    """Prometheus text for one or many volumes' ``stats`` answers.

    ``volumes`` maps a volume ID to what :meth:`fusefs.session.Session.stats`
    returns. Each metric family gets one HELP/TYPE header however many volumes
    there are, so a daemon can render all of its sessions at once.
    """
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    items = sorted(volumes.items())
    for metric, help_text, key in _GAUGES:
        family(metric, "gauge", help_text)
        for vid, st in items:
            out.append(f'{metric}{{volume_id="{_escape(vid)}"}} {_num(st.get(key, 0) or 0)}')
    family("fusefs_frozen_since_timestamp_seconds", "gauge",
           "Unix time the volume's current freeze began (0: not frozen); time() minus it is how long it is held.")
    for vid, st in items:
        out.append(f'fusefs_frozen_since_timestamp_seconds{{volume_id="{_escape(vid)}"}} '
                   f'{_num((st.get("freeze") or {}).get("frozen_since", 0) or 0)}')
    for metric, help_text, key in _COUNTERS:
        family(metric, "counter", help_text)
        for vid, st in items:
            out.append(f'{metric}{{volume_id="{_escape(vid)}"}} {_num(st.get(key, 0) or 0)}')
    family("fusefs_abnormal", "gauge", "1 when the volume's usage could not be measured (no growth allowed).")
    for vid, st in items:
        out.append(f'fusefs_abnormal{{volume_id="{_escape(vid)}"}} {1 if st.get("abnormal") else 0}')
    family("fusefs_limit_bytes_per_second", "gauge", "I/O byte rate limit (0: unlimited).")
    for vid, st in items:
        out.append(f'fusefs_limit_bytes_per_second{{volume_id="{_escape(vid)}"}} '
                   f'{_num((st.get("limits") or {}).get("bytes_per_second", 0))}')
    family("fusefs_limit_ops_per_second", "gauge", "I/O operation rate limit (0: unlimited).")
    for vid, st in items:
        out.append(f'fusefs_limit_ops_per_second{{volume_id="{_escape(vid)}"}} '
                   f'{_num((st.get("limits") or {}).get("ops_per_second", 0))}')
    family("fusefs_read_bytes_total", "counter", "Bytes read through the FUSE session.")
    for vid, st in items:
        out.append(f'fusefs_read_bytes_total{{volume_id="{_escape(vid)}"}} {_num(st.get("bytes_read", 0))}')
    family("fusefs_written_bytes_total", "counter", "Bytes written through the FUSE session.")
    for vid, st in items:
        out.append(f'fusefs_written_bytes_total{{volume_id="{_escape(vid)}"}} {_num(st.get("bytes_written", 0))}')
    family("fusefs_negotiated_flag", "gauge",
           "1 for each FUSE INIT flag the kernel granted (kernel engine), e.g. has_resend, passthrough.")
    for vid, st in items:
        for flag in sorted((st.get("negotiated") or {}).get("flags") or ()):
            out.append(f'fusefs_negotiated_flag{{volume_id="{_escape(vid)}",flag="{_escape(str(flag))}"}} 1')
    _render_ops(items, family, out)
    return "\n".join(out) + "\n"


def _render_ops(items: Iterable[tuple[str, Mapping[str, Any]]], family: Any, out: list[str]) -> None:
    items = list(items)
    family("fusefs_operations_total", "counter", "FUSE requests served, by operation.")
    for vid, st in items:
        for op, o in sorted((st.get("ops") or {}).items()):
            out.append(f'fusefs_operations_total{{volume_id="{_escape(vid)}",op="{op}"}} {o["count"]}')
    family("fusefs_operation_errors_total", "counter", "FUSE requests answered with an error, by operation.")
    for vid, st in items:
        for op, o in sorted((st.get("ops") or {}).items()):
            out.append(f'fusefs_operation_errors_total{{volume_id="{_escape(vid)}",op="{op}"}} {o["errors"]}')
    family("fusefs_operation_duration_seconds", "histogram", "Time to serve a FUSE request, by operation.")
    for vid, st in items:
        bounds = st.get("bucket_bounds") or list(BUCKETS)
        for op, o in sorted((st.get("ops") or {}).items()):
            labels = f'volume_id="{_escape(vid)}",op="{op}"'
            for bound, value in zip(bounds, o["buckets"]):
                out.append(f'fusefs_operation_duration_seconds_bucket{{{labels},le="{_le(bound)}"}} {value}')
            out.append(f'fusefs_operation_duration_seconds_bucket{{{labels},le="+Inf"}} {o["count"]}')
            out.append(f'fusefs_operation_duration_seconds_sum{{{labels}}} {_num(o["sum_seconds"])}')
            out.append(f'fusefs_operation_duration_seconds_count{{{labels}}} {o["count"]}')
