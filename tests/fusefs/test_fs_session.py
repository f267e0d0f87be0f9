"""The session process contract the daemon relies on (docs/fusefs.md):
command line, readiness, stdout/stderr, control protocol, SIGTERM and
--die-with-parent."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from fusefs.control import ControlError, SessionClient
from tests.fusefs.conftest import REPO, Mounted, chosen_engine, force_unmount, is_mounted, mountinfo_entry

pytestmark = pytest.mark.privileged


def session_argv(base: Path, volume_id: str, *extra: str) -> list[str]:
    (base / "src").mkdir(exist_ok=True)
    (base / "mnt").mkdir(exist_ok=True)
    return [sys.executable, "-m", "fusefs.session", "--volume-id", volume_id, "--source", str(base / "src"),
            "--mountpoint", str(base / "mnt"), "--control-socket", str(base / "ctl.sock"),
            f"--engine={chosen_engine()}", *extra]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def pings(sock: str) -> bool:
    try:
        return bool(SessionClient(sock, timeout=2).ping()["ready"])
    except OSError:
        return False


def test_stdout_is_silent_and_stderr_is_json_lines(base_dir: Path) -> None:
    volume_id = f"vol-{uuid.uuid4().hex}"
    proc = subprocess.Popen(session_argv(base_dir, volume_id, "--capacity", "1048576"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        wait_until(lambda: pings(str(base_dir / "ctl.sock")))
        # Ready means mounted: mountinfo agrees at the moment ping answers.
        assert mountinfo_entry(str(base_dir / "mnt")) == ("fuse.fusefs", f"fusepath:{volume_id}")
        assert stat.S_IMODE(os.stat(base_dir / "ctl.sock").st_mode) == 0o600
        (base_dir / "mnt" / "f").write_bytes(b"x")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        force_unmount(str(base_dir / "mnt"))
    assert proc.returncode == 0
    assert out == b""
    lines = err.decode().splitlines()
    assert lines, "no logs at all"
    for line in lines:
        entry = json.loads(line)
        assert entry["volume_id"] == volume_id and "msg" in entry and "level" in entry
    assert any(json.loads(line)["msg"] == "ready" for line in lines)
    assert not is_mounted(str(base_dir / "mnt"))
    assert not (base_dir / "ctl.sock").exists()


def test_control_commands(mounted: Mounted) -> None:
    c = mounted.client
    ping = c.ping()
    assert ping["ready"] is True and ping["volume_id"] == mounted.volume_id and ping["pid"] == mounted.proc.pid
    (mounted.mountpoint / "f").write_bytes(b"y" * 5000)
    (mounted.mountpoint / "f").read_bytes()
    st = c.stats()
    for key in ("capacity", "used_bytes", "used_inodes", "total_inodes", "frozen", "read_only", "limits",
                "ops", "bytes_read", "bytes_written", "bucket_bounds"):
        assert key in st, key
    assert st["used_bytes"] == 8192 and st["bytes_written"] >= 5000    # two charged blocks
    write = st["ops"]["write"]
    assert write["count"] >= 1 and write["buckets"][-1] == write["count"]
    assert len(write["buckets"]) == len(st["bucket_bounds"]) + 1
    text = c.metrics()
    label = f'volume_id="{mounted.volume_id}"'
    assert f'fusefs_operations_total{{{label},op="write"}}' in text
    assert f'fusefs_operation_duration_seconds_bucket{{{label},op="write",le="+Inf"}}' in text
    assert f"fusefs_used_bytes{{{label}}} 8192" in text
    assert text.count("# TYPE fusefs_operation_duration_seconds histogram") == 1
    with pytest.raises(ControlError) as exc:
        c.call("no-such-command")
    assert exc.value.kind == "unknown"
    with pytest.raises(ValueError):
        c.call("resize", capacity="big")
    with pytest.raises(ValueError):
        c.call("resize")


def test_bad_arguments_exit_non_zero(base_dir: Path) -> None:
    argv = session_argv(base_dir, "vol-x")
    argv[argv.index("--source") + 1] = str(base_dir / "missing")
    proc = subprocess.run(argv, capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2 and proc.stdout == b""
    assert not (base_dir / "ctl.sock").exists()
    proc = subprocess.run(session_argv(base_dir, "bad id,with=comma"), capture_output=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 2


def _spawn_via_parent(base: Path, volume_id: str, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    """A middle process that starts the session and sleeps; returns (middle, session pid)."""
    argv = session_argv(base, volume_id, *extra)
    script = ("import subprocess, sys, time\n"
              f"p = subprocess.Popen({argv!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
              "print(p.pid, flush=True)\n"
              "time.sleep(3600)\n")
    middle = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert middle.stdout is not None
    pid = int(middle.stdout.readline())
    wait_until(lambda: pings(str(base / "ctl.sock")))
    return middle, pid


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_die_with_parent(base_dir: Path) -> None:
    middle, pid = _spawn_via_parent(base_dir, f"vol-{uuid.uuid4().hex}", "--die-with-parent")
    try:
        middle.kill()
        middle.wait(10)
        wait_until(lambda: not _alive(pid), timeout=15)
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        force_unmount(str(base_dir / "mnt"))


def test_without_die_with_parent_the_session_outlives_its_parent(base_dir: Path) -> None:
    middle, pid = _spawn_via_parent(base_dir, f"vol-{uuid.uuid4().hex}")
    try:
        middle.kill()
        middle.wait(10)
        time.sleep(1.0)
        assert _alive(pid)
        assert pings(str(base_dir / "ctl.sock"))
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not _alive(pid), timeout=30)
        assert not is_mounted(str(base_dir / "mnt"))
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
        force_unmount(str(base_dir / "mnt"))


def test_busy_mount_still_stops_on_sigterm(start_session: Callable[..., Mounted]) -> None:
    """Open files in the mount do not keep SIGTERM from unmounting (lazily)."""
    m = start_session()
    fd = os.open(m.mountpoint / "f", os.O_CREAT | os.O_RDWR, 0o644)
    cwd = os.open(m.mountpoint, os.O_RDONLY)
    try:
        assert m.stop() == 0
        assert not is_mounted(str(m.mountpoint))
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: close(2) asks a session that is gone
            os.close(fd)
        os.close(cwd)
