"""Node RPCs with real mounts: bind and block mounters, publish/unpublish,
stats, expansion and inline volumes. (FUSE staging: tests/test_node_fusefs.py.)"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import grpc
import pytest

from csi_driver.gen import csi_pb2
from csi_driver.mounts import is_mounted, top_mount
from fusefs import mountinfo
from tests.harness import MiB, AccessMode, block_cap, code_of, mount_cap

C = grpc.StatusCode
pytestmark = pytest.mark.privileged
BIND = {"mounter": "bind"}


def uniq(prefix: str = "pvc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def paths(driver, name: str) -> tuple[Path, Path]:
    base = driver.kubelet_dir / "plugins" / name
    staging = base / "globalmount"
    staging.mkdir(parents=True)
    target = driver.kubelet_dir / "pods" / name / "mount"
    target.parent.mkdir(parents=True)
    return staging, target


def stage(driver, vol_id: str, staging: Path, cap=None) -> None:
    driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vol_id, staging_target_path=str(staging), volume_capability=cap or mount_cap()))


def publish(driver, vol_id: str, staging: Path, target: Path, cap=None, readonly=False, **kw) -> None:
    driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=vol_id, staging_target_path=str(staging), target_path=str(target),
        volume_capability=cap or mount_cap(), readonly=readonly, **kw))


def unpublish(driver, vol_id: str, target: Path) -> None:
    driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=vol_id, target_path=str(target)))


def unstage(driver, vol_id: str, staging: Path) -> None:
    driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=vol_id,
                                                                    staging_target_path=str(staging)))


def test_node_info_and_capabilities(driver):
    info = driver.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
    assert info.node_id == "test-node" and info.max_volumes_per_node == 4
    assert info.accessible_topology.segments == {"topology.fusepath.csi.io/node": "test-node"}
    caps = {c.rpc.type for c in driver.node.NodeGetCapabilities(csi_pb2.NodeGetCapabilitiesRequest()).capabilities}
    R = csi_pb2.NodeServiceCapability.RPC
    assert caps == {R.STAGE_UNSTAGE_VOLUME, R.GET_VOLUME_STATS, R.EXPAND_VOLUME, R.VOLUME_CONDITION,
                    R.SINGLE_NODE_MULTI_WRITER}


def test_bind_lifecycle_writes_reach_the_volume_and_repeat_safely(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, target = paths(driver, "bind1")
    for _ in range(3):
        stage(driver, vol.volume_id, staging)
    for _ in range(3):
        publish(driver, vol.volume_id, staging, target)
    (target / "hello.txt").write_text("from the pod")
    assert (driver.volume_dir(vol.volume_id) / "hello.txt").read_text() == "from the pod"
    for _ in range(3):
        unpublish(driver, vol.volume_id, target)
    assert not target.exists() and not is_mounted(target)
    for _ in range(3):
        unstage(driver, vol.volume_id, staging)
    assert not is_mounted(staging)
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_readonly_publish_is_a_readonly_bind(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, target = paths(driver, "ro")
    stage(driver, vol.volume_id, staging)
    publish(driver, vol.volume_id, staging, target, readonly=True)
    assert top_mount(target).read_only
    with pytest.raises(OSError) as exc:
        (target / "nope").write_text("x")
    assert exc.value.errno == 30  # EROFS
    other = driver.kubelet_dir / "pods" / "ro" / "other"
    publish(driver, vol.volume_id, staging, other)  # a second, writable target of the same volume
    (other / "yes").write_text("x")
    unpublish(driver, vol.volume_id, other)
    unpublish(driver, vol.volume_id, target)
    unstage(driver, vol.volume_id, staging)


def test_publish_same_target_with_other_arguments_is_already_exists(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, target = paths(driver, "ae")
    stage(driver, vol.volume_id, staging)
    publish(driver, vol.volume_id, staging, target)
    with pytest.raises(grpc.RpcError) as exc:
        publish(driver, vol.volume_id, staging, target, readonly=True)
    assert code_of(exc) == C.ALREADY_EXISTS
    unpublish(driver, vol.volume_id, target)
    unstage(driver, vol.volume_id, staging)


def test_single_writer_refuses_a_second_target(driver):
    cap = mount_cap(AccessMode.SINGLE_NODE_SINGLE_WRITER)
    vol = driver.create_volume(uniq(), parameters=BIND, cap=cap)
    staging, target = paths(driver, "sw")
    stage(driver, vol.volume_id, staging, cap)
    publish(driver, vol.volume_id, staging, target, cap)
    with pytest.raises(grpc.RpcError) as exc:
        publish(driver, vol.volume_id, staging, target.with_name("second"), cap)
    assert code_of(exc) == C.FAILED_PRECONDITION
    unpublish(driver, vol.volume_id, target)
    unstage(driver, vol.volume_id, staging)


def test_stage_errors(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, _ = paths(driver, "stage-errors")
    outside = driver.root / "outside-kubelet-dir"  # where a missing path check would mount (never /etc)
    outside.mkdir()
    cases = [
        (dict(staging_target_path=str(staging), volume_capability=mount_cap()), C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id, volume_capability=mount_cap()), C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id, staging_target_path=str(staging)), C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id, staging_target_path=str(outside), volume_capability=mount_cap()),
         C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id, staging_target_path=str(staging) + "/../../x",
              volume_capability=mount_cap()), C.INVALID_ARGUMENT),
        (dict(volume_id="vol-" + "7" * 32, staging_target_path=str(staging), volume_capability=mount_cap()),
         C.NOT_FOUND),
        (dict(volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=block_cap()),
         C.FAILED_PRECONDITION),
        (dict(volume_id=vol.volume_id, staging_target_path=str(staging),
              volume_capability=mount_cap(AccessMode.MULTI_NODE_MULTI_WRITER)), C.FAILED_PRECONDITION),
    ]
    for fields, code in cases:
        with pytest.raises(grpc.RpcError) as exc:
            driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(**fields))
        assert code_of(exc) == code, (fields, exc.value.details())
    # A refused stage leaves nothing behind: no mount of the volume anywhere, nothing at the paths.
    assert not is_mounted(staging) and not is_mounted(outside)
    assert [m for m in mountinfo.read() if m.root.endswith(f"/volumes/{vol.volume_id}")] == []
    assert list(outside.iterdir()) == [] and list(staging.iterdir()) == []


def test_stage_same_volume_at_another_path_is_already_exists(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, _ = paths(driver, "twice")
    stage(driver, vol.volume_id, staging)
    other = staging.with_name("elsewhere")
    other.mkdir()
    with pytest.raises(grpc.RpcError) as exc:
        stage(driver, vol.volume_id, other)
    assert code_of(exc) == C.ALREADY_EXISTS
    unstage(driver, vol.volume_id, staging)


def test_symlink_escape_in_target_path_is_refused(driver, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = driver.kubelet_dir / "pods" / "evil"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside)
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, _ = paths(driver, "evil-staging")
    stage(driver, vol.volume_id, staging)
    with pytest.raises(grpc.RpcError) as exc:
        publish(driver, vol.volume_id, staging, link / "mount")
    assert code_of(exc) == C.INVALID_ARGUMENT
    assert list(outside.iterdir()) == []
    unstage(driver, vol.volume_id, staging)


def test_publish_errors(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, target = paths(driver, "pub-errors")
    cases = [
        (dict(target_path=str(target), staging_target_path=str(staging), volume_capability=mount_cap()),
         C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=mount_cap()),
         C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id, target_path=str(target), staging_target_path=str(staging)),
         C.INVALID_ARGUMENT),
        (dict(volume_id="vol-" + "8" * 32, target_path=str(target), staging_target_path=str(staging),
              volume_capability=mount_cap()), C.NOT_FOUND),
        (dict(volume_id=vol.volume_id, target_path=str(target), volume_capability=mount_cap()),
         C.FAILED_PRECONDITION),
        (dict(volume_id=vol.volume_id, target_path=str(target), staging_target_path=str(staging),
              volume_capability=mount_cap()), C.FAILED_PRECONDITION),  # not staged yet
    ]
    for fields, code in cases:
        with pytest.raises(grpc.RpcError) as exc:
            driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(**fields))
        assert code_of(exc) == code, (fields, exc.value.details())
    assert not target.exists()


def test_unpublish_and_unstage_of_things_already_gone_are_ok(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, target = paths(driver, "gone")
    unpublish(driver, vol.volume_id, target)
    unstage(driver, vol.volume_id, staging)
    unpublish(driver, "vol-" + "9" * 32, target)
    for fields in (dict(target_path=str(target)), dict(volume_id=vol.volume_id)):
        with pytest.raises(grpc.RpcError) as exc:
            driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(**fields))
        assert code_of(exc) == C.INVALID_ARGUMENT
    for fields in (dict(staging_target_path=str(staging)), dict(volume_id=vol.volume_id)):
        with pytest.raises(grpc.RpcError) as exc:
            driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(**fields))
        assert code_of(exc) == C.INVALID_ARGUMENT


def test_unstage_while_published_is_failed_precondition(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    staging, target = paths(driver, "busy")
    stage(driver, vol.volume_id, staging)
    publish(driver, vol.volume_id, staging, target)
    with pytest.raises(grpc.RpcError) as exc:
        unstage(driver, vol.volume_id, staging)
    assert code_of(exc) == C.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as exc:
        driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert code_of(exc) == C.FAILED_PRECONDITION
    unpublish(driver, vol.volume_id, target)
    unstage(driver, vol.volume_id, staging)


def test_volume_stats_for_bind_volume(driver):
    vol = driver.create_volume(uniq(), size=8 * MiB, parameters=BIND)
    staging, target = paths(driver, "stats")
    stage(driver, vol.volume_id, staging)
    publish(driver, vol.volume_id, staging, target)
    (target / "blob").write_bytes(os.urandom(MiB))
    os.sync()
    stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=vol.volume_id, volume_path=str(target)))
    by_unit = {u.unit: u for u in stats.usage}
    assert by_unit[csi_pb2.VolumeUsage.BYTES].total == 8 * MiB
    assert by_unit[csi_pb2.VolumeUsage.BYTES].used >= MiB
    assert by_unit[csi_pb2.VolumeUsage.INODES].used >= 1
    assert stats.volume_condition.abnormal is False
    for fields, code in [
        (dict(volume_path=str(target)), C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id), C.INVALID_ARGUMENT),
        (dict(volume_id="vol-" + "a" * 32, volume_path=str(target)), C.NOT_FOUND),
        (dict(volume_id=vol.volume_id, volume_path="some/path"), C.NOT_FOUND),
        (dict(volume_id=vol.volume_id, volume_path=str(driver.kubelet_dir / "elsewhere")), C.NOT_FOUND),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(**fields))
        assert code_of(exc) == code, fields
    unpublish(driver, vol.volume_id, target)
    unstage(driver, vol.volume_id, staging)


def test_block_volume_lifecycle_through_a_loop_device(driver):
    cap = block_cap()
    vol = driver.create_volume(uniq(), size=4 * MiB, cap=cap)
    staging, _ = paths(driver, "blk")
    target = driver.kubelet_dir / "pods" / "blk" / "dev"
    stage(driver, vol.volume_id, staging, cap)
    stage(driver, vol.volume_id, staging, cap)
    for _ in range(2):
        publish(driver, vol.volume_id, staging, target, cap)
    assert top_mount(target) is not None
    with open(target, "r+b") as dev:
        dev.write(b"BLOCKDATA")
        dev.flush()
        os.fsync(dev.fileno())
        assert dev.seek(0, os.SEEK_END) == 4 * MiB
    image = driver.volume_dir(vol.volume_id) / "block.img"
    assert image.read_bytes()[:9] == b"BLOCKDATA"
    driver.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=8 * MiB)))
    resp = driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=vol.volume_id, volume_path=str(target), capacity_range=csi_pb2.CapacityRange(
            required_bytes=8 * MiB)))
    assert resp.capacity_bytes == 8 * MiB
    with open(target, "rb") as dev:
        assert dev.seek(0, os.SEEK_END) == 8 * MiB
    for _ in range(2):
        unpublish(driver, vol.volume_id, target)
    assert not target.exists()
    for _ in range(2):
        unstage(driver, vol.volume_id, staging)
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_node_expand_errors(driver):
    vol = driver.create_volume(uniq(), parameters=BIND)
    for fields, code in [
        (dict(volume_path=str(driver.kubelet_dir)), C.INVALID_ARGUMENT),
        (dict(volume_id="vol-" + "b" * 32, volume_path="some/path"), C.NOT_FOUND),
        (dict(volume_id=vol.volume_id), C.INVALID_ARGUMENT),
        (dict(volume_id=vol.volume_id, volume_path=str(driver.kubelet_dir / "x"), volume_capability=block_cap()),
         C.INVALID_ARGUMENT),
    ]:
        with pytest.raises(grpc.RpcError) as exc:
            driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(**fields))
        assert code_of(exc) == code, fields


def test_inline_ephemeral_volume_lives_and_dies_with_the_pod(driver):
    target = driver.kubelet_dir / "pods" / "inline" / "vol"
    target.parent.mkdir(parents=True)
    context = {"csi.storage.k8s.io/ephemeral": "true", "size": "16Mi",
               "csi.storage.k8s.io/pod.name": "web-0"}  # always fusefs: the pod author cannot pick the mounter
    req = csi_pb2.NodePublishVolumeRequest(volume_id="csi-0123abcd", target_path=str(target),
                                           volume_capability=mount_cap(), volume_context=context)
    for _ in range(2):
        driver.node.NodePublishVolume(req)
    (target / "scratch").write_text("tmp")
    listed = driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    inline = [e.volume for e in listed if e.volume.capacity_bytes == 16 * MiB]
    assert len(inline) == 1
    volume_dir = driver.volume_dir(inline[0].volume_id)
    assert (volume_dir / "scratch").read_text() == "tmp"
    for _ in range(2):
        driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-0123abcd",
                                                                           target_path=str(target)))
    assert not target.exists() and not volume_dir.exists()
    bad = csi_pb2.NodePublishVolumeRequest(volume_id="../escape", target_path=str(target),
                                           volume_capability=mount_cap(), volume_context=context)
    with pytest.raises(grpc.RpcError) as exc:
        driver.node.NodePublishVolume(bad)
    assert code_of(exc) == C.INVALID_ARGUMENT
