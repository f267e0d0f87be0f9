"""The daemon gives each kernel-engine session an orphan directory (outside
the volume, 0700) where open files a pod unlinked survive a session kill,
and Unmount removes it, with whatever is still in it.

Real daemon (``fusefs serve --engine kernel``), real holder, real FUSE
mount and bind, a pretend pod (uid 1000) in the publish target.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.fusefs.test_daemon import MiB, _env
from tests.fusefs.test_daemon_takeover import (  # noqa: F401 - fixtures
    KernelNode, _session_pid, _wait_new_session, holder, knode, root)

pytestmark = pytest.mark.privileged

POD = r"""
import os, sys
fd = os.open(os.path.join(sys.argv[1], "tmpfile"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, b"kept" * 1000)
os.unlink(os.path.join(sys.argv[1], "tmpfile"))
print("ready", flush=True)
sys.stdin.readline()
try:
    print("read", os.pread(fd, 4000, 0) == b"kept" * 1000, os.fstat(fd).st_nlink, flush=True)
except OSError as exc:
    print("error", exc.errno, flush=True)
sys.stdin.readline()
"""


def test_an_unlinked_open_file_survives_a_session_kill_and_unmount_removes_the_orphans(knode: KernelNode) -> None:
    knode.start()
    vid = knode.new_volume()
    work = knode.volumes / vid / "w"
    work.mkdir()
    os.chown(work, 1000, 1000)
    stage, target = knode.stage(vid), knode.target(f"pod-{uuid.uuid4().hex[:8]}")
    with knode.client() as c:
        c.mount(vid, stage, 64 * MiB)
        c.publish(vid, target, read_only=False)
    orphans = knode.state_dir / "kernel" / "orphans" / vid
    assert orphans.is_dir() and (orphans.stat().st_mode & 0o777) == 0o700
    pod = subprocess.Popen(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
                            sys.executable, "-c", POD, str(Path(target) / "w")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env())
    try:
        assert pod.stdin is not None and pod.stdout is not None
        assert pod.stdout.readline().strip() == b"ready"
        assert len(os.listdir(orphans)) == 1 and not os.listdir(work)
        pid = _session_pid(knode, vid)
        os.kill(pid, signal.SIGKILL)
        _wait_new_session(knode, vid, pid)
        pod.stdin.write(b"go\n")
        pod.stdin.flush()
        assert pod.stdout.readline().split() == [b"read", b"True", b"0"]
        with knode.client() as c:  # the pod still holds the orphan
            c.unpublish(vid, target)
            c.unmount(vid)
        assert not orphans.exists(), "Unmount leaves no orphan directory"
    finally:
        pod.kill()
        pod.wait(5)
