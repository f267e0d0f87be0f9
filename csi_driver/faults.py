"""Named crash points for the crash-safety tests.

``point("create.after_row")`` does nothing unless the environment variable
``FUSEPATH_CRASH_AT`` names that point, in which case the process kills
itself with SIGKILL right there, exactly as a node losing power or an OOM
kill would. The tests use it to prove that every step of every multi-step
operation is recoverable; in production the variable is never set and the
check costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_CRASH_AT = os.environ.get("FUSEPATH_CRASH_AT", "")


def point(name: str) -> None:
    if _CRASH_AT and name == _CRASH_AT:
        os.kill(os.getpid(), signal.SIGKILL)
