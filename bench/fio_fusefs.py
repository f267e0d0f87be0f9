"""fio (and a metadata loop) on native disk, a bind mount, fusefs and bindfs.

    python bench/fio_fusefs.py [--runs 3] [--size 1G] [--targets native,bind,fusefs,bindfs]
                               [--workloads seqwrite,seqread,randread,randwrite,meta]
                               [--pin-daemon CPU] [--pin-client CPU] [--base /var/tmp/fusefs-bench]
                               [--fusefs-arg=--writeback-cache ...] [--json out.json]

Needs root (mounts, drop_caches) and fio + bindfs (apt). Each number is the
median of ``--runs`` runs; the table shows fusefs and bindfs as a share of
native. "Cold" sequential reads drop the page cache first
(``echo 3 > /proc/sys/vm/drop_caches``). fusefs is started with the same
``python -m fusefs.session`` command line the daemon uses.

DESIGN §9: which vCPU the FUSE daemon runs on matters more than any option,
so pin (``--pin-daemon``/``--pin-client``) or use several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fusefs.control import SessionClient  # noqa: E402

WORKLOADS = ("seqwrite", "seqread", "randread", "randwrite", "meta")
TARGETS = ("native", "bind", "fusefs", "bindfs")
#: fusefs variants: extra session flags on top of the defaults.
VARIANTS = {
    # The libfuse engine (mfusepy), and its opt-in fast profiles.
    "fusefs": ["--engine=libfuse"],
    "fusefs-noxattr": ["--engine=libfuse", "--no-xattrs"],
    "fusefs-fast": ["--engine=libfuse", "--no-xattrs", "--writeback-cache"],
    # The default engine, which speaks /dev/fuse itself (fusefs/kernel), with passthrough.
    "fusefs-kernel": ["--engine=kernel"],
}
UNITS = {"seqwrite": "MiB/s", "seqread": "MiB/s", "randread": "IOPS", "randwrite": "IOPS",
         "create": "files/s", "stat": "files/s", "unlink": "files/s"}


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def is_mounted(path: Path) -> bool:
    target = str(path.resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class Target:
    """A directory to benchmark in, set up and torn down around the runs."""

    def __init__(self, name: str, base: Path, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.src, self.dir = base / f"{name}-src", base / f"{name}-mnt"
        self.proc: subprocess.Popen[bytes] | None = None

    def pin(self) -> list[str]:
        return ["taskset", "-c", str(self.args.pin_daemon)] if self.args.pin_daemon is not None else []

    def up(self) -> None:
        self.src.mkdir(parents=True, exist_ok=True)
        if self.name == "native":
            self.dir = self.src
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.name == "bind":
            run(["mount", "--bind", str(self.src), str(self.dir)])
        elif self.name == "bindfs":
            # bindfs' fastest safe settings on libfuse3: multithreaded, no xattrs.
            run(self.pin() + ["bindfs", "--multithreaded", "-o", "allow_other,default_permissions",
                              str(self.src), str(self.dir)])
        elif self.name in VARIANTS:
            sock = str(self.src.parent / "fusefs-bench.sock")
            argv = self.pin() + [sys.executable, "-m", "fusefs.session", "--volume-id", "bench",
                                 "--source", str(self.src), "--mountpoint", str(self.dir),
                                 "--control-socket", sock, "--capacity", str(self.args.capacity),
                                 *VARIANTS[self.name], *self.args.fusefs_arg]
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(self.src.parent / "fusefs.log", "ab"),
                                         env=dict(os.environ, PYTHONPATH=str(REPO)))
            client = SessionClient(sock, timeout=2)
            for _ in range(600):
                try:
                    if client.ping()["ready"]:
                        break
                except OSError:
                    time.sleep(0.05)
            else:
                raise RuntimeError("fusefs did not come up")
        for _ in range(100):
            if is_mounted(self.dir):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: not mounted")

    def down(self) -> None:
        if self.name == "native":
            return
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        elif is_mounted(self.dir):
            run(["umount", str(self.dir)])
        if is_mounted(self.dir):
            subprocess.run(["umount", "-l", str(self.dir)], check=False)

    def clean(self) -> None:
        for child in self.dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


# ----------------------------------------------------------------- workloads


def fio(directory: Path, args: argparse.Namespace, **opts: str) -> dict[str, Any]:
    argv = ["fio", "--output-format=json", "--name=job", f"--directory={directory}", "--ioengine=psync",
            "--numjobs=1", "--group_reporting"] + [f"--{k}={v}" for k, v in opts.items()]
    if args.pin_client is not None:
        argv = ["taskset", "-c", str(args.pin_client)] + argv
    out = run(argv).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def w_seqwrite(t: Target, args: argparse.Namespace) -> dict[str, float]:
    job = fio(t.dir, args, rw="write", bs="1M", size=args.size, end_fsync="1", filename="seq")
    t.clean()
    return {"seqwrite": job["write"]["bw_bytes"] / 2**20}


def w_seqread(t: Target, args: argparse.Namespace) -> dict[str, float]:
    fio(t.dir, args, rw="write", bs="1M", size=args.size, end_fsync="1", filename="seq")
    drop_caches()
    job = fio(t.dir, args, rw="read", bs="1M", size=args.size, filename="seq")
    t.clean()
    return {"seqread": job["read"]["bw_bytes"] / 2**20}


def w_randread(t: Target, args: argparse.Namespace) -> dict[str, float]:
    """Random 4K reads of a file that is in the page cache (read once first):
    what a pod sees in steady state. fio's default invalidate=1 would drop the
    FUSE page cache but not the backing file's, which measures nothing real."""
    fio(t.dir, args, rw="write", bs="1M", size=args.rand_size, end_fsync="1", filename="rand")
    fio(t.dir, args, rw="read", bs="1M", size=args.rand_size, filename="rand", invalidate="0")
    job = fio(t.dir, args, rw="randread", bs="4k", size=args.rand_size, runtime=str(args.runtime),
              time_based="1", filename="rand", invalidate="0")
    t.clean()
    return {"randread": job["read"]["iops"]}


