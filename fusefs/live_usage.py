"""The live usage counters, shared with a successor across a takeover.

A kernel-engine session that is SIGKILLed leaves its connection to a
successor (``--takeover``). The successor must know the volume's usage at
once: rebuilding it by a scan, during which nothing may grow, fails a pod
that is writing at that moment. So the session keeps its quota counters in
a small file mapped ``MAP_SHARED`` (``<state-file>.live``, in the session's
private state directory) and updates it on every change of the counters:
four aligned 8-byte stores into the page cache, no system call. The file
outlives the process (the kernel owns the page), not the machine (a reboot
ends the connection anyway), so it is never fsynced.

Layout, little-endian signed 64-bit words::

    0       MAGIC (format and version)
    1, 2    the connection's token (16 random bytes, also in the state
            file): a file left by another connection is never trusted
    3       reserved (0)
    4..7    slot 0: seq, used_bytes, used_inodes, seq
    8..11   slot 1: the same

Each update writes the slot that the previous one did not (``seq & 1``):
its first word, the two counters, then its last word. A slot is whole when
its two ``seq`` words are equal and non-zero; a process killed in the middle
of an update leaves that slot torn and the other one whole, with the
previous figures. The reader takes the whole slot with the highest ``seq``.
No whole slot (a session killed before its usage was known, or a file from
another connection, or a damaged one) means: rebuild the usage by a scan,
as after any crash.

How far the adopted figures can be from the truth: every operation charges
before its system call and settles after it (see :mod:`fusefs.charging`),
so a process killed in between leaves a charge for something that did not
happen, or a refund not made; a request in flight at the kill is resent by
the kernel and may be charged a second time. The drift is therefore bounded
by what the requests in flight at the kill could charge (a write's size, a
block and an inode per name operation), and it is almost always an excess.
Files that were unlinked while open (charged until their last close) are
not known to the successor as such. The successor's background scan
(:meth:`fusefs.quota.Quota.audit_end`) corrects both.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
from typing import Any

log = logging.getLogger("fusefs.live_usage")

#: b"FPLIVE01" as a little-endian word.
MAGIC = int.from_bytes(b"FPLIVE01", "little", signed=True)
WORDS = 12
SIZE = WORDS * 8
_SLOTS = (4, 8)
_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
#: A slot's four words, written field by field from the first to the last.
_PACK_SLOT = struct.Struct("<4q").pack_into


def live_path(state_file: str) -> str:
    """Where the live counters of the session with ``state_file`` are kept."""
    return f"{state_file}.live"


def new_token() -> str:
    """A connection token (hex), written to the state file and the live file."""
    return os.urandom(16).hex()


def _token_words(token: str) -> tuple[int, int]:
    raw = bytes.fromhex(token)
    if len(raw) != 16:
        raise ValueError("a usage token is 16 bytes")
    return int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)


class LiveUsage:
    """One mapped live-usage file; :meth:`publish` is called under the quota's lock."""

    __slots__ = ("path", "_mm", "_words", "_seq")

    def __init__(self, path: str, mm: mmap.mmap, seq: int) -> None:
        self.path = path
        self._mm = mm
        self._words: Any = memoryview(mm).cast("q")
        self._seq = seq

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, path: str, token: str) -> LiveUsage:
        """A new file for connection ``token``, with no figures yet.

        Written beside and renamed over any old file, so a reader never sees
        a header of one connection with the slots of another."""
        hi, lo = _token_words(token)
        header = bytearray(SIZE)
        view = memoryview(header).cast("q")
        view[0], view[1], view[2] = MAGIC, hi, lo
        tmp = f"{path}.tmp"
        fd = os.open(tmp, _FLAGS | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, bytes(header))
            os.fsync(fd)  # the header only: a reboot must not leave garbage that parses
            os.rename(tmp, path)
            mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(path, mm, 0)

    @classmethod
    def adopt(cls, path: str, token: str) -> tuple[LiveUsage, tuple[int, int] | None]:
        """Map the file a dead session of connection ``token`` kept.

        Returns it with its figures ``(used_bytes, used_inodes)``, or with
        None (and the file made anew, empty) if it cannot be trusted: missing,
        of another connection, or without a whole slot. Later updates go to
        the other slot, so the adopted figures stay whole until replaced."""
        found = _read(path, token)
        if found is None:
            return cls.create(path, token), None
        seq, used_bytes, used_inodes = found
        fd = os.open(path, _FLAGS)
        try:
            mm = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return cls(path, mm, seq), (used_bytes, used_inodes)

    # ------------------------------------------------------------ updating

    def publish(self, used_bytes: int, used_inodes: int) -> None:
        """Record the counters (caller holds the quota's lock): one
        ``pack_into`` that stores the slot's four words in order (a kill
        in the middle leaves its two ``seq`` words different)."""
        seq = self._seq + 1
        self._seq = seq
        _PACK_SLOT(self._mm, _SLOTS[seq & 1] * 8, seq, used_bytes, used_inodes, seq)

    def forget(self) -> None:
        """The figures are no longer known (the usage is being rebuilt):
        leave no whole slot."""
        w = self._words
        for base in _SLOTS:
            w[base + 3] = 0
            w[base] = 0

    def close(self) -> None:
        self._words.release()
        self._mm.close()


def figures(path: str, token: str) -> tuple[int, int] | None:
    """``(used_bytes, used_inodes)`` the file holds for connection ``token``,
    or None; reads only (for tests and tools)."""
    found = _read(path, token)
    return None if found is None else found[1:]


def _read(path: str, token: str) -> tuple[int, int, int] | None:
    """(seq, used_bytes, used_inodes) of the newest whole slot, or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        log.info("no live usage file; rescanning")
        return None
    except OSError as exc:
        log.warning("live usage file unreadable; rescanning", extra={"fields": {"error": str(exc)}})
        return None
    try:
        data = os.pread(fd, SIZE + 1, 0)
    finally:
        os.close(fd)
    if len(data) != SIZE:
        log.warning("live usage file of the wrong size; rescanning", extra={"fields": {"size": len(data)}})
        return None
    words = memoryview(data).cast("q")
    try:
        expected = _token_words(token)
    except ValueError:
        return None
    if words[0] != MAGIC or (words[1], words[2]) != expected:
        log.warning("live usage file of another connection; rescanning")
        return None
    best: tuple[int, int, int] | None = None
    for base in _SLOTS:
        seq = words[base]
        if seq > 0 and words[base + 3] == seq and _SLOTS[seq & 1] == base:
            used_bytes, used_inodes = words[base + 1], words[base + 2]
            if used_bytes >= 0 and used_inodes >= 1 and (best is None or seq > best[0]):
                best = (seq, used_bytes, used_inodes)
    if best is None:
        log.warning("live usage file has no whole figures (torn, or the usage was unknown); rescanning")
    return best
