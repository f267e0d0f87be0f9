"""Walks over pod-made trees by directory file descriptors: copy, remove, measure.

A pod owns the tree and may change it while the driver walks it (rename a
directory and a symlink into each other's place in a loop, make it 100,000
levels deep, put a million names in one directory). So every walk here:

* opens each component relative to its parent's fd with ``O_NOFOLLOW``
  (``O_DIRECTORY`` for directories): a name swapped for a symlink fails to
  open instead of leading out of the tree, and no path string is ever built;
* never crosses a mount (an entry whose ``st_dev`` differs from the root's is
  skipped by copy/measure and refused by remove);
* is iterative with an explicit stack. Only the deepest :data:`LIVE_LEVELS`
  levels keep their fds (and directory streams) open; an older level is
  reopened as ``..`` of its child when the walk climbs back to it, and its
  ``(st_dev, st_ino)`` must match what was recorded, or the walk stops with
  :class:`TreeChanged`. So fds stay bounded and memory is a few small
  objects per level, whatever the depth;
* streams each directory with ``os.scandir`` on an fd (never a list of its
  names). A reopened level resumes by skipping the entries it had consumed
  (remove starts over instead: what it removed is gone);
* copy charges every object against a :class:`Budget` (the target volume's
  capacity and inode limit) *before* writing it, and never writes more of a
  file than the budget has left, so the work is bounded by the target.

Policy for copies (the same as for restores, see ``archive``): setuid and
setgid bits are cleared on everything but directories (a setgid directory
only passes its group on, which Kubernetes ``fsGroup`` relies on), and only
``user.*`` xattrs are copied, so ``security.capability`` never is. FIFOs,
sockets and device nodes are left out. Sparse files stay sparse
(``SEEK_DATA``/``SEEK_HOLE``).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from fusefs import quota

log = logging.getLogger("fusepath.fdtree")

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Levels whose fds stay open during a walk (each holds up to three fds).
LIVE_LEVELS = 64
#: Hard-linked files whose first copy is remembered (one O_PATH fd each); past
#: this, further names of a file are copied as separate files, charged again.
MAX_LINK_FDS = 256
_COPY_CHUNK = 8 << 20
_KEPT_XATTR_PREFIX = "user."
#: Mode bits never given to a copied or restored non-directory.
STRIPPED_BITS = stat.S_ISUID | stat.S_ISGID


class TreeError(OSError):
    """A walk could not finish; ``errno`` says why when it is an OS error."""


class TreeChanged(TreeError):
    """The tree was rearranged under the walk (a reopened ``..`` is not the
    directory the walk left); the caller may retry later."""


class BudgetExceeded(TreeError):
    """The copy would not fit the target's capacity or inode limit."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(errno.ENOSPC if what == "bytes" else errno.EDQUOT,
                         f"the source needs more than the target's {limit} {what}")
        self.what = what
        self.limit = limit


def charge_of(mode: int, size: int) -> tuple[int, int]:
    """(bytes, inodes) one object costs against a volume's quota.

    The one place that follows fusefs's block model (``fusefs/quota.py``), so
    a clone or restore never makes a volume that is over quota the moment it
    is mounted: a regular file or a symlink costs its size (a symlink's size
    is its target's length) in whole blocks, a directory at least one block,
    and every object one inode. Hard links are charged once per inode by the
    callers; the root is the volume itself and is not charged.
    """
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return quota.blocks(size), 1
    if stat.S_ISDIR(mode):
        return quota.dir_charge(size), 1
    return 0, 1


@dataclass
class Budget:
    """Bytes and inodes a copy or restore may still use; None is unlimited."""

    max_bytes: int | None = None
    max_inodes: int | None = None
    used_bytes: int = 0
    used_inodes: int = 0

    def charge(self, nbytes: int, inodes: int) -> None:
        """Account for an object before it is made; raise if it does not fit."""
        if self.max_inodes is not None and self.used_inodes + inodes > self.max_inodes:
            raise BudgetExceeded("inodes", self.max_inodes)
        if self.max_bytes is not None and self.used_bytes + nbytes > self.max_bytes:
            raise BudgetExceeded("bytes", self.max_bytes)
        self.used_bytes += nbytes
        self.used_inodes += inodes

    def charge_stat(self, mode: int, size: int) -> None:
        self.charge(*charge_of(mode, size))


# --------------------------------------------------------------------------
# Mounts: st_dev alone misses a bind mount of the same filesystem

_libc = ctypes.CDLL(None, use_errno=True)
_AT_EMPTY_PATH = 0x1000
_STATX_MNT_ID = 0x1000
_STATX_BUF = 256
_STX_MNT_ID_OFFSET = 144


