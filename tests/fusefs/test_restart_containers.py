"""What containers built the way containerd and runc build them see across restarts.

A real driver (embedded fusefs daemon) stages and publishes one volume to two
pretend pods. The kubelet directory is made an rshared mount first, which is
what kubelet's root dir is on a node (and what ``mountPropagation:
Bidirectional`` hands the node plugin). The driver runs either in the test's
mount namespace or, as the node plugin pod does, in a namespace of its own
whose kubelet directory is a peer of the test's ("the host").

Two "containers", each a process in its own mount namespace, set up as runc
does before it execs the container's entrypoint:

- ``rslave`` (``mountPropagation: HostToContainer``): a new mount namespace
  whose root is made ``rslave``, with the publish target rbind-mounted at the
  container path;
- ``private`` (no propagation, the Kubernetes default): a new namespace made
  ``rprivate``, with a plain bind of the publish target.

The test does not trust the recipe: it reads ``/proc/<pid>/mountinfo`` and
checks that the first container's mount follows a master and the second's
follows nothing.

Both drop to uid 1000 after mounting, keep one file open since before each
kill ("held"), and every 50 ms append a line with fsync both through that
descriptor and through a fresh open by path. Then each kind of restart is
done in turn, and what each container saw is asserted as it is with the
libfuse engine:

- driver SIGKILLed and restarted: nothing; both containers see no error;
- the volume's FUSE session SIGKILLed; the fusefs daemon SIGKILLed (the
  driver's watcher starts a new one); the driver and the daemon SIGKILLed
  together and only the driver started again (the node plugin pod replaced):
  the ``rslave`` container's new opens by path work again once fusefs has
  re-mounted the volume; its held descriptor belongs to the dead connection
  and fails with ENOTCONN until it is re-opened; the ``private`` container
  keeps the dead mount (ENOTCONN) for good, and NodeGetVolumeStats reports
  the volume's condition abnormal.

Every line a container saw fsynced before a kill is on the backing disk.
The pause (kill to the first successful open by path) is printed for each
kind, not asserted: timing goals belong to bench/.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from csi_driver.gen import csi_pb2
from fusefs import embedded, mountinfo
from fusefs.client import FuseFSClient
from tests.harness import MiB, AccessMode, Driver, mount_cap

pytestmark = pytest.mark.privileged

#: Generous bounds for things that take well under a second or two here.
RECOVERY_DEADLINE = 30.0
SETTLE = 1.0
UID = 1000

CONTAINER = r"""
import ctypes, errno, os, signal, sys, time

MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 0x1000, 0x4000, 1 << 18, 1 << 19
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def mount(source, target, flags):
    if libc.mount(source and source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


kind, target, cpath, name, uid = sys.argv[1:6]
if kind == "rslave":            # runc: rootfs propagation rslave, then an rbind
    mount(None, "/", MS_SLAVE | MS_REC)
    mount(target, cpath, MS_BIND | MS_REC)
else:                           # runc: rprivate, then a plain bind
    mount(None, "/", MS_PRIVATE | MS_REC)
    mount(target, cpath, MS_BIND)
os.setgroups([])
os.setresgid(int(uid), int(uid), int(uid))
os.setresuid(int(uid), int(uid), int(uid))

data = f"{cpath}/shared"
reopen = [True]
signal.signal(signal.SIGUSR1, lambda *_: reopen.__setitem__(0, True))
held, i = -1, 0


def code(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))


