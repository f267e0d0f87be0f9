"""Where things live under ``--data-dir`` (DESIGN §3), and the only code that
turns an ID into a path.

Every path builder asserts the ID's form first, so even a bug elsewhere that
forgets to validate cannot make a request's string into a path.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from csi_driver import validation


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def trash(self) -> Path:
        return self.root / "trash"

    @property
    def lost_found(self) -> Path:
        return self.root / "lost+found"

    def create_dirs(self) -> None:
        for path in (self.volumes, self.snapshots, self.tmp, self.trash, self.lost_found):
            path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)

    def volume_dir(self, volume_id: str) -> Path:
        _require(volume_id, validation.VOLUME_PREFIX)
        return self.volumes / volume_id

    def volume_tmp(self, volume_id: str) -> Path:
        _require(volume_id, validation.VOLUME_PREFIX)
        return self.tmp / volume_id

    def snapshot_file(self, snapshot_id: str, suffix: str) -> Path:
        _require(snapshot_id, validation.SNAPSHOT_PREFIX)
        return self.snapshots / f"{snapshot_id}{suffix}"

    def snapshot_files(self, snapshot_id: str) -> list[Path]:
        """Every archive of a snapshot, whatever its compression suffix."""
        _require(snapshot_id, validation.SNAPSHOT_PREFIX)
        return [p for p in self.snapshots.glob(f"{snapshot_id}.tar*")]


def _require(value: str, prefix: str) -> None:
    if not validation.is_id(value, prefix):
        raise ValueError(f"refusing to build a path from {value!r}")


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(src: Path, dst: Path) -> None:
    """Atomically move a finished tree into place and make the move durable.

    One fsync of the destination directory suffices on journaling filesystems
    (ext4, xfs): a rename is one journal transaction covering both
    directories. Were the source entry to survive a power cut, it would be in
    ``tmp/``, which start-up empties.
    """
    os.rename(src, dst)
    fsync_dir(dst.parent)


def discard(path: Path, trash: Path) -> None:
    """Delete a tree in two steps: an atomic rename into ``trash``, then removal.

    After the rename the tree is out of sight, so a crash mid-removal leaves
    only trash, which start-up empties, never a half-deleted volume. The
    rename is not fsynced: the caller's final durable commit is what the CO
    is answered on, and a delete the power cut undid is simply retried.
    """
    if not path.exists() and not path.is_symlink():
        return
    dest = trash / f"{path.name}.{time.time_ns()}"
    os.rename(path, dest)
    remove_tree(dest)


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=False, onerror=_make_writable_and_retry)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _make_writable_and_retry(func, path, _exc_info) -> None:  # type: ignore[no-untyped-def]
    """A volume may hold read-only directories: open them up and try again."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        func(path)
    except FileNotFoundError:
        pass
