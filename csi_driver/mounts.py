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
import stat
import subprocess
from pathlib import Path

from csi_driver import errors
from fusefs import bindmount, mountinfo, probe
from fusefs.mountinfo import MountEntry

__all__ = ["MountEntry", "be_absent", "be_bind_mounted", "be_directory", "be_file", "be_unmounted",
           "be_absent_file", "is_mounted", "mount_state", "path_is_dead", "top_mount"]


def top_mount(path: Path | str) -> MountEntry | None:
    """The mount visible at ``path`` (the last one stacked there), if any."""
    return mountinfo.top_mount(str(path))


def is_mounted(path: Path | str) -> bool:
    return bool(mountinfo.mounts_at(str(path)))


def path_is_dead(path: Path | str) -> bool:
    """True for a mount whose FUSE server is gone (ENOTCONN) or a stale handle.

    The stat is bounded (``fusefs.probe``): a mount that does not answer is
    not dead, just stuck, and says so through :func:`mount_state`.
    """
    return mount_state(path) == DEAD


DEAD, HUNG, ALIVE = "dead", "hung", "alive"


def mount_state(path: Path | str) -> str:
    """DEAD (ENOTCONN, ESTALE, EIO), HUNG (no answer within the probe's
    bound) or ALIVE, without ever blocking the caller on a stuck mount."""
    result = probe.stat_within(str(path))
    if result.state == probe.HUNG:
        return HUNG
    if result.state == probe.ERROR and result.errno in (errno.ENOTCONN, errno.ESTALE, errno.EIO):
        return DEAD
    return ALIVE


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
    """Remove an unmounted, *empty* directory; a no-op when it is gone.

    Only rmdir(2): it cannot remove a file or a non-empty directory, so a
    path that turns out to hold someone's data (a pod's file, a directory the
    CO filled) is left alone, whatever the request said. Raises OSError
    (ENOTEMPTY, ENOTDIR...) for the caller to report.
    """
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass


def be_absent_file(path: Path) -> None:
    """Remove the empty regular file a block volume was bind-mounted on.

    Only such a file (we created it, empty, as the mount point): anything
    else, or a file that has data, stays.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        be_absent(path)
    elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
        os.unlink(path)
    else:
        raise OSError(errno.EEXIST, f"{path} is not an empty file; left in place")


def be_directory(path: Path) -> None:
    """Make ``path`` a directory, clearing a dead mount sitting on it first.

    A mount point is never stat()ed unbounded: a live mount is taken as it
    is, a dead one is detached, and one that does not answer is an error the
    CO can retry (UNAVAILABLE).
    """
    if is_mounted(path):
        state = mount_state(path)
        if state == HUNG:
            raise errors.unavailable(f"the mount at {path} does not answer; try again later")
        if state == ALIVE:
            return
        be_unmounted(path)
    path.mkdir(parents=True, exist_ok=True)


def be_file(path: Path) -> None:
    """Make ``path`` an empty regular file: the mount point of a block device bind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.touch()
