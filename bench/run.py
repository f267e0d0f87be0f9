"""Run the fusepath benchmark suite and publish the numbers (issue 5).

    .venv/bin/python bench/run.py [--quick] [--only NAME ...] [--out DIR] [--docs FILE]

``make bench`` runs everything (about 12 minutes on a 2-core machine, as
root: it mounts volumes and drops the page cache) and writes:

* ``bench/results/<YYYY-MM-DD>-<host>.json``: every figure, the machine and
  the exact commands;
* ``bench/results/<YYYY-MM-DD>-<host>-<section>.png``: one plot per section;
* the generated part of ``docs/benchmarks.md``: the machine, the commands,
  and every target marked met or not met with the ratio measured in that run.

``--quick`` (``make bench-quick``, and the CI smoke test) runs a tiny version
of every benchmark to check that it works; its figures mean nothing, so it
writes under ``bench/results/quick/`` and never touches docs/benchmarks.md.
``--out DIR`` sends everything (JSON, plots and the markdown) to DIR.
``--only`` re-runs some sections and merges them into the same day's JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import control_plane  # noqa: E402
import data_path  # noqa: E402
import footprint  # noqa: E402
import restart_matrix  # noqa: E402
import snapshot_path  # noqa: E402

SECTIONS = {
    "control_plane": control_plane.run,
    "snapshot_path": snapshot_path.run,
    "data_path": data_path.run,
    "footprint": footprint.run,
    "restart_matrix": restart_matrix.run,
}
DOCS = common.REPO / "docs" / "benchmarks.md"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny runs that only check every script works")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these sections (repeat or comma-separate): {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, help="directory for the JSON, plots and markdown (default bench/results)")
    p.add_argument("--docs", type=Path, help="markdown file whose generated block is rewritten")
    p.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="scratch directory, on the disk to measure")
    p.add_argument("--keep-work", action="store_true", help="leave the scratch directory behind")
    args = p.parse_args(argv)
    args.only = [n for chunk in args.only for n in chunk.split(",") if n]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        p.error(f"unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(SECTIONS)}")
    if args.out is None:
        args.out = common.RESULTS_DIR / "quick" if args.quick else common.RESULTS_DIR
        if args.docs is None:
            args.docs = args.out / "benchmarks.md" if args.quick else DOCS
    elif args.docs is None:
        args.docs = args.out / "benchmarks.md"
    args.out, args.work, args.docs = args.out.absolute(), args.work.absolute(), args.docs.absolute()
    return args


def check_environment() -> list[str]:
    """What this machine lacks for a full run; the sections then skip those parts and say so."""
    missing = []
    if os.geteuid() != 0:
        missing.append("not root: mounts and drop_caches need root")
    for tool in ("fio", "bindfs", "tar", "zstd", "gzip"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} not found (apt-get install -y fio bindfs zstd)")
    return missing


def run_section(name: str, opts: common.Options) -> dict[str, Any]:
    """One section; a failure is recorded in the results (with its traceback) instead of ending the run."""
    load_before = os.getloadavg()
    started = time.monotonic()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        section = SECTIONS[name](opts)
    except Exception as exc:  # noqa: BLE001 - keep the other sections' figures
        section = {"name": name, "quick": opts.quick, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(), "targets": [], "notes": []}
    section["wall_seconds"] = round(time.monotonic() - started, 1)
    section["loadavg_before"] = [round(x, 2) for x in load_before]
    section["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    section["finished_at"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    print(f"[bench] {name} done in {section['wall_seconds']} s" + (f" -- FAILED: {section['error']}"
                                                                   if "error" in section else ""),
          file=sys.stderr, flush=True)
    return section


def make_plots(results: dict[str, Any], out: Path, stem: str) -> dict[str, str]:
    """The PNGs, or a note saying why there are none: a missing matplotlib must not lose the figures."""
    try:
        import plots
    except ImportError as exc:
        results["plots_skipped"] = f"matplotlib is not installed ({exc}); pip install matplotlib"
        return {}
    return plots.plot_all(results, out, stem)


def results_path(out: Path, quick: bool) -> Path:
    day = dt.date.today().isoformat()
    return out / f"{day}-{socket.gethostname()}{'-quick' if quick else ''}.json"


# -- docs/benchmarks.md ------------------------------------------------------------------------

BEGIN = "<!-- BEGIN GENERATED by bench/run.py: everything down to END GENERATED is rewritten by each run -->"
END = "<!-- END GENERATED -->"
DOC_HEAD = """# Benchmarks

