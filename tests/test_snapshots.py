"""Snapshots and group snapshots against a real driver: tar archives on disk,
restore and clone, hostile archives, paging and concurrent duplicates."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB, code_of, mount_cap

C = grpc.StatusCode


def uniq(prefix: str = "snap") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def snapshot(driver, volume_id: str, name: str | None = None, **params: str) -> csi_pb2.Snapshot:
    return driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=name or uniq(), source_volume_id=volume_id, parameters=params)).snapshot


def restore(driver, snapshot_id: str, size: int = 64 * MiB) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(name=uniq("pvc"), volume_capabilities=[mount_cap()])
    req.capacity_range.required_bytes = size
    req.volume_content_source.snapshot.snapshot_id = snapshot_id
    return driver.controller.CreateVolume(req).volume


def fill(path: Path) -> None:
    (path / "dir" / "sub").mkdir(parents=True)
    (path / "dir" / "sub" / "a.txt").write_text("alpha")
    (path / "big.bin").write_bytes(os.urandom(256 * 1024))
    (path / "link").symlink_to("dir/sub/a.txt")
    os.link(path / "big.bin", path / "hard.bin")
    os.chmod(path / "dir" / "sub" / "a.txt", 0o640)
    os.chown(path / "dir" / "sub" / "a.txt", 1234, 5678)


@pytest.mark.privileged
@pytest.mark.parametrize("compression, suffix", [("none", ".tar"), ("gzip", ".tar.gz"), ("zstd", ".tar.zst")])
def test_snapshot_restore_round_trip(shared_driver, compression, suffix):
    vol = shared_driver.create_volume(uniq("pvc"))
    fill(shared_driver.volume_dir(vol.volume_id))
    snap = snapshot(shared_driver, vol.volume_id, compression=compression)
    assert snap.ready_to_use and snap.size_bytes > 0 and snap.creation_time.seconds > 0
    archive = shared_driver.data_dir / "snapshots" / f"{snap.snapshot_id}{suffix}"
    assert archive.stat().st_size == snap.size_bytes
    new = restore(shared_driver, snap.snapshot_id)
    assert new.content_source.snapshot.snapshot_id == snap.snapshot_id
    root = shared_driver.volume_dir(new.volume_id)
    a = root / "dir" / "sub" / "a.txt"
    assert a.read_text() == "alpha"
    assert (a.stat().st_mode & 0o777, a.stat().st_uid, a.stat().st_gid) == (0o640, 1234, 5678)
    assert os.readlink(root / "link") == "dir/sub/a.txt"
    assert (root / "hard.bin").stat().st_ino == (root / "big.bin").stat().st_ino
    assert (root / "big.bin").read_bytes() == (shared_driver.volume_dir(vol.volume_id) / "big.bin").read_bytes()


def test_snapshot_is_idempotent_and_same_name_other_source_is_already_exists(shared_driver):
    a = shared_driver.create_volume(uniq("pvc"))
    b = shared_driver.create_volume(uniq("pvc"))
    name = uniq()
    first = snapshot(shared_driver, a.volume_id, name)
    assert snapshot(shared_driver, a.volume_id, name).snapshot_id == first.snapshot_id
    with pytest.raises(grpc.RpcError) as exc:
        snapshot(shared_driver, b.volume_id, name)
    assert code_of(exc) == C.ALREADY_EXISTS


@pytest.mark.parametrize("fields, code", [
    (dict(source_volume_id="vol-" + "0" * 32), C.INVALID_ARGUMENT),
    (dict(name="s"), C.INVALID_ARGUMENT),
    (dict(name="s", source_volume_id="vol-" + "0" * 32), C.NOT_FOUND),
    (dict(name="s", source_volume_id="../../etc"), C.NOT_FOUND),
    (dict(name="s", source_volume_id="vol-" + "0" * 32, parameters={"compression": "lz4"}), C.INVALID_ARGUMENT),
    (dict(name="s", source_volume_id="vol-" + "0" * 32, parameters={"bogus": "1"}), C.INVALID_ARGUMENT),
])
def test_create_snapshot_errors(shared_driver, fields, code):
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(**fields))
    assert code_of(exc) == code


def test_concurrent_create_snapshot_with_one_name_creates_one(shared_driver):
    vol = shared_driver.create_volume(uniq("pvc"))
    (shared_driver.volume_dir(vol.volume_id) / "f").write_bytes(os.urandom(MiB))
    name, ids, errors = uniq(), [], []

    def create():
        try:
            ids.append(snapshot(shared_driver, vol.volume_id, name).snapshot_id)
        except grpc.RpcError as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == 1 and len(ids) == 16
    archives = list((shared_driver.data_dir / "snapshots").glob(f"{ids[0]}*"))
    assert len(archives) == 1


def test_delete_snapshot_is_idempotent_and_removes_archive(shared_driver):
    vol = shared_driver.create_volume(uniq("pvc"))
    snap = snapshot(shared_driver, vol.volume_id)
    for _ in range(2):
        shared_driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert not list((shared_driver.data_dir / "snapshots").glob(f"{snap.snapshot_id}*"))
    shared_driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id="reallyfakesnapshotid"))
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest())
    assert code_of(exc) == C.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.GetSnapshot(csi_pb2.GetSnapshotRequest(snapshot_id=snap.snapshot_id))
    assert code_of(exc) == C.NOT_FOUND


def test_list_snapshots_filters_and_pages(shared_driver):
    vol = shared_driver.create_volume(uniq("pvc"))
    made = [snapshot(shared_driver, vol.volume_id).snapshot_id for _ in range(5)]
    by_source = shared_driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vol.volume_id))
    assert [e.snapshot.snapshot_id for e in by_source.entries] == made
    one = shared_driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(snapshot_id=made[2]))
    assert [e.snapshot.snapshot_id for e in one.entries] == [made[2]]
    for empty in (csi_pb2.ListSnapshotsRequest(snapshot_id="none-exist-id"),
                  csi_pb2.ListSnapshotsRequest(source_volume_id="vol-" + "e" * 32)):
        assert list(shared_driver.controller.ListSnapshots(empty).entries) == []
    page = shared_driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vol.volume_id,
                                                                               max_entries=2))
    assert len(page.entries) == 2 and page.next_token
    rest = shared_driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=vol.volume_id,
                                                                               starting_token=page.next_token))
    assert [e.snapshot.snapshot_id for e in page.entries] + [e.snapshot.snapshot_id for e in rest.entries] == made
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.ListSnapshots(csi_pb2.ListSnapshotsRequest(starting_token="bad"))
    assert code_of(exc) == C.ABORTED


def test_restore_refuses_a_smaller_volume_or_wrong_type(shared_driver):
    vol = shared_driver.create_volume(uniq("pvc"), size=32 * MiB)
    snap = snapshot(shared_driver, vol.volume_id)
    with pytest.raises(grpc.RpcError) as exc:
        restore(shared_driver, snap.snapshot_id, size=16 * MiB)
    assert code_of(exc) == C.OUT_OF_RANGE
    from tests.harness import block_cap

    req = csi_pb2.CreateVolumeRequest(name=uniq("pvc"), volume_capabilities=[block_cap()])
    req.volume_content_source.snapshot.snapshot_id = snap.snapshot_id
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.controller.CreateVolume(req)
    assert code_of(exc) == C.INVALID_ARGUMENT


@pytest.mark.privileged
def test_clone_copies_the_tree(shared_driver):
    src = shared_driver.create_volume(uniq("pvc"))
    fill(shared_driver.volume_dir(src.volume_id))
    req = csi_pb2.CreateVolumeRequest(name=uniq("pvc"), volume_capabilities=[mount_cap()])
    req.capacity_range.required_bytes = 64 * MiB
    req.volume_content_source.volume.volume_id = src.volume_id
    clone = shared_driver.controller.CreateVolume(req).volume
    assert clone.content_source.volume.volume_id == src.volume_id
    root = shared_driver.volume_dir(clone.volume_id)
    assert (root / "dir" / "sub" / "a.txt").read_text() == "alpha"
    assert (root / "dir" / "sub" / "a.txt").stat().st_uid == 1234
    (root / "dir" / "sub" / "a.txt").write_text("changed")
    assert (shared_driver.volume_dir(src.volume_id) / "dir" / "sub" / "a.txt").read_text() == "alpha"


# -- hostile archives ---------------------------------------------------------------------
def _plant(driver, snapshot_id_source: str, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    """Replace a real snapshot's archive with a hostile one, keeping its row."""
    snap = snapshot(driver, snapshot_id_source)
    archive = driver.data_dir / "snapshots" / f"{snap.snapshot_id}.tar"
    with tarfile.open(archive, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return snap.snapshot_id


def _file(name: str, data: bytes = b"pwned") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


@pytest.mark.privileged
@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink", "hardlink", "device"])
def test_hostile_archive_changes_nothing_outside_the_new_volume(driver, tmp_path, case):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("original")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in victim.iterdir())
    members = {
        "absolute": [_file(str(victim / "keep"))],
        "dotdot": [_file("ok.txt"), _file("../../../../../../../../" + str(victim / "keep").lstrip("/"))],
        "symlink": [_link("escape", str(victim)), _file("escape/keep")],
        "hardlink": [_link("hl", str(victim / "keep"), tarfile.LNKTYPE)],
        "device": [_device("null")],
    }[case]
    vol = driver.create_volume(uniq("pvc"))
    snapshot_id = _plant(driver, vol.volume_id, members)
    volumes_before = set(os.listdir(driver.data_dir / "volumes"))
    with pytest.raises(grpc.RpcError) as exc:
        restore(driver, snapshot_id)
    assert code_of(exc) == C.INVALID_ARGUMENT
    assert "cannot be restored safely" in exc.value.details()
    assert (victim / "keep").read_text() == "original"
    assert sorted((p.name, p.stat().st_mtime_ns) for p in victim.iterdir()) == before
    assert set(os.listdir(driver.data_dir / "volumes")) == volumes_before
    assert list((driver.data_dir / "tmp").iterdir()) == []


