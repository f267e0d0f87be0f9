"""``fusefs mount --engine=kernel``: the standalone mount on the kernel engine."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fusefs.control import SessionClient
from fusefs.standalone import mount_main
from tests.fusefs.conftest import force_unmount, mountinfo_entry
from tests.fusefs.test_fs_standalone import _alive, wait_until

pytestmark = pytest.mark.privileged


def test_background_mount_on_the_kernel_engine_and_umount(base_dir: Path) -> None:
    src, mnt = base_dir / "src", base_dir / "mnt"
    src.mkdir()
    mnt.mkdir()
    sock = str(base_dir / "ctl.sock")
    try:
        assert mount_main([str(src), str(mnt), "--capacity", "1Mi", "--control-socket", sock,
                           "--volume-id", "bench-k", "--engine=kernel"]) == 0
        assert mountinfo_entry(str(mnt)) == ("fuse.fusefs", "fusepath:bench-k")
        client = SessionClient(sock)
        assert client.stats()["negotiated"]["engine"] == "kernel"
        (mnt / "f").write_bytes(b"x" * 1000)
        assert (src / "f").read_bytes() == b"x" * 1000
        with pytest.raises(OSError):
            (mnt / "big").write_bytes(b"y" * (2 << 20))   # past the 1 MiB quota
        assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize == 1 << 20
        pid = client.ping()["pid"]
        subprocess.run(["umount", str(mnt)], check=True)      # a plain umount ends the session
        wait_until(lambda: not _alive(pid))
    finally:
        force_unmount(str(mnt))
