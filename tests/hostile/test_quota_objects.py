"""Everything a pod makes the host store is charged (issue 8, item 5).

Hard links, symlink targets, extended attributes and directories used to
cost nothing: a 1 MiB volume used 62 MiB of host disk. Here a pod (uid 1000)
makes each kind of object until the volume refuses, on a dedicated ext4
filesystem, and the host's ``du`` and used-inode count of the backing
directory must stay within the capacity and the inode limit plus the
documented slack. Each attack is bounded (a count and a few seconds).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fusefs.conftest import base_dir  # noqa: F401 - fixture
from tests.hostile.quota_volume import (
    DU_SLACK, INODE_SLACK, Volume, as_pod, du_bytes, loop_ext4, used_inodes, volumes, wait_scanned)

pytestmark = pytest.mark.privileged

MiB = 1 << 20
ATTACK_SECONDS = 4.0
REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EMLINK, errno.E2BIG)


def _until_refused(step: Callable[[int], None], limit: int = 20000) -> int:
    """Call ``step(i)`` until the volume refuses (or the bound); returns the count."""
    deadline = time.monotonic() + ATTACK_SECONDS
    for i in range(limit):
        if time.monotonic() > deadline:
            return i
        try:
            step(i)
        except OSError as exc:
            assert exc.errno in REFUSED, exc
            return i
    return limit


def _hardlinks(root: Path) -> None:
    (root / "h").mkdir()
    (root / "h" / "f").write_bytes(b"x")
    _until_refused(lambda i: os.link(root / "h" / "f", root / "h" / f"{i:0250d}"))


def _symlinks(root: Path) -> None:
    (root / "s").mkdir()
    target = "t" * 4000
    _until_refused(lambda i: os.symlink(target, root / "s" / str(i)))


def _xattrs(root: Path) -> None:
    (root / "x").mkdir()

    def step(i: int) -> None:
        f = root / "x" / str(i)
        f.touch()
        for j in range(8):
            os.setxattr(f, f"user.{j:0100d}", b"v" * 380)
    _until_refused(step)


def _dirs(root: Path) -> None:
    _until_refused(lambda i: os.mkdir(root / f"dir{i}"))


def _fifos(root: Path) -> None:
    _until_refused(lambda i: os.mkfifo(root / f"p{i}"))


ATTACKS = {"hardlinks": _hardlinks, "symlinks": _symlinks, "xattrs": _xattrs, "dirs": _dirs,
           "fifos": _fifos}


@pytest.mark.parametrize("attack", sorted(ATTACKS) + ["mix"])
def test_host_usage_stays_within_the_limits(base_dir: Path, attack: str) -> None:  # noqa: F811
    with loop_ext4(base_dir) as fs, volumes(base_dir) as made:
        v = Volume(base_dir, capacity=MiB, source=fs / "vol")
        made.append(v)
        m = v.start()
        inodes0 = used_inodes(fs) - 1            # the backing root itself
        limit = v.stats()["total_inodes"]

        def pod() -> None:
            for name in (sorted(ATTACKS) if attack == "mix" else [attack]):
                try:
                    ATTACKS[name](m.mountpoint)
                except OSError as exc:  # the volume is already full: fine
                    assert exc.errno in REFUSED and attack == "mix", exc
        as_pod(pod)
        du, inodes = du_bytes(v.source), used_inodes(fs) - inodes0
        st = v.stats()
        print(f"{attack}: du={du} inodes={inodes} charged={st['used_bytes']}/{st['used_inodes']}")
        assert du <= MiB + DU_SLACK
        assert inodes <= limit + INODE_SLACK
        assert st["used_bytes"] <= MiB + DU_SLACK and st["used_inodes"] <= limit
        # and the charge is what a fresh scan finds (restage, then crash)
        for sig in (15, 9):
            v.restage(sig)
            again = wait_scanned(v)
            assert (again["used_bytes"], again["used_inodes"]) == (st["used_bytes"], st["used_inodes"])
