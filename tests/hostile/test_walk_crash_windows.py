"""Issue 8 item 15: a driver SIGKILLed in the middle of CreateSnapshot or
DeleteSnapshot leaves nothing that start-up reconciliation does not repair:
no source left frozen, no ready snapshot whose archive is gone."""

from __future__ import annotations

import os

import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB, Driver, mount_cap
from tests.hostile.walk_helpers import uniq
from tests.test_crash import _crash_during, crashy  # noqa: F401 - crashy is a fixture

pytestmark = pytest.mark.slow


def _stage(driver: Driver, volume_id: str, name: str):
    staging = driver.kubelet_dir / "plugins" / name / "globalmount"
    target = driver.kubelet_dir / "pods" / name / "volumes" / "mount"
    staging.parent.mkdir(parents=True)
    target.parent.mkdir(parents=True)
    driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=mount_cap()))
    driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=mount_cap()))
    return target


def _frozen(driver: Driver, volume_id: str) -> bool:
    from fusefs.client import FuseFSClient

    with FuseFSClient(f"unix://{driver.data_dir / 'fusefs.sock'}") as fusefs:
        return fusefs.stats(volume_id).frozen


@pytest.mark.privileged
@pytest.mark.parametrize("point", ["snapshot.after_freeze", "snapshot.after_archive"])
def test_a_crash_while_a_source_is_frozen_is_thawed_at_start_up(crashy, point):
    crashy.start()
    name = uniq()
    vol = crashy.create_volume(name, size=16 * MiB)
    target = _stage(crashy, vol.volume_id, name)
    (target / "before").write_text("1")
    request = csi_pb2.CreateSnapshotRequest(name=uniq("snap"), source_volume_id=vol.volume_id)
    _crash_during(crashy, point, lambda: crashy.controller.CreateSnapshot(request))
    assert not _frozen(crashy, vol.volume_id), "the restarted driver left the source frozen"
    (target / "after").write_text("2")  # the pod can write at once, not after the 120 s auto-thaw
    assert crashy.controller.CreateSnapshot(request).snapshot.ready_to_use


@pytest.mark.privileged
def test_a_crash_while_a_clone_source_is_frozen_is_thawed_at_start_up(crashy):
    crashy.start()
    name = uniq()
    vol = crashy.create_volume(name, size=16 * MiB)
    target = _stage(crashy, vol.volume_id, name)
    request = csi_pb2.CreateVolumeRequest(name=uniq(), volume_capabilities=[mount_cap()])
    request.capacity_range.required_bytes = 16 * MiB
    request.volume_content_source.volume.volume_id = vol.volume_id
    _crash_during(crashy, "clone.frozen", lambda: crashy.controller.CreateVolume(request))
    assert not _frozen(crashy, vol.volume_id), "the restarted driver left the clone's source frozen"
    (target / "after").write_text("2")
    assert crashy.controller.CreateVolume(request).volume.volume_id


@pytest.mark.parametrize("point", ["snapshot.delete_after_mark", "snapshot.delete_after_files"])
def test_a_crash_during_delete_snapshot_never_leaves_a_ready_snapshot_without_its_archive(crashy, point):
    crashy.start()
    vol = crashy.create_volume(uniq(), size=4 * MiB)
    snap = crashy.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=uniq("snap"), source_volume_id=vol.volume_id)).snapshot
    _crash_during(crashy, point, lambda: crashy.controller.DeleteSnapshot(
        csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id)))
    archives = {p.split(".")[0] for p in os.listdir(crashy.data_dir / "snapshots")}
    for entry in crashy.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries:
        if entry.snapshot.ready_to_use:
            assert entry.snapshot.snapshot_id in archives, "a ready snapshot has no archive"
    assert snap.snapshot_id not in archives
    crashy.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert crashy.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest()).entries == []
