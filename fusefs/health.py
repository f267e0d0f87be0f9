"""Volume health and usage, as Stats and List report them.

Health is what NodeGetVolumeStats turns into a VolumeCondition. A volume is
unhealthy when its session is not serving, when its staging mount is missing
or dead (ENOTCONN, or no answer to stat()/statfs()), and when a publication predates
the last session restart: the daemon bound the new mount on top of it, which
reaches containers with HostToContainer propagation, but a container
without it still holds the old, dead mount, and the daemon cannot see into
containers to tell them apart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fusefs import mountinfo, probe
from fusefs.state import Publication, VolumeRecord

#: A mount point that does not answer stat() and statfs() within this is reported hung.
PROBE_TIMEOUT = probe.DEFAULT_TIMEOUT


def probe_path(path: str, timeout: float = PROBE_TIMEOUT) -> str:
    """'' when ``stat(path)`` and ``statvfs(path)`` work; else what is wrong (ENOTCONN, hung...).

    stat alone is not enough: the kernel answers it from the attribute cache
    of a FUSE mount whose server is gone, while statfs always reaches the
    server, so a dead mount answers ENOTCONN. Bounded by ``timeout`` and by
    one helper thread per path (see ``fusefs.probe``): a hung FUSE server
    must not hold an RPC thread.
    """
    result = probe.stat_within(path, timeout)
    return "" if result.state == probe.OK else result.message


def stale_publications(record: VolumeRecord) -> list[Publication]:
    """Publications made by a session older than the current one."""
    return [p for p in record.publications.values() if p.generation < record.generation]


def assess(record: VolumeRecord, serving: bool, problem: str, target_path: str = "") -> tuple[bool, str]:
    """(healthy, message) for a volume, or for one publication of it with ``target_path``."""
    if not serving:
        return False, problem
    top = mountinfo.top_mount(record.staging_path)
    if not mountinfo.is_volume_mount(top, record.volume_id):
        return False, f"no fusefs mount of {record.volume_id} at {record.staging_path}"
    for path in [record.staging_path] + ([target_path] if target_path else []):
        trouble = probe_path(path)
        if trouble:
            return False, trouble
    if target_path:
        pub = record.publications.get(target_path)
        stale = [pub] if pub is not None and pub.generation < record.generation else []
    else:
        stale = stale_publications(record)
    if stale:
        return False, (f"{record.last_restart}; {len(stale)} publication(s) made before it: containers "
                       "without HostToContainer mount propagation still see ENOTCONN there until they are "
                       "restarted; containers with it see the new mount, except files they held open. The "
                       "daemon cannot tell which containers are which, so this stays until the volume is "
                       "published again")
    return True, record.last_restart


def session_problem(numbers: dict[str, Any]) -> str:
    """What the session itself reports wrong ('' if nothing): a volume whose
    usage could not be measured accepts no growth until it is remounted."""
    abnormal = numbers.get("abnormal") or ""
    return f"volume abnormal: {abnormal}" if abnormal else ""


def usage(record: VolumeRecord, numbers: dict[str, Any], volumes_dir: Path) -> dict[str, Any]:
    """Stats numbers from the session's quota accounting (``numbers``), with
    the record's values where the session has none (it is restarting).
    Without a quota the size is the backing filesystem's."""
    capacity = int(numbers.get("capacity") or record.capacity_bytes or 0)
    used = int(numbers.get("used_bytes") or 0)
    total = capacity
    if not total:
        fs = os.statvfs(volumes_dir)
        total = fs.f_blocks * fs.f_frsize
    used_inodes = int(numbers.get("used_inodes") or 0)
    total_inodes = int(numbers.get("total_inodes") or 0)
    limits = numbers.get("limits") or {}
    return {
        "volume_id": record.volume_id,
        "capacity_bytes": capacity,
        "used_bytes": used,
        "total_bytes": total,
        "available_bytes": max(total - used, 0),
        "used_inodes": used_inodes,
        "total_inodes": total_inodes,
        "available_inodes": max(total_inodes - used_inodes, 0),
        "frozen": bool(numbers.get("frozen", False)),
        "read_only": bool(numbers.get("read_only", record.read_only)),
        "bytes_per_second": int(limits.get("bytes_per_second", record.bytes_per_second) or 0),
        "ops_per_second": int(limits.get("ops_per_second", record.ops_per_second) or 0),
        "remount_count": record.remount_count,
        "open_files": int(numbers.get("open_files") or 0),
        "open_files_max": int(numbers.get("open_files_max") or 0),
        "open_files_refused": int(numbers.get("open_files_refused") or 0),
    }
