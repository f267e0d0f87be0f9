"""Control-plane benchmark: how fast the driver provisions and snapshots.

    .venv/bin/python bench/control_plane.py [--quick]

Measures, against one real driver process over its unix socket:

* CreateVolume+DeleteVolume pairs per second with p50/p99 latency,
  sequentially (one client, one call at a time, as a single csi-provisioner
  worker) and with 16 concurrent clients (16 threads, each its own gRPC
  channel);
* the same for CreateSnapshot+DeleteSnapshot (of an empty volume, so the
  figure is the control-plane cost, not the archive's);
* both with 0 and with 5,000 pre-existing volumes, and the sequential latency
  at 0, 1k, 2k and 5k volumes (plotted).

The pre-existing volumes are real: created through CreateVolume (16 clients
at once, to keep the run short), with their rows in the driver's SQLite
database and their directories on disk. The driver runs with production
settings (info-level logs, metrics on); CreateVolume mounts nothing, so the
default StorageClass parameters are used.

With py-spy installed, the driver process is also profiled under the
sequential create/delete loop and the section records where its time goes.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from common import (MiB, BenchDriver, Options, Section, Target, latency_summary, ratio, rss_mib, running_driver,
                    sampling, standalone, top_functions, unique)
from csi_driver.gen import csi_pb2, csi_pb2_grpc
from tests.harness import mount_cap

VOLUME_BYTES = MiB  # small promises: 5,000 volumes must fit what the disk has free (5 GiB)
CLIENTS = 16


@dataclass
class Plan:
    """How many operations each measurement makes; --quick shrinks everything."""

    levels: tuple[int, ...] = (0, 1000, 2000, 5000)
    seq_pairs: int = 600
    conc_pairs_per_client: int = 40
    seq_snap_pairs: int = 300
    conc_snap_pairs_per_client: int = 20
    warmup: int = 30
    profile_seconds: float = 8.0
    conc_runs: int = 3

    @classmethod
    def quick(cls) -> "Plan":
        return cls(levels=(0, 20, 40, 100), seq_pairs=20, conc_pairs_per_client=2, seq_snap_pairs=10,
                   conc_snap_pairs_per_client=1, warmup=3, profile_seconds=0.0, conc_runs=1)


@dataclass
class PairTimes:
    """Latencies of the two halves of each pair, and the wall time of the whole batch."""

    create: list[float] = field(default_factory=list)
    delete: list[float] = field(default_factory=list)
    pair: list[float] = field(default_factory=list)
    wall: float = 0.0

    def add(self, create_s: float, delete_s: float) -> None:
        self.create.append(create_s)
        self.delete.append(delete_s)
        self.pair.append(create_s + delete_s)

    def merge(self, other: "PairTimes") -> None:
        self.create += other.create
        self.delete += other.delete
        self.pair += other.pair

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": len(self.pair),
            "pairs_per_s": round(len(self.pair) / self.wall, 1) if self.wall else None,
            "pair": latency_summary(self.pair),
            "create": latency_summary(self.create),
            "delete": latency_summary(self.delete),
        }


def controller(driver: BenchDriver) -> tuple[grpc.Channel, csi_pb2_grpc.ControllerStub]:
    """A client of its own: a separate channel, as a separate sidecar would have."""
    channel = grpc.insecure_channel(driver.endpoint)
    return channel, csi_pb2_grpc.ControllerStub(channel)


def volume_request(name: str) -> csi_pb2.CreateVolumeRequest:
    req = csi_pb2.CreateVolumeRequest(name=name, volume_capabilities=[mount_cap()])
    req.capacity_range.required_bytes = VOLUME_BYTES
    return req


def volume_pair(stub: csi_pb2_grpc.ControllerStub, times: PairTimes) -> None:
    """One CreateVolume then DeleteVolume of the same new volume."""
    t0 = time.perf_counter()
    vol = stub.CreateVolume(volume_request(unique("bench"))).volume
    t1 = time.perf_counter()
    stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vol.volume_id))
    times.add(t1 - t0, time.perf_counter() - t1)


def snapshot_pair(stub: csi_pb2_grpc.ControllerStub, source_id: str, times: PairTimes) -> None:
    """One CreateSnapshot then DeleteSnapshot of the same source volume."""
    t0 = time.perf_counter()
    snap = stub.CreateSnapshot(csi_pb2.CreateSnapshotRequest(source_volume_id=source_id, name=unique("snap"))).snapshot
    t1 = time.perf_counter()
    stub.DeleteSnapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=snap.snapshot_id))
    times.add(t1 - t0, time.perf_counter() - t1)


def sequential(driver: BenchDriver, count: int, op: Callable[[csi_pb2_grpc.ControllerStub, PairTimes], None]) -> PairTimes:
    channel, stub = controller(driver)
    times = PairTimes()
    try:
        started = time.perf_counter()
        for _ in range(count):
            op(stub, times)
        times.wall = time.perf_counter() - started
    finally:
        channel.close()
    return times


def concurrent(driver: BenchDriver, per_client: int,
               make_op: Callable[[int], Callable[[csi_pb2_grpc.ControllerStub, PairTimes], None]]) -> PairTimes:
    """``CLIENTS`` threads, each with its own channel, start together and run ``per_client`` pairs."""
    results = [PairTimes() for _ in range(CLIENTS)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(CLIENTS + 1)

    def client(i: int) -> None:
        channel, stub = controller(driver)
        op = make_op(i)
        try:
            stub.ControllerGetCapabilities(csi_pb2.ControllerGetCapabilitiesRequest())  # connect before the clock
            barrier.wait()
            for _ in range(per_client):
                op(stub, results[i])
        except BaseException as exc:  # noqa: BLE001 - reported after the join
            errors.append(exc)
            barrier.abort()
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    total = PairTimes(wall=time.perf_counter() - started)
    for r in results:
        total.merge(r)
    return total


def populate(driver: BenchDriver, count: int) -> float:
    """Add ``count`` real volumes (16 clients at once); returns the seconds it took."""
    per_client, extra = divmod(count, CLIENTS)
    errors: list[BaseException] = []

    def client(n: int) -> None:
        channel, stub = controller(driver)
        try:
            for _ in range(n):
                stub.CreateVolume(volume_request(unique("existing")))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            channel.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(per_client + (i < extra),)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def count_volumes(driver: BenchDriver) -> tuple[int, int]:
    """(rows in ListVolumes, directories in volumes/): proof the population is real."""
    rows, token = 0, ""
    while True:
        resp = driver.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=1000, starting_token=token))
        rows += len(resp.entries)
        token = resp.next_token
        if not token:
            break
    dirs = sum(1 for _ in (driver.data_dir / "volumes").iterdir())
    return rows, dirs


def snapshot_sources(driver: BenchDriver, count: int) -> list[str]:
    """Source volumes for the snapshot pairs: one per client, each holding one small file."""
    ids = []
    for _ in range(count):
        vol_id = driver.create_volume(unique("snapsrc"), size=VOLUME_BYTES).volume_id
        (driver.volume_dir(vol_id) / "data.txt").write_text("control-plane benchmark\n" * 40)
        ids.append(vol_id)
    return ids


# -- profiling -------------------------------------------------------------------------


def profile_driver(driver: BenchDriver, seconds: float, out: Path) -> dict[str, Any]:
    """Sample the driver with py-spy while one client runs the sequential create/delete loop.

    py-spy runs in non-blocking mode (it does not stop the process to sample),
    so the profiled loop runs at close to its normal speed; its rate is
    recorded beside the profile so the two can be compared.
    """
    times = PairTimes()
    with sampling(driver.pid, seconds, out.with_suffix(".txt")) as prof:
        if "skipped" in prof:
            return prof
        stop = time.monotonic() + seconds - 1.0
        channel, stub = controller(driver)
        started = time.perf_counter()
        try:
            while time.monotonic() < stop:
                volume_pair(stub, times)
        finally:
            channel.close()
        times.wall = time.perf_counter() - started
    if "skipped" in prof:
        return prof
    summary = summarize_profile(prof["stacks"])
    summary["loop_pairs_per_s"] = round(len(times.pair) / times.wall, 1)
    summary["raw_profile"] = prof["raw_profile"]
    return summary


HANDLER = "intercept_service.<locals>.wrapped"
CATEGORIES = (  # (label, frame-name suffixes); the innermost matching frame decides
    ("directory fsync (layout.fsync_dir)", (":fsync_dir",)),
    ("SQLite BEGIN/COMMIT (WAL fsync, synchronous=FULL)", (":Store.transaction",)),
    ("other SQLite statements", ("state/store.py:Store._one", "state/store.py:Store._all_rows",
                                 "state/store.py:Store.insert_volume", "state/store.py:Store.delete_volume_row",
                                 "state/store.py:Store.set_volume_state", "state/store.py:Store._conn")),
    ("rmtree of the discarded directory", ("shutil.py:rmtree", "shutil.py:_rmtree_safe_fd")),
    ("rename/mkdir/chmod", ("pathlib.py:Path.mkdir", ":publish_dir", ":discard")),
    ("statvfs (capacity check)", (":DriverContext.max_committed",)),
    ("logging", ("logging/__init__.py:", "csi_driver/logs.py:")),
    ("metrics", ("csi_driver/metrics.py:",)),
)


def summarize_profile(stacks: list[tuple[list[str], int]]) -> dict[str, Any]:
    """Where the driver's sampled time goes.

    Samples inside an RPC handler (below the interceptor) are broken down by
    category; the rest is gRPC's own polling and dispatch threads. py-spy
    sees only Python frames, so time in a C call (an fsync, a COMMIT) shows
    as the Python function that made it.
    """
    cat_counts: collections.Counter[str] = collections.Counter()
    handler = 0
    for frames, n in stacks:
        if any(f.endswith(HANDLER) for f in frames):
            handler += n
            cat_counts[_category(frames)] += n
    summary = top_functions(stacks)
    if not handler:
        return summary
    return {
        **summary,
        "in_rpc_handlers_percent": round(100 * handler / summary["samples"], 1),
        "outside_handlers": "gRPC server polling/dispatch threads and the executor hand-off",
        "handler_breakdown": [{"category": k, "percent_of_handler_time": round(100 * v / handler, 1)}
                              for k, v in cat_counts.most_common()],
    }


def _category(frames: list[str]) -> str:
    for frame in reversed(frames):
        for label, suffixes in CATEGORIES:
            if any(frame.endswith(s) or s in frame for s in suffixes):
                return label
    return "other driver Python (validation, messages, locks)"


# -- the run -----------------------------------------------------------------------------


def server_seconds(driver: BenchDriver) -> dict[str, tuple[float, int]]:
    """(sum, count) of the driver's own RPC latency histogram per method, code OK."""
    out: dict[str, tuple[float, int]] = {}
    sums: dict[str, float] = {}
    for line in driver.metrics_text().splitlines():
        for suffix in ("_sum", "_count"):
            head = f"fusepath_rpc_duration_seconds{suffix}{{"
            if line.startswith(head) and 'code="OK"' in line:
                method = line.split('method="', 1)[1].split('"', 1)[0]
                value = float(line.rsplit(" ", 1)[1])
                if suffix == "_sum":
                    sums[method] = value
                else:
                    out[method] = (sums.get(method, 0.0), int(value))
    return out


