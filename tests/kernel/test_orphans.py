"""A file a pod unlinked while it holds it open survives a takeover.

With ``--orphan-dir`` the session does not unlink the last name of a file
that is open: it renames it into the orphan directory (outside the volume,
on the same filesystem), so the inode outlives the session's own
descriptors. A SIGKILLed session's successor finds it through the node
journal; the pod's descriptor keeps working (no ESTALE), ``fstat`` still
says ``st_nlink == 0``, and when the pod closes it the orphan is removed
and its charge returned. A fresh mount empties a leftover orphan directory.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest

from tests.fusefs.conftest import Mounted, base_dir  # noqa: F401 - fixture
from tests.kernel import test_engine
from tests.kernel.conftest import kstart  # noqa: F401 - fixture
from tests.kernel.conftest import ENV, Holder, Volume, holder, wait_for  # noqa: F401 - fixtures

pytestmark = pytest.mark.privileged

#: The pod: make a file, write it, take its last name away (unlink, or a
#: rename over it), keep it open; after "go" on stdin, read it back, write
#: more, fstat it, close it.
POD = r"""
import os, sys
d, how = sys.argv[1], sys.argv[2]
path = os.path.join(d, "tmpfile")
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
data = bytes(range(256)) * 400          # 100 KiB
os.write(fd, data)
os.fsync(fd)
if how == "late-unlink":   # opened before a takeover, unlinked after it
    print("opened", flush=True)
    assert sys.stdin.readline().strip() == "unlink"
if how != "rename-over":
    os.unlink(path)
else:
    other = os.path.join(d, "other")
    with open(other, "wb") as f:
        f.write(b"replacement")
    os.rename(other, path)               # over the open file: its last name
print("ready", os.fstat(fd).st_nlink, flush=True)
assert sys.stdin.readline().strip() == "go"
try:
    ok = os.pread(fd, len(data), 0) == data
    os.pwrite(fd, b"more" * 1024, len(data))
    st = os.fstat(fd)
    ok = ok and os.pread(fd, 4096, len(data)) == b"more" * 1024
    print("after", ok, st.st_nlink, st.st_size, flush=True)
except OSError as exc:
    print("error", exc.errno, exc.strerror, flush=True)
assert sys.stdin.readline().strip() == "close"
os.close(fd)
print("closed", flush=True)
"""


def _pod(argv: list[str]) -> list[str]:
    return ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", *argv]


def _orphan_dir(volume: Volume) -> Path:
    path = volume.base / "orphans"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _start(volume: Volume, takeover: bool = False) -> Any:
    return volume.start(takeover=takeover, extra=["--orphan-dir", str(_orphan_dir(volume))])


def _usage(volume: Volume) -> tuple[int, int]:
    st = volume.sessions[-1].client.stats()
    return st["used_bytes"], st["used_inodes"]


def _kill_and_take_over(volume: Volume) -> None:
    m = volume.sessions[-1]
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(10)
    _start(volume, takeover=True)


@pytest.mark.parametrize("how", ["unlink", "rename-over", "late-unlink"])
def test_an_unlinked_open_file_survives_a_takeover(volume: Volume, how: str) -> None:
    _start(volume)
    work = volume.mountpoint / "w"
    work.mkdir()
    os.chown(work, 1000, 1000)
    before = _usage(volume)
    pod = subprocess.Popen(_pod([sys.executable, "-c", POD, str(work), how]), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    try:
        assert pod.stdin is not None and pod.stdout is not None
        if how == "late-unlink":
            # The successor has not seen this open (the kernel keeps it from
            # the dead session): the node was restored from the journal.
            assert pod.stdout.readline().strip() == b"opened"
            _kill_and_take_over(volume)
            pod.stdin.write(b"unlink\n")
            pod.stdin.flush()
        line = pod.stdout.readline().decode().split()
        assert line == ["ready", "0"], line
        orphans = _orphan_dir(volume)
        assert len(os.listdir(orphans)) == 1, "the open file was moved to the orphan directory"
        assert sorted(os.listdir(volume.source / "w")) == (["tmpfile"] if how == "rename-over" else [])
        _kill_and_take_over(volume)
        _kill_and_take_over(volume)  # twice: a successor's journal carries the orphan on
        pod.stdin.write(b"go\n")
        pod.stdin.flush()
        line = pod.stdout.readline().decode().split()
        assert line == ["after", "True", "0", str(102400 + 4096)], line
        assert len(os.listdir(orphans)) == 1
        pod.stdin.write(b"close\n")
        pod.stdin.flush()
        assert pod.stdout.readline().strip() == b"closed"
        assert pod.wait(10) == 0
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait(5)
    wait_for(lambda: not os.listdir(_orphan_dir(volume)), what="the orphan removed after the last close")
    if how == "rename-over":
        (volume.mountpoint / "w" / "tmpfile").unlink()  # the replacement
    wait_for(lambda: _usage(volume) == before, what=f"the usage back to {before} (now {_usage(volume)})")
    assert not os.listdir(volume.source / "w")


def test_an_unlinked_file_closed_before_the_kill_leaves_nothing(volume: Volume) -> None:
    """The ordinary case stays ordinary: nothing open, nothing orphaned."""
    _start(volume)
    f = volume.mountpoint / "f"
    with open(f, "wb") as out:
        out.write(b"x" * 10000)
        f.unlink()
        assert len(os.listdir(_orphan_dir(volume))) == 1  # open: kept as an orphan
    wait_for(lambda: not os.listdir(_orphan_dir(volume)), what="the orphan removed on close")
    g = volume.mountpoint / "g"
    g.write_bytes(b"y")
    g.unlink()
    assert not os.listdir(_orphan_dir(volume))


def test_a_fresh_mount_empties_a_leftover_orphan_directory(volume: Volume) -> None:
    """What a crash left (treated as hostile: nested directories, a symlink
    pointing into the volume) is removed by a fresh mount, by descriptors;
    the volume's own files are untouched."""
    orphans = _orphan_dir(volume)
    (orphans / "5").write_bytes(b"left by a crash")
    nested = orphans / "d" / "e"
    nested.mkdir(parents=True)
    (nested / "f").write_bytes(b"x")
    (volume.source / "keep").write_bytes(b"mine")
    (orphans / "link").symlink_to(volume.source)
    _start(volume)
    assert os.listdir(orphans) == []
    assert (volume.source / "keep").read_bytes() == b"mine"
    assert (volume.mountpoint / "keep").read_bytes() == b"mine"


