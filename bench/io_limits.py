"""How closely fusefs holds its I/O limits: measured rate against the limit.

    python bench/io_limits.py [--seconds 3] [--runs 3] [--base /var/tmp/fusepath-bench-limits] [--json out.json]

Needs root (FUSE mounts). For each case a volume is mounted with
``fusefs mount`` (the same session a CSI volume gets), written (or read with
O_DIRECT, so every read reaches the daemon) back to back for ``--seconds``,
and the rate seen from the writer's side is compared with the limit. The goal
is within 20% over 3 s; an unlimited volume should run well past every
limit. The tests (tests/fusefs/test_limits.py) check only what cannot depend
on the machine's speed: that a limit is never exceeded.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import common  # noqa: E402

MiB = 1 << 20

#: (name, bytes/s limit, ops/s limit, operation, chunk size)
CASES = (
    ("write 1 MiB at 20 MiB/s", 20 * MiB, 0, "write", MiB),
    ("read 1 MiB at 20 MiB/s", 20 * MiB, 0, "read", MiB),
    ("write 4 KiB at 300 ops/s", 0, 300, "write", 4096),
    ("write 1 MiB unlimited", 0, 0, "write", MiB),
)


def mount(source: Path, mountpoint: Path, control: Path, bytes_per_second: int, ops_per_second: int) -> None:
    argv = [sys.executable, "-m", "fusefs.standalone", str(source), str(mountpoint),
            "--control-socket", str(control), "--log-file", str(control.with_suffix(".log"))]
    if bytes_per_second:
        argv += ["--io-bytes-per-second", str(bytes_per_second)]
    if ops_per_second:
        argv += ["--io-ops-per-second", str(ops_per_second)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run(argv, check=True, env=env, cwd=REPO, timeout=120)


def rate(path: Path, op: str, chunk: int, seconds: float) -> tuple[float, float]:
    """(bytes/s, operations/s) of back-to-back ``op`` calls of ``chunk`` bytes for ``seconds``."""
    if op == "write":
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    else:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    buf.write(b"x" * chunk)
    span = 8 * MiB if op == "write" else os.fstat(fd).st_size
    try:
        done, start = 0, time.monotonic()
        while time.monotonic() - start < seconds:
            offset = done * chunk % span
            if op == "write":
                os.pwrite(fd, buf, offset)
            else:
                os.preadv(fd, [buf], offset)
            done += 1
        elapsed = time.monotonic() - start
    finally:
        os.close(fd)
    return done * chunk / elapsed, done / elapsed


def run_case(base: Path, case: tuple, seconds: float) -> dict:
    name, bps, ops, op, chunk = case
    work = base / uuid.uuid4().hex[:8]
    source, mountpoint = work / "src", work / "mnt"
    source.mkdir(parents=True)
    mountpoint.mkdir()
    if op == "read":
        (source / "f").write_bytes(b"r" * (16 * MiB))
    mount(source, mountpoint, work / "ctl.sock", bps, ops)
    try:
        got_bytes, got_ops = rate(mountpoint / "f", op, chunk, seconds)
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, timeout=60)
        if os.path.ismount(mountpoint):
            print(f"left mounted: {mountpoint} (umount it, then remove {work})", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)  # our own scratch directory, never through a mount
    limit, got = (bps, got_bytes) if bps else (ops, got_ops)
    return {"case": name, "limit": limit, "measured": round(got, 1),
            "ratio": round(got / limit, 3) if limit else None, "mib_per_s": round(got_bytes / MiB, 1)}


def main(argv: list[str] | None = None) -> int:
    p = common.runs_parser(__doc__, Path("/var/tmp/fusepath-bench-limits"))
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    args.base.mkdir(parents=True, exist_ok=True)
    results = []
    for case in CASES:
        runs = [run_case(args.base, case, args.seconds) for _ in range(args.runs)]
        ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
        row = {"case": case[0], "runs": runs,
               "median_ratio": statistics.median(ratios) if ratios else None,
               "median_mib_per_s": statistics.median(r["mib_per_s"] for r in runs)}
        row["within_20_percent"] = (all(0.8 <= r <= 1.2 for r in ratios) if ratios else None)
        results.append(row)
        shown = f"ratio {row['median_ratio']:.2f}" if ratios else f"{row['median_mib_per_s']:.0f} MiB/s"
        print(f"{case[0]:<28} {shown}  within 20%: {row['within_20_percent']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
