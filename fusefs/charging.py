"""Charging an operation for the quota, around its system call: both engines.

:mod:`fusefs.quota` is the arithmetic (what an object costs, the counters)
and makes no system call. This module applies that model to operations on
the backing directory, once for both FUSE engines: the libfuse engine's
filesystem (:mod:`fusefs.operations`, by path) and the kernel engine's
(:mod:`fusefs.kernel.inodefs`, by node). Each engine finds the descriptors,
names and directory sizes its own way and hands them here, so a volume is
charged the same whichever engine serves it, and a fix to the model is
made once.

The pieces:

- :func:`name_op`: an operation that adds or removes names (create, mkdir,
  link, rename, unlink, rmdir) reserves what it may cost first (all or
  nothing), runs, then settles on what its directories' sizes really did
  (the kernel holds a directory's lock across any operation on its entries,
  so the before/after sizes are exact);
- :func:`name_removed` and :func:`last_close`: an inode whose last name
  goes away is uncharged at once, or on its last close if it is open;
- :func:`truncate_fd`, :func:`fallocate_fd`, :func:`resync_size`: size
  changes of an open file;
- :func:`set_xattr`, :func:`removed_xattr`: extended attributes, capped per
  inode;
- :class:`OpenFiles`: the per-volume cap on open files and directories;
- :func:`check_rename_flags`: the rename flags a volume supports;
- :func:`statfs_counts`: what ``df`` shows (full while the usage is unknown).
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from fusefs.quota import (
    BLOCK,
    XATTR_MAX_PER_INODE,
    InodeState,
    Quota,
    QuotaExceeded,
    blocks,
    dir_charge,
    inode_charge,
    xattr_bytes,
)

T = TypeVar("T")

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
#: The rename flags a volume supports; others (RENAME_WHITEOUT, which makes
#: a character device, and any future flag) are refused with EINVAL.
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE
#: Open files and directories per volume when none is given (see docs/fusefs.md).
MAX_OPEN_FILES = 16384
#: Block size ``statfs`` reports.
STATFS_BLOCK = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_INSERT_RANGE = 0x20


def check_rename_flags(flags: int) -> None:
    """EINVAL for a flag other than RENAME_NOREPLACE and RENAME_EXCHANGE
    (RENAME_WHITEOUT would make a device node, outside quota and rules)."""
    if flags & ~RENAME_FLAGS:
        raise OSError(errno.EINVAL, "unsupported rename flags")


# ---------------------------------------------------------------- names


def name_op(quota: Quota, sizes: Callable[[], Sequence[int | None]], op: Callable[[], T], *,
            growth: int = BLOCK, own: int = 0, inode: bool = False, moves: bool = False) -> T:
    """Run namespace operation ``op`` with its charge, all or nothing.

    ``sizes`` returns the ``st_size`` of every directory whose entries ``op``
    changes (None for one that is gone). Before ``op``: an inode if
    ``inode``, and ``own + growth`` bytes (``own``: the new object's own
    cost; ``growth``: room for the directories to grow, a block for a new
    name, 0 for an operation that only removes or reuses one), or ENOSPC
    with nothing charged. After it: ``growth`` is replaced by what the
    directories really grew (or a refund of what they shrank). If ``op``
    raises, everything is given back. ``moves``: ``op`` gives an existing
    inode a name elsewhere (rename, link), which an audit of the usage
    running now must know (see :meth:`fusefs.quota.Quota.audit_end`).
    """
    if moves:
        quota.note_move()
    if not (growth or own or inode):
        # Only removes names: nothing to charge, and nothing to measure.
        # ext4 and XFS directories never shrink when entries go; one that
        # does (tmpfs) keeps its old charge until the next scan, which errs
        # on the side of too much, never too little. Saves two stats per
        # unlink, rmdir and rename over an existing name.
        return op()
    if inode:
        quota.take_inode()
    try:
        quota.charge(own + growth)
    except QuotaExceeded:
        if inode:
            quota.give_inode()
        raise
    try:
        before = sizes()
        result = op()
    except BaseException:
        quota.release_bytes(own + growth)
        if inode:
            quota.give_inode()
        raise
    delta = 0
    for old, new in zip(before, sizes()):
        if old is not None and new is not None:  # a directory removed meanwhile settles itself
            delta += dir_charge(new) - dir_charge(old)
    quota.adjust(delta - growth)
    return result


def name_removed(quota: Quota, st: os.stat_result, extra: int, opened: InodeState | None) -> None:
    """A name is gone (unlink, rmdir, rename over it); ``st`` is its inode's
    ``lstat`` from before, ``extra`` the inode's xattr charge if this was its
    last name (see :func:`xattr_charge`), ``opened`` the inode's state if it
    has open handles (the caller holds the lock that guards it).

    A directory, or the last name of an inode nobody has open, is uncharged
    now; an open inode is marked orphan and uncharged on its last close."""
    is_dir = stat.S_ISDIR(st.st_mode)
    if not is_dir and st.st_nlink > 1:
        return  # other names still hold the inode
    if opened is not None and not is_dir:
        opened.orphan = True
        opened.extra = extra
        return
    quota.release_bytes(inode_charge(st) + extra)
    quota.give_inode()


def orphan_freed(quota: Quota, size: int, extra: int) -> None:
    """An inode kept in the kernel engine's orphan directory (its last name
    went while it was open; see fusefs.kernel.orphans) is really freed now:
    uncharge it, ``size`` bytes and ``extra`` for its xattrs."""
    quota.release_bytes(blocks(size) + extra)
    quota.give_inode()


def xattr_charge(st: os.stat_result, total: Callable[[], int]) -> int:
    """The xattr charge that goes with an inode if the name being removed is
    its last (``total()`` measures its attributes), else 0."""
    if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
        return 0
    return blocks(total())


# ---------------------------------------------------------------- open files


def last_close(quota: Quota, state: InodeState, fd: int) -> None:
    """The last handle of an inode closes (``fd``, still open): uncharge an
    orphan, or charge the size the file really has if a writer changed it
    behind our back (a short write, mmap)."""
    if state.orphan:
        quota.release_bytes(blocks(state.size) + state.extra)
        quota.give_inode()
    elif state.writable:  # read-only handles cannot have changed the size
        actual = os.fstat(fd).st_size
        if actual != state.size:
            quota.set_size(None, state.size, actual)


def resync_size(quota: Quota, fd: int, state: InodeState) -> None:
    """After a failed or short write, charge what the file really holds."""
    try:
        actual = os.fstat(fd).st_size
    except OSError:
        return
    quota.set_size(state, 0, actual)


def truncate_fd(quota: Quota, fd: int, state: InodeState, length: int) -> None:
    """ftruncate(2), charged all or nothing before it grows the file."""
    old = state.size
    if length > old:
        quota.reserve_exact(state, old, length)
    try:
        os.ftruncate(fd, length)
    except BaseException:
        if length > old:
            quota.set_size(state, 0, old)
        raise
    if length < old:
        quota.set_size(state, old, length)


def fallocate_fd(quota: Quota, fd: int, state: InodeState, mode: int, offset: int, length: int,
                 call: Callable[[int, int, int, int], Any]) -> None:
    """fallocate(2) through ``call(fd, mode, offset, length)`` (raises OSError).

    Growth of the size is charged before, all or nothing. Blocks past the
    end of file (FALLOC_FL_KEEP_SIZE) would be invisible to the size-based
    charge, so they are refused (EOPNOTSUPP, which makes posix_fallocate
    fall back to writing)."""
    size = state.size
    if mode & FALLOC_FL_KEEP_SIZE:
        if not mode & FALLOC_FL_PUNCH_HOLE and offset + length > size:
            raise OSError(errno.EOPNOTSUPP, "blocks past end of file would escape the quota")
        call(fd, mode, offset, length)
        return
    if mode & FALLOC_FL_COLLAPSE_RANGE:
        call(fd, mode, offset, length)
        quota.set_size(state, 0, os.fstat(fd).st_size)
        return
    new_size = size + length if mode & FALLOC_FL_INSERT_RANGE else max(size, offset + length)
    quota.reserve_exact(state, size, new_size)
    try:
        call(fd, mode, offset, length)
    except OSError:
        quota.set_size(state, 0, os.fstat(fd).st_size)
        raise


class OpenFiles:
    """The volume's cap on open files and directories (EMFILE past it, to
    that opener only), so a pod cannot use up the session's descriptors."""

    __slots__ = ("limit", "count", "refused", "_lock")

    def __init__(self, limit: int = MAX_OPEN_FILES) -> None:
        self.limit = limit
        #: Open now, and opens refused at the cap so far.
        self.count = 0
        self.refused = 0
        self._lock = threading.Lock()

    def take(self, check: bool = True) -> None:
        """Count one more open; EMFILE at the cap unless ``check`` is False
        (an open the kernel already holds, adopted after a handover)."""
        with self._lock:
            if check and self.count >= self.limit:
                self.refused += 1
                raise OSError(errno.EMFILE, "the volume's open-file cap is reached")
            self.count += 1

    def give(self) -> None:
        with self._lock:
            self.count -= 1

    def open(self, path: Any, flags: int, mode: int = 0o777, dir_fd: int | None = None) -> int:
        """os.open under the cap. The session's own descriptor table filling
        up is ENFILE to the opener (the system's limit, from its point of
        view), never EMFILE to everyone."""
        self.take()
        try:
            return os.open(path, flags, mode, dir_fd=dir_fd)
        except OSError as exc:
            self.give()
            if exc.errno == errno.EMFILE:
                raise OSError(errno.ENFILE, "the volume's session has no descriptor left") from exc
            raise


