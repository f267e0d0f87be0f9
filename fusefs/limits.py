"""Per-volume I/O limits: a bytes/s and an ops/s token bucket, changeable live.

The buckets are implemented as GCRA ("virtual scheduling"): each bucket keeps
the time at which it will next be free (``_tat``). A request of cost ``n``
reserves ``n / rate`` seconds starting at ``max(now - burst, _tat)`` and sleeps
until its reservation starts. This needs one short critical section per
request, is fair between threads (first come, first scheduled), lets large
requests through without starving them (a 1 MiB write at 20 MiB/s simply
waits 50 ms), and holds the long-run rate exactly: over any window ``T`` a
bucket admits at most ``rate * (T + burst)``.

The worker thread sleeps *outside* the lock, so a throttled volume keeps
serving reads from the page cache and metadata operations at full speed.
Only data operations (read, write) are limited, because those are what the
limits in a StorageClass (``ioBytesPerSecond``, ``ioOpsPerSecond``) promise.
"""

from __future__ import annotations

import threading
import time

#: Credit a bucket may bank while idle, in seconds of its rate. Small, so that
#: a limit holds within a few percent over windows of a second or more.
DEFAULT_BURST_SECONDS = 0.05


class RateLimiter:
    """One GCRA bucket. ``rate == 0`` means unlimited."""

    def __init__(self, rate: float = 0, burst_seconds: float = DEFAULT_BURST_SECONDS) -> None:
        self._lock = threading.Lock()
        self._burst = burst_seconds
        self._rate = 0.0
        self._tat = 0.0
        self.set_rate(rate)

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the rate; takes effect for the next request."""
        if rate < 0:
            raise ValueError("a rate must be >= 0")
        with self._lock:
            self._rate = float(rate)
            # Forget reservations made at the old rate: a limit that is raised
            # (or removed) must not keep requests waiting for the old schedule.
            self._tat = time.monotonic()

    def reserve(self, cost: float) -> float:
        """Reserve ``cost`` units; return how long the caller must wait (s)."""
        rate = self._rate
        if rate <= 0 or cost <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(self._tat, now - self._burst)
            self._tat = start + cost / rate
        return max(0.0, start - now)


class IOLimits:
    """The two buckets of one volume, with a cheap "anything to do?" flag."""

    def __init__(self, bytes_per_second: int = 0, ops_per_second: int = 0) -> None:
        self._bytes = RateLimiter()
        self._ops = RateLimiter()
        #: Read on every data request; False means both buckets are unlimited.
        self.active = False
        self.throttled_seconds = 0.0
        self.set(bytes_per_second, ops_per_second)

    def set(self, bytes_per_second: int, ops_per_second: int) -> None:
        """Change both limits live. 0 means unlimited."""
        bytes_per_second, ops_per_second = int(bytes_per_second), int(ops_per_second)
        if bytes_per_second < 0 or ops_per_second < 0:
            raise ValueError("limits must be >= 0 (0 means unlimited)")
        self._bytes.set_rate(bytes_per_second)
        self._ops.set_rate(ops_per_second)
        self.active = bool(bytes_per_second or ops_per_second)

    def as_dict(self) -> dict[str, int]:
        return {"bytes_per_second": int(self._bytes.rate), "ops_per_second": int(self._ops.rate)}

    def throttle(self, nbytes: int) -> None:
        """Block the calling worker until one op of ``nbytes`` may proceed."""
        wait = max(self._ops.reserve(1), self._bytes.reserve(nbytes))
        if wait > 0:
            self.throttled_seconds += wait  # approximate under races; a metric only
            time.sleep(wait)
