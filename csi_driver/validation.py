"""Checks on everything that arrives in a request, before it touches the disk.

The rule (DESIGN §6): an ID or a path from a request never reaches the
filesystem unvalidated. IDs are generated here and accepted only in exactly
that form, so an ID that does not match is simply NOT_FOUND; it can never be
turned into ``../../etc``. Paths must be absolute, normalised and under the
kubelet directory.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path

from csi_driver import errors
from fusefs import safepath

VOLUME_PREFIX = "vol-"
SNAPSHOT_PREFIX = "snap-"
GROUP_SNAPSHOT_PREFIX = "group-"

_ID_RE = re.compile(r"(vol|snap|group)-[0-9a-f]{32}")  # always fullmatch: "$" allows a trailing newline

# CSI "Size Limits": strings up to 128 bytes, maps up to 4 KiB in total.
MAX_STRING_BYTES = 128
MAX_MAP_BYTES = 4096
# Kubelet-chosen IDs (ephemeral inline volumes) are names, not paths.
_FOREIGN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def new_id(prefix: str) -> str:
    """A fresh ID of the only form this driver accepts back."""
    return f"{prefix}{uuid.uuid4().hex}"


def is_id(value: str, prefix: str) -> bool:
    """True when ``value`` is an ID this driver could have generated with ``prefix``."""
    return value.startswith(prefix) and _ID_RE.fullmatch(value) is not None


def require_field(value: str, field: str) -> str:
    """Required string fields: present, within the spec's size limit."""
    if not value:
        raise errors.invalid(f"{field} is required")
    return check_string(value, field)


def check_string(value: str, field: str) -> str:
    if len(value.encode()) > MAX_STRING_BYTES:
        raise errors.invalid(f"{field} is longer than {MAX_STRING_BYTES} bytes")
    return value


def check_map(values: Mapping[str, str], field: str) -> dict[str, str]:
    size = sum(len(k.encode()) + len(v.encode()) for k, v in values.items())
    if size > MAX_MAP_BYTES:
        raise errors.invalid(f"{field} is larger than {MAX_MAP_BYTES} bytes")
    return dict(values)


def require_volume_id(value: str) -> str:
    """A volume ID field: required and size-checked. Existence is the caller's NOT_FOUND."""
    return require_field(value, "volume_id")


def check_foreign_id(value: str, field: str) -> str:
    """An ID the CO chose (an ephemeral volume handle): a plain name, never a path."""
    if not _FOREIGN_ID_RE.fullmatch(value) or value in (".", ".."):
        raise errors.invalid(f"{field} {value!r} must be 1-128 characters of [A-Za-z0-9._-]")
    return value


def check_kubelet_path(value: str, field: str, kubelet_dir: Path) -> Path:
    """An absolute, normalised path strictly under ``kubelet_dir``; see :func:`node_path`."""
    return node_path(value, field, kubelet_dir)[0]


def node_path(value: str, field: str, kubelet_dir: Path) -> tuple[Path, str]:
    """A staging or target path the node may act on, and what is there now.

    The path must be absolute, normalised (``os.path.normpath`` equality
    rejects ``..``, ``//`` and trailing slashes instead of silently fixing
    them) and strictly under ``kubelet_dir``. Below the kubelet directory no
    component may be a symlink, and the path may not lie inside any mount
    (another pod's volume, fusefs or not): the driver never creates, removes
    or mounts anything inside a filesystem it does not own (the one
    exception: ``safepath.walk_kubelet_path``). The check reads
    mountinfo and lstat()s only components that are not mount points, so it
    never sends a request to a FUSE mount (a stuck one would block it).

    Returns the path and its kind (``fusefs.safepath``: mount, directory,
    file, other or missing).
    """
    if not value:
        raise errors.invalid(f"{field} is required")
    if "\x00" in value or len(value.encode()) > 4096:
        raise errors.invalid(f"{field} is not a valid path")
    if not os.path.isabs(value) or os.path.normpath(value) != value:
        raise errors.invalid(f"{field} {value!r} must be an absolute, normalised path")
    root = os.path.realpath(kubelet_dir)  # the admin's directory: trusted, and not a mount of ours
    for prefix in (str(kubelet_dir).rstrip("/"), root.rstrip("/")):
        if value.startswith(prefix + "/") and value != prefix:
            real = root.rstrip("/") + value[len(prefix):]
            break
    else:
        raise errors.invalid(f"{field} {value!r} is not under the kubelet directory {str(kubelet_dir)!r}")
    found = safepath.walk_kubelet_path(real, root)
    if found.symlink:
        raise errors.invalid(f"{field} {value!r} goes through a symlink at {found.symlink}")
    if found.crossed_mount:
        raise errors.invalid(f"{field} {value!r} lies inside the mount at {found.crossed_mount}; "
                             "the driver never works inside a filesystem it does not own")
    if found.not_directory:
        raise errors.invalid(f"{field} {value!r}: {found.not_directory} is not a directory")
    return Path(value), found.kind


def _is_under(path: Path, root: Path) -> bool:
    return path != root and root in path.parents
