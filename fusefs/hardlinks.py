"""Keeping hard links coherent in the kernel's caches.

libfuse's high-level API gives every *name* its own node, so the kernel sees
two hard links of one file as two inodes with separate attribute and page
caches. Writing through one name would leave the other showing the old size
and data (and the old link count after ``link``/``unlink``) until its cache
times out. Plain directories never do that, and neither should a volume.

So the filesystem remembers the names under which the kernel has *cached*
an inode with more than one link (getattr and open replies, reads that fill
its page cache), and when such an inode changes it asks the kernel to drop
its caches for those other names (``fuse_invalidate_path``) and forgets
them: a name is invalidated at most once per time the kernel cached it.
Each invalidation is therefore paid for by an earlier request, and the work
of any sequence of operations is linear in its length (links to one file
used to cost a pass over all its names each: 4,000 links took 24.7 s).
A directory rename, which moves every name under it, drops the whole cache
record the same way (invalidating each remembered name at its new place).
Files with a single link, the overwhelming majority, cost one integer
comparison per lookup and nothing else. Memory is bounded by the names the
kernel holds.

The notification is sent from a dedicated thread, never from the request
that caused it: invalidating an inode's page cache waits for that inode's
locked pages, and if two requests on two names of the same file each waited
for the other's pages, both would hang. The request waits for its
invalidations for a short while only (:data:`WAIT_SECONDS`), which in
practice means "until done", and in the pathological case above means a
short delay instead of a deadlock.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger("fusefs.hardlinks")

#: How long a request waits for the invalidations it triggered.
WAIT_SECONDS = 0.5


class LinkTracker:
    """Cached names of multiply-linked inodes, and the invalidation worker."""

    def __init__(self, invalidate: Callable[[bytes], int]) -> None:
        self._invalidate = invalidate
        self._lock = threading.Lock()
        self._names: dict[int, set[bytes]] = {}
        self._ino_of: dict[bytes, int] = {}
        self._queue: queue.SimpleQueue[tuple[list[bytes], threading.Event] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Invalidations sent to the kernel (stats: they must stay linear).
        self.invalidations = 0

    @property
    def active(self) -> bool:
        """Cheap check for the hot path: is any multiply-linked inode cached?"""
        return bool(self._names)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="invalidator", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ bookkeeping

    def observe(self, path: bytes, ino: int) -> None:
        """The kernel now caches ``path``, a name of ``ino`` (more than one link)."""
        with self._lock:
            old = self._ino_of.get(path)
            if old == ino:
                return
            if old is not None:
                self._drop(path, old)
            self._names.setdefault(ino, set()).add(path)
            self._ino_of[path] = ino

    def cached(self, path: bytes, ino: int) -> None:
        """Like :meth:`observe`, only for an inode already known to have links
        (a read or an open filling the cache under ``path``)."""
        if ino in self._names:
            self.observe(path, ino)

    def forget(self, path: bytes) -> int | None:
        """``path`` is gone; returns the inode it named, if tracked."""
        with self._lock:
            ino = self._ino_of.pop(path, None)
            if ino is not None:
                self._drop(path, ino)
            return ino

    def moved(self, src: bytes, dst: bytes) -> None:
        """A file (not a directory) was renamed: O(1)."""
        with self._lock:
            ino = self._ino_of.pop(src, None)
            if ino is not None:
                self._drop(src, ino)
                self._names.setdefault(ino, set()).add(dst)
                self._ino_of[dst] = ino

    def exchanged(self, a: bytes, b: bytes) -> None:
        """Two files (not directories) swapped names."""
        with self._lock:
            ia, ib = self._ino_of.pop(a, None), self._ino_of.pop(b, None)
            for path, ino in ((a, ia), (b, ib)):
                if ino is not None:
                    self._drop(path, ino)
            for path, ino in ((b, ia), (a, ib)):
                if ino is not None:
                    self._names.setdefault(ino, set()).add(path)
                    self._ino_of[path] = ino

    def tree_moved(self, where: Callable[[bytes], bytes]) -> None:
        """A directory was renamed: invalidate every cached name at its new
        place (``where(old)``) and forget them all. Linear in the names the
        kernel cached since the last such flush, each paid for once."""
        with self._lock:
            paths = [where(p) for p in self._ino_of]
            self._ino_of.clear()
            self._names.clear()
        self.invalidate(paths)

    def names(self, ino: int) -> set[bytes]:
        with self._lock:
            return set(self._names.get(ino, ()))

    def _drop(self, path: bytes, ino: int) -> None:
        names = self._names.get(ino)
        if names is not None:
            names.discard(path)
            if not names:
                del self._names[ino]

    # ------------------------------------------------------------ invalidation

    def changed(self, ino: int, except_path: bytes | None = None) -> None:
        """``ino`` changed: drop the kernel's caches of its other names, and
        forget them until the kernel caches them again."""
        if ino not in self._names:
            return
        with self._lock:
            names = self._names.get(ino)
            if not names:
                return
            paths = [p for p in names if p != except_path]
            for p in paths:
                del self._ino_of[p]
            if except_path in names:
                self._names[ino] = {except_path}
            else:
                del self._names[ino]
        self.invalidate(paths)

    def invalidate(self, paths: list[bytes]) -> None:
        """Invalidate ``paths`` (from the worker thread), waiting briefly."""
        if not paths or self._thread is None:
            return
        self.invalidations += len(paths)
        done = threading.Event()
        self._queue.put((paths, done))
        if not done.wait(WAIT_SECONDS):
            log.warning("cache invalidation still pending", extra={"fields": {
                "paths": len(paths), "waited_seconds": WAIT_SECONDS}})

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            paths, done = item
            for path in paths:
                try:
                    result = self._invalidate(path)  # -ENOENT: not cached, nothing to drop
                    log.debug("invalidated", extra={"fields": {"path": path, "result": result}})
                except Exception:  # noqa: BLE001 - never let the worker die
                    log.exception("invalidation failed")
            done.set()
