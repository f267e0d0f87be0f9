"""Raw block volumes: a sparse file per volume, attached to a loop device.

Block access bypasses FUSE entirely (DESIGN §4): the pod gets the loop
device node bind-mounted at its target path. ``losetup`` is driven with
argument lists and its ``--json`` output, never a shell.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

IMAGE_NAME = "block.img"
SECTOR = 512


def image_path(volume_dir: Path) -> Path:
    return volume_dir / IMAGE_NAME


def create_image(volume_dir: Path, size: int) -> None:
    """A sparse backing file: takes no space until the pod writes to it."""
    with open(image_path(volume_dir), "wb") as f:
        f.truncate(size)
        os.fsync(f.fileno())


def grow_image(volume_dir: Path, size: int) -> None:
    path = image_path(volume_dir)
    if path.stat().st_size < size:
        with open(path, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())


def _losetup(args: list[str]) -> str:
    proc = subprocess.run(["losetup", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(f"losetup {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def devices_for(image: Path) -> list[str]:
    """Loop devices currently backed by ``image`` (normally zero or one)."""
    out = _losetup(["--json", "--list", "--output", "NAME,BACK-FILE"])
    if not out.strip():
        return []
    devices = json.loads(out).get("loopdevices", [])
    target = str(image)
    return [d["name"] for d in devices if (d.get("back-file") or "").removesuffix(" (deleted)") == target]


def be_attached(volume_dir: Path) -> str:
    """Attach the volume's image to a loop device (reusing an existing one)."""
    image = image_path(volume_dir)
    existing = devices_for(image)
    if existing:
        return existing[0]
    return _losetup(["--find", "--show", "--direct-io=on", str(image)]).strip()


def be_detached(volume_dir: Path) -> None:
    for device in devices_for(image_path(volume_dir)):
        _losetup(["--detach", device])


def refresh_size(device: str) -> None:
    """Make the loop device see a grown backing file (online expansion)."""
    _losetup(["--set-capacity", device])


def device_size(device: str) -> int:
    with open(device, "rb") as f:
        return f.seek(0, os.SEEK_END)
