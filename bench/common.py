"""Plumbing shared by the benchmark scripts.

Every benchmark talks to a real ``fusepath-csi`` process through
``tests.harness.Driver`` (the same black-box harness the tests use), on a
scratch directory on the same disk as the data it measures, so the numbers
are what a kubelet or a sidecar would see. Nothing here is a shell string:
every subprocess gets an argument list.

A benchmark module exposes ``run(opts) -> dict`` (one JSON section) and a
``main()`` so it can also run alone: ``.venv/bin/python bench/data_path.py
--quick``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` puts bench/ first, not the repo
    sys.path.insert(0, str(REPO))

from csi_driver.gen import csi_pb2  # noqa: E402
from tests.harness import GiB, MiB, Driver, mount_cap  # noqa: E402,F401

DEFAULT_WORK = Path("/var/tmp/fusepath-bench")
RESULTS_DIR = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Options:
    """What every benchmark is told: how big to go and where to work."""

    quick: bool = False
    work: Path = DEFAULT_WORK
    out: Path = RESULTS_DIR


def parse_options(description: str, argv: Sequence[str] | None = None) -> Options:
    """The flags each script accepts when it runs alone."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a tiny run that checks the script works")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="scratch directory (same disk as data)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where plots and JSON go")
    args = parser.parse_args(argv)
    return Options(quick=args.quick, work=args.work.absolute(), out=args.out.absolute())


def standalone(description: str, run: Callable[[Options], dict[str, Any]]) -> None:
    """Run one benchmark module by itself and print its section as JSON."""
    opts = parse_options(description)
    opts.work.mkdir(parents=True, exist_ok=True)
    section = run(opts)
    print(json.dumps(section, indent=2, default=str))


# -- statistics ---------------------------------------------------------------


def runs_parser(doc: str, base: Path) -> argparse.ArgumentParser:
    """The options of the small standalone scripts (io_limits, recovery): runs, scratch base, JSON out."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="repeat each measurement; the median is reported")
    p.add_argument("--base", type=Path, default=base, help="scratch directory, on the disk to measure")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: p99 of 300 samples is the 297th, not an interpolation."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/mean/max in milliseconds: the unit people read latency in."""
    if not seconds:
        return {"n": 0}
    return {
        "n": len(seconds),
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
        "mean_ms": round(statistics.fmean(seconds) * 1000, 3),
        "max_ms": round(max(seconds) * 1000, 3),
    }


def median_of(values: Sequence[float]) -> dict[str, float]:
    """Median with its spread, so a reader can see how noisy a figure was."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


# -- targets --------------------------------------------------------------------


@dataclass
class Target:
    """One figure from the issue's target list, judged in the run that measured it.

    ``value`` is what is compared with ``threshold`` (often itself a ratio,
    such as fusefs/native); ``detail`` carries the raw numbers behind it.
    """

    id: str
    label: str
    value: float | None
    op: str  # ">=" or "<="
    threshold: float
    unit: str = ""
    detail: str = ""
    met: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.value is None or self.value != self.value:  # None or NaN: not measured
            self.met = None
            return
        self.met = self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def ratio(a: float | None, b: float | None) -> float | None:
    """a/b, or None when either side is missing (a skipped measurement)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- processes ---------------------------------------------------------------


