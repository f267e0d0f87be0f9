"""The node budget: each inode the kernel knows costs the session a
descriptor, and the kernel forgets inodes only under memory pressure. With
a low RLIMIT_NOFILE (as on a node whose hard limit cannot be raised), a pod
touching many more files than the session has descriptors must not get
EMFILE: the session asks the kernel to prune unused inodes
(FUSE_NOTIFY_PRUNE) and its descriptors stay within the budget."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from fusefs.kernel.nodes import ROOT_ID, NodeTable
from tests.fusefs.conftest import Mounted, wait_ready
from tests.kernel.conftest import ENV, Volume, wait_for

pytestmark = pytest.mark.privileged

#: The session's RLIMIT_NOFILE (soft and hard): 1024 reserved, then three
#: quarters of the rest go to nodes (1,482) and the open-file cap gets 494
#: (see fusefs.session.raise_fd_limit and node_budget).
NOFILE = 3000
BUDGET = 1482
#: Descriptors the session has besides its nodes (Python, sockets, /dev/fuse,
#: the journal, the pod's few open files).
SLACK = 256
FILES = 4 * BUDGET

POD = r"""
import os, subprocess, sys
mnt, n, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3]
d = os.path.join(mnt, "d")
errors = []
def check(what, fn):
    try:
        return fn()
    except OSError as exc:
        errors.append(f"{what}: {exc}")
if phase == "create":
    os.mkdir(d)
    os.mkdir(os.path.join(d, "cwd"))
held = os.open(os.path.join(d, "held"), os.O_RDWR | os.O_CREAT, 0o644)
os.pwrite(held, b"held data", 0)
os.chdir(os.path.join(d, "cwd"))
for i in range(n):
    name = f"../f{i}"
    if phase == "create":
        fd = check("create", lambda: os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        if fd is not None:
            os.write(fd, b"%d" % i)
            os.close(fd)
    check("stat", lambda: os.stat(name))
ls = subprocess.run(["ls", "-l", ".."], capture_output=True, text=True)
if ls.returncode != 0 or ls.stdout.count(" f") < n:
    errors.append(f"ls -l: {ls.returncode} {ls.stderr[:200]}")
def content(i):
    with open(f"../f{i}", "rb") as f:
        return f.read()
for i in range(0, n, 7):
    if check("read", lambda: content(i)) != b"%d" % i:
        errors.append(f"content of f{i}")
if os.pread(held, 9, 0) != b"held data":
    errors.append("held file")
check("cwd", lambda: open("here", "w").close())
if os.getcwd() != os.path.join(d, "cwd"):
    errors.append("getcwd")
print("errors", len(errors), *errors[:5], flush=True)
"""


def _start(volume: Volume, takeover: bool = False) -> Mounted:
    """Volume.start, with the session's RLIMIT_NOFILE at :data:`NOFILE`."""
    n = len(volume.sessions)
    sock = str(volume.base / f"c{n}.sock")
    log_path = volume.base / f"s{n}.log"
    argv = [sys.executable, "-m", "fusefs.session", "--engine=kernel", "--volume-id", volume.volume_id,
            "--source", str(volume.source), "--mountpoint", str(volume.mountpoint), "--control-socket", sock,
            "--capacity", str(volume.capacity), "--state-file", volume.state,
            "--holder-socket", volume.holder.socket]
    if takeover:
        argv.append("--takeover")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=ENV,
                                preexec_fn=limit)
    mounted = Mounted(volume.volume_id, volume.source, volume.mountpoint, sock, proc, log_path, "kernel")
    volume.sessions.append(mounted)
    wait_ready(mounted)
    return mounted


