"""FUSE session child processes: starting, readiness, stopping, and leftovers.

Each volume is served by its own ``python -m fusefs.session`` process, so a
crash in one volume's filesystem code takes down that volume alone. Sessions
run with ``--die-with-parent`` (PR_SET_PDEATHSIG): when the daemon dies, they
die too, instead of lingering as orphans that a restarted daemon would race.

PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the
process. A session forked from a short-lived thread (a recovery worker, a
gRPC worker that the pool retires) would be killed for no reason. So every
session is forked by one ``Spawner`` thread that lives as long as the daemon.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusefs import mountinfo

log = logging.getLogger("fusefs.supervisor")

#: The package root, put on a session's PYTHONPATH so ``-m fusefs.session``
#: works from a source checkout as well as from an installed package.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
#: sun_path is 108 bytes; leave room for the terminating NUL and some slack.
MAX_SOCKET_PATH = 100
#: Lines of a session's stderr kept for error messages.
TAIL_LINES = 20


class SessionError(Exception):
    """A session could not be started, or died before its mount was live."""


@dataclass(frozen=True)
class SessionSpec:
    """What a session is started with; derived from a volume record."""

    volume_id: str
    source: str
    mountpoint: str
    control_socket: str
    capacity_bytes: int = 0
    read_only: bool = False
    bytes_per_second: int = 0
    ops_per_second: int = 0
    #: ``libfuse`` or ``kernel``; the rest is for the kernel engine only.
    engine: str = "kernel"
    state_file: str = ""
    holder_sockets: tuple[str, ...] = ()
    #: Resume the live connection a holder keeps (no mount, no INIT).
    takeover: bool = False
    #: Where open files that lose their last name survive a takeover ("": nowhere).
    orphan_dir: str = ""

    def argv(self) -> list[str]:
        """The session's command line (an argument list, never a shell string)."""
        argv = [
            sys.executable, "-m", "fusefs.session",
            "--volume-id", self.volume_id,
            "--source", self.source,
            "--mountpoint", self.mountpoint,
            "--control-socket", self.control_socket,
            "--die-with-parent",
        ]
        if self.capacity_bytes:
            argv += ["--capacity", str(self.capacity_bytes)]
        if self.read_only:
            argv.append("--read-only")
        if self.bytes_per_second:
            argv += ["--io-bytes-per-second", str(self.bytes_per_second)]
        if self.ops_per_second:
            argv += ["--io-ops-per-second", str(self.ops_per_second)]
        if self.engine == "kernel":
            argv += ["--engine", "kernel", "--state-file", self.state_file]
            for holder in self.holder_sockets:
                argv += ["--holder-socket", holder]
            if self.takeover:
                argv.append("--takeover")
            if self.orphan_dir:
                argv += ["--orphan-dir", self.orphan_dir]
        else:
            argv += ["--engine", "libfuse"]  # always explicit: the session's default is kernel
        return argv


def launcher() -> list[str]:
    """``setpriv --pdeathsig KILL --`` when util-linux has it, else nothing.

    The session sets PR_SET_PDEATHSIG itself, but only once Python has
    started and parsed its arguments, a few hundred milliseconds after the
    fork; a daemon killed in that window would leave an orphan serving the
    mount. setpriv sets it right after the fork and it survives the exec,
    shrinking the window to about a millisecond. (A leftover is still killed
    by the next daemon at start, see ``find_stale_sessions``.)
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def socket_dir_for(state_dir: Path) -> Path:
    """Where session control sockets live: ``<state-dir>/sessions``, or a short
    directory under /run when that path would overflow sun_path."""
    preferred = state_dir / "sessions"
    if len(str(preferred)) + len("/vol-") + 32 + len(".sock") <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:16]
    base = Path("/run") if os.access("/run", os.W_OK) else Path("/tmp")
    return base / f"fusefs-{digest}"


def prepare_socket_dir(path: Path) -> None:
    """Create the socket directory 0700 and refuse one that is not ours."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid():
        raise SessionError(f"{path} is not a directory owned by us")
    os.chmod(path, 0o700)