def mount_id(fd: int) -> int:
    """The id of the mount ``fd`` is on (statx STATX_MNT_ID), or -1 where the
    kernel cannot tell (then only ``st_dev`` tells mounts apart)."""
    buf = ctypes.create_string_buffer(_STATX_BUF)
    if _libc.statx(fd, b"", _AT_EMPTY_PATH, _STATX_MNT_ID, buf) != 0:
        return -1
    if not int.from_bytes(buf.raw[0:4], "little") & _STATX_MNT_ID:
        return -1
    return int.from_bytes(buf.raw[_STX_MNT_ID_OFFSET:_STX_MNT_ID_OFFSET + 8], "little")


# --------------------------------------------------------------------------
# The stack of open directories


@dataclass(slots=True)
class _Level:
    fd: int | None
    dev: int
    ino: int
    consumed: int = 0
    it: object | None = None  # an os.scandir iterator on fd
    reopened: bool = False  # its fd was closed and opened again through '..'


class _Chain:
    """Directories from the root down to the current one; only the deepest
    :data:`LIVE_LEVELS` hold fds. The root fd belongs to the caller."""

    def __init__(self, root_fd: int, resume: bool) -> None:
        st = os.fstat(root_fd)
        self.levels = [_Level(root_fd, st.st_dev, st.st_ino)]
        self.root_mount = mount_id(root_fd)
        self.resume = resume  # skip already-consumed entries when a level is reopened
        self.max_depth = 0

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    @property
    def fd(self) -> int:
        fd = self.levels[-1].fd
        assert fd is not None
        return fd

    def crosses_mount(self, fd: int) -> bool:
        """Whether the directory ``fd`` is on another mount than the root."""
        return os.fstat(fd).st_dev != self.levels[0].dev or mount_id(fd) != self.root_mount

    def push(self, fd: int) -> None:
        st = os.fstat(fd)
        self.levels.append(_Level(fd, st.st_dev, st.st_ino))
        self.max_depth = max(self.max_depth, self.depth)
        old = len(self.levels) - 1 - LIVE_LEVELS
        if old > 0 and self.levels[old].fd is not None:
            self._close(self.levels[old])

    def next_entry(self) -> os.DirEntry | None:
        """The next entry of the current directory, or None at its end."""
        level = self.levels[-1]
        if level.it is None:
            level.it = os.scandir(self.fd)
            if self.resume:
                for _ in range(level.consumed):
                    if next(level.it, None) is None:  # type: ignore[call-overload]
                        break
            else:
                level.consumed = 0
        entry = next(level.it, None)  # type: ignore[call-overload]
        if entry is not None:
            level.consumed += 1
        return entry

    def pop(self) -> None:
        """Leave the current directory for its parent, reopening the parent
        through ``..`` if its fd was closed, and checking it is the same one."""
        child = self.levels.pop()
        parent = self.levels[-1]
        try:
            if parent.fd is None:
                fd = os.open("..", DIR_FLAGS, dir_fd=child.fd)
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (parent.dev, parent.ino):
                    os.close(fd)
                    raise TreeChanged(errno.ESTALE, "a directory was moved while it was being walked")
                parent.fd = fd
                parent.reopened = True
        finally:
            self._close(child)

    def restart_current(self) -> None:
        """Forget the current directory's stream, to read it again from the start."""
        level = self.levels[-1]
        if level.it is not None:
            level.it.close()  # type: ignore[attr-defined]
            level.it = None
        level.consumed = 0

    def _close(self, level: _Level) -> None:
        if level.it is not None:
            level.it.close()  # type: ignore[attr-defined]
            level.it = None
        if level.fd is not None and level is not self.levels[0]:
            os.close(level.fd)
        level.fd = None

    def close(self) -> None:
        while len(self.levels) > 1:
            self._close(self.levels.pop())
        self._close(self.levels[0])


# --------------------------------------------------------------------------
# Remove


