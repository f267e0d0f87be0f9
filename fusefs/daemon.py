"""``fusefs serve``: the FuseFS gRPC service on a root-only unix socket.

This module is the thin gRPC skin over ``VolumeManager``: it converts
messages, turns ``RpcFailure`` into status codes, logs one JSON line per RPC
(method, volume ID, duration, code, request ID) and times every RPC into a
histogram. It also owns process-level concerns: one daemon per state
directory (an flock), the socket's mode, the metrics endpoint, and shutting
down on SIGTERM.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from fusefs import metrics as prom
from fusefs import mountinfo, validate
from fusefs.events import EventPoster
from fusefs.gen import fusefs_pb2 as pb
from fusefs.gen import fusefs_pb2_grpc as pb_grpc
from fusefs.metrics_http import start_metrics_server
from fusefs.rpcerrors import RpcFailure
from fusefs.state import PodRef
from fusefs.volumes import DaemonConfig, VolumeManager

log = logging.getLogger("fusefs.daemon")

VERSION = "0.1.0"
#: Requests are a few hundred bytes; nothing legitimate comes close to this.
MAX_RECEIVE_BYTES = 64 * 1024
#: List answers grow with the number of volumes; this is thousands of them.
MAX_SEND_BYTES = 16 * 1024 * 1024
WORKERS = 16

T = TypeVar("T")


@dataclass(frozen=True)
class ServeOptions:
    endpoint: str
    state_dir: Path
    volumes_dir: Path
    kubelet_dir: Path
    metrics_address: str = ""
    node_id: str = ""
    engine: str = "kernel"
    holder_socket: str = ""


def socket_path(endpoint: str) -> str:
    """``unix:///run/x.sock`` -> ``/run/x.sock``; only absolute unix endpoints are served."""
    if not endpoint.startswith("unix://") or not endpoint.removeprefix("unix://").startswith("/"):
        raise ValueError(f"endpoint {endpoint!r} must be unix:///absolute/path")
    return endpoint.removeprefix("unix://")


def _pod(msg: pb.PodInfo) -> PodRef:
    return PodRef(namespace=validate.pod_field(msg.namespace, "namespace"),
                  name=validate.pod_field(msg.name, "name"), uid=validate.pod_field(msg.uid, "uid"),
                  claim=validate.pod_field(msg.claim, "claim"))


def _pod_msg(pod: PodRef) -> pb.PodInfo:
    return pb.PodInfo(namespace=pod.namespace, name=pod.name, uid=pod.uid, claim=pod.claim)


def volume_message(described: dict[str, Any]) -> pb.Volume:
    record = described["record"]
    return pb.Volume(
        volume_id=record.volume_id,
        staging_path=record.staging_path,
        capacity_bytes=record.capacity_bytes,
        read_only=record.read_only,
        limits=pb.IOLimits(bytes_per_second=record.bytes_per_second, ops_per_second=record.ops_per_second),
        publications=[pb.Publication(target_path=p.target_path, read_only=p.read_only, pod=_pod_msg(p.pod))
                      for p in sorted(record.publications.values(), key=lambda p: p.target_path)],
        state=described["state"],
        health=pb.Health(healthy=described["healthy"], message=described["message"]),
        remount_count=record.remount_count,
        pid=described["pid"],
    )


def _request_volume(request: Any) -> str:
    if getattr(request, "volume_id", ""):
        return request.volume_id
    ids = getattr(request, "volume_ids", None)
    return ",".join(ids) if ids else ""


