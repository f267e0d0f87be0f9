"""Embedded mode: ``fusepath-csi --fusefs=embedded`` runs its own fusefs daemon.

The daemon is started detached (its own session, so signals aimed at the
driver's process group miss it) and is *reused* when it already answers: a
driver that crashes or is restarted finds its daemon still there, with every
FUSE mount untouched. That is the same guarantee the separate container
gives in a cluster, for workstations, CI and csi-sanity. A daemon that dies
is started again by the driver's watcher (``csi_driver.fusefs_link``), as
kubelet restarts the fusefs container in a cluster; the new daemon re-mounts
every volume from its state file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from fusefs.client import FuseFSClient
from fusefs.supervisor import PACKAGE_ROOT, find_stale_sessions, kill_and_wait, socket_dir_for

SOCKET_NAME = "fusefs.sock"
START_TIMEOUT = 10.0


def endpoint_for(data_dir: Path) -> str:
    return f"unix://{Path(data_dir).resolve() / SOCKET_NAME}"


def _answers(endpoint: str, timeout: float = 1.0) -> bool:
    with FuseFSClient(endpoint) as client:
        return client.ping(timeout=timeout)


def daemon_argv(data_dir: Path, kubelet_dir: Path, metrics_address: str = "") -> list[str]:
    data_dir = Path(data_dir).resolve()
    argv = [
        sys.executable, "-m", "fusefs.cli", "serve",
        "--endpoint", endpoint_for(data_dir),
        "--state-dir", str(data_dir / "fusefs"),
        "--volumes-dir", str(data_dir / "volumes"),
        "--kubelet-dir", str(kubelet_dir),
    ]
    if metrics_address:
        argv += ["--metrics-address", metrics_address]
    return argv


def ensure_daemon(data_dir: Path, kubelet_dir: Path, log_path: Path | None = None,
                  metrics_address: str = "", timeout: float = START_TIMEOUT) -> str:
    """Return the endpoint of a running daemon for ``data_dir``, starting one if needed.

    The daemon logs to ``log_path`` (default ``<data_dir>/fusefs.log``), never
    to our stderr: a pipe that closes when we die would break its logging.
    """
    data_dir = Path(data_dir).resolve()
    endpoint = endpoint_for(data_dir)
    if len(endpoint.removeprefix("unix://")) > 100:
        raise ValueError(f"{endpoint} is too long for a unix socket")
    if _answers(endpoint):
        return endpoint
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else data_dir / "fusefs.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - argument list
            daemon_argv(data_dir, kubelet_dir, metrics_address), stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=log_file, env=env, close_fds=True, start_new_session=True)
    # Reap it if it ever exits while we live, so it does not linger as a zombie.
    threading.Thread(target=proc.wait, name="fusefs-reaper", daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers(endpoint, timeout=0.5):
            return endpoint
        if proc.poll() is not None and not _answers(endpoint, timeout=0.5):
            # Lost a start race to another daemon that is still coming up? Give it the time left.
            if not _wait_for(endpoint, deadline):
                raise RuntimeError(f"fusefs daemon exited with code {proc.returncode}; see {log_path}")
            return endpoint
        time.sleep(0.05)
    raise RuntimeError(f"fusefs daemon did not answer on {endpoint} within {timeout:.0f}s; see {log_path}")


def _wait_for(endpoint: str, deadline: float) -> bool:
    while time.monotonic() < deadline:
        if _answers(endpoint, timeout=0.5):
            return True
        time.sleep(0.1)
    return False


def daemon_pid(data_dir: Path) -> int | None:
    """The PID in the daemon's lock file, if that process still runs."""
    try:
        pid = int((Path(data_dir).resolve() / "fusefs" / "daemon.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    is_daemon = b"serve" in args and any(a == b"fusefs.cli" or a.endswith(b"/fusefs") for a in args)
    return pid if is_daemon else None


def stop_daemon(data_dir: Path, timeout: float = 15.0) -> bool:
    """SIGTERM the daemon of ``data_dir`` and wait for it; SIGKILL after ``timeout``.

    The state file is kept: a daemon started later re-mounts its volumes.
    Returns False when no daemon was running.
    """
    pid = daemon_pid(data_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _running(pid):
        time.sleep(0.05)
    if _running(pid):
        os.kill(pid, signal.SIGKILL)
        while _running(pid):
            time.sleep(0.05)
    # A session the daemon was still starting may have missed its death signal.
    kill_and_wait(find_stale_sessions(socket_dir_for(Path(data_dir).resolve() / "fusefs")))
    return True


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
