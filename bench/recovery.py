"""How long a node's volumes stay unreadable when the fusefs daemon is SIGKILLed.

    python bench/recovery.py [--volumes 1] [--runs 3] [--base /var/tmp/fusepath-bench-recovery] [--json out.json]

Needs root (FUSE mounts). A ``fusefs serve`` daemon mounts and publishes
``--volumes`` volumes; it is killed with SIGKILL (its sessions die with it),
a new daemon is started with the same command line (what the fusefs
container's restart does), and the time until every staging path and publish
target reads back is measured: from the new daemon's start, so it includes
Python start-up. The goal is under 5 s for one volume. The test
(tests/fusefs/test_daemon.py) only checks that recovery happens, within a
generous bound.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import common  # noqa: E402

from fusefs.client import FuseFSClient  # noqa: E402

TIMEOUT = 120.0


def start_daemon(root: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "fusefs.cli", "serve", "--endpoint", f"unix://{root / 'd' / 'fusefs.sock'}",
            "--state-dir", str(root / "d" / "fusefs"), "--volumes-dir", str(root / "d" / "volumes"),
            "--kubelet-dir", str(root / "k")]
    (root / "d").mkdir(parents=True, exist_ok=True)
    (root / "k").mkdir(parents=True, exist_ok=True)
    with open(root / "daemon.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.monotonic() + TIMEOUT
    with FuseFSClient(f"unix://{root / 'd' / 'fusefs.sock'}") as client:
        while not client.ping(timeout=1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start; see {root / 'daemon.log'}")
            time.sleep(0.02)
    return proc


def readable(paths: list[Path]) -> bool:
    try:
        return all((p / "file.txt").read_text() == "hello\n" for p in paths)
    except OSError:
        return False


def one_run(base: Path, volumes: int) -> float:
    root = base / uuid.uuid4().hex[:8]
    paths: list[Path] = []
    daemon = start_daemon(root)
    with FuseFSClient(f"unix://{root / 'd' / 'fusefs.sock'}") as client:
        for _ in range(volumes):
            vid = f"vol-{uuid.uuid4().hex}"
            (root / "d" / "volumes" / vid).mkdir(parents=True)
            (root / "d" / "volumes" / vid / "file.txt").write_text("hello\n")
            stage = root / "k" / "plugins" / vid / "globalmount"
            target = root / "k" / "pods" / vid / "volumes" / "mount"
            target.parent.mkdir(parents=True)
            client.mount(vid, str(stage), 1 << 20)
            client.publish(vid, str(target), False)
            paths += [stage, target]
    daemon.kill()
    daemon.wait()
    started = time.monotonic()
    daemon = start_daemon(root)
    try:
        while not readable(paths):
            if time.monotonic() - started > TIMEOUT:
                raise RuntimeError(f"not recovered in {TIMEOUT:.0f}s; see {root / 'daemon.log'}")
            time.sleep(0.01)
        return time.monotonic() - started
    finally:
        daemon.send_signal(signal.SIGTERM)  # stops the sessions, which unmount; publish binds stay (by design)
        daemon.wait(60)
        for path in reversed(paths):
            subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = common.runs_parser(__doc__, Path("/var/tmp/fusepath-bench-recovery"))
    p.add_argument("--volumes", type=int, default=1)
    args = p.parse_args(argv)
    seconds = [one_run(args.base, args.volumes) for _ in range(args.runs)]
    median = statistics.median(seconds)
    print(f"recovery of {args.volumes} volume(s) after SIGKILL of the daemon: median {median:.2f}s "
          f"(runs: {', '.join(f'{s:.2f}' for s in seconds)}); goal under 5 s: {median < 5}")
    if args.json:
        args.json.write_text(json.dumps({"volumes": args.volumes, "seconds": seconds, "median": median}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
