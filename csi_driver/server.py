"""The gRPC server: services registered on a unix socket, with one
interceptor that turns ``CSIError`` into statuses, logs each RPC once and
records its latency.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from csi_driver import metrics
from csi_driver.errors import CSIError
from csi_driver.instance import refuse_live_socket
from csi_driver.logs import redacted

log = logging.getLogger("fusepath.rpc")

#: CSI messages are small; anything near this size is an attack or a bug.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_ID_FIELDS = ("volume_id", "source_volume_id", "snapshot_id", "group_snapshot_id", "name", "node_id",
              "target_path", "staging_target_path", "volume_path")


def _request_fields(request: Any) -> dict[str, str]:
    """The identifying fields of a request, for the one log line per RPC."""
    out = {}
    for name in _ID_FIELDS:
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            out[name] = value
    return out


class RpcInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            request_id = uuid.uuid4().hex[:16]
            started = time.monotonic()
            code, message = grpc.StatusCode.OK, ""
            try:
                return inner(request, context)
            except CSIError as exc:
                code, message = exc.code, exc.message
                context.abort(exc.code, exc.message)
            except grpc.RpcError as exc:  # from the fusefs daemon: say so, keep meaningful codes
                code, message = _downstream_code(exc), f"fusefs daemon: {exc.details()}"
                context.abort(code, message)
            except Exception as exc:  # noqa: BLE001 - every failure still answers
                code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
                log.exception("unexpected error in %s", method, extra={"fields": {"request_id": request_id}})
                context.abort(code, message)
            finally:
                elapsed = time.monotonic() - started
                metrics.RPC_SECONDS.observe(elapsed, method, code.name)
                fields = {"method": method, "code": code.name, "duration_ms": round(elapsed * 1000, 3),
                          "request_id": request_id, **_request_fields(request)}
                if message:
                    fields["error"] = message
                level = logging.INFO if code in (grpc.StatusCode.OK,) else logging.WARNING
                if method in ("Probe", "NodeGetCapabilities", "GetPluginInfo") and code == grpc.StatusCode.OK:
                    level = logging.DEBUG
                log.log(level, "rpc", extra={"fields": fields})
                if log.isEnabledFor(logging.DEBUG):
                    _log_body(request_id, request)

        return grpc.unary_unary_rpc_method_handler(
            wrapped, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


_PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED}


def _downstream_code(exc: grpc.RpcError) -> grpc.StatusCode:
    """A daemon's NOT_FOUND is not the CO's NOT_FOUND: only unambiguous codes pass through."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.INTERNAL
    return code if code in _PASS_THROUGH else grpc.StatusCode.INTERNAL


def build_server(workers: int) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        interceptors=[RpcInterceptor()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )


def listen_unix(server: grpc.Server, socket_path: Path) -> None:
    """Bind a 0600 root-owned unix socket, replacing a stale one from a crash.

    A socket that still answers is not stale: ``StartupError``, never unlink.
    """
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    refuse_live_socket(socket_path)
    try:
        socket_path.unlink()
    except FileNotFoundError:
        pass
    old_umask = os.umask(0o177)  # the socket is created 0600, never briefly wider
    try:
        if server.add_insecure_port(f"unix://{socket_path}") == 0:
            raise OSError(f"cannot listen on {socket_path}")
    finally:
        os.umask(old_umask)


def _log_body(request_id: str, request: Any) -> None:
    """Debug-level request bodies, secrets masked; a logging bug never fails an RPC."""
    try:
        log.debug("request", extra={"fields": {"request_id": request_id, "body": redacted(request)}})
    except Exception:  # noqa: BLE001
        log.exception("could not log the request body")
