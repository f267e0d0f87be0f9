"""Issue 8 item 1: a clone or a snapshot holds only what was inside the
source volume, whatever the pod does during the copy.

The pod (a root process, and a uid-1000 process) swaps a directory with a
symlink to a root-only host directory in a loop (renameat2 RENAME_EXCHANGE)
while the driver clones or snapshots the volume. Every clone and every
archive is then searched for the host file's content. The attack is bounded
to a few seconds; ``bench``-style longer runs: set FUSEPATH_RACE_SECONDS.
"""

from __future__ import annotations

import os
import subprocess
import tarfile

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.hostile.walk_helpers import (
    HOST_SECRET, POD_UID, create_from, delete_volume, files_holding, plant_host_secret, snapshot, start_attacker,
    uniq,
)

pytestmark = pytest.mark.privileged
SECONDS = float(os.environ.get("FUSEPATH_RACE_SECONDS", "4"))


@pytest.mark.parametrize("uid", [0, POD_UID], ids=["root-pod", "uid1000-pod"])
def test_clone_during_a_symlink_swap_never_copies_host_files(driver, tmp_path, uid):
    host = plant_host_secret(tmp_path)
    src = driver.create_volume(uniq(), size=16 << 20)
    attacker = start_attacker(driver.volume_dir(src.volume_id), host, SECONDS, uid=uid)
    clones = failed = escaped = 0
    try:
        while attacker.poll() is None:
            try:
                clone = create_from(driver, "volume", src.volume_id, size=16 << 20)
            except grpc.RpcError:
                failed += 1  # a clone may fail under attack; it must never hold host data
                continue
            clones += 1
            root = driver.volume_dir(clone.volume_id)
            if files_holding(root, HOST_SECRET):
                escaped += 1
            delete_volume(driver, clone.volume_id)
    finally:
        attacker.wait()
    print(f"clones={clones} failed={failed} escaped={escaped} swaps={attacker.stdout.read().strip()}")
    assert clones > 0
    assert escaped == 0, f"{escaped} of {clones} clones held a root-only host file"


def test_snapshot_during_a_symlink_swap_never_archives_host_files(driver, tmp_path):
    host = plant_host_secret(tmp_path)
    src = driver.create_volume(uniq(), size=16 << 20)
    attacker = start_attacker(driver.volume_dir(src.volume_id), host, SECONDS, mode="blink")
    cut = refused = escaped = 0
    try:
        while attacker.poll() is None:
            try:
                snap = snapshot(driver, src.volume_id)
            except grpc.RpcError:
                refused += 1  # refused (a link pointing out) or failed under attack: both fine
                continue
            cut += 1
            archive = next((driver.data_dir / "snapshots").glob(f"{snap.snapshot_id}.tar*"))
            with tarfile.open(archive) as tar:
                for member in tar:
                    if member.isreg() and HOST_SECRET in tar.extractfile(member).read():
                        escaped += 1
            driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    finally:
        attacker.wait()
    print(f"snapshots={cut} refused={refused} escaped={escaped}")
    assert cut + refused > 0
    assert escaped == 0, f"{escaped} of {cut} snapshots held a root-only host file"


@pytest.mark.parametrize("kind", ["bind", "tmpfs"])
def test_a_mount_inside_the_source_is_never_copied(driver, tmp_path, kind):
    """Something mounted inside a volume's directory (same filesystem or
    not) is not the volume's: clones and snapshots leave it out."""
    host = plant_host_secret(tmp_path)
    src = driver.create_volume(uniq(), size=16 << 20)
    inner = driver.volume_dir(src.volume_id) / "mnt"
    inner.mkdir()
    if kind == "bind":
        subprocess.run(["mount", "--bind", str(host), str(inner)], check=True)
    else:
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(inner)], check=True)
        (inner / "data").write_bytes(HOST_SECRET)
    try:
        clone = create_from(driver, "volume", src.volume_id, size=16 << 20)
        assert files_holding(driver.volume_dir(clone.volume_id), HOST_SECRET) == []
        if kind == "tmpfs":  # tar tells mounts apart by st_dev only
            snap = snapshot(driver, src.volume_id)
            archive = next((driver.data_dir / "snapshots").glob(f"{snap.snapshot_id}.tar*"))
            with tarfile.open(archive) as tar:
                assert not any(m.name.endswith("mnt/data") for m in tar)
    finally:
        subprocess.run(["umount", str(inner)], check=True)
