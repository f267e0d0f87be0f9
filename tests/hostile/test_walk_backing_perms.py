"""Issue 8 item 3: no host user but root reaches a volume's backing
directory, and clones and restores never carry setuid/setgid bits or file
capabilities (the documented default: they are stripped)."""

from __future__ import annotations

import os
import stat
import struct
import subprocess

import pytest

from tests.harness import MiB
from tests.hostile.walk_helpers import POD_UID, create_from, snapshot, uniq

pytestmark = pytest.mark.privileged
#: A version-2 vfs_cap_data granting CAP_NET_RAW (13), effective.
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def _as_pod_user(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={POD_UID}", f"--regid={POD_UID}", "--clear-groups", *argv],
                          capture_output=True, text=True, check=False)


def test_other_host_users_cannot_reach_a_volume_directory(driver):
    vol = driver.create_volume(uniq(), size=4 * MiB)
    root = driver.volume_dir(vol.volume_id)
    (root / "file").write_text("data")
    for name in ("volumes", "snapshots", "tmp", "trash", "lost+found"):
        assert stat.S_IMODE((driver.data_dir / name).stat().st_mode) == 0o700, name
    assert _as_pod_user("stat", str(root / "file")).returncode != 0
    assert _as_pod_user("ls", str(root)).returncode != 0


def test_start_up_fixes_the_modes_of_an_existing_data_dir(driver):
    for name in ("volumes", "snapshots", "tmp", "trash"):
        os.chmod(driver.data_dir / name, 0o755)
    driver.restart()
    for name in ("volumes", "snapshots", "tmp", "trash"):
        assert stat.S_IMODE((driver.data_dir / name).stat().st_mode) == 0o700, name


def _plant_privileged_files(root) -> None:
    tool = root / "tool"
    tool.write_bytes(b"#!/bin/sh\nid -u\n")
    os.chmod(tool, 0o4755)
    group_tool = root / "group-tool"
    group_tool.write_bytes(b"x")
    os.chmod(group_tool, 0o2755)
    capped = root / "capped"
    capped.write_bytes(b"x")
    os.setxattr(capped, "security.capability", CAPABILITY)
    shared = root / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)  # a setgid directory only passes its group on: kept


def _assert_stripped(root) -> None:
    assert stat.S_IMODE((root / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((root / "group-tool").stat().st_mode) == 0o755
    assert "security.capability" not in os.listxattr(root / "capped")
    assert stat.S_IMODE((root / "shared").stat().st_mode) == 0o2775


@pytest.mark.parametrize("kind", ["volume", "snapshot"])
def test_clones_and_restores_strip_setuid_setgid_and_capabilities(driver, kind):
    src = driver.create_volume(uniq(), size=16 * MiB)
    _plant_privileged_files(driver.volume_dir(src.volume_id))
    assert "security.capability" in os.listxattr(driver.volume_dir(src.volume_id) / "capped")
    source_id = snapshot(driver, src.volume_id).snapshot_id if kind == "snapshot" else src.volume_id
    copy = create_from(driver, kind, source_id, size=16 * MiB)
    _assert_stripped(driver.volume_dir(copy.volume_id))
