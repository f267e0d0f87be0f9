"""``fusefs mount SOURCE MOUNTPOINT``: serve one directory without the daemon.

For debugging and benchmarks (DESIGN §2). It runs exactly the session a
CSI volume gets (``python -m fusefs.session``), so what you measure here is
what pods get:

- ``--foreground`` runs the session in this process until it is unmounted
  or receives SIGTERM/SIGINT.
- Otherwise the session is started in the background (its own process
  group, stdio detached, logs to ``--log-file``); the command returns once
  the mount is live, and prints where the control socket is. Stop it with
  ``umount MOUNTPOINT`` (or ``fusermount3 -u``) or by sending it SIGTERM.

The control socket answers the same commands as the daemon's sessions (see
:mod:`fusefs.control`), e.g. to watch the counters of a benchmark::

    python -c 'from fusefs.control import SessionClient as C; print(C("SOCK").stats())'
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from fusefs.control import SessionClient

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
READY_TIMEOUT = 60.0


def parse_size(text: str) -> int:
    """``1073741824``, ``1Gi``, ``500M``: a byte count."""
    match = re.fullmatch(r"\s*(\d+)\s*([kmgt]i?)?b?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(match.group(1)) * _SUFFIXES[match.group(2) or ""]


def default_volume_id(source: str) -> str:
    """A stable, valid ID derived from the source path."""
    real = os.path.realpath(source)
    name = re.sub(r"[^A-Za-z0-9._-]", "-", os.path.basename(real) or "root")[:40]
    return f"standalone-{name}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or ("/run" if os.geteuid() == 0 else "/tmp")
    path = Path(base) / "fusefs"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusefs mount", description="Serve SOURCE at MOUNTPOINT through fusefs.")
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("--capacity", type=parse_size, default=0, help="quota, e.g. 10Gi (default: none)")
    p.add_argument("--read-only", action="store_true")
    p.add_argument("--foreground", "-f", action="store_true", help="stay attached until unmounted")
    p.add_argument("--volume-id", help="ID shown as fusepath:<ID> in mountinfo (default: from SOURCE)")
    p.add_argument("--control-socket", help="default: <runtime dir>/fusefs/<volume-id>.sock")
    p.add_argument("--log-file", help="background mode only; default: next to the control socket")
    p.add_argument("--io-bytes-per-second", type=parse_size, default=0)
    p.add_argument("--io-ops-per-second", type=int, default=0)
    p.add_argument("--writeback-cache", action="store_true",
                   help="kernel write-back caching (faster small writes; ENOSPC and freeze act at write-back)")
    p.add_argument("--engine", choices=("libfuse", "kernel"), default="kernel",
                   help="kernel (fusefs speaks /dev/fuse itself; the default) or libfuse (mfusepy)")
    return p


def session_argv(args: argparse.Namespace, volume_id: str, control_socket: str) -> list[str]:
    argv = ["--volume-id", volume_id, "--source", args.source, "--mountpoint", args.mountpoint,
            "--control-socket", control_socket]
    if args.capacity:
        argv += ["--capacity", str(args.capacity)]
    if args.read_only:
        argv.append("--read-only")
    if args.io_bytes_per_second:
        argv += ["--io-bytes-per-second", str(args.io_bytes_per_second)]
    if args.io_ops_per_second:
        argv += ["--io-ops-per-second", str(args.io_ops_per_second)]
    if args.writeback_cache:
        argv.append("--writeback-cache")
    argv.append(f"--engine={args.engine}")
    return argv


def mount_main(argv: list[str]) -> int:
    """Entry point of ``fusefs mount``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    for what in ("source", "mountpoint"):
        if not os.path.isdir(getattr(args, what)):
            print(f"fusefs mount: {what} {getattr(args, what)!r} is not a directory", file=sys.stderr)
            return 2
    volume_id = args.volume_id or default_volume_id(args.source)
    control_socket = args.control_socket or str(runtime_dir() / f"{volume_id}.sock")
    sargv = session_argv(args, volume_id, control_socket)
    if args.foreground:
        from fusefs import session

        return session.main(sargv)
    return _background(sargv, control_socket, args.log_file or str(Path(control_socket).with_suffix(".log")),
                       args.source, args.mountpoint)


def _background(sargv: list[str], control_socket: str, log_file: str, source: str, mountpoint: str) -> int:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    with open(log_file, "ab") as log:
        proc = subprocess.Popen(  # noqa: S603 - an argument list, no shell
            [sys.executable, "-m", "fusefs.session", *sargv],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            start_new_session=True, close_fds=True, env=env)
    client = SessionClient(control_socket, timeout=2.0)
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"fusefs mount: the session exited with code {proc.returncode}; log: {log_file}", file=sys.stderr)
            _print_tail(log_file)
            return 1
        try:
            if client.ping().get("ready"):
                print(f"fusefs: {source} mounted on {mountpoint} (pid {proc.pid}, control {control_socket}, "
                      f"log {log_file})", file=sys.stderr)
                return 0
        except OSError:
            pass
        time.sleep(0.05)
    proc.terminate()
    print(f"fusefs mount: not ready after {READY_TIMEOUT:.0f}s; log: {log_file}", file=sys.stderr)
    return 1


def _print_tail(path: str, lines: int = 10) -> None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f.readlines()[-lines:]:
                print(line.rstrip(), file=sys.stderr)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(mount_main(sys.argv[1:]))
