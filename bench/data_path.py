"""Data-path benchmark: what the FUSE layer costs a pod, against the disk and bindfs.

    .venv/bin/python bench/data_path.py [--quick]

Five directories on the same disk, each measured the same way:

* ``native``: a plain directory;
* ``bind``: a volume with StorageClass ``mounter: bind``, staged and
  published through the driver (a bind mount: should equal native);
* ``fusefs``: a volume with the default mounter, staged and published
  through a driver run with ``--fusefs-engine=libfuse``, so I/O goes
  through the volume's FUSE session on the libfuse engine (the engine
  before the kernel engine became the default);
* ``fusefs-kernel``: the same session on the kernel engine, the default
  (``python -m fusefs.session --engine=kernel``, fusefs speaking /dev/fuse
  itself, with passthrough), started directly with a 4 GiB quota as the
  daemon starts a session (a driver runs one engine, ``--fusefs-engine``,
  and the bench's driver serves the libfuse target); the session's own
  request counters show which rows were served by kernel passthrough (no
  READ request reaches it);
* ``fusefs-kernel-base`` (only when ``FUSEPATH_BENCH_KERNEL_BASELINE``
  names another source tree, e.g. a ``git worktree`` of main): the kernel
  engine of that tree, the same way, so that a change to the engine is
  measured against its base in one run;
* ``bindfs``: the Debian ``bindfs`` (C, libfuse) over a plain directory, the
  C FUSE reference.

fio (``ioengine=psync``, buffered I/O): sequential 1 MiB write of a fresh
512 MiB file with ``end_fsync=1``; sequential 1 MiB read of that file after
dropping the page cache (cold); random 4 KiB read and write of a 256 MiB
file with a warm cache (read once beforehand, ``invalidate=0``), 1 and 4
jobs, 3 s each. Then a metadata script: create, stat and unlink 10k files, a
warm ``ls -l`` of them, and ``tar xf`` of a 1,000-file tree. The sizes keep
the whole suite inside its 15-minute budget on 2 cores.

On a 2-vCPU VM the CPU a FUSE daemon lands on swings results 3-8x (DESIGN
§9), so nothing is pinned and every figure is the median of three runs,
interleaved (run 1 of every target, then run 2, ...) so slow drift on the
machine spreads over all targets instead of biasing one. The spread is kept
in the JSON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from common import (GiB, MiB, BenchDriver, Options, Section, Target, cpu_seconds, create_volume, drop_caches,
                    parse_collapsed,
                    fusefs_daemon_pid, fusefs_session_pids, median_of, ratio, rpc_error_text, run_quiet, REPO,
                    running_driver, sampling, stage_and_publish, standalone, top_functions)

from fusefs.control import SessionClient  # noqa: E402 - common puts the repo on sys.path

TARGETS = ("native", "bind", "fusefs", "fusefs-kernel", "fusefs-kernel-base", "bindfs")
#: The kernel engine's target: its session process and control socket.
KERNEL = "fusefs-kernel"
#: An optional A/B target: the kernel engine from another source tree (for
#: example ``git worktree add /tmp/base main``), named by this variable.
BASELINE_ENV = "FUSEPATH_BENCH_KERNEL_BASELINE"
BASELINE = "fusefs-kernel-base"


@dataclass(frozen=True)
class Plan:
    runs: int = 3
    seq_size: str = "512m"
    rand_size: str = "256m"
    runtime: int = 3  # seconds per random job; 0 = one pass over the file
    meta_files: int = 10_000
    untar_files: int = 1_000

    @classmethod
    def quick(cls) -> "Plan":
        return cls(runs=1, seq_size="16m", rand_size="4m", runtime=0, meta_files=200, untar_files=50)


FIO_JOBS: dict[str, dict[str, Any]] = {
    "seq_write_1m": {"rw": "write", "bs": "1m", "file": "seq.dat", "end_fsync": 1, "fresh": True},
    "seq_read_1m_cold": {"rw": "read", "bs": "1m", "file": "seq.dat", "cold": True},
    "rand_read_4k_1job": {"rw": "randread", "bs": "4k", "file": "rand.dat", "numjobs": 1},
    "rand_read_4k_4jobs": {"rw": "randread", "bs": "4k", "file": "rand.dat", "numjobs": 4},
    "rand_write_4k_1job": {"rw": "randwrite", "bs": "4k", "file": "rand.dat", "numjobs": 1},
    "rand_write_4k_4jobs": {"rw": "randwrite", "bs": "4k", "file": "rand.dat", "numjobs": 4},
}
UNITS = {"seq": "MiB/s", "ran": "IOPS"}


def fio_argv(directory: Path, name: str, job: dict[str, Any], plan: Plan) -> list[str]:
    seq = name.startswith("seq")
    argv = ["fio", f"--name={name}", f"--filename={directory / job['file']}", f"--rw={job['rw']}",
            f"--bs={job['bs']}", "--ioengine=psync", "--output-format=json",
            f"--size={plan.seq_size if seq else plan.rand_size}"]
    if seq:
        argv += [f"--end_fsync={job.get('end_fsync', 0)}"]
    else:
        argv += ["--invalidate=0", f"--numjobs={job['numjobs']}", "--group_reporting"]
        if plan.runtime:  # --quick: one pass over the file instead of a timed run
            argv += ["--time_based", f"--runtime={plan.runtime}"]
    return argv


def run_fio(directory: Path, name: str, plan: Plan) -> float:
    """One fio job; returns MiB/s for sequential jobs and IOPS for random ones."""
    job = FIO_JOBS[name]
    if name.startswith("rand") and job["numjobs"] == 1 and job["rw"] == "randread":
        warm(directory / job["file"])
    if job.get("fresh"):
        (directory / job["file"]).unlink(missing_ok=True)
        os.sync()
    if job.get("cold"):
        drop_caches()
    out = run_quiet(fio_argv(directory, name, job, plan))
    result = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = result["write" if "write" in job["rw"] else "read"]
    return side["bw_bytes"] / MiB if name.startswith("seq") else side["iops"]


def warm(path: Path) -> None:
    """Read a file once so the random jobs run on a warm cache (the cold read dropped it)."""
    with open(path, "rb", buffering=0) as fh:
        while fh.read(MiB):
            pass


def lay_out_random_file(directory: Path, plan: Plan) -> None:
    """Write the random-I/O file once, so every random job reads and rewrites existing blocks."""
    run_quiet(["fio", "--name=layout", f"--filename={directory / 'rand.dat'}", "--rw=write", "--bs=1m",
               f"--size={plan.rand_size}", "--ioengine=psync", "--end_fsync=1", "--output-format=json"])


# -- metadata -----------------------------------------------------------------------------------


def make_untar_source(work: Path, files: int) -> Path:
    """A tar of ``files`` small files in 20 directories (built once, on native disk)."""
    archive = work / f"untar-{files}.tar"
    if archive.exists():
        return archive
    src = work / f"untar-src-{files}"
    shutil.rmtree(src, ignore_errors=True)
    rng = random.Random(7)
    for i in range(files):
        sub = src / f"d{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i:05d}.txt").write_bytes(os.urandom(rng.randint(500, 8000)).hex().encode()[:8000])
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="tree")
    shutil.rmtree(src)
    return archive


def metadata_run(directory: Path, plan: Plan, untar: Path) -> dict[str, float]:
    """Create, stat, ls -l, unlink ``meta_files`` files, then untar; rates per second."""
    box = directory / "meta"
    shutil.rmtree(box, ignore_errors=True)
    box.mkdir()
    names = [str(box / f"f{i:05d}") for i in range(plan.meta_files)]
    out: dict[str, float] = {}
    out["creates_per_s"] = _rate(len(names), lambda: [os.close(os.open(n, os.O_CREAT | os.O_WRONLY, 0o644))
                                                      for n in names])
    out["stats_per_s"] = _rate(len(names), lambda: [os.stat(n) for n in names])
    subprocess.run(["ls", "-l", str(box)], stdout=subprocess.DEVNULL, check=True)  # warm the entries
    out["ls_l_entries_per_s"] = _rate(len(names), lambda: subprocess.run(["ls", "-l", str(box)],
                                                                         stdout=subprocess.DEVNULL, check=True))
    out["unlinks_per_s"] = _rate(len(names), lambda: [os.unlink(n) for n in names])
    dest = directory / "untar"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    out["untar_files_per_s"] = _rate(plan.untar_files, lambda: run_quiet(["tar", "-xf", str(untar), "-C", str(dest)]))
    shutil.rmtree(dest)
    box.rmdir()
    return out


def _rate(count: int, action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return count / (time.perf_counter() - started)


# -- where the FUSE session spends its time ------------------------------------------------------


def profile_fusefs(driver: BenchDriver, directory: Path, plan: Plan, out: Path) -> dict[str, Any]:
    """py-spy on the volume's FUSE session child under the workloads where Python pays most."""
    daemon = fusefs_daemon_pid(driver.data_dir)
    sessions = fusefs_session_pids(daemon) if daemon else []
    if len(sessions) != 1:
        return {"skipped": f"expected one fusefs session child, found {sessions}"}
    return profile_session(sessions[0], directory, plan, out, note=(
        "py-spy sees a libfuse worker only while a ctypes callback runs (each gets a fresh thread "
        "state), so sample counts are low; session_cpu_us_per_op, from /proc, is the reliable cost"))


