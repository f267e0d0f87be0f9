"""The node table: the kernel's node IDs and what they stand for.

The kernel knows an inode by the 64-bit node ID we gave it in a LOOKUP (or
CREATE, MKNOD, ...) reply, and holds it until it sends FORGET for as many
lookups as it was given. Each node keeps an ``O_PATH`` descriptor on its
backing inode, so the node works whatever happens to its names (rename,
unlink while open) and the inode number cannot be reused while the kernel
still knows it: that is why ``(st_dev, st_ino)`` is a safe key to find the
node of an inode a lookup returns again (hard links share one node).

Node IDs must stay valid across a handover to a new process (the kernel
keeps using them without a new LOOKUP). So every node ID given out is
appended to a journal as its file handle (``name_to_handle_at``) and every
node dropped is journalled too; a successor replays the journal and reopens
each node with ``open_by_handle_at``. Journal lines::

    N <next_id>                             header: the next node ID to give out
    + <nodeid> <handle_type> <hex>          a node given out
    S <nodeid> <slot>                       its lookup count's slot (see below)
    - <nodeid>                              a node forgotten
    P <nodeid> <backing_id> <fh>            a passthrough open of a node (its backing file)
    R <nodeid> <fh>                         that open released (the last one ends the backing)
    O <nodeid> <name> <extra>               its inode kept as <name> in the orphan directory
    o <nodeid>                              that did not happen after all

**Orphans.** A file whose last name is removed while it is open lives on
only through descriptors; the session's own die with it, so its inode
would be freed at a SIGKILL and the pod's open file would turn ESTALE
after the takeover. With an orphan directory (``--orphan-dir``: outside
the volume, on the same filesystem) such an inode is hard-linked there
before its name goes (see :mod:`fusefs.kernel.inodefs`), and the ``O``
line, written *before* the link, lets a successor find it (``extra`` is its xattr
charge). It is unlinked from there when the kernel forgets the node, which
the kernel does once nothing uses the inode (an inode with no link is
evicted at its last close), and its charge is returned then through
:attr:`NodeTable.orphan_freed`. A successor drops orphans that no restored
node claims (a crash between a FORGET and the unlink); a fresh mount
empties the directory (:mod:`fusefs.kernel.orphans`).

The journal is written with plain ``write`` (no fsync): it must survive the
death of the process, not of the machine (a reboot ends the mount anyway).
It is rewritten compactly when it holds many more lines than live nodes.

**Lookup counts.** The kernel holds a node until it sends FORGET for as many
lookups as it was given, and it keeps counting across a handover: its FORGET
of a node counts the lookups answered by the dead session too. So a
successor needs each node's exact count, or it would drop a node the kernel
still uses (ESTALE for a pod's open file or working directory) or keep one
forever. A write per LOOKUP to the journal would cost a system call each;
instead the counts live in ``<journal>.counts``, an array of 64-bit words
mapped ``MAP_SHARED`` (one store per LOOKUP or FORGET, no system call), one
slot per live node, named by the ``S`` line written with its ``+`` line (a
line of its own, which a session of an older version ignores). A count is
stored before the reply that gives the lookup is written, so a session
killed in between leaves a count one too high for that node (kept until the
session ends: a leak bounded by the requests in flight at the kill), never
one too low; so does a FORGET the dead session read but did not apply
(FORGET has no reply, and the kernel resends only requests waiting for one).
A slot is zeroed before it is journalled for a new node, so a node whose
reply never left has count 0 and is not restored. A FORGET for more lookups
than the node has (which only a lost count could cause) ends it: the kernel
never forgets more than it holds, so it holds nothing. Nodes of an old
journal without slots, or with the counts file missing, get
:data:`RESTORED_LOOKUPS` and are kept until the session ends.
"""

from __future__ import annotations

import errno
import itertools
import logging
import mmap
import os
import threading
from collections.abc import Callable
from typing import Any

from fusefs.kernel import syscalls as ksys

log = logging.getLogger("fusefs.kernel.nodes")

