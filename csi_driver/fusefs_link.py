"""The driver's side of the conversation with the fusefs daemon.

The daemon may be embedded (a detached child we start, and re-use after our
own restart) or a sidecar container reached over a unix socket. Either way
the driver only ever holds a client; it never owns a FUSE session, so a
driver crash or upgrade disturbs no mount (DESIGN §1).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from csi_driver import metrics

log = logging.getLogger("fusepath.fusefs")

#: How long the daemon keeps a volume frozen if we die mid-snapshot.
FREEZE_TIMEOUT_SECONDS = 120


class FuseFSLink:
    """Lazily-connected client to the fusefs daemon."""

    def __init__(self, target: str, data_dir: Path, kubelet_dir: Path) -> None:
        self._target = target
        self._data_dir = data_dir
        self._kubelet_dir = kubelet_dir
        self._client: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Make sure a daemon is there (starting the embedded one if needed)."""
        self.client()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from fusefs.client import FuseFSClient

                endpoint = self._target
                if endpoint == "embedded":
                    from fusefs.embedded import ensure_daemon

                    endpoint = ensure_daemon(self._data_dir, self._kubelet_dir,
                                             log_path=self._data_dir / "fusefs.log")
                self._client = FuseFSClient(endpoint)
            return self._client

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            return bool(self.client().ping(timeout=timeout))
        except Exception as exc:  # noqa: BLE001 - a probe reports, it does not raise
            log.warning("fusefs daemon does not answer: %s", exc)
            return False

    @contextmanager
    def frozen(self, volume_ids: Iterable[str]) -> Iterator[float]:
        """Freeze writes on the given fusefs-served volumes for the block.

        Yields nothing useful; the freeze window (seconds between the moment
        every volume was frozen and the moment they were thawed) is recorded
        in the ``fusepath_freeze_seconds`` histogram and logged.
        """
        ids = sorted(set(volume_ids))
        if not ids:
            yield 0.0
            return
        client = self.client()
        client.freeze(ids, FREEZE_TIMEOUT_SECONDS)
        started = time.monotonic()
        try:
            yield started
        finally:
            client.thaw(ids)
            window = time.monotonic() - started
            metrics.FREEZE_SECONDS.observe(window)
            log.info("thawed %s after a %.3fs freeze window", ",".join(ids), window)
