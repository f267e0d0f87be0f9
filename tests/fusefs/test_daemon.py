"""The fusefs daemon end to end: real daemon processes, real FUSE sessions, real mounts.

Each test gets a kubelet directory under its tmp dir, made a *shared* bind
mount the way kubelet makes /var/lib/kubelet, so that mounts made there
propagate into mount namespaces that hold slave copies (the analogue of a
container with ``mountPropagation: HostToContainer``).
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from fusefs import bindmount, embedded, mountinfo
from fusefs.client import FuseFSClient
from fusefs.supervisor import PACKAGE_ROOT, find_stale_sessions, kill_and_wait, socket_dir_for
from tests.harness import daemon_engine

pytestmark = pytest.mark.privileged

MiB = 1 << 20
#: How long a test waits for recovery before calling it failed: a generous
#: bound, not a speed goal (recovery takes about a second: bench/recovery.py).
RECOVERY_BUDGET = 30.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    # Never reach a real cluster from a test, whatever ~/.kube holds.
    env["KUBECONFIG"] = "/nonexistent/kubeconfig"
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env


@dataclass
class Node:
    """A fake node: kubelet dir, data dir, and the daemons started on it."""

    root: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    metrics_port: int = 0

    @property
    def kubelet(self) -> Path:
        return self.root / "k"

    @property
    def data(self) -> Path:
        return self.root / "d"

    @property
    def volumes(self) -> Path:
        return self.data / "volumes"

    @property
    def state_dir(self) -> Path:
        return self.data / "fusefs"

    @property
    def endpoint(self) -> str:
        return f"unix://{self.data / 'fusefs.sock'}"

    @property
    def log(self) -> Path:
        return self.root / "daemon.log"

    def new_volume(self, content: str = "hello\n") -> str:
        vid = f"vol-{uuid.uuid4().hex}"
        (self.volumes / vid).mkdir(parents=True)
        (self.volumes / vid / "file.txt").write_text(content)
        return vid

    def stage(self, vid: str) -> str:
        return str(self.kubelet / "plugins" / vid / "globalmount")

    def target(self, name: str) -> str:
        path = self.kubelet / "pods" / name / "volumes"
        path.mkdir(parents=True, exist_ok=True)
        return str(path / "mount")

    def start(self, metrics: bool = False, engine: str | None = None) -> subprocess.Popen:
        """Start ``fusefs serve`` detached and wait until it answers; on
        ``engine``, or on the test run's (tests.harness.daemon_engine())."""
        argv = [sys.executable, "-m", "fusefs.cli", "serve", "--endpoint", self.endpoint,
                "--state-dir", str(self.state_dir), "--volumes-dir", str(self.volumes),
                "--kubelet-dir", str(self.kubelet), "--log-level", "debug"]
        argv += ["--engine", engine or daemon_engine()]
        if metrics:
            self.metrics_port = _free_port()
            argv += ["--metrics-address", f"127.0.0.1:{self.metrics_port}"]
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=log, env=_env(), start_new_session=True)
        self.procs.append(proc)
        self.wait_answering(proc)
        return proc

    def wait_answering(self, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        with FuseFSClient(self.endpoint) as client:
            while time.monotonic() < deadline:
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"daemon exited with {proc.returncode}:\n{self.log_tail()}")
                if client.ping(timeout=0.5):
                    return
                time.sleep(0.02)
        raise AssertionError(f"daemon did not answer:\n{self.log_tail()}")

    def client(self) -> FuseFSClient:
        return FuseFSClient(self.endpoint)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _detach_everything_under(root: Path) -> None:
    """Lazily unmount every mount below ``root``, deepest first."""
    prefix = str(root) + "/"
    for _ in range(3):
        mounts = [e.mount_point for e in mountinfo.read() if e.mount_point.startswith(prefix)]
        if not mounts:
            return
        for mount_point in sorted(set(mounts), key=len, reverse=True):
            try:
                bindmount.detach_all(mount_point)
            except OSError:
                pass


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    n.kubelet.mkdir()
    n.volumes.mkdir(parents=True)
    # What kubelet does to its root dir: make it a shared mount, so that mounts
    # below propagate to the slave copies that containers get. Like kubelet, only
    # when it is not on a shared mount already: with systemd, / is shared, and a
    # bind of the directory onto itself would join /'s peer group and show every
    # mount below it twice.
    containing = mountinfo.containing_mount(str(n.kubelet))
    if containing is None or not containing.propagation.startswith("shared"):
        subprocess.run(["mount", "--bind", str(n.kubelet), str(n.kubelet)], check=True)
        subprocess.run(["mount", "--make-shared", str(n.kubelet)], check=True)
    try:
        yield n
    finally:
        embedded.stop_daemon(n.data, timeout=5)
        embedded.stop_holder(n.data)  # an embedded kernel-engine daemon's (ensure_daemon)
        for proc in n.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        kill_and_wait(find_stale_sessions(socket_dir_for(n.state_dir)))
        _detach_everything_under(tmp_path)
        bindmount.detach_all(str(n.kubelet))