ROOT_ID = 1
#: Lookup count given to a node restored without a known count (see the
#: module docstring): never reached, so such a node stays.
RESTORED_LOOKUPS = 1 << 40
#: Slots of a new counts file (grown by doubling; 8 bytes each).
COUNT_SLOTS = 4096
#: Rewrite the journal when it has this many times more lines than live nodes.
COMPACT_FACTOR = 4
COMPACT_MIN_LINES = 4096
#: With a node budget, the pruner is woken above HIGH_WATER of it and prunes
#: down to LOW_WATER (fractions of the budget; see :meth:`NodeTable.set_budget`).
HIGH_WATER = 0.8
LOW_WATER = 0.6
#: Nodes the pruner looks at per candidate it asks for, at most.
PRUNE_SCAN = 4


class Node:
    """One inode the kernel knows."""

    __slots__ = ("nodeid", "fd", "key", "lookups", "mode", "state", "backing", "restored", "cached", "slot",
                 "orphan", "orphan_extra")

    def __init__(self, nodeid: int, fd: int, key: tuple[int, int], mode: int) -> None:
        self.nodeid = nodeid
        #: O_PATH|O_NOFOLLOW descriptor on the backing inode.
        self.fd = fd
        self.key = key
        self.lookups = 0
        self.mode = mode
        #: Per-inode data of the filesystem (open files, passthrough); see inodefs.
        self.state: Any = None
        self.backing: Any = None
        self.restored = False
        #: Open files on it that are not passthrough (the kernel caches them).
        self.cached = 0
        #: Its word in the counts file (-1: none).
        self.slot = -1
        #: Its name in the orphan directory, once its last name is gone
        #: while it was open (see the module docstring); and its xattr charge.
        self.orphan: str | None = None
        self.orphan_extra = 0


