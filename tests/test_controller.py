"""Controller RPCs against a real driver: happy paths, the spec's error
tables, idempotent repeats, paging, and concurrent duplicates."""

from __future__ import annotations

import os
import threading
import uuid

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.harness import GiB, MiB, AccessMode, block_cap, code_of, mount_cap

C = grpc.StatusCode


def uniq(prefix: str = "pvc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- Identity ---------------------------------------------------------------------
def test_plugin_info_and_capabilities(shared_driver):
    info = shared_driver.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest())
    assert info.name == "fusepath.csi.io"
    assert info.vendor_version
    caps = shared_driver.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest()).capabilities
    services = {c.service.type for c in caps if c.HasField("service")}
    PC = csi_pb2.PluginCapability.Service
    assert {PC.CONTROLLER_SERVICE, PC.VOLUME_ACCESSIBILITY_CONSTRAINTS, PC.GROUP_CONTROLLER_SERVICE} <= services
    assert any(c.volume_expansion.type == csi_pb2.PluginCapability.VolumeExpansion.ONLINE for c in caps)
    assert shared_driver.identity.Probe(csi_pb2.ProbeRequest()).ready.value is True


def test_controller_capabilities(shared_driver):
    caps = shared_driver.controller.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())
    got = {c.rpc.type for c in caps.capabilities}
    R = csi_pb2.ControllerServiceCapability.RPC
    for want in (R.CREATE_DELETE_VOLUME, R.CREATE_DELETE_SNAPSHOT, R.LIST_VOLUMES, R.LIST_SNAPSHOTS,
                 R.GET_CAPACITY, R.CLONE_VOLUME, R.EXPAND_VOLUME, R.GET_VOLUME, R.VOLUME_CONDITION,
                 R.SINGLE_NODE_MULTI_WRITER, R.MODIFY_VOLUME, R.PUBLISH_UNPUBLISH_VOLUME):
        assert want in got, R.Name(want)


# -- CreateVolume ------------------------------------------------------------------
def test_create_volume_happy_path_makes_directory_with_topology(shared_driver):
    vol = shared_driver.create_volume(uniq(), size=10 * MiB)
    assert vol.volume_id.startswith("vol-") and len(vol.volume_id) == 36
    assert vol.capacity_bytes == 10 * MiB
    assert shared_driver.volume_dir(vol.volume_id).is_dir()
    assert vol.accessible_topology[0].segments == {"topology.fusepath.csi.io/node": "test-node"}


def test_create_volume_is_idempotent_on_name(shared_driver):
    name = uniq()
    first = shared_driver.create_volume(name, size=5 * MiB)
    again = shared_driver.create_volume(name, size=5 * MiB)
    assert again.volume_id == first.volume_id


@pytest.mark.parametrize("mutate, code", [
    (lambda r: r.ClearField("name"), C.INVALID_ARGUMENT),
    (lambda r: r.ClearField("volume_capabilities"), C.INVALID_ARGUMENT),
    (lambda r: r.volume_capabilities[0].access_mode.__setattr__("mode", AccessMode.MULTI_NODE_MULTI_WRITER),
     C.INVALID_ARGUMENT),
    (lambda r: r.parameters.__setitem__("nonsense", "1"), C.INVALID_ARGUMENT),
    (lambda r: r.parameters.__setitem__("ioBytesPerSecond", "-5"), C.INVALID_ARGUMENT),
    (lambda r: r.mutable_parameters.__setitem__("XXX_FakeKey", "x"), C.INVALID_ARGUMENT),
    (lambda r: r.__setattr__("name", "x" * 129), C.INVALID_ARGUMENT),
    (lambda r: r.capacity_range.__setattr__("limit_bytes", 1), C.OUT_OF_RANGE),
    (lambda r: r.volume_content_source.snapshot.__setattr__("snapshot_id", "snap-" + "0" * 32), C.NOT_FOUND),
    (lambda r: r.volume_content_source.snapshot.__setattr__("snapshot_id", "../../etc"), C.NOT_FOUND),
    (lambda r: r.volume_content_source.volume.__setattr__("volume_id", "vol-" + "0" * 32), C.NOT_FOUND),
    (lambda r: r.capacity_range.__setattr__("required_bytes", 1 << 62), C.RESOURCE_EXHAUSTED),
    (lambda r: r.accessibility_requirements.requisite.add().segments.__setitem__(
        "topology.fusepath.csi.io/node", "other-node"), C.RESOURCE_EXHAUSTED),
])
def test_create_volume_errors(shared_driver, mutate, code):
    req = csi_pb2.CreateVolumeRequest(name=uniq(), volume_capabilities=[mount_cap()])
    req.capacity_range.required_bytes = MiB
    mutate(req)
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.CreateVolume(req)
    assert code_of(exc) == code, exc.value.details()
    assert exc.value.details()


