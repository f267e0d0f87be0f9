"""CSI Node: stage a volume at the staging path, publish it to pod targets.

Argument checks come first (INVALID_ARGUMENT even for volumes that do not
exist), then existence (NOT_FOUND), then state (FAILED_PRECONDITION,
ALREADY_EXISTS). Mount work is delegated to ``mounters``; this module keeps
the records and the rules.
"""

from __future__ import annotations

import logging
from pathlib import Path

from csi_driver import capabilities, errors, mounts, parameters, validation
from csi_driver.config import parse_size
from csi_driver.context import DriverContext
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.locks import KeyedCap
from csi_driver.mounters import BindMounter, mounter_for, mounter_named
from csi_driver.state.store import READY, Publication, Staging, Volume
from csi_driver.volumes import VolumeManager, VolumeSpec
from fusefs import safepath

log = logging.getLogger("fusepath.node")
NodeCap = csi_pb2.NodeServiceCapability.RPC
Usage = csi_pb2.VolumeUsage

#: Concurrent NodeGetVolumeStats per volume: a stuck volume can hold no more RPC workers than this.
STATS_PER_VOLUME = 4
#: What a pod spec may say about its inline volume: its size, and (pointlessly) that it is fusefs.
EPHEMERAL_KEYS = {parameters.MOUNTER, parameters.EPHEMERAL_SIZE}


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.volumes = VolumeManager(ctx)
        self._stats_slots = KeyedCap(STATS_PER_VOLUME)

    # -- info ----------------------------------------------------------------------
    def NodeGetCapabilities(self, request, context):  # noqa: N802
        kinds = [NodeCap.STAGE_UNSTAGE_VOLUME, NodeCap.GET_VOLUME_STATS, NodeCap.EXPAND_VOLUME,
                 NodeCap.VOLUME_CONDITION, NodeCap.SINGLE_NODE_MULTI_WRITER]
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[csi_pb2.NodeServiceCapability(rpc=NodeCap(type=k)) for k in kinds])

    def NodeGetInfo(self, request, context):  # noqa: N802
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.ctx.config.node_id, max_volumes_per_node=self.ctx.config.max_volumes_per_node,
            accessible_topology=csi_pb2.Topology(segments=self.ctx.topology),
        )

    # -- helpers -------------------------------------------------------------------------
    def _path(self, value: str, field: str) -> Path:
        """A required path under the kubelet directory, inside no mount; else INVALID_ARGUMENT."""
        return self._node_path(value, field)[0]

    def _node_path(self, value: str, field: str) -> tuple[Path, str]:
        """As :meth:`_path`, with what is at the path now (``fusefs.safepath`` kinds)."""
        return validation.node_path(value, field, self.ctx.config.kubelet_dir)

    def _volume(self, volume_id: str) -> Volume:
        vol = self._volume_or_none(volume_id)
        if vol is None:
            raise errors.not_found(f"volume {volume_id} does not exist on node {self.ctx.config.node_id}")
        return vol

    def _volume_or_none(self, volume_id: str) -> Volume | None:
        """Our own IDs, or the kubelet's handle of an inline volume."""
        if validation.is_id(volume_id, "vol-"):
            vol = self.ctx.store.get_volume(volume_id)
        else:
            vol = self.ctx.store.volume_by_handle(volume_id)
        return vol if vol is not None and vol.state == READY else None

    @staticmethod
    def _check_capability(vol: Volume, cap: csi_pb2.VolumeCapability) -> None:
        reason = capabilities.unsupported_reason(cap)
        if reason is None and capabilities.access_type(cap) != vol.access_type:
            reason = f"volume {vol.id} is a {vol.access_type} volume"
        if reason:
            raise errors.failed_precondition(reason)

    # -- stage -------------------------------------------------------------------------------
    def NodeStageVolume(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        staging = self._path(request.staging_target_path, "staging_target_path")
        capabilities.require_capability(request.volume_capability, request.HasField("volume_capability"))
        with self.ctx.locks.hold(f"node:{volume_id}"):
            vol = self._volume(volume_id)
            cap = request.volume_capability
            self._check_capability(vol, cap)
            read_only = capabilities.is_read_only_mode(cap)
            summary = capabilities.summary(cap)
            existing = self.ctx.store.get_staging(vol.id)
            if existing is not None and (existing.staging_path != str(staging) or existing.capability != summary):
                raise errors.already_exists(
                    f"volume {vol.id} is already staged at {existing.staging_path} with another capability")
            mounter = mounter_for(self.ctx, vol)
            loop = mounter.stage(vol, staging, read_only)
            self.ctx.store.put_staging(Staging(vol.id, str(staging), mounter.name, read_only, summary, loop))
        return csi_pb2.NodeStageVolumeResponse()

    def NodeUnstageVolume(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        staging = self._path(request.staging_target_path, "staging_target_path")
        with self.ctx.locks.hold(f"node:{volume_id}"):
            vol = self._volume_or_none(volume_id)
            if vol is None:  # already deleted: nothing of ours can be mounted there any more
                _remove_if_unmounted(staging)  # an empty directory at most; never a file or data
                return csi_pb2.NodeUnstageVolumeResponse()
            record = self.ctx.store.get_staging(vol.id)
            if record is not None and record.staging_path != str(staging):
                raise errors.not_found(f"volume {vol.id} is staged at {record.staging_path}, not {staging}")
            busy = [p.target_path for p in self.ctx.store.publications_of(vol.id) if mounts.is_mounted(p.target_path)]
            if busy:
                raise errors.failed_precondition(f"volume {vol.id} is still published at {', '.join(busy)}")
            mounter = mounter_named(self.ctx, record.mounter) if record else mounter_for(self.ctx, vol)
            mounter.unstage(vol.id, staging, record.loop_device if record else "")
            self.ctx.store.delete_staging(vol.id)
            _remove_if_unmounted(staging)
        return csi_pb2.NodeUnstageVolumeResponse()

    # -- publish --------------------------------------------------------------------------
    def NodePublishVolume(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        target, kind = self._node_path(request.target_path, "target_path")
        capabilities.require_capability(request.volume_capability, request.HasField("volume_capability"))
        validation.check_map(request.volume_context, "volume_context")
        if capabilities.access_type(request.volume_capability) == "mount" and kind in (safepath.FILE,
                                                                                        safepath.OTHER):
            raise errors.invalid(f"target_path {target} exists and is not a directory; a filesystem volume "
                                 "is mounted on a directory")
        if request.volume_context.get(parameters.EPHEMERAL) == "true":
            return self._publish_ephemeral(request, target)
        if not request.staging_target_path:
            raise errors.failed_precondition("staging_target_path is required: this driver stages volumes first")
        staging = self._path(request.staging_target_path, "staging_target_path")
        with self.ctx.locks.hold(f"node:{volume_id}"):
            vol = self._volume(volume_id)
            cap = request.volume_capability
            self._check_capability(vol, cap)
            record = self.ctx.store.get_staging(vol.id)
            if record is None or record.staging_path != str(staging):
                raise errors.failed_precondition(f"volume {vol.id} is not staged at {staging}")
            read_only = request.readonly or capabilities.is_read_only_mode(cap)
            self._check_publication(vol, target, read_only, cap)
            mounter_named(self.ctx, record.mounter).publish(vol.id, staging, target, read_only, record.loop_device,
                                                            pod=_pod_info(request.volume_context))
            self.ctx.store.put_publication(
                Publication(str(target), vol.id, str(staging), read_only, capabilities.summary(cap)))
        return csi_pb2.NodePublishVolumeResponse()

    def _check_publication(self, vol: Volume, target: Path, read_only: bool, cap) -> None:  # type: ignore[no-untyped-def]
        existing = self.ctx.store.get_publication(str(target))
        if existing is not None and (existing.volume_id != vol.id or existing.read_only != read_only
                                     or existing.capability != capabilities.summary(cap)):
            raise errors.already_exists(f"{target} is already published with other arguments")
        if cap.access_mode.mode == capabilities.AccessMode.SINGLE_NODE_SINGLE_WRITER:
            others = [p for p in self.ctx.store.publications_of(vol.id) if p.target_path != str(target)]
            if others:
                raise errors.failed_precondition(
                    f"volume {vol.id} is SINGLE_NODE_SINGLE_WRITER and already published at {others[0].target_path}")

    def NodeUnpublishVolume(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        target = self._path(request.target_path, "target_path")
        with self.ctx.locks.hold(f"node:{volume_id}"):
            vol = self._volume_or_none(volume_id)
            if vol is None:  # already deleted: unpublish is idempotent, so just tidy the path
                _remove_if_unmounted(target)  # an empty directory at most; never a file or data
                return csi_pb2.NodeUnpublishVolumeResponse()
            record = self.ctx.store.get_publication(str(target))
            if record is not None and record.volume_id != vol.id:
                raise errors.not_found(f"{target} is published for another volume, not {vol.id}")
            if vol.ephemeral_handle is not None:
                self._unpublish_ephemeral(vol, target)
            else:
                staging = self.ctx.store.get_staging(vol.id)
                mounter = mounter_named(self.ctx, staging.mounter) if staging else BindMounter(self.ctx)
                mounter.unpublish(vol.id, target)
                self.ctx.store.delete_publication(str(target))
            _remove_if_unmounted(target, block=record is not None and vol.access_type == "block")
        return csi_pb2.NodeUnpublishVolumeResponse()

    # -- CSI ephemeral inline volumes -----------------------------------------------------------
    def _publish_ephemeral(self, request, target: Path):  # type: ignore[no-untyped-def]
        """Create, stage and publish in one step; the volume lives as long as the pod."""
        handle = validation.check_foreign_id(request.volume_id, "volume_id")
        capacity, params = self._inline_policy(request.volume_context)
        cap = request.volume_capability
        if capabilities.access_type(cap) != "mount":
            raise errors.invalid("inline volumes are filesystem volumes; block access is not supported")
        with self.ctx.locks.hold(f"node:{handle}"):
            vol = self.ctx.store.volume_by_handle(handle)
            if vol is None:
                spec = VolumeSpec(name=None, capacity=capacity, access_type="mount", parameters=params,
                                  ephemeral_handle=handle)
                vol = self.volumes.create(spec, validation.new_id(validation.VOLUME_PREFIX))
            existing = self.ctx.store.get_publication(str(target))
            if existing is not None and existing.volume_id != vol.id:
                raise errors.already_exists(f"{target} is already published for another volume")
            read_only = request.readonly or capabilities.is_read_only_mode(cap)
            mounter = mounter_for(self.ctx, vol)
            mounter.stage(vol, target, read_only)
            self.ctx.store.put_staging(Staging(vol.id, str(target), mounter.name, read_only,
                                               capabilities.summary(cap)))
            self.ctx.store.put_publication(Publication(str(target), vol.id, str(target), read_only,
                                                       capabilities.summary(cap)))
        return csi_pb2.NodePublishVolumeResponse()

    def _inline_policy(self, volume_context) -> tuple[int, dict[str, str]]:  # type: ignore[no-untyped-def]
        """Capacity and parameters of an inline volume, from attributes a pod author wrote.

        The pod author is not trusted, so nothing they write may weaken
        isolation: the volume is always fusefs (quota, nosuid, nodev), its
        size is at most --max-inline-volume-size, and I/O limits are refused
        (a pod could throttle its own volume into holding session workers; a
        cluster admin sets limits in a StorageClass instead). Unknown
        attributes are refused, never ignored.
        """
        attrs = {k: v for k, v in volume_context.items() if not k.startswith(parameters.SIDECAR_PREFIX)}
        limits = sorted(set(attrs) & {parameters.IO_BYTES, parameters.IO_OPS})
        if limits:
            raise errors.invalid(f"inline volumes cannot set {', '.join(limits)}: I/O limits are the cluster "
                                 "admin's, set in a StorageClass")
        unknown = set(attrs) - EPHEMERAL_KEYS
        if unknown:
            raise errors.invalid(f"unknown inline volume attributes: {', '.join(sorted(unknown))}; "
                                 f"known: {', '.join(sorted(EPHEMERAL_KEYS))}")
        if attrs.get(parameters.MOUNTER, "fusefs") != "fusefs":
            raise errors.invalid("inline volumes are always served by fusefs; mounter cannot be chosen in a pod spec")
        maximum = self.ctx.config.max_inline_volume_size
        size_text = attrs.get(parameters.EPHEMERAL_SIZE, "")
        try:
            capacity = parse_size(size_text) if size_text else min(self.ctx.config.default_capacity, maximum)
        except ValueError:
            raise errors.invalid(f"inline volume size {size_text!r} is not a size") from None
        if capacity <= 0 or capacity > maximum:
            raise errors.invalid(f"inline volume size {size_text!r} must be between 1 byte and {maximum} bytes "
                                 "(--max-inline-volume-size)")
        return capacity, {parameters.MOUNTER: "fusefs"}

    def _unpublish_ephemeral(self, vol: Volume, target: Path) -> None:
        staging = self.ctx.store.get_staging(vol.id)
        mounter = mounter_named(self.ctx, staging.mounter) if staging else mounter_for(self.ctx, vol)
        mounter.unstage(vol.id, target)
        self.ctx.store.delete_publication(str(target))
        self.ctx.store.delete_staging(vol.id)
        with self.ctx.locks.hold(f"vol:{vol.id}"):
            self.volumes.delete(vol)

    # -- stats and expansion ---------------------------------------------------------------------
    def NodeGetVolumeStats(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        if not request.volume_path:
            raise errors.invalid("volume_path is required")
        vol = self._volume(volume_id)
        try:
            path = self._path(request.volume_path, "volume_path")
        except errors.CSIError:
            raise errors.not_found(f"volume {vol.id} is not available at {request.volume_path!r}") from None
        staging = self.ctx.store.get_staging(vol.id)
        known = {p.target_path for p in self.ctx.store.publications_of(vol.id)}
        if staging is not None:
            known.add(staging.staging_path)
        if str(path) not in known:
            raise errors.not_found(f"volume {vol.id} is not staged or published at {path}")
        mounter = mounter_named(self.ctx, staging.mounter) if staging else mounter_for(self.ctx, vol)
        with self._stats_slots.slot(vol.id) as granted:
            if not granted:
                raise errors.unavailable(f"{STATS_PER_VOLUME} NodeGetVolumeStats calls for volume {vol.id} are "
                                         "already running (its mount may not be answering); try again later")
            usage = mounter.usage(vol, path)
        entries = [Usage(unit=Usage.BYTES, total=usage.bytes_total, used=usage.bytes_used,
                         available=usage.bytes_available)]
        if usage.inodes_total:
            entries.append(Usage(unit=Usage.INODES, total=usage.inodes_total, used=usage.inodes_used,
                                 available=usage.inodes_available))
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=entries, volume_condition=csi_pb2.VolumeCondition(abnormal=usage.abnormal, message=usage.message))

    def NodeExpandVolume(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        vol = self._volume(volume_id)
        if not request.volume_path:
            raise errors.invalid("volume_path is required")
        self._path(request.volume_path, "volume_path")
        if request.HasField("volume_capability"):
            cap = request.volume_capability
            if capabilities.unsupported_reason(cap) or capabilities.access_type(cap) != vol.access_type:
                raise errors.invalid(f"volume {vol.id} does not support the given capability")
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0 or (limit and required > limit):
            raise errors.out_of_range("capacity_range is not valid")
        with self.ctx.locks.hold(f"vol:{vol.id}"):
            vol = self.volumes.expand(vol, required) if required else vol
        if limit and vol.capacity > limit:
            raise errors.out_of_range(f"volume {vol.id} already has {vol.capacity} bytes, more than limit {limit}")
        with self.ctx.locks.hold(f"node:{vol.id}"):
            staging = self.ctx.store.get_staging(vol.id)
            if staging is not None:
                mounter_named(self.ctx, staging.mounter).expand(vol, vol.capacity, staging.loop_device)
        return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=vol.capacity)


def _pod_info(volume_context: dict[str, str]) -> dict[str, str] | None:
    """The pod a publish is for (podInfoOnMount), so fusefs can post Events on it."""
    pod = {key: volume_context.get(f"csi.storage.k8s.io/pod.{key}", "") for key in ("namespace", "name", "uid")}
    # The PVC, from the context CreateVolume returned; a pod can only use claims in its own namespace.
    if volume_context.get(parameters.PVC_NAMESPACE) == pod["namespace"]:
        pod["claim"] = volume_context.get(parameters.PVC_NAME, "")
    return pod if pod["name"] else None


def _remove_if_unmounted(path: Path, block: bool = False) -> None:
    """Delete a target or staging path we are done with: never a live mount,
    and only ever an empty directory (rmdir), or for a block publication we
    made, the empty file it was mounted on. Anything else stays, logged."""
    if mounts.is_mounted(path):
        return
    try:
        if block:
            mounts.be_absent_file(path)
        else:
            mounts.be_absent(path)
    except OSError as exc:  # e.g. a non-empty directory or a file: not ours to delete
        log.warning("left %s in place: %s", path, exc)