class _FdWatch:
    """The most descriptors a process had, sampled while a pod works."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.most = max(self.most, len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                return

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.most


def _pod(volume: Volume, phase: str) -> str:
    """Run the pod script as uid 1000; its report line."""
    out = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
                          sys.executable, "-c", POD, str(volume.mountpoint), str(FILES), phase],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def _journalled_nodes(volume: Volume) -> int:
    """Nodes the journal says the kernel holds (what a successor reopens)."""
    live: set[str] = set()
    with open(f"{volume.state}.nodes", encoding="ascii") as f:
        for line in f:
            parts = line.split()
            if parts[:1] == ["+"]:
                live.add(parts[1])
            elif parts[:1] == ["-"]:
                live.discard(parts[1])
    return len(live)


def _stats(m: Mounted) -> dict[str, Any]:
    return m.client.stats()


def test_many_files_stay_within_the_descriptor_budget(volume: Volume) -> None:
    """Four times the budget of files created, stat'ed, listed and read by
    a pod: no error; the session's descriptors stay under the budget; the
    open file and the working directory keep working."""
    os.chown(volume.source, 1000, 1000)
    m = _start(volume)
    watch = _FdWatch(m.proc.pid)
    report = _pod(volume, "create")
    most = watch.stop()
    stats = _stats(m)
    assert report == "errors 0", (report, {k: v for k, v in stats.items() if k.startswith("nodes")})
    assert most < BUDGET + SLACK, f"the session had {most} descriptors (budget {BUDGET})"
    assert stats["nodes_max"] == BUDGET
    assert stats["nodes_pruned"] > 0 and stats["nodes_refused"] == 0, stats
    assert stats["nodes"] <= BUDGET
    # Every pruned node was journalled as forgotten (a successor must not
    # reopen them).
    assert 0 < _journalled_nodes(volume) <= BUDGET


def test_a_takeover_after_pruning_serves_every_file(volume: Volume) -> None:
    """Pruned nodes are journalled as forgotten: a successor restores only
    the nodes the kernel still holds (within the budget), and the pod's
    files, old and new, keep working across the SIGKILL and after."""
    os.chown(volume.source, 1000, 1000)
    first = _start(volume)
    assert _pod(volume, "create") == "errors 0"
    held = os.open(volume.mountpoint / "d" / "held", os.O_RDWR)  # held across the handover
    try:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        assert 0 < _journalled_nodes(volume) <= BUDGET
        second = _start(volume, takeover=True)
        assert _stats(second)["nodes"] <= BUDGET
        watch = _FdWatch(second.proc.pid)
        report = _pod(volume, "again")
        most = watch.stop()
        assert report == "errors 0", report
        assert most < BUDGET + SLACK, f"the successor had {most} descriptors (budget {BUDGET})"
        assert os.pread(held, 4, 0) == b"held"
        assert _stats(second)["nodes_refused"] == 0
    finally:
        os.close(held)


def test_the_table_refuses_a_node_beyond_its_budget_and_offers_unused_ones_oldest_first(tmp_path: Path) -> None:
    """The node table alone: ENFILE (descriptor closed) past the budget, a
    known inode still found; the pruner's candidates skip the root and open
    nodes, oldest first, and are asked about again only after the others."""
    for i in range(6):
        (tmp_path / f"f{i}").write_bytes(b"x")
    table = NodeTable(os.open(tmp_path, os.O_PATH | os.O_DIRECTORY))
    woken: list[int] = []
    table.on_pressure = lambda: woken.append(len(table))
    table.set_budget(5)
    assert (table.high, table.low) == (4, 3)

    def remember(name: str) -> int:
        fd = os.open(tmp_path / name, os.O_PATH | os.O_NOFOLLOW)
        return table.remember(fd, os.fstat(fd)).nodeid

    ids = [remember(f"f{i}") for i in range(4)]       # with the root: 5 nodes
    assert woken == [5]                                  # past the high-water mark
    fd = os.open(tmp_path / "f5", os.O_PATH | os.O_NOFOLLOW)
    with pytest.raises(OSError) as exc:
        table.remember(fd, os.fstat(fd))
    assert exc.value.errno == errno.ENFILE and table.refused == 1
    with pytest.raises(OSError):
        os.fstat(fd)                                     # closed, not leaked
    assert remember("f0") == ids[0]                      # a known inode needs no new node
    table.get(ids[1]).state = object()                   # open
    assert table.prune_candidates(2) == [ids[0], ids[2]]
    assert table.prune_candidates(2) == [ids[3], ids[0]]  # the ones looked at go last
    assert ROOT_ID not in table.prune_candidates(10)
    table.forget(ids[0], 2)
    assert table.dropped == 1 and len(table) == 4
    assert remember("f5") not in ids                     # room again


HOLD = r"""
import errno, os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
fds, refused = [], 0
for i in range(n):
    try:
        fds.append(os.open(os.path.join(d, f"h{i}"), os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as exc:
        assert exc.errno == errno.ENFILE, exc
        refused += 1
for fd in fds:
    os.close(fd)
print(len(fds), refused, flush=True)
"""


def test_when_every_node_is_in_use_new_names_get_enfile_until_some_are_released(volume: Volume) -> None:
    """Budget 64, a pod holding 100 files open: the opens beyond the budget
    fail with ENFILE (nothing can be pruned: each is open), the session
    keeps serving, and once the files are closed new names work again."""
    os.chown(volume.source, 1000, 1000)
    m = volume.start(extra=["--max-nodes", "64"])
    pod = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", sys.executable, "-c", HOLD]
    out = subprocess.run([*pod, str(volume.mountpoint / "held"), "100"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    opened, refused = map(int, out.stdout.split())
    assert refused > 0 and opened + refused == 100 and opened <= 64
    # A refused create left nothing behind.
    assert len(os.listdir(volume.source / "held")) == opened
    stats = _stats(m)
    assert stats["nodes_max"] == 64 and stats["nodes_refused"] >= refused
    # Closed now: the releases wake the pruner, which gets the table under
    # its low-water mark (38), so a second pod gets all it asks for.
    wait_for(lambda: _stats(m)["nodes"] <= 38, what="the closed files' nodes to be pruned")
    out = subprocess.run([*pod, str(volume.mountpoint / "again"), "20"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["20", "0"]
    assert "node budget exhausted" in m.log()


def test_a_low_descriptor_limit_leaves_most_of_it_to_nodes() -> None:
    """With RLIMIT_NOFILE stuck at 20,000 (a hard limit the session cannot
    raise), the open-file cap used to take 16,384 and leave 2,592 nodes, so a
    10,000-file tree was pruned and looked up again on every pass."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000));"
            "from fusefs.session import raise_fd_limit, node_budget, NODE_FDS;"
            "cap = raise_fd_limit(16384, NODE_FDS);"
            "print(cap, node_budget(cap), resource.getrlimit(resource.RLIMIT_NOFILE)[0], NODE_FDS)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=str(Path(__file__).resolve().parents[2])).stdout.split()
    cap, nodes, soft, wanted = (int(x) for x in out)
    room = soft - 1024  # the session's own reserve
    assert cap + nodes <= room, (cap, nodes, soft)
    if soft == 20000:  # the limit could not be raised (no CAP_SYS_RESOURCE): split it
        assert nodes >= 3 * room // 4, (cap, nodes)
        assert cap >= 1024
    else:  # raised: both get all they asked for
        assert (cap, nodes) == (16384, wanted)
