"""How a volume reaches a pod, one class per way:

* ``FuseMounter`` (the default): the fusefs daemon mounts the volume at the
  staging path with quota, freeze, read-only and I/O limits, and binds each
  publish target from it (so it can re-bind them after its own restart).
* ``BindMounter`` (StorageClass ``mounter: bind``): a plain bind mount of the
  volume directory; native speed, no quota, no freeze.
* ``BlockMounter`` (block access): a loop device over the volume's sparse
  image, bind-mounted onto the target file; no FUSE at all.

Every method is idempotent: the CO repeats calls, and a crash can leave any
step half done.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

from csi_driver import block, errors, fdtree, mounts, parameters
from csi_driver.context import DriverContext
from csi_driver.state.store import Volume

FUSE_FSTYPE = "fuse.fusefs"
#: Deadline for the daemon's Stats answer (it bounds its own stat probes well below this).
STATS_TIMEOUT = 3.0


@dataclass(frozen=True)
class Usage:
    bytes_total: int
    bytes_used: int
    bytes_available: int
    inodes_total: int = 0
    inodes_used: int = 0
    inodes_available: int = 0
    abnormal: bool = False
    message: str = "healthy"


def fuse_source(volume_id: str) -> str:
    return f"fusepath:{volume_id}"


class BindMounter:
    name = "bind"

    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx

    def stage(self, vol: Volume, staging: Path, read_only: bool) -> str:
        mounts.be_directory(staging)
        mounts.be_bind_mounted(self.ctx.layout.volume_dir(vol.id), staging, read_only)
        return ""

    def owns(self, volume_id: str, path: Path) -> bool:
        """True when the mount at ``path`` is this volume's directory."""
        entry = mounts.top_mount(path)
        return entry is not None and (entry.root.endswith(f"/volumes/{volume_id}") or
                                      entry.root.endswith(f"/{volume_id}/{block.IMAGE_NAME}"))

    def unstage(self, volume_id: str, staging: Path, loop_device: str = "") -> None:
        if self.owns(volume_id, staging) or mounts.path_is_dead(staging):
            mounts.be_unmounted(staging)

    def publish(self, volume_id: str, staging: Path, target: Path, read_only: bool, loop_device: str,
                pod: dict[str, str] | None = None) -> None:
        mounts.be_directory(target)
        mounts.be_bind_mounted(staging, target, read_only)

    def unpublish(self, volume_id: str, target: Path) -> None:
        if mounts.is_mounted(target):
            mounts.be_unmounted(target)

    def usage(self, vol: Volume, path: Path) -> Usage:
        state = mounts.mount_state(path)
        if state == mounts.DEAD:
            return Usage(vol.capacity, 0, 0, abnormal=True, message=f"{path} is not reachable (stale mount)")
        if state == mounts.HUNG:
            return Usage(vol.capacity, 0, 0, abnormal=True, message=f"{path} does not answer stat()")
        used, inodes = _scan(self.ctx.layout.volume_dir(vol.id))
        st = os.statvfs(path)
        return Usage(
            bytes_total=vol.capacity, bytes_used=used,
            bytes_available=max(0, min(vol.capacity - used, st.f_bavail * st.f_frsize)),
            inodes_total=st.f_files, inodes_used=inodes, inodes_available=st.f_favail,
            message="healthy (bind mount: capacity is not enforced)",
        )

    def expand(self, vol: Volume, capacity: int, loop_device: str) -> None:
        """Nothing to do: a bind mount has no quota to raise."""


