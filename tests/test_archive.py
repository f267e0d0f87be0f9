"""Snapshot archives: round trips on real trees, and hostile archives.

Everything here runs real tar/zstd/gzip on real files. Hostile archives are
built with tarfile (it writes whatever TarInfo it is given), extracted next to
a sentinel tree, and the sentinel tree is compared before and after.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Callable

import pytest

from csi_driver import archive
from csi_driver.archive import (
    COMPRESSIONS,
    ArchiveError,
    UnsafeArchiveError,
    archive_suffix,
    create_archive,
    extract_archive,
)

MTIME_NS = 1_600_000_000_123_456_789  # sub-second part must survive


# --------------------------------------------------------------------------
# Helpers


def tree_state(root: Path) -> dict[str, tuple]:
    """Everything restore must keep, per path below ``root`` (root itself is "."):
    type, permission bits, owner, mtime, content or link target, hard-link
    group and user xattrs. atime and ctime are left out on purpose."""
    state: dict[str, tuple] = {}
    first_path_of_inode: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted, so the hard-link group's "first path" does not depend on readdir
        # order (tmpfs lists newest first: the restored tree would differ from its source).
        dirnames.sort()
        filenames.sort()
        for name in [".", *dirnames, *filenames] if dirpath == str(root) else [*dirnames, *filenames]:
            path = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            group = first_path_of_inode.setdefault((st.st_dev, st.st_ino), rel)
            if stat.S_ISLNK(st.st_mode):
                body = ("link", os.readlink(path))
                xattrs: tuple = ()
            else:
                if stat.S_ISREG(st.st_mode):
                    body = ("file", st.st_size, hashlib.sha256(Path(path).read_bytes()).hexdigest())
                else:
                    body = ("dir",)
                xattrs = tuple(sorted((k, os.getxattr(path, k)) for k in os.listxattr(path)
                                      if k.startswith("user.")))
            state[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                          st.st_mtime_ns, body, group if st.st_nlink > 1 else None, xattrs)
    return state


def without_setid(state: dict[str, tuple]) -> dict[str, tuple]:
    """A tree state as a restore makes it: setuid/setgid cleared on everything
    but directories (a setgid directory only passes its group on)."""
    return {rel: (v[0], v[1] & ~0o6000 if v[0] != stat.S_IFDIR else v[1], *v[2:]) for rel, v in state.items()}


def listing(root: Path) -> dict[str, tuple]:
    """A cheap fingerprint of a tree for "nothing changed here" checks,
    including mtimes and ctimes so a chmod or touch would show."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            content = Path(path).read_bytes() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, root)] = (st.st_mode, st.st_uid, st.st_gid, st.st_size,
                                                st.st_mtime_ns, st.st_ctime_ns, st.st_nlink, content)
    return out


def set_times(path: Path, ns: int = MTIME_NS) -> None:
    os.utime(path, ns=(ns, ns), follow_symlinks=False)


def build_volume(root: Path, *, chown: bool) -> None:
    """A volume with every kind of thing a restore must keep."""
    root.mkdir()
    (root / "plain.txt").write_text("hello\n" * 1000)
    (root / "secret").write_bytes(os.urandom(5000))
    os.chmod(root / "secret", 0o600)
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "suid-bin").write_bytes(b"\x7fELF fake")
    (root / "shared").mkdir()
    (root / "shared" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "empty-dir").mkdir()
    (root / "deep" / "er" / "still-empty").mkdir(parents=True)
    (root / "sticky").mkdir()
    (root / ("long-" + "n" * 150)).mkdir()
    (root / ("long-" + "n" * 150) / ("file-" + "x" * 120)).write_text("long names need pax")
    (root / "ünïcödé ✓.txt").write_text("utf-8 names")
    (root / os.fsdecode(b"latin1-\xe9.txt")).write_text("non-utf-8 name")
    # links
    os.symlink("plain.txt", root / "rel-link")
    os.symlink("../plain.txt", root / "shared" / "up-link")
    os.symlink("does-not-exist", root / "dangling")
    os.symlink("shared", root / "dir-link")
    os.link(root / "plain.txt", root / "hard-1")
    os.link(root / "plain.txt", root / "shared" / "hard-2")
    # a sparse file: 64 MiB apparent, a few KiB of data
    with open(root / "sparse.img", "wb") as fh:
        fh.seek(32 << 20)
        fh.write(b"middle")
        fh.truncate(64 << 20)
    os.setxattr(root / "plain.txt", "user.origin", b"\x00binary\xff")
    if chown:
        os.chown(root / "secret", 1234, 5678)
        os.chown(root / "shared", 2000, 2000)
        os.chown(root / "shared" / "data.bin", 4_000_000, 4_000_001)  # beyond ustar's octal fields
        os.chown(root / "rel-link", 3000, 3001, follow_symlinks=False)
        os.chown(root / "suid-bin", 0, 0)
        os.chown(root, 0, 2000)
    # modes after chown, which clears setuid/setgid
    os.chmod(root / "suid-bin", 0o4755)
    os.chmod(root / "shared", 0o2775)
    os.chmod(root / "sticky", 0o1777)
    os.chmod(root, 0o2770)
    # mtimes last, deepest first, links included
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            set_times(Path(dirpath) / name, MTIME_NS + len(name))
    set_times(root)


