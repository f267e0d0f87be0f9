"""One driver per data directory, and never a live socket taken over.

Two drivers on one ``--data-dir`` would reconcile each other's half-made
volumes, move each other's directories to ``lost+found/`` and fight over the
embedded fusefs daemon. So the first thing a driver does, before it reads or
repairs anything, is take an flock on ``<data-dir>/driver.lock`` (the kernel
drops it when the process dies, however it dies). A socket path that already
accepts connections belongs to a running server: unlinking it would leave
that server alive and unreachable, so it is refused, not replaced.

Failures here are ``StartupError``: ``fusepath-csi`` prints them as one line
on stderr and exits non-zero, with no traceback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = "driver.lock"


class StartupError(Exception):
    """The driver cannot start; the message is the whole story, for one line on stderr."""


def lock_path(data_dir: Path) -> Path:
    return Path(data_dir) / LOCK_NAME


def holder_pid(data_dir: Path) -> int | None:
    """The PID written in the lock file (it may be stale: the flock is the truth)."""
    try:
        return int(lock_path(data_dir).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def hold_data_dir(data_dir: Path) -> int:
    """Take the data directory's lock for the life of this process; returns the fd.

    The fd is close-on-exec, so the embedded fusefs daemon we start never
    inherits it (it would otherwise keep the directory locked after we exit).
    """
    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(data_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"cannot use data dir {data_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            pid = holder_pid(data_dir)
            who = f"another driver (pid {pid})" if pid else "another driver"
            raise StartupError(f"{who} already uses data dir {data_dir}; stop it first, "
                               "or give this one its own --data-dir") from None
        raise StartupError(f"cannot lock data dir {data_dir}: {exc.strerror}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def socket_answers(path: Path, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def refuse_live_socket(path: Path) -> None:
    """Raise when ``path`` is a socket some process still serves."""
    if socket_answers(path):
        raise StartupError(f"{path} is already served by another process; not replacing its socket "
                           "(stop that process, or choose another --endpoint)")
