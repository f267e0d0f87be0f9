"""Start-up repair: finish or roll back whatever a crash interrupted.

Runs once, before the socket opens, so no RPC ever sees a half-done state.
The rules follow the commit points documented in ``volumes`` and
``snapshots``:

* volume ``creating``: its directory in ``volumes/`` means the rename
  happened, so it is finished; otherwise its ``tmp/`` work is rolled back.
* volume ``deleting``: always finished (the CO was told nothing yet and will
  retry DeleteVolume, which then finds nothing, which is success).
* snapshot ``creating``: finished if its archive is in ``snapshots/``,
  otherwise rolled back. A group is finished only if every member is.
* ``tmp/`` and ``trash/`` hold only in-flight work and are emptied.
* a directory in ``volumes/`` (or an archive in ``snapshots/``) with no row
  is somebody's data we cannot account for: it is moved to ``lost+found/``
  and logged, never deleted.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver import metrics, validation
from csi_driver.context import DriverContext
from csi_driver.layout import fsync_dir, remove_tree
from csi_driver.snapshots import SnapshotManager
from csi_driver.state.store import CREATING, DELETING, READY
from csi_driver.volumes import VolumeManager

log = logging.getLogger("fusepath.reconcile")


@dataclass
class Report:
    finished: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    lost_found: list[str] = field(default_factory=list)
    discarded: int = 0


def reconcile(ctx: DriverContext) -> Report:
    ctx.layout.create_dirs()
    report = Report()
    _volumes(ctx, report)
    _snapshots(ctx, report)
    _groups(ctx, report)
    report.discarded += _empty(ctx.layout.tmp) + _empty(ctx.layout.trash)
    _strays(ctx, report)
    log.info("start-up reconciliation done", extra={"fields": {
        "finished": report.finished, "rolled_back": report.rolled_back,
        "lost_found": report.lost_found, "discarded": report.discarded}})
    return report


def _volumes(ctx: DriverContext, report: Report) -> None:
    manager = VolumeManager(ctx)
    for vol in ctx.store.volumes_in_state(CREATING):
        if ctx.layout.volume_dir(vol.id).is_dir():
            ctx.store.set_volume_state(vol.id, READY)
            report.finished.append(vol.id)
        else:
            remove_tree(ctx.layout.volume_tmp(vol.id))
            ctx.store.delete_volume_row(vol.id)
            report.rolled_back.append(vol.id)
    for vol in ctx.store.volumes_in_state(DELETING):
        manager.finish_delete(vol.id)
        report.finished.append(vol.id)


def _snapshots(ctx: DriverContext, report: Report) -> None:
    for snap in ctx.store.snapshots_in_state(CREATING):
        if snap.group_id:
            continue  # decided with its group
        files = ctx.layout.snapshot_files(snap.id)
        if files:
            ctx.store.finish_snapshot(snap.id, files[0].stat().st_size)
            report.finished.append(snap.id)
        else:
            ctx.store.delete_snapshot_row(snap.id)
            report.rolled_back.append(snap.id)


def _groups(ctx: DriverContext, report: Report) -> None:
    manager = SnapshotManager(ctx)
    for group in ctx.store.groups_in_state(CREATING):
        members = ctx.store.snapshots_of_group(group.id)
        files = {s.id: ctx.layout.snapshot_files(s.id) for s in members}
        if members and all(files.values()):
            for snap in members:
                ctx.store.set_snapshot_size(snap.id, files[snap.id][0].stat().st_size)
            ctx.store.set_group_state(group.id, READY)
            report.finished.append(group.id)
        else:
            manager.delete_group(group.id)
            report.rolled_back.append(group.id)


def _empty(directory: Path) -> int:
    count = 0
    for entry in os.scandir(directory):
        remove_tree(Path(entry.path))
        count += 1
    return count


def _strays(ctx: DriverContext, report: Report) -> None:
    known_volumes = ctx.store.all_volume_ids()
    for entry in os.scandir(ctx.layout.volumes):
        if entry.name not in known_volumes:
            _to_lost_found(ctx, entry.path, entry.name, report)
    known_snapshots = ctx.store.all_snapshot_ids()
    for entry in os.scandir(ctx.layout.snapshots):
        snapshot_id = entry.name.split(".", 1)[0]
        if not validation.is_id(snapshot_id, "snap-") or snapshot_id not in known_snapshots:
            _to_lost_found(ctx, entry.path, entry.name, report)


def _to_lost_found(ctx: DriverContext, path: str, name: str, report: Report) -> None:
    dest = ctx.layout.lost_found / f"{name}.{time.strftime('%Y%m%dT%H%M%S')}"
    os.rename(path, dest)
    fsync_dir(ctx.layout.lost_found)
    report.lost_found.append(str(dest))
    metrics.LOST_FOUND.inc()
    log.warning("moved untracked data to lost+found; inspect it and delete it by hand if unwanted",
                extra={"fields": {"from": path, "to": str(dest)}})
