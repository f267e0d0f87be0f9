"""The volume's filesystem, by inode, for the kernel engine.

The same semantics as :mod:`fusefs.operations` (the libfuse engine's
filesystem), on node IDs instead of paths: read-only (EROFS), the freeze
gate, the quota (ENOSPC) and the I/O limits, each one attribute test when it
has nothing to do. Those four live in the engine-neutral modules; this
module only calls their public methods:

- :mod:`fusefs.charging`: what each operation charges, around its system
  call (the block model of :mod:`fusefs.quota`, names settled on the
  directories' real growth, xattrs capped per inode, orphans uncharged on
  their last close), the open-file cap (EMFILE), the rename flags a volume
  supports (EINVAL for others), and ``df``'s figures; the same functions
  the libfuse engine calls;
- :class:`fusefs.quota.Quota`: ``extend`` (the write path) and
  :class:`fusefs.quota.InodeState`; while the usage is unknown (a mount
  after a crash, until the background scan is done) the quota refuses all
  growth, for both engines alike;
- :class:`fusefs.freeze.FreezeGate`: ``enter``, ``enter_write``, ``leave``,
  ``frozen``;
- :class:`fusefs.limits.IOLimits`: ``active``, ``throttle``;
- :class:`fusefs.opstats.OpStats`: ``shard`` (byte counters).

Each node keeps an ``O_PATH`` descriptor (see :mod:`fusefs.kernel.nodes`),
so every call is relative to a descriptor, never to a path string: names
cannot be redirected by a pod, renames on the host do not matter, and an
open file that was unlinked keeps working (no hidden files, unlike the
libfuse engine). Files are opened through ``/proc/self/fd/N`` of the node.

Methods raise OSError; the engine turns it into the reply's errno.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from fusefs import charging
from fusefs.charging import MAX_OPEN_FILES, RENAME_EXCHANGE, STATFS_BLOCK, OpenFiles
from fusefs.freeze import FreezeGate
from fusefs.kernel import protocol as p
from fusefs.kernel import orphans as orphan_dir
from fusefs.kernel import syscalls as ksys
from fusefs.kernel.nodes import Node, NodeTable
from fusefs.limits import IOLimits
from fusefs.opstats import OpStats
from fusefs.quota import BLOCK, InodeState, Quota, blocks
from fusefs.usage import xattr_total

log = logging.getLogger("fusefs.kernel.inodefs")

_STRIP_OPEN = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND | os.O_DIRECT | os.O_NOCTTY
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_CAPABILITY = b"security.capability"
_ACL_PREFIX = b"system.posix_acl_"
_ACL_NAME_PREFIX = "system.posix_acl_"
#: How often a request parked by a freeze looks whether it was interrupted.
INTERRUPT_POLL = 0.05
_monotonic = time.monotonic
#: Set in the file handle of a passthrough open, so that its RELEASE is
#: recognised even when it comes to a successor after a handover.
PASSTHROUGH_FH = 1 << 62
#: Every open asks the kernel not to send FLUSH on close(2): there is nothing
#: to do for it (writes are never buffered here), it saves a round trip per
#: close, and a process that closes a descriptor of the mount while no server
#: runs (a successor being started, say) does not wait for one. (With the
#: kernel's write-back cache the kernel still writes dirty pages back on close.)
_NOFLUSH = p.FOPEN_NOFLUSH
_PRIV_BITS = stat.S_ISUID | stat.S_ISGID


@dataclass
class Caller:
    """Who sent a request (from the request header)."""

    uid: int
    gid: int
    pid: int


class _WritePage:
    """What FreezeGate.enter_write looks at: was this write page write-back?"""

    __slots__ = ("writepage",)

    def __init__(self, writepage: bool) -> None:
        self.writepage = writepage


#: The request the calling worker thread is serving (``unique``), set by the
#: engine: what :meth:`InodeFs.request_interrupted` looks up.
current_request = threading.local()

_NOT_WRITEPAGE = _WritePage(False)
_WRITEPAGE = _WritePage(True)


class Handle:
    """An open file or directory: its real descriptor and node."""

    __slots__ = ("fh", "fd", "node", "state", "writable", "last_end", "last_time", "passthrough",
                 "entries", "scan", "is_dir")

    def __init__(self, fh: int, fd: int, node: Node, writable: bool) -> None:
        self.fh = fh
        self.fd = fd
        self.node = node
        self.state: InodeState | None = None
        self.writable = writable
        self.last_end = -1
        self.last_time = 0.0
        self.passthrough = False
        self.entries: list[tuple[bytes, int, int]] | None = None
        self.scan: Iterator[os.DirEntry[bytes]] | None = None
        self.is_dir = False


class Interrupted(Exception):
    """The kernel interrupted the request (the caller got a signal)."""


class InodeFs:
    """Passthrough by inode, with quota, freeze, read-only and I/O limits."""

    def __init__(self, source: str, *, quota: Quota, gate: FreezeGate | None = None,
                 limits: IOLimits | None = None, stats: OpStats | None = None, read_only: bool = False,
                 xattrs_seen: bool = True, capability_seen: bool = True, keep_cache: bool = True,
                 journal: str | None = None, handle_epoch: int = 0,
                 max_open_files: int = MAX_OPEN_FILES, orphan_fd: int = -1) -> None:
        self.source = os.path.realpath(source)
        self.root_fd = os.open(self.source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        root_path = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.nodes = NodeTable(root_path, journal)
        #: Where open files that lose their last name are kept (-1: nowhere,
        #: they are unlinked; see :mod:`fusefs.kernel.orphans`).
        self.nodes.orphan_fd = orphan_fd
        self.nodes.orphan_freed = self._orphan_freed
        self.quota = quota
        self.gate = gate or FreezeGate()
        self.limits = limits or IOLimits()
        self.stats = stats or OpStats()
        self.read_only = read_only
        self.keep_cache = keep_cache
        #: Whether any xattr (and any ``security.capability``) may exist on
        #: the volume (see :class:`fusefs.operations.FusefsOperations`): set
        #: by setxattr and the usage scan. Without one, listxattr and the
        #: ``security.capability`` lookups are answered without a system call.
        self.xattrs_seen = xattrs_seen
        self.capability_seen = capability_seen
        #: Open files and directories, against the volume's cap.
        self.open_files = OpenFiles(max_open_files)
        self._handles: dict[int, Handle] = {}
        self._table = threading.Lock()
        #: Orders the choice between cached and passthrough opens of an inode
        #: (node.cached, node.backing), which the kernel requires never to mix.
        self._iomode = threading.Lock()
        #: File handles are (epoch << 32 | counter): a successor after a
        #: handover uses a new epoch, so a handle the kernel still holds from
        #: the old process can never name one of the new process's files.
        self._epoch = handle_epoch
        self._next_fh = 1
        #: Set by the engine: passthrough is negotiated and allowed.
        self.passthrough = False
        #: Set by the engine: registers a backing file, returns its id.
        self.backing_open: Any = None
        self.backing_close: Any = None
        #: Set by the engine: the kernel's write-back cache is on.
        self.writeback = False
        #: Set by the engine: FUSE_NOTIFY_INVAL_INODE(nodeid, offset, length).
        self.notify_inval_inode: Any = lambda nodeid, offset, length: None
        self.negotiated: dict[str, Any] = {}
        #: Requests the kernel interrupted (unique numbers), set by the engine.
        self.interrupted: set[int] = set()
        #: Set once the connection is initialised (or taken over) and served.
        self.initialized = threading.Event()
        #: Set by the engine: called before a request may park (a freeze, an
        #: I/O limit), so that another worker serves requests meanwhile.
        self.may_block: Any = lambda: None

    # ------------------------------------------------------------ helpers

    def _new_fh(self) -> int:
        with self._table:
            fh = (self._epoch << 32) | self._next_fh
            self._next_fh += 1
        return fh

    def _begin_mutation(self, unique: int = 0) -> Any:
        """EROFS, or wait out a freeze (interruptibly); returns the gate flag."""
        if self.read_only:
            raise OSError(errno.EROFS, "read-only volume")
        self._wait_thaw(unique)
        return self.gate.enter()

    def _wait_thaw(self, unique: int) -> None:
        """While frozen, wait here where an INTERRUPT can end the wait (EINTR),
        so a pod's process parked by a freeze stays killable."""
        if self.gate.frozen:
            self.may_block()
        while self.gate.frozen:
            if unique and unique in self.interrupted:
                raise OSError(errno.EINTR, "interrupted while the volume is frozen")
            time.sleep(INTERRUPT_POLL)

    def request_interrupted(self) -> bool:
        """Whether the kernel sent INTERRUPT for the calling worker's request
        (the I/O limits' check: a throttled request of a killed process
        ends at once with EINTR)."""
        unique = getattr(current_request, "unique", 0)
        return bool(unique) and unique in self.interrupted

    def _proc(self, node: Node) -> str:
        return f"/proc/self/fd/{node.fd}"

    def _give_to_caller(self, caller: Caller, parent: Node, fd: int, st: os.stat_result, is_path: bool) -> None:
        """A new inode belongs to the caller, keeping a set-group-ID parent's group."""
        uid, gid = caller.uid, caller.gid
        if uid == 0 and gid == 0:
            return
        if st.st_gid != 0 or os.stat(parent.fd).st_mode & stat.S_ISGID:
            gid = -1
        if uid == 0 and gid == -1:
            return
        if is_path:
            ksys.fchown_empty(fd, uid, gid)
        else:
            os.fchown(fd, uid, gid)

    def _lookup_fd(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        fd = os.open(name, _PATH_FLAGS, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self.nodes.remember(fd, st), st

    # ------------------------------------------------------------ names

    def lookup(self, parent_id: int, name: bytes) -> tuple[Node, os.stat_result]:
        return self._lookup_fd(self.nodes.get(parent_id), name)

    def lookup_listed(self, parent_id: int, name: bytes, ino: int) -> tuple[Node, os.stat_result]:
        """lookup() of a name a directory listing just showed as inode ``ino``
        (READDIRPLUS). When the kernel already knows that inode (a listing
        read again, ``ls -l`` of a directory it saw), one ``stat`` by name
        replaces open + fstat + close: the node is pinned first (see
        :meth:`NodeTable.pin`), so a name that still shows its number on its
        device is that very inode."""
        parent = self.nodes.get(parent_id)
        node = self.nodes.pin((parent.key[0], ino))
        if node is None:
            return self._lookup_fd(parent, name)
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except BaseException:
            self.nodes.forget(node.nodeid, 1)
            raise
        if st.st_ino != ino or st.st_dev != node.key[0]:  # replaced since the listing, or a mount point
            self.nodes.forget(node.nodeid, 1)
            return self._lookup_fd(parent, name)
        node.mode = st.st_mode
        return node, st

    def forget(self, nodeid: int, count: int) -> None:
        self.nodes.forget(nodeid, count)

    def getattr(self, nodeid: int) -> os.stat_result:
        node = self.nodes.get(nodeid)
        st = os.stat(node.fd)
        return st if node.orphan is None else _Unlinked(st)  # type: ignore[return-value]

    def readlink(self, nodeid: int) -> bytes:
        return os.readlink(b"", dir_fd=self.nodes.get(nodeid).fd)

    def mknod(self, caller: Caller, parent_id: int, name: bytes, mode: int, rdev: int,
              unique: int = 0) -> tuple[Node, os.stat_result]:
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EPERM, "no device nodes in a volume")
        return self._new_inode(caller, parent_id, name, unique, 0,
                               lambda d: os.mknod(name, mode, 0, dir_fd=d))

    def mkdir(self, caller: Caller, parent_id: int, name: bytes, mode: int,
              unique: int = 0) -> tuple[Node, os.stat_result]:
        return self._new_inode(caller, parent_id, name, unique, BLOCK,
                               lambda d: os.mkdir(name, mode & 0o7777, dir_fd=d))

    def symlink(self, caller: Caller, parent_id: int, name: bytes, target: bytes,
                unique: int = 0) -> tuple[Node, os.stat_result]:
        return self._new_inode(caller, parent_id, name, unique, blocks(len(target)),
                               lambda d: os.symlink(target, name, dir_fd=d))

    def _new_inode(self, caller: Caller, parent_id: int, name: bytes, unique: int, own: int,
                   make: Any) -> tuple[Node, os.stat_result]:
        """mknod, mkdir and symlink alike: charge an inode, ``own`` bytes and a
        block for the parent's growth; make it; settle; give it to the caller."""
        parent = self.nodes.get(parent_id)
        self.nodes.check_room()
        w = self._begin_mutation(unique)
        try:
            try:
                charging.name_op(self.quota, _sizes(parent), lambda: make(parent.fd), own=own, inode=True)
            except FileExistsError:
                if unique & p.UNIQUE_RESEND:
                    return self._lookup_fd(parent, name)  # we made it before the crash
                raise
            node, st = self._lookup_fd(parent, name)
            self._give_to_caller(caller, parent, node.fd, st, True)
            if caller.uid or caller.gid:
                st = os.stat(node.fd)
            return node, st
        finally:
            self.gate.leave(w)

    def link(self, old_id: int, parent_id: int, name: bytes, unique: int = 0) -> tuple[Node, os.stat_result]:
        """A new name (charged through its directory's growth), no new inode."""
        node = self.nodes.get(old_id)
        if node.orphan is not None:
            raise OSError(errno.ENOENT, "no link left")  # as linkat(2) of an unlinked file
        parent = self.nodes.get(parent_id)
        w = self._begin_mutation(unique)
        try:
            try:
                charging.name_op(self.quota, _sizes(parent), lambda: os.link(
                    self._proc(node), name, dst_dir_fd=parent.fd, follow_symlinks=True), moves=True)
            except FileExistsError:
                if not unique & p.UNIQUE_RESEND:
                    raise
            return self._lookup_fd(parent, name)
        finally:
            self.gate.leave(w)

    def unlink(self, parent_id: int, name: bytes, unique: int = 0) -> None:
        self._remove(parent_id, name, unique, lambda d: os.unlink(name, dir_fd=d), may_orphan=True)

    def rmdir(self, parent_id: int, name: bytes, unique: int = 0) -> None:
        self._remove(parent_id, name, unique, lambda d: os.rmdir(name, dir_fd=d))

    def _remove(self, parent_id: int, name: bytes, unique: int, remove: Any, may_orphan: bool = False) -> None:
        """unlink and rmdir alike: settle the parent's size, uncharge the inode
        if that was its last name (on its last close if it is open). The last
        name of an open file is kept in the orphan directory (see
        :meth:`_keep_alive`), charged until the kernel forgets it."""
        parent = self.nodes.get(parent_id)
        w = self._begin_mutation(unique)
        try:
            keep: Node | None = None
            try:
                st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
                extra = self._xattr_extra(parent, name, st)
                keep = self._orphan(self._keep_alive(st), extra) if may_orphan else None
                charging.name_op(self.quota, _sizes(parent), lambda: remove(parent.fd), growth=0)
            except BaseException as exc:
                if keep is not None:
                    self._unorphan(keep)
                if isinstance(exc, FileNotFoundError) and unique & p.UNIQUE_RESEND:
                    return  # done before the crash
                raise
            if keep is None or not self._settle_orphan(keep):
                self._link_removed(st, extra)
        finally:
            self.gate.leave(w)

    # ------------------------------------------------------------ orphans

    def _keep_alive(self, st: os.stat_result) -> Node | None:
        """The node of a regular file whose last name is going while it may be
        open (open handles, or a node restored after a handover, whose opens
        from before it this process has not all seen): with an orphan
        directory, it is kept there, so that a SIGKILL of this process does
        not free the inode under the pod's descriptor."""
        if self.nodes.orphan_fd < 0 or st.st_nlink != 1 or not stat.S_ISREG(st.st_mode):
            return None
        node = self.nodes.by_key((st.st_dev, st.st_ino))
        if node is None or node.orphan is not None or (node.state is None and not node.restored):
            return None
        return node

    def _orphan(self, node: Node | None, extra: int) -> Node | None:
        """Before a name of ``node`` goes: hard-link its inode into the orphan
        directory, by its descriptor (never by a name, which a pod could
        swap meanwhile), journalled first. Returns the node, or None if
        there is nothing to keep or it could not be linked (then the name
        goes as without an orphan directory)."""
        if node is None:
            return None
        oname = orphan_dir.name_for(node.nodeid)
        # Set before the journal line, so that a compaction of the journal
        # on that very line keeps it.
        node.orphan, node.orphan_extra = oname, extra
        self.nodes.journal_orphan(node, oname, extra)
        try:
            os.link(self._proc(node), oname, dst_dir_fd=self.nodes.orphan_fd, follow_symlinks=True)
        except OSError as exc:
            node.orphan = None
            self.nodes.journal_orphan(node, None)
            log.warning("cannot keep an open file in the orphan directory", extra={"fields": {
                "nodeid": node.nodeid, "error": str(exc)}})
            return None
        return node

    def _settle_orphan(self, node: Node) -> bool:
        """After the name went: the orphan is kept if it is now its inode's
        only link (else the inode has a name still, as after a race with
        a pod's link(2), and its orphan link goes again)."""
        try:
            links = os.fstat(node.fd).st_nlink
        except OSError:
            links = 0
        if links == 1:
            return True
        self._unorphan(node)
        return False

    def _orphan_freed(self, size: int, extra: int) -> None:
        """An orphan was unlinked from the orphan directory: its inode is
        free now; return what it was charged (see charging.name_removed)."""
        charging.orphan_freed(self.quota, size, extra)

    def orphan_charges(self) -> tuple[int, int]:
        """Bytes and inodes charged for orphans kept in the orphan directory
        (the usage scan cannot see them)."""
        total = count = 0
        for node in self.nodes.orphans():
            state = node.state
            try:
                size = state.size if state is not None else os.fstat(node.fd).st_size
            except OSError:
                continue
            total += blocks(size) + node.orphan_extra
            count += 1
        return total, count

    def rename(self, parent_id: int, name: bytes, newparent_id: int, newname: bytes, flags: int,
               unique: int = 0) -> None:
        """rename(2)/renameat2(2), with RENAME_NOREPLACE and RENAME_EXCHANGE
        only (EINVAL for others). A rename to a new name charges a block
        first for the target directory's growth (ENOSPC on a full volume, as
        a create); a rename over an existing name reuses its entry, so an
        atomic replacement works on a full volume."""
        charging.check_rename_flags(flags)
        parent = self.nodes.get(parent_id)
        newparent = self.nodes.get(newparent_id)
        w = self._begin_mutation(unique)
        try:
            try:
                other: os.stat_result | None = os.stat(newname, dir_fd=newparent.fd, follow_symlinks=False)
            except FileNotFoundError:
                other = None

            def do() -> tuple[os.stat_result | None, int]:
                replaced, extra = (None if flags & RENAME_EXCHANGE else other), 0
                if replaced is not None:
                    moved = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
                    if (moved.st_ino, moved.st_dev) == (replaced.st_ino, replaced.st_dev):
                        replaced = None  # two names of one inode: a no-op
                    else:
                        extra = self._xattr_extra(newparent, newname, replaced)
                keep = None
                if replaced is not None and not flags & charging.RENAME_NOREPLACE:
                    keep = self._orphan(self._keep_alive(replaced), extra)
                try:
                    if flags:
                        ksys.renameat2(parent.fd, name, newparent.fd, newname, flags)
                    else:
                        os.rename(name, newname, src_dir_fd=parent.fd, dst_dir_fd=newparent.fd)
                except BaseException:
                    if keep is not None:
                        self._unorphan(keep)
                    raise
                if keep is not None and self._settle_orphan(keep):
                    replaced = None  # kept: charged until the kernel forgets it
                return replaced, extra
            try:
                replaced, extra = charging.name_op(self.quota, _sizes(parent, newparent), do,
                                                   growth=BLOCK if other is None else 0, moves=True)
            except FileNotFoundError:
                if unique & p.UNIQUE_RESEND:
                    return  # renamed before the crash
                raise
            if replaced is not None:
                self._link_removed(replaced, extra)
        finally:
            self.gate.leave(w)

    def _unorphan(self, node: Node) -> None:
        """The name of an open file did not go after all (or the inode keeps
        another): its orphan link goes again."""
        try:
            os.unlink(node.orphan, dir_fd=self.nodes.orphan_fd)  # type: ignore[arg-type]
        except OSError:
            pass
        node.orphan = None
        self.nodes.journal_orphan(node, None)

    def _xattr_extra(self, parent: Node, name: bytes, st: os.stat_result) -> int:
        """The xattr charge of ``name``'s inode if this name is its last."""
        if not self.xattrs_seen:
            return 0
        return charging.xattr_charge(st, lambda: xattr_total(f"/proc/self/fd/{parent.fd}/{os.fsdecode(name)}"))

    def _link_removed(self, st: os.stat_result, extra: int = 0) -> None:
        """Account for a name that is gone (unlink, rmdir, rename over)."""
        node = self.nodes.by_key((st.st_dev, st.st_ino))
        with self._table:
            charging.name_removed(self.quota, st, extra, node.state if node is not None else None)

    # ------------------------------------------------------------ attributes

    def setattr(self, nodeid: int, valid: int, fh: int, size: int, atime: tuple[int, int],
                mtime: tuple[int, int], mode: int, uid: int, gid: int, unique: int = 0) -> os.stat_result:
        node = self.nodes.get(nodeid)
        handle = self._handles.get(fh) if valid & p.FATTR_FH else None
        if valid & (p.FATTR_MODE | p.FATTR_UID | p.FATTR_GID | p.FATTR_SIZE):
            w = self._begin_mutation(unique)
        else:
            if self.read_only:
                raise OSError(errno.EROFS, "read-only volume")
            # Timestamps with a handle may be the kernel's write-back (see operations.utimens).
            self._wait_thaw(unique) if handle is None else None
            w = self.gate.enter(write_back=handle is not None)
        try:
            if valid & p.FATTR_MODE:
                os.chmod(self._proc(node), mode & 0o7777)
            if valid & (p.FATTR_UID | p.FATTR_GID):
                ksys.fchown_empty(node.fd, uid if valid & p.FATTR_UID else -1, gid if valid & p.FATTR_GID else -1)
            if valid & p.FATTR_SIZE:
                self._truncate(node, handle, size)
                if valid & p.FATTR_KILL_SUIDGID and not valid & p.FATTR_MODE:
                    self._kill_privs(node, None)
            if valid & (p.FATTR_ATIME | p.FATTR_MTIME | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW):
                a = (0, ksys.UTIME_NOW) if valid & p.FATTR_ATIME_NOW else (
                    atime if valid & p.FATTR_ATIME else (0, ksys.UTIME_OMIT))
                m = (0, ksys.UTIME_NOW) if valid & p.FATTR_MTIME_NOW else (
                    mtime if valid & p.FATTR_MTIME else (0, ksys.UTIME_OMIT))
                ksys.utimens_empty(node.fd, a, m)
            st = os.stat(node.fd)
            node.mode = st.st_mode
            return st if node.orphan is None else _Unlinked(st)  # type: ignore[return-value]
        finally:
            self.gate.leave(w)

    def _truncate(self, node: Node, handle: Handle | None, length: int) -> None:
        if handle is not None and handle.writable:
            self._truncate_fd(handle.fd, handle.state, length)  # type: ignore[arg-type]
            return
        if not stat.S_ISREG(node.mode):
            raise OSError(errno.EINVAL if not stat.S_ISDIR(node.mode) else errno.EISDIR, "not a regular file")
        fd = self.open_files.open(self._proc(node), os.O_WRONLY | os.O_CLOEXEC)
        try:
            state = self._register(fd, node, True)
            try:
                self._truncate_fd(fd, state, length)
            finally:
                self._unregister_state(node, fd)
        finally:
            os.close(fd)
            self.open_files.give()

    def _truncate_fd(self, fd: int, state: InodeState, length: int) -> None:
        charging.truncate_fd(self.quota, fd, state, length)

    def statfs(self) -> tuple[int, ...]:
        """(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize);
        while the usage is being recounted the volume shows as full."""
        return (*charging.statfs_counts(self.quota, self.root_fd), STATFS_BLOCK, 255, STATFS_BLOCK)

    # ------------------------------------------------------------ open files

    def _register(self, fd: int, node: Node, writable: bool, st: os.stat_result | None = None) -> InodeState:
        """Count one more open on ``node``; returns its size tracker."""
        with self._table:
            state = node.state
            if state is None:
                if st is None:
                    st = os.fstat(fd)
                state = InodeState(st.st_ino, st.st_size)
                node.state = state
            state.opens += 1
            state.writable = state.writable or writable
        return state

    def _unregister_state(self, node: Node, fd: int) -> None:
        """One open fewer on ``node``: uncharge an orphan, re-check the size."""
        with self._table:
            state = node.state
            if state is None:
                return
            state.opens -= 1
            if state.opens > 0:
                return
            node.state = None
        charging.last_close(self.quota, state, fd)

    def open(self, nodeid: int, flags: int, unique: int = 0, kill_privs: bool = False) -> tuple[int, int, int]:
        """Returns (fh, open_flags, backing_id). ``kill_privs``: the kernel asks
        us to clear set-user/group-ID (FUSE_OPEN_KILL_SUIDGID, with O_TRUNC)."""
        node = self.nodes.get(nodeid)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and self.read_only:
            raise OSError(errno.EROFS, "read-only volume")
        truncate = bool(writable and flags & os.O_TRUNC)
        if truncate and unique & p.UNIQUE_RESEND:
            truncate = False  # truncated before the crash; again would drop data written since
        w = self._begin_mutation(unique) if truncate else None
        reserved = False
        try:
            if writable:
                # The kernel cannot mix cached and passthrough opens of one
                # inode (the open would fail with EIO): a writer reserves its
                # cached open before a concurrent reader can choose passthrough.
                with self._iomode:
                    if node.backing is not None:
                        raise OSError(errno.ETXTBSY, "open read-only through passthrough; cannot write now")
                    node.cached += 1
                reserved = True
            fd = self.open_files.open(self._proc(node), self._real_flags(flags))
            try:
                state = self._register(fd, node, writable)
                if truncate:
                    self._truncate_fd(fd, state, 0)
                    if kill_privs:
                        self._kill_privs(node, fd)
            except BaseException:
                self._unregister_state(node, fd)
                os.close(fd)
                self.open_files.give()
                raise
        except BaseException:
            if reserved:
                with self._iomode:
                    node.cached -= 1
            raise
        finally:
            if w is not None:
                self.gate.leave(w)
        handle = Handle(self._new_fh(), fd, node, writable)
        handle.state = state
        open_flags, backing_id = _NOFLUSH, 0
        if not writable:
            with self._iomode:
                # A node restored after a handover without a backing file may
                # have cached opens in the kernel that we have not seen yet.
                if (self.passthrough and not self.limits.active and stat.S_ISREG(node.mode)
                        and node.cached == 0 and not (node.restored and node.backing is None)):
                    backing_id = self._backing_for(node, fd, handle.fh | PASSTHROUGH_FH)
                if backing_id:
                    handle.passthrough = True
                    handle.fh |= PASSTHROUGH_FH
                    open_flags |= p.FOPEN_PASSTHROUGH
                else:
                    node.cached += 1
        if not handle.passthrough and self.keep_cache:
            open_flags |= p.FOPEN_KEEP_CACHE
        with self._table:
            self._handles[handle.fh] = handle
        return handle.fh, open_flags, backing_id

    def _real_flags(self, flags: int) -> int:
        """Open flags for the backing file. With the write-back cache the
        kernel reads pages of files opened write-only (partial page writes),
        so those are opened read-write."""
        flags = (flags & ~_STRIP_OPEN) | os.O_CLOEXEC
        if self.writeback and flags & os.O_ACCMODE == os.O_WRONLY:
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        return flags

    def _backing_for(self, node: Node, fd: int, fh: int) -> int:
        """The node's passthrough backing id, registered from ``fd`` on its
        first passthrough open; 0 if the kernel refuses. Caller holds _iomode.

        The node keeps the set of its passthrough handles, not a count, and
        journals each one: a RELEASE that the kernel resends after a handover
        may already have been done, and only the handle says whether."""
        if node.backing is None:
            try:
                node.backing = (self.backing_open(fd), set())
            except OSError as exc:
                log.debug("no passthrough", extra={"fields": {"error": str(exc)}})
                return 0
        node.backing[1].add(fh)
        self.nodes.journal_backing(node, fh, opened=True)
        return node.backing[0]

    def create(self, caller: Caller, parent_id: int, name: bytes, mode: int, flags: int,
               unique: int = 0) -> tuple[Node, os.stat_result, int, int]:
        """Returns (node, stat, fh, open_flags). Charged an inode and a block
        for the parent's growth, settled as for any new name; the open
        counts against the open-file cap."""
        parent = self.nodes.get(parent_id)
        self.nodes.check_room()
        w = self._begin_mutation(unique)
        try:
            try:
                fd = charging.name_op(self.quota, _sizes(parent), lambda: self.open_files.open(
                    name, self._real_flags(flags) | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode & 0o7777,
                    dir_fd=parent.fd), inode=True)
            except FileExistsError:
                if flags & os.O_EXCL and not unique & p.UNIQUE_RESEND:
                    raise
                node, st = self._lookup_fd(parent, name)  # lost a race, or made before the crash
                fh, open_flags, _ = self.open(node.nodeid, flags & ~os.O_TRUNC)
                return node, os.stat(node.fd), fh, open_flags
            try:
                st = os.fstat(fd)
                self._give_to_caller(caller, parent, fd, st, False)
                if mode & (stat.S_ISUID | stat.S_ISGID):
                    os.fchmod(fd, mode & 0o7777)
                node, _ = self._lookup_fd(parent, name)
                state = self._register(fd, node, True, st)
            except BaseException:
                os.close(fd)
                self.open_files.give()
                raise
            handle = Handle(self._new_fh(), fd, node, True)
            handle.state = state
            with self._iomode:
                node.cached += 1
            with self._table:
                self._handles[handle.fh] = handle
            st = os.fstat(fd)
            return node, st, handle.fh, _NOFLUSH | (p.FOPEN_KEEP_CACHE if self.keep_cache else 0)
        finally:
            self.gate.leave(w)

    def handle(self, fh: int, nodeid: int, flags: int) -> Handle:
        """The handle ``fh``; one the kernel kept from before a handover is
        reopened from its node (the request says which node and flags). It
        counts against the open-file cap but is never refused: the kernel
        already holds that open."""
        handle = self._handles.get(fh)
        if handle is not None:
            return handle
        node = self.nodes.get(nodeid)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self.open_files.take(check=False)
        try:
            fd = os.open(self._proc(node), self._real_flags(flags))
        except BaseException:
            self.open_files.give()
            raise
        handle = Handle(fh, fd, node, writable)
        handle.passthrough = bool(fh & PASSTHROUGH_FH)
        handle.state = self._register(fd, node, writable)
        with self._table:
            other = self._handles.setdefault(fh, handle)
        if other is handle and not handle.passthrough:
            with self._iomode:
                node.cached += 1
        if other is not handle:
            self._unregister_state(node, fd)
            os.close(fd)
            self.open_files.give()
        return other

    def read(self, fh: int, nodeid: int, offset: int, size: int, flags: int) -> bytes:
        handle = self._handles.get(fh) or self.handle(fh, nodeid, flags)
        if self.limits.active:
            self.may_block()
            self.limits.throttle(size)
        data = os.pread(handle.fd, size, offset)
        self.stats.shard().bytes_read += len(data)
        return data

    def write(self, fh: int, nodeid: int, offset: int, data: Any, write_flags: int, flags: int,
              unique: int = 0) -> int:
        if self.read_only:
            raise OSError(errno.EROFS, "read-only volume")
        handle = self._handles.get(fh) or self.handle(fh, nodeid, flags)
        if self.gate.frozen and not write_flags & p.WRITE_CACHE:
            self._wait_thaw_write(handle, offset, unique)
        w = self.gate.enter_write(offset, handle.last_end, handle.last_time,
                                  _WRITEPAGE if write_flags & p.WRITE_CACHE else _NOT_WRITEPAGE)
        try:
            size = len(data)
            if self.limits.active:  # write-back (WRITE_CACHE) has no INTERRUPT: it must not wait
                if write_flags & p.WRITE_CACHE:
                    self.limits.charge_writeback(size)
                else:
                    self.may_block()
                    self.limits.throttle(size)
            state = handle.state
            end = offset + size
            if end > state.size:  # type: ignore[union-attr]
                allowed = self.quota.extend(state, end)  # type: ignore[arg-type]
                if allowed <= offset:
                    raise OSError(errno.ENOSPC, "quota exceeded")
                if allowed < end:
                    data = data[: allowed - offset]
            if write_flags & p.WRITE_KILL_SUIDGID and (handle.node.mode & _PRIV_BITS or self._has_caps):
                self._kill_privs(handle.node, handle.fd)
            n = os.pwrite(handle.fd, data, offset)
            if n < len(data):
                charging.resync_size(self.quota, handle.fd, handle.state)  # type: ignore[arg-type]
            handle.last_end = offset + n
            handle.last_time = _monotonic()
            self.stats.shard().bytes_written += n
            return n
        except OSError:
            charging.resync_size(self.quota, handle.fd, handle.state)  # type: ignore[arg-type]
            raise
        finally:
            w.busy = False

    def _wait_thaw_write(self, handle: Handle, offset: int, unique: int) -> None:
        """Park interruptibly before the gate, unless this write may pass a
        settling freeze (the second half of a split write(2))."""
        if offset == handle.last_end and offset % 4096 == 0 and _monotonic() - handle.last_time < 0.05:
            return
        self._wait_thaw(unique)

    @property
    def _has_caps(self) -> bool:
        return self.capability_seen

    def _kill_privs(self, node: Node, fd: int | None) -> None:
        """What the kernel's file_remove_privs does for a writer without
        CAP_FSETID, which it leaves to us (FUSE_HANDLE_KILLPRIV_V2, so that
        it need not ask for security.capability before every write): clear
        set-user-ID, set-group-ID if group-executable, and file capabilities."""
        target: Any = fd if fd is not None else self._proc(node)
        mode = os.stat(target).st_mode
        kill = stat.S_ISUID if mode & stat.S_ISUID else 0
        if mode & stat.S_ISGID and mode & stat.S_IXGRP:
            kill |= stat.S_ISGID
        if kill:
            os.chmod(target, stat.S_IMODE(mode) & ~kill)
        node.mode = mode & ~kill
        if self._has_caps:
            where = self._proc(node)  # the f*xattr calls refuse O_PATH descriptors
            total = xattr_total(where, follow=True)
            old = charging.xattr_len(where, _CAPABILITY, follow=True)
            if old >= 0:
                os.removexattr(where, _CAPABILITY)
                charging.removed_xattr(self.quota, total, len(_CAPABILITY), old)

    def flush(self, fh: int) -> None:
        return None

    def fsync(self, fh: int, nodeid: int, datasync: bool) -> None:
        handle = self._handles.get(fh)
        if handle is None:
            # A handle from before a handover: the request does not say how it
            # was opened, so it is not adopted here (a later READ or WRITE,
            # which does, will); fsync works on any descriptor of the inode.
            fd = os.open(self._proc(self.nodes.get(nodeid)), os.O_RDONLY | os.O_CLOEXEC)
            try:
                (os.fdatasync if datasync else os.fsync)(fd)
            finally:
                os.close(fd)
            return
        if datasync:
            os.fdatasync(handle.fd)
        else:
            os.fsync(handle.fd)

    def release(self, fh: int, nodeid: int = 0) -> None:
        with self._table:
            handle = self._handles.pop(fh, None)
        if handle is None:
            if fh & PASSTHROUGH_FH and nodeid:
                try:
                    self._drop_backing(self.nodes.get(nodeid), fh)  # opened before a handover
                except OSError:
                    pass
            return
        node = handle.node
        if not handle.passthrough:
            with self._iomode:
                node.cached -= 1
        try:
            self._unregister_state(node, handle.fd)
        finally:
            os.close(handle.fd)
            self.open_files.give()
            if handle.passthrough:
                self._drop_backing(node, handle.fh)
            self.nodes.released()

    def _drop_backing(self, node: Node, fh: int) -> None:
        """Passthrough handle ``fh`` of ``node`` is released; the last one
        closes the backing file. A handle not in the set was released already
        (a RELEASE resent after a handover) and changes nothing."""
        with self._iomode:
            if node.backing is None or fh not in node.backing[1]:
                return
            backing_id, handles = node.backing
            handles.discard(fh)
            self.nodes.journal_backing(node, fh, opened=False)
            if handles:
                return
            node.backing = None
            try:
                self.backing_close(backing_id)
            except OSError as exc:
                log.warning("backing close failed", extra={"fields": {"error": str(exc)}})

    def fallocate(self, fh: int, nodeid: int, mode: int, offset: int, length: int, unique: int = 0) -> None:
        handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, "unknown file handle")  # unreachable but after a handover, and rare then
        w = self._begin_mutation(unique)
        try:
            assert handle.state is not None
            charging.fallocate_fd(self.quota, handle.fd, handle.state, mode, offset, length, ksys.fallocate)
        finally:
            self.gate.leave(w)

    def lseek(self, fh: int, nodeid: int, offset: int, whence: int) -> int:
        handle = self._handles.get(fh)
        if handle is not None:
            return os.lseek(handle.fd, offset, whence)
        fd = os.open(self._proc(self.nodes.get(nodeid)), os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, offset, whence)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ directories

    def opendir(self, nodeid: int) -> int:
        node = self.nodes.get(nodeid)
        fd = self.open_files.open(self._proc(node), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        handle = Handle(self._new_fh(), fd, node, False)
        handle.is_dir = True
        with self._table:
            self._handles[handle.fh] = handle
        return handle.fh

    def dir_entries(self, fh: int, nodeid: int, offset: int) -> Iterator[tuple[int, bytes, int, int]]:
        """(next offset, name, ino, d_type) from ``offset`` on. Offsets are
        positions in the listing read when the directory was opened (or
        rewound), so a listing that is continued never repeats or skips."""
        handle = self._handles.get(fh)
        if handle is None:
            handle = self.handle(fh, nodeid, os.O_RDONLY | os.O_DIRECTORY)
            handle.is_dir = True
        if handle.entries is None or offset == 0:
            node = handle.node
            handle.entries = [(b".", node.key[1], 4), (b"..", 1, 4)]
            with os.scandir(handle.fd) as it:
                for entry in it:
                    name = os.fsencode(entry.name)
                    try:
                        kind = _dtype(entry)
                    except OSError:
                        continue
                    handle.entries.append((name, entry.inode(), kind))
        entries = handle.entries
        for i in range(offset, len(entries)):
            name, ino, kind = entries[i]
            yield i + 1, name, ino, kind

    def releasedir(self, fh: int) -> None:
        with self._table:
            handle = self._handles.pop(fh, None)
        if handle is not None:
            os.close(handle.fd)
            self.open_files.give()

    def fsyncdir(self, fh: int, nodeid: int) -> None:
        handle = self._handles.get(fh)
        os.fsync(handle.fd if handle is not None else self.root_fd)

    # ------------------------------------------------------------ xattrs

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        if name.startswith(_ACL_PREFIX):
            # As on a filesystem mounted noacl: the kernel does not enforce
            # ACLs here (setxattr refuses them), and EOPNOTSUPP, unlike
            # ENODATA, tells ls -l and friends to stop asking for every file.
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not supported on this mount")
        if not self.xattrs_seen or (name == _CAPABILITY and not self.capability_seen):
            raise OSError(errno.ENODATA, "no such attribute")
        return os.getxattr(self._proc(self.nodes.get(nodeid)), name)

    def listxattr(self, nodeid: int) -> bytes:
        if not self.xattrs_seen:
            return b""
        names = os.listxattr(self._proc(self.nodes.get(nodeid)))
        return b"".join(os.fsencode(n) + b"\0" for n in names if not n.startswith(_ACL_NAME_PREFIX))

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int, unique: int = 0) -> None:
        """Set an attribute, charged by the model in :mod:`fusefs.quota` (see
        :func:`fusefs.charging.set_xattr`: ENOSPC past the per-inode cap)."""
        if name.startswith(_ACL_PREFIX):
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not enforced on this mount")
        node = self.nodes.get(nodeid)
        w = self._begin_mutation(unique)
        try:
            where = self._proc(node)
            total = xattr_total(where, follow=True) if self.xattrs_seen else 0
            old = charging.xattr_len(where, name, follow=True) if self.xattrs_seen else -1
            # Before the call: a racing getxattr must look.
            self.xattrs_seen = True
            if name == _CAPABILITY:
                self.capability_seen = True
            charging.set_xattr(self.quota, total, len(name), old, len(value),
                               lambda: os.setxattr(where, name, value, flags))
        finally:
            self.gate.leave(w)

    def removexattr(self, nodeid: int, name: bytes, unique: int = 0) -> None:
        if name.startswith(_ACL_PREFIX):
            raise OSError(errno.EOPNOTSUPP, "POSIX ACLs are not supported on this mount")
        node = self.nodes.get(nodeid)
        w = self._begin_mutation(unique)
        try:
            if not self.xattrs_seen:
                raise OSError(errno.ENODATA, "no such attribute")
            where = self._proc(node)
            total = xattr_total(where, follow=True)
            old = charging.xattr_len(where, name, follow=True)
            if old < 0:
                raise OSError(errno.ENODATA, "no such attribute")
            os.removexattr(where, name)
            charging.removed_xattr(self.quota, total, len(name), old)
        finally:
            self.gate.leave(w)

    def access(self, nodeid: int, mask: int) -> None:
        os.stat(self.nodes.get(nodeid).fd)

    # ------------------------------------------------------------ freeze support

    def sync_open_files(self) -> int:
        """fsync every file open for writing (the last step of a freeze); see
        :func:`fusefs.charging.sync_files`."""
        return charging.sync_files(self._table, self._handles.values(), self.root_fd)

    def write_back_open_files(self, mountpoint: str) -> int:
        """With the kernel's write-back cache: make it send us every dirty page.

        Dirty pages can only belong to files open for writing. For each,
        FUSE_NOTIFY_INVAL_INODE makes the kernel write the pages back
        (launder) before it drops them; the writes it sends carry
        FUSE_WRITE_CACHE and pass the freeze while it is writing back.
        Returns the number of files.
        """
        with self._table:
            nodeids = {h.node.nodeid for h in self._handles.values() if h.writable}
        for nodeid in nodeids:
            self.notify_inval_inode(nodeid, 0, 0)
        return len(nodeids)

    def open_handles(self) -> int:
        """Open files and directories now (what the cap counts)."""
        return self.open_files.count


class _Unlinked:
    """An orphan's ``stat``, as the pod must see it: no link (its only link
    is in the orphan directory, which is not the pod's business)."""

    __slots__ = ("_st",)
    st_nlink = 0

    def __init__(self, st: os.stat_result) -> None:
        self._st = st

    def __getattr__(self, name: str) -> Any:
        return getattr(self._st, name)


def _sizes(*dirs: Node) -> Any:
    """What :func:`fusefs.charging.name_op` measures: these directories'
    sizes (each once; None for one that is gone)."""
    unique = list({d.nodeid: d for d in dirs}.values())

    def sizes() -> list[int | None]:
        out: list[int | None] = []
        for d in unique:
            try:
                out.append(os.stat(d.fd).st_size)
            except OSError:
                out.append(None)
        return out
    return sizes


def _dtype(entry: os.DirEntry[bytes]) -> int:
    if entry.is_dir(follow_symlinks=False):
        return 4
    if entry.is_file(follow_symlinks=False):
        return 8
    if entry.is_symlink():
        return 10
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) >> 12
