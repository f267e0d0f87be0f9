"""Read-only sessions: every mutating operation gets EROFS, reads work."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fusefs.conftest import Mounted

pytestmark = pytest.mark.privileged


def populate(src: Path) -> None:
    (src / "f").write_bytes(b"content")
    (src / "d").mkdir()
    (src / "d" / "g").write_bytes(b"")
    os.setxattr(src / "f", "user.k", b"v")


def mutations(mnt: Path) -> dict[str, Callable[[], Any]]:
    return {
        "create": lambda: os.open(mnt / "new", os.O_CREAT | os.O_WRONLY, 0o644),
        "open_write": lambda: os.open(mnt / "f", os.O_WRONLY),
        "open_rdwr": lambda: os.open(mnt / "f", os.O_RDWR),
        "open_trunc": lambda: os.open(mnt / "f", os.O_WRONLY | os.O_TRUNC),
        "truncate": lambda: os.truncate(mnt / "f", 0),
        "mkdir": lambda: os.mkdir(mnt / "x"),
        "rmdir": lambda: os.rmdir(mnt / "d"),
        "unlink": lambda: os.unlink(mnt / "f"),
        "rename": lambda: os.rename(mnt / "f", mnt / "f2"),
        "link": lambda: os.link(mnt / "f", mnt / "h"),
        "symlink": lambda: os.symlink("f", mnt / "l"),
        "mknod": lambda: os.mkfifo(mnt / "p"),
        "chmod": lambda: os.chmod(mnt / "f", 0o600),
        "chown": lambda: os.chown(mnt / "f", 1, 1),
        "utime": lambda: os.utime(mnt / "f", (1, 1)),
        "setxattr": lambda: os.setxattr(mnt / "f", "user.n", b"1"),
        "removexattr": lambda: os.removexattr(mnt / "f", "user.k"),
    }


@pytest.fixture
def read_only(start_session: Callable[..., Mounted]) -> Mounted:
    return start_session(read_only=True, populate=populate)


@pytest.mark.parametrize("op", sorted(mutations(Path("/"))))
def test_mutations_get_erofs(read_only: Mounted, op: str) -> None:
    with pytest.raises(OSError) as exc:
        result = mutations(read_only.mountpoint)[op]()
        if isinstance(result, int):
            os.close(result)
    assert exc.value.errno == errno.EROFS
    assert sorted(os.listdir(read_only.source)) == ["d", "f"]
    assert (read_only.source / "f").read_bytes() == b"content"


def test_reads_work(read_only: Mounted) -> None:
    mnt = read_only.mountpoint
    assert (mnt / "f").read_bytes() == b"content"
    assert sorted(os.listdir(mnt)) == ["d", "f"]
    assert os.getxattr(mnt / "f", "user.k") == b"v"
    assert os.stat(mnt / "d" / "g").st_size == 0
    assert read_only.client.stats()["read_only"] is True


def test_read_only_can_be_switched_live(start_session: Callable[..., Mounted]) -> None:
    m = start_session(populate=populate)
    f = m.mountpoint / "f"
    fd = os.open(f, os.O_WRONLY)                  # opened for writing before the switch
    try:
        m.client.set_read_only(True)
        with pytest.raises(OSError) as exc:
            os.write(fd, b"x")                    # an existing handle cannot write either
        assert exc.value.errno == errno.EROFS
        with pytest.raises(OSError) as exc:
            f.write_bytes(b"new")
        assert exc.value.errno == errno.EROFS
        m.client.set_read_only(False)
        assert os.write(fd, b"X") == 1
    finally:
        os.close(fd)
    assert f.read_bytes() == b"Xontent"
