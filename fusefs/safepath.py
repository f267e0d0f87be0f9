"""Looking at a path under the kubelet directory without entering any mount.

``os.path.realpath`` lstat()s every component, the last one too: on a
publish target that is a FUSE mount point that is a request to the volume's
session, which blocks forever when the session is stuck. And a path whose
parent chain crosses a mount leads into a filesystem the caller does not own
(another pod's volume). :func:`walk` resolves a path component by component
from a trusted root, with the mount table from ``/proc/self/mountinfo``
consulted *before* each lstat, so it stops at the first mount point and
never asks a mounted filesystem anything.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from fusefs import mountinfo

MOUNT, DIRECTORY, FILE, OTHER, MISSING = "mount", "directory", "file", "other", "missing"


@dataclass(frozen=True)
class Walk:
    """What :func:`walk` found.

    ``crossed_mount``: the first mount point strictly between the root and the
    path's last component ("" when none). ``symlink``: the first existing
    component that is a symlink (""). ``not_directory``: an existing ancestor
    that is not a directory (""). ``kind``: what the last component is
    (MOUNT when it is a mount point, which is not looked at).
    """

    crossed_mount: str
    symlink: str
    not_directory: str
    kind: str


def mount_points() -> set[str]:
    """Every mount point of this mount namespace."""
    return {entry.mount_point for entry in mountinfo.read()}


def walk_kubelet_path(path: str, kubelet_dir: str) -> Walk:
    """:func:`walk` below the kubelet directory, with the one kind of mount a
    node path may cross: a non-FUSE mount directly below the kubelet
    directory (a separate disk for ``pods/``), which is the kubelet's own
    layout and never a volume. Any other mount on the way is someone's
    volume."""
    entries = mountinfo.read()
    prefix = kubelet_dir.rstrip("/") + "/"
    crossable = frozenset(e.mount_point for e in entries if e.mount_point.startswith(prefix)
                          and "/" not in e.mount_point[len(prefix):] and not e.fs_type.startswith("fuse"))
    return walk(path, kubelet_dir, {e.mount_point for e in entries}, crossable)


def walk(path: str, root: str, mounts: set[str] | None = None, crossable: frozenset[str] = frozenset()) -> Walk:
    """Resolve ``path`` (normalised, strictly under ``root``) without entering a mount.

    ``root`` is trusted (an admin-configured directory, already a realpath);
    only the components below it are looked at. Mount points in
    ``crossable`` are walked through like directories (the caller vouches
    for them).
    """
    mounts = mount_points() if mounts is None else mounts
    parts = path[len(root.rstrip("/")) + 1:].split("/")
    current = root.rstrip("/")
    for i, part in enumerate(parts):
        current = f"{current}/{part}"
        last = i == len(parts) - 1
        if current in mounts and (last or current not in crossable):
            return Walk("" if last else current, "", "", MOUNT if last else MISSING)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return Walk("", "", "", MISSING)
        except NotADirectoryError:
            return Walk("", "", current.rsplit("/", 1)[0], MISSING)
        if stat.S_ISLNK(st.st_mode):
            return Walk("", current, "", OTHER)
        if last:
            kind = DIRECTORY if stat.S_ISDIR(st.st_mode) else FILE if stat.S_ISREG(st.st_mode) else OTHER
            return Walk("", "", "", kind)
        if not stat.S_ISDIR(st.st_mode):
            return Walk("", "", current, MISSING)
    return Walk("", "", "", MISSING)  # pragma: no cover - parts is never empty
