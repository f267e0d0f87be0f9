"""What the shipped node DaemonSet's containers need, checked on a real mount.

The fusefs container raises each FUSE mount's read-ahead through
``/sys/class/bdi/<dev>/read_ahead_kb``. A container runtime may mount
``/sys`` read-only even in a privileged container, so the manifest gives
fusefs a writable bind of the host's ``/sys/devices/virtual/bdi``. These
tests rebuild that container's view of ``/sys`` from ``deploy/manifests/
node.yaml`` in a private mount namespace (``/sys`` read-only, then every
hostPath volume under ``/sys`` bound writable at its ``mountPath``), mount a
volume there with the real session, and read the bdi's read-ahead back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NODE_YAML = REPO / "deploy" / "manifests" / "node.yaml"
SINGLE_NODE_YAML = REPO / "deploy" / "overlays" / "single-node" / "node.yaml"
WANTED_READ_AHEAD_KB = 1024  # the session's default --read-ahead-kb

#: Runs inside ``unshare --mount --propagation private``: builds the
#: container's /sys, mounts SOURCE on MOUNTPOINT with the real session,
#: prints the mount's read_ahead_kb and the session's log as JSON, unmounts.
IN_CONTAINER = r"""
import json, os, subprocess, sys
from fusefs import mountinfo
spec = json.loads(sys.argv[1])
def run(*argv):
    subprocess.run(list(argv), check=True, capture_output=True, timeout=30)
run("mount", "-o", "remount,bind,ro", "/sys")
for host, inside in spec["binds"]:
    run("mount", "--bind", host, inside)
    run("mount", "-o", "remount,bind,rw", inside)
log = os.path.join(spec["tmp"], "session.log")
started = subprocess.run(
    [sys.executable, "-m", "fusefs.standalone", spec["source"], spec["mountpoint"],
     "--control-socket", os.path.join(spec["tmp"], "s.sock"), "--log-file", log],
    capture_output=True, text=True, timeout=90)
out = {"started": started.returncode, "stderr": started.stderr, "read_ahead_kb": None}
try:
    if started.returncode == 0:
        entry = mountinfo.top_mount(spec["mountpoint"])
        with open(f"/sys/class/bdi/{entry.major_minor}/read_ahead_kb") as f:
            out["read_ahead_kb"] = int(f.read())
        sys_ro = "ro" in mountinfo.top_mount("/sys").options
        out["sys_read_only"] = sys_ro
finally:
    subprocess.run(["umount", spec["mountpoint"]], capture_output=True, timeout=30)
with open(log, errors="replace") as f:
    out["log"] = f.read()