def remove_tree_at(parent_fd: int, name: str, deadline: float | None = None) -> int:
    """Remove ``name`` (a tree or a single entry) inside ``parent_fd``.

    Iterative, by fds; returns the number of entries removed. A mount found
    inside the tree stops the removal (EBUSY) rather than being crossed;
    passing ``deadline`` (time.monotonic) stops it with ETIMEDOUT. Either
    way what is left is a smaller tree that a later call finishes."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent_fd)
        return 1
    root_fd = os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    try:
        removed = _empty_dir(root_fd, deadline)
    finally:
        os.close(root_fd)
    _rmdir(parent_fd, name)
    return removed + 1


def _empty_dir(root_fd: int, deadline: float | None) -> int:
    chain = _Chain(root_fd, resume=False)
    names: list[str] = []  # names of the levels below the root, for rmdir on the way up
    removed = 0
    try:
        while True:
            if deadline is not None and removed % 1024 == 0 and time.monotonic() > deadline:
                raise TreeError(errno.ETIMEDOUT, f"stopped after removing {removed} entries; the rest later")
            entry = chain.next_entry()
            if entry is None:
                if chain.depth == 0:
                    return removed
                chain.pop()
                _rmdir(chain.fd, names.pop())
                removed += 1
                continue
            if entry.is_dir(follow_symlinks=False):
                fd = _open_dir(chain.fd, entry.name)
                if fd is None:  # swapped for a non-directory meanwhile
                    if not _unlink(chain.fd, entry.name):
                        chain.restart_current()
                    continue
                if chain.crosses_mount(fd):
                    os.close(fd)
                    raise TreeError(errno.EBUSY, f"a mount inside the tree at {entry.name!r}; not crossing it")
                chain.push(fd)
                names.append(entry.name)
            elif _unlink(chain.fd, entry.name):
                removed += 1
            else:
                chain.restart_current()  # became a directory meanwhile: read this one again
    finally:
        chain.close()


def _open_dir(parent_fd: int, name: str) -> int | None:
    """Open a subdirectory without following a symlink; None if it is gone
    or was replaced by something else (the caller reads the parent again)."""
    try:
        return os.open(name, DIR_FLAGS, dir_fd=parent_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        if exc.errno != errno.EACCES:
            raise
    os.chmod(name, 0o700, dir_fd=parent_fd, follow_symlinks=False)  # not root: open it up
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def _unlink(parent_fd: int, name: str) -> bool:
    """Unlink a non-directory; False if ``name`` is a directory now."""
    try:
        os.unlink(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return False
    except PermissionError:
        os.fchmod(parent_fd, 0o700)  # not root and a read-only directory
        os.unlink(name, dir_fd=parent_fd)
    return True


def _rmdir(parent_fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except PermissionError:
        os.fchmod(parent_fd, 0o700)
        os.rmdir(name, dir_fd=parent_fd)


# --------------------------------------------------------------------------
# Measure


@dataclass
class Usage:
    """What a tree holds, counted as fusefs counts it (see :func:`charge_of`),
    plus the allocated blocks the host sees and the deepest level."""

    bytes: int = 0
    inodes: int = 0
    allocated: int = 0
    max_depth: int = 0
    skipped_mounts: int = 0


def walk(root_fd: int) -> Iterator[tuple[int, os.DirEntry, list[str], int]]:
    """Every entry below ``root_fd``, depth first: ``(dir_fd, entry, names,
    prefix)`` where ``dir_fd`` is the entry's directory, ``names`` the
    directory names from the root down to it (one shared list: copy it to
    keep it) and ``prefix`` the length of ``"/".join(names) + "/"``, kept
    without joining (a join per entry would cost depth squared).
    Mounts are yielded but not entered."""
    chain = _Chain(root_fd, resume=True)
    names: list[str] = []
    prefixes = [0]
    try:
        while True:
            entry = chain.next_entry()
            if entry is None:
                if chain.depth == 0:
                    return
                chain.pop()
                names.pop()
                prefixes.pop()
                continue
            yield chain.fd, entry, names, prefixes[-1]
            if entry.is_dir(follow_symlinks=False):
                fd = _open_dir(chain.fd, entry.name)
                if fd is None:
                    continue
                if chain.crosses_mount(fd):
                    os.close(fd)
                    continue
                chain.push(fd)
                names.append(entry.name)
                prefixes.append(prefixes[-1] + len(entry.name) + 1)
    finally:
        chain.close()


def measure(root_fd: int) -> Usage:
    """Charged bytes, inodes and allocated bytes below ``root_fd`` (not the
    root itself), and the deepest level. Hard links count once (while at
    most ``MAX_LINK_FDS * 64`` linked inodes have been seen)."""
    usage = Usage()
    seen: set[int] = set()
    root_dev = os.fstat(root_fd).st_dev
    for _, entry, names, _ in walk(root_fd):
        st = entry.stat(follow_symlinks=False)
        usage.max_depth = max(usage.max_depth, len(names) + 1)
        if st.st_dev != root_dev:
            usage.skipped_mounts += 1
            continue
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in seen:
                continue
            if len(seen) < MAX_LINK_FDS * 64:
                seen.add(st.st_ino)
        nbytes, inodes = charge_of(st.st_mode, st.st_size)
        usage.bytes += nbytes
        usage.inodes += inodes
        usage.allocated += st.st_blocks * 512
    return usage


# --------------------------------------------------------------------------
# Copy


@dataclass
class CopyReport:
    """What a copy made and what it left out."""

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    skipped_special: int = 0
    skipped_mounts: int = 0
    stripped_setid: int = 0
    max_depth: int = 0
    budget: Budget = field(default_factory=Budget)


def copy_tree(src_root: int, dst_root: int, budget: Budget | None = None,
              progress: Callable[[int], None] | None = None) -> CopyReport:
    """Copy everything below the directory ``src_root`` into the empty
    directory ``dst_root`` (both fds), then the root's own attributes.

    Raises :class:`BudgetExceeded` before the target would go over its
    capacity or inode limit, :class:`TreeChanged` if the source was
    rearranged so that the walk lost its place, OSError otherwise. On any
    error the caller removes the partial copy."""
    report = CopyReport(budget=budget or Budget())
    copier = _Copier(src_root, dst_root, report, progress)
    try:
        copier.run()
    finally:
        copier.close()
    _apply_attrs(dst_root, os.fstat(src_root), src_root, report)
    report.max_depth = copier.src.max_depth
    return report


class _Copier:
    def __init__(self, src_root: int, dst_root: int, report: CopyReport,
                 progress: Callable[[int], None] | None) -> None:
        self.src = _Chain(src_root, resume=True)
        self.dst = _Chain(dst_root, resume=True)
        self.dev = self.src.levels[0].dev
        self.report = report
        self.budget = report.budget
        self.progress = progress
        self.links: dict[int, int] = {}  # source inode -> O_PATH fd of its first copy
        self.dir_stats: list[os.stat_result] = []  # source stat of each open level below the root

    def run(self) -> None:
        while True:
            entry = self.src.next_entry()
            if entry is None:
                if self.src.depth == 0:
                    return
                self._leave_dir()
                continue
            self._copy_entry(entry.name)

    def _leave_dir(self) -> None:
        st = self.dir_stats.pop()
        _apply_attrs(self.dst.fd, st, self.src.fd, self.report)
        self.src.pop()
        self.dst.pop()

    def _copy_entry(self, name: str) -> None:
        try:
            st = os.stat(name, dir_fd=self.src.fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # removed meanwhile: not in the copy
        if st.st_dev != self.dev:
            self.report.skipped_mounts += 1
            return
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            self._enter_dir(name, st)
        elif stat.S_ISREG(mode):
            self._copy_file(name, st)
        elif stat.S_ISLNK(mode):
            self._copy_symlink(name, st)
        else:
            self.report.skipped_special += 1

    def _exists_in_dst(self, name: str) -> bool:
        """After a level was reopened, entries already copied are skipped
        (the source may have reordered its directory meanwhile)."""
        if not self.src.levels[-1].reopened:
            return False
        try:
            os.stat(name, dir_fd=self.dst.fd, follow_symlinks=False)
            return True
        except FileNotFoundError:
            return False

    def _enter_dir(self, name: str, st: os.stat_result) -> None:
        fd = _open_dir(self.src.fd, name)
        if fd is None:
            return  # replaced by a non-directory meanwhile: left out
        try:
            fst = os.fstat(fd)
            if self.src.crosses_mount(fd):
                self.report.skipped_mounts += 1
                os.close(fd)
                return
            if not self._exists_in_dst(name):
                self.budget.charge_stat(fst.st_mode, 0)
                os.mkdir(name, 0o700, dir_fd=self.dst.fd)
                self.report.dirs += 1
            dfd = os.open(name, DIR_FLAGS, dir_fd=self.dst.fd)
        except BaseException:
            os.close(fd)
            raise
        self.src.push(fd)
        self.dst.push(dfd)
        self.dir_stats.append(fst)

    def _copy_symlink(self, name: str, st: os.stat_result) -> None:
        if self._exists_in_dst(name):
            return
        try:
            target = os.readlink(name, dir_fd=self.src.fd)
        except (FileNotFoundError, OSError) as exc:
            if isinstance(exc, FileNotFoundError) or exc.errno == errno.EINVAL:
                return  # gone or no longer a symlink
            raise
        self.budget.charge_stat(st.st_mode, len(os.fsencode(target)))
        os.symlink(target, name, dir_fd=self.dst.fd)
        self.report.symlinks += 1
        if os.geteuid() == 0:
            os.chown(name, st.st_uid, st.st_gid, dir_fd=self.dst.fd, follow_symlinks=False)
        os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=self.dst.fd, follow_symlinks=False)

    def _copy_file(self, name: str, st: os.stat_result) -> None:
        if self._exists_in_dst(name):
            return
        fd = _open_regular(self.src.fd, name)
        if fd is None:
            self.report.skipped_special += 1  # gone, or swapped for a symlink or special file: left out
            return
        try:
            fst = os.fstat(fd)
            if fst.st_dev != self.dev or mount_id(fd) != self.src.root_mount:
                self.report.skipped_mounts += 1
                return
            if fst.st_nlink > 1 and self._link_again(name, fst):
                return
            self.budget.charge_stat(fst.st_mode, fst.st_size)
            out = os.open(name, NEW_FILE_FLAGS, 0o600, dir_fd=self.dst.fd)
            try:
                copy_data(fd, out, fst.st_size)
                _apply_attrs(out, fst, fd, self.report)
                self._remember_link(out, fst)
            finally:
                os.close(out)
            self.report.files += 1
            if self.progress is not None:
                self.progress(self.budget.used_bytes)
        finally:
            os.close(fd)

    def _link_again(self, name: str, fst: os.stat_result) -> bool:
        first = self.links.get(fst.st_ino)
        if first is None:
            return False
        try:  # linkat(AT_SYMLINK_FOLLOW) of an O_PATH fd's magic link needs CAP_DAC_READ_SEARCH
            os.link(f"/proc/self/fd/{first}", name, dst_dir_fd=self.dst.fd, follow_symlinks=True)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EPERM, errno.EACCES):
                raise
            return False  # copied as a file of its own (and charged again)
        self.report.hardlinks += 1
        return True

    def _remember_link(self, out: int, fst: os.stat_result) -> None:
        if fst.st_nlink > 1 and len(self.links) < MAX_LINK_FDS:
            self.links[fst.st_ino] = os.open(f"/proc/self/fd/{out}", os.O_PATH | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in self.links.values():
            os.close(fd)
        self.links.clear()
        self.src.close()
        self.dst.close()


def _open_regular(dir_fd: int, name: str) -> int | None:
    """Open ``name`` for reading only if it is a regular file, or None.

    It is first opened with ``O_PATH | O_NOFOLLOW``, which opens nothing
    (not a device a pod swapped in, not the target of a symlink), checked,
    and only then reopened for reading through ``/proc/self/fd``, which
    reaches that same inode whatever the name points at by then."""
    try:
        path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(path_fd).st_mode):
            return None
        return os.open(f"/proc/self/fd/{path_fd}", FILE_FLAGS & ~os.O_NOFOLLOW)
    finally:
        os.close(path_fd)


def copy_data(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes from ``src`` to ``dst``, keeping holes as holes.

    Never more than ``size`` bytes, even if the source grows meanwhile (the
    budget charged ``size``); a source that shrinks ends the copy early."""
    offset = 0
    while offset < size:
        try:
            data = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # only a hole is left
            if exc.errno != errno.EINVAL:
                raise
            data = offset  # no SEEK_DATA here: copy everything
        if data >= size:
            break
        try:
            hole = min(os.lseek(src, data, os.SEEK_HOLE), size)
        except OSError:
            hole = size
        pos = data
        while pos < hole:
            n = _copy_range(src, dst, pos, min(hole - pos, _COPY_CHUNK))
            if n == 0:
                hole = size = pos  # the source got shorter
                break
            pos += n
        offset = hole
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, pos: int, length: int) -> int:
    try:
        return os.copy_file_range(src, dst, length, pos, pos)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    data = os.pread(src, length, pos)
    view = memoryview(data)
    while view:
        view = view[os.pwrite(dst, view, pos + len(data) - len(view)):]
    return len(data)


def _apply_attrs(dst: int, st: os.stat_result, src: int | None, report: CopyReport) -> None:
    """Owner, then mode (chown clears setuid; setid bits are stripped from
    non-directories), then ``user.*`` xattrs, then times."""
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode) and mode & STRIPPED_BITS:
        mode &= ~STRIPPED_BITS
        report.stripped_setid += 1
    if os.geteuid() == 0:
        os.fchown(dst, st.st_uid, st.st_gid)
    elif stat.S_ISDIR(st.st_mode):
        mode &= ~stat.S_ISGID
    os.fchmod(dst, mode)
    if src is not None:
        _copy_user_xattrs(src, dst)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_user_xattrs(src: int, dst: int) -> None:
    try:
        names = os.listxattr(src)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for key in names:
        if not key.startswith(_KEPT_XATTR_PREFIX):
            continue
        try:
            os.setxattr(dst, key, os.getxattr(src, key))
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.ENODATA, errno.EPERM):
                raise
