"""Mount helpers in the idempotent "be_*" style: each one makes a state true.

``be_bind_mounted(src, dst)`` leaves ``dst`` bind-mounted from ``src`` whether
it was already, was not, or was half done by a crashed earlier call.
``be_unmounted(path)`` leaves nothing mounted at ``path``, including a dead
FUSE mount that answers ENOTCONN. The CO retries everything, so these are
safe to call any number of times.

mountinfo is the truth about what is mounted: we parse
``/proc/self/mountinfo`` instead of trusting our own records.
"""

from __future__ import annotations

import errno
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    options: frozenset[str]
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 6 or len(rfields) < 2:
            continue
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                major_minor=fields[2],
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fs_type=rfields[0],
                source=_unescape(rfields[1]),
                super_options=frozenset(rfields[2].split(",")) if len(rfields) > 2 else frozenset(),
            )
        )
    return entries


def mounts_at(path: Path | str) -> list[MountEntry]:
    """Every mount stacked at ``path``, bottom first (the last one is visible)."""
    target = str(path)
    return [e for e in parse_mountinfo(MOUNTINFO.read_text()) if e.mount_point == target]


def top_mount(path: Path | str) -> MountEntry | None:
    entries = mounts_at(path)
    return entries[-1] if entries else None


def is_mounted(path: Path | str) -> bool:
    return bool(mounts_at(path))


def path_is_dead(path: Path | str) -> bool:
    """True for a mount whose FUSE server is gone (ENOTCONN) or a stale handle."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno in (errno.ENOTCONN, errno.ESTALE, errno.EIO)
    return False


def _run(args: list[str]) -> None:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")


def be_bind_mounted(source: Path, target: Path, read_only: bool) -> None:
    """Make ``target`` a bind mount of ``source``, read-only when asked.

    A read-only bind takes two steps in Linux (bind, then remount ro), and a
    crash between them would leave a writable mount; so the check below looks
    at the *current* state and finishes whatever is missing.
    """
    entry = top_mount(target)
    if entry is None or path_is_dead(target):
        if entry is not None:
            be_unmounted(target)
        _run(["mount", "--bind", "--", str(source), str(target)])
        entry = top_mount(target)
    if entry is not None and read_only and not entry.read_only:
        _run(["mount", "-o", "remount,bind,ro", "--", str(target)])


def be_unmounted(path: Path) -> None:
    """Unmount everything stacked at ``path``; no-op when nothing is.

    A lazy (detach) unmount is used for dead FUSE mounts, which a normal
    unmount can refuse with EBUSY or ENOTCONN.
    """
    for _ in range(16):  # bounded: a path can hold a small stack of mounts
        if not is_mounted(path):
            return
        proc = subprocess.run(["umount", "--", str(path)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            _run(["umount", "--lazy", "--", str(path)])
    if is_mounted(path):
        raise OSError(f"{path} is still mounted after repeated unmounts")


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