def test_without_an_orphan_dir_unlink_is_a_plain_unlink(volume: Volume) -> None:
    volume.start()
    f = volume.mountpoint / "f"
    with open(f, "wb") as out:
        out.write(b"x")
        f.unlink()
        assert os.fstat(out.fileno()).st_nlink == 0
    assert not os.listdir(volume.source)


def test_plain_directory_semantics_hold_with_an_orphan_dir(kstart: Callable[..., Mounted], tmp_path: Path) -> None:
    """The engine's unlinked-open-file test, with the orphan directory on:
    fstat says nlink 0, the parent can be removed, the data stays
    readable, the quota is given back on close; the orphan is gone then."""
    orphans = tmp_path / "orphans"
    orphans.mkdir(mode=0o700)
    test_engine.test_unlinked_open_file_behaves_as_on_a_plain_directory(
        lambda **kw: kstart(extra=["--orphan-dir", str(orphans)], **kw))
    wait_for(lambda: not os.listdir(orphans), what="the orphan removed")


def test_an_orphan_dir_on_another_filesystem_is_not_used(kstart: Callable[..., Mounted], tmp_path: Path) -> None:
    """A rename cannot cross filesystems: such a directory is refused (logged)
    and unlink works as without one."""
    other = Path("/dev/shm") / f"orphans-{os.getpid()}-{tmp_path.name}"
    other.mkdir(mode=0o700)
    try:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the test directory's filesystem")
        m = kstart(extra=["--orphan-dir", str(other)])
        f = m.mountpoint / "f"
        with open(f, "wb") as out:
            out.write(b"x")
            f.unlink()
            assert os.fstat(out.fileno()).st_nlink == 0
        assert not os.listdir(other) and not os.listdir(m.source)
        assert "orphan directory unusable" in m.log()
    finally:
        other.rmdir()


