"""Running one volume's session on the kernel engine (``--engine=kernel``).

Two ways to start:

- **fresh**: open /dev/fuse, mount(2) with ``fd=``, answer INIT, clone the
  extra descriptors, start the workers;
- **takeover** (``--takeover``): take the descriptors of a live connection
  from the holder (see :mod:`fusefs.kernel.handover`), reload the node
  table from the journal so the node IDs the kernel holds stay valid,
  start the workers, and write FUSE_NOTIFY_RESEND so the requests the dead
  server read but never answered come again. No INIT, no unmount.

With ``--holder-socket`` the session gives the holder duplicates of its
descriptors as soon as it serves, so its own death leaves the mount alive.

The state file (``--state-file``, JSON) records what INIT negotiated, which
a successor must know and cannot ask again, and the handle epoch::

    {"version": 1, "proto": "7.45", "flags": <granted INIT flags>,
     "max_readahead": N, "max_write": N, "epoch": E, "devices": D}

and ``<state-file>.nodes`` is the node journal (see :mod:`fusefs.kernel.nodes`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from fusefs.kernel import handover
from fusefs.operations import FsOptions
from fusefs.kernel import syscalls as ksys
from fusefs.kernel.engine import OPERATIONS, Engine, EngineOptions
from fusefs.kernel.inodefs import InodeFs
from fusefs.opstats import OpStats
from fusefs.session import Session

log = logging.getLogger("fusefs.kernel.serve")

STATE_VERSION = 1
#: How long a stopping session waits for requests still being served before
#: it persists the usage (it does not persist it if they do not finish).
DRAIN_SECONDS = 5.0


@dataclass
class KernelOptions:
    """The session's kernel-engine flags."""

    state_file: str | None = None
    #: Every holder to give the descriptors to; a takeover takes them from
    #: the first that has them (the daemon's own, then one outside it).
    holder_sockets: tuple[str, ...] = ()
    takeover: bool = False
    passthrough: bool = True
    #: Take FUSE_HAS_RESEND (off: as on a kernel before 6.9, for tests).
    resend: bool = True
    clones: int = 2


def new_stats() -> OpStats:
    return OpStats(OPERATIONS)


def make_fs(source: str, *, quota: Any, gate: Any, limits: Any, stats: OpStats, read_only: bool,
            options: FsOptions, xattrs_seen: bool, capability_seen: bool, kopts: KernelOptions) -> InodeFs:
    journal = f"{kopts.state_file}.nodes" if kopts.state_file else None
    epoch = 0
    if kopts.takeover:
        epoch = _read_state(kopts).get("epoch", 0) + 1
    return InodeFs(source, quota=quota, gate=gate, limits=limits, stats=stats, read_only=read_only,
                   xattrs_seen=xattrs_seen, capability_seen=capability_seen, keep_cache=options.keep_cache,
                   journal=journal, handle_epoch=epoch, max_open_files=options.max_open_files)


def _read_state(kopts: KernelOptions) -> dict[str, Any]:
    if not kopts.state_file:
        raise ValueError("--takeover needs --state-file")
    with open(kopts.state_file, encoding="utf-8") as f:
        state = json.load(f)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"state file version {state.get('version')!r} is not {STATE_VERSION}")
    return state


def _write_state(kopts: KernelOptions, state: dict[str, Any]) -> None:
    if not kopts.state_file:
        return
    tmp = f"{kopts.state_file}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, kopts.state_file)


class KernelSession(Session):
    """A session served by the kernel engine: the same control commands and
    checks, another filesystem object (``ops``) and another ``run``."""

    def __init__(self, *, kernel_options: KernelOptions, **kwargs: Any) -> None:
        self.kernel_options = kernel_options  # read by Session.__init__ (takeover)
        super().__init__(**kwargs)
        options = kwargs.get("options") or FsOptions()
        self.engine_name = "kernel"
        self.writeback_cache = options.writeback_cache
        self.attr_timeout, self.entry_timeout = options.attr_timeout, options.entry_timeout
        self.max_write = options.max_write
        libfuse_ops = self.ops
        self.stats_ = new_stats()
        # The xattr flags as Session found them (the usage file, or True
        # until its background scan says otherwise; a scan that ends before
        # the swap below set them on libfuse_ops, one that ends after sets
        # them on the new object, and reading True is only slower).
        self.ops = make_fs(  # type: ignore[assignment]
            self.source, quota=self.quota, gate=self.gate, limits=self.limits, stats=self.stats_,
            read_only=kwargs.get("read_only", False), options=libfuse_ops.options,
            xattrs_seen=libfuse_ops.xattrs_seen, capability_seen=libfuse_ops.capability_seen,
            kopts=kernel_options)
        # libfuse's fuse_interrupted() would crash on this engine's threads.
        self.limits.use_interrupt_check(self.ops.request_interrupted)
        # What Session reads from its filesystem object besides the common
        # methods (the libfuse engine's names), so both engines serve its
        # stats and control commands.
        for name, default in (("options", options), ("links", None), ("fuse_session", None)):
            if not hasattr(self.ops, name):
                setattr(self.ops, name, getattr(libfuse_ops, name, default))

    def run(self) -> int:
        return run(self, self.kernel_options)


