"""SIGKILL the driver at named points inside multi-step operations, restart
it, and check that nothing is orphaned and no completed volume is lost.

``FUSEPATH_CRASH_AT`` (see ``csi_driver.faults``) makes the driver kill
itself with SIGKILL exactly at the named point, so every interleaving the
code documents is exercised deterministically.
"""

from __future__ import annotations

import os
import sqlite3

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB, Driver, mount_cap

pytestmark = pytest.mark.slow


def _rows(driver: Driver, table: str) -> list[tuple]:
    with sqlite3.connect(driver.data_dir / "state.db") as db:
        return db.execute(f"SELECT id, state FROM {table}").fetchall()


def _assert_clean(driver: Driver) -> None:
    """No in-flight leftovers, and the disk agrees with the database."""
    data = driver.data_dir
    assert list((data / "tmp").iterdir()) == []
    assert list((data / "trash").iterdir()) == []
    assert list((data / "lost+found").iterdir()) == []
    volumes = _rows(driver, "volumes")
    assert all(state == "ready" for _, state in volumes), volumes
    assert sorted(os.listdir(data / "volumes")) == sorted(v for v, _ in volumes)
    snaps = _rows(driver, "snapshots")
    assert all(state == "ready" for _, state in snaps), snaps
    assert sorted(p.split(".")[0] for p in os.listdir(data / "snapshots")) == sorted(s for s, _ in snaps)


@pytest.fixture
def crashy(tmp_path):
    d = Driver(tmp_path)
    yield d
    d.teardown()


def _survivor(driver: Driver) -> str:
    """A completed volume with data that every crash must leave alone."""
    vol = driver.create_volume("survivor", size=4 * MiB)
    (driver.volume_dir(vol.volume_id) / "precious").write_text("do not lose me")
    return vol.volume_id


def _crash_during(driver: Driver, point: str, call) -> None:
    driver.restart(env={"FUSEPATH_CRASH_AT": point})
    with pytest.raises(grpc.RpcError) as exc:
        call()
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert driver.wait_exit() == -9
    driver.start()  # a clean start: reconciliation runs before the socket opens


@pytest.mark.parametrize("point", ["create.after_row", "create.before_rename", "create.after_rename"])
def test_kill_during_create_volume(crashy, point):
    crashy.start()
    survivor = _survivor(crashy)
    _crash_during(crashy, point, lambda: crashy.create_volume("victim", size=4 * MiB))
    _assert_clean(crashy)
    assert (crashy.volume_dir(survivor) / "precious").read_text() == "do not lose me"
    first = crashy.create_volume("victim", size=4 * MiB)  # the CO retries
    again = crashy.create_volume("victim", size=4 * MiB)
    assert first.volume_id == again.volume_id
    names = [e.volume.volume_id for e in crashy.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries]
    assert sorted(names) == sorted([survivor, first.volume_id])
    _assert_clean(crashy)


@pytest.mark.parametrize("point", ["delete.after_mark", "delete.after_discard"])
def test_kill_during_delete_volume(crashy, point):
    crashy.start()
    survivor = _survivor(crashy)
    victim = crashy.create_volume("victim", size=4 * MiB)
    (crashy.volume_dir(victim.volume_id) / "junk").write_bytes(os.urandom(MiB))
    _crash_during(crashy, point, lambda: crashy.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=victim.volume_id)))
    _assert_clean(crashy)
    crashy.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=victim.volume_id))
    assert not crashy.volume_dir(victim.volume_id).exists()
    assert (crashy.volume_dir(survivor) / "precious").read_text() == "do not lose me"
    _assert_clean(crashy)


@pytest.mark.parametrize("point", ["snapshot.after_row", "snapshot.after_archive"])
def test_kill_during_create_snapshot(crashy, point):
    crashy.start()
    survivor = _survivor(crashy)
    request = csi_pb2.CreateSnapshotRequest(name="snap-victim", source_volume_id=survivor)
    _crash_during(crashy, point, lambda: crashy.controller.CreateSnapshot(request))
    _assert_clean(crashy)
    snap = crashy.controller.CreateSnapshot(request).snapshot
    assert snap.ready_to_use
    assert crashy.controller.CreateSnapshot(request).snapshot.snapshot_id == snap.snapshot_id
    listed = crashy.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries
    assert [e.snapshot.snapshot_id for e in listed] == [snap.snapshot_id]
    assert (crashy.volume_dir(survivor) / "precious").read_text() == "do not lose me"
    _assert_clean(crashy)


def test_kill_during_delete_snapshot(crashy):
    crashy.start()
    survivor = _survivor(crashy)
    snap = crashy.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name="s", source_volume_id=survivor)).snapshot
    _crash_during(crashy, "snapshot.delete_after_files", lambda: crashy.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)))
    crashy.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    _assert_clean(crashy)


def test_stray_volume_directory_goes_to_lost_and_found_not_the_bin(crashy):
    crashy.start()
    stray = crashy.data_dir / "volumes" / ("vol-" + "c" * 32)
    stray.mkdir()
    (stray / "someones-data").write_text("keep")
    crashy.restart()
    kept = list((crashy.data_dir / "lost+found").iterdir())
    assert len(kept) == 1 and (kept[0] / "someones-data").read_text() == "keep"
    assert not stray.exists()


@pytest.mark.privileged
def test_restart_between_stage_and_publish_keeps_working(crashy):
    """A restart between two steps of the CO's flow: state comes back from SQLite."""
    crashy.start()
    vol = crashy.create_volume("pvc", size=4 * MiB, parameters={"mounter": "bind"})
    staging = crashy.kubelet_dir / "staging"
    target = crashy.kubelet_dir / "target"
    crashy.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=mount_cap()))
    crashy.kill()
    crashy.start()
    crashy.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_cap()))
    (target / "x").write_text("after restart")
    assert (crashy.volume_dir(vol.volume_id) / "x").read_text() == "after restart"
    crashy.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol.volume_id,
                                                                       target_path=str(target)))
    crashy.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vol.volume_id,
                                                                   staging_target_path=str(staging)))
