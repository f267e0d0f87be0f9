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
    old.get(ids["c"]).backing = (7, {11, 12, 13})
    for fh in (11, 12, 13):
        old.journal_backing(old.get(ids["c"]), fh, opened=True)
    old.journal_backing(old.get(ids["c"]), 12, opened=False)
    (root / "a").rename(root / "renamed")              # handles do not care about names

    new = _table(root, journal)
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 3
    for name, path in (("a", "renamed"), ("c", "c"), ("d", "d")):
        node = new.get(ids[name])
        assert os.fstat(node.fd).st_ino == os.stat(root / path).st_ino
    with pytest.raises(OSError):
        new.get(ids["b"])                              # forgotten before the handover
    assert new.get(ids["c"]).backing == (7, {11, 13})
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


def test_lookup_counts_survive_a_handover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's FORGET after a handover counts the dead session's lookups
    too: the successor keeps a node until exactly that many are forgotten,
    and a FORGET for more than it knows ends the node (the kernel holds
    nothing more). The counts file grows past its first size."""
    monkeypatch.setattr(nodes_mod, "COUNT_SLOTS", 4, raising=False)
    root, journal = tmp_path / "root", tmp_path / "journal"
    root.mkdir()
    for i in range(10):
        (root / f"f{i}").write_bytes(b"")
    old = _table(root, journal)
    old.start_journal()
    ids = [_remember(old, root, f"f{i}") for i in range(10)]
    for _ in range(2):
        _remember(old, root, "f0")  # f0: 3 lookups
    old.forget(ids[1], 1)             # f1: forgotten before the handover
    _remember(old, root, "f1")        # ...and looked up again: a new node, 1 lookup
    f1 = old.by_key((os.stat(root / "f1").st_dev, os.stat(root / "f1").st_ino)).nodeid  # type: ignore[union-attr]

    new = _table(root, journal)
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 10
    new.start_journal()
    assert new.get(ids[0]).lookups == 3 and new.get(f1).lookups == 1
    _remember(new, root, "f0")        # the successor's own lookup: 4 in all
    new.forget(ids[0], 3)
    assert new.get(ids[0]).lookups == 1  # still held by the kernel
    new.forget(ids[0], 1)
    with pytest.raises(OSError):
        new.get(ids[0])
    new.forget(ids[2], 5)             # more than it had: released, noted
    with pytest.raises(OSError):
        new.get(ids[2])
    assert new.forget_excess == 1
    for nodeid in ids[3:]:
        new.forget(nodeid, 1)
    assert len(new) == 2              # the root and f1

    # A second handover: the counts the successor kept are the ones restored.
    third = _table(root, journal)
    assert third.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 1
    assert third.get(f1).lookups == 1


def test_a_node_whose_reply_never_left_is_not_restored(tmp_path: Path) -> None:
    """A kill after a new node is journalled but before its count is stored
    (so before the reply): its count is 0 and it is not restored."""
    root, journal = tmp_path / "root", tmp_path / "journal"
    root.mkdir()
    (root / "a").write_bytes(b"")
    (root / "b").write_bytes(b"")
    old = _table(root, journal)
    old.start_journal()
    a = _remember(old, root, "a")
    b = _remember(old, root, "b")
    old._counts[old.get(b).slot] = 0  # as if killed between the journal line and the store
    new = _table(root, journal)
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 1
    assert new.get(a).lookups == 1
    with pytest.raises(OSError):
        new.get(b)


def test_without_known_counts_restored_nodes_are_kept(tmp_path: Path) -> None:
    """A journal of an older session (no S lines) or a counts file that is
    gone: the counts are unknown, so the nodes stay (the old rule) rather
    than being dropped while the kernel may hold them."""
    root, journal = tmp_path / "root", tmp_path / "journal"
    root.mkdir()
    (root / "a").write_bytes(b"")
    old = _table(root, journal)
    old.start_journal()
    a = _remember(old, root, "a")
    os.unlink(f"{journal}.counts")
    new = _table(root, journal)
    assert new.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 1
    new.start_journal()
    new.forget(a, 1)
    assert new.get(a).lookups == nodes_mod.RESTORED_LOOKUPS - 1
    journal.write_text("".join(line + "\n" for line in journal.read_text().splitlines() if not line.startswith("S ")))
    third = _table(root, journal)
    assert third.restore(os.open(root, os.O_RDONLY | os.O_DIRECTORY)) == 1
    assert third.get(a).lookups == nodes_mod.RESTORED_LOOKUPS
