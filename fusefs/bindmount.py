"""Bind, read-only remount and lazy detach through mount(2)/umount2(2) via ctypes.

No shell and no mount(8): the syscalls are called directly, and a bind's
target is passed as ``/proc/self/fd/N`` for a directory opened with
``O_PATH|O_NOFOLLOW``, after checking that the kernel's name for that fd is
exactly the validated path. Whatever happens to the path between validation
and the mount (a symlink swapped in somewhere), the mount lands on the
directory that was checked, or not at all.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from fusefs import mountinfo

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_RELATIME = 0x200000
MS_STRICTATIME = 0x1000000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

#: Per-mount flags that a read-only remount of a bind must carry over, or the
#: kernel would clear them (and a bind of a nosuid FUSE mount would turn suid).
_KEEP_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

#: At most this many mounts are peeled off one path: enough for any sane stack.
MAX_STACK = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str, path: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}")


def _mount(source: str, target: str, flags: int) -> None:
    _check(_libc.mount(source.encode(), target.encode(), None, flags, None), "mount", target)


@contextmanager
def opened_dir(path: str) -> Iterator[str]:
    """Yield ``/proc/self/fd/N`` for ``path`` opened without following a final symlink.

    Raises OSError(ELOOP/ENOTDIR) when ``path`` is not a plain directory, and
    EXDEV when the kernel's name for what was opened differs from ``path``
    (a symlink in a parent component).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        proc_path = f"/proc/self/fd/{fd}"
        if os.readlink(proc_path) != path:
            raise OSError(errno.EXDEV, f"{path} resolves elsewhere")
        yield proc_path
    finally:
        os.close(fd)


def bind(source: str, target: str, read_only: bool) -> None:
    """Bind ``source`` onto the existing directory ``target``; make it ro when asked.

    A read-only bind takes two syscalls; the second re-opens the target so it
    acts on the new mount, and carries the mount's nosuid/nodev/... flags.
    A failure of the second step detaches the half-made writable bind.
    """
    with opened_dir(source) as src, opened_dir(target) as dst:
        _mount(src, dst, MS_BIND)
    if not read_only:
        return
    try:
        remount_read_only(target)
    except OSError:
        detach(target)
        raise


def remount_read_only(target: str) -> None:
    """Make the bind at ``target`` read-only, keeping its other per-mount flags."""
    entry = mountinfo.top_mount(target)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY
    if entry is not None:
        for option in entry.options:
            flags |= _KEEP_FLAGS.get(option, 0)
    with opened_dir(target) as dst:
        _mount("none", dst, flags)


def detach(path: str) -> bool:
    """Lazily detach the top mount at ``path``; False when nothing was mounted there.

    MNT_DETACH is what works on a dead FUSE mount (ENOTCONN) and on a busy one;
    the umount propagates to slave copies in other mount namespaces.
    """
    result = _libc.umount2(path.encode(), MNT_DETACH | UMOUNT_NOFOLLOW)
    if result == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount2 {path}: {os.strerror(err)}")


def detach_all(path: str) -> int:
    """Detach every mount stacked at ``path``; returns how many were removed."""
    removed = 0
    for _ in range(MAX_STACK):
        if not mountinfo.mounts_at(path):
            return removed
        if not detach(path):
            break
        removed += 1
    if mountinfo.mounts_at(path):
        raise OSError(errno.EBUSY, f"{path} is still mounted after {removed} detaches")
    return removed
