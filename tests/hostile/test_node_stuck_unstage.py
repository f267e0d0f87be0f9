"""Issue 8 item 8, the stuck volume's own calls: NodeExpandVolume and
NodeUnstageVolume of a volume whose session is SIGSTOPped answer within
about the quick control timeout, not after a control-socket or stop timeout.

Before the fix both took about 10 s: resize waited out the session control
client's default timeout (10 s) on a socket nobody reads, and unstage's
SIGTERM stayed pending in the stopped process until ``SessionProcess.stop``
gave up after 10 s and SIGKILLed it. Now a stopped session (state T) makes
expand fail at once with UNAVAILABLE and an unchanged record (a retry works
once the session runs again), and Unmount SIGKILLs it at once and still
tears everything down: no mount of the volume is left, and on the kernel
engine the descriptor holder no longer keeps its connection.

The bounds are generous (the old behaviour took 10 s; the fix takes well
under one): they tell the two apart without timing the machine.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from csi_driver.gen import csi_pb2
from fusefs import mountinfo
from fusefs.client import FuseFSClient
from fusefs.embedded import holder_socket_for
from fusefs.kernel import handover
from tests.harness import MiB
from tests.hostile.node_pods import gone_within
from tests.hostile.node_pods import pod_driver  # noqa: F401  (fixture)
from tests.hostile.test_node_stuck_volume import CALL_TIMEOUT, stats_call, stop_session
from tests.hostile.test_node_throttled_kill import start_writer, throttled_pod
from tests.test_node_fusefs import Pod

pytestmark = pytest.mark.privileged
#: Generous: a stopped session is told apart at once (the old code took 10 s).
BOUND = 5.0


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    try:
        result = fn()
    except grpc.RpcError as exc:
        result = exc
    return time.monotonic() - start, result


def fusefs_volume(driver, volume_id: str):  # type: ignore[no-untyped-def]
    """The fusefs daemon's view of ``volume_id`` (None when it serves it no more)."""
    with FuseFSClient(f"unix://{driver.data_dir / 'fusefs.sock'}") as fusefs:
        return next((v for v in fusefs.list() if v.volume_id == volume_id), None)


def expand(pod: Pod, size: int):  # type: ignore[no-untyped-def]
    req = csi_pb2.NodeExpandVolumeRequest(volume_id=pod.vol.volume_id, volume_path=str(pod.target),
                                          staging_target_path=str(pod.staging))
    req.capacity_range.required_bytes = size
    return lambda: pod.driver.node.NodeExpandVolume(req, timeout=CALL_TIMEOUT * 3)