def _code(exc_info: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc_info.value.code()


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _wait_readable(path: str, expected: str, timeout: float) -> float:
    """Seconds until ``path`` reads ``expected``; fails after ``timeout``."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout:
        try:
            if _read(path) == expected:
                return time.monotonic() - started
        except OSError as exc:
            last = exc
        time.sleep(0.02)
    raise AssertionError(f"{path} did not read back within {timeout}s (last error: {last})")


# --------------------------------------------------------------- happy path


def test_mount_publish_stats_unmount(node: Node) -> None:
    node.start()
    vid = node.new_volume("hello\n")
    stage, rw, ro = node.stage(vid), node.target("pod-a"), node.target("pod-b")
    with node.client() as c:
        info = c.mount(vid, stage, 10 * MiB, pod={"namespace": "ns", "name": "pod-a"})
        assert (info.volume_id, info.staging_path, info.state, info.healthy) == (vid, stage, "mounted", True)
        top = mountinfo.top_mount(stage)
        assert top is not None and (top.fs_type, top.source) == ("fuse.fusefs", f"fusepath:{vid}")
        assert _read(f"{stage}/file.txt") == "hello\n"

        c.publish(vid, rw, read_only=False, pod={"csi.storage.k8s.io/pod.namespace": "ns",
                                                 "csi.storage.k8s.io/pod.name": "pod-a"})
        c.publish(vid, ro, read_only=True)
        assert mountinfo.is_volume_mount(mountinfo.top_mount(rw), vid)
        assert mountinfo.top_mount(ro).read_only and not mountinfo.top_mount(rw).read_only
        Path(rw, "new.txt").write_text("x" * 1000)
        assert _read(f"{ro}/new.txt") == "x" * 1000
        with pytest.raises(OSError) as err:
            Path(ro, "nope.txt").write_text("no")
        assert err.value.errno == errno.EROFS

        stats = c.stats(vid)
        assert stats.volume_id == vid and stats.capacity_bytes == 10 * MiB
        assert stats.used_bytes >= 1000 and stats.available_bytes == stats.total_bytes - stats.used_bytes
        assert stats.total_inodes >= stats.used_inodes >= 2
        assert stats.healthy and stats.remount_count == 0 and not stats.frozen

        listed = c.list()
        assert [v.volume_id for v in listed] == [vid]
        assert {(p.target_path, p.read_only) for p in listed[0].publications} == {(rw, False), (ro, True)}
        assert listed[0].pid > 0

        c.unpublish(vid, rw)
        c.unpublish(vid, ro)
        assert not mountinfo.mounts_at(rw) and not os.path.exists(rw)
        c.unmount(vid)
        assert not mountinfo.mounts_at(stage)
        assert c.list() == []
    assert (node.volumes / vid / "new.txt").read_text() == "x" * 1000


def test_repeated_requests_are_idempotent(node: Node) -> None:
    node.start()
    vid = node.new_volume()
    stage, target = node.stage(vid), node.target("pod-a")
    with node.client() as c:
        first = c.mount(vid, stage, 10 * MiB)
        again = c.mount(vid, stage, 10 * MiB)
        assert again.pid == first.pid  # the same session, not a new one
        assert len(mountinfo.mounts_at(stage)) == 1

        with pytest.raises(grpc.RpcError) as err:
            c.mount(vid, node.stage(vid) + "-elsewhere", 10 * MiB)
        assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as err:
            c.mount(vid, stage, 10 * MiB, read_only=True)
        assert _code(err) == grpc.StatusCode.ALREADY_EXISTS

        c.mount(vid, stage, 20 * MiB, io_bytes_per_second=50 * MiB)  # converges, same session
        stats = c.stats(vid)
        assert stats.capacity_bytes == 20 * MiB and stats.bytes_per_second == 50 * MiB

        c.publish(vid, target, False)
        c.publish(vid, target, False)
        assert len(mountinfo.mounts_at(target)) == 1
        with pytest.raises(grpc.RpcError) as err:
            c.publish(vid, target, True)
        assert _code(err) == grpc.StatusCode.ALREADY_EXISTS

        with pytest.raises(grpc.RpcError) as err:
            c.unmount(vid)  # still published
        assert _code(err) == grpc.StatusCode.FAILED_PRECONDITION

        c.unpublish(vid, target)
        c.unpublish(vid, target)
        c.unmount(vid)
        c.unmount(vid)
        assert not mountinfo.mounts_at(stage)

        again = c.mount(vid, stage, 10 * MiB)
        assert again.state == "mounted"
        c.publish(vid, target, True)
        c.unmount(vid, force=True)
        assert not mountinfo.mounts_at(stage) and not mountinfo.mounts_at(target)


def test_invalid_ids_and_paths_are_rejected(node: Node, tmp_path: Path) -> None:
    node.start()
    vid = node.new_volume()
    unknown = f"vol-{uuid.uuid4().hex}"
    outside = tmp_path / "outside"
    outside.mkdir()
    (node.kubelet / "pods").mkdir()
    os.symlink(outside, node.kubelet / "pods" / "link")
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    with node.client() as c:
        for bad_id in ["", "vol-123", f"vol-{uuid.uuid4().hex.upper()}", f"snap-{uuid.uuid4().hex}",
                       "../../etc", f"vol-{uuid.uuid4().hex}/..", "x" * 300]:
            with pytest.raises(grpc.RpcError) as err:
                c.mount(bad_id, node.stage(vid), MiB)
            assert _code(err) == invalid, bad_id
            with pytest.raises(grpc.RpcError) as err:
                c.stats(bad_id)
            assert _code(err) == invalid, bad_id
            with pytest.raises(grpc.RpcError) as err:
                c.unmount(bad_id)
            assert _code(err) == invalid, bad_id

        k = str(node.kubelet)
        for bad_path in ["", "relative/path", f"{k}/a/../b", f"{k}/a/", f"{k}//a", f"{k}/./a", k,
                         "/etc/stage", str(outside / "x"), f"{k}/pods/link/stage", "/" + "a" * 5000,
                         f"{k}/a\0b"]:
            with pytest.raises(grpc.RpcError) as err:
                c.mount(vid, bad_path, MiB)
            assert _code(err) == invalid, bad_path
        assert not os.listdir(outside)

        with pytest.raises(grpc.RpcError) as err:
            c.mount(unknown, node.stage(unknown), MiB)
        assert _code(err) == grpc.StatusCode.NOT_FOUND
        for call in (lambda: c.stats(unknown), lambda: c.resize(unknown, MiB),
                     lambda: c.set_limits(unknown, 1, 1), lambda: c.freeze([unknown], 5),
                     lambda: c.publish(unknown, node.target("p"), False)):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert _code(err) == grpc.StatusCode.NOT_FOUND
        c.unmount(unknown)  # idempotent: nothing to do
        c.unpublish(unknown, node.target("p"))
        c.thaw([unknown])

        c.mount(vid, node.stage(vid), MiB)
        for bad_target in [f"{k}/pods/link/mount", str(outside / "t"), node.stage(vid)]:
            with pytest.raises(grpc.RpcError) as err:
                c.publish(vid, bad_target, False)
            assert _code(err) == invalid, bad_target
        with pytest.raises(grpc.RpcError) as err:
            c.freeze([vid], 999999)
        assert _code(err) == invalid
        assert not os.listdir(outside)
        c.unmount(vid)


def test_socket_is_private_to_root(node: Node) -> None:
    node.start()
    st = os.stat(node.data / "fusefs.sock")
    assert (st.st_mode & 0o777, st.st_uid) == (0o600, 0)


def test_resize_limits_freeze_thaw(node: Node) -> None:
    node.start()
    a, b = node.new_volume(), node.new_volume()
    unknown = f"vol-{uuid.uuid4().hex}"
    with node.client() as c:
        c.mount(a, node.stage(a), 4 * MiB)
        c.mount(b, node.stage(b), 4 * MiB)
        assert c.resize(a, 8 * MiB) == 8 * MiB
        assert c.stats(a).capacity_bytes == 8 * MiB
        c.set_limits(a, 10 * MiB, 1000)
        stats = c.stats(a)
        assert (stats.bytes_per_second, stats.ops_per_second) == (10 * MiB, 1000)

        # All or nothing: an unknown member fails the group before anything freezes.
        with pytest.raises(grpc.RpcError) as err:
            c.freeze([a, unknown], 30)
        assert _code(err) == grpc.StatusCode.NOT_FOUND
        assert not c.stats(a).frozen

        c.freeze([a, b], 30)
        assert c.stats(a).frozen and c.stats(b).frozen
        c.freeze([a, b], 30)  # idempotent
        c.thaw([a, b])
        assert not c.stats(a).frozen and not c.stats(b).frozen
        c.thaw([a, b])
        # The capacity and limits were recorded: Mount with the same values is a no-op.
        again = c.mount(a, node.stage(a), 8 * MiB, io_bytes_per_second=10 * MiB, io_ops_per_second=1000)
        assert again.capacity_bytes == 8 * MiB
        c.unmount(a)
        c.unmount(b)


def test_metrics_and_healthz(node: Node) -> None:
    node.start(metrics=True)
    vid = node.new_volume()
    with node.client() as c:
        c.mount(vid, node.stage(vid), MiB)
        _read(f"{node.stage(vid)}/file.txt")
    base = f"http://127.0.0.1:{node.metrics_port}"
    assert urllib.request.urlopen(f"{base}/healthz", timeout=5).read() == b"ok\n"
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    assert f'fusefs_volume_up{{volume_id="{vid}"}} 1' in text
    assert 'fusefs_daemon_rpc_duration_seconds_count{method="Mount",code="OK"} 1' in text
    assert "# TYPE fusefs_remounts_total counter" in text
    # Session metrics are merged in, each sample labelled with its volume.
    session_lines = [ln for ln in text.splitlines() if not ln.startswith("#") and f'volume_id="{vid}"' in ln]
    assert len(session_lines) > 3
    families = [ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")]
    assert len(families) == len(set(families)), "a metric family is declared twice"


# ------------------------------------------------------------------ recovery


class NamespaceReader:
    """A process set up as runc sets up a container with HostToContainer, reading a file every 100 ms.

    Its own mount namespace, the root made ``rslave``, and the publish target
    rbind-mounted at a container path (``cpath``): the container's mount is a
    slave of the target mount itself, not of the kubelet directory. It was
    started before the crash, keeps running, and never re-mounts anything.
    """

    SCRIPT = (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_void_p]\n"
        "target, cpath = sys.argv[1:3]\n"
        "assert libc.mount(None, b'/', None, (1 << 19) | 0x4000, None) == 0  # MS_SLAVE|MS_REC\n"
        "assert libc.mount(target.encode(), cpath.encode(), None, 0x1000 | 0x4000, None) == 0  # rbind\n"
        "path = cpath + '/file.txt'\n"
        "while True:\n"
        "    try:\n"
        "        with open(path) as f: line = 'ok ' + f.read().strip()\n"
        "    except OSError as e: line = f'err {e.errno}'\n"
        "    print(f'{time.monotonic():.3f} {line}', flush=True)\n"
        "    time.sleep(0.1)\n"
    )

    def __init__(self, target: str, cpath: Path) -> None:
        cpath.mkdir()
        self.cpath = str(cpath)
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "unchanged", sys.executable, "-c", self.SCRIPT,
             target, self.cpath], stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def mount_entry(self) -> mountinfo.MountEntry | None:
        return mountinfo.top_mount(self.cpath, mountinfo.read(self.proc.pid))

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            stamp, _, result = line.strip().partition(" ")
            self.lines.append((float(stamp), result))

    def wait_for(self, predicate, after: float, timeout: float) -> float:
        """Monotonic time of the first line after ``after`` that matches, or fail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for stamp, result in list(self.lines):
                if stamp > after and predicate(result):
                    return stamp
            time.sleep(0.05)
        raise AssertionError(f"namespace reader never matched; last lines: {self.lines[-5:]}")

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_daemon_sigkill_recovers_host_and_slave_namespace(node: Node, tmp_path: Path) -> None:
    daemon = node.start()
    vid = node.new_volume("hello\n")
    stage, rw, ro = node.stage(vid), node.target("pod-a"), node.target("pod-b")
    with node.client() as c:
        c.mount(vid, stage, 10 * MiB)
        c.publish(vid, rw, False)
        c.publish(vid, ro, True)
    reader = NamespaceReader(rw, tmp_path / "container")
    ro_reader = NamespaceReader(ro, tmp_path / "ro-container")
    try:
        reader.wait_for(lambda r: r == "ok hello", after=0, timeout=10)
        entry = reader.mount_entry()
        assert entry is not None and any(f.startswith("master:") for f in entry.optional), entry

        killed_at = time.monotonic()
        daemon.kill()
        daemon.wait()
        # The sessions die with the daemon: the mounts are dead everywhere.
        reader.wait_for(lambda r: r == f"err {errno.ENOTCONN}", after=killed_at, timeout=10)
        with pytest.raises(OSError) as err:
            _read(f"{rw}/file.txt")
        assert err.value.errno == errno.ENOTCONN

        restarted_at = time.monotonic()
        node.start()
        for path in (f"{stage}/file.txt", f"{rw}/file.txt", f"{ro}/file.txt"):
            _wait_readable(path, "hello\n", RECOVERY_BUDGET)
        reader.wait_for(lambda r: r == "ok hello", after=restarted_at, timeout=RECOVERY_BUDGET)

        # The binds are what they were: rw stays writable, ro stays read-only.
        Path(rw, "after.txt").write_text("after")
        with pytest.raises(OSError) as err:
            Path(ro, "after2.txt").write_text("no")
        assert err.value.errno == errno.EROFS
        assert mountinfo.is_volume_mount(mountinfo.top_mount(stage), vid)
        # The fresh bind sits on top of the dead one, which is what reached the container.
        assert len(mountinfo.mounts_at(stage)) == 1
        assert [mountinfo.is_volume_mount(e, vid) for e in mountinfo.mounts_at(rw)] == [True, True]
        assert len(mountinfo.mounts_at(reader.cpath, mountinfo.read(reader.proc.pid))) == 2
        # What reached the container of the read-only target is read-only (it was before it was attached).
        ro_reader.wait_for(lambda r: r == "ok hello", after=restarted_at, timeout=RECOVERY_BUDGET)
        ro_stack = mountinfo.mounts_at(ro_reader.cpath, mountinfo.read(ro_reader.proc.pid))
        assert len(ro_stack) == 2 and all(e.read_only for e in ro_stack), ro_stack

        with node.client() as c:
            stats = c.stats(vid)
            assert stats.remount_count == 1
            assert not stats.healthy and "daemon restarted" in stats.message and "HostToContainer" in stats.message
            assert "ENOTCONN" in c.stats(vid, rw).message
            # A fresh publication after the restart is healthy.
            fresh = node.target("pod-c")
            c.publish(vid, fresh, False)
            assert c.stats(vid, fresh).healthy
            assert [v.remount_count for v in c.list()] == [1]
            # Unpublish peels every layer, the dead one at the bottom included.
            c.unpublish(vid, rw)
            assert not mountinfo.mounts_at(rw) and not os.path.exists(rw)
    finally:
        reader.stop()
        ro_reader.stop()


def test_session_sigkill_is_remounted_while_other_volume_keeps_serving(node: Node) -> None:
    node.start(metrics=True)
    a, b = node.new_volume("a\n"), node.new_volume("b\n")
    target_a, target_b = node.target("pod-a"), node.target("pod-b")
    with node.client() as c:
        c.mount(a, node.stage(a), MiB, pod={"namespace": "ns", "name": "pod-a", "uid": "u-1"})
        c.mount(b, node.stage(b), MiB)
        c.publish(a, target_a, False)
        c.publish(b, target_b, False)
        pid_a = next(v.pid for v in c.list() if v.volume_id == a)

    failures: list[str] = []
    reads = 0
    stop = threading.Event()

    def read_b() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                if _read(f"{target_b}/file.txt") != "b\n":
                    failures.append("wrong content")
                reads += 1
            except OSError as exc:
                failures.append(str(exc))
            time.sleep(0.005)

    def reads_past(n: int) -> None:
        deadline = time.monotonic() + RECOVERY_BUDGET
        while reads <= n:
            assert thread.is_alive() and time.monotonic() < deadline, f"reads of b stalled at {reads}"
            time.sleep(0.01)

    thread = threading.Thread(target=read_b, daemon=True)
    thread.start()
    try:
        reads_past(10)                      # b is being read when a's session dies...
        os.kill(pid_a, signal.SIGKILL)
        _wait_readable(f"{target_a}/file.txt", "a\n", RECOVERY_BUDGET)
        reads_past(reads + 10)              # ...and after a has recovered
    finally:
        stop.set()
        thread.join(30)
    assert failures == []

    # libfuse: a's session is re-mounted (pods that did not follow it may
    # keep ENOTCONN: unhealthy); kernel: the live connection was taken over,
    # nothing was re-mounted or detached (healthy).
    kernel = daemon_engine() == "kernel"
    with node.client() as c:
        infos = {v.volume_id: v for v in c.list()}
        assert infos[a].remount_count == (0 if kernel else 1) and infos[a].pid not in (0, pid_a)
        assert infos[b].remount_count == 0
        stats = c.stats(a)
        assert "signal SIGKILL" in stats.message and stats.healthy is kernel
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    assert f'fusefs_remounts_total{{volume_id="{a}"}} {0 if kernel else 1}' in text
    assert f'fusefs_remounts_total{{volume_id="{b}"}} 0' in text
    if kernel:
        assert f'fusefs_takeovers_total{{volume_id="{a}"}} 1' in text
    # No kube config in CI: the Event on pod-a was skipped, and said so at debug level.
    assert "no kube config; skipping event" in node.log.read_text()


EMBEDDED_PARENT = """
import sys, time
from pathlib import Path
from fusefs.client import FuseFSClient
from fusefs.embedded import ensure_daemon
data, kubelet, vid, stage, target, engine = sys.argv[1:]
endpoint = ensure_daemon(Path(data), Path(kubelet), engine=engine)
with FuseFSClient(endpoint) as c:
    c.mount(vid, stage, 1 << 20)
    c.publish(vid, target, False)
print(endpoint, flush=True)
time.sleep(3600)
"""


def test_killing_embedded_parent_does_not_disturb_mounts(node: Node) -> None:
    vid = node.new_volume("embedded\n")
    stage, target = node.stage(vid), node.target("pod-a")
    parent = subprocess.Popen([sys.executable, "-c", EMBEDDED_PARENT, str(node.data), str(node.kubelet),
                               vid, stage, target, daemon_engine()], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        ready, _, _ = select.select([parent.stdout], [], [], 30)
        assert ready, "the embedded parent did not report its endpoint"
        endpoint = parent.stdout.readline().strip()
        assert endpoint == node.endpoint
        daemon_pid = embedded.daemon_pid(node.data)
        assert daemon_pid is not None and daemon_pid != parent.pid
    finally:
        parent.kill()
        parent.wait()

    # The driver is gone; its daemon and every mount are not.
    for _ in range(10):
        assert _read(f"{target}/file.txt") == "embedded\n"
        time.sleep(0.05)
    assert embedded.daemon_pid(node.data) == daemon_pid
    # A restarted driver re-uses the running daemon instead of starting another.
    assert embedded.ensure_daemon(node.data, node.kubelet, engine=daemon_engine()) == node.endpoint
    assert embedded.daemon_pid(node.data) == daemon_pid
    with node.client() as c:
        assert [v.remount_count for v in c.list()] == [0]

    # A graceful stop keeps the state; the next daemon puts everything back:
    # by a re-mount (libfuse), or by taking over the connection the embedded
    # holder kept (kernel).
    assert embedded.stop_daemon(node.data)
    embedded.ensure_daemon(node.data, node.kubelet, engine=daemon_engine())
    _wait_readable(f"{target}/file.txt", "embedded\n", RECOVERY_BUDGET)
    kernel = daemon_engine() == "kernel"
    with node.client() as c:
        assert [v.remount_count for v in c.list()] == [0 if kernel else 1]
        if kernel:
            assert "took over" in c.stats(vid).message


def test_volume_lost_while_daemon_was_down_is_failed_not_fatal(node: Node) -> None:
    daemon = node.start()
    lost, kept = node.new_volume("lost\n"), node.new_volume("kept\n")
    with node.client() as c:
        c.mount(lost, node.stage(lost), MiB)
        c.mount(kept, node.stage(kept), MiB)
    daemon.kill()
    daemon.wait()
    (node.volumes / lost / "file.txt").unlink()
    (node.volumes / lost).rmdir()

    node.start()
    _wait_readable(f"{node.stage(kept)}/file.txt", "kept\n", RECOVERY_BUDGET)
    with node.client() as c:
        deadline = time.monotonic() + 10
        while not c.probe()[0] and time.monotonic() < deadline:
            time.sleep(0.05)
        infos = {v.volume_id: v for v in c.list()}
        assert infos[kept].state == "mounted"
        assert infos[lost].state == "failed" and "does not exist" in infos[lost].message
        stats = c.stats(lost)
        assert not stats.healthy and "does not exist" in stats.message
        with pytest.raises(grpc.RpcError) as err:
            c.publish(lost, node.target("pod"), False)
        assert _code(err) == grpc.StatusCode.UNAVAILABLE
        c.unmount(lost)
        assert [v.volume_id for v in c.list()] == [kept]
        assert not mountinfo.mounts_at(node.stage(lost))


#: The remount path (dead binds stacked on the target) needs a connection
#: that dies with its session: on the kernel engine a killed session is a
#: takeover and nothing is re-bound (tests/fusefs/test_daemon_takeover.py;
#: the fresh-mount fallback without a holder is tested there too).
LIBFUSE = "libfuse"


def _kill_session_and_wait(c: FuseFSClient, vid: str, remounts: int) -> None:
    """SIGKILL the volume's session and wait until the daemon has counted ``remounts`` re-mounts."""
    os.kill(next(v.pid for v in c.list() if v.volume_id == vid), signal.SIGKILL)
    deadline = time.monotonic() + 15
    while c.stats(vid).remount_count < remounts and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.stats(vid).remount_count >= remounts


def test_dead_binds_stack_up_to_the_cap_and_unpublish_peels_them_all(node: Node) -> None:
    """Each session restart stacks a fresh bind on the dead one; at MAX_LAYERS the dead ones go first."""
    from fusefs.volumes import MAX_LAYERS

    node.start(engine=LIBFUSE)  # a killed session is re-mounted only there (kernel: a takeover)
    vid = node.new_volume("stacked\n")
    stage, target = node.stage(vid), node.target("pod-a")
    with node.client() as c:
        c.mount(vid, stage, MiB)
        c.publish(vid, target, True)
        depths = []
        for restart in range(1, MAX_LAYERS + 2):
            _kill_session_and_wait(c, vid, restart)
            _wait_readable(f"{target}/file.txt", "stacked\n", RECOVERY_BUDGET)
            stack = mountinfo.mounts_at(target)
            assert all(mountinfo.is_volume_mount(e, vid) and e.read_only for e in stack), stack
            depths.append(len(stack))
        assert depths == [*range(2, MAX_LAYERS + 1), 1, 2]
        c.unpublish(vid, target)
        assert not mountinfo.mounts_at(target) and not os.path.exists(target)
        c.unmount(vid)
    assert not mountinfo.mounts_at(stage)


def test_publish_onto_a_dead_bind_of_the_volume_stacks_on_it(node: Node) -> None:
    """A target that already holds a dead bind of this volume (e.g. a re-bind that failed) is published on top."""
    node.start(engine=LIBFUSE)  # a killed session is re-mounted only there (kernel: a takeover)
    vid = node.new_volume("again\n")
    stage, target = node.stage(vid), node.target("pod-a")
    with node.client() as c:
        c.mount(vid, stage, MiB)
        os.mkdir(target)
        bindmount.bind(stage, target, False)  # a bind fusefs does not know about
        _kill_session_and_wait(c, vid, 1)
        with pytest.raises(OSError) as err:
            os.listdir(target)
        assert err.value.errno == errno.ENOTCONN
        c.publish(vid, target, False)
        assert _read(f"{target}/file.txt") == "again\n"
        assert len(mountinfo.mounts_at(target)) == 2
        c.unpublish(vid, target)
        assert not mountinfo.mounts_at(target)
        c.unmount(vid)


def test_binds_from_older_releases_sharing_a_peer_group_never_leak_a_mode(node: Node) -> None:
    """Binds made the old way (plain bind of the staging mount) are peers of each other.

    Stacking on one would land on the other too, with its read-only mode;
    so the first is detached and re-bound, and the last one, alone in its
    group by then, is stacked on.
    """
    node.start(engine=LIBFUSE)  # a killed session is re-mounted only there (kernel: a takeover)
    vid = node.new_volume("legacy\n")
    stage, rw, ro = node.stage(vid), node.target("pod-rw"), node.target("pod-ro")
    with node.client() as c:
        c.mount(vid, stage, MiB)
        c.publish(vid, rw, False)
        c.publish(vid, ro, True)
        for target, read_only in ((rw, False), (ro, True)):  # re-made as older releases made them
            bindmount.detach_all(target)
            bindmount.bind(stage, target, read_only)
        groups = {tuple(f for f in mountinfo.top_mount(p).optional if f.startswith("shared:")) for p in (rw, ro)}
        assert len(groups) == 1 and groups != {()}, groups
        _kill_session_and_wait(c, vid, 1)
        for target in (rw, ro):
            _wait_readable(f"{target}/file.txt", "legacy\n", RECOVERY_BUDGET)
        assert [e.read_only for e in mountinfo.mounts_at(rw)] == [False]
        assert [e.read_only for e in mountinfo.mounts_at(ro)] == [True, True]
        Path(rw, "w.txt").write_text("w")
        with pytest.raises(OSError) as err:
            Path(ro, "w.txt").write_text("no")
        assert err.value.errno == errno.EROFS
        c.unmount(vid, force=True)
        assert not mountinfo.mounts_at(rw) and not mountinfo.mounts_at(ro) and not mountinfo.mounts_at(stage)
