"""Footprint benchmark: start-up time, memory and CPU cost of the driver and of fusefs.

    .venv/bin/python bench/footprint.py [--quick]

* Start-up: from exec to the first ``Probe`` that answers ready, polled every
  10 ms on a fresh channel. "cold" starts on an empty data directory with no
  fusefs daemon (the driver starts the embedded one); "warm" restarts the
  driver while its daemon keeps running (what a driver upgrade looks like);
  and a warm restart with 5,000 volumes in the database, which includes
  start-up reconciliation over them.
* RSS (VmRSS, as ``ps`` and the kubelet see it; PSS is recorded beside it):
  the driver idle after start, with 5,000 volumes created through it, and
  after restarting on them; the fusefs daemon; and one volume's FUSE session
  child (``python -m fusefs.session``, found through /proc as the daemon's
  child), idle after staging and after 1 GiB was written through it.
* CPU seconds per GiB written through fusefs: user+system time of the
  session child (from /proc/PID/stat) while this process writes 1 GiB in
  1 MiB writes and fsyncs it, beside the writer's own CPU time, and the
  writer's CPU time for the same write to native disk.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import grpc

from common import (GiB, MiB, BenchDriver, Mounted, Options, Section, Target, cpu_seconds, create_volume,
                    fusefs_daemon_pid, fusefs_session_pids, pss_mib, rpc_error_text, rss_mib, running_driver,
                    stage_and_publish, standalone)
from control_plane import populate
from csi_driver.gen import csi_pb2, csi_pb2_grpc


def probe_ready_seconds(driver: BenchDriver, timeout: float = 60.0) -> float:
    """Start the driver process and time until Probe says ready."""
    started = time.perf_counter()
    driver.start(wait=False)
    deadline = time.monotonic() + timeout
    channel = grpc.insecure_channel(driver.endpoint)
    stub = csi_pb2_grpc.IdentityStub(channel)
    try:
        while time.monotonic() < deadline:
            if driver.proc is not None and driver.proc.poll() is not None:
                raise RuntimeError(f"driver exited:\n{driver.log_tail()}")
            if driver.socket.exists():
                try:
                    if stub.Probe(csi_pb2.ProbeRequest(), timeout=2).ready.value:
                        return time.perf_counter() - started
                except grpc.RpcError:
                    pass
            time.sleep(0.01)
    finally:
        channel.close()
    raise TimeoutError(f"driver not ready after {timeout}s:\n{driver.log_tail()}")


def startup_times(root: Path, runs: int) -> dict[str, Any]:
    """Cold (no fusefs daemon yet) and warm (daemon running) start-up, ``runs`` of each."""
    cold, warm = [], []
    for i in range(runs):
        with running_driver(root / f"startup-{i}") as driver:
            driver.stop()
            from fusefs.embedded import stop_daemon

            stop_daemon(driver.data_dir)
            cold.append(probe_ready_seconds(driver))
            driver.stop()
            warm.append(probe_ready_seconds(driver))
    return {"cold_s": round(statistics.median(cold), 3), "warm_s": round(statistics.median(warm), 3),
            "cold_runs_s": [round(x, 3) for x in cold], "warm_runs_s": [round(x, 3) for x in warm]}


def memory(pid: int) -> dict[str, float]:
    return {"rss_mib": round(rss_mib(pid), 1), "pss_mib": round(pss_mib(pid), 1)}


def write_through(directory: Path, total: int) -> float:
    """Write ``total`` bytes in 1 MiB writes and fsync; returns this thread's CPU seconds."""
    block = os.urandom(MiB)
    path = directory / "footprint.dat"
    cpu0 = time.thread_time()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(total // MiB):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    cpu = time.thread_time() - cpu0
    path.unlink()
    return cpu


def fusefs_costs(driver: BenchDriver, write_bytes: int, work: Path) -> dict[str, Any]:
    """Daemon and session RSS, and CPU per GiB written through one fusefs volume."""
    out: dict[str, Any] = {}
    daemon = fusefs_daemon_pid(driver.data_dir)
    if daemon is None:
        return {"skipped": "no fusefs daemon process found for the driver's data dir"}
    out["daemon_idle"] = memory(daemon)
    volume = create_volume(driver, 2 * write_bytes + 64 * MiB)
    mounted: Mounted = stage_and_publish(driver, volume, "fusefs")
    sessions = fusefs_session_pids(daemon)
    if len(sessions) != 1:
        return {**out, "skipped": f"expected one FUSE session child of the daemon, found {sessions}"}
    child = sessions[0]
    time.sleep(0.5)
    out["daemon_one_volume"] = memory(daemon)
    out["session_idle"] = memory(child)
    child0, daemon0 = cpu_seconds(child), cpu_seconds(daemon)
    started = time.perf_counter()
    writer_cpu = write_through(mounted.target, write_bytes)
    seconds = time.perf_counter() - started
    gib = write_bytes / GiB
    out["session_after_write"] = memory(child)
    out["write"] = {
        "bytes": write_bytes, "seconds": round(seconds, 2), "mib_per_s": round(write_bytes / MiB / seconds, 1),
        "session_cpu_s_per_gib": round((cpu_seconds(child) - child0) / gib, 2),
        "daemon_cpu_s_per_gib": round((cpu_seconds(daemon) - daemon0) / gib, 2),
        "writer_cpu_s_per_gib": round(writer_cpu / gib, 2),
    }
    native = work / "footprint-native"
    native.mkdir(parents=True, exist_ok=True)
    out["write"]["native_writer_cpu_s_per_gib"] = round(write_through(native, write_bytes) / gib, 2)
    native.rmdir()
    return out


def run(opts: Options) -> dict[str, Any]:
    volumes = 100 if opts.quick else 5000
    write_bytes = 32 * MiB if opts.quick else GiB
    runs = 1 if opts.quick else 3
    section = Section("footprint", opts.quick)
    section.config = {"volumes": volumes, "write_bytes": write_bytes, "startup_runs": runs,
                      "driver_flags": "--log-level=info --metrics-address=127.0.0.1:<port>"}
    root = opts.work / "footprint"
    section.results["startup"] = startup_times(root, runs)
    with running_driver(root / "main") as driver:
        time.sleep(1.0)
        section.results["driver_idle"] = memory(driver.pid)
        try:
            section.results["fusefs"] = fusefs_costs(driver, write_bytes, opts.work)
        except grpc.RpcError as exc:
            section.results["fusefs"] = {"skipped": f"fusefs staging failed: {rpc_error_text(exc)}"}
        populate(driver, volumes)
        section.results[f"driver_with_{volumes}_volumes"] = memory(driver.pid)
        driver.stop()
        section.results["startup"][f"warm_with_{volumes}_volumes_s"] = round(probe_ready_seconds(driver), 3)
        time.sleep(1.0)
        section.results[f"driver_restarted_on_{volumes}_volumes"] = memory(driver.pid)
    if "skipped" in section.results["fusefs"]:
        section.notes.append(f"fusefs figures skipped: {section.results['fusefs']['skipped']}")
    add_targets(section, volumes)
    return section.as_dict()


def add_targets(section: Section, volumes: int) -> None:
    idle = section.results["driver_idle"]["rss_mib"]
    section.targets.append(Target("driver_idle_rss", "driver RSS at idle", idle, "<=", 80.0, "MiB",
                                  detail=f"{idle} MiB (PSS {section.results['driver_idle']['pss_mib']} MiB)"))
    fusefs = section.results["fusefs"]
    child = None if "skipped" in fusefs else max(fusefs["session_idle"]["rss_mib"],
                                                 fusefs["session_after_write"]["rss_mib"])
    section.targets.append(Target(
        "fusefs_child_rss", "fusefs volume session child RSS (larger of idle and after the write)", child, "<=", 40.0,
        "MiB", note=fusefs.get("skipped", ""),
        detail="" if child is None else f"idle {fusefs['session_idle']['rss_mib']} MiB, after writing "
                                        f"{fusefs['write']['bytes'] // MiB} MiB {fusefs['session_after_write']['rss_mib']} MiB"))


if __name__ == "__main__":
    standalone(__doc__.splitlines()[0], run)
