"""The hostile quota tests, on the kernel engine.

A pod must not escape the quota whichever engine serves its volume: these
run the tests of tests/hostile that prove the charging model (every object
in blocks, on a dedicated ext4 filesystem whose ``du`` and used inodes are
compared with the limits, and with a fresh scan after a clean restart and
after a crash), the refusal of unknown rename flags and the open-file cap,
with ``FUSEFS_TEST_ENGINE=kernel``, so that the suite covers both engines
without setting anything. The tests themselves live in one place.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fusefs.conftest import base_dir  # noqa: F401 - fixture
from tests.hostile import test_fuse_names as names
from tests.hostile import test_open_files as open_files
from tests.hostile import test_quota_objects as objects

pytestmark = pytest.mark.privileged


@pytest.fixture(autouse=True)
def kernel_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEFS_TEST_ENGINE", "kernel")


@pytest.mark.parametrize("attack", sorted(objects.ATTACKS) + ["mix"])
def test_host_usage_stays_within_the_limits(base_dir: Path, attack: str) -> None:  # noqa: F811
    objects.test_host_usage_stays_within_the_limits(base_dir, attack)


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
