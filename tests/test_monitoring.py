"""deploy/monitoring against the metrics a real driver and fusefs daemon export.

Every PromQL expression in the PrometheusRule and in the Grafana dashboard is
parsed for metric names; a driver and a fusefs daemon are started for real,
with a staged volume that has been written to, and both ``/metrics`` pages are
scraped. A name that neither page declares fails the test: an alert on a
metric that does not exist never fires, and a panel on one stays empty.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from csi_driver.gen import csi_pb2
from tests.harness import Driver, daemon_engine, mount_cap

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
NODE_YAML = REPO / "deploy" / "manifests" / "node.yaml"

#: Series Prometheus makes itself for every target.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "bool", "offset", "inf", "nan"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --- PromQL -----------------------------------------------------------------------

def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (functions, keywords, labels and template variables left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)                      # string literals
    text = re.sub(r"\$\{?\w+\}?", "1m", text)                             # Grafana variables
    text = re.sub(r"\{[^{}]*\}", " ", text)                              # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)                            # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def test_the_parser_finds_names_and_only_names() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, op) (rate(x_seconds_bucket{volume_id=~"$volume",op!="a b"}'
            '[$__rate_interval]))) / on(volume_id) group_left y_total > 0.9 and time() - z offset 5m')
    assert metric_names(expr) == {"x_seconds_bucket", "y_total", "z"}
    assert metric_names("up{job=\"a/b\"} == 0") == {"up"}


def rule_expressions() -> Iterator[tuple[str, str]]:
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    for group in doc["spec"]["groups"]:
        for rule in group["rules"]:
            yield f"alert {rule.get('alert') or rule.get('record')}", str(rule["expr"])


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for var in dash["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", query["query"])
            assert match, f"variable {var['name']}: {query['query']}"
            yield f"variable {var['name']}", match.group(1)


def test_the_alerts_the_issue_asks_for_are_there() -> None:
    used = {where: metric_names(expr) for where, expr in rule_expressions()}
    wanted = {"fusefs_used_bytes", "fusefs_remounts_total", "fusefs_frozen_since_timestamp_seconds",
              "fusepath_volume_abnormal_total", "fusepath_ready"}
    assert wanted <= set().union(*used.values())


def test_the_podmonitor_scrapes_ports_the_node_pod_has() -> None:
    monitor = yaml.safe_load((MONITORING / "podmonitor.yaml").read_text())
    node = next(d for d in yaml.safe_load_all(NODE_YAML.read_text()) if d and d["kind"] == "DaemonSet")
    pod = node["spec"]["template"]
    ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


def test_the_kustomization_builds() -> None:
    from tests.test_manifests import kubectl

    out = subprocess.run([kubectl(), "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    assert kinds == ["ConfigMap", "PodMonitor", "PrometheusRule"]


# --- against the real exporters ---------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exposition_names(text: str) -> set[str]:
    """Every name a query may use: declared families, their histogram series, and sample names."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(None, 3)
            names.add(family)
            if kind in ("histogram", "summary"):
                names.update(family + s for s in HISTOGRAM_SUFFIXES)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def gauge_samples(text: str, volume_id: str) -> set[str]:
    return {m.group(1) for m in re.finditer(rf'^(\w+)\{{[^}}]*volume_id="{volume_id}"', text, re.M)}


@pytest.fixture
def scraped(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(driver page, daemon page, staged volume ID) from a live driver and fusefs daemon."""
    from fusefs.embedded import ensure_daemon

    driver_port, daemon_port = free_port(), free_port()
    d = Driver(tmp_path, f"--metrics-address=127.0.0.1:{driver_port}")
    d.command = lambda base=d.command: [a for a in base() if a != "--metrics-address="]  # type: ignore[method-assign]
    # The driver's embedded mode adopts a daemon already answering for its data dir.
    ensure_daemon(d.data_dir, d.kubelet_dir, metrics_address=f"127.0.0.1:{daemon_port}", engine=daemon_engine())
    d.start()
    try:
        vol = d.create_volume(f"mon-{uuid.uuid4().hex[:8]}")
        staging = d.kubelet_dir / "plugins" / "mon" / "globalmount"
        staging.mkdir(parents=True)
        d.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging), volume_capability=mount_cap()))
        (staging / "f").write_bytes(b"x" * 4096)
        (staging / "f").read_bytes()
        d.node.NodeGetVolumeStats(csi_pb2.NodeGetVolumeStatsRequest(
            volume_id=vol.volume_id, volume_path=str(staging)))
        driver_page = urllib.request.urlopen(f"http://127.0.0.1:{driver_port}/metrics", timeout=10).read().decode()
        daemon_page = urllib.request.urlopen(f"http://127.0.0.1:{daemon_port}/metrics", timeout=10).read().decode()
        d.node.NodeUnstageVolume(csi_pb2.NodeUnstageVolumeRequest(
            volume_id=vol.volume_id, staging_target_path=str(staging)))
        yield driver_page, daemon_page, vol.volume_id
    finally:
        d.teardown()


@pytest.mark.privileged
def test_every_metric_an_alert_or_a_panel_uses_is_exported(scraped: tuple[str, str, str]) -> None:
    driver_page, daemon_page, volume_id = scraped
    exported = exposition_names(driver_page) | exposition_names(daemon_page) | PROMETHEUS_SYNTHETIC
    used = list(rule_expressions()) + list(dashboard_expressions())
    assert len(used) > 20
    missing = {f"{where}: {name}" for where, expr in used for name in metric_names(expr) - exported}
    assert not missing, "\n".join(sorted(missing))
    # The per-volume gauges carry the staged volume, not just a header.
    per_volume = gauge_samples(daemon_page, volume_id)
    for name in ("fusefs_used_bytes", "fusefs_capacity_bytes", "fusefs_frozen_since_timestamp_seconds",
                 "fusefs_volume_up", "fusefs_operations_total"):
        assert name in per_volume, name
    assert re.search(r"^fusepath_ready 1$", driver_page, re.M)
    # And the check can fail: a name nobody exports is reported.
    assert metric_names("fusefs_no_such_metric > 0") - exported == {"fusefs_no_such_metric"}


def test_the_freeze_gauge_says_since_when() -> None:
    from fusefs.opstats import render_prometheus

    frozen = render_prometheus({"v": {"freeze": {"frozen": True, "frozen_since": 1700000000.5}}})
    thawed = render_prometheus({"v": {"freeze": {"frozen": False, "frozen_since": 0.0}}})
    assert 'fusefs_frozen_since_timestamp_seconds{volume_id="v"} 1700000000.5' in frozen
    assert 'fusefs_frozen_since_timestamp_seconds{volume_id="v"} 0' in thawed
