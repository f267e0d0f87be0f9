"""The command line: flags from the environment, and the JSON client."""

from __future__ import annotations

import json
import subprocess
import sys

from csi_driver import config


def client(driver, *args: str) -> tuple[int, dict]:
    proc = subprocess.run([sys.executable, "-m", "csi_driver", "client", f"--endpoint={driver.endpoint}", *args],
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def test_client_drives_the_driver_by_hand(shared_driver):
    code, info = client(shared_driver, "get-plugin-info")
    assert code == 0 and info["name"] == "fusepath.csi.io"
    code, created = client(shared_driver, "create-volume", "cli-vol", "--capacity", "2Mi", "--param", "mounter=bind")
    assert code == 0 and created["volume"]["capacity_bytes"] == str(2 << 20)
    volume_id = created["volume"]["volume_id"]
    code, listed = client(shared_driver, "list-volumes")
    assert volume_id in [e["volume"]["volume_id"] for e in listed["entries"]]
    code, generic = client(shared_driver, "call", "Controller.ControllerGetVolume", json.dumps({"volume_id": volume_id}))
    assert code == 0 and generic["volume"]["volume_id"] == volume_id
    code, error = client(shared_driver, "get-volume", "vol-" + "0" * 32)
    assert code == 1 and error["error"]["code"] == "NOT_FOUND"
    assert client(shared_driver, "delete-volume", volume_id)[0] == 0


def test_flags_read_environment_and_command_line_wins(monkeypatch):
    monkeypatch.setenv("FUSEPATH_DATA_DIR", "/srv/fusepath")
    monkeypatch.setenv("FUSEPATH_MAX_VOLUMES_PER_NODE", "7")
    monkeypatch.setenv("FUSEPATH_ENABLE_ATTACH", "true")
    monkeypatch.setenv("CSI_ENDPOINT", "unix:///tmp/from-env.sock")
    cfg = config.from_args(config.build_parser().parse_args(["--max-volumes-per-node=9", "--reserve=1Gi"]))
    assert str(cfg.data_dir) == "/srv/fusepath"
    assert cfg.max_volumes_per_node == 9 and cfg.enable_attach and cfg.reserve == 1 << 30
    assert cfg.endpoint == "unix:///tmp/from-env.sock"


def test_sizes():
    assert config.parse_size("1Gi") == 1 << 30
    assert config.parse_size("10G") == 10 * 10**9
    assert config.parse_size("4096") == 4096


def test_modes_serve_only_their_services(tmp_path):
    """--mode=controller is the cluster-wide resizer side: no node, no volumes of its own."""
    import grpc
    import pytest

    from csi_driver.gen import csi_pb2
    from tests.harness import Driver

    ctrl = Driver(tmp_path / "c", "--mode=controller").start()
    try:
        caps = ctrl.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest()).capabilities
        R = csi_pb2.ControllerServiceCapability.RPC
        assert [c.rpc.type for c in caps] == [R.EXPAND_VOLUME, R.MODIFY_VOLUME]  # modify: to refuse it aloud
        resp = ctrl.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id="vol-" + "1" * 32, capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 30)))
        assert resp.node_expansion_required and resp.capacity_bytes == 1 << 30
        with pytest.raises(grpc.RpcError) as exc:
            ctrl.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest())
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        ctrl.teardown()
    node = Driver(tmp_path / "n", "--mode=node").start()
    try:
        assert node.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest()).node_id == "test-node"
        with pytest.raises(grpc.RpcError) as exc:
            node.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        node.teardown()


def test_metrics_and_healthz_endpoint(tmp_path):
    """/healthz follows Probe, /metrics has the RPC latency histogram by method and code."""
    import socket
    import urllib.request

    from tests.harness import Driver

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = Driver(tmp_path, f"--metrics-address=127.0.0.1:{port}")
    d.command = lambda base=d.command: [a for a in base() if a != "--metrics-address="]  # type: ignore[method-assign]
    d.start()
    try:
        d.create_volume("metrics-vol")
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").status == 200
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'fusepath_rpc_duration_seconds_count{method="CreateVolume",code="OK"} 1' in body
        assert "fusepath_committed_bytes" in body
    finally:
        d.teardown()
