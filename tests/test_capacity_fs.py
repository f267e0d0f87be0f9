"""GetCapacity against a small real filesystem that something else fills.

The data directory is a loop-mounted ext4 image of its own, so the test
controls every byte on it: a big file written there by another process (not
through the driver) must lower what the driver advertises, and a
CreateVolume past what is left must get RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.harness import MiB, Driver, code_of, mount_cap

pytestmark = pytest.mark.privileged

IMAGE_SIZE = 160 * MiB
RESERVE = 16 * MiB
SLACK = 2 * MiB  # the driver's own state.db and WAL live on the same filesystem


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill(path: Path, size: int) -> None:
    """Write ``size`` real bytes (not a sparse file) and make them count now."""
    chunk = b"\xa5" * MiB
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture
def small_fs_driver(tmp_path: Path):
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
    d = Driver(tmp_path / "drv", "--reserve=16Mi")
    d.data_dir.mkdir(parents=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(d.data_dir)], check=True, capture_output=True)
    try:
        d.start()
        yield d
    finally:
        d.teardown()  # stops the driver and unmounts everything under its root, the loop mount too


def _capacity(d: Driver) -> int:
    return d.controller.GetCapacity(csi_pb2.GetCapacityRequest()).available_capacity


def test_capacity_follows_free_space_reserve_and_promises(small_fs_driver):
    d = small_fs_driver
    start = _capacity(d)
    assert 0 < start <= _free(d.data_dir) - RESERVE

    # Something other than the driver fills half the disk.
    _fill(d.data_dir / "outsider.bin", 64 * MiB)
    filled = _capacity(d)
    assert start - 64 * MiB - SLACK <= filled <= start - 64 * MiB + SLACK
    assert filled <= _free(d.data_dir) - RESERVE

    # A promise is taken off what is left, although nothing is written yet.
    d.create_volume("pvc-small-fs-a", size=20 * MiB)
    promised = _capacity(d)
    assert filled - 20 * MiB - SLACK <= promised <= filled - 20 * MiB
    assert promised <= _free(d.data_dir) - RESERVE - 20 * MiB

    # Past what is left: RESOURCE_EXHAUSTED, and nothing is promised.
    with pytest.raises(grpc.RpcError) as exc:
        d.create_volume("pvc-small-fs-b", size=promised + 4 * MiB)
    assert code_of(exc) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _capacity(d) >= promised - SLACK
    resp = d.controller.GetCapacity(csi_pb2.GetCapacityRequest(volume_capabilities=[mount_cap()]))
    assert resp.maximum_volume_size.value == resp.available_capacity

    # What fits still fits; and freeing the outsider's bytes gives them back.
    d.create_volume("pvc-small-fs-c", size=promised - 2 * SLACK)
    (d.data_dir / "outsider.bin").unlink()
    os.sync()
    assert _capacity(d) >= 64 * MiB - 3 * SLACK
