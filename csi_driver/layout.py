"""Where things live under ``--data-dir`` (DESIGN §3), and the only code that
turns an ID into a path.

Every path builder asserts the ID's form first, so even a bug elsewhere that
forgets to validate cannot make a request's string into a path.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from csi_driver import fdtree, validation

log = logging.getLogger("fusepath.layout")

#: Mode of every directory that holds volumes' data (volumes, snapshots, tmp,
#: trash, lost+found): only root may pass. 0711 would still let any host user
#: who knows a path reach a volume and run a setuid file a pod left there.
PRIVATE_DIR_MODE = 0o700
#: An RPC spends at most this long removing a discarded tree; the trash
#: janitor removes the rest in the background.
DISCARD_SECONDS = 10.0


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
        """Make the layout, and (re)set the modes of an existing one: the
        data dir is 0711 (sockets and logs below it are reached by name), every
        directory holding volume data is 0700."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        for path in (self.volumes, self.snapshots, self.tmp, self.trash, self.lost_found):
            path.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
            os.chmod(path, PRIVATE_DIR_MODE)

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
    try:
        remove_tree(dest, time.monotonic() + DISCARD_SECONDS)
    except OSError as exc:  # a huge tree, a mount inside it: the trash janitor goes on (csi_driver.reconcile)
        log.warning("could not empty %s yet, will retry in the background: %s", dest, exc)


def remove_tree(path: Path, deadline: float | None = None) -> None:
    """Remove a tree a pod made: iterative, by directory fds, never following
    a symlink or crossing a mount (see ``csi_driver.fdtree``)."""
    parent = os.open(path.parent, fdtree.DIR_FLAGS)
    try:
        fdtree.remove_tree_at(parent, path.name, deadline)
    finally:
        os.close(parent)