def resume(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def test_expand_of_a_stopped_session_fails_fast_and_a_retry_works(driver):
    pod, other = Pod(driver, size=8 * MiB), Pod(driver, size=8 * MiB)
    pid = stop_session(driver, pod)
    try:
        expand_s, expand_r = timed(expand(pod, 16 * MiB))
        other_s, other_r = timed(stats_call(other))
        record = fusefs_volume(driver, pod.vol.volume_id)
    finally:
        resume(pid)
    print(f"\nexpand of a stopped volume: {expand_s:.2f} s -> "
          f"{expand_r.code() if isinstance(expand_r, grpc.RpcError) else 'ok'}")
    assert expand_s < BOUND
    assert isinstance(expand_r, grpc.RpcError) and expand_r.code() == grpc.StatusCode.UNAVAILABLE, expand_r
    assert "stopped" in expand_r.details(), expand_r.details()
    assert not isinstance(other_r, grpc.RpcError) and other_s < BOUND, other_r
    assert record is not None and record.capacity_bytes == 8 * MiB  # the record is unchanged
    # Once the session runs again the CO's retry goes through.
    driver.node.NodeExpandVolume(csi_pb2.NodeExpandVolumeRequest(
        volume_id=pod.vol.volume_id, volume_path=str(pod.target), staging_target_path=str(pod.staging),
        capacity_range=csi_pb2.CapacityRange(required_bytes=16 * MiB)), timeout=CALL_TIMEOUT * 3)
    assert fusefs_volume(driver, pod.vol.volume_id).capacity_bytes == 16 * MiB
    assert os.statvfs(pod.target).f_blocks * os.statvfs(pod.target).f_frsize >= 15 * MiB


def test_unstage_of_a_stopped_session_tears_it_down_fast(driver):
    pod, other = Pod(driver, size=8 * MiB), Pod(driver, size=8 * MiB)
    vid = pod.vol.volume_id
    holder = holder_socket_for(driver.data_dir)
    kernel = os.path.exists(holder)
    if kernel:  # the kernel engine's holder keeps a copy of the connection, to be dropped at unstage
        fds = handover.take(holder, vid)
        for fd in fds:
            os.close(fd)
        assert fds
    pid = stop_session(driver, pod)
    try:
        unpub_s, unpub_r = timed(lambda: driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=str(pod.target)), timeout=CALL_TIMEOUT * 3))
        unstage_s, unstage_r = timed(lambda: driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=str(pod.staging)), timeout=CALL_TIMEOUT * 3))
        other_s, other_r = timed(stats_call(other))
    finally:
        resume(pid)
    print(f"\nunpublish {unpub_s:.2f} s; unstage {unstage_s:.2f} s -> "
          f"{unstage_r.code() if isinstance(unstage_r, grpc.RpcError) else 'ok'}")
    assert not isinstance(unpub_r, grpc.RpcError), unpub_r
    assert not isinstance(unstage_r, grpc.RpcError), unstage_r
    assert unstage_s < BOUND
    assert not isinstance(other_r, grpc.RpcError) and other_s < BOUND, other_r
    # Torn down: the session is gone (killed and reaped), no mount of the
    # volume is left anywhere in our namespace, the daemon forgot it.
    assert not os.path.exists(f"/proc/{pid}"), f"session {pid} still exists"
    assert not mountinfo.volume_mounts(vid)
    assert not pod.staging.exists()
    assert fusefs_volume(driver, vid) is None
    print(f"kernel engine (a holder): {kernel}")
    if kernel:  # the holder dropped its copy of the connection
        with pytest.raises(OSError, match="not found"):  # its answer for a key it does not keep
            for fd in handover.take(holder, vid):
                os.close(fd)
    # A fresh stage of the same volume works.
    pod.staging.parent.mkdir(parents=True, exist_ok=True)
    driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(pod.staging), volume_capability=pod.cap), timeout=CALL_TIMEOUT * 3)
    assert fusefs_volume(driver, vid).pid not in (0, pid)


def test_unstage_of_a_session_whose_workers_are_all_parked_is_prompt(pod_driver):
    """Not stopped but saturated: every worker waits in the I/O-limit bucket.
    The session still acts on SIGTERM (it lifts its limits first), so the
    graceful stop is taken, and it ends within the stop's short bound."""
    pod = throttled_pod(pod_driver)
    vid = pod.vol.volume_id
    writer = start_writer(pod.target, threads=160, chunk=256 * 1024)  # more writers than session workers
    try:
        unpub_s, unpub_r = timed(lambda: pod_driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vid, target_path=str(pod.target)), timeout=CALL_TIMEOUT * 3))
        unstage_s, unstage_r = timed(lambda: pod_driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vid, staging_target_path=str(pod.staging)), timeout=CALL_TIMEOUT * 3))
    finally:
        writer.kill()
        gone = gone_within(writer, timeout=30)
    print(f"\nparked workers: unpublish {unpub_s:.2f} s; unstage {unstage_s:.2f} s -> "
          f"{unstage_r.code() if isinstance(unstage_r, grpc.RpcError) else 'ok'}; writer gone after {gone}")
    assert not isinstance(unpub_r, grpc.RpcError), unpub_r
    assert not isinstance(unstage_r, grpc.RpcError), unstage_r
    assert unstage_s < BOUND
    assert not mountinfo.volume_mounts(vid)
    assert fusefs_volume(pod_driver, vid) is None
