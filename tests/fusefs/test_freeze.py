"""Freeze and thaw: mutating operations wait, reads do not, auto-thaw frees a
volume whose freezer went away. No timing goals: "blocked" is asserted as
"has not returned after a generous pause", "released" as "returns within a
generous bound".
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fusefs.conftest import Mounted

pytestmark = pytest.mark.privileged

MiB = 1 << 20
PAUSE = 1.0        # long enough for a blocked call to have returned if it were not
RELEASE = 15.0     # generous bound for a released call on a busy 2-vCPU VM


class Call:
    """Run ``func`` in a thread and watch whether it has returned."""

    def __init__(self, func: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(func,), daemon=True)
        self.thread.start()

    def _run(self, func: Callable[[], Any]) -> None:
        try:
            self.result = func()
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        finally:
            self.done.set()

    def finished(self, timeout: float) -> bool:
        return self.done.wait(timeout)


def test_freeze_blocks_a_writer_until_thaw(mounted: Mounted) -> None:
    mnt = mounted.mountpoint
    (mnt / "existing").write_bytes(b"old data")
    fd = os.open(mnt / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"before")
        answer = mounted.client.freeze(60)
        assert answer["frozen"] is True
        writer = Call(lambda: os.write(fd, b"+during"))
        assert not writer.finished(PAUSE), "the write went through a frozen volume"
        assert (mounted.source / "f").read_bytes() == b"before"
        # Reads and other non-mutating calls are not blocked.
        reader = Call(lambda: ((mnt / "existing").read_bytes(), sorted(os.listdir(mnt)), os.stat(mnt / "f").st_size,
                               os.statvfs(mnt).f_blocks > 0))
        assert reader.finished(RELEASE)
        assert reader.error is None and reader.result[0] == b"old data"
        assert mounted.client.stats()["frozen"] is True
        assert mounted.client.thaw() == {"was_frozen": True}
        assert writer.finished(RELEASE)
        assert writer.error is None and writer.result == len(b"+during")
    finally:
        os.close(fd)
    assert (mounted.source / "f").read_bytes() == b"before+during"
    assert mounted.client.thaw() == {"was_frozen": False}


@pytest.mark.parametrize("op", ["create", "mkdir", "unlink", "rename", "chmod", "truncate", "setxattr", "symlink",
                                "link", "utime"])
def test_freeze_blocks_metadata_changes(mounted: Mounted, op: str) -> None:
    mnt = mounted.mountpoint
    (mnt / "a").write_bytes(b"a")
    actions: dict[str, Callable[[], Any]] = {
        "create": lambda: (mnt / "new").write_bytes(b""),
        "mkdir": lambda: os.mkdir(mnt / "d"),
        "unlink": lambda: os.unlink(mnt / "a"),
        "rename": lambda: os.rename(mnt / "a", mnt / "b"),
        "chmod": lambda: os.chmod(mnt / "a", 0o600),
        "truncate": lambda: os.truncate(mnt / "a", 0),
        "setxattr": lambda: os.setxattr(mnt / "a", "user.x", b"1"),
        "symlink": lambda: os.symlink("a", mnt / "l"),
        "link": lambda: os.link(mnt / "a", mnt / "h"),
        "utime": lambda: os.utime(mnt / "a", (1, 1)),
    }
    before = sorted(os.listdir(mounted.source)), os.stat(mounted.source / "a")
    mounted.client.freeze(60)
    call = Call(actions[op])
    assert not call.finished(PAUSE), f"{op} went through a frozen volume"
    after = sorted(os.listdir(mounted.source)), os.stat(mounted.source / "a")
    assert (before[0], before[1].st_mode, before[1].st_size, before[1].st_mtime_ns) == \
           (after[0], after[1].st_mode, after[1].st_size, after[1].st_mtime_ns)
    mounted.client.thaw()
    assert call.finished(RELEASE)
    assert call.error is None


def test_auto_thaw_after_timeout(mounted: Mounted) -> None:
    fd = os.open(mounted.mountpoint / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        mounted.client.freeze(2)
        writer = Call(lambda: os.write(fd, b"x"))
        assert not writer.finished(0.5)
        assert writer.finished(RELEASE), "auto-thaw did not release the writer"
    finally:
        os.close(fd)
    st = mounted.client.stats()
    assert st["frozen"] is False and st["freeze"]["auto_thaws"] == 1


def test_freeze_again_moves_the_deadline(mounted: Mounted) -> None:
    first = mounted.client.freeze(2)
    second = mounted.client.freeze(120)
    assert second["auto_thaw_in_seconds"] > first["auto_thaw_in_seconds"]
    time.sleep(2.5)
    assert mounted.client.stats()["frozen"] is True     # the first deadline no longer applies
    mounted.client.thaw()
    with pytest.raises(ValueError):
        mounted.client.freeze(0)


def test_freeze_waits_for_writes_in_flight(start_session: Callable[..., Mounted]) -> None:
    """A write(2) already under way completes, all of it, before freeze returns.

    With a 512 KiB/s limit, the 1 MiB requests that a 3 MiB write(2) becomes
    each spend about two seconds in the daemon. The freeze is issued while
    one of them is parked in the limiter: it waits for that request and lets
    the rest of the same write(2) through (a cut never holds half a write),
    while the writer's next write(2) waits for the thaw.
    """
    m = start_session(bytes_per_second=MiB // 2)
    fd = os.open(m.mountpoint / "f", os.O_CREAT | os.O_WRONLY, 0o644)

    def two_writes() -> int:
        n = os.write(fd, b"w" * (3 * MiB))
        time.sleep(0.2)
        return n + os.write(fd, b"x")

    try:
        writer = Call(two_writes)
        deadline = time.monotonic() + RELEASE
        while m.client.stats()["throttled_seconds"] == 0:   # a request is parked in the limiter
            assert time.monotonic() < deadline
            time.sleep(0.01)
        m.client.freeze(60)
        assert (m.source / "f").stat().st_size == 3 * MiB   # the whole first write(2)...
        assert not writer.finished(PAUSE)                   # ...and not the second
        assert (m.source / "f").stat().st_size == 3 * MiB
        m.client.thaw()
        assert writer.finished(RELEASE) and writer.result == 3 * MiB + 1
    finally:
        os.close(fd)


def test_stop_while_frozen_unmounts_cleanly(start_session: Callable[..., Mounted]) -> None:
    """SIGTERM thaws first, so a writer parked by the freeze cannot keep the
    session from exiting (and its mount from going away)."""
    from tests.fusefs.conftest import is_mounted

    m = start_session()
    fd = os.open(m.mountpoint / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    m.client.freeze(600)
    writer = Call(lambda: os.write(fd, b"x"))
    assert not writer.finished(0.5)
    assert m.stop() == 0
    assert writer.finished(RELEASE)
    with contextlib.suppress(OSError):  # ENOTCONN: close(2) asks a session that is gone
        os.close(fd)
    assert not is_mounted(str(m.mountpoint))
    assert not Path(m.socket).exists()


def test_freeze_with_writeback_cache_flushes_the_kernel_cache(start_session: Callable[..., Mounted]) -> None:
    """With --writeback-cache, data written but not yet sent to the daemon is
    pushed out by the freeze (syncfs), and nothing reaches the backing
    directory between freeze and thaw."""
    m = start_session(extra=["--writeback-cache"])
    assert m.client.stats()["negotiated"]["writeback_cache"] is True
    f = m.mountpoint / "f"
    with open(f, "wb") as out:
        out.write(b"a" * 100_000)
        out.flush()                                        # in the kernel's cache, maybe not in ours
        m.client.freeze(60)
        assert (m.source / "f").stat().st_size == 100_000  # the freeze wrote it back
        out.write(b"b" * 5000)
        out.flush()                                        # lands in the page cache...
        time.sleep(PAUSE)
        assert (m.source / "f").stat().st_size == 100_000  # ...but not in the backing file
        m.client.thaw()
    deadline = time.monotonic() + RELEASE
    while (m.source / "f").stat().st_size != 105_000:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_thaw_wins_over_a_freeze_still_draining(start_session: Callable[..., Mounted]) -> None:
    """A thaw never waits behind a freeze that is still draining: it opens
    the gate at once, and the freeze reports that it did not complete."""
    from fusefs.control import ControlError

    m = start_session(bytes_per_second=MiB // 4)           # 1 MiB requests: the first passes, the second waits ~4 s
    fd = os.open(m.mountpoint / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        writer = Call(lambda: os.write(fd, b"w" * (2 * MiB)))
        deadline = time.monotonic() + RELEASE
        while m.client.stats()["throttled_seconds"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        freezer = Call(lambda: m.client.freeze(60))
        assert not freezer.finished(0.5)                    # draining the parked request
        assert m.client.thaw()["was_frozen"] is True
        # Not stuck behind the drain: the request the drain waits for is still parked.
        assert (m.source / "f").stat().st_size == MiB and not writer.finished(0)
        assert freezer.finished(RELEASE)
        assert isinstance(freezer.error, ControlError) and freezer.error.kind == "busy"
        assert m.client.stats()["frozen"] is False
        assert writer.finished(RELEASE + 10)
    finally:
        os.close(fd)
