"""The results table: one row per group of seeds, as Python objects and as markdown.

Conventions:
  - Accuracies are stored as fractions in [0, 1] in run directories and reported in percent
    (fields ending in ``_pct``; a run already written in percent is not rescaled).
  - Each cell is the mean ± sample standard deviation (ddof=1) over the seeds with a finite
    value, printed ``93.91 ± 0.12``; a single value prints without ``±``; when some seeds have no
    finite value (diverged, empty), the cell says over how many seeds it is, ``93.91 (n=2)``.
  - The status column lists the runs' statuses, e.g. ``2 finished, 1 diverged``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dsgd.errors import UserError
from dsgd.report.runs import Group, Run, accuracy_scale, find_runs, group_runs
from dsgd.report.stats import format_stat, stat


def _best_test_acc(run: Run) -> float:
    _, accs = run.series("test_acc", percent=False)
    best = run.summary.get("best_test_acc")
    if isinstance(best, (int, float)) and not isinstance(best, bool) and math.isfinite(best):
        return float(best) * accuracy_scale([float(best), *accs.tolist()])
    finite = accs[np.isfinite(accs)]
    return float(finite.max()) * accuracy_scale(finite.tolist()) if len(finite) else math.nan


def _wall_time(run: Run) -> float:
    t = run.summary.get("wall_time")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    return run.final("time")


def _status(runs: Sequence[Run]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    return counts


def summarize_group(group: Group) -> dict[str, Any]:
    """One table row as a JSON-ready dict (see the module docstring for units)."""
    runs = group.runs
    counts = _status(runs)
    return {
        "label": group.label,
        "n_runs": len(runs),
        "seeds": group.seeds,
        "runs": [r.name for r in runs],
        "paths": [str(r.path) for r in runs],
        "status": ", ".join(f"{n} {s}" if len(runs) > 1 else s for s, n in counts.items()),
        "statuses": counts,
        "final_test_acc_pct": stat([r.final("test_acc") for r in runs]),
        "best_test_acc_pct": stat([_best_test_acc(r) for r in runs]),
        "final_train_loss": stat([r.final("train_loss") for r in runs]),
        "final_consensus": stat([r.final("consensus") for r in runs]),
        "wall_time_s": stat([_wall_time(r) for r in runs]),
    }


def summarize_runs(
    runs: Sequence[Run] | Sequence[Group] | Sequence[str | os.PathLike],
    by: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Table rows, one per group, for runs, groups, or paths (run dirs or folders of runs)."""
    items = list(runs)
    if items and all(isinstance(x, Group) for x in items):
        groups = items
    else:
        loaded = items if all(isinstance(x, Run) for x in items) else find_runs(items)
        groups = group_runs(loaded, by)
    return [summarize_group(g) for g in groups]


def paper_column(
    rows: Sequence[Mapping[str, Any]], reference: Mapping[str, float]
) -> list[dict[str, Any]]:
    """Copies of ``rows`` with the paper's final test accuracy beside ours.

    ``reference`` maps a group label to the paper's number in percent (a fraction is read as
    one and converted). Each row gains "paper" (None when its label is not in ``reference``) and
    "delta" = our mean final test accuracy minus the paper's, in points.
    """
    labels = {r["label"] for r in rows}
    if reference and not labels & set(reference):
        raise UserError(
            f"no reference label matches a group: references {sorted(reference)}, "
            f"groups {sorted(labels)}"
        )
    out = []
    for row in rows:
        new = dict(row)
        paper = reference.get(row["label"])
        if paper is not None:
            paper = float(paper) * accuracy_scale([float(paper)])
        ours = row["final_test_acc_pct"]["mean"]
        new["paper"] = paper
        new["delta"] = ours - paper if paper is not None and ours is not None else None
        out.append(new)
    return out


# ---------------------------------------------------------------- markdown


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _seeds(row: Mapping[str, Any]) -> str:
    seeds = [s for s in row["seeds"] if s is not None]
    if len(seeds) == row["n_runs"]:
        return f"{row['n_runs']} ({', '.join(map(str, seeds))})"
    return str(row["n_runs"])


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a GitHub markdown table; paper and Δ columns when ``paper_column`` was used."""
    with_paper = any("paper" in r for r in rows)
    header = ["group", "seeds", "status", "final test acc (%)", "best test acc (%)",
              "final train loss", "final consensus", "wall time"]  # fmt: skip
    if with_paper:
        header += ["paper (%)", "Δ vs paper"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        n = r["n_runs"]
        cells = [
            r["label"].replace("|", "\\|"),
            _seeds(r),
            r["status"],
            format_stat(r["final_test_acc_pct"], ".2f", n),
            format_stat(r["best_test_acc_pct"], ".2f", n),
            format_stat(r["final_train_loss"], ".4f", n),
            format_stat(r["final_consensus"], ".2e", n),
            format_seconds(r["wall_time_s"]["mean"]),
        ]
        if with_paper:
            paper, delta = r.get("paper"), r.get("delta")
            cells += ["—" if paper is None else f"{paper:.2f}",
                      "—" if delta is None else f"{delta:+.2f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
