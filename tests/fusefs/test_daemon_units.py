"""The daemon's pure parts, without mounts or root: validation, mountinfo parsing,
metrics merging, Event bodies and the no-kube-config path, the state file,
the client's pod conversion and the CLI's environment variables."""

from __future__ import annotations

import datetime
import json
import logging
import os
import uuid
from pathlib import Path

import grpc
import pytest

from fusefs import cli, metrics, mountinfo, validate
from fusefs.client import Pod, pod_message
from fusefs.events import EventPoster, build_event
from fusefs.rpcerrors import RpcFailure
from fusefs.state import PodRef, Publication, StateFile, VolumeRecord
from fusefs.supervisor import MAX_SOCKET_PATH, SessionSpec, socket_dir_for

VID = "vol-" + "0123456789abcdef" * 2


# ------------------------------------------------------------------ validate


@pytest.mark.parametrize("value", ["", "vol-", "vol-123", "VOL-" + "a" * 32, "vol-" + "A" * 32,
                                   "vol-" + "g" * 32, "vol-" + "a" * 33, "snap-" + "a" * 32,
                                   "../vol-" + "a" * 32, "vol-" + "a" * 32 + "/", "vol-" + "a" * 32 + "\n"])
def test_volume_id_rejects_everything_but_the_generated_form(value: str) -> None:
    with pytest.raises(RpcFailure) as err:
        validate.volume_id(value)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_volume_id_accepts_generated_ids() -> None:
    vid = f"vol-{uuid.uuid4().hex}"
    assert validate.volume_id(vid) == vid


def test_kubelet_path_rules(tmp_path: Path) -> None:
    kubelet = os.path.realpath(tmp_path / "kubelet")
    os.mkdir(kubelet)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, f"{kubelet}/escape")
    os.symlink("pods", f"{kubelet}/inner")  # a symlink that stays inside is still refused
    good = f"{kubelet}/pods/uid/volumes/x/mount"
    assert validate.kubelet_path(good, "target_path", kubelet) == good
    for bad in ["", "rel", kubelet, kubelet + "/", f"{kubelet}/a/../b", f"{kubelet}//a", f"{kubelet}/a/.",
                f"{kubelet}/escape/x", f"{kubelet}/inner/x", f"{kubelet}x/a", "/etc/passwd", f"{kubelet}/a\0",
                "/" + "x" * 5000]:
        with pytest.raises(RpcFailure) as err:
            validate.kubelet_path(bad, "target_path", kubelet)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, bad


def test_volume_source_is_not_found_for_missing_or_symlinked_dirs(tmp_path: Path) -> None:
    (tmp_path / VID).mkdir()
    assert validate.volume_source(tmp_path, VID) == tmp_path / VID
    other = "vol-" + "f" * 32
    with pytest.raises(RpcFailure) as err:
        validate.volume_source(tmp_path, other)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    os.symlink("/etc", tmp_path / other)
    with pytest.raises(RpcFailure) as err:
        validate.volume_source(tmp_path, other)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_freeze_arguments() -> None:
    assert validate.freeze_timeout(0) == validate.DEFAULT_FREEZE_SECONDS
    assert validate.freeze_timeout(10) == 10
    with pytest.raises(RpcFailure):
        validate.freeze_timeout(validate.MAX_FREEZE_SECONDS + 1)
    assert validate.volume_ids([VID, VID]) == [VID]
    with pytest.raises(RpcFailure):
        validate.volume_ids([])


# ----------------------------------------------------------------- mountinfo

MOUNTINFO = (
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "42 27 254:0 /var/lib/kubelet /var/lib/kubelet rw,relatime shared:5 - ext4 /dev/vda rw\n"
    f"43 42 0:40 / /var/lib/kubelet/plugins/with\\040space rw,nosuid,nodev,relatime shared:6 - fuse.fusefs "
    f"fusepath:{VID} rw,user_id=0,group_id=0,default_permissions,allow_other\n"
    f"44 42 0:40 / /var/lib/kubelet/pods/p/mount ro,nosuid,nodev,relatime shared:6 master:2 - fuse.fusefs "
    f"fusepath:{VID} rw,user_id=0\n"
    "45 42 0:41 / /var/lib/kubelet/pods/p/mount rw,relatime - tmpfs tmpfs rw\n"
)