# -- group snapshots --------------------------------------------------------------------------
def test_group_snapshot_lifecycle(shared_driver):
    vols = [shared_driver.create_volume(uniq("pvc")) for _ in range(3)]
    for i, v in enumerate(vols):
        (shared_driver.volume_dir(v.volume_id) / "n").write_text(str(i))
    name = uniq("group")
    req = csi_pb2.CreateVolumeGroupSnapshotRequest(name=name, source_volume_ids=[v.volume_id for v in vols])
    group = shared_driver.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert group.ready_to_use and len(group.snapshots) == 3
    assert {s.group_snapshot_id for s in group.snapshots} == {group.group_snapshot_id}
    again = shared_driver.group.CreateVolumeGroupSnapshot(req).group_snapshot
    assert again.group_snapshot_id == group.group_snapshot_id
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.group.CreateVolumeGroupSnapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name=name, source_volume_ids=[vols[0].volume_id]))
    assert code_of(exc) == C.ALREADY_EXISTS
    member_ids = [s.snapshot_id for s in group.snapshots]
    got = shared_driver.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
        group_snapshot_id=group.group_snapshot_id, snapshot_ids=member_ids)).group_snapshot
    assert sorted(s.snapshot_id for s in got.snapshots) == sorted(member_ids)
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=member_ids[:1]))
    assert code_of(exc) == C.INVALID_ARGUMENT
    index = {v.volume_id: i for i, v in enumerate(vols)}
    assert sorted(index[s.source_volume_id] for s in group.snapshots) == [0, 1, 2]
    for member in group.snapshots:  # each member holds its own volume's data, not another's
        restored = restore(shared_driver, member.snapshot_id)
        got = (shared_driver.volume_dir(restored.volume_id) / "n").read_text()
        assert got == str(index[member.source_volume_id]), member.source_volume_id
        shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=restored.volume_id))
    for _ in range(2):
        shared_driver.group.DeleteVolumeGroupSnapshot(csi_pb2.DeleteVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id, snapshot_ids=member_ids))
    with pytest.raises(grpc.RpcError) as exc:
        shared_driver.group.GetVolumeGroupSnapshot(csi_pb2.GetVolumeGroupSnapshotRequest(
            group_snapshot_id=group.group_snapshot_id))
    assert code_of(exc) == C.NOT_FOUND
    for sid in member_ids:
        assert not list((shared_driver.data_dir / "snapshots").glob(f"{sid}*"))