def profile_session(child: int, directory: Path, plan: Plan, out: Path, note: str = "",
                    ls_l: bool = False) -> dict[str, Any]:
    """py-spy on one FUSE session process under the workloads where Python pays most.

    With ``ls_l`` (the kernel engine) the shares are of the samples where the
    session was serving a request: py-spy counts a worker blocked reading
    /dev/fuse as active, and those samples would bury the rest.
    """
    seconds = 4.0
    workloads: dict[str, Callable[[], float]] = {  # each returns how many operations it made
        "rand_write_4k_1job": lambda: run_fio(directory, "rand_write_4k_1job", plan) * plan.runtime,
        "creates": lambda: _create_until(directory / "profile-creates", seconds - 1.0),
        "stats": lambda: _stat_until(directory / "profile-creates", seconds - 1.0),
    }
    if ls_l:
        workloads["ls_l"] = lambda: _ls_until(directory / "profile-creates", seconds - 1.0)
    result: dict[str, Any] = {"pid": child, **({"note": note} if note else {})}
    for name, action in workloads.items():
        with sampling(child, seconds, out.with_name(f"{out.name}-{name}.txt")) as prof:
            cpu0, wall0 = cpu_seconds(child), time.perf_counter()
            ops = action()
            cpu, wall = cpu_seconds(child) - cpu0, time.perf_counter() - wall0
        cost = {"operations": int(ops), "session_cpu_us_per_op": round(1e6 * cpu / ops, 1) if ops else None,
                "session_cores_busy": round(cpu / wall, 2)}
        if "skipped" not in prof and ls_l:
            busy = _busy_stacks(out.with_name(prof["raw_profile"]))
            prof = {**prof, "stacks": busy, "samples_all": sum(n for _, n in prof["stacks"])}
        result[name] = {**cost, **(prof if "skipped" in prof else {
            **top_functions(prof["stacks"]), "raw_profile": prof["raw_profile"],
            **({"samples_all": prof["samples_all"]} if "samples_all" in prof else {})})}
    shutil.rmtree(directory / "profile-creates", ignore_errors=True)
    return result


