"""Bounded stat() and statfs() of a path that may be a FUSE mount.

A FUSE mount whose session is stopped, or whose workers are all busy,
never answers: ``os.stat`` on it blocks its thread for as long as the
session stays stuck, and a signal cannot help a thread blocked in the
kernel. So neither the driver nor the daemon ever stats a mount point in a
thread that serves an RPC. They ask :func:`stat_within` instead:

* the stat runs in a helper thread and the caller waits at most
  ``timeout`` seconds for it;
* there is at most one helper per path: a caller that finds a probe of the
  same path already running shares it, and when that probe has already
  overrun its deadline the caller is told "hung" at once. So a stuck mount
  parks one helper thread, however often it is asked about, and the number
  of parked threads is bounded by the number of mounts, not of requests;
* when the stuck stat finally returns (the session is continued or killed),
  the helper ends and the next call probes afresh.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field

#: A local FUSE stat takes microseconds; this much silence means "stuck".
DEFAULT_TIMEOUT = 0.5

OK, ERROR, HUNG = "ok", "error", "hung"


@dataclass
class _Probe:
    path: str
    deadline: float
    done: threading.Event = field(default_factory=threading.Event)
    error: int = 0
    message: str = ""


@dataclass(frozen=True)
class ProbeResult:
    """``state`` is OK, ERROR (``errno`` says which) or HUNG."""

    state: str
    errno: int = 0
    message: str = ""


_lock = threading.Lock()
_inflight: dict[str, _Probe] = {}


def stat_within(path: str, timeout: float = DEFAULT_TIMEOUT) -> ProbeResult:
    """stat(``path``) without ever blocking the caller more than ``timeout`` seconds."""
    path = str(path)
    with _lock:
        probe = _inflight.get(path)
        if probe is None:
            probe = _Probe(path, time.monotonic() + timeout)
            _inflight[path] = probe
            threading.Thread(target=_run, args=(probe,), name="stat-probe", daemon=True).start()
    remaining = probe.deadline - time.monotonic()
    if not probe.done.wait(max(0.0, min(remaining, timeout))):
        return ProbeResult(HUNG, 0, f"{path}: did not answer stat()/statfs() within {timeout:g}s")
    if probe.error:
        return ProbeResult(ERROR, probe.error, probe.message)
    return ProbeResult(OK)


def outstanding() -> int:
    """Probes still running (each one a thread blocked on some mount)."""
    with _lock:
        return len(_inflight)


def _run(probe: _Probe) -> None:
    try:
        os.stat(probe.path)
        # stat alone can be answered from the attribute cache of a mount whose
        # server is gone; statfs always reaches the server.
        os.statvfs(probe.path)
    except OSError as exc:
        probe.error = exc.errno or errno.EIO
        name = errno.errorcode.get(probe.error, str(probe.error))
        probe.message = f"{probe.path}: {name} ({exc.strerror})"
    finally:
        with _lock:
            if _inflight.get(probe.path) is probe:
                del _inflight[probe.path]
        probe.done.set()
