"""The e2e harness's own logic, without a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import harness
from .harness import NodeState, Options, Scenario, StepFailed, StepSkipped

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
100 22 0:50 / /var/lib/kubelet/plugins/kubernetes.io/csi/fusepath.csi.io/abc/globalmount rw shared:9 - fuse.fusefs fusefs rw
101 22 0:50 / /var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-1/mount rw shared:9 - fuse.fusefs fusefs rw
102 22 8:1 /var/lib/fusepath/volumes/vol-2 /var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pvc-2/mount rw - ext4 /dev/sda1 rw
103 22 0:60 / /var/lib/kubelet/pods/u3/volumes/kubernetes.io~secret/token rw - tmpfs tmpfs rw
104 22 0:61 / /mnt/other rw - fuse.sshfs host: rw
"""


def test_driver_mounts_are_fuse_or_csi_mounts_under_the_kubelet_dir() -> None:
    assert harness.driver_mounts(MOUNTINFO, "/var/lib/kubelet") == {
        "/var/lib/kubelet/plugins/kubernetes.io/csi/fusepath.csi.io/abc/globalmount",
        "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~csi/pvc-1/mount",
        "/var/lib/kubelet/pods/u2/volumes/kubernetes.io~csi/pvc-2/mount",
    }


def test_node_state_difference() -> None:
    before = NodeState(frozenset({"vol-a"}), frozenset(), frozenset({"/m1"}))
    after = NodeState(frozenset({"vol-a", "vol-b"}), frozenset({"snap-1.tar"}), frozenset({"/m1"}))
    extra = after.minus(before)
    assert not extra.empty() and extra.volumes == {"vol-b"} and extra.snapshots == {"snap-1.tar"}
    assert before.minus(before).empty()


@pytest.mark.parametrize("text, expected", [("64Mi", 64 << 20), ("1Gi", 1 << 30), ("128974848", 128974848),
                                            ("1G", 10**9)])
def test_quantity_bytes(text: str, expected: int) -> None:
    assert harness.quantity_bytes(text) == expected


def test_no_kubeconfig_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert "KUBECONFIG is not set" in harness.no_kubeconfig_reason()
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    assert "names no existing file" in harness.no_kubeconfig_reason()
    config = tmp_path / "config"
    config.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'missing'}:{config}")
    assert harness.no_kubeconfig_reason() is None
    assert harness.kubeconfig_path() == config


def test_a_failed_step_skips_what_needs_it() -> None:
    scenario = Scenario(Options(), log=lambda _: None)

    def boom() -> str:
        raise StepFailed("no")

    def skipped() -> str:
        raise StepSkipped("no CRDs")

    scenario._run_step("cluster", lambda: "ok", ())
    scenario._run_step("write", boom, ("cluster",))
    scenario._run_step("snapshot", lambda: "never", ("write",))
    scenario._run_step("optional", skipped, ("cluster",))
    scenario._run_step("restore", lambda: "never", ("optional",))
    scenario._run_step("cleanup", lambda: "done", ("cluster",), after_failure=True)
    status = {s.name: (s.status, s.detail) for s in scenario.steps}
    assert status["cluster"] == ("pass", "ok")
    assert status["write"][0] == "fail" and status["write"][1].startswith("no")
    assert status["snapshot"] == ("skip", "needs write")
    assert status["optional"] == ("skip", "no CRDs")
    assert status["restore"] == ("skip", "needs optional")
    assert status["cleanup"] == ("pass", "done")
    assert [s.name for s in harness.failed(scenario.steps)] == ["write"]
    text = harness.table(scenario.steps)
    assert text.splitlines()[0].split() == ["step", "result", "seconds", "detail"]
    assert len(text.splitlines()) == 2 + len(scenario.steps)


def test_wait_for_reports_the_last_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness.time, "sleep", lambda _: None)

    def never() -> None:
        raise RuntimeError("snapshot failed: frozen too long")

    with pytest.raises(StepFailed, match="frozen too long"):
        harness.wait_for("a thing", never, timeout=0)
    assert harness.wait_for("a thing", lambda: 42, timeout=0) == 42


def test_every_mode_has_its_kustomization() -> None:
    for mode, path in harness.MODES.items():
        assert path is None or (path / "kustomization.yaml").is_file(), mode


def test_the_ticker_ticks_and_stops_at_the_first_error(tmp_path: Path) -> None:
    """The restart steps' pod script, run here with sh and coreutils on a tmp dir instead of /data
    (the cluster runs it with busybox): numbered lines, fsynced, "ok N" every 20, and an ERROR line
    and exit 1 when a write fails."""
    import subprocess

    script = harness.TICKER.replace("/data", str(tmp_path))
    proc = subprocess.Popen(["sh", "-c", script, "ticker", "c1"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ok 20"
    finally:
        proc.kill()
        proc.wait()
    lines = (tmp_path / "c1.ticks").read_text().split()
    assert lines[:20] == [str(i) for i in range(1, 21)]
    assert (tmp_path / "c1.held").read_text().split()[:20] == [str(i) for i in range(1, 21)]
    # An append that fails ends the script with a line that says so.
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "c2.ticks").mkdir()  # dd cannot open a directory for writing, root or not
    result = subprocess.run(["sh", "-c", harness.TICKER.replace("/data", str(blocked)), "ticker", "c2"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout.strip() == "ERROR fsync 1"


def test_the_restart_steps_skip_without_a_fusefs_container() -> None:
    scenario = Scenario(Options(mode="driver-on-host"), log=lambda _: None)
    with pytest.raises(StepSkipped, match="run on the host"):
        scenario.ticking_node_pod()
