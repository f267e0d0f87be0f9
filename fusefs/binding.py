"""The libfuse3 binding: mfusepy forced onto libfuse3, plus a lean request path.

mfusepy looks for ``libfuse.so`` (libfuse 2) first and silently uses it when
both are installed; it only honours ``FUSE_LIBRARY_NAME`` (read once, at
import) to choose. So this module sets it to ``fuse3`` *before* the import,
drops ``FUSE_LIBRARY_PATH`` (which would win over it), and refuses to run on
anything but libfuse 3. Every other fusefs module imports mfusepy from here.

mfusepy's own glue decodes every path to ``str``, builds a ``dict`` per stat,
copies every read and write buffer through Python ``bytes`` and drops the
``rename`` flags. :class:`FastFUSE` skips all of that: it hands the raw
libfuse arguments (byte paths, ctypes pointers) straight to the operations
object, whose methods fill ``struct stat`` with a direct ``fstatat(2)`` call
and move file data with ``pread(2)``/``pwrite(2)`` between the file and
libfuse's own buffer, without the GIL held during the copy.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from bisect import bisect_left as _bisect
from typing import Any

from fusefs.opstats import BOUNDS_NS

os.environ.pop("FUSE_LIBRARY_PATH", None)
os.environ["FUSE_LIBRARY_NAME"] = "fuse3"

import mfusepy as fuse  # noqa: E402  (must follow the environment set-up above)

if fuse.fuse_version_major != 3:  # pragma: no cover - depends on the host
    raise ImportError(f"fusefs needs libfuse 3, found {fuse.fuse_version_major}.{fuse.fuse_version_minor}")

log = logging.getLogger("fusefs.binding")
_perf_counter_ns = time.perf_counter_ns

LIBFUSE_VERSION = (fuse.fuse_version_major, fuse.fuse_version_minor)

# ----------------------------------------------------------------- libc

libc = ctypes.CDLL(None, use_errno=True)


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(libc, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


c_int, c_uint, c_void_p, c_char_p = ctypes.c_int, ctypes.c_uint, ctypes.c_void_p, ctypes.c_char_p
c_size_t, c_ssize_t, c_off_t = ctypes.c_size_t, ctypes.c_ssize_t, ctypes.c_int64

# The buffer and stat arguments are declared with the exact pointer types
# mfusepy's callbacks receive, which ctypes passes through without the
# conversion a c_void_p declaration costs (about 0.5 us a call).
pread = _fn("pread64", c_ssize_t, c_int, ctypes.POINTER(ctypes.c_byte), c_size_t, c_off_t)
pwrite = _fn("pwrite64", c_ssize_t, c_int, ctypes.POINTER(ctypes.c_byte), c_size_t, c_off_t)
fstatat = _fn("fstatat64", c_int, c_int, c_char_p, ctypes.POINTER(fuse.c_stat), c_int)
fstat = _fn("fstat64", c_int, c_int, ctypes.POINTER(fuse.c_stat))
renameat2 = _fn("renameat2", c_int, c_int, c_char_p, c_int, c_char_p, c_uint)
utimensat = _fn("utimensat", c_int, c_int, c_char_p, c_void_p, c_int)
futimens = _fn("futimens", c_int, c_int, c_void_p)
fallocate = _fn("fallocate64", c_int, c_int, c_int, c_off_t, c_off_t)
syncfs = _fn("syncfs", c_int, c_int)
prctl = _fn("prctl", c_int, c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)

AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2
PR_SET_PDEATHSIG = 1

# fallocate(2) modes
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_INSERT_RANGE = 0x20

# libfuse 3 capability bits (fuse_common.h)
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_SPLICE_MOVE = 1 << 8
FUSE_CAP_SPLICE_READ = 1 << 9
FUSE_CAP_CACHE_SYMLINKS = 1 << 23


def errno_result() -> int:
    """The negative errno of the last failed libc call, for a FUSE reply."""
    return -(ctypes.get_errno() or errno.EIO)


def check(result: int) -> int:
    """Raise OSError for a failed libc call that returns -1."""
    if result < 0:
        err = ctypes.get_errno() or errno.EIO
        raise OSError(err, os.strerror(err))
    return result


fuse_get_context = fuse.fuse_get_context
Operations = fuse.Operations
c_stat = fuse.c_stat

#: FUSE attribute (glue) names -> operations method names. Names with a
#: ``_fuse_3`` suffix are the ones whose libfuse 3 signature differs from 2.
GLUE: dict[str, str] = {
    "getattr_fuse_3": "getattr", "readlink": "readlink", "mknod": "mknod", "mkdir": "mkdir",
    "unlink": "unlink", "rmdir": "rmdir", "symlink": "symlink", "rename_fuse_3": "rename",
    "link": "link", "chmod_fuse_3": "chmod", "chown_fuse_3": "chown",
    "truncate_fuse_3": "truncate", "open": "open", "read": "read", "write": "write",
    "statfs": "statfs", "flush": "flush", "release": "release", "fsync": "fsync",
    "setxattr": "setxattr", "getxattr": "getxattr", "listxattr": "listxattr",
    "removexattr": "removexattr", "opendir": "opendir", "readdir_fuse_3": "readdir",
    "releasedir": "releasedir", "fsyncdir": "fsyncdir", "init_fuse_3": "init",
    "destroy": "destroy", "access": "access", "create": "create",
    "utimens_fuse_3": "utimens", "fallocate": "fallocate", "write_buf": "write_buf",
}


class FastFUSE(fuse.FUSE):
    """mfusepy's FUSE with the raw operations wired in directly.

    Each glue attribute in :data:`GLUE` is set on the instance to the bound
    raw method of ``operations`` *before* mfusepy builds its callback table,
    so a request costs one ctypes trampoline, :meth:`_wrapper`, and the
    operation itself. ``_wrapper`` also times every request into the
    operations' :class:`~fusefs.opstats.OpStats`.
    """

    def __init__(self, operations: Any, mountpoint: str, **options: Any) -> None:
        for glue, name in GLUE.items():
            setattr(self, glue, getattr(operations, name))
        self._opstats = operations.stats
        self._op_index = {name: operations.stats.index(name) for name in GLUE.values()}
        self._tls = threading.local()
        super().__init__(operations, mountpoint, raw_fi=True, **options)

    def _first_request_on_thread(self) -> Any:
        _pin_thread_state()
        shard = self._tls.shard = self._opstats.shard()
        return shard

    def _wrapper(self, func: Any, *args: Any) -> int:  # type: ignore[override]
        """Run one request: time it, count it, turn OSError into -errno.

        This runs for every request, so the bookkeeping is inlined: one
        thread-local lookup finds the thread's stats shard (and tells a thread
        seen for the first time), two clock reads, a bisect and a few list
        updates.
        """
        try:
            shard = self._tls.shard
        except AttributeError:
            shard = self._first_request_on_thread()
        name = func.__name__
        if name == "init":
            return func(*args) or 0  # its exceptions must abort the mount
        t0 = _perf_counter_ns()
        try:
            ret = func(*args) or 0
        except OSError as exc:
            ret = -exc.errno if isinstance(exc.errno, int) and exc.errno > 0 else -errno.EIO
        except Exception:  # noqa: BLE001 - a bug must fail one request, not the mount
            log.exception("FUSE operation %s failed", name)
            ret = -errno.EIO
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: stop serving
            self._FUSE__critical_exception = exc  # type: ignore[attr-defined]
            log.critical("critical exception in FUSE operation %s; exiting", name, exc_info=True)
            fuse.fuse_exit()
            return -errno.EFAULT
        elapsed = _perf_counter_ns() - t0
        i = self._op_index[name]
        shard.counts[i] += 1
        shard.sum_ns[i] += elapsed
        shard.buckets[i][_bisect(BOUNDS_NS, elapsed)] += 1
        if ret < 0:
            shard.errors[i] += 1
        return ret


def _pin_thread_state() -> None:
    """Keep this libfuse worker thread's Python thread state while it lives.

    ctypes enters a callback with PyGILState_Ensure() and leaves with
    PyGILState_Release(); on a thread Python did not create, that builds a
    fresh thread state for every single request and tears it down after,
    which costs microseconds per request and makes ``threading.local`` forget
    everything between requests. One extra Ensure() that is never released
    keeps the state alive.

    The state is never released: a pthread key destructor cannot do it,
    because glibc clears CPython's own thread-state key before running ours,
    and releasing then crashes. So libfuse must not retire idle workers
    (the session passes a huge max_idle_threads); the pool is bounded by
    max_threads, one thread state each.
    """
    ctypes.pythonapi.PyGILState_Ensure()


# ----------------------------------------------------------------- stopping

_libfuse = fuse._libfuse
_libfuse.fuse_get_session.restype = c_void_p
_libfuse.fuse_get_session.argtypes = [c_void_p]
_libfuse.fuse_session_exit.restype = None
_libfuse.fuse_session_exit.argtypes = [c_void_p]
umount2 = _fn("umount2", c_int, c_char_p, c_int)
MNT_DETACH = 2


def current_fuse_session() -> int | None:
    """The ``struct fuse_session *`` serving the calling FUSE worker thread.

    Only meaningful inside a request (``init`` records it): libfuse keeps the
    context in thread-local storage of its own threads.
    """
    ctx = _libfuse.fuse_get_context()
    if not ctx or not ctx.contents.fuse:
        return None
    return _libfuse.fuse_get_session(ctx.contents.fuse) or None


_libfuse.fuse_interrupted.restype = c_int
_libfuse.fuse_interrupted.argtypes = []


def request_interrupted() -> bool:
    """True when the kernel sent FUSE INTERRUPT for the calling worker's request.

    libfuse's low-level layer marks the request when the INTERRUPT arrives
    (the caller got a signal, e.g. SIGKILL), whether or not the ``intr``
    option is set; ``intr`` only adds a signal to the worker, which we do not
    want. Only meaningful on a FUSE worker thread; False elsewhere.
    """
    return bool(_libfuse.fuse_interrupted())


def session_exit(session: int) -> None:
    """Ask libfuse's loop to stop (it notices once its main thread wakes up)."""
    _libfuse.fuse_session_exit(session)