@pytest.mark.parametrize("call, req, code", [
    ("CreateVolumeGroupSnapshot", csi_pb2.CreateVolumeGroupSnapshotRequest(source_volume_ids=["x"]),
     C.INVALID_ARGUMENT),
    ("CreateVolumeGroupSnapshot", csi_pb2.CreateVolumeGroupSnapshotRequest(name="g"), C.INVALID_ARGUMENT),
    ("CreateVolumeGroupSnapshot", csi_pb2.CreateVolumeGroupSnapshotRequest(
        name="g", source_volume_ids=["vol-" + "f" * 32]), C.NOT_FOUND),
    ("GetVolumeGroupSnapshot", csi_pb2.GetVolumeGroupSnapshotRequest(), C.INVALID_ARGUMENT),
    ("GetVolumeGroupSnapshot", csi_pb2.GetVolumeGroupSnapshotRequest(group_snapshot_id="fake-vol-id"), C.NOT_FOUND),
    ("DeleteVolumeGroupSnapshot", csi_pb2.DeleteVolumeGroupSnapshotRequest(), C.INVALID_ARGUMENT),
])
def test_group_snapshot_errors(shared_driver, call, req, code):
    with pytest.raises(grpc.RpcError) as exc:
        getattr(shared_driver.group, call)(req)
    assert code_of(exc) == code


