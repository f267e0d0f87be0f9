"""``FuseFSClient``: the CSI node plugin's handle on the fusefs daemon.

A thin, typed wrapper over the generated stub. Errors are not translated:
a failed call raises the ``grpc.RpcError`` the daemon answered with, and the
CSI layer maps its code (NOT_FOUND, INVALID_ARGUMENT, ...) to the spec's.
Every call has a deadline, so a wedged daemon cannot hang a CSI request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from fusefs.gen import fusefs_pb2 as pb
from fusefs.gen import fusefs_pb2_grpc as pb_grpc

#: Deadline for ordinary calls. Mount starts a process and scans the volume's
#: usage, so it gets more.
DEFAULT_TIMEOUT = 30.0
MOUNT_TIMEOUT = 120.0

#: The volume-context keys kubelet fills in with podInfoOnMount.
POD_CONTEXT_KEYS = {
    "namespace": "csi.storage.k8s.io/pod.namespace",
    "name": "csi.storage.k8s.io/pod.name",
    "uid": "csi.storage.k8s.io/pod.uid",
    # Not from kubelet: the driver's CreateVolume copies the claim the
    # provisioner named (--extra-create-metadata) into the volume context.
    "claim": "csi.storage.k8s.io/pvc/name",
}


@dataclass(frozen=True)
class Pod:
    namespace: str = ""
    name: str = ""
    uid: str = ""
    claim: str = ""


@dataclass(frozen=True)
class VolumeStats:
    volume_id: str
    capacity_bytes: int
    used_bytes: int
    available_bytes: int
    total_bytes: int
    used_inodes: int
    total_inodes: int
    available_inodes: int
    frozen: bool
    read_only: bool
    bytes_per_second: int
    ops_per_second: int
    healthy: bool
    message: str
    remount_count: int


@dataclass(frozen=True)
class Publication:
    target_path: str
    read_only: bool


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    staging_path: str
    capacity_bytes: int
    read_only: bool
    bytes_per_second: int
    ops_per_second: int
    publications: tuple[Publication, ...]
    state: str
    healthy: bool
    message: str
    remount_count: int
    pid: int


def pod_message(pod: Pod | Mapping[str, str] | None) -> pb.PodInfo:
    """A PodInfo from a ``Pod``, a dict with namespace/name/uid, or a CSI volume context."""
    if pod is None:
        return pb.PodInfo()
    if isinstance(pod, Pod):
        return pb.PodInfo(namespace=pod.namespace, name=pod.name, uid=pod.uid, claim=pod.claim)
    fields = {key: pod.get(key) or pod.get(ctx_key) or "" for key, ctx_key in POD_CONTEXT_KEYS.items()}
    return pb.PodInfo(**fields)


def volume_info(msg: pb.Volume) -> VolumeInfo:
    return VolumeInfo(
        volume_id=msg.volume_id, staging_path=msg.staging_path, capacity_bytes=msg.capacity_bytes,
        read_only=msg.read_only, bytes_per_second=msg.limits.bytes_per_second,
        ops_per_second=msg.limits.ops_per_second,
        publications=tuple(Publication(p.target_path, p.read_only) for p in msg.publications),
        state=msg.state, healthy=msg.health.healthy, message=msg.health.message,
        remount_count=msg.remount_count, pid=msg.pid)


class FuseFSClient:
    """Calls the FuseFS service at ``endpoint`` (``unix:///path``)."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._channel = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 16 << 20)])
        self._stub = pb_grpc.FuseFSStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> FuseFSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ health

    def ping(self, timeout: float = 2.0) -> bool:
        """True when the daemon answers; never raises."""
        try:
            self._stub.Ping(pb.PingRequest(), timeout=timeout)
            return True
        except grpc.RpcError:
            return False

    def probe(self) -> tuple[bool, str]:
        """(ready, message): ready once start-up recovery has finished."""
        resp = self._stub.Probe(pb.ProbeRequest(), timeout=self.timeout)
        return resp.ready, resp.message

    # ------------------------------------------------------------ volumes

    def mount(self, volume_id: str, staging_path: str, capacity_bytes: int, read_only: bool = False,
              io_bytes_per_second: int = 0, io_ops_per_second: int = 0,
              pod: Pod | Mapping[str, str] | None = None) -> VolumeInfo:
        resp = self._stub.Mount(pb.MountRequest(
            volume_id=volume_id, staging_path=str(staging_path), capacity_bytes=capacity_bytes,
            read_only=read_only,
            limits=pb.IOLimits(bytes_per_second=io_bytes_per_second, ops_per_second=io_ops_per_second),
            pod=pod_message(pod)), timeout=MOUNT_TIMEOUT)
        return volume_info(resp.volume)

    def unmount(self, volume_id: str, force: bool = False) -> None:
        self._stub.Unmount(pb.UnmountRequest(volume_id=volume_id, force=force), timeout=self.timeout)

    def publish(self, volume_id: str, target_path: str, read_only: bool,
                pod: Pod | Mapping[str, str] | None = None) -> None:
        self._stub.Publish(pb.PublishRequest(volume_id=volume_id, target_path=str(target_path),
                                             read_only=read_only, pod=pod_message(pod)), timeout=self.timeout)

    def unpublish(self, volume_id: str, target_path: str) -> None:
        self._stub.Unpublish(pb.UnpublishRequest(volume_id=volume_id, target_path=str(target_path)),
                             timeout=self.timeout)

    def resize(self, volume_id: str, capacity_bytes: int) -> int:
        resp = self._stub.Resize(pb.ResizeRequest(volume_id=volume_id, capacity_bytes=capacity_bytes),
                                 timeout=self.timeout)
        return resp.capacity_bytes

    def freeze(self, volume_ids: Iterable[str], timeout_seconds: int) -> None:
        """Freeze all or none; the daemon auto-thaws after ``timeout_seconds``."""
        self._stub.Freeze(pb.FreezeRequest(volume_ids=list(volume_ids), timeout_seconds=int(timeout_seconds)),
                          timeout=self.timeout + timeout_seconds)

    def thaw(self, volume_ids: Iterable[str]) -> None:
        self._stub.Thaw(pb.ThawRequest(volume_ids=list(volume_ids)), timeout=self.timeout)

    def set_limits(self, volume_id: str, bytes_per_second: int, ops_per_second: int) -> None:
        self._stub.SetLimits(pb.SetLimitsRequest(
            volume_id=volume_id,
            limits=pb.IOLimits(bytes_per_second=bytes_per_second, ops_per_second=ops_per_second)),
            timeout=self.timeout)

    def stats(self, volume_id: str, target_path: str = "", timeout: float | None = None) -> VolumeStats:
        """Usage and health; with ``target_path``, health as seen through that publication."""
        s = self._stub.Stats(pb.StatsRequest(volume_id=volume_id, target_path=str(target_path)),
                             timeout=self.timeout if timeout is None else timeout)
        return VolumeStats(
            volume_id=s.volume_id, capacity_bytes=s.capacity_bytes, used_bytes=s.used_bytes,
            available_bytes=s.available_bytes, total_bytes=s.total_bytes, used_inodes=s.used_inodes,
            total_inodes=s.total_inodes, available_inodes=s.available_inodes, frozen=s.frozen,
            read_only=s.read_only, bytes_per_second=s.limits.bytes_per_second,
            ops_per_second=s.limits.ops_per_second, healthy=s.health.healthy, message=s.health.message,
            remount_count=s.remount_count)

    def list(self) -> list[VolumeInfo]:
        return [volume_info(v) for v in self._stub.List(pb.ListRequest(), timeout=self.timeout).volumes]

    def raw(self) -> Any:
        """The generated stub, for callers that need a field this wrapper lacks."""
        return self._stub
