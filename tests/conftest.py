"""Shared fixtures.

Privileged tests (real mounts, loop devices, FUSE) are marked
``@pytest.mark.privileged``. They skip when the machine cannot run them, but
with ``FUSEPATH_REQUIRE_PRIVILEGED=1`` (set by ``.ci/run``) such a skip becomes a
failure, so CI can never pass by silently not testing the kernel paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REQUIRE_PRIVILEGED = os.environ.get("FUSEPATH_REQUIRE_PRIVILEGED") == "1"

#: ``FUSEFS_TEST_ENGINE`` picks the engine of the whole suite (kernel by
#: default; ``FUSEFS_TEST_ENGINE=libfuse`` runs it on the libfuse engine):
#: sessions the tests start themselves take ``--engine`` from it (see
#: tests/fusefs/conftest.py), every driver a test starts inherits it as
#: ``FUSEPATH_FUSEFS_ENGINE`` (its ``--fusefs-engine``), and daemons a test
#: starts itself are given ``--engine`` (tests.harness.daemon_engine()).
#: Tests that pin an engine pass it explicitly.
TEST_ENGINE = os.environ.get("FUSEFS_TEST_ENGINE", "kernel")
os.environ.setdefault("FUSEPATH_FUSEFS_ENGINE", TEST_ENGINE)


def privileged_unavailable_reason() -> str | None:
    """Why privileged tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "not running as root"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if not os.path.exists("/dev/loop-control"):
        return "/dev/loop-control is missing"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = privileged_unavailable_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("privileged") is None:
            continue
        item.add_marker(pytest.mark.skip(reason=f"privileged: {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    skipped = report.skipped and not hasattr(report, "wasxfail")  # an xfail is a result, not a skip
    if REQUIRE_PRIVILEGED and skipped and item.get_closest_marker("privileged") is not None:
        report.outcome = "failed"
        report.longrepr = f"privileged test skipped under FUSEPATH_REQUIRE_PRIVILEGED=1: {report.longrepr}"


@pytest.fixture
def driver(tmp_path: Path):
    """A fresh driver process for one test (mount-heavy tests are privileged)."""
    from tests.harness import Driver

    d = Driver(tmp_path, "--enable-attach", "--max-volumes-per-node=4")
    d.start()
    yield d
    d.teardown()


@pytest.fixture(scope="module")
def shared_driver(tmp_path_factory: pytest.TempPathFactory):
    """One driver for a whole module of read-mostly tests; names must be unique per test."""
    from tests.harness import Driver

    d = Driver(tmp_path_factory.mktemp("driver"), "--enable-attach", "--max-volumes-per-node=4")
    d.start()
    yield d
    d.teardown()
