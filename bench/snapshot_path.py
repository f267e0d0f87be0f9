"""Snapshot-path benchmark: cut and restore a realistic volume, and time the freeze.

    .venv/bin/python bench/snapshot_path.py [--quick]

The volume holds about 500 MiB in about 10k files: 10,000 small text files
(1-20 KB, compressible) and four 100 MiB incompressible files, generated
deterministically straight into the volume's directory. It is then staged
and published through the driver with the default mounter (fusefs), as a
pod would use it, and:

* ``tar cf`` and ``tar czf`` of the same tree on the same disk set the
  baseline (GNU tar does not fsync; the driver's archive is fsynced before
  the snapshot is ready, so the comparison favours tar), and ``tar xf``
  followed by ``sync`` is the baseline for restore;
* CreateSnapshot is timed for each VolumeSnapshotClass ``compression``
  (none, gzip, zstd), and CreateVolume from each snapshot (restore);
* the freeze window: while CreateSnapshot runs, a writer thread appends
  4 KiB records to a file in the published volume, each followed by fsync so
  it reaches the FUSE daemon, and records its longest stall. That stall is
  compared with the window the driver reports (the
  ``fusepath_freeze_window_seconds`` histogram and its "thawed ... after a N s
  freeze window" log line) and with the duration of the cut.

Every figure is over a warm page cache (the tree was just written), after a
``sync`` so earlier writeback does not bill the next step.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common import (MiB, BenchDriver, Mounted, Options, Section, Target, create_volume, human_mib, ratio,
                    rpc_error_text, running_driver, stage_and_publish, standalone, unique,
                    unpublish_and_unstage)
from csi_driver.gen import csi_pb2
from tests.harness import mount_cap

COMPRESSIONS = ("none", "gzip", "zstd")


@dataclass(frozen=True)
class TreeShape:
    """How the generated tree looks; --quick makes a tiny one."""

    dirs: int = 100
    files_per_dir: int = 100
    blobs: int = 4
    blob_mib: int = 100
    runs_none: int = 3
    freeze_runs: int = 3

    @property
    def capacity(self) -> int:
        return 2 * (self.blobs * self.blob_mib * MiB + self.dirs * self.files_per_dir * 20_000) + 64 * MiB


QUICK_SHAPE = TreeShape(dirs=4, files_per_dir=50, blobs=2, blob_mib=2, runs_none=1, freeze_runs=1)


def make_tree(root: Path, shape: TreeShape) -> tuple[int, int]:
    """Write the tree; returns (files, bytes). Text comes from a 4 MiB word corpus, sliced."""
    rng = random.Random(42)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(5000)]
    corpus = " ".join(rng.choice(words) for _ in range(700_000)).encode()
    files = size = 0
    for d in range(shape.dirs):
        sub = root / f"dir{d:03d}" / "nested"
        sub.mkdir(parents=True)
        for f in range(shape.files_per_dir):
            n = rng.randint(1000, 20000)
            start = rng.randrange(0, len(corpus) - n)
            (sub / f"file{f:04d}.txt").write_bytes(corpus[start:start + n])
            files += 1
            size += n
    for i in range(shape.blobs):
        with open(root / f"blob{i}.bin", "wb") as fh:
            for _ in range(shape.blob_mib):
                fh.write(os.urandom(MiB))
        files += 1
        size += shape.blob_mib * MiB
    return files, size


def timed_tar(flags: str, src: Path, dest: Path) -> tuple[float, int]:
    """One ``tar`` run from a synced state; returns (seconds, archive bytes)."""
    dest.unlink(missing_ok=True)
    os.sync()
    started = time.perf_counter()
    subprocess.run(["tar", flags, str(dest), "-C", str(src), "."], check=True, capture_output=True)
    seconds = time.perf_counter() - started
    size = dest.stat().st_size
    dest.unlink()
    return seconds, size


def create_snapshot(driver: BenchDriver, volume_id: str, compression: str) -> tuple[float, csi_pb2.Snapshot]:
    params = {"compression": compression}
    os.sync()
    started = time.perf_counter()
    snap = driver.controller.CreateSnapshot(csi_pb2.CreateSnapshotRequest(
        source_volume_id=volume_id, name=unique("snap"), parameters=params)).snapshot
    return time.perf_counter() - started, snap


def restore(driver: BenchDriver, snapshot_id: str, capacity: int) -> float:
    """CreateVolume from the snapshot (timed), then DeleteVolume (not timed)."""
    req = csi_pb2.CreateVolumeRequest(name=unique("restore"), volume_capabilities=[mount_cap()])
    req.capacity_range.required_bytes = capacity
    req.volume_content_source.snapshot.snapshot_id = snapshot_id
    os.sync()
    started = time.perf_counter()
    vol = driver.controller.CreateVolume(req).volume
    seconds = time.perf_counter() - started
    driver.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    return seconds


def delete_snapshot(driver: BenchDriver, snapshot_id: str) -> None:
    driver.controller.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snapshot_id))


# -- the freeze window ------------------------------------------------------------------


class Writer(threading.Thread):
    """Appends 4 KiB + fsync to a file in the published volume and timestamps each completion."""

    def __init__(self, path: Path, pause: float = 0.002) -> None:
        super().__init__(name="freeze-writer", daemon=True)
        self.path, self.pause = path, pause
        self.done: list[float] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        record = b"w" * 4096
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                while not self.stop.is_set():
                    os.write(fd, record)
                    os.fsync(fd)
                    self.done.append(time.perf_counter())
                    time.sleep(self.pause)
            finally:
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc

    def longest_stall(self, start: float, end: float) -> float:
        """The longest time between two completed writes, over gaps that overlap [start, end]."""
        gaps = [b - a - self.pause for a, b in zip(self.done, self.done[1:]) if b >= start and a <= end]
        return max(gaps, default=float("nan"))


def freeze_histogram(driver: BenchDriver) -> tuple[float, int]:
    """(sum, count) of ``fusepath_freeze_window_seconds`` from the driver's /metrics."""
    total, count = 0.0, 0
    for line in driver.metrics_text().splitlines():
        if line.startswith("fusepath_freeze_window_seconds_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith("fusepath_freeze_window_seconds_count"):
            count = int(float(line.rsplit(" ", 1)[1]))
    return total, count


THAW_RE = re.compile(r"after a ([0-9.]+) ?s freeze window")
CUT_RE = re.compile(r'"msg": "snapshot cut".*?"seconds": ([0-9.]+)')


def last_log_figure(driver: BenchDriver, pattern: re.Pattern[str]) -> float | None:
    """The last number a log line of the driver matched (the harness logs to <root>/driver.log)."""
    found = pattern.findall(driver.log_path.read_text(errors="replace"))
    return float(found[-1]) if found else None


def measure_freeze(driver: BenchDriver, mounted: Mounted, runs: int) -> dict[str, Any]:
    """Writer stalls against the driver's freeze window and the cut, ``runs`` times (compression none)."""
    samples = []
    for i in range(runs):
        writer = Writer(mounted.target / f"writer-{i}.log")
        writer.start()
        time.sleep(1.0)
        baseline_end = time.perf_counter()
        hist0 = freeze_histogram(driver)
        t0 = time.perf_counter()
        seconds, snap = create_snapshot(driver, mounted.volume_id, "none")
        t1 = time.perf_counter()
        time.sleep(0.5)
        writer.stop.set()
        writer.join(timeout=30)
        if writer.error is not None:
            raise RuntimeError(f"the writer in the published volume failed: {writer.error}")
        hist1 = freeze_histogram(driver)
        window = (hist1[0] - hist0[0]) / (hist1[1] - hist0[1]) if hist1[1] > hist0[1] else None
        samples.append({
            "create_snapshot_s": round(seconds, 4),
            "archive_s_from_log": last_log_figure(driver, CUT_RE),
            "freeze_window_s_metric": None if window is None else round(window, 4),
            "freeze_window_s_log": last_log_figure(driver, THAW_RE),
            "writer_longest_stall_s": round(writer.longest_stall(t0, t1), 4),
            "writer_baseline_longest_stall_s": round(writer.longest_stall(0.0, baseline_end - 0.05), 4),
            "writes": len(writer.done),
        })
        delete_snapshot(driver, snap.snapshot_id)
    return {"runs": samples, **_freeze_medians(samples)}


def _freeze_medians(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [s[key] for s in samples if s[key] is not None]
        return round(statistics.median(values), 4) if values else None

    return {k: med(k) for k in ("create_snapshot_s", "archive_s_from_log", "freeze_window_s_metric",
                                "freeze_window_s_log", "writer_longest_stall_s", "writer_baseline_longest_stall_s")}


# -- the run --------------------------------------------------------------------------------


def measure_snapshots(driver: BenchDriver, volume_id: str, tree_bytes: int, shape: TreeShape) -> dict[str, Any]:
    """CreateSnapshot and restore for each compression; none is the median of ``runs_none``."""
    out: dict[str, Any] = {}
    for compression in COMPRESSIONS:
        runs = shape.runs_none if compression == "none" else 1
        cuts, snap = [], None
        for i in range(runs):
            if snap is not None:
                delete_snapshot(driver, snap.snapshot_id)
            seconds, snap = create_snapshot(driver, volume_id, compression)
            cuts.append(seconds)
        assert snap is not None
        restore_s = restore(driver, snap.snapshot_id, shape.capacity)
        cut = statistics.median(cuts)
        out[compression] = {
            "create_snapshot_s": round(cut, 3), "create_runs_s": [round(c, 3) for c in cuts],
            "create_mib_per_s": round(tree_bytes / MiB / cut, 1),
            "archive_mib": human_mib(snap.size_bytes), "archive_ratio": round(snap.size_bytes / tree_bytes, 3),
            "restore_s": round(restore_s, 3), "restore_mib_per_s": round(tree_bytes / MiB / restore_s, 1),
        }
        delete_snapshot(driver, snap.snapshot_id)
    return out


def timed_untar(src: Path, work: Path) -> float:
    """``tar xf`` of a plain tar of ``src`` into a fresh directory, plus ``sync``.

    The restore baseline: CreateVolume from a snapshot also flushes what it
    extracted (syncfs) before it answers, so the sync is part of the time.
    """
    archive, dest = work / "untar-baseline.tar", work / "untar-baseline"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(src), "."], check=True, capture_output=True)
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    os.sync()
    started = time.perf_counter()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(dest)], check=True, capture_output=True)
    os.sync()
    seconds = time.perf_counter() - started
    archive.unlink()
    shutil.rmtree(dest)
    return seconds


