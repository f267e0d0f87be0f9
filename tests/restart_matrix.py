"""The restart matrix: what two runc-like containers see while each kind of restart happens.

One node, laid out as the shipped manifests lay it out (sidecar layout):

- a **holder** (``python -m fusefs.kernel.handover``, the same program as
  ``fusefs holder``), as root but with every capability dropped, as its own
  DaemonSet runs it; it keeps a duplicate of every volume's ``/dev/fuse``
  descriptor and outlives everything below;
- a **fusefs daemon** (``fusefs serve``) on the kernel engine with the
  holder's socket, given through ``FUSEFS_ENGINE`` and
  ``FUSEFS_HOLDER_SOCKET`` (a daemon that does not know them ignores them,
  serves on libfuse, and the matrix then shows what that engine does);
- a **CSI driver** (``fusepath-csi --fusefs=unix://...``) that talks to that
  daemon.

The daemon and the driver each run in a mount namespace of their own whose
kubelet directory is a peer of the host's (the containers of the node plugin
pod, with ``mountPropagation: Bidirectional``); a replaced pod is new
namespaces. The volume is staged and published twice through the driver's
CSI gRPC socket, and two containers are built from the host's copy of the
two publish targets, as runc builds them:

- ``rslave`` (``mountPropagation: HostToContainer``): a new mount namespace
  whose root is made ``rslave``, the target rbind-mounted at the container
  path (its mount shows a ``master:`` field);
- ``private`` (no propagation, the default): a new namespace made
  ``rprivate``, a plain bind (no ``master:``).

Each container drops to uid 1000 and runs two threads: a **writer** that
appends a numbered line and fsyncs it every 50 ms through a descriptor
opened before any kill, and a **reader** that every 50 ms drops the page
cache of a file it has held open since before any kill and reads it again
through that descriptor, then opens the same file by path and reads it;
and an **opener** that opens and closes that file by path every few
milliseconds, so that a kill finds OPEN and RELEASE requests in flight.

A phase kills something (:data:`KINDS`), starts again what kubelet would
start, waits until both containers have made progress past the restart, and
returns what they saw: errors, the pause (the longest gap between two
successful fsyncs around the kill), and the lines fsynced before the kill
that the backing file lacks.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.gen import csi_pb2
from fusefs import mountinfo
from fusefs.client import FuseFSClient
from fusefs.kernel import handover
from tests.harness import MiB, AccessMode, Driver, mount_cap, unmount_all_under

REPO = Path(__file__).resolve().parents[1]
UID = 1000
#: A generous bound on anything that should take a second or two here.
DEADLINE = 30.0
#: Successful writes (and reads) each container must make after the restart.
PROGRESS = 5
TICK = 0.05
#: Seconds after the restart at which a container still seeing errors is given up on.
FAILED_AFTER = 3.0
#: How long docs/deploy.md says to wait after a new holder is up before fusefs may restart.
HOLDER_SETTLE = 5.0
#: Every kind of restart, in the order the matrix runs them.
KINDS = ("session", "daemon", "fusefs-container", "node-plugin-pod", "driver", "holder")
DESCRIPTIONS = {
    "session": "SIGKILL of the volume's FUSE session",
    "daemon": "SIGKILL of the fusefs daemon, a new one started",
    "fusefs-container": "every fusefs process SIGKILLed, a fresh daemon started (container restart)",
    "node-plugin-pod": "every driver and fusefs process SIGKILLed, both started fresh (pod replaced)",
    "driver": "SIGKILL of the CSI driver, a new one started",
    "holder": "SIGKILL of the holder, a new one started; then a fusefs container restart",
}

CONTAINER = r"""
import ctypes, errno, os, sys, threading, time

MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE = 0x1000, 0x4000, 1 << 18, 1 << 19
libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def mount(source, target, flags):
    if libc.mount(source and source.encode(), target.encode(), None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


kind, target, cpath, uid, tick = sys.argv[1:6]
tick = float(tick)
if kind == "rslave":            # runc: rootfs propagation rslave, then an rbind
    mount(None, "/", MS_SLAVE | MS_REC)
    mount(target, cpath, MS_BIND | MS_REC)
else:                           # runc: rprivate, then a plain bind
    mount(None, "/", MS_PRIVATE | MS_REC)
    mount(target, cpath, MS_BIND)
os.setgroups([])
os.setresgid(int(uid), int(uid), int(uid))
os.setresuid(int(uid), int(uid), int(uid))

data = f"{cpath}/data"
ref_path = f"{data}/ref"
ref = open(ref_path, "rb").read()
wfd = os.open(f"{data}/{kind}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
rfd = os.open(ref_path, os.O_RDONLY)
out = threading.Lock()


def say(line):
    with out:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def code(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno))


def writer():
    i = 0
    while True:
        i += 1
        start = time.monotonic()
        try:
            os.write(wfd, f"{i}\n".encode())
            os.fsync(wfd)
            status = "ok"
        except OSError as exc:
            status = code(exc)
        say(f"W {i} {start:.4f} {time.monotonic():.4f} {status}")
        time.sleep(tick)


def reader():
    while True:
        start = time.monotonic()
        try:
            os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
            held = "ok" if os.pread(rfd, len(ref) + 1, 0) == ref else "MISMATCH"
        except OSError as exc:
            held = code(exc)
        try:
            fd = os.open(ref_path, os.O_RDONLY)
            try:
                path = "ok" if os.read(fd, len(ref) + 1) == ref else "MISMATCH"
            finally:
                os.close(fd)
        except OSError as exc:
            path = code(exc)
        say(f"R 0 {start:.4f} {time.monotonic():.4f} {held},{path}")
        time.sleep(tick)


def opener():
    # Opens and closes by path as fast as a busy pod would, so that a kill
    # finds OPEN and RELEASE requests in flight; one line per tick.
    while True:
        start, count, status = time.monotonic(), 0, "ok"
        while time.monotonic() - start < tick:
            try:
                os.close(os.open(ref_path, os.O_RDONLY))
                count += 1
            except OSError as exc:
                status = code(exc)
                break
            time.sleep(0.005)
        say(f"O {count} {start:.4f} {time.monotonic():.4f} {status}")
        if status != "ok":
            time.sleep(tick)


threading.Thread(target=writer, daemon=True).start()
threading.Thread(target=reader, daemon=True).start()
threading.Thread(target=opener, daemon=True).start()
threading.Event().wait()
"""


@dataclass(frozen=True)
class Op:
    """One line of a container's log: a write+fsync (W) or a held-and-by-path read (R)."""

    what: str
    seq: int
    start: float
    end: float
    status: str

    @property
    def ok(self) -> bool:
        return all(part == "ok" for part in self.status.split(","))


class Container:
    """A process in its own mount namespace, set up as runc sets up a container."""

    def __init__(self, kind: str, target: Path, cpath: Path) -> None:
        self.kind, self.cpath = kind, cpath
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "unchanged", "--",
             sys.executable, "-c", CONTAINER, kind, str(target), str(cpath), str(UID), str(TICK)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.ops: list[Op] = []
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            what, seq, start, end, status = line.split()
            self.ops.append(Op(what, int(seq), float(start), float(end), status))

    def mount_entry(self) -> mountinfo.MountEntry:
        """The container's mount at its volume path (the top one), from its own mountinfo."""
        top = mountinfo.top_mount(str(self.cpath), mountinfo.read(self.proc.pid))
        assert top is not None, f"{self.kind} container has nothing at {self.cpath}"
        return top

    def writes(self) -> list[Op]:
        return [op for op in list(self.ops) if op.what == "W"]

    def reads(self) -> list[Op]:
        return [op for op in list(self.ops) if op.what == "R"]

    def opens(self) -> list[Op]:
        return [op for op in list(self.ops) if op.what == "O"]

    def errors(self) -> list[Op]:
        return [op for op in list(self.ops) if not op.ok]

    def fsynced(self) -> set[int]:
        return {op.seq for op in self.writes() if op.ok}

    def progressed(self, since: float) -> bool:
        """Every thread has done PROGRESS good operations that started after ``since``."""
        return all(sum(1 for op in ops if op.ok and op.start > since) >= PROGRESS
                   for ops in (self.writes(), self.reads(), self.opens()))

    def pause(self, since: float, until: float) -> float:
        """The longest gap between two successful fsyncs that ended from ``since`` on.

        Includes the gap from the last fsync before ``since``; a writer stuck at
        ``until`` counts up to ``until``.
        """
        ends = [op.end for op in self.writes() if op.ok]
        before = [e for e in ends if e < since]
        window = ([before[-1]] if before else []) + [e for e in ends if since <= e <= until]
        if not window:
            return until - since
        gaps = [b - a for a, b in zip(window, window[1:])]
        if window[-1] < until - 1.0:  # stuck since its last fsync
            gaps.append(until - window[-1])
        return max(gaps, default=0.0)

    def story(self, since: float) -> str:
        """What the container did since ``since``, compressed: runs of one status."""
        runs: list[str] = []
        last, count = "", 0
        for op in [op for op in list(self.ops) if op.end >= since]:
            key = f"{op.what}:{op.status}"
            if key == last:
                count += 1
                continue
            if last:
                runs.append(f"{last}x{count}")
            last, count = key, 1
        if last:
            runs.append(f"{last}x{count}")
        return " ".join(runs[-12:]) or "(nothing)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


class PodDriver(Driver):
    """The CSI driver in a mount namespace of its own (the node plugin pod's csi-driver container)."""

    def command(self) -> list[str]:
        return ["unshare", "--mount", "--propagation", "unchanged", "--", *super().command()]


class Daemon:
    """``fusefs serve`` on the kernel engine with the holder's socket, in its own mount namespace."""

    def __init__(self, root: Path, data_dir: Path, kubelet_dir: Path, holder_socket: Path) -> None:
        self.endpoint = f"unix://{root / 'run' / 'fusefs.sock'}"
        self.data_dir, self.kubelet_dir, self.holder_socket = data_dir, kubelet_dir, holder_socket
        self.log_path = root / "fusefs.log"
        (root / "run").mkdir(exist_ok=True)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = ["unshare", "--mount", "--propagation", "unchanged", "--",
                sys.executable, "-m", "fusefs.cli", "serve", f"--endpoint={self.endpoint}",
                f"--state-dir={self.data_dir / 'fusefs'}", f"--volumes-dir={self.data_dir / 'volumes'}",
                f"--kubelet-dir={self.kubelet_dir}", "--metrics-address=", "--node-id=test-node",
                "--log-level=debug"]
        env = dict(os.environ, FUSEFS_ENGINE="kernel", FUSEFS_HOLDER_SOCKET=str(self.holder_socket),
                   PYTHONPATH=str(REPO))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=REPO,
                                         start_new_session=True)

    def wait_answering(self, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        with FuseFSClient(self.endpoint) as client:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"fusefs daemon exited {self.proc.returncode}:\n{self.log_tail()}")
                if client.ping(timeout=0.5):
                    return
                time.sleep(0.02)
        raise AssertionError(f"fusefs daemon did not answer within {timeout}s:\n{self.log_tail()}")

    def session_pid(self, volume_id: str) -> int:
        with FuseFSClient(self.endpoint) as client:
            return next(v.pid for v in client.list() if v.volume_id == volume_id)

    def processes(self) -> list[int]:
        """The daemon and every process below it (its sessions)."""
        assert self.proc is not None
        return [self.proc.pid, *descendants(self.proc.pid)]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (children of all its threads)."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    queue.append(child)
    return found


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Until every pid has exited (zombies count as gone: they hold no descriptor)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
            except OSError:
                break
            if state in ("Z", "X"):
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"pid {pid} still runs")