while True:
    i += 1
    note = ""
    if reopen[0]:
        reopen[0] = False
        try:
            if held >= 0:
                os.close(held)
        except OSError:
            pass
        try:
            held = os.open(f"{data}/{name}.held", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            note = "reopened"
        except OSError as exc:
            held, note = -1, "reopen-" + code(exc)
    stamp = time.monotonic()
    try:
        os.write(held, f"{i}\n".encode())
        os.fsync(held)
        h = "ok"
    except OSError as exc:
        h = code(exc)
    try:
        fd = os.open(f"{data}/{name}.path", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{i}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        p = "ok"
    except OSError as exc:
        p = code(exc)
    print(f"{stamp:.3f} {i} {h} {p} {note}".rstrip(), flush=True)
    time.sleep(0.05)
"""


@dataclass(frozen=True)
class Tick:
    """One line of a container's log: one held-fd append and one open-by-path append."""

    stamp: float
    seq: int
    held: str
    path: str
    note: str


class Container:
    """A process in its own mount namespace, set up as runc sets up a container."""

    def __init__(self, kind: str, target: Path, cpath: Path, name: str) -> None:
        self.kind, self.cpath, self.name = kind, cpath, name
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "unchanged", "--",
             sys.executable, "-c", CONTAINER, kind, str(target), str(cpath), name, str(UID)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.ticks: list[Tick] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = line.split()
            self.ticks.append(Tick(float(parts[0]), int(parts[1]), parts[2], parts[3],
                                   parts[4] if len(parts) > 4 else ""))

    def mount_entry(self) -> mountinfo.MountEntry:
        """The container's mount at its volume path (the top one), from its own mountinfo."""
        top = mountinfo.top_mount(str(self.cpath), mountinfo.read(self.proc.pid))
        assert top is not None, f"{self.kind} container has nothing at {self.cpath}"
        return top

    def after(self, when: float) -> list[Tick]:
        return [t for t in list(self.ticks) if t.stamp > when]

    def wait(self, what: str, predicate: Callable[[Tick], bool], after: float,
             timeout: float = RECOVERY_DEADLINE) -> Tick:
        """The first tick after ``after`` that matches, or fail with the container's story."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} container exited: {self.proc.stderr.read()}")
            for tick in self.after(after):
                if predicate(tick):
                    return tick
            time.sleep(0.02)
        raise AssertionError(f"{self.kind} container: {what} not seen within {timeout}s; "
                             f"last ticks {self.ticks[-5:]}; its mounts at {self.cpath}: "
                             f"{mountinfo.mounts_at(str(self.cpath), mountinfo.read(self.proc.pid))}")

    def reopen_held(self) -> None:
        """Open the held file afresh (before a kill), and wait until appends through it work."""
        asked = time.monotonic()
        os.kill(self.proc.pid, signal.SIGUSR1)
        self.wait("a re-opened held file", lambda t: t.note == "reopened" and t.held == "ok", asked)

    def ok_seqs(self, column: str) -> set[int]:
        return {t.seq for t in list(self.ticks) if getattr(t, column) == "ok"}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@dataclass
class Setup:
    driver: Driver
    volume_id: str
    targets: dict[str, Path]
    containers: dict[str, Container]

    @property
    def fusefs_endpoint(self) -> str:
        return embedded.endpoint_for(self.driver.data_dir)

    def session_pid(self) -> int:
        with FuseFSClient(self.fusefs_endpoint) as client:
            return next(v.pid for v in client.list() if v.volume_id == self.volume_id)

    def condition(self, kind: str) -> csi_pb2.VolumeCondition:
        return self.driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=self.volume_id, volume_path=str(self.targets[kind]))).volume_condition


def _make_rshared(path: Path) -> None:
    """What kubelet's root dir is on a node: a shared mount (here a bind of itself)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-rshared", str(path)], check=True)


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return
        if state in ("Z", "X"):
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still runs")


class NodePluginDriver(Driver):
    """The driver (and so its embedded fusefs daemon) in a mount namespace of its own.

    That is the node plugin pod: its containers get the kubelet directory
    with ``mountPropagation: Bidirectional``, a copy that is a peer of the
    host's (here: a new namespace copied from the test's, where the kubelet
    directory is rshared). The containers are then built from the host's
    copy of each target, as containerd builds them, and a replaced node
    plugin pod is a new namespace.
    """

    def command(self) -> list[str]:
        return ["unshare", "--mount", "--propagation", "unchanged", "--", *super().command()]


@pytest.fixture(params=["host-namespace", "own-namespace"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    # What a re-mount shows the containers is the libfuse engine's recovery;
    # on the kernel engine no restart detaches anything (tests/test_restart_matrix.py).
    driver = (Driver if request.param == "host-namespace" else NodePluginDriver)(tmp_path, "--fusefs-engine=libfuse")
    _make_rshared(driver.kubelet_dir)
    # Container paths must be reachable by uid 1000 from /, as in a container's rootfs.
    rootfs = Path(tempfile.mkdtemp(prefix="fusefs-ctr-", dir="/tmp"))
    rootfs.chmod(0o755)
    containers: dict[str, Container] = {}
    try:
        driver.start()
        cap = mount_cap(AccessMode.SINGLE_NODE_MULTI_WRITER)
        name = f"pvc-{uuid.uuid4().hex[:12]}"
        vol = driver.create_volume(name, size=64 * MiB, cap=cap)
        staging = driver.kubelet_dir / "plugins" / name / "globalmount"
        staging.parent.mkdir(parents=True)
        driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=cap))
        targets = {}
        for kind in ("rslave", "private", "readonly"):
            target = driver.kubelet_dir / "pods" / f"{kind}-{uuid.uuid4().hex[:8]}" / "volumes" / "mount"
            target.parent.mkdir(parents=True)
            driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=vol.volume_id, staging_target_path=str(staging), target_path=str(target),
                volume_capability=cap, readonly=kind == "readonly"))
            targets[kind] = target
        shared = targets["rslave"] / "shared"
        shared.mkdir()
        os.chown(shared, UID, UID)
        for kind in ("rslave", "private"):
            target, cpath = targets[kind], rootfs / kind
            cpath.mkdir(mode=0o755)
            containers[kind] = Container(kind, target, cpath, kind)
        for container in containers.values():
            container.wait("a first good tick", lambda t: t.held == "ok" and t.path == "ok", 0)
        yield Setup(driver, vol.volume_id, targets, containers)
        for target in targets.values():
            driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=vol.volume_id, target_path=str(target)))
            assert not mountinfo.mounts_at(str(target)), f"layers left at {target}"
        driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)))
        assert not mountinfo.mounts_at(str(staging))
    finally:
        for container in containers.values():
            container.stop()
        driver.teardown()
        shutil.rmtree(rootfs, ignore_errors=True)


