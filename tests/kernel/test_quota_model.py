"""The hostile quota tests, on the kernel engine.

A pod must not escape the quota whichever engine serves its volume. These
run, with ``FUSEFS_TEST_ENGINE=kernel``, the tests of tests/hostile that
prove the charging model (every object in blocks, on a dedicated ext4
filesystem whose ``du`` and used inodes are compared with the limits, and
with a fresh scan after a clean restart and after a crash), no growth of
any kind while the usage is unknown, the usage persisted at a clean stop and
rebuilt after a crash, xattrs that cost the session no memory per name, the
refusal of unknown rename flags and the open-file cap. So the suite covers
both engines without setting anything, and the tests live in one place.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fusefs.conftest import base_dir  # noqa: F401 - fixture
from tests.hostile import test_fuse_names as names
from tests.hostile import test_open_files as open_files
from tests.hostile import test_quota_cost as cost
from tests.hostile import test_quota_objects as objects
from tests.hostile import test_quota_remount as remount

pytestmark = pytest.mark.privileged


@pytest.fixture(autouse=True)
def kernel_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEFS_TEST_ENGINE", "kernel")


@pytest.mark.parametrize("attack", sorted(objects.ATTACKS) + ["mix"])
def test_host_usage_stays_within_the_limits(base_dir: Path, attack: str) -> None:  # noqa: F811
    objects.test_host_usage_stays_within_the_limits(base_dir, attack)


@pytest.mark.parametrize("how", ["restage", "crash"])
def test_usage_is_the_same_after_remounts(base_dir: Path, how: str) -> None:  # noqa: F811
    remount.test_usage_is_the_same_after_remounts(base_dir, how)


def test_clean_restage_trusts_the_persisted_usage(base_dir: Path) -> None:  # noqa: F811
    remount.test_clean_restage_trusts_the_persisted_usage(base_dir)


def test_nothing_grows_while_the_usage_is_unknown(base_dir: Path) -> None:  # noqa: F811
    remount.test_nothing_grows_while_the_usage_is_unknown(base_dir)


def test_distinct_xattr_names_do_not_grow_memory(base_dir: Path) -> None:  # noqa: F811
    cost.test_distinct_xattr_names_do_not_grow_memory(base_dir)


def test_rename_whiteout_and_unknown_flags_are_refused(base_dir: Path) -> None:  # noqa: F811
    names.test_rename_whiteout_and_unknown_flags_are_refused(base_dir)


def test_open_files_are_capped_per_volume(base_dir: Path) -> None:  # noqa: F811
    open_files.test_open_files_are_capped_per_volume(base_dir)


def test_the_kernel_engine_serves_these_tests(base_dir: Path) -> None:  # noqa: F811
    """The control: the sessions above really ran on the kernel engine."""
    from tests.hostile.quota_volume import Volume, volumes

    with volumes(base_dir) as made:
        v = Volume(base_dir)
        made.append(v)
        v.start()
        assert v.stats()["negotiated"].get("engine") == "kernel"
