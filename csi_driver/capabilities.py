"""Which volume capabilities fusepath supports, and how to read them.

Volumes are local to one node, so every access mode that needs writers on
several nodes is refused. MULTI_NODE_READER_ONLY is accepted because readers
on this node are served; the CO's scheduler keeps them on this node through
the volume's topology.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from csi_driver import errors
from csi_driver.gen import csi_pb2

AccessMode = csi_pb2.VolumeCapability.AccessMode

SUPPORTED_MODES = frozenset(
    {
        AccessMode.SINGLE_NODE_WRITER,
        AccessMode.SINGLE_NODE_READER_ONLY,
        AccessMode.SINGLE_NODE_SINGLE_WRITER,
        AccessMode.SINGLE_NODE_MULTI_WRITER,
        AccessMode.MULTI_NODE_READER_ONLY,
    }
)
READ_ONLY_MODES = frozenset({AccessMode.SINGLE_NODE_READER_ONLY, AccessMode.MULTI_NODE_READER_ONLY})
SUPPORTED_FS_TYPES = frozenset({"", "fusefs", "ext4", "xfs"})  # fs_type is advisory: we serve a directory


def access_type(cap: csi_pb2.VolumeCapability) -> str:
    """``mount`` or ``block``; INVALID_ARGUMENT when neither is set."""
    kind = cap.WhichOneof("access_type")
    if kind not in ("mount", "block"):
        raise errors.invalid("volume_capability must set access_type to mount or block")
    return kind


def unsupported_reason(cap: csi_pb2.VolumeCapability) -> str | None:
    """Why ``cap`` cannot be served, or None when it can."""
    if not cap.HasField("access_mode"):
        return "access_mode is required"
    mode = cap.access_mode.mode
    if mode not in SUPPORTED_MODES:
        return f"access mode {AccessMode.Mode.Name(mode)} needs several nodes; volumes are local to one node"
    kind = cap.WhichOneof("access_type")
    if kind not in ("mount", "block"):
        return "access_type must be mount or block"
    if kind == "mount" and cap.mount.fs_type not in SUPPORTED_FS_TYPES:
        return f"fs_type {cap.mount.fs_type!r} is not supported"
    return None


def require_capabilities(caps: Iterable[csi_pb2.VolumeCapability], field: str = "volume_capabilities") -> list:
    """The request's capabilities, all present and supported, or INVALID_ARGUMENT."""
    caps = list(caps)
    if not caps:
        raise errors.invalid(f"{field} is required")
    for cap in caps:
        reason = unsupported_reason(cap)
        if reason:
            raise errors.invalid(reason)
    kinds = {access_type(c) for c in caps}
    if len(kinds) > 1:
        raise errors.invalid("a volume cannot be both block and mount")
    return caps


def require_capability(cap: csi_pb2.VolumeCapability, has: bool, field: str = "volume_capability") -> None:
    """A single required capability (Node RPCs): present, else INVALID_ARGUMENT."""
    if not has:
        raise errors.invalid(f"{field} is required")
    if not cap.HasField("access_mode"):
        raise errors.invalid(f"{field}.access_mode is required")
    if cap.WhichOneof("access_type") not in ("mount", "block"):
        raise errors.invalid(f"{field}.access_type must be mount or block")


def is_read_only_mode(cap: csi_pb2.VolumeCapability) -> bool:
    return cap.access_mode.mode in READ_ONLY_MODES


def summary(cap: csi_pb2.VolumeCapability) -> dict[str, Any]:
    """A comparable record of a capability, to spot an incompatible repeat."""
    kind = cap.WhichOneof("access_type")
    out: dict[str, Any] = {"access_type": kind, "mode": int(cap.access_mode.mode)}
    if kind == "mount":
        out["fs_type"] = cap.mount.fs_type
        out["mount_flags"] = sorted(cap.mount.mount_flags)
    return out