def proc_stat_fields(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process (all its threads) has used."""
    fields = proc_stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def rss_mib(pid: int) -> float:
    """VmRSS in MiB: what `ps` and the kubelet's memory accounting show."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pss_mib(pid: int) -> float:
    """PSS in MiB: RSS with shared pages (libpython, .so files) split between sharers."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def parent_pid(pid: int) -> int:
    return int(proc_stat_fields(pid)[1])


def all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def find_pids(match: Callable[[list[str]], bool]) -> list[int]:
    """PIDs whose argument list satisfies ``match`` (processes may vanish meanwhile)."""
    found = []
    for pid in all_pids():
        argv = cmdline(pid)
        if argv and match(argv):
            found.append(pid)
    return found


def fusefs_daemon_pid(data_dir: Path) -> int | None:
    """The embedded fusefs daemon serving ``data_dir`` (``python -m fusefs.cli serve``)."""
    state = str(data_dir.resolve() / "fusefs")
    pids = find_pids(lambda a: "fusefs.cli" in a and "serve" in a and state in a)
    return pids[0] if pids else None


def fusefs_session_pids(daemon_pid: int) -> list[int]:
    """The daemon's per-volume FUSE session children (``python -m fusefs.session``)."""
    out = []
    for pid in find_pids(lambda a: "fusefs.session" in a):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if parent_pid(pid) == daemon_pid:
                out.append(pid)
    return out


def run_quiet(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, fail loudly with its stderr if it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (cold reads)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the driver -----------------------------------------------------------------


class BenchDriver(Driver):
    """The test harness's driver, configured as a production node runs it.

    The harness logs at debug level (a request body per RPC) and turns
    metrics off; a benchmark wants the production defaults instead (info
    logs) and the metrics endpoint on, for the freeze-window histogram.
    Later flags win in argparse, so these simply follow the harness's.
    """

    def __init__(self, root: Path, *extra: str) -> None:
        self.metrics_port = free_port()
        super().__init__(root, "--log-level=info", f"--metrics-address=127.0.0.1:{self.metrics_port}", *extra)

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


@contextlib.contextmanager
def running_driver(root: Path, *extra: str) -> Iterator[BenchDriver]:
    """A started driver under a fresh ``root``; stopped, unmounted and removed afterwards."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    driver = BenchDriver(root, *extra)
    try:
        driver.start()
        yield driver
    finally:
        driver.teardown()
        shutil.rmtree(root, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Mounted:
    """A volume staged and published through the driver, as the kubelet does it."""

    volume_id: str
    staging: Path
    target: Path
    mounter: str


def create_volume(driver: Driver, size: int, mounter: str | None = None, name: str | None = None) -> str:
    params = {"mounter": mounter} if mounter else {}
    return driver.create_volume(name or unique("pvc"), size=size, parameters=params).volume_id


def stage_and_publish(driver: Driver, volume_id: str, mounter: str) -> Mounted:
    """NodeStage + NodePublish at kubelet-like paths under the driver's kubelet dir."""
    staging = driver.kubelet_dir / "plugins" / volume_id / "globalmount"
    target = driver.kubelet_dir / "pods" / volume_id / "volumes" / "mount"
    staging.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    cap = mount_cap()
    driver.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), volume_capability=cap))
    driver.node.NodePublishVolume(csi_pb2.NodePublishVolumeRequest(
        volume_id=volume_id, staging_target_path=str(staging), target_path=str(target), volume_capability=cap))
    return Mounted(volume_id, staging, target, mounter)


def unpublish_and_unstage(driver: Driver, m: Mounted) -> None:
    driver.node.NodeUnpublishVolume(csi_pb2.NodeUnpublishVolumeRequest(volume_id=m.volume_id,
                                                                        target_path=str(m.target)))
    driver.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(volume_id=m.volume_id,
                                                                    staging_target_path=str(m.staging)))


def rpc_error_text(exc: BaseException) -> str:
    """A one-line reason from a gRPC error (its details can hold a whole log tail)."""
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    return " ".join(str(text).split())[:600]


# -- the machine ---------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unavailable"


def _mount_of(path: Path) -> dict[str, str]:
    """The filesystem under ``path``: device, type and options (longest mount-point match)."""
    best: dict[str, str] = {}
    target = str(path.resolve())
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, point, fstype, opts, *_ = line.split()
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best.get("mount", "")):
            best = {"device": dev, "mount": point, "fstype": fstype, "options": opts}
    return best


def _disk_model(device: str) -> str:
    """Model and rotational flag of the block device, when sysfs knows them."""
    name = Path(device).name
    base = Path("/sys/class/block") / name
    if not base.exists():
        return "unknown"
    parent = base.resolve().parent if (base / "partition").exists() else base.resolve()
    model = parent / "device" / "model"
    rot = parent / "queue" / "rotational"
    parts = []
    if model.exists():
        parts.append(model.read_text().strip())
    elif (parent / "device" / "vendor").exists():
        vendor = (parent / "device" / "vendor").read_text().strip()
        parts.append("virtio-blk" if vendor == "0x1af4" else f"vendor {vendor}")
    if rot.exists():
        parts.append("reports rotational" if rot.read_text().strip() == "1" else "non-rotational")
    return ", ".join(parts) or "virtual"


