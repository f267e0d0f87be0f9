"""The kernel engine (``--engine=kernel``) on real mounts: what it negotiates,
what the inode-based filesystem does better than paths, passthrough, and
interrupts. POSIX behaviour, quota, read-only and freeze run on it through
the fusefs suites (``FUSEFS_TEST_ENGINE=kernel``, and the ``kernel`` mode of
tests/fusefs/test_posix.py)."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fusefs.conftest import Mounted, run_as
from tests.kernel.conftest import ENV, op_count, wait_for

pytestmark = pytest.mark.privileged


def test_negotiates_resend_and_passthrough_and_logs_them(kstart: Callable[..., Mounted]) -> None:
    m = kstart()
    neg = m.client.stats()["negotiated"]
    assert neg["engine"] == "kernel"
    assert neg["resend"] is True and neg["passthrough"] is True and neg["readdirplus"] is True
    assert neg["writeback_cache"] is False
    assert {"has_resend", "passthrough", "init_ext", "max_pages"} <= set(neg["flags"])
    assert neg["max_write"] == 1 << 20
    assert '"msg": "negotiated"' in m.log() and "has_resend" in m.log()


def test_unlinked_open_file_behaves_as_on_a_plain_directory(kstart: Callable[..., Mounted]) -> None:
    """No hidden file: fstat says nlink 0, the directory can be removed at
    once, the data stays readable, and the quota is given back on close."""
    m = kstart()
    before = m.client.stats()
    d = m.mountpoint / "d"
    d.mkdir()
    fd = os.open(d / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.write(fd, b"x" * 10000)
        os.unlink(d / "f")
        assert os.fstat(fd).st_nlink == 0
        os.rmdir(d)
        assert os.listdir(m.source) == []
        assert os.pread(fd, 5, 9995) == b"xxxxx"
        assert m.client.stats()["used_bytes"] >= before["used_bytes"] + 10000  # charged while open
    finally:
        os.close(fd)
    wait_for(lambda: m.client.stats()["used_bytes"] == before["used_bytes"], what="quota given back")
    assert m.client.stats()["used_inodes"] == before["used_inodes"]


def test_hard_links_share_one_node(kstart: Callable[..., Mounted]) -> None:
    """One node per inode: a write through one name is seen at once through the other."""
    m = kstart()
    a, b = m.mountpoint / "a", m.mountpoint / "b"
    a.write_bytes(b"1")
    os.link(a, b)
    assert os.stat(b).st_size == 1
    with open(a, "ab") as f:
        f.write(b"2345")
    assert os.stat(b).st_size == 5 and b.read_bytes() == b"12345"
    assert os.stat(a).st_ino == os.stat(b).st_ino and os.stat(b).st_nlink == 2


def test_working_directory_survives_a_rename_on_the_host(kstart: Callable[..., Mounted]) -> None:
    """Nodes hold descriptors, not paths: renaming on the host breaks nothing."""
    m = kstart()
    (m.mountpoint / "d").mkdir()
    (m.mountpoint / "d" / "f").write_bytes(b"data")
    dfd = os.open(m.mountpoint / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(m.source / "d", m.source / "moved")
        assert os.listdir(dfd) == ["f"]
        with open(os.open("f", os.O_RDONLY, dir_fd=dfd), "rb") as f:
            assert f.read() == b"data"
    finally:
        os.close(dfd)


def _read_all(path: os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("passthrough", [True, False])
def test_read_only_opens_are_served_by_kernel_passthrough(kstart: Callable[..., Mounted], passthrough: bool) -> None:
    """With passthrough, reading a file never reaches the daemon (no READ);
    without it (the control), it does."""
    data = os.urandom(1 << 20)
    # Written on the host before the mount: nothing of it is in the mount's page cache.
    m = kstart(extra=[] if passthrough else ["--no-passthrough"],
               populate=lambda src: (src / "big").write_bytes(data))
    f = m.mountpoint / "big"
    reads = op_count(m, "read")
    assert _read_all(f) == data
    if passthrough:
        assert op_count(m, "read") == reads
    else:  # counted just after the answer is written, hence the wait
        wait_for(lambda: op_count(m, "read") > reads, what="READ requests counted")


def test_passthrough_and_writable_opens_do_not_mix(kstart: Callable[..., Mounted]) -> None:
    """The kernel refuses cached and passthrough opens of one inode at once:
    a write open while a passthrough read open is held fails with ETXTBSY
    (never EIO), and works again once the reader is closed."""
    m = kstart()
    f = m.mountpoint / "f"
    f.write_bytes(b"abc")
    reader = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as exc:
            os.open(f, os.O_WRONLY)
        assert exc.value.errno == errno.ETXTBSY
        assert os.pread(reader, 3, 0) == b"abc"
        second = os.open(f, os.O_RDONLY)  # another reader shares the backing file
        assert os.pread(second, 3, 0) == b"abc"
        os.close(second)
    finally:
        os.close(reader)
    w = wait_for(lambda: _try_open(f, os.O_WRONLY), what="write open after the reader closed")
    os.pwrite(w, b"X", 0)
    os.close(w)
    assert f.read_bytes() == b"Xbc"


def _try_open(path: os.PathLike[str], flags: int) -> int | None:
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ETXTBSY:
            raise
        return None  # the RELEASE of the reader is asynchronous


def test_read_opens_of_a_file_open_for_writing_stay_cached(kstart: Callable[..., Mounted]) -> None:
    """A reader that comes while a writer has the file open is not passthrough
    (it could not be): it reads through fusefs and sees the writer's data."""
    m = kstart()
    f = m.mountpoint / "log"
    with open(f, "wb", buffering=0) as w:
        w.write(b"line1\n")
        reads = op_count(m, "read")
        assert _read_all(f) == b"line1\n"
        w.write(b"line2\n")
        assert _read_all(f) == b"line1\nline2\n"
    assert op_count(m, "read") >= reads


