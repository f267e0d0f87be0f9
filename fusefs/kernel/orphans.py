"""The orphan directory of a kernel-engine session (``--orphan-dir``).

A file a pod unlinked (or renamed over) while it still holds it open is
kept here, hard-linked under its node ID before its name goes, so that its
inode outlives a SIGKILL of the session (see :mod:`fusefs.kernel.nodes`).
The directory is outside the volume (a pod never sees it) and on the same
filesystem (a hard link cannot cross). The daemon makes it, 0700, per volume.

Only the session puts anything here, and only regular files; all the same
its contents are treated as hostile: :func:`empty` walks it by directory
descriptors with ``O_NOFOLLOW``, iteratively, never by path strings, never
across a mount, and at most :data:`MAX_DEPTH` levels deep (deeper trees are
left, with a warning: nothing of ours is ever deeper than one level).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

log = logging.getLogger("fusefs.kernel.orphans")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How deep :func:`empty` goes into directories (ours has none).
MAX_DEPTH = 16


def open_dir(path: str, source_fd: int) -> int:
    """The orphan directory, opened; ValueError if it is not a real directory
    on the volume source's filesystem (a hard link there would fail)."""
    fd = os.open(path, _DIR_FLAGS)
    try:
        st, src = os.fstat(fd), os.fstat(source_fd)
        if st.st_dev != src.st_dev:
            raise ValueError(f"orphan directory {path!r} is not on the volume's filesystem")
        if st.st_mode & 0o077:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o700)
    except BaseException:
        os.close(fd)
        raise
    return fd


def name_for(nodeid: int) -> str:
    """An orphan's name: its node ID, never reused while the connection lives
    (and a fresh connection starts with an empty directory)."""
    return str(nodeid)


def empty(dir_fd: int, keep: set[str] | frozenset[str] = frozenset()) -> int:
    """Remove everything in ``dir_fd`` but the top-level names in ``keep``.
    Returns how many entries were removed. A directory that cannot be
    removed (a mount in it, too deep) is left, and never entered again, so
    the walk ends."""
    removed = 0
    dev = os.fstat(dir_fd).st_dev
    left: set[int] = set()  # inodes of directories given up
    stack: list[tuple[int, str | None, int]] = [(os.dup(dir_fd), None, 0)]  # (fd, name in parent, ino)
    try:
        while stack:
            fd = stack[-1][0]
            descended = False
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name
                    if len(stack) == 1 and name in keep:
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        if entry.inode() in left:
                            continue
                        child = _enter(fd, name, dev, len(stack))
                        if child < 0:
                            left.add(entry.inode())
                            continue
                        stack.append((child, name, entry.inode()))
                        descended = True
                        break
                    try:
                        os.unlink(name, dir_fd=fd)
                        removed += 1
                    except FileNotFoundError:
                        pass
            if descended:
                continue
            fd, name, ino = stack.pop()
            os.close(fd)
            if name is not None and stack:
                try:
                    os.rmdir(name, dir_fd=stack[-1][0])
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    log.warning("an orphan directory entry cannot be removed; left",
                                extra={"fields": {"name": name, "error": str(exc)}})
                    left.add(ino)
    finally:
        for fd, _, _ in stack:
            os.close(fd)
    return removed


def remove_dir(parent_fd: int, name: str) -> None:
    """Empty ``name`` (a directory in ``parent_fd``) and remove it; nothing
    if it is not there."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return
    try:
        empty(fd)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def _enter(parent_fd: int, name: str, dev: int, depth: int) -> int:
    """A subdirectory opened to empty it, or -1: too deep, gone, a mount."""
    if depth > MAX_DEPTH:
        log.warning("orphan directory too deep; left", extra={"fields": {"name": name}})
        return -1
    try:
        child = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return -1
    if os.fstat(child).st_dev != dev:
        os.close(child)  # a mount: never entered
        return -1
    return child
