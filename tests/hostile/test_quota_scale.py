"""A big volume stages at once (issue 8, item 10).

The mount-time scan had to finish before the mount answered (and within
NodeStage's 20 s), so 3,000,000 files made a volume unmountable. Now the
usage is persisted at a clean unmount and trusted at the next mount; without
it (first mount, a crash, a change behind the session's back) the mount
answers at once and the usage is rebuilt by a background scan, during which
nothing may grow past the capacity. The full-size variant (10 million files)
is ``bench/stage_scale.py``.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from tests.fusefs.conftest import base_dir  # noqa: F401 - fixture
from tests.hostile.quota_volume import Volume, volumes, wait_scanned

pytestmark = pytest.mark.privileged

FILES = 200_000
PER_DIR = 10_000


def _populate(source: Path, files: int) -> None:
    """Files made directly in the backing directory (as a restore would)."""
    for i in range(files):
        if i % PER_DIR == 0:
            (source / f"d{i // PER_DIR}").mkdir()
        fd = os.open(source / f"d{i // PER_DIR}" / str(i), os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)


def test_mount_answers_before_the_scan_and_usage_is_right_after(base_dir: Path) -> None:  # noqa: F811
    with volumes(base_dir) as made:
        v = Volume(base_dir, capacity=4 << 30)
        made.append(v)
        _populate(v.source, FILES)
        v.start()                                # waits only for the mount
        first = v.stats()
        assert first["scan"]["state"] == "running", first["scan"]
        # while the usage is unknown, nothing grows (the volume reads as full)...
        with pytest.raises(OSError) as exc:
            (v.mountpoint / "new").write_bytes(b"x")
        assert exc.value.errno == errno.ENOSPC
        # ...but everything else works
        assert len(os.listdir(v.mountpoint / "d0")) == PER_DIR
        st = wait_scanned(v)
        dirs = FILES // PER_DIR
        assert st["used_inodes"] == 1 + dirs + FILES
        assert st["used_bytes"] == st["scan"]["dir_bytes"]   # empty files: only directories
        (v.mountpoint / "new").write_bytes(b"x")
        assert v.stats()["used_inodes"] == 2 + dirs + FILES
        # a clean restage trusts what the last session persisted: no scan
        v.restage()
        again = v.stats()
        assert again["scan"]["state"] == "trusted"
        assert again["used_inodes"] == 2 + dirs + FILES


def test_a_crash_means_a_rescan_with_the_same_result(base_dir: Path) -> None:  # noqa: F811
    with volumes(base_dir) as made:
        v = Volume(base_dir, capacity=64 << 20)
        made.append(v)
        v.start()
        for i in range(50):
            (v.mountpoint / f"f{i}").write_bytes(b"x" * (i * 1000))
        before = wait_scanned(v)
        v.restage(signal.SIGKILL)
        st = wait_scanned(v)
        assert st["scan"]["state"] == "done"
        assert (st["used_bytes"], st["used_inodes"]) == (before["used_bytes"], before["used_inodes"])
