"""The statistics of every report: one ``stat``, its standard error, one formatter, the log-log
slope and the Spearman correlation. Plain Python and numpy; nothing here imports torch.

A ``Stat`` is ``{"mean", "std", "n", "values"}`` over the finite values (sample std, ddof=1);
``None`` where undefined, so it is JSON-ready as is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

Stat = dict[str, Any]  # {"mean": float | None, "std": float | None, "n": int, "values": [...]}


def finite(v: Any) -> bool:
    """A real, finite number (not a bool, not None)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def stat(values: Sequence[float | None]) -> Stat:
    """Mean and sample std (ddof=1) of the finite values; None where undefined. JSON-ready."""
    ok = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(ok)
    return {
        "mean": float(ok.mean()) if n else None,
        "std": float(ok.std(ddof=1)) if n > 1 else None,
        "n": n,
        "values": [v if v is not None and math.isfinite(v) else None for v in values],
    }


def mean_of(s: Stat | None) -> float:
    """The mean of a Stat, NaN when missing."""
    return float(s["mean"]) if isinstance(s, dict) and finite(s.get("mean")) else math.nan


def se_of(s: Stat | None) -> float:
    """Standard error of the mean, std / sqrt(n); NaN with fewer than two values (one seed
    carries no estimate of its own noise, so nothing measured on it can pass a 2-se test)."""
    if not isinstance(s, dict) or not finite(s.get("std")) or not s.get("n"):
        return math.nan
    return float(s["std"]) / math.sqrt(s["n"])


def format_stat(s: Stat, fmt: str, n_runs: int | None = None, with_std: bool = True) -> str:
    """``mean ± std`` with ``fmt`` (e.g. ".2f"); "—" without values; "(n=k)" when k < n_runs."""
    if not isinstance(s, dict) or s.get("mean") is None:
        return "—"
    text = format(s["mean"], fmt)
    if with_std and s.get("std") is not None:
        text += f" ± {format(s['std'], fmt)}"
    if n_runs is not None and s["n"] < n_runs:
        text += f" (n={s['n']})"
    return text


def fmt(v: Stat | float | None, spec: str = ".3g") -> str:
    """A Stat as ``format_stat`` writes it, a number with ``spec``, "—" when missing."""
    if isinstance(v, dict):
        return format_stat(v, spec)
    return format(v, spec) if finite(v) else "—"


def loglog_slope(xs: Sequence[float], ys: Sequence[float | None]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than 2 positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True)
           if finite(x) and x > 0 and finite(y) and y > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else math.nan


def _ranks(v: Sequence[float]) -> list[float]:
    """Ranks 0..n-1, ties get their average rank."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points."""
    pts = [(x, y) for x, y in zip(xs, ys, strict=True) if finite(x) and finite(y)]
    if len(pts) < 3:
        return math.nan
    rx, ry = _ranks([p[0] for p in pts]), _ranks([p[1] for p in pts])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    vy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (vx * vy) if vx > 0 and vy > 0 else math.nan


def spearman_se(n: int) -> float:
    """The standard error of a Spearman correlation of n independent points under no
    association, 1 / sqrt(n - 1) (its null distribution's std); NaN below 3 points."""
    return 1.0 / math.sqrt(n - 1) if n >= 3 else math.nan
