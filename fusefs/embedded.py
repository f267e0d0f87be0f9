"""Embedded mode: ``fusepath-csi --fusefs=embedded`` runs its own fusefs daemon.

The daemon is started detached (its own session, so signals aimed at the
driver's process group miss it) and is *reused* when it already answers: a
driver that crashes or is restarted finds its daemon still there, with every
FUSE mount untouched. That is the same guarantee the separate container
gives in a cluster, for workstations, CI and csi-sanity. A daemon that dies
is started again by the driver's watcher (``csi_driver.fusefs_link``), as
kubelet restarts the fusefs container in a cluster; the new daemon re-mounts
every volume from its state file.

With the kernel engine (``engine="kernel"``), a descriptor holder
(``fusefs holder``) is started the same way, detached and re-used, before
the daemon, which is given its socket: the holder keeps every volume's FUSE
connection while no daemon runs, so a new daemon takes the connections over
instead of mounting afresh.
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
HOLDER_SOCKET_NAME = "holder.sock"
START_TIMEOUT = 10.0


def endpoint_for(data_dir: Path) -> str:
    return f"unix://{Path(data_dir).resolve() / SOCKET_NAME}"


def _answers(endpoint: str, timeout: float = 1.0) -> bool:
    with FuseFSClient(endpoint) as client:
        return client.ping(timeout=timeout)


def holder_socket_for(data_dir: Path) -> str:
    return str(Path(data_dir).resolve() / HOLDER_SOCKET_NAME)


def _spawn_detached(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own (signals aimed at our process group
    miss it), logging to ``log_path``; reaped if it exits while we live."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - argument list
            argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file, env=env, close_fds=True,
            start_new_session=True)
    threading.Thread(target=proc.wait, name="fusefs-reaper", daemon=True).start()
    return proc


def ensure_holder(data_dir: Path, timeout: float = START_TIMEOUT) -> str:
    """The socket of a running descriptor holder for ``data_dir``, starting one if needed.

    Re-used when it answers: it must outlive us and the daemon, or the
    connections it keeps would end with it.
    """
    from fusefs.kernel import handover

    data_dir = Path(data_dir).resolve()
    sock = holder_socket_for(data_dir)
    if len(sock) > 100:
        raise ValueError(f"{sock} is too long for a unix socket")
    if handover.answers(sock):
        return sock
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "holder.log"
    proc = _spawn_detached([sys.executable, "-m", "fusefs.cli", "holder", "--socket", sock], log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if handover.answers(sock):
            return sock
        if proc.poll() is not None and not handover.answers(sock):
            time.sleep(0.2)  # lost a start race to another holder? it answers soon
            if handover.answers(sock):
                return sock
            raise RuntimeError(f"fusefs holder exited with code {proc.returncode}; see {log_path}")
        time.sleep(0.05)
    raise RuntimeError(f"fusefs holder did not answer on {sock} within {timeout:.0f}s; see {log_path}")


def daemon_argv(data_dir: Path, kubelet_dir: Path, metrics_address: str = "", engine: str = "kernel",
                holder_socket: str = "") -> list[str]:
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
    argv += ["--engine", engine]  # always explicit: a daemon's default may change
    if holder_socket:
        argv += ["--holder-socket", holder_socket]
    return argv


def ensure_daemon(data_dir: Path, kubelet_dir: Path, log_path: Path | None = None,
                  metrics_address: str = "", timeout: float = START_TIMEOUT, engine: str = "kernel") -> str:
    """Return the endpoint of a running daemon for ``data_dir``, starting one if needed.

    The daemon logs to ``log_path`` (default ``<data_dir>/fusefs.log``), never
    to our stderr: a pipe that closes when we die would break its logging.
    """
    data_dir = Path(data_dir).resolve()
    endpoint = endpoint_for(data_dir)
    if len(endpoint.removeprefix("unix://")) > 100:
        raise ValueError(f"{endpoint} is too long for a unix socket")
    holder = ensure_holder(data_dir) if engine == "kernel" else ""
    if _answers(endpoint):
        return endpoint
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path) if log_path else data_dir / "fusefs.log"
    proc = _spawn_detached(daemon_argv(data_dir, kubelet_dir, metrics_address, engine, holder), log_path)
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


def holder_pids(data_dir: Path) -> list[int]:
    """PIDs of ``fusefs holder`` processes serving ``data_dir``'s holder socket."""
    sock = holder_socket_for(data_dir).encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            args = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"holder" in args and b"--socket" in args and sock in args:
            found.append(int(name))
    return found


def stop_holder(data_dir: Path, timeout: float = 10.0) -> bool:
    """SIGTERM the embedded holder of ``data_dir`` (tests, ``make run``).

    Every connection it keeps ends with it: a mount that no session serves
    at that moment becomes ENOTCONN. Returns False when none was running.
    """
    pids = holder_pids(data_dir)
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.05)
    kill_and_wait([p for p in pids if _running(p)])
    return bool(pids)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")
