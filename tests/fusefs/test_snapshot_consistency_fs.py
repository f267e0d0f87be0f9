"""A cut taken under freeze holds whole records only.

A writer appends fixed-size records (one write(2) each, then fsync) while
the test repeatedly freezes the volume, copies the backing directory the way
a snapshot does (tar of the volume directory), and thaws. Every copy must be
a prefix of the record stream: a whole number of records, numbered from 0
without gaps, each intact.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tarfile
import threading
import time

import pytest

from tests.fusefs.conftest import Mounted

pytestmark = pytest.mark.privileged

RECORD = 1000  # not a divisor of the page size: records straddle pages
CUTS = 12


def record(seq: int) -> bytes:
    body = struct.pack("<Q", seq) + bytes([seq % 251]) * (RECORD - 8 - 32)
    return body + hashlib.sha256(body).digest()


def check_records(data: bytes) -> int:
    """Number of records in ``data``; fails on a torn or out-of-order one."""
    assert len(data) % RECORD == 0, f"torn record: {len(data)} bytes is not a multiple of {RECORD}"
    for i in range(len(data) // RECORD):
        chunk = data[i * RECORD : (i + 1) * RECORD]
        assert chunk == record(i), f"record {i} is damaged or out of order"
    return len(data) // RECORD


def tar_member(directory: str, name: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(directory, arcname=".")
    buf.seek(0)
    with tarfile.open(fileobj=buf, mode="r") as tar:
        member = tar.extractfile(f"./{name}")
        assert member is not None
        return member.read()


def test_cut_under_freeze_has_no_torn_record(mounted: Mounted) -> None:
    stop = threading.Event()
    written = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            fd = os.open(mounted.mountpoint / "log", os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
            try:
                seq = 0
                while not stop.is_set():
                    assert os.write(fd, record(seq)) == RECORD
                    os.fsync(fd)
                    seq += 1
                    written[0] = seq
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    counts = []
    try:
        synced = 0
        for _ in range(CUTS):
            deadline = time.monotonic() + 15  # the writer makes progress between cuts
            while written[0] <= synced and not errors:
                assert time.monotonic() < deadline, "the writer made no progress after a thaw"
                time.sleep(0.01)
            mounted.client.freeze(60)
            try:
                synced = written[0]
                copy = tar_member(str(mounted.source), "log")
            finally:
                mounted.client.thaw()
            n = check_records(copy)
            assert n >= synced  # everything written before the freeze is in the cut
            counts.append(n)
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors
    assert counts == sorted(counts) and counts[-1] > 0, counts
    check_records((mounted.source / "log").read_bytes())
