"""The ``fusefs`` command: ``fusefs serve`` (the daemon), ``fusefs holder`` (the
descriptor holder of the kernel engine) and ``fusefs mount`` (standalone).

Every ``serve`` flag, and ``holder --socket``, also reads an environment
variable, ``FUSEFS_<FLAG>`` (``--state-dir`` <- ``FUSEFS_STATE_DIR``,
``--socket`` <- ``FUSEFS_HOLDER_SOCKET``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from fusefs import jsonlog

SERVE_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("endpoint", "unix:///run/fusepath/fusefs.sock", "gRPC endpoint, unix:///absolute/path"),
    ("state-dir", "/var/lib/fusepath/fusefs", "the daemon's state file and session sockets"),
    ("volumes-dir", "/var/lib/fusepath/volumes", "where volume data lives, one <volume-id> directory each"),
    ("kubelet-dir", "/var/lib/kubelet", "staging and publish paths must be under this"),
    ("metrics-address", "", "HOST:PORT for /metrics and /healthz; empty turns it off"),
    ("node-id", "", "node name reported in Kubernetes Events (default: the hostname)"),
    ("engine", "kernel", "kernel (fusefs speaks /dev/fuse itself; sessions are restarted by taking over "
                         "their live connection) or libfuse (mfusepy; a restart is a fresh mount)"),
    ("holder-socket", "", "kernel engine: unix socket of a descriptor holder that outlives this daemon "
                          "(fusefs holder); empty: only the daemon's own copy (a session crash is a "
                          "takeover, a daemon restart a fresh mount)"),
    ("log-format", "json", "json or text"),
    ("log-level", "info", "debug, info, warning or error"),
)

log = logging.getLogger("fusefs.cli")

ENGINES = ("libfuse", "kernel")


def env_name(flag: str) -> str:
    return "FUSEFS_" + flag.upper().replace("-", "_")


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusefs serve", description="Run the fusefs daemon.")
    for flag, default, help_text in SERVE_FLAGS:
        value = os.environ.get(env_name(flag), default)
        parser.add_argument(f"--{flag}", default=value, help=f"{help_text} [env {env_name(flag)}] (default {default!r})")
    return parser


def serve_main(argv: list[str]) -> int:
    from fusefs.daemon import ServeOptions, serve

    args = serve_parser().parse_args(argv)
    if args.log_format not in ("json", "text"):
        print(f"fusefs serve: --log-format must be json or text, not {args.log_format!r}", file=sys.stderr)
        return 2
    if args.engine not in ENGINES:
        print(f"fusefs serve: --engine must be one of {', '.join(ENGINES)}, not {args.engine!r}", file=sys.stderr)
        return 2
    if args.holder_socket and not args.holder_socket.startswith("/"):
        print(f"fusefs serve: --holder-socket must be an absolute path, not {args.holder_socket!r}",
              file=sys.stderr)
        return 2
    jsonlog.configure(args.log_format, args.log_level)
    opts = ServeOptions(
        endpoint=args.endpoint, state_dir=Path(args.state_dir), volumes_dir=Path(args.volumes_dir),
        kubelet_dir=Path(args.kubelet_dir), metrics_address=args.metrics_address, node_id=args.node_id,
        engine=args.engine, holder_socket=args.holder_socket)
    try:
        return serve(opts)
    except (RuntimeError, ValueError, OSError) as exc:
        log.error("fusefs daemon cannot start: %s", exc)
        return 1


def holder_main(argv: list[str]) -> int:
    """Run a descriptor holder (fusefs.kernel.handover) until SIGTERM.

    It keeps the /dev/fuse descriptors of kernel-engine sessions so their
    mounts outlive the daemon and its container; run it where it outlives
    them (its own DaemonSet), and change it rarely: stopping it ends every
    connection no session serves at that moment.
    """
    from fusefs.kernel import handover

    parser = argparse.ArgumentParser(prog="fusefs holder", description=holder_main.__doc__.split("\n\n")[0])
    default = os.environ.get("FUSEFS_HOLDER_SOCKET", "")
    parser.add_argument("--socket", default=default, required=not default,
                        help="the unix socket to serve [env FUSEFS_HOLDER_SOCKET]")
    args = parser.parse_args(argv)
    if not args.socket.startswith("/"):
        print(f"fusefs holder: --socket must be an absolute path, not {args.socket!r}", file=sys.stderr)
        return 2
    Path(args.socket).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return handover.main(["--socket", args.socket])


def mount_main(argv: list[str]) -> int:
    from fusefs.standalone import mount_main as standalone_mount

    return standalone_mount(argv)


USAGE = """usage: fusefs serve [flags]          run the daemon (fusefs serve --help)
       fusefs holder --socket PATH     keep kernel-engine connections across daemon restarts
       fusefs mount SOURCE MOUNTPOINT [--capacity BYTES] [--read-only] [--foreground] [--engine=kernel]
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        return serve_main(rest)
    if command == "mount":
        return mount_main(rest)
    if command == "holder":
        return holder_main(rest)
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main())
