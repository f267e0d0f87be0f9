"""Start-up repair: finish or roll back whatever a crash interrupted.

Runs once, before the socket opens, so no RPC ever sees a half-done state.
The rules follow the commit points documented in ``volumes`` and
``snapshots``:

* volume ``creating``: its directory in ``volumes/`` means the rename
  happened, so it is finished; otherwise its ``tmp/`` work is rolled back.
* volume ``deleting``: always finished (the CO was told nothing yet and will
  retry DeleteVolume, which then finds nothing, which is success).
* before any of that, the source of every ``creating`` snapshot and clone is
  thawed: that row was written before the freeze, so it is the record that
  a freeze may be held by a driver that no longer exists.
* snapshot ``creating``: finished if its archive is in ``snapshots/``,
  otherwise rolled back. A group is finished only if every member is.
* snapshot ``deleting``: always finished (archive removed, then the row).
* ``tmp/`` and ``trash/`` hold only in-flight work and are emptied. A tree
  that cannot be removed (a mount inside it, a pod still rearranging it) is
  logged and left to the trash janitor, a background thread that retries
  with backoff: it never stops start-up.
* a directory in ``volumes/`` (or an archive in ``snapshots/``) with no row
  is somebody's data we cannot account for: it is moved to ``lost+found/``
  and logged, never deleted.
"""

from __future__ import annotations

import logging
import os
import threading
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

#: Start-up spends at most this long emptying tmp/ and trash/ before serving;
#: the trash janitor removes the rest (a pod's huge tree never delays start-up).
STARTUP_CLEANUP_SECONDS = 5.0


@dataclass
class Report:
    finished: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    lost_found: list[str] = field(default_factory=list)
    discarded: int = 0


def reconcile(ctx: DriverContext) -> Report:
    ctx.layout.create_dirs()
    report = Report()
    _thaw_interrupted(ctx)
    _volumes(ctx, report)
    _snapshots(ctx, report)
    _groups(ctx, report)
    deadline = time.monotonic() + STARTUP_CLEANUP_SECONDS
    report.discarded += _empty(ctx.layout.tmp, ctx.layout.trash, deadline) + _empty(ctx.layout.trash, None, deadline)
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
            _remove_or_trash(ctx.layout.volume_tmp(vol.id), ctx.layout.trash, time.monotonic() + 1.0)
            ctx.store.delete_volume_row(vol.id)
            report.rolled_back.append(vol.id)
    for vol in ctx.store.volumes_in_state(DELETING):
        manager.finish_delete(vol.id)
        report.finished.append(vol.id)


def _thaw_interrupted(ctx: DriverContext) -> None:
    """Thaw the sources of snapshots and clones a crash interrupted. A
    failure is logged, not fatal: the daemon's own freeze timeout still
    bounds the freeze."""
    if ctx.fusefs is None:
        return
    sources = {s.source_volume_id for s in ctx.store.snapshots_in_state(CREATING)}
    sources |= {v.source_id for v in ctx.store.volumes_in_state(CREATING) if v.source_kind == "volume"}
    staged = sorted(v for v in sources if (st := ctx.store.get_staging(v)) and st.mounter == "fusefs")
    if not staged:
        return
    try:
        ctx.fusefs.client().thaw(staged)
        log.info("thawed volumes a crash left frozen", extra={"fields": {"volumes": staged}})
    except Exception as exc:  # noqa: BLE001 - never fatal at start-up
        log.warning("could not thaw %s at start-up (the daemon auto-thaws them): %s", ",".join(staged), exc)


def _snapshots(ctx: DriverContext, report: Report) -> None:
    manager = SnapshotManager(ctx)
    for snap in ctx.store.snapshots_in_state(DELETING):
        if snap.group_id:
            manager.delete_group(snap.group_id)
        else:
            manager.finish_delete(snap.id)
        report.finished.append(snap.id)
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


def _empty(directory: Path, trash: Path | None, deadline: float | None = None) -> int:
    """Remove every entry of ``directory``; one that cannot be removed now
    (or by ``deadline``) is moved to ``trash`` (or left in it) for the
    janitor. Never raises."""
    count = 0
    with os.scandir(directory) as it:
        for entry in it:
            if _remove_or_trash(Path(entry.path), trash, deadline):
                count += 1
    return count


def _remove_or_trash(path: Path, trash: Path | None, deadline: float | None = None) -> bool:
    try:
        remove_tree(path, deadline)
        return True
    except OSError as exc:
        log.warning("could not remove %s now; the trash janitor retries: %s", path, exc)
        metrics.CLEANUP_FAILURES.inc()
    if trash is not None:
        try:
            os.rename(path, trash / f"{path.name}.{time.time_ns()}")
        except OSError as exc:
            log.warning("could not move %s to the trash either: %s", path, exc)
    return False


class TrashJanitor:
    """Empties ``trash/`` in the background until it is empty, retrying what
    fails with a backoff (1 s doubling to 1 min), and looks again every minute
    for what a failed removal in an RPC left. Start-up never waits for it."""

    MAX_DELAY = 60.0

    def __init__(self, trash: Path) -> None:
        self.trash = trash
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trash-janitor", daemon=True)

    def start(self) -> "TrashJanitor":
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        delay = 0.5
        while not self._stop.is_set():
            try:
                _empty(self.trash, None)
                with os.scandir(self.trash) as it:
                    left = next(it, None) is not None
            except OSError as exc:
                log.warning("trash janitor cannot read %s: %s", self.trash, exc)
                left = True
            delay = min(delay * 2, self.MAX_DELAY) if left else 0.5
            self._wake.wait(delay if left else self.MAX_DELAY)
            self._wake.clear()


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