def test_delete_unknown_group_is_ok(shared_driver):
    shared_driver.group.DeleteVolumeGroupSnapshot(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id="fake-vol-id"))


def test_a_long_snapshot_does_not_block_unrelated_rpcs(shared_driver):
    """While one volume is being archived (slowly, with gzip), other volumes are created and deleted."""
    busy = shared_driver.create_volume(uniq("pvc"), size=512 * MiB)
    with open(shared_driver.volume_dir(busy.volume_id) / "big.bin", "wb") as f:
        for _ in range(96):
            f.write(os.urandom(MiB))
    order: list[str] = []
    snapper = threading.Thread(target=lambda: (snapshot(shared_driver, busy.volume_id, compression="gzip"),
                                                order.append("snapshot")))
    snapper.start()
    tmp = shared_driver.data_dir / "tmp"
    deadline = time.monotonic() + 60
    def archive_growing() -> bool:
        for entry in os.scandir(tmp):
            try:
                if entry.name.startswith(".snapshot-") and entry.stat().st_size:
                    return True
            except FileNotFoundError:  # renamed into place meanwhile
                pass
        return False

    while not archive_growing():
        assert snapper.is_alive() and time.monotonic() < deadline, "the cut never started"
        time.sleep(0.01)  # the archive is being written: the cut is under way
    other = shared_driver.create_volume(uniq("pvc"))
    shared_driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=other.volume_id))
    shared_driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=5))
    order.append("others")
    snapper.join()
    assert order == ["others", "snapshot"]


def test_volume_with_a_link_restore_would_refuse_fails_snapshot_clearly(shared_driver):
    """An absolute symlink could never be restored (restore refuses links that leave the
    volume), so the snapshot fails up front with FAILED_PRECONDITION naming the link."""
    vol = shared_driver.create_volume(uniq("pvc"))
    os.symlink("/etc/passwd", shared_driver.volume_dir(vol.volume_id) / "abs-link")
    with pytest.raises(grpc.RpcError) as exc:
        snapshot(shared_driver, vol.volume_id)
    assert code_of(exc) == C.FAILED_PRECONDITION
    assert "abs-link" in exc.value.details()
    assert list((shared_driver.data_dir / "tmp").iterdir()) == []


@pytest.mark.privileged
def test_restore_keeps_the_source_root_mode(shared_driver):
    vol = shared_driver.create_volume(uniq("pvc"))
    root = shared_driver.volume_dir(vol.volume_id)
    os.chmod(root, 0o750)
    os.chown(root, 1000, 2000)
    restored = restore(shared_driver, snapshot(shared_driver, vol.volume_id).snapshot_id)
    st = shared_driver.volume_dir(restored.volume_id).stat()
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 1000, 2000)
