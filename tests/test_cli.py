"""The command line: flags from the environment, and the JSON client."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from csi_driver import client as client_mod
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


def run_client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csi_driver", "client", *args],
                          capture_output=True, text=True, timeout=60)


#: What a person types wrong, and a word the one line must contain.
BAD_INPUTS = {
    "petabytes": (["create-volume", "v", "--capacity", "1Pi"], "not a size"),
    "no number": (["create-volume", "v", "--capacity", "lots"], "not a size"),
    "access mode": (["create-volume", "v", "--access-mode", "EVERYONE"], "invalid choice"),
    "parameter": (["create-volume", "v", "--param", "mounter"], "KEY=VALUE"),
    "bad JSON": (["call", "Controller.ListVolumes", "{volume_id: 1"], "not a valid ListVolumesRequest"),
    "unknown field": (["call", "Controller.ListVolumes", '{"volume": 1}'], "not a valid ListVolumesRequest"),
    "unknown RPC": (["call", "Controller.MakeCoffee"], "no RPC"),
    "unknown service": (["call", "Kitchen.MakeCoffee"], "Service.Method"),
    "a name, not an ID": (["delete-volume", "cli-vol"], "not a volume ID"),
    "a name, not a snapshot ID": (["delete-snapshot", "my-snap"], "not a snapshot ID"),
    "timeout": (["--timeout", "soon", "probe"], "seconds"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_an_exit_code(shared_driver, case: str) -> None:
    args, words = BAD_INPUTS[case]
    proc = run_client(f"--endpoint={shared_driver.endpoint}", *args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr


def test_a_name_given_as_an_id_deletes_nothing(shared_driver) -> None:
    code, created = client(shared_driver, "create-volume", "named-vol", "--capacity", "1Mi", "--param", "mounter=bind")
    assert code == 0
    assert run_client(f"--endpoint={shared_driver.endpoint}", "delete-volume", "named-vol").returncode == 2
    code, listed = client(shared_driver, "list-volumes")
    assert created["volume"]["volume_id"] in [e["volume"]["volume_id"] for e in listed["entries"]]
    assert client(shared_driver, "delete-volume", created["volume"]["volume_id"])[0] == 0


@pytest.mark.parametrize("endpoint", ["{socket}", "dns:///{socket}", "unix://relative/csi.sock",
                                      "unix://{socket}.missing"])
def test_an_endpoint_that_is_no_unix_socket_is_one_line(shared_driver, endpoint: str) -> None:
    """A bare path would go to gRPC's DNS resolver; a missing socket would wait out the timeout."""
    proc = run_client("--endpoint", endpoint.format(socket=shared_driver.socket), "--timeout", "600", "probe")
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_help_mentions_the_client() -> None:
    out = subprocess.run([sys.executable, "-m", "csi_driver", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "fusepath-csi client" in out and "client --help" in out


def test_every_client_option_says_what_it_takes() -> None:
    parser = client_mod.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(commands) > 25
    for name, command in [("(global)", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{name} {action.dest}"
            assert action.help, f"{where} has no help"
            if action.type is client_mod.size:
                assert "Gi" in action.help and "1024" in action.help, where
            if action.choices:
                assert all(choice in action.help for choice in action.choices), where
            if action.dest.endswith(("volume_id", "snapshot_id")) or action.dest == "volume_ids":
                assert "hex digits" in action.help or "ID" in action.help, where
    delete = commands["delete-volume"]._actions[-1]
    assert "ID" in delete.help and "not the volume's name" in delete.help


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