How fast fusepath provisions, snapshots and serves data, measured against the
disk, GNU tar and bindfs on the same machine. `make bench` reproduces every
figure below; the text outside the generated block explains them.

"""


def update_docs(doc: Path, results: dict[str, Any], json_path: Path) -> None:
    """Rewrite the generated block of ``doc`` (creating the file if needed), keep the prose around it."""
    block = "\n".join([BEGIN, render(results, json_path, doc.parent), END])
    text = doc.read_text() if doc.exists() else DOC_HEAD + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def render(results: dict[str, Any], json_path: Path, doc_dir: Path) -> str:
    rel = lambda p: os.path.relpath(p, doc_dir)  # noqa: E731 - links work from the doc's folder
    parts = [render_machine(results, rel(json_path)), render_targets(results)]
    sections = results["sections"]
    for name, renderer in (("control_plane", render_control_plane), ("snapshot_path", render_snapshot),
                           ("data_path", render_data_path), ("footprint", render_footprint),
                           ("restart_matrix", render_restart_matrix)):
        section = sections.get(name)
        if section is None:
            continue
        if "error" in section:
            parts.append(f"### {name}\n\nFailed in this run: `{section['error']}` (traceback in the JSON).\n")
            continue
        parts.append(renderer(section))
        if section.get("notes"):
            parts.append("\n".join(f"> Note: {n}" for n in section["notes"]) + "\n")
    if results.get("plots_skipped"):
        parts.append(f"> Plots skipped: {results['plots_skipped']}\n")
    plots_made = results.get("plots", {})
    if plots_made:
        parts.append("### Plots\n\n" + "\n\n".join(
            f"![{name}]({rel(json_path.parent / f)})" for name, f in plots_made.items()) + "\n")
    return "\n".join(parts)


def render_machine(results: dict[str, Any], json_rel: str) -> str:
    m = results["machine"]
    disk = m["disk"]
    minutes = results.get("total_seconds", 0) / 60
    gaps = results.get("environment_gaps") or []
    lines = [
        "## Latest run", "",
        f"- **Date:** {m['date']} (git `{m['git_commit']}`)" + (" -- a `--quick` smoke run: figures are meaningless"
                                                               if results.get("quick") else ""),
        f"- **Machine:** `{m['host']}`, {m['nproc']} CPUs ({m['cpu_model']}), {m['memory_gib']} GiB RAM, "
        f"kernel {m['kernel']}",
        f"- **Disk:** {disk.get('device', '?')} ({disk.get('model', '?')}), {disk.get('fstype', '?')} "
        f"mounted at {disk.get('mount', '?')} with `{disk.get('options', '')}`",
        f"- **Tools:** Python {m['python']}, {m['fio']}, bindfs {m['bindfs'].split()[-1]}, {m['tar']}",
        f"- **Command:** `make bench`, i.e. `{results['command']}`, as root; it took {minutes:.1f} minutes. "
        "Each script also runs alone, e.g. `.venv/bin/python bench/control_plane.py`.",
        f"- **All figures:** [`{Path(json_rel).name}`]({json_rel}) (with per-section load averages)",
    ]
    if gaps:
        lines.append(f"- **Missing on this machine:** {'; '.join(gaps)}")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def render_targets(results: dict[str, Any]) -> str:
    rows = ["### Targets", "", "Each figure is judged against its target with numbers from the same run.", "",
            "| target | measured | needed | status |", "|---|---|---|---|"]
    for name, section in results["sections"].items():
        for t in section.get("targets", []):
            status = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
            measured = _fmt(t["value"], t["unit"] if t["unit"] != "ratio" else "")
            extra = "; ".join(x for x in (t.get("detail"), t.get("note")) if x)
            rows.append(f"| {t['label']} | {measured}{f' ({extra})' if extra else ''} | "
                        f"{t['op']} {_fmt(t['threshold'])} | {status} |")
    return "\n".join(rows) + "\n"


def _lat(s: dict[str, Any] | None) -> str:
    if not s:
        return "-"
    return f"{s['pairs_per_s']:,.0f} ({s['pair']['p50_ms']:.1f} / {s['pair']['p99_ms']:.1f})"


def render_control_plane(section: dict[str, Any]) -> str:
    r = section["results"]
    rows = ["### Control plane", "",
            "Pairs per second, and (p50 / p99 ms) of one create+delete pair, seen by the client.", "",
            "| existing volumes | volume pairs, 1 client | volume pairs, 16 clients | snapshot pairs, 1 client "
            "| snapshot pairs, 16 clients | handler ms (Create / Delete) | driver RSS MiB |",
            "|---|---|---|---|---|---|---|"]
    for level, x in sorted(r["levels"].items(), key=lambda kv: int(kv[0])):
        srv = x["volume_sequential"].get("server_side", {})
        rows.append(f"| {int(level):,} | {_lat(x['volume_sequential'])} | {_lat(x.get('volume_concurrent'))} | "
                    f"{_lat(x['snapshot_sequential'])} | {_lat(x.get('snapshot_concurrent'))} | "
                    f"{srv.get('CreateVolume_ms', 0):.1f} / {srv.get('DeleteVolume_ms', 0):.1f} | "
                    f"{x['driver_rss_mib']} |")
    floor = r.get("rpc_floor")
    if floor:
        rows += ["", f"A trivial RPC (ControllerGetCapabilities) takes {floor['p50_ms']:.2f} ms p50 from the Python "
                 f"client: two of them cap a create+delete pair at {floor['max_pairs_per_s_if_handlers_were_free']:,.0f}"
                 " pairs/s before the driver does any work."]
    profile = next((x["profile"] for x in r["levels"].values() if "handler_breakdown" in x.get("profile", {})), None)
    if profile:
        top = ", ".join(f"{c['category']} {c['percent_of_handler_time']:.0f}%"
                        for c in profile["handler_breakdown"][:5])
        rows += ["", f"py-spy, sequential create/delete loop on an empty node: {profile['in_rpc_handlers_percent']:.0f}%"
                 f" of samples are inside RPC handlers; of that: {top}."]
    return "\n".join(rows) + "\n"


def render_snapshot(section: dict[str, Any]) -> str:
    r, cfg = section["results"], section["config"]
    rows = ["### Snapshot path", "",
            f"{cfg['tree_mib']} MiB in {cfg['files']:,} files; volume staged through fusefs: {cfg.get('staged')}.", "",
            "| operation | seconds | MiB/s | archive MiB |", "|---|---|---|---|"]
    for name in ("tar_cf", "tar_czf"):
        b = r["baselines"][name]
        rows.append(f"| `{name.replace('_', ' ')}` | {b['seconds']:.2f} | {b['mib_per_s']:,.0f} | {b['archive_mib']} |")
    xf = r["baselines"].get("tar_xf_and_sync")
    for comp, s in r["snapshot"].items():
        rows.append(f"| CreateSnapshot `compression: {comp}` | {s['create_snapshot_s']:.2f} | "
                    f"{s['create_mib_per_s']:,.0f} | {s['archive_mib']} |")
    if xf:
        rows.append(f"| `tar xf` + `sync` (restore baseline) | {xf['seconds']:.2f} | {xf['mib_per_s']:,.0f} | |")
    for comp, s in r["snapshot"].items():
        rows.append(f"| restore (CreateVolume from the {comp} snapshot) | {s['restore_s']:.2f} | "
                    f"{s['restore_mib_per_s']:,.0f} | |")
    f = r.get("freeze")
    if f:
        rows += ["", "Freeze window (compression none, median of runs; a writer appends 4 KiB + fsync in the "
                 "published volume):", "",
                 "| CreateSnapshot s | archive s (log) | freeze window s (metric / log) | longest writer stall s "
                 "| writer stall without a snapshot s |", "|---|---|---|---|---|",
                 f"| {f['create_snapshot_s']} | {f['archive_s_from_log']} | {f['freeze_window_s_metric']} / "
                 f"{f['freeze_window_s_log']} | {f['writer_longest_stall_s']} | {f['writer_baseline_longest_stall_s']} |"]
    return "\n".join(rows) + "\n"


def render_data_path(section: dict[str, Any]) -> str:
    r = section["results"]
    kinds = [k for k in data_path.TARGETS if k in r]
    engines = [k for k in ("fusefs", data_path.KERNEL, data_path.BASELINE) if k in r]
    units = r.get("units", {})
    ratios = [f"{e} / {base}" for e in engines for base in ("native", "bindfs")]
    head = "| workload | unit | " + " | ".join(kinds) + " | " + " | ".join(ratios) + " |"
    rows = ["### Data path", "",
            "Medians of interleaved runs (spread in the JSON); higher is better. `fusefs` is the libfuse "
            "engine, staged through the driver; `fusefs-kernel` the kernel engine (`--engine=kernel`, "
            "with passthrough), a session started as the daemon starts one.", "",
            head, "|" + "---|" * (len(kinds) + len(ratios) + 2)]
    for row in r.get("native", {}):
        values = {k: r[k][row]["median"] for k in kinds if row in r[k]}
        cells = " | ".join(_fmt(values.get(k)) for k in kinds)
        shares = " | ".join(_fmt(common.ratio(values.get(e), values.get(base)))
                            for e in engines for base in ("native", "bindfs"))
        rows.append(f"| {row.replace('_', ' ')} | {units.get(row, 'ops/s')} | {cells} | {shares} |")
    kernel = r.get("kernel_engine")
    if kernel:
        neg = kernel.get("negotiated", {})
        rows += ["", f"Kernel engine: negotiated `{', '.join(neg.get('flags', []))}` (passthrough "
                 f"{'on' if neg.get('passthrough') else 'off'}, write-back cache "
                 f"{'on' if neg.get('writeback_cache') else 'off'}). FUSE requests its session served per fio row "
                 "(last run):", ""]
        for row, ops in kernel.get("requests_per_fio_row_last_run", {}).items():
            top = ", ".join(f"{op} {n:,}" for op, n in sorted(ops.items(), key=lambda kv: -kv[1])[:4])
            rows.append(f"- {row.replace('_', ' ')}: {top or 'none'}")
    return "\n".join(rows) + "\n"


def render_footprint(section: dict[str, Any]) -> str:
    r = section["results"]
    st = r["startup"]
    rows = ["### Footprint", "", "| figure | value |", "|---|---|",
            f"| driver start-up to Probe ready, cold (starts the embedded fusefs daemon) | {st['cold_s']:.2f} s |",
            f"| driver start-up to Probe ready, warm (fusefs daemon already running) | {st['warm_s']:.2f} s |"]
    rows += [f"| driver start-up, warm, {k.split('_')[2]} volumes in the database | {v:.2f} s |"
             for k, v in st.items() if k.startswith("warm_with_")]
    rows.append(f"| driver RSS idle | {r['driver_idle']['rss_mib']} MiB (PSS {r['driver_idle']['pss_mib']}) |")
    for key, value in r.items():
        if key.startswith("driver_with_") or key.startswith("driver_restarted_"):
            rows.append(f"| {key.replace('_', ' ')} RSS | {value['rss_mib']} MiB (PSS {value['pss_mib']}) |")
    fusefs = r.get("fusefs", {})
    if "skipped" in fusefs:
        rows.append(f"| fusefs | skipped: {fusefs['skipped']} |")
    elif fusefs:
        w = fusefs["write"]
        rows += [
            f"| fusefs daemon RSS (one volume staged) | {fusefs['daemon_one_volume']['rss_mib']} MiB |",
            f"| fusefs volume session child RSS, idle / after writing {w['bytes'] // common.MiB} MiB | "
            f"{fusefs['session_idle']['rss_mib']} / {fusefs['session_after_write']['rss_mib']} MiB |",
            f"| CPU seconds per GiB written through fusefs: session child / writer (native writer) | "
            f"{w['session_cpu_s_per_gib']} / {w['writer_cpu_s_per_gib']} ({w['native_writer_cpu_s_per_gib']}) s |",
        ]
    return "\n".join(rows) + "\n"


def render_restart_matrix(section: dict[str, Any]) -> str:
    return "### Restarts: what pods see\n\n" + restart_matrix.render(section["results"]["kinds"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or list(SECTIONS)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    opts = common.Options(quick=args.quick, work=args.work, out=args.out)
    path = results_path(args.out, args.quick)
    results: dict[str, Any] = json.loads(path.read_text()) if args.only and path.exists() else {"sections": {}}
    command = " ".join([".venv/bin/python", "bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    results.update({"machine": common.machine_info(args.work), "command": command,
                    "environment_gaps": check_environment(), "quick": args.quick})
    started = time.monotonic()
    try:
        for name in names:
            results["sections"][name] = run_section(name, opts)
            path.write_text(json.dumps(results, indent=2, default=str) + "\n")  # keep what is done so far
    finally:
        if not args.keep_work:
            shutil.rmtree(args.work, ignore_errors=True)
    # With --only, the other sections come from an earlier run: the suite's time is the sum of its sections.
    results["total_seconds"] = round(sum(s.get("wall_seconds", 0) for s in results["sections"].values()), 1)
    results["this_invocation_seconds"] = round(time.monotonic() - started, 1)
    results["plots"] = make_plots(results, args.out, path.stem)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    update_docs(args.docs, results, path)
    print(f"[bench] wrote {path}, {len(results['plots'])} plots and {args.docs} in {results['total_seconds']} s",
          file=sys.stderr)
    return 1 if any("error" in s for s in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
