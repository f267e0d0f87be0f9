"""Small pure pieces: validation, mountinfo parsing, paging tokens, redaction, locks, the store."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest

from csi_driver import errors, validation
from csi_driver.gen import csi_pb2
from csi_driver.locks import KeyedLocks
from csi_driver.logs import redacted
from fusefs.mountinfo import parse as parse_mountinfo
from csi_driver.state import Store, Volume
from csi_driver.state.schema import SCHEMA_VERSION


@pytest.mark.parametrize("value, ok", [
    ("vol-" + "a" * 32, True), ("vol-" + "A" * 32, False), ("vol-" + "a" * 31, False),
    ("vol-" + "a" * 32 + "\n", False), ("snap-" + "a" * 32, False), ("../vol-" + "a" * 32, False),
])
def test_volume_id_form(value, ok):
    assert validation.is_id(value, "vol-") is ok


@pytest.mark.parametrize("path", ["relative/path", "/kube/../etc", "/kube/a//b", "/kube/a/", "/kube", "/etc/x",
                                  "/kube/a\x00b"])
def test_kubelet_paths_rejected(path):
    with pytest.raises(errors.CSIError) as exc:
        validation.check_kubelet_path(path, "target_path", Path("/kube"))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_kubelet_path_accepted():
    assert validation.check_kubelet_path("/kube/pods/x/mount", "t", Path("/kube")) == Path("/kube/pods/x/mount")


def test_field_limits():
    with pytest.raises(errors.CSIError):
        validation.require_field("x" * 129, "name")
    assert validation.require_field("x" * 128, "name")
    with pytest.raises(errors.CSIError):
        validation.check_map({"k": "v" * 4096}, "parameters")


def test_mountinfo_parsing_unescapes_and_reads_fuse_source():
    line = ("812 29 0:77 / /var/lib/kubelet/pods/a\\040b/mount rw,nosuid,relatime shared:400 - "
            "fuse.fusefs fusepath:vol-0123 rw,user_id=0,group_id=0,allow_other")
    (entry,) = parse_mountinfo(line)
    assert entry.mount_point == "/var/lib/kubelet/pods/a b/mount"
    assert entry.fs_type == "fuse.fusefs" and entry.source == "fusepath:vol-0123"
    assert not entry.read_only


def test_secrets_are_redacted_at_any_depth():
    req = csi_pb2.NodeStageVolumeRequest(volume_id="v", secrets={"password": "hunter2"})
    out = redacted(req)
    assert out["secrets"] == {"password": "***"} and out["volume_id"] == "v"
    assert "hunter2" not in repr(out)


def test_keyed_locks_serialise_one_key_and_clean_up():
    locks, inside, peak = KeyedLocks(), [0], [0]

    def work():
        with locks.hold("k"):
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
            threading.Event().wait(0.005)
            inside[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 1 and len(locks) == 0


def test_store_schema_and_capacity_counter(tmp_path):
    store = Store(tmp_path / "state.db")
    assert store.schema_version() == SCHEMA_VERSION
    vol = Volume(id="vol-" + "1" * 32, name="a", state="ready", capacity=100, access_type="mount",
                 parameters={}, mutable_parameters={})
    assert store.insert_volume(vol, max_committed=150)
    assert not store.insert_volume(Volume(**{**vol.__dict__, "id": "vol-" + "2" * 32, "name": "b"}),
                                   max_committed=150)
    assert store.committed_bytes() == 100
    store.delete_volume_row(vol.id)
    assert store.committed_bytes() == 0
    store.close()
    again = Store(tmp_path / "state.db")  # migrations are idempotent
    assert again.schema_version() == SCHEMA_VERSION


def test_fifo_lock_hands_over_in_arrival_order():
    """The state database's writers get the write lock first come, first served."""
    import threading
    import time

    from csi_driver.state.writelock import FifoLock

    lock, order, threads = FifoLock(), [], []
    lock.acquire()
    for i in range(8):
        t = threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 10
        while len(lock._waiters) < i + 1 and time.monotonic() < deadline:  # queued before the next one asks
            time.sleep(0.001)
        assert len(lock._waiters) == i + 1
    lock.release()
    for t in threads:
        t.join(timeout=10)
    assert order == list(range(8))
    with lock:  # free again, and usable as a context manager
        assert lock._held
    assert not lock._held
    with pytest.raises(RuntimeError):
        lock.release()