class FuseMounter(BindMounter):
    name = "fusefs"

    def _client(self):  # type: ignore[no-untyped-def]
        if self.ctx.fusefs is None:
            raise errors.unavailable("no fusefs daemon is configured on this node")
        return self.ctx.fusefs.client()

    def stage(self, vol: Volume, staging: Path, read_only: bool) -> str:
        mounts.be_directory(staging)
        bps, ops = parameters.io_limits({**vol.parameters, **vol.mutable_parameters})
        self._client().mount(vol.id, str(staging), vol.capacity, read_only=read_only,
                             io_bytes_per_second=bps, io_ops_per_second=ops)
        entry = mounts.top_mount(staging)
        if entry is None or entry.fs_type != FUSE_FSTYPE or entry.source != fuse_source(vol.id):
            found = f"{entry.fs_type} from {entry.source}" if entry else "nothing"
            raise errors.internal(f"after mounting, {staging} holds {found}, not fusefs volume {vol.id}")
        if not {"nosuid", "nodev"} <= set(entry.options):  # what isolation rests on: never serve without
            self._client().unmount(vol.id)
            raise errors.internal(f"fusefs mounted {vol.id} without nosuid,nodev ({','.join(entry.options)})")
        return ""

    def owns(self, volume_id: str, path: Path) -> bool:
        entry = mounts.top_mount(path)
        return entry is not None and entry.source == fuse_source(volume_id)

    def unstage(self, volume_id: str, staging: Path, loop_device: str = "") -> None:
        self._client().unmount(volume_id)
        if self.owns(volume_id, staging):  # the daemon lost track of it (e.g. its state was wiped)
            mounts.be_unmounted(staging)

    def publish(self, volume_id: str, staging: Path, target: Path, read_only: bool, loop_device: str,
                pod: dict[str, str] | None = None) -> None:
        """The daemon binds the target itself, so it can re-bind it after its own restart.

        A dead bind of this volume at the target is left for the daemon, which
        binds on top of it: detaching it here would cut off the containers
        that follow it (HostToContainer).
        """
        if not self.owns(volume_id, target):
            mounts.be_directory(target)
        self._client().publish(volume_id, str(target), read_only, pod=pod)

    def unpublish(self, volume_id: str, target: Path) -> None:
        self._client().unpublish(volume_id, str(target))
        if mounts.is_mounted(target):
            mounts.be_unmounted(target)

    def usage(self, vol: Volume, path: Path) -> Usage:
        """The daemon's numbers and health, within STATS_TIMEOUT.

        The daemon answers a stuck volume quickly (its stat probes are
        bounded); the deadline here covers a daemon that is itself slow.
        """
        try:
            stats = self._client().stats(vol.id, str(path), timeout=STATS_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise errors.unavailable(f"fusefs did not report on volume {vol.id} in time: {exc.details()}") from exc
            raise
        # The daemon has probed the path already; look again only where it saw
        # nothing wrong (it may run in another mount namespace).
        state = mounts.mount_state(path) if stats.healthy else mounts.ALIVE
        healthy = stats.healthy and state == mounts.ALIVE
        message = stats.message or "healthy"
        if state == mounts.DEAD:
            message = (f"{path} answers ENOTCONN: the FUSE session behind it is gone. "
                       "fusefs re-mounts the volume; containers without HostToContainer mount propagation keep "
                       "ENOTCONN until they are restarted")
        elif state == mounts.HUNG and stats.healthy:
            message = f"{path} does not answer stat(): the volume's FUSE session is stuck"
        return Usage(
            bytes_total=stats.capacity_bytes or vol.capacity, bytes_used=stats.used_bytes,
            bytes_available=stats.available_bytes, inodes_total=stats.total_inodes, inodes_used=stats.used_inodes,
            inodes_available=stats.available_inodes, abnormal=not healthy, message=message,
        )

    def expand(self, vol: Volume, capacity: int, loop_device: str) -> None:
        self._client().resize(vol.id, capacity)


class BlockMounter(BindMounter):
    name = "block"

    def stage(self, vol: Volume, staging: Path, read_only: bool) -> str:
        return block.be_attached(self.ctx.layout.volume_dir(vol.id))

    def unstage(self, volume_id: str, staging: Path, loop_device: str = "") -> None:
        block.be_detached(self.ctx.layout.volume_dir(volume_id))

    def publish(self, volume_id: str, staging: Path, target: Path, read_only: bool, loop_device: str,
                pod: dict[str, str] | None = None) -> None:
        if not loop_device:
            raise errors.failed_precondition(f"volume {volume_id} is not staged: no loop device")
        if target.is_dir():
            raise errors.invalid(f"target {target} of a block volume must be a file, not a directory")
        mounts.be_file(target)
        mounts.be_bind_mounted(Path(loop_device), target, read_only)

    def usage(self, vol: Volume, path: Path) -> Usage:
        return Usage(bytes_total=vol.capacity, bytes_used=0, bytes_available=0)

    def expand(self, vol: Volume, capacity: int, loop_device: str) -> None:
        if loop_device:
            block.refresh_size(loop_device)


def _scan(root: Path) -> tuple[int, int]:
    """Allocated bytes and inode count under ``root`` (bind volumes keep no
    accounting), by an iterative fd walk that a pod's deep tree, long names
    or symlink swaps cannot break or redirect (``fdtree.measure``)."""
    fd = os.open(root, fdtree.DIR_FLAGS)
    try:
        usage = fdtree.measure(fd)
    finally:
        os.close(fd)
    return usage.allocated, usage.inodes


def mounter_for(ctx: DriverContext, vol: Volume) -> BindMounter:
    if vol.access_type == "block":
        return BlockMounter(ctx)
    if vol.parameters.get(parameters.MOUNTER, "fusefs") == "bind":
        return BindMounter(ctx)
    return FuseMounter(ctx)


def mounter_named(ctx: DriverContext, name: str) -> BindMounter:
    return {"block": BlockMounter, "bind": BindMounter, "fusefs": FuseMounter}[name](ctx)