def run(session: Any, kopts: KernelOptions) -> int:
    """Serve ``session`` (a :class:`fusefs.session.Session`) until stopped."""
    os.umask(0)
    fs: InodeFs = session.ops
    options = EngineOptions(max_write=fs_max_write(session), writeback_cache=session.writeback_cache,
                            passthrough=kopts.passthrough, resend=kopts.resend, clones=kopts.clones,
                            attr_timeout=session.attr_timeout, entry_timeout=session.entry_timeout,
                            negative_timeout=session.entry_timeout, max_workers=session.max_workers)
    engine = Engine(fs, options, stats=session.stats_)
    session.engine = engine
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=session._become_ready, name="ready", daemon=True).start()
    try:
        if kopts.takeover:
            _take_over(session, engine, kopts)
        else:
            _fresh(session, engine, kopts)
    except Exception as exc:  # noqa: BLE001 - reported, then a non-zero exit
        log.error("cannot start serving", extra={"fields": {"error": str(exc)}})
        session.stopping.set()
        if session.server is not None:
            session.server.close()
        return 1
    for holder in kopts.holder_sockets:
        try:
            handover.put(holder, session.volume_id, engine.devices)
            log.info("descriptors given to the holder", extra={"fields": {
                "devices": len(engine.devices), "holder": holder}})
        except OSError as exc:
            log.error("a holder did not take the descriptors", extra={"fields": {
                "holder": holder, "error": str(exc)}})
    while not stop.wait(0.2):
        if engine.stopped.is_set():
            break
    log.info("stop requested" if stop.is_set() else "connection ended")
    session.stopping.set()
    session.gate.thaw()
    session.limits.set(0, 0)
    if session.server is not None:
        session.server.close()
    held = False  # whether a holder may still keep the connection for a successor
    for holder in kopts.holder_sockets if stop.is_set() else ():
        try:
            handover.drop(holder, session.volume_id)
        except OSError as exc:
            held = True
            log.warning("holder did not drop the descriptors", extra={"fields": {
                "holder": holder, "error": str(exc)}})
    try:
        ksys.lazy_unmount(session.mountpoint)
    except OSError as exc:
        log.warning("unmount failed", extra={"fields": {"error": str(exc)}})
    engine.close_devices()
    if not held and engine.drain(DRAIN_SECONDS):
        # The connection is gone and nothing is in flight: the usage is
        # final, and the next mount trusts it instead of rescanning.
        session.persist_usage()
    log.info("unmounted; exiting")
    return 0


def fs_max_write(session: Any) -> int:
    return int(getattr(session, "max_write", 1 << 20))


def _fresh(session: Any, engine: Engine, kopts: KernelOptions) -> None:
    log.info("mounting", extra={"fields": {"source": session.source, "mountpoint": session.mountpoint,
                                            "capacity": session.quota.capacity, "engine": "kernel"}})
    engine.mount(session.mountpoint, f"fusepath:{session.volume_id}")
    engine.init()
    engine.add_clones()
    session.ops.nodes.start_journal()
    neg = engine.negotiated
    _write_state(kopts, {"version": STATE_VERSION, "proto": neg["proto"], "flags": neg["flags_value"],
                         "max_readahead": neg["max_readahead"], "max_write": neg["max_write"],
                         "epoch": 0, "devices": len(engine.devices)})
    if kopts.state_file and not neg["resend"]:
        engine.track_inflight(_inflight_file(kopts))
    engine.start()


def _inflight_file(kopts: KernelOptions) -> str:
    """Where the requests being served are recorded, on a connection without
    FUSE_HAS_RESEND (see Engine.track_inflight)."""
    return f"{kopts.state_file}.inflight"


def _take(holders: tuple[str, ...], key: str) -> list[int]:
    """The descriptors from the first holder that has them."""
    errors = []
    for holder in holders:
        try:
            return handover.take(holder, key)
        except OSError as exc:
            errors.append(str(exc))
    raise OSError("no holder has the descriptors: " + "; ".join(errors))


def _take_over(session: Any, engine: Engine, kopts: KernelOptions) -> None:
    if not kopts.holder_sockets:
        raise ValueError("--takeover needs --holder-socket")
    state = _read_state(kopts)
    devices = _take(kopts.holder_sockets, session.volume_id)
    if not devices:
        raise OSError("the holder gave no descriptors")
    engine.devices = devices
    # The kernel sends requests as large as the first INIT allowed.
    engine.options.max_write = int(state.get("max_write", engine.options.max_write))
    engine.resize_buffers()
    restored = session.ops.nodes.restore(session.ops.root_fd)
    session.ops.nodes.start_journal()
    engine.set_negotiated(state["proto"], state["flags"], state["max_readahead"])
    state["epoch"] = session.ops._epoch
    _write_state(kopts, state)
    log.info("took over the connection", extra={"fields": {
        "devices": len(devices), "restored_nodes": restored, "epoch": state["epoch"],
        "negotiated": engine.negotiated}})
    if engine.negotiated["resend"]:
        engine.start()
        engine.resend()
        return
    # No resend (a kernel before 6.9): what the dead session had read but
    # not answered can never come again; its callers get EIO now instead of
    # waiting for an answer until the connection ends.
    failed = engine.fail_inflight(_inflight_file(kopts))
    log.warning("answered the requests in flight at the takeover with EIO (no FUSE_HAS_RESEND)",
                extra={"fields": {"requests": failed}})
    engine.track_inflight(_inflight_file(kopts))
    engine.start()