def test_mountinfo_parsing() -> None:
    table = mountinfo.parse(MOUNTINFO)
    stage = mountinfo.top_mount("/var/lib/kubelet/plugins/with space", table)
    assert stage is not None and mountinfo.is_volume_mount(stage, VID)
    assert stage.propagation == "shared" and not stage.read_only
    stack = mountinfo.mounts_at("/var/lib/kubelet/pods/p/mount", table)
    assert [e.mount_id for e in stack] == [44, 45]
    assert stack[0].read_only and stack[0].propagation == "shared+slave"
    assert not mountinfo.is_volume_mount(stack[-1], VID)
    assert mountinfo.containing_mount("/var/lib/kubelet/pods/x", table).mount_id == 42
    assert mountinfo.containing_mount("/tmp", table).mount_id == 27
    assert len(mountinfo.volume_mounts(VID, table)) == 2



def test_mountinfo_stack_follows_parent_links_not_line_order() -> None:
    """A stack of binds at one target, listed out of order (as propagation can list them)."""
    target = "/var/lib/kubelet/pods/p/mount"
    line = "{} {} 0:40 / " + target + " rw shared:{} - fuse.fusefs fusepath:" + VID + " rw\n"
    table = mountinfo.parse(MOUNTINFO.splitlines(keepends=True)[1] + line.format(50, 42, 7)
                            + line.format(52, 51, 9) + line.format(51, 50, 8))
    stack = mountinfo.mounts_at(target, table)
    assert [e.mount_id for e in stack] == [50, 51, 52]
    assert mountinfo.top_mount(target, table).peer_group == 9
    assert mountinfo.top_mount("/var/lib/kubelet", table).peer_group == 5
    assert mountinfo.parse("60 42 0:1 / /x rw master:3 - tmpfs t rw\n")[0].peer_group == 0

# ------------------------------------------------------------------- metrics


def test_merge_declares_each_family_once_and_labels_volumes() -> None:
    session = (
        "# HELP fusefs_ops_total FUSE operations.\n# TYPE fusefs_ops_total counter\n"
        'fusefs_ops_total{op="read"} 3\n'
        "# HELP fusefs_op_seconds Latency.\n# TYPE fusefs_op_seconds histogram\n"
        'fusefs_op_seconds_bucket{op="read",le="0.001"} 2\nfusefs_op_seconds_bucket{op="read",le="+Inf"} 3\n'
        'fusefs_op_seconds_sum{op="read"} 0.01\nfusefs_op_seconds_count{op="read"} 3\n'
        "fusefs_quota_used_bytes 42\n"
    )
    labelled = session.replace('{op="read"}', '{volume_id="vol-x",op="read"}')
    text = metrics.merge([("vol-a", session), ("vol-b", session), ("vol-c", labelled)])
    lines = text.splitlines()
    assert lines.count("# TYPE fusefs_ops_total counter") == 1
    assert lines.count("# TYPE fusefs_op_seconds histogram") == 1
    assert 'fusefs_ops_total{volume_id="vol-a",op="read"} 3' in lines
    assert 'fusefs_ops_total{volume_id="vol-b",op="read"} 3' in lines
    assert 'fusefs_ops_total{volume_id="vol-x",op="read"} 3' in lines  # already labelled: kept
    assert 'fusefs_quota_used_bytes{volume_id="vol-a"} 42' in lines
    # Histogram samples stay together under their family header.
    start = lines.index("# TYPE fusefs_op_seconds histogram")
    assert all(ln.startswith("fusefs_op_seconds_") for ln in lines[start + 1:start + 13])


def test_daemon_series_render() -> None:
    m = metrics.DaemonMetrics()
    m.rpc_seconds.observe(0.003, "Mount", "OK")
    m.remounts.inc(VID)
    m.remounts.set_floor("vol-b", value=4)
    text = "\n".join(m.rpc_seconds.render() + m.remounts.render())
    assert 'fusefs_daemon_rpc_duration_seconds_bucket{method="Mount",code="OK",le="0.005"} 1' in text
    assert 'fusefs_daemon_rpc_duration_seconds_count{method="Mount",code="OK"} 1' in text
    assert f'fusefs_remounts_total{{volume_id="{VID}"}} 1' in text
    assert 'fusefs_remounts_total{volume_id="vol-b"} 4' in text


# -------------------------------------------------------------------- events


def test_event_body() -> None:
    when = datetime.datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.timezone.utc)
    body = build_event(PodRef("ns", "web-0", "uid-1"), "FuseSessionRestarted", "m" * 2000, "node-1", now=when)
    assert body["metadata"] == {"generateName": "web-0.", "namespace": "ns"}
    assert body["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "ns", "name": "web-0",
                                      "uid": "uid-1"}
    assert (body["reason"], body["type"], body["count"]) == ("FuseSessionRestarted", "Warning", 1)
    assert body["source"] == {"component": "fusefs", "host": "node-1"}
    assert body["firstTimestamp"] == body["lastTimestamp"] == "2025-01-02T03:04:05Z"
    assert body["eventTime"] == "2025-01-02T03:04:05.678000Z"
    assert len(body["message"]) == 1024
    json.dumps(body)  # serialisable as is