HOLD = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"h" * 50000)
os.unlink(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
print("read", os.pread(fd, 50000, 0) == b"h" * 50000, flush=True)
sys.stdin.readline()
"""


def _hold(path: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(_pod([sys.executable, "-c", HOLD, str(path)]), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


def _ask(proc: subprocess.Popen[bytes], line: bytes) -> bytes:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + b"\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def _work_dir(volume: Volume) -> Path:
    work = volume.mountpoint / "w"
    work.mkdir()
    os.chown(work, 1000, 1000)
    return work


def test_a_clean_stop_frees_the_orphans_and_persists_the_volumes_usage(volume: Volume) -> None:
    """SIGTERM ends the connection: the orphans go with it, and the usage
    persisted for the next fresh mount (which trusts it) is the volume's."""
    usage_file = ["--usage-file", str(volume.base / "vol.usage")]
    volume.start(extra=["--orphan-dir", str(_orphan_dir(volume)), *usage_file])
    work = _work_dir(volume)
    before = _usage(volume)
    pod = _hold(work / "f")
    try:
        assert len(os.listdir(_orphan_dir(volume))) == 1
        assert _usage(volume)[0] >= before[0] + 50000
        m = volume.sessions[-1]
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(30) == 0
    finally:
        pod.kill()
        pod.wait(5)
    assert not os.listdir(_orphan_dir(volume))
    volume.start(extra=["--orphan-dir", str(_orphan_dir(volume)), *usage_file])
    st = volume.sessions[-1].client.stats()
    assert st["scan"]["state"] == "trusted", st["scan"]
    assert (st["used_bytes"], st["used_inodes"]) == before


def test_a_rescan_after_a_takeover_counts_the_orphans(volume: Volume) -> None:
    """With the live counters lost, the successor rescans: the orphan, which
    the scan of the volume cannot see, is still charged, and uncharged when
    the pod closes it."""
    _start(volume)
    work = _work_dir(volume)
    before = _usage(volume)
    pod = _hold(work / "f")
    try:
        charged = _usage(volume)
        volume.sessions[-1].proc.send_signal(signal.SIGKILL)
        volume.sessions[-1].proc.wait(10)
        os.unlink(volume.state + ".live")
        _start(volume, takeover=True)
        st = wait_for(lambda: (s := volume.sessions[-1].client.stats())["scan"]["state"] != "running" and s,
                      what="the rescan")
        assert "adopted" not in st["scan"], st["scan"]
        assert (st["used_bytes"], st["used_inodes"]) == charged
        assert _ask(pod, b"go") == b"read True"
        _ask(pod, b"close")
        assert pod.wait(10) == 0
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait(5)
    wait_for(lambda: _usage(volume) == before, what=f"the usage back to {before} (now {_usage(volume)})")
    assert not os.listdir(_orphan_dir(volume))


def test_only_the_last_link_of_an_open_file_is_kept(volume: Volume) -> None:
    """A file with two names: removing one keeps nothing (the other holds
    the inode); removing the last keeps it while open."""
    _start(volume)
    a, b = volume.mountpoint / "a", volume.mountpoint / "b"
    with open(a, "wb") as out:
        out.write(b"x" * 5000)
        os.link(a, b)
        a.unlink()
        assert not os.listdir(_orphan_dir(volume))
        b.unlink()
        assert len(os.listdir(_orphan_dir(volume))) == 1
        assert os.fstat(out.fileno()).st_nlink == 0
    wait_for(lambda: not os.listdir(_orphan_dir(volume)), what="the orphan removed on close")


HOLD_THEN_CLOSE = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"h" * 50000)
os.unlink(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
os.close(fd)   # no FLUSH is asked for: close(2) does not wait for a server
print("closed", flush=True)
"""


def test_a_file_closed_while_no_session_serves_is_freed_by_the_successor(volume: Volume) -> None:
    """The pod closes the orphan between the kill and the takeover: the
    kernel queues the release and forget, the successor gets them, removes
    the orphan and returns its charge."""
    _start(volume)
    work = _work_dir(volume)
    before = _usage(volume)
    pod = subprocess.Popen(_pod([sys.executable, "-c", HOLD_THEN_CLOSE, str(work / "f")]), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    try:
        assert pod.stdout is not None and pod.stdout.readline().strip() == b"held"
        m = volume.sessions[-1]
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
        assert _ask(pod, b"close") == b"closed"
        assert pod.wait(10) == 0
    finally:
        if pod.poll() is None:
            pod.kill()
            pod.wait(5)
    assert len(os.listdir(_orphan_dir(volume))) == 1
    _start(volume, takeover=True)
    wait_for(lambda: not os.listdir(_orphan_dir(volume)), what="the orphan removed by the successor")
    wait_for(lambda: _usage(volume) == before, what=f"the usage back to {before} (now {_usage(volume)})")
