"""Freeze and thaw: a write barrier for crash-consistent snapshots.

``freeze()`` closes the gate for new mutating operations, waits until the
mutating operations already inside the filesystem have finished, runs a flush
callback (the session fsyncs every open file), and returns. From then on the
backing directory does not change until ``thaw()`` (or the auto-thaw timer,
so that a snapshotter that crashes mid-cut cannot wedge a volume). Reads,
lookups and every other non-mutating operation are never blocked.

The hot path must be cheap, because every write passes through it. Instead
of a shared in-flight counter behind a lock, each FUSE worker thread owns a
``busy`` flag. A mutating operation sets its flag, *then* reads ``frozen``;
``freeze()`` sets ``frozen``, *then* waits for every flag to drop. Under the
GIL those loads and stores are sequentially consistent, so one of the two
always sees the other (the Dekker handshake): either the operation sees the
gate closed and backs off, or ``freeze()`` sees it in flight and waits.
"""

from __future__ import annotations

import logging
import threading
import time
from _thread import get_ident
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fusefs.freeze")

#: How often ``freeze()`` re-checks in-flight operations while it drains them.
_DRAIN_POLL_SECONDS = 0.001
#: A write that continues, at a page boundary, the previous write on the same
#: handle that finished less than this long ago is the second half of one
#: write(2) that the kernel split (it does, when the first page was only
#: partly written and not cached). Such halves may still pass while a freeze
#: settles, so that a cut never holds half of a write(2).
CONTINUATION_WINDOW = 0.05
#: A freeze settles for at most this long, even under a stream of appends.
MAX_SETTLE_SECONDS = 0.5
PAGE_SIZE = 4096


class FreezeTimeout(Exception):
    """In-flight operations did not finish in time; the gate was reopened."""


class FreezeAborted(Exception):
    """A thaw came while the freeze was still being made; the gate is open."""


class _Worker:
    """A worker thread's in-flight flag. Only its owner writes it."""

    __slots__ = ("busy",)

    def __init__(self) -> None:
        self.busy = False


