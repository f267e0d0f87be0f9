"""Handover: a session dies (SIGKILL), a holder keeps the /dev/fuse
descriptors, and a new session takes them and serves the same connection:
no INIT, no unmount, node IDs still valid, requests in flight resent."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fusefs.conftest import is_mounted
from tests.kernel.conftest import ENV, Volume, wait_for

pytestmark = pytest.mark.privileged

CLIENT = r"""
import os, sys, time
mnt, stop = sys.argv[1], sys.argv[2]
os.chdir(os.path.join(mnt, "d"))           # a node the kernel holds across the handover
fd = os.open("log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
rfd = os.open("log", os.O_RDONLY)
errors, n = 0, 0
print("started", flush=True)
while not os.path.exists(stop):
    try:
        line = b"%08d\n" % n
        os.write(fd, line)
        os.fsync(fd)
        n += 1
        if os.pread(rfd, 9, (n - 1) * 9) != line:
            errors += 1
            print("mismatch at", n - 1, flush=True)
        with open("f%d" % (n % 10), "wb") as f:   # new opens by name
            f.write(b"x" * n)
        os.listdir(".")
        os.stat("log")
    except OSError as exc:
        errors += 1
        print("error", exc, flush=True)
    time.sleep(0.005)
print("done", n, errors, flush=True)
"""


def _lines(path: Path) -> int:
    try:
        return path.stat().st_size // 9
    except FileNotFoundError:
        return 0


def test_sigkill_and_takeover_without_errors(volume: Volume, tmp_path: Path) -> None:
    first = volume.start()
    (volume.mountpoint / "d").mkdir()
    stop = tmp_path / "stop"
    client = subprocess.Popen([sys.executable, "-c", CLIENT, str(volume.mountpoint), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == b"started"
        log = volume.source / "d" / "log"
        wait_for(lambda: _lines(log) >= 20, what="the client writing")
        serving = first
        for round_ in range(2):  # a successor can be taken over too
            serving.proc.send_signal(signal.SIGKILL)
            serving.proc.wait(10)
            at_kill = _lines(log)
            time.sleep(0.3)  # clients block in the kernel meanwhile
            assert is_mounted(str(volume.mountpoint)), "the holder keeps the mount alive"
            serving = volume.start(takeover=True)
            assert "took over the connection" in serving.log()
            assert f'"epoch": {round_ + 1}' in serving.log()
            wait_for(lambda: _lines(log) >= at_kill + 50, what="the client writing after the takeover")
        second = serving
        stop.touch()
        out, _ = client.communicate(timeout=30)
    finally:
        stop.touch()
        if client.poll() is None:
            client.kill()
            client.wait(5)
    last = out.decode().strip().splitlines()[-1].split()
    assert last[0] == "done" and last[2] == "0", out.decode()
    written = int(last[1])
    assert log.read_bytes() == b"".join(b"%08d\n" % i for i in range(written))
    assert second.client.stats()["negotiated"]["resend"] is True


PARKED_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
print("open", flush=True)
n = os.pwrite(fd, b"written once", 100)
os.fsync(fd)
print("wrote", n, flush=True)
"""


def test_a_request_in_flight_at_the_kill_is_resent_and_answered(volume: Volume) -> None:
    """Freeze the volume so that a write is read by the session but parked,
    SIGKILL the session, take over: the kernel sends the write again
    (FUSE_NOTIFY_RESEND) and the writer sees it succeed, once."""
    first = volume.start()
    f = volume.mountpoint / "f"
    f.write_bytes(b"")
    empty = first.client.stats()["used_bytes"]
    first.client.freeze(120)
    writer = subprocess.Popen([sys.executable, "-c", PARKED_WRITER, str(f)], stdout=subprocess.PIPE, env=ENV)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"open"
        time.sleep(0.5)
        assert writer.poll() is None, "the write is parked by the freeze"
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = volume.start(takeover=True)  # a new session is not frozen
        out, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(5)
    assert out.decode().split() == ["wrote", "12"]
    data = (volume.source / "f").read_bytes()
    assert data == b"\0" * 100 + b"written once"
    assert second.client.stats()["used_bytes"] >= empty + 112  # charged (once the new session counted)


def test_takeover_without_a_holder_fails_cleanly(volume: Volume) -> None:
    """A takeover with nothing to take exits non-zero and mounts nothing."""
    argv = [sys.executable, "-m", "fusefs.session", "--engine=kernel", "--volume-id", volume.volume_id,
            "--source", str(volume.source), "--mountpoint", str(volume.mountpoint),
            "--control-socket", str(volume.base / "x.sock"), "--state-file", volume.state,
            "--holder-socket", volume.holder.socket, "--takeover"]
    proc = subprocess.run(argv, capture_output=True, env=ENV, timeout=60, check=False)
    assert proc.returncode != 0
    assert not is_mounted(str(volume.mountpoint))


def test_passthrough_opens_survive_a_handover(volume: Volume) -> None:
    """A file open through passthrough at the kill keeps its backing file in
    the kernel; the successor (from the journal) reuses it for new readers
    (a second backing for one inode would fail the open with EIO) and
    closes it when the last of them is released, so writers work again."""
    first = volume.start()
    f = volume.mountpoint / "f"
    f.write_bytes(b"passthrough data")
    reader = os.open(f, os.O_RDONLY)
    try:
        journal = Path(volume.state + ".nodes").read_text().splitlines()
        assert sum(line.startswith("P ") for line in journal) == 1, journal
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        volume.start(takeover=True)
        assert os.pread(reader, 11, 0) == b"passthrough"
        again = os.open(f, os.O_RDONLY)
        assert os.pread(again, 4, 12) == b"data"
        with pytest.raises(OSError) as exc:
            os.open(f, os.O_WRONLY)
        assert exc.value.errno == errno.ETXTBSY
        os.close(again)
    finally:
        os.close(reader)
    w = wait_for(lambda: _open_writer(f), what="a writer once every reader closed")
    os.pwrite(w, b"P", 0)
    os.close(w)
    assert (volume.source / "f").read_bytes() == b"Passthrough data"


def _open_writer(path: Path) -> int | None:
    try:
        return os.open(path, os.O_WRONLY)
    except OSError as exc:
        if exc.errno != errno.ETXTBSY:
            raise
        return None


def test_a_clean_stop_takes_the_descriptors_back_from_the_holder(volume: Volume) -> None:
    """SIGTERM means "unmount": the session drops its descriptors from the
    holder, so the mount goes away although the holder keeps running."""
    from fusefs.kernel import handover

    m = volume.start()
    fds = handover.take(volume.holder.socket, volume.volume_id)
    for fd in fds:
        os.close(fd)
    assert len(fds) == 3  # the master and two clones
    m.proc.send_signal(signal.SIGTERM)
    assert m.proc.wait(15) == 0
    wait_for(lambda: not is_mounted(str(volume.mountpoint)), what="the unmount")
    assert volume.holder.proc.poll() is None
    with pytest.raises(OSError):
        handover.take(volume.holder.socket, volume.volume_id)


def test_a_file_open_for_writing_across_a_handover_can_be_opened_for_reading(volume: Volume) -> None:
    """The successor does not know the cached opens the kernel kept (they are
    adopted on their next write); a new read-only open of such a file must
    not be passthrough, or the kernel would fail it with EIO."""
    first = volume.start()
    f = volume.mountpoint / "f"
    f.write_bytes(b"")
    writer = os.open(f, os.O_WRONLY)
    try:
        os.pwrite(writer, b"before", 0)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        volume.start(takeover=True)
        reader = os.open(f, os.O_RDONLY)  # before the writer writes again
        assert os.pread(reader, 6, 0) == b"before"
        os.pwrite(writer, b"after", 6)
        assert os.pread(reader, 11, 0) == b"beforeafter"
        os.close(reader)
    finally:
        os.close(writer)


SITTER = r"""
import os, sys
print("ready", flush=True)
for line in sys.stdin:
    try:
        with open(line.strip(), "w") as f:     # relative to the working directory in the volume
            f.write("made")
        print("ok", sorted(os.listdir(".")), flush=True)
    except OSError as exc:
        print("error", exc.errno, exc, flush=True)
"""


def _nodes_of(m: Any, source: Path) -> int:
    """Descriptors the session keeps on the volume's inodes (a node keeps
    one each; the root and open files add a few)."""
    prefix = str(source)
    count = 0
    for fd in os.listdir(f"/proc/{m.proc.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{m.proc.pid}/fd/{fd}")
        except OSError:
            continue
        if target == prefix or target.startswith(prefix + "/"):
            count += 1
    return count


def _drop_caches() -> None:
    """Make the kernel evict unused inodes (of every filesystem: harmless
    to other mounts), which sends FORGET for ours."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")


def test_nodes_are_released_when_the_kernel_forgets_them_after_a_takeover(volume: Volume) -> None:
    """Lookups, a takeover, then FORGETs (the kernel evicting its inodes):
    the successor releases every node the kernel forgot, counting the dead
    session's lookups, and keeps those it still holds (an open file, a
    working directory), which keep working; the released names are looked
    up again as new nodes."""
    n = 300
    first = volume.start()
    d = volume.mountpoint / "d"
    d.mkdir()
    for i in range(n):
        (d / f"f{i}").write_bytes(b"x")
    (volume.mountpoint / "held").write_bytes(b"held data")
    (volume.mountpoint / "cwd").mkdir()
    held = os.open(volume.mountpoint / "held", os.O_RDWR)  # served by fusefs, not passthrough
    sitter = subprocess.Popen([sys.executable, "-c", SITTER], cwd=volume.mountpoint / "cwd", env=ENV,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert sitter.stdout is not None and sitter.stdin is not None
        assert sitter.stdout.readline().strip() == "ready"
        for _ in range(3):
            for i in range(n):
                os.stat(d / f"f{i}")
            _drop_caches()  # forgets before the kill count too
        for i in range(n):
            os.stat(d / f"f{i}")
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = volume.start(takeover=True)
        assert _nodes_of(second, volume.source) >= n

        def released() -> bool:
            _drop_caches()
            time.sleep(0.2)
            return _nodes_of(second, volume.source) < 20
        wait_for(released, timeout=30, what="the nodes the kernel forgot to be released")
        # What the kernel still holds still works.
        assert os.pread(held, 4, 0) == b"held"
        os.pwrite(held, b"HELD", 0)
        sitter.stdin.write("made-after\n")
        sitter.stdin.flush()
        assert sitter.stdout.readline().split()[0] == "ok"
        # Released names come back as new nodes.
        for i in range(n):
            assert os.stat(d / f"f{i}").st_size == 1
        assert second.proc.poll() is None
        # No request named a node the successor had released (ESTALE):
        # nothing failed but LOOKUPs of names not made yet (and isatty()'s ioctl).
        ops = second.client.stats()["ops"]
        expected = ("lookup", "getxattr", "ioctl")
        failed = {op: o["errors"] for op, o in ops.items() if o["errors"] and op not in expected}
        assert failed == {}, failed
    finally:
        os.close(held)
        sitter.kill()
        sitter.wait(5)
    assert (volume.source / "held").read_bytes() == b"HELD data"
    assert (volume.source / "cwd" / "made-after").read_text() == "made"