def _assert_host_view(setup: Setup) -> None:
    """What this namespace (the host's, when the driver has its own) holds at each target.

    Each target's top mount is this volume's, shared, in a peer group of its
    own (so a mount on one never lands on another), and the read-only
    publication is read-only here too: a bind made writable and remounted
    read-only afterwards would have propagated a writable copy.
    """
    tops = {kind: mountinfo.top_mount(str(t)) for kind, t in setup.targets.items()}
    groups = {kind: [f for f in top.optional if f.startswith("shared:")] for kind, top in tops.items()}
    for kind, top in tops.items():
        assert mountinfo.is_volume_mount(top, setup.volume_id), (kind, top)
        assert top.read_only == (kind == "readonly"), (kind, top)
        assert groups[kind], (kind, top)
    assert len({tuple(g) for g in groups.values()}) == len(tops), tops


def _assert_fsynced_lines_kept(setup: Setup) -> None:
    """Every append a container saw succeed (write and fsync) is on the backing disk."""
    backing = setup.driver.volume_dir(setup.volume_id) / "shared"
    for kind, container in setup.containers.items():
        for column in ("held", "path"):
            on_disk = {int(line) for line in (backing / f"{kind}.{column}").read_text().split()}
            missing = container.ok_seqs(column) - on_disk
            assert not missing, f"{kind} container lost fsynced {column} appends {sorted(missing)[:10]}"


def _kill_session(setup: Setup) -> None:
    os.kill(setup.session_pid(), signal.SIGKILL)


def _kill_daemon(setup: Setup) -> None:
    pid = embedded.daemon_pid(setup.driver.data_dir)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _wait_gone(pid)


