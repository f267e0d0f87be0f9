"""The usage scan measures any tree a pod can make (issue 8, items 4 and 7).

Directly on a directory (no FUSE): a tree far deeper than PATH_MAX and than
the number of descriptors the scan keeps open (so the walk climbs back
through ``..``), built with ``mkdirat`` so no path string is ever involved,
is measured exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

from fusefs.quota import BLOCK
from fusefs.usage import FDS_KEPT, scan

DEPTH = 20_000
NAME = "d" * 50  # 20,000 levels of 51 bytes: a path of about 1 MB


def _deep(root: Path, depth: int) -> None:
    """``depth`` nested directories with a one-block file every 1,000 levels."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            if level % 1000 == 0:
                f = os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
                os.write(f, b"x")
                os.close(f)
            os.mkdir(NAME, dir_fd=fd)
            nfd = os.open(NAME, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def test_scan_measures_a_tree_deeper_than_path_max_and_the_fds_it_keeps(tmp_path: Path) -> None:
    assert DEPTH > 10 * FDS_KEPT
    _deep(tmp_path, DEPTH)
    (tmp_path / "top").write_bytes(b"y" * (BLOCK + 1))
    os.link(tmp_path / "top", tmp_path / "top2")          # counted once
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        found = scan(fd)
    finally:
        os.close(fd)
    files = DEPTH // 1000
    assert found.unmeasured == 0, found.problems
    assert found.used_inodes == 1 + DEPTH + files + 1
    # every directory one block (they hold one or two short names), the root's first block free
    assert found.dir_bytes == DEPTH * BLOCK
    assert found.used_bytes == DEPTH * BLOCK + files * BLOCK + 2 * BLOCK
