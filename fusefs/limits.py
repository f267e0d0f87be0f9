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

Three bounds keep a throttled volume from hurting anyone but its own data
rate (a pod can always queue more than the rate allows):

* **Interruptible waits.** A wait sleeps in slices of :data:`SLICE` seconds
  and asks ``interrupted()`` (libfuse's ``fuse_interrupted()``: the kernel
  sent FUSE INTERRUPT because the caller got a fatal signal) between them;
  an interrupted request stops waiting and fails with EINTR, so a SIGKILLed
  pod process is gone within about a slice instead of after its whole
  reservation. Its reservation is handed back when nobody queued behind it.
* **Bounded debt.** A bucket never schedules more than
  :data:`MAX_DEBT_SECONDS` ahead: a request that finds a longer backlog
  waits (interruptibly) for it to drain before it reserves, so the debt a
  bucket carries is at most ``MAX_DEBT_SECONDS`` plus one request's cost.
* **Write-back never waits.** Pages a pod dirtied through a shared writable
  ``mmap`` (or any buffered write, with the write-back cache) are written by
  the kernel, not by the pod's request: FUSE marks those WRITEs
  ``FUSE_WRITE_CACHE`` and never interrupts them, and a killed process waits
  at exit until they are done. So :meth:`IOLimits.charge_writeback` books
  them in both buckets without sleeping, up to the debt bound (what lies
  beyond it is not booked): the pod's next own data requests pay for them,
  and a SIGKILLed process is gone as soon as its pages are written at the
  disk's speed.
* **Capped waiters.** At most ``max_waiters`` requests of a volume wait at
  once (the session passes half its workers), so metadata, page-cache reads
  and INTERRUPT requests always find a free worker. A data request beyond the
  cap fails at once with EAGAIN instead of taking a worker: only a pod that
  runs more concurrent data requests on one throttled volume than the cap
  sees it.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable

#: Credit a bucket may bank while idle, in seconds of its rate. Small, so that
#: a limit holds within a few percent over windows of a second or more.
DEFAULT_BURST_SECONDS = 0.05
#: How far ahead a bucket may be booked before new requests wait to reserve.
MAX_DEBT_SECONDS = 2.0
#: Longest sleep between two checks for an interrupt: the latency of a kill.
SLICE = 0.05
#: Requests that may wait in one volume's buckets at once, unless told.
DEFAULT_MAX_WAITERS = 64


def _never() -> bool:
    return False


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

    def backlog(self) -> float:
        """Seconds the bucket is booked ahead of now (0 when free or unlimited)."""
        if self._rate <= 0:
            return 0.0
        return max(0.0, self._tat - time.monotonic())

    def reserve(self, cost: float, max_debt: float = float("inf")) -> float | None:
        """Reserve ``cost`` units; return how long the caller must wait (s).

        None, and nothing reserved, when the bucket is already booked more
        than ``max_debt`` seconds ahead: the caller waits and asks again.
        """
        rate = self._rate
        if rate <= 0 or cost <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            if self._tat - now > max_debt:
                return None
            start = max(self._tat, now - self._burst)
            self._tat = start + cost / rate
        return max(0.0, start - now)

    def charge(self, cost: float, max_debt: float) -> None:
        """Book ``cost`` units without waiting, but never past ``max_debt``
        seconds ahead of now (a backlog already beyond it is left as it is)."""
        rate = self._rate
        if rate <= 0 or cost <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._tat, now - self._burst)
            self._tat = max(self._tat, min(start + cost / rate, now + max_debt))

    def refund(self, cost: float) -> None:
        """Give back an unused reservation of ``cost`` (an interrupted request's).

        Requests booked after it keep the waits they were given, so the rate
        may run ahead by at most the refunded cost; a killed pod's debt does
        not stay on the volume.
        """
        rate = self._rate
        if rate <= 0 or cost <= 0:
            return
        with self._lock:
            self._tat = max(time.monotonic(), self._tat - cost / rate)