def make_archive(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]],
                 fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, *, linkname: str = "",
           mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.mode = mode
    info.mtime = 1_600_000_000
    return info


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """dest (empty) and, beside it, a sentinel tree that hostile archives aim at."""
    dest = tmp_path / "dest"
    dest.mkdir()
    sentinel = tmp_path / "sentinel"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "victim").write_text("original")
    (sentinel / "sub" / "file").write_text("original too")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {"root": tmp_path, "dest": dest, "sentinel": sentinel, "tmp": tmp}


# --------------------------------------------------------------------------
# API basics


def test_archive_suffix() -> None:
    assert [archive_suffix(c) for c in COMPRESSIONS] == [".tar", ".tar.gz", ".tar.zst"]
    with pytest.raises(ValueError, match="bzip2"):
        archive_suffix("bzip2")


def test_create_rejects_unknown_compression(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError):
        create_archive(tmp_path / "src", tmp_path / "x.tar", "lz4", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["src"]


# --------------------------------------------------------------------------
# Round trips


@pytest.mark.privileged
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip_keeps_everything(tmp_path: Path, compression: str) -> None:
    src = tmp_path / "src"
    build_volume(src, chown=True)
    before = tree_state(src)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dest = tmp_path / ("snap" + archive_suffix(compression))

    size = create_archive(src, dest, compression, tmp)

    assert size == dest.stat().st_size > 0
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600  # snapshots hold user data
    assert os.listdir(tmp) == []
    assert tree_state(src) == before  # archiving changed nothing
    out = tmp_path / "restored"
    out.mkdir()
    extract_archive(dest, out)
    after = tree_state(out)
    assert after == without_setid(before)
    # spot checks that make failures readable
    assert stat.S_IMODE(os.stat(out / "suid-bin").st_mode) == 0o755  # setuid is never restored
    assert stat.S_IMODE(os.stat(out / "shared").st_mode) == 0o2775
    assert (os.stat(out / "shared" / "data.bin").st_uid, os.stat(out).st_gid) == (4_000_000, 2000)
    assert os.stat(out / "plain.txt").st_mtime_ns == MTIME_NS + len("plain.txt")
    assert os.stat(out / "sparse.img").st_blocks * 512 < (1 << 20)  # holes stay holes
    assert os.stat(out / "hard-1").st_ino == os.stat(out / "shared" / "hard-2").st_ino


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_round_trip_unprivileged_parts(tmp_path: Path, compression: str) -> None:
    """Everything but ownership, so the format is covered without root too."""
    src = tmp_path / "src"
    build_volume(src, chown=False)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dest = tmp_path / "snap"
    create_archive(src, dest, compression, tmp)
    out = tmp_path / "out"
    out.mkdir()
    extract_archive(dest, out)
    before, after = tree_state(src), tree_state(out)
    if os.geteuid() != 0:  # non-root drops setuid/setgid and cannot chown: compare the rest
        before, after = unprivileged_view(before), unprivileged_view(after)
    assert after == without_setid(before)


def unprivileged_view(state: dict[str, tuple]) -> dict[str, tuple]:
    """``tree_state`` without what only root can restore: owners, setuid and setgid."""
    return {path: (kind, mode & ~(stat.S_ISUID | stat.S_ISGID), *rest)
            for path, (kind, mode, _uid, _gid, *rest) in state.items()}


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_archives_are_read_by_standard_tools(tmp_path: Path, compression: str) -> None:
    """Our gzip is several gzip members in a row and zstd comes from the zstd
    CLI; GNU tar and Python's tarfile must read both as ordinary archives."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(os.urandom(9 << 20))  # > two 4 MiB gzip members
    (src / "small.txt").write_text("x" * 10000)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dest = tmp_path / ("snap" + archive_suffix(compression))
    create_archive(src, dest, compression, tmp)
    out = tmp_path / "gnu"
    out.mkdir()
    flag = "--gzip" if compression == "gzip" else "--zstd"
    subprocess.run(["tar", flag, "-xf", str(dest), "-C", str(out)], check=True)
    assert (out / "big").read_bytes() == (src / "big").read_bytes()
    if compression == "gzip":
        with tarfile.open(dest, "r:gz") as tf:
            assert tf.extractfile("./big").read() == (src / "big").read_bytes()
    ours = tmp_path / "ours"  # big members cross gzip members / go through splice
    ours.mkdir()
    extract_archive(dest, ours)
    assert (ours / "big").read_bytes() == (src / "big").read_bytes()
    assert (ours / "small.txt").read_text() == "x" * 10000


@pytest.mark.privileged
@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_gnu_tar_restores_our_archives_exactly(tmp_path: Path, compression: str) -> None:
    """The archive is written by our own writer, not by GNU tar: GNU tar must
    still list it and restore all of it (pax mtimes, numeric owners, user
    xattrs, long and non-UTF-8 names, hard links, sparse files as sparse)."""
    src = tmp_path / "src"
    build_volume(src, chown=True)
    before = tree_state(src)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    dest = tmp_path / ("snap" + archive_suffix(compression))
    create_archive(src, dest, compression, tmp)
    flags = {"none": [], "gzip": ["--gzip"], "zstd": ["--zstd"]}[compression]
    listed = subprocess.run(["tar", *flags, "-tf", str(dest)], check=True, capture_output=True).stdout
    assert b"./sparse.img\n" in listed and b"GNUSparseFile" not in listed
    out = tmp_path / "gnu"
    out.mkdir()
    subprocess.run(["tar", *flags, "-xpf", str(dest), "-C", str(out), "--numeric-owner",
                    "--xattrs", "--xattrs-include=user.*"], check=True)
    assert tree_state(out) == before  # GNU tar, as root, keeps setuid: nothing was dropped in the archive
    assert os.stat(out / "sparse.img").st_blocks * 512 < (1 << 20)


@pytest.mark.parametrize("layout_of", ["hole-first", "data-first", "many-extents", "all-hole"])
def test_sparse_files_round_trip_with_holes(tmp_path: Path, layout_of: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Holes stay holes in both restores; past the extent cap the rest of a
    file is archived densely (zeros included), never wrongly."""
    monkeypatch.setattr(archive, "_MAX_EXTENTS", 8)
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "f", "wb") as fh:
        if layout_of == "hole-first":
            fh.seek(8 << 20)
            fh.write(b"tail data")
        elif layout_of == "data-first":
            fh.write(os.urandom(10000))
            fh.truncate(16 << 20)
        elif layout_of == "many-extents":
            for i in range(20):
                fh.seek(i << 20)
                fh.write(b"extent %d" % i)
            fh.truncate(24 << 20)
        else:
            fh.truncate(4 << 20)
    want = (src / "f").read_bytes()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    create_archive(src, tmp_path / "snap.tar", "none", tmp)
    ours, gnu = tmp_path / "ours", tmp_path / "gnu"
    ours.mkdir()
    gnu.mkdir()
    extract_archive(tmp_path / "snap.tar", ours)
    subprocess.run(["tar", "-xf", str(tmp_path / "snap.tar"), "-C", str(gnu)], check=True)
    for out in (ours, gnu):
        assert (out / "f").read_bytes() == want
        if layout_of != "many-extents":
            assert os.stat(out / "f").st_blocks * 512 < (1 << 20)


