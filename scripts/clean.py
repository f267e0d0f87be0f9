#!/usr/bin/env python3
"""``make clean``: delete the local run directory and the venv, never through a mount.

A plain ``rm -rf .run`` after ``make run`` would walk into live FUSE and bind
mounts (and through a bind, into whatever directory it shows). So, holding
the run directory's driver lock (no driver can start meanwhile):

1. refuse while a driver still runs on ``RUN_DIR/data`` (it holds that lock);
2. stop a leftover embedded fusefs daemon of ``RUN_DIR/data`` (it would
   re-mount what we unmount);
3. unmount everything mounted under the paths, deepest first; unmounting
   never deletes data;
4. refuse, listing them, if any mount is still there;
5. only then delete, with ``rm --one-file-system`` as a second guard.

Standard library only: it runs with the system ``python3``, even when the
venv is broken or gone.

    scripts/clean.py --run-dir .run .run .venv .pytest_cache
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DAEMON_STOP_SECONDS = 20.0


class Refused(Exception):
    """Nothing was deleted; the message says why and what to do."""


def mount_points() -> list[str]:
    """Every mount point on this machine, from /proc/self/mountinfo (octal escapes decoded)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        field = line.split()[4]
        points.append(field.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace"))
    return points


def mounts_under(paths: list[Path]) -> list[str]:
    """Mount points at or below any of ``paths``, deepest first."""
    roots = [str(p) for p in paths]
    found = {m for m in mount_points() if any(m == r or m.startswith(r + "/") for r in roots)}
    return sorted(found, key=lambda p: (-p.count("/"), p))


def try_lock(path: Path) -> int | None:
    """An fd holding ``path``'s flock, or None when another process holds it (or there is no file)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def hold_driver_lock(data_dir: Path) -> int:
    """Refuse while a driver runs on ``data_dir``; else hold its lock so none starts."""
    lock = data_dir / "driver.lock"
    fd = try_lock(lock)
    if fd is None:
        pid = pid_in(lock)
        raise Refused(f"the driver{f' (pid {pid})' if pid else ''} is still running on {data_dir}: "
                      "stop it (Ctrl-C in its terminal), then run `make clean` again; nothing was deleted")
    return fd


def stop_leftover_daemon(data_dir: Path) -> None:
    """SIGTERM the embedded fusefs daemon of ``data_dir`` if one still runs, and wait for it."""
    lock = data_dir / "fusefs" / "daemon.lock"
    fd = try_lock(lock)
    if fd is not None:  # no daemon holds it
        if fd >= 0:
            os.close(fd)
        return
    pid = pid_in(lock)
    if pid is None or not is_our_daemon(pid, data_dir):
        raise Refused(f"a fusefs daemon holds {lock} but its pid is unknown; stop it, then run `make clean` "
                      "again; nothing was deleted")
    print(f"make clean: stopping the leftover fusefs daemon (pid {pid}) of {data_dir}", file=sys.stderr)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DAEMON_STOP_SECONDS
    while time.monotonic() < deadline:
        fd = try_lock(lock)
        if fd is not None:
            if fd >= 0:
                os.close(fd)
            return
        time.sleep(0.1)
    raise Refused(f"the fusefs daemon (pid {pid}) did not stop within {DAEMON_STOP_SECONDS:.0f}s; "
                  "nothing was deleted")


def is_our_daemon(pid: int, data_dir: Path) -> bool:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False
    return "serve" in args and str(data_dir / "fusefs") in args


def unmount_all(paths: list[Path]) -> None:
    """Unmount everything under ``paths``, deepest first, until nothing is left or nothing moves."""
    while True:
        left = mounts_under(paths)
        if not left:
            return
        progress = False
        for point in left:
            done = subprocess.run(["umount", "--", point], capture_output=True, text=True)
            progress |= done.returncode == 0
        if not progress:
            raise Refused("still mounted, so nothing was deleted: " + " ".join(left) +
                          "; see what holds them with `fuser -vm PATH`, unmount them, then run `make clean` again")


def delete(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", *existing], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="delete make run's directory and the venv, never through a mount")
    parser.add_argument("--run-dir", type=Path, required=True, help="make run's RUN_DIR (its data dir is RUN_DIR/data)")
    parser.add_argument("paths", nargs="+", type=Path, help="what to delete")
    args = parser.parse_args(argv)
    paths = [p.absolute() for p in args.paths]
    data_dir = args.run_dir.absolute() / "data"
    try:
        lock = hold_driver_lock(data_dir) if data_dir.is_dir() else -1  # noqa: F841 - held until exit
        if data_dir.is_dir():
            stop_leftover_daemon(data_dir)
        unmount_all(paths)
        delete(paths)
    except Refused as exc:
        print(f"make clean: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"make clean: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