def test_a_read_limit_turns_passthrough_off(kstart: Callable[..., Mounted]) -> None:
    """Reads under an I/O limit must pass through fusefs to be limited."""
    m = kstart(bytes_per_second=1 << 30, populate=lambda src: (src / "f").write_bytes(b"y" * 100_000))
    f = m.mountpoint / "f"
    reads = op_count(m, "read")
    assert _read_all(f) == b"y" * 100_000
    wait_for(lambda: op_count(m, "read") > reads, what="READ requests counted")


WRITER = """
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
print("open", flush=True)
os.write(fd, b"blocked write")
print("written", flush=True)
"""


def test_a_process_parked_by_a_freeze_stays_killable(kstart: Callable[..., Mounted]) -> None:
    """SIGKILL of a process whose write waits for a thaw: the kernel sends
    INTERRUPT, the engine answers EINTR, and the process dies at once
    (without it, it would hang in D state until the thaw)."""
    m = kstart()
    (m.mountpoint / "f").write_bytes(b"")
    m.client.freeze(120)
    try:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(m.mountpoint / "f")],
                                stdout=subprocess.PIPE, env=ENV)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"open"
        time.sleep(0.5)
        assert proc.poll() is None, "the write should be parked by the freeze"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)  # bounded: raises TimeoutExpired if the process hangs
        assert proc.returncode == -signal.SIGKILL
        assert time.monotonic() - t0 < 60, "died by the freeze's end, not by the kill"
        assert m.client.stats()["frozen"] is True
    finally:
        m.client.thaw()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_unknown_requests_get_enosys_and_the_session_stays_up(kstart: Callable[..., Mounted]) -> None:
    """copy_file_range is not implemented: ENOSYS makes the kernel fall back to
    a plain copy, and the result is right."""
    m = kstart()
    src, dst = m.mountpoint / "a", m.mountpoint / "b"
    src.write_bytes(b"z" * 5000)
    with open(src, "rb") as i, open(dst, "wb") as o:
        assert os.copy_file_range(i.fileno(), o.fileno(), 5000) == 5000
    assert dst.read_bytes() == b"z" * 5000
    assert m.client.ping()["ready"]


def test_negotiated_flags_are_exported_as_metrics(kstart: Callable[..., Mounted]) -> None:
    m = kstart()
    text = m.client.metrics()
    assert f'fusefs_negotiated_flag{{volume_id="{m.volume_id}",flag="has_resend"}} 1' in text
    assert f'fusefs_negotiated_flag{{volume_id="{m.volume_id}",flag="passthrough"}} 1' in text


