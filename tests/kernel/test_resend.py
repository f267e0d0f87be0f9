"""Requests the kernel sends again after a takeover (bit 63 of ``unique``)
may have been executed by the dead session already: the filesystem must
answer them as if once. Driven directly on the inode filesystem over a real
directory, because which requests a kill catches half-done is up to timing."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from fusefs.kernel import protocol as p
from fusefs.kernel.inodefs import Caller, InodeFs
from fusefs.kernel.nodes import ROOT_ID
from fusefs.quota import Quota

ROOT = Caller(0, 0, 1)
RESENT = p.UNIQUE_RESEND | 42


@pytest.fixture
def fs(tmp_path: Path) -> InodeFs:
    (tmp_path / "v").mkdir()
    return InodeFs(str(tmp_path / "v"), quota=Quota(1 << 20, 0, 1))


def test_namespace_requests_done_before_the_crash_succeed_when_resent(fs: InodeFs, tmp_path: Path) -> None:
    src = tmp_path / "v"
    node, _ = fs.mkdir(ROOT, ROOT_ID, b"d", 0o755, 7)
    again, _ = fs.mkdir(ROOT, ROOT_ID, b"d", 0o755, RESENT)
    assert again.nodeid == node.nodeid
    with pytest.raises(FileExistsError):
        fs.mkdir(ROOT, ROOT_ID, b"d", 0o755, 8)        # not resent: a real EEXIST
    fs.symlink(ROOT, ROOT_ID, b"l", b"d", 9)
    fs.symlink(ROOT, ROOT_ID, b"l", b"d", RESENT)
    f, _, fh, _ = fs.create(ROOT, ROOT_ID, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 10)
    fs.release(fh)
    f2, _, fh2, _ = fs.create(ROOT, ROOT_ID, b"f", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL, RESENT)
    fs.release(fh2)
    assert f2.nodeid == f.nodeid
    fs.link(f.nodeid, ROOT_ID, b"f2", 11)
    fs.link(f.nodeid, ROOT_ID, b"f2", RESENT)
    fs.rename(ROOT_ID, b"f2", ROOT_ID, b"f3", 0, 12)
    fs.rename(ROOT_ID, b"f2", ROOT_ID, b"f3", 0, RESENT)
    fs.unlink(ROOT_ID, b"f3", 13)
    fs.unlink(ROOT_ID, b"f3", RESENT)
    with pytest.raises(FileNotFoundError):
        fs.unlink(ROOT_ID, b"f3", 14)
    fs.rmdir(ROOT_ID, b"d", 15)
    fs.rmdir(ROOT_ID, b"d", RESENT)
    assert sorted(os.listdir(src)) == ["f", "l"]
    assert fs.quota.used_inodes == 3                   # root, f, l: each charged once


def test_a_resent_truncating_open_does_not_truncate_again(fs: InodeFs, tmp_path: Path) -> None:
    f, _, fh, _ = fs.create(ROOT, ROOT_ID, b"f", 0o644, os.O_WRONLY | os.O_CREAT, 1)
    assert fs.write(fh, f.nodeid, 0, b"first", 0, os.O_WRONLY) == 5
    fs.release(fh)
    fh, _, _ = fs.open(f.nodeid, os.O_WRONLY | os.O_TRUNC, 2)            # really truncates
    assert (tmp_path / "v" / "f").read_bytes() == b""
    assert fs.write(fh, f.nodeid, 0, b"written after", 0, os.O_WRONLY) == 13
    charged = fs.quota.used_bytes
    fh2, _, _ = fs.open(f.nodeid, os.O_WRONLY | os.O_TRUNC, RESENT)      # the same open, again
    assert (tmp_path / "v" / "f").read_bytes() == b"written after"
    fs.release(fh)
    fs.release(fh2)
    assert fs.quota.used_bytes == charged


def test_a_handle_from_before_the_handover_is_adopted_with_its_open_flags(fs: InodeFs, tmp_path: Path) -> None:
    f, _, fh, _ = fs.create(ROOT, ROOT_ID, b"f", 0o644, os.O_RDWR | os.O_CREAT, 1)
    fs.release(fh)
    old_fh = 12345                                   # a handle the dead session gave out
    fs.fsync(old_fh, f.nodeid, False)                # fsync does not say how it was opened
    assert fs.write(old_fh, f.nodeid, 0, b"abc", 0, os.O_WRONLY) == 3
    with pytest.raises(OSError) as exc:
        fs.read(old_fh, f.nodeid, 0, 3, os.O_WRONLY)  # adopted write-only, as it was opened
    assert exc.value.errno == errno.EBADF
    fs.release(old_fh)
    assert (tmp_path / "v" / "f").read_bytes() == b"abc"


def _passthrough_fs(src: Path, journal: Path, epoch: int, registered: list[str]) -> InodeFs:
    """An InodeFs whose backing registrations are recorded (what the engine
    would ask the kernel), journalled at ``journal``."""
    fs = InodeFs(str(src), quota=Quota(1 << 20, 0, 1), journal=str(journal), handle_epoch=epoch)
    fs.passthrough = True
    fs.backing_open = lambda fd: registered.append("open") or 5
    fs.backing_close = lambda backing_id: registered.append(f"close {backing_id}")
    return fs


@pytest.mark.privileged  # open_by_handle_at needs CAP_DAC_READ_SEARCH
def test_a_resent_release_of_a_passthrough_open_is_counted_once(tmp_path: Path) -> None:
    """The dead session released (and journalled) one of two passthrough
    opens, then died before answering; the kernel sends that RELEASE again.
    Counting it twice closed the backing file under the other open, and the
    next open then failed with EIO (found by the restart matrix)."""
    src, journal = tmp_path / "v", tmp_path / "journal"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    registered: list[str] = []
    old = _passthrough_fs(src, journal, 0, registered)
    old.nodes.start_journal()
    node, _ = old.lookup(ROOT_ID, b"f")
    fh_a, _, backing_a = old.open(node.nodeid, os.O_RDONLY, 1)
    fh_b, _, backing_b = old.open(node.nodeid, os.O_RDONLY, 2)
    assert backing_a == backing_b == 5 and registered == ["open"]
    old.release(fh_a, node.nodeid)                     # done and journalled; the reply never left

    new = _passthrough_fs(src, journal, 1, registered)
    assert new.nodes.restore(os.open(src, os.O_RDONLY | os.O_DIRECTORY)) >= 1
    new.nodes.start_journal()
    new.release(fh_a, node.nodeid)                     # resent by the kernel
    assert registered == ["open"], "the backing file was closed under a live passthrough open"
    new.release(fh_b, node.nodeid)                     # the last passthrough open
    assert registered == ["open", "close 5"]
    new.release(fh_b, node.nodeid)                     # and a resend of that one changes nothing
    assert registered == ["open", "close 5"]
