"""Names a pod makes are ordinary names (issue: `.fuse_hidden*`, `.`/`..`, rename flags).

libfuse's high-level API hides a file unlinked while open by renaming it to
``.fuse_hiddenNNN``; the filesystem used to treat every such name as its own:
a rename to one deleted the file, readdir hid them, and the next mount
deleted them. Readdir also filled ``.`` and ``..`` with inode 0, which glibc
drops, so ``ls -a`` showed neither. ``renameat2(RENAME_WHITEOUT)`` made a
character device per call, outside the quota and the "no device nodes" rule.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from pathlib import Path

import pytest

from tests.fusefs.conftest import base_dir  # noqa: F401 - fixture
from tests.hostile.quota_volume import Volume, as_pod, volumes

pytestmark = pytest.mark.privileged

HIDDEN = ".fuse_hidden0000000100000002"
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4

_libc = ctypes.CDLL(None, use_errno=True)


def renameat2(old: str, new: str, flags: int) -> int:
    """renameat2(2) with AT_FDCWD; returns 0 or the errno."""
    AT_FDCWD = -100
    res = _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    return ctypes.get_errno() if res else 0


def test_fuse_hidden_names_are_ordinary(base_dir: Path) -> None:  # noqa: F811
    with volumes(base_dir) as made:
        v = Volume(base_dir)
        made.append(v)
        m = v.start()

        def pod() -> list[str]:
            a = m.mountpoint / "a"
            a.write_bytes(b"keep me")
            os.rename(a, m.mountpoint / HIDDEN)            # an ordinary rename
            fd = os.open(m.mountpoint / "open", os.O_CREAT | os.O_RDWR, 0o644)
            os.close(fd)
            (m.mountpoint / ".fuse_hidden0000000a00000001").write_bytes(b"mine too")
            return sorted(os.listdir(m.mountpoint))
        listed = as_pod(pod)
        assert HIDDEN in listed and ".fuse_hidden0000000a00000001" in listed
        assert (m.mountpoint / HIDDEN).read_bytes() == b"keep me"
        before = v.stats()["used_bytes"]
        v.restage()
        assert sorted(os.listdir(v.mountpoint)) == listed   # the next mount deletes nothing
        assert (v.mountpoint / HIDDEN).read_bytes() == b"keep me"
        assert v.stats()["used_bytes"] == before


def test_ls_a_shows_dot_and_dotdot(base_dir: Path) -> None:  # noqa: F811
    with volumes(base_dir) as made:
        v = Volume(base_dir)
        made.append(v)
        m = v.start()
        (m.mountpoint / "sub").mkdir()
        for d in (m.mountpoint, m.mountpoint / "sub"):
            out = subprocess.run(["ls", "-a", str(d)], check=True, capture_output=True, text=True).stdout.split()
            assert out[:2] == [".", ".."], out
        # and the inode numbers are real ones (ls -ai shows them)
        out = subprocess.run(["ls", "-ai", str(m.mountpoint / "sub")], check=True, capture_output=True,
                             text=True).stdout.split()
        assert int(out[0]) == os.stat(v.source / "sub").st_ino


def test_rename_whiteout_and_unknown_flags_are_refused(base_dir: Path) -> None:  # noqa: F811
    with volumes(base_dir) as made:
        v = Volume(base_dir)
        made.append(v)
        m = v.start()
        inodes = v.stats()["used_inodes"]
        a, b = m.mountpoint / "a", m.mountpoint / "b"
        a.write_bytes(b"a")
        b.write_bytes(b"b")
        for _ in range(50):
            assert renameat2(str(a), str(m.mountpoint / "c"), RENAME_WHITEOUT) == errno.EINVAL
        assert renameat2(str(a), str(m.mountpoint / "c"), 1 << 5) == errno.EINVAL
        assert sorted(os.listdir(v.source)) == ["a", "b"]   # no character devices appeared
        # the flags a pod needs still work
        assert renameat2(str(a), str(b), RENAME_NOREPLACE) == errno.EEXIST
        assert renameat2(str(a), str(b), RENAME_EXCHANGE) == 0
        assert a.read_bytes() == b"b" and b.read_bytes() == b"a"
        assert v.stats()["used_inodes"] == inodes + 2
