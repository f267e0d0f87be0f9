"""What a user sees when the FUSE session under a PVC dies: Events on the pod AND on the PVC.

No feature gate is involved: the fusefs daemon posts core/v1 Events through
the real Kubernetes client. Here the API server is a small HTTP server on a
loopback port that records what it is sent; the client finds it through a
kubeconfig, as it would find a real one.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB, Driver, daemon_engine, mount_cap
from tests.test_promises import FakeApiServer, api_server  # noqa: F401 - the fixture

pytestmark = pytest.mark.privileged


def test_a_killed_session_posts_events_on_the_pod_and_the_pvc(tmp_path, api_server: FakeApiServer):
    kubeconfig = api_server.kubeconfig(tmp_path / "kubeconfig", "not-a-secret")
    d = Driver(tmp_path / "drv", env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""})
    d.start()
    try:
        req = csi_pb2.CreateVolumeRequest(name="pvc-1234", volume_capabilities=[mount_cap()], parameters={
            "csi.storage.k8s.io/pvc/name": "data-web-0", "csi.storage.k8s.io/pvc/namespace": "shop",
            "csi.storage.k8s.io/pv/name": "pvc-1234"})
        req.capacity_range.required_bytes = 8 * MiB
        vol = d.controller.CreateVolume(req).volume
        # The PVC goes into the PV's volume attributes, which kubelet hands back at publish.
        assert vol.volume_context["csi.storage.k8s.io/pvc/name"] == "data-web-0"
        assert vol.volume_context["csi.storage.k8s.io/pvc/namespace"] == "shop"
        assert d.controller.CreateVolume(req).volume.volume_context == vol.volume_context  # a repeat agrees

        staging = d.kubelet_dir / "plugins" / "pvc-1234" / "globalmount"
        target = d.kubelet_dir / "pods" / "uid-1" / "volumes" / "data"
        staging.parent.mkdir(parents=True)
        target.parent.mkdir(parents=True)
        d.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=mount_cap(),
            volume_context=vol.volume_context))
        context = {**vol.volume_context, "csi.storage.k8s.io/pod.name": "web-0",
                   "csi.storage.k8s.io/pod.namespace": "shop", "csi.storage.k8s.io/pod.uid": "uid-1"}
        d.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=mount_cap(), volume_context=context))
        assert api_server.requests == []  # nothing to report yet

        from fusefs.client import FuseFSClient

        with FuseFSClient(f"unix://{d.data_dir / 'fusefs.sock'}") as fusefs:
            pid = next(v.pid for v in fusefs.list() if v.volume_id == vol.volume_id)
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(api_server.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # and no third one
        assert {r["path"] for r in api_server.requests} == {"/api/v1/namespaces/shop/events"}
        events = [r["body"] for r in api_server.requests]
        by_kind = {e["involvedObject"]["kind"]: e for e in events}
        assert len(events) == 2 and set(by_kind) == {"Pod", "PersistentVolumeClaim"}, events
        pod, claim = by_kind["Pod"], by_kind["PersistentVolumeClaim"]
        assert (pod["involvedObject"]["namespace"], pod["involvedObject"]["name"]) == ("shop", "web-0")
        assert (claim["involvedObject"]["namespace"], claim["involvedObject"]["name"]) == ("shop", "data-web-0")
        # libfuse: a re-mount, and the message says which containers see it
        # (HostToContainer); kernel: a takeover, nothing was detached.
        says = "never detached" if daemon_engine() == "kernel" else "HostToContainer"
        for event in events:
            assert event["reason"] == "FuseSessionRestarted" and event["type"] == "Warning"
            assert vol.volume_id in event["message"] and says in event["message"]
            assert event["metadata"]["namespace"] == "shop"
    finally:
        d.teardown()
