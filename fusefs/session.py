"""One volume's FUSE session: a process that mounts, serves and answers control.

Command line (the daemon's contract; see docs/fusefs.md)::

    python -m fusefs.session --volume-id ID --source DIR --mountpoint DIR
        --control-socket PATH [--capacity BYTES] [--read-only]
        [--io-bytes-per-second N] [--io-ops-per-second N] [--die-with-parent]
        [--usage-file PATH] [--max-open-files N]

- stdout stays empty; logs are JSON lines on stderr.
- The control socket (0600) answers only once the mount shows in
  ``/proc/self/mountinfo`` with fstype ``fuse.fusefs`` and source
  ``fusepath:<ID>``: a successful ``ping`` means "mounted and serving".
- SIGTERM (or SIGHUP) thaws the volume, lifts the I/O limits so no request
  stays parked, stops the FUSE loop, unmounts (lazily) and exits 0.
- ``--die-with-parent`` sets PR_SET_PDEATHSIG=SIGKILL; without it the
  session outlives its parent.
- The usage is persisted in ``--usage-file`` (default: the control socket's
  path with ``.usage`` for ``.sock``, in the daemon's private directory) at a
  clean exit and trusted at the next start; otherwise it is rebuilt by a
  background scan while the mount already serves (see fusefs.usage). A
  kernel-engine takeover adopts the dead session's live counters instead
  and audits them with that scan (see fusefs.live_usage).

Threads: the main thread sits in libfuse's multithreaded loop (inside
``fuse_main_real``); libfuse runs requests on its own worker threads; Python
threads serve the control socket, wait for readiness, and handle signals.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any

from fusefs import binding
from fusefs.control import Busy, ControlServer, InvalidRequest
from fusefs.freeze import FreezeAborted, FreezeGate, FreezeTimeout
from fusefs.limits import IOLimits
from fusefs import usage
from fusefs.charging import MAX_OPEN_FILES
from fusefs.operations import FsOptions, FusefsOperations
from fusefs.opstats import OpStats, render_prometheus
from fusefs.quota import Quota

log = logging.getLogger("fusefs.session")

FSTYPE = "fuse.fusefs"
VOLUME_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: How long the session waits for its own mount to appear before giving up.
READY_TIMEOUT = 30.0
MAX_FREEZE_SECONDS = 3600
#: libfuse worker threads at most; they are created on demand, so that
#: writers parked by a freeze or a limit never starve reads.
MAX_WORKERS = 128
#: Idle workers libfuse keeps before it retires one. Never retire: a worker's
#: Python thread state is pinned for speed and cannot be released safely when
#: libfuse ends the thread (see binding._pin_thread_state).
IDLE_WORKERS = 100000
#: Descriptors a session keeps for itself beyond the volume's open-file cap
#: (/dev/fuse, the control socket and its clients, the usage scan's walk).
RESERVED_FDS = 1024
#: Scan passes the background scan makes before it gives up (a pass is
#: repeated only when the tree moved under it).
SCAN_PASSES = 3
#: Nodes the kernel engine keeps at most by default (one descriptor and
#: a few hundred bytes each), for which it raises RLIMIT_NOFILE (up to
#: fs.nr_open); and the least it keeps for them when the limit is low (the
#: open-file cap shrinks instead).
NODE_FDS = 1 << 17
MIN_NODES = 1024


def raise_fd_limit(cap: int, nodes: int = 0) -> int:
    """Raise RLIMIT_NOFILE to hold ``cap`` volume files plus our own, and
    ``nodes`` more (the kernel engine: a descriptor per inode the kernel
    knows, see :func:`node_budget`); returns the cap that fits (lower only
    where the hard limit cannot be raised)."""
    import resource

    want = max(65536, 2 * cap + RESERVED_FDS + nodes)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except (OSError, ValueError):
        ceiling = want
    target = min(want, ceiling)
    for new in ((target, max(hard, target)), (min(target, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, new)
            break
        except (ValueError, OSError):
            continue
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    room = soft - RESERVED_FDS
    if nodes and room < cap + nodes:
        # A limit that cannot be raised far enough: three quarters of it go
        # to nodes. Every open file needs its node as well, and a pod that
        # lists or stats a tree needs a node per inode it sees; a budget much
        # smaller than the tree makes the pruner and the kernel trade nodes
        # back and forth (a stat then costs a LOOKUP: measured 10,000 stats/s
        # instead of 250,000 with 2,592 nodes for a 10,000-file tree).
        return max(1, min(cap, room - max(min(nodes, room * 3 // 4), min(nodes, MIN_NODES))))
    return max(1, min(cap, room))


def node_budget(cap: int, wanted: int = 0) -> int:
    """Nodes the kernel engine may keep: ``wanted`` (0: :data:`NODE_FDS`),
    or fewer, the descriptors of RLIMIT_NOFILE left after the open-file cap
    and our own."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(1, min(soft - RESERVED_FDS - cap, wanted if wanted > 0 else NODE_FDS))


