"""The /dev/fuse loop: read requests, call the filesystem, write replies.

One connection has a master descriptor (the one passed to mount(2), or
received in a handover) and a few clones (``FUSE_DEV_IOC_CLONE``), each with
its own processing queue in the kernel. Worker threads read a request into
a preallocated buffer, answer it on the descriptor it came from (a reply on
another one is refused), and read the next.

How many workers: as few as keep every request moving. One worker serves a
sequential caller fastest: with two or more waiting, the kernel hands each
request to the longest-waiting one, and on two vCPUs the threads then pass
the GIL back and forth (a worker preempted by the woken caller holds it
while the next worker wakes), which cost about half of a small request's
round trip. So a worker is added, up to a maximum, only when a request may
wait: at once before a request parks (a freeze, an I/O limit), and by a
watchdog when every worker has been on the same requests for a tick (a slow
fsync, say), so that a parked or slow request never starves the others.
Workers beyond the minimum leave after a while with nothing to do.

The first request of a fresh mount is INIT, answered before any worker
starts. A connection taken over from a dead server is already initialised:
no INIT comes, and the engine writes FUSE_NOTIFY_RESEND so that the requests
the dead server had read but not answered are queued again (with bit 63 set
in their ``unique``; the filesystem answers them idempotently).

**Pruning.** Every node holds a descriptor, and the kernel sends FORGET only
when it evicts an inode, which it does under memory pressure: left alone,
the node table grows with what the pod touches until the session runs out
of descriptors. With a node budget (see :meth:`NodeTable.set_budget`), a
pruner thread woken when the table passes its high-water mark writes
FUSE_NOTIFY_PRUNE (Linux 6.16+) for the oldest nodes that are not open: the
kernel drops their unused dentries and evicts the inodes nobody uses, which
sends FORGET for them, until the table is under the low-water mark. A
request never waits for it; a kernel without the notification refuses the
write once, and the budget is then a hard limit (ENFILE beyond it).
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import select
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fusefs.kernel import protocol as p
from fusefs.kernel import syscalls as ksys
from fusefs.kernel.inodefs import Caller, InodeFs, current_request
from fusefs.opstats import OpStats

log = logging.getLogger("fusefs.kernel.engine")

#: Node IDs per FUSE_NOTIFY_PRUNE write (the kernel's own batch).
PRUNE_BATCH = 512
#: How long the pruner lets the FORGETs of a pass arrive before it looks
#: again (short: a pod listing a large directory makes nodes fast).
PRUNE_SETTLE = 0.005
#: Node IDs sent per wake at most, in budgets; and the pause after a wake
#: that freed nothing (everything in use), so that a full table of nodes in
#: use does not keep the pruner spinning.
PRUNE_ROUNDS = 4
PRUNE_BACKOFF = 0.05

#: What an engine's OpStats counts (opcode names; see protocol.OPCODE_NAMES).
OPERATIONS = tuple(sorted(set(p.OPCODE_NAMES.values())))
_NS = 1_000_000_000
_ENTRY_OUT = p.ENTRY_OUT.pack
_ATTR_OUT = p.ATTR_OUT.pack
_DIRENTPLUS = p.DIRENTPLUS.pack
_DIRENT = p.DIRENT.pack
#: Zero bytes that pad a name to 8 bytes, by how many are needed.
_PADS = tuple(bytes(i) for i in range(8))
_DIRENTPLUS_SIZE = p.DIRENTPLUS.size
#: The entry part of a READDIRPLUS record for "." and ".." (no lookup: the kernel skips them).
_EMPTY_ENTRY = bytes(p.ENTRY_PREFIX.size + p.ATTR.size)
#: INTERRUPTs remembered for requests not (yet) seen being served, at most.
MAX_EARLY_INTERRUPTS = 1024
#: One worker's slot in the in-flight file: (descriptor index + 1, unique); 0: idle.
INFLIGHT_SLOT = struct.Struct("=QQ")
#: A successor reads at most this many slots (more than any --max-workers).
MAX_INFLIGHT_SLOTS = 1 << 16


@dataclass
class EngineOptions:
    """What INIT asks for and how requests are served."""

    max_write: int = 1 << 20
    max_readahead: int = 1 << 20
    max_background: int = 64
    attr_timeout: float = 10.0
    entry_timeout: float = 10.0
    negative_timeout: float = 10.0
    writeback_cache: bool = False
    #: Serve read-only opens through kernel passthrough when the kernel grants it.
    passthrough: bool = True
    #: Take FUSE_HAS_RESEND when the kernel offers it (off: behave as on a
    #: kernel without it, see :meth:`Engine.fail_inflight`).
    resend: bool = True
    readdirplus: bool = True
    #: Cloned descriptors besides the master (each worker uses one of them).
    clones: int = 2
    max_workers: int = 64
    #: Workers that never leave (see the module docstring for why one).
    min_workers: int = 1
    #: The watchdog's tick: a request every worker has been on for this long
    #: (two ticks at most) gets another worker started.
    spawn_after: float = 0.005
    #: A worker beyond the minimum leaves after waiting this long for a request.
    idle_exit: float = 10.0
    negotiated: dict[str, Any] = field(default_factory=dict)


def _timeout(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e9)


def pack_attr(st: os.stat_result) -> bytes:
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    return p.ATTR.pack(st.st_ino, st.st_size, st.st_blocks, a // _NS, m // _NS, c // _NS,
                       a % _NS, m % _NS, c % _NS, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                       st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)


class Unmounted(Exception):
    """The connection is gone (ENODEV on read)."""


class Engine:
    """One FUSE connection served by a pool of threads."""

    def __init__(self, fs: InodeFs, options: EngineOptions | None = None, stats: OpStats | None = None) -> None:
        self.fs = fs
        self.options = options or EngineOptions()
        self.stats = stats or OpStats(OPERATIONS)
        self._op_index = {op: self.stats.index(p.OPCODE_NAMES[op]) if p.OPCODE_NAMES.get(op) in self.stats.operations
                          else -1 for op in p.OPCODE_NAMES}
        self.devices: list[int] = []
        self.initialized = fs.initialized
        self.stopped = threading.Event()
        self.negotiated: dict[str, Any] = {}
        self._want_passthrough = False
        self._lock = threading.Lock()
        self._idle = 0
        self._workers = 0
        self._served = 0  # requests taken, for the watchdog
        self._watch_parked = False
        self._watch_wake = threading.Event()
        self._inflight: set[int] = set()
        #: The pruner (see the module docstring): its wake-up, node IDs it
        #: asked the kernel to forget, and whether the kernel can.
        self._prune_wake = threading.Event()
        self.pruned = 0
        self.prune_supported = True
        #: INTERRUPT targets read before their request was registered (_interrupt).
        self._early: dict[int, None] = {}
        #: Without FUSE_HAS_RESEND: the request each worker serves (track_inflight).
        self._slots: mmap.mmap | None = None
        #: In-flight slots of workers that left, for the next ones (so no two
        #: live workers ever share one), and the next never-used slot.
        self._free_slots: list[int] = []
        self._next_slot = 0
        o = self.options
        self._entry_valid = _timeout(o.entry_timeout)
        self._attr_valid = _timeout(o.attr_timeout)
        self._negative_valid = _timeout(o.negative_timeout)
        self._bufsize = o.max_write + 4096 + p.MIN_READ_BUFFER
        self._handlers: dict[int, Callable[[int, int, int, int, int, memoryview], Any]] = {
            p.LOOKUP: self._lookup, p.FORGET: self._forget, p.BATCH_FORGET: self._batch_forget,
            p.GETATTR: self._getattr, p.SETATTR: self._setattr, p.READLINK: self._readlink,
            p.SYMLINK: self._symlink, p.MKNOD: self._mknod, p.MKDIR: self._mkdir, p.UNLINK: self._unlink,
            p.RMDIR: self._rmdir, p.RENAME: self._rename, p.RENAME2: self._rename2, p.LINK: self._link,
            p.OPEN: self._open, p.READ: self._read, p.WRITE: self._write, p.STATFS: self._statfs,
            p.RELEASE: self._release, p.FSYNC: self._fsync, p.FLUSH: self._flush,
            p.SETXATTR: self._setxattr, p.GETXATTR: self._getxattr, p.LISTXATTR: self._listxattr,
            p.REMOVEXATTR: self._removexattr, p.OPENDIR: self._opendir, p.READDIR: self._readdir,
            p.READDIRPLUS: self._readdirplus, p.RELEASEDIR: self._releasedir, p.FSYNCDIR: self._fsyncdir,
            p.ACCESS: self._access, p.CREATE: self._create, p.INTERRUPT: self._interrupt,
            p.FALLOCATE: self._fallocate, p.LSEEK: self._lseek, p.DESTROY: self._destroy,
        }

    # ------------------------------------------------------------ setup

    def mount(self, mountpoint: str, source: str, subtype: str = "fusefs") -> int:
        """Open /dev/fuse and mount it; returns the master descriptor."""
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        try:
            ksys.mount_fuse(fd, mountpoint, source, subtype,
                            f"default_permissions,allow_other,max_read={self.options.max_write}")
        except BaseException:
            os.close(fd)
            raise
        self.devices = [fd]
        return fd

    def resize_buffers(self) -> None:
        """Size the workers' read buffers for ``options.max_write`` (before start())."""
        self._bufsize = self.options.max_write + 4096 + p.MIN_READ_BUFFER

    def add_clones(self) -> None:
        for _ in range(self.options.clones):
            self.devices.append(ksys.clone_device(self.devices[0]))

    def init(self) -> None:
        """Read and answer INIT on the master descriptor (a fresh mount)."""
        buf = bytearray(self._bufsize)
        fd = self.devices[0]
        while True:
            n = os.readv(fd, [buf])
            length, opcode, unique = p.IN_HEADER.unpack_from(buf, 0)[:3]
            if opcode == p.INIT:
                break
            self._reply_error(fd, unique, errno.EIO)
        major, minor, max_readahead, flags = p.INIT_IN.unpack_from(buf, 40)
        flags2 = int.from_bytes(buf[56:60], sys.byteorder) if n >= 60 and flags & p.INIT_EXT else 0
        kernel_flags = flags | (flags2 << 32)
        if major != p.KERNEL_VERSION or minor < 31:
            self._reply_error(fd, unique, errno.EPROTO)
            raise OSError(errno.EPROTO, f"kernel FUSE protocol {major}.{minor} is too old")
        o = self.options
        want = (p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.BIG_WRITES | p.AUTO_INVAL_DATA | p.ASYNC_DIO
                | p.PARALLEL_DIROPS | p.MAX_PAGES | p.CACHE_SYMLINKS | p.INIT_EXT | p.HAS_RESEND
                | p.DIRECT_IO_ALLOW_MMAP | p.HANDLE_KILLPRIV_V2)
        # Ask for everything a successor may use; a taken-over connection
        # keeps what this INIT negotiated.
        want |= p.PASSTHROUGH | p.DO_READDIRPLUS | p.READDIRPLUS_AUTO
        if o.writeback_cache:
            want |= p.WRITEBACK_CACHE
            want &= ~p.PASSTHROUGH  # the kernel refuses passthrough with write-back caching
        if not o.readdirplus:
            want &= ~(p.DO_READDIRPLUS | p.READDIRPLUS_AUTO)
        if not o.resend:
            want &= ~p.HAS_RESEND
        granted = want & kernel_flags
        max_pages = (o.max_write + 4095) // 4096
        reply = p.INIT_OUT.pack(
            p.KERNEL_VERSION, min(minor, p.KERNEL_MINOR_VERSION), min(max_readahead, o.max_readahead),
            granted & 0xFFFFFFFF, o.max_background, max(1, o.max_background * 3 // 4), o.max_write,
            1, max_pages, 0, granted >> 32, 1 if granted & p.PASSTHROUGH else 0, 0)
        self._reply(fd, unique, reply)
        self.set_negotiated(f"{major}.{minor}", granted, min(max_readahead, o.max_readahead))
        log.info("negotiated", extra={"fields": {"negotiated": self.negotiated}})

    def set_negotiated(self, proto: str, granted: int, max_readahead: int) -> None:
        o = self.options
        self.negotiated = {
            "engine": "kernel",
            "proto": proto,
            "flags": p.flag_names(granted),
            "flags_value": granted,
            "max_write": o.max_write,
            "max_read": o.max_write,
            "max_readahead": max_readahead,
            "writeback_cache": bool(granted & p.WRITEBACK_CACHE),
            "passthrough": bool(granted & p.PASSTHROUGH) and o.passthrough,
            "resend": bool(granted & p.HAS_RESEND),
            "readdirplus": bool(granted & p.DO_READDIRPLUS),
            "keep_cache": self.fs.keep_cache,
        }
        self.fs.negotiated = self.negotiated
        self.fs.notify_inval_inode = self.notify_inval_inode
        self.fs.writeback = self.negotiated["writeback_cache"]
        self._readdirplus = bool(granted & p.DO_READDIRPLUS)
        if self.negotiated["passthrough"]:
            master = self.devices[0]
            self.fs.backing_open = lambda fd: ksys.backing_open(master, fd)
            self.fs.backing_close = lambda bid: ksys.backing_close(master, bid)
            self.fs.passthrough = True

    def resend(self) -> None:
        """Ask the kernel to queue again what a dead server read but never answered."""
        os.write(self.devices[0], p.OUT_HEADER.pack(16, p.NOTIFY_RESEND, 0))

    # ------------------------------------------------------------ in flight, without resend

    def track_inflight(self, path: str) -> None:
        """Record in ``path`` (a shared file mapping, one slot per worker) the
        request each worker is serving, for a successor on a connection
        without FUSE_HAS_RESEND (see :meth:`fail_inflight`). A store into
        memory per request, no system call; the mapping outlives a SIGKILL
        because it is the file's page cache. Call before start()."""
        size = INFLIGHT_SLOT.size * max(1, self.options.max_workers)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._slots = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    def fail_inflight(self, path: str, code: int = errno.EIO) -> int:
        """Answer ``code`` to every request the dead server recorded in
        ``path`` as being served (the kernel cannot send them again without
        FUSE_HAS_RESEND, and their callers would wait for an answer until the
        connection ends). A request it answered just before it died is refused by
        the kernel (ENOENT: unique numbers are never reused) and skipped.
        Returns how many the kernel took. Call before track_inflight()."""
        try:
            with open(path, "rb") as f:
                data = f.read(INFLIGHT_SLOT.size * MAX_INFLIGHT_SLOTS)
        except FileNotFoundError:
            return 0
        failed = 0
        for i in range(len(data) // INFLIGHT_SLOT.size):
            device, unique = INFLIGHT_SLOT.unpack_from(data, i * INFLIGHT_SLOT.size)
            if not unique:
                continue
            # The request waits on the descriptor it was read from; the
            # holder gives the descriptors back in the order they were put.
            order = [device - 1] if 0 < device <= len(self.devices) else []
            for index in order + [j for j in range(len(self.devices)) if j + 1 != device]:
                try:
                    os.write(self.devices[index], p.OUT_HEADER.pack(16, -code, unique))
                except OSError:
                    continue
                failed += 1
                break
        return failed

    # ------------------------------------------------------------ notifications

    def notify_inval_inode(self, nodeid: int, offset: int = 0, length: int = 0) -> None:
        """Drop the kernel's cached attributes (and data in [offset, offset+length), 0: all)."""
        body = p.NOTIFY_INVAL_INODE_OUT.pack(nodeid, offset, length)
        self._notify(p.NOTIFY_INVAL_INODE, body)

    def notify_inval_entry(self, parent: int, name: bytes) -> None:
        """Drop the kernel's cached name ``name`` in directory ``parent``."""
        body = p.NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name), 0) + name + b"\0"
        self._notify(p.NOTIFY_INVAL_ENTRY, body)

    def notify_prune(self, nodeids: list[int]) -> bool:
        """Ask the kernel to forget ``nodeids`` if nothing uses their inodes
        (FUSE_NOTIFY_PRUNE); False if the kernel does not know the
        notification (before Linux 6.16: it refuses it with EINVAL)."""
        body = p.NOTIFY_PRUNE_OUT.pack(len(nodeids), 0, 0)
        ids = array.array("Q", nodeids).tobytes()  # u64 in native order, as the kernel reads them
        try:
            os.writev(self.devices[0], [p.OUT_HEADER.pack(16 + len(body) + len(ids), p.NOTIFY_PRUNE, 0), body, ids])
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            if exc.errno != errno.ENOENT:
                raise
        return True

    def _pruner(self) -> None:
        """Keep the node table under its budget (see the module docstring)."""
        nodes = self.fs.nodes
        while not self.stopped.is_set():
            if not self._prune_wake.wait(1.0):
                continue
            self._prune_wake.clear()
            try:
                freed = self._prune_passes(nodes)
            except OSError as exc:
                log.warning("prune failed", extra={"fields": {"error": str(exc)}})
                freed = False
            if not self.prune_supported:
                log.warning("the kernel cannot prune nodes (FUSE_NOTIFY_PRUNE needs Linux 6.16): "
                            "the node budget is a hard limit", extra={"fields": {"budget": nodes.budget}})
                return
            if not freed:
                self.stopped.wait(PRUNE_BACKOFF)

    def _prune_passes(self, nodes: Any) -> bool:
        """Prune until under the low-water mark or :data:`PRUNE_ROUNDS`
        budgets of IDs were sent (the nodes the kernel keeps, in use, are
        asked about again only after every other node); False if the kernel
        forgot none of those it was asked about (all in use: back off)."""
        start = nodes.dropped
        total = 0
        while total < PRUNE_ROUNDS * nodes.budget:
            need = len(nodes) - nodes.low
            if need <= 0:
                break
            sent = 0
            while sent < need:
                ids = nodes.prune_candidates(min(PRUNE_BATCH, need - sent))
                if not ids:
                    break
                if not self.notify_prune(ids):
                    self.prune_supported = False
                    return False
                sent += len(ids)
                self.pruned += len(ids)
            total += sent
            if not sent or self.stopped.wait(PRUNE_SETTLE):
                break
        if total and nodes.dropped == start:
            self.stopped.wait(10 * PRUNE_SETTLE)  # the FORGETs may come late on a busy connection
            return nodes.dropped > start
        return True

    def _notify(self, code: int, body: bytes) -> None:
        try:
            os.writev(self.devices[0], [p.OUT_HEADER.pack(16 + len(body), code, 0), body])
        except FileNotFoundError:
            pass  # nothing cached: nothing to drop

    # ------------------------------------------------------------ serving

    def start(self) -> None:
        """Start the workers (after init() or a takeover)."""
        self.initialized.set()
        self.fs.may_block = self.spare_worker
        for _ in range(max(1, self.options.min_workers)):
            self._spawn()
        threading.Thread(target=self._watch, name="fuse-watch", daemon=True).start()
        nodes = self.fs.nodes
        if nodes.budget:
            nodes.on_pressure = self._prune_wake.set
            threading.Thread(target=self._pruner, name="fuse-prune", daemon=True).start()
            if len(nodes) > nodes.high:  # restored by a takeover
                self._prune_wake.set()

    def _spawn(self) -> None:
        with self._lock:
            if self._workers >= self.options.max_workers:
                return
            index = self._workers
            self._workers += 1
            self._idle += 1
            slot_index = self._free_slots.pop() if self._free_slots else self._next_slot
            if slot_index == self._next_slot:
                self._next_slot += 1
        device = index % len(self.devices)
        threading.Thread(target=self._worker, args=(self.devices[device], index >= self.options.min_workers,
                                                    slot_index, device),
                         name=f"fuse-{index}", daemon=True).start()

    def spare_worker(self) -> None:
        """Called before a request parks (freeze, I/O limit): make sure another
        worker waits for requests meanwhile."""
        with self._lock:
            needed = self._idle <= 0
        if needed:
            self._spawn()

    def _watch(self) -> None:
        """Start a worker when every worker has been on the same requests for a
        tick; sleep until woken while some worker waits for requests."""
        tick = self.options.spawn_after
        quiet_ticks = max(1, int(0.1 / tick)) if tick > 0 else 1
        quiet, last = 0, -1
        while not self.stopped.is_set():
            if quiet >= quiet_ticks:
                with self._lock:
                    park = self._idle > 0
                    if park:
                        self._watch_parked = True
                        self._watch_wake.clear()
                if park and not self._watch_wake.wait(1.0):
                    continue  # still nothing to watch (and a look at stopped each second)
                quiet, last = 0, -1
                continue
            time.sleep(tick)
            with self._lock:
                idle, served = self._idle, self._served
            if idle > 0:
                quiet, last = quiet + 1, -1
            elif served == last:
                self._spawn()
                quiet, last = 0, -1
            else:
                quiet, last = 0, served

    def _worker(self, fd: int, extra: bool = False, slot_index: int = 0, device: int = 0) -> None:
        """Serve requests from ``fd``; an ``extra`` worker (beyond the minimum)
        leaves after ``idle_exit`` seconds without a request. ``slot_index``
        is its own slot in the in-flight file (see track_inflight), given back
        when it leaves; ``device`` is the index of ``fd`` in ``devices``."""
        slots = self._slots
        slot = INFLIGHT_SLOT.size * slot_index
        mark = INFLIGHT_SLOT.pack_into
        buf = bytearray(self._bufsize)
        view = memoryview(buf)
        readv = os.readv
        unpack = p.IN_HEADER.unpack_from
        handlers = self._handlers
        op_index = self._op_index
        record = self.stats.record
        clock = time.perf_counter_ns
        inflight = self._inflight
        interrupted = self.fs.interrupted
        early = self._early
        lock = self._lock
        current = current_request
        reply_error = self._reply_error
        out_header = p.OUT_HEADER.pack
        writev = os.writev
        poller = None
        if extra:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
        idle_ms = int(self.options.idle_exit * 1000)
        while True:
            if poller is not None and not poller.poll(idle_ms):
                with lock:
                    if self._idle > 1:  # others wait: this one may go
                        self._idle -= 1
                        self._workers -= 1
                        self._free_slots.append(slot_index)
                        return
                continue
            try:
                n = readv(fd, [buf])
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EAGAIN):
                    continue  # the request was interrupted before we read it
                if exc.errno == errno.ENODEV:
                    self.stopped.set()
                    return
                log.error("reading /dev/fuse failed", extra={"fields": {"error": str(exc)}})
                self.stopped.set()
                return
            if n < 40:  # /dev/fuse never gives less than a header: released (close_devices)
                self.stopped.set()
                return
            with lock:
                self._idle -= 1
                self._served += 1
                wake = self._idle <= 0 and self._watch_parked
                if wake:
                    self._watch_parked = False
            if wake:
                self._watch_wake.set()
            t0 = clock()
            _, opcode, unique, nodeid, uid, gid, pid, _, _ = unpack(buf, 0)
            handler = handlers.get(opcode)
            inflight.add(unique)
            if early and unique in early:  # its INTERRUPT was read first (see _interrupt)
                interrupted.add(unique)
            if slots is not None:
                mark(slots, slot, device + 1, unique)
            current.unique = unique
            err = 0
            reply = None
            try:
                if handler is None:
                    err = errno.ENOSYS
                else:
                    reply = handler(unique, nodeid, uid, gid, pid, view[40:n])
            except OSError as exc:
                err = exc.errno or errno.EIO
            except Exception:  # noqa: BLE001 - a bug must not kill the worker
                log.exception("request failed", extra={"fields": {"opcode": opcode}})
                err = errno.EIO
            inflight.discard(unique)
            if err:
                reply_error(fd, unique, err)
            elif reply is not None:
                try:
                    if type(reply) is list:
                        writev(fd, [out_header(16 + sum(map(len, reply)), 0, unique), *reply])
                    else:
                        writev(fd, [out_header(16 + len(reply), 0, unique), reply])
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # ENOENT: the request was aborted meanwhile
                        log.error("the kernel refused a reply", extra={"fields": {
                            "opcode": opcode, "error": str(exc)}})
                        self._reply_error(fd, unique, errno.EIO)
            if slots is not None:
                mark(slots, slot, 0, 0)
            if interrupted:
                interrupted.discard(unique)
            if early:
                early.pop(unique, None)
            with lock:
                self._idle += 1
            failed = err != 0
            i = op_index.get(opcode, -1)
            if i >= 0:
                record(i, clock() - t0, failed)

    def close_devices(self) -> None:
        """Let go of the connection's descriptors at a stop. Each is replaced
        by /dev/null rather than closed, so that its number stays taken until
        the process exits: a worker between two requests then reads
        end-of-file and exits, instead of reading a number the process has
        reused for another file (the usage file it persists next) and
        answering into it. A worker blocked in a read keeps its own
        reference to the connection until the connection ends."""
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for fd in self.devices:
                os.dup2(null, fd, inheritable=False)
        finally:
            os.close(null)

    def drain(self, timeout: float) -> bool:
        """Wait until no request is being served (after the connection ended);
        False if some still are after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while self._inflight:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _reply(self, fd: int, unique: int, payload: bytes) -> None:
        os.writev(fd, [p.OUT_HEADER.pack(16 + len(payload), 0, unique), payload])

    def _reply_error(self, fd: int, unique: int, code: int) -> None:
        try:
            os.write(fd, p.OUT_HEADER.pack(16, -code, unique))
        except OSError:
            pass  # interrupted and already answered, or the connection is gone

    # ------------------------------------------------------------ replies

    def _entry(self, nodeid: int, st: os.stat_result) -> bytes:
        e, a = self._entry_valid, self._attr_valid
        at, mt, ct = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return _ENTRY_OUT(nodeid, 0, e[0], a[0], e[1], a[1],
                          st.st_ino, st.st_size, st.st_blocks, at // _NS, mt // _NS, ct // _NS,
                          at % _NS, mt % _NS, ct % _NS, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                          st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)

    def _attr(self, st: os.stat_result) -> bytes:
        a = self._attr_valid
        at, mt, ct = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return _ATTR_OUT(a[0], a[1], 0,
                         st.st_ino, st.st_size, st.st_blocks, at // _NS, mt // _NS, ct // _NS,
                         at % _NS, mt % _NS, ct % _NS, st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                         st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0)

    @staticmethod
    def _name(body: memoryview, start: int = 0) -> bytes:
        raw = bytes(body[start:])
        return raw[: raw.index(b"\0")] if b"\0" in raw else raw

    @staticmethod
    def _two_names(body: memoryview, start: int) -> tuple[bytes, bytes]:
        raw = bytes(body[start:])
        first, _, rest = raw.partition(b"\0")
        return first, rest.partition(b"\0")[0]

    # ------------------------------------------------------------ handlers
    # Each takes (unique, nodeid, uid, gid, pid, body) and returns the reply
    # payload (bytes or a list of buffers), or None for no reply.

    def _lookup(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        name = self._name(body)
        try:
            node, st = self.fs.lookup(nodeid, name)
        except FileNotFoundError:
            if not self._negative_valid[0] and not self._negative_valid[1]:
                raise
            n = self._negative_valid
            return p.ENTRY_PREFIX.pack(0, 0, n[0], 0, n[1], 0) + bytes(p.ATTR.size)
        return self._entry(node.nodeid, st)

    def _forget(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.fs.forget(nodeid, p.FORGET_IN.unpack_from(body, 0)[0])
        return None

    def _batch_forget(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        count = p.BATCH_FORGET_IN.unpack_from(body, 0)[0]
        forget = self.fs.forget
        for i in range(count):
            nid, nlookup = p.FORGET_ONE.unpack_from(body, 8 + 16 * i)
            forget(nid, nlookup)
        return None

    def _getattr(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        return self._attr(self.fs.getattr(nodeid))

    def _setattr(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        (valid, _, fh, size, _, atime, mtime, _, atimens, mtimens, _, mode, _, a_uid, a_gid, _) = \
            p.SETATTR_IN.unpack_from(body, 0)
        st = self.fs.setattr(nodeid, valid, fh, size, (atime, atimens), (mtime, mtimens), mode, a_uid, a_gid,
                             unique)
        return self._attr(st)

    def _readlink(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        return self.fs.readlink(nodeid)

    def _symlink(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        name, target = self._two_names(body, 0)
        node, st = self.fs.symlink(Caller(uid, gid, pid), nodeid, name, target, unique)
        return self._entry(node.nodeid, st)

    def _mknod(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        mode, rdev, _, _ = p.MKNOD_IN.unpack_from(body, 0)
        node, st = self.fs.mknod(Caller(uid, gid, pid), nodeid, self._name(body, p.MKNOD_IN.size), mode, rdev,
                                 unique)
        return self._entry(node.nodeid, st)

    def _mkdir(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        mode, _ = p.MKDIR_IN.unpack_from(body, 0)
        node, st = self.fs.mkdir(Caller(uid, gid, pid), nodeid, self._name(body, p.MKDIR_IN.size), mode, unique)
        return self._entry(node.nodeid, st)

    def _unlink(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.fs.unlink(nodeid, self._name(body), unique)
        return b""

    def _rmdir(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.fs.rmdir(nodeid, self._name(body), unique)
        return b""

    def _rename(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        newdir = p.RENAME_IN.unpack_from(body, 0)[0]
        old, new = self._two_names(body, p.RENAME_IN.size)
        self.fs.rename(nodeid, old, newdir, new, 0, unique)
        return b""

    def _rename2(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        newdir, flags, _ = p.RENAME2_IN.unpack_from(body, 0)
        old, new = self._two_names(body, p.RENAME2_IN.size)
        self.fs.rename(nodeid, old, newdir, new, flags, unique)
        return b""

    def _link(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        old = p.LINK_IN.unpack_from(body, 0)[0]
        node, st = self.fs.link(old, nodeid, self._name(body, p.LINK_IN.size), unique)
        return self._entry(node.nodeid, st)

    def _open(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        flags, open_in_flags = p.OPEN_IN.unpack_from(body, 0)
        fh, open_flags, backing_id = self.fs.open(nodeid, flags, unique,
                                                  bool(open_in_flags & p.OPEN_KILL_SUIDGID))
        return p.OPEN_OUT.pack(fh, open_flags, backing_id)

    def _create(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        flags, mode, _, _ = p.CREATE_IN.unpack_from(body, 0)
        node, st, fh, open_flags = self.fs.create(Caller(uid, gid, pid), nodeid,
                                                  self._name(body, p.CREATE_IN.size), mode, flags, unique)
        return self._entry(node.nodeid, st) + p.OPEN_OUT.pack(fh, open_flags, 0)

    def _read(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, offset, size, _, _, flags, _ = p.READ_IN.unpack_from(body, 0)
        return self.fs.read(fh, nodeid, offset, size, flags)

    def _write(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, offset, size, write_flags, _, flags, _ = p.WRITE_IN.unpack_from(body, 0)
        n = self.fs.write(fh, nodeid, offset, body[40:40 + size], write_flags, flags, unique)
        return p.WRITE_OUT.pack(n, 0)

    def _statfs(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        return p.STATFS_OUT.pack(*self.fs.statfs(), 0)

    def _release(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.fs.release(p.RELEASE_IN.unpack_from(body, 0)[0], nodeid)
        return b""

    def _flush(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        return b""

    def _fsync(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, fsync_flags, _ = p.FSYNC_IN.unpack_from(body, 0)
        self.fs.fsync(fh, nodeid, bool(fsync_flags & p.FSYNC_FDATASYNC))
        return b""

    def _setxattr(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        size, flags = p.SETXATTR_IN.unpack_from(body, 0)
        raw = bytes(body[p.SETXATTR_IN.size:])
        name, _, rest = raw.partition(b"\0")
        self.fs.setxattr(nodeid, name, rest[:size], flags, unique)
        return b""

    def _getxattr(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        size, _ = p.GETXATTR_IN.unpack_from(body, 0)
        return self._sized(self.fs.getxattr(nodeid, self._name(body, p.GETXATTR_IN.size)), size)

    def _listxattr(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        size, _ = p.GETXATTR_IN.unpack_from(body, 0)
        return self._sized(self.fs.listxattr(nodeid), size)

    @staticmethod
    def _sized(data: bytes, size: int) -> bytes:
        if not size:
            return p.GETXATTR_OUT.pack(len(data), 0)
        if len(data) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return data

    def _removexattr(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.fs.removexattr(nodeid, self._name(body), unique)
        return b""

    def _opendir(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        return p.OPEN_OUT.pack(self.fs.opendir(nodeid), 0, 0)

    def _readdir(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(body, 0)
        out: list[bytes] = []
        used = 0
        for off, name, ino, kind in self.fs.dir_entries(fh, nodeid, offset):
            rec = p.dirent_size(len(name))
            if used + rec > size:
                break
            out.append(p.DIRENT.pack(ino, off, len(name), kind) + name + bytes(rec - p.DIRENT.size - len(name)))
            used += rec
        return b"".join(out)

    def _readdirplus(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(body, 0)
        out: list[bytes] = []
        used = 0
        fs = self.fs
        lookup = fs.lookup_listed
        (ev, ens), (av, ans) = self._entry_valid, self._attr_valid
        for off, name, ino, kind in fs.dir_entries(fh, nodeid, offset):
            namelen = len(name)
            rec = _DIRENTPLUS_SIZE + ((namelen + 7) & ~7)
            if used + rec > size:
                break
            if name == b"." or name == b"..":
                out.append(_EMPTY_ENTRY + _DIRENT(ino, off, namelen, kind))
            else:
                try:
                    node, st = lookup(nodeid, name, ino)
                except OSError as exc:
                    if exc.errno != errno.ENFILE:
                        continue  # gone since the listing was read
                    # No room for a node (see NodeTable.set_budget): the
                    # name without one; the kernel looks it up when used.
                    out.append(_EMPTY_ENTRY + _DIRENT(ino, off, namelen, kind))
                    out.append(name)
                    out.append(_PADS[-namelen & 7])
                    used += rec
                    continue
                at, mt, ct = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
                out.append(_DIRENTPLUS(node.nodeid, 0, ev, av, ens, ans,
                                       st.st_ino, st.st_size, st.st_blocks, at // _NS, mt // _NS, ct // _NS,
                                       at % _NS, mt % _NS, ct % _NS, st.st_mode, st.st_nlink, st.st_uid,
                                       st.st_gid, st.st_rdev & 0xFFFFFFFF, st.st_blksize, 0,
                                       st.st_ino, off, namelen, kind))
            out.append(name)
            out.append(_PADS[-namelen & 7])
            used += rec
        return b"".join(out)

    def _releasedir(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.fs.releasedir(p.RELEASE_IN.unpack_from(body, 0)[0])
        return b""

    def _fsyncdir(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, _, _ = p.FSYNC_IN.unpack_from(body, 0)
        self.fs.fsyncdir(fh, nodeid)
        return b""

    def _access(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.fs.access(nodeid, p.ACCESS_IN.unpack_from(body, 0)[0])
        return b""

    def _interrupt(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        target = p.INTERRUPT_IN.unpack_from(body, 0)[0]
        inflight = self._inflight
        if target in inflight:
            self.fs.interrupted.add(target)
            return None
        # The kernel sends INTERRUPT only for a request a worker has read, but
        # that worker may not have registered it yet: remember the target, then
        # look again, so that this worker or that one sees the other's mark.
        # (A target answered meanwhile is never registered again; the oldest
        # such entries are dropped beyond MAX_EARLY_INTERRUPTS.)
        early = self._early
        early[target] = None
        if target in inflight:
            self.fs.interrupted.add(target)
        while len(early) > MAX_EARLY_INTERRUPTS:
            try:
                early.pop(next(iter(early)), None)
            except (StopIteration, RuntimeError):
                break
        return None

    def _fallocate(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(body, 0)
        self.fs.fallocate(fh, nodeid, mode, offset, length, unique)
        return b""

    def _lseek(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        fh, offset, whence, _ = p.LSEEK_IN.unpack_from(body, 0)
        return p.LSEEK_OUT.pack(self.fs.lseek(fh, nodeid, offset, whence))

    def _destroy(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: memoryview) -> Any:
        self.stopped.set()
        return b""
