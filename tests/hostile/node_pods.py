"""Shared helpers for the node's hostile-pod tests: pods played by real processes.

A "pod" here is a volume staged and published through the real driver
(``tests.test_node_fusefs.Pod``) plus processes that run as uid 1000 through
``setpriv``, as a container's unprivileged user would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fusefs.client import FuseFSClient
from tests.harness import Driver

POD_UID = 1000
#: The system interpreter: readable by uid 1000, unlike a venv under /root.
SYSTEM_PYTHON = "/usr/bin/python3"


def as_pod_user(*argv: str) -> list[str]:
    """``argv`` run as uid/gid 1000 with no supplementary groups."""
    return ["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", "--", *argv]


def session_pid(driver: Driver, volume_id: str) -> int:
    """The PID of the FUSE session process serving ``volume_id``."""
    with FuseFSClient(f"unix://{driver.data_dir / 'fusefs.sock'}") as fusefs:
        return next(v.pid for v in fusefs.list() if v.volume_id == volume_id)


def gone_within(proc: subprocess.Popen, timeout: float) -> float | None:
    """Seconds until ``proc`` is reaped, or None when it is still there after ``timeout``."""
    start = time.monotonic()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.monotonic() - start


def threads_in_fuse(pid: int) -> int:
    """How many threads of ``pid`` sleep in a FUSE request (their wchan says so)."""
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            wchan = Path(f"/proc/{pid}/task/{tid}/wchan").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        count += "fuse" in wchan or "request_wait_answer" in wchan
    return count


def wait_blocked_in_fuse(pid: int, timeout: float = 10.0) -> bool:
    """Wait until some thread of ``pid`` sleeps in a FUSE request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if threads_in_fuse(pid):
                return True
        except OSError:
            return False  # the process is gone
        time.sleep(0.02)
    return False


@pytest.fixture
def pod_driver() -> Iterator[Driver]:
    """A driver whose kubelet directory uid 1000 can traverse (pytest's tmp_path is 0700)."""
    root = Path(tempfile.mkdtemp(prefix="fusepath-hostile-", dir="/tmp"))
    root.chmod(0o755)
    d = Driver(root)
    d.start()
    try:
        yield d
    finally:
        d.teardown()
        shutil.rmtree(root, ignore_errors=True)
