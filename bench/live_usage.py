"""What mirroring the quota's counters (and lookup counts) costs.

Two measurements, each run against two source trees (``--old`` and
``--new``, e.g. a checkout of main and this branch) in interleaved rounds
(alternating which goes first),
medians reported:

- **in process**: ``Quota.charge`` + ``Quota.adjust`` pairs and
  ``take_inode`` + ``give_inode`` pairs per second, with the live usage
  file attached where the tree has one;
- **on a mount**: a kernel-engine session with ``--state-file`` (so the
  new tree mirrors its counters and lookup counts); creates (open
  O_CREAT|O_EXCL + close: a CREATE that charges an inode and a block) and
  4 KiB appends (each charging a new block) per second, and the session's
  CPU time per operation (user + system, which the machine's load disturbs
  less than wall time).

Usage (root, /dev/fuse)::

    python bench/live_usage.py --old /path/to/main --new . [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MICRO = r"""
import json, sys, tempfile, time
from fusefs.quota import Quota
q = Quota(1 << 50)
try:
    from fusefs.live_usage import LiveUsage, new_token
    d = tempfile.mkdtemp()
    q.mirror(LiveUsage.create(d + "/x.live", new_token()))
    mirrored = True
except ImportError:
    mirrored = False
n = 200000
t0 = time.perf_counter()
for _ in range(n):
    q.charge(4096)
    q.adjust(-4096)
t1 = time.perf_counter()
for _ in range(n):
    q.take_inode()
    q.give_inode()
t2 = time.perf_counter()
print(json.dumps({"mirrored": mirrored, "charge_adjust_per_s": n / (t1 - t0), "inode_pairs_per_s": n / (t2 - t1)}))
"""

LOAD = r"""
import json, os, sys, time
mnt, n, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
if what == "creates":
    d = os.path.join(mnt, "c")
    os.mkdir(d)
    for i in range(n):
        os.close(os.open(os.path.join(d, "f%d" % i), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
else:
    fd = os.open(os.path.join(mnt, "log"), os.O_CREAT | os.O_WRONLY | os.O_APPEND, 0o644)
    block = b"x" * 4096
    for i in range(n):
        os.write(fd, block)
    os.close(fd)
print(json.dumps({what + "_per_s": n / (time.perf_counter() - t0)}))
"""


def _cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process (less noisy than wall time on a
    loaded machine)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def micro(tree: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", MICRO], env=dict(os.environ, PYTHONPATH=str(tree)),
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def mount_run(tree: Path, n: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        base = Path(tmp)
        (base / "src").mkdir()
        (base / "mnt").mkdir()
        sock = str(base / "c.sock")
        argv = [sys.executable, "-m", "fusefs.session", "--engine=kernel", "--volume-id", "bench-live",
                "--source", str(base / "src"), "--mountpoint", str(base / "mnt"), "--control-socket", sock,
                "--capacity", str(1 << 34), "--state-file", str(base / "state.json")]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not os.path.ismount(base / "mnt") or not os.path.exists(sock):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the session did not come up")
                time.sleep(0.05)
            time.sleep(0.2)
            result: dict[str, float] = {}
            for what in ("creates", "appends"):
                cpu = _cpu_seconds(proc.pid)
                out = subprocess.run([sys.executable, "-c", LOAD, str(base / "mnt"), str(n), what], env=env,
                                     check=True, capture_output=True, text=True)
                result.update(json.loads(out.stdout))
                result[f"session_cpu_us_per_{what[:-1]}"] = (_cpu_seconds(proc.pid) - cpu) / n * 1e6
            return result
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            subprocess.run(["umount", "-l", str(base / "mnt")], check=False, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--new", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--files", type=int, default=2000)
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    for r in range(args.rounds):
        pairs = [("old", args.old), ("new", args.new)]
        for name, tree in pairs if r % 2 == 0 else pairs[::-1]:  # ABBA: no order bias
            for key, value in {**micro(tree), **mount_run(tree, args.files)}.items():
                if isinstance(value, float):
                    results[name].setdefault(key, []).append(value)
    summary = {}
    for key in results["old"]:
        old, new = statistics.median(results["old"][key]), statistics.median(results["new"][key])
        summary[key] = {"old": round(old), "new": round(new), "new/old": round(new / old, 3)}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