class NodeTable:
    """Node IDs <-> nodes, with lookup counts and an optional journal."""

    def __init__(self, root_fd: int, journal: str | None = None) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[int, Node] = {}
        self._by_key: dict[tuple[int, int], Node] = {}
        self._next = ROOT_ID + 1
        st = os.fstat(root_fd)
        root = Node(ROOT_ID, root_fd, (st.st_dev, st.st_ino), st.st_mode)
        root.lookups = 1 << 62  # never forgotten
        self._by_id[ROOT_ID] = root
        self._by_key[root.key] = root
        self.root = root
        self.journal_path = journal
        self._journal_fd = -1
        self._journal_lines = 0
        #: The counts file, mapped (see the module docstring), and its free slots.
        self._counts: Any = None
        self._counts_mm: mmap.mmap | None = None
        self._free: list[int] = []
        #: FORGETs for more lookups than a node had (see the module docstring).
        self.forget_excess = 0
        #: The orphan directory (-1: none), and what to call with (size,
        #: xattr charge) of an orphan really freed (set by the filesystem).
        self.orphan_fd = -1
        self.orphan_freed: Any = lambda size, extra: None
        #: The node budget (0: none), its watermarks, and what to call when
        #: the table grows past the high one (set by the engine: wakes its
        #: pruner; it must not block). See :meth:`set_budget`.
        self.budget = 0
        self.high = 0
        self.low = 0
        self.on_pressure: Callable[[], None] = lambda: None
        #: New nodes refused (ENFILE) because the budget was full.
        self.refused = 0
        self._refusal_logged = False
        #: Nodes the kernel forgot (the pruner's measure of progress).
        self.dropped = 0

    def set_budget(self, budget: int) -> None:
        """Keep at most ``budget`` nodes (descriptors): beyond
        :data:`HIGH_WATER` of it the pruner asks the kernel to forget the
        oldest unused ones (down to :data:`LOW_WATER`); a new node beyond
        the budget is refused with ENFILE. 0: no budget."""
        self.budget = max(0, budget)
        self.high = int(self.budget * HIGH_WATER)
        self.low = int(self.budget * LOW_WATER)

    # ------------------------------------------------------------ hot path

    def get(self, nodeid: int) -> Node:
        try:
            return self._by_id[nodeid]
        except KeyError:
            raise OSError(116, "stale node id") from None  # ESTALE

    def by_key(self, key: tuple[int, int]) -> Node | None:
        """The node of inode ``(st_dev, st_ino)``, if the kernel knows it."""
        return self._by_key.get(key)

    def remember(self, fd: int, st: os.stat_result) -> Node:
        """The node for the inode behind ``fd`` (just opened O_PATH), counted
        as one more lookup; ``fd`` is kept or closed."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            node = self._by_key.get(key)
            if node is not None:
                node.lookups += 1
                node.mode = st.st_mode
                close = True
            else:
                if self.budget and len(self._by_id) >= self.budget:
                    self._refuse(fd)
                node = Node(self._next, fd, key, st.st_mode)
                self._next += 1
                node.lookups = 1
                self._by_id[node.nodeid] = node
                self._by_key[key] = node
                close = False
                if self._journal_fd >= 0:
                    self._take_slot(node)
                    self._journal_add(node)
            if node.slot >= 0:
                self._counts[node.slot] = node.lookups
            pressed = not close and self.high and len(self._by_id) > self.high
        if close:
            os.close(fd)
        elif pressed:
            self.on_pressure()
        return node

    def check_room(self) -> None:
        """ENFILE now if a new node would be refused (see :meth:`_refuse`):
        called before a new inode is made, so that a refused create, mkdir,
        mknod or symlink leaves nothing behind."""
        if self.budget and len(self._by_id) >= self.budget:
            with self._lock:
                self._refuse(-1)

    def _refuse(self, fd: int) -> None:
        """No room for a new node (caller holds the lock): ENFILE, logged
        once with the numbers (the pruner could not keep up, or every node
        is in use: open, a working directory, a directory with names the
        kernel caches)."""
        self.refused += 1
        self.on_pressure()
        if not self._refusal_logged:
            self._refusal_logged = True
            log.error("node budget exhausted: new names get ENFILE until the kernel forgets some", extra={
                "fields": {"nodes": len(self._by_id), "budget": self.budget}})
        if fd >= 0:
            os.close(fd)
        raise OSError(errno.ENFILE, "too many inodes in use on this volume")

    def prune_candidates(self, limit: int) -> list[int]:
        """Up to ``limit`` node IDs the kernel may be asked to forget, oldest
        first: not the root, not open (no per-inode state, passthrough
        backing or cached open), not an orphan, with a known lookup count.
        At most ``PRUNE_SCAN * limit`` nodes are looked at (the lock is held),
        and each one looked at moves to the end of the order: the nodes in
        use, and those the kernel keeps (its dentries are in use), are not
        looked at again before every other node was."""
        chosen: list[int] = []
        with self._lock:
            seen: list[Node] = []
            for node in itertools.islice(self._by_id.values(), PRUNE_SCAN * limit):
                seen.append(node)
                if (node.state is None and node.backing is None and node.cached == 0 and node.orphan is None
                        and node.nodeid != ROOT_ID and node.lookups < RESTORED_LOOKUPS):
                    chosen.append(node.nodeid)
                    if len(chosen) >= limit:
                        break
            by_id = self._by_id
            for node in seen:
                del by_id[node.nodeid]
                by_id[node.nodeid] = node
        return chosen

    def released(self) -> None:
        """An open file was released (its node may be prunable now): wake
        the pruner if the table is past its high-water mark."""
        if self.high and len(self._by_id) > self.high:
            self.on_pressure()

    def pin(self, key: tuple[int, int]) -> Node | None:
        """The node of inode ``key`` with one more lookup counted, or None if
        the kernel does not know that inode. While pinned, the node keeps its
        descriptor, so its inode cannot be freed and its number reused: the
        caller may then trust a ``stat`` that shows this number. Undo with
        ``forget(node.nodeid, 1)``."""
        with self._lock:
            node = self._by_key.get(key)
            if node is not None:
                node.lookups += 1
                if node.slot >= 0:  # stored before the reply, as remember() does
                    self._counts[node.slot] = node.lookups
            return node

    def forget(self, nodeid: int, count: int) -> None:
        with self._lock:
            node = self._by_id.get(nodeid)
            if node is None or nodeid == ROOT_ID:
                return
            node.lookups -= count
            if node.lookups > 0:
                if node.slot >= 0:
                    self._counts[node.slot] = node.lookups
                return
            if node.lookups < 0:
                self.forget_excess += 1
                log.warning("FORGET for more lookups than the node had; released",
                            extra={"fields": {"nodeid": nodeid, "excess": -node.lookups}})
            del self._by_id[nodeid]
            self.dropped += 1
            if self._by_key.get(node.key) is node:
                del self._by_key[node.key]
            if self._journal_fd >= 0:
                self._journal_write(f"- {nodeid}\n")
            if node.slot >= 0:
                self._counts[node.slot] = 0
                self._free.append(node.slot)
                node.slot = -1
        if node.orphan is not None:
            self._free_orphan(node)
        os.close(node.fd)

    def _free_orphan(self, node: Node) -> None:
        """The kernel forgot an orphan: unlink it and return its charge."""
        try:
            size = os.fstat(node.fd).st_size
            os.unlink(node.orphan, dir_fd=self.orphan_fd)  # type: ignore[arg-type]
        except OSError as exc:
            log.warning("cannot remove an orphan", extra={"fields": {"nodeid": node.nodeid, "error": str(exc)}})
            return
        self.orphan_freed(size, node.orphan_extra)

    def orphans(self) -> list[Node]:
        """Nodes kept in the orphan directory (charged until freed)."""
        with self._lock:
            return [n for n in self._by_id.values() if n.orphan is not None]

    def journal_orphan(self, node: Node, name: str | None, extra: int = 0) -> None:
        """Record (before the move) that ``node`` is kept as ``name`` in the
        orphan directory; ``name`` None: it is not after all."""
        if self._journal_fd < 0:
            return
        line = f"O {node.nodeid} {name} {extra}\n" if name is not None else f"o {node.nodeid}\n"
        with self._lock:
            self._journal_write(line)

    def __len__(self) -> int:
        return len(self._by_id)

    def states(self) -> list[Any]:
        """The per-inode data of every node that has some (open inodes)."""
        with self._lock:
            return [n.state for n in self._by_id.values() if n.state is not None]

    # ------------------------------------------------------------ journal

    def start_journal(self) -> None:
        """Write a fresh journal of every live node and keep appending to it;
        map the counts file (a new one unless :meth:`restore` mapped the old)."""
        if not self.journal_path:
            return
        with self._lock:
            if self._counts is None:
                self._new_counts()
            for node in self._by_id.values():
                if node.nodeid != ROOT_ID and node.slot < 0:
                    self._take_slot(node)
                    self._counts[node.slot] = node.lookups if node.lookups < RESTORED_LOOKUPS else RESTORED_LOOKUPS
            self._rewrite()

    # ------------------------------------------------------------ counts

    def _counts_path(self) -> str:
        return f"{self.journal_path}.counts"

    def _new_counts(self) -> None:
        """A zeroed counts file of :data:`COUNT_SLOTS` slots, all free."""
        path = self._counts_path()
        tmp = f"{path}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, COUNT_SLOTS * 8)
            os.rename(tmp, path)
            self._map_counts(fd, COUNT_SLOTS)
        finally:
            os.close(fd)
        self._free = list(range(COUNT_SLOTS - 1, -1, -1))

    def _map_counts(self, fd: int, slots: int) -> None:
        old_view, old_mm = self._counts, self._counts_mm
        self._counts_mm = mmap.mmap(fd, slots * 8, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._counts = memoryview(self._counts_mm).cast("q")
        if old_view is not None:
            old_view.release()
            old_mm.close()  # type: ignore[union-attr]

    def _take_slot(self, node: Node) -> None:
        """Give ``node`` a zeroed slot (caller holds the lock); the file
        doubles when none is free, so it stays within twice the live nodes."""
        if not self._free:
            slots = len(self._counts)
            fd = os.open(self._counts_path(), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.ftruncate(fd, 2 * slots * 8)
                self._map_counts(fd, 2 * slots)
            finally:
                os.close(fd)
            self._free = list(range(2 * slots - 1, slots - 1, -1))
        node.slot = self._free.pop()
        self._counts[node.slot] = 0

    def _restore_counts(self, slots: dict[int, int]) -> dict[int, int]:
        """Map the counts file left by the dead session; the count of each
        node's slot (nodes whose slot is out of the file are left out)."""
        try:
            fd = os.open(self._counts_path(), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
        try:
            size = os.fstat(fd).st_size
            if size < 8 or size % 8:
                return {}
            self._map_counts(fd, size // 8)
        finally:
            os.close(fd)
        total = len(self._counts)
        found = {nodeid: self._counts[slot] for nodeid, slot in slots.items() if 0 <= slot < total}
        return found

    def _rewrite(self) -> None:
        tmp = f"{self.journal_path}.tmp"
        lines = [f"N {self._next}\n"]
        for node in self._by_id.values():
            if node.nodeid != ROOT_ID:
                lines.append(self._add_line(node))
            backing = node.backing  # read once: a release may end it meanwhile
            if backing is not None:
                lines.extend(f"P {node.nodeid} {backing[0]} {fh}\n" for fh in tuple(backing[1]))
            if node.orphan is not None:
                lines.append(f"O {node.nodeid} {node.orphan} {node.orphan_extra}\n")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, "".join(lines).encode())
        except BaseException:
            os.close(fd)
            raise
        os.rename(tmp, self.journal_path)  # type: ignore[arg-type]
        os.lseek(fd, 0, os.SEEK_END)
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
        self._journal_fd = fd
        self._journal_lines = len(lines)

    def journal_backing(self, node: Node, fh: int, opened: bool) -> None:
        """Record a passthrough open (or its release) of ``node``: the kernel
        keeps the backing file across a handover, and a successor must reuse
        it and close it exactly when the last of these handles is released."""
        if self._journal_fd < 0:
            return
        if opened:
            line = f"P {node.nodeid} {node.backing[0]} {fh}\n"
        else:
            line = f"R {node.nodeid} {fh}\n"
        with self._lock:
            os.write(self._journal_fd, line.encode())
            self._journal_lines += 1

    @staticmethod
    def _add_line(node: Node) -> str:
        try:
            kind, handle = ksys.name_to_handle(node.fd)
        except OSError as exc:
            log.warning("no file handle for a node", extra={"fields": {"nodeid": node.nodeid, "error": str(exc)}})
            return ""
        slot = f"S {node.nodeid} {node.slot}\n" if node.slot >= 0 else ""
        return f"+ {node.nodeid} {kind} {handle.hex()}\n{slot}"

    def _journal_add(self, node: Node) -> None:
        # The counter is journalled with each node so a successor never
        # reuses an ID (the header only says where the rewrite started).
        self._journal_write(self._add_line(node))

    def _journal_write(self, line: str) -> None:
        os.write(self._journal_fd, line.encode())
        self._journal_lines += 1
        if self._journal_lines > max(COMPACT_MIN_LINES, COMPACT_FACTOR * len(self._by_id)):
            self._rewrite()

    def restore(self, mount_fd: int) -> int:
        """Reopen every node of the journal (after a handover). Returns how many.

        A node whose inode is gone (deleted meanwhile) is skipped: the kernel
        gets ESTALE for it, as NFS clients do.
        """
        if not self.journal_path or not os.path.exists(self.journal_path):
            return 0
        entries: dict[int, tuple[int, bytes]] = {}
        slots: dict[int, int] = {}
        backings: dict[int, tuple[int, set[int]]] = {}
        orphans: dict[int, tuple[str, int]] = {}
        next_id = self._next
        with open(self.journal_path, encoding="ascii") as f:
            for line in f:
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == "N" and len(parts) == 2:
                    next_id = max(next_id, int(parts[1]))
                elif parts[0] == "+" and len(parts) == 4:
                    nodeid = int(parts[1])
                    entries[nodeid] = (int(parts[2]), bytes.fromhex(parts[3]))
                    slots.pop(nodeid, None)
                    next_id = max(next_id, nodeid + 1)
                elif parts[0] == "S" and len(parts) == 3 and int(parts[1]) in entries:
                    slots[int(parts[1])] = int(parts[2])
                elif parts[0] == "-" and len(parts) == 2:
                    entries.pop(int(parts[1]), None)
                    slots.pop(int(parts[1]), None)
                    backings.pop(int(parts[1]), None)
                    orphans.pop(int(parts[1]), None)
                elif parts[0] == "O" and len(parts) == 4 and parts[2].isdigit():
                    orphans[int(parts[1])] = (parts[2], int(parts[3]))
                elif parts[0] == "o" and len(parts) == 2:
                    orphans.pop(int(parts[1]), None)
                elif parts[0] == "P" and len(parts) == 4:
                    backings.setdefault(int(parts[1]), (int(parts[2]), set()))[1].add(int(parts[3]))
                elif parts[0] == "R" and len(parts) == 3 and int(parts[1]) in backings:
                    handles = backings[int(parts[1])][1]
                    handles.discard(int(parts[2]))
                    if not handles:
                        del backings[int(parts[1])]
        restored = 0
        with self._lock:
            counts = self._restore_counts(slots)
            used: set[int] = set()
            for nodeid, (kind, handle) in entries.items():
                count = counts.get(nodeid, RESTORED_LOOKUPS)
                if count <= 0:
                    continue  # its reply never left, or the kernel forgot it: not held
                try:
                    fd = ksys.open_by_handle(mount_fd, kind, handle, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError:
                    continue
                st = os.fstat(fd)
                node = Node(nodeid, fd, (st.st_dev, st.st_ino), st.st_mode)
                node.lookups = count
                if nodeid in counts and slots[nodeid] not in used:
                    node.slot = slots[nodeid]
                    used.add(node.slot)
                node.restored = True
                node.backing = backings.get(nodeid) if nodeid != ROOT_ID else None
                if nodeid in orphans:
                    self._claim_orphan(node, *orphans[nodeid])
                self._by_id[nodeid] = node
                self._by_key.setdefault(node.key, node)
                restored += 1
            self._next = next_id
            if self._counts is not None:
                # Every other slot is free, and zeroed (a crash may have left
                # the count of a node journalled as forgotten).
                self._free = [i for i in range(len(self._counts) - 1, -1, -1) if i not in used]
                for i in self._free:
                    self._counts[i] = 0
        self._drop_unclaimed_orphans(orphans)
        return restored

    def _claim_orphan(self, node: Node, name: str, extra: int) -> None:
        """A restored node journalled as an orphan is one if its inode is
        that name in the orphan directory and has no other link (a crash
        between the journal line and the move, or during a rename over an
        open file, leaves it in the volume: not an orphan then)."""
        if self.orphan_fd < 0:
            return
        try:
            st = os.stat(name, dir_fd=self.orphan_fd, follow_symlinks=False)
        except OSError:
            return
        if (st.st_dev, st.st_ino) != node.key:
            return
        if st.st_nlink > 1:
            try:
                os.unlink(name, dir_fd=self.orphan_fd)  # the volume still names it
            except OSError:
                pass
            return
        node.orphan, node.orphan_extra = name, extra

    def _drop_unclaimed_orphans(self, journalled: dict[int, tuple[str, int]]) -> None:
        """After a restore: orphans the kernel no longer holds are freed (and
        uncharged, from the journal); entries nobody journalled (a crash
        between a FORGET and the unlink) are removed."""
        if self.orphan_fd < 0:
            return
        from fusefs.kernel import orphans as orphan_dir
        claimed = {n.orphan for n in self._by_id.values() if n.orphan is not None}
        for nodeid, (name, extra) in journalled.items():
            if nodeid in self._by_id or name in claimed:
                continue
            try:
                st = os.stat(name, dir_fd=self.orphan_fd, follow_symlinks=False)
                os.unlink(name, dir_fd=self.orphan_fd)
            except OSError:
                continue
            if st.st_nlink == 1:
                self.orphan_freed(st.st_size, extra)
        orphan_dir.empty(self.orphan_fd, keep=claimed)
