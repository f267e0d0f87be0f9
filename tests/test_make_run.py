"""``make run`` and ``make clean`` as a newcomer uses them, with real processes.

Each test runs the repository's own Makefile with ``RUN_DIR`` in its tmp
dir and this venv (``-o`` tells make the venv is installed, so nothing is
installed here), on a free metrics port:

- a second ``make run`` in the same directory, or a second driver on the
  same ``--data-dir`` or endpoint, refuses with one line and leaves the first
  one reachable;
- Ctrl-C (SIGINT to the foreground process group, as a terminal sends it)
  leaves no process behind and says what it left mounted;
- ``make clean`` never deletes through a mount.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusefs.mountinfo import parse as parse_mountinfo
from tests.harness import unmount_all_under

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
STAMP = VENV / ".installed"
CSI = VENV / "bin" / "fusepath-csi"
START_TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def _installed() -> None:
    if not CSI.is_file() or not STAMP.is_file():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{CSI} is not installed: run the suite through `make test`")
        pytest.skip(f"needs the venv that `make test` builds ({CSI} or {STAMP} is missing)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make(run_dir: Path, *targets: str, metrics: str = "") -> list[str]:
    return ["make", "--no-print-directory", "-C", str(REPO), "-o", str(STAMP), f"VENV={VENV}",
            f"RUN_DIR={run_dir}", f"METRICS_ADDRESS={metrics}", *targets]


def start_make_run(run_dir: Path, metrics: str, log: Path) -> subprocess.Popen:
    """`make run` in its own process group, as a shell's foreground job."""
    with log.open("wb") as out:
        return subprocess.Popen(make(run_dir, "run", metrics=metrics), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def client(endpoint: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CSI), "client", "--endpoint", endpoint, *args],
                          capture_output=True, text=True, timeout=60)


