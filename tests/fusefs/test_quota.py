"""Quota: a hard byte and inode limit, from a mount-time scan plus deltas.

Usage is the apparent size of regular files (each inode once), see
fusefs/quota.py; ``df`` and statvfs on the mount show exactly that.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.fusefs.conftest import Mounted

pytestmark = pytest.mark.privileged

MiB = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate64.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def used(m: Mounted) -> int:
    return int(m.client.stats()["used_bytes"])


def scanned(m: Mounted, timeout: float = 30.0) -> dict[str, Any]:
    """Stats once the session's background usage scan is done."""
    deadline = time.monotonic() + timeout
    while (st := m.client.stats())["scan"]["state"] not in ("done", "trusted"):
        assert st["scan"]["state"] == "running" and time.monotonic() < deadline, st["scan"]
        time.sleep(0.02)
    return st


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_quota_hit_exactly_at_capacity(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=MiB)
    f = m.mountpoint / "fill"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        assert os.write(fd, b"a" * MiB) == MiB              # capacity bytes: fine
        with pytest.raises(OSError) as exc:
            os.write(fd, b"b")                              # one more byte: ENOSPC
        assert exc.value.errno == errno.ENOSPC
        os.fsync(fd)
    finally:
        os.close(fd)
    assert os.stat(f).st_size == MiB
    assert (m.source / "fill").stat().st_size == MiB        # nothing past the limit on disk
    assert used(m) == MiB
    with pytest.raises(OSError) as exc:                      # nor can a new name (it needs a
        (m.mountpoint / "more").write_bytes(b"x")            # block for its directory)
    assert exc.value.errno == errno.ENOSPC
    assert not (m.mountpoint / "more").exists()


def test_write_across_the_limit_is_short(start_session: Callable[..., Mounted]) -> None:
    """A write that crosses the limit writes up to it and returns the short
    count, as a full disk does; the next write gets ENOSPC."""
    m = start_session(capacity=MiB)
    fd = os.open(m.mountpoint / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"a" * (MiB - 100))
        assert os.write(fd, b"b" * 1000) == 100
        with pytest.raises(OSError) as exc:
            os.write(fd, b"c")
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert (m.source / "f").stat().st_size == MiB


def test_overwrites_inside_a_full_volume_still_work(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=MiB)
    f = m.mountpoint / "f"
    f.write_bytes(b"a" * MiB)
    fd = os.open(f, os.O_WRONLY)
    try:
        assert os.pwrite(fd, b"Z" * 4096, 8192) == 4096
    finally:
        os.close(fd)
    assert f.read_bytes()[8190:8194] == b"aaZZ"


