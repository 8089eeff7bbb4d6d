"""``make_report``: REPORT.md with the results table, the curves and the list of runs.

Layout of ``out_dir``::

    REPORT.md      title, date, table, embedded plots (relative paths), runs with their versions
    summary.json   ``summarize_runs``'s rows (null where a value is undefined)
    plots/*.png    one per metric (see plots.py)
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsgd import __version__
from dsgd.report.plots import AXIS_TITLES, metric_title, plot_against_cost, plot_groups
from dsgd.report.runs import Group, find_runs, group_runs
from dsgd.report.tables import markdown_table, paper_column, summarize_group

PLOTS_DIR = "plots"


def _rel(path: Path, start: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return path.resolve().as_posix()


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|")


def _short_keys(flat: Mapping[str, Any]) -> dict[str, Any]:
    """"train.lr" -> "lr" where the last component is unique, so nested and flat configs line up."""
    last = [k.rsplit(".", 1)[-1] for k in flat]
    return {(s if last.count(s) == 1 else k): v for k, s, v in zip(flat, last, flat.values())}


def _settings_table(groups: Sequence[Group]) -> str | None:
    """Config keys whose values differ between groups (seeds, names and paths excluded)."""
    if len(groups) < 2:
        return None
    dicts = [_short_keys(dict(g.key)) for g in groups]
    keys = sorted({k for d in dicts for k in d})
    differing = [k for k in keys if len({repr(d.get(k)) for d in dicts}) > 1]
    if not differing:
        return None
    lines = ["| group | " + " | ".join(differing) + " |", "|" + "---|" * (len(differing) + 1)]
    for g, d in zip(groups, dicts):
        values = ["—" if d.get(k) is None else _md(d[k]) for k in differing]
        lines.append(f"| {_md(g.label)} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def _runs_table(groups: Sequence[Group], out_dir: Path) -> str:
    lines = [
        "| run | group | seed | status | steps | dsgd | git | path |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        for r in g.runs:
            steps = r.summary.get("steps", r.metrics[-1].get("step") if r.metrics else None)
            git = str(r.version.get("git", "unknown"))
            cells = [r.name, g.label, r.seed, r.status, steps, r.version.get("dsgd", "unknown"),
                     git[:10], f"`{_rel(r.path, out_dir)}`"]  # fmt: skip
            lines.append("| " + " | ".join("—" if c is None else _md(c) for c in cells) + " |")
    return "\n".join(lines)


def make_report(
    run_dirs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    title: str = "dsgd report",
    by: Sequence[str] | None = None,
    reference: Mapping[str, float] | None = None,
    metrics: Sequence[str] | None = None,
    labels: Mapping[str | os.PathLike, str] | None = None,
) -> Path:
    """Write ``out_dir/REPORT.md`` (with summary.json and plots/) for the runs; return its path.

    ``run_dirs``: run directories or folders holding runs. ``by``: dotted config keys that define
    a group (default: the whole config without seeds, names and paths). ``reference``: the
    paper's final test accuracy (%) per group label, shown beside ours. ``metrics``: the curves
    to draw (default: every metric found). ``labels``: a group's label by the folder its runs
    are in (default: made from the config).
    """
    out_dir = Path(out_dir)
    runs = find_runs(run_dirs)
    groups = group_runs(runs, by)
    if labels:
        named = {Path(d).resolve(): label for d, label in labels.items()}
        for g in groups:
            folder = next((d for d in g.runs[0].path.resolve().parents if d in named), None)
            if folder is not None:
                g.label = named[folder]
    out_dir.mkdir(parents=True, exist_ok=True)

    rows = [summarize_group(g) for g in groups]
    if reference:
        rows = paper_column(rows, reference)
    plots = plot_groups(groups, out_dir / PLOTS_DIR, metrics)
    costs = plot_against_cost(groups, out_dir / PLOTS_DIR)

    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    n_seeds = sorted({len(g.runs) for g in groups})
    parts = [
        f"# {title}",
        f"Generated {now} by dsgd {__version__} from {len(runs)} runs in {len(groups)} groups.",
        "## Results",
        markdown_table(rows),
        f"Mean ± sample standard deviation (ddof=1) over n seeds (n = "
        f"{', '.join(map(str, n_seeds))}); accuracies in %, final values at the last "
        "evaluation; a cell marked (n=k) averages only the k seeds with a finite value.",
    ]
    settings = _settings_table(groups)
    if settings:
        parts += ["## Settings that differ between groups", settings]
    if plots:
        parts.append("## Curves")
        parts.append(
            "Mean over seeds with a ± one standard deviation band; evaluation steps on the x axis."
        )
        for key, path in plots.items():
            parts.append(f"### {metric_title(key)}\n\n![{key}]({_rel(path, out_dir)})")
    if costs:
        parts.append("## Accuracy against communication")
        parts.append(
            "Bytes are what one worker puts on the wire (a ring all-reduce sends 2(m-1)/m of the "
            "vector per worker, a gossip step one message per neighbour); simulated time is the "
            "clock of `[network]` (latency, bandwidth, compute time, stragglers)."
        )
        for x, path in costs.items():
            parts.append(f"### {metric_title('test_acc')} against {AXIS_TITLES[x]}\n\n"
                         f"![test_acc vs {x}]({_rel(path, out_dir)})")
    parts += ["## Runs", _runs_table(groups, out_dir)]

    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    report = out_dir / "REPORT.md"
    report.write_text("\n\n".join(parts) + "\n")
    return report
