"""A kernel-engine session builds only what the kernel engine uses.

It used to build the libfuse engine's filesystem object too, only to read
its options and xattr flags; that object (and what it holds: descriptors,
the hard-link tracker) must not exist in a kernel-engine session, while the
control commands see what they always saw."""

from __future__ import annotations

import gc
from pathlib import Path

from fusefs.kernel.serve import KernelOptions, KernelSession
from fusefs.operations import FusefsOperations


def test_a_kernel_session_has_no_libfuse_filesystem_object(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "mnt").mkdir()
    gc.collect()
    before = sum(isinstance(o, FusefsOperations) for o in gc.get_objects())
    session = KernelSession(kernel_options=KernelOptions(), volume_id="v", source=str(tmp_path / "src"),
                            mountpoint=str(tmp_path / "mnt"), control_socket=None, capacity=1 << 20)
    gc.collect()
    assert sum(isinstance(o, FusefsOperations) for o in gc.get_objects()) == before
    # What Session's stats and commands read from the filesystem object.
    assert session.ops.links.invalidations == 0
    assert session.ops.fuse_session is None
    assert session.ops.options.max_open_files == session.ops.open_files.limit
