"""I/O limits: token buckets never let more through than the limit allows,
can be changed live, and 0 means unlimited.

No test here asserts a speed. The buckets guarantee that over any window of
``T`` seconds at most ``rate * (T + burst)`` passes, so a fixed amount of work
can never finish *sooner* than that allows: a slow or loaded machine only
makes it later, and the check cannot fail for that. That the limiter holds
the rate closely (within 20% over a few seconds) is measured by
``bench/io_limits.py``. ``throttled_seconds`` (the sum of the waits the
limiter imposed) shows which limit is in force, independent of speed.
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fusefs.limits import DEFAULT_BURST_SECONDS
from tests.fusefs.conftest import Mounted

pytestmark = pytest.mark.privileged

MiB = 1 << 20


def timed_writes(path: Path, chunk: int, count: int) -> float:
    """Seconds taken by ``count`` back-to-back writes of ``chunk`` bytes (each one request)."""
    data = b"x" * chunk
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        start = time.monotonic()
        for i in range(count):
            os.pwrite(fd, data, i * chunk % (8 * MiB))
        return time.monotonic() - start
    finally:
        os.close(fd)


def timed_reads(path: Path, chunk: int, count: int) -> float:
    """Seconds taken by ``count`` reads that all reach the daemon (O_DIRECT: no page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    buf = mmap.mmap(-1, chunk)
    try:
        start = time.monotonic()
        for i in range(count):
            os.preadv(fd, [buf], i * chunk % size)
        return time.monotonic() - start
    finally:
        os.close(fd)


def fastest_allowed(cost: float, rate: float, last: float) -> float:
    """The least time ``cost`` units can take through a bucket of ``rate``: the
    burst and the last request (admitted at the start of its reservation) come free."""
    return (cost - last) / rate - DEFAULT_BURST_SECONDS


def test_byte_limit_is_never_exceeded_by_writes(start_session: Callable[..., Mounted]) -> None:
    limit = 20 * MiB
    m = start_session(bytes_per_second=limit)
    seconds = timed_writes(m.mountpoint / "f", MiB, 30)
    assert seconds >= fastest_allowed(30 * MiB, limit, MiB), f"30 MiB in {seconds:.2f}s at a 20 MiB/s limit"
    assert m.client.stats()["throttled_seconds"] > 0


def test_byte_limit_applies_to_reads(start_session: Callable[..., Mounted]) -> None:
    limit = 20 * MiB
    m = start_session(populate=lambda src: (src / "f").write_bytes(b"r" * (16 * MiB)), bytes_per_second=limit)
    seconds = timed_reads(m.mountpoint / "f", MiB, 30)
    assert seconds >= fastest_allowed(30 * MiB, limit, MiB), f"30 MiB read in {seconds:.2f}s at 20 MiB/s"
    assert m.client.stats()["throttled_seconds"] > 0


def test_ops_limit_is_never_exceeded(start_session: Callable[..., Mounted]) -> None:
    limit = 300
    m = start_session(ops_per_second=limit)
    seconds = timed_writes(m.mountpoint / "f", 4096, 450)
    assert seconds >= fastest_allowed(450, limit, 1), f"450 writes in {seconds:.2f}s at 300 ops/s"
    assert m.client.stats()["throttled_seconds"] > 0


def test_limits_change_live(start_session: Callable[..., Mounted]) -> None:
    m = start_session()
    f = m.mountpoint / "f"

    def throttled() -> float:
        return float(m.client.stats()["throttled_seconds"])

    m.client.set_limits(bytes_per_second=10 * MiB, ops_per_second=0)
    seconds = timed_writes(f, MiB, 10)
    assert seconds >= fastest_allowed(10 * MiB, 10 * MiB, MiB)
    # Raised: the waits imposed for 20 MiB are at most 20 MiB / 40 MiB/s = 0.5 s
    # (a slower writer only waits less); at the old 10 MiB/s they would be ~2 s.
    m.client.set_limits(bytes_per_second=40 * MiB, ops_per_second=0)
    before = throttled()
    seconds = timed_writes(f, MiB, 20)
    assert seconds >= fastest_allowed(20 * MiB, 40 * MiB, MiB)
    assert throttled() - before <= 20 / 40 + 0.1
    # Removed: no wait at all any more.
    assert m.client.set_limits(0, 0) == {"limits": {"bytes_per_second": 0, "ops_per_second": 0}}
    before = throttled()
    timed_writes(f, MiB, 20)
    assert throttled() == before
    assert m.client.stats()["limits"] == {"bytes_per_second": 0, "ops_per_second": 0}
    with pytest.raises(ValueError):
        m.client.set_limits(-1, 0)


def test_limits_do_not_slow_metadata(start_session: Callable[..., Mounted]) -> None:
    """Only data operations are limited: a throttled volume still lists and stats."""
    m = start_session(ops_per_second=1)
    for i in range(20):
        (m.source / f"f{i}").write_bytes(b"")
    assert len(os.listdir(m.mountpoint)) == 20
    for i in range(20):
        os.stat(m.mountpoint / f"f{i}")
    assert m.client.stats()["throttled_seconds"] == 0  # at 1 op/s, any of these would have waited