def sync_files(lock: threading.Lock, handles: Iterable[Any], root_fd: int) -> int:
    """fsync every handle open for writing, then the root (the last step of
    a freeze); returns how many files. Descriptors are duplicated under
    ``lock`` (the one that guards ``handles``) so that a concurrent release
    cannot close one, and its number be reused, under our feet."""
    with lock:
        fds = [os.dup(h.fd) for h in handles if h.writable]
    for fd in fds:
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.fsync(root_fd)
    return len(fds)


# ---------------------------------------------------------------- xattrs


def set_xattr(quota: Quota, total: int, name_len: int, old_len: int, new_len: int,
              call: Callable[[], Any]) -> None:
    """Set one attribute through ``call()``: ``total`` is the inode's xattr
    total now (see :func:`fusefs.usage.xattr_total`), ``old_len`` the
    attribute's current value length (-1: not set). ENOSPC past
    XATTR_MAX_PER_INODE; growth in blocks is charged before the call."""
    new_total = total + xattr_bytes(name_len, new_len) - (xattr_bytes(name_len, old_len) if old_len >= 0 else 0)
    if new_total > XATTR_MAX_PER_INODE:
        raise OSError(errno.ENOSPC, "the inode's extended attributes are full")
    delta = blocks(new_total) - blocks(total)
    quota.charge(delta)
    try:
        call()
    except BaseException:
        quota.adjust(-max(delta, 0))
        raise
    if delta < 0:
        quota.adjust(delta)