def wait_ready(endpoint: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"make run exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        probe = client(endpoint, "probe")
        if probe.returncode == 0 and json.loads(probe.stdout).get("ready"):
            return
        time.sleep(0.3)
    pytest.fail(f"make run not ready after {START_TIMEOUT}s:\n{log.read_text()[-3000:]}")


def processes_mentioning(text: str) -> dict[int, str]:
    """Every live process whose command line contains ``text`` (ours are all named by the run dir)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if text in cmdline and state not in ("Z", "X"):
            found[int(entry)] = cmdline
    return found


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    return [e.mount_point for e in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
            if e.mount_point.startswith(prefix)]


def interrupt(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    """Ctrl-C: SIGINT to the whole foreground process group, then wait."""
    os.killpg(proc.pid, signal.SIGINT)
    return proc.wait(timeout=timeout)


@pytest.fixture
def run_dir(tmp_path: Path):
    """A RUN_DIR whose processes and mounts are gone after the test, whatever happened."""
    path = tmp_path / "run"
    yield path
    for pid in processes_mentioning(str(path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    unmount_all_under(tmp_path)


def test_make_run_twice_refuses_and_the_first_keeps_serving(run_dir: Path, tmp_path: Path) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    endpoint = f"unix://{run_dir}/csi.sock"
    first = start_make_run(run_dir, metrics, tmp_path / "first.log")
    try:
        wait_ready(endpoint, first, tmp_path / "first.log")
        second = subprocess.run(make(run_dir, "run", metrics=metrics), capture_output=True, text=True,
                                timeout=START_TIMEOUT)
        assert second.returncode != 0
        ours = [line for line in second.stderr.splitlines() if line.startswith("fusepath-csi:")]
        assert len(ours) == 1 and "already" in ours[0] and str(run_dir / "data") in ours[0], second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        assert "reconcil" not in second.stdout + second.stderr  # refused before touching the data dir
        assert first.poll() is None
        assert client(endpoint, "probe").returncode == 0, "the first driver lost its socket"

        # Same data dir, another endpoint and no metrics: refused as well.
        other = subprocess.run([str(CSI), f"--endpoint=unix://{tmp_path}/other.sock",
                                f"--data-dir={run_dir / 'data'}", f"--kubelet-dir={run_dir / 'kubelet'}",
                                "--metrics-address=", "--log-format=text"],
                               capture_output=True, text=True, timeout=START_TIMEOUT)
        assert other.returncode != 0 and other.stderr.count("\n") == 1, other.stderr
        assert other.stderr.startswith("fusepath-csi:") and "already" in other.stderr
        assert not (tmp_path / "other.sock").exists()

        # Another data dir on the live endpoint: the live socket is never unlinked.
        taken = subprocess.run([str(CSI), f"--endpoint={endpoint}", f"--data-dir={tmp_path / 'data2'}",
                                f"--kubelet-dir={run_dir / 'kubelet'}", "--metrics-address=",
                                "--log-format=text"], capture_output=True, text=True, timeout=START_TIMEOUT)
        assert taken.returncode != 0 and taken.stderr.count("\n") == 1, taken.stderr
        assert str(run_dir / "csi.sock") in taken.stderr
        assert client(endpoint, "probe").returncode == 0, "the first driver lost its socket"
        assert first.poll() is None
    finally:
        interrupt(first)


@pytest.mark.privileged
def test_ctrl_c_leaves_no_process_and_says_what_stays_mounted(run_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "make-run.log"
    endpoint = f"unix://{run_dir}/csi.sock"
    proc = start_make_run(run_dir, "", log)
    wait_ready(endpoint, proc, log)
    created = client(endpoint, "create-volume", "ctrl-c", "--capacity", "8Mi")
    assert created.returncode == 0, created.stderr
    volume_id = json.loads(created.stdout)["volume"]["volume_id"]
    staging, target = run_dir / "kubelet" / "staging", run_dir / "kubelet" / "pods" / "p" / "mount"
    assert client(endpoint, "node-stage", volume_id, str(staging)).returncode == 0
    published = client(endpoint, "node-publish", volume_id, str(target), "--staging-path", str(staging))
    assert published.returncode == 0, published.stdout + published.stderr
    (target / "data").write_text("kept")
    assert processes_mentioning(str(run_dir))

    interrupt(proc)

    left = processes_mentioning(str(run_dir))
    assert not left, f"Ctrl-C left processes behind: {left}"
    output = log.read_text()
    still = mounts_under(run_dir)
    assert str(target) in still, "fusefs leaves publications in place (a dead mount beats an empty dir)"
    report = [line for line in output.splitlines() if "left mounted" in line]
    assert len(report) == 1 and str(target) in report[0] and "make clean" in report[0], output[-3000:]

    cleaned = subprocess.run(make(run_dir, "clean") + [f"VENV={tmp_path / 'no-venv'}"],
                             capture_output=True, text=True, timeout=120)
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not mounts_under(run_dir) and not run_dir.exists()


def test_make_clean_refuses_while_the_driver_runs(run_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "make-run.log"
    proc = start_make_run(run_dir, "", log)
    try:
        wait_ready(f"unix://{run_dir}/csi.sock", proc, log)
        cleaned = subprocess.run(make(run_dir, "clean") + [f"VENV={tmp_path / 'no-venv'}"],
                                 capture_output=True, text=True, timeout=120)
        assert cleaned.returncode != 0
        assert "still running" in cleaned.stderr and "Traceback" not in cleaned.stderr, cleaned.stderr
        assert (run_dir / "data" / "state.db").exists()
        assert proc.poll() is None
    finally:
        interrupt(proc)


@pytest.mark.privileged
def test_make_clean_never_deletes_through_a_mount(run_dir: Path, tmp_path: Path) -> None:
    """Something mounted under RUN_DIR (here a bind of a directory outside it)
    is unmounted, never emptied: only RUN_DIR's own files go."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    inside = run_dir / "kubelet" / "pods" / "p" / "mount"
    inside.mkdir(parents=True)
    (run_dir / "data").mkdir()
    (run_dir / "data" / "junk").write_text("delete me")
    subprocess.run(["mount", "--bind", str(outside), str(inside)], check=True)
    cleaned = subprocess.run(make(run_dir, "clean") + [f"VENV={tmp_path / 'no-venv'}"],
                             capture_output=True, text=True, timeout=120)
    assert (outside / "precious").read_text() == "keep me", cleaned.stdout + cleaned.stderr
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not mounts_under(run_dir) and not run_dir.exists()


def test_a_busy_metrics_port_is_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    """`make run` while something else holds 127.0.0.1:9808: say so, start no fusefs daemon."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        data = tmp_path / "data"
        proc = subprocess.run([str(CSI), f"--endpoint=unix://{tmp_path}/csi.sock", f"--data-dir={data}",
                               f"--kubelet-dir={tmp_path}", f"--metrics-address={address}", "--log-format=text"],
                              capture_output=True, text=True, timeout=START_TIMEOUT)
    left = processes_mentioning(str(data))
    for pid in left:  # the old code left a fusefs daemon here: never leave it to the machine
        os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("fusepath-csi:"), proc.stderr
    assert address in proc.stderr and "--metrics-address" in proc.stderr
    assert not left, "a fusefs daemon was left behind"
    assert not (tmp_path / "csi.sock").exists()
