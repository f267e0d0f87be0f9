"""The daemon on the kernel engine restarts a volume's session by takeover.

Real daemon (``fusefs serve --engine kernel``), real descriptor holder
(``fusefs holder``), real FUSE mounts. A pretend pod (uid 1000) works in the
volume through a publish target bind: a writer appends a line and fsyncs
every 50 ms through a descriptor held since before any kill (and through a
fresh open by path each time), and a reader holds a file open and reads it
back each tick. Then:

(a) the volume's session is SIGKILLed: the daemon starts a successor with
    ``--takeover``; neither process sees an error, the staging mount and the
    target's bind keep their mount IDs, the takeover is counted and the
    remount counter is not;
(b) the daemon is SIGKILLed (its sessions die with it) and a new one is
    started with the same state directory and the external holder: the same,
    across daemons;
(c) with no external holder, a session SIGKILL is still a takeover (the
    daemon's own copy), but a daemon SIGKILL ends the connection: the new
    daemon mounts afresh (Step 1) and new opens by path work again;
(d) Unmount after takeovers leaves no mount, no connection (fusectl) and
    nothing in the holder.

The longest gap between two successful fsyncs (the pause pods see) is
printed, not asserted: timing goals belong to bench/.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fusefs import bindmount, embedded, mountinfo
from fusefs.kernel import handover
from fusefs.supervisor import find_stale_sessions, kill_and_wait, socket_dir_for
from tests.fusefs.test_daemon import MiB, Node, _detach_everything_under, _env, _free_port

pytestmark = pytest.mark.privileged

UID = 1000
#: Generous bounds: a takeover takes about a second here, a remount two.
RECOVERY_DEADLINE = 30.0
#: Ticks the pod must get through after a restart before we look.
TICKS_AFTER = 10
DATA = bytes(range(256)) * 256  # 64 KiB the reader checks

POD = r"""
import errno, os, sys, time
root, uid = sys.argv[1], int(sys.argv[2])
os.setgroups([]); os.setresgid(uid, uid, uid); os.setresuid(uid, uid, uid)
held = os.open(f"{root}/held.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
# O_RDWR: a read-only open could be served by kernel passthrough, which
# never reaches fusefs; this reader must go through it.
data = os.open(f"{root}/data.bin", os.O_RDWR)
expected = bytes(range(256)) * 256
print("ready", flush=True)

def code(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))