# ---------------------------------------------------------------- logging


class _JsonLines(logging.Formatter):
    """One JSON object per line, with the volume ID on every line."""

    def __init__(self, volume_id: str) -> None:
        super().__init__()
        self.volume_id = volume_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "volume_id": self.volume_id,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(volume_id: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLines(volume_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("fuse").setLevel(logging.WARNING)  # mfusepy's own logger


# ---------------------------------------------------------------- mountinfo


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_device(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """``major:minor`` of the topmost mount at ``mountpoint`` (its bdi name)."""
    target = os.path.realpath(mountpoint)
    found = None
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4 and _unescape(fields[4]) == target:
                found = fields[2]
    return found


def mount_is_live(mountpoint: str, volume_id: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether the topmost mount at ``mountpoint`` is this volume's fusefs mount."""
    target = os.path.realpath(mountpoint)
    found = None
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            fields, rfields = left.split(" "), right.split(" ")
            if sep and len(fields) >= 5 and len(rfields) >= 2 and _unescape(fields[4]) == target:
                found = (rfields[0], _unescape(rfields[1]))  # later lines stack on top
    return found == (FSTYPE, f"fusepath:{volume_id}")


# ---------------------------------------------------------------- the session


class Session:
    """Everything one volume's process owns, and the control commands."""

    #: Descriptors wanted for nodes besides the open-file cap (see raise_fd_limit).
    node_fds = 0

    def __init__(self, *, volume_id: str, source: str, mountpoint: str, control_socket: str | None,
                 capacity: int = 0, read_only: bool = False, bytes_per_second: int = 0,
                 ops_per_second: int = 0, options: FsOptions | None = None,
                 read_ahead_kb: int = 1024, max_workers: int = MAX_WORKERS,
                 usage_file: str | None = None) -> None:
        if not VOLUME_ID_RE.match(volume_id):
            raise ValueError(f"invalid volume id {volume_id!r}")
        # A takeover must not touch its mountpoint before it serves it: a
        # stat there waits for the server, which is this process.
        taking_over = bool(getattr(getattr(self, "kernel_options", None), "takeover", False))
        for what, path in (("source", source), ("mountpoint", mountpoint)):
            if not (taking_over and what == "mountpoint") and not os.path.isdir(path):
                raise ValueError(f"{what} {path!r} is not a directory")
        self.volume_id = volume_id
        self.source = os.path.realpath(source)
        self.mountpoint = os.path.abspath(mountpoint) if taking_over else os.path.realpath(mountpoint)
        self.control_socket = control_socket
        self.read_ahead_kb = read_ahead_kb
        self.max_workers = max_workers
        self.started = time.time()
        self.stopping = threading.Event()
        self.ready = threading.Event()

        options = options or FsOptions()
        options.max_open_files = raise_fd_limit(options.max_open_files, self.node_fds)
        if usage_file is None and control_socket:
            usage_file = (control_socket[:-5] if control_socket.endswith(".sock") else control_socket) + ".usage"
        self.usage_file = usage_file
        #: Why the volume's usage cannot be trusted ('' when it can); shown in stats.
        self.abnormal = ""
        self._root_fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        adopted = self._adopted_usage(capacity)
        known = usage.load(usage_file, self._root_fd) if usage_file and adopted is None else None
        if known is not None and not usage.mark_dirty(usage_file, self._root_fd):
            known = None  # a crash could leave it looking clean: do not rely on it
        if adopted is not None:
            # A successor's figures from the dead session (a takeover): known
            # within a small drift, audited by a scan while the volume grows.
            if usage_file:
                usage.mark_dirty(usage_file, self._root_fd)
            self.scan_info = {"state": "running", "adopted": True, "seconds": 0.0, "passes": 0}
            self.quota = adopted
            xattrs = capability = True  # until a quiet audit says otherwise
            log.info("usage adopted from the live counters", extra={"fields": {
                "used_bytes": adopted.used_bytes, "used_inodes": adopted.used_inodes}})
        elif known is not None:
            self.scan_info: dict[str, Any] = {"state": "trusted", "seconds": 0.0, "passes": 0}
            self.quota = Quota(capacity, known["used_bytes"], known["used_inodes"])
            xattrs, capability = bool(known.get("xattrs", True)), bool(known.get("capability", True))
            log.info("usage from the last clean unmount", extra={"fields": {
                "used_bytes": known["used_bytes"], "used_inodes": known["used_inodes"]}})
        else:
            if usage_file:
                usage.mark_dirty(usage_file, self._root_fd)
            self.scan_info = {"state": "running", "seconds": 0.0, "passes": 0}
            self.quota = Quota(capacity, recovering=True)
            xattrs = capability = True  # until the scan says otherwise
        self.gate = FreezeGate()
        # Half the workers at most may wait in the buckets: the rest serve
        # metadata, cached reads and the kernel's INTERRUPT requests.
        self.limits = IOLimits(bytes_per_second, ops_per_second, max_waiters=max(1, max_workers // 2),
                               interrupted=binding.request_interrupted)
        self.ops = self._make_ops(read_only=read_only, options=options, xattrs_seen=xattrs,
                                  capability_seen=capability)
        self.server = ControlServer(control_socket, self.handlers()) if control_socket else None
        if self.quota.recovering:
            threading.Thread(target=self._recount, name="usage-scan", daemon=True).start()
        elif adopted is not None:
            threading.Thread(target=self._audit, name="usage-audit", daemon=True).start()

    def _adopted_usage(self, capacity: int) -> Quota | None:
        """The usage a predecessor left for this session to adopt (the kernel
        engine's takeover); None: the usual rules (usage file, or a scan)."""
        return None

    def _orphan_charges(self) -> tuple[int, int]:
        """Bytes and inodes charged for open files that have no name left
        (see :meth:`_audit`); only the kernel engine audits."""
        return 0, 0

    def _requests_in_flight(self) -> int:
        """Requests being served now (see :meth:`_audit`)."""
        return 0

    def _make_ops(self, *, read_only: bool, options: FsOptions, xattrs_seen: bool,
                  capability_seen: bool) -> Any:
        """The filesystem object the engine calls (the libfuse engine's here);
        sets ``stats_``, the counters it fills."""
        self.stats_ = OpStats()
        return FusefsOperations(
            self.source, quota=self.quota, gate=self.gate, limits=self.limits, stats=self.stats_,
            read_only=read_only, options=options, xattrs_seen=xattrs_seen, capability_seen=capability_seen)

    def _recount(self) -> None:
        """Rebuild the usage in the background (the quota refuses growth
        meanwhile, and renames, so the tree cannot move under the walk)."""
        t0 = time.monotonic()
        for attempt in range(1, SCAN_PASSES + 1):
            self.scan_info["passes"] = attempt
            try:
                found = usage.scan(self._root_fd, should_stop=self.stopping.is_set)
            except usage.ScanAborted as exc:
                if self.stopping.is_set():
                    return
                log.warning("usage scan restarted", extra={"fields": {"reason": str(exc)}})
                continue
            except OSError as exc:
                self._scan_failed(f"the usage scan failed: {exc}", t0)
                return
            seconds = round(time.monotonic() - t0, 3)
            self.scan_info.update(seconds=seconds, dir_bytes=found.dir_bytes, unmeasured=found.unmeasured)
            if found.unmeasured:
                self._scan_failed(f"{found.unmeasured} entries could not be measured "
                                  f"(e.g. {'; '.join(found.problems[:3])}); the volume accepts no growth", t0)
                return
            self.ops.xattrs_seen, self.ops.capability_seen = found.xattrs, found.capability
            # Charged inodes with no name the scan could see (kept open by a
            # pod across a takeover) are still charged until freed.
            orphan_bytes, orphan_inodes = self._orphan_charges()
            self.quota.recovered(found.used_bytes + orphan_bytes, found.used_inodes + orphan_inodes)
            self.scan_info["state"] = "done"
            log.info("usage scan done", extra={"fields": {
                "used_bytes": found.used_bytes, "used_inodes": found.used_inodes, **self.scan_info}})
            return
        self._scan_failed(f"the tree kept moving during {SCAN_PASSES} usage scans", t0)

    def _audit(self) -> None:
        """Check adopted counters with a scan while the volume keeps growing
        (see :meth:`fusefs.quota.Quota.audit_end`), up to SCAN_PASSES passes
        until one is exact (nothing changed during its walk). A pass during
        which a name moved proves nothing; one during which the volume
        changed corrects only what it proves. Unless a pass was exact, the
        usage is not persisted as clean (the next fresh mount rescans)."""
        t0 = time.monotonic()
        judged: dict[str, Any] = {"verdict": "moved"}
        for attempt in range(1, SCAN_PASSES + 1):
            self.scan_info["passes"] = attempt
            mark = self.quota.audit_start()
            idle = not self._requests_in_flight()
            try:
                found = usage.scan(self._root_fd, should_stop=self.stopping.is_set)
            except usage.ScanAborted as exc:
                if self.stopping.is_set():
                    return
                log.warning("usage audit restarted", extra={"fields": {"reason": str(exc)}})
                continue
            except OSError as exc:
                self.quota.lose()
                self._scan_failed(f"the usage audit failed: {exc}", t0)
                return
            if found.unmeasured:
                self.quota.lose()
                self._scan_failed(f"{found.unmeasured} entries could not be measured "
                                  f"(e.g. {'; '.join(found.problems[:3])}); the volume accepts no growth", t0)
                return
            # Inodes unlinked while open are charged until their last close,
            # which will uncharge them, but have no name the scan could see.
            orphan_bytes, orphan_inodes = self._orphan_charges()
            idle = idle and not self._requests_in_flight()
            judged = self.quota.audit_end(mark, found.used_bytes + orphan_bytes, found.used_inodes + orphan_inodes,
                                          may_lower=idle)
            self.scan_info.update(audit=judged, dir_bytes=found.dir_bytes, unmeasured=0)
            if judged["verdict"] == "exact":
                self.ops.xattrs_seen, self.ops.capability_seen = found.xattrs, found.capability
                break
        state = "unconfirmed" if judged["verdict"] == "moved" else "done"
        self.scan_info.update(state=state, seconds=round(time.monotonic() - t0, 3))
        log.info("usage audit ended", extra={"fields": self.scan_info})

    def _scan_failed(self, why: str, t0: float) -> None:
        """The usage stays unknown: no growth (never counted as free), reported."""
        self.abnormal = why
        self.scan_info.update(state="failed", seconds=round(time.monotonic() - t0, 3))
        log.error("volume abnormal", extra={"fields": {"reason": why}})

    def persist_usage(self) -> None:
        """After the unmount: the figures, marked clean, for the next mount."""
        if not self.usage_file or self.quota.recovering or self.scan_info.get("state") not in ("trusted", "done"):
            return  # unknown or unconfirmed usage is rebuilt next time (the file is already dirty)
        if self.scan_info.get("adopted") and self.scan_info.get("audit", {}).get("verdict") != "exact":
            return  # adopted figures no exact audit confirmed: the same
        q = self.quota.snapshot()
        try:
            usage.store(self.usage_file, self._root_fd, clean=True, used_bytes=q["used_bytes"],
                        used_inodes=q["used_inodes"], xattrs=self.ops.xattrs_seen,
                        capability=self.ops.capability_seen)
        except OSError as exc:
            log.error("could not persist the usage", extra={"fields": {"error": str(exc)}})

    # ------------------------------------------------------------ commands

    def handlers(self) -> dict[str, Any]:
        return {
            "ping": lambda a: self.ping(),
            "stats": lambda a: self.stats(),
            "metrics": lambda a: {"text": self.metrics()},
            "resize": lambda a: self.resize(_int_arg(a, "capacity")),
            "freeze": lambda a: self.freeze(float(a.get("timeout_seconds", 60))),
            "thaw": lambda a: self.thaw(),
            "set_limits": lambda a: self.set_limits(_int_arg(a, "bytes_per_second", 0),
                                                    _int_arg(a, "ops_per_second", 0)),
            "set_read_only": lambda a: self.set_read_only(bool(a["read_only"])),
        }

    def ping(self) -> dict[str, Any]:
        return {"ready": self.ready.is_set(), "volume_id": self.volume_id, "pid": os.getpid(),
                "mountpoint": self.mountpoint}

    def stats(self) -> dict[str, Any]:
        q = self.quota.snapshot()
        ops = self.stats_.snapshot()
        return {
            "volume_id": self.volume_id,
            **q,
            "available_bytes": max(0, q["capacity"] - q["used_bytes"]) if q["capacity"] else 0,
            "available_inodes": max(0, q["total_inodes"] - q["used_inodes"]),
            "frozen": self.gate.frozen,
            "freeze": self.gate.status(),
            "read_only": self.ops.read_only,
            "limits": self.limits.as_dict(),
            "throttled_seconds": round(self.limits.throttled_seconds, 3),
            "throttle_refused": self.limits.refused,
            "throttle_interrupted": self.limits.interrupted_requests,
            "throttle_backlog_seconds": round(self.limits.backlog(), 3),
            "throttle_writeback_bytes": self.limits.writeback_bytes,
            "open_files": self.ops.open_handles(),
            "open_files_max": self.ops.open_files.limit,
            "open_files_refused": self.ops.open_files.refused,
            "invalidations": self.ops.links.invalidations,
            "abnormal": self.abnormal,
            "worker_threads": self.stats_.threads(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "negotiated": self.ops.negotiated,
            "scan": self.scan_info,
            **ops,
        }

    def metrics(self) -> str:
        return render_prometheus({self.volume_id: self.stats()})

    def resize(self, capacity: int) -> dict[str, Any]:
        if capacity < 0:
            raise InvalidRequest("capacity must be >= 0")
        old = self.quota.capacity
        self.quota.resize(capacity)
        log.info("resized", extra={"fields": {"old_capacity": old, "capacity": capacity}})
        return {"capacity": capacity}

    def freeze(self, timeout_seconds: float) -> dict[str, Any]:
        if not 0 < timeout_seconds <= MAX_FREEZE_SECONDS:
            raise InvalidRequest(f"timeout_seconds must be in (0, {MAX_FREEZE_SECONDS}]")
        synced: list[int] = []
        t0 = time.monotonic()
        write_back = self._write_back if self.ops.negotiated.get("writeback_cache") else None
        try:
            self.gate.freeze(timeout_seconds, flush=lambda: synced.append(self.ops.sync_open_files()),
                             write_back=write_back)
        except (FreezeTimeout, FreezeAborted) as exc:
            raise Busy(str(exc)) from exc
        status = self.gate.status()
        log.info("frozen", extra={"fields": {"timeout_seconds": timeout_seconds,
                                              "synced_files": sum(synced),
                                              "took_seconds": round(time.monotonic() - t0, 3)}})
        return {"frozen": True, "synced_files": sum(synced),
                "auto_thaw_in_seconds": status["auto_thaw_in_seconds"]}

    def _write_back(self) -> None:
        """Have the kernel write its dirty pages back to us (write-back cache)."""
        self.ops.write_back_open_files(self.mountpoint)

    def thaw(self) -> dict[str, Any]:
        was = self.gate.thaw()
        if was:
            log.info("thawed")
        return {"was_frozen": was}

    def set_limits(self, bytes_per_second: int, ops_per_second: int) -> dict[str, Any]:
        try:
            self.limits.set(bytes_per_second, ops_per_second)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from exc
        log.info("limits set", extra={"fields": self.limits.as_dict()})
        return {"limits": self.limits.as_dict()}

    def set_read_only(self, read_only: bool) -> dict[str, Any]:
        self.ops.read_only = read_only
        log.info("read-only set", extra={"fields": {"read_only": read_only}})
        return {"read_only": read_only}

    # ------------------------------------------------------------ running

    def run(self) -> int:
        """Mount and serve until told to stop. Returns the exit code."""
        os.umask(0)  # the kernel already applied the caller's umask to every mode
        self._install_signals()
        threading.Thread(target=self._become_ready, name="ready", daemon=True).start()
        options = dict(
            foreground=True,
            fsname=f"fusepath:{self.volume_id}",
            subtype="fusefs",
            default_permissions=True,
            allow_other=True,
            max_read=self.ops.options.max_write,
            # Enough workers that writers parked by a freeze or a limit never
            # starve reads (libfuse 3.14 defaults to 10), and never reap idle
            # ones (-1, which 3.14 also logs as "invalid").
            max_threads=self.max_workers,
            max_idle_threads=IDLE_WORKERS,
        )
        log.info("mounting", extra={"fields": {"source": self.source, "mountpoint": self.mountpoint,
                                                "capacity": self.quota.capacity}})
        code = 0
        try:
            binding.FastFUSE(self.ops, self.mountpoint, **options)
        except Exception as exc:  # noqa: BLE001 - reported, then a non-zero exit
            log.error("FUSE session failed", extra={"fields": {"error": str(exc)}})
            code = 1
        finally:
            self.stopping.set()
            if self.server is not None:
                self.server.close()
        if code == 0:
            self.persist_usage()
        if code == 0 and not self.ready.is_set():
            code = 1  # the loop ended before the mount ever came up
        log.info("unmounted; exiting", extra={"fields": {"code": code}})
        return code

    def _become_ready(self) -> None:
        if not self.ops.initialized.wait(READY_TIMEOUT):
            log.error("the kernel never initialised the mount")
            return
        deadline = time.monotonic() + READY_TIMEOUT
        while not mount_is_live(self.mountpoint, self.volume_id):
            if time.monotonic() > deadline or self.stopping.is_set():
                log.error("mount did not appear in mountinfo")
                return
            time.sleep(0.01)
        self._tune_read_ahead()
        if self.server is not None:
            self.server.start()
        self.ready.set()
        log.info("ready", extra={"fields": {"negotiated": self.ops.negotiated}})

    def _tune_read_ahead(self) -> None:
        """Raise the mount's read-ahead (the kernel offers FUSE 128 KiB).

        Sequential reads then reach the daemon as 1 MiB requests, several
        in flight, instead of 128 KiB ones: cold sequential reads go from
        about 280 to about 1,100 MiB/s on the reference VM. INIT cannot ask
        for more than the kernel offers, so this is done through sysfs.
        """
        if not self.read_ahead_kb:
            return
        dev = mount_device(self.mountpoint)
        if dev is None:
            return
        try:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(self.read_ahead_kb))
        except OSError as exc:
            log.warning("could not set read-ahead", extra={"fields": {
                "error": str(exc), "read_ahead_kb": self.read_ahead_kb,
                "hint": "in a container, /sys/devices/virtual/bdi must be writable (docs/deploy.md, Read-ahead)"}})

    # ------------------------------------------------------------ stopping

    def _install_signals(self) -> None:
        """Own SIGTERM/SIGHUP so a stop can first release parked requests.

        libfuse installs its exit handler only where the disposition is still
        SIG_DFL; having ours in place keeps it out. A signal wakes the main
        thread out of libfuse's sem_wait (EINTR) and, through the wakeup fd,
        the stopper thread below, which does the work Python cannot do from a
        signal handler while the main thread is inside C.
        """
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: None)
        threading.Thread(target=self._stopper, args=(r,), name="stopper", daemon=True).start()

    def _stopper(self, rfd: int) -> None:
        import select

        while True:
            select.select([rfd], [], [])
            try:
                data = os.read(rfd, 64)
            except BlockingIOError:
                continue
            if any(b in (signal.SIGTERM, signal.SIGHUP) for b in data):
                break
        log.info("stop requested")
        self.stopping.set()
        self.gate.thaw()             # release writers parked by a freeze
        self.limits.set(0, 0)        # and requests parked by a limit
        main = threading.main_thread().ident
        for _ in range(100):
            if self.ops.fuse_session:
                binding.session_exit(self.ops.fuse_session)
            else:
                # Not initialised yet: unmounting makes libfuse's read fail.
                binding.lazy_unmount(self.mountpoint)
            if main is not None:
                try:
                    signal.pthread_kill(main, signal.SIGTERM)  # interrupt sem_wait
                except (ProcessLookupError, OSError):
                    return
            time.sleep(0.1)


def _int_arg(args: dict[str, Any], key: str, default: int | None = None) -> int:
    if key not in args:
        if default is None:
            raise InvalidRequest(f"missing argument {key!r}")
        return default
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"{key} must be an integer")
    return value


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusefs.session", description=__doc__.split("\n\n")[0])
    p.add_argument("--volume-id", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--control-socket", required=True)
    p.add_argument("--capacity", type=int, default=0, help="quota in bytes (0: none)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--io-bytes-per-second", type=int, default=0)
    p.add_argument("--io-ops-per-second", type=int, default=0)
    p.add_argument("--die-with-parent", action="store_true")
    p.add_argument("--writeback-cache", action="store_true",
                   help="buffer writes in the kernel (faster small writes; ENOSPC at write-back)")
    p.add_argument("--no-keep-cache", action="store_true", help="drop a file's page cache on every open")
    p.add_argument("--splice", action="store_true", help="libfuse engine: receive requests with splice() (the kernel engine ignores it)")
    p.add_argument("--no-xattrs", action="store_true",
                   help="libfuse engine: no extended attributes (ENOTSUP); saves a round trip per write(2) "
                        "(the kernel engine ignores it)")
    p.add_argument("--max-workers", type=int, default=MAX_WORKERS, help="worker threads at most (both engines)")
    p.add_argument("--read-ahead-kb", type=int, default=1024, help="the mount's read-ahead (0: kernel default)")
    p.add_argument("--usage-file", help="where the usage is persisted (default: beside the control socket)")
    p.add_argument("--max-open-files", type=int, default=MAX_OPEN_FILES,
                   help="open files and directories the volume's users may hold at once (EMFILE beyond)")
    # Long timeouts are safe because only this session changes the source
    # directory (hard links are kept coherent by explicit invalidation).
    p.add_argument("--attr-timeout", type=float, default=10.0)
    p.add_argument("--entry-timeout", type=float, default=10.0)
    p.add_argument("--log-level", default=os.environ.get("FUSEFS_LOG_LEVEL", "info"))
    p.add_argument("--engine", choices=("libfuse", "kernel"), default="kernel",
                   help="kernel (fusefs speaks /dev/fuse itself; the default) or libfuse (mfusepy)")
    k = p.add_argument_group("kernel engine")
    k.add_argument("--state-file", help="negotiated flags and node journal, for a takeover")
    k.add_argument("--holder-socket", action="append", default=[],
                   help="give the /dev/fuse descriptors to this holder (repeatable)")
    k.add_argument("--takeover", action="store_true",
                   help="resume the live connection kept by --holder-socket (no mount, no INIT)")
    k.add_argument("--no-passthrough", action="store_true", help="never use kernel passthrough")
    k.add_argument("--no-resend", action="store_true",
                   help="do not take FUSE_HAS_RESEND (as on a kernel before 6.9: requests in flight at a "
                        "takeover get EIO instead of being sent again)")
    k.add_argument("--clones", type=int, default=2, help="cloned /dev/fuse descriptors besides the master")
    k.add_argument("--max-nodes", type=int, default=0,
                   help="inodes the kernel may know at once (a descriptor each; 0: what RLIMIT_NOFILE "
                        "leaves); unused ones are pruned beyond 80%%, ENFILE beyond all")
    k.add_argument("--orphan-dir", default="",
                   help="where open files that lose their last name are kept across a takeover "
                        "(outside the volume, same filesystem)")
    return p


def options_from_args(args: argparse.Namespace) -> FsOptions:
    return FsOptions(
        keep_cache=not args.no_keep_cache,
        writeback_cache=args.writeback_cache,
        attr_timeout=args.attr_timeout,
        entry_timeout=args.entry_timeout,
        negative_timeout=args.entry_timeout,
        xattrs=not args.no_xattrs,
        splice=args.splice,
        max_open_files=args.max_open_files,
    )


def session_class(args: argparse.Namespace) -> Any:
    """Session, or the kernel engine's subclass with its options bound."""
    if args.engine != "kernel":
        return Session
    import functools

    from fusefs.kernel.serve import KernelOptions, KernelSession

    return functools.partial(KernelSession, kernel_options=KernelOptions(
        state_file=args.state_file, holder_sockets=tuple(args.holder_socket), takeover=args.takeover,
        passthrough=not args.no_passthrough, resend=not args.no_resend, clones=max(0, args.clones),
        orphan_dir=args.orphan_dir,
        max_nodes=max(0, args.max_nodes)))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.die_with_parent:
        binding.prctl(binding.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    configure_logging(args.volume_id, args.log_level)
    if args.max_open_files < 1:
        log.error("invalid argument", extra={"fields": {"max_open_files": args.max_open_files}})
        return 2
    unsupported = [flag for flag, on in (("--no-xattrs", args.no_xattrs), ("--splice", args.splice)) if on]
    if args.engine == "kernel" and unsupported:
        log.error("option of the libfuse engine only; the kernel engine would ignore it",
                  extra={"fields": {"options": unsupported, "engine": "kernel"}})
        return 2
    for name in ("capacity", "io_bytes_per_second", "io_ops_per_second"):
        if getattr(args, name) < 0:
            log.error("invalid argument", extra={"fields": {name: getattr(args, name)}})
            return 2
    try:
        session = session_class(args)(
            volume_id=args.volume_id, source=args.source, mountpoint=args.mountpoint,
            control_socket=args.control_socket, capacity=args.capacity, read_only=args.read_only,
            bytes_per_second=args.io_bytes_per_second, ops_per_second=args.io_ops_per_second,
            options=options_from_args(args), read_ahead_kb=args.read_ahead_kb, max_workers=args.max_workers,
            usage_file=args.usage_file)
    except (ValueError, OSError) as exc:
        log.error("cannot start the session", extra={"fields": {"error": str(exc)}})
        return 2
    return session.run()


if __name__ == "__main__":
    sys.exit(main())