def xattr_len(where: Any, name: bytes, follow: bool = False) -> int:
    """The length of attribute ``name``'s value at ``where``, or -1 if it is
    not set (``follow``: as for :func:`fusefs.usage.xattr_total`)."""
    try:
        return len(os.getxattr(where, name, follow_symlinks=follow))
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
            return -1
        raise


def removed_xattr(quota: Quota, total: int, name_len: int, old_len: int) -> None:
    """An attribute of ``old_len`` bytes was removed from an inode whose
    xattr total was ``total``: refund the blocks that freed."""
    quota.adjust(blocks(total - xattr_bytes(name_len, old_len)) - blocks(total))


# ---------------------------------------------------------------- statfs


def statfs_counts(quota: Quota, root_fd: int) -> tuple[int, int, int, int, int]:
    """(blocks, bfree, bavail, files, ffree) in :data:`STATFS_BLOCK` units:
    the capacity and usage, or the host's figures without a capacity.
    While the usage is being recounted the volume shows as full."""
    q = quota.snapshot()
    if q["capacity"]:
        total = q["capacity"] // STATFS_BLOCK
        used = -(-q["used_bytes"] // STATFS_BLOCK)
        free = max(0, total - used)
        bfree = bavail = free
    else:
        host = os.statvfs(root_fd)
        scale = host.f_frsize / STATFS_BLOCK
        total, bfree, bavail = (int(host.f_blocks * scale), int(host.f_bfree * scale),
                                int(host.f_bavail * scale))
    return total, bfree, bavail, q["total_inodes"], max(0, q["total_inodes"] - q["used_inodes"])
