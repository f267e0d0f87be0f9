"""SQLite-backed records of volumes, snapshots, stagings and publications.

Every method is one short transaction, so a crash between two of them leaves
a state that start-up reconciliation understands (see ``csi_driver.reconcile``).
Each thread gets its own connection (SQLite connections must not be shared
across threads), WAL lets readers run beside the single writer, and
``BEGIN IMMEDIATE`` takes the write lock up front so two writers never
deadlock on a lock upgrade.

Nothing here is O(number of volumes) per call: lookups go through primary
keys or unique indexes, and the promised capacity is a maintained counter.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csi_driver.state import schema
from csi_driver.state.writelock import FifoLock

CREATING, READY, DELETING = "creating", "ready", "deleting"


@dataclass(frozen=True)
class Volume:
    id: str
    name: str | None
    state: str
    capacity: int
    access_type: str
    parameters: dict[str, str]
    mutable_parameters: dict[str, str]
    source_kind: str = ""
    source_id: str = ""
    ephemeral_handle: str | None = None
    created_at: float = 0.0
    rowid: int = 0


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str | None
    source_volume_id: str
    state: str
    compression: str
    size_bytes: int
    created_at_ns: int
    group_id: str = ""
    parameters: dict[str, str] = field(default_factory=dict)
    source_capacity: int = 0
    access_type: str = "mount"
    rowid: int = 0


@dataclass(frozen=True)
class GroupSnapshot:
    id: str
    name: str
    state: str
    source_volume_ids: list[str]
    parameters: dict[str, str]
    created_at_ns: int


@dataclass(frozen=True)
class Staging:
    volume_id: str
    staging_path: str
    mounter: str
    read_only: bool
    capability: dict[str, Any]
    loop_device: str = ""


@dataclass(frozen=True)
class Publication:
    target_path: str
    volume_id: str
    staging_path: str
    read_only: bool
    capability: dict[str, Any]


@dataclass(frozen=True)
class Attachment:
    volume_id: str
    node_id: str
    read_only: bool


class Store:
    """The driver's state database. Thread-safe; one connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        # One writer at a time, queued here rather than in SQLite: a writer
        # that finds SQLite's write lock taken sleeps in its busy handler in
        # steps of up to 100 ms, whenever the lock is freed, so 16 concurrent
        # writers made the control plane's p99 ten times its p50 (86% of the
        # handlers' time was spent asleep in BEGIN IMMEDIATE). This queue
        # wakes the oldest waiting writer the moment the previous one
        # commits. Only this process writes state.db; the busy timeout stays
        # as a safety net.
        self._write_lock = FifoLock()
        conn = self._conn()
        schema.migrate(conn)

    # -- connections -------------------------------------------------------
    def _conn(self, durable: bool = True) -> sqlite3.Connection:
        """This thread's connection: ``durable`` commits fsync the WAL, the others do not.

        Two connections per thread, rather than flipping ``PRAGMA synchronous``
        around each transaction, keep the hot path to the statements that do
        work. Both see the same database; each is used by one thread only.
        """
        name = "conn" if durable else "fast_conn"
        conn = getattr(self._local, name, None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before the RPC answers, so a power cut
            # never forgets a volume the CO was told about.
            conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys=ON")
            setattr(self._local, name, conn)
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction; commits on success, rolls back on any error.

        ``durable=False`` skips the WAL fsync at commit. It is for the *first*
        step of a multi-step operation (a ``creating`` or ``deleting`` mark):
        the step that finishes the operation commits durably, and its fsync of
        the append-only WAL makes every earlier frame durable too. If the power
        fails in between, the CO has had no answer and retries, and start-up
        reconciliation handles every state the non-durable mark can leave
        (see ``csi_driver.volumes``). A process crash loses nothing either way.
        """
        conn = self._conn(durable)
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _one(self, sql: str, args: tuple | dict = ()) -> sqlite3.Row | None:
        return self._conn().execute(sql, args).fetchone()

    def _all_rows(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, args).fetchall()

    def healthy(self) -> bool:
        """Probe: the database answers a read."""
        try:
            return self._one("SELECT 1") is not None
        except sqlite3.Error:
            return False

    def schema_version(self) -> int:
        return int(self._one("PRAGMA user_version")[0])

    def close(self) -> None:
        with self._all_lock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all.clear()
        self._local = threading.local()

    # -- capacity ------------------------------------------------------------
    def committed_bytes(self) -> int:
        return int(self._one("SELECT value FROM counters WHERE name='committed_bytes'")[0])

    @staticmethod
    def _add_committed(conn: sqlite3.Connection, delta: int) -> None:
        conn.execute("UPDATE counters SET value = value + ? WHERE name='committed_bytes'", (delta,))

    # -- volumes -------------------------------------------------------------
    def insert_volume(self, vol: Volume, max_committed: int | None = None, durable: bool = True) -> bool:
        """Record a volume in state ``creating`` and promise its capacity.

        With ``max_committed``, the insert and the capacity check are one
        transaction, so two concurrent creates cannot both take the last bytes.
        Returns False (and inserts nothing) when the promise would pass it.
        """
        with self.transaction(durable) as conn:
            if max_committed is not None:
                committed = conn.execute("SELECT value FROM counters WHERE name='committed_bytes'").fetchone()[0]
                if committed + vol.capacity > max_committed:
                    return False
            conn.execute(
                "INSERT INTO volumes(id, name, ephemeral_handle, state, capacity, access_type, parameters,"
                " mutable_parameters, source_kind, source_id, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    vol.id, vol.name, vol.ephemeral_handle, vol.state, vol.capacity, vol.access_type,
                    json.dumps(vol.parameters, sort_keys=True), json.dumps(vol.mutable_parameters, sort_keys=True),
                    vol.source_kind, vol.source_id, vol.created_at or time.time(),
                ),
            )
            self._add_committed(conn, vol.capacity)
        return True

    def set_volume_state(self, volume_id: str, state: str, durable: bool = True) -> None:
        with self.transaction(durable) as conn:
            conn.execute("UPDATE volumes SET state=? WHERE id=?", (state, volume_id))

    def delete_volume_row(self, volume_id: str) -> None:
        """Forget a volume and release its promised capacity (with its attachments)."""
        with self.transaction() as conn:
            row = conn.execute("SELECT capacity FROM volumes WHERE id=?", (volume_id,)).fetchone()
            if row is None:
                return
            conn.execute("DELETE FROM volumes WHERE id=?", (volume_id,))
            conn.execute("DELETE FROM attachments WHERE volume_id=?", (volume_id,))
            self._add_committed(conn, -int(row["capacity"]))

    def set_volume_capacity(self, volume_id: str, capacity: int, max_committed: int | None = None) -> bool:
        """Grow a volume's promise; False when it would pass ``max_committed``."""
        with self.transaction() as conn:
            row = conn.execute("SELECT capacity FROM volumes WHERE id=?", (volume_id,)).fetchone()
            if row is None:
                return False
            delta = capacity - int(row["capacity"])
            if max_committed is not None and delta > 0:
                committed = conn.execute("SELECT value FROM counters WHERE name='committed_bytes'").fetchone()[0]
                if committed + delta > max_committed:
                    return False
            conn.execute("UPDATE volumes SET capacity=? WHERE id=?", (capacity, volume_id))
            self._add_committed(conn, delta)
        return True

    def set_mutable_parameters(self, volume_id: str, params: dict[str, str]) -> None:
        with self.transaction() as conn:
            conn.execute(
                "UPDATE volumes SET mutable_parameters=? WHERE id=?", (json.dumps(params, sort_keys=True), volume_id)
            )

    def get_volume(self, volume_id: str) -> Volume | None:
        row = self._one("SELECT rowid, * FROM volumes WHERE id=?", (volume_id,))
        return _volume(row) if row else None

    def volume_by_name(self, name: str) -> Volume | None:
        row = self._one("SELECT rowid, * FROM volumes WHERE name=?", (name,))
        return _volume(row) if row else None

    def volume_by_handle(self, handle: str) -> Volume | None:
        row = self._one("SELECT rowid, * FROM volumes WHERE ephemeral_handle=?", (handle,))
        return _volume(row) if row else None

    def list_volumes(self, after_rowid: int, limit: int) -> list[Volume]:
        """Ready volumes in creation order after ``after_rowid`` (keyset paging)."""
        rows = self._all_rows(
            "SELECT rowid, * FROM volumes WHERE state=? AND rowid > ? ORDER BY rowid LIMIT ?",
            (READY, after_rowid, limit),
        )
        return [_volume(r) for r in rows]

    def volumes_in_state(self, state: str) -> list[Volume]:
        return [_volume(r) for r in self._all_rows("SELECT rowid, * FROM volumes WHERE state=?", (state,))]

    def all_volume_ids(self) -> set[str]:
        """Every volume ID; only start-up reconciliation calls this."""
        return {r[0] for r in self._all_rows("SELECT id FROM volumes")}

    def max_volume_rowid(self) -> int:
        return int(self._one("SELECT COALESCE(MAX(rowid), 0) FROM volumes")[0])

    # -- snapshots -----------------------------------------------------------
    def insert_snapshot(self, snap: Snapshot, durable: bool = True) -> None:
        with self.transaction(durable) as conn:
            self._insert_snapshot(conn, snap)

    @staticmethod
    def _insert_snapshot(conn: sqlite3.Connection, snap: Snapshot) -> None:
        conn.execute(
            "INSERT INTO snapshots(id, name, source_volume_id, group_id, state, compression, size_bytes,"
            " source_capacity, access_type, created_at_ns, parameters) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                snap.id, snap.name, snap.source_volume_id, snap.group_id, snap.state, snap.compression,
                snap.size_bytes, snap.source_capacity, snap.access_type, snap.created_at_ns,
                json.dumps(snap.parameters, sort_keys=True),
            ),
        )

    def finish_snapshot(self, snapshot_id: str, size_bytes: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE snapshots SET state=?, size_bytes=? WHERE id=?", (READY, size_bytes, snapshot_id))

    def set_snapshot_state(self, snapshot_id: str, state: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE snapshots SET state=? WHERE id=?", (state, snapshot_id))

    def delete_snapshot_row(self, snapshot_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))

    def get_snapshot(self, snapshot_id: str) -> Snapshot | None:
        row = self._one("SELECT rowid, * FROM snapshots WHERE id=?", (snapshot_id,))
        return _snapshot(row) if row else None

    def snapshot_by_name(self, name: str) -> Snapshot | None:
        row = self._one("SELECT rowid, * FROM snapshots WHERE name=?", (name,))
        return _snapshot(row) if row else None

    def list_snapshots(self, after_rowid: int, limit: int, source_volume_id: str = "") -> list[Snapshot]:
        if source_volume_id:
            rows = self._all_rows(
                "SELECT rowid, * FROM snapshots WHERE state=? AND source_volume_id=? AND rowid > ?"
                " ORDER BY rowid LIMIT ?",
                (READY, source_volume_id, after_rowid, limit),
            )
        else:
            rows = self._all_rows(
                "SELECT rowid, * FROM snapshots WHERE state=? AND rowid > ? ORDER BY rowid LIMIT ?",
                (READY, after_rowid, limit),
            )
        return [_snapshot(r) for r in rows]

    def snapshots_in_state(self, state: str) -> list[Snapshot]:
        return [_snapshot(r) for r in self._all_rows("SELECT rowid, * FROM snapshots WHERE state=?", (state,))]

    def snapshots_of_group(self, group_id: str) -> list[Snapshot]:
        rows = self._all_rows("SELECT rowid, * FROM snapshots WHERE group_id=? ORDER BY rowid", (group_id,))
        return [_snapshot(r) for r in rows]

    def all_snapshot_ids(self) -> set[str]:
        return {r[0] for r in self._all_rows("SELECT id FROM snapshots")}

    # -- group snapshots -----------------------------------------------------
    def insert_group(self, group: GroupSnapshot, members: list[Snapshot]) -> None:
        """The group and all its member snapshots appear in one transaction."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO group_snapshots(id, name, state, source_volume_ids, parameters, created_at_ns)"
                " VALUES (?,?,?,?,?,?)",
                (
                    group.id, group.name, group.state, json.dumps(group.source_volume_ids),
                    json.dumps(group.parameters, sort_keys=True), group.created_at_ns,
                ),
            )
            for snap in members:
                self._insert_snapshot(conn, snap)

    def set_group_state(self, group_id: str, state: str) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE group_snapshots SET state=? WHERE id=?", (state, group_id))
            if state == READY:
                conn.execute("UPDATE snapshots SET state=? WHERE group_id=? AND state=?", (READY, group_id, CREATING))

    def set_snapshot_size(self, snapshot_id: str, size_bytes: int) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE snapshots SET size_bytes=? WHERE id=?", (size_bytes, snapshot_id))

    def delete_group_rows(self, group_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM snapshots WHERE group_id=?", (group_id,))
            conn.execute("DELETE FROM group_snapshots WHERE id=?", (group_id,))

    def get_group(self, group_id: str) -> GroupSnapshot | None:
        row = self._one("SELECT * FROM group_snapshots WHERE id=?", (group_id,))
        return _group(row) if row else None

    def group_by_name(self, name: str) -> GroupSnapshot | None:
        row = self._one("SELECT * FROM group_snapshots WHERE name=?", (name,))
        return _group(row) if row else None

    def groups_in_state(self, state: str) -> list[GroupSnapshot]:
        return [_group(r) for r in self._all_rows("SELECT * FROM group_snapshots WHERE state=?", (state,))]

    # -- node: stagings and publications --------------------------------------
    def put_staging(self, staging: Staging) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO stagings(volume_id, staging_path, mounter, read_only, capability, loop_device)"
                " VALUES (?,?,?,?,?,?)",
                (
                    staging.volume_id, staging.staging_path, staging.mounter, int(staging.read_only),
                    json.dumps(staging.capability, sort_keys=True), staging.loop_device,
                ),
            )

    def get_staging(self, volume_id: str) -> Staging | None:
        row = self._one("SELECT * FROM stagings WHERE volume_id=?", (volume_id,))
        return _staging(row) if row else None

    def delete_staging(self, volume_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM stagings WHERE volume_id=?", (volume_id,))

    def all_stagings(self) -> list[Staging]:
        return [_staging(r) for r in self._all_rows("SELECT * FROM stagings")]

    def put_publication(self, pub: Publication) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO publications(target_path, volume_id, staging_path, read_only, capability)"
                " VALUES (?,?,?,?,?)",
                (pub.target_path, pub.volume_id, pub.staging_path, int(pub.read_only),
                 json.dumps(pub.capability, sort_keys=True)),
            )

    def get_publication(self, target_path: str) -> Publication | None:
        row = self._one("SELECT * FROM publications WHERE target_path=?", (target_path,))
        return _publication(row) if row else None

    def publications_of(self, volume_id: str) -> list[Publication]:
        return [_publication(r) for r in self._all_rows("SELECT * FROM publications WHERE volume_id=?", (volume_id,))]

    def delete_publication(self, target_path: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM publications WHERE target_path=?", (target_path,))

    # -- controller attachments (--enable-attach) ------------------------------
    def attach(self, att: Attachment, max_per_node: int) -> bool:
        """Record an attachment; False when the node already has ``max_per_node``."""
        with self.transaction() as conn:
            if max_per_node > 0:
                count = conn.execute("SELECT COUNT(*) FROM attachments WHERE node_id=?", (att.node_id,)).fetchone()[0]
                if count >= max_per_node:
                    return False
            conn.execute(
                "INSERT OR REPLACE INTO attachments(volume_id, node_id, read_only) VALUES (?,?,?)",
                (att.volume_id, att.node_id, int(att.read_only)),
            )
        return True

    def get_attachment(self, volume_id: str, node_id: str) -> Attachment | None:
        row = self._one("SELECT * FROM attachments WHERE volume_id=? AND node_id=?", (volume_id, node_id))
        return Attachment(row["volume_id"], row["node_id"], bool(row["read_only"])) if row else None

    def detach(self, volume_id: str, node_id: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM attachments WHERE volume_id=? AND node_id=?", (volume_id, node_id))

    def users_of(self, volume_id: str) -> str | None:
        """What still uses a volume on this node (staging, target, attachment), or None: one query."""
        row = self._one(
            "SELECT (SELECT staging_path FROM stagings WHERE volume_id=:v),"
            " (SELECT target_path FROM publications WHERE volume_id=:v LIMIT 1),"
            " (SELECT node_id FROM attachments WHERE volume_id=:v LIMIT 1)", {"v": volume_id})
        staged, published, attached = row[0], row[1], row[2]
        if staged:
            return f"staged at {staged}"
        if published:
            return f"published at {published}"
        if attached:
            return f"published to node {attached}"
        return None

    def attached_nodes(self, volume_id: str) -> list[str]:
        return [r[0] for r in self._all_rows("SELECT node_id FROM attachments WHERE volume_id=?", (volume_id,))]


def _volume(row: sqlite3.Row) -> Volume:
    return Volume(
        id=row["id"], name=row["name"], state=row["state"], capacity=int(row["capacity"]),
        access_type=row["access_type"], parameters=json.loads(row["parameters"]),
        mutable_parameters=json.loads(row["mutable_parameters"]), source_kind=row["source_kind"],
        source_id=row["source_id"], ephemeral_handle=row["ephemeral_handle"], created_at=row["created_at"],
        rowid=int(row["rowid"]),
    )


def _snapshot(row: sqlite3.Row) -> Snapshot:
    return Snapshot(
        id=row["id"], name=row["name"], source_volume_id=row["source_volume_id"], state=row["state"],
        compression=row["compression"], size_bytes=int(row["size_bytes"]), created_at_ns=int(row["created_at_ns"]),
        group_id=row["group_id"], parameters=json.loads(row["parameters"]),
        source_capacity=int(row["source_capacity"]), access_type=row["access_type"], rowid=int(row["rowid"]),
    )


def _group(row: sqlite3.Row) -> GroupSnapshot:
    return GroupSnapshot(
        id=row["id"], name=row["name"], state=row["state"], source_volume_ids=json.loads(row["source_volume_ids"]),
        parameters=json.loads(row["parameters"]), created_at_ns=int(row["created_at_ns"]),
    )


def _staging(row: sqlite3.Row) -> Staging:
    return Staging(
        volume_id=row["volume_id"], staging_path=row["staging_path"], mounter=row["mounter"],
        read_only=bool(row["read_only"]), capability=json.loads(row["capability"]), loop_device=row["loop_device"],
    )


def _publication(row: sqlite3.Row) -> Publication:
    return Publication(
        target_path=row["target_path"], volume_id=row["volume_id"], staging_path=row["staging_path"],
        read_only=bool(row["read_only"]), capability=json.loads(row["capability"]),
    )
