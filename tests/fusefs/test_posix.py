"""POSIX behaviour, table-driven: every case runs on a fusefs mount and on a
plain directory of the same backing filesystem, and must give identical
results (values and errno names), including permission checks made as an
unprivileged uid in a forked child.

A case is a function ``case(root) -> list``; it may only touch ``root``
and must return plain data that does not depend on where it ran (no inode
numbers, no absolute paths, no times that were not set explicitly).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fusefs.conftest import Mounted, run_as, session_starter

pytestmark = pytest.mark.privileged

libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_KEEP_SIZE, FALLOC_PUNCH_HOLE = 1, 2
UTIME_OMIT = (1 << 30) - 2

CASES: dict[str, Callable[[Path], list[Any]]] = {}


def case(func: Callable[[Path], list[Any]]) -> Callable[[Path], list[Any]]:
    CASES[func.__name__] = func
    return func


def res(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The value, or the errno name of the OSError, of ``fn(*args)``."""
    try:
        return fn(*args, **kwargs)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def st(path: Path | str, follow: bool = False) -> dict[str, Any] | str:
    """The comparable part of a stat."""
    try:
        s = os.stat(path, follow_symlinks=follow)
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]
    out = {"type": stat.S_IFMT(s.st_mode), "mode": oct(stat.S_IMODE(s.st_mode)), "nlink": s.st_nlink,
           "uid": s.st_uid, "gid": s.st_gid}
    if not stat.S_ISDIR(s.st_mode):
        out["size"] = s.st_size
    return out


def read(path: Path | str) -> bytes | str:
    return res(lambda: Path(path).read_bytes())


def renameat2(src: Path, dst: Path, flags: int) -> int | str:
    if libc.renameat2(AT_FDCWD, bytes(src), AT_FDCWD, bytes(dst), flags) == 0:
        return 0
    return errno.errorcode[ctypes.get_errno()]


def fallocate(fd: int, mode: int, offset: int, length: int) -> int | str:
    if libc.fallocate64(fd, mode, offset, length) == 0:
        return 0
    return errno.errorcode[ctypes.get_errno()]


# ------------------------------------------------------------------ files


