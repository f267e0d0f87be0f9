"""What every hostile-pod test shares.

Pods make trees deeper than Python's recursion limit; pytest removes old
tmp dirs with a recursive ``shutil.rmtree``, which would then fail at the end
of every later session. So each hostile test's tmp dir is removed here, by
file descriptors and iteratively, right after the test (autouse fixtures are
set up first, so this runs after the test's own fixtures are torn down).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile.walk_helpers import remove_deep


@pytest.fixture(autouse=True)
def _deep_cleanup(tmp_path: Path) -> Iterator[None]:
    yield
    remove_deep(tmp_path)