def _replace_node_plugin(setup: Setup) -> None:
    """Every driver and fusefs process killed at once; only the driver is started again."""
    pid = embedded.daemon_pid(setup.driver.data_dir)
    assert pid is not None
    session = setup.session_pid()
    setup.driver.proc.send_signal(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    setup.driver.wait_exit()
    _wait_gone(pid)
    _wait_gone(session)
    setup.driver.start(wait=False)


def _remount_phase(setup: Setup, kind: str, kill: Callable[[Setup], None]) -> float:
    """Kill, then assert what each container sees; returns the rslave container's pause."""
    rslave, private = setup.containers["rslave"], setup.containers["private"]
    rslave.reopen_held()
    killed = time.monotonic()
    kill(setup)
    try:
        back = rslave.wait("a new open by path that works again",
                           lambda t: t.path == "ok" and t.held != "ok", killed)
    except AssertionError as exc:
        k = str(setup.driver.kubelet_dir)
        raise AssertionError(f"{exc}; on the host: " + " | ".join(
            f"{e.mount_id} {e.parent_id} {e.major_minor} {e.mount_point[len(k):]} {e.optional}"
            for e in mountinfo.read() if e.mount_point.startswith(k))) from None
    pause = back.stamp - killed
    # The descriptor opened before the kill belongs to the dead connection.
    settled = rslave.wait("a few more ticks", lambda t: True, back.stamp + SETTLE)
    late = [t for t in rslave.after(back.stamp) if t.stamp <= settled.stamp]
    assert late and all(t.path == "ok" for t in late), late
    assert all(t.held == "ENOTCONN" for t in late), late
    # The private container never sees the new mount.
    seen = private.after(back.stamp)
    assert seen and all(t.path == "ENOTCONN" and t.held == "ENOTCONN" for t in seen), seen[-5:]
    assert private.mount_entry().fs_type == "fuse.fusefs"
    condition = setup.condition("private")
    assert condition.abnormal, condition.message
    _assert_host_view(setup)
    with pytest.raises(OSError) as err:
        (setup.targets["readonly"] / "shared" / "nope").write_text("no")
    assert err.value.errno == errno.EROFS
    print(f"{kind}: rslave container's new opens worked again {pause:.2f}s after the kill; "
          f"private container: {seen[-1].path}; condition: {condition.message}")
    return pause


def test_what_runc_like_containers_see_across_each_restart(setup: Setup) -> None:
    rslave, private = setup.containers["rslave"], setup.containers["private"]
    # The recipe is not trusted: the namespaces must be what the test claims.
    assert any(f.startswith("master:") for f in rslave.mount_entry().optional), rslave.mount_entry()
    assert not private.mount_entry().optional, private.mount_entry()
    for container in (rslave, private):
        assert mountinfo.is_volume_mount(container.mount_entry(), setup.volume_id)
    _assert_host_view(setup)

    # A driver restart disturbs nothing: the daemon and every session keep running.
    for container in (rslave, private):
        container.reopen_held()
    killed = time.monotonic()
    setup.driver.kill(signal.SIGKILL)
    setup.driver.start()
    settled = rslave.wait("ticks after the driver restart", lambda t: True, time.monotonic() + SETTLE)
    for container in (rslave, private):
        seen = [t for t in container.after(killed) if t.stamp <= settled.stamp]
        assert seen and all(t.held == "ok" and t.path == "ok" for t in seen), seen
    assert not setup.condition("private").abnormal
    if isinstance(setup.driver, NodePluginDriver):
        assert os.readlink(f"/proc/{setup.driver.proc.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

    pauses = {
        "session SIGKILL": _remount_phase(setup, "session SIGKILL", _kill_session),
        "daemon SIGKILL": _remount_phase(setup, "daemon SIGKILL", _kill_daemon),
        "node plugin replaced": _remount_phase(setup, "node plugin replaced", _replace_node_plugin),
    }
    setup.driver.wait_ready()
    print(f"pauses (kill to first working open by path, rslave container): "
          + ", ".join(f"{k} {v:.2f}s" for k, v in pauses.items()))
    _assert_fsynced_lines_kept(setup)


def _restarts_logged(driver: Driver) -> int:
    return driver.log_path.read_text().count("the embedded fusefs daemon had died")


def test_driver_starts_a_new_embedded_daemon_when_it_dies(tmp_path: Path) -> None:
    """``--fusefs=embedded``: SIGKILL of the daemon, twice; each time volumes are served again."""
    driver = Driver(tmp_path)
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
        (target / "kept").write_text("kept")
        pids = [embedded.daemon_pid(driver.data_dir)]
        for restarts in (1, 2):
            assert pids[-1] is not None
            os.kill(pids[-1], signal.SIGKILL)
            _wait_gone(pids[-1])
            # Wait for the driver's own account of the restart, not only for a
            # readable file: right after the kill, the dying session can still
            # answer a read before its parent-death signal lands.
            deadline = time.monotonic() + RECOVERY_DEADLINE
            while time.monotonic() < deadline:
                if _restarts_logged(driver) >= restarts:
                    try:
                        if (target / "kept").read_text() == "kept":
                            break
                    except OSError:
                        pass
                time.sleep(0.05)
            assert _restarts_logged(driver) == restarts, driver.log_tail()
            assert (target / "kept").read_text() == "kept", driver.log_tail()
            pids.append(embedded.daemon_pid(driver.data_dir))
            assert pids[-1] not in pids[:-1]
        assert driver.proc.poll() is None
        # The driver talks to the new daemon: stats, unpublish and unstage work.
        stats = driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(target)))
        assert stats.usage
        driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
            volume_id=vol.volume_id, target_path=str(target)))
        assert not mountinfo.mounts_at(str(target))
        driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)))
        assert not mountinfo.mounts_at(str(staging))
    finally:
        driver.teardown()
