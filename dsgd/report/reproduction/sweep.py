"""The learning-rate sweep and the deviation scaling of the D-SGD = ADSAM decomposition, as
statistics, markdown and a figure (from the rows ``dsgd.experiments.equivalence`` returns)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsgd.report.stats import finite, fmt, loglog_slope, mean_of, stat

SWEEP_KEYS = ("consensus", "res_sgd", "res_adsam", "res_2nd")


def regression(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, int]:
    """(slope, its standard error, n) of the least-squares fit of log y on log x over the
    positive points; the se is NaN with fewer than 3 points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True)
           if finite(x) and x > 0 and finite(y) and y > 0]
    n = len(pts)
    slope = loglog_slope([math.exp(p[0]) for p in pts], [math.exp(p[1]) for p in pts])
    if n < 3 or not finite(slope):
        return slope, math.nan, n
    mx = sum(p[0] for p in pts) / n
    my = sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    ssr = sum((p[1] - my - slope * (p[0] - mx)) ** 2 for p in pts)
    return slope, math.sqrt(ssr / (n - 2) / sxx), n


def sweep_finals(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last checkpoint of each (lr, seed, activation)."""
    last: dict[tuple, dict] = {}
    for r in rows:
        key = (r["lr"], r["seed"], r.get("activation", "relu"))
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    return list(last.values())


def sweep_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of the final checkpoint, one row per (activation, lr)."""
    groups: dict[tuple, list[dict]] = {}
    for r in sweep_finals(rows):
        groups.setdefault((r.get("activation", "relu"), r["lr"]), []).append(r)
    out = []
    for (act, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        row: dict[str, Any] = {"activation": act, "lr": lr, "n": len(rs), "steps": rs[0]["step"]}
        for k in (*SWEEP_KEYS, "res_adsam_noise"):
            row[k] = stat([r.get(k) for r in rs])
        out.append(row)
    return out


def sweep_slopes(table: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per activation: log-log slopes of each quantity against eta (all and the three smallest)
    and against sqrt(Tr Xi)."""
    out: dict[str, dict[str, float]] = {}
    for act in sorted({r["activation"] for r in table}):
        rs = sorted((r for r in table if r["activation"] == act), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in rs]
        radius = [math.sqrt(mean_of(r["consensus"])) if mean_of(r["consensus"]) > 0
                  else math.nan for r in rs]
        s = {f"{k}_vs_lr": loglog_slope(lrs, [mean_of(r[k]) for r in rs]) for k in SWEEP_KEYS}
        s.update({f"{k}_vs_radius": loglog_slope(radius, [mean_of(r[k]) for r in rs])
                  for k in SWEEP_KEYS[1:]})
        if len(rs) > 3:  # relative residuals saturate near 1 at large eta
            s.update({f"{k}_vs_lr_3smallest": loglog_slope(lrs[:3], [mean_of(r[k])
                                                                     for r in rs[:3]])
                      for k in SWEEP_KEYS})
        out[act] = s
    return out


def sweep_markdown(table: Sequence[dict[str, Any]]) -> str:
    """The sweep table; each ADSAM residual has its Monte Carlo noise floor beside it."""
    head = ("| activation | lr | steps | seeds | Tr Xi | res SGD | res ADSAM | ADSAM noise "
            "floor | res 2nd order |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['activation']} | {r['lr']:g} | {r['steps']} | {r['n']} | "
        + " | ".join(fmt(r[k]) for k in ("consensus", "res_sgd", "res_adsam",
                                         "res_adsam_noise", "res_2nd")) + " |\n"
        for r in table)
    return head + body


def scaling_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The deviation-scaling table: D-SGD state with every d_j multiplied by s."""
    head = ("| activation | s | Tr Xi | res SGD | res ADSAM (control variate) | its noise "
            "floor | res ADSAM (plain antithetic) | its noise floor | res 2nd order |\n"
            "|---|---|---|---|---|---|---|---|---|\n")
    keys = ("consensus", "res_sgd", "res_adsam", "res_adsam_noise", "res_adsam_plain",
            "res_adsam_plain_noise", "res_2nd")
    body = "".join(f"| {r['activation']} | 1/{round(1 / r['s'])} | "
                   + " | ".join(fmt(r.get(k)) for k in keys) + " |\n" for r in rows)
    slopes = []
    for act in sorted({r["activation"] for r in rows}):
        rs = [r for r in rows if r["activation"] == act]
        slopes.append(f"{act}: " + ", ".join(
            f"{k} {loglog_slope([r['s'] for r in rs], [r.get(k) for r in rs]):.2f}"
            for k in ("res_sgd", "res_adsam", "res_adsam_plain", "res_2nd")))
    return head + body + "\nLog-log slopes against s (theory: res_sgd 2, res_2nd and " \
        "res_adsam 3): " + "; ".join(slopes) + "\n"


def write_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """sweep.json (all rows, the table and the slopes), sweep.md and sweep.png in out_dir."""
    from dsgd.report.figures import plot_sweep

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = sweep_table(rows)
    result = {"rows": list(rows), "table": table, "slopes": sweep_slopes(table)}
    (out / "sweep.json").write_text(json.dumps(result, indent=1))
    md = sweep_markdown(table) + "\nLog-log slopes against eta: " + "; ".join(
        f"{act}: " + ", ".join(f"{k.removesuffix('_vs_lr')} {v:.2f}" for k, v in s.items()
                               if k.endswith("_vs_lr"))
        for act, s in result["slopes"].items()) + "\n"
    (out / "sweep.md").write_text(md)
    plot_sweep(table, out / "sweep.png")
    return result
