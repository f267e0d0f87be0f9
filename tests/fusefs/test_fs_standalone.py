"""``fusefs mount SOURCE MOUNTPOINT`` outside the daemon (fusefs/standalone.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusefs.control import SessionClient
from fusefs.standalone import default_volume_id, mount_main, parse_size
from tests.fusefs.conftest import REPO, force_unmount, is_mounted, mountinfo_entry

pytestmark = pytest.mark.privileged


def wait_until(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    """Running (a zombie child of this test process does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_parse_size() -> None:
    assert parse_size("1048576") == 1 << 20
    assert parse_size("10Gi") == 10 << 30
    assert parse_size("500M") == 500_000_000
    assert default_volume_id("/x/y z").startswith("standalone-y-z-")


@pytest.mark.parametrize("engine", ["libfuse", "kernel"])
def test_background_mount_and_umount(base_dir: Path, engine: str) -> None:
    src, mnt = base_dir / "src", base_dir / "mnt"
    src.mkdir()
    mnt.mkdir()
    sock = str(base_dir / "ctl.sock")
    try:
        assert mount_main([str(src), str(mnt), "--capacity", "1Mi", "--control-socket", sock,
                           "--volume-id", "bench-1", f"--engine={engine}"]) == 0
        assert mountinfo_entry(str(mnt)) == ("fuse.fusefs", "fusepath:bench-1")
        client = SessionClient(sock)
        assert client.stats()["negotiated"].get("engine", "libfuse") == engine  # libfuse does not name itself
        (mnt / "f").write_bytes(b"x" * 1000)
        assert (src / "f").read_bytes() == b"x" * 1000
        with pytest.raises(OSError):
            (mnt / "big").write_bytes(b"y" * (2 << 20))   # past the 1 MiB quota
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == 1 << 20
        pid = client.ping()["pid"]
        subprocess.run(["umount", str(mnt)], check=True)      # a plain umount ends the session
        wait_until(lambda: not _alive(pid))
        assert not Path(sock).exists()
    finally:
        force_unmount(str(mnt))


def test_foreground_mount_stops_on_sigterm(base_dir: Path) -> None:
    src, mnt = base_dir / "src", base_dir / "mnt"
    src.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fusefs.standalone", str(src), str(mnt), "--foreground",
                             "--control-socket", str(base_dir / "c.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        wait_until(lambda: is_mounted(str(mnt)) and os.path.exists(base_dir / "c.sock"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not is_mounted(str(mnt))
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(str(mnt))


def test_refuses_missing_directories(base_dir: Path) -> None:
    assert mount_main([str(base_dir / "nope"), str(base_dir)]) == 2
