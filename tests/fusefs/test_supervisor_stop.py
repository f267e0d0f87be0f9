"""``SessionProcess.stop``: graceful first, but never waiting on a process that cannot act.

Real child processes stand in for a session (the stop logic only signals
and reaps): one that exits on SIGTERM, one that ignores it, one that is
SIGSTOPped (a stopped process keeps SIGTERM pending until SIGCONT, so
waiting for it could only end in the SIGKILL), and one that is stopped
while the stop waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from fusefs.supervisor import SessionProcess, SessionSpec, process_state

#: Prints "ready" once its SIGTERM disposition is set, then waits.
CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def start(mode: str) -> SessionProcess:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    spec = SessionSpec(volume_id="vol-test", source="/nonexistent", mountpoint="/nonexistent",
                       control_socket="/nonexistent.sock")
    return SessionProcess(spec, proc)


def stopped(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 10
    while process_state(pid) != "T":
        assert time.monotonic() < deadline, "the child never showed state T"
        time.sleep(0.01)


def timed_stop(session: SessionProcess, timeout: float) -> float:
    start_at = time.monotonic()
    session.stop(timeout)
    return time.monotonic() - start_at


def test_a_session_that_handles_sigterm_exits_by_it():
    session = start("exit")
    timed_stop(session, 30.0)
    assert session.proc.returncode == 0  # its own exit, not SIGKILL


def test_a_session_that_ignores_sigterm_is_killed_after_the_grace():
    session = start("ignore")
    seconds = timed_stop(session, 0.5)
    assert session.proc.returncode == -signal.SIGKILL
    assert seconds >= 0.5


def test_a_stopped_session_is_killed_without_waiting_out_the_grace():
    session = start("exit")
    stopped(session.pid)
    assert session.is_stopped()
    seconds = timed_stop(session, 60.0)
    assert session.proc.returncode == -signal.SIGKILL
    assert seconds < 30.0  # the grace was 60 s: it was not waited for
    assert not session.is_stopped()


def test_a_session_stopped_during_the_grace_is_killed_then():
    session = start("ignore")
    timer = threading.Timer(0.3, os.kill, (session.pid, signal.SIGSTOP))
    timer.start()
    try:
        seconds = timed_stop(session, 60.0)
    finally:
        timer.join()
    assert session.proc.returncode == -signal.SIGKILL
    assert seconds < 30.0


def test_process_state_of_a_missing_process_is_empty():
    proc = subprocess.Popen(["true"])
    proc.wait()
    assert process_state(proc.pid) == ""
    assert process_state(os.getpid()) in ("R", "S")
