"""The daemon's volume logic: what to serve where, and putting it back after a crash.

``VolumeManager`` owns one ``Volume`` per staged volume: its record (the
intent, persisted in the state file), its FUSE session process, and its
health. It knows nothing about gRPC: methods take plain values and raise
``RpcFailure`` with the code the daemon answers.

Three things restart a session, all through ``_restart``:

- start-up recovery: every volume in the state file is mounted again at its
  staging path and every publication re-bound, in parallel, so the host side
  is back within a couple of seconds;
- the watcher: a session that exits without being asked to is re-mounted,
  with backoff when that fails;
- a Mount of a volume whose session is down.

On the kernel engine (``--engine kernel``) a restart is a *takeover* when it
can be: every session gives its /dev/fuse descriptors to the daemon's own
in-process holder and to an external one (``--holder-socket``, a process
that outlives the daemon and its container), so the connection outlives the
session. ``_take_over`` starts a successor with ``--takeover``: no detach, no
new mount, no re-bind; the staging mount and every bind of it (the ones in
containers too) stay the same live connection, and containers see a pause.
It is used when the staging path's top mount is this volume's and a holder
has the descriptors; otherwise (no holder, a node reboot, the libfuse
engine, a takeover that fails) ``_remount`` mounts afresh.

``_remount`` first makes sure the old session is dead, detaches the dead
(ENOTCONN) staging mount (kubelet binds only targets into containers, so no
container follows the staging mount), starts a new session, and then binds
the fresh staging mount onto each publication's target *on top of* the dead
bind there, never after detaching it. A container runtime mounts a volume
into a container as a bind of the target mount itself; with
``mountPropagation: HostToContainer`` that bind is a slave of the target, so
a mount made on the target reaches it and the container's new opens work
again without doing anything. Detaching the dead bind first would cut it off
for good. Each target's bind gets a peer group of its own (see
``bindmount.bind_on_top``), so a mount on one target never lands on another.

Dead layers pile up at a target, one per restart, in the host's namespace and
in each following container; Unpublish and a forced Unmount peel them all,
bottom included. After ``MAX_LAYERS`` of them, a re-bind detaches the dead
ones first: bounded memory beats reaching a container through the twentieth
crash of a session.

Locking: ``self._lock`` guards the table; each volume has its own RLock held
for the whole of any change to it (mount, publish, remount...), so two
requests for one volume are serialised while different volumes proceed in
parallel. During start-up recovery a volume's ``settled`` event is clear and
requests for it wait on it.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusefs import bindmount, health, mountinfo, rpcerrors, validate
from fusefs.events import REASON_FAILED, REASON_RESTARTED, EventPoster
from fusefs.kernel import handover, orphans
from fusefs.metrics import DaemonMetrics
from fusefs.rpcerrors import RpcFailure
from fusefs.state import PodRef, Publication, StateFile, VolumeRecord
from fusefs.supervisor import (
    QUICK_TIMEOUT,
    SessionError,
    SessionProcess,
    SessionSpec,
    Spawner,
    find_stale_sessions,
    kill_and_wait,
    prepare_socket_dir,
    socket_dir_for,
)

log = logging.getLogger("fusefs.volumes")

MOUNTED, RESTARTING, FAILED = "mounted", "restarting", "failed"
#: Backoff between failed re-mount attempts.
RETRY_MIN, RETRY_MAX = 1.0, 60.0
#: How long a request waits for a volume that start-up recovery is restoring.
SETTLE_TIMEOUT = 30.0
#: The files a kernel-engine session keeps beside its state file: the node
#: journal, the lookup counts, the live usage, and their temporaries.
KERNEL_STATE_SUFFIXES = ("", ".tmp", ".nodes", ".nodes.tmp", ".nodes.counts", ".nodes.counts.tmp",
                         ".live", ".live.tmp")
#: At most this many of a volume's mounts are stacked at one target.
MAX_LAYERS = 8


@dataclass(frozen=True)
class DaemonConfig:
    """Where things live; ``kubelet_dir`` is a realpath."""

    state_dir: Path
    volumes_dir: Path
    kubelet_dir: str
    node_id: str = ""
    session_timeout: float = 20.0
    watch_interval: float = 0.2
    #: ``libfuse`` or ``kernel`` (which restarts sessions by takeover).
    engine: str = "kernel"
    #: An external holder (kernel engine) that outlives this daemon; "" for none.
    holder_socket: str = ""


@dataclass
class Volume:
    """A served volume: the persisted record plus what only lives in memory."""

    record: VolumeRecord
    lock: threading.RLock = field(default_factory=threading.RLock)
    settled: threading.Event = field(default_factory=threading.Event)
    session: SessionProcess | None = None
    state: str = RESTARTING
    #: What is wrong right now (empty when mounted and fine).
    problem: str = ""
    restart_reason: str = ""
    retry_at: float = 0.0
    retry_delay: float = RETRY_MIN
    restart_pending: bool = False
    removed: bool = False
    last_stats: dict[str, Any] = field(default_factory=dict)

    @property
    def volume_id(self) -> str:
        return self.record.volume_id


def now_text() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class VolumeManager:
    """Every volume this daemon serves."""

    def __init__(self, config: DaemonConfig, events: EventPoster | None = None,
                 metrics: DaemonMetrics | None = None) -> None:
        self.config = config
        self.events = events or EventPoster(config.node_id)
        self.metrics = metrics or DaemonMetrics()
        self.state = StateFile(config.state_dir)
        self.socket_dir = socket_dir_for(config.state_dir)
        self.ready = threading.Event()
        self._spawner = Spawner()
        self._lock = threading.Lock()
        self._volumes: dict[str, Volume] = {}
        self._stop = threading.Event()
        #: Set when a session exits: the watcher looks at once, not at its next tick.
        self._wake = threading.Event()
        self._watcher: threading.Thread | None = None
        #: The in-process holder (kernel engine): a session crash leaves the
        #: connection here even with no external holder.
        self._own_holder: handover.Holder | None = None
        #: The external holder's socket (device, inode, ctime) the last re-sync reached.
        self._synced_ino: tuple[int, int, int] | None = None
        self._syncing = threading.Event()
        self.kernel_dir = config.state_dir / "kernel"

    # ----------------------------------------------------------- lifecycle

    def load(self) -> None:
        """Read the state file and kill leftover sessions; spawns nothing.

        Every recorded volume is in the table from here on, unsettled, so a
        request for it that arrives before recovery reaches it waits instead
        of racing it. Called before the gRPC server starts.
        """
        prepare_socket_dir(self.socket_dir)
        if self.config.engine == "kernel":
            self._start_own_holder()
        records = self.state.load()
        stale = find_stale_sessions(self.socket_dir)
        if stale:
            log.info("killing leftover FUSE sessions", extra={"fields": {"pids": stale}})
            kill_and_wait(stale)
        with self._lock:
            for record in records.values():
                self._volumes[record.volume_id] = Volume(record=record)
                self.metrics.remounts.set_floor(record.volume_id, value=record.remount_count)

    def _start_own_holder(self) -> None:
        self.kernel_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.kernel_dir, 0o700)
        self._own_holder = handover.Holder(str(self.socket_dir / "holder.sock"))
        threading.Thread(target=self._own_holder.serve_forever, name="fusefs-holder", daemon=True).start()

    def holder_sockets(self) -> tuple[str, ...]:
        """Where kernel-engine sessions put their descriptors: ours first, then the external one."""
        own = (self._own_holder.path,) if self._own_holder is not None else ()
        return own + ((self.config.holder_socket,) if self.config.holder_socket else ())

    def orphan_dir(self, volume_id: str) -> str:
        """The volume's orphan directory (kernel engine), made 0700: where
        its session keeps open files a pod unlinked, so that they survive a
        takeover (see fusefs.kernel.orphans). Outside the volume, and on its
        filesystem (the session hard-links files there); "" if the
        state directory is on another filesystem than the volumes."""
        root = self.kernel_dir / "orphans"
        root.mkdir(mode=0o700, exist_ok=True)
        if os.stat(root).st_dev != os.stat(self.config.volumes_dir).st_dev:
            log.warning("the state directory is not on the volumes' filesystem: files pods unlink "
                        "while open do not survive a session restart", extra={"fields": {
                            "state_dir": str(self.config.state_dir)}})
            return ""
        path = root / volume_id
        path.mkdir(mode=0o700, exist_ok=True)
        return str(path)

    def _remove_orphans(self, volume_id: str) -> None:
        """Empty and remove the volume's orphan directory (after its session
        stopped), by descriptors (see fusefs.kernel.orphans.empty)."""
        try:
            root = os.open(self.kernel_dir / "orphans", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            orphans.remove_dir(root, volume_id)
        except OSError as exc:
            log.warning("cannot remove the orphan directory", extra={"fields": {
                "volume_id": volume_id, "error": str(exc)}})
        finally:
            os.close(root)

    def kernel_state_file(self, volume_id: str) -> Path:
        return self.kernel_dir / f"{volume_id}.kstate"

    def start(self) -> None:
        """Begin recovery of every loaded volume and start the watcher.

        Returns at once: volumes are restored in parallel threads, and each
        one's ``settled`` event gates requests for it. ``ready`` is set when
        all have been tried.
        """
        with self._lock:
            volumes = [v for v in self._volumes.values() if not v.settled.is_set()]
        workers = [threading.Thread(target=self._recover_one, args=(v,), name=f"recover-{v.volume_id[:12]}")
                   for v in volumes]
        for worker in workers:
            worker.start()
        threading.Thread(target=self._finish_recovery, args=(workers,), name="recovery", daemon=True).start()
        self._watcher = threading.Thread(target=self._watch, name="fusefs-watcher", daemon=True)
        self._watcher.start()

    def _finish_recovery(self, workers: list[threading.Thread]) -> None:
        started = time.monotonic()
        for worker in workers:
            worker.join()
        self.ready.set()
        log.info("recovery finished", extra={"fields": {
            "volumes": len(workers), "duration_ms": round((time.monotonic() - started) * 1000)}})

    def _recover_one(self, volume: Volume) -> None:
        try:
            with volume.lock:
                self._restart(volume, "the fusefs daemon restarted")
        except Exception as exc:  # noqa: BLE001 - recorded; the watcher retries
            self._mark_failed(volume, "the fusefs daemon restarted", exc)
        finally:
            volume.settled.set()

    def shutdown(self) -> None:
        """Stop every session and keep the state.

        With an external holder (kernel engine), sessions are killed without
        unmounting: the holder keeps every connection, and the next daemon
        takes them over (a container restart or an upgrade is a pause for
        pods). Otherwise each session unmounts its staging path. Publications
        are left in place: a pod without mount propagation is better off
        with an ENOTCONN mount than with the empty directory underneath,
        into which it would write onto the node's disk. The next daemon
        re-mounts and re-binds everything from the state file.
        """
        self._stop.set()
        self._wake.set()
        keep = self.config.engine == "kernel" and bool(self.config.holder_socket)
        if keep:
            log.info("leaving every FUSE connection to the external holder", extra={"fields": {
                "holder": self.config.holder_socket}})
        stoppers = [threading.Thread(target=v.session.kill if keep else v.session.stop,
                                     kwargs={} if keep else {"timeout": 5.0}, daemon=True)
                    for v in list(self._volumes.values()) if v.session is not None]
        for thread in stoppers:
            thread.start()
        for thread in stoppers:
            thread.join(10.0)

    # -------------------------------------------------------------- lookups

    def _get(self, volume_id: str) -> Volume | None:
        with self._lock:
            return self._volumes.get(volume_id)

    def _settled(self, volume: Volume) -> Volume:
        if not volume.settled.wait(SETTLE_TIMEOUT):
            raise rpcerrors.unavailable(f"volume {volume.volume_id} is still being recovered")
        return volume

    def _mounted(self, volume_id: str) -> Volume:
        """A volume this daemon serves, or NOT_FOUND."""
        volume = self._get(validate.volume_id(volume_id))
        if volume is None:
            raise rpcerrors.not_found(f"volume {volume_id} is not mounted by this daemon")
        return self._settled(volume)

    def _save(self) -> None:
        with self._lock:
            records = {vid: v.record for vid, v in self._volumes.items() if not v.removed}
        self.state.save(records)

    # ---------------------------------------------------------------- Mount

    def mount(self, volume_id: str, staging_path: str, capacity_bytes: int = 0, read_only: bool = False,
              bytes_per_second: int = 0, ops_per_second: int = 0, pod: PodRef | None = None) -> Volume:
        """Serve ``volume_id`` at ``staging_path``; idempotent.

        An existing mount at the same path converges to the requested
        capacity, limits and pod. The same volume at another path is
        FAILED_PRECONDITION (unmount it first); the same path with a different
        read-only mode is ALREADY_EXISTS (incompatible, as in CSI).
        """
        volume_id = validate.volume_id(volume_id)
        staging_path = validate.kubelet_path(staging_path, "staging_path", self.config.kubelet_dir)
        pod = pod or PodRef()
        validate.volume_source(self.config.volumes_dir, volume_id)
        with self._lock:
            volume = self._volumes.get(volume_id)
            if volume is None:
                self._check_path_free(staging_path, volume_id)
                volume = Volume(record=VolumeRecord(
                    volume_id=volume_id, staging_path=staging_path, capacity_bytes=capacity_bytes,
                    read_only=read_only, bytes_per_second=bytes_per_second, ops_per_second=ops_per_second,
                    pod=pod, generation=0))
                volume.settled.set()
                volume.lock.acquire()  # uncontended: nobody else can see it yet
                self._volumes[volume_id] = volume
                fresh = True
            else:
                fresh = False
        if fresh:
            try:
                self._first_mount(volume)
            except BaseException:
                with self._lock:
                    volume.removed = True
                    self._volumes.pop(volume_id, None)
                raise
            finally:
                volume.lock.release()
            return volume
        self._settled(volume)
        with volume.lock:
            if volume.removed:
                raise rpcerrors.unavailable(f"volume {volume_id} was unmounted concurrently; retry")
            self._converge(volume, staging_path, capacity_bytes, read_only, bytes_per_second, ops_per_second, pod)
        return volume

    def _check_path_free(self, path: str, volume_id: str) -> None:
        """No other volume may stage at, or publish to, ``path`` (caller holds _lock)."""
        for other in self._volumes.values():
            if other.volume_id == volume_id:
                continue
            if other.record.staging_path == path or path in other.record.publications:
                raise rpcerrors.failed_precondition(f"{path} is in use by volume {other.volume_id}")

    def _first_mount(self, volume: Volume) -> None:
        record = volume.record
        top = mountinfo.top_mount(record.staging_path)
        if top is not None and not mountinfo.is_volume_mount(top, record.volume_id):
            raise rpcerrors.failed_precondition(
                f"{record.staging_path} already has a {top.fs_type} mount of {top.source}")
        try:
            self._remount(volume, "", first=True)
        except SessionError as exc:
            raise rpcerrors.internal(str(exc)) from exc

    def _converge(self, volume: Volume, staging_path: str, capacity_bytes: int, read_only: bool,
                  bytes_per_second: int, ops_per_second: int, pod: PodRef) -> None:
        record = volume.record
        if record.staging_path != staging_path:
            raise rpcerrors.failed_precondition(
                f"volume {record.volume_id} is already mounted at {record.staging_path}")
        if record.read_only != read_only:
            raise rpcerrors.already_exists(
                f"volume {record.volume_id} is mounted {'read-only' if record.read_only else 'read-write'}")
        if volume.state != MOUNTED or volume.session is None or volume.session.exit_code() is not None:
            try:
                self._restart(volume, volume.restart_reason or "a Mount request found the session down")
            except (SessionError, OSError, RpcFailure) as exc:
                self._mark_failed(volume, "a Mount request found the session down", exc)
                raise rpcerrors.unavailable(f"volume {record.volume_id} cannot be re-mounted: {exc}") from exc
        changed = False
        if capacity_bytes != record.capacity_bytes:
            self._call(volume, "resize", capacity_bytes)
            record.capacity_bytes, changed = capacity_bytes, True
        if (bytes_per_second, ops_per_second) != (record.bytes_per_second, record.ops_per_second):
            self._call(volume, "set_limits", bytes_per_second, ops_per_second)
            record.bytes_per_second, record.ops_per_second, changed = bytes_per_second, ops_per_second, True
        if pod and pod != record.pod:
            record.pod, changed = pod, True
        if changed:
            self._save()

    # -------------------------------------------------------------- restart

    def _restart(self, volume: Volume, reason: str) -> None:
        """Serve ``volume`` again: by takeover when a holder keeps its live
        connection, else by a fresh mount. Caller holds ``volume.lock``."""
        if self._can_take_over(volume):
            try:
                self._take_over(volume, reason)
                return
            except (SessionError, OSError) as exc:
                log.error("taking over the FUSE connection failed; mounting afresh", extra={"fields": {
                    "volume_id": volume.volume_id, "error": str(exc)}})
        self._remount(volume, reason)

    def _can_take_over(self, volume: Volume) -> bool:
        """Kernel engine, a state file from the mount, this volume's mount on top
        of the staging path, and a holder with its descriptors.

        Nothing here touches the mount by path: with no server, any access
        there would wait for the successor that is not started yet.
        """
        record = volume.record
        if self.config.engine != "kernel" or not self.kernel_state_file(record.volume_id).is_file():
            return False
        if not mountinfo.is_volume_mount(mountinfo.top_mount(record.staging_path), record.volume_id):
            return False
        return any(_holder_has(sock, record.volume_id) for sock in self.holder_sockets())

    def _take_over(self, volume: Volume, reason: str) -> None:
        """Start a successor that resumes the live connection: no detach, no
        mount, no re-bind. Caller holds ``volume.lock``."""
        record = volume.record
        validate.kubelet_path(record.staging_path, "staging_path", self.config.kubelet_dir)
        if volume.session is not None:
            volume.session.kill()
        # Two servers must never read one connection: any session of this
        # volume still running (a leftover of a dead daemon) goes first.
        kill_and_wait(find_stale_sessions(self.socket_dir, self._control_socket(record.volume_id)))
        volume.state = RESTARTING
        started = time.monotonic()
        volume.session = self._start_session(record, takeover=True)
        record.pid = volume.session.pid
        record.last_restart = (f"FUSE session restarted at {now_text()} after {reason}; the new session took "
                               "over the live FUSE connection")
        record.last_restart_at = time.time()
        self.metrics.takeovers.inc(record.volume_id)  # before the state says so (List readers)
        volume.state, volume.problem, volume.retry_delay = MOUNTED, "", RETRY_MIN
        self._save()
        log.warning("took over the volume's FUSE connection", extra={"fields": {
            "volume_id": record.volume_id, "reason": reason, "pid": record.pid,
            "duration_ms": round((time.monotonic() - started) * 1000),
            "takeovers": int(self.metrics.takeovers.value(record.volume_id)),
            "remount_count": record.remount_count}})
        self._post_events(volume, REASON_RESTARTED, self._takeover_message(record))

    def _drop_held(self, volume_id: str) -> None:
        """Make every holder close its copy of the volume's connection."""
        for sock in self.holder_sockets():
            try:
                handover.drop(sock, volume_id)
            except OSError as exc:
                log.warning("a holder did not drop the volume's descriptors", extra={"fields": {
                    "volume_id": volume_id, "holder": sock, "error": str(exc)}})

    def _remount(self, volume: Volume, reason: str, first: bool = False) -> None:
        """Put ``volume`` back: fresh session at the staging path, fresh binds.

        Caller holds ``volume.lock``. ``first`` is the initial Mount, which
        is not a restart and binds nothing.
        """
        record = volume.record
        validate.kubelet_path(record.staging_path, "staging_path", self.config.kubelet_dir)
        old = volume.session
        if old is not None:
            old.kill()
        volume.state = RESTARTING
        if self.holder_sockets():
            # A holder copy of an older connection must never be taken over
            # in place of the one mounted now (nor outlive it).
            self._drop_held(record.volume_id)
        bindmount.detach_all(record.staging_path)
        os.makedirs(record.staging_path, mode=0o750, exist_ok=True)
        volume.session = self._start_session(record)
        record.pid = volume.session.pid
        record.generation += 1
        if not first:
            record.remount_count += 1
            record.last_restart = f"FUSE session restarted at {now_text()} after {reason}"
            record.last_restart_at = time.time()
        failures = [] if first else self._rebind_all(volume)
        volume.state, volume.problem, volume.retry_delay = MOUNTED, "", RETRY_MIN
        self._save()
        if first:
            self.metrics.remounts.set_floor(record.volume_id, value=0)  # a series from the start
            log.info("mounted volume", extra={"fields": {"volume_id": record.volume_id, "pid": record.pid}})
            return
        self.metrics.remounts.inc(record.volume_id)
        log.warning("re-mounted volume", extra={"fields": {
            "volume_id": record.volume_id, "reason": reason, "remount_count": record.remount_count,
            "publications": len(record.publications), "rebind_failures": failures}})
        self._post_events(volume, REASON_RESTARTED, self._restart_message(record))

    def _control_socket(self, volume_id: str) -> str:
        return str(self.socket_dir / f"{volume_id}.sock")

    def _start_session(self, record: VolumeRecord, takeover: bool = False) -> SessionProcess:
        """Start a session and wait until it serves; on failure kill it (and,
        unless it was taking over a connection a holder keeps, detach its mount)."""
        source = validate.volume_source(self.config.volumes_dir, record.volume_id)
        kernel = self.config.engine == "kernel"
        spec = SessionSpec(
            volume_id=record.volume_id, source=str(source), mountpoint=record.staging_path,
            control_socket=self._control_socket(record.volume_id),
            capacity_bytes=record.capacity_bytes, read_only=record.read_only,
            bytes_per_second=record.bytes_per_second, ops_per_second=record.ops_per_second,
            engine=self.config.engine,
            state_file=str(self.kernel_state_file(record.volume_id)) if kernel else "",
            holder_sockets=self.holder_sockets() if kernel else (), takeover=takeover,
            orphan_dir=self.orphan_dir(record.volume_id) if kernel else "")
        session = SessionProcess.start(self._spawner, spec, on_exit=self._wake.set)
        try:
            session.wait_ready(self.config.session_timeout)
        except BaseException:
            session.kill()
            if not takeover:
                bindmount.detach_all(record.staging_path)
            raise
        return session

    def _rebind_all(self, volume: Volume) -> list[str]:
        """Replace every publication's stale bind; returns the targets that failed."""
        failures = []
        for pub in list(volume.record.publications.values()):
            try:
                self._rebind(volume, pub)
            except (OSError, RpcFailure) as exc:
                failures.append(pub.target_path)
                log.error("re-binding a publication failed", extra={"fields": {
                    "volume_id": volume.volume_id, "target_path": pub.target_path, "error": str(exc)}})
        return failures

    def _rebind(self, volume: Volume, pub: Publication) -> None:
        """Bind the live staging mount onto the target, on top of the dead bind there.

        A target whose parent directory is gone belongs to a pod that was
        deleted meanwhile; it is left for Unpublish rather than recreated.
        """
        target = validate.kubelet_path(pub.target_path, "target_path", self.config.kubelet_dir)
        if not os.path.isdir(os.path.dirname(target)):
            raise OSError(errno.ENOENT, f"parent of {target} is gone")
        read_only = pub.read_only or volume.record.read_only
        top = mountinfo.top_mount(target)
        if top is None and not os.path.isdir(target):
            os.mkdir(target, 0o750)
        elif mountinfo.is_volume_mount(top, volume.volume_id) and top.read_only == read_only \
                and not health.probe_path(target):
            return  # already live: an earlier target's bind propagated here (binds made before this release)
        self._bind_target(volume, target, read_only)

    def _bind_target(self, volume: Volume, target: str, read_only: bool) -> None:
        """Bind the staging mount at ``target``, stacked on this volume's dead binds there.

        Stacking is what reaches containers that follow the target (see the
        module docstring). The dead layers are detached first only when
        stacking would do harm: a live bind of the wrong mode (it would stay
        reachable underneath), ``MAX_LAYERS`` reached, or a dead bind made by
        an older release that shares its peer group with another target of
        this volume (a mount on it would land on that target too). A mount
        that is not this volume's is never touched: FAILED_PRECONDITION.
        """
        vid = volume.volume_id
        table = mountinfo.read()
        stack = mountinfo.mounts_at(target, table)
        if stack and not mountinfo.is_volume_mount(stack[-1], vid):
            raise rpcerrors.failed_precondition(
                f"{target} already has a {stack[-1].fs_type} mount of {stack[-1].source}")
        reason = ""
        if stack and not health.probe_path(target):
            reason = "a live bind with the other read-only mode"
        elif len(stack) >= MAX_LAYERS:
            reason = f"{len(stack)} dead binds stacked already"
        elif stack and self._shares_group_with_other_target(vid, target, stack[-1], table):
            reason = "a dead bind whose peer group spans another target (made by an older release)"
        if reason:
            log.warning("detaching the old binds before binding; containers that follow this target "
                        "keep the dead mount", extra={"fields": {
                            "volume_id": vid, "target_path": target, "reason": reason}})
            bindmount.detach_ours(target, lambda e: mountinfo.is_volume_mount(e, vid))
        bindmount.bind_on_top(volume.record.staging_path, target, read_only)

    @staticmethod
    def _shares_group_with_other_target(vid: str, target: str, top: mountinfo.MountEntry,
                                        table: list[mountinfo.MountEntry]) -> bool:
        group = top.peer_group
        return bool(group) and any(e.peer_group == group and e.mount_point != target
                                   and mountinfo.is_volume_mount(e, vid) for e in table)

    def _mark_failed(self, volume: Volume, reason: str, exc: BaseException) -> None:
        """Record a failed re-mount and schedule a retry; one Event per failure streak."""
        first_failure = volume.retry_delay == RETRY_MIN  # reset by every successful remount
        volume.state = FAILED
        volume.restart_reason = reason
        volume.problem = f"{reason}; re-mounting failed at {now_text()}: {exc}"
        volume.retry_at = time.monotonic() + volume.retry_delay
        volume.retry_delay = min(volume.retry_delay * 2, RETRY_MAX)
        log.error("re-mounting volume failed", extra={"fields": {
            "volume_id": volume.volume_id, "reason": reason, "error": str(exc)}})
        if first_failure:
            self._post_events(volume, REASON_FAILED, f"fusefs could not re-mount volume {volume.volume_id}: "
                              f"{volume.problem}; retrying")

    @staticmethod
    def _takeover_message(record: VolumeRecord) -> str:
        """The FuseSessionRestarted Event after a takeover: what containers saw."""
        return (f"{record.last_restart}. The mount of volume {record.volume_id} was never detached: every "
                "container using it, with or without mount propagation, saw only a pause while no session "
                "served it; files and directories they had open stay valid. Requests in flight at the "
                "restart were sent again by the kernel (FUSE resend, Linux 6.9 and later).")

    @staticmethod
    def _restart_message(record: VolumeRecord) -> str:
        """The FuseSessionRestarted Event: what each kind of container sees now."""
        return (f"{record.last_restart}. fusefs mounted volume {record.volume_id} again and bound it on top "
                "of each target. Containers that mount it with mountPropagation HostToContainer see the new "
                "mount: new opens work again, while files and directories they had open (a working "
                "directory in the volume too) return ENOTCONN until opened again. Containers without mount "
                "propagation keep the dead mount and get ENOTCONN until they are restarted. Data written "
                "but not fsynced before the restart may be lost.")

    def _post_events(self, volume: Volume, reason: str, message: str) -> None:
        """One Event on every pod using the volume, and one on each PVC it is bound through."""
        pods = {(p.namespace, p.name): p for p in [volume.record.pod] + [
            pub.pod for pub in volume.record.publications.values()] if p}
        for pod in pods.values():
            self.events.post(pod, reason, message)
        claims = {(p.namespace, p.claim): p for p in pods.values() if p.claim}
        for pod in claims.values():
            self.events.post(pod, reason, message, on_claim=True)

    # -------------------------------------------------------------- watcher

    def _watch(self) -> None:
        """Notice sessions that exit on their own, retry failed re-mounts, and
        give a new external holder the connections it missed."""
        while True:
            self._wake.wait(self.config.watch_interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._check_external_holder()
            for volume in list(self._volumes.values()):
                reason = self._needs_restart(volume)
                if reason:
                    volume.restart_pending = True
                    threading.Thread(target=self._restart_async, args=(volume, reason),
                                     name=f"restart-{volume.volume_id[:12]}", daemon=True).start()

    def _check_external_holder(self) -> None:
        """Start a re-sync when the external holder's socket is a new one.

        Sessions give their descriptors to the external holder once, when
        they start serving. A holder that was not up yet, or that was
        restarted since, has none of them, and a daemon restart would then
        have to mount afresh. A new holder binds a new socket file, which
        is cheap to notice on every tick.
        """
        if self._own_holder is None or not self.config.holder_socket or self._syncing.is_set():
            return
        try:
            st = os.stat(self.config.holder_socket)
        except OSError:
            return
        ino = (st.st_dev, st.st_ino, st.st_ctime_ns)  # an inode number alone can be reused at once
        if ino != self._synced_ino and self.ready.is_set():
            self._syncing.set()
            threading.Thread(target=self._sync_external_holder, args=(ino,), name="holder-sync",
                             daemon=True).start()

    def _sync_external_holder(self, ino: tuple[int, int, int]) -> None:
        """Copy every mounted volume's descriptors from our holder to the external one."""
        try:
            given, failed = 0, 0
            for volume in list(self._volumes.values()):
                with volume.lock:  # never races an Unmount, which drops them
                    if volume.removed or volume.state != MOUNTED or self._own_holder is None \
                            or _holder_has(self.config.holder_socket, volume.volume_id):
                        continue
                    try:
                        fds = handover.take(self._own_holder.path, volume.volume_id)
                    except OSError:
                        continue  # not ours to give (its session is starting)
                    try:
                        handover.put(self.config.holder_socket, volume.volume_id, fds)
                        given += 1
                    except OSError as exc:
                        failed += 1
                        log.warning("the external holder did not take a volume's descriptors", extra={"fields": {
                            "volume_id": volume.volume_id, "error": str(exc)}})
                    finally:
                        for fd in fds:
                            os.close(fd)
            if not failed:
                self._synced_ino = ino
            if given or failed:
                log.info("gave the external holder the connections it did not have", extra={"fields": {
                    "holder": self.config.holder_socket, "volumes": given, "failed": failed}})
        finally:
            self._syncing.clear()

    def _needs_restart(self, volume: Volume) -> str:
        if volume.removed or volume.restart_pending or not volume.settled.is_set():
            return ""
        session = volume.session
        if volume.state == MOUNTED and session is not None and not session.stopping \
                and session.exit_code() is not None:
            reason = f"the session exited ({session.describe_exit()})"
            volume.state, volume.problem = RESTARTING, f"FUSE session down since {now_text()}: {reason}"
            return reason
        if volume.state == FAILED and time.monotonic() >= volume.retry_at:
            return volume.restart_reason
        return ""

    def _restart_async(self, volume: Volume, reason: str) -> None:
        try:
            with volume.lock:
                if volume.removed or volume.state == MOUNTED:
                    return
                self._restart(volume, reason)
        except Exception as exc:  # noqa: BLE001 - recorded and retried with backoff
            self._mark_failed(volume, reason, exc)
        finally:
            volume.restart_pending = False

    # -------------------------------------------------------------- Unmount

    def unmount(self, volume_id: str, force: bool = False) -> None:
        """Stop serving ``volume_id``; OK when it is not served."""
        volume = self._get(validate.volume_id(volume_id))
        if volume is None:
            return
        self._settled(volume)
        with volume.lock:
            if volume.removed:
                return
            record = volume.record
            live = [t for t in record.publications if mountinfo.mounts_at(t)]
            if live and not force:
                raise rpcerrors.failed_precondition(f"volume {volume_id} is still published at {', '.join(live)}")
            for target in list(record.publications):
                self._unbind(record.volume_id, target)
            if volume.session is not None:
                volume.session.stop()
            self._drop_held(volume_id)  # the connection ends with the last copy
            self._forget_kernel_state(volume_id)
            self._remove_orphans(volume_id)
            bindmount.detach_all(record.staging_path)
            _rmdir_quietly(record.staging_path)
            with self._lock:
                volume.removed = True
                self._volumes.pop(volume_id, None)
            self.metrics.remounts.remove(volume_id)
            self.metrics.takeovers.remove(volume_id)
            self._save()
        log.info("unmounted volume", extra={"fields": {"volume_id": volume_id}})

    def _forget_kernel_state(self, volume_id: str) -> None:
        """Remove the kernel engine's state and node journal of an unmounted volume."""
        base = self.kernel_state_file(volume_id)
        for suffix in KERNEL_STATE_SUFFIXES:
            path = Path(f"{base}{suffix}")
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # ------------------------------------------------------ Publish/Unpublish

    def publish(self, volume_id: str, target_path: str, read_only: bool, pod: PodRef | None = None) -> None:
        """Bind the staging mount at ``target_path``; idempotent.

        The same target with another read-only mode is ALREADY_EXISTS; a
        target that another volume uses is FAILED_PRECONDITION.
        """
        target = validate.kubelet_path(target_path, "target_path", self.config.kubelet_dir)
        volume = self._mounted(volume_id)
        pod = pod or PodRef()
        with self._lock:
            self._check_path_free(target, volume.volume_id)
        with volume.lock:
            if volume.removed:
                raise rpcerrors.not_found(f"volume {volume_id} is not mounted by this daemon")
            record = volume.record
            if target == record.staging_path:
                raise rpcerrors.invalid("target_path is the staging path")
            if volume.state != MOUNTED:
                raise rpcerrors.unavailable(f"volume {volume_id} is {volume.state}: {volume.problem}")
            pub = record.publications.get(target)
            if pub is not None and pub.read_only != read_only:
                raise rpcerrors.already_exists(
                    f"{target} is already published {'read-only' if pub.read_only else 'read-write'}")
            effective_ro = read_only or record.read_only
            top = mountinfo.top_mount(target)
            if top is not None and not mountinfo.is_volume_mount(top, volume_id):
                raise rpcerrors.already_exists(f"{target} already has a {top.fs_type} mount of {top.source}")
            bound = top is not None and top.read_only == effective_ro and not health.probe_path(target)
            if not bound:
                if top is None:  # a dead mount there answers ENOTCONN to makedirs' isdir()
                    os.makedirs(target, mode=0o750, exist_ok=True)
                self._bind_target(volume, target, effective_ro)
            if pub is None:
                record.publications[target] = Publication(target, read_only, pod, generation=record.generation)
            elif pod:
                pub.pod = pod
            self._save()

    def unpublish(self, volume_id: str, target_path: str) -> None:
        """Remove the bind at ``target_path`` and the directory; OK when already gone."""
        volume_id = validate.volume_id(volume_id)
        target = validate.kubelet_path(target_path, "target_path", self.config.kubelet_dir)
        volume = self._get(volume_id)
        if volume is None:
            self._unbind(volume_id, target)
            return
        self._settled(volume)
        with volume.lock:
            self._unbind(volume_id, target)
            if volume.record.publications.pop(target, None) is not None:
                self._save()

    @staticmethod
    def _unbind(volume_id: str, target: str) -> None:
        """Detach every layer of this volume's mounts at ``target`` (never someone
        else's), the dead ones left by restarts included, and rmdir it."""
        bindmount.detach_ours(target, lambda e: mountinfo.is_volume_mount(e, volume_id))
        if not mountinfo.mounts_at(target):
            _rmdir_quietly(target)

    # ------------------------------------------- Resize, limits, freeze, thaw

    def _call(self, volume: Volume, method: str, *args: Any) -> Any:
        """Call the session's control API, mapping failures to gRPC codes."""
        session = volume.session
        if volume.state != MOUNTED or session is None:
            raise rpcerrors.unavailable(f"volume {volume.volume_id} is {volume.state}: {volume.problem}")
        if session.is_stopped():
            raise rpcerrors.unavailable(
                f"{method}: the FUSE session of volume {volume.volume_id} (pid {session.pid}) is stopped "
                "(SIGSTOP or a tracer) and answers nothing; nothing was changed, retry once it runs again")
        try:
            # freeze drains and syncs (its own, longer deadline); every other
            # command is quick, so a session that stays silent past
            # QUICK_TIMEOUT is stuck and the caller hears so then.
            client = session.client() if method == "freeze" else session.client(QUICK_TIMEOUT)
            return getattr(client, method)(*args)
        except RpcFailure:
            raise
        except ValueError as exc:
            raise rpcerrors.invalid(f"{method}: {exc}") from exc
        except OSError as exc:  # socket.timeout included: a session that does not answer in time
            raise rpcerrors.unavailable(f"{method}: session of {volume.volume_id} does not answer ({exc}); "
                                        "the volume's record is unchanged, retry once it answers") from exc
        except Exception as exc:  # noqa: BLE001 - the session's error becomes the status text
            if getattr(exc, "kind", "") == "busy":  # e.g. a freeze that could not drain in time
                raise rpcerrors.unavailable(f"{method} on volume {volume.volume_id}: {exc}") from exc
            raise rpcerrors.internal(f"{method} on volume {volume.volume_id}: {exc}") from exc

    def resize(self, volume_id: str, capacity_bytes: int) -> int:
        if capacity_bytes <= 0:
            raise rpcerrors.invalid("capacity_bytes must be positive")
        volume = self._mounted(volume_id)
        with volume.lock:
            if volume.record.capacity_bytes != capacity_bytes:
                self._call(volume, "resize", capacity_bytes)
                volume.record.capacity_bytes = capacity_bytes
                self._save()
            return capacity_bytes

    def set_limits(self, volume_id: str, bytes_per_second: int, ops_per_second: int) -> None:
        volume = self._mounted(volume_id)
        with volume.lock:
            self._call(volume, "set_limits", bytes_per_second, ops_per_second)
            record = volume.record
            if (record.bytes_per_second, record.ops_per_second) != (bytes_per_second, ops_per_second):
                record.bytes_per_second, record.ops_per_second = bytes_per_second, ops_per_second
                self._save()

    def freeze(self, volume_ids: list[str], timeout_seconds: int) -> None:
        """Freeze every volume or none: on any failure the frozen ones are thawed."""
        ids = validate.volume_ids(volume_ids)
        timeout = validate.freeze_timeout(timeout_seconds)
        volumes = [self._mounted(vid) for vid in ids]
        frozen: list[Volume] = []
        try:
            for volume in volumes:
                self._call(volume, "freeze", timeout)
                frozen.append(volume)
        except RpcFailure:
            for volume in frozen:
                try:
                    self._call(volume, "thaw")
                except RpcFailure as exc:
                    log.error("thaw after a failed group freeze failed", extra={"fields": {
                        "volume_id": volume.volume_id, "error": str(exc)}})
            raise

    def thaw(self, volume_ids: list[str]) -> None:
        """Thaw every listed volume that is served; try all, then report failures."""
        errors = []
        for vid in validate.volume_ids(volume_ids):
            volume = self._get(vid)
            if volume is None or volume.session is None or volume.state != MOUNTED:
                continue  # a session that is not running holds no freeze
            try:
                self._call(volume, "thaw")
            except RpcFailure as exc:
                errors.append(str(exc))
        if errors:
            raise rpcerrors.internal("; ".join(errors))

    # ------------------------------------------------------------ Stats/List

    def stats(self, volume_id: str, target_path: str = "") -> dict[str, Any]:
        """Usage from the session's quota accounting, plus health."""
        volume = self._mounted(volume_id)
        if target_path:
            target_path = validate.kubelet_path(target_path, "target_path", self.config.kubelet_dir)
        numbers = dict(volume.last_stats)
        healthy, message = self.health(volume, target_path)
        # A mount that does not answer stat() has a stuck session, which will
        # not answer its control socket either: report it now, with the last
        # numbers, rather than wait out the control call's timeout too.
        hung = not healthy and "did not answer" in message
        if volume.state == MOUNTED and volume.session is not None and not hung:
            try:
                numbers = dict(volume.session.client(QUICK_TIMEOUT).stats())
                volume.last_stats = numbers
            except Exception as exc:  # noqa: BLE001 - reported as health, with the last numbers
                log.warning("session stats failed", extra={"fields": {"volume_id": volume_id, "error": str(exc)}})
        problem = health.session_problem(numbers)
        if healthy and problem:
            healthy, message = False, problem
        return health.usage(volume.record, numbers, self.config.volumes_dir) | {
            "healthy": healthy, "message": message}

    def health(self, volume: Volume, target_path: str = "") -> tuple[bool, str]:
        """(healthy, message) for the volume, or for one of its publications."""
        return health.assess(volume.record, volume.state == MOUNTED,
                             volume.problem or f"FUSE session is {volume.state}", target_path)

    def describe(self, volume: Volume) -> dict[str, Any]:
        """A volume for List/Mount answers."""
        record = volume.record
        healthy = volume.state == MOUNTED and not health.stale_publications(record)
        message = volume.problem if volume.state != MOUNTED else record.last_restart
        return {
            "record": record,
            "state": volume.state,
            "healthy": healthy,
            "message": message,
            "pid": volume.session.pid if volume.session and volume.session.exit_code() is None else 0,
        }

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            volumes = sorted(self._volumes.values(), key=lambda v: v.volume_id)
        return [self.describe(v) for v in volumes if not v.removed]

    def counts(self) -> tuple[int, int]:
        """(volumes, unhealthy volumes), cheaply: for Probe."""
        described = self.list()
        return len(described), sum(1 for d in described if not d["healthy"])

    def metrics_sources(self) -> list[tuple[str, str]]:
        """Each live session's Prometheus text, tagged with its volume ID."""
        out = []
        with self._lock:
            volumes = list(self._volumes.values())
        for volume in volumes:
            session = volume.session
            if volume.state != MOUNTED or session is None:
                continue
            try:
                out.append((volume.volume_id, session.client(QUICK_TIMEOUT).metrics()))
            except Exception as exc:  # noqa: BLE001 - one bad session must not break the scrape
                log.warning("session metrics failed", extra={"fields": {
                    "volume_id": volume.volume_id, "error": str(exc)}})
        return out

    def volume_gauges(self) -> list[tuple[str, bool, str]]:
        """(volume_id, up, state) for every volume."""
        with self._lock:
            volumes = list(self._volumes.values())
        return [(v.volume_id, v.state == MOUNTED, v.state) for v in volumes if not v.removed]


def _holder_has(sock: str, volume_id: str) -> bool:
    """True when the holder at ``sock`` keeps descriptors for ``volume_id``."""
    try:
        fds = handover.take(sock, volume_id)
    except OSError:
        return False
    for fd in fds:
        os.close(fd)
    return bool(fds)


def _rmdir_quietly(path: str) -> None:
    """Remove an empty directory; anything else (gone, not empty, busy) is left."""
    try:
        os.rmdir(path)
    except OSError:
        pass
