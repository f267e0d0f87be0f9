"""The kernel's FUSE protocol (include/uapi/linux/fuse.h): numbers and layouts.

Only what fusefs speaks. Every layout is a preallocated :class:`struct.Struct`
(native byte order, as the kernel writes them), so the hot path packs and
unpacks without parsing a format string per request.
"""

from __future__ import annotations

import struct

#: The protocol version we speak; the kernel answers with min(its, ours).
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
#: The kernel refuses a read buffer smaller than this.
MIN_READ_BUFFER = 8192

# ---------------------------------------------------------------- opcodes
LOOKUP, FORGET, GETATTR, SETATTR, READLINK, SYMLINK = 1, 2, 3, 4, 5, 6
MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, OPEN, READ, WRITE = 8, 9, 10, 11, 12, 13, 14, 15, 16
STATFS, RELEASE, FSYNC, SETXATTR, GETXATTR, LISTXATTR, REMOVEXATTR = 17, 18, 20, 21, 22, 23, 24
FLUSH, INIT, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR = 25, 26, 27, 28, 29, 30
GETLK, SETLK, SETLKW, ACCESS, CREATE, INTERRUPT, BMAP, DESTROY = 31, 32, 33, 34, 35, 36, 37, 38
IOCTL, POLL, NOTIFY_REPLY, BATCH_FORGET, FALLOCATE, READDIRPLUS, RENAME2, LSEEK = 39, 40, 41, 42, 43, 44, 45, 46
COPY_FILE_RANGE, SYNCFS, TMPFILE, STATX = 47, 50, 51, 52

OPCODE_NAMES = {v: k.lower() for k, v in dict(globals()).items()
                if k.isupper() and isinstance(v, int) and k not in (
                    "KERNEL_VERSION", "KERNEL_MINOR_VERSION", "MIN_READ_BUFFER")}

# ---------------------------------------------------------------- INIT flags
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40

INIT_FLAG_NAMES = {
    "async_read": ASYNC_READ, "posix_locks": POSIX_LOCKS, "atomic_o_trunc": ATOMIC_O_TRUNC,
    "export_support": EXPORT_SUPPORT, "big_writes": BIG_WRITES, "dont_mask": DONT_MASK,
    "splice_write": SPLICE_WRITE, "splice_move": SPLICE_MOVE, "splice_read": SPLICE_READ,
    "flock_locks": FLOCK_LOCKS, "auto_inval_data": AUTO_INVAL_DATA, "do_readdirplus": DO_READDIRPLUS,
    "readdirplus_auto": READDIRPLUS_AUTO, "async_dio": ASYNC_DIO, "writeback_cache": WRITEBACK_CACHE,
    "parallel_dirops": PARALLEL_DIROPS, "handle_killpriv": HANDLE_KILLPRIV, "posix_acl": POSIX_ACL,
    "max_pages": MAX_PAGES, "cache_symlinks": CACHE_SYMLINKS, "explicit_inval_data": EXPLICIT_INVAL_DATA,
    "handle_killpriv_v2": HANDLE_KILLPRIV_V2, "setxattr_ext": SETXATTR_EXT, "init_ext": INIT_EXT,
    "direct_io_allow_mmap": DIRECT_IO_ALLOW_MMAP, "passthrough": PASSTHROUGH, "has_resend": HAS_RESEND,
}

# ---------------------------------------------------------------- other flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_NOFLUSH = 1 << 5
FOPEN_PASSTHROUGH = 1 << 7

FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH = 16, 32, 64
FATTR_ATIME_NOW, FATTR_MTIME_NOW, FATTR_LOCKOWNER, FATTR_CTIME = 128, 256, 512, 1024
FATTR_KILL_SUIDGID = 2048

GETATTR_FH = 1
FSYNC_FDATASYNC = 1
WRITE_CACHE = 1
WRITE_KILL_SUIDGID = 4
RELEASE_FLUSH = 1
OPEN_KILL_SUIDGID = 1

# ---------------------------------------------------------------- notifications
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3
NOTIFY_DELETE = 6
NOTIFY_RESEND = 7
#: Linux 6.16+ (7.45): forget these node IDs if nothing uses their inodes.
NOTIFY_PRUNE = 9
#: Bit 63 of ``unique``: the kernel sends a request again (after NOTIFY_RESEND).
UNIQUE_RESEND = 1 << 63

