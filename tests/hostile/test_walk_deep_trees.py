"""Issue 8 item 7: every walk over a pod-made tree is iterative and by fds.

Trees are made as a pod makes them: ``mkdirat`` relative to the last
directory's fd, far past PATH_MAX and Python's recursion limit. CI sizes are
set by FUSEPATH_DEEP_LEVELS (default 20,000) and FUSEPATH_WIDE_ENTRIES
(default 20,000); ``tests/hostile/walk_full.sh`` runs 100,000 levels and
1,000,000 entries.
"""

from __future__ import annotations

import os
import subprocess
import time

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.hostile.walk_helpers import (
    create_from, deep_depth, delete_volume, make_deep, make_wide, snapshot, uniq,
)

pytestmark = pytest.mark.privileged
LEVELS = int(os.environ.get("FUSEPATH_DEEP_LEVELS", "20000"))
#: Snapshots name every member by its full path, so an archive grows with
#: depth squared; this is deep enough to pass PATH_MAX and the recursion limit.
ARCHIVE_LEVELS = int(os.environ.get("FUSEPATH_DEEP_ARCHIVE_LEVELS", "3000"))
WIDE = int(os.environ.get("FUSEPATH_WIDE_ENTRIES", "20000"))


def _wait(predicate, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_delete_volume_removes_a_very_deep_tree(driver):
    vol = driver.create_volume(uniq(), size=64 << 20)
    make_deep(driver.volume_dir(vol.volume_id), LEVELS, every=1000)
    delete_volume(driver, vol.volume_id)
    assert not driver.volume_dir(vol.volume_id).exists()
    delete_volume(driver, vol.volume_id)  # idempotent
    assert _wait(lambda: list((driver.data_dir / "trash").iterdir()) == [])  # the rest in the background


def test_a_deep_tree_in_trash_never_stops_start_up(driver):
    make_deep(driver.data_dir / "trash", LEVELS)
    driver.restart()
    assert _wait(lambda: list((driver.data_dir / "trash").iterdir()) == [])


def test_a_failing_start_up_cleanup_is_retried_in_the_background(driver, tmp_path):
    """A mount inside a trashed tree cannot be removed: start-up goes on, and
    the cleanup is retried until it works (here: after the mount is gone)."""
    stuck = driver.data_dir / "trash" / "vol-stuck" / "sub"
    stuck.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("not the driver's")
    subprocess.run(["mount", "--bind", str(elsewhere), str(stuck)], check=True)
    try:
        driver.restart()
        assert driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value
        assert (elsewhere / "keep").read_text() == "not the driver's"
    finally:
        subprocess.run(["umount", str(stuck)], check=True)
    assert _wait(lambda: list((driver.data_dir / "trash").iterdir()) == [])
    assert (elsewhere / "keep").read_text() == "not the driver's"


def test_clone_copies_a_very_deep_tree(driver):
    src = driver.create_volume(uniq(), size=256 << 20)
    make_deep(driver.volume_dir(src.volume_id), LEVELS, every=1000)
    clone = create_from(driver, "volume", src.volume_id, size=256 << 20)
    assert deep_depth(driver.volume_dir(clone.volume_id)) == LEVELS


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_snapshot_and_restore_of_a_tree_deeper_than_path_max(driver, compression):
    src = driver.create_volume(uniq(), size=256 << 20)
    make_deep(driver.volume_dir(src.volume_id), ARCHIVE_LEVELS, every=500)
    snap = snapshot(driver, src.volume_id, compression=compression)
    restored = create_from(driver, "snapshot", snap.snapshot_id, size=256 << 20)
    assert deep_depth(driver.volume_dir(restored.volume_id)) == ARCHIVE_LEVELS


def test_a_snapshot_of_a_tree_too_deep_to_archive_fails_clearly_and_at_once(driver):
    """A tar archive names members by full path (size ~ depth squared): past
    a bound the snapshot is refused with FAILED_PRECONDITION, nothing left."""
    src = driver.create_volume(uniq(), size=256 << 20)
    make_deep(driver.volume_dir(src.volume_id), LEVELS)
    with pytest.raises(grpc.RpcError) as exc:
        snapshot(driver, src.volume_id)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.value.details()[:300]
    assert "too deep" in exc.value.details()
    assert list((driver.data_dir / "snapshots").iterdir()) == []
    assert list((driver.data_dir / "tmp").iterdir()) == []


def test_a_million_entries_directory_is_streamed_by_every_walk(driver):
    src = driver.create_volume(uniq(), size=256 << 20)
    make_wide(driver.volume_dir(src.volume_id), WIDE)
    clone = create_from(driver, "volume", src.volume_id, size=256 << 20)
    assert len(os.listdir(driver.volume_dir(clone.volume_id))) == WIDE
    snap = snapshot(driver, src.volume_id, compression="zstd")
    restored = create_from(driver, "snapshot", snap.snapshot_id, size=256 << 20)
    assert len(os.listdir(driver.volume_dir(restored.volume_id))) == WIDE
    for vol in (src, clone, restored):
        delete_volume(driver, vol.volume_id)
        assert not driver.volume_dir(vol.volume_id).exists()
