"""I/O limits: token buckets hold the configured rate within 20% over a few
seconds, can be changed live, and 0 means unlimited.

Rates are measured from the test's side (bytes or operations completed over
wall time), so they include everything a pod would see.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fusefs.conftest import Mounted

pytestmark = pytest.mark.privileged

MiB = 1 << 20
WINDOW = 3.0


def write_rate(path: Path, chunk: int, seconds: float = WINDOW) -> tuple[float, float]:
    """(bytes/s, writes/s) of back-to-back writes of ``chunk`` bytes."""
    data = b"x" * chunk
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        done = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            os.pwrite(fd, data, done * chunk % (8 * MiB))
            done += 1
        elapsed = time.monotonic() - start
    finally:
        os.close(fd)
    return done * chunk / elapsed, done / elapsed


def read_rate(path: Path, chunk: int, seconds: float = WINDOW) -> float:
    """bytes/s of reads that reach the daemon (O_DIRECT: no page cache)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    size = os.fstat(fd).st_size
    import mmap

    buf = mmap.mmap(-1, chunk)
    try:
        done = 0
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            os.preadv(fd, [buf], done * chunk % size)
            done += 1
        elapsed = time.monotonic() - start
    finally:
        os.close(fd)
    return done * chunk / elapsed


def test_byte_limit_holds_within_20_percent(start_session: Callable[..., Mounted]) -> None:
    limit = 20 * MiB
    m = start_session(bytes_per_second=limit)
    rate, _ = write_rate(m.mountpoint / "f", MiB)
    assert 0.8 * limit <= rate <= 1.2 * limit, f"{rate / MiB:.1f} MiB/s against a {limit / MiB:.0f} MiB/s limit"


def test_byte_limit_applies_to_reads(start_session: Callable[..., Mounted]) -> None:
    limit = 20 * MiB
    m = start_session(populate=lambda src: (src / "f").write_bytes(b"r" * (16 * MiB)), bytes_per_second=limit)
    rate = read_rate(m.mountpoint / "f", MiB)
    assert 0.8 * limit <= rate <= 1.2 * limit, f"{rate / MiB:.1f} MiB/s against a {limit / MiB:.0f} MiB/s limit"


def test_ops_limit_holds_within_20_percent(start_session: Callable[..., Mounted]) -> None:
    limit = 300
    m = start_session(ops_per_second=limit)
    _, ops = write_rate(m.mountpoint / "f", 4096)
    assert 0.8 * limit <= ops <= 1.2 * limit, f"{ops:.0f} ops/s against a limit of {limit}"


def test_limits_change_live(start_session: Callable[..., Mounted]) -> None:
    m = start_session()
    f = m.mountpoint / "f"
    m.client.set_limits(bytes_per_second=10 * MiB, ops_per_second=0)
    slow, _ = write_rate(f, MiB)
    assert 0.8 * 10 * MiB <= slow <= 1.2 * 10 * MiB
    m.client.set_limits(bytes_per_second=40 * MiB, ops_per_second=0)
    faster, _ = write_rate(f, MiB)
    assert 0.8 * 40 * MiB <= faster <= 1.2 * 40 * MiB
    assert m.client.set_limits(0, 0) == {"limits": {"bytes_per_second": 0, "ops_per_second": 0}}
    unlimited, _ = write_rate(f, MiB, seconds=1.0)
    assert unlimited > 1.2 * 40 * MiB  # well past the old limit (the disk is much faster)
    assert m.client.stats()["limits"] == {"bytes_per_second": 0, "ops_per_second": 0}
    with pytest.raises(ValueError):
        m.client.set_limits(-1, 0)


def test_limits_do_not_slow_metadata(start_session: Callable[..., Mounted]) -> None:
    """Only data operations are limited: a throttled volume still lists and stats."""
    m = start_session(ops_per_second=1)
    for i in range(20):
        (m.source / f"f{i}").write_bytes(b"")
    start = time.monotonic()
    for _ in range(5):
        assert len(os.listdir(m.mountpoint)) == 20
        for i in range(20):
            os.stat(m.mountpoint / f"f{i}")
    assert time.monotonic() - start < 10