def lazy_unmount(mountpoint: str) -> int:
    """umount2(MNT_DETACH); returns 0 or -errno."""
    return 0 if umount2(os.fsencode(mountpoint), MNT_DETACH) == 0 else errno_result()


# ----------------------------------------------------------------- zero-copy writes

FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
FUSE_BUF_FD_RETRY = 1 << 3


class _FdBufVec(ctypes.Structure):
    """``struct fuse_bufvec`` with its one inline ``struct fuse_buf`` (mfusepy
    declares the array as a pointer, which is not the C layout)."""

    _fields_ = [("count", c_size_t), ("idx", c_size_t), ("off", c_size_t),
                ("buf", fuse.fuse_buf * 1)]


_libfuse.fuse_buf_size.restype = c_size_t
_libfuse.fuse_buf_size.argtypes = [fuse.fuse_bufvec_p]
_libfuse.fuse_buf_copy.restype = c_ssize_t
_libfuse.fuse_buf_copy.argtypes = [ctypes.POINTER(_FdBufVec), fuse.fuse_bufvec_p, c_int]
buf_size = _libfuse.fuse_buf_size


def buf_copy_to_fd(src: Any, fd: int, size: int, offset: int) -> int:
    """Copy ``size`` bytes of libfuse's buffer ``src`` to ``fd`` at ``offset``.

    When libfuse received the request by splice() the data still sits in a
    pipe, and this splices it into the file: the bytes never pass through
    this process. Returns the count written or -errno.
    """
    dst = _FdBufVec(1, 0, 0)
    b = dst.buf[0]
    b.size, b.flags, b.fd, b.pos = size, FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY, fd, offset
    return _libfuse.fuse_buf_copy(ctypes.byref(dst), src, 0)


# ----------------------------------------------------------------- cache invalidation

_libfuse.fuse_invalidate_path.restype = c_int
_libfuse.fuse_invalidate_path.argtypes = [c_void_p, c_char_p]


def current_fuse() -> int | None:
    """The ``struct fuse *`` of the calling FUSE worker thread (see above)."""
    ctx = _libfuse.fuse_get_context()
    if not ctx or not ctx.contents.fuse:
        return None
    return int(ctx.contents.fuse)


def invalidate_path(fuse_handle: int, path: bytes) -> int:
    """Drop the kernel's attribute and page cache of ``path``; 0 or -errno.

    -ENOENT just means libfuse has no node for it: nothing is cached.
    """
    return _libfuse.fuse_invalidate_path(fuse_handle, path)
