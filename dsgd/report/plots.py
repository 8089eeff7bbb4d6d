"""Training curves from run directories: one PNG per metric, one line per group of seeds.

A group is drawn as the mean over its seeds with a band of one sample standard deviation
(ddof=1) where at least two seeds have a finite value; NaN and inf (a diverged run) are left out
of the mean, so a diverged seed shortens nothing but its own contribution. Accuracies are drawn
in percent. Colours follow the group order and are the same in every plot of a report.

matplotlib is imported inside the functions and drawn on its Agg canvas, so importing this module
is cheap and no global backend is changed; nothing here imports torch or an engine.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dsgd.report.figures import figure, save
from dsgd.report.runs import Group, is_accuracy

# Drawn first, in this order; any other numeric key found in metrics.jsonl follows, sorted.
CORE_METRICS = ("test_acc", "train_acc", "test_loss", "train_loss", "consensus", "lr")
# Row bookkeeping, never a curve of its own.
AXIS_KEYS = frozenset({"step", "epoch", "time", "iteration", "sim_time_s", "bytes_per_worker"})
# Always on a log axis; other positive metrics go log when they span over two decades.
LOG_METRICS = frozenset({"consensus"})

_TITLES = {
    "test_acc": "test accuracy (%)",
    "train_acc": "train accuracy (%)",
    "test_loss": "test loss",
    "train_loss": "train loss",
    "consensus": "consensus distance Tr Xi",
    "lr": "learning rate",
    "hessian_trace": "Hessian trace",
    "top_eigenvalue": "top Hessian eigenvalue",
    "bytes_per_worker_step": "bytes a worker puts on the wire per step",
}
# x axes besides the step: the simulated clock and the bytes sent so far
AXIS_TITLES = {"step": "step", "sim_time_s": "simulated time (s)",
               "bytes_per_worker": "bytes a worker has put on the wire"}


def metric_title(key: str) -> str:
    if key in _TITLES:
        return _TITLES[key]
    title = key.replace("_", " ")
    return f"{title} (%)" if is_accuracy(key) else title


def group_colors(groups: Sequence[Group]) -> dict[str, str]:
    """A colour per group label, by group order: tab10, or tab20 beyond ten groups."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    return {g.label: to_hex(cmap(i % cmap.N)) for i, g in enumerate(groups)}


def plottable_metrics(groups: Sequence[Group]) -> list[str]:
    """CORE_METRICS present in some run, then every other numeric key, sorted."""
    present: set[str] = set()
    for g in groups:
        for r in g.runs:
            present.update(r.metric_keys)
    present -= AXIS_KEYS
    return [k for k in CORE_METRICS if k in present] + sorted(present - set(CORE_METRICS))


def group_curve(group: Group, key: str, x: str = "step"):
    """(xs, mean, std, n) over the union of the runs' x values; NaN where no seed has a value.

    std is the sample standard deviation (ddof=1), NaN where fewer than two seeds have a value.
    """
    series = [r.series(key, x=x) for r in group.runs]
    series = [(xs[np.isfinite(xs)], ys[np.isfinite(xs)]) for xs, ys in series]
    if not series or not any(len(xs) for xs, _ in series):
        empty = np.zeros(0)
        return empty, empty, empty, np.zeros(0, dtype=int)
    grid = np.unique(np.concatenate([xs for xs, _ in series]))
    table = np.full((len(series), len(grid)), np.nan)  # (runs, points)
    for i, (xs, ys) in enumerate(series):
        table[i, np.searchsorted(grid, xs)] = ys  # a repeated x keeps its last value
    finite = np.isfinite(table)
    n = finite.sum(0)
    filled = np.where(finite, table, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, filled.sum(0) / n, np.nan)
        sq = np.where(finite, (table - mean) ** 2, 0.0).sum(0)
        std = np.where(n > 1, np.sqrt(sq / (n - 1)), np.nan)
    return grid, mean, std, n


