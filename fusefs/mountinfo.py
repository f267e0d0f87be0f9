"""Reading ``/proc/self/mountinfo``: the kernel's truth about what is mounted.

The daemon never trusts its own records about mounts: after a crash they can
be wrong in both directions. Before binding, detaching or reporting health it
asks mountinfo what is really stacked at a path, and whether that is the
fusefs mount of the right volume (fstype ``fuse.fusefs``, source
``fusepath:<volume-id>``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
FSTYPE = "fuse.fusefs"


@dataclass(frozen=True)
class MountEntry:
    """One line of mountinfo, fields named as in proc(5)."""

    mount_id: int
    parent_id: int
    major_minor: str
    root: str
    mount_point: str
    options: tuple[str, ...]
    optional: tuple[str, ...]
    fs_type: str
    source: str
    super_options: tuple[str, ...]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    @property
    def peer_group(self) -> int:
        """The ``shared:N`` peer group, or 0 when the mount is not shared."""
        for tag in self.optional:
            if tag.startswith("shared:"):
                return int(tag.partition(":")[2])
        return 0

    @property
    def propagation(self) -> str:
        """``shared``, ``slave``, ``shared+slave`` or ``private``."""
        kinds = [f.split(":")[0] for f in self.optional]
        shared, slave = "shared" in kinds, "master" in kinds
        if shared and slave:
            return "shared+slave"
        return "shared" if shared else "slave" if slave else "private"


def source_name(volume_id: str) -> str:
    """The fsname a session mounts a volume with."""
    return f"fusepath:{volume_id}"


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    out: list[str] = []
    i = 0
    while i < len(field):
        chunk = field[i + 1 : i + 4]
        if field[i] == "\\" and len(chunk) == 3 and all(c in "01234567" for c in chunk):
            out.append(chr(int(chunk, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse(text: str) -> list[MountEntry]:
    """Parse mountinfo text into entries, in the kernel's order (parents first)."""
    entries: list[MountEntry] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(" "), right.split(" ")
        if len(fields) < 6 or len(rfields) < 2:
            continue
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                major_minor=fields[2],
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                optional=tuple(f for f in fields[6:] if f),
                fs_type=rfields[0],
                source=unescape(rfields[1]),
                super_options=tuple(rfields[2].split(",")) if len(rfields) > 2 else (),
            )
        )
    return entries


def read(pid: int | str = "self") -> list[MountEntry]:
    """The mount table as the given process sees it."""
    return parse(Path(f"/proc/{pid}/mountinfo").read_text())


def mounts_at(path: str | Path, table: list[MountEntry] | None = None) -> list[MountEntry]:
    """Every mount stacked at ``path``, bottom first (the last one is visible).

    The order follows the kernel's parent links (each layer's parent is the
    one below it) when they form one chain, not the order of the lines,
    which a propagated mount can break.
    """
    target = str(path)
    found = [e for e in (table if table is not None else read()) if e.mount_point == target]
    ids = {e.mount_id for e in found}
    by_parent = {e.parent_id: e for e in found if e.parent_id in ids}
    stack = [e for e in found if e.parent_id not in ids][:1]
    while stack and stack[-1].mount_id in by_parent and len(stack) < len(found):
        stack.append(by_parent[stack[-1].mount_id])
    return stack if len(stack) == len(found) else found  # not one chain: the kernel's line order


def top_mount(path: str | Path, table: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount a process opening ``path`` would land on, if ``path`` is a mount point."""
    stack = mounts_at(path, table)
    return stack[-1] if stack else None


def is_volume_mount(entry: MountEntry | None, volume_id: str) -> bool:
    """True when ``entry`` is a fusefs mount (or a bind of one) of ``volume_id``."""
    return entry is not None and entry.fs_type == FSTYPE and entry.source == source_name(volume_id)


def containing_mount(path: str | Path, table: list[MountEntry] | None = None) -> MountEntry | None:
    """The mount that ``path`` lives on (the deepest mount point that is a prefix)."""
    target = str(path).rstrip("/") or "/"
    best: MountEntry | None = None
    for entry in table if table is not None else read():
        mp = entry.mount_point
        inside = target == mp or mp == "/" or target.startswith(mp.rstrip("/") + "/")
        if inside and (best is None or len(mp) >= len(best.mount_point)):
            best = entry
    return best


def volume_mounts(volume_id: str, table: list[MountEntry] | None = None) -> list[MountEntry]:
    """Every mount of ``volume_id``'s FUSE filesystem (staging and binds)."""
    return [e for e in (table if table is not None else read()) if is_volume_mount(e, volume_id)]
