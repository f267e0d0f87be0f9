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
