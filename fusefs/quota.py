"""Quota accounting for one volume: what each object costs, and the counters.

The charging model (docs/fusefs.md, "Quota") charges every object a pod can
make the host store, in whole blocks of :data:`BLOCK` bytes, so that the
blocks a backing directory occupies (what the host's ``du`` shows) never
exceed the capacity by more than a small, fixed slack:

=================  ==========================================================
regular file       its apparent size rounded up to a block (sparse files at
                   their full size); each inode once, however many names
directory          its own size as the backing filesystem reports it
                   (``st_size``: grows with its entries, so every name,
                   hard links included, is paid for), at least one block
symbolic link      the target's length rounded up to a block
fifo, socket       nothing but the inode
extended attrs     per inode: the sum over its attributes of
                   ``XATTR_ENTRY + len(name) + len(value)``, rounded up to a
                   block; at most :data:`XATTR_MAX_PER_INODE` per inode
=================  ==========================================================

Every inode, of any type, also counts against the inode limit. The volume's
root directory is the one exception: its first block and its inode exist
before the pod does anything, so they are not charged (the used-inode count
starts at 1 for it, as ``df -i`` shows).

This module is engine-neutral: it does arithmetic on sizes and counters and
never touches the filesystem. A FUSE engine calls :meth:`Quota.charge` (all
or nothing) *before* an operation that may grow the volume, and
:meth:`Quota.adjust` afterwards with the difference between what it charged
and what the operation really cost (measured with :func:`inode_charge` and
:func:`dir_charge` on ``stat`` results). :meth:`Quota.extend` is the write
path's short-write variant.

While the usage is unknown (a mount after a crash, until the background
scan is done; see :mod:`fusefs.usage`), the quota is *recovering*: every
charge is refused with ENOSPC and every release is ignored, so nothing can
grow past the capacity and the scan's result, when it comes, is the truth.

A kernel-engine session mirrors its counters into a shared file
(:mod:`fusefs.live_usage`) on every change, so that a successor taking over
its connection after a crash adopts them at once instead of recovering.
The successor then *audits* them with a scan while it keeps charging
(:meth:`Quota.audit_start`, :meth:`Quota.audit_end`): the quota counts
what grew and what was released meanwhile, and names moved (renames, hard
links), which could hide an entry from the scan.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from typing import Any

#: The unit of every charge. Backing filesystems allocate in blocks of
#: 4 KiB (ext4, XFS, tmpfs pages), so charging whole blocks makes the charge
#: an upper bound of what ``du`` sees.
BLOCK = 4096
#: Per-attribute overhead of an extended attribute (ext4's entry header and
#: padding are 16 to 22 bytes; rounded up).
XATTR_ENTRY = 32
#: The most extended-attribute bytes one inode may hold (ENOSPC beyond):
#: keeps every xattr operation's cost bounded by a constant.
XATTR_MAX_PER_INODE = 64 << 10
#: Inode limit per byte of capacity when none is given: one inode per 4 KiB,
#: enough for a volume full of one-block files.
BYTES_PER_INODE = 4096
#: The inode limit is never below this, so tiny volumes still hold a tree.
MIN_INODES = 1024
#: With no capacity (0: no quota) the inode limit is this many.
UNLIMITED_INODES = 2**32


def blocks(nbytes: int) -> int:
    """``nbytes`` rounded up to whole blocks, in bytes."""
    return -(-nbytes // BLOCK) * BLOCK if nbytes > 0 else 0


def dir_charge(size: int) -> int:
    """What a directory of ``st_size`` bytes costs: at least one block."""
    return max(BLOCK, blocks(size))


def xattr_bytes(name_len: int, value_len: int) -> int:
    """What one extended attribute adds to its inode's xattr total."""
    return XATTR_ENTRY + name_len + value_len


def inode_charge(st: os.stat_result, xattr_total: int = 0) -> int:
    """Bytes charged for one inode (not its names), from ``lstat``.

    ``xattr_total`` is the sum of :func:`xattr_bytes` over its attributes.
    """
    mode = st.st_mode
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        own = blocks(st.st_size)  # a symlink's st_size is its target's length
    elif stat.S_ISDIR(mode):
        own = dir_charge(st.st_size)
    else:
        own = 0
    return own + blocks(xattr_total)


class QuotaExceeded(OSError):
    """ENOSPC: the operation would pass the capacity or the inode limit."""

    def __init__(self, what: str = "quota exceeded") -> None:
        super().__init__(errno.ENOSPC, what)


