"""Usage survives a daemon restart, a daemon crash and a restage (issue 8, item 4),
seen as the driver sees it: the fusefs daemon's Stats RPC.

The sessions persist their usage beside their control sockets, in the
daemon's private state directory: a graceful daemon stop (SIGTERM) leaves it
clean and the next session trusts it; a daemon SIGKILL kills the sessions
too, and the next ones rebuild the usage in the background, showing the
volume as full (nothing grows) until they know it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.fusefs.test_daemon import MiB, Node, node  # noqa: F401 - fixture

pytestmark = pytest.mark.privileged

CAPACITY = 4 * MiB


def _used(node: Node, vid: str, timeout: float = 60.0) -> int:  # noqa: F811
    """Used bytes once the session knows them (while it recounts: capacity)."""
    deadline = time.monotonic() + timeout
    with node.client() as c:
        while True:
            st = c.stats(vid)
            if st.used_bytes != CAPACITY:
                assert st.healthy, st.message
                return st.used_bytes
            assert time.monotonic() < deadline, "usage never became known"
            time.sleep(0.05)


def _populate(stage: str) -> None:
    """Data, a deep tree renamed to long names, xattrs, links and symlinks."""
    root = Path(stage)
    bottom = root.joinpath(*["d"] * 25)
    bottom.mkdir(parents=True)
    (bottom / "data").write_bytes(b"x" * 300_000)
    for level in range(25, 0, -1):
        os.rename(root.joinpath(*["d"] * (level - 1), "d"), root.joinpath(*["d"] * (level - 1), "L" * 200))
    (root / "f").write_bytes(b"y" * 5000)
    os.setxattr(root / "f", "user.k", b"v" * 300)
    for i in range(50):
        os.link(root / "f", root / f"link-{i:0100d}")
        os.symlink("t" * 300, root / f"sym{i}")


@pytest.mark.parametrize("how", ["daemon-sigterm", "daemon-sigkill", "restage"])
def test_usage_survives(node: Node, how: str) -> None:  # noqa: F811
    daemon = node.start()
    vid = node.new_volume("hello\n")
    stage = node.stage(vid)
    with node.client() as c:
        c.mount(vid, stage, CAPACITY)
    _populate(stage)
    before = _used(node, vid)
    assert 300_000 < before < CAPACITY
    for _ in range(2):
        if how == "restage":
            with node.client() as c:
                c.unmount(vid)
                c.mount(vid, stage, CAPACITY)
        else:
            daemon.send_signal(signal.SIGTERM if how == "daemon-sigterm" else signal.SIGKILL)
            daemon.wait(30)
            daemon = node.start()
            node.wait_answering(daemon)
        assert _used(node, vid) == before


def test_an_unmeasurable_volume_is_unhealthy_in_stats(node: Node) -> None:  # noqa: F811
    """What the session cannot measure shows in the VolumeCondition the
    driver reports, and the volume accepts no growth."""
    import subprocess

    node.start()
    vid = node.new_volume()
    inner = node.volumes / vid / "a-mount"
    inner.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inner)], check=True)
    try:
        stage = node.stage(vid)
        with node.client() as c:
            c.mount(vid, stage, CAPACITY)
            deadline = time.monotonic() + 30
            while (st := c.stats(vid)).healthy:
                assert time.monotonic() < deadline, "never reported"
                time.sleep(0.05)
            assert "abnormal" in st.message and "a-mount" in st.message
            assert st.available_bytes == 0
        with pytest.raises(OSError):
            Path(stage, "grow").write_bytes(b"x")
    finally:
        subprocess.run(["umount", "-l", str(inner)], check=False)
