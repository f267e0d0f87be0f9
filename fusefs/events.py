"""Kubernetes Events on the pods that use a volume, and on their PVCs, when the daemon can post them.

An Event on the pod and on its PVC is how a user learns that the FUSE
session under their volume was restarted: a container without
HostToContainer mount propagation is left on a dead mount (ENOTCONN) until it
is restarted, and one with it sees the new mount but gets ENOTCONN from files
it held open across the restart (``VolumeManager._restart_message`` has the
text); it needs no feature gate. The pod comes from the Mount/Publish
requests (podInfoOnMount), the PVC from the volume context the driver's
CreateVolume returned.

Posting is best effort and never blocks recovery: events are queued to one
background thread. Without a kube config (no in-cluster service account, no
KUBECONFIG, no ~/.kube/config), as on a workstation or in CI, each event is
skipped with one debug line.
"""

from __future__ import annotations

import datetime
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fusefs.state import PodRef

log = logging.getLogger("fusefs.events")

COMPONENT = "fusefs"
REPORTING_CONTROLLER = "fusepath.csi.io/fusefs"
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
#: Events are dropped rather than queued without bound when the API is slow.
MAX_QUEUED = 256

REASON_RESTARTED = "FuseSessionRestarted"
REASON_FAILED = "FuseSessionFailed"


def build_event(pod: PodRef, reason: str, message: str, node: str, event_type: str = "Warning",
                now: datetime.datetime | None = None, on_claim: bool = False) -> dict[str, Any]:
    """A core/v1 Event about ``pod`` (or, ``on_claim``, its PVC), as the dict the API server accepts.

    ``generateName`` lets the server pick a unique name; the message is cut to
    the API's 1 KiB limit. An Event on the PVC is what ``kubectl describe
    pvc`` shows, with no feature gate, and outlives the pod.
    """
    now = now or datetime.datetime.now(datetime.timezone.utc)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    micro = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if on_claim:
        involved: dict[str, Any] = {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                    "namespace": pod.namespace, "name": pod.claim}
    else:
        involved = {"apiVersion": "v1", "kind": "Pod", "namespace": pod.namespace, "name": pod.name}
        if pod.uid:
            involved["uid"] = pod.uid
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{involved['name']}.", "namespace": pod.namespace},
        "involvedObject": involved,
        "reason": reason,
        "message": message[:1024],
        "type": event_type,
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": REPORTING_CONTROLLER,
        "reportingInstance": node,
        "action": "Remount",
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": micro,
        "count": 1,
    }


def kube_config_available() -> bool:
    """True when an in-cluster service account or a kubeconfig file is there."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and SERVICE_ACCOUNT_TOKEN.exists():
        return True
    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig:
        return any(Path(p).is_file() for p in kubeconfig.split(os.pathsep) if p)
    return (Path.home() / ".kube" / "config").is_file()


def load_core_api() -> Any | None:
    """A CoreV1Api, or None when there is no kube config to build it from."""
    if not kube_config_available():
        return None
    from kubernetes import client, config  # imported late: only needed in a cluster

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoreV1Api()


class EventPoster:
    """Queues Events and posts them from one background thread."""

    def __init__(self, node: str | None = None, api_factory: Callable[[], Any | None] = load_core_api) -> None:
        self.node = node or socket.gethostname()
        self._api_factory = api_factory
        self._api: Any | None = None
        self._loaded = False
        # Items are event bodies, or an Event that flush() waits on.
        self._queue: queue.Queue[dict[str, Any] | threading.Event] = queue.Queue(MAX_QUEUED)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def post(self, pod: PodRef, reason: str, message: str, event_type: str = "Warning",
             on_claim: bool = False) -> None:
        """Queue an Event on ``pod`` (or its PVC); returns at once. Pods without a name are ignored."""
        if not pod or (on_claim and not pod.claim):
            return
        body = build_event(pod, reason, message, self.node, event_type, on_claim=on_claim)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fusefs-events", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(body)
        except queue.Full:
            log.warning("event queue full; dropping event", extra={"fields": {"reason": reason}})

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until queued events are handled (tests, shutdown)."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(done, timeout=timeout)
        done.wait(timeout)

    def send_now(self, body: dict[str, Any]) -> bool:
        """Post one event body synchronously; False when skipped or failed."""
        if not self._loaded:
            self._loaded = True
            try:
                self._api = self._api_factory()
            except Exception as exc:  # noqa: BLE001 - a broken kube config must not break mounts
                log.warning("cannot load kube config; events disabled: %s", exc)
                self._api = None
        meta, involved = body["metadata"], body["involvedObject"]
        if self._api is None:
            log.debug("no kube config; skipping event", extra={"fields": {
                "reason": body["reason"], "object": f"{involved['kind']} {involved['namespace']}/{involved['name']}"}})
            return False
        try:
            self._api.create_namespaced_event(meta["namespace"], body)
            return True
        except Exception as exc:  # noqa: BLE001 - events are best effort
            log.warning("posting event failed: %s", exc, extra={"fields": {"reason": body["reason"]}})
            return False

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
            else:
                self.send_now(item)
