"""How long pods pause (and whether they see an error) across each kind of restart.

    python bench/restart_matrix.py [--runs 3] [--quick] [--work DIR] [--json out.json]

Needs root (FUSE mounts, mount namespaces). Each run builds one node as
``tests/test_restart_matrix.py`` does (a descriptor holder, a fusefs daemon
on the kernel engine, a CSI driver in the sidecar layout, one volume staged
and published twice, an ``rslave`` and a ``private`` runc-like container,
each appending a line with fsync every 50 ms and reading a file held open
since the start), then does every kind of restart in turn on that node. The
pause of a container is the longest gap between two successful fsyncs
around the kill. Printed: per kind and container, the median over the runs
of that pause, the worst run, and the errors the containers saw (any error
is a failure: the test asserts zero). Issue 9's goal is a pause of at most
2 s for every kind.

As a section of ``bench/run.py`` (``--only restart_matrix``) it records the
same figures, with one target per kind.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

import common  # noqa: E402

from tests.restart_matrix import DESCRIPTIONS, KINDS, Node, describe  # noqa: E402

PAUSE_GOAL_S = 2.0
CONTAINERS = ("rslave", "private")


def one_run(root: Path, log: bool = True) -> dict[str, dict[str, Any]]:
    """One node, every kind of restart in turn: {kind: {container: pause, "errors": n, ...}}."""
    node = Node(root)
    out: dict[str, dict[str, Any]] = {}
    try:
        node.start()
        for kind in KINDS:
            phase = node.phase(kind)
            if log:
                print(describe(phase), file=sys.stderr, flush=True)
            out[kind] = {name: round(phase.pauses[name], 3) for name in CONTAINERS}
            out[kind]["errors"] = sum(len(e) for e in phase.errors.values())
            out[kind]["lost_lines"] = sum(len(v) for v in phase.lost.values())
            out[kind]["stuck"] = phase.stuck
            if phase.stuck:  # the rest would measure a broken node
                break
    finally:
        node.teardown()
    return out


def summarise(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per kind and container: the median pause over the runs, the worst, and the errors in all."""
    table: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        done = [r[kind] for r in runs if kind in r]
        if not done:
            continue
        row: dict[str, Any] = {"runs": len(done), "errors": sum(r["errors"] for r in done),
                               "lost_lines": sum(r["lost_lines"] for r in done),
                               "stuck": sum(1 for r in done if r["stuck"])}
        for name in CONTAINERS:
            pauses = [r[name] for r in done]
            row[name] = {"median_s": round(statistics.median(pauses), 3), "max_s": max(pauses), "all_s": pauses}
        table[kind] = row
    return table


def render(table: dict[str, dict[str, Any]]) -> str:
    """The markdown table for docs/benchmarks.md."""
    rows = ["| restart | rslave pause, median (worst) | private pause, median (worst) | errors | runs |",
            "|---|---|---|---|---|"]
    for kind, row in table.items():
        cells = [f"{row[n]['median_s']:.2f} s ({row[n]['max_s']:.2f} s)" for n in CONTAINERS]
        errors = row["errors"] + row["lost_lines"] + row["stuck"]
        rows.append(f"| {DESCRIPTIONS[kind]} | {cells[0]} | {cells[1]} | {errors} | {row['runs']} |")
    return "\n".join(rows) + "\n"


def run(opts: common.Options, runs: int | None = None) -> dict[str, Any]:
    """The bench/run.py section."""
    runs = runs or (1 if opts.quick else 3)
    section = common.Section("restart_matrix", opts.quick)
    section.config = {"runs": runs, "kinds": list(KINDS), "writer_interval_s": 0.05, "goal_pause_s": PAUSE_GOAL_S}
    opts.work.mkdir(parents=True, exist_ok=True)
    results = []
    for _ in range(runs):
        tmp = Path(tempfile.mkdtemp(prefix="rm-", dir=opts.work))
        results.append(one_run(tmp))
        if any(r["errors"] or r["lost_lines"] or r["stuck"] for r in results[-1].values()):
            # Keep the logs of a run that went wrong (fusefs.log, driver.log, holder.log).
            section.notes.append(f"a run saw errors; its logs are in {tmp}")
            print(f"a run saw errors; its logs are in {tmp}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    table = summarise(results)
    section.results = {"kinds": table}
    for kind, row in table.items():
        worst = max(row[n]["median_s"] for n in CONTAINERS)
        failed = row["errors"] + row["lost_lines"] + row["stuck"]
        section.targets.append(common.Target(
            f"restart_pause_{kind.replace('-', '_')}", f"longest pod pause: {DESCRIPTIONS[kind]}",
            None if failed else worst, "<=", PAUSE_GOAL_S, "s",
            detail=f"median of {row['runs']} runs, worse container",
            note=f"{failed} errors seen" if failed else ""))
    return section.as_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one run")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_WORK, help="scratch directory")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    opts = common.Options(quick=args.quick, work=args.work.absolute())
    section = run(opts, runs=1 if args.quick else args.runs)
    table = section["results"]["kinds"]
    print(render(table))
    if args.json:
        args.json.write_text(json.dumps(section, indent=2))
    return 0 if all(t["met"] for t in section["targets"]) and len(table) == len(KINDS) else 1


if __name__ == "__main__":
    sys.exit(main())
