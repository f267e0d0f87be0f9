"""Per-key locks: serialise work on one volume or one name, never on all of them.

The CO retries and races freely (DESIGN "Idempotency is law"). Two
CreateVolume calls with one name must create one volume, yet a long snapshot
of volume A must not delay anything about volume B. A lock per key gives
exactly that; entries are reference-counted so the table does not grow with
the number of keys ever seen.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """Hold the lock for ``key`` for the duration of the block."""
        lock = self._acquire_ref(key)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
            self._release_ref(key)

    @contextmanager
    def hold_many(self, keys: Iterable[str]) -> Iterator[None]:
        """Hold several keys, taken in sorted order so two callers cannot deadlock."""
        with ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self.hold(key))
            yield

    def _acquire_ref(self, key: str) -> threading.Lock:
        with self._guard:
            lock, refs = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, refs + 1)
            return lock

    def _release_ref(self, key: str) -> None:
        with self._guard:
            lock, refs = self._locks[key]
            if refs <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, refs - 1)

    def __len__(self) -> int:
        with self._guard:
            return len(self._locks)


class KeyedCap:
    """At most ``limit`` holders per key at once; a caller beyond that is told so at once.

    For calls that may take long on one key (stats of a volume whose mount
    does not answer): capped, they can hold only a few RPC workers, and the
    rest of the pool keeps serving every other key.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._guard = threading.Lock()
        self._held: dict[str, int] = {}

    @contextmanager
    def slot(self, key: str) -> Iterator[bool]:
        """Yields True with a slot held, or False (nothing held) when ``key`` is at its limit."""
        with self._guard:
            count = self._held.get(key, 0)
            granted = count < self.limit
            if granted:
                self._held[key] = count + 1
        try:
            yield granted
        finally:
            if granted:
                with self._guard:
                    count = self._held[key] - 1
                    if count:
                        self._held[key] = count
                    else:
                        del self._held[key]