def _privs_case(root: Path) -> list[object]:
    """As root: set-ID files owned by uid 1000; as uid 1000: write, truncate."""
    modes = {"w": 0o6755, "g": 0o2745, "t": 0o4777, "f": 0o6777}
    for name, mode in modes.items():
        (root / name).write_bytes(b"data")
        os.chown(root / name, 1000, 1000)
        os.chmod(root / name, mode)

    def as_user() -> list[int]:
        for name in ("w", "g"):
            with open(root / name, "ab") as out:
                out.write(b"more")
        os.close(os.open(root / "t", os.O_WRONLY | os.O_TRUNC))
        fd = os.open(root / "f", os.O_WRONLY)
        os.ftruncate(fd, 1)
        os.close(fd)
        return [stat.S_IMODE(os.stat(root / n).st_mode) for n in modes]

    return run_as(1000, 1000, as_user)


def test_writes_by_a_user_clear_set_id_bits_as_a_local_filesystem_does(kstart: Callable[..., Mounted],
                                                                       base_dir: Path) -> None:
    """The engine negotiates FUSE_HANDLE_KILLPRIV_V2 (so the kernel does not
    ask for security.capability before every write) and clears set-ID bits
    itself, exactly as the kernel does on a plain directory."""
    m = kstart()
    assert "handle_killpriv_v2" in m.client.stats()["negotiated"]["flags"]
    plain = base_dir / "plain"
    plain.mkdir(mode=0o755)
    (m.mountpoint / "x").mkdir(mode=0o755)
    assert _privs_case(m.mountpoint / "x") == _privs_case(plain)
    f = m.mountpoint / "x" / "w"
    before = op_count(m, "getxattr")
    with open(f, "r+b", buffering=0) as out:
        for i in range(50):
            out.write(b"z")
    assert op_count(m, "getxattr") - before < 5  # not one per write


OPENER = r"""
import errno, os, sys, time
path, mode, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end = time.monotonic() + seconds
ok = busy = other = 0
while time.monotonic() < end:
    try:
        fd = os.open(path, os.O_RDONLY if mode == "r" else os.O_WRONLY)
        if mode == "r":
            os.pread(fd, 4, 0)
        else:
            os.pwrite(fd, b"data", 0)
        os.close(fd)
        ok += 1
    except OSError as exc:
        if exc.errno == errno.ETXTBSY and mode == "w":
            busy += 1
        else:
            other += 1
            print("error", exc, flush=True)
print(ok, busy, other, flush=True)
"""


def test_racing_readers_and_writers_never_get_eio(kstart: Callable[..., Mounted]) -> None:
    """Readers (passthrough candidates) and writers open one file at once for
    two seconds: readers always succeed, writers succeed or get ETXTBSY,
    nobody gets the EIO the kernel gives a mixed-mode open."""
    m = kstart()
    f = m.mountpoint / "f"
    f.write_bytes(b"data")
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(f), mode, "2"], stdout=subprocess.PIPE, env=ENV)
             for mode in ("r", "r", "w", "w")]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        results.append(out.decode().split()[-3:])
    assert all(r[2] == "0" for r in results), results
    assert all(int(r[0]) > 0 for r in results[:2]), results


def test_a_throttled_request_of_a_killed_process_ends_at_once(kstart: Callable[..., Mounted]) -> None:
    """The I/O limits ask the engine, not libfuse, whether a request was
    interrupted: a writer killed while throttled is gone at once (EINTR for
    its request, counted), and the session lives on. (Asking libfuse's
    fuse_interrupted() from this engine's threads crashed the session.)"""
    m = kstart(bytes_per_second=256 << 10)  # 1 MiB requests: the first passes, each next waits ~4 s
    writer = subprocess.Popen([sys.executable, "-c",
                               "import os, sys; fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644);"
                               " os.write(fd, b'x' * (16 << 20))", str(m.mountpoint / "f")])
    try:
        wait_for(lambda: m.client.stats()["throttled_seconds"] > 0 or writer.poll() is not None,
                 what="the writer to be throttled")
        assert writer.poll() is None, "the writer was never held by the limit"
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)  # without the interrupt it would wait out ~60 s of throttling
        wait_for(lambda: m.client.stats()["throttle_interrupted"] >= 1, what="the interrupt to be counted")
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert m.proc.poll() is None, m.log()
    assert m.client.ping()["ready"]
