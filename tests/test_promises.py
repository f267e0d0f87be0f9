"""Promises the README and docs make that no other test held the driver to.

Each test runs the real driver (and, where a mount is involved, the real
fusefs daemon and FUSE sessions) and checks the promise from the outside: the
log file it writes, the HTTP endpoint a kubelet probes, the files a pod
writes, the HTTP requests an API server receives.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import sqlite3
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB, Driver, code_of, daemon_engine, mount_cap

C = grpc.StatusCode
RECOVERY_TIMEOUT = 30.0  # a generous bound for recovery, not a speed goal
BURST_SECONDS = 0.05     # fusefs.limits.DEFAULT_BURST_SECONDS


def uniq(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Any, what: str, timeout: float = RECOVERY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(0.05)


def log_lines(driver: Driver) -> list[dict[str, Any]]:
    """Every line of the driver's log, each of which must be one JSON object."""
    return [json.loads(line) for line in driver.log_path.read_text().splitlines() if line.strip()]


# --- one JSON log line per RPC, no secrets -------------------------------------------------

def test_one_json_log_line_per_rpc_with_its_fields_and_no_secret(driver: Driver) -> None:
    secret = f"hunter2-{uuid.uuid4().hex}"
    name = uniq("logged")
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap()],
                                      secrets={"password": secret}, parameters={"mounter": "bind"})
    req.capacity_range.required_bytes = 8 * MiB
    vol = driver.controller.CreateVolume(req).volume
    with pytest.raises(grpc.RpcError) as exc:  # a failing RPC is logged once too, with its code
        driver.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
            name=name, volume_capabilities=[mount_cap()], secrets={"token": secret},
            parameters={"mounter": "nonsense"}))
    assert code_of(exc) == C.INVALID_ARGUMENT
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id,
                                                               secrets={"password": secret}))

    text = driver.log_path.read_text()
    assert secret not in text
    lines = log_lines(driver)
    rpcs = [line for line in lines if line.get("msg") == "rpc" and line.get("method") in
            ("CreateVolume", "DeleteVolume") and (line.get("name") == name or line.get("volume_id") == vol.volume_id)]
    assert [(r["method"], r["code"]) for r in rpcs] == [
        ("CreateVolume", "OK"), ("CreateVolume", "INVALID_ARGUMENT"), ("DeleteVolume", "OK")]
    for r in rpcs:
        assert isinstance(r["duration_ms"], (int, float)) and r["duration_ms"] >= 0
        assert len(r["request_id"]) >= 8 and r["level"] in ("info", "warning") and r["ts"]
    assert len({r["request_id"] for r in rpcs}) == 3
    assert rpcs[2]["volume_id"] == vol.volume_id
    assert "nonsense" in rpcs[1]["error"]
    # At debug level the bodies are logged too, with the secrets masked (not dropped unseen).
    bodies = [line for line in lines if line.get("msg") == "request"
              and line["request_id"] in {r["request_id"] for r in rpcs}]
    assert len(bodies) == 3 and all("***" in json.dumps(b["body"]["secrets"]) for b in bodies)


# --- a database newer than the driver ------------------------------------------------------

def test_a_driver_refuses_a_database_newer_than_itself(driver: Driver) -> None:
    vol = driver.create_volume(uniq(), parameters={"mounter": "bind"})
    driver.stop()
    db = driver.data_dir / "state.db"
    with sqlite3.connect(db) as conn:
        newer = conn.execute("PRAGMA user_version").fetchone()[0] + 1
        conn.execute(f"PRAGMA user_version = {newer}")
    before = driver.log_path.read_text()
    driver.start(wait=False)
    assert driver.wait_exit(60) != 0
    said = driver.log_path.read_text()[len(before):]
    assert "newer than this driver" in said, said[-2000:]
    with sqlite3.connect(db) as conn:  # left as it was: no migration, no rewrite
        assert conn.execute("PRAGMA user_version").fetchone()[0] == newer
        assert conn.execute("SELECT count(*) FROM volumes WHERE id=?", (vol.volume_id,)).fetchone()[0] == 1
    assert driver.volume_dir(vol.volume_id).is_dir()


# --- unknown inline volume attributes ------------------------------------------------------

