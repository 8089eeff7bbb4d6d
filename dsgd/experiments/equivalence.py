"""The D-SGD = average-direction SAM equivalence as experiments (Zhu et al., ICML 2023, Thm 1).

Two measurements:

``lr_sweep``: train D-SGD at several learning rates eta and, at a few checkpoints, decompose the
direction the averaged model follows, g_dsgd = (1/m) sum_j grad L(w_j), against

    g_sgd   = grad L(w_a)                                 (C-SGD at the average)
    g_adsam = E_{eps~N(0,Xi)} grad L(w_a + eps)           (average-direction SAM)
    g_2nd   = grad L(w_a) + grad (1/2) Tr(H Xi)           (its second-order Taylor form)

on one fixed large batch (``dsgd.metrics.equivalence.decompose``). The theorem predicts
Tr Xi ~ eta^2, ||g_dsgd - g_sgd|| = O(||d||^2) ~ eta^2 and ||g_dsgd - g_2nd|| = O(||d||^3) ~ eta^3
when L has four continuous derivatives; for ReLU nets the Taylor form can fail while the
Gaussian-smoothed gradient g_adsam still explains g_dsgd (the paper's gradient-smoothing point),
so ``activation`` can swap the MLP's ReLUs for tanh/GELU to see the smooth regime.

``lockstep``: three trajectories from one start on the same mini-batches: D-SGD (m workers),
average-direction SAM on one centralized model with Sigma = Xi(t) taken from the D-SGD run at
the same step, and plain SGD with the same total batch (C-SGD). The theorem says the ADSAM
trajectory stays closer to D-SGD's average w_a(t) than SGD's does.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsgd.engine import Engine
from dsgd.experiments import config as C
from dsgd.metrics._func import make_loss_fn
from dsgd.metrics.consensus import consensus_distance, deviations, sample_xi
from dsgd.metrics.equivalence import decompose
from dsgd.metrics.smoothness import gradient_lipschitz, smoothed_gradient_lipschitz
from dsgd.optim.avg_sam import AvgSAM, from_deviations
from dsgd.topology import Topology

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh,
                                                   "gelu": nn.GELU, "softplus": nn.Softplus}


def set_activation(model: nn.Module, name: str) -> nn.Module:
    """Replace every nn.ReLU in ``model`` by ``name`` (in place; parameters are unchanged)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    if name == "relu":
        return model
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, ACTIVATIONS[name]())
    return model


def _fixed_batch(dataset, n: int) -> tuple[Tensor, Tensor]:
    n = min(n, len(dataset.y_train))
    return dataset.x_train[:n], dataset.y_train[:n]


# ---------------------------------------------------------------- learning-rate sweep


