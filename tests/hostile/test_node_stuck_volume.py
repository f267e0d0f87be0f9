"""One stuck volume must not hang the node.

A pod's FUSE session that stops answering (here: SIGSTOPped, as a pod that
saturates it would leave it) makes every filesystem call on its mount block.
The driver must answer Probe and every RPC about other volumes promptly,
answer the stuck volume's own calls quickly with an abnormal VolumeCondition,
and never park an unbounded number of its threads on the stuck mount.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from csi_driver.gen import csi_pb2
from fusefs.embedded import daemon_pid
from tests.harness import MiB, mount_cap
from tests.hostile.node_pods import session_pid, threads_in_fuse
from tests.test_node_fusefs import Pod

pytestmark = pytest.mark.privileged
#: Generous: the goal is well under 1 s (bench/node_stuck.py measures it).
BOUND = 5.0
CALL_TIMEOUT = 8.0


def timed(fn):  # type: ignore[no-untyped-def]
    """(seconds, result or the RpcError) of one call."""
    start = time.monotonic()
    try:
        result = fn()
    except grpc.RpcError as exc:
        result = exc
    return time.monotonic() - start, result


def stop_session(driver, pod: Pod) -> int:  # type: ignore[no-untyped-def]
    """SIGSTOP the pod's session so that its mount root really does not answer.

    The kernel caches the root's attributes for attr_timeout; creating a file
    invalidates the directory's, so right after it a stat of the root is a
    request the stopped session never answers. A child stat checks that (a
    stray stat between the poke and the stop can re-cache them: then again).
    """
    pid = session_pid(driver, pod.vol.volume_id)
    for _ in range(5):
        (pod.target / f"poke-{uuid.uuid4().hex[:8]}").write_text("")
        os.kill(pid, signal.SIGSTOP)
        child = subprocess.Popen(["stat", str(pod.target)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            child.wait(timeout=1)
        except subprocess.TimeoutExpired:
            child.kill()  # reaped once the session runs again (see the caller's SIGCONT)
            return pid
        os.kill(pid, signal.SIGCONT)
    pytest.fail("the stopped session's mount still answered stat(): the test would prove nothing")


def stats_call(pod: Pod):  # type: ignore[no-untyped-def]
    return lambda: pod.driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=pod.vol.volume_id, volume_path=str(pod.target)), timeout=CALL_TIMEOUT)


def test_stuck_session_leaves_probe_and_other_volumes_answering(driver):
    stuck, other = Pod(driver, size=8 * MiB), Pod(driver, size=8 * MiB)
    pid = stop_session(driver, stuck)
    try:
        with ThreadPoolExecutor(48) as pool:
            rounds = []
            for _ in range(2):  # the kubelet asks again and again; calls must not pile up
                rounds += [pool.submit(timed, stats_call(stuck)) for _ in range(20)]
                time.sleep(0.2)
            probe = pool.submit(timed, lambda: driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=CALL_TIMEOUT))
            create = pool.submit(timed, lambda: driver.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=f"pvc-{uuid.uuid4().hex[:8]}", volume_capabilities=[mount_cap()]), timeout=CALL_TIMEOUT))
            healthy = pool.submit(timed, stats_call(other))
            stuck_results = [f.result() for f in rounds]
            probe_t, probe_r = probe.result()
            create_t, create_r = create.result()
            other_t, other_r = healthy.result()
        print(f"\nstuck stats max {max(t for t, _ in stuck_results):.3f}s; probe {probe_t:.3f}s; "
              f"create {create_t:.3f}s; other stats {other_t:.3f}s")
        assert probe_t < BOUND and not isinstance(probe_r, grpc.RpcError) and probe_r.ready.value
        assert create_t < BOUND and not isinstance(create_r, grpc.RpcError)
        assert other_t < BOUND and not isinstance(other_r, grpc.RpcError)
        assert other_r.volume_condition.abnormal is False
        for seconds, result in stuck_results:
            assert seconds < BOUND
            if isinstance(result, grpc.RpcError):  # a clear code, never a hang or INTERNAL
                assert result.code() == grpc.StatusCode.UNAVAILABLE, result
            else:
                assert result.volume_condition.abnormal is True
                assert result.volume_condition.message
        # Threads parked on the stuck mount are capped (one probe per path), not
        # one per call, however often the volume is asked about.
        with ThreadPoolExecutor(20) as pool:
            again = list(pool.map(lambda _: timed(stats_call(stuck)), range(20)))
        assert max(t for t, _ in again) < BOUND
        parked = threads_in_fuse(driver.proc.pid), threads_in_fuse(daemon_pid(driver.data_dir))
        print(f"threads blocked in FUSE requests: driver {parked[0]}, fusefs daemon {parked[1]}")
        assert parked[0] <= 2 and parked[1] <= 2
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # once it answers again, it is reported healthy again
        _, result = timed(stats_call(stuck))
        if not isinstance(result, grpc.RpcError) and not result.volume_condition.abnormal:
            break
        time.sleep(0.2)
    assert not isinstance(result, grpc.RpcError) and result.volume_condition.abnormal is False
    stuck.teardown()
    other.teardown()


def test_stuck_volume_does_not_block_publishing_another_volume(driver):
    stuck, other = Pod(driver, size=8 * MiB), Pod(driver, size=8 * MiB)
    pid = stop_session(driver, stuck)
    try:
        second = other.target.parent.parent / "second" / "mount"
        second.parent.mkdir(parents=True)
        seconds, result = timed(lambda: driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=other.vol.volume_id, staging_target_path=str(other.staging), target_path=str(second),
            volume_capability=other.cap), timeout=CALL_TIMEOUT))
        assert seconds < BOUND and not isinstance(result, grpc.RpcError), result
        # A repeated NodeStage of the stuck volume answers quickly: UNAVAILABLE (retry), or done.
        seconds, result = timed(lambda: driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=stuck.vol.volume_id, staging_target_path=str(stuck.staging),
            volume_capability=stuck.cap), timeout=CALL_TIMEOUT))
        assert seconds < BOUND, result
        assert not isinstance(result, grpc.RpcError) or result.code() == grpc.StatusCode.UNAVAILABLE, result
        # The stuck volume's own unpublish answers quickly too (a retryable code, or done).
        seconds, result = timed(lambda: driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=stuck.vol.volume_id, target_path=str(stuck.target)), timeout=CALL_TIMEOUT))
        assert seconds < BOUND, result
        driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=other.vol.volume_id, target_path=str(second)), timeout=CALL_TIMEOUT)
    finally:
        os.kill(pid, signal.SIGCONT)
    stuck.teardown()
    other.teardown()