def test_unknown_inline_volume_attributes_are_refused(driver: Driver) -> None:
    target = driver.kubelet_dir / "pods" / "inline-unknown" / "vol"
    target.parent.mkdir(parents=True)
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id="csi-unknown-attr", target_path=str(target), volume_capability=mount_cap(),
        volume_context={"csi.storage.k8s.io/ephemeral": "true", "size": "1Mi", "colour": "blue"})
    with pytest.raises(grpc.RpcError) as exc:
        driver.node.NodePublishVolume(req)
    assert code_of(exc) == C.INVALID_ARGUMENT
    assert "colour" in exc.value.details()
    assert driver.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries == []
    assert not target.exists()
    assert os.listdir(driver.data_dir / "volumes") == []


# --- /healthz follows Probe -----------------------------------------------------------------

def healthz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_healthz_fails_while_probe_fails(tmp_path: Path) -> None:
    """The fusefs daemon stops answering (SIGSTOP): Probe says not ready, /healthz 503; it
    answers again: both recover. The driver's liveness and readiness probes use /healthz."""
    from fusefs.embedded import daemon_pid

    port = free_port()
    d = Driver(tmp_path, f"--metrics-address=127.0.0.1:{port}")
    d.command = lambda base=d.command: [a for a in base() if a != "--metrics-address="]  # type: ignore[method-assign]
    d.start()
    pid = daemon_pid(d.data_dir)
    assert pid is not None
    try:
        assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
        assert healthz(port) == 200
        os.kill(pid, signal.SIGSTOP)
        try:
            assert d.identity.Probe(csi_pb2.ProbeRequest(), timeout=30).ready.value is False
            assert healthz(port) == 503
        finally:
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: healthz(port) == 200, "/healthz back to 200")
        assert d.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True
    finally:
        d.teardown()


# --- I/O limits, capacity and read-only through a staged volume ----------------------------

LIMIT = 4 * MiB       # ioBytesPerSecond of the StorageClass
CAPACITY = 4 * MiB


class Volume:
    """A fusefs volume with StorageClass I/O limits, staged, published rw and ro."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        name = uniq("sc")
        self.vol = driver.create_volume(name, size=CAPACITY, parameters={"ioBytesPerSecond": str(LIMIT)})
        self.staging = driver.kubelet_dir / "plugins" / name / "globalmount"
        self.rw = driver.kubelet_dir / "pods" / f"{name}-rw" / "mount"
        self.ro = driver.kubelet_dir / "pods" / f"{name}-ro" / "mount"
        for path in (self.staging, self.rw.parent, self.ro.parent):
            path.mkdir(parents=True)
        driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=self.vol.volume_id, staging_target_path=str(self.staging), volume_capability=mount_cap()))
        for target, readonly in ((self.rw, False), (self.ro, True)):
            driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=self.vol.volume_id, staging_target_path=str(self.staging), target_path=str(target),
                volume_capability=mount_cap(), readonly=readonly))

    def daemon_stats(self) -> Any:
        from fusefs.client import FuseFSClient
        from fusefs.embedded import endpoint_for

        with FuseFSClient(endpoint_for(self.driver.data_dir)) as client:
            return client.stats(self.vol.volume_id)

    def check_limit_holds(self) -> None:
        """9 MiB through a 4 MiB/s limit in 1 MiB writes cannot take less than (9 - 1) / 4 s less the
        burst. A lower bound only: a slow machine makes it longer, never shorter."""
        fd = os.open(self.rw / "limited", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            started = time.monotonic()
            for _ in range(9):
                os.pwrite(fd, b"l" * MiB, 0)  # the same MiB each time: the quota is not the point here
            seconds = time.monotonic() - started
        finally:
            os.close(fd)
        assert seconds >= (9 - 1) * MiB / LIMIT - BURST_SECONDS, f"9 MiB in {seconds:.2f}s at 4 MiB/s"

    def check_capacity_holds(self) -> None:
        written = 0
        with pytest.raises(OSError) as exc:
            with open(self.rw / "filler", "wb", buffering=0) as f:
                for _ in range(2 * CAPACITY // MiB):
                    written += f.write(b"f" * MiB)
                os.fsync(f.fileno())
        assert exc.value.errno in (errno.ENOSPC, errno.EDQUOT)
        assert written <= CAPACITY
        assert os.statvfs(self.rw).f_blocks * os.statvfs(self.rw).f_frsize == CAPACITY
        (self.rw / "filler").unlink()

    def check_read_only_holds(self) -> None:
        assert (self.ro / "hello").read_text() == "hi"
        with pytest.raises(OSError) as exc:
            (self.ro / "nope").write_text("x")
        assert exc.value.errno == errno.EROFS


@pytest.fixture
def limited(driver: Driver) -> Iterator[Volume]:
    yield Volume(driver)


@pytest.mark.privileged
def test_storageclass_io_limits_are_applied_at_stage(limited: Volume) -> None:
    stats = limited.daemon_stats()
    assert (stats.bytes_per_second, stats.ops_per_second) == (LIMIT, 0)
    limited.check_limit_holds()


@pytest.mark.privileged
def test_capacity_limits_and_read_only_hold_after_the_fusefs_daemon_is_killed(limited: Volume) -> None:
    """SIGKILL of the daemon (by PID) takes every session with it; a new daemon (as the
    fusefs container's restart would start) re-mounts and re-binds (libfuse engine) or
    takes the connections over from the holder (kernel engine): still enforced."""
    from fusefs.embedded import daemon_pid, ensure_daemon

    (limited.rw / "hello").write_text("hi")
    old = daemon_pid(limited.driver.data_dir)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: daemon_pid(limited.driver.data_dir) is None, "the killed daemon gone")
    ensure_daemon(limited.driver.data_dir, limited.driver.kubelet_dir, engine=daemon_engine())
    assert daemon_pid(limited.driver.data_dir) not in (None, old)

    def serving() -> bool:
        try:
            return (limited.rw / "hello").read_text() == "hi" and (limited.ro / "hello").read_text() == "hi"
        except OSError:
            return False

    wait_for(serving, "both targets serving again")
    if daemon_engine() == "kernel":  # the holder kept the connection: taken over, not re-mounted
        assert "took over" in limited.daemon_stats().message
    else:
        assert limited.daemon_stats().remount_count >= 1
    stats = limited.daemon_stats()
    assert (stats.bytes_per_second, stats.capacity_bytes) == (LIMIT, CAPACITY)
    limited.check_read_only_holds()
    limited.check_capacity_holds()
    limited.check_limit_holds()


# --- Kubernetes Events through the real client -------------------------------------------------

class FakeApiServer:
    """A loopback HTTP server that records what a Kubernetes client sends it."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        received = self.requests

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                received.append({"method": "POST", "path": self.path, "body": body,
                                 "authorization": self.headers.get("Authorization", "")})
                body.setdefault("metadata", {})["name"] = body["metadata"].get("generateName", "e.") + "x1"
                reply = json.dumps(body).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path, token: str) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fusefs", "user": {"token": token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fusefs"}}],
        }))
        return path

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api_server() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    yield server
    server.close()