def _busy_stacks(raw_path: Path) -> list[tuple[list[str], int]]:
    """The kernel engine's samples without those of workers waiting for a
    request (on the lines of ``Engine._worker`` that read or poll /dev/fuse)
    and of its watchdog."""
    source = (REPO / "fusefs" / "kernel" / "engine.py").read_text().splitlines()
    waits = {i + 1 for i, line in enumerate(source) if "readv(fd, [buf])" in line or "poller.poll(" in line}
    kept = []
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        where = re.search(r"engine\.py:(\d+)\)$", leaf)
        if "_watch (" in stack or ("_worker (" in leaf and where and int(where.group(1)) in waits):
            continue
        kept.append(line)
    return parse_collapsed("\n".join(kept))


def _create_until(box: Path, seconds: float) -> int:
    box.mkdir(exist_ok=True)
    end, i = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        os.close(os.open(box / f"p{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
        i += 1
    return i


def _ls_until(box: Path, seconds: float) -> int:
    end, done = time.monotonic() + seconds, 0
    count = len(os.listdir(box))
    while time.monotonic() < end:
        subprocess.run(["ls", "-l", str(box)], stdout=subprocess.DEVNULL, check=True)
        done += count
    return done


def _stat_until(box: Path, seconds: float) -> int:
    names = [box / n for n in os.listdir(box)]
    end, done = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        for n in names:
            os.stat(n)
        done += len(names)
    return done


# -- the five directories ---------------------------------------------------------------------


@dataclass
class KernelSession:
    """A volume session on the kernel engine, started as the daemon starts one."""

    pid: int
    mountpoint: Path
    client: SessionClient

    def requests(self) -> dict[str, int]:
        """Requests served so far, by operation (the session's own counters)."""
        return {op: v["count"] for op, v in self.client.stats()["ops"].items()}

    def negotiated(self) -> dict[str, Any]:
        return dict(self.client.stats().get("negotiated", {}))


@contextmanager
def kernel_session(work: Path, capacity: int = 4 * GiB, code: Path = REPO,
                   name: str = "kernel") -> Iterator[KernelSession]:
    """``python -m fusefs.session --engine=kernel`` (from the source tree
    ``code``) over a plain directory; stopped on the way out."""
    src, mnt, sock = work / f"{name}-src", work / f"{name}-mnt", work / f"{name}.sock"
    for p in (src, mnt):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    argv = [sys.executable, "-m", "fusefs.session", "--engine=kernel", "--volume-id", "bench-kernel",
            "--source", str(src), "--mountpoint", str(mnt), "--control-socket", str(sock),
            "--capacity", str(capacity), "--state-file", str(work / f"{name}.state"), "--log-level", "info"]
    with open(work / f"{name}-session.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, cwd=code,
                                env=dict(os.environ, PYTHONPATH=str(code)))
    try:
        client = SessionClient(str(sock), timeout=5)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.ping().get("ready"):
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the kernel-engine session did not come up (see {work / f'{name}-session.log'})")
            time.sleep(0.05)
        yield KernelSession(proc.pid, mnt, client)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)
        shutil.rmtree(src, ignore_errors=True)


@contextmanager
def bindfs_mount(work: Path) -> Iterator[Path]:
    """bindfs (default options) of a plain directory; unmounted on the way out."""
    src, mnt = work / "bindfs-src", work / "bindfs-mnt"
    for p in (src, mnt):
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    run_quiet(["bindfs", str(src), str(mnt)])
    try:
        yield mnt
    finally:
        if subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)
        shutil.rmtree(src, ignore_errors=True)


