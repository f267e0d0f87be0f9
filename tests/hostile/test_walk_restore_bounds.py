"""Issue 8 item 6: restore and clone stop at the target volume's capacity
and inode limit, with a clear error, clean up, keep sparse files sparse, and
do work bounded by the target's size, not by what an archive claims.

Archives are planted in place of a real snapshot's archive (what a pod could
make with a volume that has no quota, or what a corrupted archive says).
The writes the driver makes are measured from /proc/<pid>/io.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile

import grpc
import pytest

from tests.harness import MiB
from tests.hostile.walk_helpers import create_from, snapshot, uniq, write_bytes_of

pytestmark = pytest.mark.privileged
C = grpc.StatusCode
BOMB_BYTES = int(os.environ.get("FUSEPATH_BOMB_BYTES", str(256 * MiB)))
ENTRIES = int(os.environ.get("FUSEPATH_BOMB_ENTRIES", "5000"))


def _planted_snapshot(driver, size: int = MiB) -> tuple[str, os.PathLike]:
    """A real snapshot of a ``size`` volume, its archive path (to replace)."""
    vol = driver.create_volume(uniq(), size=size)
    snap = snapshot(driver, vol.volume_id)
    archive = next((driver.data_dir / "snapshots").glob(f"{snap.snapshot_id}.tar*"))
    return snap.snapshot_id, archive


def _restore_fails_cleanly(driver, snapshot_id: str, size: int = MiB) -> grpc.RpcError:
    volumes = set(os.listdir(driver.data_dir / "volumes"))
    before = write_bytes_of(driver.proc.pid)
    with pytest.raises(grpc.RpcError) as exc:
        create_from(driver, "snapshot", snapshot_id, size=size)
    written = write_bytes_of(driver.proc.pid) - before
    print(f"restore refused with {exc.value.code()}: {exc.value.details()}; driver wrote {written} bytes")
    assert exc.value.code() == C.INVALID_ARGUMENT, exc.value.details()
    assert "does not fit" in exc.value.details()
    assert written < 16 * MiB, f"the driver wrote {written} bytes for a {size}-byte volume"
    assert set(os.listdir(driver.data_dir / "volumes")) == volumes
    assert list((driver.data_dir / "tmp").iterdir()) == []
    return exc.value


def test_a_small_zstd_archive_of_a_huge_zero_file_stops_at_the_capacity(driver, tmp_path):
    snapshot_id, archive = _planted_snapshot(driver)
    big = tmp_path / "zeros"
    with open(big, "wb") as f:
        f.truncate(BOMB_BYTES)
    tar = subprocess.Popen(["tar", "--create", "--file=-", f"--directory={tmp_path}", "zeros"], stdout=subprocess.PIPE)
    with open(archive, "wb") as out:
        subprocess.run(["zstd", "-3", "--quiet", "--stdout"], stdin=tar.stdout, stdout=out, check=True)
    assert tar.wait() == 0
    print(f"archive of {BOMB_BYTES} zero bytes: {os.path.getsize(archive)} bytes")
    _restore_fails_cleanly(driver, snapshot_id)


def test_a_sparse_member_with_a_huge_apparent_size_allocates_nothing(driver, tmp_path):
    snapshot_id, archive = _planted_snapshot(driver)
    big = tmp_path / "sparse"
    with open(big, "wb") as f:
        f.seek(32 << 30)
        f.write(b"end")
    subprocess.run(["tar", "--create", f"--file={archive}", "--sparse", "--format=posix",
                    f"--directory={tmp_path}", "sparse"], check=True)
    _restore_fails_cleanly(driver, snapshot_id)


def test_many_tiny_entries_stop_at_the_inode_limit(driver):
    snapshot_id, archive = _planted_snapshot(driver)
    with tarfile.open(archive, "w") as tar:
        for i in range(ENTRIES):
            tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    err = _restore_fails_cleanly(driver, snapshot_id)
    assert "inode" in err.details()


def test_a_clone_of_an_overfull_source_stops_at_the_target_capacity(driver):
    """A bind-mounted source has no quota: it can hold more than its size."""
    src = driver.create_volume(uniq(), size=MiB, parameters={"mounter": "bind"})
    (driver.volume_dir(src.volume_id) / "big").write_bytes(os.urandom(4 * MiB))
    volumes = set(os.listdir(driver.data_dir / "volumes"))
    with pytest.raises(grpc.RpcError) as exc:
        create_from(driver, "volume", src.volume_id, size=MiB)
    assert exc.value.code() == C.INVALID_ARGUMENT, exc.value.details()
    assert "does not fit" in exc.value.details()
    assert set(os.listdir(driver.data_dir / "volumes")) == volumes
    assert list((driver.data_dir / "tmp").iterdir()) == []


@pytest.mark.parametrize("kind", ["snapshot", "volume"])
def test_sparse_files_stay_sparse_through_restore_and_clone(driver, kind):
    src = driver.create_volume(uniq(), size=64 * MiB)
    path = driver.volume_dir(src.volume_id) / "sparse"
    with open(path, "wb") as f:
        f.seek(48 * MiB)
        f.write(b"tail")
    source_id = snapshot(driver, src.volume_id).snapshot_id if kind == "snapshot" else src.volume_id
    copy = create_from(driver, kind, source_id, size=64 * MiB)
    st = os.stat(driver.volume_dir(copy.volume_id) / "sparse")
    assert st.st_size == 48 * MiB + 4
    assert st.st_blocks * 512 < MiB, f"{st.st_blocks * 512} bytes allocated for a sparse file"