def measure_tar(src: Path, work: Path, shape: TreeShape, tree_bytes: int) -> dict[str, Any]:
    dest = work / "baseline.tar"
    cf = [timed_tar("-cf", src, dest) for _ in range(max(1, shape.runs_none - 1))]
    czf = timed_tar("-czf", src, dest.with_suffix(".tgz"))
    cf_s = statistics.median(s for s, _ in cf)
    xf_s = timed_untar(src, work)
    return {
        "tar_xf_and_sync": {"seconds": round(xf_s, 3), "mib_per_s": round(tree_bytes / MiB / xf_s, 1),
                            "archive_mib": 0.0, "runs_s": [round(xf_s, 3)]},
        "tar_cf": {"seconds": round(cf_s, 3), "mib_per_s": round(tree_bytes / MiB / cf_s, 1),
                   "archive_mib": human_mib(cf[0][1]), "runs_s": [round(s, 3) for s, _ in cf]},
        "tar_czf": {"seconds": round(czf[0], 3), "mib_per_s": round(tree_bytes / MiB / czf[0], 1),
                    "archive_mib": human_mib(czf[1]), "runs_s": [round(czf[0], 3)]},
    }


def run(opts: Options) -> dict[str, Any]:
    shape = QUICK_SHAPE if opts.quick else TreeShape()
    section = Section("snapshot_path", opts.quick)
    with running_driver(opts.work / "snapshot-path") as driver:
        volume_id = create_volume(driver, shape.capacity)
        files, size = make_tree(driver.volume_dir(volume_id), shape)
        os.sync()
        section.config = {"files": files, "tree_mib": human_mib(size), "shape": shape.__dict__,
                          "disk": "tar output, archives and volumes all under the same --work directory"}
        section.results["baselines"] = measure_tar(driver.volume_dir(volume_id), opts.work, shape, size)
        mounted = _stage(driver, volume_id, section)
        section.results["snapshot"] = measure_snapshots(driver, volume_id, size, shape)
        if mounted is not None:
            section.results["freeze"] = measure_freeze(driver, mounted, shape.freeze_runs)
            unpublish_and_unstage(driver, mounted)
    add_targets(section)
    return section.as_dict()