def test_create_volume_same_name_incompatible_is_already_exists(shared_driver):
    name = uniq()
    shared_driver.create_volume(name, size=4 * MiB)
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.create_volume(name, size=8 * MiB)
    assert code_of(exc) == C.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.create_volume(name, size=4 * MiB, cap=block_cap())
    assert code_of(exc) == C.ALREADY_EXISTS


def test_create_volume_default_and_limited_capacity(shared_driver):
    req = csi_pb2.CreateVolumeRequest(name=uniq(), volume_capabilities=[mount_cap()])
    req.capacity_range.limit_bytes = 3 * MiB
    vol = shared_driver.controller.CreateVolume(req).volume
    assert vol.capacity_bytes == 3 * MiB
    req = csi_pb2.CreateVolumeRequest(name=uniq(), volume_capabilities=[mount_cap()])
    assert shared_driver.controller.CreateVolume(req).volume.capacity_bytes == GiB


def test_block_volume_has_sparse_image_rounded_to_sectors(shared_driver):
    vol = shared_driver.create_volume(uniq(), size=MiB + 1, cap=block_cap())
    assert vol.capacity_bytes == MiB + 512
    image = shared_driver.volume_dir(vol.volume_id) / "block.img"
    assert image.stat().st_size == MiB + 512
    assert image.stat().st_blocks * 512 < MiB  # sparse


def test_concurrent_create_volume_with_one_name_creates_one(shared_driver):
    name, results, errors = uniq(), [], []

    def create():
        try:
            results.append(shared_driver.create_volume(name, size=2 * MiB).volume_id)
        except grpc.RpcError as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 16 and len(set(results)) == 1
    dirs = [p for p in (shared_driver.data_dir / "volumes").iterdir() if p.name == results[0]]
    assert len(dirs) == 1


# -- DeleteVolume --------------------------------------------------------------------
def test_delete_volume_removes_directory_and_is_idempotent(shared_driver):
    vol = shared_driver.create_volume(uniq())
    (shared_driver.volume_dir(vol.volume_id) / "data").write_text("x")
    for _ in range(2):
        shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert not shared_driver.volume_dir(vol.volume_id).exists()
    assert not any((shared_driver.data_dir / "trash").iterdir())


@pytest.mark.parametrize("volume_id, code", [("", C.INVALID_ARGUMENT), ("x" * 129, C.INVALID_ARGUMENT)])
def test_delete_volume_errors(shared_driver, volume_id, code):
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    assert code_of(exc) == code


def test_delete_unknown_or_foreign_volume_is_ok(shared_driver):
    """OK, and nothing on disk changes, even where an ID read as a path would land."""
    volumes = shared_driver.data_dir / "volumes"
    victims = {"../../../etc": volumes.parent.parent.parent / "etc", "../../victim": volumes.parent.parent / "victim"}
    for victim in victims.values():
        victim.mkdir(exist_ok=True)
        (victim / f"keep-{os.getpid()}").write_text("kept")

    def disk() -> dict[str, list[str]]:
        return {str(d): sorted(os.listdir(d)) for d in [shared_driver.data_dir, volumes, *victims.values()]}

    before = disk()
    for volume_id in ("fake-vol-id", *victims, "vol-" + "1" * 32):
        shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))
    assert disk() == before
    for victim in victims.values():
        assert (victim / f"keep-{os.getpid()}").read_text() == "kept"
        (victim / f"keep-{os.getpid()}").unlink()


def test_delete_volume_published_to_a_node_is_failed_precondition(shared_driver):
    vol = shared_driver.create_volume(uniq())
    shared_driver.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vol.volume_id, node_id="test-node", volume_capability=mount_cap()))
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    assert code_of(exc) == C.FAILED_PRECONDITION
    shared_driver.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
        volume_id=vol.volume_id, node_id="test-node"))
    shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_delete_volume_with_snapshots_keeps_snapshots_usable(shared_driver):
    vol = shared_driver.create_volume(uniq())
    (shared_driver.volume_dir(vol.volume_id) / "keep.txt").write_text("kept")
    snap = shared_driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=uniq("snap"), source_volume_id=vol.volume_id)).snapshot
    shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    got = shared_driver.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id)).snapshot
    assert got.ready_to_use
    req = csi_pb2.CreateVolumeRequest(name=uniq(), volume_capabilities=[mount_cap()])
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    restored = shared_driver.controller.CreateVolume(req).volume
    assert (shared_driver.volume_dir(restored.volume_id) / "keep.txt").read_text() == "kept"