@pytest.mark.privileged
def test_a_restarted_session_posts_an_event_on_the_pod_through_the_kubernetes_client(
        tmp_path: Path, api_server: FakeApiServer) -> None:
    from fusefs.client import FuseFSClient
    from fusefs.embedded import endpoint_for

    token = uuid.uuid4().hex
    kubeconfig = api_server.kubeconfig(tmp_path / "kubeconfig", token)
    d = Driver(tmp_path / "node", env={"KUBECONFIG": str(kubeconfig), "KUBERNETES_SERVICE_HOST": ""})
    d.start()
    try:
        name = uniq("ev")
        vol = d.create_volume(name, size=8 * MiB)
        staging = d.kubelet_dir / "plugins" / name / "globalmount"
        target = d.kubelet_dir / "pods" / name / "mount"
        staging.mkdir(parents=True)
        target.parent.mkdir(parents=True)
        d.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=mount_cap()))
        pod_uid = str(uuid.uuid4())
        d.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=mount_cap(), volume_context={
                "csi.storage.k8s.io/pod.name": "web-0", "csi.storage.k8s.io/pod.namespace": "shop",
                "csi.storage.k8s.io/pod.uid": pod_uid}))
        with FuseFSClient(endpoint_for(d.data_dir)) as fusefs:
            pid = next(v.pid for v in fusefs.list() if v.volume_id == vol.volume_id)
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: api_server.requests, "an Event POSTed to the API server")
        posted = api_server.requests[0]
        assert posted["path"] == "/api/v1/namespaces/shop/events"
        assert posted["authorization"] == f"Bearer {token}"
        event = posted["body"]
        assert event["reason"] == "FuseSessionRestarted" and event["type"] == "Warning"
        assert event["involvedObject"] == {"apiVersion": "v1", "kind": "Pod", "namespace": "shop",
                                           "name": "web-0", "uid": pod_uid}
        assert vol.volume_id in event["message"]
    finally:
        d.teardown()
