"""A session the daemon starts on the kernel engine (``fusefs serve --engine
kernel``) negotiates FUSE_HAS_RESEND and FUSE_PASSTHROUGH on this kernel
(Linux 6.9 and later), logs them at mount, exports them as metrics, and uses
both: a read-only open is served by the kernel from the backing file (no
READ reaches fusefs), and a write in flight when the session is SIGKILLed
is sent again to its successor and done once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.fusefs.test_daemon import _env
from tests.fusefs.test_daemon_takeover import (  # noqa: F401 - fixtures
    Holder, KernelNode, _session_pid, _wait_new_session, holder, knode, root)

pytestmark = pytest.mark.privileged

MiB = 1 << 20

PARKED_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
print("open", flush=True)
n = os.pwrite(fd, b"written once", 100)
os.fsync(fd)
print("wrote", n, flush=True)
"""


def _metrics(node: KernelNode) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def _count(text: str, name: str, vid: str, op: str) -> int:
    m = re.search(rf'^{name}{{volume_id="{vid}",op="{op}"}} (\S+)$', text, re.M)
    return int(float(m.group(1))) if m else 0


def _mounted(node: KernelNode, populate: bytes) -> tuple[str, Path]:
    vid = node.new_volume()
    (node.volumes / vid / "data.bin").write_bytes(populate)
    stage = node.stage(vid)
    with node.client() as c:
        c.mount(vid, stage, 64 * MiB)
    return vid, Path(stage)


def test_daemon_session_negotiates_logs_exports_and_uses_resend_and_passthrough(
        knode: KernelNode, holder: Holder) -> None:  # noqa: F811
    knode.start(metrics=True)
    data = os.urandom(4 * MiB)
    vid, stage = _mounted(knode, data)

    # Negotiated, logged at mount (the session's "negotiated" line), exported.
    negotiated = [json.loads(line) for line in knode.log.read_text(errors="replace").splitlines()
                  if '"negotiated"' in line and vid in line and line.startswith("{")]
    assert negotiated, knode.log_tail()
    flags = negotiated[0]["negotiated"]["flags"]
    assert "has_resend" in flags and "passthrough" in flags
    text = _metrics(knode)
    for flag in ("has_resend", "passthrough"):
        assert f'fusefs_negotiated_flag{{volume_id="{vid}",flag="{flag}"}} 1' in text

    # Passthrough used: 4 MiB read through a fresh read-only open, not one READ.
    reads = _count(text, "fusefs_operations_total", vid, "read")
    assert (stage / "data.bin").read_bytes() == data
    assert _count(_metrics(knode), "fusefs_operations_total", vid, "read") == reads

    # Resend used: a write parked by a freeze when the session is killed is
    # sent again to the successor (FUSE_NOTIFY_RESEND) and done once.
    (stage / "f").write_bytes(b"")
    with knode.client() as c:
        c.freeze([vid], 120)
    writer = subprocess.Popen([sys.executable, "-c", PARKED_WRITER, str(stage / "f")],
                              stdout=subprocess.PIPE, env=_env())
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"open"
        time.sleep(0.5)
        assert writer.poll() is None, "the write is parked by the freeze"
        old = _session_pid(knode, vid)
        os.kill(old, signal.SIGKILL)
        _wait_new_session(knode, vid, old)
        with knode.client() as c:
            c.thaw([vid])  # in case the daemon froze the successor again
        out, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(5)
    assert out.decode().split() == ["wrote", "12"]
    assert (knode.volumes / vid / "f").read_bytes() == b"\0" * 100 + b"written once"
    with knode.client() as c:
        c.unmount(vid)
