"""The daemon's kernel-engine plumbing without FUSE: flags, session command
lines, leftover sessions by volume, and the holder's refusal to steal a
socket another holder serves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from csi_driver import config
from fusefs import cli
from fusefs.kernel import handover
from fusefs.supervisor import PACKAGE_ROOT, SessionSpec, find_stale_sessions

VID = "vol-" + "a" * 32


def test_engine_and_holder_flags_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSEFS_ENGINE", raising=False)
    args = cli.serve_parser().parse_args([])
    assert (args.engine, args.holder_socket) == ("kernel", "")
    monkeypatch.setenv("FUSEFS_ENGINE", "libfuse")
    assert cli.serve_parser().parse_args([]).engine == "libfuse"
    monkeypatch.setenv("FUSEFS_ENGINE", "kernel")
    monkeypatch.setenv("FUSEFS_HOLDER_SOCKET", "/run/h/holder.sock")
    args = cli.serve_parser().parse_args([])
    assert (args.engine, args.holder_socket) == ("kernel", "/run/h/holder.sock")
    assert cli.serve_parser().parse_args(["--engine", "libfuse"]).engine == "libfuse"


@pytest.mark.parametrize("argv", [["--engine", "fuse3"], ["--engine", "kernel", "--holder-socket", "rel.sock"]])
def test_bad_engine_flags_exit_2_before_anything_starts(argv: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--state-dir", str(tmp_path / "s"), *argv]) == 2
    assert not (tmp_path / "s").exists()
    assert "fusefs serve:" in capsys.readouterr().err


def test_holder_needs_an_absolute_socket(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["holder", "--socket", "rel.sock"]) == 2
    assert "absolute" in capsys.readouterr().err


def test_driver_passes_the_engine_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FUSEPATH_FUSEFS_ENGINE", raising=False)  # FUSEFS_TEST_ENGINE sets it for drivers
    assert config.from_args(config.build_parser().parse_args([])).fusefs_engine == "kernel"
    cfg = config.from_args(config.build_parser().parse_args(["--fusefs-engine", "libfuse"]))
    assert cfg.fusefs_engine == "libfuse"
    monkeypatch.setenv("FUSEPATH_FUSEFS_ENGINE", "libfuse")
    assert config.from_args(config.build_parser().parse_args([])).fusefs_engine == "libfuse"
    with pytest.raises(SystemExit):
        config.build_parser().parse_args(["--fusefs-engine", "other"])


def test_session_command_lines() -> None:
    base = dict(volume_id=VID, source="/v", mountpoint="/k/m", control_socket="/s/x.sock")
    libfuse = SessionSpec(**base, engine="libfuse").argv()
    assert libfuse[libfuse.index("--engine"):][:2] == ["--engine", "libfuse"]  # explicit: sessions default to kernel
    assert "--state-file" not in libfuse
    argv = SessionSpec(**base, engine="kernel", state_file="/st/k", holder_sockets=("/a", "/b")).argv()
    tail = argv[argv.index("--engine"):]
    assert tail == ["--engine", "kernel", "--state-file", "/st/k", "--holder-socket", "/a", "--holder-socket", "/b"]
    assert SessionSpec(**base, engine="kernel", state_file="/st/k", holder_sockets=("/a",),
                       takeover=True).argv()[-1] == "--takeover"


def test_the_session_accepts_several_holders() -> None:
    from fusefs.session import build_parser

    args = build_parser().parse_args(["--volume-id", VID, "--source", "/v", "--mountpoint", "/m",
                                      "--control-socket", "/c", "--holder-socket", "/a", "--holder-socket", "/b"])
    assert args.holder_socket == ["/a", "/b"]


def test_leftover_sessions_are_found_by_volume(tmp_path: Path) -> None:
    """find_stale_sessions(dir, socket) finds only that volume's session."""
    fake = "import sys, time; print('up', flush=True); time.sleep(60)"
    procs = []
    try:
        for name in ("a", "b"):
            # A process whose command line looks like a session of ours.
            procs.append(subprocess.Popen(
                [sys.executable, "-c", fake, "-m", "fusefs.session", "--control-socket", str(tmp_path / f"{name}.sock")],
                stdout=subprocess.PIPE))
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == b"up"
        assert {procs[0].pid, procs[1].pid} <= set(find_stale_sessions(tmp_path))
        assert find_stale_sessions(tmp_path, str(tmp_path / "a.sock")) == [procs[0].pid]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_holder_never_steals_a_live_holders_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "h.sock")
    env = {"PYTHONPATH": PACKAGE_ROOT}
    first = subprocess.Popen([sys.executable, "-m", "fusefs.kernel.handover", "--socket", sock],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == b"ready"
        r, w = os.pipe()
        handover.put(sock, "k", [r])
        second = subprocess.run([sys.executable, "-m", "fusefs.kernel.handover", "--socket", sock],
                                capture_output=True, env=env, timeout=30, check=False)
        assert second.returncode == 1 and b"another holder" in second.stderr
        for fd in handover.take(sock, "k"):  # the first one still serves, with what it kept
            os.close(fd)
        os.close(r)
        os.close(w)
    finally:
        first.terminate()
        first.wait(10)
    # A dead holder's socket file is no obstacle.
    third = subprocess.Popen([sys.executable, "-m", "fusefs.kernel.handover", "--socket", sock],
                             stdout=subprocess.PIPE, env=env)
    try:
        assert third.stdout is not None and third.stdout.readline().strip() == b"ready"
        with pytest.raises(OSError, match="not found"):
            handover.take(sock, "k")
    finally:
        third.terminate()
        third.wait(10)


def test_the_embedded_daemon_always_names_its_engine(tmp_path: Path) -> None:
    """A libfuse daemon started without ``--engine`` would run the kernel
    engine (the default), which is what the driver's --fusefs-engine=libfuse
    got after the default changed."""
    from fusefs.embedded import daemon_argv

    for engine in ("libfuse", "kernel"):
        argv = daemon_argv(tmp_path, tmp_path, engine=engine)
        assert argv[argv.index("--engine") + 1] == engine


@pytest.mark.parametrize("flag", ["--no-xattrs", "--splice"])
def test_libfuse_only_options_are_refused_on_the_kernel_engine(flag: str, tmp_path: Path) -> None:
    """The kernel engine has no such mode; accepting the flag would promise
    what it does not do."""
    from fusefs.session import main

    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    argv = ["--volume-id", VID, "--source", str(tmp_path / "src"), "--mountpoint", str(tmp_path / "mnt"),
            "--control-socket", str(tmp_path / "c.sock"), "--engine", "kernel", flag]
    assert main(argv) == 2
    assert not os.path.ismount(tmp_path / "mnt")