i = 0
while True:
    i += 1
    try:
        os.write(held, b"%d\n" % i)
        os.fsync(held)
        w = "ok"
    except OSError as exc:
        w = code(exc)
    try:
        fd = os.open(f"{root}/path.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, b"%d\n" % i)
            os.fsync(fd)
        finally:
            os.close(fd)
        p = "ok"
    except OSError as exc:
        p = code(exc)
    try:
        os.posix_fadvise(data, 0, 0, os.POSIX_FADV_DONTNEED)  # read from fusefs, not the page cache
        off = (i * 4096) % len(expected)
        r = "ok" if os.pread(data, 4096, off) == expected[off:off + 4096] else "MISMATCH"
    except OSError as exc:
        r = code(exc)
    print(f"{time.monotonic():.4f} {i} {w} {p} {r}", flush=True)
    time.sleep(0.05)
"""


@dataclass(frozen=True)
class Tick:
    stamp: float
    seq: int
    write: str
    path: str
    read: str


class Pod:
    """The writer and reader, as uid 1000, in the volume through a target."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", POD, str(root), str(UID)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        assert first == "ready", f"pod did not start: {first} {self.proc.stderr.read() if self.proc.stderr else ''}"
        self.ticks: list[Tick] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp, seq, write, path, read = line.split()
            self.ticks.append(Tick(float(stamp), int(seq), write, path, read))

    def wait(self, what: str, predicate: Callable[[list[Tick]], bool], timeout: float = RECOVERY_DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"pod exited: {self.proc.stderr.read() if self.proc.stderr else ''}"
            if predicate(list(self.ticks)):
                return
            time.sleep(0.02)
        raise AssertionError(f"pod: {what} not seen within {timeout}s; last ticks {self.ticks[-5:]}")

    def ticks_after(self, n: int, since: float) -> None:
        self.wait(f"{n} good ticks", lambda ts: sum(1 for t in ts if t.stamp > since and t.write == "ok"
                                                    and t.path == "ok") >= n)

    def errors(self) -> list[Tick]:
        return [t for t in list(self.ticks) if (t.write, t.path, t.read) != ("ok", "ok", "ok")]

    def longest_pause(self) -> float:
        """The longest gap between two successful fsyncs through the held descriptor."""
        stamps = [t.stamp for t in list(self.ticks) if t.write == "ok"]
        return max((b - a for a, b in zip(stamps, stamps[1:])), default=0.0)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@dataclass
class KernelNode(Node):
    """A node whose daemon runs ``--engine kernel``, with or without an external holder."""

    holder_socket: str = ""

    def start(self, metrics: bool = True) -> subprocess.Popen:
        argv = [sys.executable, "-m", "fusefs.cli", "serve", "--endpoint", self.endpoint,
                "--state-dir", str(self.state_dir), "--volumes-dir", str(self.volumes),
                "--kubelet-dir", str(self.kubelet), "--log-level", "debug", "--engine", "kernel"]
        if self.holder_socket:
            argv += ["--holder-socket", self.holder_socket]
        self.metrics_port = _free_port()
        argv += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, env=_env(), start_new_session=True)
        self.procs.append(proc)
        self.wait_answering(proc)
        return proc

    def metric(self, name: str, vid: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        m = re.search(rf'^{name}{{volume_id="{vid}"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0


@dataclass
class Holder:
    socket: str
    proc: subprocess.Popen[bytes]


@pytest.fixture
def root() -> Iterator[Path]:
    """A 0755 node root, so the pod (uid 1000) can reach the target."""
    path = Path(tempfile.mkdtemp(prefix="fusefs-takeover-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _start_holder(sock: str, log: Path) -> Holder:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fusefs.cli", "holder", "--socket", sock],
                                stdout=subprocess.PIPE, stderr=out, env=_env(), start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return Holder(sock, proc)


@pytest.fixture
def holder(root: Path) -> Iterator[Holder]:
    h = _start_holder(str(root / "holder.sock"), root / "holder.log")
    yield h
    if h.proc.poll() is None:
        h.proc.terminate()
        h.proc.wait(10)


def _node(root: Path, holder_socket: str) -> Iterator[KernelNode]:
    n = KernelNode(root, holder_socket=holder_socket)
    n.kubelet.mkdir()
    n.volumes.mkdir(parents=True)
    containing = mountinfo.containing_mount(str(n.kubelet))
    if containing is None or not containing.propagation.startswith("shared"):
        subprocess.run(["mount", "--bind", str(n.kubelet), str(n.kubelet)], check=True)
        subprocess.run(["mount", "--make-shared", str(n.kubelet)], check=True)
    try:
        yield n
    finally:
        embedded.stop_daemon(n.data, timeout=5)
        for proc in n.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kill_and_wait(find_stale_sessions(socket_dir_for(n.state_dir)))
        _detach_everything_under(root)
        bindmount.detach_all(str(n.kubelet))
        print(f"--- daemon log tail ---\n{n.log_tail(40)}")


@pytest.fixture
def knode(root: Path, holder: Holder) -> Iterator[KernelNode]:
    """A kernel-engine node with an external holder (torn down before the holder)."""
    yield from _node(root, holder.socket)


@pytest.fixture
def lone_node(root: Path) -> Iterator[KernelNode]:
    """A kernel-engine node with no external holder: only the daemon's own copy."""
    yield from _node(root, "")


@dataclass
class Served:
    vid: str
    stage: str
    target: str
    pod: Pod

    def mount_ids(self) -> tuple[int, int]:
        """Unique mount IDs of the staging mount and of the target's (top) bind.

        Not mountinfo's IDs: the kernel hands a freed one to the next mount,
        so a fresh mount made after detaching the old one can show the same.
        """
        for path in (self.stage, self.target):
            assert mountinfo.is_volume_mount(mountinfo.top_mount(path), self.vid), path
        return _unique_mount_id(self.stage), _unique_mount_id(self.target)


def _unique_mount_id(path: str) -> int:
    """statx(STATX_MNT_ID_UNIQUE) (Linux 6.8+): an ID never reused while the system runs."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(-100, path.encode(), 0x100 | 0x4000, 0x4000, buf) != 0:  # AT_FDCWD, NOFOLLOW|DONT_SYNC
        err = ctypes.get_errno()
        raise OSError(err, f"statx {path}: {os.strerror(err)}")
    mask, = struct.unpack_from("I", buf.raw, 0)
    assert mask & 0x4000, "the kernel gave no unique mount ID"
    return struct.unpack_from("Q", buf.raw, 0x90)[0]  # stx_mnt_id


_libc = ctypes.CDLL(None, use_errno=True)


def _serve(node: KernelNode) -> Served:
    """Mount a volume, publish it, and start the pod in it."""
    vid = node.new_volume()
    shared = node.volumes / vid / "shared"
    shared.mkdir()
    (shared / "data.bin").write_bytes(DATA)
    os.chown(shared, UID, UID)
    os.chown(shared / "data.bin", UID, UID)
    stage, target = node.stage(vid), node.target(f"pod-{uuid.uuid4().hex[:8]}")
    with node.client() as c:
        c.mount(vid, stage, 64 * MiB)
        c.publish(vid, target, read_only=False)
    pod = Pod(Path(target) / "shared")
    served = Served(vid, stage, target, pod)
    pod.ticks_after(5, 0)
    return served


def _session_pid(node: KernelNode, vid: str) -> int:
    with node.client() as c:
        return next(v.pid for v in c.list() if v.volume_id == vid)


def _wait_new_session(node: KernelNode, vid: str, old: int) -> int:
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while time.monotonic() < deadline:
        try:
            with node.client() as c:
                vol = next((v for v in c.list() if v.volume_id == vid), None)
            if vol is not None and vol.state == "mounted" and vol.pid not in (0, old):
                return vol.pid
        except Exception:  # noqa: BLE001 - a daemon that is starting does not answer yet
            pass
        time.sleep(0.05)
    raise AssertionError(f"no new session for {vid}:\n{node.log_tail()}")


def _remount_count(node: KernelNode, vid: str) -> int:
    with node.client() as c:
        return next(v.remount_count for v in c.list() if v.volume_id == vid)


def _assert_fsynced_kept(node: KernelNode, served: Served) -> None:
    """Every append the pod saw succeed is on the backing disk, once, in order."""
    backing = node.volumes / served.vid / "shared"
    for column, name in (("write", "held.log"), ("path", "path.log")):
        good = [t.seq for t in list(served.pod.ticks) if getattr(t, column) == "ok"]
        on_disk = [int(x) for x in (backing / name).read_text().split()]
        assert set(good) <= set(on_disk), f"{name}: lost {sorted(set(good) - set(on_disk))[:10]}"
        if column == "write" and not served.pod.errors():
            assert on_disk == sorted(set(on_disk)), f"{name}: lines repeated or out of order"


def _connection(stage: str) -> str:
    """The fusectl name of the connection mounted at ``stage`` (its device minor)."""
    top = mountinfo.top_mount(stage)
    assert top is not None
    return top.major_minor.split(":")[1]


def _unmount_leaves_nothing(node: KernelNode, served: Served, holders: list[str]) -> None:
    """(d) Unpublish and Unmount: no mount, no FUSE connection, nothing held."""
    conn = _connection(served.stage)
    served.pod.stop()
    ctl = Path(tempfile.mkdtemp(prefix="fusectl-", dir="/tmp"))
    subprocess.run(["mount", "-t", "fusectl", "none", str(ctl)], check=True)
    try:
        assert (ctl / conn).is_dir(), "the connection is alive before the unmount"
        with node.client() as c:
            c.unpublish(served.vid, served.target)
            c.unmount(served.vid)
        assert not mountinfo.mounts_at(served.stage) and not mountinfo.mounts_at(served.target)
        for sock in holders:
            with pytest.raises(OSError, match="not found"):
                handover.take(sock, served.vid)
        deadline = time.monotonic() + RECOVERY_DEADLINE
        while (ctl / conn).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (ctl / conn).exists(), "the FUSE connection outlived the unmount"
    finally:
        subprocess.run(["umount", str(ctl)], check=False)
        ctl.rmdir()
    assert not list((node.state_dir / "kernel").glob(f"{served.vid}*")), "kernel state left behind"


def _wait_logged(log: Path, text: str, count: int) -> None:
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while log.read_text().count(text) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.read_text().count(text) >= count, f"{text!r} not logged {count} times in {log}"


def _own_holder(node: KernelNode) -> str:
    return str(socket_dir_for(node.state_dir) / "holder.sock")


# ------------------------------------------------------------------ tests


def test_session_sigkill_is_a_takeover_pods_see_no_error(knode: KernelNode, holder: Holder) -> None:
    """(a) and (d): SIGKILL of the session, twice; then Unmount."""
    knode.start()
    served = _serve(knode)
    before = served.mount_ids()
    for n in (1, 2):
        old = _session_pid(knode, served.vid)
        killed = time.monotonic()
        os.kill(old, signal.SIGKILL)
        _wait_new_session(knode, served.vid, old)
        served.pod.ticks_after(TICKS_AFTER, killed)
        assert served.mount_ids() == before, "the staging mount or the target's bind was replaced"
        assert len(mountinfo.mounts_at(served.target)) == 1, "a bind was stacked on the target"
        assert knode.metric("fusefs_takeovers_total", served.vid) == n
    assert served.pod.errors() == [], served.pod.errors()[:10]
    assert _remount_count(knode, served.vid) == 0
    assert knode.metric("fusefs_remounts_total", served.vid) == 0
    with knode.client() as c:
        vol = next(v for v in c.list() if v.volume_id == served.vid)
    assert vol.healthy and "took over the live FUSE connection" in vol.message
    _assert_fsynced_kept(knode, served)
    print(f"session SIGKILL -> takeover: longest pause between fsyncs {served.pod.longest_pause():.3f}s")
    _unmount_leaves_nothing(knode, served, [holder.socket, _own_holder(knode)])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_daemon_death_with_an_external_holder_is_a_takeover(knode: KernelNode, holder: Holder, sig: int) -> None:
    """(b) and (d): SIGKILL of the daemon (and so of its sessions), or SIGTERM
    (a container stop: with an external holder the daemon leaves the
    connections to it); a new daemon with the same state directory takes the
    connection over from the holder."""
    first = knode.start()
    served = _serve(knode)
    before = served.mount_ids()
    session = _session_pid(knode, served.vid)
    killed = time.monotonic()
    first.send_signal(sig)
    first.wait(30)
    kill_and_wait([session])  # dies of its parent's death; make sure before we look
    assert mountinfo.is_volume_mount(mountinfo.top_mount(served.stage), served.vid)
    knode.start()
    _wait_new_session(knode, served.vid, session)
    served.pod.ticks_after(TICKS_AFTER, killed)
    assert served.pod.errors() == [], served.pod.errors()[:10]
    assert served.mount_ids() == before, "the staging mount or the target's bind was replaced"
    assert len(mountinfo.mounts_at(served.target)) == 1
    assert _remount_count(knode, served.vid) == 0
    assert knode.metric("fusefs_takeovers_total", served.vid) == 1
    _assert_fsynced_kept(knode, served)
    print(f"daemon {signal.Signals(sig).name} -> takeover: longest pause between fsyncs "
          f"{served.pod.longest_pause():.3f}s")
    _unmount_leaves_nothing(knode, served, [holder.socket, _own_holder(knode)])


def test_a_restarted_external_holder_gets_the_connections_back(knode: KernelNode, holder: Holder,
                                                              root: Path) -> None:
    """The external holder restarts while the daemon runs: the daemon gives the
    new one every connection from its own copy, so a daemon SIGKILL after that
    is still a takeover."""
    first = knode.start()
    served = _serve(knode)
    before = served.mount_ids()
    holder.proc.terminate()
    holder.proc.wait(10)
    holder.proc = _start_holder(holder.socket, root / "holder.log").proc
    deadline = time.monotonic() + RECOVERY_DEADLINE
    while not _has(holder.socket, served.vid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _has(holder.socket, served.vid), f"the new holder never got the descriptors:\n{knode.log_tail()}"
    session = _session_pid(knode, served.vid)
    killed = time.monotonic()
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    kill_and_wait([session])
    knode.start()
    _wait_new_session(knode, served.vid, session)
    served.pod.ticks_after(TICKS_AFTER, killed)
    assert served.pod.errors() == [], served.pod.errors()[:10]
    assert served.mount_ids() == before
    assert _remount_count(knode, served.vid) == 0
    _unmount_leaves_nothing(knode, served, [holder.socket, _own_holder(knode)])


def _has(sock: str, vid: str) -> bool:
    try:
        fds = handover.take(sock, vid)
    except OSError:
        return False
    for fd in fds:
        os.close(fd)
    return bool(fds)


def test_without_an_external_holder_a_daemon_sigkill_falls_back_to_a_fresh_mount(lone_node: KernelNode) -> None:
    """(c): the daemon's own copy covers a session crash; a daemon crash ends
    the connection, and the next daemon mounts afresh and binds on top."""
    node = lone_node
    first = node.start()
    served = _serve(node)
    before = served.mount_ids()
    old = _session_pid(node, served.vid)
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    session = _wait_new_session(node, served.vid, old)
    served.pod.ticks_after(TICKS_AFTER, killed)
    assert served.pod.errors() == [], served.pod.errors()[:10]
    assert served.mount_ids() == before

    killed = time.monotonic()
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    kill_and_wait([session])
    node.start()
    _wait_new_session(node, served.vid, session)
    # New opens by path work again (the fresh mount is bound on top of the target).
    served.pod.wait("new opens by path that work again",
                    lambda ts: sum(1 for t in ts if t.stamp > killed and t.path == "ok") >= TICKS_AFTER)
    after = served.mount_ids()
    assert after[0] != before[0] and after[1] != before[1], "expected a fresh mount and a new bind"
    assert len(mountinfo.mounts_at(served.target)) == 2, "the new bind is stacked on the dead one"
    assert _remount_count(node, served.vid) == 1
    late = [t for t in list(served.pod.ticks) if t.stamp > killed][-3:]
    assert all(t.write == "ENOTCONN" for t in late), late  # the held descriptor's connection is gone
    with node.client() as c:
        vol = next(v for v in c.list() if v.volume_id == served.vid)
    assert "restarted" in vol.message and "took over" not in vol.message
    _assert_fsynced_kept(node, served)
    served.pod.stop()
    with node.client() as c:
        c.unpublish(served.vid, served.target)
        c.unmount(served.vid)
    assert not mountinfo.mounts_at(served.stage) and not mountinfo.mounts_at(served.target)


def test_embedded_driver_on_the_kernel_engine_keeps_the_mount_across_daemon_deaths(tmp_path: Path) -> None:
    """``fusepath-csi --fusefs=embedded --fusefs-engine=kernel`` starts a detached
    holder beside the daemon and re-uses it after its own restart; when the
    daemon dies, the driver's new daemon takes the connection over: a file
    open since before the kill keeps working and the mount is the same."""
    from csi_driver.gen import csi_pb2
    from tests.harness import Driver, mount_cap

    driver = Driver(tmp_path, "--fusefs-engine=kernel")
    try:
        driver.start()
        cap = mount_cap()
        name = f"pvc-{uuid.uuid4().hex[:12]}"
        vol = driver.create_volume(name, size=8 * MiB, cap=cap)
        staging = driver.kubelet_dir / "plugins" / name / "globalmount"
        target = driver.kubelet_dir / "pods" / name / "volumes" / "mount"
        staging.parent.mkdir(parents=True)
        target.parent.mkdir(parents=True)
        driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=cap))
        driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
            volume_capability=cap))
        daemon_log = driver.data_dir / "fusefs.log"
        holders = embedded.holder_pids(driver.data_dir)
        assert len(holders) == 1, holders
        sock = embedded.holder_socket_for(driver.data_dir)
        for fd in handover.take(sock, vol.volume_id):
            os.close(fd)
        before = (_unique_mount_id(str(staging)), _unique_mount_id(str(target)))
        held = os.open(target / "held", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(held, b"before\n")
            # The driver restarts: the holder is re-used, not replaced.
            driver.kill(signal.SIGKILL)
            driver.start()
            assert embedded.holder_pids(driver.data_dir) == holders
            for n in (1, 2):
                pid = embedded.daemon_pid(driver.data_dir)
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                os.write(held, b"after %d\n" % n)  # waits for the new daemon's session
                os.fsync(held)
                _wait_logged(daemon_log, "took over the volume's FUSE connection", n)
            assert (_unique_mount_id(str(staging)), _unique_mount_id(str(target))) == before
            assert embedded.holder_pids(driver.data_dir) == holders
        finally:
            os.close(held)
        assert (driver.volume_dir(vol.volume_id) / "held").read_text() == "before\nafter 1\nafter 2\n"
        assert daemon_log.read_text().count("took over the volume's FUSE connection") == 2
        assert "re-mounted volume" not in daemon_log.read_text()
        assert driver.log_path.read_text().count("takes over every volume's connection") == 2
        driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=str(target)))
        driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)))
        assert not mountinfo.mounts_at(str(staging))
        with pytest.raises(OSError, match="not found"):
            handover.take(sock, vol.volume_id)
    finally:
        driver.teardown()
    assert not embedded.holder_pids(driver.data_dir)
