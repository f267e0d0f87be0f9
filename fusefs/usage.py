"""Knowing a volume's usage at mount: the persisted figures, or a scan.

A session persists its usage in a small file of its own, outside the backing
directory (beside its control socket, in the daemon's 0700 state directory,
so a pod can never write it). The file is marked *dirty* as soon as a
session has loaded it and *clean* again, with the final figures, when the
session ends after unmounting. At the next mount a clean file is trusted if
the backing directory is still the one it describes (same device, inode and
ctime of its root: a new volume under a reused ID, or a host-side change in
its root, shows as a mismatch); anything else means the usage is rebuilt by
:func:`scan`, in the background, while the quota refuses all growth.

The scan walks by directory file descriptors (``openat`` with
``O_NOFOLLOW|O_DIRECTORY``), iteratively, so a tree deeper than PATH_MAX or
than the recursion limit is measured like any other; it keeps at most
:data:`FDS_KEPT` directories open and climbs back with ``..``, checked
against the inode it expects. An entry it cannot measure is reported
(:attr:`ScanResult.unmeasured`), never counted as free.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any

from fusefs.quota import dir_charge, inode_charge, xattr_bytes

log = logging.getLogger("fusefs.usage")

#: Directory descriptors the scan keeps open at most (deeper ancestors are
#: closed and reopened through ``..`` on the way back up).
FDS_KEPT = 64
#: How many unmeasurable entries are described in the result (all are counted).
MAX_REPORTED = 10
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FORMAT_VERSION = 1


class ScanAborted(Exception):
    """The tree changed under the scan in a way that makes it unsound."""


@dataclass
class ScanResult:
    """What a walk of a backing directory found (see fusefs.quota's model)."""

    used_bytes: int = 0
    used_inodes: int = 1
    #: Bytes of that for directories (the root's first block excluded).
    dir_bytes: int = 0
    #: Whether any extended attribute, and any ``security.capability``, exists.
    xattrs: bool = False
    capability: bool = False
    unmeasured: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, what: str) -> None:
        self.unmeasured += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append(what)


def xattr_total(path: str | int, result: ScanResult | None = None, follow: bool = False) -> int:
    """Sum of :func:`fusefs.quota.xattr_bytes` over an inode's attributes.

    ``path`` is a descriptor or a path whose last component is not followed
    unless ``follow`` (for ``/proc/self/fd/N`` of an ``O_PATH`` descriptor,
    which the f*xattr calls refuse; the magic link leads to the inode
    itself, a symbolic link included).
    """
    follow = follow or isinstance(path, int)
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError:
        return 0  # ENOTSUP on the backing fs, or gone meanwhile: nothing charged for it
    total = 0
    for name in names:
        try:
            value = os.getxattr(path, name, follow_symlinks=follow)
        except OSError:
            continue
        total += xattr_bytes(len(os.fsencode(name)), len(value))
        if result is not None:
            result.xattrs = True
            if name == "security.capability":
                result.capability = True
    return total


class _Dir:
    """One directory on the walk's stack."""

    __slots__ = ("fd", "ino", "pending", "label")

    def __init__(self, fd: int, ino: int, pending: list[str], label: str) -> None:
        self.fd = fd
        self.ino = ino
        self.pending = pending  # subdirectory names still to visit
        self.label = label      # for error messages only