#: Deadline for read-only control calls (stats, metrics, ping): a hung
#: session must not stall a scrape or a Stats RPC for long.
QUICK_TIMEOUT = 3.0
#: How long a session gets to act on SIGTERM (release parked requests,
#: unmount, persist its usage) before SIGKILL. A healthy session needs well
#: under a second; one that takes longer is stuck, and waiting for it only
#: holds up the Unmount (whoever unmounts detaches what it leaves).
STOP_GRACE = 3.0
#: /proc/<pid>/stat states of a process that runs no code until SIGCONT
#: (SIGSTOP, SIGTSTP, or a tracer): it never acts on SIGTERM.
STOPPED_STATES = ("T", "t")


def session_client(socket_path: str, timeout: float | None = None) -> Any:
    """A control client for one session (imported late: the session module
    pulls in the FUSE binding, which the daemon itself does not need)."""
    from fusefs.control import SessionClient

    return SessionClient(socket_path) if timeout is None else SessionClient(socket_path, timeout=timeout)


class Spawner:
    """Forks every session from one long-lived thread (see module docstring)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[list[str], dict[str, Any], concurrent.futures.Future[subprocess.Popen[bytes]]]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="fusefs-spawner", daemon=True)
        self._thread.start()

    def spawn(self, argv: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
        future: concurrent.futures.Future[subprocess.Popen[bytes]] = concurrent.futures.Future()
        self._queue.put((argv, popen_kwargs, future))
        return future.result()

    def _run(self) -> None:
        while True:
            argv, kwargs, future = self._queue.get()
            try:
                future.set_result(subprocess.Popen(argv, **kwargs))  # noqa: S603 - argument list
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)


class SessionProcess:
    """One running session: its process, its stderr tail and its control client."""

    def __init__(self, spec: SessionSpec, proc: subprocess.Popen[bytes],
                 on_exit: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.proc = proc
        #: Called once the process has exited (from the stderr thread), so a
        #: watcher need not wait for its next poll to notice a death.
        self.on_exit = on_exit
        self.started_at = time.time()
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.stopping = False
        threading.Thread(target=self._forward_stderr, name=f"log-{spec.volume_id[:12]}", daemon=True).start()

    @classmethod
    def start(cls, spawner: Spawner, spec: SessionSpec, on_exit: Callable[[], None] | None = None) -> SessionProcess:
        """Fork the session; it is not ready until ``wait_ready`` says so."""
        try:
            os.unlink(spec.control_socket)
        except FileNotFoundError:
            pass
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p)
        proc = spawner.spawn(
            launcher() + spec.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, env=env, close_fds=True,
        )
        log.info("started FUSE session", extra={"fields": {"volume_id": spec.volume_id, "pid": proc.pid}})
        return cls(spec, proc, on_exit)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exit_code(self) -> int | None:
        return self.proc.poll()

    def describe_exit(self) -> str:
        """``exit code 1`` or ``signal SIGKILL``, for health messages."""
        code = self.proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"signal {signal.Signals(-code).name}"
            except ValueError:
                return f"signal {-code}"
        return f"exit code {code}"

    def client(self, timeout: float | None = None) -> Any:
        """A control client; ``timeout`` None keeps the client's own default."""
        return session_client(self.spec.control_socket, timeout)

    def wait_ready(self, timeout: float) -> None:
        """Block until the session answers ping and mountinfo shows its mount.

        The session answers ping only once its mount is live; mountinfo is
        checked as well so a wrong mount can never be taken for ready.
        Neither looks at the mount by path: a session taking over a
        connection must be serving before anything there can answer.
        """
        deadline = time.monotonic() + timeout
        last_error = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.05)  # let the stderr forwarder catch the last lines
                raise SessionError(f"FUSE session exited ({self.describe_exit()}) before mounting: {self.tail_text()}")
            if os.path.exists(self.spec.control_socket):
                try:
                    self.client(QUICK_TIMEOUT).ping()
                    if mountinfo.is_volume_mount(mountinfo.top_mount(self.spec.mountpoint), self.spec.volume_id):
                        return
                    last_error = "mount not in mountinfo yet"
                except Exception as exc:  # noqa: BLE001 - retried until the deadline
                    last_error = str(exc)
            time.sleep(0.02)
        raise SessionError(f"FUSE session did not become ready within {timeout:.0f}s ({last_error}): {self.tail_text()}")

    def is_stopped(self) -> bool:
        """True while the process is stopped (state T: SIGSTOP, or t: a tracer).

        A stopped session answers neither its mount nor its control socket
        and leaves a SIGTERM pending, so callers fail fast (or SIGKILL it)
        instead of waiting out a timeout.
        """
        return self.proc.poll() is None and process_state(self.pid) in STOPPED_STATES

    def stop(self, timeout: float = STOP_GRACE) -> None:
        """SIGTERM (the session unmounts and exits), then SIGKILL after ``timeout``.

        A stopped process would keep the SIGTERM pending for as long as it
        stays stopped, so one that is stopped, or becomes so during the
        wait, is SIGKILLed at once: waiting could only ever end in the kill.
        """
        self.stopping = True
        if self.proc.poll() is not None:
            return
        if self.is_stopped():
            log.warning("FUSE session is stopped (SIGSTOP); killing it", extra={"fields": {
                "volume_id": self.spec.volume_id, "pid": self.pid}})
            self.kill()
            return
        self.proc.terminate()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.proc.wait(min(0.05, max(0.0, deadline - time.monotonic())))
                return
            except subprocess.TimeoutExpired:
                pass
            if self.is_stopped() or time.monotonic() >= deadline:
                break
        log.warning("FUSE session did not exit on SIGTERM; killing it", extra={"fields": {
            "volume_id": self.spec.volume_id, "pid": self.pid, "stopped": self.is_stopped()}})
        self.kill()

    def kill(self) -> None:
        """SIGKILL and reap."""
        self.stopping = True
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail_text(self) -> str:
        return " | ".join(self.tail)[-2000:] or "(no output)"

    def _forward_stderr(self) -> None:
        """Copy the session's JSON log lines to our stderr, keeping a tail."""
        assert self.proc.stderr is not None
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line[:500])
            try:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        if self.on_exit is not None:
            # stderr closes as the process exits, a moment before it can be
            # reaped; poll (never wait: that would hold Popen's lock) briefly.
            for _ in range(200):
                if self.proc.poll() is not None:
                    break
                time.sleep(0.005)
            self.on_exit()


