"""The default path: volumes staged through fusefs, driven by CSI RPCs.

Real FUSE mounts from the embedded fusefs daemon: the staging mount must be
this volume's fusefs mount (checked in mountinfo), the quota is the volume's
capacity, stats come from the quota, expansion raises it online, read-only
is enforced, snapshots freeze writes, and a driver crash disturbs nothing.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
import uuid
from pathlib import Path

import grpc
import pytest

from csi_driver.gen import csi_pb2
from csi_driver.mounts import top_mount
from tests.harness import MiB, AccessMode, Driver, code_of, daemon_engine, mount_cap

pytestmark = pytest.mark.privileged
C = grpc.StatusCode


def uniq(prefix: str = "pvc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class Pod:
    """A volume staged and published for one pretend pod."""

    def __init__(self, driver: Driver, size: int = 8 * MiB, cap=None, readonly: bool = False, **params: str):
        self.driver, self.cap = driver, cap or mount_cap()
        name = uniq()
        self.vol = driver.create_volume(name, size=size, cap=self.cap, parameters=params)
        self.staging = driver.kubelet_dir / "plugins" / name / "globalmount"
        self.target = driver.kubelet_dir / "pods" / name / "volumes" / "mount"
        self.staging.parent.mkdir(parents=True)
        self.target.parent.mkdir(parents=True)
        driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=str(self.staging), volume_capability=self.cap))
        driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=str(self.staging), target_path=str(self.target),
            volume_capability=self.cap, readonly=readonly))

    def stats(self) -> csi_pb2.NodeGetVolumeStatsResponse:
        return self.driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=self.vol.volume_id, volume_path=str(self.target)))

    def bytes_usage(self) -> csi_pb2.VolumeUsage:
        return next(u for u in self.stats().usage if u.unit == csi_pb2.VolumeUsage.BYTES)

    def teardown(self) -> None:
        self.driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=self.vol.volume_id, target_path=str(self.target)))
        self.driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=str(self.staging)))
        self.driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=self.vol.volume_id))


def fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(b"\0" * size)
        f.flush()
        os.fsync(f.fileno())


def test_stage_is_verified_fusefs_mount_and_data_reaches_the_volume(driver):
    pod = Pod(driver)
    entry = top_mount(pod.staging)
    assert entry.fs_type == "fuse.fusefs" and entry.source == f"fusepath:{pod.vol.volume_id}"
    (pod.target / "hello").write_text("through fuse")
    os.sync()
    assert (driver.volume_dir(pod.vol.volume_id) / "hello").read_text() == "through fuse"
    pod.teardown()
    assert top_mount(pod.staging) is None and not pod.target.exists()


def test_quota_is_the_capacity_and_stats_follow_it(driver):
    pod = Pod(driver, size=4 * MiB)
    st = os.statvfs(pod.target)
    assert st.f_blocks * st.f_frsize == 4 * MiB
    fill(pod.target / "a", 3 * MiB)
    usage = pod.bytes_usage()
    assert usage.total == 4 * MiB and 3 * MiB <= usage.used <= 4 * MiB
    assert usage.available == usage.total - usage.used
    inodes = next(u for u in pod.stats().usage if u.unit == csi_pb2.VolumeUsage.INODES)
    assert inodes.used >= 1
    with pytest.raises(OSError) as exc:
        fill(pod.target / "b", 2 * MiB)
    assert exc.value.errno == errno.ENOSPC
    assert pod.stats().volume_condition.abnormal is False
    pod.teardown()


def test_online_expansion_raises_the_quota(driver):
    pod = Pod(driver, size=2 * MiB)
    with pytest.raises(OSError):
        fill(pod.target / "big", 3 * MiB)
    (pod.target / "big").unlink()
    rng = csi_pb2.CapacityRange(required_bytes=8 * MiB)
    driver.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
        volume_id=pod.vol.volume_id, capacity_range=rng))
    for _ in range(2):
        resp = driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
            volume_id=pod.vol.volume_id, volume_path=str(pod.target), capacity_range=rng))
        assert resp.capacity_bytes == 8 * MiB
    fill(pod.target / "big", 3 * MiB)
    st = os.statvfs(pod.target)
    assert st.f_blocks * st.f_frsize == 8 * MiB
    pod.teardown()


def test_readonly_publication_and_rox_staging_get_erofs(driver):
    ro = Pod(driver, readonly=True)
    with pytest.raises(OSError) as exc:
        (ro.target / "x").write_text("no")
    assert exc.value.errno == errno.EROFS
    ro.teardown()
    rox = Pod(driver, cap=mount_cap(AccessMode.MULTI_NODE_READER_ONLY))
    with pytest.raises(OSError) as exc:
        (rox.staging / "x").write_text("no")  # the FUSE filesystem itself refuses, not only the bind
    assert exc.value.errno == errno.EROFS
    rox.teardown()


def test_modify_volume_changes_io_limits_live(driver):
    pod = Pod(driver)
    driver.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
        volume_id=pod.vol.volume_id, mutable_parameters={"ioBytesPerSecond": "2097152", "ioOpsPerSecond": "500"}))
    from fusefs.client import FuseFSClient

    with FuseFSClient(f"unix://{driver.data_dir / 'fusefs.sock'}") as fusefs:
        stats = fusefs.stats(pod.vol.volume_id)
    assert (stats.bytes_per_second, stats.ops_per_second) == (2097152, 500)
    pod.teardown()


def test_snapshot_of_a_staged_volume_freezes_and_thaws(driver):
    pod = Pod(driver)
    (pod.target / "f").write_text("consistent")
    snap = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=uniq("snap"), source_volume_id=pod.vol.volume_id)).snapshot
    assert snap.ready_to_use
    thawed = [json.loads(line) for line in driver.log_path.read_text().splitlines()
              if '"thawed' in line]
    assert any(pod.vol.volume_id in entry["msg"] for entry in thawed)
    (pod.target / "after").write_text("writes work again")  # not left frozen
    pod.teardown()


def test_killing_the_driver_does_not_disturb_the_mount(driver):
    pod = Pod(driver)
    (pod.target / "before").write_text("1")
    driver.kill(signal.SIGKILL)
    (pod.target / "during").write_text("2")  # the FUSE session lives in the fusefs daemon
    assert (pod.target / "before").read_text() == "1"
    driver.start()
    assert pod.stats().volume_condition.abnormal is False
    pod.teardown()


def test_killed_fuse_session_is_remounted_and_the_target_works_again(driver):
    """libfuse engine: the daemon mounts the volume afresh and re-binds the
    target; kernel engine: a successor takes the live connection over, the
    mount is never detached and the volume stays healthy."""
    pod = Pod(driver)
    (pod.target / "before").write_text("kept")
    from fusefs.client import FuseFSClient

    kernel = daemon_engine() == "kernel"
    with FuseFSClient(f"unix://{driver.data_dir / 'fusefs.sock'}") as fusefs:
        pid = next(v.pid for v in fusefs.list() if v.volume_id == pod.vol.volume_id)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15

        def restarted() -> bool:
            stats = fusefs.stats(pod.vol.volume_id)
            return "took over" in stats.message if kernel else stats.remount_count >= 1
        while not restarted() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert restarted()
        if kernel:
            assert fusefs.stats(pod.vol.volume_id).remount_count == 0
    while time.monotonic() < deadline:  # the daemon re-binds the target after the remount
        try:
            (pod.target / "after-remount").write_text("ok")
            break
        except OSError:
            time.sleep(0.05)
    assert (pod.target / "before").read_text() == "kept"
    assert (pod.target / "after-remount").read_text() == "ok"
    condition = pod.stats().volume_condition
    assert "restarted" in condition.message and "SIGKILL" in condition.message
    if kernel:
        # Nothing was detached: every pod kept the same mount.
        assert condition.abnormal is False and "took over" in condition.message
    else:
        # Pods that opened the old mount without HostToContainer propagation may
        # still hold ENOTCONN, so the condition stays abnormal and says why.
        assert condition.abnormal is True
    pod.teardown()


def test_volume_stats_on_an_unstaged_path_is_not_found(driver):
    pod = Pod(driver)
    with pytest.raises(grpc.RpcError) as exc:
        driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=pod.vol.volume_id, volume_path=str(driver.kubelet_dir / "pods")))
    assert code_of(exc) == C.NOT_FOUND
    pod.teardown()


def test_inline_volume_through_fusefs_has_its_size_as_quota(driver):
    target = driver.kubelet_dir / "pods" / "inline-fuse" / "vol"
    target.parent.mkdir(parents=True)
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-inline-fuse", target_path=str(target), volume_capability=mount_cap(),
        volume_context={"csi.storage.k8s.io/ephemeral": "true", "size": "3Mi"})
    driver.node.NodePublishVolume(req)
    st = os.statvfs(target)
    assert st.f_blocks * st.f_frsize == 3 * MiB
    driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id="csi-inline-fuse",
                                                                       target_path=str(target)))
    assert not target.exists()
    assert driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries == []


def test_snapshot_during_fsynced_appends_holds_a_prefix_of_whole_records(driver):
    """Crash consistency: the restored log is a prefix of what was written, with no torn record."""
    import threading

    record_size = 4096 + 17  # not page-aligned, so a torn write would show
    pod = Pod(driver, size=64 * MiB)
    log_path = pod.target / "log"
    stop, written = threading.Event(), [0]

    def record(i: int) -> bytes:
        head = f"{i:012d}|".encode()
        return head + bytes([i % 251]) * (record_size - len(head) - 1) + b"\n"

    def writer() -> None:
        with open(log_path, "ab", buffering=0) as f:
            i = 0
            while not stop.is_set() and i < 5000:
                f.write(record(i))
                os.fsync(f.fileno())
                written[0] = i = i + 1

    def written_past(n: int) -> None:
        """Wait until the writer has fsynced more than ``n`` records (it must not stall or die)."""
        deadline = time.monotonic() + 30
        while written[0] <= n:
            assert thread.is_alive() and time.monotonic() < deadline, f"writer stuck at {written[0]}"
            time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    written_past(49)
    snaps = []
    for n in range(3):  # several cuts while the writer runs, each after more records
        snaps.append(driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
            name=uniq("snap"), source_volume_id=pod.vol.volume_id)).snapshot)
        written_past(written[0])
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    for snap in snaps:
        req = csi_pb2.CreateVolumeRequest(name=uniq(), volume_capabilities=[mount_cap()])
        req.capacity_range.required_bytes = 64 * MiB
        req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
        restored = driver.controller.CreateVolume(req).volume
        data = (driver.volume_dir(restored.volume_id) / "log").read_bytes()
        assert len(data) % record_size == 0, f"torn record: {len(data)} bytes"
        count = len(data) // record_size
        assert 50 <= count <= written[0]
        for i in range(count):
            assert data[i * record_size:(i + 1) * record_size] == record(i), f"record {i} is corrupt"
    pod.teardown()
