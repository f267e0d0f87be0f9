"""What Ctrl-C of a local driver (``make run``) stops, and what it reports.

SIGTERM is how the kubelet, a container runtime or a restart stops the
driver: the embedded fusefs daemon then stays, so the next driver finds
every FUSE mount untouched. SIGINT is a person at a terminal pressing Ctrl-C:
they expect nothing of ours to keep running. So on SIGINT the driver also
stops its embedded daemon (which unmounts its staging mounts) and, with
``--fusefs-engine=kernel``, its descriptor holder, then says in
one line what is still mounted under its directories and how to clean up.
Nothing is unmounted or deleted here: a publication left in place is the
daemon's deliberate choice, and the next ``make run`` mounts and binds it again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from csi_driver.config import Config
from fusefs import mountinfo

log = logging.getLogger("fusepath")


def stop_embedded(config: Config) -> None:
    """Stop the embedded fusefs daemon of ``config.data_dir`` and report leftover mounts."""
    from fusefs.embedded import stop_daemon, stop_holder

    try:
        stopped = stop_daemon(config.data_dir)
        # The kernel engine's holder too: nothing of ours keeps running, and
        # the mounts it kept end as the libfuse engine's do (ENOTCONN).
        stop_holder(config.data_dir)
    except OSError as exc:
        log.warning(f"Ctrl-C: could not stop the embedded fusefs daemon: {exc}")
        return
    left = mounts_under(config.data_dir, config.kubelet_dir)
    what = "stopped the embedded fusefs daemon" if stopped else "no embedded fusefs daemon was running"
    if not left:
        log.info(f"Ctrl-C: {what}; nothing is left mounted")
        return
    log.warning(f"Ctrl-C: {what}; left mounted ({len(left)}): {' '.join(left)}; they are served again by the "
                "next driver on this data dir; to clean up instead, `umount` each path (deepest first), "
                "or run `make clean`, which unmounts everything under .run before deleting it")


def mounts_under(*dirs: Path) -> list[str]:
    """Mount points strictly below any of ``dirs``, deepest first (the order to unmount them in)."""
    prefixes = tuple(str(Path(d).resolve()) + "/" for d in dirs)
    points = {e.mount_point for e in mountinfo.read() if e.mount_point.startswith(prefixes)}
    return sorted(points, key=lambda p: (-p.count("/"), p))