def test_truncate_and_fallocate_respect_capacity(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=MiB)
    f = m.mountpoint / "f"
    f.write_bytes(b"x" * 1000)
    with pytest.raises(OSError) as exc:
        os.truncate(f, MiB + 1)
    assert exc.value.errno == errno.ENOSPC
    assert os.stat(f).st_size == 1000
    os.truncate(f, MiB)                                     # exactly the capacity
    assert used(m) == MiB
    os.truncate(f, 10)
    assert used(m) == 4096                                  # charged in whole blocks
    fd = os.open(f, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.posix_fallocate(fd, 0, MiB + 1)
        assert exc.value.errno == errno.ENOSPC
        os.posix_fallocate(fd, 0, MiB // 2)
        assert os.fstat(fd).st_size == MiB // 2
        # Blocks past end of file would not count as apparent size: refused.
        assert libc.fallocate64(fd, 1, 0, 2 * MiB) == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
        assert libc.fallocate64(fd, 1, 0, 4096) == 0       # inside the file: fine
    finally:
        os.close(fd)
    assert used(m) == MiB // 2


def test_deletes_renames_and_links_are_counted(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=4 * MiB)
    base_inodes = m.client.stats()["used_inodes"]
    a, b, c = (m.mountpoint / n for n in "abc")
    a.write_bytes(b"a" * 1000)                              # one block each
    b.write_bytes(b"b" * 3000)
    assert used(m) == 8192
    os.link(a, c)                                           # a second name: only its directory entry
    assert used(m) == 8192                                  # (the root's first block holds it)
    os.rename(b, a)                                         # a's old inode still has c
    assert used(m) == 8192
    os.unlink(c)                                            # now it is gone
    assert used(m) == 4096
    os.rename(a, c)
    (m.mountpoint / "d").mkdir()                            # a directory: one block
    os.symlink("c", m.mountpoint / "l")                     # a symlink: its target, in blocks
    st = m.client.stats()
    assert st["used_bytes"] == 3 * 4096 and st["used_inodes"] == base_inodes + 3
    os.unlink(c)
    os.unlink(m.mountpoint / "l")
    os.rmdir(m.mountpoint / "d")
    st = m.client.stats()
    assert st["used_bytes"] == 0 and st["used_inodes"] == base_inodes


def test_unlinked_open_file_is_released_on_close(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=4 * MiB)
    f = m.mountpoint / "f"
    fd = os.open(f, os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"x" * MiB)
    os.unlink(f)
    assert os.listdir(m.mountpoint) == []
    os.write(fd, b"y" * MiB)                                # still charged while open
    assert used(m) == 2 * MiB
    os.close(fd)
    wait_for(lambda: used(m) == 0)                           # release is asynchronous
    wait_for(lambda: os.listdir(m.source) == [])


def test_inode_limit(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=MiB)                          # 1024 inodes at least
    st = m.client.stats()
    room = st["total_inodes"] - st["used_inodes"]
    assert room > 0
    made = 0
    with pytest.raises(OSError) as exc:
        for i in range(room + 10):
            os.close(os.open(m.mountpoint / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o644))
            made += 1
    assert exc.value.errno == errno.ENOSPC
    assert made == room
    assert os.statvfs(m.mountpoint).f_ffree == 0
    os.unlink(m.mountpoint / "f0")
    os.mkdir(m.mountpoint / "d")                             # the freed inode is usable again


def _df(path: Path) -> dict[str, int]:
    out = subprocess.run(["df", "-B1", "--output=size,used,avail,itotal,iused,iavail", str(path)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    keys = ["size", "used", "avail", "itotal", "iused", "iavail"]
    return dict(zip(keys, map(int, out[1].split())))


def test_df_shows_capacity_and_usage(start_session: Callable[..., Mounted]) -> None:
    capacity = 10 * MiB
    m = start_session(capacity=capacity)
    (m.mountpoint / "a").write_bytes(b"a" * (3 * MiB))
    (m.mountpoint / "dir").mkdir()
    st = m.client.stats()
    df = _df(m.mountpoint)
    sv = os.statvfs(m.mountpoint)
    assert df["size"] == capacity == sv.f_blocks * sv.f_frsize
    used_bytes = 3 * MiB + 4096                              # the directory's block
    assert df["used"] == used_bytes == st["used_bytes"] == (sv.f_blocks - sv.f_bfree) * sv.f_frsize
    assert df["avail"] == capacity - used_bytes == sv.f_bavail * sv.f_frsize
    assert df["itotal"] == st["total_inodes"] == sv.f_files
    assert df["iused"] == st["used_inodes"] == sv.f_files - sv.f_ffree
    assert df["iavail"] == st["total_inodes"] - st["used_inodes"]


def test_online_resize_lets_a_refused_write_through(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=MiB)
    f = m.mountpoint / "f"
    fd = os.open(f, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"a" * MiB)
        with pytest.raises(OSError) as exc:
            os.write(fd, b"b" * MiB)
        assert exc.value.errno == errno.ENOSPC
        assert m.client.resize(4 * MiB) == {"capacity": 4 * MiB}
        assert os.write(fd, b"b" * MiB) == MiB              # the same write, now it fits
    finally:
        os.close(fd)
    assert _df(m.mountpoint)["size"] == 4 * MiB
    assert used(m) == 2 * MiB
    m.client.resize(MiB)                                    # below usage: nothing grows, nothing breaks
    with pytest.raises(OSError):
        (m.mountpoint / "g").write_bytes(b"x")
    assert f.read_bytes()[:1] == b"a"
    with pytest.raises(ValueError):
        m.client.resize(-1)


def test_mount_scan_counts_existing_data(start_session: Callable[..., Mounted]) -> None:
    def populate(src: Path) -> None:
        (src / "d" / "e").mkdir(parents=True)
        (src / "d" / "e" / "f").write_bytes(b"f" * 5000)
        (src / "g").write_bytes(b"g" * 7)
        os.link(src / "g", src / "d" / "g2")                 # counted once
        os.symlink("g", src / "l")
        with open(src / "sparse", "wb") as s:                # sparse: apparent size counts
            s.truncate(100_000)
        os.setxattr(src / "g", "user.tag", b"1")

    m = start_session(capacity=MiB, populate=populate)
    st = scanned(m)                                          # no usage file yet: a background scan
    # blocks: f 2, g 1, l 1, sparse 25 (apparent size), d and e 1 each, g's xattr 1
    assert st["used_bytes"] == 4096 * (2 + 1 + 1 + 25 + 2 + 1)
    assert st["used_inodes"] == 1 + 2 + 1 + 1 + 1 + 1        # root, d, e, f, g, l, sparse
    assert os.getxattr(m.mountpoint / "g", "user.tag") == b"1"   # a scanned name is served
    assert os.getxattr(m.mountpoint / "d" / "g2", "user.tag") == b"1"


def test_no_quota_means_no_limit(start_session: Callable[..., Mounted]) -> None:
    m = start_session(capacity=0)
    (m.mountpoint / "f").write_bytes(b"x" * (2 * MiB))
    st = m.client.stats()
    assert st["capacity"] == 0 and st["used_bytes"] == 2 * MiB
    host = os.statvfs(m.source)
    assert os.statvfs(m.mountpoint).f_blocks * 4096 == pytest.approx(host.f_blocks * host.f_frsize, rel=0.01)


def test_fuse_hidden_names_are_the_pods_and_counted(start_session: Callable[..., Mounted]) -> None:
    """Unlinked open files are really unlinked (hard_remove), so a
    ``.fuse_hidden*`` name is an ordinary one: kept and charged at mount."""
    def populate(src: Path) -> None:
        (src / ".fuse_hidden0000000a00000001").write_bytes(b"x" * 5000)
        (src / "keep").write_bytes(b"k" * 10)
        (src / ".fuse_hidden-but-not-ours").write_bytes(b"y")

    m = start_session(capacity=MiB, populate=populate)
    names = [".fuse_hidden-but-not-ours", ".fuse_hidden0000000a00000001", "keep"]
    assert sorted(os.listdir(m.source)) == names
    assert sorted(os.listdir(m.mountpoint)) == names
    assert scanned(m)["used_bytes"] == 4096 * (2 + 1 + 1)