def open_targets(stack: ExitStack, driver: BenchDriver, work: Path, section: Section) -> dict[str, Path]:
    """The directories to measure; a target that cannot be set up is skipped with its reason."""
    dirs: dict[str, Path] = {}
    native = work / "native"
    shutil.rmtree(native, ignore_errors=True)
    native.mkdir(parents=True)
    dirs["native"] = native
    for name, mounter in (("bind", "bind"), ("fusefs", None)):
        try:
            vol = create_volume(driver, 4 * GiB, mounter=mounter)
            dirs[name] = stage_and_publish(driver, vol, mounter or "fusefs").target
        except grpc.RpcError as exc:
            section.notes.append(f"{name}: staging through the driver failed, skipped: {rpc_error_text(exc)}")
    try:
        kernel = stack.enter_context(kernel_session(work))
        dirs[KERNEL] = kernel.mountpoint
        section.results[f"{KERNEL}_session"] = kernel
    except (RuntimeError, OSError) as exc:
        section.notes.append(f"{KERNEL}: the session could not start, skipped: {exc}")
    baseline = os.environ.get(BASELINE_ENV)
    if baseline:
        try:
            dirs[BASELINE] = stack.enter_context(kernel_session(work, code=Path(baseline), name="base")).mountpoint
            section.config["kernel_baseline_tree"] = baseline
        except (RuntimeError, OSError) as exc:
            section.notes.append(f"{BASELINE}: the session from {baseline} could not start, skipped: {exc}")
    if shutil.which("bindfs"):
        try:
            dirs["bindfs"] = stack.enter_context(bindfs_mount(work))
        except RuntimeError as exc:
            section.notes.append(f"bindfs: could not mount, skipped: {exc}")
    else:
        section.notes.append("bindfs: not installed (apt-get install -y bindfs), skipped")
    return dirs