def rpc(method: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Wrap a handler: request ID, one log line, latency histogram, error mapping."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def handler(self: FuseFSServicer, request: Any, context: grpc.ServicerContext) -> T:
            metadata = dict(context.invocation_metadata() or ())
            request_id = str(metadata.get("x-request-id", "")) or uuid.uuid4().hex[:16]
            started = time.monotonic()
            code, detail = grpc.StatusCode.OK, ""
            try:
                return fn(self, request)
            except RpcFailure as failure:
                code, detail = failure.code, failure.message
            except Exception as exc:  # noqa: BLE001 - every other error is INTERNAL, logged once
                code, detail = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
                log.exception("unexpected error", extra={"fields": {"method": method, "request_id": request_id}})
            finally:
                seconds = time.monotonic() - started
                self.metrics.rpc_seconds.observe(seconds, method, code.name)
                fields = {"method": method, "volume_id": _request_volume(request), "code": code.name,
                          "duration_ms": round(seconds * 1000, 2), "request_id": request_id}
                if detail:
                    fields["error"] = detail
                level = logging.INFO if code in (grpc.StatusCode.OK,) or method in ("Ping", "Probe") \
                    else logging.WARNING
                log.log(logging.DEBUG if method in ("Ping", "Probe") and code == grpc.StatusCode.OK else level,
                        "rpc", extra={"fields": fields})
            context.abort(code, detail)
            raise AssertionError("unreachable: abort raises")

        return handler

    return decorate


class FuseFSServicer(pb_grpc.FuseFSServicer):
    """gRPC handlers: convert, delegate to the manager, convert back."""

    def __init__(self, manager: VolumeManager) -> None:
        self.manager = manager
        self.metrics = manager.metrics

    @rpc("Ping")
    def Ping(self, request: pb.PingRequest) -> pb.PingResponse:  # noqa: N802 - gRPC naming
        return pb.PingResponse(version=VERSION, pid=os.getpid())

    @rpc("Probe")
    def Probe(self, request: pb.ProbeRequest) -> pb.ProbeResponse:  # noqa: N802
        total, unhealthy = self.manager.counts()
        ready = self.manager.ready.is_set()
        message = "" if ready else "recovering volumes after start-up"
        return pb.ProbeResponse(ready=ready, message=message, volumes=total, unhealthy_volumes=unhealthy)

    @rpc("Mount")
    def Mount(self, request: pb.MountRequest) -> pb.MountResponse:  # noqa: N802
        volume = self.manager.mount(
            request.volume_id, request.staging_path, request.capacity_bytes, request.read_only,
            request.limits.bytes_per_second, request.limits.ops_per_second, _pod(request.pod))
        return pb.MountResponse(volume=volume_message(self.manager.describe(volume)))

    @rpc("Unmount")
    def Unmount(self, request: pb.UnmountRequest) -> pb.UnmountResponse:  # noqa: N802
        self.manager.unmount(request.volume_id, request.force)
        return pb.UnmountResponse()

    @rpc("Publish")
    def Publish(self, request: pb.PublishRequest) -> pb.PublishResponse:  # noqa: N802
        self.manager.publish(request.volume_id, request.target_path, request.read_only, _pod(request.pod))
        return pb.PublishResponse()

    @rpc("Unpublish")
    def Unpublish(self, request: pb.UnpublishRequest) -> pb.UnpublishResponse:  # noqa: N802
        self.manager.unpublish(request.volume_id, request.target_path)
        return pb.UnpublishResponse()

    @rpc("Resize")
    def Resize(self, request: pb.ResizeRequest) -> pb.ResizeResponse:  # noqa: N802
        return pb.ResizeResponse(capacity_bytes=self.manager.resize(request.volume_id, request.capacity_bytes))

    @rpc("Freeze")
    def Freeze(self, request: pb.FreezeRequest) -> pb.FreezeResponse:  # noqa: N802
        self.manager.freeze(list(request.volume_ids), request.timeout_seconds)
        return pb.FreezeResponse()

    @rpc("Thaw")
    def Thaw(self, request: pb.ThawRequest) -> pb.ThawResponse:  # noqa: N802
        self.manager.thaw(list(request.volume_ids))
        return pb.ThawResponse()

    @rpc("SetLimits")
    def SetLimits(self, request: pb.SetLimitsRequest) -> pb.SetLimitsResponse:  # noqa: N802
        self.manager.set_limits(request.volume_id, request.limits.bytes_per_second, request.limits.ops_per_second)
        return pb.SetLimitsResponse()

    @rpc("Stats")
    def Stats(self, request: pb.StatsRequest) -> pb.StatsResponse:  # noqa: N802
        s = self.manager.stats(request.volume_id, request.target_path)
        return pb.StatsResponse(
            volume_id=s["volume_id"], capacity_bytes=s["capacity_bytes"], used_bytes=s["used_bytes"],
            available_bytes=s["available_bytes"], total_bytes=s["total_bytes"], used_inodes=s["used_inodes"],
            total_inodes=s["total_inodes"], available_inodes=s["available_inodes"], frozen=s["frozen"],
            read_only=s["read_only"],
            limits=pb.IOLimits(bytes_per_second=s["bytes_per_second"], ops_per_second=s["ops_per_second"]),
            health=pb.Health(healthy=s["healthy"], message=s["message"]), remount_count=s["remount_count"])

    @rpc("List")
    def List(self, request: pb.ListRequest) -> pb.ListResponse:  # noqa: N802
        return pb.ListResponse(volumes=[volume_message(d) for d in self.manager.list()])


def render_metrics(manager: VolumeManager) -> str:
    """The whole /metrics page: daemon series, volume gauges, session series."""
    m = manager.metrics
    gauges = manager.volume_gauges()
    up = prom.Gauge("fusefs_volume_up", "1 when the volume's FUSE session is serving.", ("volume_id",))
    state = prom.Gauge("fusefs_volume_state", "The volume's state (mounted, restarting, failed).",
                       ("volume_id", "state"))
    lines = m.rpc_seconds.render() + m.remounts.render() + m.takeovers.render()
    lines += prom.Gauge("fusefs_volumes", "Volumes this daemon serves.", ()).render([((), len(gauges))])
    lines += up.render(((vid,), 1.0 if ok else 0.0) for vid, ok, _ in gauges)
    lines += state.render(((vid, st), 1.0) for vid, _, st in gauges)
    return "\n".join(lines) + "\n" + prom.merge(manager.metrics_sources())


class DaemonLock:
    """One daemon per state directory: an flock the kernel drops when we die."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "daemon.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self.fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise RuntimeError(f"another fusefs daemon uses {state_dir}") from None
            raise
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())


def _endpoint_answers(path: str) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def _warn_about_propagation(kubelet_dir: str) -> None:
    entry = mountinfo.containing_mount(kubelet_dir)
    if entry is not None and not entry.propagation.startswith("shared"):
        log.warning("the kubelet directory is not on a shared mount: binds re-made after a restart will not "
                    "reach containers' mount namespaces", extra={"fields": {
                        "kubelet_dir": kubelet_dir, "mount_point": entry.mount_point,
                        "propagation": entry.propagation}})


def start_grpc(servicer: FuseFSServicer, path: str) -> grpc.Server:
    """Bind the unix socket with mode 0600 from the start (umask), then serve."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="fusefs-rpc"),
        options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                 ("grpc.max_send_message_length", MAX_SEND_BYTES)],
        maximum_concurrent_rpcs=WORKERS * 4,
    )
    pb_grpc.add_FuseFSServicer_to_server(servicer, server)
    old_umask = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix://{path}")
        server.start()
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def serve(opts: ServeOptions, stop: threading.Event | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT (or ``stop``); returns an exit code."""
    path = socket_path(opts.endpoint)
    opts.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    opts.volumes_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    if not opts.kubelet_dir.is_dir():
        raise RuntimeError(f"kubelet directory {opts.kubelet_dir} does not exist")
    kubelet_dir = os.path.realpath(opts.kubelet_dir)
    lock = DaemonLock(opts.state_dir)  # noqa: F841 - held for the life of the process
    if _endpoint_answers(path):
        raise RuntimeError(f"something already serves {path}")
    Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _warn_about_propagation(kubelet_dir)

    config = DaemonConfig(state_dir=opts.state_dir, volumes_dir=opts.volumes_dir.resolve(),
                          kubelet_dir=kubelet_dir, node_id=opts.node_id or socket.gethostname(),
                          engine=opts.engine, holder_socket=opts.holder_socket)
    manager = VolumeManager(config, events=EventPoster(config.node_id))
    manager.load()
    # Bind both listeners before any session starts: if one fails, we exit
    # having touched no mount.
    http = start_metrics_server(opts.metrics_address, lambda: render_metrics(manager)) \
        if opts.metrics_address else None
    server = start_grpc(FuseFSServicer(manager), path)
    manager.start()
    log.info("fusefs daemon serving", extra={"fields": {
        "endpoint": opts.endpoint, "state_dir": str(opts.state_dir), "kubelet_dir": kubelet_dir,
        "engine": opts.engine, "holder_socket": opts.holder_socket, "pid": os.getpid()}})

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("fusefs daemon stopping")
    server.stop(grace=3).wait()
    if http is not None:
        http.shutdown()
    manager.shutdown()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return 0