def lr_sweep(
    base: C.Config,
    lrs: Sequence[float],
    *,
    steps: int | None = None,
    total_time: float | None = None,
    checkpoints: Sequence[float] = (0.5, 1.0),
    seeds: Sequence[int] = (0,),
    activation: str = "relu",
    eval_samples: int = 1024,
    num_samples: int = 16,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train D-SGD (``base`` with a constant learning rate) at each eta in ``lrs``; decompose.

    ``steps`` trains every eta for the same number of steps; ``total_time`` instead trains
    round(total_time / eta) steps, so eta * steps (the gradient-flow time) is equal. At each
    fraction in ``checkpoints`` of the run the decomposition is measured on the first
    ``eval_samples`` training samples (eval mode). Returns one JSON-ready row per
    (eta, seed, checkpoint): lr, seed, step, time, consensus, res_sgd, res_adsam, res_2nd, ...
    """
    from dsgd.experiments.runner import build

    if (steps is None) == (total_time is None):
        raise ValueError("give exactly one of steps and total_time")
    rows = []
    for seed in seeds:
        for lr in lrs:
            n_steps = steps if steps is not None else max(1, round(total_time / lr))
            cfg = C.from_dict(C.apply_overrides(C.to_dict(base), [
                "train.algorithm=dsgd", f"train.lr={float(lr)!r}", "train.schedule=constant",
                "train.warmup_steps=0", f"train.steps={n_steps}", f"train.seed={seed}"]))
            setup = build(cfg)
            engine, loader = setup.engine, setup.loader
            set_activation(engine.model, activation)
            x, y = _fixed_batch(setup.dataset, eval_samples)
            x, y = x.to(engine.w.device), y.to(engine.w.device)
            marks = sorted({max(1, round(f * n_steps)) for f in checkpoints})
            gen = torch.Generator().manual_seed(seed)
            while engine.step_count < n_steps:
                xb, yb = loader.next_batch()
                engine.step(xb, yb)
                if engine.step_count in marks:
                    avg = engine.module(engine.average_state())
                    loss_fn = make_loss_fn(avg, x, y, buffers=dict(avg.named_buffers()))
                    dec = decompose(loss_fn, engine.params, num_samples=num_samples,
                                    generator=gen)
                    row = {"lr": float(lr), "seed": seed, "step": engine.step_count,
                           "time": float(lr) * engine.step_count, "activation": activation,
                           **dec.summary(), "loss": float(loss_fn(
                               {k: p.detach() for k, p in avg.named_parameters()}))}
                    row["consensus"] = row.pop("consensus_distance")
                    rows.append(row)
                    if log:
                        log(f"  lr {lr:g} seed {seed} step {engine.step_count}: consensus "
                            f"{row['consensus']:.3g}, res_sgd {row['res_sgd']:.3g}, res_adsam "
                            f"{row['res_adsam']:.3g}, res_2nd {row['res_2nd']:.3g}")
    return rows


def final_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The last checkpoint of each (lr, seed, activation)."""
    last: dict[tuple, dict] = {}
    for r in rows:
        key = (r["lr"], r["seed"], r.get("activation", "relu"))
        if key not in last or r["step"] > last[key]["step"]:
            last[key] = r
    return list(last.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    mean = sum(v) / len(v)
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return mean, std


SWEEP_KEYS = ("consensus", "res_sgd", "res_adsam", "res_2nd")


def sweep_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of the final checkpoint, one row per (activation, lr)."""
    groups: dict[tuple, list[dict]] = {}
    for r in final_rows(rows):
        groups.setdefault((r.get("activation", "relu"), r["lr"]), []).append(r)
    out = []
    for (act, lr), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        row: dict[str, Any] = {"activation": act, "lr": lr, "n": len(rs),
                               "steps": rs[0]["step"]}
        for k in SWEEP_KEYS:
            row[k], row[k + "_std"] = _mean_std([r[k] for r in rs])
        out.append(row)
    return out


def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x (NaN with fewer than 2 positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True)
           if x > 0 and y is not None and math.isfinite(y) and y > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx > 0 else math.nan


def sweep_slopes(table: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per activation: log-log slopes of each quantity against eta and against sqrt(Tr Xi)."""
    out: dict[str, dict[str, float]] = {}
    for act in sorted({r["activation"] for r in table}):
        rs = [r for r in table if r["activation"] == act]
        lrs = [r["lr"] for r in rs]
        radius = [math.sqrt(r["consensus"]) if r["consensus"] > 0 else math.nan for r in rs]
        s = {f"{k}_vs_lr": loglog_slope(lrs, [r[k] for r in rs]) for k in SWEEP_KEYS}
        s.update({f"{k}_vs_radius": loglog_slope(radius, [r[k] for r in rs])
                  for k in SWEEP_KEYS[1:]})
        # the asymptotic regime: relative residuals saturate near 1 at large eta
        small = sorted(rs, key=lambda r: r["lr"])[:3]
        if len(small) < len(rs):
            s.update({f"{k}_vs_lr_3smallest": loglog_slope([r["lr"] for r in small],
                                                           [r[k] for r in small])
                      for k in SWEEP_KEYS})
        out[act] = s
    return out


def plot_sweep(table: Sequence[dict[str, Any]], path: str | Path, dpi: int = 100) -> None:
    """Log-log: consensus and residuals against eta (left) and against sqrt(Tr Xi) (right),
    with reference slopes 2 and 3 (left) / 2 and 3 (right) through the first point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acts = sorted({r["activation"] for r in table})
    fig = Figure(figsize=(10, 3.8 * len(acts)))
    FigureCanvasAgg(fig)
    styles = {"consensus": ("k", "o", "Tr Xi"), "res_sgd": ("C0", "s", "res SGD"),
              "res_adsam": ("C1", "^", "res ADSAM"), "res_2nd": ("C2", "v", "res 2nd order")}
    for i, act in enumerate(acts):
        rs = sorted((r for r in table if r["activation"] == act), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in rs]
        rad = [math.sqrt(max(r["consensus"], 0.0)) for r in rs]
        for j, (xs, xlabel) in enumerate(((lrs, "learning rate eta"),
                                          (rad, "sqrt(Tr Xi) (deviation size)"))):
            ax = fig.add_subplot(len(acts), 2, 2 * i + j + 1)
            keys = SWEEP_KEYS if j == 0 else SWEEP_KEYS[1:]
            for k in keys:
                color, marker, label = styles[k]
                ys = [r[k] for r in rs]
                err = [r.get(k + "_std") for r in rs]
                err = [e if e is not None and math.isfinite(e) else 0.0 for e in err]
                ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, ms=4, lw=1,
                            capsize=2, label=label)
            y0 = rs[0]["res_sgd"]
            for p, ls in ((2, ":"), (3, "--")):
                if xs[0] > 0 and y0 and y0 > 0:
                    ax.plot(xs, [y0 * (x / xs[0]) ** p for x in xs], color="0.5", ls=ls, lw=1,
                            label=f"slope {p}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

            ax.xaxis.set_major_locator(FixedLocator(xs))
            ax.xaxis.set_major_formatter(lambda v, _: f"{v:.2g}")
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set(xlabel=xlabel, title=f"{act} MLP: residual ||g_dsgd - g|| / ||g_dsgd||")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def _fmt(v: float, std: float | None = None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    text = f"{v:.3g}"
    if std is not None and math.isfinite(std):
        text += f" ± {std:.2g}"
    return text


def sweep_markdown(table: Sequence[dict[str, Any]]) -> str:
    head = ("| activation | lr | steps | seeds | Tr Xi | res SGD | res ADSAM | res 2nd order |\n"
            "|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['activation']} | {r['lr']:g} | {r['steps']} | {r['n']} | "
        + " | ".join(_fmt(r[k], r[k + "_std"]) for k in SWEEP_KEYS) + " |\n"
        for r in table)
    return head + body


def write_sweep(rows: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Any]:
    """sweep.json (all rows, the table and the slopes), sweep.md and sweep.png in out_dir."""
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


# ---------------------------------------------------------------- lockstep trajectories


def _flat_mean(engine: Engine) -> Tensor:
    return engine.w.mean(0)  # (P,) the average model (every row for C-SGD)


def lockstep(
    model: nn.Module,
    topology: Topology,
    batches: Iterator[tuple[Tensor, Tensor]],
    *,
    lr: float | Callable[[int], float],
    steps: int,
    num_samples: int = 2,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    strategy: str = "auto",
    seed: int = 0,
    record_every: int = 1,
    probe: Callable[[dict[str, Engine], int], dict[str, float]] | None = None,
    probe_every: int | None = None,
) -> list[dict[str, float]]:
    """D-SGD, centralized average-direction SAM with Sigma = Xi_dsgd(t), and C-SGD in lockstep.

    All three start from ``model``'s weights and see the same mini-batches x: (m, B, ...) each
    step. The ADSAM model is one centralized model (kept as m identical rows) whose gradient at
    step t is (1/m) sum_j (1/K) sum_k grad L_j(w + eps_jk), eps ~ N(0, Xi(t)), with Xi(t) the
    consensus covariance of the D-SGD workers *before* their step t (antithetic pairs, K =
    ``num_samples``); SGD uses (1/m) sum_j grad L_j(w). Returns one row every ``record_every``
    steps: step, consensus, dist_adsam = ||w_adsam - w_a||, dist_sgd = ||w_sgd - w_a||,
    dist_adsam_sgd, travel = ||w_a(t) - w_a(0)|| (plus ``probe(engines, step)``'s values every
    ``probe_every`` steps).
    """
    def engine(algorithm: str, rule=None) -> Engine:
        return Engine(copy.deepcopy(model), topology, algorithm=algorithm, lr=lr, loss=loss,
                      strategy=strategy, gradient_rule=rule, seed=seed)

    engines = {"dsgd": engine("dsgd"), "adsam": engine("csgd"), "sgd": engine("csgd")}
    w0 = _flat_mean(engines["dsgd"]).clone()
    rows: list[dict[str, float]] = []

    def record(step: int) -> None:
        w_a = _flat_mean(engines["dsgd"])
        wad, wsg = _flat_mean(engines["adsam"]), _flat_mean(engines["sgd"])
        row = {"step": step, "consensus": engines["dsgd"].consensus_distance(),
               "dist_adsam": float((wad - w_a).norm()), "dist_sgd": float((wsg - w_a).norm()),
               "dist_adsam_sgd": float((wad - wsg).norm()), "travel": float((w_a - w0).norm())}
        if probe is not None and probe_every and step % probe_every == 0:
            row.update(probe(engines, step))
        rows.append(row)

    record(0)
    for t in range(steps):
        x, y = next(batches)
        devs = deviations(engines["dsgd"].params)  # Xi(t) of the pre-step D-SGD state
        engines["adsam"].gradient_rule = AvgSAM(from_deviations(devs), num_samples=num_samples,
                                                antithetic=True)
        for e in engines.values():
            e.step(x, y)
        if (t + 1) % record_every == 0 or t + 1 == steps:
            record(t + 1)
    return rows


def smoothness_probe(
    x: Tensor, y: Tensor, *, radius: float, num_dirs: int = 8, num_samples: int = 8,
    seed: int = 0, loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Callable[[dict[str, Engine], int], dict[str, float]]:
    """A ``lockstep`` probe: local gradient-Lipschitz estimates (``dsgd.metrics.smoothness``)
    on the fixed batch (x, y) at D-SGD's average (of L and of the Xi-smoothed L) and at the
    C-SGD model (of L), all with radius ``radius`` and the same random directions."""

    def probe(engines: dict[str, Engine], step: int) -> dict[str, float]:
        out = {}
        d = engines["dsgd"]
        for name, e in (("dsgd", d), ("sgd", engines["sgd"])):
            avg = e.module(e.average_state())
            loss_fn = make_loss_fn(avg, x, y, loss=loss, buffers=dict(avg.named_buffers()))
            w = {k: p.detach() for k, p in avg.named_parameters()}
            gen = torch.Generator().manual_seed(seed + step)
            out[f"lip_{name}"] = gradient_lipschitz(loss_fn, w, radius, num_dirs, gen).mean
            if name == "dsgd" and consensus_distance(d.params) > 0:
                stacked = d.params

                def sampler(n, g, stacked=stacked):
                    return sample_xi(stacked, n, g)

                gen = torch.Generator().manual_seed(seed + step)
                out["lip_dsgd_smoothed"] = smoothed_gradient_lipschitz(
                    loss_fn, w, sampler, radius, num_dirs, num_samples, gen).mean
        return out

    return probe


def plot_lockstep(runs: dict[str, list[list[dict[str, float]]]], path: str | Path,
                  dpi: int = 100) -> None:
    """Distance to D-SGD's average over time, mean ± std over seeds, for each label in runs."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    ax, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, seeds in runs.items():
        steps = np.array([r["step"] for r in seeds[0]])
        for key, name, color in (("dist_adsam", "ADSAM (Sigma = Xi(t))", "C1"),
                                 ("dist_sgd", "SGD (C-SGD)", "C0")):
            v = np.array([[r[key] for r in rows] for rows in seeds])
            mean, std = v.mean(0), v.std(0)
            ax.plot(steps, mean, color=color, label=f"{name} {label}".strip())
            ax.fill_between(steps, mean - std, mean + std, color=color, alpha=0.2)
        ratio = np.array([[r["dist_adsam"] / r["dist_sgd"] if r["dist_sgd"] > 0 else np.nan
                           for r in rows] for rows in seeds])
        ax2.plot(steps, np.nanmean(ratio, 0), label=label or "ratio")
    ax.set(xlabel="step", ylabel="||w - w_a(D-SGD)||", title="distance to D-SGD's average")
    ax.legend(fontsize=7)
    ax2.axhline(1.0, color="0.5", ls="--", lw=1)
    ax2.set(xlabel="step", ylabel="dist ADSAM / dist SGD", title="ratio (< 1: ADSAM closer)")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