def w_randwrite(t: Target, args: argparse.Namespace) -> dict[str, float]:
    fio(t.dir, args, rw="write", bs="1M", size=args.rand_size, end_fsync="1", filename="rand")
    job = fio(t.dir, args, rw="randwrite", bs="4k", size=args.rand_size, runtime=str(args.runtime),
              time_based="1", filename="rand")
    t.clean()
    return {"randwrite": job["write"]["iops"]}


META_SCRIPT = r"""
import os, sys, time, json
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
names = [os.path.join(d, f"f{i:05d}") for i in range(n)]
out = {}
t = time.perf_counter()
for p in names:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
out["create"] = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.stat(p)
out["stat"] = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.unlink(p)
out["unlink"] = n / (time.perf_counter() - t)
os.rmdir(d)
print(json.dumps(out))
"""


def w_meta(t: Target, args: argparse.Namespace) -> dict[str, float]:
    argv = [sys.executable, "-c", META_SCRIPT, str(t.dir / "meta"), str(args.files)]
    if args.pin_client is not None:
        argv = ["taskset", "-c", str(args.pin_client)] + argv
    return json.loads(run(argv).stdout)


RUNNERS: dict[str, Callable[[Target, argparse.Namespace], dict[str, float]]] = {
    "seqwrite": w_seqwrite, "seqread": w_seqread, "randread": w_randread, "randwrite": w_randwrite, "meta": w_meta,
}


# ----------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--size", default="1G", help="sequential file size")
    p.add_argument("--rand-size", default="256M", help="random I/O file size")
    p.add_argument("--runtime", type=int, default=8, help="seconds per random run")
    p.add_argument("--files", type=int, default=10000)
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--pin-daemon", type=int)
    p.add_argument("--pin-client", type=int)
    p.add_argument("--capacity", type=int, default=64 << 30)
    p.add_argument("--fusefs-arg", action="append", default=[], help="extra session flag (repeatable)")
    p.add_argument("--base", default="/var/tmp/fusefs-bench")
    p.add_argument("--json", help="write all raw results here")
    args = p.parse_args(argv)
    base = Path(args.base)
    base.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, list[float]]] = {}
    for name in args.targets.split(","):
        target = Target(name, base, args)
        target.up()
        try:
            for workload in args.workloads.split(","):
                for _ in range(args.runs):
                    for key, value in RUNNERS[workload](target, args).items():
                        results.setdefault(key, {}).setdefault(name, []).append(value)
                        print(f"{name:7s} {key:9s} {value:12.0f} {UNITS[key]}", file=sys.stderr, flush=True)
        finally:
            target.down()
    print_table(results, args.targets.split(","))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def print_table(results: dict[str, dict[str, list[float]]], targets: list[str]) -> None:
    header = f"{'workload':10s} {'unit':8s}" + "".join(f"{t:>12s}" for t in targets)
    if "native" in targets:
        header += "".join(f"{t + '/nat':>12s}" for t in targets if t != "native")
    print(header)
    for key, per in results.items():
        med = {t: statistics.median(per[t]) for t in targets if t in per}
        line = f"{key:10s} {UNITS[key]:8s}" + "".join(f"{med.get(t, float('nan')):12.0f}" for t in targets)
        if "native" in med:
            line += "".join(f"{med[t] / med['native']:12.0%}" for t in targets if t != "native" and t in med)
        print(line)


if __name__ == "__main__":
    sys.exit(main())
