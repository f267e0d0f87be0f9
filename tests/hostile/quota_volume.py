"""Helpers for the hostile quota tests: a volume whose session can be restarted.

A :class:`Volume` is one backing directory and one mountpoint, served by a
real ``python -m fusefs.session`` process that can be stopped (SIGTERM: a
clean unmount; SIGKILL: a crash) and started again on the same directory, as
a restage, a daemon restart or a node reboot would. ``loop_ext4`` gives a
small dedicated ext4 filesystem so that the host's ``du`` and ``df -i`` of a
backing directory can be compared with the volume's limits exactly.

Sessions run on the engine ``$FUSEFS_TEST_ENGINE`` names (kernel by
default, or libfuse), as in tests/fusefs, so these tests can be run on either.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.fusefs.conftest import REPO, Mounted, force_unmount, wait_ready

POD_UID = 1000


class Volume:
    """One volume: a backing dir served by successive sessions."""

    def __init__(self, base: Path, name: str = "v", capacity: int = 1 << 20,
                 extra: list[str] | None = None, source: Path | None = None) -> None:
        self.base = base
        self.source = source or base / f"{name}-src"
        self.mountpoint = base / f"{name}-mnt"
        self.state = base / f"{name}-state"
        self.capacity = capacity
        self.extra = extra or []
        self.volume_id = f"vol-{uuid.uuid4().hex}"
        self.source.mkdir(mode=0o755, exist_ok=True)
        self.source.chmod(0o777)
        self.mountpoint.mkdir(mode=0o755, exist_ok=True)
        self.state.mkdir(mode=0o700, exist_ok=True)
        self.session: Mounted | None = None
        self.generation = 0

    def start(self, wait: bool = True) -> Mounted:
        self.generation += 1
        sock = str(self.state / f"{self.volume_id}.sock")
        log_path = self.base / f"{self.mountpoint.name}-{self.generation}.log"
        argv = [sys.executable, "-m", "fusefs.session", "--volume-id", self.volume_id,
                "--source", str(self.source), "--mountpoint", str(self.mountpoint),
                "--control-socket", sock, "--capacity", str(self.capacity), *self.extra]
        argv.append(f"--engine={os.environ.get('FUSEFS_TEST_ENGINE', 'kernel')}")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.session = Mounted(self.volume_id, self.source, self.mountpoint, sock, proc, log_path)
        if wait:
            wait_ready(self.session)
        return self.session

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.session is not None:
            self.session.stop(sig)
            self.session = None

    def restage(self, sig: int = signal.SIGTERM) -> Mounted:
        self.stop(sig)
        return self.start()

    def stats(self) -> dict[str, Any]:
        assert self.session is not None
        return self.session.client.stats()


@contextlib.contextmanager
def volumes(base: Path) -> Iterator[list[Volume]]:
    """A list to put volumes in; every one is stopped at the end."""
    made: list[Volume] = []
    try:
        yield made
    finally:
        for v in made:
            log = v.session.log() if v.session else ""
            v.stop()
            force_unmount(str(v.mountpoint))
            print(f"--- {v.volume_id} log tail ---\n" + "\n".join(log.splitlines()[-30:]))


@contextlib.contextmanager
def loop_ext4(base: Path, size_mb: int = 256) -> Iterator[Path]:
    """A fresh ext4 filesystem on a loop device, mounted under ``base``."""
    image, mnt = base / "ext4.img", base / "ext4"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-I", "256", "-O", "^has_journal", str(image)],
                   check=True, capture_output=True)
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True, capture_output=True)
    try:
        mnt.chmod(0o755)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
        image.unlink(missing_ok=True)


def du_bytes(path: Path) -> int:
    """Allocated bytes of a tree, as the host's ``du -s --block-size=1`` says."""
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def used_inodes(fs: Path) -> int:
    sv = os.statvfs(fs)
    return sv.f_files - sv.f_ffree


def as_pod(func: Any) -> Any:
    """Run ``func`` as the pod's unprivileged uid (a forked child)."""
    from tests.fusefs.conftest import run_as

    return run_as(POD_UID, POD_UID, func)


def kill(v: Volume) -> None:
    """SIGKILL the session: a crash (no clean unmount)."""
    v.stop(signal.SIGKILL)


#: What a backing directory may hold on the host beyond the capacity: the
#: root directory's own block and one block of rounding per charge
#: reservation in flight (docs/fusefs.md, "Quota": the charging model).
DU_SLACK = 64 << 10
#: Inodes beyond the inode limit: the root directory, which is not charged.
INODE_SLACK = 1


def wait_scan_ended(v: Volume, timeout: float = 120.0) -> dict[str, Any]:
    """Stats once the volume's usage scan is no longer running, whatever it ended in."""
    import time

    deadline = time.monotonic() + timeout
    while (st := v.stats())["scan"]["state"] == "running":
        assert time.monotonic() < deadline, st["scan"]
        time.sleep(0.05)
    return st


def wait_scanned(v: Volume, timeout: float = 120.0) -> dict[str, Any]:
    """Stats once the volume's usage is known (trusted, or the scan is done)."""
    st = wait_scan_ended(v, timeout)
    assert st["scan"]["state"] in ("trusted", "done"), st["scan"]
    return st


def fill(root: Path, prefix: str, chunk: int = 64 << 10) -> int:
    """Write files of ``chunk`` bytes under ``root`` until ENOSPC; bytes written."""
    import errno

    total, i = 0, 0
    while True:
        try:
            fd = os.open(root / f"{prefix}{i}", os.O_CREAT | os.O_WRONLY, 0o644)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return total
        try:
            n = os.write(fd, b"x" * chunk)
            total += n
            if n < chunk:
                return total
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            return total
        finally:
            os.close(fd)
        i += 1


def proc_number(pid: int, file: str, prefix: str, column: int) -> int:
    """A number from ``/proc/<pid>/<file>``: the line starting with
    ``prefix``, split on blanks, item ``column``."""
    with open(f"/proc/{pid}/{file}") as f:
        for line in f:
            if line.startswith(prefix):
                return int(line.split()[column])
    raise AssertionError(f"no {prefix!r} line in /proc/{pid}/{file}")
