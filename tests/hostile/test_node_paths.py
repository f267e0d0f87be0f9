"""Node paths: the driver never creates, removes or mounts anything inside a volume.

Every volume's mount lives under the kubelet directory, so "under
--kubelet-dir" alone lets a staging or target path point into another pod's
volume. Each attack below uses real fusefs mounts; after each, the victim's
files must be untouched and nothing may be mounted inside the victim.
"""

from __future__ import annotations

import uuid

import grpc
import pytest

from csi_driver.gen import csi_pb2
from csi_driver.mounts import top_mount
from tests.harness import MiB, code_of, mount_cap
from tests.test_node_fusefs import Pod

pytestmark = pytest.mark.privileged
C = grpc.StatusCode
REFUSED = (C.INVALID_ARGUMENT, C.FAILED_PRECONDITION)


def unknown_volume() -> str:
    return f"vol-{uuid.uuid4().hex}"


def mounts_inside(path) -> list[str]:  # type: ignore[no-untyped-def]
    prefix = str(path) + "/"
    return [line.split()[4] for line in open("/proc/self/mountinfo") if line.split()[4].startswith(prefix)]


def rpc_code(call) -> grpc.StatusCode | None:  # type: ignore[no-untyped-def]
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return None


@pytest.fixture
def victim_and_attacker(driver):
    victim, attacker = Pod(driver, size=8 * MiB), Pod(driver, size=8 * MiB)
    (victim.target / "data").write_text("precious")
    yield victim, attacker
    for pod in (attacker, victim):
        try:
            pod.teardown()
        except grpc.RpcError:
            pass


def test_publish_into_another_volume_is_refused(driver, victim_and_attacker):
    victim, attacker = victim_and_attacker
    evil = victim.target / "evil"
    code = rpc_code(lambda: driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=attacker.vol.volume_id, staging_target_path=str(attacker.staging), target_path=str(evil),
        volume_capability=attacker.cap)))
    assert code in REFUSED
    assert not (driver.volume_dir(victim.vol.volume_id) / "evil").exists()
    assert mounts_inside(victim.target) == []


def test_publish_into_a_bind_of_another_volume_is_refused(driver, victim_and_attacker):
    victim, attacker = victim_and_attacker
    deep = victim.staging / "sub" / "dir"
    code = rpc_code(lambda: driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=attacker.vol.volume_id, staging_target_path=str(attacker.staging), target_path=str(deep),
        volume_capability=attacker.cap)))
    assert code in REFUSED
    assert not (driver.volume_dir(victim.vol.volume_id) / "sub").exists()


def test_stage_inside_another_volume_is_refused(driver, victim_and_attacker):
    victim, _ = victim_and_attacker
    vol = driver.create_volume(f"pvc-{uuid.uuid4().hex[:8]}", size=8 * MiB)
    staging = victim.target / "globalmount"
    code = rpc_code(lambda: driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=mount_cap())))
    assert code in REFUSED
    assert mounts_inside(victim.target) == []
    assert not (driver.volume_dir(victim.vol.volume_id) / "globalmount").exists()


def test_unpublish_of_unknown_volume_never_deletes_a_pod_file(driver, victim_and_attacker):
    victim, _ = victim_and_attacker
    rpc_code(lambda: driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=unknown_volume(), target_path=str(victim.target / "data"))))
    rpc_code(lambda: driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
        volume_id=unknown_volume(), staging_target_path=str(victim.target / "data"))))
    assert (victim.target / "data").read_text() == "precious"
    assert top_mount(victim.target) is not None


def test_unpublish_of_unknown_volume_removes_only_an_empty_directory(driver):
    pods = driver.kubelet_dir / "pods" / uuid.uuid4().hex
    file_target, full_dir, empty_dir = pods / "file", pods / "full", pods / "empty"
    pods.mkdir(parents=True)
    file_target.write_text("not ours")
    full_dir.mkdir()
    (full_dir / "keep").write_text("x")
    empty_dir.mkdir()
    for path in (file_target, full_dir, empty_dir):
        code = rpc_code(lambda: driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=unknown_volume(), target_path=str(path))))
        assert code in (None, C.FAILED_PRECONDITION)
        code = rpc_code(lambda: driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=unknown_volume(), staging_target_path=str(path))))
        assert code in (None, C.FAILED_PRECONDITION)
    assert file_target.read_text() == "not ours"
    assert (full_dir / "keep").read_text() == "x"
    assert not empty_dir.exists()


def test_symlinked_path_into_another_volume_is_refused(driver, victim_and_attacker):
    victim, attacker = victim_and_attacker
    link = driver.kubelet_dir / "pods" / uuid.uuid4().hex
    link.symlink_to(victim.target)
    code = rpc_code(lambda: driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=attacker.vol.volume_id, staging_target_path=str(attacker.staging),
        target_path=str(link / "mount"), volume_capability=attacker.cap)))
    assert code in REFUSED
    assert not (driver.volume_dir(victim.vol.volume_id) / "mount").exists()


def test_publish_to_a_regular_file_is_invalid_argument(driver):
    pod = Pod(driver, size=8 * MiB)
    target = driver.kubelet_dir / "pods" / uuid.uuid4().hex / "mount"
    target.parent.mkdir(parents=True)
    target.write_text("a file, not a directory")
    code = rpc_code(lambda: driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=pod.vol.volume_id, staging_target_path=str(pod.staging), target_path=str(target),
        volume_capability=pod.cap)))
    assert code == C.INVALID_ARGUMENT
    assert target.read_text() == "a file, not a directory"
    pod.teardown()


def test_only_the_kubelets_own_top_level_mounts_may_be_crossed(driver):
    """A separate disk for ``pods/`` is the kubelet's layout; a mount deeper down is someone's volume."""
    import subprocess

    from csi_driver.mounts import be_unmounted

    top = driver.kubelet_dir / "pods-disk"
    top.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "kubelet-disk", str(top)], check=True)
    deep = top / "other-volume"
    try:
        deep.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "other-volume", str(deep)], check=True)
        vol = driver.create_volume(f"pvc-{uuid.uuid4().hex[:8]}", size=8 * MiB)
        refused = rpc_code(lambda: driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(deep / "globalmount"), volume_capability=mount_cap())))
        assert refused in REFUSED
        assert not (deep / "globalmount").exists()
        staging = top / "plugins" / "globalmount"
        driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=mount_cap()))
        assert top_mount(staging) is not None and top_mount(staging).fs_type == "fuse.fusefs"
        driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)))
    finally:
        be_unmounted(deep)
        be_unmounted(top)
