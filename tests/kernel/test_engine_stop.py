"""A stopping session lets go of its /dev/fuse descriptors without closing
their numbers: a worker between two requests must never read (and answer
on) a descriptor number the process has since reused for another file, such
as the usage file it persists right after. Driven on the engine with a pipe
standing for /dev/fuse."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fusefs.kernel import protocol as p
from fusefs.kernel.engine import Engine, EngineOptions
from fusefs.kernel.inodefs import InodeFs
from fusefs.quota import Quota


def test_released_descriptors_read_end_of_file_and_the_workers_exit(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    fs = InodeFs(str(tmp_path / "v"), quota=Quota(1 << 20, 0, 1))
    engine = Engine(fs, EngineOptions(min_workers=1, max_workers=1, clones=0))
    r, w = os.pipe()
    engine.devices = [r]
    engine.close_devices()
    # The number is still taken (by /dev/null), so nothing can reuse it...
    assert os.fstat(r).st_rdev == os.stat(os.devnull).st_rdev
    with pytest.raises(BrokenPipeError):  # the pipe's read end is gone
        os.write(w, p.IN_HEADER.pack(56, p.GETATTR, 2, 1, 0, 0, 0, 0, 0) + bytes(16))
    os.close(w)
    engine.start()
    # ...and a worker reading it sees end-of-file and stops, answering nothing.
    deadline = time.monotonic() + 10
    while not engine.stopped.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stopped.is_set()
    assert "getattr" not in engine.stats.snapshot()["ops"]
    os.close(r)


def test_an_interrupt_read_before_its_request_still_interrupts_it(tmp_path: Path) -> None:
    """The kernel sends INTERRUPT once its request has been read; another
    worker may read the INTERRUPT before the worker that read the request
    has registered it. It must not be lost: here the INTERRUPT comes first
    (one worker, a seqpacket socket standing for /dev/fuse), then a mkdir
    that a freeze parks; the mkdir must end at once with EINTR, not wait for
    the thaw."""
    import errno
    import socket

    from fusefs.freeze import FreezeGate

    (tmp_path / "v").mkdir()
    gate = FreezeGate()
    fs = InodeFs(str(tmp_path / "v"), quota=Quota(1 << 20, 0, 1), gate=gate)
    engine = Engine(fs, EngineOptions(min_workers=1, max_workers=1, clones=0))
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    engine.devices = [ours.fileno()]
    gate.freeze(60)
    try:
        unique = 1000
        interrupt = p.IN_HEADER.pack(48, p.INTERRUPT, unique | 1, 0, 0, 0, 0, 0, 0) + p.INTERRUPT_IN.pack(unique)
        mkdir = p.IN_HEADER.pack(50, p.MKDIR, unique, 1, 0, 0, 0, 0, 0) + p.MKDIR_IN.pack(0o755, 0) + b"d\0"
        kernel.send(interrupt)
        kernel.send(mkdir)
        engine.start()
        kernel.settimeout(5)
        reply = kernel.recv(4096)
        _, error, answered = p.OUT_HEADER.unpack_from(reply, 0)
        assert (answered, error) == (unique, -errno.EINTR)
        assert not (tmp_path / "v" / "d").exists()
    finally:
        gate.thaw()
        kernel.close()  # the worker reads end-of-file and exits...
        deadline = time.monotonic() + 10
        while not engine.stopped.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        ours.close()  # ...before its descriptor number can be reused (the next test's pipe)
