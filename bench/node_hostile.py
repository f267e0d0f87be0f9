"""Node isolation timings: a stuck volume and a killed throttled writer.

    .venv/bin/python bench/node_hostile.py [--rounds N]

As root, against one real driver with its embedded fusefs daemon, prints
JSON with, per round:

* ``stuck``: one of two volumes' FUSE sessions SIGSTOPped (right after a
  file creation, so the kernel has no cached attributes of its root), then
  40 concurrent NodeGetVolumeStats on it plus Probe, CreateVolume and the
  other volume's NodeGetVolumeStats: each call's latency in seconds. The
  goal is under 1 s for everything about the other volume and the node.
* ``kill``: a uid-1000 writer with 4 threads of 1 MiB writes on a
  64 KiB/s volume is SIGKILLed: seconds until it is reaped (goal: < 1 s).

The CI tests in tests/hostile/ check the same with generous bounds; this
script records the real figures.
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
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csi_driver.gen import csi_pb2  # noqa: E402
from tests.harness import MiB, Driver, mount_cap  # noqa: E402
from tests.hostile.node_pods import SYSTEM_PYTHON, as_pod_user, session_pid, wait_blocked_in_fuse  # noqa: E402
from tests.hostile.test_node_throttled_kill import WRITER  # noqa: E402
from tests.test_node_fusefs import Pod  # noqa: E402


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    try:
        fn()
    except Exception:  # noqa: BLE001 - a failed call still has a latency
        pass
    return round(time.monotonic() - start, 4)


def stuck_round(driver: Driver) -> dict[str, object]:
    stuck, other = Pod(driver, size=8 * MiB), Pod(driver, size=8 * MiB)
    pid = session_pid(driver, stuck.vol.volume_id)
    (stuck.target / f"poke-{uuid.uuid4().hex[:8]}").write_text("")
    os.kill(pid, signal.SIGSTOP)
    try:
        def stats(pod: Pod):  # type: ignore[no-untyped-def]
            return lambda: driver.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
                volume_id=pod.vol.volume_id, volume_path=str(pod.target)), timeout=30)
        with ThreadPoolExecutor(48) as pool:
            stuck_calls = [pool.submit(timed, stats(stuck)) for _ in range(40)]
            probe = pool.submit(timed, lambda: driver.identity.Probe(csi_pb2.ProbeRequest(), timeout=30))
            create = pool.submit(timed, lambda: driver.controller.CreateVolume(csi_pb2.CreateVolumeRequest(
                name=f"pvc-{uuid.uuid4().hex[:8]}", volume_capabilities=[mount_cap()]), timeout=30))
            other_stats = pool.submit(timed, stats(other))
            stuck_latencies = [f.result() for f in stuck_calls]
        return {"probe": probe.result(), "create": create.result(), "other_stats": other_stats.result(),
                "stuck_stats_p50": statistics.median(stuck_latencies), "stuck_stats_max": max(stuck_latencies)}
    finally:
        os.kill(pid, signal.SIGCONT)


def kill_round(driver: Driver) -> float:
    pod = Pod(driver, size=64 * MiB, ioBytesPerSecond=str(64 * 1024))
    pod.target.chmod(0o777)
    proc = subprocess.Popen(as_pod_user(SYSTEM_PYTHON, "-c", WRITER, str(pod.target), "4", str(MiB)))
    wait_blocked_in_fuse(proc.pid)
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    start = time.monotonic()
    proc.wait()
    return round(time.monotonic() - start, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fusepath-bench-hostile-", dir="/tmp"))
    root.chmod(0o755)
    driver = Driver(root)
    driver.start()
    try:
        rounds = [{"stuck": stuck_round(driver), "kill_seconds": kill_round(driver)} for _ in range(args.rounds)]
    finally:
        driver.teardown()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