# ---------------------------------------------------------------- ioctls on /dev/fuse
FUSE_DEV_IOC_CLONE = 0x8004E500          # _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_BACKING_OPEN = 0x4010E501   # _IOW(229, 1, struct fuse_backing_map)
FUSE_DEV_IOC_BACKING_CLOSE = 0x4004E502  # _IOW(229, 2, uint32_t)

# ---------------------------------------------------------------- layouts
IN_HEADER = struct.Struct("=IIQQIIIHH")        # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("=IiQ")             # len error unique
ATTR = struct.Struct("=QQQQQQIIIIIIIIII")      # fuse_attr, 88 bytes
ENTRY_PREFIX = struct.Struct("=QQQQII")        # nodeid generation entry_valid attr_valid (nsec x2)
ATTR_OUT_PREFIX = struct.Struct("=QII")        # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("=IIII")               # major minor max_readahead flags (flags2 follows)
INIT_OUT = struct.Struct("=IIIIHHIIHHIIH22x")  # fuse_init_out, 64 bytes
FORGET_IN = struct.Struct("=Q")
BATCH_FORGET_IN = struct.Struct("=II")
FORGET_ONE = struct.Struct("=QQ")
GETATTR_IN = struct.Struct("=IIQ")
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")
MKNOD_IN = struct.Struct("=IIII")
MKDIR_IN = struct.Struct("=II")
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")
LINK_IN = struct.Struct("=Q")
OPEN_IN = struct.Struct("=II")
CREATE_IN = struct.Struct("=IIII")
OPEN_OUT = struct.Struct("=QIi")               # fh open_flags backing_id
RELEASE_IN = struct.Struct("=QIIQ")
FLUSH_IN = struct.Struct("=QIIQ")
READ_IN = struct.Struct("=QQIIQII")            # fh offset size read_flags lock_owner flags pad
WRITE_IN = struct.Struct("=QQIIQII")
WRITE_OUT = struct.Struct("=II")
STATFS_OUT = struct.Struct("=QQQQQIIII24x")
FSYNC_IN = struct.Struct("=QII")
SETXATTR_IN = struct.Struct("=II")             # without FUSE_SETXATTR_EXT
GETXATTR_IN = struct.Struct("=II")
GETXATTR_OUT = struct.Struct("=II")
ACCESS_IN = struct.Struct("=II")
INTERRUPT_IN = struct.Struct("=Q")
FALLOCATE_IN = struct.Struct("=QQQII")
LSEEK_IN = struct.Struct("=QQII")
LSEEK_OUT = struct.Struct("=Q")
DIRENT = struct.Struct("=QQII")                # ino off namelen type, then the name padded to 8
#: Replies packed in one call on the hot paths: fuse_entry_out, fuse_attr_out,
#: and a fuse_direntplus without its name (entry_out + dirent).
ENTRY_OUT = struct.Struct("=QQQQII" + ATTR.format[1:])
ATTR_OUT = struct.Struct("=QII" + ATTR.format[1:])
DIRENTPLUS = struct.Struct("=QQQQII" + ATTR.format[1:] + "QQII")
NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")
NOTIFY_PRUNE_OUT = struct.Struct("=IIQ")       # count padding spare, then count u64 node IDs
BACKING_MAP = struct.Struct("=iIQ")            # fd flags padding

assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert INIT_OUT.size == 64 and SETATTR_IN.size == 88 and STATFS_OUT.size == 80
assert READ_IN.size == 40 and ENTRY_PREFIX.size + ATTR.size == 128
assert ENTRY_OUT.size == 128 and ATTR_OUT.size == 104 and DIRENTPLUS.size == 152


def dirent_size(namelen: int) -> int:
    """Bytes one fuse_dirent with a name of ``namelen`` takes (8-aligned)."""
    return (DIRENT.size + namelen + 7) & ~7


def flag_names(flags: int) -> list[str]:
    """The INIT flags set in ``flags``, by name, for logs and metrics."""
    return sorted(name for name, bit in INIT_FLAG_NAMES.items() if flags & bit)