# -- ValidateVolumeCapabilities ----------------------------------------------------------
def test_validate_volume_capabilities(shared_driver):
    vol = shared_driver.create_volume(uniq())
    ok = shared_driver.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap()]))
    assert ok.confirmed.volume_capabilities[0] == mount_cap()
    no = shared_driver.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap(AccessMode.MULTI_NODE_MULTI_WRITER)]))
    assert not no.HasField("confirmed") and no.message
    wrong_type = shared_driver.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[block_cap()]))
    assert not wrong_type.HasField("confirmed")


@pytest.mark.parametrize("volume_id, caps, code", [
    ("", [mount_cap()], C.INVALID_ARGUMENT),
    ("vol-" + "2" * 32, [mount_cap()], C.NOT_FOUND),
    ("not-ours", [mount_cap()], C.NOT_FOUND),
])
def test_validate_volume_capabilities_errors(shared_driver, volume_id, caps, code):
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ValidateVolumeCapabilities(csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume_id, volume_capabilities=caps))
    assert code_of(exc) == code


def test_validate_without_capabilities_is_invalid(shared_driver):
    vol = shared_driver.create_volume(uniq())
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ValidateVolumeCapabilities(
            csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id))
    assert code_of(exc) == C.INVALID_ARGUMENT


# -- ListVolumes / ControllerGetVolume ---------------------------------------------------------
def test_list_volumes_pages_through_everything_once(shared_driver):
    made = {shared_driver.create_volume(uniq()).volume_id for _ in range(5)}
    seen, token, pages = [], "", 0
    while True:
        resp = shared_driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token))
        assert len(resp.entries) <= 2
        seen += [e.volume.volume_id for e in resp.entries]
        pages += 1
        token = resp.next_token
        if not token:
            break
    assert made <= set(seen)
    assert len(seen) == len(set(seen))
    assert pages >= 3


def test_list_volumes_survives_deletion_of_the_page_boundary(shared_driver):
    """A page that ends on our first volume; that volume is deleted; the next page still starts right after it."""
    vols = [shared_driver.create_volume(uniq()).volume_id for _ in range(3)]
    everything = [e.volume.volume_id for e in shared_driver.controller.ListVolumes(
        csi_pb2.ListVolumesRequest()).entries]
    first = shared_driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(
        max_entries=everything.index(vols[0]) + 1))
    boundary = first.entries[-1].volume.volume_id
    assert boundary == vols[0] and first.next_token
    shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=boundary))
    rest = shared_driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=first.next_token))
    listed = [e.volume.volume_id for e in rest.entries]
    assert boundary not in listed
    assert listed[:2] == vols[1:]


@pytest.mark.parametrize("token", ["invalid-token", "-1", "1e5", "９"])
def test_list_volumes_bad_token_is_aborted(shared_driver, token):
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(starting_token=token))
    assert code_of(exc) == C.ABORTED


def test_list_volumes_negative_max_entries_is_invalid(shared_driver):
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=-1))
    assert code_of(exc) == C.INVALID_ARGUMENT


def test_controller_get_volume(shared_driver):
    vol = shared_driver.create_volume(uniq())
    got = shared_driver.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.volume_id == vol.volume_id
    assert got.status.volume_condition.abnormal is False
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id="vol-" + "3" * 32))
    assert code_of(exc) == C.NOT_FOUND


def test_condition_reports_missing_directory(shared_driver):
    vol = shared_driver.create_volume(uniq())
    path = shared_driver.volume_dir(vol.volume_id)
    path.rename(path.with_name("moved-away"))
    try:
        got = shared_driver.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
        assert got.status.volume_condition.abnormal is True
        assert "missing" in got.status.volume_condition.message
    finally:
        path.with_name("moved-away").rename(path)


# -- GetCapacity ----------------------------------------------------------------------------------
def test_get_capacity_drops_by_what_was_promised(shared_driver):
    before = shared_driver.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    shared_driver.create_volume(uniq(), size=100 * MiB)
    after = shared_driver.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity
    assert before - after == 100 * MiB
    resp = shared_driver.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    assert resp.maximum_volume_size.value == resp.available_capacity
    other = csi_pb2.GetCapacityRequest(accessible_topology=csi_pb2.Topology(
        segments={"topology.fusepath.csi.io/node": "elsewhere"}))
    assert shared_driver.controller.GetCapacity(other).available_capacity == 0


# -- ControllerExpandVolume ---------------------------------------------------------------------------
def test_controller_expand_volume(shared_driver):
    vol = shared_driver.create_volume(uniq(), size=MiB)
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id=vol.volume_id,
                                                capacity_range=csi_pb2.CapacityRange(required_bytes=3 * MiB))
    for _ in range(2):
        resp = shared_driver.controller.ControllerExpandVolume(req)
        assert resp.capacity_bytes == 3 * MiB and resp.node_expansion_required
    got = shared_driver.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume.capacity_bytes == 3 * MiB


