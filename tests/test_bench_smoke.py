"""Smoke test of the benchmark suite: ``bench/run.py --quick`` works end to end.

CI never runs the full benchmark (it takes minutes and its figures depend on
the machine). It runs every benchmark script in its tiny ``--quick`` mode,
into a temporary directory, and checks that each section produced numbers,
targets, plots and the markdown summary. The timings themselves are not
checked. Privileged: the benchmarks stage volumes (bind and fusefs mounts),
mount bindfs and drop the page cache.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("control_plane", "snapshot_path", "data_path", "footprint")

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def _numbers(value: object) -> list[float]:
    """Every number in a JSON value, recursively."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    for tool in ("fio", "bindfs", "git"):  # git: the results record the commit they measured
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; scripts/install.sh system-test installs it")
    out = tmp_path_factory.mktemp("bench-out")
    work = tmp_path_factory.mktemp("bench-work")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(out),
                           "--work", str(work)], cwd=REPO, capture_output=True, text=True, timeout=600)
    files = list(out.glob("*-quick.json"))
    assert files, f"no results JSON; exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(files[0].read_text()), out, proc


def test_quick_run_succeeds(quick_run) -> None:
    results, _, proc = quick_run
    errors = {n: s["error"] for n, s in results["sections"].items() if "error" in s}
    assert proc.returncode == 0 and not errors, f"{errors}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("name", SECTIONS)
def test_every_section_has_numbers_and_targets(quick_run, name: str) -> None:
    results, _, _ = quick_run
    section = results["sections"][name]
    assert "error" not in section, section.get("traceback")
    numbers = _numbers(section["results"])
    assert len(numbers) >= 5 and all(math.isfinite(n) for n in numbers), section["results"]
    assert section["targets"], "every section judges at least one target"
    for target in section["targets"]:
        assert isinstance(target["value"], (int, float)), f"{target['id']} was not measured: {target}"
        assert target["met"] in (True, False)


def test_sections_measure_what_the_issue_asks(quick_run) -> None:
    s = quick_run[0]["sections"]
    levels = s["control_plane"]["results"]["levels"]
    first, last = levels[min(levels, key=int)], levels[max(levels, key=int)]
    for level in (first, last):
        for key in ("volume_sequential", "volume_concurrent", "snapshot_sequential", "snapshot_concurrent"):
            assert level[key]["pairs_per_s"] > 0 and level[key]["pair"]["p99_ms"] > 0
    assert set(s["snapshot_path"]["results"]["snapshot"]) == {"none", "gzip", "zstd"}
    assert s["snapshot_path"]["results"]["freeze"]["freeze_window_s_metric"] is not None
    assert set(s["data_path"]["results"]) >= {"native", "bind", "fusefs", "bindfs"}
    fusefs = s["footprint"]["results"]["fusefs"]
    assert "skipped" not in fusefs and fusefs["session_idle"]["rss_mib"] > 0


def test_plots_and_markdown_are_written_to_out(quick_run) -> None:
    results, out, _ = quick_run
    assert importlib.util.find_spec("matplotlib") is not None, \
        "matplotlib is a dev dependency (pyproject.toml): the plots must not be skipped silently"
    assert set(results["plots"]) == set(SECTIONS), results.get("plots_skipped")
    for name in results["plots"].values():
        assert (out / name).stat().st_size > 1000
    doc = (out / "benchmarks.md").read_text()
    assert "BEGIN GENERATED" in doc and "END GENERATED" in doc and "| target | measured |" in doc