def _stage(driver: BenchDriver, volume_id: str, section: Section) -> Mounted | None:
    """Stage and publish through fusefs; when that fails, the freeze part is skipped with the reason."""
    try:
        mounted = stage_and_publish(driver, volume_id, "fusefs")
        section.config["staged"] = "fusefs (default mounter), published at a kubelet-like target path"
        return mounted
    except grpc.RpcError as exc:
        reason = rpc_error_text(exc)
        section.config["staged"] = "no"
        section.notes.append(f"fusefs staging failed, so the freeze window was not measured and the snapshots "
                             f"were cut of an unstaged volume: {reason}")
        return None


def add_targets(section: Section) -> None:
    r = section.results
    czf = r["baselines"]["tar_czf"]["seconds"]
    none = r["snapshot"]["none"]["create_snapshot_s"]
    section.targets.append(Target(
        "snap_vs_tar_czf", "CreateSnapshot (default, none) speed-up over tar czf", ratio(czf, none), ">=", 10.0, "x",
        detail=f"tar czf {czf:.2f} s vs CreateSnapshot {none:.2f} s"))
    freeze = r.get("freeze")
    if freeze is None:
        section.targets.append(Target("freeze_vs_cut", "longest writer stall / CreateSnapshot duration", None,
                                      "<=", 1.0, "ratio", note="not measured: fusefs staging failed"))
        return
    stall, cut = freeze["writer_longest_stall_s"], freeze["create_snapshot_s"]
    window = freeze["freeze_window_s_metric"]
    section.targets.append(Target(
        "freeze_vs_cut", "longest writer stall / CreateSnapshot duration (freeze no longer than the cut)",
        ratio(stall, cut), "<=", 1.0, "ratio",
        detail=f"stall {stall} s, driver's freeze window {window} s, CreateSnapshot {cut} s"))
    section.targets.append(Target(
        "freeze_window_reported", "driver-reported freeze window / CreateSnapshot duration", ratio(window, cut),
        "<=", 1.0, "ratio", detail=f"window {window} s (metric), {freeze['freeze_window_s_log']} s (log)"))


if __name__ == "__main__":
    standalone(__doc__.splitlines()[0], run)
