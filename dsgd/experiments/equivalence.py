"""The D-SGD = average-direction SAM equivalence as experiments (Zhu et al., ICML 2023, Thm 1).

Each returns JSON-ready rows; tables, slopes and figures are ``dsgd.report.reproduction``'s.
Three measurements:

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

``deviation_scaling``: one D-SGD state with every deviation scaled by s = 1 ... 1/16; the
residuals against g_sgd, g_2nd and g_adsam should scale like s^2, s^3 and s^3, the last only
while above the Monte Carlo noise of its estimate (reported beside it).

``lockstep``: three trajectories from one start on the same mini-batches: D-SGD (m workers),
average-direction SAM on one centralized model with Sigma = Xi(t) taken from the D-SGD run at
the same step, and plain SGD with the same total batch (C-SGD). The theorem says the ADSAM
trajectory stays closer to D-SGD's average w_a(t) than SGD's does.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsgd.engine import Engine
from dsgd.experiments import config as C
from dsgd.metrics._func import make_loss_fn, tree_norm
from dsgd.metrics.consensus import consensus_distance, deviations, sample_xi
from dsgd.metrics.equivalence import adsam_estimate, decompose
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



def _constant_lr_dsgd(base: C.Config, lr: float, steps: int, seed: int, activation: str,
                      eval_samples: int):
    """D-SGD of ``base`` at a constant ``lr`` for ``steps``: (engine, loader, x, y), with x, y a
    fixed batch of ``eval_samples`` training samples on the engine's device."""
    from dsgd.experiments.runner import build

    setup = build(C.with_overrides(base, [
        "train.algorithm=dsgd", f"train.lr={float(lr)!r}", "train.schedule=constant",
        "train.warmup_steps=0", f"train.steps={steps}", f"train.seed={seed}"]))
    set_activation(setup.engine.model, activation)
    x, y = _fixed_batch(setup.dataset, eval_samples)
    dev = setup.engine.w.device
    return setup.engine, setup.loader, x.to(dev), y.to(dev)

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
    control_variate: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train D-SGD (``base`` with a constant learning rate) at each eta in ``lrs``; decompose.

    ``steps`` trains every eta for the same number of steps; ``total_time`` instead trains
    round(total_time / eta) steps, so eta * steps (the gradient-flow time) is equal. At each
    fraction in ``checkpoints`` of the run the decomposition is measured on the first
    ``eval_samples`` training samples (eval mode); g_adsam from ``num_samples`` antithetic
    pairs, with the second-order control variate unless ``control_variate=False``. Returns one
    JSON-ready row per (eta, seed, checkpoint): lr, seed, step, time, consensus, res_sgd,
    res_adsam, res_adsam_noise (its Monte Carlo noise floor), res_2nd, ...
    """

    if (steps is None) == (total_time is None):
        raise ValueError("give exactly one of steps and total_time")
    rows = []
    for seed in seeds:
        for lr in lrs:
            n_steps = steps if steps is not None else max(1, round(total_time / lr))
            engine, loader, x, y = _constant_lr_dsgd(base, lr, n_steps, seed, activation,
                                                     eval_samples)
            marks = sorted({max(1, round(f * n_steps)) for f in checkpoints})
            gen = torch.Generator().manual_seed(seed)
            while engine.step_count < n_steps:
                xb, yb = loader.next_batch()
                engine.step(xb, yb)
                if engine.step_count in marks:
                    avg = engine.module(engine.average_state())
                    loss_fn = make_loss_fn(avg, x, y, buffers=dict(avg.named_buffers()))
                    dec = decompose(loss_fn, engine.params, num_samples=num_samples,
                                    generator=gen, control_variate=control_variate)
                    row = {"lr": float(lr), "seed": seed, "step": engine.step_count,
                           "time": float(lr) * engine.step_count, "activation": activation,
                           **dec.summary(), "loss": float(loss_fn(
                               {k: p.detach() for k, p in avg.named_parameters()}))}
                    row["consensus"] = row.pop("consensus_distance")
                    rows.append(row)
                    if log:
                        log(f"  lr {lr:g} seed {seed} step {engine.step_count}: consensus "
                            f"{row['consensus']:.3g}, res_sgd {row['res_sgd']:.3g}, res_adsam "
                            f"{row['res_adsam']:.3g} (noise {row['res_adsam_noise']:.2g}), "
                            f"res_2nd {row['res_2nd']:.3g}")
    return rows


def deviation_scaling(
    base: C.Config,
    *,
    lr: float,
    steps: int,
    scales: Sequence[float] = (1.0, 0.5, 0.25, 0.125, 0.0625),
    activation: str = "tanh",
    seed: int = 0,
    eval_samples: int = 1024,
    num_samples: int = 64,
) -> list[dict[str, Any]]:
    """Train D-SGD (constant ``lr``) for ``steps``, then decompose at the states with every
    deviation scaled by s, w_a + s (w_j - w_a), for each s in ``scales``.

    Theory (Zhu et al., ICML 2023): res_sgd ~ s^2, res_2nd ~ s^3 and res_adsam ~ s^3. g_adsam
    is estimated twice from the same ``num_samples`` antithetic pairs, with the second-order
    control variate (``res_adsam``, its noise ``res_adsam_noise``) and without
    (``res_adsam_plain``, ``res_adsam_plain_noise``), whose noise floor scales like s^2.
    Returns one JSON-ready row per s.
    """

    engine, loader, x, y = _constant_lr_dsgd(base, lr, steps, seed, activation, eval_samples)
    while engine.step_count < steps:
        engine.step(*loader.next_batch())
    avg = engine.module(engine.average_state())
    loss_fn = make_loss_fn(avg, x, y, buffers=dict(avg.named_buffers()))
    stacked = {k: v.detach() for k, v in engine.params.items()}
    rows = []
    for s in scales:
        state = {k: v.mean(0) + s * (v - v.mean(0)) for k, v in stacked.items()}
        out = {}
        for cv, tag in ((True, ""), (False, "_plain")):
            dec = decompose(loss_fn, state, num_samples=num_samples, control_variate=cv,
                            generator=torch.Generator().manual_seed(seed))
            out[f"res_adsam{tag}"] = dec.res_adsam
            out[f"res_adsam{tag}_noise"] = dec.res_adsam_noise
        rows.append({"activation": activation, "lr": float(lr), "steps": steps, "seed": seed,
                     "s": float(s), "pairs": num_samples, "consensus": dec.consensus_distance,
                     "res_sgd": dec.res_sgd, "res_2nd": dec.res_2nd, **out})
    return rows


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


def adsam_noise_probe(
    x: Tensor, y: Tensor, *, pairs: int, seed: int = 0,
    loss: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> Callable[[dict[str, Engine], int], dict[str, float]]:
    """A ``lockstep`` probe: the Monte Carlo noise of the ADSAM arm's step direction.

    The arm averages m workers' gradients, each at its own ``pairs`` antithetic draws of
    N(0, Xi(t)), so its direction rests on m * pairs independent pairs. The probe estimates the
    smoothed gradient at the ADSAM model on the fixed batch (x, y) from that many pairs and
    returns ``adsam_noise`` = ||its standard error|| / ||its value||: the relative error the
    finite sample count adds to every ADSAM step (0 when Xi = 0)."""

    def probe(engines: dict[str, Engine], step: int) -> dict[str, float]:
        d, a = engines["dsgd"], engines["adsam"]
        if consensus_distance(d.params) == 0:
            return {"adsam_noise": 0.0}
        avg = a.module(a.average_state())
        loss_fn = make_loss_fn(avg, x, y, loss=loss, buffers=dict(avg.named_buffers()))
        w = {k: p.detach() for k, p in avg.named_parameters()}
        g, se = adsam_estimate(loss_fn, w, d.params, d.m * pairs,
                               torch.Generator().manual_seed(seed + step))
        return {"adsam_noise": tree_norm(se) / max(tree_norm(g), 1e-30)}

    return probe
