"""Time csi_driver.archive against GNU tar on a generated volume-like tree.

    .venv/bin/python bench/archive_bench.py [--work DIR] [--runs N] [--small]

The tree is what the snapshot benchmark asks for: about 500 MiB in about 10k
files, mostly small text files plus four 100 MiB incompressible ones
(``--small`` makes it 10x smaller for a quick check). Each measurement is the
median of ``--runs`` runs with a warm page cache; runs of the different cases
are interleaved and preceded by ``sync`` and a pause. create_archive includes its
fsyncs, while the plain ``tar`` baselines do not fsync, which favours tar.
Every extraction goes into a fresh empty directory.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csi_driver.archive import COMPRESSIONS, archive_suffix, create_archive, extract_archive  # noqa: E402


def make_tree(root: Path, dirs: int, files_per_dir: int, blobs: int, blob_mib: int) -> None:
    """Deterministic tree: text files of 1-20 KB in dirN/nested, random blobs at the top."""
    rng = random.Random(42)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(2000)]
    for d in range(dirs):
        sub = root / f"dir{d:03d}" / "nested"
        sub.mkdir(parents=True)
        for f in range(files_per_dir):
            size = rng.randint(1000, 20000)
            text: list[str] = []
            total = 0
            while total < size:
                word = rng.choice(words)
                text.append(word)
                total += len(word) + 1
            (sub / f"file{f:04d}.txt").write_text(" ".join(text))
    for i in range(blobs):
        with open(root / f"blob{i}.bin", "wb") as fh:
            for _ in range(blob_mib):
                fh.write(os.urandom(1 << 20))


def tree_size(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, name)).st_size
    return files, size


def settle(seconds: float) -> None:
    """Flush dirty pages and let deletes (ext4 discard) finish, so one case's
    leftovers do not slow down the next; this disk swings 2-6x otherwise."""
    os.sync()
    time.sleep(seconds)


def fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


Case = tuple[str, Callable[[], object], Callable[[], None]]


def run_cases(cases: list[Case], runs: int, pause: float) -> dict[str, float]:
    """Median seconds per case; cases are interleaved run by run, so slow
    phases of the disk hit every case alike."""
    samples: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    for _ in range(runs):
        for name, action, prepare in cases:
            prepare()
            settle(pause)
            start = time.perf_counter()
            action()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/fusepath-archive-bench"))
    parser.add_argument("--extract-to", type=Path, help="extract here (e.g. a tmpfs) instead of under --work")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--pause", type=float, default=3.0, help="seconds to settle before each run")
    parser.add_argument("--small", action="store_true", help="a 10x smaller tree")
    parser.add_argument("--skip-czf", action="store_true", help="skip the slow tar czf baseline")
    args = parser.parse_args()

    src = args.work / ("src-small" if args.small else "src")
    tmp = args.work / "tmp"
    out = (args.extract_to or args.work) / "out"
    if not src.exists():
        if args.small:
            make_tree(src, 10, 100, 4, 10)
        else:
            make_tree(src, 100, 100, 4, 100)
    tmp.mkdir(parents=True, exist_ok=True)
    files, size = tree_size(src)
    print(f"tree: {files} files, {size / 2**20:.0f} MiB; {os.cpu_count()} CPUs; "
          f"median of {args.runs}, warm cache; extracting into {out.parent}")

    def tar(*argv: str) -> Callable[[], object]:
        return lambda: subprocess.run(["tar", *argv], check=True)

    baseline = args.work / "baseline.tar"
    snaps = {c: args.work / f"snap{archive_suffix(c)}" for c in COMPRESSIONS}

    create: list[Case] = [("tar cf", tar("-cf", str(baseline), "-C", str(src), "."), lambda: remove(baseline))]
    for c, dest in snaps.items():
        create.append((f"create_archive {c}", lambda c=c, d=dest: create_archive(src, d, c, tmp),
                       lambda d=dest: remove(d)))
    results = run_cases(create, args.runs, args.pause)
    if not args.skip_czf:
        czf = args.work / "baseline.tar.gz"
        results |= run_cases([("tar czf (1 run)", tar("-czf", str(czf), "-C", str(src), "."),
                               lambda: remove(czf))], 1, args.pause)
        remove(czf)

    sizes = {"tar cf": baseline.stat().st_size}
    for c, dest in snaps.items():
        sizes[f"create_archive {c}"] = create_archive(src, dest, c, tmp)
    extract: list[Case] = [("tar xf", tar("-xf", str(baseline), "-C", str(out)), lambda: fresh_dir(out))]
    for c, dest in snaps.items():
        extract.append((f"extract_archive {c}", lambda d=dest: extract_archive(d, out),
                        lambda: fresh_dir(out)))
    results |= run_cases(extract, args.runs, args.pause)

    shutil.rmtree(out, ignore_errors=True)
    for path in (baseline, *snaps.values()):
        remove(path)
    for name, sec in results.items():
        extra = f"  archive {sizes[name] / 2**20:6.1f} MiB" if name in sizes else ""
        print(f"{name:24s} {sec:7.2f} s  {size / 2**20 / sec:6.0f} MiB/s{extra}")


if __name__ == "__main__":
    main()
