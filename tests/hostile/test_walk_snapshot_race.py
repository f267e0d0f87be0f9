"""Issue 8 item 1, snapshots: an archive holds only the regular files,
directories and symlinks that were inside the source volume, read through
directory descriptors, whatever the pod does while it is cut.

A pod in a ``mounter: bind`` volume works straight on the backing directory
(no freeze, no FUSE in between). It swaps a regular file with a FIFO (any
uid can make one) or a device node (root in a pod) in a loop, so that a
cutter that decides by name what to leave out, and then opens by name,
archives the special file under the regular file's name: a snapshot that
restore refuses ("ready" yet unrestorable), or a device opened on the host.
And something mounted inside the volume on the same filesystem (a bind of a
host directory, as a pod with Bidirectional mount propagation can make) is
not the volume's, even when its device number matches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile

import grpc
import pytest

from csi_driver.gen import csi_pb2
from tests.hostile.walk_helpers import HOST_SECRET, POD_UID, plant_host_secret, snapshot, uniq

pytestmark = pytest.mark.privileged
SECONDS = float(os.environ.get("FUSEPATH_RACE_SECONDS", "3"))

SWAPPER = r"""
import ctypes, os, stat, sys, time
vol, kind, seconds, uid = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
fd = os.open(vol, os.O_RDONLY | os.O_DIRECTORY)
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
libc = ctypes.CDLL(None, use_errno=True)
for i in range(8):
    f = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(f, b"pod data\n" * 100); os.close(f)
    if kind == "fifo":
        os.mkfifo(f"s{i}", 0o644, dir_fd=fd)
    else:  # /dev/null's numbers: harmless to open, but never the volume's
        os.mknod(f"s{i}", 0o600 | stat.S_IFCHR, os.makedev(1, 3), dir_fd=fd)
print("ready", flush=True)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    for i in range(8):
        libc.renameat2(fd, f"f{i}".encode(), fd, f"s{i}".encode(), 2)  # RENAME_EXCHANGE
    n += 1
print(n, flush=True)
"""

SPECIAL = (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)


def archive_of(driver, snap: csi_pb2.Snapshot):  # type: ignore[no-untyped-def]
    return next((driver.data_dir / "snapshots").glob(f"{snap.snapshot_id}.tar*"))


@pytest.mark.parametrize("kind,uid", [("fifo", POD_UID), ("chardev", 0)], ids=["fifo-uid1000", "chardev-root"])
def test_snapshot_during_a_special_file_swap_holds_no_special_file(driver, kind, uid):
    src = driver.create_volume(uniq(), size=16 << 20)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(driver.volume_dir(src.volume_id)), kind,
                                str(SECONDS), str(uid)], stdout=subprocess.PIPE, text=True)
    assert swapper.stdout is not None and swapper.stdout.readline().strip() == "ready"
    cut = failed = bad = 0
    try:
        while swapper.poll() is None:
            try:
                snap = snapshot(driver, src.volume_id)
            except grpc.RpcError:
                failed += 1  # a cut may fail under attack; it must never hold a special file
                continue
            cut += 1
            with tarfile.open(archive_of(driver, snap)) as tar:
                bad += sum(1 for m in tar if m.type in SPECIAL)
            driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    finally:
        swapper.wait()
    print(f"snapshots={cut} failed={failed} special members={bad} swaps={swapper.stdout.read().strip()}")
    assert cut > 0
    assert bad == 0, f"{bad} special files in {cut} snapshots: they were ready, but restore refuses them"


@pytest.mark.parametrize("what", ["dir", "file"])
def test_a_same_filesystem_bind_mount_inside_the_source_is_not_archived(driver, tmp_path, what):
    host = plant_host_secret(tmp_path)
    src = driver.create_volume(uniq(), size=16 << 20)
    inner = driver.volume_dir(src.volume_id) / "mnt"
    if what == "dir":
        inner.mkdir()
    else:
        inner.write_bytes(b"a name of the pod's\n")
        host = host / "data"
    (driver.volume_dir(src.volume_id) / "own").write_bytes(b"pod data\n")
    subprocess.run(["mount", "--bind", str(host), str(inner)], check=True)
    try:
        assert os.stat(inner).st_dev == os.stat(inner.parent).st_dev  # only the mount id tells them apart
        snap = snapshot(driver, src.volume_id)
        with tarfile.open(archive_of(driver, snap)) as tar:
            names = [m.name for m in tar]
            leaked = [m.name for m in tar if m.isreg() and HOST_SECRET in tar.extractfile(m).read()]
        assert "./own" in names
        assert leaked == [], f"host files archived from a bind mount inside the volume: {leaked}"
    finally:
        subprocess.run(["umount", str(inner)], check=True)
