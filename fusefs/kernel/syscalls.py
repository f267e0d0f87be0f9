"""System calls the standard library lacks: mount(2), umount2(2), ioctls on
/dev/fuse, file handles (name_to_handle_at/open_by_handle_at), and the
``*at`` forms with ``AT_EMPTY_PATH`` that work on ``O_PATH`` descriptors.

All through ctypes on the C library, with errno turned into OSError.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct

from fusefs.kernel import protocol as p

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
MAX_HANDLE_SZ = 128


def _raise(what: str) -> None:
    e = ctypes.get_errno()
    raise OSError(e, f"{what}: {os.strerror(e)}")


def mount_fuse(fd: int, mountpoint: str, source: str, subtype: str, options: str) -> None:
    """mount(2) a FUSE filesystem served on ``fd`` at ``mountpoint``."""
    st = os.stat(mountpoint)
    data = f"fd={fd},rootmode={st.st_mode & 0o170000:o},user_id=0,group_id=0,{options}"
    if _libc.mount(source.encode(), mountpoint.encode(), f"fuse.{subtype}".encode(),
                   MS_NOSUID | MS_NODEV, data.encode()) != 0:
        _raise(f"mount {mountpoint}")


def lazy_unmount(mountpoint: str) -> None:
    if _libc.umount2(mountpoint.encode(), MNT_DETACH) != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _raise(f"umount {mountpoint}")


def clone_device(master: int) -> int:
    """A new /dev/fuse descriptor on the same connection (own processing queue)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, p.FUSE_DEV_IOC_CLONE, struct.pack("=I", master))
    except BaseException:
        os.close(fd)
        raise
    return fd


def backing_open(devfd: int, fd: int) -> int:
    """Register ``fd`` as a passthrough backing file; returns its backing id
    (the ioctl's return value, which fcntl.ioctl cannot give us)."""
    buf = ctypes.create_string_buffer(p.BACKING_MAP.pack(fd, 0, 0), p.BACKING_MAP.size)
    res = _libc.ioctl(ctypes.c_int(devfd), ctypes.c_ulong(p.FUSE_DEV_IOC_BACKING_OPEN), buf)
    if res < 0:
        _raise("FUSE_DEV_IOC_BACKING_OPEN")
    return res


def backing_close(devfd: int, backing_id: int) -> None:
    ident = ctypes.c_uint32(backing_id)
    if _libc.ioctl(ctypes.c_int(devfd), ctypes.c_ulong(p.FUSE_DEV_IOC_BACKING_CLOSE), ctypes.byref(ident)) < 0:
        _raise("FUSE_DEV_IOC_BACKING_CLOSE")


def name_to_handle(fd: int) -> tuple[int, bytes]:
    """(handle_type, handle bytes) of the inode behind ``fd`` (an O_PATH fd is fine)."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("=Ii", buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), AT_EMPTY_PATH) != 0:
        _raise("name_to_handle_at")
    size, kind = struct.unpack_from("=Ii", buf, 0)
    return kind, buf.raw[8:8 + size]


def open_by_handle(mount_fd: int, kind: int, handle: bytes, flags: int) -> int:
    buf = ctypes.create_string_buffer(struct.pack("=Ii", len(handle), kind) + handle)
    fd = _libc.open_by_handle_at(mount_fd, buf, flags)
    if fd < 0:
        _raise("open_by_handle_at")
    return fd


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """chown the inode behind an O_PATH descriptor (symlinks included)."""
    if _libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0:
        _raise("fchownat")


def utimens_empty(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat on the inode behind an O_PATH descriptor; (sec, nsec) or UTIME_*."""
    times = (ctypes.c_long * 4)(atime[0], atime[1], mtime[0], mtime[1])
    if _libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) != 0:
        _raise("utimensat")


def renameat2(olddir: int, old: bytes, newdir: int, new: bytes, flags: int) -> None:
    if _libc.renameat2(olddir, old, newdir, new, flags) != 0:
        _raise("renameat2")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate64(fd, mode, offset, length) != 0:
        _raise("fallocate")
