"""CSI Controller: volumes and snapshots on this node's disk.

This module translates between protobuf and the domain managers
(``volumes``, ``snapshots``); validation happens here, before any lookup
touches the database or the disk, in the order the spec's error tables and
csi-sanity expect (arguments first, then existence, then compatibility).
"""

from __future__ import annotations

import logging
import re

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value

from csi_driver import capabilities, errors, parameters, validation
from csi_driver.context import DriverContext
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.snapshots import SnapshotManager
from csi_driver.state.store import READY, Attachment, Snapshot, Volume
from csi_driver.volumes import VolumeManager, VolumeSpec, compatible

log = logging.getLogger("fusepath.controller")

Cap = csi_pb2.ControllerServiceCapability.RPC
BLOCK_ALIGN = 512
DEFAULT_PAGE = 1000
_TOKEN_RE = re.compile(r"[0-9]{1,18}")  # ASCII only: str.isdigit() accepts "９"


def _rpc_cap(kind: int) -> csi_pb2.ControllerServiceCapability:
    return csi_pb2.ControllerServiceCapability(rpc=Cap(type=kind))


class ControllerService(csi_pb2_grpc.ControllerServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.volumes = VolumeManager(ctx)
        self.snapshots = SnapshotManager(ctx)

    # -- capabilities ----------------------------------------------------------
    def ControllerGetCapabilities(self, request, context):  # noqa: N802
        if self.ctx.config.mode == "controller":
            # MODIFY_VOLUME so that csi-resizer asks, and gets a clear refusal
            # it shows on the PVC (see ControllerModifyVolume), instead of
            # never asking and leaving a new VolumeAttributesClass unapplied
            # without a word.
            kinds = [Cap.EXPAND_VOLUME, Cap.MODIFY_VOLUME]
        else:
            kinds = [
                Cap.CREATE_DELETE_VOLUME, Cap.CREATE_DELETE_SNAPSHOT, Cap.LIST_SNAPSHOTS, Cap.LIST_VOLUMES,
                Cap.GET_CAPACITY, Cap.CLONE_VOLUME, Cap.EXPAND_VOLUME, Cap.GET_VOLUME, Cap.VOLUME_CONDITION,
                Cap.SINGLE_NODE_MULTI_WRITER, Cap.MODIFY_VOLUME, Cap.GET_SNAPSHOT,
            ]
            if self.ctx.config.enable_attach:
                kinds += [Cap.PUBLISH_UNPUBLISH_VOLUME, Cap.PUBLISH_READONLY, Cap.LIST_VOLUMES_PUBLISHED_NODES]
        return csi_pb2.ControllerGetCapabilitiesResponse(capabilities=[_rpc_cap(k) for k in kinds])

    # -- CreateVolume ------------------------------------------------------------
    def CreateVolume(self, request, context):  # noqa: N802
        self._require_local_state()
        name = validation.require_field(request.name, "name")
        caps = capabilities.require_capabilities(request.volume_capabilities)
        kind = capabilities.access_type(caps[0])
        params = parameters.volume_parameters(request.parameters)
        mutable = parameters.mutable_parameters(request.mutable_parameters)
        required, limit = self._capacity_range(request)
        source_kind, source_id = self._content_source(request)
        self._check_topology(request.accessibility_requirements)
        capacity = self._choose_capacity(required, limit, kind, source_kind, source_id)
        spec = VolumeSpec(name=name, capacity=capacity, access_type=kind, parameters=params,
                          mutable_parameters=mutable, source_kind=source_kind, source_id=source_id)
        with self.ctx.locks.hold(f"volname:{name}"):
            existing = self.ctx.store.volume_by_name(name)
            if existing is not None:
                return self._repeat_create(existing, spec, required, limit, request.parameters)
            vol = self.volumes.create(spec, validation.new_id(validation.VOLUME_PREFIX))
        return self._created(vol, request.parameters)

    def _created(self, vol: Volume, params) -> csi_pb2.CreateVolumeResponse:  # type: ignore[no-untyped-def]
        """The answer to CreateVolume: the volume, its context carrying the PVC it is for.

        The PVC's name and namespace go into the PV's volume attributes, so
        that the node, which sees only those at publish, can have fusefs
        post Events on the PVC as well as on the pod. They are taken from the
        request each time, so a repeat answers the same without storing them.
        """
        msg = self._volume_message(vol)
        msg.volume_context.update(parameters.claim_context(params))
        return csi_pb2.CreateVolumeResponse(volume=msg)

    def _repeat_create(self, vol: Volume, spec: VolumeSpec, required: int, limit: int, params):  # type: ignore[no-untyped-def]
        reason = compatible(vol, spec, required, limit)
        if reason:
            raise errors.already_exists(f"volume {vol.name!r} already exists ({vol.id}) but {reason}")
        if vol.state != READY:
            raise errors.aborted(f"volume {vol.name!r} is being {vol.state}; retry")
        return self._created(vol, params)

    def _capacity_range(self, request) -> tuple[int, int]:  # type: ignore[no-untyped-def]
        required = request.capacity_range.required_bytes
        limit = request.capacity_range.limit_bytes
        if required < 0 or limit < 0:
            raise errors.out_of_range("capacity_range bytes must not be negative")
        if limit and required > limit:
            raise errors.out_of_range(f"required_bytes {required} is more than limit_bytes {limit}")
        return required, limit

    def _choose_capacity(self, required: int, limit: int, kind: str, source_kind: str, source_id: str) -> int:
        """The capacity to promise: what was required, else the default, within the limit."""
        floor = self._source_capacity(source_kind, source_id)
        capacity = required or max(self.ctx.config.default_capacity, floor)
        if limit:
            capacity = min(capacity, limit) if not required else capacity
        capacity = max(capacity, 1)
        if kind == "block":
            capacity = -(-capacity // BLOCK_ALIGN) * BLOCK_ALIGN
        if limit and capacity > limit:
            raise errors.out_of_range(f"block volumes need {BLOCK_ALIGN}-byte sizes; {capacity} passes the limit")
        if capacity < floor:
            raise errors.out_of_range(f"the source holds {floor} bytes; the new volume cannot be smaller")
        return capacity

    def _source_capacity(self, source_kind: str, source_id: str) -> int:
        if source_kind == "snapshot":
            return self.ctx.store.get_snapshot(source_id).source_capacity  # type: ignore[union-attr]
        if source_kind == "volume":
            return self.ctx.store.get_volume(source_id).capacity  # type: ignore[union-attr]
        return 0

    def _content_source(self, request) -> tuple[str, str]:  # type: ignore[no-untyped-def]
        """The validated source: ('', ''), ('snapshot', id) or ('volume', id); NOT_FOUND when gone."""
        if not request.HasField("volume_content_source"):
            return "", ""
        src = request.volume_content_source
        kind = src.WhichOneof("type")
        want = "block" if capabilities.access_type(request.volume_capabilities[0]) == "block" else "mount"
        if kind == "snapshot":
            snap_id = validation.require_field(src.snapshot.snapshot_id, "volume_content_source.snapshot.snapshot_id")
            snap = self.ctx.store.get_snapshot(snap_id) if validation.is_id(snap_id, "snap-") else None
            if snap is None or snap.state != READY:
                raise errors.not_found(f"source snapshot {snap_id} does not exist")
            if snap.access_type != want:
                raise errors.invalid(f"snapshot {snap_id} is of a {snap.access_type} volume, not {want}")
            return "snapshot", snap_id
        if kind == "volume":
            vol_id = validation.require_field(src.volume.volume_id, "volume_content_source.volume.volume_id")
            vol = self.ctx.store.get_volume(vol_id) if validation.is_id(vol_id, "vol-") else None
            if vol is None or vol.state != READY:
                raise errors.not_found(f"source volume {vol_id} does not exist")
            if vol.access_type != want:
                raise errors.invalid(f"volume {vol_id} is a {vol.access_type} volume, not {want}")
            return "volume", vol_id
        raise errors.invalid("volume_content_source must name a snapshot or a volume")

    def _check_topology(self, req) -> None:  # type: ignore[no-untyped-def]
        """Volumes live on this node; a request that excludes it cannot be met here."""
        if not req.requisite and not req.preferred:
            return
        mine = self.ctx.topology
        for topo in list(req.requisite) or list(req.preferred):
            if all(mine.get(k) == v for k, v in topo.segments.items()):
                return
        raise errors.exhausted(f"volumes can only be created on node {self.ctx.config.node_id!r}")

    def _volume_message(self, vol: Volume) -> csi_pb2.Volume:
        msg = csi_pb2.Volume(
            volume_id=vol.id, capacity_bytes=vol.capacity,
            volume_context={parameters.MOUNTER: vol.parameters.get(parameters.MOUNTER, "fusefs")},
            accessible_topology=[csi_pb2.Topology(segments=self.ctx.topology)],
        )
        if vol.source_kind == "snapshot":
            msg.content_source.snapshot.snapshot_id = vol.source_id
        elif vol.source_kind == "volume":
            msg.content_source.volume.volume_id = vol.source_id
        return msg

    # -- DeleteVolume -------------------------------------------------------------
    def DeleteVolume(self, request, context):  # noqa: N802
        self._require_local_state()
        volume_id = validation.require_volume_id(request.volume_id)
        if not validation.is_id(volume_id, "vol-"):
            return csi_pb2.DeleteVolumeResponse()  # never ours, so already gone
        with self.ctx.locks.hold(f"vol:{volume_id}"):
            vol = self.ctx.store.get_volume(volume_id)
            if vol is None:
                return csi_pb2.DeleteVolumeResponse()
            in_use = self.ctx.store.users_of(volume_id)
            if in_use:
                raise errors.failed_precondition(f"volume {volume_id} is in use: {in_use}")
            self.volumes.delete(vol)
        return csi_pb2.DeleteVolumeResponse()

    # -- lookups -------------------------------------------------------------------
    def _existing_volume(self, volume_id: str) -> Volume:
        vol = self.ctx.store.get_volume(volume_id) if validation.is_id(volume_id, "vol-") else None
        if vol is None or vol.state != READY:
            raise errors.not_found(f"volume {volume_id} does not exist")
        return vol

    def _require_local_state(self) -> None:
        if self.ctx.config.mode == "controller":
            raise errors.unimplemented(
                "this is the cluster-wide controller; volumes are provisioned by each node's plugin")

    # -- ValidateVolumeCapabilities ------------------------------------------------
    def ValidateVolumeCapabilities(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        if not request.volume_capabilities:
            raise errors.invalid("volume_capabilities is required")
        vol = self._existing_volume(volume_id)
        for cap in request.volume_capabilities:
            reason = capabilities.unsupported_reason(cap)
            if reason is None and capabilities.access_type(cap) != vol.access_type:
                reason = f"volume {volume_id} is a {vol.access_type} volume"
            if reason:
                return csi_pb2.ValidateVolumeCapabilitiesResponse(message=reason)
        try:
            parameters.volume_parameters(request.parameters)
            parameters.mutable_parameters(request.mutable_parameters)
        except errors.CSIError as exc:
            return csi_pb2.ValidateVolumeCapabilitiesResponse(message=exc.message)
        confirmed = csi_pb2.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=request.volume_context, volume_capabilities=request.volume_capabilities,
            parameters=request.parameters, mutable_parameters=request.mutable_parameters,
        )
        return csi_pb2.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    # -- ListVolumes / ControllerGetVolume ------------------------------------------
    def ListVolumes(self, request, context):  # noqa: N802
        self._require_local_state()
        after, limit = _page(request.starting_token, request.max_entries)
        vols = self.ctx.store.list_volumes(after, limit + 1)
        more = len(vols) > limit
        vols = vols[:limit]
        entries = [
            csi_pb2.ListVolumesResponse.Entry(volume=self._volume_message(v), status=self._volume_status(v))
            for v in vols
        ]
        return csi_pb2.ListVolumesResponse(entries=entries, next_token=str(vols[-1].rowid) if more else "")

    def ControllerGetVolume(self, request, context):  # noqa: N802
        self._require_local_state()
        vol = self._existing_volume(validation.require_volume_id(request.volume_id))
        return csi_pb2.ControllerGetVolumeResponse(
            volume=self._volume_message(vol),
            status=csi_pb2.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=self._published_nodes(vol), volume_condition=self._condition(vol)),
        )

    def _volume_status(self, vol: Volume) -> csi_pb2.ListVolumesResponse.VolumeStatus:
        return csi_pb2.ListVolumesResponse.VolumeStatus(
            published_node_ids=self._published_nodes(vol), volume_condition=self._condition(vol))

    def _published_nodes(self, vol: Volume) -> list[str]:
        nodes = set(self.ctx.store.attached_nodes(vol.id))
        if self.ctx.store.get_staging(vol.id) or self.ctx.store.publications_of(vol.id):
            nodes.add(self.ctx.config.node_id)
        return sorted(nodes)

    def _condition(self, vol: Volume) -> csi_pb2.VolumeCondition:
        if not self.ctx.layout.volume_dir(vol.id).is_dir():
            return csi_pb2.VolumeCondition(abnormal=True, message="the volume's directory is missing on the node")
        return csi_pb2.VolumeCondition(abnormal=False, message="volume directory present")

    # -- GetCapacity -----------------------------------------------------------------
    def GetCapacity(self, request, context):  # noqa: N802
        self._require_local_state()
        for cap in request.volume_capabilities:
            if capabilities.unsupported_reason(cap):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        if request.HasField("accessible_topology"):
            mine = self.ctx.topology
            if any(mine.get(k) != v for k, v in request.accessible_topology.segments.items()):
                return csi_pb2.GetCapacityResponse(available_capacity=0)
        parameters.volume_parameters(request.parameters)
        available = self.ctx.available_capacity()
        return csi_pb2.GetCapacityResponse(
            available_capacity=available, maximum_volume_size=Int64Value(value=available),
            minimum_volume_size=Int64Value(value=1),
        )

    # -- ControllerExpandVolume -----------------------------------------------------
    def ControllerExpandVolume(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        if not request.HasField("capacity_range"):
            raise errors.invalid("capacity_range is required")
        required, limit = self._capacity_range(request)
        if not required:
            raise errors.invalid("capacity_range.required_bytes is required to expand")
        if request.HasField("volume_capability"):
            reason = capabilities.unsupported_reason(request.volume_capability)
            if reason:
                raise errors.invalid(reason)
        if self.ctx.config.mode == "controller":
            # The cluster-wide controller owns no volumes: the node that holds
            # the volume grows its quota in NodeExpandVolume (DESIGN §1).
            if not validation.is_id(volume_id, "vol-"):
                raise errors.not_found(f"volume {volume_id} does not exist")
            return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=required, node_expansion_required=True)
        with self.ctx.locks.hold(f"vol:{volume_id}"):
            vol = self._existing_volume(volume_id)
            if request.HasField("volume_capability") and \
                    capabilities.access_type(request.volume_capability) != vol.access_type:
                raise errors.invalid(f"volume {volume_id} is a {vol.access_type} volume")
            if vol.access_type == "block":
                required = -(-required // BLOCK_ALIGN) * BLOCK_ALIGN
            if limit and max(vol.capacity, required) > limit:
                raise errors.out_of_range(f"volume {volume_id} has {vol.capacity} bytes, more than limit {limit}")
            vol = self.volumes.expand(vol, required)
        return csi_pb2.ControllerExpandVolumeResponse(capacity_bytes=vol.capacity, node_expansion_required=True)

    # -- ControllerModifyVolume -----------------------------------------------------
    def ControllerModifyVolume(self, request, context):  # noqa: N802
        volume_id = validation.require_volume_id(request.volume_id)
        if self.ctx.config.mode == "controller":
            self._refuse_remote_modify(volume_id, request.mutable_parameters)
        with self.ctx.locks.hold(f"vol:{volume_id}"):
            vol = self._existing_volume(volume_id)
            changes = parameters.mutable_parameters(request.mutable_parameters)
            merged = {**vol.mutable_parameters, **changes}
            self.ctx.store.set_mutable_parameters(volume_id, merged)
            self._apply_limits(volume_id, {**vol.parameters, **merged})
        return csi_pb2.ControllerModifyVolumeResponse()

    def _refuse_remote_modify(self, volume_id: str, mutable: dict[str, str]) -> None:
        """The cluster-wide controller cannot change a volume: say so, never succeed silently.

        A volume's I/O limits live in the fusefs session on the node that holds
        it, and this process has no way to reach that node. INVALID_ARGUMENT is
        the code csi-resizer treats as final ("Infeasible"): it sets the PVC's
        ``status.modifyVolumeStatus`` to Infeasible, adds a ModifyVolumeError
        condition and posts a VolumeModifyFailed Warning event with this
        message, and does not hammer the driver with retries.
        """
        if not validation.is_id(volume_id, "vol-"):
            raise errors.not_found(f"volume {volume_id} does not exist")
        parameters.mutable_parameters(mutable)  # a bad key is reported as such first
        raise errors.invalid(
            f"volume {volume_id} was not modified: VolumeAttributesClass changes cannot be applied in the "
            "distributed layout, because the cluster-wide controller cannot reach the node that holds the "
            "volume; the volume keeps the I/O limits it was created with. Use the single-node overlay, or "
            "clone the PVC with the new class (docs/deploy.md, 'VolumeAttributesClass changes')")

    def _apply_limits(self, volume_id: str, params: dict[str, str]) -> None:
        """Push new I/O limits to a live fusefs mount; stored limits apply at the next stage otherwise."""
        staging = self.ctx.store.get_staging(volume_id)
        if staging is None or staging.mounter != "fusefs" or self.ctx.fusefs is None:
            return
        bps, ops = parameters.io_limits(params)
        self.ctx.fusefs.client().set_limits(volume_id, bps, ops)

    # -- ControllerPublish / Unpublish (--enable-attach) ------------------------------
    def ControllerPublishVolume(self, request, context):  # noqa: N802
        self._require_attach()
        volume_id = validation.require_volume_id(request.volume_id)
        node_id = validation.require_field(request.node_id, "node_id")
        capabilities.require_capability(request.volume_capability, request.HasField("volume_capability"))
        vol = self._existing_volume(volume_id)
        if node_id != self.ctx.config.node_id:
            raise errors.not_found(f"node {node_id} does not exist; this driver serves {self.ctx.config.node_id}")
        reason = capabilities.unsupported_reason(request.volume_capability)
        if reason is None and capabilities.access_type(request.volume_capability) != vol.access_type:
            reason = f"volume {volume_id} is a {vol.access_type} volume"
        if reason:
            raise errors.invalid(reason)
        with self.ctx.locks.hold(f"vol:{volume_id}"):
            existing = self.ctx.store.get_attachment(volume_id, node_id)
            if existing is not None:
                if existing.read_only != request.readonly:
                    raise errors.already_exists(f"volume {volume_id} is already published to {node_id} "
                                                f"with readonly={existing.read_only}")
            elif not self.ctx.store.attach(Attachment(volume_id, node_id, request.readonly),
                                           self.ctx.config.max_volumes_per_node):
                raise errors.exhausted(f"node {node_id} already has {self.ctx.config.max_volumes_per_node} "
                                       "volumes published")
        return csi_pb2.ControllerPublishVolumeResponse(publish_context={})

    def ControllerUnpublishVolume(self, request, context):  # noqa: N802
        self._require_attach()
        volume_id = validation.require_volume_id(request.volume_id)
        node_id = request.node_id or self.ctx.config.node_id
        if validation.is_id(volume_id, "vol-"):
            with self.ctx.locks.hold(f"vol:{volume_id}"):
                self.ctx.store.detach(volume_id, node_id)
        return csi_pb2.ControllerUnpublishVolumeResponse()

    def _require_attach(self) -> None:
        if not self.ctx.config.enable_attach:
            raise errors.unimplemented("ControllerPublishVolume is off; start the driver with --enable-attach")

    # -- snapshots ---------------------------------------------------------------------
    def CreateSnapshot(self, request, context):  # noqa: N802
        self._require_local_state()
        source_id = validation.require_field(request.source_volume_id, "source_volume_id")
        name = validation.require_field(request.name, "name")
        compression = parameters.snapshot_compression(request.parameters)
        with self.ctx.locks.hold(f"snapname:{name}"):
            existing = self.ctx.store.snapshot_by_name(name)
            if existing is not None:
                if existing.source_volume_id != source_id:
                    raise errors.already_exists(
                        f"snapshot {name!r} already exists for volume {existing.source_volume_id}")
                return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot_message(existing))
            source = self._existing_volume(source_id)
            snap = self.snapshots.create(validation.new_id(validation.SNAPSHOT_PREFIX), name, source, compression,
                                         {parameters.COMPRESSION: compression})
        return csi_pb2.CreateSnapshotResponse(snapshot=_snapshot_message(snap))

    def DeleteSnapshot(self, request, context):  # noqa: N802
        self._require_local_state()
        snapshot_id = validation.require_field(request.snapshot_id, "snapshot_id")
        if not validation.is_id(snapshot_id, "snap-"):
            return csi_pb2.DeleteSnapshotResponse()
        with self.ctx.locks.hold(f"snap:{snapshot_id}"):
            if self.ctx.store.get_snapshot(snapshot_id) is not None:
                self.snapshots.delete(snapshot_id)
        return csi_pb2.DeleteSnapshotResponse()

    def ListSnapshots(self, request, context):  # noqa: N802
        self._require_local_state()
        after, limit = _page(request.starting_token, request.max_entries)
        if request.snapshot_id:
            snap = self.ctx.store.get_snapshot(request.snapshot_id) if validation.is_id(
                request.snapshot_id, "snap-") else None
            keep = snap is not None and snap.state == READY and (
                not request.source_volume_id or snap.source_volume_id == request.source_volume_id)
            entries = [_snapshot_entry(snap)] if keep else []  # type: ignore[arg-type]
            return csi_pb2.ListSnapshotsResponse(entries=entries)
        snaps = self.ctx.store.list_snapshots(after, limit + 1, request.source_volume_id)
        more = len(snaps) > limit
        snaps = snaps[:limit]
        return csi_pb2.ListSnapshotsResponse(
            entries=[_snapshot_entry(s) for s in snaps], next_token=str(snaps[-1].rowid) if more else "")

    def GetSnapshot(self, request, context):  # noqa: N802
        self._require_local_state()
        snapshot_id = validation.require_field(request.snapshot_id, "snapshot_id")
        snap = self.ctx.store.get_snapshot(snapshot_id) if validation.is_id(snapshot_id, "snap-") else None
        if snap is None or snap.state != READY:
            raise errors.not_found(f"snapshot {snapshot_id} does not exist")
        return csi_pb2.GetSnapshotResponse(snapshot=_snapshot_message(snap))


def _page(token: str, max_entries: int) -> tuple[int, int]:
    """Decode a paging token (the last rowid returned) and the page size."""
    if max_entries < 0:
        raise errors.invalid("max_entries must not be negative")
    after = 0
    if token:
        if not _TOKEN_RE.fullmatch(token):
            raise errors.aborted(f"starting_token {token!r} is not valid; start again without one")
        after = int(token)
    return after, max_entries or DEFAULT_PAGE


def _timestamp(ns: int) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _snapshot_message(snap: Snapshot) -> csi_pb2.Snapshot:
    return csi_pb2.Snapshot(
        snapshot_id=snap.id, source_volume_id=snap.source_volume_id, size_bytes=snap.size_bytes,
        creation_time=_timestamp(snap.created_at_ns), ready_to_use=snap.state == READY,
        group_snapshot_id=snap.group_id,
    )


def _snapshot_entry(snap: Snapshot) -> csi_pb2.ListSnapshotsResponse.Entry:
    return csi_pb2.ListSnapshotsResponse.Entry(snapshot=_snapshot_message(snap))
