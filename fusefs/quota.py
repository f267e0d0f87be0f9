"""Quota accounting for one volume: bytes and inodes, from a scan plus deltas.

What counts as "used bytes" is the *apparent size* (``st_size``) of every
regular file, each inode once however many hard links it has. Not allocated
blocks, because:

- it is exact and predictable: writing ``capacity`` bytes into an empty volume
  succeeds and one byte more fails, on any backing filesystem; allocated
  blocks depend on the filesystem (ext4 rounds to 4 KiB, XFS adds speculative
  preallocation that shows up in ``st_blocks`` and vanishes later);
- it can be checked *before* a write: the growth of a file is known from the
  offset and length, while the blocks a write allocates are only known after;
- it is an upper bound on the data blocks actually used, so the backing
  filesystem can never be filled past the promise. Sparse files are charged
  at their full size, which is conservative. The one way to allocate blocks
  beyond the apparent size, ``fallocate(FALLOC_FL_KEEP_SIZE)`` past end of
  file, is refused by the filesystem layer (EOPNOTSUPP).

Directories, symlinks, special files and xattrs are not charged bytes (their
blocks are filesystem overhead); every inode, of any type, counts against the
inode limit. ``df`` on the mount shows exactly these numbers (see ``statfs``).

Open files are tracked per inode in :class:`InodeState` so that a write's
growth is computed from a size held in memory (no ``fstat`` per write). Only
fusefs writes the backing directory, so that size stays true; it is
re-checked against ``fstat`` when the last handle on the inode closes.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from dataclasses import dataclass, field

#: Inode limit per byte of capacity when none is given: one inode per 4 KiB,
#: enough for a volume full of one-block files.
BYTES_PER_INODE = 4096
#: The inode limit is never below this, so tiny volumes still hold a tree.
MIN_INODES = 1024
#: With no capacity (0: no quota) the inode limit is this many.
UNLIMITED_INODES = 2**32
#: Files libfuse hid because they were unlinked while open (see operations).
#: At mount time nothing is open, so any found are leftovers of a session
#: that ended without closing them (a crash).
HIDDEN_NAME = re.compile(rb"\.fuse_hidden[0-9a-f]{16}")


class QuotaExceeded(OSError):
    """ENOSPC: the operation would pass the capacity or the inode limit."""

    def __init__(self, what: str = "quota exceeded") -> None:
        super().__init__(errno.ENOSPC, what)


@dataclass
class ScanResult:
    """What the mount-time walk found."""

    used_bytes: int = 0
    used_inodes: int = 0
    xattr_names: set[bytes] = field(default_factory=set)
    errors: int = 0
    #: Leftover hidden files: (path, size), not counted in the figures above.
    hidden: list[tuple[bytes, int]] = field(default_factory=list)


def scan(root: str, with_xattrs: bool = True) -> ScanResult:
    """Walk ``root`` once: apparent bytes, inodes, and the xattr names in use.

    Hard links are counted once. Nothing is followed out of the tree (symlinks
    are not followed, other filesystems mounted inside are not entered).
    Unreadable entries are counted as errors and skipped, never fatal: a
    volume with one odd file must still mount.
    """
    result = ScanResult()
    root_st = os.lstat(root)
    seen_links: set[int] = set()
    result.used_inodes = 1
    if with_xattrs:
        _collect_xattrs(os.fsencode(root), result)
    stack = [os.fsencode(root)]
    while stack:
        directory = stack.pop()
        try:
            entries = os.scandir(directory)
        except OSError:
            result.errors += 1
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    result.errors += 1
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and HIDDEN_NAME.fullmatch(entry.name):
                    result.hidden.append((entry.path, st.st_size))
                    continue
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    if st.st_ino in seen_links:
                        continue
                    seen_links.add(st.st_ino)
                result.used_inodes += 1
                if stat.S_ISREG(st.st_mode):
                    result.used_bytes += st.st_size
                elif stat.S_ISDIR(st.st_mode) and st.st_dev == root_st.st_dev:
                    stack.append(entry.path)
                if with_xattrs:
                    _collect_xattrs(entry.path, result)
    return result


def _collect_xattrs(path: bytes, result: ScanResult) -> None:
    try:
        for name in os.listxattr(path, follow_symlinks=False):
            result.xattr_names.add(os.fsencode(name))
    except OSError:
        pass  # ENOTSUP on the backing fs, or a racing unlink: nothing to add


class InodeState:
    """An inode with open handles: its size as fusefs knows it."""

    __slots__ = ("ino", "size", "opens", "flushed", "orphan", "writable")

    def __init__(self, ino: int, size: int) -> None:
        self.ino = ino
        self.size = size
        self.opens = 0
        #: Handles on it that saw a FLUSH (their descriptor was closed; the
        #: RELEASE, which the kernel sends asynchronously, may be pending).
        self.flushed = 0
        #: Some handle could write: re-check the size against fstat on close.
        self.writable = False
        #: The last link is gone but handles are open: uncharge on last close.
        self.orphan = False


class Quota:
    """Capacity and usage of one volume. All mutations are under one lock.

    ``capacity == 0`` means no quota: usage is still counted (for stats) but
    nothing is refused for bytes. The lock is held for a few dictionary and
    integer operations only, never across a system call.
    """

    def __init__(self, capacity: int, used_bytes: int = 0, used_inodes: int = 1,
                 inode_limit: int | None = None) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._lock = threading.Lock()
        self.capacity = capacity
        self.used_bytes = used_bytes
        self.used_inodes = used_inodes
        self._explicit_inode_limit = inode_limit
        self.inode_limit = self._derive_inode_limit(capacity)

    def _derive_inode_limit(self, capacity: int) -> int:
        if self._explicit_inode_limit is not None:
            return self._explicit_inode_limit
        if capacity == 0:
            return UNLIMITED_INODES
        return max(MIN_INODES, capacity // BYTES_PER_INODE)

    # ------------------------------------------------------------ control

    def resize(self, capacity: int) -> None:
        """Change the capacity online. Shrinking below usage is allowed: it
        refuses further growth until usage drops, as a full disk would."""
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        with self._lock:
            self.capacity = capacity
            self.inode_limit = self._derive_inode_limit(capacity)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "capacity": self.capacity,
                "used_bytes": self.used_bytes,
                "used_inodes": self.used_inodes,
                "total_inodes": self.inode_limit,
            }

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity - self.used_bytes) if self.capacity else 0

    # ------------------------------------------------------------ bytes

    def extend(self, state: InodeState, end: int) -> int:
        """Grow ``state`` towards ``end`` bytes; return the end that fits.

        A write ending at ``end`` may proceed up to the returned offset. When
        the quota is short the result is smaller than ``end`` (a short write,
        as on a full disk) and, when nothing fits, equal to the current size.
        """
        with self._lock:
            size = state.size
            if end <= size:
                return end
            grow = end - size
            if self.capacity:
                room = self.capacity - self.used_bytes
                if grow > room:
                    grow = max(0, room)
            state.size = size + grow
            self.used_bytes += grow
            return state.size

    def reserve_exact(self, state: InodeState | None, old_size: int, new_size: int) -> None:
        """All-or-nothing size change (truncate, fallocate) before it happens.

        Raises :class:`QuotaExceeded` without charging anything if the growth
        does not fit. Shrinks are applied by :meth:`set_size` afterwards.
        """
        with self._lock:
            current = state.size if state is not None else old_size
            grow = new_size - current
            if grow <= 0:
                return
            if self.capacity and self.used_bytes + grow > self.capacity:
                raise QuotaExceeded("the new size does not fit in the volume's capacity")
            self.used_bytes += grow
            if state is not None:
                state.size = new_size

    def set_size(self, state: InodeState | None, old_size: int, new_size: int) -> None:
        """Record a size the file really has now (after truncate, on close)."""
        with self._lock:
            if state is not None:
                old_size = state.size
                state.size = new_size
            self.used_bytes += new_size - old_size

    def release_bytes(self, nbytes: int) -> None:
        """A file of ``nbytes`` is gone (last link removed and not open)."""
        if nbytes:
            with self._lock:
                self.used_bytes -= nbytes

    # ------------------------------------------------------------ inodes

    def take_inode(self) -> None:
        """Charge a new inode, or raise ENOSPC at the inode limit."""
        with self._lock:
            if self.used_inodes >= self.inode_limit:
                raise QuotaExceeded("the volume's inode limit is reached")
            self.used_inodes += 1

    def give_inode(self, count: int = 1) -> None:
        with self._lock:
            self.used_inodes -= count