def run(opts: Options) -> dict[str, Any]:
    plan = Plan.quick() if opts.quick else Plan()
    section = Section("data_path", opts.quick)
    section.config = {**plan.__dict__, "fio_jobs": {k: {kk: vv for kk, vv in v.items() if kk != "file"}
                                                    for k, v in FIO_JOBS.items()},
                      "ioengine": "psync (buffered)", "pinning": "none; median of interleaved runs"}
    work = opts.work / "data-path"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    untar = make_untar_source(work, plan.untar_files)
    samples: dict[str, dict[str, list[float]]] = {}
    step_seconds: dict[str, dict[str, float]] = {}
    # The driver's target is the libfuse engine, so that one run compares
    # both engines (the kernel engine, the default, is the fusefs-kernel target).
    with running_driver(opts.work / "data-path-driver", "--fusefs-engine=libfuse") as driver, ExitStack() as stack:
        dirs = open_targets(stack, driver, work, section)
        section.config["paths"] = {k: str(v) for k, v in dirs.items()}
        for d in dirs.values():
            lay_out_random_file(d, plan)
        kernel: KernelSession | None = section.results.pop(f"{KERNEL}_session", None)
        requests: dict[str, dict[str, int]] = {}
        for _ in range(plan.runs):
            for target, directory in dirs.items():
                row = samples.setdefault(target, {})
                for name in FIO_JOBS:
                    started = time.monotonic()
                    before = kernel.requests() if kernel is not None and target == KERNEL else None
                    row.setdefault(name, []).append(run_fio(directory, name, plan))
                    if before is not None:
                        requests[name] = _delta(before, kernel.requests())  # type: ignore[union-attr]
                    _add_time(step_seconds, target, name, started)
                started = time.monotonic()
                for key, value in metadata_run(directory, plan, untar).items():
                    row.setdefault(key, []).append(value)
                _add_time(step_seconds, target, "metadata", started)
        if not opts.quick and "fusefs" in dirs:
            section.results["fusefs_profile"] = profile_fusefs(driver, dirs["fusefs"], plan,
                                                               opts.out / "profile-fusefs")
        if kernel is not None:
            kernel_info = {"negotiated": kernel.negotiated(), "requests_per_fio_row_last_run": requests,
                           "note": "FUSE requests the session served during each fio row (its last run): "
                                   "a row served by passthrough sends no READ"}
            if not opts.quick:
                kernel_info["profile"] = profile_session(kernel.pid, dirs[KERNEL], plan,
                                                         opts.out / "profile-fusefs-kernel", ls_l=True)
        for directory in dirs.values():
            for f in ("seq.dat", "rand.dat"):
                (directory / f).unlink(missing_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    profile = section.results.pop("fusefs_profile", None)
    section.results = {t: {k: _rounded(median_of(v)) for k, v in rows.items()} for t, rows in samples.items()}
    if profile is not None:
        section.results["fusefs_profile"] = profile
    if kernel is not None:
        section.results["kernel_engine"] = kernel_info
    section.results["wall_seconds_per_step"] = step_seconds
    section.results["units"] = {**{k: UNITS[k[:3]] for k in FIO_JOBS}, "metadata": "operations per second"}
    add_targets(section)
    return section.as_dict()


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}


