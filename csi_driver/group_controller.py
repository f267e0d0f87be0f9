"""CSI GroupController: crash-consistent snapshots of several volumes at once.

Every member volume is frozen before the first cut and thawed after the
last, so the archives agree with each other about time (DESIGN §4).
"""

from __future__ import annotations

import time

from csi_driver import errors, parameters, validation
from csi_driver.context import DriverContext
from csi_driver.controller import _snapshot_message, _timestamp
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from csi_driver.snapshots import SnapshotManager
from csi_driver.state.store import CREATING, READY, GroupSnapshot, Snapshot

GroupCap = csi_pb2.GroupControllerServiceCapability.RPC


class GroupControllerService(csi_pb2_grpc.GroupControllerServicer):
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx
        self.snapshots = SnapshotManager(ctx)

    def GroupControllerGetCapabilities(self, request, context):  # noqa: N802
        cap = csi_pb2.GroupControllerServiceCapability(
            rpc=GroupCap(type=GroupCap.CREATE_DELETE_GET_VOLUME_GROUP_SNAPSHOT))
        return csi_pb2.GroupControllerGetCapabilitiesResponse(capabilities=[cap])

    def CreateVolumeGroupSnapshot(self, request, context):  # noqa: N802
        name = validation.require_field(request.name, "name")
        if not request.source_volume_ids:
            raise errors.invalid("source_volume_ids is required")
        sources = sorted(set(request.source_volume_ids))
        for volume_id in sources:
            validation.check_string(volume_id, "source_volume_ids")
        compression = parameters.snapshot_compression(request.parameters)
        with self.ctx.locks.hold(f"groupname:{name}"):
            existing = self.ctx.store.group_by_name(name)
            if existing is not None:
                if existing.source_volume_ids != sources:
                    raise errors.already_exists(f"group snapshot {name!r} exists with other source volumes")
                if existing.state != READY:
                    raise errors.aborted(f"group snapshot {name!r} is being {existing.state}; retry")
                return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self._message(existing))
            volumes = [self._source(v) for v in sources]
            now = time.time_ns()
            group = GroupSnapshot(id=validation.new_id(validation.GROUP_SNAPSHOT_PREFIX), name=name, state=CREATING,
                                  source_volume_ids=sources, parameters={parameters.COMPRESSION: compression},
                                  created_at_ns=now)
            members = [
                Snapshot(id=validation.new_id(validation.SNAPSHOT_PREFIX), name=None, source_volume_id=v.id,
                         state=CREATING, compression=compression, size_bytes=0, created_at_ns=now,
                         group_id=group.id, parameters=group.parameters, source_capacity=v.capacity,
                         access_type=v.access_type)
                for v in volumes
            ]
            group = self.snapshots.create_group(group, members)
        return csi_pb2.CreateVolumeGroupSnapshotResponse(group_snapshot=self._message(group))

    def _source(self, volume_id: str):  # type: ignore[no-untyped-def]
        vol = self.ctx.store.get_volume(volume_id) if validation.is_id(volume_id, "vol-") else None
        if vol is None or vol.state != READY:
            raise errors.not_found(f"source volume {volume_id} does not exist")
        return vol

    def DeleteVolumeGroupSnapshot(self, request, context):  # noqa: N802
        group_id = validation.require_field(request.group_snapshot_id, "group_snapshot_id")
        if not validation.is_id(group_id, "group-"):
            return csi_pb2.DeleteVolumeGroupSnapshotResponse()
        with self.ctx.locks.hold(f"group:{group_id}"):
            group = self.ctx.store.get_group(group_id)
            if group is None:
                return csi_pb2.DeleteVolumeGroupSnapshotResponse()
            self._check_members(group_id, request.snapshot_ids)
            self.snapshots.delete_group(group_id)
        return csi_pb2.DeleteVolumeGroupSnapshotResponse()

    def GetVolumeGroupSnapshot(self, request, context):  # noqa: N802
        group_id = validation.require_field(request.group_snapshot_id, "group_snapshot_id")
        group = self.ctx.store.get_group(group_id) if validation.is_id(group_id, "group-") else None
        if group is None or group.state != READY:
            raise errors.not_found(f"group snapshot {group_id} does not exist")
        self._check_members(group_id, request.snapshot_ids)
        return csi_pb2.GetVolumeGroupSnapshotResponse(group_snapshot=self._message(group))

    def _check_members(self, group_id: str, given: list[str]) -> None:
        """A caller's snapshot list must match the group (members deleted on their own may be absent)."""
        if not given:
            return
        members = {s.id for s in self.ctx.store.snapshots_of_group(group_id)}
        given_set = set(given)
        strangers = {s for s in given_set - members if self._exists(s)}
        if strangers or not members <= given_set:
            raise errors.invalid(f"snapshot_ids do not match the members of group snapshot {group_id}")

    def _exists(self, snapshot_id: str) -> bool:
        return validation.is_id(snapshot_id, "snap-") and self.ctx.store.get_snapshot(snapshot_id) is not None

    def _message(self, group: GroupSnapshot) -> csi_pb2.VolumeGroupSnapshot:
        members = self.ctx.store.snapshots_of_group(group.id)
        return csi_pb2.VolumeGroupSnapshot(
            group_snapshot_id=group.id, snapshots=[_snapshot_message(s) for s in members],
            creation_time=_timestamp(group.created_at_ns), ready_to_use=group.state == READY,
        )
