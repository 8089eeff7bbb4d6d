"""Every figure of the reports, drawn on matplotlib's Agg canvas (no global backend changes).

One helper makes the canvas (``figure``) and one writes the PNG (``save``); each plot exists
once here. Inputs are sequences or arrays (a CPU tensor converts with ``np.asarray``); nothing
here imports torch or an engine.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 110


def figure(figsize: tuple[float, float]):
    """A Figure on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # log-axis tick labels use mathtext; without TeX fonts matplotlib logs a fallback notice
    # per glyph family, which is noise in a training log
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path, dpi: int = DPI, tight: bool = True) -> Path:
    """Write the PNG (``tight``: lay the axes out first; not with a shared colorbar)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------- loss landscapes


def plot_surface(alphas, betas, Z, path: str | Path, levels: int = 30,
                 title: str | None = None) -> Path:
    """Contour plot of one 2D loss surface (``dsgd.metrics.landscape.surface_2d``)."""
    return plot_surfaces({title or "": {"alphas": alphas, "betas": betas, "Z": Z}}, path,
                         levels=levels, span=None)


def plot_surfaces(surfaces: Mapping[str, Mapping[str, Any]], path: str | Path,
                  levels: int = 25, span: float | None = 5.0) -> Path:
    """One contour panel per surface {"alphas", "betas", "Z"}, the same levels in every panel
    (from the lowest value to ``span`` above it, or to the highest when ``span`` is None); the
    centre (0, 0) is the model itself."""
    zs = [np.asarray(s["Z"], dtype=float) for s in surfaces.values()]
    lo = min(z.min() for z in zs)
    hi = max(z.max() for z in zs)
    grid = np.linspace(lo, hi if span is None else min(hi, lo + span), levels)
    fig = figure((4.4 * len(surfaces), 3.8))
    cs = None
    for i, (name, s) in enumerate(surfaces.items()):
        ax = fig.add_subplot(1, len(surfaces), i + 1)
        A, B = np.meshgrid(np.asarray(s["alphas"], dtype=float),
                           np.asarray(s["betas"], dtype=float), indexing="ij")
        cs = ax.contour(A, B, zs[i], levels=grid, cmap="viridis")
        ax.plot([0], [0], "k+", ms=8)
        ax.set(title=name, xlabel="direction 1", ylabel="direction 2" if i == 0 else "")
        ax.title.set_fontsize(8)
    fig.colorbar(cs, ax=fig.axes)
    return save(fig, path, tight=False)


def plot_interpolation(curves: Mapping[str, tuple[Any, Any]], path: str | Path,
                       title: str | None = None, log_y: bool = False) -> Path:
    """Loss against a, one line per ``dsgd.metrics.landscape.interpolate`` output."""
    fig = figure((5, 3.6))
    ax = fig.add_subplot()
    for name, (alphas, losses) in curves.items():
        ax.plot(np.asarray(alphas), np.asarray(losses), marker="o", ms=2, label=name)
    ax.set(xlabel="a  (w = (1 - a) w0 + a w1)", ylabel="loss", title=title or "")
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    return save(fig, path)


# ---------------------------------------------------------------- calibration


def plot_reliability(curves: Mapping[str, Any], path: str | Path,
                     title: str | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per bin, one line per curve.

    A curve is ``dsgd.metrics.uncertainty.reliability_curve``'s (conf, acc, count) or the
    JSON form {"conf", "acc", "count"} (None for empty bins); empty bins are skipped.
    """
    fig = figure((4.6, 4.4))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="perfect calibration")
    for name, c in curves.items():
        conf, acc, count = ((c["conf"], c["acc"], c["count"]) if isinstance(c, Mapping) else c)
        conf = np.array([math.nan if v is None else v for v in np.asarray(conf).tolist()])
        acc = np.array([math.nan if v is None else v for v in np.asarray(acc).tolist()])
        keep = (np.asarray(count) > 0) & np.isfinite(conf)
        ax.plot(conf[keep], acc[keep], marker="o", ms=3, label=name)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=title or "")
    ax.legend(loc="upper left", fontsize=7)
    return save(fig, path)


# ---------------------------------------------------------------- reproduction


