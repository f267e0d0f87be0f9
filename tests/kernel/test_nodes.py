"""The node table and its journal, on a real directory (no mount needed):
what a successor restores is what the kernel was given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fusefs.kernel import nodes as nodes_mod
from fusefs.kernel.nodes import ROOT_ID, NodeTable

pytestmark = pytest.mark.privileged  # open_by_handle_at needs CAP_DAC_READ_SEARCH


def _table(root: Path, journal: Path) -> NodeTable:
    return NodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY), str(journal))


def _remember(table: NodeTable, root: Path, name: str) -> int:
    fd = os.open(root / name, os.O_PATH | os.O_NOFOLLOW)
    return table.remember(fd, os.fstat(fd)).nodeid


def test_restore_gives_the_same_ids_for_the_same_inodes(tmp_path: Path) -> None:
    root, journal = tmp_path / "root", tmp_path / "journal"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_bytes(name.encode())
    (root / "d").mkdir()
    os.link(root / "a", root / "a2")
    old = _table(root, journal)
    old.start_journal()
    ids = {name: _remember(old, root, name) for name in ("a", "b", "c", "d", "a2")}
    assert ids["a"] == ids["a2"] != ROOT_ID          # hard links: one node
    assert len({ids[n] for n in ("a", "b", "c", "d")}) == 4
    old.forget(ids["b"], 1)
    old.get(ids["c"]).backing = (7, 2)
    old.journal_backing(old.get(ids["c"]))
    (root / "a").rename(root / "renamed")              # handles do not care about names

    new = _table(root, journal)
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 3
    for name, path in (("a", "renamed"), ("c", "c"), ("d", "d")):
        node = new.get(ids[name])
        assert os.fstat(node.fd).st_ino == os.stat(root / path).st_ino
    with pytest.raises(OSError):
        new.get(ids["b"])                              # forgotten before the handover
    assert new.get(ids["c"]).backing == (7, 2)
    fresh = _remember(new, root, "b")
    assert fresh > max(ids.values())                   # IDs are never reused


def test_the_journal_is_compacted_and_stays_right(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nodes_mod, "COMPACT_MIN_LINES", 20)
    root, journal = tmp_path / "root", tmp_path / "journal"
    root.mkdir()
    table = _table(root, journal)
    table.start_journal()
    kept = []
    for i in range(200):
        (root / f"f{i}").write_bytes(b"")
        nodeid = _remember(table, root, f"f{i}")
        if i % 50 == 0:
            kept.append((nodeid, f"f{i}"))
        else:
            table.forget(nodeid, 1)
            (root / f"f{i}").unlink()
    assert len(journal.read_text().splitlines()) < 60  # not 400 lines: rewritten as it went
    new = _table(root, journal)
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == len(kept)
    for nodeid, name in kept:
        assert os.fstat(new.get(nodeid).fd).st_ino == os.stat(root / name).st_ino
