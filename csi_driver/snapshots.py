"""Snapshot lifecycle: cut a volume (or a group of volumes) into tar archives.

create:  row(creating) -> freeze -> archive into tmp/, fsync, rename into snapshots/ -> thaw -> row(ready)
delete:  row(deleting) -> archive removed -> row gone

The ``creating`` row, written before the freeze, is also the record of the
freeze: start-up reconciliation thaws the source of every ``creating``
snapshot (a driver killed mid-cut would otherwise leave the pod's volume
frozen until the daemon's own timeout). A ``deleting`` row is never listed
or restored from, and start-up finishes the delete, so no crash can leave a
ready snapshot whose archive is gone.

The rename is the commit point: at start-up a ``creating`` row whose archive
is in ``snapshots/`` is finished, one without is rolled back. A group's rows
are written in one transaction and the group is ready only when every
member's archive is in place, otherwise the whole group is rolled back.

Freezing: every staged fusefs source is frozen before any cut starts and
thawed after the last cut ends, so the members of a group are consistent
with each other (DESIGN §4).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterable
from contextlib import nullcontext

from csi_driver import archive, errors, faults, metrics
from csi_driver.context import DriverContext
from csi_driver.layout import discard
from csi_driver.state.store import CREATING, DELETING, READY, GroupSnapshot, Snapshot, Volume

log = logging.getLogger("fusepath.snapshots")


class SnapshotManager:
    def __init__(self, ctx: DriverContext) -> None:
        self.ctx = ctx

    def create(self, snapshot_id: str, name: str | None, source: Volume, compression: str,
               parameters: dict[str, str]) -> Snapshot:
        """Cut one snapshot; the caller holds the snapshot-name lock."""
        snap = Snapshot(
            id=snapshot_id, name=name, source_volume_id=source.id, state=CREATING, compression=compression,
            size_bytes=0, created_at_ns=time.time_ns(), parameters=parameters,
            source_capacity=source.capacity, access_type=source.access_type,
        )
        self.ctx.store.insert_snapshot(snap, durable=False)
        faults.point("snapshot.after_row")
        try:
            sizes = self._cut([snap])
        except BaseException:
            self._roll_back([snap])
            self.ctx.store.delete_snapshot_row(snap.id)
            raise
        self.ctx.store.finish_snapshot(snap.id, sizes[snap.id])
        return self.ctx.store.get_snapshot(snap.id)  # type: ignore[return-value]

    def create_group(self, group: GroupSnapshot, members: list[Snapshot]) -> GroupSnapshot:
        self.ctx.store.insert_group(group, members)
        try:
            sizes = self._cut(members)
        except BaseException:
            self._roll_back(members)
            self.ctx.store.delete_group_rows(group.id)
            raise
        for snap in members:
            self.ctx.store.set_snapshot_size(snap.id, sizes[snap.id])
        self.ctx.store.set_group_state(group.id, READY)
        return self.ctx.store.get_group(group.id)  # type: ignore[return-value]

    def _cut(self, snaps: list[Snapshot]) -> dict[str, int]:
        """Freeze every staged source, archive each one, thaw them all."""
        sources = [s.source_volume_id for s in snaps]
        with self.ctx.locks.hold_many(f"vol:{v}" for v in sources):
            for volume_id in sources:
                if not self.ctx.layout.volume_dir(volume_id).is_dir():
                    raise errors.not_found(f"source volume {volume_id} does not exist")
            with self._frozen(sources):
                faults.point("snapshot.after_freeze")
                return {s.id: self._archive(s) for s in snaps}

    def _frozen(self, volume_ids: Iterable[str]):  # type: ignore[no-untyped-def]
        staged = [v for v in volume_ids if (st := self.ctx.store.get_staging(v)) and st.mounter == "fusefs"]
        if staged and self.ctx.fusefs is not None:
            return self.ctx.fusefs.frozen(staged)
        return nullcontext()

    def _archive(self, snap: Snapshot) -> int:
        dest = self.ctx.layout.snapshot_file(snap.id, archive.archive_suffix(snap.compression))
        started = time.monotonic()
        try:
            size = archive.create_archive(
                self.ctx.layout.volume_dir(snap.source_volume_id), dest, snap.compression, self.ctx.layout.tmp,
                progress_reporter("snapshot", snap.id),
            )
        except archive.ArchiveError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise errors.exhausted(f"no space for the snapshot archive: {exc}") from exc
            if exc.errno is None:  # the volume holds something a restore would refuse; the message says what
                raise errors.failed_precondition(f"volume {snap.source_volume_id} cannot be snapshotted: {exc}")
            raise errors.internal(f"snapshot of {snap.source_volume_id} failed: {exc}") from exc
        faults.point("snapshot.after_archive")
        metrics.SNAPSHOT_BYTES.inc("create", amount=size)
        log.info("snapshot cut", extra={"fields": {
            "snapshot_id": snap.id, "volume_id": snap.source_volume_id, "bytes": size,
            "seconds": round(time.monotonic() - started, 3), "compression": snap.compression}})
        return size

    def _roll_back(self, snaps: Iterable[Snapshot]) -> None:
        for snap in snaps:
            self.remove_files(snap.id)

    def remove_files(self, snapshot_id: str) -> None:
        for path in self.ctx.layout.snapshot_files(snapshot_id):
            discard(path, self.ctx.layout.trash)

    def delete(self, snapshot_id: str) -> None:
        """Mark the row deleting, remove the archive, drop the row; the caller
        holds its lock. The mark comes first so that no crash leaves a ready
        row without its archive (start-up finishes a ``deleting`` row)."""
        self.ctx.store.set_snapshot_state(snapshot_id, DELETING)
        faults.point("snapshot.delete_after_mark")
        self.finish_delete(snapshot_id)

    def finish_delete(self, snapshot_id: str) -> None:
        self.remove_files(snapshot_id)
        faults.point("snapshot.delete_after_files")
        self.ctx.store.delete_snapshot_row(snapshot_id)

    def delete_group(self, group_id: str) -> None:
        members = self.ctx.store.snapshots_of_group(group_id)
        for snap in members:
            self.ctx.store.set_snapshot_state(snap.id, DELETING)
        for snap in members:
            self.remove_files(snap.id)
        self.ctx.store.delete_group_rows(group_id)


def progress_reporter(action: str, object_id: str, every: float = 5.0):  # type: ignore[no-untyped-def]
    """A progress callback for long archive work: a gauge always, a log line every few seconds."""
    started = last = time.monotonic()

    def report(done: int) -> None:
        nonlocal last
        metrics.SNAPSHOT_PROGRESS.set(done)
        now = time.monotonic()
        if now - last >= every:
            last = now
            log.info(f"{action} in progress", extra={"fields": {
                "id": object_id, "bytes": done, "seconds": round(now - started, 1),
                "mib_per_second": round(done / (1 << 20) / max(now - started, 1e-9), 1)}})

    return report