def plot_bars(groups: Mapping[str, Sequence[tuple[float, float]]], series: Sequence[str],
              path: str | Path, ylabel: str, title: str) -> Path:
    """Grouped bars: for each x label, one (mean, std) per series (NaN: no bar)."""
    fig = figure((6.8, 3.6))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    names = list(groups)
    for i, s in enumerate(series):
        means = [groups[n][i][0] for n in names]
        stds = [groups[n][i][1] if math.isfinite(groups[n][i][1]) else 0.0 for n in names]
        ax.bar([k + i * width for k in range(len(names))], means, width, yerr=stds, capsize=3,
               label=s)
    ax.set_xticks([k + width * (len(series) - 1) / 2 for k in range(len(names))], names,
                  fontsize=8)
    vals = [m for v in groups.values() for m, _ in v if math.isfinite(m)]
    if vals:
        ax.set_ylim(min(vals) - 3, max(vals) + 2)
    ax.set(ylabel=ylabel, title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_lockstep(runs: Mapping[str, Sequence[Sequence[dict]]], path: str | Path) -> Path:
    """One panel per learning rate: distance of ADSAM and SGD to D-SGD's average (mean ± std
    over seeds); a last panel with the smoothness probes where the runs have them."""
    fig = figure((4.6 * (len(runs) + 1), 3.4))
    for i, (lr, lock) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs) + 1, i + 1)
        steps = np.array([r["step"] for r in lock[0]])
        for key, name, color in (("dist_adsam", "ADSAM, Sigma = Xi(t)", "C1"),
                                 ("dist_sgd", "SGD, same total batch", "C0")):
            v = np.array([[r[key] for r in rows] for rows in lock])
            ax.plot(steps, v.mean(0), color=color, label=name)
            ax.fill_between(steps, v.mean(0) - v.std(0), v.mean(0) + v.std(0), color=color,
                            alpha=0.2)
        ax.set(xlabel="step", ylabel="||w - w_a(t)||",
               title=f"distance to D-SGD's average, lr {lr}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7)
    ax2 = fig.add_subplot(1, len(runs) + 1, len(runs) + 1)
    for lr, lock in runs.items():
        for key, name in (("lip_dsgd", "L at D-SGD average"),
                          ("lip_dsgd_smoothed", "Xi-smoothed L at D-SGD average"),
                          ("lip_sgd", "L along C-SGD")):
            ps = [[r for r in rows if key in r] for rows in lock]
            if not ps[0]:
                continue
            v = np.array([[r[key] for r in rows] for rows in ps])
            ax2.plot([r["step"] for r in ps[0]], v.mean(0), marker="o", ms=3,
                     label=f"{name} (lr {lr})")
    ax2.set(xlabel="step", ylabel="local gradient Lipschitz (mean ratio)",
            title="gradient smoothing")
    ax2.title.set_fontsize(9)
    ax2.legend(fontsize=7)
    return save(fig, path)


def plot_tradeoff(points: Sequence[dict], path: str | Path) -> Path:
    """Final train loss and test accuracy against the mean consensus distance, per run."""
    fig = figure((10, 3.6))
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    keys = sorted({(p["label"], p["total_batch"]) for p in points})
    for i, (lab, tb) in enumerate(keys):
        rs = [p for p in points if (p["label"], p["total_batch"]) == (lab, tb)]
        xs = [max(p["consensus_mean"], 1e-12) for p in rs]
        kw = dict(color=f"C{i}", marker="o", s=18, label=f"{lab}, batch {tb}")
        ax.scatter(xs, [p["train_loss"] for p in rs], **kw)
        ax2.scatter(xs, [p["test_acc"] for p in rs], **kw)
    for a, ylab in ((ax, "final train loss"), (ax2, "final test accuracy (%)")):
        a.set_xscale("log")
        a.set(xlabel="mean consensus distance Tr Xi (C-SGD: 0, drawn at 1e-12)", ylabel=ylab)
    ax.legend(fontsize=6)
    return save(fig, path)


def plot_sweep(table: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Log-log: Tr Xi and the residuals against eta (left) and against sqrt(Tr Xi) (right),
    with reference slopes 2 and 3 through the first point; the ADSAM noise floor dashed."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    def m(s):
        return s["mean"] if isinstance(s, dict) and s.get("mean") is not None else math.nan

    def sd(s):
        return s["std"] if isinstance(s, dict) and s.get("std") is not None else 0.0

    acts = sorted({r["activation"] for r in table})
    fig = figure((10, 3.8 * len(acts)))
    styles = {"consensus": ("k", "o", "Tr Xi"), "res_sgd": ("C0", "s", "res SGD"),
              "res_adsam": ("C1", "^", "res ADSAM"), "res_2nd": ("C2", "v", "res 2nd order")}
    for i, act in enumerate(acts):
        rs = sorted((r for r in table if r["activation"] == act), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in rs]
        rad = [math.sqrt(max(m(r["consensus"]), 0.0)) for r in rs]
        for j, (xs, xlabel) in enumerate(((lrs, "learning rate eta"),
                                          (rad, "sqrt(Tr Xi) (deviation size)"))):
            ax = fig.add_subplot(len(acts), 2, 2 * i + j + 1)
            for k in (styles if j == 0 else list(styles)[1:]):
                color, marker, label = styles[k]
                ax.errorbar(xs, [m(r[k]) for r in rs], yerr=[sd(r[k]) for r in rs],
                            color=color, marker=marker, ms=4, lw=1, capsize=2, label=label)
            noise = [m(r.get("res_adsam_noise")) for r in rs]
            if any(math.isfinite(v) for v in noise):
                ax.plot(xs, noise, color="C1", ls="--", lw=1, label="ADSAM noise floor")
            y0 = m(rs[0]["res_sgd"])
            for p, ls in ((2, ":"), (3, "--")):
                if xs[0] > 0 and y0 > 0:
                    ax.plot(xs, [y0 * (x / xs[0]) ** p for x in xs], color="0.5", ls=ls, lw=1,
                            label=f"slope {p}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_major_formatter(lambda v, _: f"{v:.2g}")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(xlabel=xlabel, title=f"{act} MLP: residual ||g_dsgd - g|| / ||g_dsgd||")
            ax.legend(fontsize=7)
    return save(fig, path)
