"""The driver's side of the conversation with the fusefs daemon.

The daemon may be embedded (a detached child we start, and re-use after our
own restart) or a sidecar container reached over a unix socket. Either way
the driver only ever holds a client; it never owns a FUSE session, so a
driver crash or upgrade disturbs no mount.

In embedded mode nothing else would bring back a daemon that died (in a
cluster, kubelet restarts the fusefs container), so a watcher thread checks
every ``WATCH_INTERVAL`` that the daemon's process still runs and starts a
new one when it does not, with a backoff between failed starts. The new
daemon re-mounts every volume from its state file and re-binds each target;
with ``--fusefs-engine=kernel`` it takes over each volume's live connection
instead, from a descriptor holder that is started beside the daemon the same
way (detached, re-used when it answers) and outlives the driver and the
daemon.
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
#: How often the embedded daemon's process is checked, and the backoff
#: between failed attempts to start a new one.
WATCH_INTERVAL = 0.25
RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX = 0.5, 30.0


class FuseFSLink:
    """Lazily-connected client to the fusefs daemon."""

    def __init__(self, target: str, data_dir: Path, kubelet_dir: Path, engine: str = "kernel") -> None:
        self._target = target
        self._engine = engine
        self._data_dir = data_dir
        self._kubelet_dir = kubelet_dir
        self._client: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Make sure a daemon is there (starting the embedded one if needed), and
        in embedded mode keep it there."""
        self.client()
        if self._target == "embedded" and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="fusefs-watcher", daemon=True)
            self._watcher.start()

    def stop(self) -> None:
        """Stop watching (the daemon itself is left running, with every mount).

        Waits for the watcher, so that a caller that stops the daemon next
        (Ctrl-C of ``make run``) never races a restart of it.
        """
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)

    def _watch(self) -> None:
        """Start a new embedded daemon whenever the current one's process is gone."""
        from fusefs.embedded import daemon_pid

        backoff = RESTART_BACKOFF_MIN
        while not self._stop.wait(WATCH_INTERVAL):
            if daemon_pid(self._data_dir) is not None:
                backoff = RESTART_BACKOFF_MIN
                continue
            try:
                self._restart_embedded()
                backoff = RESTART_BACKOFF_MIN
            except Exception as exc:  # noqa: BLE001 - logged and retried with backoff
                log.error("starting a new embedded fusefs daemon failed; retrying in %.1fs: %s", backoff, exc)
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX)

    def _restart_embedded(self) -> None:
        """Start a new daemon (it re-mounts every volume) and talk to it on a fresh channel.

        A fresh channel, because the old one may be in gRPC's reconnect
        backoff after the socket went away, which would delay the first
        calls to the new daemon by up to minutes.
        """
        from fusefs.client import FuseFSClient
        from fusefs.embedded import ensure_daemon

        started = time.monotonic()
        endpoint = ensure_daemon(self._data_dir, self._kubelet_dir, log_path=self._data_dir / "fusefs.log",
                                 engine=self._engine)
        with self._lock:
            old, self._client = self._client, FuseFSClient(endpoint)
        if old is not None:
            old.close()
        log.warning("the embedded fusefs daemon had died; started a new one in %.2fs, which %s",
                    time.monotonic() - started, "takes over every volume's connection from the holder"
                    if self._engine == "kernel" else "re-mounts every volume")

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                from fusefs.client import FuseFSClient

                endpoint = self._target
                if endpoint == "embedded":
                    from fusefs.embedded import ensure_daemon

                    endpoint = ensure_daemon(self._data_dir, self._kubelet_dir,
                                             log_path=self._data_dir / "fusefs.log", engine=self._engine)
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
