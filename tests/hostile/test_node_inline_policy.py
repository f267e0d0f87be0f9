"""Inline ephemeral volumes: the pod author writes volume_context, so nothing in it may weaken isolation.

For a CSI ephemeral inline volume, ``volume_context`` comes from the pod spec.
A pod author must not be able to pick the bind mounter (no quota, setuid
honoured), choose a size beyond what the cluster admin allows, or set I/O
limits that make the volume hang its own workers. These tests publish real
inline volumes through the driver and play the pod with uid 1000 processes.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid

import grpc
import pytest

from csi_driver.gen import csi_pb2
from csi_driver.mounts import top_mount
from tests.harness import MiB, Driver, code_of, mount_cap
from tests.hostile.node_pods import as_pod_user, pod_driver  # noqa: F401  (fixture)

pytestmark = pytest.mark.privileged
C = grpc.StatusCode
EPHEMERAL = {"csi.storage.k8s.io/ephemeral": "true", "csi.storage.k8s.io/pod.name": "attacker",
             "csi.storage.k8s.io/pod.namespace": "default"}


def publish_inline(driver: Driver, attrs: dict[str, str]):  # type: ignore[no-untyped-def]
    """NodePublish of an inline volume as the kubelet sends it; returns (handle, target)."""
    handle = f"csi-{uuid.uuid4().hex[:16]}"
    target = driver.kubelet_dir / "pods" / handle / "volumes" / "mount"
    target.parent.mkdir(parents=True)
    driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=handle, target_path=str(target), volume_capability=mount_cap(),
        volume_context={**EPHEMERAL, **attrs}), timeout=60)
    return handle, target


def unpublish(driver: Driver, handle: str, target) -> None:  # type: ignore[no-untyped-def]
    driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=handle, target_path=str(target)))


def refused(driver: Driver, attrs: dict[str, str]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as excinfo:
        publish_inline(driver, attrs)
    return code_of(excinfo)


@pytest.fixture
def small_inline_driver(tmp_path):
    d = Driver(tmp_path, "--max-inline-volume-size=16Mi")
    d.start()
    yield d
    d.teardown()


def test_inline_volume_cannot_choose_the_bind_mounter(driver):
    assert refused(driver, {"mounter": "bind", "size": "8Mi"}) == C.INVALID_ARGUMENT


def test_inline_volume_cannot_set_io_limits(driver):
    assert refused(driver, {"ioBytesPerSecond": "1", "size": "8Mi"}) == C.INVALID_ARGUMENT
    assert refused(driver, {"ioOpsPerSecond": "1", "size": "8Mi"}) == C.INVALID_ARGUMENT


def test_inline_volume_refuses_unknown_attributes(driver):
    assert refused(driver, {"size": "8Mi", "nosuid": "false"}) == C.INVALID_ARGUMENT
    assert refused(driver, {"size": "8Mi", "mountOptions": "suid,dev"}) == C.INVALID_ARGUMENT


def test_inline_volume_size_is_bounded_by_the_admin(small_inline_driver):
    d = small_inline_driver
    assert refused(d, {"size": "32Mi"}) == C.INVALID_ARGUMENT
    assert refused(d, {"size": "1Ti"}) == C.INVALID_ARGUMENT
    handle, target = publish_inline(d, {"size": "8Mi"})
    unpublish(d, handle, target)
    # Without a size an inline volume gets the default capacity, never more than the maximum.
    handle, target = publish_inline(d, {})
    with pytest.raises(OSError):
        (target / "big").write_bytes(b"\0" * (17 * MiB))
    unpublish(d, handle, target)


def test_default_maximum_inline_size_refuses_a_huge_volume(driver):
    assert refused(driver, {"size": "100Ti"}) == C.INVALID_ARGUMENT


def test_setuid_binary_in_an_inline_volume_gives_no_privilege(pod_driver):
    driver = pod_driver
    handle, target = publish_inline(driver, {"size": "16Mi"})
    entry = top_mount(target)
    assert entry is not None and entry.fs_type == "fuse.fusefs"
    assert "nosuid" in entry.options and "nodev" in entry.options
    target.chmod(0o777)
    binary = target / "id"
    shutil.copy("/usr/bin/id", binary)  # root in the pod plants a setuid-root binary
    binary.chmod(0o4755)
    out = subprocess.run(as_pod_user(str(binary), "-u"), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1000"
    unpublish(driver, handle, target)
