"""Issue 8 item 8, the stuck volume's own calls: NodeExpandVolume and
NodeUnstageVolume of a volume whose session is SIGSTOPped must answer
within about the probe timeout (here: a generous bound), not after a
control-socket or stop timeout.

Today both take about 10 s: resize waits out the session control client's
default timeout (10 s) on a socket nobody reads, and unstage's SIGTERM stays
pending in a stopped process until ``SessionProcess.stop`` gives up after
10 s and SIGKILLs it. The fix belongs in fusefs/volumes.py and
fusefs/supervisor.py (see the xfail reason); this test is the check.
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB
from tests.hostile.test_node_stuck_volume import CALL_TIMEOUT, stop_session
from tests.test_node_fusefs import Pod

pytestmark = pytest.mark.privileged
#: Generous: the goal is about the probe's 0.5 s.
BOUND = 3.0


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.monotonic()
    try:
        result = fn()
    except grpc.RpcError as exc:
        result = exc
    return time.monotonic() - start, result


@pytest.mark.xfail(strict=True, reason="needs fusefs/volumes.py + supervisor.py: a quick control timeout for a "
                                       "hung session and SIGCONT (or SIGKILL) when stopping a stopped one")
def test_expand_and_unstage_of_a_stopped_session_answer_quickly(driver):
    pod = Pod(driver, size=8 * MiB)
    pid = stop_session(driver, pod)
    try:
        req = csi_pb2.NodeExpandVolumeRequest(volume_id=pod.vol.volume_id, volume_path=str(pod.target),
                                              staging_target_path=str(pod.staging))
        req.capacity_range.required_bytes = 16 * MiB
        expand_s, expand_r = timed(lambda: driver.node.NodeExpandVolume(req, timeout=CALL_TIMEOUT * 3))
        print(f"\nexpand of a stopped volume: {expand_s:.2f} s -> "
              f"{expand_r.code() if isinstance(expand_r, grpc.RpcError) else 'ok'}")
        unpub_s, _ = timed(lambda: driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=pod.vol.volume_id, target_path=str(pod.target)), timeout=CALL_TIMEOUT * 3))
        unstage_s, unstage_r = timed(lambda: driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=pod.vol.volume_id, staging_target_path=str(pod.staging)), timeout=CALL_TIMEOUT * 3))
        print(f"unpublish {unpub_s:.2f} s; unstage {unstage_s:.2f} s -> "
              f"{unstage_r.code() if isinstance(unstage_r, grpc.RpcError) else 'ok'}")
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # A clear retryable code or success, never INTERNAL, and promptly.
    for result in (expand_r, unstage_r):
        assert not isinstance(result, grpc.RpcError) or result.code() == grpc.StatusCode.UNAVAILABLE, result
    assert expand_s < BOUND and unstage_s < BOUND
