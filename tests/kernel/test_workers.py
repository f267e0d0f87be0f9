"""The kernel engine's worker model and its short cuts for speed, on real mounts.

The engine serves with one worker and adds workers only when a request may
wait (see fusefs/kernel/engine.py): these tests pin down that a request stuck
in the backing filesystem or parked by a freeze never starves the others,
and that READDIRPLUS answers with the
same nodes as LOOKUP does.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fusefs.conftest import Mounted
from tests.kernel.conftest import wait_for

pytestmark = pytest.mark.privileged


@pytest.mark.skipif(shutil.which("bindfs") is None, reason="needs bindfs (apt-get install bindfs)")
def test_a_request_stuck_in_the_backing_filesystem_does_not_starve_the_others(
        kstart: Callable[..., Mounted], tmp_path: Path) -> None:
    """A FUSE mount inside the source whose server is stopped makes a LOOKUP
    hang in the session (its fstat never returns). Other requests must still
    be served: the watchdog adds a worker when every worker is stuck."""
    m = kstart()
    (m.source / "other").write_bytes(b"x")
    inner_src = tmp_path / "inner-src"
    inner_src.mkdir()
    (inner_src / "f").write_bytes(b"y")
    stuck = m.source / "stuck"
    stuck.mkdir()
    bindfs = subprocess.Popen(["bindfs", "-f", str(inner_src), str(stuck)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stopped = False
    waiter: threading.Thread | None = None
    try:
        wait_for(lambda: os.path.ismount(stuck), what="bindfs mounted inside the source")
        bindfs.send_signal(signal.SIGSTOP)
        stopped = True
        results: list[object] = []
        waiter = threading.Thread(target=lambda: results.append(os.stat(m.mountpoint / "stuck" / "f")),
                                  daemon=True)
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive(), "the lookup should hang on the stopped server"
        # Served by another worker, while the first one stays stuck.
        done = threading.Event()
        threading.Thread(target=lambda: (os.stat(m.mountpoint / "other"), done.set()), daemon=True).start()
        assert done.wait(30), "a request was starved by one stuck in the backing filesystem"
        assert (m.mountpoint / "other").read_bytes() == b"x"
        assert waiter.is_alive()
    finally:
        if stopped:
            bindfs.send_signal(signal.SIGCONT)
        if waiter is not None:
            waiter.join(30)
        # Lazily: the session still holds a node inside it until it stops.
        subprocess.run(["umount", "--lazy", str(stuck)], capture_output=True)
        bindfs.terminate()
        try:
            bindfs.wait(30)
        except subprocess.TimeoutExpired:
            bindfs.kill()
            bindfs.wait(10)


def test_reads_go_on_while_a_write_is_parked_by_a_freeze(kstart: Callable[..., Mounted]) -> None:
    """A write parked by a freeze holds the only worker; another is started
    (at once, by the parking itself) so reads, stats and lookups go on."""
    m = kstart()
    (m.mountpoint / "f").write_bytes(b"")
    (m.mountpoint / "r").write_bytes(b"data")
    m.client.freeze(120)
    fd = os.open(m.mountpoint / "f", os.O_WRONLY)
    writer = threading.Thread(target=lambda: os.write(fd, b"after thaw"), daemon=True)
    try:
        writer.start()
        time.sleep(0.3)
        assert writer.is_alive(), "the write should be parked by the freeze"
        seen: list[object] = []
        done = threading.Event()

        def others() -> None:
            seen.extend([(m.mountpoint / "r").read_bytes(), os.stat(m.mountpoint / "r").st_size,
                         (m.mountpoint / "absent").exists()])
            done.set()
        threading.Thread(target=others, daemon=True).start()
        assert done.wait(30), "requests were starved by a write parked by the freeze"
        assert seen == [b"data", 4, False]
        assert writer.is_alive()
    finally:
        m.client.thaw()
        writer.join(30)
        os.close(fd)
    assert (m.mountpoint / "f").read_bytes() == b"after thaw"


def test_readdirplus_gives_the_nodes_lookup_gives(kstart: Callable[..., Mounted]) -> None:
    """``ls -l`` of a directory whose entries the kernel already knows (the
    short cut: one stat by name) shows what stat shows, also after a name
    was replaced on the host between two listings, and hard links keep one
    inode."""
    m = kstart()
    d = m.mountpoint / "d"
    d.mkdir()
    for i in range(50):
        (d / f"f{i}").write_bytes(b"a" * i)
    os.link(d / "f7", d / "hard")
    first = {e.name: (e.inode(), e.stat(follow_symlinks=False).st_size) for e in os.scandir(d)}
    again = {e.name: (e.inode(), e.stat(follow_symlinks=False).st_size) for e in os.scandir(d)}
    assert first == again and first["hard"] == first["f7"]
    # Replaced on the host (not through the mount): a new inode under an old name.
    os.unlink(m.source / "d" / "f3")
    (m.source / "d" / "f3").write_bytes(b"b" * 1000)
    os.unlink(m.source / "d" / "f4")
    listing = subprocess.run(["ls", "-l", str(d)], capture_output=True, text=True, check=True).stdout
    names = sorted(line.split()[-1] for line in listing.splitlines()[1:])
    assert names == sorted([f"f{i}" for i in range(50) if i != 4] + ["hard"])
    for e in os.scandir(d):
        assert e.inode() == os.stat(d / e.name, follow_symlinks=False).st_ino
    assert os.stat(d / "f3").st_size == 1000
    assert os.stat(d / "hard").st_ino == os.stat(d / "f7").st_ino


def test_posix_acl_attributes_are_unsupported_as_on_a_noacl_mount(kstart: Callable[..., Mounted]) -> None:
    """The kernel does not enforce ACLs on this mount, so the ACL attributes
    answer EOPNOTSUPP (as on an ext4 mounted noacl) instead of ENODATA: tools
    such as ``ls -l`` then stop asking for each file. An ACL set on the host
    is neither shown nor listed."""
    m = kstart()
    f = m.mountpoint / "f"
    f.write_bytes(b"")
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError) as exc:
            os.getxattr(f, name)
        assert exc.value.errno == errno.EOPNOTSUPP
    if shutil.which("setfacl"):
        subprocess.run(["setfacl", "-m", "u:1234:r", str(m.source / "f")], check=True)
        assert not any(n.startswith("system.posix_acl") for n in os.listxattr(f))
        with pytest.raises(OSError) as exc:
            os.getxattr(f, "system.posix_acl_access")
        assert exc.value.errno == errno.EOPNOTSUPP
    os.setxattr(f, "user.k", b"v")
    assert os.getxattr(f, "user.k") == b"v" and "user.k" in os.listxattr(f)


def test_lookups_counted_by_readdirplus_survive_a_handover(tmp_path: Path) -> None:
    """READDIRPLUS counts a lookup on a known node without opening it
    (NodeTable.pin); that count is stored in the counts file like any
    other, so a successor forgets the node after exactly as many lookups as
    the kernel holds (no FORGET beyond the count, no node kept for ever)."""
    from fusefs.kernel.nodes import NodeTable

    root, journal = tmp_path / "root", tmp_path / "journal"
    root.mkdir()
    (root / "f").write_bytes(b"")
    old = NodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY), str(journal))
    old.start_journal()
    fd = os.open(root / "f", os.O_PATH | os.O_NOFOLLOW)
    st = os.fstat(fd)
    nodeid = old.remember(fd, st).nodeid
    for _ in range(3):
        assert old.pin((st.st_dev, st.st_ino)) is not None  # three listings: 4 lookups in all
    assert old.pin((st.st_dev, st.st_ino + 1_000_000)) is None

    new = NodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY), str(journal))
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 1
    assert new.get(nodeid).lookups == 4
    new.forget(nodeid, 3)
    assert new.get(nodeid).lookups == 1  # the kernel still holds one
    new.forget(nodeid, 1)
    with pytest.raises(OSError):
        new.get(nodeid)
    assert new.forget_excess == 0
