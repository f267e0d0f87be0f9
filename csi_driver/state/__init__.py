"""The driver's state: one SQLite file, the single source of truth (DESIGN §3)."""

from csi_driver.state.store import (  # noqa: F401
    Attachment,
    GroupSnapshot,
    Publication,
    Snapshot,
    Staging,
    Store,
    Volume,
)
