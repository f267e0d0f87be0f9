"""PNG plots of a results JSON (matplotlib, headless).

    .venv/bin/python bench/plots.py bench/results/<date>-<host>.json

Each function takes one section of the results and writes one PNG; a section
that is missing or was skipped simply produces no plot.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402

DPI = 110


def control_plane(section: dict[str, Any], path: Path) -> Path | None:
    """Pair latency (p50, p99) and throughput against the number of existing volumes."""
    levels = section.get("results", {}).get("levels")
    if not levels:
        return None
    xs = sorted(int(k) for k in levels)
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind, colour in (("volume", "tab:blue"), ("snapshot", "tab:orange")):
        rows = [levels[str(x)][f"{kind}_sequential"] for x in xs]
        lat.plot(xs, [r["pair"]["p50_ms"] for r in rows], "o-", color=colour, label=f"{kind} pair p50")
        lat.plot(xs, [r["pair"]["p99_ms"] for r in rows], "s--", color=colour, label=f"{kind} pair p99")
        thr.plot(xs, [r["pairs_per_s"] for r in rows], "o-", color=colour, label=f"{kind} create+delete, 1 client")
        conc = [(x, levels[str(x)].get(f"{kind}_concurrent")) for x in xs]
        conc = [(x, c["pairs_per_s"]) for x, c in conc if c]
        if conc:
            thr.plot([c[0] for c in conc], [c[1] for c in conc], "^:", color=colour, label=f"{kind}, 16 clients")
    thr.axhline(500, color="grey", linewidth=1, linestyle="--", label="target: 500 volume pairs/s")
    lat.set(xlabel="existing volumes", ylabel="ms per create+delete pair", title="Latency, sequential client")
    thr.set(xlabel="existing volumes", ylabel="pairs per second", title="Throughput")
    lat.set_ylim(bottom=0)
    thr.set_ylim(bottom=0)
    lat.legend(fontsize=8)
    thr.legend(fontsize=8)
    return _save(fig, path)


def snapshot_path(section: dict[str, Any], path: Path) -> Path | None:
    """Seconds for tar baselines, CreateSnapshot and restore per compression, with MiB/s labels."""
    r = section.get("results", {})
    if "snapshot" not in r:
        return None
    rows: list[tuple[str, float, float, str]] = []
    for name in ("tar_cf", "tar_czf"):
        b = r["baselines"][name]
        rows.append((name.replace("_", " "), b["seconds"], b["mib_per_s"], "tab:grey"))
    for comp, s in r["snapshot"].items():
        rows.append((f"CreateSnapshot {comp}", s["create_snapshot_s"], s["create_mib_per_s"], "tab:blue"))
    if "tar_xf_and_sync" in r["baselines"]:
        b = r["baselines"]["tar_xf_and_sync"]
        rows.append(("tar xf + sync", b["seconds"], b["mib_per_s"], "tab:grey"))
    for comp, s in r["snapshot"].items():
        rows.append((f"restore {comp}", s["restore_s"], s["restore_mib_per_s"], "tab:green"))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [x[0] for x in rows]
    ax.barh(labels, [x[1] for x in rows], color=[x[3] for x in rows])
    for i, (_, sec, mibs, _) in enumerate(rows):
        ax.text(sec, i, f" {sec:.2f} s, {mibs:.0f} MiB/s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds (lower is better)")
    ax.set_xlim(right=max(x[1] for x in rows) * 1.35)
    cfg = section.get("config", {})
    ax.set_title(f"Snapshot and restore of {cfg.get('tree_mib', '?')} MiB in {cfg.get('files', '?')} files")
    return _save(fig, path)


def data_path(section: dict[str, Any], path: Path) -> Path | None:
    """Every row relative to native disk (log scale), one bar per mount type."""
    r = section.get("results", {})
    if "native" not in r:
        return None
    rows = [k for k in r["native"]]
    kinds = [k for k in ("bind", "fusefs", "fusefs-kernel", "fusefs-kernel-base", "bindfs") if k in r]
    fig, ax = plt.subplots(figsize=(12, 4.8))
    width = 0.8 / max(1, len(kinds))
    colours = {"bind": "tab:grey", "fusefs": "tab:blue", "fusefs-kernel": "tab:green",
               "fusefs-kernel-base": "tab:olive", "bindfs": "tab:orange"}
    for i, kind in enumerate(kinds):
        values = [r[kind][row]["median"] / r["native"][row]["median"] if r["native"][row]["median"] else 0
                  for row in rows]
        ax.bar([j + (i - (len(kinds) - 1) / 2) * width for j in range(len(rows))], values, width,
               label=kind, color=colours[kind])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([row.replace("_", " ") for row in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative to native disk (1 = native)")
    ax.set_title("Data path: median of runs, relative to native disk (higher is better)")
    ax.legend()
    return _save(fig, path)


def footprint(section: dict[str, Any], path: Path) -> Path | None:
    """RSS of each process against its target."""
    r = section.get("results", {})
    if "driver_idle" not in r:
        return None
    bars: list[tuple[str, float, float | None]] = [("driver idle", r["driver_idle"]["rss_mib"], 80.0)]
    for key, value in r.items():
        if key.startswith("driver_with_") or key.startswith("driver_restarted_"):
            bars.append((key.replace("driver_", "driver ").replace("_", " "), value["rss_mib"], None))
    fusefs = r.get("fusefs", {})
    if "skipped" not in fusefs and fusefs:
        bars += [("fusefs daemon", fusefs["daemon_one_volume"]["rss_mib"], None),
                 ("session child idle", fusefs["session_idle"]["rss_mib"], 40.0),
                 ("session child after write", fusefs["session_after_write"]["rss_mib"], 40.0)]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color="tab:blue")
    for i, (_, value, limit) in enumerate(bars):
        ax.text(value, i, f" {value:.0f} MiB" + (f" (target < {limit:.0f})" if limit else ""), va="center", fontsize=8)
        if limit:
            ax.plot([limit, limit], [i - 0.4, i + 0.4], color="red", linewidth=2)
    ax.invert_yaxis()
    ax.set_xlim(right=max(b[1] for b in bars) * 1.5)
    ax.set_xlabel("RSS, MiB")
    ax.set_title("Memory (VmRSS); red marks are the targets")
    return _save(fig, path)


PLOTTERS = {"control_plane": control_plane, "snapshot_path": snapshot_path, "data_path": data_path,
            "footprint": footprint}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_all(results: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    """One PNG per section present; returns {section: file name}."""
    made = {}
    for name, plotter in PLOTTERS.items():
        section = results.get("sections", {}).get(name)
        if not section or "error" in section:
            continue
        path = plotter(section, out_dir / f"{stem}-{name.replace('_', '-')}.png")
        if path is not None:
            made[name] = path.name
    return made


if __name__ == "__main__":
    src = Path(sys.argv[1])
    print(plot_all(json.loads(src.read_text()), src.parent, src.stem))