class InodeState:
    """An inode with open handles: its size as fusefs knows it."""

    __slots__ = ("ino", "size", "opens", "orphan", "writable", "extra")

    def __init__(self, ino: int, size: int) -> None:
        self.ino = ino
        self.size = size
        self.opens = 0
        #: Some handle could write: re-check the size against fstat on close.
        self.writable = False
        #: The last link is gone but handles are open: uncharge on last close.
        self.orphan = False
        #: What the inode is charged besides its data (its xattrs), released
        #: with it when an orphan is finally closed.
        self.extra = 0


class Quota:
    """Capacity and usage of one volume. All mutations are under one lock.

    ``capacity == 0`` means no quota: usage is still counted (for stats) but
    nothing is refused for bytes. The lock is held for a few integer
    operations only, never across a system call.
    """

    def __init__(self, capacity: int, used_bytes: int = 0, used_inodes: int = 1,
                 inode_limit: int | None = None, recovering: bool = False) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self._lock = threading.Lock()
        self.capacity = capacity
        self.used_bytes = used_bytes
        self.used_inodes = used_inodes
        self._explicit_inode_limit = inode_limit
        self.inode_limit = self._derive_inode_limit(capacity)
        #: Usage unknown (see the module docstring): refuse growth.
        self.recovering = recovering
        #: Where the counters are mirrored (fusefs.live_usage.LiveUsage), if
        #: anywhere; ``_out`` is the same, or None while the usage is unknown.
        self._live: Any = None
        self._out: Any = None
        #: Totals since the start, for an audit: bytes and inodes charged and
        #: released, and names moved (rename, link).
        self.grown_bytes = self.released_bytes = 0
        self.grown_inodes = self.released_inodes = 0
        self.moves = 0

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

    def recovered(self, used_bytes: int, used_inodes: int) -> None:
        """The background scan is done: its figures are the usage."""
        with self._lock:
            self.used_bytes = used_bytes
            self.used_inodes = used_inodes
            self.recovering = False
            self._out = self._live
            self._publish()

    def lose(self) -> None:
        """The usage cannot be known (a scan failed): refuse growth from now on."""
        with self._lock:
            self.recovering = True
            self._out = None
            if self._live is not None:
                self._live.forget()

    # ------------------------------------------------------------ mirror and audit

    def mirror(self, live: Any) -> None:
        """Mirror the counters into ``live`` from now on (every change, under
        the lock); written at once if the usage is known."""
        with self._lock:
            self._live = live
            self._out = None if self.recovering else live
            self._publish()

    def _publish(self) -> None:
        """Caller holds the lock and has just changed a counter."""
        if self._out is not None:
            self._out.publish(self.used_bytes, self.used_inodes)

    def note_move(self) -> None:
        """A name moved (rename, hard link): an audit scan running now may
        have missed an entry, so it cannot judge the counters."""
        with self._lock:
            self.moves += 1

    def audit_start(self) -> tuple[int, ...]:
        """A mark for :meth:`audit_end`, taken just before a scan starts."""
        with self._lock:
            return (self.grown_bytes, self.released_bytes, self.grown_inodes, self.released_inodes, self.moves)

    def audit_end(self, mark: tuple[int, ...], scan_bytes: int, scan_inodes: int,
                  may_lower: bool = True) -> dict[str, Any]:
        """Judge the counters by a scan that ran since ``mark``, while the
        volume was in use, and correct them where it proves them wrong.

        An object changed during the walk was measured before or after its
        change, so the usage now lies between ``scan - released`` and
        ``scan + grown`` (what was released and grown since the mark), unless
        a name moved (an entry may have moved from an unscanned directory to
        a scanned one and been missed): then the pass proves nothing
        (``"moved"``). A counter inside its range is kept; outside it, it is
        set to the top of the range (never too little); with nothing changed
        during the walk the scan is exact and replaces it. Returns the
        verdict (``exact``, ``kept``, ``corrected``, ``moved``) and the
        corrections applied.

        ``may_lower`` is False when a request was being served at the mark
        or now: it may have made its system call and not yet settled its
        charge (a release still to come after an unlink, say), so a counter
        is only ever raised then, never lowered."""
        with self._lock:
            gb, rb, gi, ri = (self.grown_bytes - mark[0], self.released_bytes - mark[1],
                              self.grown_inodes - mark[2], self.released_inodes - mark[3])
            if self.moves != mark[4]:
                return {"verdict": "moved", "bytes": 0, "inodes": 0}
            if self.recovering:
                return {"verdict": "kept", "bytes": 0, "inodes": 0}
            old_b, old_i = self.used_bytes, self.used_inodes
            if not (gb or rb or gi or ri) and may_lower:
                new_b, new_i, verdict = scan_bytes, scan_inodes, "exact"
            else:
                new_b = old_b if scan_bytes - rb <= old_b <= scan_bytes + gb else scan_bytes + gb
                new_i = old_i if scan_inodes - ri <= old_i <= scan_inodes + gi else scan_inodes + gi
                if not may_lower:
                    new_b, new_i = max(new_b, old_b), max(new_i, old_i)
                verdict = "kept" if (new_b, new_i) == (old_b, old_i) else "corrected"
            self.used_bytes, self.used_inodes = new_b, new_i
            self._publish()
            return {"verdict": verdict, "bytes": new_b - old_b, "inodes": new_i - old_i}

    def snapshot(self) -> dict[str, int]:
        """The figures for stats and ``df``. While recovering the volume shows
        as full (nothing more fits until the usage is known)."""
        with self._lock:
            if self.recovering:
                return {"capacity": self.capacity, "used_bytes": self.capacity,
                        "used_inodes": self.inode_limit, "total_inodes": self.inode_limit}
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

    def charge(self, nbytes: int) -> None:
        """Charge ``nbytes`` before an operation, or raise ENOSPC (all or nothing)."""
        if nbytes <= 0:
            return
        with self._lock:
            if self.recovering and self.capacity:
                raise QuotaExceeded("the volume's usage is being recounted; nothing may grow yet")
            if self.capacity and self.used_bytes + nbytes > self.capacity:
                raise QuotaExceeded("the volume's capacity is reached")
            self.used_bytes += nbytes
            self.grown_bytes += nbytes
            if self._out is not None:
                self._out.publish(self.used_bytes, self.used_inodes)

    def adjust(self, delta: int) -> None:
        """Record a change measured after the fact (a refund, a settlement of
        what :meth:`charge` reserved, a file's real size on close)."""
        if delta:
            with self._lock:
                if not self.recovering:
                    self.used_bytes += delta
                    if delta > 0:
                        self.grown_bytes += delta
                    else:
                        self.released_bytes -= delta
                    if self._out is not None:
                        self._out.publish(self.used_bytes, self.used_inodes)

    def _add_bytes(self, delta: int) -> None:
        """Caller holds the lock, and the usage is known."""
        self.used_bytes += delta
        if delta > 0:
            self.grown_bytes += delta
        else:
            self.released_bytes -= delta
        if self._out is not None:
            self._out.publish(self.used_bytes, self.used_inodes)

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
            have = blocks(size)
            if end <= have:  # inside the last, already charged block
                state.size = end
                return end
            if self.recovering and self.capacity:
                return size
            grow = blocks(end) - have
            if self.capacity:
                room = self.capacity - self.used_bytes
                if grow > room:
                    grow = max(0, room) // BLOCK * BLOCK
                    end = min(end, have + grow)
                    if end <= size:
                        return size
            state.size = end
            if grow:
                self.used_bytes += grow
                self.grown_bytes += grow
                if self._out is not None:
                    self._out.publish(self.used_bytes, self.used_inodes)
            return end

    def reserve_exact(self, state: InodeState | None, old_size: int, new_size: int) -> None:
        """All-or-nothing size change (truncate, fallocate) before it happens.

        Raises :class:`QuotaExceeded` without charging anything if the growth
        does not fit. Shrinks are applied by :meth:`set_size` afterwards.
        """
        current = state.size if state is not None else old_size
        if new_size <= current:
            return
        self.charge(blocks(new_size) - blocks(current))
        if state is not None:
            state.size = new_size

    def set_size(self, state: InodeState | None, old_size: int, new_size: int) -> None:
        """Record a size the file really has now (after truncate, on close)."""
        with self._lock:
            if state is not None:
                old_size = state.size
                state.size = new_size
            if not self.recovering:
                delta = blocks(new_size) - blocks(old_size)
                if delta:
                    self._add_bytes(delta)

    def release_bytes(self, nbytes: int) -> None:
        """An object that was charged ``nbytes`` is gone."""
        self.adjust(-nbytes)

    # ------------------------------------------------------------ inodes

    def take_inode(self) -> None:
        """Charge a new inode, or raise ENOSPC at the inode limit."""
        with self._lock:
            if self.recovering and self.capacity:
                raise QuotaExceeded("the volume's usage is being recounted; nothing may grow yet")
            if self.used_inodes >= self.inode_limit:
                raise QuotaExceeded("the volume's inode limit is reached")
            self.used_inodes += 1
            self.grown_inodes += 1
            if self._out is not None:
                self._out.publish(self.used_bytes, self.used_inodes)

    def give_inode(self, count: int = 1) -> None:
        with self._lock:
            if not self.recovering:
                self.used_inodes -= count
                self.released_inodes += count
                if self._out is not None:
                    self._out.publish(self.used_bytes, self.used_inodes)