def test_create_leaves_out_special_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A FIFO in a volume must not turn into a snapshot restore refuses."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    os.mkfifo(src / "d" / "pipe")
    os.mkfifo(src / "odd*name\nwith newline")
    (src / "d" / "pipe-not").write_text("a regular file whose name starts like the FIFO's")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with caplog.at_level(logging.WARNING, logger="csi_driver.archive"):
        create_archive(src, tmp_path / "snap.tar", "none", tmp)
    assert "2 special file(s)" in caplog.text
    with tarfile.open(tmp_path / "snap.tar") as tf:
        names = sorted(tf.getnames())
    assert names == [".", "./d", "./d/pipe-not"]
    out = tmp_path / "out"
    out.mkdir()
    extract_archive(tmp_path / "snap.tar", out)
    assert (out / "d" / "pipe-not").exists()


@pytest.mark.parametrize("target", ["/etc", "../outside", "a/../../outside"])
def test_create_refuses_links_restore_would_refuse(tmp_path: Path, target: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(target, src / "bad-link")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with pytest.raises(ArchiveError, match="bad-link"):
        create_archive(src, tmp_path / "snap.tar", "none", tmp)
    assert not (tmp_path / "snap.tar").exists()
    assert os.listdir(tmp) == []


def test_create_refuses_symlink_chain_escape(tmp_path: Path) -> None:
    """Each link looks fine as text; together they leave the volume."""
    src = tmp_path / "src"
    src.mkdir()
    os.symlink(".", src / "s")
    os.symlink("s/../outside", src / "t")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    with pytest.raises(ArchiveError, match="'t'"):
        create_archive(src, tmp_path / "snap.tar", "none", tmp)


# --------------------------------------------------------------------------
# Failed creates leave nothing


def test_create_missing_source_leaves_nothing(layout: dict[str, Path]) -> None:
    dest = layout["root"] / "snap.tar"
    with pytest.raises(ArchiveError, match="not a directory"):
        create_archive(layout["root"] / "nope", dest, "none", layout["tmp"])
    assert not dest.exists()
    assert os.listdir(layout["tmp"]) == []


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_create_unwritable_dest_leaves_nothing(layout: dict[str, Path], compression: str) -> None:
    src = layout["root"] / "src"
    src.mkdir()
    (src / "f").write_text("data")
    dest = layout["root"] / "no-such-dir" / "snap.tar"
    with pytest.raises(ArchiveError) as info:
        create_archive(src, dest, compression, layout["tmp"])
    assert info.value.errno == errno.ENOENT
    assert not dest.exists()
    assert os.listdir(layout["tmp"]) == []


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_create_interrupted_midway_leaves_nothing(
    layout: dict[str, Path], compression: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception while tar (and the compressor) run: children are killed,
    the temp file goes, dest never appears."""
    src = layout["root"] / "src"
    src.mkdir()
    for i in range(8):
        (src / f"f{i}").write_bytes(os.urandom(4 << 20))
    monkeypatch.setattr(archive, "_PROGRESS_INTERVAL", 0.0)  # report at the first chance

    def boom(done: int) -> None:
        raise RuntimeError(f"cancelled at {done}")

    dest = layout["root"] / "snap"
    with pytest.raises(RuntimeError, match="cancelled"):
        create_archive(src, dest, compression, layout["tmp"], progress=boom)
    assert not dest.exists()
    assert os.listdir(layout["tmp"]) == []
    assert _children() == []


def _children() -> list[str]:
    """Our own child processes still alive (zombies count: they were not reaped)."""
    me = str(os.getpid())
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.append(pid)
    return out


def test_create_replaces_existing_dest_atomically(layout: dict[str, Path]) -> None:
    src = layout["root"] / "src"
    src.mkdir()
    (src / "f").write_text("new")
    dest = layout["root"] / "snap.tar"
    dest.write_text("stale leftover")
    create_archive(src, dest, "none", layout["tmp"])
    with tarfile.open(dest) as tf:
        assert tf.extractfile("./f").read() == b"new"


def test_progress_reports_uncompressed_bytes(layout: dict[str, Path]) -> None:
    src = layout["root"] / "src"
    src.mkdir()
    (src / "f").write_bytes(b"\0" * (3 << 20))
    seen: list[int] = []
    create_archive(src, layout["root"] / "s.tar.zst", "zstd", layout["tmp"], seen.append)
    assert seen and seen[-1] >= 3 << 20  # zstd makes this tiny; progress counts tar bytes
    seen.clear()
    extract_archive(layout["root"] / "s.tar.zst", layout["dest"], seen.append)
    assert seen and seen[-1] >= 3 << 20
    assert seen == sorted(seen)


# --------------------------------------------------------------------------
# Hostile archives


def _abs(layout: dict[str, Path], *parts: str) -> str:
    return str(layout["sentinel"].joinpath(*parts))


HOSTILE: dict[str, Callable[[dict[str, Path]], list[tuple[tarfile.TarInfo, bytes | None]]]] = {
    "absolute path": lambda l: [(member(_abs(l, "evil")), b"pwned")],
    "absolute path to existing file": lambda l: [(member(_abs(l, "victim")), b"pwned")],
    "dotdot escape": lambda l: [(member("../sentinel/evil"), b"pwned")],
    "dotdot after a dir": lambda l: [(member("a", tarfile.DIRTYPE), None),
                                     (member("a/../../sentinel/victim"), b"pwned")],
    "dotdot that stays inside": lambda l: [(member("a/../b"), b"still refused")],
    "symlink escape then write through it": lambda l: [
        (member("link", tarfile.SYMTYPE, linkname="../sentinel"), None),
        (member("link/victim"), b"pwned")],
    "absolute symlink then write through it": lambda l: [
        (member("link", tarfile.SYMTYPE, linkname=_abs(l)), None),
        (member("link/victim"), b"pwned")],
    "write through an inside symlink": lambda l: [
        (member("sub", tarfile.DIRTYPE), None),
        (member("link", tarfile.SYMTYPE, linkname="sub"), None),
        (member("link/file"), b"through a link")],
    "symlink chain escape": lambda l: [
        (member("s", tarfile.SYMTYPE, linkname="."), None),
        (member("t", tarfile.SYMTYPE, linkname="s/../sentinel"), None)],
    "symlink chain escape then write": lambda l: [
        (member("s", tarfile.SYMTYPE, linkname="."), None),
        (member("t", tarfile.SYMTYPE, linkname="s/../sentinel"), None),
        (member("t/victim"), b"pwned")],
    "symlink chain made in reverse order": lambda l: [
        (member("t", tarfile.SYMTYPE, linkname="s/../x"), None),
        (member("s", tarfile.SYMTYPE, linkname="."), None)],
    "hardlink escape": lambda l: [(member("h", tarfile.LNKTYPE, linkname="../sentinel/victim"), None)],
    "hardlink absolute": lambda l: [(member("h", tarfile.LNKTYPE, linkname=_abs(l, "victim")), None)],
    "hardlink to missing member": lambda l: [(member("h", tarfile.LNKTYPE, linkname="nothing"), None)],
    "hardlink to itself": lambda l: [(member("h", tarfile.LNKTYPE, linkname="h"), None)],
    "hardlink to a directory": lambda l: [(member("d", tarfile.DIRTYPE), None),
                                          (member("h", tarfile.LNKTYPE, linkname="d"), None)],
    "hardlink through an escaping symlink": lambda l: [
        (member("d", tarfile.DIRTYPE), None),
        (member("d/l", tarfile.SYMTYPE, linkname=".."), None),
        (member("h", tarfile.LNKTYPE, linkname="d/l/../sentinel/victim"), None)],
    "hardlink via an inside symlink": lambda l: [
        (member("sub", tarfile.DIRTYPE), None),
        (member("sub/f"), b"x"),
        (member("l", tarfile.SYMTYPE, linkname="sub"), None),
        (member("h", tarfile.LNKTYPE, linkname="l/f"), None)],
    "hardlink to a symlink that escapes from its new place": lambda l: [
        (member("a/b", tarfile.DIRTYPE), None),
        (member("a/b/l", tarfile.SYMTYPE, linkname="../../x"), None),
        (member("h", tarfile.LNKTYPE, linkname="a/b/l"), None)],
    "character device": lambda l: [(member("null", tarfile.CHRTYPE), None)],
    "block device": lambda l: [(member("disk", tarfile.BLKTYPE), None)],
    "fifo": lambda l: [(member("pipe", tarfile.FIFOTYPE), None)],
    "unknown member type": lambda l: [(member("odd", b"Q"), None)],  # b"X" would be a pax header
}


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_refused(layout: dict[str, Path], case: str, compression: str) -> None:
    archive_path = make_archive(layout["root"] / "evil.tar", HOSTILE[case](layout))
    if compression == "zstd":
        subprocess.run(["zstd", "-q", "--rm", str(archive_path), "-o", str(archive_path) + ".zst"],
                       check=True)
        archive_path = Path(str(archive_path) + ".zst")
    before = listing(layout["sentinel"])
    siblings = sorted(os.listdir(layout["root"]))

    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive_path, layout["dest"])

    message = str(info.value)
    assert "unsafe archive" in message and "'" in message  # names the member
    assert listing(layout["sentinel"]) == before
    assert sorted(os.listdir(layout["root"])) == siblings
    assert not (layout["root"] / "evil").exists() and not (layout["root"] / "x").exists()
    # nothing inside dest may point outside it either (the caller deletes dest, but still)
    real_dest = os.path.realpath(layout["dest"])
    for dirpath, dirnames, filenames in os.walk(layout["dest"]):
        for name in dirnames + filenames:
            resolved = os.path.realpath(os.path.join(dirpath, name))
            if os.path.islink(os.path.join(dirpath, name)) and case.startswith("symlink chain"):
                continue  # the chain is only detected after it is made; it was reported
            assert resolved == real_dest or resolved.startswith(real_dest + os.sep), (name, resolved)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("absolute path", "absolute path"),
        ("dotdot escape", "'..'"),
        ("write through an inside symlink", "written through the symlink 'link'"),
        ("hardlink to missing member", "nothing extracted before it"),
        ("character device", "character device node"),
        ("fifo", "FIFO"),
        ("symlink chain escape", "through other symlinks"),
    ],
)
def test_refusal_messages_say_why(layout: dict[str, Path], case: str, needle: str) -> None:
    archive_path = make_archive(layout["root"] / "evil.tar", HOSTILE[case](layout))
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive_path, layout["dest"])
    assert needle in str(info.value)


def test_inside_links_are_fine(layout: dict[str, Path]) -> None:
    """Links that stay inside, and a later entry replacing an earlier one, as GNU tar does."""
    path = make_archive(layout["root"] / "ok.tar", [
        (member("d", tarfile.DIRTYPE), None),
        (member("d/f"), b"first"),
        (member("d/f"), b"second"),
        (member("d/up", tarfile.SYMTYPE, linkname="../d/f"), None),
        (member("h", tarfile.LNKTYPE, linkname="d/f"), None),
        (member("d/hl", tarfile.LNKTYPE, linkname="d/up"), None),  # a hard-linked symlink, still inside
        (member("implicit/parent/file"), b"no dir entries before me"),
    ], fmt=tarfile.GNU_FORMAT)
    extract_archive(path, layout["dest"])
    dest = layout["dest"]
    assert (dest / "d" / "up").read_bytes() == b"second"
    assert (dest / "h").read_bytes() == b"second"
    assert os.readlink(dest / "d" / "hl") == "../d/f"
    assert os.lstat(dest / "d" / "hl").st_ino == os.lstat(dest / "d" / "up").st_ino
    assert (dest / "implicit" / "parent" / "file").read_bytes() == b"no dir entries before me"


def test_extract_requires_empty_dest(layout: dict[str, Path]) -> None:
    path = make_archive(layout["root"] / "ok.tar", [(member("f"), b"x")])
    (layout["dest"] / "already-here").write_text("")
    with pytest.raises(ValueError, match="not empty"):
        extract_archive(path, layout["dest"])


# --------------------------------------------------------------------------
# Compression detection and corrupt archives


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("misleading_name", ["snap.tar", "snap.tar.gz", "snap.tar.zst", "snap"])
def test_compression_comes_from_magic_not_name(
    layout: dict[str, Path], compression: str, misleading_name: str
) -> None:
    src = layout["root"] / "src"
    src.mkdir()
    (src / "f").write_text("payload")
    made = layout["root"] / ("made" + archive_suffix(compression))
    create_archive(src, made, compression, layout["tmp"])
    renamed = layout["root"] / misleading_name
    made.rename(renamed)
    extract_archive(renamed, layout["dest"])
    assert (layout["dest"] / "f").read_text() == "payload"


@pytest.fixture
def good_archives(layout: dict[str, Path]) -> dict[str, bytes]:
    src = layout["root"] / "src"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(os.urandom(200_000))
    out = {}
    for compression in COMPRESSIONS:
        path = layout["root"] / ("good" + archive_suffix(compression))
        create_archive(src, path, compression, layout["tmp"])
        out[compression] = path.read_bytes()
        path.unlink()
    shutil.rmtree(src)
    return out


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


CORRUPTIONS: dict[str, Callable[[dict[str, bytes]], bytes]] = {
    "empty file": lambda g: b"",
    "random bytes": lambda g: os.urandom(100_000),
    "plain tar cut mid-data": lambda g: g["none"][: len(g["none"]) // 2],
    "plain tar cut at a header": lambda g: g["none"][:512 * 3],
    "gzip cut short": lambda g: g["gzip"][: len(g["gzip"]) // 2],
    "gzip with a flipped byte": lambda g: _flip(g["gzip"], len(g["gzip"]) // 2),
    "gzip with trailing garbage": lambda g: g["gzip"] + b"not another gzip member",
    "gzip with a truncated trailer": lambda g: g["gzip"][:-3],
    "zstd cut short": lambda g: g["zstd"][: len(g["zstd"]) // 2],
    "zstd with a flipped byte": lambda g: _flip(g["zstd"], len(g["zstd"]) // 2),
    "zstd magic then garbage": lambda g: b"\x28\xb5\x2f\xfd" + os.urandom(5000),
    "gzip magic then garbage": lambda g: b"\x1f\x8b" + os.urandom(5000),
    "xz": lambda g: b"\xfd7zXZ\x00" + os.urandom(100),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_archive_raises_archive_error(
    layout: dict[str, Path], good_archives: dict[str, bytes], case: str
) -> None:
    path = layout["root"] / "corrupt.tar"
    path.write_bytes(CORRUPTIONS[case](good_archives))
    with pytest.raises(ArchiveError):
        extract_archive(path, layout["dest"])
    assert _children() == []


def test_damaged_header_is_not_a_silent_short_restore(
    layout: dict[str, Path], good_archives: dict[str, bytes]
) -> None:
    """tarfile stops quietly at a bad header after the first member; that
    must not look like a complete restore with files missing."""
    data = good_archives["none"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
    path = layout["root"] / "damaged.tar"
    path.write_bytes(_flip(data, last.offset + 148))  # the checksum field of the last header
    with pytest.raises(ArchiveError, match="truncated or corrupt"):
        extract_archive(path, layout["dest"])


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_files_changing_during_the_cut_give_readable_archives(tmp_path: Path, compression: str) -> None:
    """A volume that is not frozen (``mounter: bind``) changes under the cut:
    a file shrinks, grows and gets holes while it is read. Every header must
    be followed by exactly the bytes it announces, so every archive lists
    with GNU tar and restores, whatever the timing."""
    import threading

    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"small{i}").write_bytes(b"s" * 3000)
    stop = threading.Event()

    def churn(name: str, step: int) -> None:  # shrink and grow, with holes past the old end
        fd = os.open(src / name, os.O_RDWR)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                os.ftruncate(fd, (n % 7) * step)
                os.pwrite(fd, b"d" * 5000, (n % 5) * step)
        finally:
            os.close(fd)

    churned = (("churn", 1 << 20), ("churn-small", 100_000))
    for name, step in churned:
        (src / name).write_bytes(b"c" * step)
    workers = [threading.Thread(target=churn, args=(name, step), daemon=True) for name, step in churned]
    for worker in workers:
        worker.start()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    flags = {"none": [], "gzip": ["--gzip"], "zstd": ["--zstd"]}[compression]
    try:
        for i in range(15):
            dest = tmp_path / f"snap{i}{archive_suffix(compression)}"
            create_archive(src, dest, compression, tmp)
            listed = subprocess.run(["tar", *flags, "-tf", str(dest)], check=True, capture_output=True).stdout
            assert b"./churn\n" in listed and b"./churn-small\n" in listed and b"./small19\n" in listed
            out = tmp_path / f"out{i}"
            out.mkdir()
            extract_archive(dest, out)
            assert (out / "small19").read_bytes() == b"s" * 3000
            dest.unlink()
    finally:
        stop.set()
        for worker in workers:
            worker.join()