class IOLimits:
    """The two buckets of one volume, with a cheap "anything to do?" flag."""

    def __init__(self, bytes_per_second: int = 0, ops_per_second: int = 0,
                 max_waiters: int = DEFAULT_MAX_WAITERS, interrupted: Callable[[], bool] = _never) -> None:
        self._bytes = RateLimiter()
        self._ops = RateLimiter()
        #: Read on every data request; False means both buckets are unlimited.
        self.active = False
        self.throttled_seconds = 0.0
        #: Requests refused with EAGAIN (waiter cap) or EINTR (interrupted).
        self.refused = 0
        self.interrupted_requests = 0
        #: Bytes of kernel write-back let through without a wait (charged as debt).
        self.writeback_bytes = 0
        self._interrupted = interrupted
        self._slots = threading.BoundedSemaphore(max(1, int(max_waiters)))
        self.set(bytes_per_second, ops_per_second)

    def use_interrupt_check(self, interrupted: Callable[[], bool]) -> None:
        """Ask ``interrupted()`` whether the calling request was interrupted:
        each engine has its own way to know (libfuse's ``fuse_interrupted``
        is only valid on libfuse's own worker threads)."""
        self._interrupted = interrupted

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
        """Block the calling worker until one op of ``nbytes`` may proceed.

        Raises OSError(EAGAIN) when the waiter cap is reached and
        OSError(EINTR) when the request is interrupted while it waits; the
        FUSE glue turns either into the request's error reply.
        """
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            raise OSError(errno.EAGAIN, "too many requests wait for this volume's I/O limit")
        try:
            ops_wait, bytes_wait = self._reserve_within_debt(nbytes)
            wait = max(ops_wait, bytes_wait)
            if wait > 0:
                self.throttled_seconds += wait  # approximate under races; a metric only
                if not self._sleep(wait):
                    self._ops.refund(1)
                    self._bytes.refund(nbytes)
                    raise OSError(errno.EINTR, "interrupted while throttled")
        finally:
            self._slots.release()

    def charge_writeback(self, nbytes: int) -> None:
        """Charge a write the kernel makes from its page cache (FUSE_WRITE_CACHE:
        libfuse's ``fi->writepage``) without waiting: see "Write-back never
        waits". The debt it leaves is bounded like any other."""
        self._ops.charge(1, MAX_DEBT_SECONDS)
        self._bytes.charge(nbytes, MAX_DEBT_SECONDS)
        self.writeback_bytes += nbytes  # approximate under races; a metric only

    def backlog(self) -> float:
        """Seconds the busier bucket is booked ahead of now: the longest a new
        request would wait (bounded by MAX_DEBT_SECONDS plus one request)."""
        return max(self._ops.backlog(), self._bytes.backlog())

    def _reserve_within_debt(self, nbytes: int) -> tuple[float, float]:
        """Reserve in both buckets once neither is booked beyond the debt bound.

        Waits (interruptibly, in slices) while a bucket is booked too far
        ahead, so no bucket's schedule ever runs more than
        ``MAX_DEBT_SECONDS`` plus one request past now.
        """
        while True:
            ops_wait = self._ops.reserve(1, MAX_DEBT_SECONDS)
            if ops_wait is not None:
                bytes_wait = self._bytes.reserve(nbytes, MAX_DEBT_SECONDS)
                if bytes_wait is not None:
                    return ops_wait, bytes_wait
                self._ops.refund(1)
            if not self._sleep(SLICE):
                raise OSError(errno.EINTR, "interrupted while throttled")

    def _sleep(self, seconds: float) -> bool:
        """Sleep ``seconds`` in slices; False as soon as the request is interrupted."""
        deadline = time.monotonic() + seconds
        while True:
            if self._interrupted():
                self.interrupted_requests += 1
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(SLICE, left))
