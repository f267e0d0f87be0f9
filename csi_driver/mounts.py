"""Mount helpers in the idempotent "be_*" style: each one makes a state true.

``be_bind_mounted(src, dst)`` leaves ``dst`` bind-mounted from ``src`` whether
it was already, was not, or was half done by a crashed earlier call.
``be_unmounted(path)`` leaves nothing mounted at ``path``, including a dead
FUSE mount that answers ENOTCONN. The CO retries everything, so these are
safe to call any number of times.

The driver and the fusefs daemon share the lower layer: mountinfo parsing
(``fusefs.mountinfo``, the truth about what is mounted) and the mount(2)
syscalls (``fusefs.bindmount``, which binds through O_PATH descriptors so a
symlink swapped into a path after validation cannot redirect the mount).
Only a block device's bind onto a target *file* goes through mount(8),
because the syscall helper binds directories.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

from fusefs import bindmount, mountinfo
from fusefs.mountinfo import MountEntry

__all__ = ["MountEntry", "be_absent", "be_bind_mounted", "be_directory", "be_file", "be_unmounted",
           "is_mounted", "path_is_dead", "top_mount"]


def top_mount(path: Path | str) -> MountEntry | None:
    """The mount visible at ``path`` (the last one stacked there), if any."""
    return mountinfo.top_mount(str(path))


def is_mounted(path: Path | str) -> bool:
    return bool(mountinfo.mounts_at(str(path)))


def path_is_dead(path: Path | str) -> bool:
    """True for a mount whose FUSE server is gone (ENOTCONN) or a stale handle."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ESTALE, errno.EIO)
    return False


def be_bind_mounted(source: Path, target: Path, read_only: bool) -> None:
    """Make ``target`` a bind mount of ``source``, read-only when asked.

    A read-only bind takes two steps in Linux (bind, then remount ro), and a
    crash between them would leave a writable mount; so the check looks at
    the *current* state and finishes whatever is missing.
    """
    entry = top_mount(target)
    if entry is not None and path_is_dead(target):
        be_unmounted(target)
        entry = None
    if entry is None:
        if target.is_dir():
            bindmount.bind(str(source), str(target), read_only)
            return
        _mount_cmd(["mount", "--bind", "--", str(source), str(target)])
        entry = top_mount(target)
    if entry is not None and read_only and not entry.read_only:
        if target.is_dir():
            bindmount.remount_read_only(str(target))
        else:
            _mount_cmd(["mount", "-o", "remount,bind,ro", "--", str(target)])


def _mount_cmd(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def be_unmounted(path: Path) -> None:
    """Detach everything stacked at ``path``; a no-op when nothing is.

    Detaching is lazy (MNT_DETACH): it works on dead FUSE mounts and busy
    ones alike, and the unmount propagates to slave copies in pods.
    """
    bindmount.detach_all(str(path))


def be_absent(path: Path) -> None:
    """Remove an (unmounted) target file or empty directory; no-op when it is gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def be_directory(path: Path) -> None:
    """Make ``path`` a directory, clearing a dead mount sitting on it first."""
    if path_is_dead(path):
        be_unmounted(path)
    path.mkdir(parents=True, exist_ok=True)


def be_file(path: Path) -> None:
    """Make ``path`` an empty regular file: the mount point of a block device bind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch()