print(json.dumps(out))
"""


def fusefs_container(doc: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in doc["spec"]["template"]["spec"]["containers"] if c["name"] == "fusefs")


def node_daemonset() -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(NODE_YAML.read_text()) if d and d["kind"] == "DaemonSet")


def sys_binds_of_fusefs() -> list[tuple[str, str]]:
    """(host path, path in the container) of every hostPath under /sys that fusefs mounts writable."""
    ds = node_daemonset()
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    binds = []
    for mount in fusefs_container(ds).get("volumeMounts", []):
        host = volumes[mount["name"]].get("hostPath", {}).get("path", "")
        if mount["mountPath"].startswith("/sys/") and host and not mount.get("readOnly"):
            binds.append((host, mount["mountPath"]))
    return binds


def mount_in_container(tmp_path: Path, binds: list[tuple[str, str]]) -> dict[str, Any]:
    source, mountpoint = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    spec = {"binds": binds, "source": str(source), "mountpoint": str(mountpoint), "tmp": str(tmp_path)}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", IN_CONTAINER, json.dumps(spec)],
        capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["started"] == 0, out
    assert out["sys_read_only"], "the simulated container's /sys must be read-only"
    return out


def test_the_fusefs_container_binds_the_bdi_directory_writable() -> None:
    assert ("/sys/devices/virtual/bdi", "/sys/devices/virtual/bdi") in sys_binds_of_fusefs()


@pytest.mark.privileged
def test_read_ahead_takes_effect_in_the_shipped_fusefs_container(tmp_path: Path) -> None:
    out = mount_in_container(tmp_path, sys_binds_of_fusefs())
    assert out["read_ahead_kb"] == WANTED_READ_AHEAD_KB, out["log"]
    assert "could not set read-ahead" not in out["log"]


@pytest.mark.privileged
def test_a_read_only_sys_without_the_bind_loses_the_read_ahead(tmp_path: Path) -> None:
    """The situation the bind fixes (and proof that the check above can fail)."""
    out = mount_in_container(tmp_path, [])
    assert out["read_ahead_kb"] != WANTED_READ_AHEAD_KB
    assert "could not set read-ahead" in out["log"]
    assert "Read-only file system" in out["log"]


def test_distributed_snapshotters_do_not_probe_for_group_snapshots() -> None:
    """The default layout's RBAC denies group snapshot objects on purpose; the
    sidecar is told so, instead of probing and warning that the CRDs are missing."""
    ds = node_daemonset()
    snap = next(c for c in ds["spec"]["template"]["spec"]["containers"] if c["name"] == "csi-snapshotter")
    assert "--feature-gates=CSIVolumeGroupSnapshot=false" in snap["args"]
    rbac = [d for d in yaml.safe_load_all((REPO / "deploy" / "manifests" / "rbac-node.yaml").read_text()) if d]
    groups = {g for d in rbac for rule in d.get("rules", []) for g in rule.get("apiGroups", [])}
    assert "snapshot.storage.k8s.io" in groups and "groupsnapshot.storage.k8s.io" not in groups
    overlay = next(d for d in yaml.safe_load_all(SINGLE_NODE_YAML.read_text()) if d)
    snap = next(c for c in overlay["spec"]["template"]["spec"]["containers"] if c["name"] == "csi-snapshotter")
    assert "--feature-gates=CSIVolumeGroupSnapshot=true" in snap["args"]


HOLDER_YAML = REPO / "deploy" / "manifests" / "holder.yaml"


def holder_container() -> dict[str, Any]:
    ds = next(d for d in yaml.safe_load_all(HOLDER_YAML.read_text()) if d and d["kind"] == "DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    return container


def setpriv_args(ctx: dict[str, Any]) -> list[str]:
    """The holder container's securityContext as setpriv options (only what it uses)."""
    assert set(ctx) <= {"runAsUser", "runAsGroup", "allowPrivilegeEscalation", "readOnlyRootFilesystem",
                        "capabilities", "seccompProfile"}, ctx
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    args = [f"--reuid={ctx['runAsUser']}", f"--regid={ctx.get('runAsGroup', ctx['runAsUser'])}",
            "--clear-groups", "--bounding-set=-all", "--inh-caps=-all"]
    if ctx["allowPrivilegeEscalation"] is False:
        args.append("--no-new-privs")
    return args


@pytest.mark.privileged
def test_the_holder_keeps_a_dev_fuse_descriptor_with_the_manifests_privileges(tmp_path: Path) -> None:
    """The holder needs no privilege: run as holder.yaml says (no capability at all, no new
    privileges), it takes a /dev/fuse descriptor and gives back the same open file, on a socket
    only root can reach."""
    from fusefs.kernel import handover

    c = holder_container()
    assert c["command"] == ["fusefs"] and c["args"][0] == "holder"
    socket_dir = tmp_path / "holder"
    sock = socket_dir / "holder.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(["setpriv", *setpriv_args(c["securityContext"]), "--", sys.executable, "-m",
                             "fusefs.cli", "holder", f"--socket={sock}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO, text=True)
    fuse = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        status = Path(f"/proc/{proc.pid}/status").read_text()
        assert "CapEff:\t0000000000000000" in status and "NoNewPrivs:\t1" in status
        assert oct(sock.stat().st_mode & 0o777) == "0o600"
        assert sock.stat().st_uid == 0
        handover.put(str(sock), "vol-1", [fuse])
        (back,) = handover.take(str(sock), "vol-1")
        try:
            # The same open file description: a flag set through one shows through the other.
            mine, theirs = os.fstat(fuse), os.fstat(back)
            assert (mine.st_rdev, mine.st_ino) == (theirs.st_rdev, theirs.st_ino)
            os.set_blocking(back, False)
            assert not os.get_blocking(fuse)
        finally:
            os.close(back)
    finally:
        os.close(fuse)
        proc.terminate()
        proc.wait(10)
