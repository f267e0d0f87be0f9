"""StorageClass, VolumeAttributesClass and VolumeSnapshotClass parameters.

Unknown keys are refused with INVALID_ARGUMENT rather than ignored: a typo
in ``ioBytesPerSecond`` silently giving an unlimited volume is exactly the
kind of surprise an operator never forgives. Keys under the
``csi.storage.k8s.io/`` prefix are metadata the sidecars add (PVC name and
namespace) and are accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Mapping

from csi_driver import errors, validation

MOUNTER = "mounter"
MOUNTERS = ("fusefs", "bind")
IO_BYTES = "ioBytesPerSecond"
IO_OPS = "ioOpsPerSecond"
MUTABLE_KEYS = (IO_BYTES, IO_OPS)
COMPRESSION = "compression"
COMPRESSIONS = ("none", "gzip", "zstd")
EPHEMERAL = "csi.storage.k8s.io/ephemeral"
EPHEMERAL_SIZE = "size"
SIDECAR_PREFIX = "csi.storage.k8s.io/"
#: Set by csi-provisioner --extra-create-metadata; returned in the volume
#: context so the node knows the PVC to post Events on.
PVC_NAME = "csi.storage.k8s.io/pvc/name"
PVC_NAMESPACE = "csi.storage.k8s.io/pvc/namespace"


def claim_context(params: Mapping[str, str]) -> dict[str, str]:
    """The PVC's name and namespace from CreateVolume parameters, when the provisioner gave both."""
    name, namespace = params.get(PVC_NAME, ""), params.get(PVC_NAMESPACE, "")
    if not name or not namespace or len(name) > 253 or len(namespace) > 63:
        return {}
    return {PVC_NAME: name, PVC_NAMESPACE: namespace}


def _non_negative_int(key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise errors.invalid(f"parameter {key}={value!r} must be a non-negative integer") from None
    if number < 0:
        raise errors.invalid(f"parameter {key}={value!r} must be a non-negative integer")
    return number


def volume_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """Validated CreateVolume parameters, normalised (mounter defaults to fusefs)."""
    params = validation.check_map(params, "parameters")
    out: dict[str, str] = {}
    for key, value in params.items():
        if key.startswith(SIDECAR_PREFIX):
            continue
        if key == MOUNTER:
            if value not in MOUNTERS:
                raise errors.invalid(f"parameter mounter={value!r} must be one of {', '.join(MOUNTERS)}")
            out[key] = value
        elif key in MUTABLE_KEYS:
            out[key] = str(_non_negative_int(key, value))
        else:
            raise errors.invalid(f"unknown parameter {key!r}; known: {MOUNTER}, {IO_BYTES}, {IO_OPS}")
    out.setdefault(MOUNTER, "fusefs")
    return out


def mutable_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """Validated mutable parameters: only the I/O limits may change live."""
    params = validation.check_map(params, "mutable_parameters")
    out: dict[str, str] = {}
    for key, value in params.items():
        if key not in MUTABLE_KEYS:
            raise errors.invalid(f"parameter {key!r} is not mutable; mutable: {IO_BYTES}, {IO_OPS}")
        out[key] = str(_non_negative_int(key, value))
    return out


def io_limits(params: Mapping[str, str]) -> tuple[int, int]:
    """(bytes/s, ops/s); 0 is unlimited."""
    return int(params.get(IO_BYTES, 0)), int(params.get(IO_OPS, 0))


def snapshot_compression(params: Mapping[str, str]) -> str:
    params = validation.check_map(params, "parameters")
    for key in params:
        if key != COMPRESSION and not key.startswith(SIDECAR_PREFIX):
            raise errors.invalid(f"unknown snapshot parameter {key!r}; known: {COMPRESSION}")
    value = params.get(COMPRESSION, "none") or "none"
    if value not in COMPRESSIONS:
        raise errors.invalid(f"parameter compression={value!r} must be one of {', '.join(COMPRESSIONS)}")
    return value