def _against(group: Group, key: str, x: str):
    """``key`` against the seeds' mean of the logged quantity ``x`` at each evaluation step
    (seeds whose clocks differ are averaged step by step, not on a merged x grid)."""
    steps, mean, std, n = group_curve(group, key)
    xs_steps, xs, _, _ = group_curve(group, x)
    at = dict(zip(xs_steps.tolist(), xs.tolist()))
    return group, np.array([at.get(s, np.nan) for s in steps.tolist()]), mean, std, n


def _use_log(key: str, curves: list[np.ndarray]) -> bool:
    values = np.concatenate([c[np.isfinite(c)] for c in curves]) if curves else np.zeros(0)
    if key in LOG_METRICS:
        return bool((values > 0).any())
    if len(values) == 0 or (values <= 0).any():
        return False
    return values.max() / values.min() > 100.0


def plot_metric(
    groups: Sequence[Group],
    key: str,
    path: str | Path,
    colors: Mapping[str, str] | None = None,
    x: str = "step",
) -> Path | None:
    """One PNG of ``key`` over ``x``, a mean line and ± std band per group.

    Returns the path, or None (and writes nothing) when no run has a finite value of ``key``.
    """
    colors = dict(colors or group_colors(groups))
    if x == "step" or x not in AXIS_TITLES:
        curves = [(g, *group_curve(g, key, x)) for g in groups]
    else:  # a logged cost (simulated time, bytes): its mean over seeds at each step
        curves = [_against(g, key, x) for g in groups]
    curves = [c for c in curves if np.isfinite(c[2]).any()]
    if not curves:
        return None
    log = _use_log(key, [c[2] for c in curves])

    fig = figure((6.4, 4.0))
    ax = fig.add_subplot()
    for g, xs, mean, std, _n in curves:
        color = colors.get(g.label)
        lo, hi = mean - std, mean + std
        if log:  # a band reaching below zero cannot be drawn on a log axis: clip it at the mean
            mean = np.where(mean > 0, mean, np.nan)
            lo = np.where(lo > 0, lo, mean)
        label = f"{g.label} (n={len(g.runs)})"
        if not np.isfinite(mean).any():  # e.g. C-SGD's consensus distance, 0 throughout
            ax.plot([], [], color=color, label=f"{label}: ≤ 0, not drawn on a log axis")
            continue
        few = np.isfinite(mean).sum() < 2  # a single point needs a marker to show
        ax.plot(xs, mean, color=color, lw=1.5, marker="o" if few else None, ms=4, label=label)
        band = np.isfinite(std)
        if band.any():
            ax.fill_between(xs, lo, hi, where=band, color=color, alpha=0.2, lw=0)
    if log:
        ax.set_yscale("log")
    title = metric_title(key) if x == "step" else f"{metric_title(key)} against {AXIS_TITLES[x]}"
    ax.set(xlabel=AXIS_TITLES.get(x, x), ylabel=metric_title(key), title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save(fig, path, dpi=120)


def _file_stem(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key) or "metric"


def plot_groups(
    groups: Sequence[Group],
    out_dir: str | Path,
    metrics: Sequence[str] | None = None,
    x: str = "step",
) -> dict[str, Path]:
    """A PNG per metric (default: ``plottable_metrics``) in ``out_dir``, named ``<metric>.png``.

    Returns {metric: path} for the plots written; metrics without finite values are skipped.
    """
    colors = group_colors(groups)
    out: dict[str, Path] = {}
    for key in plottable_metrics(groups) if metrics is None else metrics:
        path = plot_metric(groups, key, Path(out_dir) / f"{_file_stem(key)}.png", colors, x)
        if path is not None:
            out[key] = path
    return out


def plot_against_cost(groups: Sequence[Group], out_dir: str | Path, key: str = "test_acc"
                      ) -> dict[str, Path]:
    """``key`` against the simulated time and against the bytes sent, where runs logged them:
    {x: path} of ``<key>_vs_<x>.png``."""
    colors = group_colors(groups)
    out: dict[str, Path] = {}
    for x in ("sim_time_s", "bytes_per_worker"):
        if not any(x in r.metric_keys for g in groups for r in g.runs):
            continue
        path = plot_metric(groups, key, Path(out_dir) / f"{key}_vs_{x}.png", colors, x)
        if path is not None:
            out[x] = path
    return out