def kill_all(pids: list[int]) -> None:
    """SIGKILL every pid at once, then wait until they are gone."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_gone(pids)


def holder_answers(path: Path) -> bool:
    """True when a holder answers on ``path`` (a stale socket file does not)."""
    try:
        handover.take(str(path), "probe")
    except OSError as exc:
        return "not found" in str(exc)
    return True


def capabilities(pid: int) -> int:
    """The effective capability set of ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no CapEff for {pid}")


@dataclass
class Phase:
    """What one kind of restart did to the two containers."""

    kind: str
    killed: float
    restarted: float
    pauses: dict[str, float] = field(default_factory=dict)
    errors: dict[str, list[Op]] = field(default_factory=dict)
    lost: dict[str, list[int]] = field(default_factory=dict)
    stories: dict[str, str] = field(default_factory=dict)
    stuck: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        for kind, errors in self.errors.items():
            if errors:
                out.append(f"{kind} container saw {len(errors)} errors, first {errors[:3]}")
        for kind, lost in self.lost.items():
            if lost:
                out.append(f"{kind} container lost fsynced lines {lost[:10]}")
        for kind in self.stuck:
            out.append(f"{kind} container made no progress within {DEADLINE}s of the restart")
        return out


class Node:
    """The holder, the fusefs daemon and the CSI driver of one node, a staged volume and two containers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.holder_socket = root / "holder" / "holder.sock"
        self.driver: Driver | None = None
        self.daemon: Daemon | None = None
        self.holder: subprocess.Popen | None = None
        self.containers: dict[str, Container] = {}
        self.rootfs: Path | None = None
        self.volume_id = ""
        self.staging: Path | None = None
        self.targets: dict[str, Path] = {}
        #: What the last kill noticed on its way (shown with the phase).
        self.notes: list[str] = []

    # -- building it -----------------------------------------------------------------

    def start(self) -> None:
        self.daemon = Daemon(self.root, self.root / "data", self.root / "kubelet", self.holder_socket)
        self.driver = PodDriver(self.root, f"--fusefs={self.daemon.endpoint}")
        _make_rshared(self.driver.kubelet_dir)
        self.start_holder()
        self.daemon.start()
        self.daemon.wait_answering()
        self.driver.start()
        self.stage_and_publish()
        self.start_containers()

    def start_holder(self) -> None:
        """The holder as its DaemonSet runs it: uid 0, no capability at all, no new privileges."""
        self.holder_socket.parent.mkdir(mode=0o700, exist_ok=True)
        log = open(self.root / "holder.log", "ab")
        self.holder = subprocess.Popen(
            ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--",
             sys.executable, "-m", "fusefs.kernel.handover", "--socket", str(self.holder_socket)],
            stdout=log, stderr=log, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
            start_new_session=True)
        log.close()
        deadline = time.monotonic() + DEADLINE
        while not holder_answers(self.holder_socket):
            assert self.holder.poll() is None, (self.root / "holder.log").read_text()
            assert time.monotonic() < deadline, "the holder never answered on its socket"
            time.sleep(0.02)
        assert capabilities(self.holder.pid) == 0

    def wait_held(self, timeout: float) -> bool:
        """Whether the holder keeps the volume's connection within ``timeout`` (fusefs gives a
        new holder every connection)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fds = handover.take(str(self.holder_socket), self.volume_id)
            except OSError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
                continue
            for fd in fds:
                os.close(fd)
            return True

    def stage_and_publish(self) -> None:
        assert self.driver is not None
        cap = mount_cap(AccessMode.SINGLE_NODE_MULTI_WRITER)
        name = f"pvc-{uuid.uuid4().hex[:12]}"
        self.volume_id = self.driver.create_volume(name, size=64 * MiB, cap=cap).volume_id
        self.staging = self.driver.kubelet_dir / "plugins" / name / "globalmount"
        self.staging.parent.mkdir(parents=True)
        self.driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=self.volume_id, staging_target_path=str(self.staging), volume_capability=cap))
        for kind in ("rslave", "private"):
            target = self.driver.kubelet_dir / "pods" / f"{kind}-{uuid.uuid4().hex[:8]}" / "volumes" / "mount"
            target.parent.mkdir(parents=True)
            self.driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
                volume_id=self.volume_id, staging_target_path=str(self.staging), target_path=str(target),
                volume_capability=cap))
            self.targets[kind] = target
        data = self.targets["rslave"] / "data"
        data.mkdir()
        (data / "ref").write_bytes(b"the reference file, read again and again\n" * 100)
        os.chown(data, UID, UID)

    def start_containers(self) -> None:
        # Container paths must be reachable by uid 1000 from /, as in a container's rootfs.
        self.rootfs = Path(tempfile.mkdtemp(prefix="fusefs-matrix-", dir="/tmp"))
        self.rootfs.chmod(0o755)
        for kind, target in self.targets.items():
            cpath = self.rootfs / kind
            cpath.mkdir(mode=0o755)
            self.containers[kind] = Container(kind, target, cpath)
        deadline = time.monotonic() + DEADLINE
        for container in self.containers.values():
            while not container.progressed(0.0):
                if container.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{container.kind} container did not start: "
                                         f"{container.story(0)} {container.proc.stderr.read()[-2000:]}"
                                         if container.proc.poll() is not None else container.story(0))
                time.sleep(0.02)

    # -- the kills --------------------------------------------------------------------

    def kill(self, kind: str) -> None:
        """Kill what ``kind`` kills, and start again what kubelet would start; returns once started."""
        assert self.driver is not None and self.daemon is not None
        if kind == "session":
            pid = self.daemon.session_pid(self.volume_id)
            assert pid and pid != self.daemon.proc.pid, f"no session process of its own: {pid}"
            kill_all([pid])
        elif kind == "daemon":
            kill_all([self.daemon.proc.pid])
            self.daemon.proc.wait()
            self.daemon.start()
            self.daemon.wait_answering()
        elif kind == "fusefs-container":
            kill_all(self.daemon.processes())
            self.daemon.proc.wait()
            self.daemon.start()
            self.daemon.wait_answering()
        elif kind == "node-plugin-pod":
            assert self.driver.proc is not None
            kill_all([self.driver.proc.pid, *self.daemon.processes()])
            self.driver.wait_exit()
            self.daemon.proc.wait()
            self.daemon.start()
            self.driver.start(wait=False)
            self.daemon.wait_answering()
            self.driver.wait_ready()
        elif kind == "driver":
            self.driver.kill(signal.SIGKILL)
            self.driver.start()
        elif kind == "holder":
            assert self.holder is not None
            kill_all([self.holder.pid])
            self.holder.wait()
            self.start_holder()
            # As docs/deploy.md says: once the new holder is up, wait a few
            # seconds, then the node plugin may restart.
            self.notes.append("the new holder got the connection" if self.wait_held(HOLDER_SETTLE)
                              else f"the new holder did not get the connection within {HOLDER_SETTLE}s")
            self.kill("fusefs-container")
        else:
            raise ValueError(kind)

    def phase(self, kind: str) -> Phase:
        """One kill and what both containers saw, from the kill until both progressed past the restart."""
        killed = time.monotonic()
        self.notes = []
        self.kill(kind)
        restarted = time.monotonic()
        phase = Phase(kind, killed, restarted, notes=list(self.notes))
        deadline = restarted + DEADLINE
        waiting = dict(self.containers)
        while waiting and time.monotonic() < deadline:
            for name, container in list(waiting.items()):
                if container.progressed(restarted):
                    del waiting[name]
            # A container that still fails a few seconds after the restart has
            # failed the phase: no need to wait out the deadline.
            if all(c.errors() and c.errors()[-1].end > restarted + FAILED_AFTER for c in waiting.values()):
                break
            time.sleep(0.02)
        phase.stuck = sorted(waiting)
        until = time.monotonic()
        for name, container in self.containers.items():
            phase.pauses[name] = container.pause(killed, until)
            phase.errors[name] = [op for op in container.errors() if op.end >= killed]
            phase.stories[name] = container.story(killed - 0.2)
        phase.lost = self.lost_lines()
        return phase

    def lost_lines(self) -> dict[str, list[int]]:
        """Per container, the lines it fsynced that its file on the backing disk lacks or repeats."""
        assert self.driver is not None
        out = {}
        for name, container in self.containers.items():
            backing = self.driver.volume_dir(self.volume_id) / "data" / f"{name}.log"
            lines = [int(x) for x in backing.read_text().split()]
            synced = container.fsynced()
            bad = sorted(synced - set(lines))
            # Appends land in order, each once: 1, 2, ... (a resent write must not repeat one).
            if lines != list(range(1, len(lines) + 1)):
                bad.append(-1)
            out[name] = bad
        return out

    # -- taking it down ---------------------------------------------------------------

    def unpublish_and_unstage(self) -> None:
        """Through the driver, as kubelet does when the pods go; every layer must go."""
        assert self.driver is not None and self.staging is not None
        for container in self.containers.values():
            container.stop()
        for target in self.targets.values():
            self.driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=self.volume_id, target_path=str(target)))
            assert not mountinfo.mounts_at(str(target)), f"layers left at {target}"
        self.driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=self.volume_id, staging_target_path=str(self.staging)))
        assert not mountinfo.mounts_at(str(self.staging)), f"layers left at {self.staging}"

    def teardown(self) -> None:
        for container in self.containers.values():
            container.stop()
        if self.driver is not None:
            self.driver.stop()
        if self.daemon is not None:
            self.daemon.stop()
            if self.daemon.proc is not None:
                leftovers = descendants(self.daemon.proc.pid)
                if leftovers:
                    kill_all(leftovers)
        if self.holder is not None and self.holder.poll() is None:
            self.holder.terminate()
            try:
                self.holder.wait(10)
            except subprocess.TimeoutExpired:
                self.holder.kill()
                self.holder.wait()
        unmount_all_under(self.root)
        if self.rootfs is not None:
            shutil.rmtree(self.rootfs, ignore_errors=True)

    def logs(self) -> str:
        parts = []
        if self.daemon is not None:
            parts.append("fusefs daemon:\n" + self.daemon.log_tail(15))
        if self.driver is not None:
            parts.append("driver:\n" + self.driver.log_tail(10))
        return "\n".join(parts)


def _make_rshared(path: Path) -> None:
    """What kubelet's root dir is on a node: a shared mount (here a bind of itself)."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    subprocess.run(["mount", "--make-rshared", str(path)], check=True)


def describe(phase: Phase) -> str:
    """One paragraph: what each container saw, its pause, and any problem."""
    lines = [f"{phase.kind} ({DESCRIPTIONS[phase.kind]}): restart took {phase.restarted - phase.killed:.2f}s"
             + "".join(f"; {note}" for note in phase.notes)]
    for name in sorted(phase.pauses):
        lines.append(f"  {name}: pause {phase.pauses[name]:.2f}s, {len(phase.errors.get(name, []))} errors; "
                     f"{phase.stories.get(name, '')}")
    return "\n".join(lines + [f"  PROBLEM: {p}" for p in phase.problems()])

