"""Shared pieces of the walk tests (tests/hostile/test_walk_*.py): a pod
played by real processes, deep and wide trees made the way a pod makes them
(``mkdirat`` relative to the last directory fd), and checks by fd walks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import grpc

from csi_driver.gen import csi_pb2
from tests.harness import MiB, mount_cap

C = grpc.StatusCode
HOST_SECRET = b"HOST-ROOT-ONLY-SECRET\n"
POD_UID = 1000


def uniq(prefix: str = "pvc") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def plant_host_secret(root: Path) -> Path:
    """A root-only directory outside every volume, holding a root-only file
    named like the pod's own file, so a copy that follows a swapped symlink
    would pick it up."""
    host = root / "host-secrets"
    host.mkdir(mode=0o700)
    secret = host / "data"
    secret.write_bytes(HOST_SECRET)
    os.chmod(secret, 0o600)
    return host


ATTACKER = r"""
import ctypes, os, sys, time
vol, host, seconds, uid, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
fd = os.open(vol, os.O_RDONLY | os.O_DIRECTORY)
if uid:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
os.mkdir("d", dir_fd=fd)
f = os.open("data", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd))
os.write(f, b"pod data\n"); os.close(f)
os.symlink(host, "l", dir_fd=fd)
print("ready", flush=True)
end = time.monotonic() + seconds
n = 0
while time.monotonic() < end:
    if mode == "blink":
        try:
            os.symlink(host, "l", dir_fd=fd)
        except FileExistsError:
            pass
    libc.renameat2(fd, b"d", fd, b"l", RENAME_EXCHANGE)
    libc.renameat2(fd, b"d", fd, b"l", RENAME_EXCHANGE)
    if mode == "blink":
        os.unlink("l", dir_fd=fd)
    n += 1
print(n, flush=True)
"""


def start_attacker(volume: Path, host: Path, seconds: float, uid: int = 0, mode: str = "swap") -> subprocess.Popen:
    """A pod process swapping the directory ``d`` with a symlink ``l`` to
    the host directory (renameat2 RENAME_EXCHANGE) for ``seconds``. Started
    as root to open the volume, it drops to ``uid`` before touching it."""
    proc = subprocess.Popen([sys.executable, "-c", ATTACKER, str(volume), str(host), str(seconds), str(uid), mode],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def make_deep(root: Path, depth: int, name: str = "a", every: int = 0) -> None:
    """``depth`` nested directories, each made relative to the last one's fd
    (as ``mkdir a; cd a`` in a loop would); a small file every ``every`` levels."""
    cur = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir(name, dir_fd=cur)
            if every and level % every == 0:
                f = os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=cur)
                os.write(f, b"x")
                os.close(f)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
            os.close(cur)
            cur = nxt
    finally:
        os.close(cur)


def deep_depth(root: Path, name: str = "a") -> int:
    """How many levels of ``name`` there are below ``root``, by fds."""
    cur = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    depth = 0
    try:
        while True:
            try:
                nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=cur)
            except FileNotFoundError:
                return depth
            os.close(cur)
            cur = nxt
            depth += 1
    finally:
        os.close(cur)


def make_wide(root: Path, count: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(count):
            os.close(os.open(f"f{i:07d}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Regular files below ``root`` (walked without following symlinks) whose
    content contains ``needle``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and needle in Path(path).read_bytes():
                    found.append(path)
            except OSError:
                pass
    return found


def create_from(driver, kind: str, source_id: str, size: int = 64 * MiB, name: str | None = None) -> csi_pb2.Volume:
    req = csi_pb2.CreateVolumeRequest(name=name or uniq(), volume_capabilities=[mount_cap()])
    req.capacity_range.required_bytes = size
    if kind == "volume":
        req.volume_content_source.volume.volume_id = source_id
    else:
        req.volume_content_source.snapshot.snapshot_id = source_id
    return driver.controller.CreateVolume(req).volume


def snapshot(driver, volume_id: str, **params: str) -> csi_pb2.Snapshot:
    return driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        name=uniq("snap"), source_volume_id=volume_id, parameters=params)).snapshot


def delete_volume(driver, volume_id: str) -> None:
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def write_bytes_of(pid: int) -> int:
    """Bytes a process caused to be written to storage (/proc/<pid>/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    raise AssertionError("no write_bytes in /proc/<pid>/io")


def remove_deep(root: Path) -> None:
    """Remove a test's tmp dir that may hold trees too deep for pytest's own
    (recursive) cleanup, which would otherwise fail every later session."""
    from csi_driver.fdtree import remove_tree_at

    if not root.exists():
        return
    parent = os.open(root.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        remove_tree_at(parent, root.name)
    except OSError:
        pass  # a mount left behind; the test's own teardown reports that
    finally:
        os.close(parent)
