"""Fixtures for the fusefs filesystem tests: real sessions on real FUSE mounts.

``start_session(**options)`` runs ``python -m fusefs.session`` exactly as the
daemon does, waits until its control socket answers ``ping`` (which the
session only does once its mount is live), and returns a :class:`Mounted`.
Everything is torn down at the end of the test: SIGTERM first (the session
unmounts itself), then a lazy unmount and SIGKILL for a session that hung.

The base directory is world-traversable (0755) so that tests which drop to
an unprivileged uid can reach the mount and the plain comparison directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from fusefs.control import SessionClient

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def mountinfo_entry(mountpoint: str) -> tuple[str, str] | None:
    """(fstype, source) of the topmost mount at ``mountpoint``, if any."""
    target = os.path.realpath(mountpoint)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(" "), right.split(" ")
            if fields[4].replace("\\040", " ") == target:
                found = (rfields[0], rfields[1])
    return found


def is_mounted(mountpoint: str) -> bool:
    return mountinfo_entry(mountpoint) is not None


def force_unmount(mountpoint: str) -> None:
    """Lazy unmount, for a session that did not clean up after itself."""
    for argv in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if not is_mounted(mountpoint):
            return
        subprocess.run(argv, capture_output=True, check=False)


@dataclass
class Mounted:
    """A running session: where it is mounted and how to talk to it."""

    volume_id: str
    source: Path
    mountpoint: Path
    socket: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    #: The session's --engine (libfuse or kernel).
    engine: str = "libfuse"
    client: SessionClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = SessionClient(self.socket, timeout=30.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the session; returns its exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                force_unmount(str(self.mountpoint))
                return None
        force_unmount(str(self.mountpoint))
        return self.proc.returncode


@pytest.fixture
def base_dir() -> Iterator[Path]:
    """A 0755 scratch directory that unprivileged uids can traverse."""
    path = Path(tempfile.mkdtemp(prefix="fusefs-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_session(base_dir: Path) -> Iterator[Callable[..., Mounted]]:
    """Factory: ``start_session(capacity=..., read_only=..., extra=[...])``."""
    with session_starter(base_dir) as start:
        yield start


def chosen_engine() -> str:
    """The engine a test run uses for sessions and daemons it does not pin:
    ``$FUSEFS_TEST_ENGINE`` (kernel or libfuse), kernel by default."""
    return os.environ.get("FUSEFS_TEST_ENGINE", "kernel")


@contextlib.contextmanager
def session_starter(base_dir: Path, engine: str | None = None) -> Iterator[Callable[..., Mounted]]:
    """The factory behind ``start_session``, usable for any fixture scope.
    ``engine`` is the session's ``--engine`` (libfuse or kernel); by default
    ``$FUSEFS_TEST_ENGINE`` or kernel, so a whole suite can be run on either."""
    engine = engine or chosen_engine()
    started: list[Mounted] = []

    def start(capacity: int = 64 << 20, read_only: bool = False, bytes_per_second: int = 0,
              ops_per_second: int = 0, extra: list[str] | None = None,
              populate: Callable[[Path], Any] | None = None, name: str | None = None) -> Mounted:
        name = name or f"s{len(started)}"
        source, mountpoint = base_dir / f"{name}-src", base_dir / f"{name}-mnt"
        source.mkdir(mode=0o755)
        mountpoint.mkdir(mode=0o755)
        source.chmod(0o755)  # the mount's root shows the source's mode
        if populate is not None:
            populate(source)
        volume_id = f"vol-{uuid.uuid4().hex}"
        sock = str(base_dir / f"{name}.sock")
        log_path = base_dir / f"{name}.log"
        argv = [sys.executable, "-m", "fusefs.session", "--volume-id", volume_id,
                "--source", str(source), "--mountpoint", str(mountpoint), "--control-socket", sock,
                "--capacity", str(capacity)]
        if read_only:
            argv.append("--read-only")
        if bytes_per_second:
            argv += ["--io-bytes-per-second", str(bytes_per_second)]
        if ops_per_second:
            argv += ["--io-ops-per-second", str(ops_per_second)]
        argv.append(f"--engine={engine}")
        argv += extra or []
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        mounted = Mounted(volume_id, source, mountpoint, sock, proc, log_path, engine)
        started.append(mounted)
        wait_ready(mounted)
        return mounted

    try:
        yield start
    finally:
        for mounted in reversed(started):
            code = mounted.stop()
            # Shown by pytest only when the test failed: the session's own story.
            print(f"--- session {mounted.volume_id} (exit {code}) log tail ---")
            print("\n".join(mounted.log().splitlines()[-30:]))


def wait_ready(mounted: Mounted, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mounted.proc.poll() is not None:
            raise AssertionError(f"session exited with {mounted.proc.returncode}:\n{mounted.log()}")
        try:
            if mounted.client.ping()["ready"]:
                return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError(f"session not ready after {timeout}s:\n{mounted.log()}")


@pytest.fixture
def mounted(start_session: Callable[..., Mounted]) -> Mounted:
    """One session with a 64 MiB quota."""
    return start_session()


def run_as(uid: int, gid: int, func: Callable[[], Any], groups: tuple[int, ...] = ()) -> Any:
    """Run ``func`` in a forked child with real/effective/saved ids dropped.

    The child returns ``func()``'s result (anything picklable) or the
    exception it raised; exceptions are re-raised in the parent.
    """
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            try:
                payload = ("ok", func())
            except BaseException as exc:  # noqa: BLE001 - shipped to the parent
                payload = ("err", exc)
            data = pickle.dumps(payload)
            with os.fdopen(w, "wb") as out:
                out.write(data)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "child failed before reporting"
    kind, value = pickle.loads(data)
    if kind == "err":
        raise value
    return value