def find_stale_sessions(socket_dir: Path, control_socket: str = "") -> list[int]:
    """PIDs of session processes that use a control socket in ``socket_dir``
    (only ``control_socket``, when given).

    After the daemon is SIGKILLed, its sessions are dying (die-with-parent)
    but may not be gone yet; one that is still tearing down could unmount the
    path a new session just mounted. So a restarted daemon finds and kills
    them first. Matching the control socket directory keeps this to our own.
    """
    prefix = str(socket_dir) + "/"
    found: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            args = Path(f"/proc/{name}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "fusefs.session" not in args:
            continue
        for i, arg in enumerate(args[:-1]):
            if arg == "--control-socket" and args[i + 1].startswith(prefix) \
                    and args[i + 1] == (control_socket or args[i + 1]):
                found.append(int(name))
    return found


def process_state(pid: int) -> str:
    """The state letter of ``pid`` in /proc/<pid>/stat (R, S, D, T, Z...), "" when absent.

    The command name before it is in parentheses and may hold anything, so
    the state is the first field after the last ``)``.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rpartition(")")[2].split()
    return fields[0] if fields else ""


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (absent, or a zombie nobody reaped yet)."""
    return process_state(pid) in ("", "Z", "X")


def kill_and_wait(pids: list[int], timeout: float = 5.0) -> None:
    """SIGKILL every PID and wait until each has stopped running."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.01)
