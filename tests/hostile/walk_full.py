"""Full-size walk check (issue 8 item 7), for a person to run; CI runs the
bounded variants in test_walk_deep_trees.py.

    sudo .venv/bin/python -m tests.hostile.walk_full [--levels 100000] [--entries 1000000] [--dir /var/tmp]

Makes a tree LEVELS deep (mkdirat relative to the last fd, as a pod would)
and a directory with ENTRIES names, then copies, measures and removes each
with csi_driver.fdtree, printing seconds, peak RSS and open fds, and fails if
a copy is not identical in shape.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

from csi_driver import fdtree
from tests.hostile.walk_helpers import deep_depth, make_deep, make_wide


def _timed(label: str, fn):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = fn()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    fds = len(os.listdir("/proc/self/fd"))
    print(f"{label:<28} {time.monotonic() - started:8.1f} s   peak RSS {rss} MiB   open fds {fds}", flush=True)
    return result


def _check(base: str, kind: str, make, expect) -> None:  # type: ignore[no-untyped-def]
    src, dst = os.path.join(base, f"{kind}-src"), os.path.join(base, f"{kind}-dst")
    os.mkdir(src)
    os.mkdir(dst)
    _timed(f"{kind}: make", lambda: make(src))
    sfd, dfd, bfd = (os.open(p, fdtree.DIR_FLAGS) for p in (src, dst, base))
    try:
        usage = _timed(f"{kind}: measure", lambda: fdtree.measure(sfd))
        report = _timed(f"{kind}: copy", lambda: fdtree.copy_tree(sfd, dfd, fdtree.Budget()))
        copied = _timed(f"{kind}: measure copy", lambda: fdtree.measure(dfd))
        assert (copied.inodes, copied.bytes) == (usage.inodes, usage.bytes), (usage, copied)
        expect(dst)
        print(f"{kind}: {usage.inodes} inodes, depth {report.max_depth}")
        _timed(f"{kind}: remove both", lambda: (fdtree.remove_tree_at(bfd, f"{kind}-src"),
                                               fdtree.remove_tree_at(bfd, f"{kind}-dst")))
    finally:
        for fd in (sfd, dfd, bfd):
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, default=100_000)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="fusepath-walk-", dir=args.dir)
    try:
        def deep_ok(dst: str) -> None:
            assert deep_depth(dst) == args.levels

        def wide_ok(dst: str) -> None:
            with os.scandir(dst) as it:
                assert sum(1 for _ in it) == args.entries

        _check(base, "deep", lambda p: make_deep(p, args.levels, every=1000), deep_ok)
        _check(base, "wide", lambda p: make_wide(p, args.entries), wide_ok)
    finally:
        parent = os.open(os.path.dirname(base), fdtree.DIR_FLAGS)
        fdtree.remove_tree_at(parent, os.path.basename(base))
        os.close(parent)


if __name__ == "__main__":
    main()
