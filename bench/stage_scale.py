"""How fast a big volume stages, and what hostile patterns cost a session.

Run as root on a quiet machine::

    python bench/stage_scale.py stage --files 10000000 [--base /var/tmp]
    python bench/stage_scale.py links --count 4000
    python bench/stage_scale.py xattrs --count 30000

``stage`` fills a backing directory with empty files (directly, as a restore
would), then starts a session on it three ways and prints the seconds until
the mount answers and until its usage is known: with no persisted usage (a
first mount or a crash: background scan), and after a clean unmount (the
persisted usage is trusted). ``links`` times making COUNT hard links of one
file through the mount and 1,000 one-byte writes to it afterwards; ``xattrs``
prints the session's RSS growth after COUNT distinct xattr names were set and
removed. ``--repo`` runs another checkout's fusefs (for before/after figures).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class Session:
    """A fusefs session process on ``source``, like the daemon starts one."""

    def __init__(self, repo: Path, base: Path, source: Path, capacity: int) -> None:
        self.repo, self.base, self.source, self.capacity = repo, base, source, capacity
        self.mnt = base / "mnt"
        self.mnt.mkdir(exist_ok=True)
        self.sock = str(base / "vol.sock")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start; returns seconds until the control socket says ready."""
        sys.path.insert(0, str(self.repo))
        from fusefs.control import SessionClient

        argv = [sys.executable, "-m", "fusefs.session", "--volume-id", "bench", "--source", str(self.source),
                "--mountpoint", str(self.mnt), "--control-socket", self.sock, "--capacity", str(self.capacity)]
        t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(self.repo)), cwd=str(self.repo),
                                     stdout=subprocess.DEVNULL, stderr=open(self.base / "log", "ab"))
        self.client = SessionClient(self.sock, timeout=600)
        while True:
            assert self.proc.poll() is None, (self.base / "log").read_text()[-2000:]
            try:
                if self.client.ping()["ready"]:
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.01)

    def wait_usage(self) -> dict:
        while True:
            st = self.client.stats()
            if st.get("scan", {}).get("state", "done") in ("done", "trusted"):
                return st
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(60)
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, check=False)
            self.proc = None


def _populate(source: Path, files: int, per_dir: int = 10000) -> None:
    for i in range(0, files, per_dir):
        d = source / f"d{i // per_dir}"
        d.mkdir()
        dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for j in range(min(per_dir, files - i)):
                os.close(os.open(str(j), os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd))
        finally:
            os.close(dfd)


def stage(args: argparse.Namespace, base: Path) -> None:
    source = base / "src"
    source.mkdir()
    t0 = time.monotonic()
    _populate(source, args.files)
    print(f"made {args.files} files in {time.monotonic() - t0:.1f}s")
    s = Session(args.repo, base, source, 1 << 50)
    for label, sig in (("no persisted usage", None), ("after a clean unmount", signal.SIGTERM),
                       ("after a crash", signal.SIGKILL)):
        if sig is not None:
            s.stop(sig)
        t0 = time.monotonic()
        ready = s.start()
        st = s.wait_usage()
        print(f"{label}: mount answers after {ready:.2f}s, usage known after {time.monotonic() - t0:.2f}s "
              f"({st['used_inodes']} inodes, {st['used_bytes']} bytes)")
    s.stop()


def _one_file(args: argparse.Namespace, base: Path) -> tuple[Session, Path]:
    """A started session on an empty 1 GiB volume holding one file ``f``."""
    source = base / "src"
    source.mkdir()
    s = Session(args.repo, base, source, 1 << 30)
    s.start()
    f = s.mnt / "f"
    f.write_bytes(b"x")
    return s, f


def links(args: argparse.Namespace, base: Path) -> None:
    s, f = _one_file(args, base)
    t0 = time.monotonic()
    for i in range(args.count):
        os.link(f, s.mnt / f"l{i:05d}")
    made = time.monotonic() - t0
    t0 = time.monotonic()
    with open(f, "r+b", buffering=0) as fh:
        for _ in range(1000):
            fh.write(b"y")
    writes = time.monotonic() - t0
    print(f"{args.count} links: {made:.2f}s; then 1,000 writes: {1000 / writes:.0f}/s")
    s.stop()


def xattrs(args: argparse.Namespace, base: Path) -> None:
    s, f = _one_file(args, base)

    def rss() -> int:
        for line in Path(f"/proc/{s.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
        return 0
    name = "user." + "n" * 240
    for i in range(2000):
        os.setxattr(f, f"{name}{i:08d}", b"v")
        os.removexattr(f, f"{name}{i:08d}")
    before = rss()
    t0 = time.monotonic()
    for i in range(10**6, 10**6 + args.count):
        os.setxattr(f, f"{name}{i:08d}", b"v")
        os.removexattr(f, f"{name}{i:08d}")
    print(f"{args.count} distinct xattr names in {time.monotonic() - t0:.1f}s: "
          f"RSS grew {(rss() - before) / (1 << 20):.1f} MiB")
    s.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["stage", "links", "xattrs"])
    p.add_argument("--files", type=int, default=10_000_000)
    p.add_argument("--count", type=int, default=4000)
    p.add_argument("--base", default="/var/tmp")
    p.add_argument("--repo", type=Path, default=REPO, help="checkout whose fusefs to run")
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="stage-scale-", dir=args.base))
    try:
        {"stage": stage, "links": links, "xattrs": xattrs}[args.what](args, base)
    finally:
        subprocess.run(["umount", "-l", str(base / "mnt")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