def _add_time(table: dict[str, dict[str, float]], target: str, step: str, started: float) -> None:
    """Wall time spent per (target, step) over all runs: where the section's minutes go."""
    row = table.setdefault(target, {})
    row[step] = round(row.get(step, 0.0) + time.monotonic() - started, 1)


def _rounded(m: dict[str, Any]) -> dict[str, Any]:
    return {k: ([round(x, 1) for x in v] if isinstance(v, list) else round(v, 1)) for k, v in m.items()}


def _median(section: Section, target: str, row: str) -> float | None:
    return section.results.get(target, {}).get(row, {}).get("median")


NATIVE_TARGETS = (  # (row, share of native fusefs must reach)
    ("seq_write_1m", 0.5), ("seq_read_1m_cold", 0.7), ("rand_write_4k_1job", 0.4),
)
BINDFS_ROWS = (*FIO_JOBS, "creates_per_s", "stats_per_s", "ls_l_entries_per_s", "unlinks_per_s", "untar_files_per_s")


def add_targets(section: Section) -> None:
    for row, share in NATIVE_TARGETS:
        f, n = _median(section, "fusefs", row), _median(section, "native", row)
        section.targets.append(Target(f"fuse_{row}_vs_native", f"fusefs {row} / native (>= {share:.0%})",
                                      ratio(f, n), ">=", share, "ratio", detail=f"fusefs {f}, native {n}"))
    creates = _median(section, "fusefs", "creates_per_s")
    section.targets.append(Target("fuse_creates", "fusefs creates/s", creates, ">=", 3000.0, "files/s"))
    for row in BINDFS_ROWS:
        f, b = _median(section, "fusefs", row), _median(section, "bindfs", row)
        section.targets.append(Target(f"fuse_{row}_vs_bindfs", f"fusefs {row} / bindfs (>= 1)", ratio(f, b), ">=",
                                      1.0, "ratio", detail=f"fusefs {f}, bindfs {b}"))
    add_kernel_targets(section)


#: Issue 9's speed targets for the kernel engine: (row, share of native) and rows against bindfs.
KERNEL_NATIVE_TARGETS = (
    ("rand_read_4k_1job", 0.9), ("rand_read_4k_4jobs", 0.9), ("seq_read_1m_cold", 0.9),
    ("seq_write_1m", 0.5), ("rand_write_4k_1job", 0.4),
)
KERNEL_BINDFS_ROWS = ("creates_per_s", "stats_per_s", "unlinks_per_s", "ls_l_entries_per_s", "untar_files_per_s")
PASSTHROUGH_ROWS = ("seq_read_1m_cold", "rand_read_4k_1job", "rand_read_4k_4jobs")


def add_kernel_targets(section: Section) -> None:
    if KERNEL not in section.results:
        return
    for row, share in KERNEL_NATIVE_TARGETS:
        k, n = _median(section, KERNEL, row), _median(section, "native", row)
        section.targets.append(Target(f"kernel_{row}_vs_native", f"{KERNEL} {row} / native (>= {share:.0%})",
                                      ratio(k, n), ">=", share, "ratio", detail=f"{KERNEL} {k}, native {n}"))
    for row in KERNEL_BINDFS_ROWS:
        k, b = _median(section, KERNEL, row), _median(section, "bindfs", row)
        section.targets.append(Target(f"kernel_{row}_vs_bindfs", f"{KERNEL} {row} / bindfs (>= 1)", ratio(k, b),
                                      ">=", 1.0, "ratio", detail=f"{KERNEL} {k}, bindfs {b}"))
    info = section.results.get("kernel_engine", {})
    per_row = info.get("requests_per_fio_row_last_run", {})
    if per_row:
        reads = sum(per_row.get(r, {}).get("read", 0) for r in PASSTHROUGH_ROWS)
        section.targets.append(Target(
            "kernel_read_rows_passthrough", f"{KERNEL}: READ requests reaching the session in the read rows "
            "(0: all served by passthrough)", float(reads), "<=", 0.0, "requests",
            detail=f"passthrough negotiated: {info.get('negotiated', {}).get('passthrough')}"))


if __name__ == "__main__":
    standalone(__doc__.splitlines()[0], run)
