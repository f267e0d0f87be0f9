"""Usage survives every remount (issue 8, item 4).

The mount-time scan used to walk by absolute path strings and skip entries
whose path reached PATH_MAX, which a pod makes with relative paths: they
counted as zero, so each restage freed them again (a 16 MiB volume held
48 MiB after three restages). The usage must be the same before and after a
clean restage, a crash (SIGKILL) and a restart, and the host must never hold
more than the capacity.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.fusefs.conftest import base_dir  # noqa: F401 - fixture
from tests.hostile.quota_volume import DU_SLACK, Volume, as_pod, du_bytes, fill, volumes, wait_scan_ended, wait_scanned

pytestmark = pytest.mark.privileged

MiB = 1 << 20
LEVEL = "d" * 200  # 25 levels make a path longer than PATH_MAX (4096)


def _deep_tree(mountpoint: Path) -> int:
    """As the pod: data at the bottom of a tree, then the tree made deeper
    than PATH_MAX by renaming its directories to long names bottom-up (each
    request names a short path; the result cannot be walked by path)."""
    def pod() -> int:
        depth = 30
        bottom = mountpoint.joinpath(*["d"] * depth)
        bottom.mkdir(parents=True)
        for i in range(8):
            (bottom / f"deep{i}").write_bytes(b"x" * (32 << 10))
        for level in range(depth, 0, -1):
            os.chdir(mountpoint.joinpath(*["d"] * (level - 1)))
            os.rename("d", LEVEL)
        return 8 * (32 << 10) + fill(mountpoint, "top", 32 << 10)
    return as_pod(pod)


@pytest.mark.parametrize("how", ["restage", "crash"])
def test_usage_is_the_same_after_remounts(base_dir: Path, how: str) -> None:  # noqa: F811
    with volumes(base_dir) as made:
        v = Volume(base_dir, capacity=MiB)
        made.append(v)
        m = v.start()
        assert _deep_tree(m.mountpoint) > 0
        first = wait_scanned(v)
        usage = (first["used_bytes"], first["used_inodes"])
        for _ in range(3):
            v.restage(signal.SIGTERM if how == "restage" else signal.SIGKILL)
            st = wait_scanned(v)
            assert (st["used_bytes"], st["used_inodes"]) == usage
            assert st["abnormal"] == ""
            # the pod tries to write more: the volume is still full
            assert as_pod(lambda: fill(v.mountpoint, f"more{v.generation}-")) == 0
        assert du_bytes(v.source) <= MiB + DU_SLACK


def test_clean_restage_trusts_the_persisted_usage(base_dir: Path) -> None:  # noqa: F811
    with volumes(base_dir) as made:
        v = Volume(base_dir, capacity=4 * MiB)
        made.append(v)
        v.start()
        (v.mountpoint / "f").write_bytes(b"x" * 10000)
        before = wait_scanned(v)
        v.restage()
        st = v.stats()
        assert st["scan"]["state"] == "trusted"
        assert st["used_bytes"] == before["used_bytes"] and st["used_inodes"] == before["used_inodes"]
        # a change behind the session's back (the host, a restore) is noticed
        v.stop()
        (v.source / "g").write_bytes(b"y" * 20000)
        v.start()
        st = wait_scanned(v)
        assert st["scan"]["state"] == "done"
        assert st["used_bytes"] == before["used_bytes"] + 20480


def test_an_entry_the_scan_cannot_measure_makes_the_volume_abnormal(base_dir: Path) -> None:  # noqa: F811
    """Another filesystem mounted inside a backing directory (which no pod
    can do, but a host can) cannot be measured: never counted as free."""
    import errno
    import subprocess

    with volumes(base_dir) as made:
        v = Volume(base_dir, capacity=MiB)
        made.append(v)
        inner = v.source / "mounted-here"
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inner)], check=True)
        try:
            v.start()
            st = wait_scan_ended(v, timeout=30)
            assert st["scan"]["state"] == "failed"
            assert "mounted-here" in st["abnormal"] and "another filesystem" in st["abnormal"]
            assert st["used_bytes"] == st["capacity"]                 # shows full...
            with pytest.raises(OSError) as exc:                      # ...and is: nothing grows
                (v.mountpoint / "f").write_bytes(b"x")
            assert exc.value.errno == errno.ENOSPC
            assert v.session is not None
            text = v.session.client.metrics()
            assert f'fusefs_abnormal{{volume_id="{v.volume_id}"}} 1' in text
            v.stop()
        finally:
            subprocess.run(["umount", "-l", str(inner)], check=False)


def test_nothing_grows_while_the_usage_is_unknown(base_dir: Path) -> None:  # noqa: F811
    """While the usage is unknown (here for good: the scan cannot measure an
    entry) every operation that can grow the volume is refused with ENOSPC,
    not only creates and writes; what cannot grow it keeps working."""
    import errno
    import subprocess

    with volumes(base_dir) as made:
        v = Volume(base_dir, capacity=MiB)
        made.append(v)
        for name in ("f", "a", "b"):
            (v.source / name).write_bytes(b"x")
            os.chown(v.source / name, 1000, 1000)
        inner = v.source / "mounted-here"
        inner.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inner)], check=True)
        try:
            v.start()
            assert wait_scan_ended(v, timeout=30)["scan"]["state"] == "failed"
            m = v.mountpoint

            def append() -> None:
                fd = os.open(m / "f", os.O_WRONLY)
                try:
                    os.pwrite(fd, b"y" * 10, 4096)      # past the block the file is charged
                finally:
                    os.close(fd)

            growth = {
                "create": lambda: os.close(os.open(m / "new", os.O_CREAT | os.O_WRONLY, 0o644)),
                "mkdir": lambda: os.mkdir(m / "d"),
                "mkfifo": lambda: os.mkfifo(m / "p"),
                "symlink": lambda: os.symlink("f", m / "s"),
                "link": lambda: os.link(m / "f", m / "f2"),
                "rename to a new name": lambda: os.rename(m / "a", m / "c"),
                "setxattr": lambda: os.setxattr(m / "f", "user.k", b"v"),
                "truncate up": lambda: os.truncate(m / "f", 1 << 16),
                "write past the charged block": append,
            }

            def pod() -> dict[str, int]:
                refused = {}
                for what, attempt in growth.items():
                    try:
                        attempt()
                        refused[what] = 0
                    except OSError as exc:
                        refused[what] = exc.errno or -1
                # what cannot grow the volume still works
                os.rename(m / "a", m / "b")                    # over an existing name
                os.unlink(m / "b")
                assert (m / "f").read_bytes() == b"x"
                return refused
            refused = as_pod(pod)
            assert refused == {what: errno.ENOSPC for what in growth}
            assert sorted(os.listdir(v.source)) == ["f", "mounted-here"]
            v.stop()
        finally:
            subprocess.run(["umount", "-l", str(inner)], check=False)
