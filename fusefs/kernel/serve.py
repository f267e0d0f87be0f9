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
     "max_readahead": N, "max_write": N, "epoch": E, "devices": D,
     "usage_token": "<32 hex digits>"}

``<state-file>.nodes`` is the node journal (see :mod:`fusefs.kernel.nodes`),
and ``<state-file>.live`` the quota's live counters of the connection named
by ``usage_token`` (see :mod:`fusefs.live_usage`): a takeover adopts them,
so the volume may grow at once, and audits them with a background scan.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

from fusefs.kernel import handover, orphans
from fusefs.operations import FsOptions
from fusefs.kernel import syscalls as ksys
from fusefs.kernel.engine import OPERATIONS, Engine, EngineOptions
from fusefs.kernel.inodefs import InodeFs
from fusefs.live_usage import LiveUsage, live_path, new_token
from fusefs.opstats import OpStats
from fusefs.quota import Quota, blocks
from fusefs.session import NODE_FDS, Session, node_budget

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
    #: Where open files that lose their last name are kept so that they
    #: survive a takeover (see fusefs.kernel.orphans); "" for nowhere.
    orphan_dir: str = ""
    #: Nodes at most (0: what RLIMIT_NOFILE leaves; see fusefs.session.node_budget).
    max_nodes: int = 0


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
                   journal=journal, handle_epoch=epoch, max_open_files=options.max_open_files,
                   orphan_fd=_orphan_fd(source, kopts))


def _orphan_fd(source: str, kopts: KernelOptions) -> int:
    """The orphan directory, opened (emptied by a fresh mount: nothing a new
    connection knows is there); -1 without one, or if it is unusable (then
    an unlinked open file does not survive a takeover, as without it)."""
    if not kopts.orphan_dir:
        return -1
    src = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = orphans.open_dir(kopts.orphan_dir, src)
    except (OSError, ValueError) as exc:
        log.error("orphan directory unusable; open files unlinked by pods will not survive a takeover",
                  extra={"fields": {"orphan_dir": kopts.orphan_dir, "error": str(exc)}})
        return -1
    finally:
        os.close(src)
    if not kopts.takeover:
        removed = orphans.empty(fd)
        if removed:
            log.info("orphan directory emptied", extra={"fields": {"removed": removed}})
    return fd


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


class _NoLinks:
    """What Session's stats read of the libfuse engine's hard-link tracker
    (this engine needs none: a node is an inode, whatever its names)."""

    invalidations = 0