class FreezeGate:
    """The write barrier of one volume."""

    def __init__(self) -> None:
        #: Read by every mutating operation; written only under ``_lock``.
        self.frozen = False
        self._by_thread: dict[int, _Worker] = {}
        self._workers: list[_Worker] = []
        self._register = threading.Lock()
        self._lock = threading.Lock()     # guards the state below; held only briefly
        self._op_lock = threading.Lock()  # one freeze is made at a time
        self._epoch = 0                   # bumped whenever the gate opens
        self._thawed = threading.Event()
        self._thawed.set()
        self._deadline = 0.0
        self._timer: threading.Timer | None = None
        self._generation = 0
        self.frozen_since = 0.0
        self.auto_thaws = 0
        #: False while a freeze settles (continuations may pass), then True.
        self._settled = True
        self._flushing = False
        self._last_continuation = 0.0

    # ------------------------------------------------------------ hot path

    def worker(self) -> _Worker:
        """The calling thread's flag, registered on first use (keyed by OS
        thread id: libfuse's workers are not Python threads)."""
        w = self._by_thread.get(get_ident())
        if w is None:
            w = _Worker()
            with self._register:
                self._workers.append(w)
                self._by_thread[get_ident()] = w
        return w

    def enter(self, write_back: bool = False) -> _Worker:
        """Announce a mutating operation; blocks while the volume is frozen.

        ``write_back`` marks requests the kernel may send while it writes its
        cache back (timestamps flushed with a file handle); those pass while
        the freeze is writing back, or its own fsync would wait forever.
        The caller must call :meth:`leave` with the returned flag when done.
        """
        w = self.worker()
        while True:
            w.busy = True
            if not self.frozen or (write_back and self._flushing):
                return w
            w.busy = False
            self._thawed.wait()

    def enter_write(self, offset: int, last_end: int, last_time: float, fi: Any = None) -> _Worker:
        """:meth:`enter` for a write at ``offset`` on a handle whose previous
        write ended at ``last_end`` at ``last_time`` (monotonic). ``fi`` is the
        request's fuse_file_info, consulted only while freezing."""
        w = self.worker()
        while True:
            w.busy = True
            if not self.frozen:
                return w
            if not self._settled:
                if (offset == last_end and offset % PAGE_SIZE == 0
                        and time.monotonic() - last_time < CONTINUATION_WINDOW):
                    self._last_continuation = time.monotonic()
                    return w  # the rest of a write(2) that was in flight
                if self._flushing and fi is not None and fi.writepage:
                    return w  # page cache write-back that the freeze itself asked for
            w.busy = False
            self._thawed.wait()

    @staticmethod
    def leave(w: _Worker) -> None:
        w.busy = False

    # ----------------------------------------------------------- control

    def freeze(self, timeout_seconds: float, flush: Callable[[], None] | None = None,
               drain_timeout: float = 30.0, write_back: Callable[[], None] | None = None) -> float:
        """Close the gate, drain, flush; return the auto-thaw deadline (monotonic).

        ``write_back`` (with the kernel's write-back cache) pushes dirty pages
        out of the kernel; the write-back requests it causes pass the gate
        until it returns, everything else stays blocked.

        Freezing a frozen volume only moves its auto-thaw deadline (a second
        caller waits until the first freeze is complete). If the in-flight
        operations do not finish within ``drain_timeout`` the gate is
        reopened and :class:`FreezeTimeout` raised: a half-made freeze must
        never linger. A thaw (or auto-thaw) while the freeze is still being
        made wins: the gate opens and this raises :class:`FreezeAborted`.
        The state lock is never held while waiting, so a thaw is never stuck
        behind a slow drain or fsync.
        """
        if timeout_seconds <= 0:
            raise ValueError("a freeze needs a positive timeout")
        with self._op_lock:
            with self._lock:
                already = self.frozen
                if not already:
                    self._thawed.clear()
                    self._settled = False
                    self.frozen = True
                    self.frozen_since = time.time()
                self._generation += 1
                self._arm_timer(timeout_seconds, self._generation)
                if already:
                    return self._deadline
                epoch = self._epoch
            try:
                self._drain(drain_timeout, epoch)
                if write_back is not None:
                    self._flushing = True
                    try:
                        write_back()
                    finally:
                        self._flushing = False
                self._settle(drain_timeout, epoch)
                if flush is not None:
                    flush()
            except BaseException:
                with self._lock:
                    if self._epoch == epoch:
                        self._open()
                raise
            with self._lock:
                if self._epoch != epoch:
                    raise FreezeAborted("the volume was thawed while the freeze was being made")
                return self._deadline

    def thaw(self) -> bool:
        """Reopen the gate. Returns whether the volume was frozen."""
        with self._lock:
            was = self.frozen
            self._open()
            return was

    def status(self) -> dict[str, float | bool]:
        with self._lock:
            return {
                "frozen": self.frozen,
                "frozen_since": self.frozen_since if self.frozen else 0.0,
                "auto_thaw_in_seconds": max(0.0, self._deadline - time.monotonic()) if self.frozen else 0.0,
                "auto_thaws": self.auto_thaws,
            }

    # ----------------------------------------------------------- internals

    def _drain(self, timeout: float, epoch: int) -> None:
        deadline = time.monotonic() + timeout
        me = self._by_thread.get(get_ident())
        while True:
            if self._epoch != epoch:
                raise FreezeAborted("the volume was thawed while the freeze was being made")
            with self._register:
                busy = [w for w in self._workers if w.busy and w is not me]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise FreezeTimeout(f"{len(busy)} operation(s) still in flight after {timeout:.0f}s")
            time.sleep(_DRAIN_POLL_SECONDS)

    def _settle(self, drain_timeout: float, epoch: int) -> None:
        """Let the second halves of split write(2) calls in, then close for good."""
        deadline = time.monotonic() + MAX_SETTLE_SECONDS
        while time.monotonic() < deadline:
            time.sleep(CONTINUATION_WINDOW)
            self._drain(drain_timeout, epoch)
            if time.monotonic() - self._last_continuation >= CONTINUATION_WINDOW:
                break
        self._settled = True
        self._drain(drain_timeout, epoch)  # one that slipped in just before

    def _arm_timer(self, timeout_seconds: float, generation: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._deadline = time.monotonic() + timeout_seconds
        self._timer = threading.Timer(timeout_seconds, self._auto_thaw, args=(generation,))
        self._timer.daemon = True
        self._timer.start()

    def _auto_thaw(self, generation: int) -> None:
        with self._lock:
            if not self.frozen or generation != self._generation:
                return
            self.auto_thaws += 1
            log.warning("auto-thaw: the volume stayed frozen past its timeout",
                        extra={"fields": {"frozen_for_seconds": round(time.time() - self.frozen_since, 3)}})
            self._open()

    def _open(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._settled = True
        self.frozen = False
        self._epoch += 1
        self._deadline = 0.0
        self._thawed.set()
