"""Fixtures for the kernel engine: sessions on ``--engine=kernel`` and a
descriptor holder (``python -m fusefs.kernel.handover``) for handovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fusefs.conftest import REPO, Mounted, base_dir, force_unmount, session_starter, wait_ready  # noqa: F401

ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture
def kstart(base_dir: Path) -> Iterator[Callable[..., Mounted]]:  # noqa: F811
    """``start_session`` on the kernel engine."""
    with session_starter(base_dir, "kernel") as start:
        yield start


@dataclass
class Holder:
    socket: str
    proc: subprocess.Popen[bytes]


@pytest.fixture
def holder(base_dir: Path) -> Iterator[Holder]:  # noqa: F811
    sock = str(base_dir / "holder.sock")
    proc = subprocess.Popen([sys.executable, "-m", "fusefs.kernel.handover", "--socket", sock],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    yield Holder(sock, proc)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


class Volume:
    """One volume served by successive session processes (handover tests)."""

    def __init__(self, base: Path, holder: Holder, capacity: int = 64 << 20) -> None:
        self.base = base
        self.holder = holder
        self.volume_id = f"vol-{uuid.uuid4().hex}"
        self.source = base / "src"
        self.mountpoint = base / "mnt"
        self.source.mkdir(mode=0o755)
        self.mountpoint.mkdir(mode=0o755)
        self.state = str(base / "state.json")
        self.capacity = capacity
        self.sessions: list[Mounted] = []

    def start(self, takeover: bool = False, extra: list[str] | None = None) -> Mounted:
        n = len(self.sessions)
        sock = str(self.base / f"c{n}.sock")
        log_path = self.base / f"s{n}.log"
        argv = [sys.executable, "-m", "fusefs.session", "--engine=kernel", "--volume-id", self.volume_id,
                "--source", str(self.source), "--mountpoint", str(self.mountpoint), "--control-socket", sock,
                "--capacity", str(self.capacity), "--state-file", self.state,
                "--holder-socket", self.holder.socket, *(extra or [])]
        if takeover:
            argv.append("--takeover")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=ENV)
        mounted = Mounted(self.volume_id, self.source, self.mountpoint, sock, proc, log_path, "kernel")
        self.sessions.append(mounted)
        wait_ready(mounted)
        return mounted

    def close(self) -> None:
        for m in reversed(self.sessions):
            if m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
                try:
                    m.proc.wait(15)
                except subprocess.TimeoutExpired:
                    m.proc.kill()
                    m.proc.wait(5)
        if self.holder.proc.poll() is None:
            self.holder.proc.kill()
            self.holder.proc.wait(5)
        force_unmount(str(self.mountpoint))
        for i, m in enumerate(self.sessions):
            print(f"--- session {i} (exit {m.proc.returncode}) log tail ---")
            print("\n".join(m.log().splitlines()[-20:]))


@pytest.fixture
def volume(base_dir: Path, holder: Holder) -> Iterator[Volume]:  # noqa: F811
    vol = Volume(base_dir, holder)
    try:
        yield vol
    finally:
        vol.close()


def op_count(m: Mounted, op: str) -> int:
    return int(m.client.stats().get("ops", {}).get(op, {}).get("count", 0))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