def scan(root_fd: int, should_stop: Any = None) -> ScanResult:
    """Measure the tree under ``root_fd`` (a directory descriptor).

    Hard links are counted once. Symlinks are not followed and other
    filesystems mounted inside are not entered (each is reported as
    unmeasured). Entries that vanish during the walk are skipped (a pod may
    delete while the scan runs; see the module docstring). Raises
    :class:`ScanAborted` if the tree moved under the walk.
    """
    result = ScanResult()
    root = os.fstat(root_fd)
    result.used_bytes = inode_charge(root, xattr_total(root_fd, result)) - dir_charge(0)
    result.dir_bytes = dir_charge(root.st_size) - dir_charge(0)
    seen_links: set[int] = set()
    top = os.dup(root_fd)
    stack = [_Dir(top, root.st_ino, _list(top, root.st_dev, result, seen_links, "."), ".")]
    try:
        while stack:
            if should_stop is not None and should_stop():
                raise ScanAborted("stopped")
            cur = stack[-1]
            if cur.pending:
                name = cur.pending.pop()
                try:
                    fd = os.open(name, _DIR_FLAGS, dir_fd=cur.fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    result.problem(f"{cur.label}/{name}: {exc.strerror}")
                    continue
                st = os.fstat(fd)
                if len(stack) >= FDS_KEPT:
                    old = stack[-FDS_KEPT]
                    if old.fd >= 0:
                        os.close(old.fd)
                        old.fd = -1
                label = f"{cur.label}/{name}" if len(cur.label) < 200 else cur.label
                stack.append(_Dir(fd, st.st_ino, _list(fd, root.st_dev, result, seen_links, label), label))
                continue
            stack.pop()
            if stack and stack[-1].fd < 0:
                parent = stack[-1]
                fd = os.open("..", _DIR_FLAGS, dir_fd=cur.fd)
                if os.fstat(fd).st_ino != parent.ino:
                    os.close(fd)
                    os.close(cur.fd)
                    raise ScanAborted(f"{parent.label} moved during the scan")
                parent.fd = fd
            os.close(cur.fd)
    finally:
        for d in stack:
            if d.fd >= 0:
                os.close(d.fd)
    return result


def _list(dfd: int, dev: int, result: ScanResult, seen_links: set[int], label: str) -> list[str]:
    """Account for every entry of one directory; return its subdirectories."""
    subdirs: list[str] = []
    try:
        entries = os.scandir(dfd)
    except OSError as exc:
        result.problem(f"{label}: {exc.strerror}")
        return subdirs
    with entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            except OSError as exc:
                result.problem(f"{label}/{entry.name}: {exc.strerror}")
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir and st.st_dev != dev:
                result.problem(f"{label}/{entry.name}: another filesystem is mounted here")
                continue
            if st.st_nlink > 1 and not is_dir:
                if st.st_ino in seen_links:
                    continue
                seen_links.add(st.st_ino)
            # The xattr calls have no *at form: go through the directory's
            # descriptor in /proc, which no pod can redirect, and do not
            # follow the last component.
            charge = inode_charge(st, xattr_total(f"/proc/self/fd/{dfd}/{entry.name}", result))
            result.used_inodes += 1
            result.used_bytes += charge
            if is_dir:
                result.dir_bytes += dir_charge(st.st_size)
                subdirs.append(entry.name)
    return subdirs


# ---------------------------------------------------------------- the usage file


def root_identity(root_fd: int) -> dict[str, int]:
    """What ties a usage file to one backing directory, unchanged since."""
    st = os.fstat(root_fd)
    return {"dev": st.st_dev, "ino": st.st_ino, "ctime_ns": st.st_ctime_ns}


def load(path: str, root_fd: int) -> dict[str, Any] | None:
    """The persisted usage if it is clean and describes this directory."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable usage file; rescanning", extra={"fields": {"path": path, "error": str(exc)}})
        return None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        return None
    if not data.get("clean"):
        log.info("usage file not clean (the last session did not end cleanly); rescanning")
        return None
    if data.get("root") != root_identity(root_fd):
        log.info("usage file describes another directory, or the root changed since; rescanning")
        return None
    for key in ("used_bytes", "used_inodes"):
        if not isinstance(data.get(key), int) or data[key] < 0:
            return None
    return data


def store(path: str, root_fd: int, *, clean: bool, used_bytes: int = 0, used_inodes: int = 0,
          xattrs: bool = True, capability: bool = True) -> None:
    """Write the usage file atomically (a temporary file, fsync, rename)."""
    data = {"version": FORMAT_VERSION, "clean": clean, "root": root_identity(root_fd),
            "used_bytes": used_bytes, "used_inodes": used_inodes, "xattrs": xattrs, "capability": capability}
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def mark_dirty(path: str, root_fd: int) -> bool:
    """Before serving: a crash from now on must not leave a clean file."""
    try:
        store(path, root_fd, clean=False)
        return True
    except OSError as exc:
        log.warning("cannot mark the usage file dirty", extra={"fields": {"path": path, "error": str(exc)}})
        try:
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True
