"""The report of ``dsgd compare``, made from its ``results.json`` alone: a table of final test
accuracy and consensus distance (mean ± sample std over seeds) for every arm and setting, a
figure of accuracy across the settings, and per setting the curves of ``dsgd report`` (against
steps, simulated time and bytes). Diverged runs are left out of the means and counted.
Nothing here imports torch or an engine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from dsgd.report.figures import figure, save
from dsgd.report.report import make_report
from dsgd.report.stats import format_stat, stat


def slug(label: str) -> str:
    """A label as a path component: lowercase ASCII letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def cells(results: Mapping[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """{(arm, setting): {"test_acc": Stat in %, "consensus": Stat, "diverged": k, "runs": n}}."""
    out = {}
    for arm in (a["label"] for a in results["arms"]):
        for setting in (s["label"] for s in results["settings"]):
            rs = [r for r in results["runs"] if r["arm"] == arm and r["setting"] == setting]
            ok = [r for r in rs if r["status"] == "finished"]
            out[arm, setting] = {
                "test_acc": stat([100 * r["final"].get("test_acc", np.nan) for r in ok]),
                "consensus": stat([r["final"].get("consensus", np.nan) for r in ok]),
                "sim_time_s": stat([r["final"].get("sim_time_s", np.nan) for r in ok]),
                "bytes": stat([r["final"].get("bytes_per_worker", np.nan) for r in ok]),
                "diverged": sum(r["status"] == "diverged" for r in rs), "runs": len(rs)}
    return out


def _table(results, table, key: str, spec: str) -> str:
    settings = [s["label"] for s in results["settings"]]
    lines = ["| | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for arm in (a["label"] for a in results["arms"]):
        row = []
        for s in settings:
            c = table[arm, s]
            text = format_stat(c[key], spec, c["runs"])
            row.append(text + (f", {c['diverged']} diverged" if c["diverged"] else ""))
        lines.append(f"| {arm} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_accuracy(results, table, path: Path) -> Path:
    settings = [s["label"] for s in results["settings"]]
    arms = [a["label"] for a in results["arms"]]
    fig = figure((7.0, 4.2))
    ax = fig.add_subplot()
    xs = np.arange(len(settings))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        mean = [table[arm, s]["test_acc"]["mean"] for s in settings]
        std = [table[arm, s]["test_acc"]["std"] or 0.0 for s in settings]
        mean = [np.nan if v is None else v for v in mean]
        ax.bar(xs + (i - (len(arms) - 1) / 2) * width, mean, width, yerr=std, capsize=2,
               label=arm)
    finite = [v["test_acc"]["mean"] for v in table.values() if v["test_acc"]["mean"] is not None]
    if finite:
        ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
    ax.set_xticks(xs, settings)
    ax.set(xlabel=results["axis"], ylabel="final test accuracy (%), mean ± std over seeds")
    ax.set_title(results["title"], fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return save(fig, path)


def write_report(results: Mapping[str, Any], out: str | Path) -> Path:
    out = Path(out)
    table = cells(results)
    fig = plot_accuracy(results, table, out / "accuracy.png")
    n = results["seeds"]
    parts = [f"# {results['title']}",
             f"Study `{results['study']}`: preset `{results['preset']}` with "
             f"{', '.join(f'`{o}`' for o in results['overrides'])}; {n} seeds per cell (the "
             "seed also draws the data partition). Mean ± sample std over the seeds that "
             "finished; a cell marked (n=k) averages k of them, diverged runs are counted.",
             *[f"- {note}" for note in results["notes"]],
             "## Final test accuracy (%)", _table(results, table, "test_acc", ".2f"),
             f"![accuracy]({fig.relative_to(out)})",
             "## Consensus distance at the end", _table(results, table, "consensus", ".3g")]
    if any(c["sim_time_s"]["mean"] for c in table.values()):
        parts += ["## Simulated time of the run (s)", _table(results, table, "sim_time_s", ".3g"),
                  "## Bytes a worker put on the wire", _table(results, table, "bytes", ".3g")]
    parts += ["## Arms", "\n".join(f"- **{a['label']}**: "
                                   + ", ".join(f"`{o}`" for o in a["overrides"])
                                   for a in results["arms"])]
    curves = []
    for s in results["settings"]:  # the run directories beside results.json, where present
        arms = {str(out / Path(r["run"]).parent): r["arm"] for r in results["runs"]
                if r["setting"] == s["label"] and (out / r["run"]).is_dir()}
        if not arms:
            continue
        sub = make_report(sorted(arms), out / "settings" / slug(s["label"]),
                          title=f"{results['title']}: {s['label']}",
                          metrics=["test_acc", "train_loss", "consensus"], labels=arms)
        curves.append(f"- [{s['label']}]({sub.relative_to(out)})")
    if curves:
        parts += ["## Curves per setting", "\n".join(curves)]
    path = out / "REPORT.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path
