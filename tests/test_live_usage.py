"""The live usage file and the audit of adopted counters, without a mount.

The file must give a successor the last whole figures of its connection and
nothing else: not a torn update, not another connection's figures. The audit
must never leave the counters below what the volume holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fusefs.live_usage import SIZE, LiveUsage, figures, new_token
from fusefs.quota import BLOCK, Quota


def test_a_successor_reads_the_last_whole_figures(tmp_path: Path) -> None:
    path, token = str(tmp_path / "s.live"), new_token()
    live = LiveUsage.create(path, token)
    assert LiveUsage.adopt(path, token)[1] is None  # nothing published yet: unknown
    live = LiveUsage.create(path, token)
    for i in range(1, 6):
        live.publish(i * BLOCK, i + 1)
    _, figures = LiveUsage.adopt(path, token)
    assert figures == (5 * BLOCK, 6)
    assert os.path.getsize(path) == SIZE


def test_the_figures_survive_a_sigkill_of_the_writer(tmp_path: Path) -> None:
    """MAP_SHARED stores live in the page cache, not in the process."""
    path, token = str(tmp_path / "s.live"), new_token()
    code = (f"import os, signal\nfrom fusefs.live_usage import LiveUsage\n"
            f"live = LiveUsage.create({path!r}, {token!r})\n"
            f"for i in range(1, 1001): live.publish(i * 4096, i)\n"
            f"os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])),
                          check=False)
    assert proc.returncode == -9
    assert LiveUsage.adopt(path, token)[1] == (1000 * 4096, 1000)


def test_a_torn_update_leaves_the_previous_figures(tmp_path: Path) -> None:
    path, token = str(tmp_path / "s.live"), new_token()
    live = LiveUsage.create(path, token)
    live.publish(BLOCK, 2)   # slot 1
    live.publish(2 * BLOCK, 3)  # slot 0
    # A kill after the first two stores of the next update (slot 1).
    words = live._words
    words[8] = 3  # slot 1's first seq word
    words[9] = 999 * BLOCK
    assert figures(path, token) == (2 * BLOCK, 3)
    # Both slots torn: nothing to trust.
    words[4 + 3] = 77
    assert figures(path, token) is None


def test_another_connections_file_is_not_trusted(tmp_path: Path) -> None:
    path = str(tmp_path / "s.live")
    live = LiveUsage.create(path, new_token())
    live.publish(BLOCK, 2)
    mine = new_token()
    adopted, figures = LiveUsage.adopt(path, mine)
    assert figures is None
    adopted.publish(7 * BLOCK, 3)  # the file was made anew for this connection
    assert LiveUsage.adopt(path, mine)[1] == (7 * BLOCK, 3)
    (tmp_path / "short.live").write_bytes(b"\0" * 10)
    assert LiveUsage.adopt(str(tmp_path / "short.live"), mine)[1] is None


def test_the_quota_mirrors_every_change_but_not_while_recovering(tmp_path: Path) -> None:
    path, token = str(tmp_path / "s.live"), new_token()
    q = Quota(100 * BLOCK, recovering=True)
    q.mirror(LiveUsage.create(path, token))
    assert figures(path, token) is None
    q.recovered(3 * BLOCK, 4)
    q.charge(BLOCK)
    q.take_inode()
    assert figures(path, token) == (4 * BLOCK, 5)
    q.release_bytes(2 * BLOCK)
    q.give_inode()
    assert figures(path, token) == (2 * BLOCK, 4)
    q.lose()
    assert figures(path, token) is None


def test_a_quiet_audit_replaces_the_counters() -> None:
    q = Quota(100 * BLOCK, used_bytes=10 * BLOCK, used_inodes=5)
    mark = q.audit_start()
    assert q.audit_end(mark, 8 * BLOCK, 4) == {"verdict": "exact", "bytes": -2 * BLOCK, "inodes": -1}
    assert (q.used_bytes, q.used_inodes) == (8 * BLOCK, 4)


def test_an_audit_during_activity_corrects_only_what_it_proves() -> None:
    q = Quota(100 * BLOCK, used_bytes=10 * BLOCK, used_inodes=5)
    mark = q.audit_start()
    q.charge(2 * BLOCK)  # grown during the walk (seen by the scan or not)
    # The scan saw 10 or 12 blocks: 12 is consistent with the counters.
    assert q.audit_end(mark, 10 * BLOCK, 5)["verdict"] == "kept"
    assert q.used_bytes == 12 * BLOCK
    # Counters 5 blocks too high (an orphan the successor never knew): the
    # usage is at most scan + grown, and is set there, never lower.
    mark = q.audit_start()
    q.charge(BLOCK)
    judged = q.audit_end(mark, 7 * BLOCK, 5)
    assert judged == {"verdict": "corrected", "bytes": -5 * BLOCK, "inodes": 0}
    assert q.used_bytes == 8 * BLOCK
    # Counters too low (the scan found more than they can explain): raised.
    mark = q.audit_start()
    q.release_bytes(BLOCK)
    judged = q.audit_end(mark, 20 * BLOCK, 5)
    assert judged["verdict"] == "corrected" and q.used_bytes == 20 * BLOCK


def test_an_audit_during_which_a_name_moved_proves_nothing() -> None:
    q = Quota(100 * BLOCK, used_bytes=10 * BLOCK, used_inodes=5)
    mark = q.audit_start()
    q.note_move()
    assert q.audit_end(mark, 2 * BLOCK, 2)["verdict"] == "moved"
    assert (q.used_bytes, q.used_inodes) == (10 * BLOCK, 5)


def test_an_audit_with_requests_in_flight_never_lowers_the_counters() -> None:
    """A request in flight may have unlinked a file (the scan misses it) and
    not yet released its charge: lowering now would count it off twice."""
    q = Quota(100 * BLOCK, used_bytes=10 * BLOCK, used_inodes=5)
    mark = q.audit_start()
    assert q.audit_end(mark, 8 * BLOCK, 4, may_lower=False)["verdict"] == "kept"
    assert (q.used_bytes, q.used_inodes) == (10 * BLOCK, 5)
    judged = q.audit_end(q.audit_start(), 12 * BLOCK, 6, may_lower=False)
    assert judged["verdict"] == "corrected" and (q.used_bytes, q.used_inodes) == (12 * BLOCK, 6)
