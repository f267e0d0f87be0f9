"""A real driver process on a real unix socket, for black-box tests.

Tests talk to ``fusepath-csi`` exactly as the kubelet and the sidecars do:
over gRPC on a unix socket, with a real data directory, SQLite file and
kubelet directory under the test's tmp dir. Crash tests kill the process
with SIGKILL and start a new one on the same data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.mounts import be_unmounted
from fusefs.mountinfo import parse as parse_mountinfo

GiB = 1 << 30
MiB = 1 << 20
AccessMode = csi_pb2.VolumeCapability.AccessMode


def mount_cap(mode: int = AccessMode.SINGLE_NODE_WRITER, fs_type: str = "") -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=AccessMode(mode=mode))
    cap.mount.fs_type = fs_type
    return cap


def block_cap(mode: int = AccessMode.SINGLE_NODE_WRITER) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability(access_mode=AccessMode(mode=mode))
    cap.block.SetInParent()
    return cap


def daemon_engine() -> str:
    """The engine of the embedded fusefs daemon a test's driver starts: what
    the driver reads (``$FUSEPATH_FUSEFS_ENGINE``, set from
    ``$FUSEFS_TEST_ENGINE`` by tests/conftest.py), or its default."""
    from csi_driver.config import Config

    return os.environ.get("FUSEPATH_FUSEFS_ENGINE") or Config().fusefs_engine


class Driver:
    """One ``fusepath-csi`` process and its stubs."""

    def __init__(self, root: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.kubelet_dir = root / "kubelet"
        self.socket = root / "csi.sock"
        self.log_path = root / "driver.log"
        self.extra = list(extra)
        self.env = env or {}
        self.proc: subprocess.Popen | None = None
        self.kubelet_dir.mkdir(parents=True, exist_ok=True)
        self.channel: grpc.Channel | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "csi_driver", f"--endpoint={self.endpoint}", f"--data-dir={self.data_dir}",
            f"--kubelet-dir={self.kubelet_dir}", "--node-id=test-node", "--metrics-address=",
            "--log-format=json", "--log-level=debug", *self.extra,
        ]

    def start(self, wait: bool = True, env: dict[str, str] | None = None) -> "Driver":
        full_env = {**os.environ, **self.env, **(env or {})}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, env=full_env)
        log.close()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"driver exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.socket.exists():
                try:
                    if self.identity.Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value:
                        return
                except grpc.RpcError:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"driver not ready after {timeout}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def _channel(self) -> grpc.Channel:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.endpoint)
        return self.channel

    @property
    def identity(self) -> csi_pb2_grpc.IdentityStub:
        return csi_pb2_grpc.IdentityStub(self._channel())

    @property
    def controller(self) -> csi_pb2_grpc.ControllerStub:
        return csi_pb2_grpc.ControllerStub(self._channel())

    @property
    def node(self) -> csi_pb2_grpc.NodeStub:
        return csi_pb2_grpc.NodeStub(self._channel())

    @property
    def group(self) -> csi_pb2_grpc.GroupControllerStub:
        return csi_pb2_grpc.GroupControllerStub(self._channel())

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=30)
        self._close_channel()
        return code

    def wait_exit(self, timeout: float = 60) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        self._close_channel()
        return code

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_channel()

    def restart(self, **kw: object) -> "Driver":
        self.stop()
        return self.start(**kw)  # type: ignore[arg-type]

    # -- convenience -------------------------------------------------------------
    def create_volume(self, name: str, size: int = 64 * MiB, cap: csi_pb2.VolumeCapability | None = None,
                      **kw: object) -> csi_pb2.Volume:
        req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[cap or mount_cap()], **kw)  # type: ignore[arg-type]
        req.capacity_range.required_bytes = size
        return self.controller.CreateVolume(req).volume

    def volume_dir(self, volume_id: str) -> Path:
        return self.data_dir / "volumes" / volume_id

    def teardown(self) -> None:
        """Stop the driver, its embedded fusefs daemon, and every mount under root."""
        self.stop()
        try:
            from fusefs.embedded import stop_daemon, stop_holder

            stop_daemon(self.data_dir)
            stop_holder(self.data_dir)  # --fusefs-engine=kernel: the connections it keeps end here
        except Exception:  # noqa: BLE001 - fusefs may not be in use by this test
            pass
        unmount_all_under(self.root)


def unmount_all_under(root: Path) -> None:
    entries = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    prefix = str(root) + "/"
    for entry in reversed(entries):
        if entry.mount_point.startswith(prefix):
            try:
                be_unmounted(Path(entry.mount_point))
            except OSError:
                subprocess.run(["umount", "--lazy", entry.mount_point], check=False, capture_output=True)


def code_of(excinfo) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    return excinfo.value.code()
