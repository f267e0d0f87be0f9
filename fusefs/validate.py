"""Checks on every ID and path a daemon request carries (DESIGN §6).

The daemon trusts only its own socket, and even then a request never names a
host path to serve: it names a volume ID of exactly the form the driver
generates, and the daemon derives ``<volumes-dir>/<id>`` itself. The only
paths a request carries are staging and publish targets, and those must be
absolute, already normalised, free of symlinks (``realpath`` gives back the
same string) and strictly under ``--kubelet-dir``. Anything else is
INVALID_ARGUMENT rather than silently "fixed", because a caller sending such
a path has a bug, or is an attacker.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path

from fusefs import rpcerrors, safepath

VOLUME_ID_RE = re.compile(r"vol-[0-9a-f]{32}")
#: PATH_MAX; a longer path cannot be mounted anyway.
MAX_PATH_BYTES = 4096
#: CSI's limit on strings, applied to the pod fields we keep.
MAX_STRING_BYTES = 128
#: Freeze timeouts: 0 means the default, more than an hour is a mistake.
DEFAULT_FREEZE_SECONDS = 60
MAX_FREEZE_SECONDS = 3600
#: Many volumes in one Freeze is fine; thousands is a bug.
MAX_FREEZE_VOLUMES = 1024


def volume_id(value: str) -> str:
    """A ``vol-<32 lowercase hex>`` ID, or INVALID_ARGUMENT; never a path."""
    if not isinstance(value, str) or not VOLUME_ID_RE.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise rpcerrors.invalid(f"volume_id {shown!r} is not of the form vol-<32 lowercase hex>")
    return value


def volume_ids(values: Iterable[str]) -> list[str]:
    """A non-empty list of IDs, de-duplicated, in a stable (sorted) order."""
    ids = sorted({volume_id(v) for v in values})
    if not ids:
        raise rpcerrors.invalid("volume_ids is empty")
    if len(ids) > MAX_FREEZE_VOLUMES:
        raise rpcerrors.invalid(f"more than {MAX_FREEZE_VOLUMES} volume_ids")
    return ids


def kubelet_path(value: str, field: str, kubelet_dir: str) -> str:
    """An absolute, normalised, symlink-free path strictly under ``kubelet_dir``.

    ``kubelet_dir`` must itself be a realpath (the daemon resolves it once at
    start). The walk catches a symlink anywhere in the existing part of the
    path and a path inside another mount, without stat()ing any mount point
    (a stuck FUSE mount would block it); the bind code re-checks the opened directory through
    ``/proc/self/fd`` to close the window between this check and the mount.
    """
    if not value:
        raise rpcerrors.invalid(f"{field} is required")
    if "\0" in value or len(value.encode()) > MAX_PATH_BYTES:
        raise rpcerrors.invalid(f"{field} is not a usable path")
    if not value.startswith("/"):
        raise rpcerrors.invalid(f"{field} {value!r} is not absolute")
    if os.path.normpath(value) != value or value.startswith("//"):
        raise rpcerrors.invalid(f"{field} {value!r} is not normalised")
    if not is_under(value, kubelet_dir):
        raise rpcerrors.invalid(f"{field} {value!r} is not under the kubelet directory {kubelet_dir}")
    found = safepath.walk_kubelet_path(value, kubelet_dir)
    if found.symlink:
        raise rpcerrors.invalid(f"{field} {value!r} goes through a symlink")
    if found.crossed_mount:
        raise rpcerrors.invalid(f"{field} {value!r} lies inside the mount at {found.crossed_mount}")
    return value


def is_under(path: str, root: str) -> bool:
    """True when ``path`` is strictly inside ``root`` (both normalised)."""
    return path != root and path.startswith(root.rstrip("/") + "/")


def pod_field(value: str, field: str) -> str:
    """Pod namespace/name/uid: bounded strings (they only label Events)."""
    if len(value.encode()) > MAX_STRING_BYTES:
        raise rpcerrors.invalid(f"pod.{field} is longer than {MAX_STRING_BYTES} bytes")
    return value


def freeze_timeout(seconds: int) -> int:
    """The auto-thaw timeout: 0 picks the default, more than an hour is refused."""
    if seconds == 0:
        return DEFAULT_FREEZE_SECONDS
    if seconds > MAX_FREEZE_SECONDS:
        raise rpcerrors.invalid(f"timeout_seconds {seconds} is more than {MAX_FREEZE_SECONDS}")
    return seconds


def volume_source(volumes_dir: Path, vol_id: str) -> Path:
    """``<volumes-dir>/<id>``, which must be a real directory (no symlink): else NOT_FOUND."""
    source = volumes_dir / volume_id(vol_id)
    try:
        st = os.lstat(source)
    except FileNotFoundError:
        raise rpcerrors.not_found(f"volume {vol_id} does not exist on this node") from None
    if not stat.S_ISDIR(st.st_mode):
        raise rpcerrors.not_found(f"volume {vol_id} has no data directory")
    return source