@pytest.mark.parametrize("volume_id, rng, code", [
    ("", csi_pb2.CapacityRange(required_bytes=MiB), C.INVALID_ARGUMENT),
    ("vol-" + "4" * 32, None, C.INVALID_ARGUMENT),
    ("vol-" + "4" * 32, csi_pb2.CapacityRange(required_bytes=MiB), C.NOT_FOUND),
    ("vol-" + "4" * 32, csi_pb2.CapacityRange(required_bytes=5, limit_bytes=4), C.OUT_OF_RANGE),
])
def test_controller_expand_errors(shared_driver, volume_id, rng, code):
    req = csi_pb2.ControllerExpandVolumeRequest(volume_id=volume_id)
    if rng is not None:
        req.capacity_range.CopyFrom(rng)
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerExpandVolume(req)
    assert code_of(exc) == code


def test_controller_expand_past_what_the_node_can_promise_is_out_of_range(shared_driver):
    vol = shared_driver.create_volume(uniq(), size=MiB)
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerExpandVolume(csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=1 << 62)))
    assert code_of(exc) == C.OUT_OF_RANGE


# -- ControllerModifyVolume --------------------------------------------------------------------------
def test_modify_volume_stores_io_limits(shared_driver):
    vol = shared_driver.create_volume(uniq())
    for _ in range(2):
        shared_driver.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters={"ioBytesPerSecond": "1048576"}))
    from csi_driver.state import Store

    stored = Store(shared_driver.data_dir / "state.db").get_volume(vol.volume_id)
    assert stored.mutable_parameters == {"ioBytesPerSecond": "1048576"}


@pytest.mark.parametrize("volume_id, params, code", [
    ("", {}, C.INVALID_ARGUMENT),
    ("vol-" + "5" * 32, {"ioOpsPerSecond": "10"}, C.NOT_FOUND),
])
def test_modify_volume_errors(shared_driver, volume_id, params, code):
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
            volume_id=volume_id, mutable_parameters=params))
    assert code_of(exc) == code


@pytest.mark.parametrize("params", [{"XXX_FakeKey": "v"}, {"ioOpsPerSecond": "lots"}, {"mounter": "bind"}])
def test_modify_volume_rejects_unknown_or_immutable_keys(shared_driver, params):
    vol = shared_driver.create_volume(uniq())
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerModifyVolume(csi_pb2.ControllerModifyVolumeRequest(
            volume_id=vol.volume_id, mutable_parameters=params))
    assert code_of(exc) == C.INVALID_ARGUMENT


# -- ControllerPublish / Unpublish ---------------------------------------------------------------------
def test_controller_publish_and_limits(driver):
    vols = [driver.create_volume(uniq()) for _ in range(5)]
    for vol in vols[:4]:
        for _ in range(2):
            driver.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vol.volume_id, node_id="test-node", volume_capability=mount_cap()))
    with pytest.raises(grpc.RpcError) as exc:
        driver.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vols[4].volume_id, node_id="test-node", volume_capability=mount_cap()))
    assert code_of(exc) == C.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as exc:
        driver.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vols[0].volume_id, node_id="test-node", volume_capability=mount_cap(), readonly=True))
    assert code_of(exc) == C.ALREADY_EXISTS
    for _ in range(2):
        driver.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(
            volume_id=vols[0].volume_id, node_id="test-node"))
    driver.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
        volume_id=vols[4].volume_id, node_id="test-node", volume_capability=mount_cap()))


@pytest.mark.parametrize("volume_id, node_id, cap, code", [
    ("", "test-node", mount_cap(), C.INVALID_ARGUMENT),
    ("vol-" + "6" * 32, "", mount_cap(), C.INVALID_ARGUMENT),
    ("vol-" + "6" * 32, "test-node", None, C.INVALID_ARGUMENT),
    ("vol-" + "6" * 32, "test-node", mount_cap(), C.NOT_FOUND),
])
def test_controller_publish_errors(shared_driver, volume_id, node_id, cap, code):
    req = csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id)
    if cap is not None:
        req.volume_capability.CopyFrom(cap)
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerPublishVolume(req)
    assert code_of(exc) == code


def test_controller_publish_to_unknown_node_is_not_found(shared_driver):
    vol = shared_driver.create_volume(uniq())
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerPublishVolume(csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vol.volume_id, node_id="no-such-node", volume_capability=mount_cap()))
    assert code_of(exc) == C.NOT_FOUND


def test_controller_unpublish_requires_volume_id(shared_driver):
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ControllerUnpublishVolume(csi_pb2.ControllerUnpublishVolumeRequest(node_id="n"))
    assert code_of(exc) == C.INVALID_ARGUMENT