def test_events_are_skipped_without_kube_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    poster = EventPoster("node-1")
    with caplog.at_level(logging.DEBUG, logger="fusefs.events"):
        poster.post(PodRef("ns", "web-0"), "FuseSessionRestarted", "restarted")
        poster.flush()
    skipped = [r for r in caplog.records if r.name == "fusefs.events"]
    assert [(r.levelno, r.getMessage()) for r in skipped] == [(logging.DEBUG, "no kube config; skipping event")]


def test_events_go_to_the_pod_namespace_when_an_api_is_there() -> None:
    calls: list[tuple[str, dict]] = []

    class FakeApi:
        def create_namespaced_event(self, namespace: str, body: dict) -> None:
            calls.append((namespace, body))

    poster = EventPoster("node-1", api_factory=FakeApi)
    poster.post(PodRef(), "FuseSessionRestarted", "no pod: ignored")
    poster.post(PodRef("ns", "web-0", "u"), "FuseSessionRestarted", "restarted")
    poster.flush()
    assert [(ns, b["involvedObject"]["name"], b["message"]) for ns, b in calls] == [("ns", "web-0", "restarted")]


# --------------------------------------------------------------------- state


def test_state_round_trip_is_atomic(tmp_path: Path) -> None:
    store = StateFile(tmp_path)
    assert store.load() == {}
    record = VolumeRecord(volume_id=VID, staging_path="/k/s", capacity_bytes=5, read_only=True,
                          bytes_per_second=1, ops_per_second=2, pod=PodRef("ns", "p", "u"),
                          publications={"/k/t": Publication("/k/t", True, PodRef("ns", "q"), 3)},
                          generation=4, remount_count=3, last_restart="x", pid=99)
    store.save({VID: record})
    assert store.load() == {VID: record}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    assert (tmp_path / "state.json").stat().st_mode & 0o777 == 0o600
    doc = json.loads((tmp_path / "state.json").read_text())
    doc["version"] = 99
    (tmp_path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError):
        store.load()


# ------------------------------------------------------- supervisor, client, cli


def test_session_command_line() -> None:
    spec = SessionSpec(VID, "/d/volumes/x", "/k/s", "/run/x.sock", capacity_bytes=10, read_only=True,
                       bytes_per_second=5, ops_per_second=0)
    argv = spec.argv()
    assert argv[1:3] == ["-m", "fusefs.session"]
    assert argv[argv.index("--volume-id") + 1] == VID
    assert argv[argv.index("--capacity") + 1] == "10"
    assert "--read-only" in argv and "--die-with-parent" in argv
    assert "--io-ops-per-second" not in argv


def test_socket_dir_falls_back_when_the_path_would_overflow(tmp_path: Path) -> None:
    assert socket_dir_for(Path("/var/lib/fusepath/fusefs")) == Path("/var/lib/fusepath/fusefs/sessions")
    long_dir = Path("/x" * 40)
    short = socket_dir_for(long_dir)
    assert len(str(short / f"{VID}.sock")) <= MAX_SOCKET_PATH
    assert short == socket_dir_for(long_dir)  # stable across restarts


def test_pod_message_accepts_csi_volume_context() -> None:
    ctx = {"csi.storage.k8s.io/pod.namespace": "ns", "csi.storage.k8s.io/pod.name": "p",
           "csi.storage.k8s.io/pod.uid": "u", "other": "x"}
    msg = pod_message(ctx)
    assert (msg.namespace, msg.name, msg.uid) == ("ns", "p", "u")
    assert pod_message(Pod("a", "b")).name == "b"
    assert pod_message(None).name == ""


def test_serve_flags_read_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEFS_STATE_DIR", "/s")
    monkeypatch.setenv("FUSEFS_METRICS_ADDRESS", ":9999")
    args = cli.serve_parser().parse_args(["--kubelet-dir", "/k"])
    assert (args.state_dir, args.metrics_address, args.kubelet_dir) == ("/s", ":9999", "/k")
    assert args.endpoint == "unix:///run/fusepath/fusefs.sock"
    assert cli.serve_parser().parse_args(["--state-dir", "/cli"]).state_dir == "/cli"


def test_fusefs_mount_is_the_standalone_mount(monkeypatch: pytest.MonkeyPatch) -> None:
    import fusefs.standalone

    seen: list[list[str]] = []
    monkeypatch.setattr(fusefs.standalone, "mount_main", lambda argv: seen.append(argv) or 7)
    assert cli.main(["mount", "/src", "/mnt", "--capacity", "10"]) == 7
    assert seen == [["/src", "/mnt", "--capacity", "10"]]
    assert cli.main(["bogus"]) == 2
