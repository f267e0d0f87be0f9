"""What a user sees when the FUSE session under a PVC dies: Events on the pod AND on the PVC.

No feature gate is involved: the fusefs daemon posts core/v1 Events through
the real Kubernetes client. Here the API server is a small HTTP server on a
loopback port that records what it is sent; the client finds it through a
kubeconfig, as it would find a real one.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB, Driver, mount_cap

pytestmark = pytest.mark.privileged


class _Recorder(BaseHTTPRequestHandler):
    events: list[dict] = []
    lock = threading.Lock()

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if self.path.startswith("/api/v1/namespaces/") and self.path.endswith("/events"):
            with self.lock:
                self.events.append(body)
            self._answer(201, {**body, "metadata": {**body.get("metadata", {}), "name": "e1"}})
        else:
            self._answer(404, {"kind": "Status", "code": 404})

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api_server(tmp_path: Path):
    _Recorder.events = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = tmp_path / "kubeconfig"
    config.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
        "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
    }))
    yield config
    server.shutdown()
    server.server_close()


def test_a_killed_session_posts_events_on_the_pod_and_the_pvc(tmp_path, api_server):
    env = {"KUBECONFIG": str(api_server), "HOME": str(tmp_path)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    d = Driver(tmp_path / "drv", env=env)
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
        assert _Recorder.events == []  # nothing to report yet

        from fusefs.client import FuseFSClient

        with FuseFSClient(f"unix://{d.data_dir / 'fusefs.sock'}") as fusefs:
            pid = next(v.pid for v in fusefs.list() if v.volume_id == vol.volume_id)
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with _Recorder.lock:
                if len(_Recorder.events) >= 2:
                    break
            time.sleep(0.05)
        time.sleep(0.3)  # and no third one
        with _Recorder.lock:
            events = list(_Recorder.events)
        by_kind = {e["involvedObject"]["kind"]: e for e in events}
        assert len(events) == 2 and set(by_kind) == {"Pod", "PersistentVolumeClaim"}, events
        pod, claim = by_kind["Pod"], by_kind["PersistentVolumeClaim"]
        assert (pod["involvedObject"]["namespace"], pod["involvedObject"]["name"]) == ("shop", "web-0")
        assert (claim["involvedObject"]["namespace"], claim["involvedObject"]["name"]) == ("shop", "data-web-0")
        for event in events:
            assert event["reason"] == "FuseSessionRestarted" and event["type"] == "Warning"
            assert vol.volume_id in event["message"] and "HostToContainer" in event["message"]
            assert event["metadata"]["namespace"] == "shop"
    finally:
        d.teardown()
