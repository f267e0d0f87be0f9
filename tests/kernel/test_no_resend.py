"""A takeover where the kernel does not resend (what a kernel before 6.9
gives, simulated on a newer one with ``--no-resend``: INIT does not take
FUSE_HAS_RESEND and the successor never writes FUSE_NOTIFY_RESEND).

The requests the dead session had read but not answered cannot come again,
so the successor answers each with EIO (the dead session recorded them in
``<state-file>.inflight``): the pod's process gets an error for that one
call instead of waiting in the kernel, unkillably, until the connection ends;
everything sent after the takeover is served as usual."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.kernel.conftest import ENV, Volume

pytestmark = pytest.mark.privileged

PARKED_THEN_AGAIN = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
print("open", flush=True)
try:
    os.pwrite(fd, b"first", 100)
    print("first ok", flush=True)
except OSError as exc:
    print("first errno", exc.errno, flush=True)
n = os.pwrite(fd, b"second", 200)
os.fsync(fd)
print("second", n, flush=True)
"""


def test_without_resend_the_request_in_flight_fails_and_the_next_one_works(volume: Volume) -> None:
    first = volume.start(extra=["--no-resend"])
    assert first.client.stats()["negotiated"]["resend"] is False
    f = volume.mountpoint / "f"
    f.write_bytes(b"")
    first.client.freeze(120)
    writer = subprocess.Popen([sys.executable, "-c", PARKED_THEN_AGAIN, str(f)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"open"
        time.sleep(0.5)
        assert writer.poll() is None, "the write is parked by the freeze"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = volume.start(takeover=True)  # not frozen; resend stays off (the state file says so)
        out, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(5)
    assert out.decode().splitlines() == ["first errno 5", "second 6"]  # EIO, then served
    assert second.client.stats()["negotiated"]["resend"] is False
    data = (volume.source / "f").read_bytes()
    assert data[200:] == b"second" and b"first" not in data
    log = second.log()
    assert "answered the requests in flight at the takeover with EIO" in log


def test_resend_is_negotiated_by_default(volume: Volume) -> None:
    """The counterpart: on this kernel (6.18) a session takes FUSE_HAS_RESEND."""
    first = volume.start()
    assert first.client.stats()["negotiated"]["resend"] is True
