"""The daemon's own state file: what it serves, so a restart can serve it again.

When the daemon is SIGKILLed its FUSE sessions die with it (die-with-parent),
and every staging mount and publish bind is left dead (ENOTCONN). The state
file is what lets the next daemon put each volume back at the same staging
path and re-bind every target. It is one small JSON document, written
atomically (temp file, fsync, rename, fsync of the directory), so a crash
mid-write leaves the previous version, never a torn one. It is rewritten on
every change; with tens of volumes per node that costs microseconds.

The file lists intent (what should be mounted where), not observations: the
kernel's mount table is consulted for what is actually mounted.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VERSION = 1
FILE_NAME = "state.json"


@dataclass
class PodRef:
    """A pod, for Events; from podInfoOnMount. ``claim``: its PVC for this volume, if any."""

    namespace: str = ""
    name: str = ""
    uid: str = ""
    claim: str = ""

    def __bool__(self) -> bool:
        return bool(self.namespace and self.name)


@dataclass
class Publication:
    """A target path bound from the staging mount."""

    target_path: str
    read_only: bool = False
    pod: PodRef = field(default_factory=PodRef)
    #: The volume's session generation when the target was published by a
    #: request. Recovery re-binds without changing it, so a publication older
    #: than the current generation may be stale in a pod's mount namespace.
    generation: int = 1


@dataclass
class VolumeRecord:
    """Everything needed to serve a volume again after a restart."""

    volume_id: str
    staging_path: str
    capacity_bytes: int = 0
    read_only: bool = False
    bytes_per_second: int = 0
    ops_per_second: int = 0
    pod: PodRef = field(default_factory=PodRef)
    publications: dict[str, Publication] = field(default_factory=dict)
    #: Incremented each time a new FUSE session serves the volume.
    generation: int = 1
    remount_count: int = 0
    #: "<when>: <why>" of the last session restart, for the health message.
    last_restart: str = ""
    last_restart_at: float = 0.0
    #: PID of the session serving it, so a restarted daemon can make sure an
    #: old session is gone before mounting over its mount point.
    pid: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VolumeRecord:
        data = dict(data)
        data["pod"] = PodRef(**data.get("pod") or {})
        pubs = {}
        for target, pub in (data.get("publications") or {}).items():
            pub = dict(pub)
            pub["pod"] = PodRef(**pub.get("pod") or {})
            pubs[target] = Publication(**pub)
        data["publications"] = pubs
        known = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in data.items() if k in known})


class StateFile:
    """Atomic load/save of every volume record; safe to call from many threads."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / FILE_NAME
        self._lock = threading.Lock()

    def load(self) -> dict[str, VolumeRecord]:
        """The records on disk; an absent file is an empty daemon."""
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        if doc.get("version") != VERSION:
            raise ValueError(f"{self.path}: unsupported state version {doc.get('version')!r}")
        return {vid: VolumeRecord.from_json(rec) for vid, rec in doc.get("volumes", {}).items()}

    def save(self, records: dict[str, VolumeRecord]) -> None:
        """Replace the file with ``records`` atomically and durably."""
        doc = {"version": VERSION, "volumes": {vid: rec.to_json() for vid, rec in sorted(records.items())}}
        data = json.dumps(doc, indent=1, sort_keys=True).encode()
        with self._lock:
            tmp = self.path.with_name(f".{FILE_NAME}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
