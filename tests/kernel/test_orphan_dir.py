"""The orphan directory's journal records and its emptying, on real
directories (no mount): what a successor claims, frees and removes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusefs.kernel import nodes as nodes_mod
from fusefs.kernel import orphans
from fusefs.kernel.nodes import NodeTable

pytestmark = pytest.mark.privileged  # open_by_handle_at needs CAP_DAC_READ_SEARCH


def _table(root: Path, journal: Path, orphan_dir: Path, freed: list[tuple[int, int]]) -> NodeTable:
    table = NodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY), str(journal))
    table.orphan_fd = os.open(orphan_dir, os.O_RDONLY | os.O_DIRECTORY)
    table.orphan_freed = lambda size, extra: freed.append((size, extra))
    return table


def _remember(table: NodeTable, root: Path, name: str) -> nodes_mod.Node:
    fd = os.open(root / name, os.O_PATH | os.O_NOFOLLOW)
    return table.remember(fd, os.fstat(fd))


def _orphan(table: NodeTable, root: Path, orphan_dir: Path, node: nodes_mod.Node, name: str, extra: int) -> None:
    node.orphan, node.orphan_extra = orphans.name_for(node.nodeid), extra
    table.journal_orphan(node, node.orphan, extra)
    os.rename(root / name, orphan_dir / node.orphan)


def test_a_successor_claims_held_orphans_and_frees_the_others(tmp_path: Path) -> None:
    root, orphan_dir, journal = tmp_path / "root", tmp_path / "orphans", tmp_path / "journal"
    root.mkdir()
    orphan_dir.mkdir()
    for name, size in (("held", 5000), ("forgotten", 7000), ("moved-back", 10)):
        (root / name).write_bytes(b"x" * size)
    freed: list[tuple[int, int]] = []
    old = _table(root, journal, orphan_dir, freed)
    old.start_journal()
    held, forgotten, back = (_remember(old, root, n) for n in ("held", "forgotten", "moved-back"))
    _orphan(old, root, orphan_dir, held, "held", 4096)
    _orphan(old, root, orphan_dir, forgotten, "forgotten", 0)
    # A crash between the journal line and the move: still in the volume.
    back.orphan = orphans.name_for(back.nodeid)
    old.journal_orphan(back, back.orphan, 0)
    # The kernel forgot one orphan but the unlink never happened (crash):
    # its count is zero in the counts file, so it is not restored.
    old._counts[forgotten.slot] = 0
    (orphan_dir / "stray").write_bytes(b"nobody journalled me")

    new = _table(root, journal, orphan_dir, freed)
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 2
    assert new.get(held.nodeid).orphan == str(held.nodeid)
    assert new.get(held.nodeid).orphan_extra == 4096
    assert new.get(back.nodeid).orphan is None
    assert sorted(os.listdir(orphan_dir)) == [str(held.nodeid)]
    assert freed == [(7000, 0)]  # the forgotten orphan's charge, once
    assert [n.nodeid for n in new.orphans()] == [held.nodeid]

    new.start_journal()  # a compacted journal keeps the orphan
    freed.clear()
    again = _table(root, journal, orphan_dir, freed)
    again.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY))
    assert again.get(held.nodeid).orphan == str(held.nodeid)
    again.forget(held.nodeid, again.get(held.nodeid).lookups)
    assert os.listdir(orphan_dir) == [] and freed == [(5000, 4096)]


def test_empty_treats_the_directory_as_hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested directories go, symlinks are removed and never followed, names
    to keep stay, and a tree deeper than the bound ends the walk (left)."""
    monkeypatch.setattr(orphans, "MAX_DEPTH", 4)
    d, outside = tmp_path / "orphans", tmp_path / "outside"
    d.mkdir()
    outside.mkdir()
    (outside / "precious").write_bytes(b"p")
    (d / "1").write_bytes(b"a")
    (d / "keep").write_bytes(b"k")
    (d / "link").symlink_to(outside)
    (d / "x" / "y").mkdir(parents=True)
    (d / "x" / "y" / "f").write_bytes(b"f")
    (d / "x" / "y" / "l").symlink_to(outside / "precious")
    deep = d / "deep"
    for i in range(8):
        deep = deep / str(i)
    deep.mkdir(parents=True)
    (deep / "bottom").write_bytes(b"b")
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        orphans.empty(fd, keep={"keep"})
    finally:
        os.close(fd)
    assert sorted(os.listdir(d)) == ["deep", "keep"]
    assert (outside / "precious").read_bytes() == b"p"
    monkeypatch.setattr(orphans, "MAX_DEPTH", 16)
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        orphans.empty(fd)
    finally:
        os.close(fd)
    assert os.listdir(d) == []
