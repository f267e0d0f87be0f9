"""Bind, read-only remount and lazy detach through the mount syscalls via ctypes.

No shell and no mount(8): the syscalls are called directly, and a bind's
target is passed as ``/proc/self/fd/N`` (or the fd itself) for a directory
opened with ``O_PATH|O_NOFOLLOW``, after checking that the kernel's name for
that fd is exactly the validated path. Whatever happens to the path between
validation and the mount (a symlink swapped in somewhere), the mount lands on
the directory that was checked, or not at all.

``bind_on_top`` is how the fusefs daemon publishes: with the new mount API
(open_tree, mount_setattr, move_mount; Linux 5.12+) it makes a detached
clone of the staging mount, gives it a peer group of its own and, when
asked, makes it read-only, all before it is attached. Attaching it on top of
whatever the target holds then propagates one finished, correctly flagged
mount to every copy of the target: the host's and those of containers that
follow it (``mountPropagation: HostToContainer``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable, Iterator
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
MS_PRIVATE = 1 << 18
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

# The new mount API. Syscall numbers from 424 on are the same on every
# architecture (x86_64, aarch64, ...).
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
OPEN_TREE_CLONE = 0x1
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOVE_MOUNT_T_EMPTY_PATH = 0x40
MOUNT_ATTR_RDONLY = 0x1

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

#: At most this many mounts are peeled off one path. The daemon stacks at
#: most ``volumes.MAX_LAYERS`` mounts on a target, so this is enough.
MAX_STACK = 16

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    """``struct mount_attr`` (MOUNT_ATTR_SIZE_VER0, 32 bytes)."""

    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


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
    with opened_dir_fd(path) as fd:
        yield f"/proc/self/fd/{fd}"


@contextmanager
def opened_dir_fd(path: str) -> Iterator[int]:
    """``opened_dir``, yielding the O_PATH descriptor itself.

    Opening with O_PATH never calls into the filesystem, so this works on a
    dead FUSE mount (ENOTCONN for everything else) as well as on a live one.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != path:
            raise OSError(errno.EXDEV, f"{path} resolves elsewhere")
        yield fd
    finally:
        os.close(fd)


def _syscall(number: int, what: str, path: str, *args: object) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what} {path}: {os.strerror(err)}")
    return int(result)


def _set_attr(tree_fd: int, path: str, attr_set: int = 0, propagation: int = 0) -> None:
    attr = _MountAttr(attr_set=attr_set, attr_clr=0, propagation=propagation, userns_fd=0)
    _syscall(SYS_MOUNT_SETATTR, "mount_setattr", path, ctypes.c_int(tree_fd), ctypes.c_char_p(b""),
             ctypes.c_uint(AT_EMPTY_PATH), ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))


def bind_on_top(source: str, target: str, read_only: bool) -> None:
    """Bind the top mount at ``source`` onto ``target``, on top of whatever is there.

    Nothing at ``target`` is detached: a dead mount left there by a crashed
    FUSE session stays underneath, because containers hold copies of it
    that follow it (rslave), and only a mount made *on* it reaches them.

    The new mount is finished before it is attached, so every propagated
    copy is identical to it: read-only from the first instant when asked
    (a bind followed by a read-only remount would propagate a writable
    copy, as remounts do not propagate), and shared in a peer group of its
    own, so that the next mount on top of it reaches its copies too and
    never those of another target or of the staging mount.
    """
    with opened_dir_fd(source) as src, opened_dir_fd(target) as dst:
        tree = _syscall(SYS_OPEN_TREE, "open_tree", source, ctypes.c_int(src), ctypes.c_char_p(b""),
                        ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC | AT_EMPTY_PATH))
        try:
            _set_attr(tree, source, propagation=MS_PRIVATE)  # leave the staging mount's group
            _set_attr(tree, source, attr_set=MOUNT_ATTR_RDONLY if read_only else 0, propagation=MS_SHARED)
            _syscall(SYS_MOVE_MOUNT, "move_mount", target, ctypes.c_int(tree), ctypes.c_char_p(b""),
                     ctypes.c_int(dst), ctypes.c_char_p(b""),
                     ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH))
        finally:
            os.close(tree)  # a clone never attached is freed here


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
    """Detach every mount stacked at ``path`` (someone else's too); returns how many."""
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


def detach_ours(path: str, is_ours: Callable[[mountinfo.MountEntry | None], bool]) -> int:
    """Detach the mounts stacked at ``path`` from the top down while ``is_ours`` says so.

    A umount always removes the top of a stack, so a stack of dead mounts
    (one per restart) is peeled one layer per call, bottom included; a
    foreign mount (not ``is_ours``) ends the peeling and is left alone.
    Bounded by MAX_STACK; EBUSY when ours are still there after that.
    """
    removed = 0
    for _ in range(MAX_STACK):
        if not is_ours(mountinfo.top_mount(path)) or not detach(path):
            return removed
        removed += 1
    if is_ours(mountinfo.top_mount(path)):
        raise OSError(errno.EBUSY, f"{path} still holds our mounts after {removed} detaches")
    return removed