class KernelSession(Session):
    """A session served by the kernel engine: the same control commands and
    checks, another filesystem object (``ops``) and another ``run``.

    With a state file, the quota's counters are mirrored into
    ``<state-file>.live`` (:mod:`fusefs.live_usage`), tied to the connection
    by a token kept in the state file; a takeover adopts them instead of
    rescanning before anything may grow."""

    def __init__(self, *, kernel_options: KernelOptions, **kwargs: Any) -> None:
        self.kernel_options = kernel_options  # read by Session.__init__ (takeover)
        self.node_fds = kernel_options.max_nodes or NODE_FDS  # descriptors wanted for nodes
        #: The live usage file, and the connection's token that names it.
        self.live: LiveUsage | None = None
        self.usage_token = ""
        super().__init__(**kwargs)
        options = kwargs.get("options") or FsOptions()
        self.engine_name = "kernel"
        self.writeback_cache = options.writeback_cache
        self.attr_timeout, self.entry_timeout = options.attr_timeout, options.entry_timeout
        self.max_write = options.max_write
        # libfuse's fuse_interrupted() would crash on this engine's threads.
        self.limits.use_interrupt_check(self.ops.request_interrupted)
        if self.live is not None:
            self.quota.mirror(self.live)

    def _adopted_usage(self, capacity: int) -> Quota | None:
        """A fresh mount starts a live usage file of a new token; a takeover
        adopts the one of its connection (None if it cannot be trusted: the
        usual rules then apply, a rescan)."""
        kopts = self.kernel_options
        if not kopts.state_file:
            return None
        path = live_path(kopts.state_file)
        if not kopts.takeover:
            self.usage_token = new_token()
            self.live = LiveUsage.create(path, self.usage_token)
            return None
        token = _read_state(kopts).get("usage_token")
        self.usage_token = token if isinstance(token, str) and len(token) == 32 else new_token()
        try:
            self.live, figures = LiveUsage.adopt(path, self.usage_token)
        except ValueError:  # a token that is not hex
            self.usage_token = new_token()
            self.live, figures = LiveUsage.create(path, self.usage_token), None
        if figures is None:
            return None
        return Quota(capacity, *figures)

    def _orphan_charges(self) -> tuple[int, int]:
        total, count = self.ops.orphan_charges()  # kept in the orphan directory
        for state in self.ops.nodes.states():
            if state.orphan:
                total += blocks(state.size) + state.extra
                count += 1
        return total, count

    def _audit(self) -> None:
        if self._wait_served():
            super()._audit()

    def _recount(self) -> None:
        if self._wait_served():
            super()._recount()

    def _wait_served(self) -> bool:
        """Wait until the node table is what the connection uses (restored
        by a takeover): the scan's figures add the charges of the inodes
        that have no name (:meth:`_orphan_charges`), which only the restored
        table knows. False if the session stops first."""
        while not self.ops.initialized.wait(0.2):
            if self.stopping.is_set():
                return False
        return True

    def drop_orphans(self) -> None:
        """The connection is gone for good (a clean stop): no inode without a
        name can be used any more. Their charges go, and the orphan
        directory is emptied, so that the usage persisted next is the
        volume's (a fresh mount would empty the directory anyway)."""
        total, count = self._orphan_charges()
        if count:
            self.quota.release_bytes(total)
            self.quota.give_inode(count)
        fd = self.ops.nodes.orphan_fd
        if fd >= 0:
            try:
                orphans.empty(fd)
            except OSError as exc:
                log.warning("cannot empty the orphan directory", extra={"fields": {"error": str(exc)}})

    def _requests_in_flight(self) -> int:
        engine = getattr(self, "engine", None)
        return len(engine._inflight) if engine is not None else 0

    def _make_ops(self, *, read_only: bool, options: FsOptions, xattrs_seen: bool,
                  capability_seen: bool) -> Any:
        self.stats_ = new_stats()
        fs = make_fs(self.source, quota=self.quota, gate=self.gate, limits=self.limits, stats=self.stats_,
                     read_only=read_only, options=options, xattrs_seen=xattrs_seen,
                     capability_seen=capability_seen, kopts=self.kernel_options)
        # What Session reads from its filesystem object besides the common
        # methods (the libfuse engine's names), so both engines serve its
        # stats and control commands.
        fs.options = options  # type: ignore[attr-defined]
        fs.links = _NoLinks()  # type: ignore[attr-defined]
        fs.fuse_session = None  # type: ignore[attr-defined]
        fs.nodes.set_budget(node_budget(options.max_open_files, self.kernel_options.max_nodes))
        return fs

    def stats(self) -> dict[str, Any]:
        """The common stats, and the node table's (see NodeTable.set_budget)."""
        out = super().stats()
        engine = getattr(self, "engine", None)
        nodes = self.ops.nodes
        out["nodes"] = len(nodes)
        out["nodes_max"] = nodes.budget
        out["nodes_pruned"] = engine.pruned if engine is not None else 0
        out["nodes_refused"] = nodes.refused
        return out

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
    # Ready (the control socket answers) only once a holder keeps the
    # connection: a kill from then on never ends the mount.
    threading.Thread(target=session._become_ready, name="ready", daemon=True).start()
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
        session.drop_orphans()
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
                         "epoch": 0, "devices": len(engine.devices), "usage_token": session.usage_token})
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
    state["usage_token"] = session.usage_token
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