@case
def create_write_read(root: Path) -> list[Any]:
    f = root / "f"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    n = os.write(fd, b"hello world")
    os.close(fd)
    again = res(os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    return [n, read(f), st(f), again]


@case
def append_and_overwrite(root: Path) -> list[Any]:
    f = root / "f"
    f.write_bytes(b"0123456789")
    with open(f, "ab") as a:
        a.write(b"ABC")
    fd = os.open(f, os.O_WRONLY)
    os.pwrite(fd, b"xy", 3)
    os.pwrite(fd, b"END", 20)  # past EOF: a hole reads as zeros
    os.close(fd)
    fd = os.open(f, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"!")  # O_APPEND writes at the end, whatever the offset
    os.close(fd)
    return [read(f), st(f)]


@case
def truncate_path_and_fd(root: Path) -> list[Any]:
    f = root / "f"
    f.write_bytes(b"a" * 5000)
    out = [res(os.truncate, f, 100), st(f), res(os.truncate, f, 10000), st(f)]
    fd = os.open(f, os.O_RDWR)
    out += [res(os.ftruncate, fd, 3), os.pread(fd, 10, 0), res(os.ftruncate, fd, 8), os.pread(fd, 10, 0)]
    os.close(fd)
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    out += [st(f), res(os.truncate, root / "missing", 1)]
    return out


@case
def fallocate_modes(root: Path) -> list[Any]:
    f = root / "f"
    f.write_bytes(b"z" * 10000)
    fd = os.open(f, os.O_RDWR)
    out = [res(os.posix_fallocate, fd, 0, 20000), os.fstat(fd).st_size,
           fallocate(fd, FALLOC_KEEP_SIZE, 0, 4096), os.fstat(fd).st_size,
           fallocate(fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE, 4096, 4096), os.fstat(fd).st_size,
           hashlib.sha256(os.pread(fd, 20000, 0)).hexdigest()]
    os.close(fd)
    return out


@case
def large_io(root: Path) -> list[Any]:
    f = root / "big"
    data = hashlib.sha256(b"seed").digest() * (3 * 1024 * 1024 // 32 + 5)
    with open(f, "wb", buffering=0) as out:
        for i in range(0, len(data), (1 << 20) + 17):
            out.write(data[i : i + (1 << 20) + 17])
    back = f.read_bytes()
    return [len(back), back == data, st(f)]


@case
def mmap_shared_write(root: Path) -> list[Any]:
    f = root / "m"
    f.write_bytes(b"\0" * 8192)
    with open(f, "r+b") as fh, mmap.mmap(fh.fileno(), 8192) as m:
        m[100:105] = b"HELLO"
        m.flush()
    return [read(f)[95:110]]


@case
def unlink_while_open(root: Path) -> list[Any]:
    """The descriptor keeps working; the name is gone at once.

    (fstat() of the unlinked open file is left out: on fusefs it fails with
    ESTALE, because the file really has no name any more (hard_remove) and
    libfuse's high-level API can only stat by name; see docs/fusefs.md.)
    """
    f = root / "f"
    f.write_bytes(b"keep")
    fd = os.open(f, os.O_RDWR)
    out = [res(os.unlink, f), f.exists(), sorted(os.listdir(root)), os.pwrite(fd, b"more", 4),
           os.pread(fd, 100, 0)]
    os.close(fd)
    return out


@case
def locks(root: Path) -> list[Any]:
    f = root / "f"
    f.write_bytes(b"x")
    with open(f, "r+b") as fh:
        fcntl.lockf(fh, fcntl.LOCK_EX)
        fcntl.flock(fh, fcntl.LOCK_SH)
        fcntl.lockf(fh, fcntl.LOCK_UN)
    return ["ok"]


# ------------------------------------------------------------------ names


@case
def rename_plain(root: Path) -> list[Any]:
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")
    (root / "d").mkdir()
    (root / "e").mkdir()
    (root / "e" / "x").write_bytes(b"")
    (root / "empty").mkdir()
    return [
        res(os.rename, root / "a", root / "a2"), read(root / "a2"), read(root / "a"),
        res(os.rename, root / "a2", root / "b"), read(root / "b"),       # over a file
        res(os.rename, root / "b", root / "d"),                          # file over dir
        res(os.rename, root / "d", root / "e"),                          # dir over non-empty dir
        res(os.rename, root / "d", root / "empty"),                      # dir over empty dir
        res(os.rename, root / "empty", root / "empty" / "sub"),          # into itself
        res(os.rename, root / "missing", root / "z"),
        sorted(os.listdir(root)),
    ]


@case
def rename_flags(root: Path) -> list[Any]:
    (root / "a").write_bytes(b"A")
    (root / "b").write_bytes(b"B")
    (root / "d").mkdir()
    return [
        renameat2(root / "a", root / "b", RENAME_NOREPLACE), read(root / "a"), read(root / "b"),
        renameat2(root / "a", root / "c", RENAME_NOREPLACE), read(root / "c"),
        renameat2(root / "c", root / "b", RENAME_EXCHANGE), read(root / "b"), read(root / "c"),
        renameat2(root / "b", root / "d", RENAME_EXCHANGE), st(root / "b"), st(root / "d"),
        renameat2(root / "b", root / "missing", RENAME_EXCHANGE),
        renameat2(root / "c", root / "x", RENAME_NOREPLACE | RENAME_EXCHANGE),
        sorted(os.listdir(root)),
    ]


@case
def hard_links(root: Path) -> list[Any]:
    (root / "a").write_bytes(b"data")
    (root / "d").mkdir()
    out = [res(os.link, root / "a", root / "b"), st(root / "a"), st(root / "b"),
           os.stat(root / "a").st_ino == os.stat(root / "b").st_ino,
           res(os.link, root / "a", root / "b"), res(os.link, root / "d", root / "d2"),
           res(os.link, root / "missing", root / "m")]
    (root / "b").write_bytes(b"changed")
    out += [read(root / "a"), res(os.unlink, root / "a"), st(root / "b")]
    return out


@case
def symlinks(root: Path) -> list[Any]:
    (root / "t").write_bytes(b"target")
    return [
        res(os.symlink, "t", root / "l"), res(os.readlink, root / "l"), st(root / "l")["type"],
        read(root / "l"), st(root / "l", follow=True),
        res(os.symlink, "nowhere/x", root / "dangling"), read(root / "dangling"),
        res(os.readlink, root / "t"), res(os.symlink, "t", root / "l"),
        res(os.symlink, "a" * 1000, root / "long"), len(res(os.readlink, root / "long")),
    ]


@case
def directories(root: Path) -> list[Any]:
    d = root / "d"
    out = [res(os.mkdir, d, 0o750), st(d), res(os.mkdir, d), res(os.mkdir, d / "s1"), res(os.mkdir, d / "s2"),
           st(d)["nlink"], res(os.mkdir, root / "missing" / "x"), res(os.rmdir, d), res(os.unlink, d / "s1")]
    (d / "f").write_bytes(b"")
    out += [res(os.rmdir, d / "f"), res(os.mkdir, d / "f" / "x"), res(os.rmdir, d / "s1"), st(d)["nlink"],
            res(os.rmdir, d / "missing")]
    return out


@case
def readdir_listing(root: Path) -> list[Any]:
    for i in range(60):
        (root / f"file-{i:03d}").write_bytes(b"x" * i)
    for i in range(5):
        (root / f"dir-{i}").mkdir()
    os.symlink("file-001", root / "link")
    os.mkfifo(root / "fifo")
    kinds = sorted((e.name, e.is_dir(follow_symlinks=False), e.is_symlink(), e.is_file(follow_symlinks=False))
                   for e in os.scandir(root))
    return [sorted(os.listdir(root)), kinds, res(os.listdir, root / "file-001")]


@case
def special_files(root: Path) -> list[Any]:
    return [res(os.mkfifo, root / "p", 0o640), st(root / "p"),
            res(os.mknod, root / "r", stat.S_IFREG | 0o600), st(root / "r")]


@case
def open_errors(root: Path) -> list[Any]:
    (root / "f").write_bytes(b"")
    (root / "d").mkdir()
    return [res(os.open, root / "missing", os.O_RDONLY), res(os.open, root / "d", os.O_WRONLY),
            res(os.open, root / "f" / "x", os.O_RDONLY), res(os.open, root / "f", os.O_RDONLY | os.O_DIRECTORY),
            res(os.unlink, root / "missing"), res(os.rmdir, root / "f")]


# ------------------------------------------------------------------ attributes


@case
def chmod_chown(root: Path) -> list[Any]:
    f, d = root / "f", root / "d"
    f.write_bytes(b"")
    d.mkdir()
    os.symlink("f", root / "l")
    return [res(os.chmod, f, 0o600), st(f), res(os.chmod, f, 0o4755), st(f), res(os.chmod, d, 0o1777), st(d),
            res(os.chown, f, 1234, 5678), st(f), res(os.chown, f, -1, 42), st(f),
            res(os.lchown, root / "l", 77, 88), st(root / "l"), st(f)]


@case
def timestamps(root: Path) -> list[Any]:
    f = root / "f"
    f.write_bytes(b"")
    os.utime(f, ns=(1_000_000_123, 2_000_000_456))
    s1 = os.stat(f)
    times = (ctypes.c_long * 4)(0, UTIME_OMIT, 3, 789)  # atime untouched, mtime = 3.000000789
    libc.utimensat(AT_FDCWD, bytes(f), ctypes.addressof(times), 0)
    s2 = os.stat(f)
    os.symlink("f", root / "l")
    os.utime(root / "l", ns=(5, 6), follow_symlinks=False)
    s3 = os.lstat(root / "l")
    return [(s1.st_atime_ns, s1.st_mtime_ns), (s2.st_atime_ns, s2.st_mtime_ns), (s3.st_atime_ns, s3.st_mtime_ns),
            os.stat(f).st_mtime_ns]


@case
def xattrs(root: Path) -> list[Any]:
    f, d = root / "f", root / "d"
    f.write_bytes(b"")
    d.mkdir()
    return [
        res(os.listxattr, f), res(os.getxattr, f, "user.a"),
        res(os.setxattr, f, "user.a", b"1"), res(os.setxattr, f, "user.b", b"x" * 3000),
        res(os.getxattr, f, "user.a"), len(res(os.getxattr, f, "user.b")), sorted(res(os.listxattr, f)),
        res(os.setxattr, f, "user.a", b"2", os.XATTR_CREATE), res(os.setxattr, f, "user.c", b"", os.XATTR_REPLACE),
        res(os.setxattr, f, "user.a", b"22", os.XATTR_REPLACE), res(os.getxattr, f, "user.a"),
        res(os.removexattr, f, "user.a"), res(os.removexattr, f, "user.a"), sorted(res(os.listxattr, f)),
        res(os.setxattr, d, "user.dir", b"v"), res(os.getxattr, d, "user.dir"),
        res(os.getxattr, f, "security.capability"), res(os.getxattr, root / "missing", "user.a"),
    ]


@case
def statvfs_shape(root: Path) -> list[Any]:
    sv = os.statvfs(root)
    return [sv.f_namemax, sv.f_bsize > 0, sv.f_frsize > 0, sv.f_blocks >= sv.f_bfree >= sv.f_bavail >= 0,
            sv.f_files >= sv.f_ffree >= 0]


# ------------------------------------------------------------------ as a user

USER, GROUP, OTHER_GROUP = 1000, 1000, 2000


def _perm_setup(root: Path) -> None:
    """As root: a tree with owners and modes for the unprivileged checks."""
    for name, mode, owner in (("ro", 0o755, (0, 0)), ("mine", 0o755, (USER, GROUP)),
                              ("sgid", 0o2777, (0, OTHER_GROUP)), ("sticky", 0o1777, (0, 0))):
        (root / name).mkdir()
        os.chown(root / name, *owner)
        os.chmod(root / name, mode)
    for name, mode, owner in (("secret", 0o600, (0, 0)), ("public", 0o644, (0, 0)),
                              ("open", 0o666, (0, 0)), ("sticky/theirs", 0o666, (1001, 1001))):
        (root / name).write_bytes(b"x")
        os.chown(root / name, *owner)
        os.chmod(root / name, mode)


def _perm_checks(root: str) -> list[Any]:
    """As uid 1000: what it may and may not do."""
    r = Path(root)
    os.umask(0o022)

    def create(p: Path, mode: int = 0o666) -> Any:
        fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, mode)
        os.close(fd)
        return st(p)

    return [
        res(create, r / "ro" / "f"), res(lambda: (r / "secret").read_bytes()), res(lambda: (r / "public").read_bytes()),
        res(create, r / "mine" / "f", 0o777), res(os.mkdir, r / "mine" / "d", 0o777), st(r / "mine" / "d"),
        res(os.symlink, "f", r / "mine" / "l"), st(r / "mine" / "l"),
        res(create, r / "sgid" / "f"), res(os.mkdir, r / "sgid" / "d"), st(r / "sgid" / "d"),
        res(os.chmod, r / "secret", 0o777), res(os.chown, r / "mine" / "f", 0, -1),
        res(os.chown, r / "mine" / "f", -1, GROUP), res(os.chmod, r / "mine" / "f", 0o600), st(r / "mine" / "f"),
        res(os.unlink, r / "sticky" / "theirs"), res(os.utime, r / "open", None),
        res(os.utime, r / "open", (1, 1)), res(os.truncate, r / "public", 0),
        res(os.open, r / "public", os.O_WRONLY), os.access(r / "public", os.X_OK), os.access(r / "open", os.W_OK),
        res(os.setxattr, r / "public", "user.x", b"1"), res(os.setxattr, r / "mine" / "f", "user.x", b"1"),
        res(os.rename, r / "mine" / "f", r / "ro" / "f"), res(os.link, r / "secret", r / "mine" / "hl"),
        res(os.rmdir, r / "ro"), res(os.mkfifo, r / "mine" / "fifo"), st(r / "mine" / "fifo"),
    ]


@case
def permissions_as_user(root: Path) -> list[Any]:
    _perm_setup(root)
    return run_as(USER, GROUP, lambda: _perm_checks(str(root)))


@case
def supplementary_group_access(root: Path) -> list[Any]:
    """Access through a supplementary group: the kernel checks it, we serve it."""
    d = root / "team"
    d.mkdir()
    os.chown(d, 0, 3000)
    os.chmod(d, 0o2770)

    def work() -> list[Any]:
        fd = os.open(d / "f", os.O_CREAT | os.O_WRONLY, 0o660)
        os.close(fd)
        return [st(d / "f"), sorted(os.listdir(d))]

    return [res(run_as, USER, GROUP, work, (3000,)), res(run_as, USER, GROUP, work)]


# ------------------------------------------------------------------ the runner


@pytest.fixture(scope="module", params=["default", "writeback-cache", "splice", "kernel"])
def module_session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One session per mode for the whole table (starting one per case is slow)."""
    import shutil
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="fusefs-posix-", dir="/tmp"))
    base.chmod(0o755)
    extra = {"default": [], "writeback-cache": ["--writeback-cache"], "splice": ["--splice"],
             "kernel": []}[request.param]
    engine = "kernel" if request.param == "kernel" else "libfuse"
    try:
        with session_starter(base, engine) as start:
            yield start(extra=extra), base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def roots(module_session: tuple[Mounted, Path], request: pytest.FixtureRequest) -> tuple[Path, Path]:
    mounted, base = module_session
    plain = base / f"plain-{request.node.callspec.id}"
    plain.mkdir(mode=0o755)
    return mounted.mountpoint, plain


#: Known, documented differences of the opt-in --writeback-cache mode: the
#: kernel then trusts its own cached size of each name, so a write through one
#: hard link is not seen in the size of another until that inode leaves the
#: cache (docs/fusefs.md).
WRITEBACK_DEVIATIONS = {"hard_links"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_as_plain_directory(name: str, roots: tuple[Path, Path], module_session: tuple[Mounted, Path],
                                 request: pytest.FixtureRequest) -> None:
    if "writeback-cache" in request.node.callspec.id and name in WRITEBACK_DEVIATIONS:
        pytest.xfail("documented difference of --writeback-cache")
    fuse_root, plain_root = roots
    results = []
    for base in (fuse_root, plain_root):
        root = base / name
        root.mkdir()
        root.chmod(0o755)
        results.append(CASES[name](root))
    assert results[0] == results[1]


def test_device_nodes_are_refused(mounted: Mounted) -> None:
    """A volume never holds device nodes (root in a pod could otherwise make one)."""
    with pytest.raises(PermissionError):
        os.mknod(mounted.mountpoint / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))


def test_hard_link_counts_are_fresh(mounted: Mounted) -> None:
    """nlink seen through the *other* name right after link/unlink."""
    a, b = mounted.mountpoint / "a", mounted.mountpoint / "b"
    a.write_bytes(b"x")
    assert os.stat(a).st_nlink == 1
    os.link(a, b)
    assert os.stat(a).st_nlink == 2
    os.unlink(b)
    assert os.stat(a).st_nlink == 1


def test_mount_identity(mounted: Mounted) -> None:
    """mountinfo shows what the node plugin verifies."""
    from tests.fusefs.conftest import mountinfo_entry

    assert mountinfo_entry(str(mounted.mountpoint)) == ("fuse.fusefs", f"fusepath:{mounted.volume_id}")


def test_hot_xattr_queries_stay_in_the_daemon(mounted: Mounted) -> None:
    """The kernel asks for security.capability before every write(2), and
    ``ls -l`` for ACLs and labels of every entry. On a volume where no xattr
    was ever set, fusefs answers every such query itself with no system
    call; once one was set, other names are looked up for real every time,
    and security.capability once a capability was set through the volume."""
    f = mounted.mountpoint / "f"
    f.write_bytes(b"x")
    # Set behind the daemon's back, on the backing file: a plain passthrough
    # would look them up and find them; fusefs answers ENODATA without looking.
    os.setxattr(mounted.source / "f", "security.capability", _FILE_CAPABILITY)
    os.setxattr(mounted.source / "f", "user.behind", b"b")
    for name in ("security.capability", "user.behind"):
        with pytest.raises(OSError) as e:
            os.getxattr(f, name)
        assert e.value.errno == errno.ENODATA, name
    # Once an xattr is set through the volume, other names are real lookups.
    os.setxattr(f, "user.k", b"v")
    assert os.getxattr(f, "user.behind") == b"b"
    with pytest.raises(OSError) as e:
        os.getxattr(f, "security.capability")
    assert e.value.errno == errno.ENODATA
    # Once a capability is set through the volume, that query is real too.
    g = mounted.mountpoint / "g"
    g.write_bytes(b"y")
    os.setxattr(g, "security.capability", _FILE_CAPABILITY)
    assert os.getxattr(f, "security.capability") == _FILE_CAPABILITY
    # A known name is looked up for real each time, not cached.
    os.setxattr(mounted.source / "f", "user.k", b"w")
    assert os.getxattr(f, "user.k") == b"w"


#: A valid VFS_CAP_REVISION_2 file capability granting CAP_NET_BIND_SERVICE
#: (bit 10) in the permitted set, with the effective flag off.
_FILE_CAPABILITY = struct.pack("<IIIII", 0x02000000, 1 << 10, 0, 0, 0)


def test_close_unlink_rmdir_never_finds_leftovers(mounted: Mounted) -> None:
    """close() returns before the kernel's asynchronous RELEASE; an unlink
    right after must still remove the file for real (not hide it), or the
    rmdir that follows would fail with ENOTEMPTY."""
    for i in range(200):
        d = mounted.mountpoint / f"d{i}"
        d.mkdir()
        (d / "f").write_bytes(b"x" * 100)
        (d / "f").read_bytes()
        os.unlink(d / "f")
        os.rmdir(d)
    assert os.listdir(mounted.source) == []


def test_open_unlinked_file_has_no_name_left(mounted: Mounted) -> None:
    """An unlinked open file is really unlinked (hard_remove): no hidden
    name in the volume, its directory can go at once, and its descriptor
    still reads and writes. On the libfuse engine fstat() on it is the one
    casualty (ESTALE); the kernel engine keeps the inode's descriptor, so
    fstat() works and shows no link left, as on a local filesystem."""
    d = mounted.mountpoint / "d"
    d.mkdir()
    fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"data")
        os.unlink(d / "f")
        assert os.listdir(d) == [] and os.listdir(mounted.source / "d") == []
        os.rmdir(d)
        assert os.pwrite(fd, b"more", 4) == 4 and os.pread(fd, 100, 0) == b"datamore"
        if mounted.engine == "kernel":
            st = os.fstat(fd)
            assert st.st_nlink == 0 and st.st_size == 8
        else:
            with pytest.raises(OSError) as exc:
                os.fstat(fd)
            assert exc.value.errno == errno.ESTALE
    finally:
        os.close(fd)
