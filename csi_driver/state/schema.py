"""The SQLite schema and its migrations.

``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``. The
current version is kept in ``PRAGMA user_version`` and every migration runs
in the same transaction as the version bump, so a crash mid-migration leaves
the old schema intact and the next start simply runs it again.
"""

from __future__ import annotations

import sqlite3

MIGRATIONS: list[str] = [
    # 0 -> 1: the initial schema.
    """
    CREATE TABLE volumes (
        id                 TEXT PRIMARY KEY,
        name               TEXT UNIQUE,          -- the CO's name; NULL for inline volumes
        ephemeral_handle   TEXT UNIQUE,          -- kubelet's volume_id for inline volumes
        state              TEXT NOT NULL,        -- creating | ready | deleting
        capacity           INTEGER NOT NULL,
        access_type        TEXT NOT NULL,        -- mount | block
        parameters         TEXT NOT NULL,        -- JSON, as given at creation
        mutable_parameters TEXT NOT NULL,        -- JSON, changed by ControllerModifyVolume
        source_kind        TEXT NOT NULL DEFAULT '',   -- '' | snapshot | volume
        source_id          TEXT NOT NULL DEFAULT '',
        created_at         REAL NOT NULL
    );
    CREATE TABLE snapshots (
        id               TEXT PRIMARY KEY,
        name             TEXT UNIQUE,
        source_volume_id TEXT NOT NULL,
        group_id         TEXT NOT NULL DEFAULT '',
        state            TEXT NOT NULL,          -- creating | ready | deleting
        compression      TEXT NOT NULL,
        size_bytes       INTEGER NOT NULL DEFAULT 0,
        source_capacity  INTEGER NOT NULL DEFAULT 0,   -- restores must be at least this big
        access_type      TEXT NOT NULL DEFAULT 'mount',
        created_at_ns    INTEGER NOT NULL,
        parameters       TEXT NOT NULL
    );
    CREATE INDEX snapshots_by_source ON snapshots(source_volume_id);
    CREATE INDEX snapshots_by_group ON snapshots(group_id);
    CREATE TABLE group_snapshots (
        id                TEXT PRIMARY KEY,
        name              TEXT UNIQUE NOT NULL,
        state             TEXT NOT NULL,         -- creating | ready | deleting
        source_volume_ids TEXT NOT NULL,         -- JSON list, sorted
        parameters        TEXT NOT NULL,
        created_at_ns     INTEGER NOT NULL
    );
    CREATE TABLE stagings (
        volume_id    TEXT PRIMARY KEY,
        staging_path TEXT NOT NULL,
        mounter      TEXT NOT NULL,              -- fusefs | bind | block
        read_only    INTEGER NOT NULL,
        capability   TEXT NOT NULL,              -- JSON summary of the staged capability
        loop_device  TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE publications (
        target_path  TEXT PRIMARY KEY,
        volume_id    TEXT NOT NULL,
        staging_path TEXT NOT NULL,
        read_only    INTEGER NOT NULL,
        capability   TEXT NOT NULL
    );
    CREATE INDEX publications_by_volume ON publications(volume_id);
    CREATE TABLE attachments (
        volume_id TEXT NOT NULL,
        node_id   TEXT NOT NULL,
        read_only INTEGER NOT NULL,
        PRIMARY KEY (volume_id, node_id)
    );
    CREATE TABLE counters (
        name  TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
    INSERT INTO counters(name, value) VALUES ('committed_bytes', 0);
    """,
]

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database up to ``SCHEMA_VERSION``; returns the version found."""
    found = conn.execute("PRAGMA user_version").fetchone()[0]
    if found > SCHEMA_VERSION:
        raise RuntimeError(
            f"state.db has schema version {found}, newer than this driver's {SCHEMA_VERSION}; "
            "refusing to run an older driver against it"
        )
    for version in range(found, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(MIGRATIONS[version]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def _statements(script: str) -> list[str]:
    """Split a migration into statements so they share one explicit transaction.

    ``executescript`` would commit on its own and break the all-or-nothing
    guarantee; our migrations contain no semicolons inside literals.
    """
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
