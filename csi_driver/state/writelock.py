"""A first-come, first-served lock for the state database's single writer.

``threading.Lock`` makes no promise of order: a thread that releases it and
asks again at once, or one that happens to hold the GIL when it is freed,
can pass threads that have waited longer. Every CreateVolume and
DeleteVolume takes the database's write lock twice, so under 16 concurrent
clients some calls lost that race again and again and made the tail. Here
each waiter queues behind the others and the holder hands the lock straight
to the oldest waiter on release.
"""

from __future__ import annotations

import threading
from collections import deque
from types import TracebackType


class FifoLock:
    """A non-reentrant mutex whose waiters get it in the order they asked."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiters: deque[threading.Lock] = deque()

    def acquire(self) -> None:
        with self._guard:
            if not self._held:
                self._held = True
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
        try:
            turn.acquire()  # released by the holder that hands the lock over; _held stays True
        except BaseException:  # e.g. KeyboardInterrupt in the main thread: never strand the lock
            with self._guard:
                handed_over = turn not in self._waiters
                if not handed_over:
                    self._waiters.remove(turn)
            if handed_over:
                self.release()
            raise

    def release(self) -> None:
        with self._guard:
            if not self._held:
                raise RuntimeError("release of an unheld FifoLock")
            if self._waiters:
                self._waiters.popleft().release()
            else:
                self._held = False

    def __enter__(self) -> "FifoLock":
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