def machine_info(work: Path) -> dict[str, Any]:
    """What a reader needs to compare figures: CPUs, memory, kernel, disk, versions, date."""
    mem_kib = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                   if l.startswith("MemTotal:"))
    cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), platform.processor())
    mount = _mount_of(work)
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return {
        "host": socket.gethostname(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "disk": {**mount, "model": _disk_model(mount.get("device", ""))},
        "fio": _first_line(["fio", "--version"]),
        "bindfs": _first_line(["bindfs", "--version"]),
        "tar": _first_line(["tar", "--version"]),
        "git_commit": git + ("-dirty" if dirty else ""),
    }


# -- profiling ------------------------------------------------------------------------


def py_spy() -> str | None:
    """py-spy from PATH or from the venv this runs in (``make bench`` does not activate it)."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


@contextlib.contextmanager
def sampling(pid: int, seconds: float, raw_path: Path) -> Iterator[dict[str, Any]]:
    """Sample ``pid`` with py-spy (non-blocking, 200 Hz) while the block runs.

    The block should keep the process busy for about ``seconds``. Yields a
    dict that holds, afterwards, ``stacks`` (collapsed stacks and counts) or
    ``skipped`` with the reason.
    """
    out: dict[str, Any] = {}
    spy = py_spy()
    if spy is None:
        out["skipped"] = "py-spy is not installed (pip install py-spy)"
        yield out
        return
    proc = subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))),
                             "--rate", "200", "--nonblocking", "--format", "raw", "--output", str(raw_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)  # let py-spy attach before the work starts
    yield out
    _, err = proc.communicate(timeout=seconds + 60)
    if proc.returncode != 0 or not raw_path.exists():
        out["skipped"] = f"py-spy failed: {err.decode(errors='replace').strip()[-400:]}"
        return
    out["stacks"] = parse_collapsed(raw_path.read_text())
    out["raw_profile"] = raw_path.name


def parse_collapsed(raw: str) -> list[tuple[list[str], int]]:
    """py-spy's raw format (``frame;frame;... count``) as (frame names, count), line numbers dropped."""
    stacks = []
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            frames = [frame_name(f) for f in stack.split(";") if "(" in f]
            if frames:
                stacks.append((frames, int(count_text)))
    return stacks


def frame_name(frame: str) -> str:
    """'create (csi_driver/volumes.py:94)' -> 'csi_driver/volumes.py:create'."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3.11/", "/lib/python3", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{func}"


def top_functions(stacks: list[tuple[list[str], int]], top: int = 12) -> dict[str, Any]:
    """Self and inclusive shares of samples per function."""
    import collections

    self_c: collections.Counter[str] = collections.Counter()
    incl_c: collections.Counter[str] = collections.Counter()
    total = 0
    for frames, n in stacks:
        total += n
        self_c[frames[-1]] += n
        for name in set(frames):
            incl_c[name] += n
    if not total:
        return {"samples": 0}
    skip = ("threading.py:", "concurrent/futures/thread.py:_worker")
    return {
        "samples": total,
        "top_self": [{"function": k, "percent": round(100 * v / total, 1)} for k, v in self_c.most_common(top)],
        "top_inclusive": [{"function": k, "percent": round(100 * v / total, 1)}
                          for k, v in incl_c.most_common(top + 8) if not k.startswith(skip)][:top],
    }


def human_mib(nbytes: float) -> float:
    return round(nbytes / MiB, 1)


@dataclass
class Section:
    """A benchmark's JSON section, built up as it runs."""

    name: str
    quick: bool
    config: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "quick": self.quick, "seconds": round(time.monotonic() - self.started, 1),
            "config": self.config, "results": self.results,
            "targets": [t.as_dict() for t in self.targets], "notes": self.notes,
        }
