"""Wiring: build the shared context, repair state, open the socket, serve."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from csi_driver import metrics
from csi_driver.config import Config
from csi_driver.context import DriverContext
from csi_driver.controller import ControllerService
from csi_driver.fusefs_link import FuseFSLink
from csi_driver.gen import csi_pb2_grpc
from csi_driver.group_controller import GroupControllerService
from csi_driver.identity import IdentityService
from csi_driver.instance import StartupError, hold_data_dir, refuse_live_socket
from csi_driver.interactive import stop_embedded
from csi_driver.layout import Layout
from csi_driver.locks import KeyedLocks
from csi_driver.node import NodeService
from csi_driver.reconcile import TrashJanitor, reconcile
from csi_driver.server import build_server, listen_unix
from csi_driver.state import Store

log = logging.getLogger("fusepath")


def build_context(config: Config) -> DriverContext:
    layout = Layout(config.data_dir)
    layout.create_dirs()
    store = Store(layout.db)
    fusefs = FuseFSLink(config.fusefs, config.data_dir, config.kubelet_dir,
                        config.fusefs_engine) if config.runs_node else None
    return DriverContext(config=config, layout=layout, store=store, locks=KeyedLocks(), fusefs=fusefs)


def build_grpc(ctx: DriverContext) -> tuple[grpc.Server, IdentityService]:
    server = build_server(ctx.config.workers)
    identity = IdentityService(ctx)
    csi_pb2_grpc.add_IdentityServicer_to_server(identity, server)
    if ctx.config.runs_controller:
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerService(ctx), server)
        csi_pb2_grpc.add_GroupControllerServicer_to_server(GroupControllerService(ctx), server)
    if ctx.config.runs_node:
        csi_pb2_grpc.add_NodeServicer_to_server(NodeService(ctx), server)
    return server, identity


def run(config: Config) -> int:
    """Run until SIGTERM or SIGINT; returns the exit code.

    Refusals come first, before anything in the data directory is read or
    repaired: another driver on the data dir, or a live socket at our endpoint.
    """
    started = time.monotonic()
    # Installed first, so that a Ctrl-C during start-up also ends in the orderly
    # shutdown below (which stops the embedded daemon) instead of a traceback.
    stopped_by: list[int] = []
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: (stopped_by.append(signum), stop.set()))
    lock_fd = hold_data_dir(config.data_dir)  # noqa: F841 - held for the life of the process
    refuse_live_socket(config.socket_path)
    ctx = build_context(config)
    metrics.COMMITTED_BYTES.bind(ctx.store.committed_bytes)
    # The metrics port is taken before anything starts (a busy port must not leave
    # a fusefs daemon behind); /healthz answers 503 until the driver serves.
    ready: list[Callable[[], bool]] = [lambda: False]
    http = _serve_metrics(config.metrics_address, lambda: ready[0]())
    if config.mode != "controller":
        reconcile(ctx)
    janitor = TrashJanitor(ctx.layout.trash).start()  # whatever start-up could not remove, retried
    if ctx.fusefs is not None:
        ctx.fusefs.start()
    server, identity = build_grpc(ctx)
    listen_unix(server, config.socket_path)
    server.start()
    ready[0] = identity.ready
    os.chmod(config.socket_path, 0o600)
    log.info("serving", extra={"fields": {
        "endpoint": config.endpoint, "mode": config.mode, "node_id": config.node_id,
        "data_dir": str(config.data_dir), "startup_seconds": round(time.monotonic() - started, 3)}})

    stop.wait()
    interactive = bool(stopped_by) and stopped_by[0] == signal.SIGINT
    log.info("shutting down: in-flight RPCs get 10s to finish")
    if ctx.fusefs is not None:
        ctx.fusefs.stop()  # no restart of the embedded daemon from here on
    server.stop(grace=10).wait()
    janitor.stop()
    if http is not None:
        http.shutdown()
    ctx.store.close()
    if interactive and config.fusefs == "embedded" and config.runs_node:
        stop_embedded(config)
    return 0


def _serve_metrics(address: str, ready: Callable[[], bool]) -> Any:
    """The metrics endpoint, or one clear line when its port is taken."""
    try:
        return metrics.serve(address, ready)
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {address}: {exc.strerror}; choose another "
                           "--metrics-address, or turn it off with --metrics-address=") from None