def server_mean_ms(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]],
                   methods: tuple[str, ...]) -> dict[str, float]:
    """Mean time inside the driver's handlers (the interceptor's clock) between two scrapes."""
    out = {}
    for m in methods:
        s0, c0 = before.get(m, (0.0, 0))
        s1, c1 = after.get(m, (0.0, 0))
        if c1 > c0:
            out[f"{m}_ms"] = round(1000 * (s1 - s0) / (c1 - c0), 3)
    return out


def rpc_floor(driver: BenchDriver, count: int) -> dict[str, Any]:
    """Round trip of a trivial RPC: what gRPC in Python costs before the driver does any work."""
    channel, stub = controller(driver)
    req = csi_pb2.ControllerGetCapabilitiesRequest()
    samples = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            stub.ControllerGetCapabilities(req)
            samples.append(time.perf_counter() - t0)
    finally:
        channel.close()
    summary = latency_summary(samples[count // 10:])  # the first calls warm the channel
    summary["max_pairs_per_s_if_handlers_were_free"] = round(1000 / (2 * summary["p50_ms"]), 1)
    return summary


def settle() -> None:
    """Let writeback from the previous step finish so it does not bill the next one."""
    os.sync()
    time.sleep(0.5)



def measure_level(driver: BenchDriver, plan: Plan, sources: list[str], full: bool) -> dict[str, Any]:
    """Sequential pairs (and, when ``full``, the 16-client runs) at the current volume count."""
    out: dict[str, Any] = {}
    settle()
    before = server_seconds(driver)
    out["volume_sequential"] = sequential(driver, plan.seq_pairs, volume_pair).summary()
    out["volume_sequential"]["server_side"] = server_mean_ms(before, server_seconds(driver),
                                                             ("CreateVolume", "DeleteVolume"))
    out["snapshot_sequential"] = sequential(
        driver, plan.seq_snap_pairs, lambda stub, t: snapshot_pair(stub, sources[0], t)).summary()
    if full:
        out["volume_concurrent"] = concurrent_median(driver, plan)
        out["snapshot_concurrent"] = concurrent(
            driver, plan.conc_snap_pairs_per_client,
            lambda i: (lambda stub, t: snapshot_pair(stub, sources[i], t))).summary()
    return out


def concurrent_median(driver: BenchDriver, plan: Plan) -> dict[str, Any]:
    """The 16-client create+delete run, ``plan.conc_runs`` times: the run with the median p99, and all of them.

    One run's p99 is its 7th-worst pair of 640, so a single run on a shared
    machine says little about the tail; the ratio p99/p50 is judged on the
    medians of the runs.
    """
    runs = []
    for _ in range(plan.conc_runs):
        settle()
        runs.append(concurrent(driver, plan.conc_pairs_per_client, lambda i: volume_pair).summary())
    runs.sort(key=lambda s: s["pair"]["p99_ms"])
    out = dict(runs[len(runs) // 2])
    p50s = sorted(s["pair"]["p50_ms"] for s in runs)
    p99s = sorted(s["pair"]["p99_ms"] for s in runs)
    out["runs"] = [{"p50_ms": s["pair"]["p50_ms"], "p99_ms": s["pair"]["p99_ms"], "pairs_per_s": s["pairs_per_s"]}
                   for s in runs]
    out["median_p50_ms"], out["median_p99_ms"] = p50s[len(p50s) // 2], p99s[len(p99s) // 2]
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return out


def run(opts: Options) -> dict[str, Any]:
    plan = Plan.quick() if opts.quick else Plan()
    section = Section("control_plane", opts.quick)
    section.config = {
        "levels": list(plan.levels), "sequential_pairs": plan.seq_pairs, "clients": CLIENTS,
        "concurrent_pairs_per_client": plan.conc_pairs_per_client, "sequential_snapshot_pairs": plan.seq_snap_pairs,
        "concurrent_snapshot_pairs_per_client": plan.conc_snap_pairs_per_client, "volume_bytes": VOLUME_BYTES,
        "driver_flags": "--log-level=info --metrics-address=127.0.0.1:<port> (harness defaults otherwise)",
        "snapshot_source": "an unstaged volume holding one 1 KiB file (compression none)",
    }
    levels: dict[str, Any] = {}
    with running_driver(opts.work / "control-plane") as driver:
        sources = snapshot_sources(driver, CLIENTS)
        sequential(driver, plan.warmup, volume_pair)
        section.results["rpc_floor"] = rpc_floor(driver, plan.warmup * 20)
        existing = 0
        for level in plan.levels:
            fill = populate(driver, level - existing) if level > existing else 0.0
            existing = level
            rows, dirs = count_volumes(driver)
            full = level in (plan.levels[0], plan.levels[-1])
            result = measure_level(driver, plan, sources, full)
            result.update({"existing_volumes": level, "populate_seconds": round(fill, 1),
                           "list_volumes_rows": rows, "volume_dirs_on_disk": dirs,
                           "driver_rss_mib": round(rss_mib(driver.pid), 1)})
            levels[str(level)] = result
            if plan.profile_seconds and full:
                result["profile"] = profile_driver(driver, plan.profile_seconds,
                                                   opts.out / f"profile-control-plane-{level}")
    section.results["levels"] = levels
    add_targets(section, levels, plan)
    return section.as_dict()


def add_targets(section: Section, levels: dict[str, Any], plan: Plan) -> None:
    empty = levels[str(plan.levels[0])]["volume_sequential"]["pairs_per_s"]
    full = levels[str(plan.levels[-1])]["volume_sequential"]["pairs_per_s"]
    section.targets.append(Target(
        "cp_seq_empty", "CreateVolume+DeleteVolume pairs/s, sequential, empty node", empty, ">=", 500.0, "pairs/s",
        detail=f"ratio to target {ratio(empty, 500.0):.2f}"))
    r = ratio(full, empty)
    section.targets.append(Target(
        "cp_seq_5k_vs_empty", f"pairs/s at {plan.levels[-1]} volumes / empty (within 20%)", r, ">=", 0.8, "ratio",
        detail=f"{full} vs {empty} pairs/s"))
    for level in (plan.levels[0], plan.levels[-1]):
        conc = levels[str(level)]["volume_concurrent"]
        tail = ratio(conc["median_p99_ms"], conc["median_p50_ms"])
        section.targets.append(Target(
            f"cp_conc_tail_{level}", f"16 clients, {level} volumes: create+delete p99 / p50 (medians of runs)",
            tail, "<=", 3.0, "ratio",
            detail=f"p50 {conc['median_p50_ms']} ms, p99 {conc['median_p99_ms']} ms, load {conc['load_average']}"))


if __name__ == "__main__":
    standalone(__doc__.splitlines()[0], run)
